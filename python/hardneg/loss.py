"""hardneg_loss: the fused hard-negative contrastive loss as a PyTorch op.

Row schedule (design section 2): queries are cut into row chunks; each chunk sees its whole
candidate row, so one pass over the chunk gives the loss and, when a gradient will be needed, dS in
place, dQ and dC (3 GEMMs, the floor). The B x N logits matrix never exists: extra memory is
O(chunk x N) plus fp32 copies of the inputs and of their gradients.

Legend: B queries, M hard negatives per query, N = B + B*M candidates, D embedding dim,
R rows in a chunk. Suffixes name shapes: q_BD, c_ND, s_RN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardneg import _ops
from hardneg._constants import (
    ALPHA,
    EGA_BETA,
    EGA_MARGIN,
    MODES,
    REDUCTIONS,
    STRATEGIES,
    TEMPERATURE,
)

# A chunk of S holds at most this many bytes unless one row alone is larger: big enough that the
# chunk GEMMs run at full speed and the rank-R updates of dC stay few, small next to the inputs.
# Measured on CPU (benchmarks/results/bench_loss_*): 256 to 1024 rows within 7% of each other,
# 64 rows 1.15-1.25x and 16 rows 1.5-2x slower.
CHUNK_BYTES = 32 * 2**20
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def default_chunk_size(num_candidates: int) -> int:
    """Rows per chunk of S for N candidates: CHUNK_BYTES of fp32, at least 16 rows."""
    return max(16, CHUNK_BYTES // (4 * max(num_candidates, 1)))


# ---------------------------------------------------------------------------------------------
# The computation (device generic: torch GEMMs around the hardneg kernels of _C / _C_cuda)
# ---------------------------------------------------------------------------------------------


def _row_pass(
    rows_BD: Tensor,
    cands_ND: Tensor | tuple[Tensor, ...],
    row_ids_B: Tensor | None,
    col_ids_N: Tensor | None,
    opts: dict,
    chunk_size: int,
    loss_B: Tensor,
    grad_scale: float,
    row_scale_B: Tensor | None,
    d_rows_BD: Tensor | None,
    d_cands_ND: Tensor | tuple[Tensor, ...] | None,
    *,
    accumulate: bool = True,
) -> None:
    """One direction of the loss: row i's positive is candidate i. Writes loss_B and, when
    d_rows_BD is given, accumulates dL/drows and dL/dcands scaled by grad_scale * row_scale.

    cands_ND may be a tuple of column blocks (N_k, D) standing for their concatenation, with
    d_cands_ND the matching tuple: [target; hard negatives] then needs no concatenated copy (the
    GEMMs write and read column slices of S in place). accumulate=False overwrites d_rows_BD and
    d_cands_ND instead of adding to them, so they need no zero fill.
    """
    blocks = (cands_ND,) if isinstance(cands_ND, Tensor) else tuple(cands_ND)
    need_grad = d_rows_BD is not None
    d_blocks = (
        ((d_cands_ND,) if isinstance(d_cands_ND, Tensor) else tuple(d_cands_ND))
        if need_grad
        else ()
    )
    spans, N = [], 0
    for c in blocks:
        spans.append((N, N + c.shape[0]))
        N += c.shape[0]
    B = rows_BD.shape[0]
    R = min(chunk_size, B)
    device = rows_BD.device
    s_buf = torch.empty(R * N, dtype=torch.float32, device=device)
    stats_3B = torch.empty(3, B, dtype=torch.float32, device=device)  # lse, z_pos, s_pos
    params = _ops.new_params(device)
    kernels = _ops.kernels_for(device)
    params.mode = opts["mode_code"]
    params.inv_tau = 1.0 / opts["temperature"]
    params.alpha = opts["alpha"]
    params.ega_beta = opts["ega_beta"]
    params.ega_margin = opts["ega_margin"]
    params.cols = N
    params.ld_s = N
    params.need_grad = need_grad
    params.grad_scale = grad_scale
    if col_ids_N is not None:
        params.col_ids = col_ids_N.data_ptr()
    for r0 in range(0, B, R):
        r1 = min(B, r0 + R)
        rows_RD = rows_BD[r0:r1]
        s_RN = s_buf[: (r1 - r0) * N].view(r1 - r0, N)
        for c_KD, (c0, c1) in zip(blocks, spans, strict=True):
            torch.mm(rows_RD, c_KD.T, out=s_RN[:, c0:c1])  # (R, D) x (D, K) -> (R, K)
        params.s = s_RN.data_ptr()
        params.rows = r1 - r0
        params.pos_offset = r0
        params.lse = stats_3B[0, r0:].data_ptr()
        params.z_pos = stats_3B[1, r0:].data_ptr()
        params.s_pos = stats_3B[2, r0:].data_ptr()
        params.loss = loss_B[r0:].data_ptr()
        if row_ids_B is not None:
            params.row_ids = row_ids_B[r0:].data_ptr()
        if row_scale_B is not None:
            params.row_scale = row_scale_B[r0:].data_ptr()
        kernels.hardneg_loss_rows(params)  # s_RN now holds dL/dS when need_grad
        if not need_grad:
            continue
        for k, (c_KD, d_c_KD, (c0, c1)) in enumerate(zip(blocks, d_blocks, spans, strict=True)):
            ds_RK = s_RN[:, c0:c1]
            if k == 0 and not accumulate:
                torch.mm(ds_RK, c_KD, out=d_rows_BD[r0:r1])  # (R, K) x (K, D) -> (R, D)
            else:
                d_rows_BD[r0:r1].addmm_(ds_RK, c_KD)
            if r0 == 0 and not accumulate:
                torch.mm(ds_RK.T, rows_RD, out=d_c_KD)  # (K, R) x (R, D) -> (K, D)
            else:
                d_c_KD.addmm_(ds_RK.T, rows_RD)


def _check_finite(tensors: dict[str, Tensor | None]) -> None:
    for name, t in tensors.items():
        # One read-only reduction first: a NaN or Inf anywhere makes the sum NaN or Inf. Only then
        # the exact scan, which also clears a sum that overflowed on huge finite values.
        if t is None or bool(torch.isfinite(t.sum())):
            continue
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise FloatingPointError(
                f"{name} holds {bad} NaN or Inf value(s); pass check_finite=False to skip this scan"
            )


def _compute(
    query: Tensor,
    target: Tensor,
    hard_negatives: Tensor | None,
    target_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    opts: dict,
    need_grad: bool,
    grad_loss: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss per query (fp32, both directions averaged when symmetric) and, when need_grad, the fp32
    gradients dq (B, D) and dc (N, D) = [dt; dh] of the reduced loss scaled by grad_loss (1 when
    None)."""
    if opts["check_finite"]:
        _check_finite({"query": query, "target": target, "hard_negatives": hard_negatives})
    B, D = query.shape
    # fp32 inputs are used in place: the candidates stay two column blocks [target | hard
    # negatives] instead of one concatenated (N, D) copy.
    q_BD = query.float().contiguous()
    t_BD = target.float().contiguous()
    blocks = [t_BD]
    if target_ids is not None:
        target_ids = target_ids.contiguous()  # the kernel reads ids through a raw pointer
    ids_N = target_ids
    if hard_negatives is not None:
        blocks.append(hard_negatives.float().reshape(-1, D).contiguous())
        if target_ids is not None:
            ids_N = torch.cat([target_ids, hard_negative_ids.reshape(-1)])
    N = sum(c.shape[0] for c in blocks)
    symmetric = opts["symmetric"]
    chunk = opts["chunk_size"] or default_chunk_size(N)

    # dL/dS scale per row: 1/B for mean, 1/2 per direction when symmetric, times grad_loss.
    reduction = opts["reduction"]
    grad_scale = (1.0 / B if reduction == "mean" else 1.0) * (0.5 if symmetric else 1.0)
    row_scale_B = None
    if grad_loss is not None:
        if reduction == "none":
            row_scale_B = grad_loss.float().contiguous()
        else:
            row_scale_B = grad_loss.float().expand(B).contiguous()
    # Written (not accumulated) by the first pass, so no zero fill.
    dq_BD = q_BD.new_empty(B, D, dtype=torch.float32) if need_grad else None
    dc_ND = q_BD.new_empty(N, D, dtype=torch.float32) if need_grad else None
    d_blocks = (dc_ND[:B], dc_ND[B:]) if need_grad else None

    loss_B = torch.empty(B, dtype=torch.float32, device=query.device)
    _row_pass(
        q_BD,
        tuple(blocks),
        target_ids,
        ids_N,
        opts,
        chunk,
        loss_B,
        grad_scale,
        row_scale_B,
        dq_BD,
        d_blocks[: len(blocks)] if need_grad else None,
        accumulate=False,
    )
    if symmetric:
        # Target -> query over the in-batch targets; query i carries the id of its positive.
        loss_t_B = torch.empty_like(loss_B)
        d_t_BD = dc_ND[:B] if need_grad else None
        _row_pass(
            t_BD,
            q_BD,
            target_ids,
            target_ids,
            opts,
            opts["chunk_size"] or default_chunk_size(B),
            loss_t_B,
            grad_scale,
            row_scale_B,
            d_t_BD,
            dq_BD,
        )
        loss_B = (loss_B + loss_t_B) * 0.5

    if not need_grad:
        return loss_B, query.new_empty(0, dtype=torch.float32), q_BD.new_empty(0)
    return loss_B, dq_BD, dc_ND


