"""Zero-shot image-text retrieval (COCO / Flickr30k, Karpathy splits): recall@K both ways.

Annotations are the ``dataset_coco.json`` / ``dataset_flickr30k.json`` files of Karpathy's
splits: ``{"images": [{"filename", "filepath" (COCO only), "split", "sentences": [{"raw"}]}]}``.
An image's file is ``{root}/{filepath}/{filename}`` (COCO, e.g. ``val2014/...``) or
``{root}/{filename}`` (Flickr30k).

* text -> image: a caption counts as retrieved at K if its image is among the K images most
  similar to it;
* image -> text: an image counts as retrieved at K if *any* of its captions is among the K
  captions most similar to it.

Similarities are cosines of normalised embeddings. Ties are broken towards the lower index
(as ``argmax`` and :mod:`slip.eval.metrics` do), so results never depend on sort stability.
A catalog entry of type ``retrieval`` has ``path`` (image root), ``annotations`` (the JSON
file) and ``test`` (the Karpathy split, usually "test").
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .datasets import DatasetNotFoundError, _SkippingDataset, make_eval_loader
from .zero_shot import _device_of, _rank_and_world, _unwrap, encode_texts, run_image_model

__all__ = [
    "RetrievalDataset",
    "build_retrieval_dataset",
    "evaluate_retrieval",
    "recall_at_k",
]

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)


class RetrievalDataset(_SkippingDataset):
    """The images of one Karpathy split, with their captions.

    Items are ``(transform(image), image index)``. Attributes: ``captions`` (all captions of
    the split, image by image), ``caption_image`` (the image index of each caption) and
    ``paths``.
    """

    def __init__(self, root: str | os.PathLike, annotations: str | os.PathLike, split: str = "test",
                 transform: Callable[[Any], Any] | None = None) -> None:
        super().__init__(transform)
        with open(annotations, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{annotations}: expected a Karpathy-split file with an 'images' list")
        root = Path(root)
        self.paths: list[str] = []
        self.captions: list[str] = []
        self.caption_image: list[int] = []
        for entry in data["images"]:
            if entry.get("split") != split:
                continue
            sentences = [s["raw"].strip() for s in entry.get("sentences", [])]
            if not sentences:
                raise ValueError(f"{annotations}: image {entry.get('filename')!r} has no captions")
            image_index = len(self.paths)
            self.paths.append(str(root / entry.get("filepath", "") / entry["filename"]))
            self.captions.extend(sentences)
            self.caption_image.extend([image_index] * len(sentences))
        if not self.paths:
            splits = sorted({str(e.get("split")) for e in data["images"]})
            raise ValueError(f"{annotations}: no images in split {split!r}; splits present: {splits}")
        self.targets = list(range(len(self.paths)))

    def _read(self, index: int) -> str:
        return self.paths[index]

    def _describe(self, index: int) -> str:
        return self.paths[index]


def build_retrieval_dataset(key: str, entry: Mapping[str, str], transform: Callable[[Any], Any] | None,
                            split: str = "test") -> RetrievalDataset:
    """The retrieval dataset of a catalog entry (``path``, ``annotations``, ``test`` split name).

    Raises:
        DatasetNotFoundError: naming ``key`` when the annotations file or image root is missing.
    """
    root, annotations = entry.get("path", ""), entry.get("annotations", "")
    split_name = entry.get(split, split)
    layout = (f"{annotations or '<annotations>'} (dataset_coco.json / dataset_flickr30k.json format) and "
              f"images under {root}/[filepath/]filename")
    if not annotations or not Path(annotations).is_file():
        raise DatasetNotFoundError(f"catalog entry {key!r} (type retrieval): annotations file {annotations!r} "
                                   f"not found; expected {layout}")
    if not Path(root).is_dir():
        raise DatasetNotFoundError(f"catalog entry {key!r} (type retrieval): image directory {root} not found; "
                                   f"expected {layout}")
    return RetrievalDataset(root, annotations, split_name, transform)


def _ranks(scores: torch.Tensor, true_index: torch.Tensor) -> torch.Tensor:
    """0-based rank of column ``true_index[r]`` within row ``r`` of ``scores``; ties -> lower index first."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    true = scores[rows, true_index][:, None]
    lower = torch.arange(scores.shape[1], device=scores.device)[None, :] < true_index[:, None]
    return ((scores > true) | ((scores == true) & lower)).sum(dim=1)


