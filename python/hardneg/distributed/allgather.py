"""The all-gather strategy of the cross-device loss: one all-gather of every rank's block, the
row schedule over all candidates (loss and gradient in one pass, hardneg._schedule), one
reduce-scatter of the candidate gradients to their owners in backward.

It pays each transfer once and in the open, so it wins where per-rank batches are small and the
loss GEMMs are short next to a transfer (hardneg.distributed.costmodel). Candidates are laid out
own block first, so the positive of local row i is candidate i (the loss does not depend on the
candidate order).

Legend: K ranks, X rows of the largest block (blocks are padded to it for the collectives),
B_r local rows, N all candidates, D dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardneg import _gemm, _schedule
from hardneg._spec import LossSpec
from hardneg.distributed.layout import Layout, all_gather_single, own_block, reduce_scatter_single


def _gather_blocks(own_emb, own_ids, layout: Layout, group):
    """Every rank's block, padded to the largest: (K, X, D) and ids (K, Nmax) (None without)."""
    K, X = layout.world_size, layout.max_block_rows
    D = own_emb.shape[1]
    pad = own_emb.new_zeros(X, D)
    pad[: own_emb.shape[0]] = own_emb
    emb_KXD = own_emb.new_empty(K, X, D)
    all_gather_single(emb_KXD.view(K * X, D), pad, group)
    ids_KN = None
    if own_ids is not None:
        pad_ids = own_ids.new_zeros(layout.max_cands)
        pad_ids[: own_ids.shape[0]] = own_ids
        ids_KN = own_ids.new_empty(K, layout.max_cands)
        all_gather_single(ids_KN.view(-1), pad_ids, group)
    return emb_KXD, ids_KN


def _own_first(layout: Layout) -> list[int]:
    """Rank order with this rank first."""
    K, r = layout.world_size, layout.rank
    return [r] + [k for k in range(K) if k != r]


def allgather_compute(
    inputs, layout: Layout, group, spec: LossSpec, need_grad: bool, grad_loss: Tensor | None
):
    """Loss per local row and, when need_grad, dq (B_r, D) and the padded candidate gradients
    (K, X, D) of this rank's rows, fp32, ready for the reduce-scatter. inputs: (query, target,
    hard_negatives, target_ids, hard_negative_ids) of this rank."""
    query, target, target_ids = inputs[0], inputs[1], inputs[3]
    B = query.shape[0]
    own_emb, own_ids = own_block(*inputs, spec.symmetric)
    emb_KXD, ids_KN = _gather_blocks(own_emb, own_ids, layout, group)
    order = _own_first(layout)
    c_ND = _gemm.operand(torch.cat([emb_KXD[k, : layout.cands(k)] for k in order]))
    ids_N = torch.cat([ids_KN[k, : layout.cands(k)] for k in order]) if ids_KN is not None else None
    row_scale_B = _schedule.row_scale(grad_loss, B, spec.reduction)
    grad_scale = _schedule.grad_scale_of(spec, layout.total_batch)
    q_BD = _gemm.operand(query)
    dq_BD = torch.zeros_like(q_BD, dtype=torch.float32) if need_grad else None
    dc_ND = torch.zeros_like(c_ND, dtype=torch.float32) if need_grad else None
    loss_B = torch.empty(B, dtype=torch.float32, device=query.device)
    _schedule.row_pass(
        q_BD, c_ND, target_ids, ids_N, spec, loss_B, grad_scale, row_scale_B, dq_BD, dc_ND
    )
    if spec.symmetric:
        # t->q: local targets against every rank's queries (the block's last B_k rows).
        qc_BD = _gemm.operand(
            torch.cat([emb_KXD[k, layout.cands(k) : layout.block_rows(k)] for k in order])
        )
        qids_B = None
        if ids_KN is not None:
            qids_B = torch.cat([ids_KN[k, : layout.batch[k]] for k in order])
        t_BD = _gemm.operand(target)
        dt_BD = torch.zeros_like(t_BD, dtype=torch.float32) if need_grad else None
        dqc_BD = torch.zeros_like(qc_BD, dtype=torch.float32) if need_grad else None
        loss_t_B = torch.empty_like(loss_B)
        _schedule.row_pass(
            t_BD,
            qc_BD,
            target_ids,
            qids_B,
            spec,
            loss_t_B,
            grad_scale,
            row_scale_B,
            dt_BD,
            dqc_BD,
        )
        loss_B = (loss_B + loss_t_B) * 0.5
    if not need_grad:
        return loss_B, None, None
    dc_KXD = torch.zeros(emb_KXD.shape, dtype=torch.float32, device=query.device)
    n0 = q0 = 0
    for k in order:
        n, b = layout.cands(k), layout.batch[k]
        dc_KXD[k, :n] = dc_ND[n0 : n0 + n]
        if spec.symmetric:
            dc_KXD[k, n : n + b] = dqc_BD[q0 : q0 + b]
        n0, q0 = n0 + n, q0 + b
    if spec.symmetric:
        dc_KXD[layout.rank, :B] += dt_BD  # target rows of the t->q direction
    return loss_B, dq_BD, dc_KXD


def allgather_grads(dq_BD: Tensor, dc_KXD: Tensor, layout: Layout, group):
    """Reduce-scatter of the candidate gradients: (dq, dc of this rank's own block) in fp32."""
    K, X, D = dc_KXD.shape
    own = dc_KXD.new_empty(X, D)
    reduce_scatter_single(own, dc_KXD.view(K * X, D), group)
    return dq_BD, own[: layout.block_rows(layout.rank)]
