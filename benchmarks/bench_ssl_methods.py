"""Training-step cost of CLIP, each SSL method alone and SLIP with each SSL method, side by side.

One run measures every combination under the same conditions and prints them in one table
with ratios to CLIP; machines are noisy, so compare the ratios of one run, not figures across
runs. The issue's question -- samples/s and peak memory of SLIP with each method at ViT-B/16,
batch 64, bf16 (the SLIP paper notes SLIP costs about 3x CLIP's activations) -- is the default:

    python benchmarks/bench_ssl_methods.py                       # b16, batch 64, bf16 on CUDA
    python benchmarks/bench_ssl_methods.py --size l16 --batch 32 --json ssl_l16.json
    python benchmarks/bench_ssl_methods.py --only clip,slip+simclr,slip+beit --tokenizer CODEBOOK
    python benchmarks/bench_ssl_methods.py --device cpu --size tiny --batch 32 [--threads 1]
    python benchmarks/bench_ssl_methods.py --device cpu --size s16 --batch 8 --steps 2 --warmup 1 \\
        --only clip,slip+simclr,slip+beit [--threads 1]

On a CPU shared with other work, ``--threads 1`` gives far steadier timings: with several
OpenMP threads every op waits for the slowest, and a descheduled thread stalls it.

Combinations: ``clip`` (the clip_* model), one per method of the SSL registry
(``slip.ssl.method_names()``: ``simclr``, ``mocov3``, ``byol``, ``beit`` ...; the image-only
simclr_* model with its SSL method swapped, as ``objective.ssl`` does in training) and
``slip+<method>`` for each (the slip_* model). A newly registered method is picked up.

What a step is: the trainer's plain step (slip.train.step.plain_step) on a fixed random batch --
zero_grad, forward + slip_objective under autocast (bf16) or in fp32, backward, AdamW step
(the trainer's parameter groups, torch's fused kernel on CUDA), then the SSL method's
``before_optimizer_step`` / ``on_step_end`` (EMA updates, queues, SwAV's prototypes, PIRL's
memory bank, whose ``--corpus`` rows its ``configure_training`` allocates). Data loading and
augmentation are not included. Inputs (made on the device): normalised-looking randn images at the tower's size
(in the autocast dtype, as BatchAugment hands them over), random caption tokens with the EOT
(49407) at a random position, and for a method with a visual tokenizer (BEiT) the tokenizer's
view as float32 in [0, 1] plus a block mask from the method's own mask generator, and for a
method with a memory bank (PIRL) distinct random global sample indices. BEiT's
targets come from a KMeansPatchTokenizer with random centroids (8192 codes of p x p pixel
patches, p = tokenizer input / grid side, e.g. 112 / 14 = 8 at ViT-B/16), about the vocabulary
of the FLAVA codebook, or from ``--tokenizer PATH`` (slip.ssl.visual_tokenizers
.load_visual_tokenizer: a k-means codebook file or a FLAVA directory).

Columns:
  samples/s, ms/step  timed steps only (after the warm-up), with torch.cuda.synchronize on CUDA.
  peak GiB            torch.cuda.max_memory_allocated over the whole combination (model,
                      gradients, AdamW state, activations), after reset_peak_memory_stats.
                      CUDA only: on CPU there is no resettable allocator peak (max RSS only
                      ever grows over the process), so it reads n/a.
  act MiB/sample      activations: the bytes of the distinct storages autograd saves for
                      backward during one forward + objective (torch.autograd.graph
                      .saved_tensors_hooks on the first warm-up step), excluding parameters and
                      the autocast bf16 copies of parameters, divided by the batch size. It
                      is the same on every device for a given precision (kernels may save
                      slightly different extras, e.g. the attention backend's statistics).
  TFLOP/s             FLOPs of one step (forward, objective and backward, counted with
                      torch.utils.flop_counter.FlopCounterMode on the first warm-up step;
                      with --grad-checkpointing the recomputed forward counts too) over the
                      timed step time.
  MFU                 TFLOP/s over the device's peak dense bf16 FLOP/s (PEAK_BF16_FLOPS, by
                      device name); '-' for fp32, an unknown device, or with activation
                      checkpointing (whose count includes the recomputation: that is HFU).
  state MiB           what the SSL method keeps across steps besides trained weights: its
                      buffers (MoCo v2's key queue, SwAV's embedding queue, BatchNorm
                      statistics), frozen momentum copies of the tower and heads, and PIRL's
                      memory bank (``--corpus`` rows of the head's output size, one process).
  x clip              ratio to the clip row of the same run, batch size and checkpointing
                      setting (samples/s, activations).

``--grad-checkpointing`` recomputes block activations in backward in both towers (the
trainer's ``model.grad_checkpointing``). On CUDA a batch that does not fit reads ``OOM`` in
the table instead of stopping the run.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from slip.losses import slip_objective
from slip.models import create_model, get_architecture
from slip.ssl import method_class, method_names
from slip.ssl.base import TARGET
from slip.ssl.visual_tokenizers import KMeansPatchTokenizer, load_visual_tokenizer
from slip.train.config import OptimConfig
from slip.train.optim import build_optimizer
from slip.train.step import plain_step

SIZES = {"tiny": "vit_tiny", "s16": "vit_s16", "b16": "vit_b16", "l16": "vit_l16"}
_ORDER = ("simclr", "mocov2", "mocov3", "byol", "swav", "relicv2", "pirl", "amdim", "cpc", "yadim", "beit")  # display order of the methods known when this was written
SSL_METHODS = tuple([m for m in _ORDER if m in method_names()] + [m for m in method_names() if m not in _ORDER])
COMBINATIONS = ("clip", *SSL_METHODS, *(f"slip+{m}" for m in SSL_METHODS))
EOT = 49407  # CLIP's end-of-text id, the highest of the vocabulary
SOT = 49406
MASK_RATIO = 0.4  # objective.mask_ratio's default
VOCAB = 8192  # codes of the random benchmark tokenizer (DALL-E / FLAVA codebook size)
# Rows of the memory bank of a method with one row per sample (PIRL), as for ImageNet-1k's
# training set, PIRL's corpus (--corpus); the batch's samples get random distinct indices in it.
CORPUS = 1_281_167
# Peak dense bf16 tensor-core FLOP/s (no sparsity) by a substring of torch.cuda.get_device_name,
# first match wins; the H100 entry is the SXM part (whose name reads "H100 80GB HBM3"), not
# the PCIe / NVL boards, which are slower and not listed.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 80GB HBM3", 989e12),
    ("H100 SXM", 989e12),
    ("A100", 312e12),
)


@dataclass
class Combination:
    name: str
    model: str  # registry name of the preset
    clip: bool  # the image-text loss is on
    ssl: str | None  # SSL method, None for CLIP alone


def needs_tokenizer(ssl: str | None) -> bool:
    """Whether the SSL method trains against a visual tokenizer's codes (BEiT)."""
    return ssl is not None and method_class(ssl).needs_visual_tokenizer


