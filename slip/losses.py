"""Contrastive losses of SLIP, distributed-aware, as pure functions of embeddings.

Each returns a dict with ``loss`` plus named parts and accuracies (in percent), so the trainer
logs every objective the same way. Under torch.distributed, embeddings are gathered from all
ranks with gradients flowing back to their owners, and each rank scores its own rows against
the global batch. With DDP's gradient averaging, W ranks of local batch B then produce the
gradients of one process with batch W*B; the mean of the per-rank losses is that loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import all_gather_with_grad, get_rank


def _local_labels(local_batch: int, device: torch.device) -> torch.Tensor:
    # Row i of this rank is sample rank*B + i of the global batch.
    return get_rank() * local_batch + torch.arange(local_batch, device=device)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=-1) == labels).float().mean() * 100


def clip_loss(image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor) -> dict:
    """CLIP's symmetric InfoNCE (Radford et al. 2021), as trained in SLIP.

    Args:
        image_embed, text_embed: (B, E) local embeddings, not necessarily normalised.
        logit_scale: scalar, already exponentiated (the model's ``logit_scale.exp()``).
    Returns ``loss`` (mean of image->text and text->image cross-entropy over the global
    batch), ``clip_loss`` (the same value) and ``clip_acc`` (image->text top-1, percent).
    """
    image_embed = F.normalize(image_embed, dim=-1)
    text_embed = F.normalize(text_embed, dim=-1)
    labels = _local_labels(image_embed.shape[0], image_embed.device)
    logits_per_image = logit_scale * image_embed @ all_gather_with_grad(text_embed).t()
    logits_per_text = logit_scale * text_embed @ all_gather_with_grad(image_embed).t()
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
    """
    z1 = F.normalize(z1, dim=-1)
    z2 = F.normalize(z2, dim=-1)
    labels = _local_labels(z1.shape[0], z1.device)
    k1, k2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
    self_mask = F.one_hot(labels, k1.shape[0]).bool()

    def direction(q, k_same, k_other):
        positives_and_cross = q @ k_other.t() / temperature
        same_view = (q @ k_same.t() / temperature).masked_fill(self_mask, float("-inf"))
        logits = torch.cat([positives_and_cross, same_view], dim=1)
        return F.cross_entropy(logits, labels), logits

    loss_a, logits_a = direction(z1, k1, k2)
    loss_b, _ = direction(z2, k2, k1)
    loss = (loss_a + loss_b) / 2
    return {"loss": loss, "ssl_loss": loss, "ssl_acc": _accuracy(logits_a, labels)}


def slip_objective(
    outputs: dict,
    *,
    clip: bool = True,
    ssl: bool = True,
    ssl_scale: float = 1.0,
    ssl_temperature: float = 0.1,
) -> dict:
    """The SLIP objective: ``clip_loss + ssl_scale * ssl_loss``, the one place losses are summed.

    ``outputs`` is what :class:`slip.models.SLIPModel` returns. With ``clip=False`` it is SimCLR,
    with ``ssl=False`` CLIP. Returns ``loss`` and every part and accuracy of the branches used.
    """
    if not (clip or ssl):
        raise ValueError("slip_objective needs at least one of clip and ssl")
    parts: dict = {}
    total = 0.0
    if clip:
        c = clip_loss(outputs["image_embed"], outputs["text_embed"], outputs["logit_scale"])
        parts.update(clip_loss=c["clip_loss"], clip_acc=c["clip_acc"])
        total = total + c["loss"]
    if ssl:
        embeds = outputs["ssl_embeds"]
        if len(embeds) != 2:
            raise ValueError(f"SimCLR needs exactly 2 views, got {len(embeds)}")
        s = simclr_loss(embeds[0], embeds[1], temperature=ssl_temperature)
        parts.update(ssl_loss=s["ssl_loss"], ssl_acc=s["ssl_acc"])
        total = total + ssl_scale * s["loss"]
    return {"loss": total, **parts}
