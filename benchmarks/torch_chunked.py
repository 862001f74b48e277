"""The pure-torch row-chunked hardneg loss: the strongest alternative a user could write without
hardneg (design section 6), the `torch_chunked` provider of benchmarks/bench_loss.py.

It runs hardneg's row schedule with torch ops: the same row chunks and chunk size (hardneg's
default for the inputs' device, hardneg._schedule.default_chunk_size), elementwise work in place
where possible, and the gradient computed in the forward pass the same way (one pass of 3 GEMMs per
chunk; backward only scales the saved gradients). Extra memory is O(R x N) per chunk plus
[target; hard_negatives] and the saved gradients, like hardneg's. It computes in its inputs' dtype
(fp32 in the CPU benchmarks, bf16 on GPUs: S, the softmax and the gradient accumulators in bf16,
what a user's bf16 code gets) and returns the mean loss. tests/test_torch_chunked.py holds it to the
fp64 reference under the loss tests' error rule, so the peer the benchmark beats is a correct one.

Legend: B queries, M hard negatives per query, N = B + B*M candidates, D embedding dim, R rows in a
chunk. Suffixes name shapes: rows_BD, cands_ND, s_RN.
"""

from __future__ import annotations

import torch
from hardneg._constants import ALPHA, EGA_BETA, EGA_MARGIN, TEMPERATURE
from hardneg._schedule import default_chunk_size
from torch import Tensor


def _row_pass(
    rows_BD: Tensor,
    cands_ND: Tensor,
    row_ids_B: Tensor | None,
    col_ids_N: Tensor | None,
    opts: dict,
    chunk_size: int,
    loss_B: Tensor,
    grad_scale: float,
    d_rows_BD: Tensor | None,
    d_cands_ND: Tensor | None,
) -> None:
    """hardneg's row schedule in torch ops: row i's positive is candidate i; writes loss_B and, when
    d_rows_BD is given, accumulates the gradients of grad_scale * sum(loss)."""
    B = rows_BD.shape[0]
    inv_tau = 1.0 / opts["temperature"]
    c_neg = inv_tau + (opts["alpha"] if opts["mode"] == "llave" else 0.0)
    ega = opts["mode"] == "ega"
    for r0 in range(0, B, chunk_size):
        r1 = min(B, r0 + chunk_size)
        rr = torch.arange(r1 - r0)
        pos = torch.arange(r0, r1)
        s_RN = rows_BD[r0:r1] @ cands_ND.T  # (R, D) x (D, N) -> (R, N)
        s_pos_R = s_RN[rr, pos]
        z_pos_R = s_pos_R * inv_tau
        # ega needs s for its amplification; other modes turn s into z in place.
        z_RN = s_RN * c_neg if ega else s_RN.mul_(c_neg)
        if row_ids_B is not None:
            z_RN.masked_fill_(col_ids_N[None, :] == row_ids_B[r0:r1, None], float("-inf"))
        z_RN[rr, pos] = z_pos_R
        lse_R = torch.logsumexp(z_RN, dim=1)
        torch.sub(lse_R, z_pos_R, out=loss_B[r0:r1])
        if d_rows_BD is None:
            continue
        if ega:
            # Pbar = softmax(z + u), u = beta * max(0, s - s_pos + margin) on negatives, 0 at the
            # positive: the amplified logits replace z, their logsumexp lse.
            u_RN = s_RN.sub_(s_pos_R[:, None]).add_(opts["ega_margin"]).clamp_min_(0)
            u_RN.mul_(opts["ega_beta"])[rr, pos] = 0.0
            lse_R = torch.logsumexp(z_RN.add_(u_RN), dim=1)
        p_RN = z_RN.sub_(lse_R[:, None]).exp_()
        p_RN[rr, pos] -= 1.0
        ds_RN = p_RN.mul_(inv_tau * grad_scale)
        d_rows_BD[r0:r1].addmm_(ds_RN, cands_ND)  # (R, N) x (N, D) -> (R, D)
        d_cands_ND.addmm_(ds_RN.T, rows_BD[r0:r1])  # (N, R) x (R, D) -> (N, D)


class _TorchChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, target, hard_negatives, target_ids, hard_negative_ids, opts):
        B = query.shape[0]
        c_ND = (
            target if hard_negatives is None else torch.cat([target, hard_negatives.flatten(0, 1)])
        )
        ids_N = target_ids
        if hard_negatives is not None and target_ids is not None:
            ids_N = torch.cat([target_ids, hard_negative_ids.flatten()])
        N = c_ND.shape[0]
        need_grad = any(ctx.needs_input_grad[:3])
        grad_scale = (1.0 / B) * (0.5 if opts["symmetric"] else 1.0)
        dq_BD = torch.zeros_like(query) if need_grad else None
        dc_ND = torch.zeros_like(c_ND) if need_grad else None
        loss_B = query.new_empty(B)
        chunk = opts["chunk_size"] or default_chunk_size(N, query.device)
        _row_pass(query, c_ND, target_ids, ids_N, opts, chunk, loss_B, grad_scale, dq_BD, dc_ND)
        if opts["symmetric"]:
            # Target -> query over the in-batch targets; query i carries the id of its positive.
            loss_t_B = torch.empty_like(loss_B)
            _row_pass(
                target,
                query,
                target_ids,
                target_ids,
                opts,
                opts["chunk_size"] or default_chunk_size(B, query.device),
                loss_t_B,
                grad_scale,
                dc_ND[:B] if need_grad else None,
                dq_BD,
            )
            loss_B = (loss_B + loss_t_B) * 0.5
        ctx.has_hard_negatives = hard_negatives is not None
        if need_grad:
            ctx.save_for_backward(dq_BD, dc_ND)
        return loss_B.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        dq_BD, dc_ND = ctx.saved_tensors
        B = dq_BD.shape[0]
        dh = None
        if ctx.has_hard_negatives:
            dh = (dc_ND[B:] * grad_loss).view(B, -1, dq_BD.shape[1])
        return dq_BD * grad_loss, dc_ND[:B] * grad_loss, dh, None, None, None


def torch_chunked_hardneg_loss(
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
    chunk_size: int | None = None,
) -> Tensor:
    """Mean hardneg loss in plain torch with hardneg's row schedule.

    query, target (B, D); hard_negatives (B, M, D); ids and options as in fused_hardneg_loss
    (reduction "mean" only). chunk_size: rows per chunk, default hardneg's
    default_chunk_size(N, device).
    """
    opts = {
        "mode": mode,
        "temperature": temperature,
        "alpha": alpha,
        "ega_beta": ega_beta,
        "ega_margin": ega_margin,
        "symmetric": symmetric,
        "chunk_size": chunk_size,
    }
    return _TorchChunkedLoss.apply(
        query, target, hard_negatives, target_ids, hard_negative_ids, opts
    )
