"""Contrastive losses of SLIP, distributed-aware, as pure functions of embeddings.

Each returns a dict with ``loss`` plus named parts and accuracies (in percent), so the trainer
logs every objective the same way. Under torch.distributed, embeddings are gathered from all
ranks with gradients flowing back to their owners, and each rank scores its own rows against
the global batch. With DDP's gradient averaging, W ranks of local batch B then produce the
gradients of one process with batch W*B; the mean of the per-rank losses is that loss.
(``clip_loss(..., gather="slip")`` instead gathers as SLIP's code did; see there.)

Similarities and logits are computed in float32 with autocast switched off, whatever the
precision of the embeddings: in bfloat16 a logit of scale 100 is only good to about +-0.3.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

from .distributed import all_gather_no_grad, all_gather_with_grad, all_reduce_, get_rank

# How clip_loss gathers the other ranks' embeddings (see clip_loss).
GATHER_MODES = ("with_grad", "slip")


def _local_labels(local_batch: int, device: torch.device) -> torch.Tensor:
    # Row i of this rank is sample rank*B + i of the global batch.
    return get_rank() * local_batch + torch.arange(local_batch, device=device)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=-1) == labels).float().mean() * 100


def _fp32(t: torch.Tensor):
    """A region where autocast is off on ``t``'s device: inputs cast with :func:`_up` stay
    float32 through matmuls (under autocast even a float32 matmul would run in bf16/fp16)."""
    kind = t.device.type
    if not torch.amp.is_autocast_available(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def _up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is of lower precision (float64 stays float64)."""
    return t.float() if t.element_size() < 4 else t


def _check_gather(gather: str) -> None:
    if gather not in GATHER_MODES:
        raise ValueError(f"gather must be one of {', '.join(GATHER_MODES)}, got {gather!r}")


def clip_loss(image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor,
              gather: str = "with_grad") -> dict:
    """CLIP's symmetric InfoNCE (Radford et al. 2021), as trained in SLIP.

    Args:
        image_embed, text_embed: (B, E) local embeddings, not necessarily normalised.
        logit_scale: scalar, already exponentiated (the model's ``logit_scale.exp()``).
        gather: how the other ranks' embeddings join the logits (only matters with several
            ranks; the loss value is the same either way):

            * ``with_grad`` (default): differentiable gather; every rank's loss sends gradient
              to every embedding, and W ranks of batch B train exactly as one process of W*B.
            * ``slip``: SLIP's own code (``CLIPLoss`` with ``utils.all_gather_batch``): the
              gathered embeddings are a constant, so a rank's embeddings get gradient only as
              the queries (rows) of its own logits, never as another rank's keys (columns),
              nor as its own keys. After DDP's averaging the gradient differs from one big
              process's. Use it to reproduce SLIP's numbers.
    Returns ``loss`` (mean of image->text and text->image cross-entropy over the global
    batch), ``clip_loss`` (the same value) and ``clip_acc`` (image->text top-1, percent).
    Logits are float32 whatever the embeddings' dtype or autocast.
    """
    _check_gather(gather)
    gather_fn = all_gather_with_grad if gather == "with_grad" else all_gather_no_grad
    with _fp32(image_embed):
        image_embed = F.normalize(_up(image_embed), dim=-1)
        text_embed = F.normalize(_up(text_embed), dim=-1)
        logit_scale = _up(torch.as_tensor(logit_scale, device=image_embed.device))
        labels = _local_labels(image_embed.shape[0], image_embed.device)
        logits_per_image = logit_scale * image_embed @ gather_fn(text_embed).t()
        logits_per_text = logit_scale * text_embed @ gather_fn(image_embed).t()
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return {"loss": loss, "clip_loss": loss, "clip_acc": _accuracy(logits_per_image, labels)}


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> dict:
    """SimCLR's NT-Xent (Chen et al. 2020) as SLIP computes it.

    Args:
        z1, z2: (B, D) embeddings of the two views of the same B images (row i of z1 and row i
            of z2 are the positive pair).
        temperature: 0.1 in SLIP.
    Each anchor of view a scores its partner in view b against the 2N-2 other embeddings of the
    global batch (N = global batch): all of view b plus view a without itself (self-similarity
    masked). The loss averages the a->b and b->a directions. Returns ``loss``, ``ssl_loss`` and
    ``ssl_acc`` (percent of view-a anchors whose best match is their partner).
    The gather is differentiable, as in SLIP (its ``SIMCLRLoss`` uses ``all_gather_batch_with_grad``).
    Similarities are float32 whatever the embeddings' dtype or autocast.
    """
    with _fp32(z1):
        z1 = F.normalize(_up(z1), dim=-1)
        z2 = F.normalize(_up(z2), dim=-1)
        labels = _local_labels(z1.shape[0], z1.device)
        k1, k2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
        self_mask = labels[:, None] == torch.arange(k1.shape[0], device=labels.device)

        def direction(q, k_same, k_other):
            positives_and_cross = q @ k_other.t() / temperature
            same_view = (q @ k_same.t() / temperature).masked_fill(self_mask, float("-inf"))
            logits = torch.cat([positives_and_cross, same_view], dim=1)
            return F.cross_entropy(logits, labels), logits

        loss_a, logits_a = direction(z1, k1, k2)
        loss_b, _ = direction(z2, k2, k1)
        loss = (loss_a + loss_b) / 2
    return {"loss": loss, "ssl_loss": loss, "ssl_acc": _accuracy(logits_a, labels)}


