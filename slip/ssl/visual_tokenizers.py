"""Frozen visual tokenizers: images -> one discrete code per patch, the targets of BEiT's masked
image modelling.

Every tokenizer is a :class:`VisualTokenizer`: an ``nn.Module`` that stays in eval mode, has no
trainable parameters and maps a batch of images ``(N, 3, S, S)`` with ``S = input_size`` to
token ids ``(N, grid_h * grid_w)`` int64 in ``[0, vocab_size)``, in raster order (row by row,
the order of a ViT's patch tokens). Pixels go in as ``uint8`` in ``[0, 255]`` or as floats in
``[0, 1]`` -- *not* ImageNet-normalised; each tokenizer applies its own normalisation
(``expected_normalization`` says which), so callers feed the raw crop.

Two implementations:

* :class:`FlavaCodebookTokenizer` -- the DALL-E-style dVAE encoder released with FLAVA
  (``facebook/flava-image-codebook``; 8192 codes; 112 px -> 14 x 14 tokens), loaded from a
  local directory with :meth:`FlavaCodebookTokenizer.from_directory`.
* :class:`KMeansPatchTokenizer` -- a k-means codebook over raw pixel patches, fitted on the
  training corpus itself (``slip fit-tokenizer``), for when no pretrained tokenizer can be had.
"""
from __future__ import annotations

import abc
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from slip.fileio import atomic_path

