"""hardneg_loss: the fused hard-negative contrastive loss as a PyTorch op, and the public entry.

`fused_hardneg_loss` checks its arguments once (hardneg._spec), then runs the single-process op
below, or, for a process group of more than one rank, hardneg.distributed's cross-device ops.
The single-process op runs the row schedule (hardneg._schedule): the B x N logits matrix never
exists; extra memory is O(chunk x N) plus fp32 copies of the inputs and of their gradients.

Legend: B queries, M hard negatives per query, N = B + B*M candidates, D embedding dim.
Suffixes name shapes: q_BD, dc_ND.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from hardneg import _finite, _gemm, _schedule
from hardneg._constants import (
    ALPHA,
    EGA_BETA,
    EGA_MARGIN,
    KEEP_LOGITS_BYTES,
    TEMPERATURE,
)
from hardneg._spec import LossSpec, check_group_options, check_inputs, make_spec
from hardneg.distributed.ops import group_hardneg_loss

# ---------------------------------------------------------------------------------------------
# The computation (device generic: torch GEMMs around the hardneg kernels of _C / _C_cuda)
# ---------------------------------------------------------------------------------------------


def _compute(
    query: Tensor,
    target: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    spec: LossSpec,
    need_grad: bool,
    grad_loss: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss per query (fp32, both directions averaged when symmetric) and, when need_grad, the fp32
    gradients dq (B, D) and dc (N, D) = [dt; dh] of the reduced loss scaled by grad_loss (1 when
    None)."""
    if spec.check_finite:
        _finite.check_finite({"query": query, "target": target, "hard_negatives": hard_negatives})
    B, D = query.shape
    # Operands per hardneg._gemm's policy (fp32 inputs are used in place); the candidates stay
    # two column blocks [target | hard negatives] instead of one concatenated (N, D) copy.
    q_BD = _gemm.operand(query)
    t_BD = _gemm.operand(target)
    blocks = [t_BD]
    if target_ids is not None:
        target_ids = target_ids.contiguous()  # the kernel reads ids through a raw pointer
    ids_N = _schedule.candidate_ids(target_ids, hard_negative_ids, hard_negatives)
    if hard_negatives is not None:
        blocks.append(_gemm.operand(hard_negatives.reshape(-1, D)))
    N = sum(c.shape[0] for c in blocks)
    grad_scale = _schedule.grad_scale_of(spec, B)
    row_scale_B = _schedule.row_scale(grad_loss, B, spec.reduction)
    # Written (not accumulated) by the first pass, so no zero fill.
    dq_BD = q_BD.new_empty(B, D, dtype=torch.float32) if need_grad else None
    dc_ND = q_BD.new_empty(N, D, dtype=torch.float32) if need_grad else None
    d_blocks = (dc_ND[:B], dc_ND[B:])[: len(blocks)] if need_grad else None

    loss_B = torch.empty(B, dtype=torch.float32, device=query.device)
    _schedule.row_pass(
        q_BD,
        tuple(blocks),
        target_ids,
        ids_N,
        spec,
        loss_B,
        grad_scale,
        row_scale_B,
        dq_BD,
        d_blocks,
        accumulate=False,
    )
    if spec.symmetric:
        # Target -> query over the in-batch targets; query i carries the id of its positive.
        loss_t_B = torch.empty_like(loss_B)
        _schedule.row_pass(
            t_BD,
            q_BD,
            target_ids,
            target_ids,
            spec,
            loss_t_B,
            grad_scale,
            row_scale_B,
            dc_ND[:B] if need_grad else None,
            dq_BD,
        )
        loss_B = (loss_B + loss_t_B) * 0.5

    if not need_grad:
        return (
            loss_B,
            query.new_empty(0, dtype=torch.float32),
            q_BD.new_empty(0, dtype=torch.float32),
        )
    return loss_B, dq_BD, dc_ND


