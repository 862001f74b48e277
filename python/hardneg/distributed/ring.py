"""Cross-device negatives: hardneg_loss over the concatenation of every rank's batch (design 3).

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
    s_ic = q_i . c,  z_ic as in hardneg.loss (mode, alpha, masking by ids)
    m_i, l_i <- merge over blocks of (max_c z_ic, sum_c exp(z_ic - max)),  lse_i = m_i + log l_i
    L_i = lse_i - z_{i,p(i)},   loss = sum_i L_i / B (mean, B global) or sum_i L_i
    symmetric: the same with target rows and query columns, loss = (L_q->t + L_t->q) / 2
Backward (g = grad_output of this rank, scaling this rank's rows):
    dS_ic = g * (Pbar_ic - Y_ic) / tau / B
    dQ_r  = sum_k dS_rk . C_k               (accumulated locally)
    dC_k  = sum_r dS_rk^T . Q_r             (partials travel the ring back to the owner of k)

Saved for backward: lse and s_pos per row and direction (2 B_r floats each: all the backward needs
to rebuild P from S), and the logits of as many blocks as fit `keep_logits_bytes` (each kept block
saves one GEMM in backward; the others are recomputed, so memory stays O(chunk) by default).

Scaling for trainers: the loss is the global loss on every rank and each rank already receives
the full d(global loss)/d(its inputs). An engine that AVERAGES parameter gradients over K ranks
(DDP, DeepSpeed) divides that by K: multiply the loss by K (the world size) before backward.
Each rank's grad_output scales its own queries' rows, so with equal grad_outputs (the usual case)
every rank gets exactly the gradient of grad_output * loss.

Strategies: "ring" (K steps, double-buffered: the GEMM and the fused update run on the block in
hand while the next block is in flight; the backward ring carries partial candidate gradients back
to their owners, a reduce-scatter done by the ring), "allgather" (one all-gather, the row-chunked
single-process schedule with the loss and gradient in one pass, a reduce-scatter of candidate
gradients in backward), "auto" (hardneg.costmodel picks the faster for this size and link).

Legend: K ranks, r this rank, k a block's owner, B_r local rows, N_k = B_k (1 + M_k) candidates of
rank k, S_k = B_k query columns of rank k when symmetric (0 otherwise), D dim, R rows in a chunk.
A block is the (N_k + S_k, D) matrix [T_k; H_k; Q_k] with ids [t_ids_k; h_ids_k].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from hardneg import _ops
from hardneg._constants import MODES, REDUCTIONS
from hardneg.distributed import costmodel
from hardneg.distributed.transport import make_transport
from hardneg.loss import _check_finite, _opts, _row_pass, default_chunk_size

# Logits of whole blocks kept between forward and backward at most: each kept block saves the
# recompute GEMM (2 B_r N_k D flops) for a copy of B_r N_k floats. 64 MiB keeps every block at
# small per-rank batches, where recompute would be noticeable next to the transfer, and none at
# large ones, where the ring's point is O(chunk) memory.
KEEP_LOGITS_BYTES = 64 * 2**20

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_GROUPS: dict[str, dist.ProcessGroup] = {}


def _register_group(group: dist.ProcessGroup) -> str:
    """Custom ops take no process group argument: they carry its name and look it up here."""
    name = group.group_name
    _GROUPS[name] = group
    return name


def _group(name: str) -> dist.ProcessGroup:
    return _GROUPS[name]


# ---------------------------------------------------------------------------------------------
# Sizes of every rank, exchanged once before any loop
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Block sizes of every rank, identical on all ranks."""

    rank: int
    batch: tuple[int, ...]  # B_k
    negatives: tuple[int, ...]  # M_k
    symmetric: bool

    @property
    def world_size(self) -> int:
        return len(self.batch)

    def cands(self, k: int) -> int:  # N_k
        return self.batch[k] * (1 + self.negatives[k])

    def block_rows(self, k: int) -> int:  # N_k + S_k
        return self.cands(k) + (self.batch[k] if self.symmetric else 0)

    @property
    def max_block_rows(self) -> int:
        return max(self.block_rows(k) for k in range(self.world_size))

    @property
    def total_batch(self) -> int:
        return sum(self.batch)

    def owner(self, step: int) -> int:
        """Owner of the block rank `rank` holds at ring step `step`."""
        return (self.rank - step) % self.world_size


def _layout(sizes: list[int], rank: int, symmetric: bool) -> _Layout:
    return _Layout(rank, tuple(sizes[0::2]), tuple(sizes[1::2]), symmetric)


