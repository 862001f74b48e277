"""The loss family's defining properties (design section 1), held by the plain-torch reference and
by the fused op alike: InfoNCE is plain cross-entropy; EGA's forward is InfoNCE's and its gradient
w.r.t. s is (Pbar - Y) / tau with Pbar_ij = P_ij a_ij / sum_k P_ik a_ik the renormalised
amplification (a = 1 at the positive), so every row of dS sums to zero; LLaVE's is (P - Y) / tau
with P the softmax of its shifted logits (the alpha term is stop-gradient); llave with alpha = 0
is infonce; masking a candidate is deleting it.

The hand-computed cases write dL/dS out in plain Python floats from the formulas of design
section 1, independent of both implementations. They recover dS from the op through orthonormal
candidates (c_j = e_j, so s_ij = q_i[j] and dL/dq = dS . C = dS).

Legend: B queries, M hard negatives per query, N = B + B*M candidates, D embedding dim.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hardneg import (
    ALPHA,
    EGA_BETA,
    EGA_MARGIN,
    TEMPERATURE,
    _ops,
    fused_hardneg_loss,
    hardneg_loss_reference,
)
from hardneg._constants import MODES
from hardneg.reference import _direction_loss
from loss_testing import (
    FP64_ROUNDOFF,
    check_close,
    loss_and_grads,
    make_inputs,
    reference_outputs,
    rule_for,
)

LOSSES = {"op": fused_hardneg_loss, "reference": hardneg_loss_reference}
# The dtype each is run in: the op computes in fp32 (it rejects fp64), the reference in fp64, both
# on the same fp64-built inputs (rounded once for the op) and held to the same fp64 truth.
DTYPES = {"op": torch.float32, "reference": torch.float64}


def _check(loss_name: str, got: dict, truth: dict, plain: dict | None, B: int, **call) -> None:
    """The one error rule (tests/loss_testing.py) against fp64 expected values: the op with plain
    torch in fp32 (plain: the same expected values computed by the reference in fp32); the fp64
    reference, which is plain torch itself, with fp64's unit roundoff and no plain term."""
    rule = rule_for(B, **call)
    if loss_name == "op":
        check_close(got, truth, plain, **rule)
    else:
        check_close(got, truth, None, roundoff=FP64_ROUNDOFF, **rule)


def ds_by_hand(s_rows, *, mode, tau=TEMPERATURE, alpha=ALPHA, beta=EGA_BETA, margin=EGA_MARGIN):
    """dL_i/ds_ij of loss_i = logsumexp_j z_ij - z_ii (positive of row i at column i), in Python
    floats: (Pbar - Y) / tau, Pbar = P = softmax(z) except for ega, where
    Pbar_ij = P_ij a_ij / sum_k P_ik a_ik, a_ij = exp(beta * max(0, s_ij - s_ii + margin)) on
    negatives and a_ii = 1 (the renormalised amplification, README "The loss")."""
    out = []
    for i, row in enumerate(s_rows):
        z = [
            s / tau + (alpha * s if mode == "llave" and j != i else 0.0) for j, s in enumerate(row)
        ]
        top = max(z)
        e = [math.exp(v - top) for v in z]
        p = [v / sum(e) for v in e]
        amp = [
            math.exp(beta * max(0.0, s - row[i] + margin)) if mode == "ega" and j != i else 1.0
            for j, s in enumerate(row)
        ]
        weighted = [p_ij * a_ij for p_ij, a_ij in zip(p, amp, strict=True)]
        pbar = [w / sum(weighted) for w in weighted]
        out.append([(pbar_ij - (1.0 if j == i else 0.0)) / tau for j, pbar_ij in enumerate(pbar)])
    return out


# Two queries against an orthonormal pool [t_0, t_1, h_0, h_1] = [e_0, e_1, e_2, e_3], so row i of
# query is row i of S. With beta = 5 and margin = 0.1 (HAND_BETA, HAND_MARGIN; a margin > 0 also
# exercises negatives just below the positive), EGA amplifies (0, 1) by
# exp(5 * 0.15) and (1, 2) by exp(5 * 0.12), (1, 3) by exp(5 * 0.08), and leaves (0, 2), (0, 3) and
# (1, 0) alone (s_ij - s_ii + margin <= 0).
HAND_BETA, HAND_MARGIN = 5.0, 0.1
S_2x4 = [[0.50, 0.55, 0.30, 0.35], [0.20, 0.60, 0.62, 0.58]]
AMP_2x4 = [[1.0, math.exp(0.75), 1.0, 1.0], [1.0, 1.0, math.exp(0.6), math.exp(0.4)]]