def _split_grads(dq_BD, dc_ND, query, target, hard_negatives):
    """(dq, dt, dh) in the input dtypes from the fp32 dq and dc = [dt; dh]; dh is empty without
    hard negatives."""
    B = query.shape[0]
    dh = (
        dc_ND[B:].reshape(hard_negatives.shape).to(hard_negatives.dtype)
        if hard_negatives is not None
        else query.new_empty(0)
    )
    return dq_BD.to(query.dtype), dc_ND[:B].to(target.dtype).clone(), dh.clone()


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("hardneg::hardneg_loss", mutates_args=())
def _hardneg_loss_op(
    query: Tensor,
    target: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    spec: str,
    fuse_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (loss, dq, dc): the reduced loss and, when fuse_grad, the fp32 gradients of the loss
    w.r.t. query (B, D) and the candidates [target; hard negatives] (N, D) computed in the same
    pass (empty otherwise), scaled in backward by grad_output. Only a scalar loss can have its
    gradient fused (backward scales it by one number), so fuse_grad needs reduction mean or sum.
    spec: LossSpec.encode()."""
    loss_spec = LossSpec.decode(spec)
    if fuse_grad and loss_spec.reduction == "none":
        raise ValueError("fuse_grad=True needs reduction 'mean' or 'sum', got reduction 'none'")
    inputs = (query, target, hard_negatives, target_ids, hard_negative_ids)
    loss_B, dq, dc = _compute(*inputs, loss_spec, fuse_grad, None)
    return _schedule.reduce(loss_B, loss_spec.reduction), dq, dc


@_hardneg_loss_op.register_fake
def _(query, target, hard_negatives, target_ids, hard_negative_ids, spec, fuse_grad):
    B, D = query.shape
    reduction = LossSpec.decode(spec).reduction
    loss = query.new_empty((B,) if reduction == "none" else (), dtype=torch.float32)
    if not fuse_grad:
        empty = query.new_empty(0, dtype=torch.float32)
        return loss, empty, empty.clone()
    N = B + (hard_negatives.shape[0] * hard_negatives.shape[1] if hard_negatives is not None else 0)
    return (
        loss,
        query.new_empty((B, D), dtype=torch.float32),
        query.new_empty((N, D), dtype=torch.float32),
    )


@torch.library.custom_op("hardneg::hardneg_loss_backward", mutates_args=())
def _hardneg_loss_backward_op(
    grad_loss: Tensor,
    query: Tensor,
    target: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    spec: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Recomputing backward: one more pass of the row schedule with dS scaled by grad_loss."""
    inputs = (query, target, hard_negatives, target_ids, hard_negative_ids)
    _, dq, dc = _compute(*inputs, LossSpec.decode(spec), True, grad_loss)
    return _split_grads(dq, dc, query, target, hard_negatives)


@_hardneg_loss_backward_op.register_fake
def _(grad_loss, query, target, hard_negatives, target_ids, hard_negative_ids, spec):
    dh = torch.empty_like(hard_negatives) if hard_negatives is not None else query.new_empty(0)
    return torch.empty_like(query), torch.empty_like(target), dh


def _setup_context(ctx, inputs, output):
    query, target, hard_negatives, target_ids, hard_negative_ids, spec, fuse_grad = inputs
    _, dq, dc = output
    ctx.spec = spec
    ctx.fused = fuse_grad
    ctx.has_hard_negatives = hard_negatives is not None
    if fuse_grad:
        ctx.save_for_backward(query, target, hard_negatives, dq, dc)
    else:
        ctx.save_for_backward(query, target, hard_negatives, target_ids, hard_negative_ids)
    ctx.mark_non_differentiable(dq, dc)


def _scaled(grad: Tensor, grad_loss: Tensor, like: Tensor) -> Tensor:
    """grad (fp32) * grad_loss in like's dtype, a fresh tensor, in one pass: the multiply rounds
    once into the output (what (grad * grad_loss).to(dtype) gives, without the fp32 temporary)."""
    out = torch.empty(grad.shape, dtype=like.dtype, device=grad.device)
    return torch.mul(grad, grad_loss, out=out)


def _backward(ctx, grad_loss, _grad_dq, _grad_dc):
    if ctx.fused:
        # The gradients were computed with the forward pass at grad_output = 1; the reduced loss
        # is a scalar, so backward only scales them.
        query, target, hard_negatives, dq_BD, dc_ND = ctx.saved_tensors
        B = query.shape[0]
        dq = _scaled(dq_BD, grad_loss, query)
        dt = _scaled(dc_ND[:B], grad_loss, target)
        dh = None
        if hard_negatives is not None:
            dh = _scaled(dc_ND[B:], grad_loss, hard_negatives).view(hard_negatives.shape)
    else:
        query, target, hard_negatives, target_ids, hard_negative_ids = ctx.saved_tensors
        dq, dt, dh = _hardneg_loss_backward_op(
            grad_loss, query, target, hard_negatives, target_ids, hard_negative_ids, ctx.spec
        )
    if not ctx.has_hard_negatives:
        dh = None
    # No gradient for target_ids, hard_negative_ids, spec, fuse_grad.
    return dq, dt, dh, None, None, None, None


_hardneg_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def fused_hardneg_loss(
    query: Tensor,
    target: Tensor,
    *,
    hard_negatives: Tensor | None = None,
    target_ids: Tensor | None = None,
    hard_negative_ids: Tensor | None = None,
    mode: str = "llave",
    temperature: float = TEMPERATURE,
    alpha: float = ALPHA,
    ega_beta: float = EGA_BETA,
    ega_margin: float = EGA_MARGIN,
    symmetric: bool = False,
    reduction: str = "mean",
    group: dist.ProcessGroup | None = None,
    strategy: str = "auto",
    transport: str = "auto",
    keep_logits_bytes: int = KEEP_LOGITS_BYTES,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> Tensor:
    """Hardness-aware contrastive loss, fused: the B x N logits matrix is never materialised.

    Shapes: query, target (B, D), target[i] the positive of query[i]; hard_negatives (B, M, D) join
    the candidate pool shared by every query, N = B + B*M candidates in the order
    [target; hard_negatives.reshape(B*M, D)]. target_ids (B,), hard_negative_ids (B, M), int64: a
    candidate whose id equals the id of a query's positive is a false negative and is masked out
    (in both directions when symmetric). hard_negative_ids=None with target_ids given: hard
    negatives are never masked (mined negatives without ids; target ids must not use the
    reserved id -2**63, hardneg._constants.UNMASKED_ID). Inputs are used as given: L2-normalise
    them first for cosine similarities (the intended use). float32, bfloat16 and float16 inputs are
    accumulated in fp32; the loss is fp32 and gradients come back in the input dtype. float64
    inputs raise TypeError (the kernels are fp32): hardneg_loss_reference computes in fp64.

    With s_ij = q_i . c_j, tau = temperature, p(i) = i and P = softmax_j(z):
      infonce:  z_ij = s_ij / tau
      llave:    z_ij = s_ij / tau + [j != p(i)] * alpha * sg(s_ij)   (LLaVE hardness weighting)
      ega:      z_ij = s_ij / tau in the forward (the value is InfoNCE); the backward amplifies
                hard negatives: dL_i/ds_ij = (Pbar_ij - Y_ij) / tau with
                Pbar_ij = softmax_j(z_ij + u_ij), u_ij = ega_beta * max(0, s_ij - s_{i,p(i)} +
                ega_margin) for j != p(i), u_{i,p(i)} = 0, u not differentiated (masked
                candidates excluded): the renormalised amplification, sum_j Pbar_ij = 1. This is a
                documented reconstruction of QQMM-embed's gradient amplifier (its exact formula
                is unpublished). Defaults ega_beta = 50, ega_margin = 0.3, chosen on the
                controlled benchmark (benchmarks/bench_hardness.py, README "Learning quality"):
                a negative within 0.3 cosine of its positive is weighted by
                e^(50 (s - s_pos + 0.3)) before the row is renormalised.
      L_i = logsumexp_j z_ij - z_{i,p(i)}; symmetric: (L_q->t + L_t->q) / 2 where the t->q
      direction ranks the queries for each in-batch target (hard negatives take no part).

    reduction: "mean" (over queries), "sum", or "none" (shape (B,), per-index mean of both
    directions when symmetric). chunk_size: rows of S per chunk (default: 32 MiB on CPU, 1/64 of
    the GPU's memory up to 2 GiB on CUDA, of fp32 S plus, with bf16 / fp16 GEMM operands, the
    chunk's dS in that dtype: hardneg._schedule.chunk_bytes).
    check_finite: scan the inputs for NaN/Inf (FloatingPointError); False skips the scan. On CPU
    the error is raised at once; on CUDA the scan queues without a host synchronisation and its
    verdict raises at a later hardneg call or at hardneg.raise_if_nonfinite() (hardneg._finite).

    Cross-device negatives: group (None: this process only): with more than one rank the loss is
    the single-process loss over the concatenation of every rank's batch, the same value on every
    rank, and each rank gets the gradient w.r.t. its own inputs. Multiply the loss by the world
    size before backward when DDP / DeepSpeed average gradients over ranks. strategy: "ring",
    "allgather" or "auto" (hardneg.distributed.costmodel picks); transport (ring only): "torch"
    (torch.distributed), "nccl" (hardneg's NCCL communicator, CUDA) or "auto"; keep_logits_bytes
    (ring only): logits kept between the forward and backward rings, at most (the rest are
    recomputed). hardneg.distributed.ops has the per-rank shapes and equations.

    The gradient is computed in the forward pass when autograd will need it (reduction "mean" or
    "sum"): each row chunk sees its whole row, so the loss, dS, dQ and dC come from one pass of 3
    GEMMs and backward only scales them. reduction "none" recomputes in backward instead.
    """
    check_inputs(query, target, hard_negatives, target_ids, hard_negative_ids)
    spec = make_spec(
        mode=mode,
        temperature=temperature,
        alpha=alpha,
        ega_beta=ega_beta,
        ega_margin=ega_margin,
        symmetric=symmetric,
        reduction=reduction,
        chunk_size=chunk_size,
        check_finite=check_finite,
    )
    check_group_options(strategy, transport, keep_logits_bytes)
    inputs = (query, target, hard_negatives, target_ids, hard_negative_ids)
    if group is not None and dist.get_world_size(group) > 1:
        return group_hardneg_loss(
            *inputs,
            spec=spec,
            group=group,
            strategy=strategy,
            transport=transport,
            keep_logits_bytes=keep_logits_bytes,
        )
    fuse_grad = _schedule.fuses_grad(spec, query, target, hard_negatives)
    loss, _, _ = _hardneg_loss_op(*inputs, spec.encode(), fuse_grad)
    return loss
