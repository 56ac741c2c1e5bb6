"""Model-side speed figures, measured side by side in one run (ratios are what to compare).

1. Text tower: slip's batch-first, fused causal SDPA with padding trimmed after the last EOT,
   against the original layout (nn.MultiheadAttention with a dense additive mask over all 77
   positions), same weights, same captions.
2. SLIP image forward: one tower call over the concatenated CLIP + 2 SSL views, against three
   separate calls (the original), forward + backward.
3. Peak memory and time of a forward+backward of the full SLIP objective on this device.

    python benchmarks/bench_model.py [--model slip_vit_s16] [--batch 16] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import slip  # noqa: E402
from slip.losses import slip_objective  # noqa: E402
from slip.tokenizer import trim_padding  # noqa: E402

CAPTIONS = ["a photo of a dog", "sunset over the lake near our cabin in the mountains",
            "IMG_2041", "two children playing football on a beach during summer holidays"]


def timeit(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="slip_vit_s16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 for the forward+backward figure")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = args.device
    from original_slip import OriginalCLIP

    model = slip.create_model(args.model).to(dev)
    size = model.arch.vision.image_size
    print(f"device={dev} model={args.model} batch={args.batch} threads={torch.get_num_threads()}")

    # 1. text tower
    original = OriginalCLIP("vit_small_patch16_224", vision_heads=12).to(dev).eval()
    model_text = slip.create_model("clip_vit_s16").to(dev).eval()
    model_text.load_state_dict(original.state_dict(), strict=False)
    tokens = slip.get_tokenizer()(CAPTIONS * (args.batch // len(CAPTIONS) or 1))
    text = tokens.to(dev)
    trimmed = trim_padding(tokens).to(dev)  # as the training loader and zero-shot hand tokens over
    with torch.no_grad():
        t_ours = timeit(lambda: model_text.encode_text(trimmed), args.repeats, dev)
        t_orig = timeit(lambda: original.encode_text(text), args.repeats, dev)
        err = (model_text.encode_text(trimmed) - original.encode_text(text)).abs().max().item()
    print(f"text tower  original (MHA, dense mask, 77 pos): {t_orig * 1e3:8.1f} ms")
    print(f"text tower  slip (causal SDPA, trimmed):        {t_ours * 1e3:8.1f} ms   speed-up x{t_orig / t_ours:.2f}"
          f"   max |diff| {err:.1e}")

    # 2. one tower call over three views vs three calls
    views = [torch.randn(args.batch, 3, size, size, device=dev) for _ in range(3)]

    def fused():
        model.zero_grad(set_to_none=True)
        sum(f.sum() for f in model.image_features(views)).backward()

    def separate():
        model.zero_grad(set_to_none=True)
        sum(model.visual(v).sum() for v in views).backward()

    t_fused = timeit(fused, args.repeats, dev)
    t_sep = timeit(separate, args.repeats, dev)
    print(f"3 views fwd+bwd  three calls: {t_sep * 1e3:8.1f} ms")
    print(f"3 views fwd+bwd  one call:    {t_fused * 1e3:8.1f} ms   speed-up x{t_sep / t_fused:.2f}")

    # 3. the full SLIP step
    batch_text = text[: args.batch] if text.shape[0] >= args.batch else text.repeat(args.batch // text.shape[0] + 1, 1)[: args.batch]

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=args.bf16):
            out = model(image=views[0], text=batch_text, views=views[1:])
            loss = slip_objective(out, clip=model.has_text,
                                  ssl_loss=model.ssl.loss if model.has_ssl_head else None)["loss"]
        loss.backward()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_step = timeit(step, args.repeats, dev)
    mem = f"   peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if dev == "cuda" else ""
    print(f"SLIP objective fwd+bwd ({'bf16' if args.bf16 else 'fp32'}): {t_step * 1e3:8.1f} ms"
          f"   {args.batch / t_step:.1f} samples/s{mem}")


if __name__ == "__main__":
    main()