def exchange_sizes(
    group: dist.ProcessGroup,
    query: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    opts: dict,
) -> list[int]:
    """All-gathers every rank's (B, M) and checks that the ranks agree on D, dtype, ids and the
    loss options (a mismatch would silently compute a different loss per rank). Returns
    [B_0, M_0, B_1, M_1, ...]. One host synchronisation, before any loop."""
    B, D = query.shape
    M = hard_negatives.shape[1] if hard_negatives is not None else 0
    mine = [
        B,
        M,
        D,
        _DTYPES.index(query.dtype),
        target_ids is not None,
        MODES.index(opts["mode"]),
        opts["symmetric"],
        REDUCTIONS.index(opts["reduction"]),
        opts["temperature"],
        opts["alpha"],
        opts["ega_beta"],
        opts["ega_margin"],
    ]
    K = dist.get_world_size(group)
    meta = torch.tensor(mine, dtype=torch.float64, device=query.device)
    gathered = torch.empty(K, len(mine), dtype=torch.float64, device=query.device)
    _all_gather_single(gathered.view(-1), meta, group)
    rows = gathered.cpu().tolist()
    names = ("D", "dtype", "target_ids given", "mode", "symmetric", "reduction")
    names += ("temperature", "alpha", "ega_beta", "ega_margin")
    rank = dist.get_rank(group)
    for k, row in enumerate(rows):
        for name, theirs, ours in zip(names, row[2:], rows[rank][2:], strict=True):
            if theirs != ours:
                raise ValueError(
                    f"rank {k} of the group passes {name} = {_describe(name, theirs)} but rank "
                    f"{rank} passes {_describe(name, ours)}: every rank must agree"
                )
    return [int(v) for row in rows for v in row[:2]]


def _describe(name: str, value: float):
    if name == "dtype":
        return _DTYPES[int(value)]
    if name == "mode":
        return MODES[int(value)]
    if name == "reduction":
        return REDUCTIONS[int(value)]
    return value


