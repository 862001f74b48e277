"""hardneg_loss, the fused op, against the plain-torch reference (fp64 truth): values and gradients
of query, target and hard negatives for every mode, direction, masking and reduction, on awkward
sizes, both backward paths, low-precision inputs, and a proof that the comparison can fail.

Tolerances, fp64 inputs. The op casts to fp32 and accumulates there by design (design section 1),
so fp64 inputs measure its fp32 error. fp32's unit roundoff u is 6e-8; the D <= 128 term dot
products of unit vectors and the logsumexp leave ~1e-6 relative error in s and in the
probabilities. Logits are s / tau (+ alpha * s on llave's negatives), so an error in s reaches the
loss and dL/dS amplified by up to 1 / tau + alpha = 50 + 9 at the defaults: RTOL_FP32 = 1e-6 * 59
~ 6e-5 of the largest reference magnitude of each output.
A row the model already ranks well (P_pos within u of 1) has a tiny loss and gradient, but fp32
cannot resolve P_pos - 1 (nor lse - z_pos) better than u: dS = w_i (P - Y) / tau keeps an absolute
error ~ u |w_i| / tau = 3e-6 |w_i| however small its value, where w_i is row i's weight
(grad_output_i, divided by B for "mean"). So each output also gets an absolute floor of RTOL_FP32
times its natural unit (loss_testing.fp32_floor): |w| for gradients, 1 nat per row for the loss
(B for "sum").
Measured (B <= 257, all cases): errors reach at most 0.09 of the budget (d_query), while a 1e-3
relative change of tau is caught (test_wrong_temperature_is_caught). bf16 / fp16: the op's error is
at most 0.21 of plain torch's in the same dtype, against the 2x allowed.
"""

from __future__ import annotations

import hardneg.loss
import pytest
import torch
from hardneg import TEMPERATURE, fused_hardneg_loss, hardneg_loss_reference
from hardneg._schedule import default_chunk_size
from loss_testing import (
    RTOL_FP32,
    allowed_error,
    check_close,
    check_no_worse,
    fp32_floor,
    loss_and_grads,
    make_inputs,
    max_error,
)

MODES = ("infonce", "llave", "ega")
REDUCTIONS = ("mean", "sum", "none")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch / OpenMP thread by default. The CI machines are small and shared: with two
    threads, OpenMP's spin-waiting under contention quadruples the CPU time of this file. The
    kernel's multi-threaded row split runs in the tests that ask for two_threads (B = 1500)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def two_threads(one_thread):
    """Two threads, so the kernel splits rows across OpenMP threads (params.num_threads > 1)."""
    torch.set_num_threads(2)
    yield