def recall_at_k(similarity: torch.Tensor, caption_image: Sequence[int] | torch.Tensor,
                ks: Sequence[int] = DEFAULT_KS, chunk: int = 1024) -> dict[str, float]:
    """Recall@K in percent from an ``(images, captions)`` similarity matrix.

    Args:
        similarity: ``sim[i, j]`` between image ``i`` and caption ``j``.
        caption_image: the image index of each caption; every image needs at least one.
        ks: the K values.
        chunk: rows scored at a time, bounding memory for large splits.

    Returns:
        ``image_to_text_R@K`` and ``text_to_image_R@K`` for each K, and ``mean_recall`` (the
        mean of all of them, the usual single-number summary).
    """
    sim = similarity.float()
    n_images, n_captions = sim.shape
    owner = torch.as_tensor(caption_image, dtype=torch.int64, device=sim.device)
    if owner.shape != (n_captions,):
        raise ValueError(f"caption_image must have one entry per caption ({n_captions}), got {tuple(owner.shape)}")
    if n_captions == 0 or owner.min() < 0 or owner.max() >= n_images:
        raise ValueError("caption_image must hold image indices in [0, images)")
    if torch.bincount(owner, minlength=n_images).min() == 0:
        raise ValueError("every image needs at least one caption")

    # text -> image: rank of the caption's image among all images (a column of sim).
    t2i = torch.cat([_ranks(sim[:, j:j + chunk].T, owner[j:j + chunk]) for j in range(0, n_captions, chunk)])
    # image -> text: best rank over the image's captions within its row.
    i2t = torch.full((n_images,), n_captions, dtype=torch.int64, device=sim.device)
    caption_ids = torch.arange(n_captions, device=sim.device)
    for start in range(0, n_images, chunk):
        stop = min(start + chunk, n_images)
        mine = (owner >= start) & (owner < stop)
        rows = owner[mine] - start
        ranks = _ranks(sim[start:stop][rows], caption_ids[mine])
        i2t[start:stop] = torch.full((stop - start,), n_captions, dtype=torch.int64, device=sim.device) \
            .scatter_reduce(0, rows, ranks, reduce="amin")

    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float(100.0 * (i2t < k).double().mean())
    for k in ks:
        out[f"text_to_image_R@{k}"] = float(100.0 * (t2i < k).double().mean())
    out["mean_recall"] = float(sum(out.values()) / len(out))
    return out


@torch.no_grad()
def evaluate_retrieval(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    dataset: RetrievalDataset,
    batch_size: int = 256,
    workers: int = 0,
    device: str | torch.device | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool | None = None,
    distributed: bool | None = None,
) -> dict[str, Any]:
    """Image-text retrieval recall@K of ``model`` on ``dataset``.

    Images are split across ranks under ``torch.distributed`` (and gathered back); every rank
    embeds all captions; call it on every rank, or pass ``distributed=False`` to evaluate on
    one rank alone. An unreadable image is skipped together with its captions.

    Returns ``{"n_images", "n_captions", "skipped", "recalls": recall_at_k(...)}``.
    """
    inner = _unwrap(model)
    if not getattr(inner, "has_text", True):
        raise ValueError("image-text retrieval needs a text tower, and this model has none")
    device = _device_of(inner, device)

    def embed(images: torch.Tensor) -> torch.Tensor:
        return inner.encode_image(images, normalize=True)

    rank, world = _rank_and_world(distributed)
    loader = make_eval_loader(dataset, batch_size, workers, rank, world)
    image_emb, image_ids, skipped = run_image_model(inner, loader, embed, device, desc="retrieval images",
                                                    progress=progress, distributed=distributed)
    if skipped:
        logger.warning("retrieval evaluation skipped %d unreadable image(s) and their captions", skipped)
    if len(image_ids) == 0:
        raise ValueError(f"no readable images to evaluate ({skipped} skipped)")

    # Keep the captions of the images that were read, renumbering images 0..n-1.
    new_index = torch.full((len(dataset),), -1, dtype=torch.int64)
    new_index[image_ids] = torch.arange(len(image_ids))
    owner_all = new_index[torch.as_tensor(dataset.caption_image, dtype=torch.int64)]
    keep = (owner_all >= 0).nonzero().flatten().tolist()
    captions = [dataset.captions[j] for j in keep]

    text_emb = encode_texts(inner, tokenizer, captions, batch_size, device, progress=progress,
                            desc="retrieval captions").cpu()
    similarity = image_emb.float() @ text_emb.T
    return {
        "n_images": int(len(image_ids)),
        "n_captions": len(captions),
        "skipped": int(skipped),
        "recalls": recall_at_k(similarity, owner_all[keep], ks),
    }