def _orthonormal_case() -> tuple[dict, torch.Tensor]:
    eye = torch.eye(4, dtype=torch.float64)
    inputs = {
        "query": torch.tensor(S_2x4, dtype=torch.float64),
        "target": eye[:2].clone(),
        "hard_negatives": eye[2:, None].clone(),  # (B=2, M=1, D=4)
    }
    return inputs, eye


def _expected_grads(ds_BN: torch.Tensor, inputs: dict) -> dict:
    """dq = dS . C and dC = dS^T . Q for the orthonormal pool C = I."""
    dc_ND = ds_BN.T @ inputs["query"]
    return {"d_query": ds_BN, "d_target": dc_ND[:2], "d_hard_negatives": dc_ND[2:, None]}


def test_ega_amplification_table_by_hand():
    """The AMP_2x4 table is the design's a_ij = exp(beta * max(0, s_ij - s_ii + margin))."""
    for i, row in enumerate(S_2x4):
        for j, s in enumerate(row):
            if j != i:
                h = s - row[i] + HAND_MARGIN
                assert math.isclose(math.exp(HAND_BETA * max(0.0, h)), AMP_2x4[i][j], rel_tol=1e-12)


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_gradient_by_hand(loss_name, mode):
    """dL/dS of every mode on the 2x4 hand case equals design section 1's formula."""
    inputs, _ = _orthonormal_case()
    hand = {"beta": HAND_BETA, "margin": HAND_MARGIN}
    ds_BN = torch.tensor(ds_by_hand(S_2x4, mode=mode, **hand), dtype=torch.float64)
    call = {"mode": mode, "reduction": "sum", "ega_beta": HAND_BETA, "ega_margin": HAND_MARGIN}
    got = loss_and_grads(LOSSES[loss_name], inputs, dtype=DTYPES[loss_name], **call)
    plain = reference_outputs(inputs, dtype=torch.float32, **call)
    _check(loss_name, got, _expected_grads(ds_BN, inputs), plain, 2, **call)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_ega_gradient_differs_from_infonce_as_designed(loss_name):
    """dS_ega - dS_infonce = (Pbar - P) / tau with Pbar the renormalised P * a: each entry's
    weight changes by a_ij / sum_k P_ik a_ik, up for the hardest negatives, down for the rest."""
    inputs, _ = _orthonormal_case()
    hand = {"ega_beta": HAND_BETA, "ega_margin": HAND_MARGIN, "reduction": "sum"}

    def ega_minus_infonce(run) -> torch.Tensor:
        return run(mode="ega", **hand)["d_query"] - run(mode="infonce", **hand)["d_query"]

    diff = ega_minus_infonce(
        lambda **o: loss_and_grads(LOSSES[loss_name], inputs, dtype=DTYPES[loss_name], **o)
    )
    plain = ega_minus_infonce(lambda **o: reference_outputs(inputs, dtype=torch.float32, **o))
    s_BN = torch.tensor(S_2x4, dtype=torch.float64)
    p_BN = torch.softmax(s_BN / TEMPERATURE, dim=1)
    amp_BN = torch.tensor(AMP_2x4, dtype=torch.float64)
    pbar_BN = p_BN * amp_BN / (p_BN * amp_BN).sum(dim=1, keepdim=True)
    expected = (pbar_BN - p_BN) / TEMPERATURE
    _check(loss_name, {"d_query": diff}, {"d_query": expected}, {"d_query": plain}, 2, **hand)
    # Pbar / P is a_ij over the row's normaliser: the most amplified entry of each row gains, the
    # positive (a = 1) loses, both by far more than the tolerance.
    top = amp_BN.argmax(dim=1)
    assert (diff[torch.arange(2), top] > 1e-3).all() and (diff.diagonal() < -1e-3).all()