def mocov3_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                temperature: float = 0.2) -> dict:
    """MoCo v3's symmetrised contrastive loss (Chen, Xie, He 2021).

    Args:
        q1, q2: (B, D) online queries of views 1 and 2 (predictor outputs).
        k1, k2: (B, D) momentum keys of views 1 and 2 (no gradient).
    ctr(q, k): cross-entropy of q against the keys of the whole global batch (gathered from
    all ranks, no gradient), the positive being the same image's key, scaled by 2 x temperature
    as in MoCo v3. Loss = ctr(q1, k2) + ctr(q2, k1). ``ssl_acc``: top-1 of view 1's queries.
    Logits are float32 whatever the embeddings' dtype or autocast.
    """
    labels = _local_labels(q1.shape[0], q1.device)

    def ctr(q, k):
        q = F.normalize(_up(q), dim=-1)
        with torch.no_grad():
            keys = all_gather_with_grad(F.normalize(_up(k), dim=-1))
        logits = q @ keys.t() / temperature
        return F.cross_entropy(logits, labels) * (2 * temperature), logits

    with _fp32(q1):
        loss_a, logits_a = ctr(q1, k2)
        loss_b, _ = ctr(q2, k1)
        loss = loss_a + loss_b
    return {"loss": loss, "ssl_loss": loss, "ssl_acc": _accuracy(logits_a, labels)}


