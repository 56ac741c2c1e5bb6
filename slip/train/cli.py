"""``slip train CONFIG [key=value ...]`` / ``python -m slip.train`` (also under torchrun)."""
from __future__ import annotations

import argparse

from ..errors import command
from .config import load_config


@command("train")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="slip train", description="Pretrain CLIP, SimCLR or SLIP. Rerunning with the same "
        "train.output_dir resumes from its last checkpoint. Works unchanged under torchrun.")
    parser.add_argument("config", help="a YAML recipe, e.g. configs/yfcc15m/slip_vit_b16.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=1024")
    args = parser.parse_args(argv)
    from ..runtime import configure_logging

    configure_logging()
    cfg = load_config(args.config, args.overrides)
    from .trainer import train

    result = train(cfg)
    from ..distributed import is_main_process

    if result.checkpoint is not None and is_main_process():
        print(f"finished at step {result.step}; checkpoint: {result.checkpoint}")
    return 0
