"""Shared pieces of the hardneg_loss tests: the input builder, one calling convention for the op
and the reference, and the error-vs-truth comparisons whose tolerances the test files justify.

Legend: B queries, M hard negatives per query, D embedding dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from hardneg import ALPHA, TEMPERATURE
from torch import Tensor

OUTPUT_NAMES = ("loss", "d_query", "d_target", "d_hard_negatives")

# fp32 budget of the op (it accumulates in fp32 whatever the input dtype): ~1e-6 relative error in
# s, amplified by up to 1 / tau + alpha in the logits. Derivation in tests/test_loss.py's doc.
RTOL_FP32 = 1e-6 * (1 / TEMPERATURE + ALPHA)


def fp32_floor(reduction: str, B: int, grad_output: Tensor | float = 1.0) -> dict[str, float]:
    """Absolute part of the fp32 budget per output, RTOL_FP32 of its natural unit: 1 nat per row
    for the loss (B rows for "sum"), the largest row weight |w_i| = |grad_output_i| (/ B for
    "mean") for the gradients, since fp32 resolves P_pos - 1 only to its roundoff."""
    w = torch.as_tensor(grad_output).abs().max().item() / (B if reduction == "mean" else 1)
    floor = {"loss": RTOL_FP32 * (B if reduction == "sum" else 1)}
    floor.update(dict.fromkeys(OUTPUT_NAMES[1:], RTOL_FP32 * w))
    return floor


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def make_inputs(
    B: int, D: int, M: int = 0, *, ids: bool = False, dtype: torch.dtype = torch.float64, seed=0
) -> dict[str, Tensor | None]:
    """L2-normalised query (B, D), target (B, D) and hard_negatives (B, M, D) (None when M == 0);
    with ids, target_ids (B,) and hard_negative_ids (B, M) (None when M == 0), int64.

    Positives and hard negatives lean towards their query (cosine ~0.3, against a spread of
    ~0.13 for random pairs at D = 59), so at tau = 0.02 several candidates per row carry real
    probability: masking, EGA amplification and the LLaVE weight all move the result.

    Ids are drawn from ceil(B / 2) values, so duplicates are common, and three collisions are
    forced so that even B = 7 has each kind: two in-batch targets share an id, a query's own hard
    negative duplicates its positive, and another query's hard negative duplicates it too.
    The vectors are built in fp64 and rounded once to `dtype`.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q_BD = _unit(randn(B, D))
    t_BD = _unit(0.3 * q_BD + _unit(randn(B, D)))
    out: dict[str, Tensor | None] = {
        "query": q_BD.to(dtype),
        "target": t_BD.to(dtype),
        "hard_negatives": None,
    }
    if M > 0:
        h_BMD = _unit(0.3 * q_BD[:, None] + _unit(randn(B, M, D)))
        out["hard_negatives"] = h_BMD.to(dtype)
    if ids:
        num_ids = max(2, (B + 1) // 2)
        target_ids_B = torch.randint(num_ids, (B,), generator=g)
        if B >= 2:
            target_ids_B[1] = target_ids_B[0]
        out["target_ids"] = target_ids_B
        out["hard_negative_ids"] = None
        if M > 0:
            hard_ids_BM = torch.randint(num_ids, (B, M), generator=g)
            hard_ids_BM[0, 0] = target_ids_B[0]
            if B >= 2:
                hard_ids_BM[-1, -1] = target_ids_B[0]
            out["hard_negative_ids"] = hard_ids_BM
    return out


def loss_and_grads(
    loss_fn: Callable[..., Tensor],
    inputs: dict[str, Tensor | None],
    *,
    grad_output: Tensor | float = 1.0,
    dtype: torch.dtype | None = None,
    **options,
) -> dict[str, Tensor]:
    """Runs loss_fn (fused_hardneg_loss or hardneg_loss_reference) on fresh leaf copies of the
    float inputs, cast to `dtype` when given, and back-propagates grad_output (a number, or a
    tensor shaped like the loss). Returns {"loss", "d_query", "d_target"[, "d_hard_negatives"]}.
    """
    leaves = {}
    for name in ("query", "target", "hard_negatives"):
        t = inputs.get(name)
        if t is not None:
            leaves[name] = t.detach().to(dtype or t.dtype).requires_grad_()
    kwargs = {k: v for k, v in inputs.items() if k not in ("query", "target")}
    kwargs["hard_negatives"] = leaves.get("hard_negatives")
    loss = loss_fn(leaves["query"], leaves["target"], **kwargs, **options)
    grad_out = torch.as_tensor(grad_output, dtype=loss.dtype).expand_as(loss)
    grads = torch.autograd.grad(loss, list(leaves.values()), grad_out)
    out = {"loss": loss.detach()}
    for name, grad in zip(leaves, grads, strict=True):
        out["d_" + name] = grad
    return out


def max_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected|, taken in fp64 (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def allowed_error(expected: Tensor, *, rtol: float, atol: float) -> float:
    """rtol of the largest |expected| plus atol: the error budget of one output tensor."""
    if expected.numel() == 0:
        return atol
    return rtol * expected.double().abs().max().item() + atol


def check_close(
    actual: dict[str, Tensor],
    expected: dict[str, Tensor],
    *,
    rtol: float,
    atol: float | dict[str, float],
) -> None:
    """Raises AssertionError naming every output (loss and gradients) whose max |actual -
    expected| exceeds rtol * max |expected| + atol, or whose shape differs. atol is one number or
    one per output name."""
    problems = []
    for name in OUTPUT_NAMES:
        if name not in expected:
            continue
        a, e = actual[name], expected[name]
        if a.shape != e.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
            continue
        floor = atol[name] if isinstance(atol, dict) else atol
        err, allowed = max_error(a, e), allowed_error(e, rtol=rtol, atol=floor)
        if not err <= allowed:
            problems.append(f"{name}: max error {err:.3e} > allowed {allowed:.3e}")
    assert not problems, "; ".join(problems)


def check_no_worse(
    actual: dict[str, Tensor],
    plain: dict[str, Tensor],
    truth: dict[str, Tensor],
    *,
    factor: float,
    atol_rel: float,
) -> None:
    """Raises AssertionError naming every output whose error against truth exceeds factor times
    the error of `plain` (the plain-torch reference in the same dtype) plus atol_rel of the
    largest |truth|."""
    problems = []
    for name in OUTPUT_NAMES:
        if name not in truth:
            continue
        err, plain_err = max_error(actual[name], truth[name]), max_error(plain[name], truth[name])
        allowed = factor * plain_err + allowed_error(truth[name], rtol=atol_rel, atol=0.0)
        if not err <= allowed:
            problems.append(
                f"{name}: error {err:.3e} > {factor} x plain-torch error {plain_err:.3e} + floor"
            )
    assert not problems, "; ".join(problems)
