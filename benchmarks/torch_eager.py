"""The loss as users write it in eager torch under bf16 autocast: the `eager_autocast` provider of
benchmarks/bench_loss.py on GPUs.

    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = query @ candidates.T / tau         # (B, N), bf16 under autocast
        loss = F.cross_entropy(logits, labels)      # log_softmax in fp32 (autocast's fp32 list)
    loss.backward()

plus, for mode "llave", LLaVE's hardness shift alpha * sg(s) on the negatives' logits, and the
false-negative mask when ids are given (design section 1). The B x N logits are materialised, in
bf16, with the softmax and its backward in fp32 over them: the traffic benchmarks/roofline.py
counts for this provider. Mode "ega" has no such one-liner (its gradient is not a softmax's) and
is refused. tests/test_bench_loss.py holds it to the fp64 reference (exactly without autocast,
within bf16's error under it).

Legend: B queries, M hard negatives per query, N = B + B*M candidates, D embedding dim.
Suffixes name shapes: s_BN, cands_ND.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hardneg._constants import ALPHA, TEMPERATURE
from torch import Tensor

EAGER_MODES = ("infonce", "llave")


def _direction(
    rows_BD: Tensor,
    cands_ND: Tensor,
    row_ids_B: Tensor | None,
    cand_ids_N: Tensor | None,
    mode: str,
    temperature: float,
    alpha: float,
) -> Tensor:
    """Mean cross-entropy of rows against candidates; row i's positive is candidate i."""
    B = rows_BD.shape[0]
    s_BN = rows_BD @ cands_ND.T
    logits_BN = s_BN / temperature
    if mode == "llave":
        shift_BN = alpha * s_BN.detach()
        shift_BN[:, :B].fill_diagonal_(0)  # the positive keeps its plain logit
        logits_BN = logits_BN + shift_BN
    if row_ids_B is not None:
        n = cand_ids_N.shape[0]
        false_neg_BN = torch.zeros_like(logits_BN, dtype=torch.bool)
        false_neg_BN[:, :n] = cand_ids_N[None, :] == row_ids_B[:, None]
        false_neg_BN[:, :B].fill_diagonal_(False)
        logits_BN = logits_BN.masked_fill(false_neg_BN, float("-inf"))
    labels_B = torch.arange(B, device=rows_BD.device)
    return F.cross_entropy(logits_BN, labels_B)


def eager_autocast_loss(
    query: Tensor,
    target: Tensor,
    *,
    hard_negatives: Tensor | None = None,
    target_ids: Tensor | None = None,
    hard_negative_ids: Tensor | None = None,
    mode: str = "llave",
    temperature: float = TEMPERATURE,
    alpha: float = ALPHA,
    symmetric: bool = False,
    autocast: bool = True,
) -> Tensor:
    """Mean loss of fused_hardneg_loss (same arguments and meaning, modes infonce and llave) in
    eager torch, under bf16 autocast on the inputs' device unless autocast=False.

    query, target (B, D); hard_negatives (B, M, D); target_ids (B,); hard_negative_ids (B, M).
    """
    if mode not in EAGER_MODES:
        raise ValueError(f"eager_autocast_loss supports mode in {EAGER_MODES}, got mode {mode!r}")
    cands_ND, cand_ids_N = target, target_ids
    if hard_negatives is not None:
        cands_ND = torch.cat([target, hard_negatives.flatten(0, 1)])
        if target_ids is not None and hard_negative_ids is not None:
            cand_ids_N = torch.cat([target_ids, hard_negative_ids.flatten()])
    opts = (mode, temperature, alpha)
    with torch.autocast(query.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = _direction(query, cands_ND, target_ids, cand_ids_N, *opts)
        if symmetric:
            loss = (loss + _direction(target, query, target_ids, target_ids, *opts)) / 2
    return loss