def _all_gather_single(out: Tensor, inp: Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _reduce_scatter_single(out: Tensor, inp: Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def _own_block(query, target, hard_negatives, target_ids, hard_negative_ids, symmetric):
    """This rank's block [T; H; Q] (input dtype) and its ids [t_ids; h_ids] (None without ids)."""
    D = query.shape[1]
    parts = [target]
    if hard_negatives is not None:
        parts.append(hard_negatives.reshape(-1, D))
    if symmetric:
        parts.append(query)
    emb = torch.cat(parts).contiguous()
    ids = None
    if target_ids is not None:
        ids = target_ids
        if hard_negative_ids is not None:
            ids = torch.cat([target_ids, hard_negative_ids.reshape(-1)])
        ids = ids.contiguous()
    return emb, ids


def _grad_scale(layout: _Layout, opts: dict) -> float:
    """dL/dS scale of one row: 1/B (global B) for mean, 1/2 per direction when symmetric."""
    scale = 1.0 / layout.total_batch if opts["reduction"] == "mean" else 1.0
    return scale * (0.5 if opts["symmetric"] else 1.0)


def _row_scale(grad_loss: Tensor | None, B: int, reduction: str) -> Tensor | None:
    if grad_loss is None:
        return None
    if reduction == "none":
        return grad_loss.float().contiguous()
    return grad_loss.float().expand(B).contiguous()


def _finish_loss(loss_B: Tensor, reduction: str, layout: _Layout, group) -> Tensor:
    """The global reduced loss on every rank (one all-reduce of a scalar), or the local slice."""
    if reduction == "none":
        return loss_B
    total = loss_B.sum().reshape(1)
    dist.all_reduce(total, group=group)
    return total[0] / layout.total_batch if reduction == "mean" else total[0]


def _kernel_params(device: torch.device, opts: dict, need_grad: bool, grad_scale: float):
    params = _ops.new_params(device)
    params.mode = opts["mode_code"]
    params.inv_tau = 1.0 / opts["temperature"]
    params.alpha = opts["alpha"]
    params.ega_beta = opts["ega_beta"]
    params.ega_margin = opts["ega_margin"]
    params.need_grad = need_grad
    params.grad_scale = grad_scale
    return params


# ---------------------------------------------------------------------------------------------
# The ring
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pass:
    """One direction of the loss as the ring sees it: local rows against one column range of
    every block. q->t: query rows, columns [0, N_k) = [T_k; H_k]. t->q: target rows, columns
    [N_k, N_k + B_k) = Q_k, ids t_ids_k (a query carries its positive's id)."""

    rows_BD: Tensor  # fp32, (B_r, D)
    first_col: bool  # True: columns [0, N_k); False: [N_k, N_k + B_k)

    def cols(self, layout: _Layout, k: int) -> tuple[int, int]:
        if self.first_col:
            return 0, layout.cands(k)
        return layout.cands(k), layout.cands(k) + layout.batch[k]

    def col_ids(self, ids: Tensor | None, layout: _Layout, k: int) -> Tensor | None:
        if ids is None:
            return None
        return ids[: layout.cands(k)] if self.first_col else ids[: layout.batch[k]]


def _keep_plan(layout: _Layout, num_passes: int, keep_bytes: int) -> tuple[list[list[int]], int]:
    """(plan, floats): the offset (in floats) of each kept block's logits in the saved buffer, -1
    when recomputed, indexed [step][pass], and the buffer's size. Blocks are kept in ring order
    while they fit keep_bytes."""
    B = layout.batch[layout.rank]
    used = 0
    plan = []
    for step in range(layout.world_size):
        k = layout.owner(step)
        row = []
        for p in range(num_passes):
            cols = layout.cands(k) if p == 0 else layout.batch[k]
            size = B * cols
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

    def __init__(self, layout: _Layout, D: int, dtype, device, with_ids: bool) -> None:
        rows = layout.max_block_rows
        self.layout = layout
        self.emb = [torch.empty(rows, D, dtype=dtype, device=device) for _ in range(2)]
        n = max(layout.cands(k) for k in range(layout.world_size))
        self.ids = (
            [torch.empty(n, dtype=torch.int64, device=device) for _ in range(2)]
            if (with_ids)
            else None
        )

    def block(self, slot: int, k: int) -> tuple[Tensor, Tensor | None]:
        emb = self.emb[slot][: self.layout.block_rows(k)]
        ids = self.ids[slot][: self.layout.cands(k)] if self.ids is not None else None
        return emb, ids


def _send_recv_lists(buffers: _RingBuffers, step: int, layout: _Layout):
    """(sends, recvs) of the block exchange posted at `step`: the block in hand goes to the next
    rank, the block for step + 1 comes from the previous one. Empty on the last step."""
    if step == layout.world_size - 1:
        return [], []
    k, k_next = layout.owner(step), layout.owner(step + 1)
    emb, ids = buffers.block(step % 2, k)
    emb_next, ids_next = buffers.block((step + 1) % 2, k_next)
    sends = [emb] + ([ids] if ids is not None else [])
    recvs = [emb_next] + ([ids_next] if ids_next is not None else [])
    return sends, recvs


def _block_chunks(B: int, cols: int, chunk_size: int | None):
    R = min(B, chunk_size or default_chunk_size(cols))
    for r0 in range(0, B, R):
        yield r0, min(B, r0 + R)


@dataclass(frozen=True)
class _RingState:
    """What both rings start from: the passes (q->t, and t->q when symmetric), the double buffers
    with this rank's own block in slot 0, the keep plan and a scratch chunk of S."""

    passes: list[_Pass]
    buffers: _RingBuffers
    plan: list[list[int]]  # _keep_plan's [step][pass] offsets
    kept_floats: int
    s_buf: Tensor  # fp32, (R * max_block_rows,)


def _ring_start(
    query, target, hard_negatives, target_ids, hard_negative_ids, layout, opts, keep
) -> _RingState:
    B, D = query.shape
    symmetric = opts["symmetric"]
    passes = [_Pass(query.float().contiguous(), True)]
    if symmetric:
        passes.append(_Pass(target.float().contiguous(), False))
    own_emb, own_ids = _own_block(
        query, target, hard_negatives, target_ids, hard_negative_ids, symmetric
    )
    buffers = _RingBuffers(layout, D, query.dtype, query.device, own_ids is not None)
    emb, ids = buffers.block(0, layout.rank)
    emb.copy_(own_emb)
    if ids is not None:
        ids.copy_(own_ids)
    plan, kept_floats = _keep_plan(layout, len(passes), keep)
    cols = layout.max_block_rows
    s_buf = torch.empty(
        min(B, opts["chunk_size"] or default_chunk_size(cols)) * cols,
        dtype=torch.float32,
        device=query.device,
    )
    return _RingState(passes, buffers, plan, kept_floats, s_buf)


def _ring_chunks(state: _RingState, layout: _Layout, step: int, params, target_ids, chunk_size):
    """The chunks of the block in hand at `step`, in the order both rings visit them: yields
    (pass index, pass, c_XD, c0, c1, r0, r1) for local rows [r0, r1) against block columns
    [c0, c1), with the kernel parameters that depend only on those (columns, their ids, rows,
    the positive's offset, the rows' ids) already set. c_XD: the block in fp32."""
    k = layout.owner(step)
    emb, ids = state.buffers.block(step % 2, k)
    c_XD = emb.float()
    B = layout.batch[layout.rank]
    for p, ps in enumerate(state.passes):
        c0, c1 = ps.cols(layout, k)
        cols = c1 - c0
        col_ids = ps.col_ids(ids, layout, k)
        params.cols = cols
        params.ld_s = cols
        params.col_ids = col_ids.data_ptr() if col_ids is not None else 0
        for r0, r1 in _block_chunks(B, cols, chunk_size):
            params.rows = r1 - r0
            # The positive of local row i is column i of this rank's own block; elsewhere
            # pos_offset = -(rows) puts every row's positive before column 0, i.e. absent.
            params.pos_offset = r0 if k == layout.rank else -(r1 - r0)
            if target_ids is not None:
                params.row_ids = target_ids[r0:].data_ptr()
            yield p, ps, c_XD, c0, c1, r0, r1


def _ring_forward(
    query, target, hard_negatives, target_ids, hard_negative_ids, layout, transport, opts, keep
):
    """Loss per local row (B_r,), the per-row statistics (passes, 2, B_r) = (lse, s_pos) that
    backward needs, and the kept logits (flat fp32)."""
    device = query.device
    B = query.shape[0]
    K, r = layout.world_size, layout.rank
    state = _ring_start(
        query, target, hard_negatives, target_ids, hard_negative_ids, layout, opts, keep
    )
    kept = torch.empty(state.kept_floats, dtype=torch.float32, device=device)
    # Per pass: run_max, run_sum, z_pos, s_pos (B_r each).
    stats = torch.empty(len(state.passes), 4, B, dtype=torch.float32, device=device)
    stats[:, 0] = -math.inf
    stats[:, 1] = 0.0
    params = _kernel_params(device, opts, False, 1.0)

    nxt, prv = (r + 1) % K, (r - 1) % K
    for step in range(K):
        sends, recvs = _send_recv_lists(state.buffers, step, layout)
        handle = transport.exchange(nxt, sends, prv, recvs)  # next block flies during the GEMMs
        chunks = _ring_chunks(state, layout, step, params, target_ids, opts["chunk_size"])
        for p, ps, c_XD, c0, c1, r0, r1 in chunks:
            R, C = r1 - r0, c1 - c0
            if state.plan[step][p] >= 0:
                off = state.plan[step][p] + r0 * C
                s_RC = kept[off : off + R * C].view(R, C)
            else:
                s_RC = state.s_buf[: R * C].view(R, C)
            torch.mm(ps.rows_BD[r0:r1], c_XD[c0:c1].T, out=s_RC)  # (R, D) x (D, C) -> (R, C)
            params.s = s_RC.data_ptr()
            params.run_max = stats[p, 0, r0:].data_ptr()
            params.run_sum = stats[p, 1, r0:].data_ptr()
            params.z_pos = stats[p, 2, r0:].data_ptr()
            params.s_pos = stats[p, 3, r0:].data_ptr()
            _ops.kernels_for(device).hardneg_loss_block_update(params)
        handle.wait()

    lse = stats[:, 0] + torch.log(stats[:, 1])  # (passes, B_r)
    loss_B = (lse - stats[:, 2]).mean(dim=0)  # both directions averaged when symmetric
    saved = torch.stack([lse, stats[:, 3]], dim=1)  # (passes, 2, B_r): lse, s_pos
    return loss_B, saved, kept


def _ring_backward(
    grad_loss,
    query,
    target,
    hard_negatives,
    target_ids,
    hard_negative_ids,
    saved,
    kept,
    layout,
    transport,
    opts,
    keep,
):
    """(dq (B_r, D), dc (N_r + S_r, D)) in fp32: dc = [dT; dH; dQ from the t->q columns] of this
    rank's own block, summed over every rank by the ring."""
    device = query.device
    B, D = query.shape
    K, r = layout.world_size, layout.rank
    state = _ring_start(
        query, target, hard_negatives, target_ids, hard_negative_ids, layout, opts, keep
    )
    rows = layout.max_block_rows
    # Partial candidate gradients: computed into acc[s % 2] while acc[(s - 1) % 2] travels on
    # and the partial of this step's block arrives in `incoming`.
    acc = [torch.empty(rows, D, dtype=torch.float32, device=device) for _ in range(2)]
    incoming = torch.empty(rows, D, dtype=torch.float32, device=device)
    d_rows = [torch.zeros(B, D, dtype=torch.float32, device=device) for _ in state.passes]
    row_scale_B = _row_scale(grad_loss, B, opts["reduction"])
    params = _kernel_params(device, opts, True, _grad_scale(layout, opts))

    nxt, prv = (r + 1) % K, (r - 1) % K
    for step in range(K):
        k = layout.owner(step)
        sends, recvs = _send_recv_lists(state.buffers, step, layout)
        if step >= 1:
            # The partial of the previous step's block moves on to the next rank, and the partial
            # of this step's block (summed over the ranks it has visited) comes in.
            sends.append(acc[(step - 1) % 2][: layout.block_rows(layout.owner(step - 1))])
            recvs.append(incoming[: layout.block_rows(k)])
        handle = transport.exchange(nxt, sends, prv, recvs)
        g_XD = acc[step % 2][: layout.block_rows(k)]
        g_XD.zero_()
        chunks = _ring_chunks(state, layout, step, params, target_ids, opts["chunk_size"])
        for p, ps, c_XD, c0, c1, r0, r1 in chunks:
            R, C = r1 - r0, c1 - c0
            s_RC = state.s_buf[: R * C].view(R, C)
            if state.plan[step][p] >= 0:
                off = state.plan[step][p] + r0 * C
                s_RC.copy_(kept[off : off + R * C].view(R, C))
            else:
                torch.mm(ps.rows_BD[r0:r1], c_XD[c0:c1].T, out=s_RC)  # (R, D) x (D, C)
            params.s = s_RC.data_ptr()
            params.lse = saved[p, 0, r0:].data_ptr()
            params.s_pos = saved[p, 1, r0:].data_ptr()
            if row_scale_B is not None:
                params.row_scale = row_scale_B[r0:].data_ptr()
            _ops.kernels_for(device).hardneg_loss_block_grad(params)  # s_RC <- dL/dS
            d_rows[p][r0:r1].addmm_(s_RC, c_XD[c0:c1])  # (R, C) x (C, D) -> (R, D)
            g_XD[c0:c1].addmm_(s_RC.T, ps.rows_BD[r0:r1])  # (C, R) x (R, D) -> (C, D)
        handle.wait()
        if step >= 1:
            g_XD += incoming[: layout.block_rows(k)]

    # The last block's partial is complete except for its owner, the next rank; ours comes in.
    last = acc[(K - 1) % 2][: layout.block_rows(layout.owner(K - 1))]
    own = incoming[: layout.block_rows(r)]
    transport.exchange(nxt, [last], prv, [own]).wait()
    dq_BD = d_rows[0]
    dc_XD = own.clone()
    if opts["symmetric"]:
        dc_XD[:B].add_(d_rows[1])  # t->q rows are the targets
    return dq_BD, dc_XD


# ---------------------------------------------------------------------------------------------
# The all-gather strategy
# ---------------------------------------------------------------------------------------------


def _gather_blocks(own_emb, own_ids, layout, group):
    """Every rank's block, padded to the largest: (K, X, D) and ids (K, Nmax) (None without)."""
    K, X = layout.world_size, layout.max_block_rows
    D = own_emb.shape[1]
    pad = own_emb.new_zeros(X, D)
    pad[: own_emb.shape[0]] = own_emb
    emb_KXD = own_emb.new_empty(K, X, D)
    _all_gather_single(emb_KXD.view(K * X, D), pad, group)
    ids_KN = None
    if own_ids is not None:
        n = max(layout.cands(k) for k in range(K))
        pad_ids = own_ids.new_zeros(n)
        pad_ids[: own_ids.shape[0]] = own_ids
        ids_KN = own_ids.new_empty(K, n)
        _all_gather_single(ids_KN.view(-1), pad_ids, group)
    return emb_KXD, ids_KN


def _own_first(layout: _Layout) -> list[int]:
    """Rank order with this rank first: candidates are laid out own block first, so the positive
    of local row i is candidate i (the loss does not depend on candidate order)."""
    K, r = layout.world_size, layout.rank
    return [r] + [k for k in range(K) if k != r]


def _allgather_compute(
    query,
    target,
    hard_negatives,
    target_ids,
    hard_negative_ids,
    layout,
    group,
    opts,
    need_grad,
    grad_loss,
):
    """Loss per local row and, when need_grad, dq (B_r, D) and the padded candidate gradients
    (K, X, D) of this rank's rows, fp32, ready for the reduce-scatter."""
    B, D = query.shape
    symmetric = opts["symmetric"]
    own_emb, own_ids = _own_block(
        query, target, hard_negatives, target_ids, hard_negative_ids, symmetric
    )
    emb_KXD, ids_KN = _gather_blocks(own_emb, own_ids, layout, group)
    order = _own_first(layout)
    c_ND = torch.cat([emb_KXD[k, : layout.cands(k)] for k in order]).float()
    ids_N = torch.cat([ids_KN[k, : layout.cands(k)] for k in order]) if ids_KN is not None else None
    row_scale_B = _row_scale(grad_loss, B, opts["reduction"])
    grad_scale = _grad_scale(layout, opts)
    q_BD = query.float().contiguous()
    dq_BD = torch.zeros_like(q_BD) if need_grad else None
    dc_ND = torch.zeros_like(c_ND) if need_grad else None
    loss_B = torch.empty(B, dtype=torch.float32, device=query.device)
    chunk = opts["chunk_size"] or default_chunk_size(c_ND.shape[0])
    _row_pass(
        q_BD, c_ND, target_ids, ids_N, opts, chunk, loss_B, grad_scale, row_scale_B, dq_BD, dc_ND
    )
    if symmetric:
        qc_BD = torch.cat(
            [emb_KXD[k, layout.cands(k) : layout.block_rows(k)] for k in order]
        ).float()
        qids_B = (
            torch.cat([ids_KN[k, : layout.batch[k]] for k in order]) if ids_KN is not None else None
        )
        t_BD = target.float().contiguous()
        dt_BD = torch.zeros_like(t_BD) if need_grad else None
        dqc_BD = torch.zeros_like(qc_BD) if need_grad else None
        loss_t_B = torch.empty_like(loss_B)
        chunk = opts["chunk_size"] or default_chunk_size(qc_BD.shape[0])
        _row_pass(
            t_BD,
            qc_BD,
            target_ids,
            qids_B,
            opts,
            chunk,
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
        if symmetric:
            dc_KXD[k, n : n + b] = dqc_BD[q0 : q0 + b]
        n0, q0 = n0 + n, q0 + b
    if symmetric:
        dc_KXD[layout.rank, :B] += dt_BD  # target rows of the t->q direction
    return loss_B, dq_BD, dc_KXD


def _allgather_grads(dq_BD, dc_KXD, layout, group):
    """Reduce-scatter of the candidate gradients: (dq, dc of this rank's own block) in fp32."""
    K, X, D = dc_KXD.shape
    own = dc_KXD.new_empty(X, D)
    _reduce_scatter_single(own, dc_KXD.view(K * X, D), group)
    return dq_BD, own[: layout.block_rows(layout.rank)]


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


def _split_grads(dq_BD, dc_XD, query, target, hard_negatives, symmetric):
    """(dq, dt, dh) in the input dtypes from dq (B, D) and the own block's dc = [dt; dh; dq']."""
    B, D = query.shape
    N = B * (1 + (hard_negatives.shape[1] if hard_negatives is not None else 0))
    dq = dq_BD + dc_XD[N : N + B] if symmetric else dq_BD
    dh = (
        dc_XD[B:N].reshape(hard_negatives.shape).to(hard_negatives.dtype)
        if hard_negatives is not None
        else query.new_empty(0)
    )
    return dq.to(query.dtype), dc_XD[:B].to(target.dtype).clone(), dh.clone()


def _unpack(group_name: str, sizes: list[int], strategy: str, *loss_args):
    """(group, layout, opts) from an op's arguments; loss_args are _opts' in its order."""
    if strategy not in ("ring", "allgather"):
        raise ValueError(f"strategy must be 'ring' or 'allgather', got {strategy!r}")
    group = _group(group_name)
    opts = _opts(*loss_args)
    return group, _layout(sizes, dist.get_rank(group), opts["symmetric"]), opts


@torch.library.custom_op("hardneg::hardneg_loss_group", mutates_args=())
def _group_op(
    query: Tensor,
    target: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    group_name: str,
    sizes: list[int],
    strategy: str,
    transport: str,
    keep_logits_bytes: int,
    mode: str,
    temperature: float,
    alpha: float,
    ega_beta: float,
    ega_margin: float,
    symmetric: bool,
    reduction: str,
    chunk_size: int,
    check_finite: bool,
    fuse_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, a, b), with (a, b) what backward reads, all fp32:
    ring: a = (passes, 2, B_r) lse and s_pos per row, b = the kept logits (flat);
    allgather with fuse_grad: this rank's rows' contributions at grad_output = 1, a = dq (B_r, D)
    and b = the padded candidate gradients (K, X, D) of every block, which backward scales and
    reduce-scatters to the block owners; empty without fuse_grad (backward recomputes).
    transport and keep_logits_bytes are the ring's options, fuse_grad the all-gather's: the other
    strategy ignores them."""
    group, layout, opts = _unpack(
        group_name,
        sizes,
        strategy,
        mode,
        temperature,
        alpha,
        ega_beta,
        ega_margin,
        symmetric,
        reduction,
        chunk_size,
        check_finite,
    )
    if strategy == "allgather" and fuse_grad and reduction == "none":
        # Backward scales fused gradients by one number: a per-row loss cannot have them.
        raise ValueError("fuse_grad=True needs reduction 'mean' or 'sum', got reduction 'none'")
    if check_finite:
        _check_finite({"query": query, "target": target, "hard_negatives": hard_negatives})
    inputs = (query, target, hard_negatives, target_ids, hard_negative_ids)
    if strategy == "ring":
        tr = make_transport(group, query.device, transport)
        loss_B, a, b = _ring_forward(*inputs, layout, tr, opts, keep_logits_bytes)
    else:
        loss_B, a, b = _allgather_compute(*inputs, layout, group, opts, fuse_grad, None)
        if not fuse_grad:
            a, b = (query.new_empty(0, dtype=torch.float32) for _ in range(2))
    return _finish_loss(loss_B, reduction, layout, group), a, b


@_group_op.register_fake
def _(query, target, hard_negatives, target_ids, hard_negative_ids, *rest):
    o = dict(zip(_OPT_NAMES, rest[: len(_OPT_NAMES)], strict=True))
    fuse_grad = rest[-1]
    B, D = query.shape
    layout = _layout(o["sizes"], dist.get_rank(_group(o["group_name"])), o["symmetric"])
    loss = query.new_empty((B,) if o["reduction"] == "none" else (), dtype=torch.float32)
    if o["strategy"] == "ring":
        passes = 2 if o["symmetric"] else 1
        _, kept_floats = _keep_plan(layout, passes, o["keep_logits_bytes"])
        a = query.new_empty((passes, 2, B), dtype=torch.float32)
        return loss, a, query.new_empty(kept_floats, dtype=torch.float32)
    if not fuse_grad:
        return loss, *(query.new_empty(0, dtype=torch.float32) for _ in range(2))
    a = query.new_empty((B, D), dtype=torch.float32)
    K, X = layout.world_size, layout.max_block_rows
    return loss, a, query.new_empty((K, X, D), dtype=torch.float32)


@torch.library.custom_op("hardneg::hardneg_loss_group_backward", mutates_args=())
def _group_backward_op(
    grad_loss: Tensor,
    query: Tensor,
    target: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    a: Tensor,
    b: Tensor,
    group_name: str,
    sizes: list[int],
    strategy: str,
    transport: str,
    keep_logits_bytes: int,
    mode: str,
    temperature: float,
    alpha: float,
    ega_beta: float,
    ega_margin: float,
    symmetric: bool,
    reduction: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dt, dh) of this rank's inputs (dh empty without hard negatives), from the forward's
    (a, b): the backward ring, or the all-gather's fused gradients scaled by grad_loss (a, b
    non-empty) or recomputed (reduction "none"), then reduce-scattered to their owners."""
    group, layout, opts = _unpack(
        group_name,
        sizes,
        strategy,
        mode,
        temperature,
        alpha,
        ega_beta,
        ega_margin,
        symmetric,
        reduction,
        chunk_size,
        False,
    )
    inputs = (query, target, hard_negatives, target_ids, hard_negative_ids)
    if strategy == "ring":
        tr = make_transport(group, query.device, transport)
        dq_BD, dc_XD = _ring_backward(grad_loss, *inputs, a, b, layout, tr, opts, keep_logits_bytes)
    else:
        if a.numel() > 0:
            dq_BD, dc_KXD = a * grad_loss, b * grad_loss
        else:
            _, dq_BD, dc_KXD = _allgather_compute(*inputs, layout, group, opts, True, grad_loss)
        dq_BD, dc_XD = _allgather_grads(dq_BD, dc_KXD, layout, group)
    return _split_grads(dq_BD, dc_XD, query, target, hard_negatives, symmetric)


@_group_backward_op.register_fake
def _(grad_loss, query, target, hard_negatives, *rest):
    dh = torch.empty_like(hard_negatives) if hard_negatives is not None else query.new_empty(0)
    return torch.empty_like(query), torch.empty_like(target), dh


# The forward's options that backward takes too, in both ops' order (inputs[5:18] of the forward).
_OPT_NAMES = (
    "group_name",
    "sizes",
    "strategy",
    "transport",
    "keep_logits_bytes",
    "mode",
    "temperature",
    "alpha",
    "ega_beta",
    "ega_margin",
    "symmetric",
    "reduction",
    "chunk_size",
)


def _setup_context(ctx, inputs, output):
    query, target, hard_negatives, target_ids, hard_negative_ids = inputs[:5]
    ctx.opts = inputs[5 : 5 + len(_OPT_NAMES)]
    ctx.num_inputs = len(inputs)
    ctx.has_hard_negatives = hard_negatives is not None
    ctx.save_for_backward(
        query, target, hard_negatives, target_ids, hard_negative_ids, output[1], output[2]
    )
    ctx.mark_non_differentiable(output[1], output[2])


def _autograd_backward(ctx, grad_loss, *_unused):
    dq, dt, dh = _group_backward_op(grad_loss, *ctx.saved_tensors, *ctx.opts)
    return (dq, dt, dh if ctx.has_hard_negatives else None) + (None,) * (ctx.num_inputs - 3)


_group_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Entry point (called by hardneg.fused_hardneg_loss for a group of more than one rank)
# ---------------------------------------------------------------------------------------------


def ring_hardneg_loss(
    query: Tensor,
    target: Tensor,
    *,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    mode: str,
    temperature: float,
    alpha: float,
    ega_beta: float,
    ega_margin: float,
    symmetric: bool,
    reduction: str,
    group: dist.ProcessGroup,
    strategy: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = True,
    transport: str = "auto",
    keep_logits_bytes: int = KEEP_LOGITS_BYTES,
) -> Tensor:
    """hardneg_loss over the global batch of `group` (see the module docstring for the per-rank
    shapes, equations and the loss scaling a DDP / DeepSpeed trainer needs). Arguments are those
    of hardneg.fused_hardneg_loss, already validated per rank; this checks that the ranks agree.

    strategy: "ring", "allgather" or "auto" (hardneg.costmodel.choose_strategy on the largest
    per-rank batch). transport (ring only): "torch" (torch.distributed), "nccl" (hardneg's NCCL
    communicator, CUDA) or "auto" (nccl for CUDA tensors when built, else torch).
    keep_logits_bytes: logits kept between the forward and backward rings, at most.
    """
    if keep_logits_bytes < 0:
        raise ValueError(f"keep_logits_bytes must be >= 0, got {keep_logits_bytes}")
    opts = _opts(
        mode,
        float(temperature),
        float(alpha),
        float(ega_beta),
        float(ega_margin),
        bool(symmetric),
        reduction,
        int(chunk_size or 0),
        bool(check_finite),
    )
    name = _register_group(group)
    # The kernels read ids by pointer, row by row: they must be dense.
    target_ids = target_ids.contiguous() if target_ids is not None else None
    hard_negative_ids = hard_negative_ids.contiguous() if hard_negative_ids is not None else None
    sizes = exchange_sizes(group, query, hard_negatives, target_ids, opts)
    layout = _layout(sizes, dist.get_rank(group), symmetric)
    if strategy == "auto":
        strategy = costmodel.choose_strategy(
            batch=max(layout.batch),
            dim=query.shape[1],
            world_size=layout.world_size,
            negatives=max(layout.negatives),
            dtype=query.dtype,
            link=costmodel.default_link(query.device),
            symmetric=bool(symmetric),
        )
    # fuse_grad: the all-gather computes the gradient with the loss when one will be needed.
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, target, hard_negatives)
    )
    loss, _, _ = _group_op(
        query,
        target,
        hard_negatives,
        target_ids,
        hard_negative_ids,
        name,
        sizes,
        strategy,
        transport,
        int(keep_logits_bytes),
        opts["mode"],
        opts["temperature"],
        opts["alpha"],
        opts["ega_beta"],
        opts["ega_margin"],
        opts["symmetric"],
        reduction,
        opts["chunk_size"],
        opts["check_finite"],
        strategy == "allgather" and wants_grad and reduction != "none",
    )
    return loss
