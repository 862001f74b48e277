"""Cross-device hardneg_loss on 2 and 4 gloo ranks against the fp64 single-process reference.

Each world is spawned once per module and runs every case (ring_cases.all_cases: all modes,
symmetric, hard negatives, id masking across ranks, every reduction, both strategies, the ring's
keep and recompute paths) on uneven per-rank batches including B = 1; the tests below assert on
what each rank measured (ring_cases.check_result).

Tolerance: the one error rule of tests/loss_testing.py (justified there): each rank's loss and
gradients within 2 x (plain torch's error in fp32 + one fp32 rounding of the largest logit carried
to that output) of the fp64 reference over the concatenated batch. The op computes in fp32 like
plain torch, in another order (blocks of candidates, an online logsumexp). A rotated target
layout must exceed that budget more than 100x (ring_cases.WRONG_LAYOUT_FACTOR), and a 1e-3
relative error in one gradient is caught (test_a_perturbed_gradient_is_caught). Measured: errors
reach at most 0.59 of the budget (1,104 outputs over both worlds; an ega gradient, infonce and
llave 0.33); a rotated layout exceeds it at least 1.7e5 times.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from loss_testing import check_close, make_inputs, reference_outputs, rule_for
from ring_cases import Case, all_cases, check_result, free_port, spawn_worker

CASES = all_cases()


def _run_world(world_size: int, tmp_path_factory) -> dict[tuple[str, int], dict]:
    out_dir = str(tmp_path_factory.mktemp(f"ring{world_size}"))
    mp.spawn(
        spawn_worker,
        args=(world_size, free_port(), CASES, out_dir),
        nprocs=world_size,
        join=True,
    )
    results = {}
    for rank in range(world_size):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            for r in json.load(f):
                if "mismatch" in r:
                    results[("mismatch", rank)] = r["mismatch"]
                else:
                    results[(Case(**r["case"]).name, rank)] = r
    return results


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _run_world(2, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _run_world(4, tmp_path_factory)


def _check(results, case: Case, world_size: int) -> None:
    for rank in range(world_size):
        check_result(results[(case.name, rank)])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_two_ranks(world2, case):
    _check(world2, case, 2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_four_ranks(world4, case):
    _check(world4, case, 4)


def test_a_perturbed_gradient_is_caught():
    """The rule sees a 1e-3 relative error in one gradient of fp32 inputs, and passes plain
    torch's own fp32 result."""
    inputs = make_inputs(7, 59, 2, ids=True, dtype=torch.float32)
    truth = reference_outputs(inputs, dtype=torch.float64)
    plain = reference_outputs(inputs, dtype=torch.float32)
    check_close(plain, truth, plain, **rule_for(7))
    bad = {"d_query": plain["d_query"] * (1 + 1e-3)}
    with pytest.raises(AssertionError, match="d_query"):
        check_close(bad, truth, plain, **rule_for(7))


def test_a_result_that_misses_a_misplaced_positive_is_refused():
    """check_result fails a case whose rotated layout is within 100x of the budget."""
    errors = {"loss": {"error": 1e-7, "allowed": 1e-6}}
    result = {"case": {"mode": "llave"}, "rank": 0, "errors": errors, "wrong_layout": 50.0}
    with pytest.raises(AssertionError, match="rotated target layout"):
        check_result(result)
    check_result({**result, "wrong_layout": 500.0})


def test_ranks_that_disagree_on_an_option_all_raise(world2):
    for rank in range(2):
        msg = world2[("mismatch", rank)]
        assert "temperature" in msg and "0.05" in msg and "every rank must agree" in msg, msg
