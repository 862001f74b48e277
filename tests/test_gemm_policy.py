"""hardneg._gemm's precision policy on the low-precision path CUDA takes, run on CPU.

On CUDA, bf16 / fp16 inputs keep their dtype as GEMM operands (fp32 accumulation, fp32 S) and the
gradient GEMMs take dS rounded to the input dtype. CPU torch has no bf16 x bf16 -> fp32 GEMM, so
CPU runs upcast fp32 operands; `_gemm.EMULATE_ON_CPU` switches the CPU to the CUDA path's
operands, with fp32 arithmetic on them (exactly what the low-precision GEMM computes, up to
summation order). These tests hold that path to the loss family's one error rule
(tests/loss_testing.py): the error against the fp64 truth at most 2x (plain torch's own error in
that dtype + one rounding's floor).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hardneg import _gemm, fused_hardneg_loss
from loss_testing import (
    check_close,
    loss_and_grads,
    make_inputs,
    reference_outputs,
    rule_for,
    run_gloo_world,
)

MODES = ("infonce", "llave", "ega")


@pytest.fixture
def emulated(monkeypatch):
    """The CUDA low-precision path on CPU, with every GEMM's operands recorded."""
    monkeypatch.setattr(_gemm, "EMULATE_ON_CPU", True)
    calls = []
    mm, addmm_ = _gemm.mm, _gemm.addmm_

    def spy_mm(a, b, out):
        calls.append(("mm", b.dtype, out.dtype))
        mm(a, b, out)

    def spy_addmm(acc, a, b):
        calls.append(("addmm", b.dtype, acc.dtype))
        addmm_(acc, a, b)

    monkeypatch.setattr(_gemm, "mm", spy_mm)
    monkeypatch.setattr(_gemm, "addmm_", spy_addmm)
    return calls


@pytest.mark.parametrize("symmetric", [False, True], ids=["q2t", "sym"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_operands_no_worse_than_plain_torch(emulated, dtype, mode, symmetric):
    inputs = make_inputs(257, 59, 2, ids=True, dtype=dtype)
    options = {"mode": mode, "symmetric": symmetric}
    got = loss_and_grads(fused_hardneg_loss, inputs, grad_output=1.3, chunk_size=16, **options)
    plain = reference_outputs(inputs, dtype=dtype, grad_output=1.3, **options)
    truth = reference_outputs(inputs, dtype=torch.float64, grad_output=1.3, **options)
    check_close(got, truth, plain, **rule_for(257, 1.3, **options))
    # Every GEMM (S and both gradients, 17 row chunks) took low-precision operands and wrote or
    # accumulated fp32.
    assert len(emulated) >= 3 * 17
    assert {(b, out) for _, b, out in emulated} == {(dtype, torch.float32)}


def test_fp32_inputs_keep_fp32_operands(emulated):
    inputs = make_inputs(33, 24, 2, ids=True, dtype=torch.float32)
    loss_and_grads(fused_hardneg_loss, inputs, symmetric=True)
    assert {b for _, b, _ in emulated} == {torch.float32}


def test_rounding_dS_to_the_input_dtype_is_visible():
    """The check above can fail: the low-precision path differs from the fp32-operand path by more
    than fp32 round-off (so the comparison sees which path ran), yet stays within the bound."""
    inputs = make_inputs(257, 59, 2, ids=True, dtype=torch.bfloat16)
    fp32_path = loss_and_grads(fused_hardneg_loss, inputs, chunk_size=16)
    _gemm.EMULATE_ON_CPU = True
    try:
        bf16_path = loss_and_grads(fused_hardneg_loss, inputs, chunk_size=16)
    finally:
        _gemm.EMULATE_ON_CPU = False
    diff = (bf16_path["d_query"].float() - fp32_path["d_query"].float()).abs().max().item()
    assert diff > 0


def _worker(rank: int, strategy: str, out: str) -> None:
    _gemm.EMULATE_ON_CPU = True
    inputs = make_inputs(12, 40, 2, ids=True, dtype=torch.bfloat16)
    sl = slice(0, 7) if rank == 0 else slice(7, 12)
    local = {k: v[sl] for k, v in inputs.items()}
    got = loss_and_grads(
        lambda q, t, **kw: fused_hardneg_loss(
            q, t, group=dist.group.WORLD, strategy=strategy, chunk_size=3, **kw
        ),
        local,
        symmetric=True,
    )
    torch.save({k: v.float() for k, v in got.items()}, f"{out}.{rank}")


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_cross_device_low_precision_path(strategy, tmp_path):
    out = str(tmp_path / "grads")
    run_gloo_world(_worker, strategy, out)
    inputs = make_inputs(12, 40, 2, ids=True, dtype=torch.bfloat16)
    plain = reference_outputs(inputs, dtype=torch.bfloat16, symmetric=True)
    truth = reference_outputs(inputs, dtype=torch.float64, symmetric=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    got = {"loss": ranks[0]["loss"]}
    for name in ("d_query", "d_target", "d_hard_negatives"):
        got[name] = torch.cat([ranks[0][name], ranks[1][name]])
    check_close(got, truth, plain, **rule_for(12, 1.0, symmetric=True))
