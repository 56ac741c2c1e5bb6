"""PIRL (Misra & van der Maaten 2020, "Self-Supervised Learning of Pretext-Invariant
Representations", arXiv 1912.01991): an image and its jigsaw transform are pulled together
through a memory bank of one embedding per image of the corpus.

Two representations per image I (Sec. 3.3, 4.1 of the paper): f(v_I), the image's own view
(:func:`slip.data.views.pirl_views`) through the tower and a linear projection to 128-d; and
g(v_It), its jigsaw transform: nine tiles from a 3 x 3 grid of one crop, each through the same
tower and a linear projection to 128-d, the nine concatenated in a random order (the data puts
a random cell in each slot, so they are concatenated here in slot order) and projected linearly
to 128-d. Both are L2-normalised.

Memory bank (Sec. 3.2): one 128-d row m_I per image of the corpus, indexed by each sample's
global index in the shards' index (``batch["index"]``), initialised to random unit vectors and,
after every applied update, for every image of the global batch
m_I <- normalize(0.5 m_I + 0.5 f(v_I)) (``objective.bank_momentum``; a sample that occurs twice in
one global batch takes the last occurrence's f).

Loss (Eq. 2-5; Wu et al. 2018's NCE, :func:`slip.losses.nce_loss`): with s(a, b) = a . b / tau on
unit vectors, tau = 0.07, N bank rows, M = 32,000 negatives (``objective.nce_negatives``),
P = exp(s) / Z and h = P / (P + M / N),
L_NCE(m_I, v) = -log h(m_I, v) - sum over the negatives I' of log(1 - h(v, m_I')), and the loss
is lambda L_NCE(m_I, g(v_It)) + (1 - lambda) L_NCE(m_I, f(v_I)), lambda = 0.5
(``objective.pirl_lambda``), averaged over the batch. The positive m_I and the negatives are read
from the bank before this step's update; no gradient flows into the bank. Z is estimated on the
first step, separately for each term, as N times the mean of exp(s) over that step's (sample,
negative) pairs of the global batch (Wu et al.'s Monte-Carlo estimate), then kept fixed; it is a
buffer (``nce_z``), so a resumed run uses the same.

Negatives: one set of M rows per step, drawn uniformly WITH replacement from the whole bank by a
generator seeded with ``train.seed`` and the number of applied updates (``num_updates``, a
buffer): the same on every rank and after a resume. They are shared by every sample of the
global batch (Wu et al.'s and VISSL's code draw per sample; the expected loss is the same, and a
shared set costs M rows per step rather than B x M), and a sample's own row is left out of its
sum, as the paper draws them "from D excluding I" (M stays the nominal count in h).

Sharding over ranks: rank r holds the bank rows i with i % world == r (a plain tensor, not a
buffer: DDP's broadcast of buffers would overwrite every rank's share with rank 0's). Each step
the global batch's indices and the negatives' are looked up by ownership, each rank writing the
rows it holds into a zero tensor and one all-reduce (sum) giving every rank all of them; after
the optimizer step the global batch's f(v_I) and indices are all-gathered and each rank updates
the rows it holds. W ranks of batch B thus compute exactly what one process of batch W x B does
(same negatives, loss, Z and bank). Checkpoints hold the bank once, in global row order, gathered
in chunks of :attr:`PIRL.gather_chunk_rows` rows (:meth:`PIRL.gathered_state`); a resume with
another number of ranks reshards it (:meth:`PIRL.load_gathered_state`).

Not verified against the paper's text: the augmentation of the image and of the tiles and the
parent crop's scale (see :func:`slip.data.views.pirl_views`, taken from VISSL's reproduction),
and the optimisation of the ResNet-50 recipe (``configs/imagenet/pirl_resnet50.yaml``).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.views import PIRL_GRID, MethodViews, pirl_views
from ..distributed import all_gather_no_grad, all_reduce_, get_rank, get_world_size
from ..losses import _fp32, _up, nce_loss
from ..runtime import host_to_device
from .base import POOLED, SSLMethod, register_method

TILES = PIRL_GRID * PIRL_GRID
_MASK63 = (1 << 63) - 1


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (the run's seed, a purpose tag, a counter)."""
    out = 0
    for p in parts:
        out = (out * 1_000_003 + int(p)) & _MASK63
    return out


