"""fused_hardneg_loss rejects bad input at the boundary, with a message that names the argument and
its value (ValueError for bad values and shapes, TypeError for bad types and dtypes), and reports
NaN / Inf inputs by name unless check_finite=False.

The "meta" device stands in for a second device: a device mismatch must be caught before any
kernel runs, so no GPU is needed to test it.
"""

from __future__ import annotations

import re

import hardneg.loss
import pytest
import torch
from hardneg import fused_hardneg_loss
from hardneg._spec import LossSpec
from loss_testing import make_inputs

B, M, D = 4, 2, 8


def _args(**changes) -> dict:
    """Valid arguments (loss_testing.make_inputs: B = 4 queries, M = 2 hard negatives, D = 8, fp32,
    ids), with `changes` applied; a change to None removes the argument."""
    args = make_inputs(B, D, M, ids=True, dtype=torch.float32)
    args.update(changes)
    return {k: v for k, v in args.items() if v is not None}


def _call(args: dict, **options):
    return fused_hardneg_loss(args.pop("query"), args.pop("target"), **args, **options)


def test_valid_arguments_pass():
    """The baseline every case below breaks in one place is accepted."""
    assert torch.isfinite(_call(_args()))


# (case, changed arguments, options, exception, pattern the message must match). The patterns
# require the argument's name and the offending value (shape, dtype, device or number).
CASES = [
    ("dim mismatch", {"target": torch.randn(B, D + 1)}, {}, ValueError,
     r"target has dim 9 but query has dim 8"),
    ("row mismatch", {"target": torch.randn(B + 1, D)}, {}, ValueError,
     r"target has 5 rows but query has 4"),
    ("1-d query", {"query": torch.randn(D)}, {}, ValueError,
     r"query must be 2-d .* got shape \(8,\)"),
    ("1-d target", {"target": torch.randn(D)}, {}, ValueError,
     r"target must be 2-d .* got shape \(8,\)"),
    ("3-d query", {"query": torch.randn(B, 1, D)}, {}, ValueError,
     r"query must be 2-d .* got shape \(4, 1, 8\)"),
    ("empty batch", {"query": torch.randn(0, D), "target": torch.randn(0, D),
                     "hard_negatives": None, "target_ids": None, "hard_negative_ids": None},
     {}, ValueError, r"query must be non-empty, got shape \(0, 8\)"),
    ("empty dim", {"query": torch.randn(B, 0), "target": torch.randn(B, 0),
                   "hard_negatives": None, "target_ids": None, "hard_negative_ids": None},
     {}, ValueError, r"query must be non-empty, got shape \(4, 0\)"),
    ("query not a tensor", {"query": [[0.0] * D] * B}, {}, TypeError,
     r"query must be a torch.Tensor, got list"),
    ("hard_negatives not a tensor", {"hard_negatives": [[[0.0] * D] * M] * B}, {}, TypeError,
     r"hard_negatives must be a torch.Tensor or None, got list"),
    ("integer query", {"query": torch.ones(B, D, dtype=torch.int64)}, {}, TypeError,
     r"query must be a floating tensor .* got dtype torch.int64"),
    ("integer target", {"target": torch.ones(B, D, dtype=torch.int32)}, {}, TypeError,
     r"target must be a floating tensor .* got dtype torch.int32"),
    ("bool hard_negatives", {"hard_negatives": torch.ones(B, M, D, dtype=torch.bool)}, {},
     TypeError, r"hard_negatives must be a floating tensor .* got dtype torch.bool"),
    ("mixed target dtype", {"target": torch.randn(B, D).half()}, {}, TypeError,
     r"target has dtype torch.float16 but query has dtype torch.float32"),
    ("fp64 query", {"query": torch.randn(B, D, dtype=torch.float64),
                    "target": torch.randn(B, D, dtype=torch.float64)}, {}, TypeError,
     r"query has dtype torch.float64, which hardneg does not compute in .* pass float32 .*"
     r"hardneg_loss_reference"),
    ("fp64 hard_negatives only", {"hard_negatives": torch.randn(B, M, D, dtype=torch.float64)},
     {}, TypeError, r"hard_negatives has dtype torch.float64, which hardneg does not compute in"),
    ("mixed hard_negatives dtype", {"hard_negatives": torch.randn(B, M, D).bfloat16()}, {},
     TypeError, r"hard_negatives has dtype torch.bfloat16 but query has dtype torch.float32"),
    ("target on another device", {"target": torch.empty(B, D, device="meta")}, {}, ValueError,
     r"target is on meta but query is on cpu"),
    ("hard_negatives on another device", {"hard_negatives": torch.empty(B, M, D, device="meta")},
     {}, ValueError, r"hard_negatives is on meta but query is on cpu"),
    ("target_ids on another device", {"target_ids": torch.arange(B, device="meta")}, {},
     ValueError, r"target_ids is on meta but query is on cpu"),
    ("zero temperature", {}, {"temperature": 0.0}, ValueError,
     r"temperature must be > 0, got 0.0"),
    ("negative temperature", {}, {"temperature": -0.02}, ValueError,
     r"temperature must be > 0, got -0.02"),
    ("NaN temperature", {}, {"temperature": float("nan")}, ValueError,
     r"temperature must be > 0, got nan"),
    ("unknown mode", {}, {"mode": "triplet"}, ValueError,
     r"mode must be one of \('infonce', 'llave', 'ega'\), got 'triplet'"),
    ("unknown reduction", {}, {"reduction": "max"}, ValueError,
     r"reduction must be one of .*'mean'.* got 'max'"),
    ("unknown strategy", {}, {"strategy": "broadcast"}, ValueError,
     r"strategy must be one of .*'ring'.* got 'broadcast'"),
    ("zero chunk_size", {}, {"chunk_size": 0}, ValueError,
     r"chunk_size must be a positive int or None, got 0"),
    ("fractional chunk_size", {}, {"chunk_size": 2.5}, ValueError,
     r"chunk_size must be a positive int or None, got 2.5"),
    ("2-d hard_negatives", {"hard_negatives": torch.randn(B, D)}, {}, ValueError,
     r"hard_negatives must have shape \(B, M, D\) = \(4, M, 8\), got \(4, 8\)"),
    ("hard_negatives for other rows", {"hard_negatives": torch.randn(B + 1, M, D)}, {},
     ValueError, r"hard_negatives must have shape \(B, M, D\) = \(4, M, 8\), got \(5, 2, 8\)"),
    ("hard_negatives of another dim", {"hard_negatives": torch.randn(B, M, D - 1)}, {},
     ValueError, r"hard_negatives must have shape \(B, M, D\) = \(4, M, 8\), got \(4, 2, 7\)"),
    ("target_ids of wrong length", {"target_ids": torch.arange(B + 1)}, {}, ValueError,
     r"target_ids must have shape \(4,\), got \(5,\)"),
    ("2-d target_ids", {"target_ids": torch.arange(B)[:, None]}, {}, ValueError,
     r"target_ids must have shape \(4,\), got \(4, 1\)"),
    ("hard_negative_ids of wrong shape", {"hard_negative_ids": torch.arange(B * M)}, {},
     ValueError, r"hard_negative_ids must have shape \(4, 2\), got \(8,\)"),
    ("int32 target_ids", {"target_ids": torch.arange(B, dtype=torch.int32)}, {}, TypeError,
     r"target_ids must be an int64 tensor, got torch.int32"),
    ("float hard_negative_ids", {"hard_negative_ids": torch.zeros(B, M)}, {}, TypeError,
     r"hard_negative_ids must be an int64 tensor, got torch.float32"),
    ("target_ids a list", {"target_ids": list(range(B))}, {}, TypeError,
     r"target_ids must be an int64 tensor, got list"),
    ("hard_negative_ids without hard_negatives", {"hard_negatives": None}, {}, ValueError,
     r"hard_negative_ids \(shape \(4, 2\)\) was given without hard_negatives"),
    ("hard_negative_ids alone with hard_negatives", {"target_ids": None}, {}, ValueError,
     r"hard_negative_ids needs target_ids.*\(target_ids is None\)"),
]  # fmt: skip


