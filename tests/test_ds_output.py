"""The kernels' bf16 / fp16 dS output on the low-precision GEMM path, run on CPU
(hardneg._gemm.EMULATE_ON_CPU): bitwise the loss and gradients of writing dS in fp32 and casting
it with torch's .to(), the two passes the kernels' own rounding replaces.

The comparison path wraps the kernel module: every grad-writing call that asks for a bf16 / fp16
dS output instead writes dS in fp32 in place of S, then torch casts it into the output buffer.
Everything else (schedule, chunks, GEMMs, their operands' layout) is shared, so any difference is
the kernels' rounding. Cases: every mode, symmetric or not, hard negatives with id masking or
neither, chunk boundaries (chunks of 1, 7 and the default), bf16 and fp16, and the ring (with and
without kept logits) and all-gather strategies on 2 gloo ranks. A truncating cast in the wrapper
is caught, so the comparison can fail.
"""

from __future__ import annotations

import ctypes
import functools
import itertools

import pytest
import torch
import torch.distributed as dist
from hardneg import _gemm, _ops, fused_hardneg_loss
from loss_testing import loss_and_grads, make_inputs, run_gloo_world

DTYPE_OF_CODE = {code: dtype for dtype, code in _gemm.DS_DTYPE_CODES.items()}


def _view(ptr: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The memory at ptr as a flat tensor sharing it (a kernel buffer known by address only)."""
    raw = (ctypes.c_char * (numel * dtype.itemsize)).from_address(ptr)
    return torch.frombuffer(raw, dtype=dtype)


def _truncate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A wrong rounding for the control: bf16 by dropping the low 16 bits."""
    assert dtype == torch.bfloat16
    return (x.view(torch.int32) >> 16).to(torch.int16).view(dtype)


class CastAfter:
    """A kernel module whose grad kernels, asked for a low-precision dS output, write dS in fp32
    in place of S and cast it into the output with `cast` (torch's .to() by default)."""

    def __init__(self, module, cast=None) -> None:
        self._module = module
        self._cast = cast or (lambda x, dtype: x.to(dtype))
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._module, name)

    def hardneg_loss_rows(self, p) -> None:
        self._run(self._module.hardneg_loss_rows, p)

    def hardneg_loss_block_grad(self, p) -> None:
        self._run(self._module.hardneg_loss_block_grad, p)

    def _run(self, kernel, p) -> None:
        ds, dtype = p.ds, DTYPE_OF_CODE[p.ds_dtype]
        if ds == 0 or p.rows == 0 or p.cols == 0:
            kernel(p)
            return
        p.ds = 0
        kernel(p)  # dS in fp32, in place of S
        p.ds = ds  # the caller reuses the parameters for its next chunk
        rows, cols = p.rows, p.cols
        s = _view(p.s, torch.float32, (rows - 1) * p.ld_s + cols)
        out = _view(ds, dtype, (rows - 1) * p.ld_ds + cols)
        ds_fp32 = s.as_strided((rows, cols), (p.ld_s, 1))
        out.as_strided((rows, cols), (p.ld_ds, 1)).copy_(self._cast(ds_fp32.contiguous(), dtype))
        self.calls += 1


def _cast_after(cast=None):
    """Patches hardneg._ops.kernels_for to hand out CastAfter modules; returns (restore, wrap)."""
    original = _ops.kernels_for
    wrapped = {}

    def kernels_for(device):
        if device.type not in wrapped:
            wrapped[device.type] = CastAfter(original(device), cast)
        return wrapped[device.type]

    _ops.kernels_for = kernels_for

    def restore():
        _ops.kernels_for = original

    return restore, wrapped


def _both_paths(loss_fn, inputs, cast=None, **options):
    """(kernels' rounding, fp32 dS cast afterwards, number of casts) on the emulated path."""
    _gemm.EMULATE_ON_CPU = True
    try:
        fused = loss_and_grads(loss_fn, inputs, grad_output=1.7, **options)
        restore, wrapped = _cast_after(cast)
        try:
            cast_after = loss_and_grads(loss_fn, inputs, grad_output=1.7, **options)
        finally:
            restore()
    finally:
        _gemm.EMULATE_ON_CPU = False
    return fused, cast_after, sum(w.calls for w in wrapped.values())


def _bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8))
        for k in a
    )


CASES = list(
    itertools.product(("infonce", "llave", "ega"), (False, True), (False, True), (1, 7, None))
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "mode, symmetric, negatives, chunk",
    CASES,
    ids=[f"{m}-sym{int(s)}-neg{int(n)}-c{c}" for m, s, n, c in CASES],
)
def test_kernel_rounding_is_torchs_cast_of_the_fp32_ds(dtype, mode, symmetric, negatives, chunk):
    B = 19
    inputs = make_inputs(B, 24, 2 if negatives else 0, ids=negatives, dtype=dtype, seed=B)
    options = {"mode": mode, "symmetric": symmetric, "chunk_size": chunk}
    fused, cast_after, casts = _both_paths(fused_hardneg_loss, inputs, **options)
    chunks = -(-B // chunk) if chunk else 1
    assert casts == chunks * (2 if symmetric else 1)  # every grad kernel call took the wrapper
    assert _bitwise_equal(fused, cast_after)


def test_a_truncating_cast_is_caught():
    """The control: the same comparison with truncation in place of torch's rounding differs."""
    inputs = make_inputs(19, 24, 2, ids=True, dtype=torch.bfloat16, seed=19)
    fused, truncated, casts = _both_paths(fused_hardneg_loss, inputs, cast=_truncate, chunk_size=7)
    assert casts == 3
    assert not _bitwise_equal(fused, truncated)


def test_fp32_inputs_ask_for_no_separate_ds():
    """fp32 operands keep dS in place of S: the wrapper is never asked to cast."""
    inputs = make_inputs(19, 24, 2, ids=True, dtype=torch.float32)
    _, _, casts = _both_paths(fused_hardneg_loss, inputs, symmetric=True, chunk_size=7)
    assert casts == 0


def _worker(rank: int, dtype: torch.dtype, out: str) -> None:
    inputs = make_inputs(12, 40, 2, ids=True, dtype=dtype, seed=5)
    sl = slice(0, 7) if rank == 0 else slice(7, 12)
    local = {k: v[sl] if v is not None else None for k, v in inputs.items()}
    results = {}
    for strategy, keep, mode in itertools.product(
        ("ring", "allgather"), (None, 0), ("infonce", "llave", "ega")
    ):
        if strategy == "allgather" and keep is not None:
            continue
        kw = {"keep_logits_bytes": keep} if keep is not None else {}
        loss_fn = functools.partial(
            fused_hardneg_loss, group=dist.group.WORLD, strategy=strategy, chunk_size=3, **kw
        )
        fused, cast_after, casts = _both_paths(loss_fn, local, mode=mode, symmetric=True)
        results[f"{strategy}-{keep}-{mode}"] = (_bitwise_equal(fused, cast_after), casts)
    torch.save(results, f"{out}.{rank}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cross_device_kernel_rounding_is_torchs_cast(dtype, tmp_path):
    out = str(tmp_path / "equal")
    run_gloo_world(_worker, dtype, out)
    for rank in range(2):
        results = torch.load(f"{out}.{rank}", weights_only=True)
        assert len(results) == 9
        for name, (equal, casts) in results.items():
            assert casts > 0, f"rank {rank} {name}: no grad kernel took the wrapper"
            assert equal, f"rank {rank} {name}: the kernels' rounding differs from torch's cast"
