"""One error path for every command: a user's mistake ends in one line, a bug in a traceback.

A mistake in what the user gave (a path, a file, a setting, a benchmark name) raises
:class:`UserError` or one of the file-system errors in :data:`USER_ERRORS`, with a message naming
the offending input; :func:`command` turns it into ``slip <command>: error: <message>`` on stderr
and exit code 2. A run that stopped on purpose (:class:`slip.runtime.RunStopped`) prints its
reason and exits 1. Anything else is a programming error and keeps its traceback. ``--debug`` on
any command, or ``SLIP_DEBUG=1``, shows the traceback for everything.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input; the message names the file, key or value."""


class MissingExtra(UserError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the
    ``pip install 'slip[extra]'`` that brings it."""

    def __init__(self, feature: str, package: str, extra: str) -> None:
        super().__init__(f"{feature} needs the '{package}' package, which is not installed: "
                         f"pip install 'slip[{extra}]'")


# File-system errors are the user's too: a path that does not exist, is a directory, or is not
# readable. Their message names the path.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError, IsADirectoryError,
                                                NotADirectoryError, PermissionError)


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("SLIP_DEBUG", "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """The error's message on one line; an OSError as ``path: reason``."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror.lower()}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def command(name: str) -> Callable[[Callable[[list[str]], int | None]], Callable[[list[str] | None], int]]:
    """Decorate a command's ``main(argv) -> int`` with slip's error path (see the module doc)."""

    def decorate(fn: Callable[[list[str]], int | None]) -> Callable[[list[str] | None], int]:
        @functools.wraps(fn)
        def main(argv: list[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = debug_requested(argv)
            argv = [a for a in argv if a != "--debug"]
            from .runtime import RunStopped

            try:
                return int(fn(argv) or 0)
            except RunStopped as e:  # on purpose: its reason, exit 1 (3 for a stop on a signal)
                if debug:
                    raise
                print(f"slip {name}: {one_line(e)}", file=sys.stderr)
                return e.exit_code
            except USER_ERRORS as e:
                if debug:
                    raise
                print(f"slip {name}: error: {one_line(e)}", file=sys.stderr)
                return 2

        return main

    return decorate
