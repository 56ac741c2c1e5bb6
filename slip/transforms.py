"""The evaluation transform SLIP uses for zero-shot and linear evaluation."""
from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI's CLIP normalises with the statistics of its own training images (open_clip's default too).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# eval_transform's arguments: slip's own (those of SLIP's evaluation), and OpenAI CLIP's
SLIP_PREPROCESS = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"}
OPENAI_PREPROCESS = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic"}
INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


def _to_rgb(image):
    return image.convert("RGB")


def eval_transform(image_size: int = 224, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD,
                   interpolation: str = "bilinear") -> T.Compose:
    """PIL image -> (3, S, S) float tensor: resize the shorter side to S (bilinear), centre
    crop S x S, RGB, ImageNet mean/std. SLIP evaluates at 224 (resize 224, crop 224).

    Models trained elsewhere bring their own statistics and resampling (OpenAI's CLIP:
    :data:`OPENAI_MEAN`, :data:`OPENAI_STD`, bicubic); ``interpolation`` is one of
    :data:`INTERPOLATIONS`."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
    return T.Compose([
        T.Resize(image_size, interpolation=INTERPOLATIONS[interpolation]),
        T.CenterCrop(image_size),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