__all__ = [
    "FlavaCodebookTokenizer",
    "KMeansPatchTokenizer",
    "KMeansResult",
    "VisualTokenizer",
    "extract_patches",
    "kmeans",
    "load_visual_tokenizer",
    "nearest_centroid",
    "to_unit_range",
]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels -> float32 in ``[0, 1]``; floating images are returned unchanged.

    Args:
        images: ``(N, 3, H, W)`` uint8 in ``[0, 255]`` or float in ``[0, 1]``.
    """
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images


class VisualTokenizer(nn.Module, abc.ABC):
    """Interface of a frozen image -> patch-token map.

    Attributes:
        vocab_size: number of distinct codes; ids lie in ``[0, vocab_size)``.
        input_size: side ``S`` of the square images :meth:`forward` takes.
        grid: ``(grid_h, grid_w)`` tokens per image; ``num_tokens = grid_h * grid_w``.
        expected_normalization: what the pixels must look like on input, and what the
            tokenizer does to them internally.

    Subclasses implement :meth:`encode` on ``[0, 1]`` images. The module is always in eval mode
    (``train()`` is a no-op, so a parent's ``model.train()`` cannot switch it) and its
    parameters never require grad; :meth:`forward` runs without autograd.
    """

    expected_normalization: ClassVar[str] = ""

    def __init__(self, vocab_size: int, input_size: int, grid: tuple[int, int]) -> None:
        super().__init__()
        if vocab_size < 1 or input_size < 1 or min(grid) < 1:
            raise ValueError(f"bad tokenizer geometry: vocab {vocab_size}, input {input_size}, grid {grid}")
        self.vocab_size = int(vocab_size)
        self.input_size = int(input_size)
        self.grid = (int(grid[0]), int(grid[1]))
        super().train(False)

    @property
    def num_tokens(self) -> int:
        """Tokens per image, ``grid_h * grid_w``."""
        return self.grid[0] * self.grid[1]

    def train(self, mode: bool = True) -> "VisualTokenizer":
        # A frozen target network: training mode would change nothing useful and could change
        # outputs (dropout, batch norm statistics) of a wrapped model.
        return super().train(False)

    def freeze(self) -> "VisualTokenizer":
        """Set every parameter's ``requires_grad`` to False (done by the constructors)."""
        for param in self.parameters():
            param.requires_grad_(False)
        return self

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids ``(N, grid_h, grid_w)`` of images ``(N, 3, S, S)`` float in ``[0, 1]``."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Tokenize a batch.

        Args:
            images: ``(N, 3, S, S)`` with ``S = input_size``; uint8 in ``[0, 255]`` or float in
                ``[0, 1]`` (not ImageNet-normalised).

        Returns:
            ``(N, grid_h * grid_w)`` int64 token ids, raster order.
        """
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"{type(self).__name__} takes (N, 3, {self.input_size}, {self.input_size}) images, "
                f"got {tuple(images.shape)}"
            )
        with torch.no_grad():
            ids = self.encode(to_unit_range(images))
        return ids.reshape(images.shape[0], self.num_tokens).long()


# --------------------------------------------------------------------------------------------
# FLAVA / DALL-E codebook
# --------------------------------------------------------------------------------------------
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class FlavaCodebookTokenizer(VisualTokenizer):
    """FLAVA's image codebook (``transformers.FlavaImageCodebook``), a DALL-E-style dVAE
    encoder: 8192 codes, 112 px -> 14 x 14 tokens.

    The encoder is fully convolutional with three 2x max-pools (groups 1-3; group 4 does not
    pool), so it downsamples by 8 and takes any side divisible by 8; ``input_size`` fixes the
    side used (112 gives the 14 x 14 grid of a ViT-B/16 at 224 px).

    Args:
        codebook: a loaded ``FlavaImageCodebook``; it is frozen and kept in eval mode.
        input_size: image side; must be divisible by the encoder's downsampling factor.
    """

    #: DALL-E's logit-Laplace epsilon (``transformers`` ``LOGIT_LAPLACE_EPS``).
    LOGIT_LAPLACE_EPS: ClassVar[float] = 0.1

    expected_normalization: ClassVar[str] = (
        "Input: RGB uint8 [0, 255] or float [0, 1], not ImageNet-normalised. Internally the pixels "
        "are mapped as DALL-E's logit-Laplace preprocessing does, x -> (1 - 2 * 0.1) * x + 0.1, "
        "i.e. into [0.1, 0.9]. This is what FlavaImageProcessor produces for codebook inputs "
        "(return_codebook_pixels=True): resize to 112 (LANCZOS), centre crop 112, rescale by "
        "1/255, normalise with mean 0 / std 1 (a no-op: FLAVA_CODEBOOK_MEAN/STD), then "
        "map_pixels with eps 0.1."
    )

    def __init__(self, codebook: nn.Module, input_size: int = 112) -> None:
        pools = sum(isinstance(m, nn.MaxPool2d) for m in codebook.modules())
        factor = 2**pools  # each FLAVA layer group pools with kernel 2, stride 2
        if input_size % factor:
            raise ValueError(f"input_size {input_size} is not divisible by the codebook's downsampling factor {factor}")
        config = getattr(codebook, "config", None)
        vocab = int(getattr(config, "vocab_size", 0) or getattr(codebook, "vocab_size"))
        super().__init__(vocab_size=vocab, input_size=input_size, grid=(input_size // factor, input_size // factor))
        self.downsample = factor
        self.codebook = codebook
        self.freeze()
        self.eval()

    @classmethod
    def from_directory(
        cls,
        path: str | os.PathLike,
        *,
        input_size: int = 112,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "FlavaCodebookTokenizer":
        """Load a codebook saved in the layout of ``facebook/flava-image-codebook``.

        The directory must hold ``config.json`` (``model_type: flava_image_codebook``) and the
        weights (``model.safetensors`` or ``pytorch_model.bin``, possibly sharded with an index).
        Nothing is downloaded: ``path`` must be a local directory.

        Raises:
            FileNotFoundError: ``path`` or one of the required files does not exist.
            ValueError: the directory does not hold a loadable FLAVA image codebook (wrong model
                type, unreadable config, weights that do not match the architecture).
        """
        try:
            from transformers import FlavaImageCodebook  # heavy import, only when used
        except ImportError:
            from ..errors import MissingExtra

            raise MissingExtra(f"the FLAVA codebook {path}", "transformers", "beit") from None

        root = Path(path).expanduser()
        what = "a FLAVA image codebook directory (config.json + model.safetensors or pytorch_model.bin)"
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such directory; expected {what}")
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a directory; expected {what}")
        config_file = root / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{root}: missing config.json; expected {what}")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{config_file}: unreadable config ({exc})") from exc
        if not isinstance(config, dict):
            raise ValueError(f"{config_file}: not a JSON object")
        model_type = config.get("model_type")
        if model_type != "flava_image_codebook" and "FlavaImageCodebook" not in (config.get("architectures") or []):
            raise ValueError(f"{config_file}: model_type is {model_type!r}, not 'flava_image_codebook'")
        if not any((root / name).is_file() for name in _WEIGHT_FILES):
            raise FileNotFoundError(f"{root}: no weights (looked for {', '.join(_WEIGHT_FILES)})")
        try:
            model, info = FlavaImageCodebook.from_pretrained(root, local_files_only=True, output_loading_info=True)
        except Exception as exc:  # noqa: BLE001 -- re-raised with the path, whatever went wrong
            raise ValueError(f"{root}: could not load a FLAVA image codebook: {type(exc).__name__}: {exc}") from exc
        # from_pretrained only warns about these; random weights where the codebook's should be
        # would silently produce meaningless targets.
        missing = list(info.get("missing_keys") or [])
        mismatched = list(info.get("mismatched_keys") or [])
        if missing or mismatched:
            raise ValueError(
                f"{root}: weights do not match FlavaImageCodebook "
                f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; mismatched: {mismatched[:5]})"
            )
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        return cls(model, input_size=input_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` float in ``[0, 1]`` -> ``(N, S/8, S/8)`` code ids."""
        param = next(self.codebook.parameters())
        x = images.to(dtype=param.dtype)
        x = (1.0 - 2.0 * self.LOGIT_LAPLACE_EPS) * x + self.LOGIT_LAPLACE_EPS
        return self.codebook.get_codebook_indices(x)


# --------------------------------------------------------------------------------------------
# k-means patch codebook
# --------------------------------------------------------------------------------------------
PATCH_NORMS = ("none", "standardize")
KMEANS_FORMAT = "slip-kmeans-patch-tokenizer/1"


def extract_patches(images: torch.Tensor, patch_size: int, patch_norm: str = "none", eps: float = 1e-2) -> torch.Tensor:
    """Cut images into non-overlapping patches and flatten each.

    Args:
        images: ``(N, 3, S, S)`` uint8 or float in ``[0, 1]``; ``S`` divisible by ``patch_size``.
        patch_size: patch side ``p``.
        patch_norm: ``"none"`` keeps pixels in ``[0, 1]``; ``"standardize"`` subtracts each
            patch's mean and divides by ``sqrt(var + eps)`` (over all its ``3 p^2`` values).
        eps: variance floor of ``"standardize"``; keeps near-flat patches near the origin
            instead of blowing their compression noise up to unit variance.

    Returns:
        ``(N, (S/p)^2, 3 p^2)`` float32, patches in raster order, each flattened as ``(C, p, p)``.
    """
    if patch_norm not in PATCH_NORMS:
        raise ValueError(f"patch_norm must be one of {PATCH_NORMS}, got {patch_norm!r}")
    x = to_unit_range(images).float()
    n, c, h, w = x.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    patches = x.reshape(n, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n, gh * gw, c * patch_size * patch_size)
    if patch_norm == "standardize":
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True, unbiased=False)
        patches = (patches - mean) / torch.sqrt(var + eps)
    return patches


