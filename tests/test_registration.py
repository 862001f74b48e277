"""torch.library registration of hardneg_loss: torch.library.opcheck on both custom ops (schema,
fake / meta implementation, autograd registration, AOT dispatch) and torch.compile(fullgraph=True)
of the public function on CPU, forward and backward, equal to eager.

hardneg::hardneg_loss returns (loss, dq, dc); fuse_grad=True fills dq and dc in the forward pass
(the reduced-loss path), fuse_grad=False leaves them empty and backward calls
hardneg::hardneg_loss_backward (the recompute path, the only one reduction "none" uses).
"""

from __future__ import annotations

import pytest
import torch
from hardneg import fused_hardneg_loss
from hardneg._spec import LossSpec
from loss_testing import make_inputs

B, M, D = 5, 2, 12


def _op_args(*, hard: bool, fuse_grad: bool, reduction: str, mode: str, requires_grad: bool):
    inputs = make_inputs(B, D, M if hard else 0, ids=hard, dtype=torch.float32)
    query, target, hard_negatives = inputs["query"], inputs["target"], inputs["hard_negatives"]
    for t in (query, target, hard_negatives):
        if t is not None:
            t.requires_grad_(requires_grad)
    ids = (inputs["target_ids"], inputs["hard_negative_ids"]) if hard else (None, None)
    # chunk_size 2 rows: several chunks, the last partial.
    spec = LossSpec(mode, 0.05, 9.0, 5.0, 0.1, True, reduction, chunk_size=2, check_finite=True)
    return (query, target, hard_negatives, *ids, spec.encode(), fuse_grad)


# fuse_grad with reduction "none" is never issued (fused_hardneg_loss recomputes instead).
@pytest.mark.parametrize(
    "fuse_grad,reduction", [(True, "mean"), (True, "sum"), (False, "mean"), (False, "none")]
)
@pytest.mark.parametrize("hard", [False, True], ids=["no_hn", "hn_ids"])
@pytest.mark.parametrize("mode", ["llave", "ega"])
def test_opcheck_hardneg_loss(mode, hard, fuse_grad, reduction):
    args = _op_args(
        hard=hard, fuse_grad=fuse_grad, reduction=reduction, mode=mode, requires_grad=True
    )
    torch.library.opcheck(torch.ops.hardneg.hardneg_loss.default, args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("hard", [False, True], ids=["no_hn", "hn_ids"])
def test_opcheck_hardneg_loss_backward(hard, reduction):
    *inputs, spec, _ = _op_args(
        hard=hard, fuse_grad=False, reduction=reduction, mode="ega", requires_grad=False
    )
    grad_loss = torch.randn(B) if reduction == "none" else torch.tensor(1.7)
    args = (grad_loss, *inputs, spec)
    torch.library.opcheck(torch.ops.hardneg.hardneg_loss_backward.default, args)


def test_compile_fullgraph_matches_eager():
    """One compiled function exercises both paths: a "mean" loss (gradients fused into the forward)
    and a "none" loss (recomputed in backward), with hard negatives and id masking."""
    inputs = make_inputs(33, 24, 2, ids=True, dtype=torch.float32)
    weights = torch.randn(33, generator=torch.Generator().manual_seed(3))

    def two_losses(query, target, hard_negatives, target_ids, hard_negative_ids):
        masking = {"target_ids": target_ids, "hard_negative_ids": hard_negative_ids}
        mean = fused_hardneg_loss(
            query, target, hard_negatives=hard_negatives, mode="llave", chunk_size=8, **masking
        )
        per_query = fused_hardneg_loss(
            query,
            target,
            hard_negatives=hard_negatives,
            mode="ega",
            symmetric=True,
            reduction="none",
            chunk_size=8,
            **masking,
        )
        return mean, per_query

    def run(fn):
        leaves = [inputs[k].clone().requires_grad_() for k in ("query", "target", "hard_negatives")]
        mean, per_query = fn(*leaves, inputs["target_ids"], inputs["hard_negative_ids"])
        (3.7 * mean + (weights * per_query).sum()).backward()
        return [mean, per_query] + [t.grad for t in leaves]

    torch._dynamo.reset()
    compiled = run(torch.compile(two_losses, fullgraph=True))
    eager = run(two_losses)
    # The same kernels run in both; only the elementwise glue (scaling by grad_output, the sum of
    # the two losses' gradients) may be reordered by inductor: fp32 rounding, no more.
    for name, got, want in zip(
        ("mean", "per_query", "d_query", "d_target", "d_hard_negatives"),
        compiled,
        eager,
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
        assert got.dtype == want.dtype, name