def _grad_output(reduction: str, B: int, seed: int = 1) -> torch.Tensor | float:
    """A random per-query grad_output for "none"; 3.7 for mean / sum, so that the fused path's
    backward has to scale its saved gradients instead of passing them through."""
    if reduction == "none":
        return torch.randn(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 3.7


def _check_against_reference(B, D, M, *, ids, mode, symmetric, reduction, chunk_size) -> None:
    inputs = make_inputs(B, D, M, ids=ids)
    options = {"mode": mode, "symmetric": symmetric, "reduction": reduction}
    grad_output = _grad_output(reduction, B)
    want = loss_and_grads(hardneg_loss_reference, inputs, grad_output=grad_output, **options)
    got = loss_and_grads(
        fused_hardneg_loss, inputs, grad_output=grad_output, chunk_size=chunk_size, **options
    )
    assert got["loss"].dtype == torch.float32
    assert got["loss"].shape == ((B,) if reduction == "none" else ())
    for name in ("d_query", "d_target", "d_hard_negatives"):
        if name in got:
            assert got[name].dtype == torch.float64, name
    check_close(got, want, rtol=RTOL_FP32, atol=fp32_floor(reduction, B, grad_output))


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
    masked = loss_and_grads(fused_hardneg_loss, inputs, mode=mode, symmetric=True)
    unmasked_inputs = {**inputs, "target_ids": None, "hard_negative_ids": None}
    unmasked = loss_and_grads(fused_hardneg_loss, unmasked_inputs, mode=mode, symmetric=True)
    for name in masked:
        allowed = allowed_error(masked[name], rtol=RTOL_FP32, atol=fp32_floor("mean", 7)[name])
        assert max_error(masked[name], unmasked[name]) > 100 * allowed, name


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
    got = loss_and_grads(fused_hardneg_loss, no_hn_ids, grad_output=0.5, chunk_size=3, **opts)
    want = loss_and_grads(hardneg_loss_reference, no_hn_ids, grad_output=0.5, **opts)
    check_close(got, want, rtol=RTOL_FP32, atol=fp32_floor("none", 7, 0.5))
    # The same as ids the targets never use, and not the same as the masking ids.
    fresh = {**inputs, "hard_negative_ids": torch.full((7, 2), 10**6)}
    check_close(got, loss_and_grads(hardneg_loss_reference, fresh, grad_output=0.5, **opts),
                rtol=RTOL_FP32, atol=fp32_floor("none", 7, 0.5))  # fmt: skip
    masked = loss_and_grads(hardneg_loss_reference, inputs, grad_output=0.5, **opts)
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
            got = loss_and_grads(fused_hardneg_loss, case, grad_output=0.5, chunk_size=3, **opts)
            want = loss_and_grads(hardneg_loss_reference, case, grad_output=0.5, **opts)
            check_close(got, want, rtol=RTOL_FP32, atol=fp32_floor("none", 7, 0.5))


def test_zero_hard_negatives_per_query():
    """hard_negatives of shape (B, 0, D) is the no-hard-negative loss, with an empty gradient."""
    inputs = make_inputs(7, 59, ids=True)
    inputs["hard_negatives"] = torch.zeros(7, 0, 59, dtype=torch.float64)
    inputs["hard_negative_ids"] = torch.zeros(7, 0, dtype=torch.int64)
    got = loss_and_grads(fused_hardneg_loss, inputs, mode="ega", symmetric=True)
    want = loss_and_grads(hardneg_loss_reference, inputs, mode="ega", symmetric=True)
    check_close(got, want, rtol=RTOL_FP32, atol=fp32_floor("mean", 7))
    assert got["d_hard_negatives"].shape == (7, 0, 59)


# ---------------------------------------------------------------------------------------------
# Low precision: error against fp64 truth at most 2x the error of plain torch in the same dtype.
# ---------------------------------------------------------------------------------------------
# truth: the fp64 reference on the rounded inputs (so input rounding is nobody's error); plain: the
# reference run in bf16 / fp16. The op accumulates in fp32, so its own error is the fp32 one above
# plus rounding the gradients to the input dtype, which plain torch pays as well (and much more:
# at tau = 0.02 logits reach 50, where bf16's step is 0.25). Floor: RTOL_FP32 of the largest
# |truth|, the op's fp32 budget, for an output that plain torch happens to get (nearly) exact; it
# is 60x below a bf16 ulp and 8x below an fp16 ulp of that largest entry.


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["q2t", "sym"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_no_worse_than_plain_torch(dtype, mode, symmetric, reduction):
    inputs = make_inputs(257, 59, 2, ids=True, dtype=dtype)
    options = {"mode": mode, "symmetric": symmetric, "reduction": reduction}
    grad_output = _grad_output(reduction, 257)
    got = loss_and_grads(
        fused_hardneg_loss, inputs, grad_output=grad_output, chunk_size=16, **options
    )
    plain = loss_and_grads(hardneg_loss_reference, inputs, grad_output=grad_output, **options)
    truth = loss_and_grads(
        hardneg_loss_reference, inputs, grad_output=grad_output, dtype=torch.float64, **options
    )
    assert got["loss"].dtype == torch.float32
    for name in ("d_query", "d_target", "d_hard_negatives"):
        assert got[name].dtype == dtype, name
    check_no_worse(got, plain, truth, factor=2.0, atol_rel=RTOL_FP32)


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
    grad_output = _grad_output(reduction, 7)
    got = loss_and_grads(
        fused_hardneg_loss, inputs, grad_output=grad_output, chunk_size=3, **options
    )
    want = loss_and_grads(hardneg_loss_reference, inputs, grad_output=grad_output, **options)
    check_close(got, want, rtol=RTOL_FP32, atol=fp32_floor(reduction, 7, grad_output))
    assert calls == {"fuse_grad": [reduction != "none"], "recompute": int(reduction == "none")}


def test_fused_and_recompute_paths_agree():
    """reduction "mean" (fused) and "none" then .mean() (recompute) are the same function."""
    inputs = make_inputs(257, 59, 2, ids=True, dtype=torch.float32)
    for mode in MODES:
        options = {"mode": mode, "symmetric": True, "chunk_size": 16}
        fused = loss_and_grads(fused_hardneg_loss, inputs, grad_output=3.7, **options)
        recompute = loss_and_grads(
            lambda *a, **k: fused_hardneg_loss(*a, reduction="none", **k).mean(),
            inputs,
            grad_output=3.7,
            **options,
        )
        check_close(fused, recompute, rtol=RTOL_FP32, atol=fp32_floor("mean", 257, 3.7))


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("needs_grad", ["query", "target", "hard_negatives"])
def test_gradient_of_one_input_only(needs_grad, reduction):
    """Only the inputs that require grad get one, on either path, and it is right."""
    inputs = make_inputs(7, 59, 2, ids=True)
    kwargs = {k: v.clone() for k, v in inputs.items()}
    leaf = kwargs[needs_grad].requires_grad_()
    options = {"mode": "llave", "symmetric": True, "reduction": reduction}
    grad_output = _grad_output(reduction, 7)
    loss = fused_hardneg_loss(kwargs.pop("query"), kwargs.pop("target"), **kwargs, **options)
    loss.backward(torch.as_tensor(grad_output, dtype=loss.dtype).expand_as(loss))
    want = loss_and_grads(hardneg_loss_reference, inputs, grad_output=grad_output, **options)
    name = "d_" + needs_grad
    check_close(
        {name: leaf.grad},
        {name: want[name]},
        rtol=RTOL_FP32,
        atol=fp32_floor(reduction, 7, grad_output)[name],
    )


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


FLOOR_PASSING = fp32_floor("mean", 7, 3.7)


def _passing_case() -> tuple[dict, dict]:
    inputs = make_inputs(7, 59, 2, ids=True)
    options = {"mode": "ega", "symmetric": True, "reduction": "mean"}
    got = loss_and_grads(fused_hardneg_loss, inputs, grad_output=3.7, chunk_size=3, **options)
    want = loss_and_grads(hardneg_loss_reference, inputs, grad_output=3.7, **options)
    check_close(got, want, rtol=RTOL_FP32, atol=FLOOR_PASSING)
    return got, want


@pytest.mark.parametrize("name", ["loss", "d_query", "d_target", "d_hard_negatives"])
def test_perturbation_just_above_tolerance_is_caught(name):
    got, want = _passing_case()
    allowed = allowed_error(want[name], rtol=RTOL_FP32, atol=FLOOR_PASSING[name])
    # Set one entry to the reference plus 1.01x the budget: the max error is then just above it.
    # 0.99x must still pass, so the threshold sits exactly where the tolerance says.
    for factor, should_pass in ((0.99, True), (1.01, False)):
        bad = dict(got)
        bad[name] = got[name].clone().double()
        bad[name].view(-1)[-1] = want[name].reshape(-1)[-1] + factor * allowed
        if should_pass:
            check_close(bad, want, rtol=RTOL_FP32, atol=FLOOR_PASSING)
        else:
            with pytest.raises(AssertionError, match=name):
                check_close(bad, want, rtol=RTOL_FP32, atol=FLOOR_PASSING)


def test_wrong_temperature_is_caught():
    """A 0.1% error in tau (logits off by ~0.1% of up to 50) fails the comparison."""
    inputs = make_inputs(257, 59, 2, ids=True)
    options = {"mode": "llave", "symmetric": True, "reduction": "mean"}
    got = loss_and_grads(fused_hardneg_loss, inputs, temperature=TEMPERATURE * 1.001, **options)
    want = loss_and_grads(hardneg_loss_reference, inputs, temperature=TEMPERATURE, **options)
    with pytest.raises(AssertionError, match="loss: max error"):
        check_close(got, want, rtol=RTOL_FP32, atol=fp32_floor("mean", 257))


def test_low_precision_check_can_fail():
    """check_no_worse rejects an output whose error exceeds 2x plain torch's: the plain bf16
    reference itself, judged against a plain run that is 4x more accurate."""
    inputs = make_inputs(257, 59, 2, ids=True, dtype=torch.bfloat16)
    plain = loss_and_grads(hardneg_loss_reference, inputs, mode="llave")
    truth = loss_and_grads(hardneg_loss_reference, inputs, dtype=torch.float64, mode="llave")
    closer = {k: truth[k] + (plain[k].double() - truth[k]) / 4 for k in truth}
    with pytest.raises(AssertionError, match="d_query"):
        check_no_worse(plain, closer, truth, factor=2.0, atol_rel=RTOL_FP32)
