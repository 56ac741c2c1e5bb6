"""The evaluation transform SLIP uses for zero-shot and linear evaluation."""
from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_rgb(image):
    return image.convert("RGB")


def eval_transform(image_size: int = 224) -> T.Compose:
    """PIL image -> (3, S, S) float tensor: resize the shorter side to S (bilinear), centre
    crop S x S, RGB, ImageNet mean/std. SLIP evaluates at 224 (resize 224, crop 224)."""
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(image_size),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