def _ds_rows(loss_name: str, inputs: dict, **options) -> torch.Tensor:
    """dL/dS (B, B) of one direction through orthonormal candidates: query = S, target = I."""
    B = inputs["query"].shape[0]
    eye = torch.eye(B, dtype=torch.float64)
    got = loss_and_grads(
        LOSSES[loss_name],
        {"query": inputs["query"], "target": eye},
        dtype=DTYPES[loss_name],
        **options,
    )
    return got["d_query"]


@pytest.mark.parametrize("loss_name", LOSSES)
def test_ega_gradient_rows_sum_to_zero(loss_name):
    """sum_j Pbar_ij = 1, so each row of dS = w (Pbar - Y) / tau sums to 0: the gradient pulls
    the positive exactly as hard as it pushes the negatives. With a margin that puts every
    negative in reach (most rows amplified), the unnormalised form (Pbar = P a, sum >= 1) left a
    net push of up to e^(beta * (margin + 1)) / tau per row; here the sums are at fp rounding."""
    g = torch.Generator().manual_seed(5)
    B = 33
    s_BB = torch.rand(B, B, generator=g, dtype=torch.float64) * 0.6 + 0.2  # cosine-like
    options = {"mode": "ega", "reduction": "sum", "ega_beta": 20.0, "ega_margin": 0.3}
    ds_BB = _ds_rows(loss_name, {"query": s_BB}, **options)
    u_BB = options["ega_beta"] * (s_BB - s_BB.diagonal()[:, None] + 0.3).clamp_min(0)
    u_BB.fill_diagonal_(0.0)
    assert (u_BB > 0).sum() > B * B // 2  # the amplification is active on most entries
    # Each Pbar_ij carries a relative error of a few roundings of its logit z + u (<= zu_max), and
    # sum_j |dS_ij| <= 2 / tau: 4 such roundings of the largest logit, in fp32 (op) or fp64.
    zu_max = (s_BB / TEMPERATURE + u_BB).abs().max().item()
    unit = 2.0**-24 if loss_name == "op" else 2.0**-53
    tol = 4 * unit * zu_max * 2 / TEMPERATURE
    assert ds_BB.sum(dim=1).abs().max().item() <= tol
    assert ds_BB.abs().max().item() > 1.0  # rows are far from trivially zero
    # The check can fail: the unnormalised form's rows sum to (sum_j P_ij e^u_ij - 1) / tau.
    p_BB = torch.softmax(s_BB / TEMPERATURE, dim=1)
    unnormalised = ((p_BB * u_BB.exp()).sum(dim=1) - 1) / TEMPERATURE
    assert unnormalised.abs().max().item() > 1e3 * tol


