"""hardneg.costmodel: the pure logic behind strategy="auto" (no processes, no timing)."""

from __future__ import annotations

import json

import pytest
import torch
from hardneg.distributed import costmodel

SHAPE = dict(dim=1024, world_size=8, hard_negatives=7, dtype=torch.bfloat16)


def test_allgather_wins_small_batches_and_ring_hides_transfers_at_large_ones():
    assert costmodel.choose_strategy(batch=8, link=costmodel.NVLINK, **SHAPE) == "allgather"
    first, last = costmodel.crossover(link=costmodel.NVLINK, **SHAPE)
    assert 8 < first < last
    mid = (first + last) // 2
    assert costmodel.choose_strategy(batch=mid, link=costmodel.NVLINK, **SHAPE) == "ring"
    ring = costmodel.predict("ring", batch=mid, link=costmodel.NVLINK, **SHAPE)
    # Inside the window the ring's transfers are (almost) all behind its GEMMs.
    assert ring["exposed_comm"] < 0.2 * ring["comm"]


def test_a_slower_link_moves_the_crossover_up():
    nvlink = costmodel.crossover(link=costmodel.NVLINK, keep_logits_bytes=1 << 40, **SHAPE)
    ib = costmodel.crossover(link=costmodel.INFINIBAND, keep_logits_bytes=1 << 40, **SHAPE)
    assert nvlink[0] < ib[0]


def test_recomputed_logits_close_the_window():
    """With every block kept the ring stays faster to the end of the search (last is None, not
    the search limit); the default keep budget closes the window at a finite batch."""
    kept = costmodel.crossover(link=costmodel.NVLINK, keep_logits_bytes=1 << 40, **SHAPE)
    default = costmodel.crossover(link=costmodel.NVLINK, **SHAPE)
    assert kept[1] is None
    assert default[1] is not None and default[0] < default[1]


def test_cpu_constants_come_from_the_calibration_file(tmp_path):
    """The loopback link and CPU compute are bench_ring's measurements, loaded from the file its
    --save-calibration writes, never typed into the code."""
    link, compute = costmodel.load_calibration()
    assert (link, compute) == (costmodel.LOOPBACK_GLOO, costmodel.CPU)
    record = json.loads(costmodel.CALIBRATION_FILE.read_text())
    assert link.bandwidth == record["link_bandwidth"]
    assert compute.gemm_flops == record["gemm_flops"]
    other = tmp_path / "calibration.json"
    other.write_text(json.dumps({**record, "link_bandwidth": 2.5e9}))
    assert costmodel.load_calibration(other)[0].bandwidth == 2.5e9


def test_bad_strategy_is_named():
    with pytest.raises(ValueError, match="strategy must be one of .* got 'tree'"):
        costmodel.predict("tree", batch=1, dim=1, world_size=2)
