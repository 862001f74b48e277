"""Plain-torch losses of benchmarks/bench_hardness.py: the EGA variants and the controls.

Every loss here is symmetric (query -> target and target -> query averaged, as the benchmark
trains) and takes the arguments of hardneg.fused_hardneg_loss: query, target (B, D), optional
hard_negatives (B, M, D) joining the candidate pool, target_ids (B,) and hard_negative_ids (B, M):
a candidate with the id of a row's positive is a false negative and is masked out. Row i's
positive is candidate i. The t -> q direction ranks the queries (hard negatives take no part).

EGA (gradient amplification, a reconstruction: QQMM-embed's exact formula is unpublished). With
s_ij the cosines, tau the temperature, z_ij = s_ij / tau, P = softmax_j(z) over unmasked
candidates, p = p(i) the positive and Y its one-hot:
    value:     L_i = logsumexp_j z_ij - z_ip                           (InfoNCE)
    gradient:  dL_i/ds_ij = (Pbar_ij - Y_ij) / tau
    hardness:  u_ij = beta * max(0, s_ij - s_ip + margin)   (threshold=True)
               u_ij = beta * (s_ij - s_ip + margin)         (threshold=False), u_ip = 0
    normalise = "none" (the kernels' form before the renormalisation):
               Pbar_ij = P_ij * exp(u_ij)                  (sum_j Pbar_ij >= 1: a net push)
    normalise = "row" (hardneg's mode="ega", its defaults 50 / 0.3 being this loss's):
               Pbar_ij = P_ij exp(u_ij) / sum_k P_ik exp(u_ik)   over every unmasked k, the
               positive included (u_ip = 0): softmax_j(z_ij + u_ij), so sum_j Pbar_ij = 1
    normalise = "negatives":
               Pbar_ip = P_ip; Pbar_ij = (1 - P_ip) * P_ij exp(u_ij) / sum_{k != p} P_ik exp(u_ik)
               for negatives: the positive's pull stays InfoNCE's, the negatives' total push is
               unchanged and only redistributed toward the hard ones.
The value stays InfoNCE in every variant; only the backward differs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

NORMALISE = ("none", "row", "negatives")


def _directions(q, t, h, ids, h_ids):
    """[(s_BN, false_neg_BN)] for q -> [t; h] and t -> q; row i's positive is column i. Hard
    negatives without ids are never masked."""
    cands = t if h is None else torch.cat([t, h.flatten(0, 1)])
    cand_ids = ids if h_ids is None else torch.cat([ids, h_ids.flatten()])
    out = []
    for rows, cols, col_ids in ((q, cands, cand_ids), (t, q, ids)):
        B, N = rows.shape[0], cols.shape[0]
        false_neg = torch.zeros(B, N, dtype=torch.bool)
        if ids is not None:
            n = col_ids.shape[0]
            false_neg[:, :n] = col_ids[None, :] == ids[:, None]
            false_neg[:, :B].fill_diagonal_(False)
        out.append((rows @ cols.T, false_neg))
    return out


def _symmetric(direction_loss: Callable, q, t, h, ids, h_ids) -> Tensor:
    """Mean over rows of the two directions' average."""
    per_dir = [direction_loss(s, fn) for s, fn in _directions(q, t, h, ids, h_ids)]
    return (per_dir[0] + per_dir[1]).mean() / 2


def _is_pos(s_BN: Tensor) -> Tensor:
    eye = torch.zeros_like(s_BN, dtype=torch.bool)
    eye[:, : s_BN.shape[0]].fill_diagonal_(True)
    return eye


def ega_pbar(
    s_BN: Tensor,
    false_neg_BN: Tensor,
    *,
    temperature: float,
    beta: float,
    margin: float,
    normalise: str,
    threshold: bool = True,
) -> Tensor:
    """Pbar (B, N) of the module docstring; masked entries are 0."""
    if normalise not in NORMALISE:
        raise ValueError(f"normalise must be one of {NORMALISE}, got {normalise!r}")
    is_pos = _is_pos(s_BN)
    z = (s_BN / temperature).masked_fill(false_neg_BN, float("-inf"))
    h = s_BN - s_BN.diagonal()[:, None] + margin
    u = beta * (h.clamp_min(0) if threshold else h)
    u = u.masked_fill(is_pos, 0.0)
    if normalise == "none":
        return torch.softmax(z, dim=1) * torch.exp(u)
    if normalise == "row":
        return torch.softmax(z + u, dim=1)
    p = torch.softmax(z, dim=1)
    neg_mass = p.masked_fill(is_pos, 0.0).sum(dim=1, keepdim=True)  # 1 - P_ip, exact form
    neg = torch.softmax((z + u).masked_fill(is_pos, float("-inf")), dim=1)
    return torch.where(is_pos, p, neg_mass * neg)