def test_kernel_gradient_by_hand_2x3():
    """The CPU kernel alone on a 2x3 block of S (rows 0, 1 with positives at columns 0, 1; column 2
    a negative of both): the loss and dS it writes in place match the hand formulas."""
    s_rows = [[0.50, 0.55, 0.30], [0.20, 0.60, 0.62]]
    for mode in MODES:
        s_RN = torch.tensor(s_rows, dtype=torch.float32)
        stats_4R = torch.zeros(4, 2, dtype=torch.float32)  # lse, z_pos, s_pos, loss
        params = _ops.new_params(torch.device("cpu"))
        params.mode = MODES.index(mode)
        params.inv_tau = 1 / TEMPERATURE
        params.alpha = ALPHA
        params.ega_beta = HAND_BETA
        params.ega_margin = HAND_MARGIN
        params.rows, params.cols, params.ld_s, params.pos_offset = 2, 3, 3, 0
        params.s = s_RN.data_ptr()
        params.lse, params.z_pos = stats_4R[0].data_ptr(), stats_4R[1].data_ptr()
        params.s_pos, params.loss = stats_4R[2].data_ptr(), stats_4R[3].data_ptr()
        params.need_grad = True
        params.grad_scale = 1.0
        _ops.kernels_for(torch.device("cpu")).hardneg_loss_rows(params)
        s64 = torch.tensor(s_rows, dtype=torch.float64)
        z = s64 / TEMPERATURE + (ALPHA * s64 * (1 - torch.eye(2, 3)) if mode == "llave" else 0)
        loss_R = torch.logsumexp(z, dim=1) - z.diagonal()
        ds_RN = torch.tensor(
            ds_by_hand(s_rows, mode=mode, beta=HAND_BETA, margin=HAND_MARGIN), dtype=torch.float64
        )
        # The one rule, per row (reduction "none", weight 1): plain torch in fp32 is the
        # reference's row loss on the same block (rows = S, candidates = the identity, so
        # dL/drows = dS).
        rows = torch.tensor(s_rows, dtype=torch.float32, requires_grad=True)
        hand = (mode, TEMPERATURE, ALPHA, HAND_BETA, HAND_MARGIN)
        plain_loss_R = _direction_loss(rows, torch.eye(3), None, None, *hand)
        (plain_ds_RN,) = torch.autograd.grad(plain_loss_R.sum(), rows)
        check_close(
            {"loss": stats_4R[3], "d_query": s_RN},
            {"loss": loss_R, "d_query": ds_RN},
            {"loss": plain_loss_R.detach(), "d_query": plain_ds_RN},
            **rule_for(2, reduction="none", mode=mode),
        )


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["q2t", "sym"])
def test_ega_forward_is_infonce(loss_name, reduction, symmetric):
    inputs = make_inputs(7, 59, 2, ids=True, dtype=torch.float64)
    options = {"reduction": reduction, "symmetric": symmetric}
    loss_fn = LOSSES[loss_name]
    ega = loss_and_grads(loss_fn, inputs, dtype=DTYPES[loss_name], mode="ega", **options)
    infonce = loss_and_grads(loss_fn, inputs, dtype=DTYPES[loss_name], mode="infonce", **options)
    if loss_name == "op":
        # One kernel path computes both values: the logits and their logsumexp are the same code.
        assert torch.equal(ega["loss"], infonce["loss"])
    else:
        # The reference adds a surrogate x - x, zero up to one rounding of the loss.
        torch.testing.assert_close(ega["loss"], infonce["loss"], rtol=1e-15, atol=1e-15)
    # ... while the gradients do differ: this input has hard negatives that EGA amplifies.
    assert (ega["d_hard_negatives"] - infonce["d_hard_negatives"]).abs().max() > 1e-3


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["q2t", "sym"])
def test_ega_without_amplification_is_infonce(loss_name, symmetric):
    """beta = 0 or a margin below every hardness makes a = 1: EGA is then InfoNCE, gradients too."""
    inputs = make_inputs(7, 59, 2, ids=True, dtype=torch.float64)
    loss_fn = LOSSES[loss_name]
    options = {"symmetric": symmetric, "reduction": "sum"}
    truth = reference_outputs(inputs, dtype=torch.float64, mode="infonce", **options)
    plain = reference_outputs(inputs, dtype=torch.float32, mode="infonce", **options)
    for beta, margin in ((0.0, EGA_MARGIN), (EGA_BETA, -3.0)):
        ega = loss_and_grads(
            loss_fn,
            inputs,
            dtype=DTYPES[loss_name],
            mode="ega",
            ega_beta=beta,
            ega_margin=margin,
            **options,
        )
        _check(loss_name, ega, truth, plain, 7, mode="ega", **options)


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["q2t", "sym"])
def test_llave_with_zero_alpha_is_infonce(loss_name, symmetric):
    inputs = make_inputs(257, 59, 2, ids=True, dtype=torch.float64)
    loss_fn = LOSSES[loss_name]
    options = {"symmetric": symmetric, "reduction": "mean"}
    llave = loss_and_grads(
        loss_fn, inputs, dtype=DTYPES[loss_name], mode="llave", alpha=0.0, **options
    )
    infonce = loss_and_grads(loss_fn, inputs, dtype=DTYPES[loss_name], mode="infonce", **options)
    truth = reference_outputs(inputs, dtype=torch.float64, mode="infonce", **options)
    plain = reference_outputs(inputs, dtype=torch.float32, mode="infonce", **options)
    _check(loss_name, llave, truth, plain, 257, mode="llave", alpha=0.0, **options)
    # alpha does matter otherwise: the default weight changes the loss by far more than that.
    weighted = loss_and_grads(loss_fn, inputs, dtype=DTYPES[loss_name], mode="llave", **options)
    assert (weighted["loss"] - infonce["loss"]).abs() > 0.1


