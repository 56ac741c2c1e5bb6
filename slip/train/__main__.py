import sys

from ..cli import use_huge_pages

use_huge_pages()  # before .cli imports torch

from .cli import main

sys.exit(main())