def _chunk_rows(k: int) -> int:
    # Bound the (rows, K) distance block to ~4M floats (16 MB) whatever K is.
    return max(1, (1 << 22) // max(k, 1))


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid of every row.

    Uses ``|x|^2 - 2 x.c + |c|^2`` in row chunks (one matmul per chunk, no ``(N, K, D)``
    temporary). Ties go to the lowest index.

    Args:
        x: ``(N, D)`` float points.
        centroids: ``(K, D)`` float.

    Returns:
        ``(index (N,) int64, squared distance (N,) float32)``.
    """
    chunk = chunk_rows or _chunk_rows(centroids.shape[0])
    c = centroids.to(x.dtype)
    c_sq = (c * c).sum(dim=1)
    index = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk):
        rows = x[start : start + chunk]
        d = torch.addmm(c_sq.unsqueeze(0), rows, c.t(), alpha=-2.0)
        d.add_((rows * rows).sum(dim=1, keepdim=True))
        value, idx = d.min(dim=1)
        index[start : start + chunk] = idx
        # Cancellation in the expansion can leave tiny negatives for (near-)identical points.
        dist[start : start + chunk] = value.clamp_(min=0.0)
    return index, dist


@dataclass
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes:
        centroids: ``(K, D)`` float32 final centroids.
        counts: ``(K,)`` int64 cluster sizes under the final centroids.
        inertia: sum of squared distances to the nearest centroid, after the initialisation
            and after every Lloyd update (non-increasing); ``inertia[-1]`` is the final one.
        iterations: Lloyd updates performed.
        converged: True when an update changed no assignment (stopped before ``iters``).
        reseeded: empty clusters re-seeded over the whole run.
        num_points: number of points clustered.
    """

    centroids: torch.Tensor
    counts: torch.Tensor
    inertia: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False
    reseeded: int = 0
    num_points: int = 0


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre is a point drawn with
    probability proportional to its squared distance to the nearest centre so far."""
    n = x.shape[0]
    x_sq = (x * x).sum(dim=1)
    first = int(torch.randint(n, (), generator=generator))
    chosen = [first]
    closest = (x_sq - 2.0 * (x @ x[first]) + x_sq[first]).clamp_(min=0.0)
    for _ in range(1, k):
        # Inverse-CDF sampling in float64: torch.multinomial caps the number of categories at
        # 2^24 and float32 cumulative sums lose the small weights of big point sets.
        cdf = torch.cumsum(closest.double(), dim=0)
        total = float(cdf[-1])
        if total <= 0.0:
            # Fewer distinct points than centres: every point is a centre already.
            idx = int(torch.randint(n, (), generator=generator))
        else:
            u = float(torch.rand((), generator=generator, dtype=torch.float64)) * total
            idx = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64, device=cdf.device), right=True)), n - 1)
        chosen.append(idx)
        d = (x_sq - 2.0 * (x @ x[idx]) + x_sq[idx]).clamp_(min=0.0)
        closest = torch.minimum(closest, d)
    return x[torch.tensor(chosen, device=x.device)].clone()


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 20,
    seed: int = 0,
    init: str | torch.Tensor = "k-means++",
    chunk_rows: int | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> KMeansResult:
    """Lloyd's k-means on the rows of ``x``.

    Empty clusters are re-seeded after each update with the points currently farthest from their
    centroid (distinct points, largest distance first), which never increases the inertia.
    Deterministic for a given ``seed`` on CPU.

    Args:
        x: ``(N, D)`` float points, ``N >= k``.
        k: number of clusters.
        iters: maximum number of Lloyd updates; stops early when no assignment changes.
        seed: seeds the initialisation.
        init: ``"k-means++"``, ``"random"`` (k distinct points) or a ``(k, D)`` tensor.
        chunk_rows: rows per distance block (default keeps blocks near 16 MB).
        callback: called as ``callback(iteration, inertia)`` after the initial assignment
            (iteration 0) and after every update.

    Returns:
        A :class:`KMeansResult`.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (N, D), got {tuple(x.shape)}")
    x = x.float()
    n = x.shape[0]
    if k < 1 or n < k:
        raise ValueError(f"need 1 <= k <= number of points, got k={k}, N={n}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (k, x.shape[1]):
            raise ValueError(f"init centroids must be ({k}, {x.shape[1]}), got {tuple(init.shape)}")
        centroids = init.to(device=x.device, dtype=torch.float32).clone()
    elif init == "k-means++":
        centroids = _kmeans_plus_plus(x, k, generator)
    elif init == "random":
        centroids = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    else:
        raise ValueError(f"init must be 'k-means++', 'random' or a tensor, got {init!r}")

    assign, dist = nearest_centroid(x, centroids, chunk_rows)
    result = KMeansResult(centroids, torch.zeros(k, dtype=torch.long), [float(dist.double().sum())], num_points=n)
    if callback is not None:
        callback(0, result.inertia[0])
    for it in range(1, iters + 1):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        updated = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            # An empty cluster's centroid is moved onto one of the worst-served points, where it
            # takes over at least that point (so the inertia cannot rise).
            farthest = torch.argsort(dist, descending=True, stable=True)[: empty.numel()]
            updated[empty] = x[farthest]
            result.reseeded += int(empty.numel())
        centroids = updated
        new_assign, dist = nearest_centroid(x, centroids, chunk_rows)
        result.inertia.append(float(dist.double().sum()))
        result.iterations = it
        if callback is not None:
            callback(it, result.inertia[-1])
        changed = bool((new_assign != assign).any())
        assign = new_assign
        if not changed:
            result.converged = True
            break
    result.centroids = centroids
    result.counts = torch.bincount(assign, minlength=k).cpu()
    return result


class KMeansPatchTokenizer(VisualTokenizer):
    """A codebook of ``K`` pixel-patch centroids: each ``p x p`` patch gets the id of its
    nearest centroid (squared Euclidean distance). Needs no downloaded weights.

    Args:
        centroids: ``(K, 3 p^2)`` float centroids in the space of :func:`extract_patches`.
        patch_size: patch side ``p``; the grid is ``input_size / p`` per side.
        input_size: image side ``S``.
        patch_norm: ``"none"`` (the default of :meth:`fit`: codes capture colour and
            structure, and solid colours get distinct codes) or ``"standardize"`` (per-patch
            mean/std: codes capture structure only, invariant to brightness and contrast).
        eps: variance floor of ``"standardize"``.
    """

    expected_normalization: ClassVar[str] = (
        "Input: RGB uint8 [0, 255] or float [0, 1], not ImageNet-normalised (the same range the "
        "codebook was fitted on). Internally: patch_norm 'none' uses the [0, 1] pixels as they "
        "are; 'standardize' subtracts each patch's mean and divides by sqrt(var + eps)."
    )

    def __init__(
        self,
        centroids: torch.Tensor,
        patch_size: int,
        input_size: int,
        patch_norm: str = "none",
        eps: float = 1e-2,
    ) -> None:
        if patch_norm not in PATCH_NORMS:
            raise ValueError(f"patch_norm must be one of {PATCH_NORMS}, got {patch_norm!r}")
        if patch_size < 1 or input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be a positive multiple of patch_size {patch_size}")
        if centroids.ndim != 2 or centroids.shape[1] != 3 * patch_size * patch_size:
            raise ValueError(f"centroids must be (K, {3 * patch_size * patch_size}), got {tuple(centroids.shape)}")
        side = input_size // patch_size
        super().__init__(vocab_size=centroids.shape[0], input_size=input_size, grid=(side, side))
        self.patch_size = int(patch_size)
        self.patch_norm = patch_norm
        self.eps = float(eps)
        # A buffer, not a parameter: moves with .to() and is saved, but is never optimised.
        self.register_buffer("centroids", centroids.detach().float().clone().contiguous())
        self.fit_result: KMeansResult | None = None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` float in ``[0, 1]`` -> ``(N, S/p, S/p)`` code ids."""
        patches = extract_patches(images.to(self.centroids.device), self.patch_size, self.patch_norm, self.eps)
        index, _ = nearest_centroid(patches.reshape(-1, patches.shape[-1]), self.centroids)
        return index.reshape(images.shape[0], *self.grid)

    @classmethod
    def fit(
        cls,
        images: torch.Tensor | Iterable[torch.Tensor],
        k: int,
        *,
        patch_size: int = 8,
        input_size: int | None = None,
        iters: int = 20,
        seed: int = 0,
        patch_norm: str = "none",
        eps: float = 1e-2,
        patches_per_image: int | None = None,
        init: str | torch.Tensor = "k-means++",
        device: torch.device | str | None = None,
        callback: Callable[[int, float], None] | None = None,
    ) -> "KMeansPatchTokenizer":
        """Fit a codebook by k-means over the patches of ``images``.

        Args:
            images: an ``(N, 3, S, S)`` tensor or an iterable of such batches (uint8 or float in
                ``[0, 1]``); all the same side ``S``.
            k: codebook size.
            patch_size: patch side ``p``.
            input_size: expected ``S`` (checked); None takes it from the first batch.
            iters: maximum Lloyd iterations.
            seed: seeds patch subsampling and the initialisation.
            patch_norm: ``"none"`` or ``"standardize"`` (see :func:`extract_patches`).
            eps: variance floor for ``"standardize"``.
            patches_per_image: keep this many random patches of each image (bounds memory:
                all patches of 20k images at 112 px are 3.9M x 192 floats); None keeps all.
            init: see :func:`kmeans`.
            device: where to cluster (default: CPU).
            callback: passed to :func:`kmeans`.

        Returns:
            The fitted tokenizer; ``tokenizer.fit_result`` holds the :class:`KMeansResult`.
        """
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        batches = [images] if isinstance(images, torch.Tensor) else images
        chunks: list[torch.Tensor] = []
        for batch in batches:
            if batch.ndim == 3:
                batch = batch.unsqueeze(0)
            if batch.ndim != 4 or batch.shape[1] != 3 or batch.shape[2] != batch.shape[3]:
                raise ValueError(f"images must be (N, 3, S, S), got {tuple(batch.shape)}")
            if input_size is None:
                input_size = int(batch.shape[2])
            elif batch.shape[2] != input_size:
                raise ValueError(f"images must be {input_size} px, got {batch.shape[2]}")
            patches = extract_patches(batch, patch_size, patch_norm, eps)
            if patches_per_image is not None and patches_per_image < patches.shape[1]:
                order = torch.rand(patches.shape[:2], generator=generator).argsort(dim=1)[:, :patches_per_image]
                patches = torch.gather(patches, 1, order.unsqueeze(-1).expand(-1, -1, patches.shape[2]))
            chunks.append(patches.reshape(-1, patches.shape[-1]))
        if not chunks or input_size is None:
            raise ValueError("no images to fit the codebook on")
        x = torch.cat(chunks).to(device or "cpu")
        del chunks
        result = kmeans(x, k, iters=iters, seed=seed, init=init, callback=callback)
        tokenizer = cls(result.centroids.cpu(), patch_size, input_size, patch_norm, eps)
        result.centroids = tokenizer.centroids
        tokenizer.fit_result = result
        return tokenizer

    def save(self, path: str | os.PathLike) -> None:
        """Write the codebook as a safetensors file (atomically: readers never see a partial one).

        The file holds one tensor ``centroids`` ``(K, 3 p^2)`` float32 and string metadata
        ``format``, ``patch_size``, ``input_size``, ``patch_norm``, ``eps``.
        """
        from safetensors.torch import save_file

        metadata = {
            "format": KMEANS_FORMAT,
            "patch_size": str(self.patch_size),
            "input_size": str(self.input_size),
            "patch_norm": self.patch_norm,
            "eps": repr(self.eps),
        }
        with atomic_path(path) as tmp:
            save_file({"centroids": self.centroids.detach().cpu().contiguous()}, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "KMeansPatchTokenizer":
        """Read a codebook written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a k-means patch codebook.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such k-means codebook file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != KMEANS_FORMAT or "centroids" not in f.keys():
                    raise ValueError(f"{path}: not a {KMEANS_FORMAT} file (metadata {metadata})")
                centroids = f.get_tensor("centroids")
            patch_size, input_size = int(metadata["patch_size"]), int(metadata["input_size"])
            eps = float(metadata.get("eps", "0.01"))
            if not math.isfinite(eps):
                raise ValueError(f"{path}: bad eps {eps}")
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a safetensors file ({exc})") from exc
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: incomplete metadata ({exc})") from exc
        return cls(centroids, patch_size, input_size, metadata.get("patch_norm", "none"), eps).to(device)


def load_visual_tokenizer(
    path: str | os.PathLike,
    *,
    input_size: int | None = None,
    grid: int | None = None,
    device: torch.device | str | None = None,
) -> VisualTokenizer:
    """Load a tokenizer by what ``path`` is: a directory -> :class:`FlavaCodebookTokenizer`
    (``input_size`` defaults to 112, or to what gives ``grid`` x ``grid`` codes, e.g. the image
    tower's patch grid), a file -> :class:`KMeansPatchTokenizer` (its own ``input_size``; a
    different requested one is an error).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: unloadable content, or ``input_size`` disagrees with a k-means codebook.
    """
    root = Path(path).expanduser()
    if root.is_dir():
        tokenizer = FlavaCodebookTokenizer.from_directory(root, input_size=input_size or 112, device=device)
        if grid is not None and input_size is None and tokenizer.grid != (grid, grid):
            tokenizer = FlavaCodebookTokenizer(tokenizer.codebook, input_size=grid * tokenizer.downsample)
        return tokenizer
    if not root.exists():
        raise FileNotFoundError(f"{root}: no visual tokenizer here (expected a FLAVA codebook directory or a "
                                f"k-means codebook file)")
    tokenizer = KMeansPatchTokenizer.load(root, device=device or "cpu")
    if input_size is not None and input_size != tokenizer.input_size:
        raise ValueError(f"{root}: codebook was fitted at {tokenizer.input_size} px, not {input_size}")
    return tokenizer