@pytest.mark.parametrize("symmetric", [False, True], ids=["q2t", "sym"])
def test_reference_infonce_is_cross_entropy(symmetric):
    """The oracle in its plainest form: InfoNCE is F.cross_entropy over S / tau (both directions
    averaged when symmetric), values and gradients."""
    inputs = make_inputs(7, 59, 2, dtype=torch.float64)
    q, t, h = inputs["query"], inputs["target"], inputs["hard_negatives"]

    def cross_entropy(query, target, *, hard_negatives, **_):
        labels = torch.arange(query.shape[0])
        cands = torch.cat([target, hard_negatives.flatten(0, 1)])
        loss = F.cross_entropy(query @ cands.T / TEMPERATURE, labels)
        if symmetric:
            loss = (loss + F.cross_entropy(target @ query.T / TEMPERATURE, labels)) / 2
        return loss

    want = loss_and_grads(cross_entropy, {"query": q, "target": t, "hard_negatives": h})
    got = loss_and_grads(
        hardneg_loss_reference,
        {"query": q, "target": t, "hard_negatives": h},
        mode="infonce",
        symmetric=symmetric,
    )
    options = {"mode": "infonce", "symmetric": symmetric}
    check_close(got, want, None, roundoff=FP64_ROUNDOFF, **rule_for(7, **options))


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_masking_a_candidate_is_deleting_it(loss_name, mode):
    """One hard negative carries the id of target 3, so it is a false negative of query 3 only.
    Query 3's loss and gradients then equal those of a problem where it was deleted: query 3 alone
    against [t_3 (positive); the other targets; the other hard negatives]. The other rows are
    unchanged by the mask, and the masked candidate gets no gradient from query 3."""
    B, M, D = 5, 3, 59
    base = make_inputs(B, D, M)
    q, t, h = base["query"], base["target"], base["hard_negatives"]
    # Mask the hard negative (of any query) that query 3 finds most similar: it carries real
    # probability in query 3's row, so the mask visibly changes that row.
    h_flat = h.flatten(0, 1)
    k = (h_flat @ q[3]).argmax().item()
    target_ids = torch.arange(B)
    hard_ids = torch.arange(100, 100 + B * M)
    hard_ids[k] = target_ids[3]
    options = {"mode": mode, "reduction": "none"}
    row3 = torch.zeros(B, dtype=torch.float64)
    row3[3] = 1.0
    masked_inputs = {**base, "target_ids": target_ids, "hard_negative_ids": hard_ids.view(B, M)}
    masked = loss_and_grads(
        LOSSES[loss_name], masked_inputs, dtype=DTYPES[loss_name], grad_output=row3, **options
    )
    others = [0, 1, 2, 4]
    keep_h = [j for j in range(B * M) if j != k]
    deleted_pool = torch.cat([t[others], h_flat[keep_h]])[None]  # (1, N - 2, D)

    def expected(dtype: torch.dtype) -> dict:
        """The unmasked problem's outputs, with query 3's row from the deletion problem; both
        computed by the reference in `dtype` (fp64: the truth; fp32: plain torch)."""
        unmasked = reference_outputs(base, dtype=dtype, grad_output=row3, **options)
        deleted = reference_outputs(
            {"query": q[3:4], "target": t[3:4], "hard_negatives": deleted_pool},
            dtype=dtype,
            **options,
        )
        d_hard = torch.zeros(B * M, D, dtype=dtype)
        d_hard[keep_h] = deleted["d_hard_negatives"][0, len(others) :]
        d_target = torch.zeros(B, D, dtype=dtype)
        d_target[3] = deleted["d_target"][0]
        d_target[others] = deleted["d_hard_negatives"][0, : len(others)]
        d_query = torch.zeros(B, D, dtype=dtype)
        d_query[3] = deleted["d_query"][0]
        loss = unmasked["loss"].clone()
        loss[3] = deleted["loss"][0]
        return {
            "loss": loss,
            "d_query": d_query,
            "d_target": d_target,
            "d_hard_negatives": d_hard.view(B, M, D),
        }

    truth = expected(torch.float64)
    _check(loss_name, masked, truth, expected(torch.float32), B, grad_output=row3, **options)
    # The mask is not vacuous: without it query 3's loss is clearly different.
    unmasked = reference_outputs(base, dtype=torch.float64, **options)
    assert (unmasked["loss"][3] - masked["loss"][3]).abs() > 1e-3
