"""The default chunk of S per device (hardneg._schedule): CPU's fixed 32 MiB, and the GPU's budget
from its memory size, checked on CPU with the device properties stubbed."""

from __future__ import annotations

import types

import pytest
import torch
from hardneg import _schedule


def test_cpu_default_is_32_mib_of_fp32_with_a_floor_of_16_rows():
    cpu = torch.device("cpu")
    assert _schedule.default_chunk_size(8192, cpu) == 32 * 2**20 // (4 * 8192) == 1024
    assert _schedule.default_chunk_size(10**9, cpu) == 16


@pytest.mark.parametrize(
    ("total_gib", "N", "rows"),
    [(80, 65536, 5120), (80, 2**19, 640), (141, 65536, 8192), (16, 65536, 1024), (24, 32768, 3072)],
)
def test_gpu_budget_follows_the_device_memory(monkeypatch, total_gib, N, rows):
    props = types.SimpleNamespace(total_memory=total_gib * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    got = _schedule.default_chunk_size(N, torch.device("cuda", 0))
    assert got == rows
    # R >= 1024 rows at the shapes the issue names (N = 65536) on any GPU of 16 GiB or more.
    if N == 65536:
        assert got >= 1024


def test_the_users_chunk_size_wins(monkeypatch):
    spec = _schedule.LossSpec(chunk_size=7)
    assert _schedule.chunk_rows(spec, 65536, torch.device("cuda", 0)) == 7
