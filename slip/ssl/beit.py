"""BEiT (Bao et al. 2021) as SLIP's SSL branch: masked image modelling against a visual tokenizer.

Per image, one crop is cut at two sizes (:func:`slip.data.views.beit_views`): the tower's view
(224 px) and the tokenizer's (112 px for the DALL-E/FLAVA codebook). About 40% of the tower's
patches are masked in blocks (:class:`~slip.ssl.masking.BlockMaskGenerator`, drawn in the data
workers); their patch embeddings are replaced by a learned mask token before the position
embedding, and a linear head over the tokenizer's vocabulary predicts, from the tower's final
(normalised) tokens, the code the tokenizer gives each masked patch. Loss: cross-entropy over
the masked positions of the batch.

The tokenizer is frozen and is not part of the model: it is attached with
:meth:`BEiT.attach_visual_tokenizer` (the trainer loads it from ``objective.tokenizer``), kept
out of the state dict, and moved to the views' device when first used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as D
from ..data.views import MethodViews, beit_views
from .base import MASKED, TARGET, SSLMethod, register_method
from .masking import beit_mask_generator


@register_method("beit")
class BEiT(SSLMethod):
    """Masked image modelling: ``mask_token`` (1, 1, width) and ``lm_head`` (width -> vocabulary).

    Views: ``masked`` (the tower's, with ``patch_mask``) and ``target`` (the tokenizer's). The
    vocabulary size is ``head.vocab_size`` (8192 for the DALL-E/FLAVA codebook); both are
    initialised with a truncated normal of std 0.02, as in BEiT.
    """

    view_roles = (MASKED, TARGET)
    needs_visual_tokenizer = True

    def __init__(self, encoder: nn.Module, width: int, head):
        super().__init__(encoder, width, head)
        if not hasattr(encoder, "patch_embed"):
            raise ValueError(f"BEiT masks patch tokens, which a {type(encoder).__name__} tower has none of; "
                             "use a ViT tower")
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.vocab_size = int(head.vocab_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.lm_head = nn.Linear(width, self.vocab_size)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
        object.__setattr__(self, "_tokenizer", None)  # see attach_visual_tokenizer
        # The most patches a mask of the training data holds (its generator's target), set by
        # data_views: the masked tokens are then picked in fixed-size slots (see forward).
        self.mask_slots: int | None = None

    # -- the tokenizer (held outside the module tree) ------------------------------------------
    def attach_visual_tokenizer(self, tokenizer) -> None:
        """Use ``tokenizer`` (a :class:`~slip.ssl.visual_tokenizers.VisualTokenizer`) for the targets.

        It is stored as a plain attribute, not a submodule: it is not saved in checkpoints, not
        wrapped by DDP and not converted by ``model.to(dtype)``.
        """
        if tokenizer.vocab_size != self.vocab_size:
            raise ValueError(f"the visual tokenizer has {tokenizer.vocab_size} codes but the BEiT head predicts "
                             f"{self.vocab_size} (ssl_head.vocab_size)")
        if tuple(tokenizer.grid) != self.grid:
            raise ValueError(f"the visual tokenizer gives a {tokenizer.grid[0]}x{tokenizer.grid[1]} grid of codes "
                             f"but the image tower has {self.grid[0]}x{self.grid[1]} patches")
        object.__setattr__(self, "_tokenizer", tokenizer)

    @property
    def visual_tokenizer(self):
        if self._tokenizer is None:
            raise RuntimeError("BEiT needs a visual tokenizer: call attach_visual_tokenizer() "
                               "(in training, set objective.tokenizer)")
        return self._tokenizer

    # -- data ------------------------------------------------------------------------------------
    @classmethod
    def declare_views(cls, image_size: int | tuple[int, int], *, patch_size: int = 16, mask_ratio: float = 0.4,
                      tokenizer_size: int | tuple[int, int] | None = None) -> MethodViews:
        """BEiT's two sizes of one crop (:func:`~slip.data.views.beit_views`) and a blockwise mask
        over the ``patch_size`` grid; the tokenizer's view defaults to 8 px per patch, as the
        DALL-E codebook sees it (112 px for 224 / 16)."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        grid = (height // patch_size, width // patch_size)
        if tokenizer_size is None:
            tokenizer_size = (8 * grid[0], 8 * grid[1])
        return MethodViews(clip=None, ssl=beit_views(image_size, tokenizer_size), mask=beit_mask_generator(grid, mask_ratio))

    def data_views(self, image_size: int, mask_ratio: float = 0.4, objective=None) -> MethodViews:
        views = self.declare_views(image_size, patch_size=image_size // self.grid[0], mask_ratio=mask_ratio,
                                   tokenizer_size=self.visual_tokenizer.input_size)
        if views.mask.grid != self.grid:
            raise ValueError(f"{image_size} px views give a {views.mask.grid} patch grid; the tower has {self.grid}")
        self.mask_slots = views.mask.num_masked
        return views

    # -- model -----------------------------------------------------------------------------------
    def mask_patches(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = mask.unsqueeze(-1).to(tokens.dtype)
        return tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w

    @property
    def has_targets(self) -> bool:
        return True

    @torch.no_grad()
    def target_features(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The codes ``(N, L)`` of the tokenizer's view (the second), computed in float32."""
        tokenizer, pixels = self.visual_tokenizer, views[1]
        first = next(iter(tokenizer.buffers()), None)
        first = first if first is not None else next(iter(tokenizer.parameters()), None)
        if first is not None and first.device != pixels.device:
            tokenizer.to(pixels.device)
        with torch.autocast(pixels.device.type, enabled=False):
            return [tokenizer(pixels.float())]

    def forward(self, feats: list[torch.Tensor], targets: list[torch.Tensor] | None,
                patch_mask: torch.Tensor | None = None) -> dict:
        if targets is None or patch_mask is None:
            raise RuntimeError("BEiT needs the tokenizer's codes and the patch mask "
                               "(forward_features(..., patch_mask=..., targets=True))")
        (tokens,), (codes,) = feats, targets
        if codes.shape != patch_mask.shape or tokens.shape[:2] != patch_mask.shape:
            raise ValueError(f"BEiT: patch tokens {tuple(tokens.shape)}, codes {tuple(codes.shape)} and mask "
                             f"{tuple(patch_mask.shape)} disagree")
        if self.mask_slots is None:  # masks from elsewhere: boolean selection (its size is read on the host)
            return {"logits": self.lm_head(tokens[patch_mask]), "labels": codes[patch_mask]}
        # The data's masks hold at most mask_slots patches each: every image's masked tokens go
        # first into mask_slots slots (in patch order, then unmasked ones as padding, weight 0),
        # a fixed shape, so that no count is read on the host (a sync on accelerators).
        slots = min(self.mask_slots, patch_mask.shape[1])
        torch._assert_async(patch_mask.sum(dim=1).max() <= slots, "a BEiT mask holds more patches than its generator's target")
        order = torch.argsort((~patch_mask).to(torch.int32), dim=1, stable=True)[:, :slots]
        picked = torch.gather(tokens, 1, order[..., None].expand(-1, -1, tokens.shape[-1]))
        return {"logits": self.lm_head(picked), "labels": torch.gather(codes, 1, order),
                "weights": torch.gather(patch_mask, 1, order)}

    def loss(self, out: dict, temperature: float | None = None) -> dict:
        """Cross-entropy averaged over the masked patches of the *global* batch, and the
        percentage of them whose code is predicted (``ssl_acc``).

        Ranks hold different numbers of masked patches, so each rank divides its sum by the
        global count and multiplies by the number of ranks: the mean over ranks (DDP's gradient
        averaging, the logged loss) is then exactly the one-process mean. (BEiT's code averages
        per rank.)
        """
        logits, labels = out["logits"].float(), out["labels"]
        weights = out.get("weights")  # fixed-size slots (forward): 1 for a masked patch, 0 for padding
        if weights is None:
            ce = F.cross_entropy(logits, labels, reduction="sum")
            hits, count = (logits.argmax(dim=-1) == labels).float().sum(), labels.numel()
        else:
            w = weights.reshape(-1).to(logits.dtype)
            logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
            ce = (F.cross_entropy(logits, labels, reduction="none") * w).sum()
            hits, count = ((logits.argmax(dim=-1) == labels).to(logits.dtype) * w).sum(), w.sum()
        scale = D.get_world_size() / D.global_sum(count, logits.device).clamp_min(1).to(logits.dtype)
        loss = ce * scale
        acc = hits * scale * 100
        return {"loss": loss, "ssl_loss": loss, "ssl_acc": acc}
