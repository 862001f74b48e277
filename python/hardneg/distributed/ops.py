"""Cross-device hardneg_loss: the custom ops of both strategies and their entry point.

Each of K ranks passes its local queries, targets, hard negatives and ids. The result is the
single-process loss over the global batch: queries, targets and hard negatives of ranks 0..K-1
concatenated in rank order, the positive of global query g being global target g, every query
ranking every target and hard negative of every rank. The loss value is the same on every rank;
backward gives each rank the gradient of that global loss w.r.t. its own local inputs.

Per-rank shapes (rank r, K ranks; B_r may differ between ranks, 1 included; M_r too, 0 = no hard
negatives; the concatenation equals the single-process problem when M is the same everywhere):

    input / output        rank r                 global equivalent
    query, target         (B_r, D)               (B, D),  B = sum_k B_k
    hard_negatives        (B_r, M_r, D)          (B, M, D)
    target_ids            (B_r,)                 (B,)
    hard_negative_ids     (B_r, M_r)             (B, M)
    loss                  () mean / sum          the same number on every rank
                          (B_r,) none            rank r's slice of the (B,) per-query losses
    grads                 like the inputs        rows of the global gradient owned by rank r

Forward (block c = candidates [T_k; H_k] of one rank, online logsumexp over blocks):
    s_ic = q_i . c,  z_ic as in hardneg.fused_hardneg_loss (mode, alpha, masking by ids)
    m_i, l_i <- merge over blocks of (max_c z_ic, sum_c exp(z_ic - max)),  lse_i = m_i + log l_i
    L_i = lse_i - z_{i,p(i)},   loss = sum_i L_i / B (mean, B global) or sum_i L_i
    ega: also lse_u_i of the amplified logits z_ic + u_ic (u needs s_{i,p(i)}, which the ring's
    first block, this rank's own, holds: hardneg.distributed.ring), L_u_i = lse_u_i - z_{i,p(i)}
    symmetric: the same with target rows and query columns, loss = (L_q->t + L_t->q) / 2
Backward (g = grad_output of this rank, scaling this rank's rows):
    dS_ic = g * (Pbar_ic - Y_ic) / tau / B,  Pbar_ic = exp(z_ic - lse_i)
            (ega: exp(z_ic + u_ic - lse_u_i); the positive's exactly expm1(-L or -L_u))
    dQ_r  = sum_k dS_rk . C_k               (accumulated locally)
    dC_k  = sum_r dS_rk^T . Q_r             (sent back to the owner of block k)

Ops (each with a fake and registered autograd; options travel as LossSpec / GroupSpec strings):
    hardneg::hardneg_loss_ring       -> (loss, stats, kept_logits). Saves the loss L, s_pos and
        the gradient softmax's row loss L_u (ega's amplified one; L for the other modes) per row
        and direction, stats (directions, 3, B_r): all backward needs to rebuild Pbar from S
        (lse = z_pos + L_u; the positive's gradient is expm1(-L_u) / tau, exact when Pbar_pos ~ 1;
        s_pos gives ega's u), and the logits of as many blocks as fit keep_logits_bytes (each kept
        block saves one GEMM in backward; the others are recomputed, so memory stays O(chunk) by
        default).
    hardneg::hardneg_loss_allgather  -> (loss, dq, dc). When the gradient is fused (reduction
        mean or sum and a gradient needed), this rank's rows' contributions at grad_output = 1:
        dq (B_r, D) and the padded candidate gradients (K, X, D) of every block, which backward
        scales and reduce-scatters to the block owners; empty otherwise (backward recomputes).

Scaling for trainers: the loss is the global loss on every rank and each rank already receives
the full d(global loss)/d(its inputs). An engine that AVERAGES parameter gradients over K ranks
(DDP, DeepSpeed) divides that by K: multiply the loss by K (the world size) before backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Imported with hardneg, i.e. normally before init_process_group, on purpose: this torch module
# binds `group.WORLD` as a default argument value when first imported, and the first call of any
# torch.library custom op (ours below) imports it through torch._dynamo. Imported only then, it
# would hold the default process group for the life of the process: destroy_process_group could
# not free it, and a gloo group's worker threads would run on into interpreter teardown, where
# one still releasing a finished work's tensors aborts the process (layout._GROUPS says how).
import torch.distributed.nn.functional  # noqa: F401
from torch import Tensor

from hardneg import _finite, _schedule
from hardneg._spec import GroupSpec, LossSpec
from hardneg.distributed import costmodel
from hardneg.distributed.allgather import allgather_compute, allgather_grads
from hardneg.distributed.layout import (
    Layout,
    exchange_sizes,
    finish_loss,
    lookup_group,
    register_group,
)
from hardneg.distributed.ring import keep_plan, ring_backward, ring_forward
from hardneg.distributed.transport import make_transport


def _context(spec: str, group_spec: str) -> tuple[LossSpec, GroupSpec, object, Layout]:
    """(loss spec, group spec, process group, layout) from an op's option strings."""
    loss_spec, gspec = LossSpec.decode(spec), GroupSpec.decode(group_spec)
    group = lookup_group(gspec.group_name)
    layout = Layout.from_sizes(gspec.sizes, dist.get_rank(group), loss_spec.symmetric)
    return loss_spec, gspec, group, layout


