"""hardneg_loss, the fused op, against the plain-torch reference (fp64 truth): values and gradients
of query, target and hard negatives for every mode, direction, masking and reduction, on awkward
sizes, both backward paths, low-precision inputs, and a proof that the comparison can fail.

Every comparison uses the one error rule of tests/loss_testing.py (its docstring justifies it):
max error <= 2 x (plain torch's error at the op's precision + one rounding of the largest logit
carried to that output). fp64 inputs measure the op's fp32 error (it accumulates in fp32 by
design), judged against plain torch in fp32; bf16 / fp16 inputs are judged against plain torch in
their own dtype, the loss also against plain fp32, and their gradients must be the fp32 path's
rounded once. Measured: errors reach at most 0.50 of the budget (fp32 path; an ega gradient,
infonce and llave 0.36) and 0.08 (bf16 / fp16 gradients), while a 1e-3 relative change of tau
exceeds it 106x to 578x and an entry 1 % over budget is caught.
"""

from __future__ import annotations

import hardneg.loss
import pytest
import torch
from hardneg import TEMPERATURE, fused_hardneg_loss
from hardneg._schedule import default_chunk_size
from loss_testing import (
    check_close,
    check_rounding_only,
    compare_with_reference,
    grad_output_for,
    loss_and_grads,
    make_inputs,
    max_error,
    measure,
    reference_outputs,
    rule_for,
)

MODES = ("infonce", "llave", "ega")
REDUCTIONS = ("mean", "sum", "none")


# One thread (tests/conftest.py); the kernel's multi-threaded row split runs in the tests that ask
# for two_threads (B = 1500).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def two_threads(one_thread):
    """Two threads, so the kernel splits rows across OpenMP threads (params.num_threads > 1)."""
    torch.set_num_threads(2)
    yield


def _check_against_reference(B, D, M, *, ids, mode, symmetric, reduction, chunk_size) -> None:
    """The op on fp64 inputs against the reference (loss_testing.compare_with_reference checks the
    dtypes: fp32 loss, fp64 gradients), grad_output 3.7 or random per query."""
    got = compare_with_reference(
        make_inputs(B, D, M, ids=ids),
        grad_output=grad_output_for(reduction, B),
        mode=mode,
        symmetric=symmetric,
        reduction=reduction,
        chunk_size=chunk_size,
    )
    assert got["loss"].shape == ((B,) if reduction == "none" else ())


