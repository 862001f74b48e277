"""The ring schedule of the cross-device loss (design section 3): K steps forward, K backward.

Forward, step s: rank r holds the block of rank k = (r - s) mod K, posts its send to r + 1 and the
receive of the next block from r - 1, then runs the GEMM and the online-logsumexp update on the
block in hand while the transfer is in flight (double buffer). Backward: the same ring rebuilds
Pbar from the saved statistics and the kept or recomputed logits, accumulates dQ_r locally, and
adds dS_rk^T . Q_r into a partial dC_k that travels with the blocks and arrives summed at its owner
after the full circle (a reduce-scatter done by the ring).

    forward, block c:  S_c = Q . C_c^T ;  update(S_c) -> running max m_i and sum l_i of the
                       negatives' logits, z_pos_i from the block that holds the positive;
                       ega also (m_u_i, l_u_i) of the amplified logits z + u
    finish:            L_i = row_loss(z_pos_i, m_i, l_i)  (no cancellation on confident rows);
                       ega: L_u_i = row_loss(z_pos_i, m_u_i, l_u_i), the gradient softmax's
    backward, block c: S_c kept (within keep_logits_bytes) or recomputed;
                       grad(S_c, L or L_u, s_pos) -> dS_c (in place; for bf16 / fp16 operands
                       into a buffer of their dtype, hardneg._gemm.grad_dtype) ;
                       dQ += dS_c . C_c ; dC_c = dS_c^T . Q

How ega knows s_ip before it sweeps a block (u_ij = beta * max(0, s_ij - s_ip + margin)): step 0
holds this rank's own block [T_r; H_r; Q_r], and the positive of every local row lies there in
both directions: query i's is target i, column i of [T_r; H_r] (the hard negatives come after
the targets), and target i's (t->q) is query i, column i of Q_r. Every chunk of both directions
sweeps step 0 before any other block, so the block update reads s_ip from the block at step 0 and
from the s_pos it recorded there at every later step (the kernels' contract, hardneg_loss.h).

Legend: K ranks, r this rank, k a block's owner, B_r local rows, N_k candidates and S_k query
columns of block k (hardneg.distributed.layout), D dim, R rows and C columns of one chunk of S.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from hardneg import _gemm, _ops, _schedule
from hardneg._spec import LossSpec
from hardneg.distributed.layout import Layout, own_block
from hardneg.distributed.transport import Transport


@dataclass(frozen=True)
class _Direction:
    """One direction of the loss as the ring sees it: local rows against one column range of
    every block. "q->t": query rows, columns [0, N_k) = [T_k; H_k] with ids [t_ids_k; h_ids_k].
    "t->q" (symmetric): target rows, columns [N_k, N_k + B_k) = Q_k with ids t_ids_k (a query
    carries the id of its positive)."""

    rows_BD: Tensor  # (B_r, D), a GEMM operand (hardneg._gemm)
    name: str  # "q->t" or "t->q"

    def cols(self, layout: Layout, k: int) -> tuple[int, int]:
        if self.name == "q->t":
            return 0, layout.cands(k)
        return layout.cands(k), layout.cands(k) + layout.batch[k]

    def col_ids(self, ids: Tensor | None, layout: Layout, k: int) -> Tensor | None:
        if ids is None:
            return None
        return ids[: layout.cands(k)] if self.name == "q->t" else ids[: layout.batch[k]]


def row_loss(z_pos: Tensor, m_neg: Tensor, l_neg: Tensor) -> Tensor:
    """L = log(exp(z_pos) + sum_j exp(z_j)) - z_pos from the negatives' online (max, sum), the
    kernels' hardneg_row_loss (csrc/include/hardneg/hardneg_loss_math.h) elementwise:
    log1p(l exp(d)) where the positive leads (d = m - z_pos <= 0), else d + log(l + exp(-d))."""
    d = m_neg - z_pos
    leads = d <= 0
    loss = torch.where(
        leads,
        torch.log1p(l_neg * torch.exp(d.clamp(max=0))),
        d + torch.log(l_neg + torch.exp(-d.clamp(min=0))),
    )
    return torch.where(l_neg == 0, z_pos - z_pos, loss)  # 0, or NaN for a NaN z_pos


def keep_plan(layout: Layout, directions: int, keep_bytes: int) -> tuple[list[list[int]], int]:
    """(plan, floats): the offset (in floats) of each kept block's logits in the saved buffer, -1
    when recomputed, indexed [step][direction], and the buffer's size. Blocks are kept in ring
    order while they fit keep_bytes."""
    B = layout.batch[layout.rank]
    used = 0
    plan = []
    for step in range(layout.world_size):
        k = layout.owner(step)
        row = []
        for d in range(directions):
            size = B * (layout.cands(k) if d == 0 else layout.batch[k])
            if 4 * (used + size) <= keep_bytes:
                row.append(used)
                used += size
            else:
                row.append(-1)
        plan.append(row)
    return plan, used


class _RingBuffers:
    """Double-buffered blocks: at step s the block in hand is slot s % 2 while the next one
    arrives in slot (s + 1) % 2."""

    def __init__(self, layout: Layout, D: int, dtype, device, with_ids: bool) -> None:
        self.layout = layout
        self.emb = [
            torch.empty(layout.max_block_rows, D, dtype=dtype, device=device) for _ in range(2)
        ]
        self.ids = None
        if with_ids:
            self.ids = [
                torch.empty(layout.max_cands, dtype=torch.int64, device=device) for _ in range(2)
            ]

    def block(self, slot: int, k: int) -> tuple[Tensor, Tensor | None]:
        emb = self.emb[slot][: self.layout.block_rows(k)]
        ids = self.ids[slot][: self.layout.cands(k)] if self.ids is not None else None
        return emb, ids

    def exchange_lists(self, step: int) -> tuple[list[Tensor], list[Tensor]]:
        """(sends, recvs) of the block exchange posted at `step`: the block in hand goes to the
        next rank, the block for step + 1 comes from the previous one. Empty on the last step."""
        layout = self.layout
        if step == layout.world_size - 1:
            return [], []
        emb, ids = self.block(step % 2, layout.owner(step))
        emb_next, ids_next = self.block((step + 1) % 2, layout.owner(step + 1))
        sends = [emb] + ([ids] if ids is not None else [])
        recvs = [emb_next] + ([ids_next] if ids_next is not None else [])
        return sends, recvs


@dataclass(frozen=True)
class _RingState:
    """What both rings start from: the directions, the double buffers with this rank's own block
    in slot 0, the keep plan, a scratch chunk of S and, in the backward ring with low-precision
    operands, one of dS in their dtype (the kernel writes it; the gradient GEMMs read it)."""

    directions: list[_Direction]
    buffers: _RingBuffers
    plan: list[list[int]]  # keep_plan's [step][direction] offsets
    kept_floats: int
    s_buf: Tensor  # fp32, (R * max_block_rows,)
    ds_buf: Tensor | None  # ds_dtype, (R * max_block_rows,); None: dS in place of S
    ds_dtype: torch.dtype | None


def _ring_start(
    inputs, layout: Layout, spec: LossSpec, keep_bytes: int, need_grad: bool = False
) -> _RingState:
    query, target, hard_negatives, target_ids, hard_negative_ids = inputs
    B, D = query.shape
    directions = [_Direction(_gemm.operand(query), "q->t")]
    if spec.symmetric:
        directions.append(_Direction(_gemm.operand(target), "t->q"))
    ds_dtype = _gemm.grad_dtype(directions[0].rows_BD) if need_grad else None
    own_emb, own_ids = own_block(*inputs, spec.symmetric)
    buffers = _RingBuffers(layout, D, query.dtype, query.device, own_ids is not None)
    emb, ids = buffers.block(0, layout.rank)
    emb.copy_(own_emb)
    if ids is not None:
        ids.copy_(own_ids)
    plan, kept_floats = keep_plan(layout, len(directions), keep_bytes)
    cols = layout.max_block_rows
    R = min(B, _schedule.chunk_rows(spec, cols, query.device, ds_dtype))
    s_buf = torch.empty(R * cols, dtype=torch.float32, device=query.device)
    ds_buf = None
    if ds_dtype is not None:
        ds_buf = torch.empty(R * cols, dtype=ds_dtype, device=query.device)
    return _RingState(directions, buffers, plan, kept_floats, s_buf, ds_buf, ds_dtype)


def _block_chunks(
    B: int, cols: int, spec: LossSpec, device, ds_dtype: torch.dtype | None
) -> Iterator[tuple[int, int]]:
    R = min(B, _schedule.chunk_rows(spec, cols, device, ds_dtype))
    for r0 in range(0, B, R):
        yield r0, min(B, r0 + R)


def _ring_chunks(state: _RingState, layout: Layout, step: int, params, target_ids, spec):
    """The chunks of the block in hand at `step`, in the order both rings visit them: yields
    (direction index, direction, c_XD, c0, c1, r0, r1) for local rows [r0, r1) against block
    columns [c0, c1), with the kernel parameters that depend only on those (columns, their ids,
    rows, the positive's offset, the rows' ids) already set. c_XD: the block as a GEMM operand."""
    k = layout.owner(step)
    emb, ids = state.buffers.block(step % 2, k)
    c_XD = _gemm.operand(emb)
    B = layout.batch[layout.rank]
    for d, direction in enumerate(state.directions):
        c0, c1 = direction.cols(layout, k)
        cols = c1 - c0
        col_ids = direction.col_ids(ids, layout, k)
        params.cols = cols
        params.ld_s = cols
        params.col_ids = col_ids.data_ptr() if col_ids is not None else 0
        for r0, r1 in _block_chunks(B, cols, spec, c_XD.device, state.ds_dtype):
            params.rows = r1 - r0
            # The positive of local row i is column i of this rank's own block; elsewhere
            # pos_offset = -(rows) puts every row's positive before column 0, i.e. absent.
            params.pos_offset = r0 if k == layout.rank else -(r1 - r0)
            if target_ids is not None:
                params.row_ids = target_ids[r0:].data_ptr()
            yield d, direction, c_XD, c0, c1, r0, r1


def ring_forward(inputs, layout: Layout, transport: Transport, spec: LossSpec, keep_bytes: int):
    """Loss per local row (B_r,), the per-row statistics (directions, 3, B_r) = (L, s_pos, L_u)
    that backward needs (L_u: the row loss of the gradient's softmax, ega's amplified one; L for
    the other modes), and the kept logits (flat fp32). inputs: (query, target, hard_negatives,
    target_ids, hard_negative_ids) of this rank."""
    query, target_ids = inputs[0], inputs[3]
    device = query.device
    B = query.shape[0]
    K, r = layout.world_size, layout.rank
    state = _ring_start(inputs, layout, spec, keep_bytes)
    kept = torch.empty(state.kept_floats, dtype=torch.float32, device=device)
    # Per direction: run_max, run_sum, z_pos, s_pos, and ega's run_max_u, run_sum_u (B_r each).
    stats = torch.empty(len(state.directions), 6, B, dtype=torch.float32, device=device)
    stats[:, 0::4] = -math.inf
    stats[:, 1::4] = 0.0
    params = _schedule.kernel_params(device, spec, False, 1.0)
    kernels = _ops.kernels_for(device)

    nxt, prv = (r + 1) % K, (r - 1) % K
    for step in range(K):
        sends, recvs = state.buffers.exchange_lists(step)
        handle = transport.exchange(nxt, sends, prv, recvs)  # next block flies during the GEMMs
        for d, direction, c_XD, c0, c1, r0, r1 in _ring_chunks(
            state, layout, step, params, target_ids, spec
        ):
            R, C = r1 - r0, c1 - c0
            if state.plan[step][d] >= 0:
                off = state.plan[step][d] + r0 * C
                s_RC = kept[off : off + R * C].view(R, C)
            else:
                s_RC = state.s_buf[: R * C].view(R, C)
            _gemm.mm(direction.rows_BD[r0:r1], c_XD[c0:c1].T, out=s_RC)  # (R, D) x (D, C)
            params.s = s_RC.data_ptr()
            params.run_max = stats[d, 0, r0:].data_ptr()
            params.run_sum = stats[d, 1, r0:].data_ptr()
            params.z_pos = stats[d, 2, r0:].data_ptr()
            params.s_pos = stats[d, 3, r0:].data_ptr()
            params.run_max_u = stats[d, 4, r0:].data_ptr()
            params.run_sum_u = stats[d, 5, r0:].data_ptr()
            kernels.hardneg_loss_block_update(params)
        handle.wait()

    loss_dB = row_loss(stats[:, 2], stats[:, 0], stats[:, 1])  # (directions, B_r)
    loss_B = loss_dB.mean(dim=0)  # both directions averaged when symmetric
    # The gradient's softmax: ega's amplified one, else P itself (its row loss is L).
    grad_loss_dB = (
        row_loss(stats[:, 2], stats[:, 4], stats[:, 5]) if spec.mode == "ega" else loss_dB
    )
    saved = torch.stack([loss_dB, stats[:, 3], grad_loss_dB], dim=1)  # (directions, 3, B_r)
    return loss_B, saved, kept


def ring_backward(
    grad_loss: Tensor,
    inputs,
    saved: Tensor,
    kept: Tensor,
    layout: Layout,
    transport: Transport,
    spec: LossSpec,
    keep_bytes: int,
) -> tuple[Tensor, Tensor]:
    """(dq (B_r, D), dc (N_r + S_r, D)) in fp32: dc = [dT; dH; dQ from the t->q columns] of this
    rank's own block, summed over every rank by the ring. saved, kept: ring_forward's."""
    query, target_ids = inputs[0], inputs[3]
    device = query.device
    B, D = query.shape
    K, r = layout.world_size, layout.rank
    state = _ring_start(inputs, layout, spec, keep_bytes, need_grad=True)
    rows = layout.max_block_rows
    # Partial candidate gradients: computed into acc[s % 2] while acc[(s - 1) % 2] travels on
    # and the partial of this step's block arrives in `incoming`.
    acc = [torch.empty(rows, D, dtype=torch.float32, device=device) for _ in range(2)]
    incoming = torch.empty(rows, D, dtype=torch.float32, device=device)
    d_rows = [torch.zeros(B, D, dtype=torch.float32, device=device) for _ in state.directions]
    row_scale_B = _schedule.row_scale(grad_loss, B, spec.reduction)
    grad_scale = _schedule.grad_scale_of(spec, layout.total_batch)
    params = _schedule.kernel_params(device, spec, True, grad_scale)
    if state.ds_dtype is not None:
        params.ds_dtype = _gemm.DS_DTYPE_CODES[state.ds_dtype]
    kernels = _ops.kernels_for(device)

    nxt, prv = (r + 1) % K, (r - 1) % K
    for step in range(K):
        k = layout.owner(step)
        sends, recvs = state.buffers.exchange_lists(step)
        if step >= 1:
            # The partial of the previous step's block moves on to the next rank, and the partial
            # of this step's block (summed over the ranks it has visited) comes in.
            sends.append(acc[(step - 1) % 2][: layout.block_rows(layout.owner(step - 1))])
            recvs.append(incoming[: layout.block_rows(k)])
        handle = transport.exchange(nxt, sends, prv, recvs)
        g_XD = acc[step % 2][: layout.block_rows(k)]
        g_XD.zero_()
        for d, direction, c_XD, c0, c1, r0, r1 in _ring_chunks(
            state, layout, step, params, target_ids, spec
        ):
            R, C = r1 - r0, c1 - c0
            s_RC = state.s_buf[: R * C].view(R, C)
            if state.plan[step][d] >= 0:
                off = state.plan[step][d] + r0 * C
                s_RC.copy_(kept[off : off + R * C].view(R, C))
            else:
                _gemm.mm(direction.rows_BD[r0:r1], c_XD[c0:c1].T, out=s_RC)  # (R, D) x (D, C)
            params.s = s_RC.data_ptr()
            # dS: in place of S, or the operand-dtype buffer the kernel writes.
            ds_RC = s_RC
            if state.ds_buf is not None:
                ds_RC = state.ds_buf[: R * C].view(R, C)
                params.ds = ds_RC.data_ptr()
                params.ld_ds = C
            params.loss = saved[d, 0, r0:].data_ptr()
            params.s_pos = saved[d, 1, r0:].data_ptr()
            params.ega_loss = saved[d, 2, r0:].data_ptr()  # read by ega only
            if row_scale_B is not None:
                params.row_scale = row_scale_B[r0:].data_ptr()
            kernels.hardneg_loss_block_grad(params)  # ds_RC <- dL/dS
            _gemm.addmm_(d_rows[d][r0:r1], ds_RC, c_XD[c0:c1])  # (R, C) x (C, D) -> (R, D)
            _gemm.addmm_(g_XD[c0:c1], ds_RC.T, direction.rows_BD[r0:r1])  # (C, R) x (R, D)
        handle.wait()
        if step >= 1:
            g_XD += incoming[: layout.block_rows(k)]

    # The last block's partial is complete except for its owner, the next rank; ours comes in.
    last = acc[(K - 1) % 2][: layout.block_rows(layout.owner(K - 1))]
    own = incoming[: layout.block_rows(r)]
    transport.exchange(nxt, [last], prv, [own]).wait()
    dq_BD = d_rows[0]
    dc_XD = own.clone()
    if spec.symmetric:
        dc_XD[:B].add_(d_rows[1])  # t->q rows are the targets
    return dq_BD, dc_XD
