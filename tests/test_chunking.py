"""The default chunk of S per device (hardneg._schedule): CPU's fixed 32 MiB, and the GPU's budget
from its memory size, checked on CPU with the device properties stubbed; a bf16 / fp16 dS buffer
counted in that budget."""

from __future__ import annotations

import types

import pytest
import torch
from hardneg import _gemm, _ops, _schedule, fused_hardneg_loss


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


@pytest.mark.parametrize(
    ("total_gib", "N", "rows"), [(80, 65536, 3413), (80, 2**19, 426), (141, 65536, 5461)]
)
def test_gpu_budget_holds_the_chunks_bf16_ds_too(monkeypatch, total_gib, N, rows):
    """With a separate bf16 / fp16 dS a row costs 6 bytes per candidate: 2/3 of the rows."""
    props = types.SimpleNamespace(total_memory=total_gib * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    for dtype in (torch.bfloat16, torch.float16):
        assert _schedule.default_chunk_size(N, torch.device("cuda", 0), dtype) == rows


def _rows_per_kernel_call(monkeypatch, dtype: torch.dtype, need_grad: bool) -> list[int]:
    """Rows of every row-kernel call of one loss over B = 1024 queries and N = 8192 candidates
    (7 hard negatives each), on the emulated CUDA GEMM path with the default CPU chunk."""
    monkeypatch.setattr(_gemm, "EMULATE_ON_CPU", True)
    rows, kernels_for = [], _ops.kernels_for

    class Spy:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            return getattr(self.module, name)

        def hardneg_loss_rows(self, p):
            rows.append(p.rows)
            self.module.hardneg_loss_rows(p)

    monkeypatch.setattr(_ops, "kernels_for", lambda device: Spy(kernels_for(device)))
    g = torch.Generator().manual_seed(0)
    q, t = (torch.randn(1024, 8, generator=g).to(dtype) for _ in range(2))
    h = torch.randn(1024, 7, 8, generator=g).to(dtype)
    q.requires_grad_(need_grad)
    fused_hardneg_loss(q, t, hard_negatives=h, check_finite=False)
    return rows


def test_row_pass_counts_the_ds_buffer_in_its_chunks(monkeypatch):
    """32 MiB at N = 8192: 1024 rows of fp32 S, 682 of S plus its bf16 dS."""
    assert _rows_per_kernel_call(monkeypatch, torch.float32, need_grad=True) == [1024]
    assert _rows_per_kernel_call(monkeypatch, torch.bfloat16, need_grad=True) == [682, 342]
    # Without a gradient there is no dS buffer: the whole budget is S.
    with torch.no_grad():
        assert _rows_per_kernel_call(monkeypatch, torch.bfloat16, need_grad=False) == [1024]