# Full cross product at small B: B = 1 (a single row: its only candidates are its own), B = 7 with
# chunk_size 3 (chunks of 3, 3 and 1 rows) and with the default chunk.
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ids", [False, True], ids=["unmasked", "ids"])
@pytest.mark.parametrize("M", [0, 2], ids=["no_hn", "hn2"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["q2t", "sym"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "B,D,chunk_size",
    [(1, 59, None), (1, 128, None), (7, 59, 3), (7, 128, None)],
    ids=["b1_d59", "b1_d128", "b7_d59_chunk3", "b7_d128"],
)
def test_small_matches_reference(B, D, chunk_size, mode, symmetric, M, ids, reduction):
    _check_against_reference(
        B, D, M, ids=ids, mode=mode, symmetric=symmetric, reduction=reduction, chunk_size=chunk_size
    )


# B = 257, the full cross product at D = 59 with chunk_size 16: 16 full chunks and a last chunk of
# one row; N = 771 with two hard negatives. The default chunk at D = 128 is covered above and at
# B = 1500.
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ids", [False, True], ids=["unmasked", "ids"])
@pytest.mark.parametrize("M", [0, 2], ids=["no_hn", "hn2"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["q2t", "sym"])
@pytest.mark.parametrize("mode", MODES)
def test_257_matches_reference(mode, symmetric, M, ids, reduction):
    _check_against_reference(
        257, 59, M, ids=ids, mode=mode, symmetric=symmetric, reduction=reduction, chunk_size=16
    )


# B = 1500, a representative subset: every mode, reduction, direction and masking choice appears
# at least once, with partial last chunks (1500 = 15 * 97 + 45 = 3 * 449 + 153) and the default
# chunk at N = 6000, where it is 1398 rows, so the default also crosses a chunk boundary.
@pytest.mark.parametrize(
    "D,M,ids,mode,symmetric,reduction,chunk_size",
    [
        (128, 3, True, "llave", False, "mean", None),
        (59, 1, True, "ega", True, "none", 97),
        (128, 0, True, "infonce", True, "sum", 256),
        (59, 3, False, "ega", False, "mean", None),
        (59, 1, True, "llave", True, "none", 449),
    ],
)
def test_1500_matches_reference(D, M, ids, mode, symmetric, reduction, chunk_size, two_threads):
    if chunk_size is None and M == 3:
        assert default_chunk_size(1500 * (1 + M)) < 1500  # the default chunk is partial too
    _check_against_reference(
        1500,
        D,
        M,
        ids=ids,
        mode=mode,
        symmetric=symmetric,
        reduction=reduction,
        chunk_size=chunk_size,
    )


@pytest.mark.parametrize("mode", MODES)
def test_ids_change_the_result(mode):
    """The masking cases above are not vacuous: the ids move the loss and gradients far beyond
    the tolerance (the masked candidates carry real probability)."""
    inputs = make_inputs(7, 59, 2, ids=True)
    options = {"mode": mode, "symmetric": True}
    masked = compare_with_reference(inputs, **options)
    budget = measure(
        masked,
        reference_outputs(inputs, dtype=torch.float64, **options),
        reference_outputs(inputs, dtype=torch.float32, **options),
        **rule_for(7, **options),
    )
    unmasked_inputs = {**inputs, "target_ids": None, "hard_negative_ids": None}
    unmasked = loss_and_grads(fused_hardneg_loss, unmasked_inputs, **options)
    for name in masked:
        assert max_error(masked[name], unmasked[name]) > 100 * budget[name]["allowed"], name


@pytest.mark.parametrize("symmetric", [False, True], ids=["q2t", "sym"])
@pytest.mark.parametrize("mode", MODES)
def test_hard_negatives_without_ids_are_never_masked(mode, symmetric):
    """target_ids with hard_negative_ids=None: in-batch duplicates are masked, hard negatives never
    (the reference masks only the columns it has ids for). make_inputs forces a hard negative of
    query 0 to carry its positive's id, so the masked and the unmasked-hard-negative losses
    differ; negative ids such as -1 stay ordinary ids."""
    inputs = make_inputs(7, 59, 2, ids=True)
    inputs["target_ids"] = inputs["target_ids"] - 1  # -1 among them: an ordinary id
    no_hn_ids = {**inputs, "hard_negative_ids": None}
    opts = {"mode": mode, "symmetric": symmetric, "reduction": "none"}
    got = compare_with_reference(no_hn_ids, grad_output=0.5, chunk_size=3, **opts)
    # The same as ids the targets never use, and not the same as the masking ids.
    fresh = {**inputs, "hard_negative_ids": torch.full((7, 2), 10**6)}
    truth = reference_outputs(fresh, dtype=torch.float64, grad_output=0.5, **opts)
    plain = reference_outputs(fresh, dtype=torch.float32, grad_output=0.5, **opts)
    check_close(got, truth, plain, **rule_for(7, 0.5, **opts))
    masked = reference_outputs(inputs, dtype=torch.float64, grad_output=0.5, **opts)
    assert max_error(got["loss"], masked["loss"]) > 1e-3


def test_noncontiguous_inputs_and_ids():
    """Strided views are valid inputs: ids are read per row by the kernel, so a strided id tensor
    must be made contiguous before its pointer is taken."""
    base = make_inputs(14, 59, 2, ids=True)
    inputs = {
        "query": base["query"].T.contiguous().T[::2],
        "target": base["target"][1::2],
        "hard_negatives": base["hard_negatives"][::2].transpose(0, 1).contiguous().transpose(0, 1),
        "target_ids": base["target_ids"][::2],
        "hard_negative_ids": base["hard_negative_ids"][::2],
    }
    assert not inputs["target_ids"].is_contiguous() and not inputs["query"].is_contiguous()
    for hard in (True, False):
        case = dict(inputs)
        if not hard:
            case["hard_negatives"] = case["hard_negative_ids"] = None
        for symmetric in (False, True):
            opts = {"mode": "llave", "symmetric": symmetric, "reduction": "none"}
            compare_with_reference(case, grad_output=0.5, chunk_size=3, **opts)


def test_zero_hard_negatives_per_query():
    """hard_negatives of shape (B, 0, D) is the no-hard-negative loss, with an empty gradient."""
    inputs = make_inputs(7, 59, ids=True)
    inputs["hard_negatives"] = torch.zeros(7, 0, 59)
    inputs["hard_negative_ids"] = torch.zeros(7, 0, dtype=torch.int64)
    got = compare_with_reference(inputs, mode="ega", symmetric=True)
    assert got["d_hard_negatives"].shape == (7, 0, 59)


# ---------------------------------------------------------------------------------------------
# Low precision: the rule against plain torch in the same dtype (bf16's step at a logit of 50 is
# 0.25), the loss also against plain fp32, the gradients the fp32 path's rounded once.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["q2t", "sym"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_no_worse_than_plain_torch(dtype, mode, symmetric, reduction):
    compare_with_reference(
        make_inputs(257, 59, 2, ids=True, dtype=dtype),
        grad_output=grad_output_for(reduction, 257),
        chunk_size=16,
        mode=mode,
        symmetric=symmetric,
        reduction=reduction,
    )


# ---------------------------------------------------------------------------------------------
# The two backward paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_path(reduction, monkeypatch):
    """mean / sum compute the gradients in the forward pass (fuse_grad) and backward only scales
    them; none saves the inputs and recomputes in backward. grad_output is 3.7 or random."""
    calls = {"fuse_grad": [], "recompute": 0}
    forward_op, backward_op = hardneg.loss._hardneg_loss_op, hardneg.loss._hardneg_loss_backward_op

    def spy_forward(*args):
        calls["fuse_grad"].append(args[-1])
        return forward_op(*args)

    def spy_backward(*args):
        calls["recompute"] += 1
        return backward_op(*args)

    monkeypatch.setattr(hardneg.loss, "_hardneg_loss_op", spy_forward)
    monkeypatch.setattr(hardneg.loss, "_hardneg_loss_backward_op", spy_backward)
    inputs = make_inputs(7, 59, 2, ids=True)
    options = {"mode": "ega", "symmetric": True, "reduction": reduction}
    compare_with_reference(
        inputs, grad_output=grad_output_for(reduction, 7), chunk_size=3, **options
    )
    assert calls == {"fuse_grad": [reduction != "none"], "recompute": int(reduction == "none")}


def test_fused_and_recompute_paths_agree():
    """reduction "mean" (fused) and "none" then .mean() (recompute) are the same function: both
    meet the rule, and they differ by less than its budget."""
    inputs = make_inputs(257, 59, 2, ids=True, dtype=torch.float32)
    for mode in MODES:
        options = {"mode": mode, "symmetric": True}
        fused = compare_with_reference(inputs, grad_output=3.7, chunk_size=16, **options)
        recompute = compare_with_reference(
            inputs,
            grad_output=3.7,
            loss_fn=lambda *a, **k: fused_hardneg_loss(*a, reduction="none", **k).mean(),
            chunk_size=16,
            **options,
        )
        plain = reference_outputs(inputs, dtype=torch.float32, grad_output=3.7, **options)
        check_close(fused, recompute, plain, **rule_for(257, 3.7, **options))


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("needs_grad", ["query", "target", "hard_negatives"])
def test_gradient_of_one_input_only(needs_grad, reduction):
    """Only the inputs that require grad get one, on either path, and it is right."""
    inputs = make_inputs(7, 59, 2, ids=True)
    kwargs = {k: v.clone() for k, v in inputs.items()}
    leaf = kwargs[needs_grad].requires_grad_()
    options = {"mode": "llave", "symmetric": True, "reduction": reduction}
    grad_output = grad_output_for(reduction, 7)
    loss = fused_hardneg_loss(kwargs.pop("query"), kwargs.pop("target"), **kwargs, **options)
    loss.backward(torch.as_tensor(grad_output, dtype=loss.dtype).expand_as(loss))
    call = {"grad_output": grad_output, **options}
    truth = reference_outputs(inputs, dtype=torch.float64, **call)
    plain = reference_outputs(inputs, dtype=torch.float32, **call)
    name = "d_" + needs_grad
    check_close({name: leaf.grad}, truth, plain, **rule_for(7, **call))


def test_no_grad_forward_skips_the_gradient(monkeypatch):
    """Under no_grad the op is asked for the loss only (fuse_grad False) and returns it exactly as
    the gradient-computing pass does."""
    seen = []
    forward_op = hardneg.loss._hardneg_loss_op

    def spy(*args):
        seen.append(args[-1])
        return forward_op(*args)

    monkeypatch.setattr(hardneg.loss, "_hardneg_loss_op", spy)
    inputs = make_inputs(7, 59, 2, ids=True)
    with torch.no_grad():
        value = fused_hardneg_loss(inputs.pop("query"), inputs.pop("target"), **inputs)
    with_grad = loss_and_grads(fused_hardneg_loss, make_inputs(7, 59, 2, ids=True))["loss"]
    assert seen == [False, True]
    assert torch.equal(value, with_grad)


# ---------------------------------------------------------------------------------------------
# The comparison can fail
# ---------------------------------------------------------------------------------------------


PASSING_CALL = {"grad_output": 3.7, "mode": "ega", "symmetric": True, "reduction": "mean"}


def _passing_case() -> tuple[dict, dict, dict, dict]:
    """(op outputs, truth, plain fp32, the rule) of a case that passes."""
    inputs = make_inputs(7, 59, 2, ids=True)
    got = loss_and_grads(fused_hardneg_loss, inputs, chunk_size=3, **PASSING_CALL)
    truth = reference_outputs(inputs, dtype=torch.float64, **PASSING_CALL)
    plain = reference_outputs(inputs, dtype=torch.float32, **PASSING_CALL)
    rule = rule_for(7, **PASSING_CALL)
    check_close(got, truth, plain, **rule)
    return got, truth, plain, rule


@pytest.mark.parametrize("name", ["loss", "d_query", "d_target", "d_hard_negatives"])
def test_perturbation_just_above_tolerance_is_caught(name):
    got, truth, plain, rule = _passing_case()
    allowed = measure(got, truth, plain, **rule)[name]["allowed"]
    # Set one entry to the truth plus 1.01x the budget: the max error is then just above it.
    # 0.99x must still pass, so the threshold sits exactly where the rule says.
    for factor, should_pass in ((0.99, True), (1.01, False)):
        bad = dict(got)
        bad[name] = got[name].clone().double()
        bad[name].view(-1)[-1] = truth[name].reshape(-1)[-1] + factor * allowed
        if should_pass:
            check_close(bad, truth, plain, **rule)
        else:
            with pytest.raises(AssertionError, match=name):
                check_close(bad, truth, plain, **rule)


def test_wrong_temperature_is_caught():
    """A 0.1% error in tau (logits off by ~0.1% of up to 50) fails the comparison."""
    inputs = make_inputs(257, 59, 2, ids=True)
    call = {"mode": "llave", "symmetric": True, "reduction": "mean"}
    got = loss_and_grads(fused_hardneg_loss, inputs, temperature=TEMPERATURE * 1.001, **call)
    truth = reference_outputs(inputs, dtype=torch.float64, **call)
    plain = reference_outputs(inputs, dtype=torch.float32, **call)
    with pytest.raises(AssertionError, match="loss: max error"):
        check_close(got, truth, plain, **rule_for(257, **call))


def test_low_precision_check_can_fail():
    """The rule rejects an output whose error exceeds 2x plain torch's: the plain bf16 reference
    itself, judged against a plain run that is 4x more accurate."""
    inputs = make_inputs(257, 59, 2, ids=True, dtype=torch.bfloat16)
    plain = reference_outputs(inputs, dtype=torch.bfloat16, mode="llave")
    truth = reference_outputs(inputs, dtype=torch.float64, mode="llave")
    closer = {k: truth[k] + (plain[k].double() - truth[k]) / 4 for k in truth}
    with pytest.raises(AssertionError, match="d_query"):
        check_close(plain, truth, closer, **rule_for(257, mode="llave"))


def test_rounding_only_check_can_fail():
    """A bf16 gradient entry a few bf16 steps (3 %) off the fp32 path's rounding is caught."""
    inputs = make_inputs(7, 59, 2, ids=True, dtype=torch.bfloat16)
    got = loss_and_grads(fused_hardneg_loss, inputs)
    fp32_path = loss_and_grads(fused_hardneg_loss, inputs, dtype=torch.float32)
    check_rounding_only(got, fp32_path)
    bad = dict(got)
    bad["d_target"] = got["d_target"].clone()
    bad["d_target"].view(-1)[fp32_path["d_target"].abs().argmax()] *= 1 + 4 * 2.0**-7
    with pytest.raises(AssertionError, match="d_target"):
        check_rounding_only(bad, fp32_path)