class _EgaDirection(torch.autograd.Function):
    """Per-row InfoNCE value with the gradient (Pbar - Y) / tau w.r.t. s."""

    @staticmethod
    def forward(ctx, s_BN, false_neg_BN, temperature, beta, margin, normalise, threshold):
        s_BN = s_BN.detach()
        z = (s_BN / temperature).masked_fill(false_neg_BN, float("-inf"))
        loss_B = torch.logsumexp(z, dim=1) - z.diagonal()
        pbar = ega_pbar(
            s_BN,
            false_neg_BN,
            temperature=temperature,
            beta=beta,
            margin=margin,
            normalise=normalise,
            threshold=threshold,
        )
        ctx.save_for_backward(pbar)
        ctx.temperature = temperature
        return loss_B

    @staticmethod
    def backward(ctx, grad_B):
        (pbar,) = ctx.saved_tensors
        grad = pbar.clone()
        grad[:, : grad.shape[0]].diagonal().sub_(1.0)
        return grad * (grad_B[:, None] / ctx.temperature), None, None, None, None, None, None


def ega_surrogate_loss(
    query: Tensor,
    target: Tensor,
    *,
    hard_negatives: Tensor | None = None,
    target_ids: Tensor | None = None,
    hard_negative_ids: Tensor | None = None,
    temperature: float = 0.02,
    beta: float = 50.0,
    margin: float = 0.3,
    normalise: str = "row",
    threshold: bool = True,
) -> Tensor:
    """Symmetric EGA loss (module docstring), mean over queries: InfoNCE's value, the gradient
    (Pbar - Y) / tau of the chosen variant. query, target (B, D); hard_negatives (B, M, D).

    The defaults are the recommended EGA (benchmarks/bench_hardness.py's study): normalise="row",
    threshold=True, beta=50, margin=0.3, i.e. dL_i/ds_ij = (softmax_j(z_ij + u_ij) - Y_ij) / tau
    with u_ij = 50 * max(0, s_ij - s_ip + 0.3) on negatives and u_ip = 0; the value is InfoNCE."""

    def direction(s, fn):
        return _EgaDirection.apply(s, fn, temperature, beta, margin, normalise, threshold)

    return _symmetric(direction, query, target, hard_negatives, target_ids, hard_negative_ids)


def cosface_loss(
    query: Tensor,
    target: Tensor,
    *,
    hard_negatives: Tensor | None = None,
    target_ids: Tensor | None = None,
    hard_negative_ids: Tensor | None = None,
    temperature: float = 0.02,
    margin: float = 0.1,
) -> Tensor:
    """Constant-margin control (CosFace): z_ij = (s_ij - margin [j = p]) / tau, symmetric."""

    def direction(s, fn):
        z = ((s - margin * _is_pos(s)) / temperature).masked_fill(fn, float("-inf"))
        return torch.logsumexp(z, dim=1) - z.diagonal()

    return _symmetric(direction, query, target, hard_negatives, target_ids, hard_negative_ids)


def llave_without_stop_gradient(
    query: Tensor,
    target: Tensor,
    *,
    hard_negatives: Tensor | None = None,
    target_ids: Tensor | None = None,
    hard_negative_ids: Tensor | None = None,
    temperature: float = 0.02,
    alpha: float = 9.0,
) -> Tensor:
    """The broken control: LLaVE's logit shift alpha * s_ij on negatives WITHOUT the stop-gradient
    (z_ij = s_ij / tau + [j != p] alpha s_ij, differentiated through the shift)."""

    def direction(s, fn):
        z = (s / temperature + alpha * s * ~_is_pos(s)).masked_fill(fn, float("-inf"))
        return torch.logsumexp(z, dim=1) - z.diagonal()

    return _symmetric(direction, query, target, hard_negatives, target_ids, hard_negative_ids)
