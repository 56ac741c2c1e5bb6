"""Training views for SLIP: what each view of an image is (crop, flip, photometric draws).

A view is declared with :class:`ViewSpec`; a method's set with :class:`MethodViews` (a method
declares its own: :meth:`slip.ssl.SSLMethod.declare_views`; by name: :func:`slip.ssl.method_views`).
The work of making them is split in two halves on purpose:

* **Worker half (per sample, CPU)**, :mod:`slip.data.decode`: :func:`~slip.data.decode.decode_views`
  reads the image size from the header, draws every view's crop box first, then decodes the image
  **once** -- at a reduced size via libjpeg's DCT scaling (``Image.draft``) when every crop keeps at
  least the output resolution -- and resizes each crop straight to a ``uint8`` tensor
  (antialiased bilinear, like torchvision's ``RandomResizedCrop``). Nothing photometric happens
  there, so workers ship ``uint8`` (4x less inter-process traffic than float32).
* **Batched half (per batch, accelerator or CPU)**, :mod:`slip.data.augment`:
  :class:`~slip.data.augment.BatchAugment` applies horizontal flip, colour jitter, grayscale,
  Gaussian blur and normalisation to a whole ``uint8`` batch with per-sample random parameters,
  in plain tensor ops. The same code runs on CPU and GPU, so the distribution does not depend on
  the device.

The views SLIP's methods use:

* CLIP view (SLIP's ``train_transform``): ``RandomResizedCrop(size, scale=(0.5, 1))`` then
  ImageNet normalisation; no flip, no colour augmentation.
* SimCLR views (two): ``RandomResizedCrop(size, scale=(0.08, 1))``, colour jitter
  ``(0.4, 0.4, 0.4, 0.1)`` with p=0.8, grayscale p=0.2, Gaussian blur sigma in [0.1, 2] with
  p=0.5, horizontal flip p=0.5, ImageNet normalisation.
* BYOL / MoCo v3 views (two, asymmetric, :func:`byol_views`): as SimCLR's but colour jitter
  ``(0.4, 0.4, 0.2, 0.1)``; the first view is always blurred and never solarised, the second
  blurred with p=0.1 and solarised with p=0.2.
* BEiT views (:func:`beit_views`): one ``RandomResizedCrop(scale=(0.08, 1))`` cut at two sizes
  from the same box with the same flip and colour jitter (``(0.4, 0.4, 0.4)``, always): the
  tower's view (ImageNet-normalised) and the visual tokenizer's (``normalize=False``: float
  pixels in [0, 1]). A view declares the sharing with ``shares="<name of the earlier view>"``.
  :attr:`MethodViews.mask` adds a blockwise patch mask per sample, drawn in the workers.
* PIRL views (:func:`pirl_views`): the image's own view, and the nine tiles of its jigsaw
  transform as nine ordinary views that declare one parent group (``tile_of``): the workers draw
  ONE parent crop per sample, a random permutation of its 3 x 3 grid cells, and for tile slot k
  a random sub-box of cell perm[k] (:func:`slip.data.decode.jigsaw_boxes`); each tile is then
  cut, resized and augmented like any other view, independently of the others.
* CPC v2 patches (:func:`cpc_views`): the same group mechanism with ``tile_layout="grid"``: ONE
  parent crop per sample cut into an overlapping ``n x n`` grid of patches in row-major order
  (:func:`slip.data.decode.grid_boxes`), each patch an ordinary view, augmented on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


# --------------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewSpec:
    """One augmented view of an image.

    The geometric part (``scale``, ``ratio``, ``size``) runs in the data workers; the rest runs
    batched in :class:`BatchAugment`. Probabilities are per sample.

    Attributes:
        name: label used in logs and benchmarks.
        size: output (height, width) in pixels.
        scale: range of the crop area as a fraction of the image area (RandomResizedCrop).
        ratio: range of the crop aspect ratio w/h, sampled log-uniformly.
        hflip_p: probability of a horizontal flip.
        jitter: (brightness, contrast, saturation, hue) strengths as in torchvision's
            ``ColorJitter``, or None for no colour jitter.
        jitter_p: probability that colour jitter is applied.
        grayscale_p: probability of converting to (3-channel) grayscale.
        blur_p: probability of a Gaussian blur.
        blur_sigma: range of the blur's standard deviation in output pixels (uniform).
        solarize_p: probability of solarising (pixels at or above 128/255 inverted, as
            torchvision's ``RandomSolarize(threshold=128)`` on uint8 images).
        shares: name of an earlier view of the same declaration whose crop box and random
            photometric draws this view reuses (the same crop at another size: BEiT's two
            views). Its crop and photometric settings must equal that view's; only ``size``
            and ``normalize`` may differ.
        flip_with: name of an earlier view whose horizontal-flip draw this view takes (AMDIM
            flips the image once, before cutting both views); its crop and other draws stay its
            own. ``hflip_p`` must equal that view's.
        normalize: apply the mean/std normalisation (False: float pixels in [0, 1], e.g. for
            a visual tokenizer with its own normalisation).
        saliency_p: probability that the crop is cut from the image with its background
            removed (RELICv2's saliency masking; :mod:`slip.data.saliency`).
        tile_of: name of a jigsaw group this view is a tile of (None: an ordinary view). The
            ``grid * grid`` views of a group, in declaration order, are its slots: per sample
            ONE parent crop is drawn with the group's ``scale``/``ratio`` and divided into a
            ``grid x grid`` grid of cells, the cells are randomly permuted, and slot k is a
            random sub-box of cell perm[k] whose sides are ``tile_fraction`` of the cell's
            (PIRL's jigsaw; :func:`slip.data.decode.jigsaw_boxes`). Every view of a group
            declares the same ``scale``, ``ratio``, ``grid`` and ``tile_fraction``; its own
            size and photometric settings apply to it alone.
        grid: cells per side of the parent crop of a ``tile_of`` group.
        tile_fraction: a tile's side as a fraction of its cell's (PIRL: 64 px of an 85 px cell);
            with ``tile_layout="grid"``, a patch's side as a fraction of the parent's.
        tile_layout: ``"jigsaw"`` (PIRL's, above) or ``"grid"``: CPC's overlapping patch grid.
            The ``grid * grid`` views of the group are then the patches of ONE parent crop in
            row-major order (slot ``r * grid + c`` is row r, column c), no permutation: patch
            (r, c) has its left edge at ``c * tile_stride`` and its top at ``r * tile_stride``
            of the parent's width / height, and sides ``tile_fraction`` of them
            (:func:`slip.data.decode.grid_boxes`; CPC v2: 7 x 7 patches of 64 px at stride 32
            from 256 px, ``tile_fraction = 1/4``, ``tile_stride = 1/8``). Each patch is cut,
            resized and augmented on its own like any other view.
        tile_stride: ``"grid"`` layout only: the step between neighbouring patches as a fraction
            of the parent's side; the patches must fit: ``(grid - 1) * tile_stride +
            tile_fraction <= 1``.
    """

    name: str
    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip_p: float = 0.0
    jitter: tuple[float, float, float, float] | None = None
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    shares: str | None = None
    flip_with: str | None = None
    normalize: bool = True
    saliency_p: float = 0.0
    tile_of: str | None = None
    grid: int = 3
    tile_fraction: float = 64 / 85
    tile_layout: str = "jigsaw"
    tile_stride: float = 0.0

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"view {self.name!r}: size must be two positive ints, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"view {self.name!r}: scale must satisfy 0 < lo <= hi <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"view {self.name!r}: ratio must satisfy 0 < lo <= hi")
        for p in (self.hflip_p, self.jitter_p, self.grayscale_p, self.blur_p, self.solarize_p, self.saliency_p):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"view {self.name!r}: probabilities must lie in [0, 1]")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"view {self.name!r}: blur_sigma must satisfy 0 < lo <= hi")
        if self.grid < 1 or not 0 < self.tile_fraction <= 1:
            raise ValueError(f"view {self.name!r}: grid must be >= 1 and tile_fraction in (0, 1]")
        if self.tile_layout not in ("jigsaw", "grid"):
            raise ValueError(f"view {self.name!r}: tile_layout must be 'jigsaw' or 'grid', got {self.tile_layout!r}")
        if self.tile_layout == "grid":
            if self.tile_of is None:
                raise ValueError(f"view {self.name!r}: tile_layout 'grid' is for the patches of a tile_of group")
            if self.tile_stride < 0 or (self.grid > 1 and self.tile_stride <= 0):
                raise ValueError(f"view {self.name!r}: a patch grid needs a positive tile_stride")
            if (self.grid - 1) * self.tile_stride + self.tile_fraction > 1 + 1e-9:
                raise ValueError(f"view {self.name!r}: {self.grid} patches of {self.tile_fraction} at stride "
                                 f"{self.tile_stride} do not fit in the parent crop")
        elif self.tile_stride != 0.0:
            raise ValueError(f"view {self.name!r}: tile_stride is for tile_layout 'grid' only")
        if self.tile_of is not None and self.shares is not None:
            raise ValueError(f"view {self.name!r}: a tile (tile_of) cannot also share another view's crop")
        if self.flip_with is not None and self.shares is not None:
            raise ValueError(f"view {self.name!r}: a view that shares another's draws takes its flip already "
                             "(flip_with is for views with their own crop)")


# What a view that ``shares`` another takes from it, and so must declare identically.
_SHARED_FIELDS = ("scale", "ratio", "hflip_p", "jitter", "jitter_p", "grayscale_p", "blur_p", "blur_sigma", "solarize_p",
                  "saliency_p")
# What the tiles of one jigsaw group (``tile_of``) have in common: the parent crop and its grid.
_TILE_FIELDS = ("scale", "ratio", "grid", "tile_fraction", "tile_layout", "tile_stride")


@dataclass(frozen=True)
class MethodViews:
    """The views a training method needs from each image.

    Attributes:
        clip: the view fed to the image tower for the image-text loss, or None (SimCLR alone).
        ssl: the self-supervised views (two for SimCLR), or empty (CLIP alone).
        mask: a patch-mask generator (e.g. :class:`slip.ssl.masking.BlockMaskGenerator`), called
            with each sample's RNG in the workers; batches then carry ``patch_mask``
            ``(B, H * W)`` bool. None: no mask.
    """

    clip: ViewSpec | None
    ssl: tuple[ViewSpec, ...] = field(default_factory=tuple)
    mask: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        seen: dict[str, ViewSpec] = {}
        for view in self.all:
            if view.name in seen:
                raise ValueError(f"two views are named {view.name!r}")
            if view.shares is not None:
                source = seen.get(view.shares)
                if source is None:
                    raise ValueError(f"view {view.name!r} shares {view.shares!r}, which is not an earlier view")
                if source.shares is not None:
                    raise ValueError(f"view {view.name!r} shares {view.shares!r}, which itself shares a view")
                differ = [f for f in _SHARED_FIELDS if getattr(view, f) != getattr(source, f)]
                if differ:
                    raise ValueError(f"view {view.name!r} shares the crop and draws of {view.shares!r} but declares "
                                     f"other {', '.join(differ)}")
            if view.flip_with is not None:
                source = seen.get(view.flip_with)
                if source is None:
                    raise ValueError(f"view {view.name!r} takes the flip of {view.flip_with!r}, which is not an "
                                     "earlier view")
                if source.hflip_p != view.hflip_p:
                    raise ValueError(f"view {view.name!r} takes the flip of {view.flip_with!r} but declares hflip_p "
                                     f"{view.hflip_p} against its {source.hflip_p}")
            seen[view.name] = view
        groups: dict[str, list[ViewSpec]] = {}
        for view in self.all:
            if view.tile_of is not None:
                groups.setdefault(view.tile_of, []).append(view)
        for group, tiles in groups.items():
            differ = [f for f in _TILE_FIELDS if len({getattr(t, f) for t in tiles}) > 1]
            if differ:
                raise ValueError(f"the tiles of jigsaw group {group!r} declare different {', '.join(differ)}")
            if len(tiles) != tiles[0].grid ** 2:
                raise ValueError(f"jigsaw group {group!r} has {len(tiles)} tiles; a {tiles[0].grid} x {tiles[0].grid} "
                                 f"grid needs {tiles[0].grid ** 2}")

    @property
    def all(self) -> tuple[ViewSpec, ...]:
        """Every view in the order :func:`decode_views` returns them: CLIP first, then SSL."""
        return ((self.clip,) if self.clip is not None else ()) + self.ssl

    @property
    def needs_text(self) -> bool:
        """Captions are only needed when there is an image-text loss."""
        return self.clip is not None


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def clip_view(size: int | tuple[int, int] = 224) -> ViewSpec:
    """SLIP's CLIP training view: RandomResizedCrop(size, scale=(0.5, 1)) + normalisation."""
    return ViewSpec(name="clip", size=_pair(size), scale=(0.5, 1.0))


def simclr_view(size: int | tuple[int, int] = 224, name: str = "simclr") -> ViewSpec:
    """One SimCLR view as SLIP augments it (see the module docstring for the parameters)."""
    return ViewSpec(
        name=name,
        size=_pair(size),
        scale=(0.08, 1.0),
        hflip_p=0.5,
        jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p=0.8,
        grayscale_p=0.2,
        blur_p=0.5,
        blur_sigma=(0.1, 2.0),
    )


def byol_views(size: int | tuple[int, int] = 224, prefix: str = "byol") -> tuple[ViewSpec, ViewSpec]:
    """BYOL's two asymmetric views (Grill et al. 2020, Table 6), also MoCo v3's for ViTs:
    crop scale (0.08, 1), flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale 0.2,
    Gaussian blur sigma in [0.1, 2] with p=1.0 / 0.1, solarisation with p=0.0 / 0.2."""
    common = dict(size=_pair(size), scale=(0.08, 1.0), hflip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                  grayscale_p=0.2, blur_sigma=(0.1, 2.0))
    return (ViewSpec(name=f"{prefix}1", blur_p=1.0, solarize_p=0.0, **common),
            ViewSpec(name=f"{prefix}2", blur_p=0.1, solarize_p=0.2, **common))


def beit_views(size: int | tuple[int, int] = 224, tokenizer_size: int | tuple[int, int] = 112) -> tuple[ViewSpec, ViewSpec]:
    """BEiT's two views of one crop (Bao et al. 2021): RandomResizedCrop scale (0.08, 1), flip
    0.5 and colour jitter (0.4, 0.4, 0.4) always, then the tower's view at ``size`` and the
    visual tokenizer's at ``tokenizer_size``, unnormalised. (BEiT resizes them bicubic and
    Lanczos; both are antialiased bilinear here.)"""
    common = dict(scale=(0.08, 1.0), hflip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.0), jitter_p=1.0)
    return (ViewSpec(name="beit", size=_pair(size), **common),
            ViewSpec(name="beit_tokens", size=_pair(tokenizer_size), shares="beit", normalize=False, **common))


def mocov2_views(size: int | tuple[int, int] = 224, prefix: str = "mocov2") -> tuple[ViewSpec, ViewSpec]:
    """MoCo v2's two views (Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum
    Contrastive Learning", Sec. 3 and its ``aug_plus``): crop scale (0.2, 1), colour jitter
    (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale 0.2, Gaussian blur sigma in [0.1, 2] with
    p=0.5 (the blur MoCo v2 adds to MoCo), flip 0.5; the same distribution for both views: SLIP's
    SimCLR view (:func:`simclr_view`) with MoCo's crop scale."""
    return tuple(replace(simclr_view(size, f"{prefix}{i}"), scale=(0.2, 1.0)) for i in (1, 2))  # type: ignore[return-value]


def small_crop_size(size: int | tuple[int, int], patch_size: int = 16) -> tuple[int, int]:
    """SwAV's small crops are 96 px for 224 px large ones: the same ratio at any size, rounded
    to whole patches of ``patch_size`` (at least one) so a ViT tower can take them."""
    return tuple(max(patch_size, round(s * 96 / 224 / patch_size) * patch_size) for s in _pair(size))  # type: ignore[return-value]


def swav_views(size: int | tuple[int, int] = 224, *, large: int = 2, small: int = 6, patch_size: int = 16,
               prefix: str = "swav") -> tuple[ViewSpec, ...]:
    """SwAV's multi-crop (Caron et al. 2020, Sec. 3.2 and its released ``main_swav.py``):
    ``large`` crops at ``size`` with scale (0.14, 1) and ``small`` crops at 96/224 of it
    (:func:`small_crop_size`) with scale (0.05, 0.14); every crop flipped with p=0.5, colour
    jitter (0.8, 0.8, 0.8, 0.2) with p=0.8 (strength s=1), grayscale 0.2 and Gaussian blur
    sigma in [0.1, 2] with p=0.5. The large crops come first (their codes are the targets)."""
    common = dict(hflip_p=0.5, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                  blur_sigma=(0.1, 2.0))
    small_size = small_crop_size(size, patch_size)
    return (tuple(ViewSpec(name=f"{prefix}_large{i + 1}", size=_pair(size), scale=(0.14, 1.0), **common)
                  for i in range(large))
            + tuple(ViewSpec(name=f"{prefix}_small{i + 1}", size=small_size, scale=(0.05, 0.14), **common)
                    for i in range(small)))


# PIRL (Misra & van der Maaten 2020, Sec. 4): the jigsaw's parent crop resized to 255 px is cut
# into a 3 x 3 grid of 85 px cells, and a random 64 px tile is taken from each cell.
PIRL_GRID = 3
PIRL_TILE_FRACTION = 64 / 85


def pirl_tile_size(size: int | tuple[int, int], patch_size: int = 16) -> tuple[int, int]:
    """PIRL's tiles are 64 px for 224 px images: the same ratio at any size, rounded to whole
    patches of ``patch_size`` (at least one) so a ViT tower can take them."""
    return tuple(max(patch_size, round(s * 64 / 224 / patch_size) * patch_size) for s in _pair(size))  # type: ignore[return-value]


def pirl_views(size: int | tuple[int, int] = 224, *, patch_size: int = 16, prefix: str = "pirl") -> tuple[ViewSpec, ...]:
    """PIRL's views (Misra & van der Maaten 2020): ``{prefix}_image``, the image's own view I,
    then ``{prefix}_tile1`` .. ``{prefix}_tile9``, the nine tiles of its jigsaw transform I^t in
    one group (``tile_of``): a parent crop divided into a 3 x 3 grid, the cells in a random
    order per image (slot k holds cell perm[k]), from each cell a random sub-crop of 64/85 of its
    side (the paper's 64 px of an 85 px cell of a 255 px crop), each tile resized to
    :func:`pirl_tile_size` (64 px at 224) and augmented on its own.

    From the paper: the 3 x 3 grid, the 255 / 85 / 64 px geometry, each tile encoded on its own.
    Not verified against the paper's text (taken from VISSL's reproduction,
    ``pirl_jigsaw_4node_resnet50.yaml`` and its ``ImgPilToPatchesAndImage``): the image view's
    crop scale (0.08, 1), the parent crop's scale (0.6, 1), and the photometric augmentation of
    the image and of every tile alike: colour jitter (0.4, 0.4, 0.4, 0.2) always, grayscale
    p=0.2, horizontal flip p=0.5, no blur. VISSL also applies, with p=0.66, a posterise /
    sharpness / solarise / autocontrast group that slip's batched augmentation does not have
    (left out here).
    """
    photometric = {"hflip_p": 0.5, "jitter": (0.4, 0.4, 0.4, 0.2), "jitter_p": 1.0, "grayscale_p": 0.2}
    tile = pirl_tile_size(size, patch_size)
    image = ViewSpec(name=f"{prefix}_image", size=_pair(size), scale=(0.08, 1.0), **photometric)
    return (image,) + tuple(
        ViewSpec(name=f"{prefix}_tile{k + 1}", size=tile, scale=(0.6, 1.0), tile_of=f"{prefix}_jigsaw",
                 grid=PIRL_GRID, tile_fraction=PIRL_TILE_FRACTION, **photometric)
        for k in range(PIRL_GRID * PIRL_GRID))


# CPC v2 (Henaff et al. 2020): a crop cut into a 7 x 7 grid of half-overlapping patches, a quarter
# of its side at stride an eighth (Lightning-Bolts' cpc/transforms.py: 32 px patches overlapping by
# 16 of a 128 px crop): a patch is 2 strides, n patches span n + 1 strides.
CPC_GRID = 7


def cpc_patch_size(size: int | tuple[int, int], grid: int = CPC_GRID, patch_size: int = 16) -> tuple[int, int]:
    """A CPC patch's output size: ``2 / (grid + 1)`` of the tower's input size (64 px of 256 for a
    7 x 7 grid; 56 px of 224, rounded), rounded to whole patches of ``patch_size`` (at least one)
    so a ViT tower can take it: 64 px at 224 with patch 16 (4 x 4 tokens), 16 px at 32 with
    patch 8 and a 3 x 3 grid."""
    return tuple(max(patch_size, round(s * 2 / (grid + 1) / patch_size) * patch_size)  # type: ignore[return-value]
                 for s in _pair(size))


def cpc_views(size: int | tuple[int, int] = 224, *, grid: int = CPC_GRID, patch_size: int = 16,
              prefix: str = "cpc") -> tuple[ViewSpec, ...]:
    """CPC v2's views: ``{prefix}_patch1`` .. ``{prefix}_patch{grid ** 2}``, the patches of one
    parent crop in row-major order (one ``tile_of`` group, ``tile_layout="grid"``), each
    ``2 / (grid + 1)`` of the parent's side at stride ``1 / (grid + 1)`` (half-overlapping),
    resized to :func:`cpc_patch_size` and augmented on its own.

    As Lightning-Bolts' CPC v2 on ImageNet (cpc/transforms.py ``CPCTrainTransformsImageNet128``):
    the 7 x 7 grid of patches a quarter of the crop's side at stride an eighth (32 px overlapping
    by 16 of 128 px), the parent crop's scale (0.3, 1) and ratio (0.7, 1.4), colour jitter
    (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.25, flip p=0.5. Differences: bolts applies the
    photometric set and the flip once to the whole crop before cutting it; here each patch draws
    its own (CPC v2 augments each patch independently, as third-party summaries of its paper
    describe; its text was not available), and the patch is resized to the tower's patch size
    (64 px at 224; bolts keeps 32 px of 128). Not in slip's batched augmentation and left out:
    CPC v2's colour dropping (two of three channels dropped per patch, as the summaries describe
    it; not in bolts either). Its further augmentations (AutoAugment-style primitives, as we
    recall the paper) are not verified and not here either.
    """
    if grid < 2:
        raise ValueError(f"a CPC patch grid needs at least 2 x 2 patches, got {grid}")
    photometric = {"hflip_p": 0.5, "jitter": (0.4, 0.4, 0.4, 0.1), "jitter_p": 0.8, "grayscale_p": 0.25}
    patch = cpc_patch_size(size, grid, patch_size)
    return tuple(
        ViewSpec(name=f"{prefix}_patch{k + 1}", size=patch, scale=(0.3, 1.0), ratio=(0.7, 1.4),
                 tile_of=f"{prefix}_grid", grid=grid, tile_layout="grid", tile_fraction=2 / (grid + 1),
                 tile_stride=1 / (grid + 1), **photometric)
        for k in range(grid * grid))
