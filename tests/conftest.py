"""Shared test fixtures."""
from __future__ import annotations

import pytest
import torch


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
