"""``slip finetune``: end-to-end classification fine-tuning of a checkpoint's image tower.

    slip finetune --checkpoint slip_base_100ep.pt --catalog catalog.json --benchmark imagenet \\
        --output-dir runs/ft_imagenet [--batch-size 1024] [--accum-steps 2]
    torchrun --nproc_per_node 8 -m slip.eval.finetune_cli --checkpoint ... (same options)

SLIP's protocol (BEiT's recipe, see slip/eval/finetune.py): AdamW, weight decay 0.05, layer-wise
lr decay, drop path, RandAugment, random erasing, mixup/cutmix with label smoothing, cosine
schedule with warm-up. Options left unset take the recipe of the tower's size: ViT-S 100 epochs
(20 warm-up), layer decay 0.65, no drop path; ViT-B as ViT-S with drop path 0.1; ViT-L 50 epochs
(5 warm-up), layer decay 0.75, drop path 0.1. The peak learning rate is base-lr x batch / 1024
(base-lr 4e-3) unless --lr gives it directly.

A ResNet tower (*_resnet50, *_resnet_tiny) is fine-tuned as timm's resnetN with a new linear
classifier, with the same optimiser, augmentation and schedule; its recipe has no layer-wise lr
decay (--layer-decay below 1 applies timm's grouping: stem, each residual block, classifier),
drop path 0.05 and 100 epochs (5 warm-up). Its BatchNorm statistics are synchronised over ranks.

Rerunning with the same --output-dir resumes from its newest checkpoint. Writes
OUTPUT/finetuned.pt (load with slip.eval.finetune.load_finetuned, or plain timm: see the module),
OUTPUT/results.json, OUTPUT/metrics.jsonl and TensorBoard logs.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import command
from .finetune import REFERENCE_BATCH, FinetuneConfig

_DEFAULTS = FinetuneConfig(checkpoint="", catalog="", benchmark="", output_dir="")


def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = argparse.ArgumentParser(prog="slip finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="pretrained checkpoint: slip's, SLIP's released ones, or a fine-tuned one "
                   "(its head is replaced)")
    p.add_argument("--catalog", required=True, help="dataset catalog JSON (see zero_shot/catalog.example.json)")
    p.add_argument("--benchmark", required=True, help="benchmark key with train and test splits, e.g. imagenet")
    p.add_argument("--output-dir", required=True, help="checkpoints, logs and results; rerun to resume")
    g = p.add_argument_group("schedule (unset: the recipe of the tower's size)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--warmup-epochs", type=float, default=None)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch over ranks and accumulation")
    g.add_argument("--accum-steps", type=int, default=d.accum_steps, help="micro-batches per optimizer step")
    lr = g.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=float, default=None, help="peak learning rate (overrides --base-lr)")
    lr.add_argument("--base-lr", type=float, default=d.base_lr,
                    help=f"peak lr at a global batch of {REFERENCE_BATCH}; scaled linearly with --batch-size")
    g.add_argument("--min-lr", type=float, default=d.min_lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (ViT-S/B 0.65, ViT-L 0.75, ResNet 1.0: none)")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (ViT-S 0, ViT-B/L 0.1, ResNet 0.05)")
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (default: no clipping)")
    g = p.add_argument_group("augmentation")
    g.add_argument("--mixup", type=float, default=d.mixup, help="mixup alpha")
    g.add_argument("--cutmix", type=float, default=d.cutmix, help="cutmix alpha")
    g.add_argument("--no-mixup", action="store_true", help="neither mixup nor cutmix (label smoothing stays)")
    g.add_argument("--smoothing", type=float, default=d.label_smoothing, help="label smoothing")
    g.add_argument("--aa", default=d.auto_augment, help="timm auto-augment policy; 'none' for none")
    g.add_argument("--reprob", type=float, default=d.reprob, help="random erasing probability")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=None, help="cpu, cuda (default: cuda:LOCAL_RANK when available)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default=d.precision,
                   help="auto: bf16 autocast on capable GPUs, fp32 on CPU")
    g.add_argument("--workers", type=int, default=d.workers, help="data-loading processes per rank")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="epochs between evaluations (0: at the end only)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="epochs between checkpoints")
    g.add_argument("--save-every-steps", type=int, default=None, help="also save every this many steps")
    g.add_argument("--keep-last", type=int, default=d.keep_last, help="checkpoints kept on disk")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs, tests)")
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    no_mix = args.no_mixup
    return FinetuneConfig(
        checkpoint=args.checkpoint, catalog=args.catalog, benchmark=args.benchmark, output_dir=args.output_dir,
        epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
        accum_steps=args.accum_steps, lr=args.lr, base_lr=args.base_lr, min_lr=args.min_lr,
        weight_decay=args.weight_decay, layer_decay=args.layer_decay, drop_path=args.drop_path,
        clip_grad=args.clip_grad, mixup=0.0 if no_mix else args.mixup, cutmix=0.0 if no_mix else args.cutmix,
        label_smoothing=args.smoothing, auto_augment=None if str(args.aa).lower() == "none" else args.aa,
        reprob=args.reprob, seed=args.seed, device=args.device, precision=args.precision, workers=args.workers,
        eval_batch_size=args.eval_batch_size, eval_every=args.eval_every, save_every=args.save_every,
        save_every_steps=args.save_every_steps, keep_last=args.keep_last, log_every=args.log_every,
        max_steps=args.max_steps,
    )


def _table(rows: list[tuple[str, ...]]) -> str:
    header = ("benchmark", "metric", "value", "best (epoch)", "test images")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if i >= 2 else '<'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


@command("finetune")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ..runtime import configure_logging

    configure_logging()
    from ..distributed import is_main_process
    from .finetune import finetune

    result = finetune(config_from_args(args))
    if is_main_process():
        best = f"{result.best['value']:.2f} ({result.best['epoch']:g})"
        print(_table([(result.benchmark, result.metric, f"{result.value:.2f}", best, str(result.n))]))
        print(f"fine-tuned checkpoint: {result.checkpoint}  (step {result.step}, {result.epochs_done:g} epochs)")
        print(f"results: {result.results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
