"""The GEMM precision policy of every hardneg schedule (row pass, ring, all-gather).

    input dtype      operands          accumulation / S     where
    fp32             fp32              fp32                 everywhere; on CUDA cuBLAS follows
                                                            torch.get_float32_matmul_precision()
                                                            (TF32 when the user allowed it)
    bf16 / fp16      the input dtype   fp32, S in fp32      CUDA (aten::mm.dtype_out)
    bf16 / fp16      fp32 (upcast)     fp32                 CPU: aten::mm.dtype has no CPU
                                                            kernel in torch 2.13

S = Q C^T: a bf16 x bf16 product is exact in fp32 and cuBLAS accumulates in fp32, so S loses
nothing to the low-precision operands, and it is never rounded below fp32 (at tau = 0.02 a bf16 S
would move logits by ~0.2). The gradient GEMMs dQ = dS C and dC = dS^T Q take dS rounded to the
input dtype: its relative error 2^-9 (bf16) per element is what plain torch's bf16 backward pays
on every element too, and the accumulation stays fp32 (tests hold the result to at most twice
plain torch's own error in that dtype). The loss kernels write that operand themselves
(`grad_dtype`): the fp32 gradient, rounded to nearest even (the bits of torch's .to()), goes
straight into a separate buffer of the operand dtype, so no pass over an fp32 dS casts it.
Accumulating into fp32 uses addmm with out_dtype where this torch's CUDA build accepts an fp32
accumulator with low-precision factors (probed once per device), else an fp32 product added in
place.

`EMULATE_ON_CPU` turns the low-precision path on for CPU tensors with fp32 arithmetic on the
upcast operands, which is exactly what a bf16 x bf16 -> fp32 GEMM computes (up to summation
order): tests use it to run the CUDA path's schedule, dtypes and error budget on CPU.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)
EMULATE_ON_CPU = False
# The kernels' dS dtype codes (csrc/include/hardneg/hardneg_loss.h, DsDtype).
DS_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def low_precision_operands(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether GEMMs of inputs in `dtype` on `device` keep low-precision operands."""
    if dtype not in LOW_PRECISION:
        return False
    return device.type == "cuda" or (device.type == "cpu" and EMULATE_ON_CPU)


def operand(x: Tensor) -> Tensor:
    """x as a dense GEMM operand under the policy: its own dtype or fp32."""
    if low_precision_operands(x.dtype, x.device):
        return x.contiguous()
    return x.float().contiguous()


def grad_dtype(like: Tensor) -> torch.dtype | None:
    """The dtype the kernels write dS in for gradient GEMMs with operand `like`, into a buffer of
    its own: the operand's when it is low precision (both gradient GEMMs read the 2-byte dS the
    kernel wrote), else None: dS overwrites the fp32 S in place."""
    return like.dtype if like.dtype in LOW_PRECISION else None


def mm(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out (fp32) = a @ b. a is cast to b's dtype when b is a low-precision operand."""
    if b.dtype == torch.float32:
        torch.mm(a.float(), b, out=out)
    elif b.device.type == "cpu":  # EMULATE_ON_CPU
        torch.mm(a.to(b.dtype).float(), b.float(), out=out)
    else:
        torch.mm(a.to(b.dtype), b, out_dtype=torch.float32, out=out)


def addmm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b, with the operands of mm."""
    if b.dtype == torch.float32:
        acc.addmm_(a.float(), b)
    elif b.device.type == "cpu":  # EMULATE_ON_CPU
        acc.addmm_(a.to(b.dtype).float(), b.float())
    elif _fp32_accumulator_ok(b.device, b.dtype):
        torch.addmm(acc, a.to(b.dtype), b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a.to(b.dtype), b, out_dtype=torch.float32))


@functools.cache
def _fp32_accumulator_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether addmm.dtype_out takes an fp32 accumulator with `dtype` factors on this build
    (older CUDA builds require the accumulator in the factors' dtype)."""
    acc = torch.zeros(2, 2, device=device)
    factor = torch.ones(2, 2, device=device, dtype=dtype)
    try:
        torch.addmm(acc, factor, factor, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool(acc[0, 0] == 2)
