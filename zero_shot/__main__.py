"""``python -m zero_shot``: the same command as ``slip zero-shot``."""
import sys

from slip.eval.zero_shot_cli import main

if __name__ == "__main__":
    sys.exit(main())