@pytest.mark.parametrize(
    "changes,options,error,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_named(changes, options, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(_args(**changes), **options)


def test_target_ids_without_hard_negatives_is_valid():
    """target_ids alone (no hard negatives) masks duplicate in-batch targets: not an error."""
    _call(_args(hard_negatives=None, hard_negative_ids=None, target_ids=torch.zeros(B).long()))


@pytest.mark.parametrize("name", ["query", "target", "hard_negatives"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_named(name, bad):
    args = _args()
    args[name].view(-1)[3] = bad
    args[name].view(-1)[5] = bad
    with pytest.raises(FloatingPointError, match=rf"^{name} holds 2 NaN or Inf value\(s\)"):
        _call(args)


def test_huge_finite_input_is_not_reported():
    """Only NaN and Inf are errors: finite values whose sum overflows fp32 pass the scan."""
    big = torch.full((B, D), 3e38)
    loss = _call(_args(query=big, hard_negatives=None, target_ids=None, hard_negative_ids=None))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("name", ["query", "target", "hard_negatives"])
def test_check_finite_false_skips_the_scan(name, monkeypatch):
    """check_finite=False runs no scan (the op's own sync-free path) and lets the NaN through."""
    scans = []
    scan = hardneg._finite.check_finite
    monkeypatch.setattr(hardneg._finite, "check_finite", lambda t: scans.append(t) or scan(t))
    args = _args()
    args[name].view(-1)[0] = float("nan")
    loss = _call(dict(args), check_finite=False, reduction="none")
    assert scans == []
    assert not torch.isfinite(loss).all()
    with pytest.raises(FloatingPointError, match=re.escape(name)):
        _call(args)
    assert len(scans) == 1


def test_op_refuses_a_fused_gradient_for_reduction_none():
    """The raw op can fuse the gradient only for a scalar loss: asking for it with reduction none
    (which the public function never does) is an error, not a wrongly shaped backward."""
    q = torch.randn(B, D)
    with pytest.raises(ValueError, match="fuse_grad=True needs reduction 'mean' or 'sum'"):
        torch.ops.hardneg.hardneg_loss(
            q, q, None, None, None, LossSpec(reduction="none").encode(), True
        )