def mocov2_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> dict:
    """MoCo's InfoNCE over a queue of keys (He et al. 2020; MoCo v2, Chen et al. 2020).

    Args:
        q: (B, D) online queries of view 1; k: (B, D) momentum keys of view 2 (no gradient).
        queue: (K, D) normalised keys of earlier batches, the negatives.
    Each query's logits are its own key, then the K queue keys, over the temperature (0.2 in
    MoCo v2); the loss is the cross-entropy with the positive at index 0, averaged over the
    local batch (with DDP's averaging, the mean over the global batch). ``ssl_acc``: percent of
    queries whose best match is their key. Logits are float32.
    """
    with _fp32(q):
        q = F.normalize(_up(q), dim=-1)
        k = F.normalize(_up(k.detach()), dim=-1)
        positive = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([positive, q @ _up(queue.detach()).t()], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, labels)
    return {"loss": loss, "ssl_loss": loss, "ssl_acc": _accuracy(logits, labels)}


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's codes (Caron et al. 2020, Alg. 1 and its distributed form): soft assignments of
    samples to prototypes with equal use of every prototype over the whole batch.

    ``scores`` (N, K) are this rank's prototype scores; the batch is every rank's rows together
    (row and total sums are all-reduced), so a rank may hold any share of it. Q = exp(scores /
    epsilon) is scaled in turn so each prototype's row sums to 1/K and each sample's column to
    1/N, ``iterations`` times; returned (N, K) with each sample's codes summing to 1. float32.
    """
    with _fp32(scores):
        q = torch.exp(_up(scores).float() / epsilon).t()  # (K, N)
        prototypes = q.shape[0]
        total = all_reduce_(torch.full((1,), float(q.shape[1]), device=q.device))
        q /= all_reduce_(q.sum().reshape(1))
        for _ in range(iterations):
            q /= all_reduce_(q.sum(dim=1, keepdim=True))  # rows: every prototype gets 1/K of the mass
            q /= prototypes
            q /= q.sum(dim=0, keepdim=True)  # columns: every sample gets 1/N
            q /= total
        return (q * total).t()


def swav_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float = 0.1) -> dict:
    """SwAV's swapped prediction (Caron et al. 2020): the codes of each crop ``i`` that has
    them (the large crops) are predicted from every other crop's prototype scores.

    Args:
        scores: per crop, (B, K) prototype scores of its normalised embedding (all crops).
        codes: per large crop, (B, K) Sinkhorn codes (no gradient), in crop order.
    loss = mean over the crops i with codes of [ sum over v != i of
    -mean_b sum_k codes_i[b, k] log softmax(scores_v[b] / temperature)_k ] / (num_crops - 1).
    ``ssl_acc``: percent of samples whose second crop's best prototype is the first's code.
    """
    with _fp32(scores[0]):
        total = 0.0
        for i, q in enumerate(codes):
            sub = 0.0
            for v, s in enumerate(scores):
                if v != i:
                    sub = sub - (q * F.log_softmax(_up(s) / temperature, dim=1)).sum(dim=1).mean()
            total = total + sub / (len(scores) - 1)
        loss = total / len(codes)
        acc = (scores[1].argmax(dim=1) == codes[0].argmax(dim=1)).float().mean() * 100
    return {"loss": loss, "ssl_loss": loss, "ssl_acc": acc}


def nce_loss(v: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, log_z: torch.Tensor | float,
             bank_size: int, temperature: float = 0.07, exclude: torch.Tensor | None = None) -> dict:
    """The noise-contrastive estimation loss of Wu et al. 2018 as PIRL uses it (Misra & van der
    Maaten 2020, Eq. 2-4), per sample, against memory-bank rows.

    Args:
        v: (B, D) embeddings (normalised here), the ones that get gradient.
        positives: (B, D) each sample's own memory-bank row m_I (normalised, no gradient).
        negatives: (M, D) memory-bank rows m_I' drawn uniformly from the bank (normalised, no
            gradient), shared by the batch.
        log_z: log of the normalisation constant Z (a constant, estimated once; see
            :class:`slip.ssl.pirl.PIRL`).
        bank_size: N, the bank's rows: the noise distribution is uniform, P_n = 1 / N.
        temperature: tau (0.07 in PIRL).
        exclude: (B, M) bool, negatives left out of a sample's sum (its own row).
    With s(a, b) = a . b / tau, P(a, b) = exp(s(a, b)) / Z and h(a, b) = P / (P + M / N):
    ``loss[i] = -log h(m_i, v_i) - sum over negatives j of log(1 - h(v_i, m_j))``, computed as
    softplus(log(M/N) - log P) + sum_j softplus(log P_j - log(M/N)) (the same, without overflow).
    ``acc``: percent of samples whose positive scores above every negative. Float32.
    """
    with _fp32(v):
        v = F.normalize(_up(v), dim=-1)
        positives, negatives = _up(positives.detach()), _up(negatives.detach())
        # log(M / N) as a Python number: a tensor made on the device would be copied from the host
        log_noise = math.log(negatives.shape[0] / bank_size) if negatives.shape[0] else float("-inf")
        log_z = torch.as_tensor(log_z, dtype=v.dtype, device=v.device)
        s_pos = (v * positives).sum(dim=1) / temperature
        s_neg = v @ negatives.t() / temperature
        neg = F.softplus(s_neg - log_z - log_noise)
        if exclude is not None:
            neg = neg.masked_fill(exclude, 0.0)
        loss = F.softplus(log_noise - (s_pos - log_z)) + neg.sum(dim=1)
        with torch.no_grad():
            best = s_neg if exclude is None else s_neg.masked_fill(exclude, float("-inf"))
            acc = (s_pos > best.amax(dim=1)).float().mean() * 100 if best.shape[1] else torch.tensor(100.0)
    return {"loss": loss, "acc": acc}


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> dict:
    """BYOL's symmetrised normalised MSE (Grill et al. 2020): each view's prediction regresses
    the target projection of the other view, ``2 - 2 cos(p, z)``, averaged over the batch.

    Args:
        p1, p2: (B, D) online predictions; z1, z2: (B, D) target projections (no gradient).
    Returns ``loss`` = mean(2 - 2cos(p1, z2)) + mean(2 - 2cos(p2, z1)), ``ssl_loss`` and
    ``ssl_cos`` (the mean cosine, 1 at perfect agreement). Cosines are float32.
    """
    def regress(p, z):
        return 2 - 2 * F.cosine_similarity(_up(p), _up(z.detach()), dim=-1)

    with _fp32(p1):
        a, b = regress(p1, z2), regress(p2, z1)
        loss = a.mean() + b.mean()
    return {"loss": loss, "ssl_loss": loss, "ssl_cos": 1 - (a.mean() + b.mean()).detach() / 4}


def slip_objective(
    outputs: dict,
    *,
    clip: bool = True,
    ssl_loss: Callable[[dict], dict] | None = None,
    ssl_scale: float = 1.0,
    gather: str = "with_grad",
) -> dict:
    """The SLIP objective: ``clip_loss + ssl_scale * ssl_loss``, the one place losses are summed.

    ``outputs`` is what :class:`slip.models.SLIPModel` returns; ``ssl_loss`` is the SSL method's
    loss on ``outputs["ssl"]`` (e.g. ``model.ssl.loss``). With ``clip=False`` it is the SSL
    method alone; without ``ssl_loss``, CLIP. ``gather`` is :func:`clip_loss`'s (config key
    ``objective.gather``). Returns ``loss`` and every part and metric.
    """
    if not clip and ssl_loss is None:
        raise ValueError("slip_objective needs at least one of clip and ssl_loss")
    _check_gather(gather)
    parts: dict = {}
    total = 0.0
    if clip:
        c = clip_loss(outputs["image_embed"], outputs["text_embed"], outputs["logit_scale"], gather=gather)
        parts.update(clip_loss=c["clip_loss"], clip_acc=c["clip_acc"])
        total = total + c["loss"]
    if ssl_loss is not None:
        s = ssl_loss(outputs["ssl"])
        parts.update({k: v for k, v in s.items() if k != "loss"})
        total = total + ssl_scale * s["loss"]
    return {"loss": total, **parts}