def _split_grads(dq_BD, dc_XD, query, target, hard_negatives, symmetric):
    """(dq, dt, dh) in the input dtypes from dq (B, D) and the own block's dc = [dt; dh; dq']."""
    B = query.shape[0]
    N = B * (1 + (hard_negatives.shape[1] if hard_negatives is not None else 0))
    dq = dq_BD + dc_XD[N : N + B] if symmetric else dq_BD
    dh = (
        dc_XD[B:N].reshape(hard_negatives.shape).to(hard_negatives.dtype)
        if hard_negatives is not None
        else query.new_empty(0)
    )
    return dq.to(query.dtype), dc_XD[:B].to(target.dtype).clone(), dh.clone()


def _grads_fake(query, target, hard_negatives):
    dh = torch.empty_like(hard_negatives) if hard_negatives is not None else query.new_empty(0)
    return torch.empty_like(query), torch.empty_like(target), dh


def _loss_fake(query, reduction: str) -> Tensor:
    B = query.shape[0]
    return query.new_empty((B,) if reduction == "none" else (), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# The ring
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("hardneg::hardneg_loss_ring", mutates_args=())
def _ring_op(
    query: Tensor,
    target: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    spec: str,
    group_spec: str,
) -> tuple[Tensor, Tensor, Tensor]:
    loss_spec, gspec, group, layout = _context(spec, group_spec)
    if loss_spec.check_finite:
        _finite.check_finite({"query": query, "target": target, "hard_negatives": hard_negatives})
    inputs = (query, target, hard_negatives, target_ids, hard_negative_ids)
    transport = make_transport(group, query.device, gspec.transport)
    loss_B, stats, kept = ring_forward(
        inputs, layout, transport, loss_spec, gspec.keep_logits_bytes
    )
    return finish_loss(loss_B, loss_spec.reduction, layout, group), stats, kept


@_ring_op.register_fake
def _(query, target, hard_negatives, target_ids, hard_negative_ids, spec, group_spec):
    loss_spec, gspec, _, layout = _context(spec, group_spec)
    directions = loss_spec.directions
    _, kept_floats = keep_plan(layout, directions, gspec.keep_logits_bytes)
    stats = query.new_empty((directions, 3, query.shape[0]), dtype=torch.float32)
    kept = query.new_empty(kept_floats, dtype=torch.float32)
    return _loss_fake(query, loss_spec.reduction), stats, kept


@torch.library.custom_op("hardneg::hardneg_loss_ring_backward", mutates_args=())
def _ring_backward_op(
    grad_loss: Tensor,
    query: Tensor,
    target: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    stats: Tensor,
    kept_logits: Tensor,
    spec: str,
    group_spec: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dt, dh) of this rank's inputs (dh empty without hard negatives): the backward ring."""
    loss_spec, gspec, group, layout = _context(spec, group_spec)
    inputs = (query, target, hard_negatives, target_ids, hard_negative_ids)
    transport = make_transport(group, query.device, gspec.transport)
    dq_BD, dc_XD = ring_backward(
        grad_loss,
        inputs,
        stats,
        kept_logits,
        layout,
        transport,
        loss_spec,
        gspec.keep_logits_bytes,
    )
    return _split_grads(dq_BD, dc_XD, query, target, hard_negatives, loss_spec.symmetric)


@_ring_backward_op.register_fake
def _(grad_loss, query, target, hard_negatives, *_options):
    return _grads_fake(query, target, hard_negatives)


def _ring_setup_context(ctx, inputs, output):
    query, target, hard_negatives, target_ids, hard_negative_ids, spec, group_spec = inputs
    _, stats, kept = output
    ctx.specs = (spec, group_spec)
    ctx.has_hard_negatives = hard_negatives is not None
    ctx.save_for_backward(query, target, hard_negatives, target_ids, hard_negative_ids, stats, kept)
    ctx.mark_non_differentiable(stats, kept)


def _ring_autograd(ctx, grad_loss, _grad_stats, _grad_kept):
    dq, dt, dh = _ring_backward_op(grad_loss, *ctx.saved_tensors, *ctx.specs)
    return dq, dt, dh if ctx.has_hard_negatives else None, None, None, None, None


_ring_op.register_autograd(_ring_autograd, setup_context=_ring_setup_context)


# ---------------------------------------------------------------------------------------------
# The all-gather
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("hardneg::hardneg_loss_allgather", mutates_args=())
def _allgather_op(
    query: Tensor,
    target: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    spec: str,
    group_spec: str,
    fuse_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    loss_spec, _, group, layout = _context(spec, group_spec)
    if fuse_grad and loss_spec.reduction == "none":
        # Backward scales fused gradients by one number: a per-row loss cannot have them.
        raise ValueError("fuse_grad=True needs reduction 'mean' or 'sum', got reduction 'none'")
    if loss_spec.check_finite:
        _finite.check_finite({"query": query, "target": target, "hard_negatives": hard_negatives})
    inputs = (query, target, hard_negatives, target_ids, hard_negative_ids)
    loss_B, dq, dc = allgather_compute(inputs, layout, group, loss_spec, fuse_grad, None)
    if not fuse_grad:
        dq, dc = (query.new_empty(0, dtype=torch.float32) for _ in range(2))
    return finish_loss(loss_B, loss_spec.reduction, layout, group), dq, dc


@_allgather_op.register_fake
def _(query, target, hard_negatives, target_ids, hard_negative_ids, spec, group_spec, fuse_grad):
    loss_spec, _, _, layout = _context(spec, group_spec)
    loss = _loss_fake(query, loss_spec.reduction)
    if not fuse_grad:
        return loss, *(query.new_empty(0, dtype=torch.float32) for _ in range(2))
    K, X, D = layout.world_size, layout.max_block_rows, query.shape[1]
    dq = query.new_empty((query.shape[0], D), dtype=torch.float32)
    return loss, dq, query.new_empty((K, X, D), dtype=torch.float32)


@torch.library.custom_op("hardneg::hardneg_loss_allgather_backward", mutates_args=())
def _allgather_backward_op(
    grad_loss: Tensor,
    query: Tensor,
    target: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    dq: Tensor,
    dc: Tensor,
    spec: str,
    group_spec: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dt, dh) of this rank's inputs: the forward's fused gradients scaled by grad_loss
    (dq, dc non-empty) or recomputed (reduction "none"), then reduce-scattered to their owners."""
    loss_spec, _, group, layout = _context(spec, group_spec)
    inputs = (query, target, hard_negatives, target_ids, hard_negative_ids)
    if dq.numel() > 0:
        dq_BD, dc_KXD = dq * grad_loss, dc * grad_loss
    else:
        _, dq_BD, dc_KXD = allgather_compute(inputs, layout, group, loss_spec, True, grad_loss)
    dq_BD, dc_XD = allgather_grads(dq_BD, dc_KXD, layout, group)
    return _split_grads(dq_BD, dc_XD, query, target, hard_negatives, loss_spec.symmetric)


@_allgather_backward_op.register_fake
def _(grad_loss, query, target, hard_negatives, *_options):
    return _grads_fake(query, target, hard_negatives)


def _allgather_setup_context(ctx, inputs, output):
    query, target, hard_negatives, target_ids, hard_negative_ids, spec, group_spec, _ = inputs
    _, dq, dc = output
    ctx.specs = (spec, group_spec)
    ctx.has_hard_negatives = hard_negatives is not None
    ctx.save_for_backward(query, target, hard_negatives, target_ids, hard_negative_ids, dq, dc)
    ctx.mark_non_differentiable(dq, dc)


def _allgather_autograd(ctx, grad_loss, _grad_dq, _grad_dc):
    dq, dt, dh = _allgather_backward_op(grad_loss, *ctx.saved_tensors, *ctx.specs)
    return dq, dt, dh if ctx.has_hard_negatives else None, None, None, None, None, None


_allgather_op.register_autograd(_allgather_autograd, setup_context=_allgather_setup_context)


# ---------------------------------------------------------------------------------------------
# Entry point (hardneg.fused_hardneg_loss calls it for a group of more than one rank)
# ---------------------------------------------------------------------------------------------


def group_hardneg_loss(
    query: Tensor,
    target: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    *,
    spec: LossSpec,
    group: dist.ProcessGroup,
    strategy: str,
    transport: str,
    keep_logits_bytes: int,
) -> Tensor:
    """hardneg_loss over the global batch of `group` (see the module docstring). Arguments are
    those of hardneg.fused_hardneg_loss, already checked on this rank; this checks that the ranks
    agree and resolves strategy "auto" with the cost model on the largest per-rank batch."""
    # The kernels read ids by pointer, row by row: they must be dense.
    target_ids = target_ids.contiguous() if target_ids is not None else None
    hard_negative_ids = hard_negative_ids.contiguous() if hard_negative_ids is not None else None
    sizes = exchange_sizes(group, query, hard_negatives, target_ids, spec)
    layout = Layout.from_sizes(sizes, dist.get_rank(group), spec.symmetric)
    if strategy == "auto":
        strategy = costmodel.choose_strategy(
            batch=max(layout.batch),
            dim=query.shape[1],
            world_size=layout.world_size,
            hard_negatives=max(layout.hard_negatives),
            dtype=query.dtype,
            link=costmodel.default_link(query.device),
            symmetric=spec.symmetric,
        )
    gspec = GroupSpec(register_group(group), tuple(sizes), strategy, transport, keep_logits_bytes)
    inputs = (query, target, hard_negatives, target_ids, hard_negative_ids)
    if strategy == "ring":
        loss, _, _ = _ring_op(*inputs, spec.encode(), gspec.encode())
        return loss
    # The all-gather computes the gradient with the loss when one will be needed.
    fuse_grad = _schedule.fuses_grad(spec, query, target, hard_negatives)
    loss, _, _ = _allgather_op(*inputs, spec.encode(), gspec.encode(), fuse_grad)
    return loss
