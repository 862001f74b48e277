"""The benchmarks' pure-torch peer (benchmarks/torch_chunked.py, bench_loss's `torch_chunked`)
against the fp64 reference: loss and gradients of query, target and hard negatives for every mode,
direction and masking, on awkward sizes and chunkings, under the one error rule of
tests/loss_testing.py (plain torch: the reference in fp32, the peer's own dtype). bench_loss
reports how hardneg compares with this peer, so the peer must compute the same loss.
"""

from __future__ import annotations

import pytest
import torch
from hardneg import TEMPERATURE
from loss_testing import (
    check_close,
    compare_with_reference,
    loss_and_grads,
    make_inputs,
    reference_outputs,
    rule_for,
)

from benchmarks.torch_chunked import torch_chunked_hardneg_loss

MODES = ("infonce", "llave", "ega")


# One thread (tests/conftest.py); the kernel's multi-threaded row split runs where a test asks.
pytestmark = pytest.mark.usefixtures("one_thread")


# B = 1 (its only candidates are its own), B = 7 in chunks of 3, 3 and 1 rows, B = 257 in 16 full
# chunks of 16 and one of 1, and the default chunk (one chunk here); D = 59 and 128.
@pytest.mark.parametrize("ids", [False, True], ids=["unmasked", "ids"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["q2t", "sym"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "B,D,M,chunk_size",
    [(1, 59, 2, None), (7, 59, 2, 3), (257, 59, 2, 16), (257, 128, 0, None)],
    ids=["b1_hn2", "b7_hn2_chunk3", "b257_hn2_chunk16", "b257_d128_no_hn"],
)
def test_peer_matches_reference(B, D, M, chunk_size, mode, symmetric, ids):
    inputs = make_inputs(B, D, M, ids=ids, dtype=torch.float32)
    compare_with_reference(
        inputs,
        grad_output=3.7,
        loss_fn=torch_chunked_hardneg_loss,
        chunk_size=chunk_size,
        mode=mode,
        symmetric=symmetric,
    )


def test_peer_comparison_can_fail():
    """A peer run at a 0.1 % wrong temperature fails the rule (loss and gradients)."""
    inputs = make_inputs(257, 59, 2, ids=True, dtype=torch.float32)
    call = {"grad_output": 3.7, "mode": "ega", "symmetric": True}
    got = loss_and_grads(
        torch_chunked_hardneg_loss, inputs, temperature=TEMPERATURE * 1.001, chunk_size=16, **call
    )
    truth = reference_outputs(inputs, dtype=torch.float64, **call)
    plain = reference_outputs(inputs, dtype=torch.float32, **call)
    for name in ("loss", "d_query", "d_target", "d_hard_negatives"):
        with pytest.raises(AssertionError, match=name):
            check_close({name: got[name]}, truth, plain, **rule_for(257, **call))
