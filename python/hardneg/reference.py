"""Plain-torch oracle of the hard-negative loss family (design section 1).

It materialises the full B x N logits matrix and lets autograd do the rest, in whatever dtype it is
given: fp64 for the tests' ground truth, the input dtype for "plain torch's own error". It is short
on purpose; tests and benchmarks import this one copy.

Legend: B queries, M hard negatives per query, N = B + B*M candidates, D embedding dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardneg._constants import ALPHA, EGA_BETA, EGA_MARGIN, TEMPERATURE


def _direction_loss(
    rows_BD: Tensor,
    cands_ND: Tensor,
    row_ids_B: Tensor | None,
    cand_ids_N: Tensor | None,
    mode: str,
    temperature: float,
    alpha: float,
    ega_beta: float,
    ega_margin: float,
) -> Tensor:
    """Per-row loss of rows against candidates; row i's positive is candidate i. cand_ids_N may
    cover only the first candidates: the others are never masked."""
    B = rows_BD.shape[0]
    s_BN = rows_BD @ cands_ND.T
    is_pos_BN = torch.zeros_like(s_BN, dtype=torch.bool)
    is_pos_BN[torch.arange(B), torch.arange(B)] = True
    z_BN = s_BN / temperature
    if mode == "llave":
        z_BN = z_BN + alpha * s_BN.detach() * (~is_pos_BN)
    if row_ids_B is not None:
        false_neg_BN = torch.zeros_like(is_pos_BN)
        n = cand_ids_N.shape[0]
        false_neg_BN[:, :n] = (cand_ids_N[None, :] == row_ids_B[:, None]) & ~is_pos_BN[:, :n]
        z_BN = z_BN.masked_fill(false_neg_BN, float("-inf"))
    loss_B = torch.logsumexp(z_BN, dim=1) - z_BN.diagonal()
    if mode == "ega":
        # Forward value is InfoNCE; the gradient w.r.t. s becomes (Pbar - Y) / tau with
        # Pbar_ij = softmax_j(z_ij + u_ij), u_ij = beta * max(0, s_ij - s_ii + margin) on
        # negatives, u_ii = 0, u held constant: the gradient of the cross-entropy over the
        # amplified logits. Its term is zero in value (x - x) and carries the whole gradient.
        u_BN = (ega_beta * (s_BN - s_BN.diagonal()[:, None] + ega_margin).clamp_min(0)).detach()
        u_BN = u_BN.masked_fill(is_pos_BN, 0.0)
        amplified_B = torch.logsumexp(z_BN + u_BN, dim=1) - z_BN.diagonal()
        loss_B = loss_B.detach() + (amplified_B - amplified_B.detach())
    return loss_B


def hardneg_loss_reference(
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
) -> Tensor:
    """Materialised reference of ``hardneg.fused_hardneg_loss`` (same arguments and meaning).

    query, target: (B, D); hard_negatives: (B, M, D); target_ids: (B,); hard_negative_ids: (B, M).
    Returns a scalar for "mean" / "sum", shape (B,) for "none".
    """
    cands_ND = target
    cand_ids_N = target_ids
    if hard_negatives is not None:
        cands_ND = torch.cat([target, hard_negatives.flatten(0, 1)])
        if target_ids is not None and hard_negative_ids is not None:
            cand_ids_N = torch.cat([target_ids, hard_negative_ids.flatten()])
    opts = (mode, temperature, alpha, ega_beta, ega_margin)
    loss_B = _direction_loss(query, cands_ND, target_ids, cand_ids_N, *opts)
    if symmetric:
        # Target -> query: the queries are the candidates, query i has the id of its positive.
        loss_B = (loss_B + _direction_loss(target, query, target_ids, target_ids, *opts)) / 2
    if reduction == "mean":
        return loss_B.mean()
    if reduction == "sum":
        return loss_B.sum()
    return loss_B
