"""Shared test fixtures."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread for the whole session, here and (through the environment) in every process
# the tests start (CLI runs, torchrun workers). Tiny models gain nothing from more, and on a busy
# 2-core machine two OpenMP threads made a 96-step tiny training run 14x slower (172 s against
# 12 s, measured), which was most of the suite's time.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def _single_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine an OpenMP
    # barrier waiting for a descheduled thread makes each op many times slower. One thread also
    # fixes the summation order, so short training runs are reproducible on any core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    yield from _single_thread()


@pytest.fixture(scope="module")
def one_torch_thread_module():
    yield from _single_thread()


@contextlib.contextmanager
def loaded_script(path: Path, name: str):
    """A script (e.g. under benchmarks/) imported as module ``name`` for the block, then
    forgotten, with ``sys.path`` as it was (scripts put their own folder on it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    saved_path = list(sys.path)
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
        sys.path[:] = saved_path