def peak_bf16_flops(device_name: str) -> float | None:
    """The peak dense bf16 FLOP/s of a device from PEAK_BF16_FLOPS; None when not listed."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def combination(name: str, size: str) -> Combination:
    vit = SIZES[size]
    if name == "clip":
        return Combination(name, f"clip_{vit}", clip=True, ssl=None)
    if name.startswith("slip+"):
        return Combination(name, f"slip_{vit}", clip=True, ssl=name.removeprefix("slip+"))
    return Combination(name, f"simclr_{vit}", clip=False, ssl=name)


# ----------------------------------------------------------------------------------------------
# Building the model and a batch
# ----------------------------------------------------------------------------------------------
def random_tokenizer(image_size: int, grid: int, seed: int = 0) -> KMeansPatchTokenizer:
    """A k-means patch tokenizer with random centroids: BEiT targets at the cost of a real
    8192-code codebook. Its input is half the tower's image size (112 px for 224 px towers)."""
    input_size = image_size // 2
    if input_size % grid:
        raise ValueError(f"tokenizer input {input_size} px is not divisible by the {grid}x{grid} patch grid")
    patch = input_size // grid
    generator = torch.Generator().manual_seed(seed)
    centroids = torch.rand(VOCAB, 3 * patch * patch, generator=generator)
    return KMeansPatchTokenizer(centroids, patch_size=patch, input_size=input_size)


