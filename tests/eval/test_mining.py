"""Hard-negative selection (hardneg.eval.mining.mine_negatives) against a plain fp64 oracle, the
positive-aware false-negative filter (TopK-PercPos) on planted scores, and its input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hardneg.eval.mining import FN_THRESHOLD, false_negative_threshold, mine_negatives


def oracle(q_ND, c_UD, positive_N, k, fraction):
    """Per query, in fp64 and plain Python: candidates other than the positive whose score is at
    most fraction x the positive's (positive - (1 - fraction)|positive|), best k; and the number
    of candidates above that limit."""
    s_NU = (q_ND.double() @ c_UD.double().T).tolist()
    chosen, filtered = [], []
    for i, row in enumerate(s_NU):
        pos = row[int(positive_N[i])]
        limit = math.inf if math.isinf(fraction) else pos - (1 - fraction) * abs(pos)
        others = [(s, j) for j, s in enumerate(row) if j != int(positive_N[i])]
        kept = sorted(((s, j) for s, j in others if s <= limit), key=lambda t: (-t[0], t[1]))
        chosen.append(kept[:k])
        filtered.append(sum(s > limit for s, _ in others))
    return chosen, filtered


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


@pytest.mark.parametrize(
    "N, U, D, k, fraction, chunk_rows",
    [
        (37, 23, 59, 5, FN_THRESHOLD, 8),  # chunks of 8 rows do not divide 37
        (1, 2, 3, 1, FN_THRESHOLD, 1024),  # the smallest pool: the positive and one other
        (64, 17, 16, 20, 0.5, 64),  # k > U - 1: every query short
        (29, 31, 8, 4, math.inf, 5),  # no filter
    ],
)
def test_matches_fp64_oracle(N, U, D, k, fraction, chunk_rows):
    # Clustered candidates and queries near their positive: scores on both sides of the threshold.
    c_UD = F.normalize(unit(1, D, 0) + 0.5 * unit(U, D, 1), dim=-1)
    positive_N = torch.randint(0, U, (N,), generator=torch.Generator().manual_seed(2))
    q_ND = F.normalize(c_UD[positive_N] + unit(N, D, 3), dim=-1)
    mined = mine_negatives(
        q_ND, c_UD, positive_N, k=k, fn_threshold=fraction, chunk_rows=chunk_rows
    )
    chosen, filtered = oracle(q_ND, c_UD, positive_N, k, fraction)
    assert mined.index_NK.shape == (N, k) and mined.score_NK.shape == (N, k)
    for i in range(N):
        n = len(chosen[i])
        assert mined.index_NK[i, :n].tolist() == [j for _, j in chosen[i]], i
        assert mined.index_NK[i, n:].eq(-1).all() and mined.score_NK[i, n:].isnan().all()
        # fp32 GEMM vs fp64: |error| <= D * eps32 for unit vectors; 1e-5 is 10x that at D = 59.
        assert mined.score_NK[i, :n].tolist() == pytest.approx([s for s, _ in chosen[i]], abs=1e-5)
    assert mined.filtered_N.tolist() == filtered
    assert mined.count_N.tolist() == [len(c) for c in chosen]
    expected_pos = (q_ND.double() * c_UD[positive_N].double()).sum(1)
    torch.testing.assert_close(mined.positive_N.double(), expected_pos, atol=1e-5, rtol=0)
    if math.isfinite(fraction) and N > 1:
        assert sum(filtered) > 0 and any(chosen)  # both sides of the threshold were exercised


def planted(positive_score=0.8):
    """One query, its positive, a near-duplicate of the positive scoring 0.97 x the positive's
    score, and three true negatives at 0.6, 0.3 and 0.0 x (in the plane of q and a helper axis)."""
    D = 6
    e = torch.eye(D, dtype=torch.float64)

    def at(score, axis):  # a unit vector whose dot product with q = e0 is `score`
        return score * e[0] + math.sqrt(1 - score**2) * e[axis]

    q = e[0:1]
    c = torch.stack(
        [
            at(positive_score, 1),  # 0: the positive
            at(0.6 * positive_score, 2),  # 1: true negative
            at(0.97 * positive_score, 3),  # 2: near-duplicate of the positive
            at(0.0, 4),  # 3: easy negative
            at(0.3 * positive_score, 5),  # 4: true negative
        ]
    )
    return q.float(), c.float(), torch.tensor([0])


def test_filter_drops_the_planted_near_duplicate_and_keeps_true_negatives():
    q, c, pos = planted()
    mined = mine_negatives(q, c, pos, k=3)
    assert mined.index_NK.tolist() == [[1, 4, 3]]
    assert mined.filtered_N.tolist() == [1]
    assert mined.positive_N.tolist() == pytest.approx([0.8], abs=1e-6)
    assert mined.top1_N.tolist() == [True]
    # The check can fail: without the filter the near-duplicate is the hardest negative.
    unfiltered = mine_negatives(q, c, pos, k=3, fn_threshold=math.inf)
    assert unfiltered.index_NK.tolist() == [[2, 1, 4]] and unfiltered.filtered_N.tolist() == [0]
    # At 0.98 it lies below the threshold (0.97 < 0.98) and is kept.
    assert mine_negatives(q, c, pos, k=1, fn_threshold=0.98).index_NK.tolist() == [[2]]


def test_positive_is_never_chosen_even_when_k_exceeds_the_pool():
    q, c, pos = planted()
    mined = mine_negatives(q, c, pos, k=10, fn_threshold=math.inf)
    assert 0 not in mined.index_NK[0].tolist()
    assert mined.count_N.tolist() == [4]


def test_negative_positive_score_keeps_the_limit_below_the_positive():
    q, c, pos = planted(positive_score=-0.5)
    limit = false_negative_threshold(torch.tensor([-0.5]), 0.95)
    assert limit.item() == pytest.approx(-0.525)
    mined = mine_negatives(q, c, pos, k=4)
    # 0.97 x, 0.6 x, 0.3 x and 0 x a negative score all lie above the positive: all dropped.
    assert mined.count_N.tolist() == [0] and mined.filtered_N.tolist() == [4]
    assert mined.top1_N.tolist() == [False]


def test_threshold_is_the_fraction_of_a_positive_score():
    pos = torch.tensor([0.0, 0.2, 0.9, 1.0])
    torch.testing.assert_close(false_negative_threshold(pos, 0.95), 0.95 * pos)
    assert false_negative_threshold(pos, math.inf).isinf().all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), "k must be an int >= 1, got 0"),
        (dict(k=2.0), "k must be an int >= 1, got 2.0"),
        (
            dict(k=1, fn_threshold=0.0),
            "fn_threshold must be a number > 0 (inf: no filter), got 0.0",
        ),
        (dict(k=1, fn_threshold=math.nan), "fn_threshold must be a number > 0"),
        (dict(k=1, positive_N=torch.tensor([5])), "positive_N holds indices outside [0, 5)"),
        (dict(k=1, positive_N=torch.tensor([0, 1])), "positive_N has shape (2,), expected (1,)"),
        (dict(k=1, chunk_rows=0), "chunk_rows must be an int >= 1, got 0"),
        (dict(k=1, c_UD=torch.ones(5, 4)), "q_ND (1, 6) and c_UD (5, 4) must be (N, D) and"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    q, c, pos = planted()
    args = {"q_ND": q, "c_UD": c, "positive_N": pos, **kwargs}
    with pytest.raises(ValueError) as err:
        mine_negatives(**args)
    assert str(err.value).startswith(message)