def _reduce(loss_B: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss_B.mean()
    if reduction == "sum":
        return loss_B.sum()
    return loss_B


def _opts(
    mode, temperature, alpha, ega_beta, ega_margin, symmetric, reduction, chunk_size, check_finite
) -> dict:
    return {
        "mode": mode,
        "mode_code": MODES.index(mode),
        "temperature": temperature,
        "alpha": alpha,
        "ega_beta": ega_beta,
        "ega_margin": ega_margin,
        "symmetric": symmetric,
        "reduction": reduction,
        "chunk_size": chunk_size,
        "check_finite": check_finite,
    }


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
    """Returns (loss, dq, dc): the reduced loss and, when fuse_grad, the fp32 gradients of the loss
    w.r.t. query (B, D) and the candidates [target; hard negatives] (N, D) computed in the same
    pass (empty otherwise), scaled in backward by grad_output. Only a scalar loss can have its
    gradient fused (backward scales it by one number), so fuse_grad needs reduction mean or sum."""
    if fuse_grad and reduction == "none":
        raise ValueError("fuse_grad=True needs reduction 'mean' or 'sum', got reduction 'none'")
    opts = _opts(
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
    loss_B, dq, dc = _compute(
        query, target, hard_negatives, target_ids, hard_negative_ids, opts, fuse_grad, None
    )
    return _reduce(loss_B, reduction), dq, dc


@_hardneg_loss_op.register_fake
def _(
    query,
    target,
    hard_negatives,
    target_ids,
    hard_negative_ids,
    mode,
    temperature,
    alpha,
    ega_beta,
    ega_margin,
    symmetric,
    reduction,
    chunk_size,
    check_finite,
    fuse_grad,
):
    B, D = query.shape
    loss = query.new_empty((B,) if reduction == "none" else (), dtype=torch.float32)
    if not fuse_grad:
        return (
            loss,
            query.new_empty(0, dtype=torch.float32),
            query.new_empty(0, dtype=torch.float32),
        )
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
    mode: str,
    temperature: float,
    alpha: float,
    ega_beta: float,
    ega_margin: float,
    symmetric: bool,
    reduction: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Recomputing backward: one more pass of the row schedule with dS scaled by grad_loss."""
    opts = _opts(
        mode, temperature, alpha, ega_beta, ega_margin, symmetric, reduction, chunk_size, False
    )
    _, dq, dc = _compute(
        query, target, hard_negatives, target_ids, hard_negative_ids, opts, True, grad_loss
    )
    return _split_grads(dq, dc, query, target, hard_negatives)


@_hardneg_loss_backward_op.register_fake
def _(
    grad_loss,
    query,
    target,
    hard_negatives,
    target_ids,
    hard_negative_ids,
    mode,
    temperature,
    alpha,
    ega_beta,
    ega_margin,
    symmetric,
    reduction,
    chunk_size,
):
    dh = torch.empty_like(hard_negatives) if hard_negatives is not None else query.new_empty(0)
    return torch.empty_like(query), torch.empty_like(target), dh


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


_OPT_NAMES = (
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
    ctx.opts = dict(zip(_OPT_NAMES, inputs[5:13], strict=True))
    ctx.fused = inputs[14]
    ctx.has_hard_negatives = hard_negatives is not None
    if ctx.fused:
        ctx.save_for_backward(query, target, hard_negatives, *output[1:])
    else:
        ctx.save_for_backward(query, target, hard_negatives, target_ids, hard_negative_ids)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_unused):
    if ctx.fused:
        # The gradients were computed with the forward pass at grad_output = 1; the reduced loss
        # is a scalar, so backward only scales them.
        # One multiply per output, each a fresh tensor: no clone, no further copy for fp32.
        query, target, hard_negatives, dq_BD, dc_ND = ctx.saved_tensors
        B = query.shape[0]
        grads = [(dq_BD * grad_loss).to(query.dtype), (dc_ND[:B] * grad_loss).to(target.dtype)]
        grads.append(
            (dc_ND[B:] * grad_loss).view(hard_negatives.shape).to(hard_negatives.dtype)
            if hard_negatives is not None
            else None
        )
    else:
        query, target, hard_negatives, target_ids, hard_negative_ids = ctx.saved_tensors
        o = ctx.opts
        grads = list(
            _hardneg_loss_backward_op(
                grad_loss,
                query,
                target,
                hard_negatives,
                target_ids,
                hard_negative_ids,
                o["mode"],
                o["temperature"],
                o["alpha"],
                o["ega_beta"],
                o["ega_margin"],
                o["symmetric"],
                o["reduction"],
                o["chunk_size"],
            )
        )
    if not ctx.has_hard_negatives:
        grads[2] = None
    return (grads[0], grads[1], grads[2]) + (None,) * 12


_hardneg_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _validate(
    query,
    target,
    hard_negatives,
    target_ids,
    hard_negative_ids,
    mode,
    temperature,
    reduction,
    strategy,
    chunk_size,
) -> None:
    for name, t in (("query", query), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hard_negatives is not None and not isinstance(hard_negatives, Tensor):
        raise TypeError(
            f"hard_negatives must be a torch.Tensor or None, got {type(hard_negatives).__name__}"
        )
    for name, t in (("query", query), ("target", target), ("hard_negatives", hard_negatives)):
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor (float32, bfloat16, float16 or "
                f"float64), got dtype {t.dtype}"
            )
    if query.dim() != 2:
        raise ValueError(f"query must be 2-d (B, D), got shape {tuple(query.shape)}")
    if target.dim() != 2:
        raise ValueError(f"target must be 2-d (B, D), got shape {tuple(target.shape)}")
    B, D = query.shape
    if B == 0 or D == 0:
        raise ValueError(f"query must be non-empty, got shape {tuple(query.shape)}")
    if target.shape[1] != D:
        raise ValueError(f"target has dim {target.shape[1]} but query has dim {D}")
    if target.shape[0] != B:
        raise ValueError(
            f"target has {target.shape[0]} rows but query has {B}: target[i] is the "
            "positive of query[i]"
        )
    if target.dtype != query.dtype:
        raise TypeError(f"target has dtype {target.dtype} but query has dtype {query.dtype}")
    if target.device != query.device:
        raise ValueError(f"target is on {target.device} but query is on {query.device}")
    if hard_negatives is not None:
        if (
            hard_negatives.dim() != 3
            or hard_negatives.shape[0] != B
            or hard_negatives.shape[2] != D
        ):
            raise ValueError(
                f"hard_negatives must have shape (B, M, D) = ({B}, M, {D}), got "
                f"{tuple(hard_negatives.shape)}"
            )
        if hard_negatives.dtype != query.dtype:
            raise TypeError(
                f"hard_negatives has dtype {hard_negatives.dtype} but query has dtype {query.dtype}"
            )
        if hard_negatives.device != query.device:
            raise ValueError(
                f"hard_negatives is on {hard_negatives.device} but query is on {query.device}"
            )
    if (target_ids is None) != (hard_negative_ids is None) and hard_negatives is not None:
        raise ValueError(
            "target_ids and hard_negative_ids must be given together when "
            f"hard_negatives is given (target_ids is "
            f"{'None' if target_ids is None else 'set'}, hard_negative_ids is "
            f"{'None' if hard_negative_ids is None else 'set'})"
        )
    if hard_negative_ids is not None and hard_negatives is None:
        got = (
            f"shape {tuple(hard_negative_ids.shape)}"
            if isinstance(hard_negative_ids, Tensor)
            else type(hard_negative_ids).__name__
        )
        raise ValueError(f"hard_negative_ids ({got}) was given without hard_negatives")
    for name, ids, shape in (
        ("target_ids", target_ids, (B,)),
        (
            "hard_negative_ids",
            hard_negative_ids,
            tuple(hard_negatives.shape[:2]) if hard_negatives is not None else None,
        ),
    ):
        if ids is None:
            continue
        if not isinstance(ids, Tensor) or ids.dtype != torch.int64:
            raise TypeError(
                f"{name} must be an int64 tensor, got "
                f"{ids.dtype if isinstance(ids, Tensor) else type(ids).__name__}"
            )
        if tuple(ids.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(ids.shape)}")
        if ids.device != query.device:
            raise ValueError(f"{name} is on {ids.device} but query is on {query.device}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


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
    group=None,
    strategy: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> Tensor:
    """Hardness-aware contrastive loss, fused: the B x N logits matrix is never materialised.

    Shapes: query, target (B, D), target[i] the positive of query[i]; hard_negatives (B, M, D) join
    the candidate pool shared by every query, N = B + B*M candidates in the order
    [target; hard_negatives.reshape(B*M, D)]. target_ids (B,), hard_negative_ids (B, M), int64: a
    candidate whose id equals the id of a query's positive is a false negative and is masked out
    (in both directions when symmetric). Inputs are used as given: L2-normalise them first for
    cosine similarities (the intended use). float32, bfloat16 and float16 inputs are accumulated in
    fp32; the loss is fp32 and gradients come back in the input dtype.

    With s_ij = q_i . c_j, tau = temperature, p(i) = i and P = softmax_j(z):
      infonce:  z_ij = s_ij / tau
      llave:    z_ij = s_ij / tau + [j != p(i)] * alpha * sg(s_ij)   (LLaVE hardness weighting)
      ega:      z_ij = s_ij / tau in the forward (the value is InfoNCE); the backward amplifies
                hard negatives: dL_i/ds_ij = (Pbar_ij - Y_ij) / tau with
                Pbar_ij = P_ij * exp(ega_beta * max(0, s_ij - s_{i,p(i)} + ega_margin)), j != p(i).
                This is a documented reconstruction of QQMM-embed's gradient amplifier (its exact
                formula is unpublished). Defaults, chosen by the synthetic ablation
                (benchmarks/results/ablation_*.md): ega_beta = 2, ega_margin = 0, i.e. only a
                negative that outscores its positive is amplified, e-fold per 0.5 cosine above
                it. Pbar is not renormalised: with a margin > 0 at the start of training every
                negative is amplified, sum_j Pbar_ij > 1, and the ablation's beta-5 runs collapsed.
      L_i = logsumexp_j z_ij - z_{i,p(i)}; symmetric: (L_q->t + L_t->q) / 2 where the t->q
      direction ranks the queries for each in-batch target (hard negatives take no part).

    reduction: "mean" (over queries), "sum", or "none" (shape (B,), per-index mean of both
    directions when symmetric). chunk_size: rows of S per chunk (default: 32 MiB of fp32).
    check_finite: scan the inputs for NaN/Inf first (FloatingPointError); False skips the scan.
    group / strategy: cross-device negatives over a process group (None: this process only):
    with more than one rank the loss is the single-process loss over the concatenation of every
    rank's batch, the same value on every rank, and each rank gets the gradient w.r.t. its own
    inputs; strategy "ring", "allgather" or "auto". Multiply the loss by the world size before
    backward when DDP / DeepSpeed average gradients over ranks. See hardneg.ring for the per-rank
    shapes and equations.

    The gradient is computed in the forward pass when autograd will need it (reduction "mean" or
    "sum"): each row chunk sees its whole row, so the loss, dS, dQ and dC come from one pass of 3
    GEMMs and backward only scales them. reduction "none" recomputes in backward instead.
    """
    _validate(
        query,
        target,
        hard_negatives,
        target_ids,
        hard_negative_ids,
        mode,
        temperature,
        reduction,
        strategy,
        chunk_size,
    )
    if group is not None and torch.distributed.get_world_size(group) > 1:
        from hardneg.distributed.ring import ring_hardneg_loss  # ring imports this module

        return ring_hardneg_loss(
            query,
            target,
            hard_negatives=hard_negatives,
            target_ids=target_ids,
            hard_negative_ids=hard_negative_ids,
            mode=mode,
            temperature=temperature,
            alpha=alpha,
            ega_beta=ega_beta,
            ega_margin=ega_margin,
            symmetric=symmetric,
            reduction=reduction,
            group=group,
            strategy=strategy,
            chunk_size=chunk_size,
            check_finite=check_finite,
        )
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, target, hard_negatives)
    )
    fuse_grad = wants_grad and reduction != "none"
    loss, _, _ = _hardneg_loss_op(
        query,
        target,
        hard_negatives,
        target_ids,
        hard_negative_ids,
        mode,
        float(temperature),
        float(alpha),
        float(ega_beta),
        float(ega_margin),
        bool(symmetric),
        reduction,
        int(chunk_size or 0),
        bool(check_finite),
        fuse_grad,
    )
    return loss