def build_model(combo: Combination, tokenizer, device: torch.device, grad_checkpointing: bool = False):
    """The trainer's resolve_architecture for this combination, built on ``device`` (with
    activation checkpointing in both towers if asked, as ``model.grad_checkpointing``)."""
    arch = get_architecture(combo.model)
    if combo.ssl is not None:
        arch = arch.with_ssl_method(combo.ssl, tokenizer.vocab_size if needs_tokenizer(combo.ssl) else None)
    torch.manual_seed(0)
    model = create_model(arch)
    if needs_tokenizer(combo.ssl):
        model.ssl.attach_visual_tokenizer(tokenizer.to(device))
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.to(device).train()


def configure(model, combo: Combination, total_steps: int, corpus: int = CORPUS) -> None:
    """The trainer's ``configure_training`` with the default objective settings; a method with
    one memory-bank row per sample (PIRL) gets a corpus of ``corpus`` samples."""
    if combo.ssl is None:
        return
    from slip.train.config import ObjectiveConfig

    needs_index = model.ssl.needs_sample_index
    model.ssl.configure_training(ObjectiveConfig(ssl=combo.ssl), total_steps, total_steps,
                                 corpus_size=corpus if needs_index else None, seed=0)


def random_batch(model, combo: Combination, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One batch as the trainer hands it to the model after augmentation, made on ``device``
    (drawn from a generator of that device, so a CPU and a CUDA batch differ)."""
    generator = torch.Generator(device).manual_seed(1)
    size = model.arch.vision.image_size
    out: dict = {}

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    if combo.clip:
        out["image"] = randn(batch, 3, size, size)
        text_cfg = model.arch.text
        length = text_cfg.context_length
        # Random ids below SOT, then SOT at 0, EOT at a random position and padding after it.
        text = torch.randint(1, SOT, (batch, length), generator=generator, device=device)
        eot = torch.randint(2, length, (batch, 1), generator=generator, device=device)
        positions = torch.arange(length, device=device)
        text = torch.where(positions > eot, 0, torch.where(positions == eot, EOT, text))
        text[:, 0] = SOT
        out["text"] = text
    if combo.ssl is not None:
        declared = model.ssl.data_views(size, mask_ratio=MASK_RATIO)
        views = []
        for spec in declared.ssl:
            h, w = spec.size
            if spec.normalize:
                views.append(randn(batch, 3, h, w))
            else:  # a visual tokenizer's view: float32 pixels in [0, 1]
                views.append(torch.rand(batch, 3, h, w, generator=generator, device=device))
        out["views"] = views
        if declared.mask is not None:
            out["patch_mask"] = declared.mask.sample_masks(batch, np.random.default_rng(2)).to(device)
        if model.ssl.needs_sample_index:  # the samples' global indices (PIRL's memory bank)
            corpus = model.ssl.corpus_size or CORPUS
            out["index"] = torch.randperm(corpus, generator=torch.Generator().manual_seed(3))[:batch].to(device)
    return out


def ssl_state_bytes(model) -> int:
    """Bytes the SSL method keeps from step to step besides what the optimizer trains: its
    buffers (queues, counters, BatchNorm statistics), frozen copies (momentum branches) and
    tensors it holds outside its buffers (PIRL's memory bank, this rank's share of it)."""
    if not model.has_ssl_head:
        return 0
    kept = [*model.ssl.buffers(), *(p for p in model.ssl.parameters() if not p.requires_grad)]
    kept += [t for t in vars(model.ssl).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in kept)


def tower_images(model, combo: Combination) -> int:
    """Images per sample that go through the online image tower with autograd."""
    roles = model.ssl.view_roles if combo.ssl is not None else ()
    return int(combo.clip) + sum(r != TARGET for r in roles)


# ----------------------------------------------------------------------------------------------
# Measuring saved activations
# ----------------------------------------------------------------------------------------------
def _is_parameter_cast(t: torch.Tensor) -> bool:
    """True for autocast's low-precision copy of a parameter (a ToCopy of an autograd leaf), or
    a view of one (Linear saves ``weight.t()``). The model's inputs never require grad, so the
    only leaves that do are parameters."""
    fn = (t._base if t._base is not None else t).grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    return any(nxt is not None and type(nxt).__name__ == "AccumulateGrad" for nxt, _ in fn.next_functions)


class SavedTensors:
    """Inside ``with``, records every tensor autograd saves for backward, by distinct storage.

    ``activation_bytes``: storages that are neither a parameter/buffer of ``model`` nor an
    autocast copy of one; ``parameter_bytes``: those that are. A storage shared by several saved
    tensors (views, in-place results) counts once, at its full size.
    """

    def __init__(self, model: torch.nn.Module):
        tensors = list(model.parameters()) + list(model.buffers())
        self._params = {(t.device, t.untyped_storage().data_ptr()) for t in tensors}
        self._activations: dict[tuple, int] = {}
        self._parameters: dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in self._activations and key not in self._parameters:
            parameter = key in self._params or _is_parameter_cast(t)
            (self._parameters if parameter else self._activations)[key] = storage.nbytes()
        return t

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def activation_bytes(self) -> int:
        return sum(self._activations.values())

    @property
    def parameter_bytes(self) -> int:
        return sum(self._parameters.values())


# ----------------------------------------------------------------------------------------------
# One combination
# ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Return what the last measurement left to the allocator (and the CUDA cache)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Counting FLOPs
# ----------------------------------------------------------------------------------------------
def _already_wrapped(formula):
    def raw(*args, **kwargs):
        return formula(*args, **kwargs)

    raw._get_raw = True  # FlopCounterMode must not wrap a registered formula a second time
    return raw


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter (matmuls, convolutions, attention; forward and backward), also
    counting CPU flash attention, which torch's table leaves out (it lists the CUDA kernels
    only), with the formulas of the CUDA kernel. CUDA counts are torch's own."""
    aten = torch.ops.aten
    registry = torch.utils.flop_counter.flop_registry
    extra = {}
    for cpu_name, cuda_op in (("_scaled_dot_product_flash_attention_for_cpu", aten._scaled_dot_product_flash_attention),
                              ("_scaled_dot_product_flash_attention_for_cpu_backward",
                               aten._scaled_dot_product_flash_attention_backward)):
        cpu_op = getattr(aten, cpu_name, None)
        if cpu_op is not None and cpu_op not in registry and cuda_op in registry:
            extra[cpu_op] = _already_wrapped(registry[cuda_op])
    return FlopCounterMode(display=False, custom_mapping=extra)


# ----------------------------------------------------------------------------------------------
# One combination
# ----------------------------------------------------------------------------------------------
def measure(combo: Combination, args, device: torch.device, tokenizer) -> dict:
    """One combination at ``args.batch``: see :func:`measure_batches`."""
    return measure_batches(combo, [args.batch], args, device, tokenizer)[0]


def measure_batches(combo: Combination, batches: list[int], args, device: torch.device, tokenizer, *,
                    stop_at_oom: bool = False) -> list[dict]:
    """Build the combination once (with activation checkpointing if ``args.grad_checkpointing``)
    and measure it at each batch size of ``batches`` in turn: ``args.warmup`` untimed steps (the
    first also counts FLOPs and saved activations), then ``args.steps`` timed ones.

    The CUDA peak is reset before each batch size, so ``peak_gib`` covers the model, its
    gradients, the AdamW state and that batch's activations. A batch size that runs out of CUDA
    memory gives a row with ``oom: True`` (and no figures); the other sizes still run, unless
    ``stop_at_oom`` (for batch sizes in increasing order: the search for the largest that fits).
    """
    amp = torch.bfloat16 if args.precision == "bf16" else None
    checkpointing = bool(getattr(args, "grad_checkpointing", False))
    model = build_model(combo, tokenizer, device, checkpointing)
    optimizer = build_optimizer(model, OptimConfig(), fused=device.type == "cuda")
    ssl_loss = model.ssl.loss if combo.ssl is not None else None
    total_steps = args.warmup + args.steps
    configure(model, combo, total_steps, getattr(args, "corpus", CORPUS))
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    objective = functools.partial(slip_objective, clip=combo.clip, ssl_loss=ssl_loss)

    def step(batch: dict, i: int, probe: SavedTensors | None = None) -> None:
        optimizer.zero_grad(set_to_none=True)

        @contextlib.contextmanager
        def forward_context():  # plain_step's autocast, here also the activation probe
            with autocast(), (probe or contextlib.nullcontext()):
                yield

        plain_step(model, batch, objective, forward_context, lambda loss: loss)
        if combo.ssl is not None:
            model.ssl.before_optimizer_step(i)
        optimizer.step()
        if combo.ssl is not None:
            model.ssl.on_step_end(i + 1, total_steps, model.visual)

    common = {
        "combination": combo.name,
        "model": combo.model,
        "ssl": combo.ssl,
        "grad_checkpointing": checkpointing,
        "tower_images": tower_images(model, combo),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "ssl_state_mib": ssl_state_bytes(model) / 2**20,
    }
    results = []
    for size in batches:
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out_of_memory = False
        batch = probe = counter = None
        try:
            batch = random_batch(model, combo, size, device, amp or torch.float32)
            probe = SavedTensors(model)
            with flop_counter() as counter:
                step(batch, 0, probe)  # the first warm-up step also counts FLOPs and activations
            for i in range(1, args.warmup):
                step(batch, i)
            sync(device)
            start = time.perf_counter()
            for i in range(args.warmup, total_steps):
                step(batch, i)
            sync(device)
            seconds = (time.perf_counter() - start) / args.steps
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # handled below, once the exception has let go of the step's tensors
        batch = None
        if out_of_memory:
            optimizer.zero_grad(set_to_none=True)
            free_memory(device)
            results.append({**common, "batch": size, "oom": True, "samples_per_s": None, "ms_per_step": None,
                            "peak_gib": None, "activation_mib_per_sample": None, "saved_parameter_mib": None,
                            "flops_per_step": None, "tflops_per_s": None, "mfu": None, "hfu": None})
            if stop_at_oom:
                break
            continue
        flops = counter.get_total_flops()
        achieved = flops / seconds
        results.append({
            **common,
            "batch": size,
            "oom": False,
            "samples_per_s": size / seconds,
            "ms_per_step": seconds * 1e3,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "activation_mib_per_sample": probe.activation_bytes / size / 2**20,
            "saved_parameter_mib": probe.parameter_bytes / 2**20,
            "flops_per_step": flops,
            "tflops_per_s": achieved / 1e12,
            # Model FLOPs utilisation needs the model's FLOPs: with checkpointing the count also
            # holds the recomputed forward, and the ratio is the hardware FLOPs utilisation (hfu).
            "mfu": achieved / peak if peak and amp is torch.bfloat16 and not checkpointing else None,
            "hfu": achieved / peak if peak and amp is torch.bfloat16 else None,
        })
    model = optimizer = None  # the step closure holds them too: drop them before freeing memory
    if needs_tokenizer(combo.ssl):
        tokenizer.to("cpu")  # off the device, so it weighs on no other combination's peak
    free_memory(device)
    return results


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _ratio(value: float | None, reference: float | None) -> str:
    return f"x{value / reference:.2f}" if value is not None and reference else "-"


def _fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def format_table(results: list[dict]) -> str:
    """The results as a Markdown table; "x clip" compares with the clip row of the same batch
    size and checkpointing setting."""
    clips = {(r["batch"], r["grad_checkpointing"]): r for r in results if r["combination"] == "clip" and not r["oom"]}
    header = ("combination", "model", "batch", "ckpt", "tower imgs", "params M", "samples/s", "x clip", "ms/step",
              "peak GiB", "act MiB/sample", "x clip", "state MiB", "TFLOP/s", "MFU")
    rows = [header]
    for r in results:
        clip = clips.get((r["batch"], r["grad_checkpointing"]), {})
        lead = (r["combination"], r["model"], str(r["batch"]), "yes" if r["grad_checkpointing"] else "no",
                str(r["tower_images"]), f"{r['params_m']:.1f}")
        if r["oom"]:
            rows.append((*lead, "OOM", *("-",) * (len(header) - len(lead) - 1)))
            continue
        rows.append((
            *lead, f"{r['samples_per_s']:.1f}", _ratio(r["samples_per_s"], clip.get("samples_per_s")),
            f"{r['ms_per_step']:.1f}", _fmt(r["peak_gib"], ".2f"), f"{r['activation_mib_per_sample']:.2f}",
            _ratio(r["activation_mib_per_sample"], clip.get("activation_mib_per_sample")),
            f"{r['ssl_state_mib']:.1f}", f"{r['tflops_per_s']:.3g}", _fmt(r["mfu"], ".1%", "-"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def print_table(results: list[dict]) -> None:
    print(format_table(results))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="b16", help="ViT size (default b16)")
    parser.add_argument("--batch", type=int, default=64, help="samples per step (default 64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="autocast dtype (default bf16 on CUDA, fp32 elsewhere)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per combination (default 10)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first, >= 1; the first measures the activations (default 3)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(COMBINATIONS)}")
    parser.add_argument("--tokenizer", default=None,
                        help="a real visual tokenizer for BEiT (k-means file or FLAVA directory); "
                             "default: random 8192-code patch centroids")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute block activations in backward (the trainer's model.grad_checkpointing)")
    parser.add_argument("--corpus", type=int, default=CORPUS,
                        help=f"samples in the corpus, the memory bank's rows of PIRL (default {CORPUS:,}, ImageNet-1k)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    if args.batch < 2 or args.steps < 1 or args.warmup < 1:
        parser.error("need --batch >= 2 (BatchNorm in the SSL heads), --steps >= 1 and --warmup >= 1")
    args.combinations = COMBINATIONS if args.only is None else tuple(c.strip() for c in args.only.split(",") if c.strip())
    unknown = [c for c in args.combinations if c not in COMBINATIONS]
    if unknown or not args.combinations:
        parser.error(f"--only: unknown combination(s) {unknown}; choose from {','.join(COMBINATIONS)}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vision = get_architecture(f"clip_{SIZES[args.size]}").vision
    tokenizer = None
    if any(needs_tokenizer(combination(c, args.size).ssl) for c in args.combinations):
        if args.tokenizer:
            tokenizer = load_visual_tokenizer(args.tokenizer)
        else:
            tokenizer = random_tokenizer(vision.image_size, vision.image_size // vision.patch_size)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    threads = f" threads={torch.get_num_threads()}" if device.type == "cpu" else ""
    token_desc = ("none" if tokenizer is None else
                  f"{type(tokenizer).__name__} {tokenizer.vocab_size} codes, {tokenizer.input_size} px")
    print(f"device={device}{gpu}{threads} size={args.size} ({vision.image_size} px) batch={args.batch} "
          f"precision={args.precision} grad_checkpointing={args.grad_checkpointing} warmup={args.warmup} "
          f"steps={args.steps} tokenizer={token_desc}")

    results = []
    for i, name in enumerate(args.combinations, start=1):
        combo = combination(name, args.size)
        print(f"[{i}/{len(args.combinations)}] {name} ({combo.model}) ...", file=sys.stderr, flush=True)
        r = measure(combo, args, device, tokenizer)
        if r["oom"]:
            print(f"[{i}/{len(args.combinations)}] {name}: out of memory at batch {args.batch}",
                  file=sys.stderr, flush=True)
        else:
            peak = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.2f} GiB"
            print(f"[{i}/{len(args.combinations)}] {name}: {r['samples_per_s']:.1f} samples/s, "
                  f"{r['activation_mib_per_sample']:.2f} MiB activations/sample{peak}", file=sys.stderr, flush=True)
        results.append(r)
    print_table(results)

    if args.json:
        meta = {
            "size": args.size, "batch": args.batch, "precision": args.precision, "device": str(device),
            "grad_checkpointing": args.grad_checkpointing,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "threads": torch.get_num_threads(), "warmup": args.warmup, "steps": args.steps,
            "tokenizer": token_desc, "torch": torch.__version__,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": meta, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