@register_method("pirl")
class PIRL(SSLMethod):
    """Heads (the paper's, Sec. 4.1): ``image_head`` (f: width -> ``out_dim``), ``tile_head``
    (each tile: width -> ``out_dim``) and ``jigsaw_head`` (g: 9 x ``out_dim`` -> ``out_dim``),
    all linear; 128-d in the recipes (``model.ssl_head.out_dim``). Temperature 0.07. The memory
    bank is allocated by :meth:`configure_training` (the trainer passes the corpus size)."""

    view_roles = (POOLED,) * (1 + TILES)  # the image's view, then the nine tile slots
    default_temperature = 0.07
    needs_sample_index = True
    # Bank rows per collective when gathering the bank for a checkpoint (128 MiB of 128-d fp32)
    gather_chunk_rows: ClassVar[int] = 1 << 18
    # Rows per draw of the random initial bank; fixed, so the bank is the same for any ranks
    _init_chunk_rows: ClassVar[int] = 1 << 16

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__(encoder, width, head)
        patch = getattr(getattr(encoder, "patch_embed", None), "patch_size", None)  # a ViT's; None for a ResNet
        self._patch_size = int(patch[0]) if patch is not None else 16
        d = head.out_dim
        self.image_head = nn.Linear(width, d)
        self.tile_head = nn.Linear(width, d)
        self.jigsaw_head = nn.Linear(TILES * d, d)
        self.register_buffer("nce_z", torch.zeros(2))  # Z of the jigsaw term, of the image term; 0: not estimated
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))  # seeds the negatives
        self.bank: torch.Tensor | None = None  # this rank's rows i % world == rank, in order
        self.corpus_size = 0
        self.num_negatives, self.lam, self.bank_momentum, self.seed = 32000, 0.5, 0.5, 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def declare_views(cls, image_size, *, patch_size: int = 16, mask_ratio: float = 0.4,
                      tokenizer_size: int | None = None) -> MethodViews:
        return MethodViews(clip=None, ssl=pirl_views(image_size, patch_size=patch_size))

    def data_views(self, image_size: int, mask_ratio: float = 0.4, objective=None) -> MethodViews:
        """The tiles in whole patches of this tower's ViT."""
        return self.declare_views(image_size, patch_size=self._patch_size)

    # ------------------------------------------------------------------------------ the bank
    def configure_training(self, objective, steps_per_epoch: int, total_steps: int, *,
                           corpus_size: int | None = None, seed: int = 0) -> None:
        if not corpus_size or corpus_size < 1:
            raise ValueError("PIRL's memory bank needs the corpus size (one row per sample of the shards' index): "
                             "configure_training(..., corpus_size=N)")
        self.num_negatives, self.lam = objective.nce_negatives, objective.pirl_lambda
        self.bank_momentum, self.seed, self.corpus_size = objective.bank_momentum, seed, corpus_size
        self.bank = self._initial_bank(corpus_size, self.nce_z.device)

    def _rows_held(self, rank: int, world: int) -> int:
        return len(range(rank, self.corpus_size, world))

    @torch.no_grad()
    def _initial_bank(self, n: int, device: torch.device) -> torch.Tensor:
        """Random unit vectors, drawn chunk by chunk by a generator of ``device`` seeded with the
        run's seed and the chunk: row i is the same for any number of ranks (each keeps its own)."""
        world, rank = get_world_size(), get_rank()
        d = self.jigsaw_head.out_features
        bank = torch.empty(self._rows_held(rank, world), d, device=device)
        generator = torch.Generator(device)
        for chunk, start in enumerate(range(0, n, self._init_chunk_rows)):
            stop = min(n, start + self._init_chunk_rows)
            generator.manual_seed(_seed(self.seed, 1, chunk))
            rows = F.normalize(torch.randn(stop - start, d, generator=generator, device=device), dim=1)
            first = start + (rank - start) % world  # this rank's first row of the chunk
            mine = rows[first - start::world]
            bank[first // world:first // world + mine.shape[0]] = mine
        return bank

    def _require_bank(self) -> torch.Tensor:
        if self.bank is None:
            raise RuntimeError("PIRL's memory bank is not allocated: the trainer calls configure_training(..., "
                               "corpus_size=N) before the first step")
        return self.bank

    @torch.no_grad()
    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """Bank rows of the global indices ``index`` (the same tensor on every rank), on every
        rank: each writes the rows it holds into zeros and one all-reduce (sum) fills the rest."""
        bank = self._require_bank()
        world, rank = get_world_size(), get_rank()
        index = index.to(bank.device)
        if bank.shape[0] == 0:  # more ranks than rows
            rows = torch.zeros(index.shape[0], bank.shape[1], dtype=bank.dtype, device=bank.device)
        else:
            local = torch.div(index, world, rounding_mode="floor").clamp_(max=bank.shape[0] - 1)
            rows = torch.where((index % world == rank)[:, None], bank[local], 0.0)
        return all_reduce_(rows)

    def draw_negatives(self) -> torch.Tensor:
        """This step's negatives: ``nce_negatives`` indices uniform over the bank, with
        replacement, from a generator seeded by the run's seed and ``num_updates``."""
        bank = self._require_bank()
        generator = torch.Generator().manual_seed(_seed(self.seed, 2, self.host_count("num_updates")))
        return host_to_device(torch.randint(self.corpus_size, (self.num_negatives,), generator=generator), bank.device)

    @torch.no_grad()
    def update_bank(self, embeds: torch.Tensor, index: torch.Tensor) -> None:
        """m_i <- normalize(w m_i + (1 - w) f_i) for the rows this rank holds, ``embeds`` (normalised
        f) and ``index`` being the whole global batch's (the same on every rank); of a sample that
        occurs more than once, the last occurrence's f is taken."""
        bank = self._require_bank()
        world, rank = get_world_size(), get_rank()
        index = index.to(bank.device)
        unique, inverse = torch.unique(index, return_inverse=True)
        order = torch.arange(index.shape[0], device=index.device)
        last = torch.full((unique.shape[0],), -1, dtype=torch.long, device=index.device)
        last.scatter_reduce_(0, inverse, order, reduce="amax")
        keep = torch.zeros(index.shape[0], dtype=torch.bool, device=index.device)
        keep[last] = True
        keep &= index % world == rank
        rows = torch.div(index[keep], world, rounding_mode="floor")
        w = self.bank_momentum
        bank[rows] = F.normalize(w * bank[rows] + (1 - w) * embeds[keep].to(bank.device, bank.dtype), dim=1)

    def gathered_state(self) -> dict[str, torch.Tensor]:
        """The whole bank in global row order on rank 0 (CPU), gathered ``gather_chunk_rows``
        rows per collective, so no rank holds more than a chunk beyond its own share."""
        if self.bank is None:
            return {}
        out = torch.empty(self.corpus_size, self.bank.shape[1], dtype=self.bank.dtype) if get_rank() == 0 else None
        for start in range(0, self.corpus_size, self.gather_chunk_rows):
            stop = min(self.corpus_size, start + self.gather_chunk_rows)
            chunk = self.lookup(torch.arange(start, stop, device=self.bank.device))
            if out is not None:
                out[start:stop] = chunk.cpu()
        return {} if out is None else {"bank": out}

    def load_gathered_state(self, state: dict[str, torch.Tensor]) -> None:
        bank = self._require_bank()
        saved = state.get("bank")
        if saved is None:
            raise RuntimeError("the checkpoint holds no PIRL memory bank (its ssl_state has no 'bank'); it cannot be "
                               "resumed exactly. Start a new train.output_dir (train.init_from=CHECKPOINT keeps its "
                               "weights with a fresh bank)")
        if tuple(saved.shape) != (self.corpus_size, bank.shape[1]):
            raise ValueError(f"the checkpoint's PIRL memory bank has {tuple(saved.shape)} rows x dims; this run's "
                             f"corpus has {self.corpus_size} samples of {bank.shape[1]}-d embeddings (other shards?)")
        world, rank = get_world_size(), get_rank()
        self.bank = saved[rank::world].contiguous().to(device=bank.device, dtype=bank.dtype)

    # ---------------------------------------------------------------------------- the loss
    def forward(self, feats: list[torch.Tensor], targets=None, patch_mask=None) -> dict:
        image, tiles = feats[0], feats[1:]
        n = image.shape[0]
        slots = self.tile_head(torch.cat(tiles))  # (9 n, d), slot after slot
        slots = slots.reshape(len(tiles), n, -1).transpose(0, 1).reshape(n, -1)  # (n, 9 d), in slot order
        return {"f": self.image_head(image), "g": self.jigsaw_head(slots)}

    @property
    def z_estimated(self) -> bool:
        """Whether ``nce_z`` holds the estimate (read from the device once, see ``host_count``)."""
        return bool(self.host_count("z_estimated", lambda: bool((self.nce_z > 0).all())))

    @torch.no_grad()
    def estimate_z(self, embeds: list[torch.Tensor], negatives: torch.Tensor, exclude: torch.Tensor,
                   temperature: float) -> None:
        """Z of each term: N times the mean of exp(s) over this step's (sample, negative) pairs of
        the global batch (own rows left out), one all-reduce for both; kept in ``nce_z``."""
        sums = []
        for v in embeds:
            e = torch.exp(v.double() @ negatives.double().t() / temperature).masked_fill(exclude, 0.0)
            sums += [e.sum(), (~exclude).sum().double()]
        total = all_reduce_(torch.stack(sums))
        z = [self.corpus_size * total[i] / total[i + 1].clamp(min=1) for i in range(0, len(sums), 2)]
        self.nce_z.copy_(torch.stack(z).to(self.nce_z.dtype))
        self.keep_host_count("z_estimated", 1)

    def loss(self, out: dict, temperature: float | None = None) -> dict:
        index = out.get("index")
        if index is None:
            raise RuntimeError("PIRL needs each sample's global index (the batch's 'index', from the shards' "
                               "index.json): call the model with index=batch['index']")
        bank = self._require_bank()
        tau = temperature or self.default_temperature
        local = index.to(bank.device, torch.long)
        everyone = all_gather_no_grad(local)
        drawn = self.draw_negatives()
        rows = self.lookup(torch.cat([everyone, drawn]))
        start = get_rank() * local.shape[0]
        positives, negatives = rows[start:start + local.shape[0]], rows[everyone.shape[0]:]
        exclude = drawn[None, :] == local[:, None]  # a sample's own row is no negative of it
        with _fp32(out["f"]):
            f, g = F.normalize(_up(out["f"]), dim=1), F.normalize(_up(out["g"]), dim=1)
            if not self.z_estimated:
                self.estimate_z([g.detach(), f.detach()], negatives, exclude, tau)
            log_z = self.nce_z.float().log()
            jigsaw = nce_loss(g, positives, negatives, log_z[0], self.corpus_size, tau, exclude)
            image = nce_loss(f, positives, negatives, log_z[1], self.corpus_size, tau, exclude)
            loss = (self.lam * jigsaw["loss"] + (1 - self.lam) * image["loss"]).mean()
        # The bank takes f after the optimizer step (on_step_end): a skipped update leaves it alone.
        self._pending = (f.detach(), local)
        return {"loss": loss, "ssl_loss": loss, "ssl_acc": jigsaw["acc"], "ssl_acc_image": image["acc"]}

    def on_step_end(self, step: int, total_steps: int, encoder: nn.Module, base_momentum: float | None = None) -> dict:
        if self._pending is not None:
            embeds, index = self._pending
            self.update_bank(all_gather_no_grad(embeds), all_gather_no_grad(index))
            self._pending = None
        self.advance_count("num_updates")
        return {}
