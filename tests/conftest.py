"""Shared pytest configuration.

Tests marked `cuda` are skipped, with the reason, on a machine where torch sees no CUDA GPU, so the
suite passes on CPU-only machines and CI and still runs them wherever a GPU exists.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One torch / OpenMP thread (test modules opt in with pytestmark). The CI machines are small
    and shared: with two threads, OpenMP's spin-waiting under contention multiplies the CPU time
    of the kernel-heavy files. Tests that need the kernel's multi-threaded row split ask for more
    threads themselves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
