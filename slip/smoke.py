"""``slip smoke``: the shortest end-to-end check of an install.

Builds a model with fresh weights, embeds a generated picture and a caption, saves the model,
loads it back with :func:`slip.load_pretrained` and checks the embeddings agree.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import create_model, get_tokenizer, list_models, load_pretrained, save_checkpoint
from .errors import command
from .transforms import eval_transform


def sample_image(size: int = 256) -> Image.Image:
    """A red disc on a blue background, drawn on the spot (nothing is downloaded)."""
    image = Image.new("RGB", (size, size), (30, 60, 160))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 30, 30))
    return image


@command("smoke")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slip smoke", description=__doc__)
    parser.add_argument("--model", default="slip_vit_b16", choices=list_models())
    parser.add_argument("--caption", default="a red circle on a blue background")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = create_model(args.model).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {args.model}: {n_params / 1e6:.1f}M parameters in {time.perf_counter() - start:.1f}s")

    image = eval_transform(model.arch.vision.image_size)(sample_image())[None]
    with torch.no_grad():
        img = model.encode_image(image, normalize=True)
        txt = model.encode_text(get_tokenizer()([args.caption]), normalize=True) if model.has_text else None
    print(f"image embedding {tuple(img.shape)}")
    if txt is not None:
        print(f"text embedding  {tuple(txt.shape)}  cosine(image, text) = {float(img @ txt.T):+.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.model}.safetensors"
        save_checkpoint(model, path)
        loaded, preprocess = load_pretrained(path)
        with torch.no_grad():
            again = loaded.encode_image(preprocess(sample_image())[None], normalize=True)
    diff = float((again - img).abs().max())
    print(f"checkpoint round trip: max |difference| = {diff:.2e}")
    if diff > 1e-5:
        print("smoke test FAILED: the reloaded model embeds the image differently")
        return 1
    print("smoke test passed")
    return 0


@command("list-models")
def list_models_main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="slip list-models", description="Print the registered model names.").parse_args(argv)
    print("\n".join(list_models()))
    return 0
