"""Similarity analysis (LLaVE Table 1): hand-computed means, padding, JSON + PNG output."""

from __future__ import annotations

import json

import pytest
import torch
from hardneg.eval.similarity import similarity_stats, write_similarity

INF = float("inf")


def test_stats_match_hand_computation():
    # Row 0: 7 negatives (5 hardest 0.8..0.4, 5 easiest -0.2..0.2); row 1: 2 negatives (padding).
    s_NK = torch.tensor(
        [
            [0.9, 0.8, 0.7, -0.2, 0.6, 0.5, 0.0, 0.4],
            [0.3, 0.5, 0.1, -INF, -INF, -INF, -INF, -INF],
        ]
    )
    stats = similarity_stats(s_NK)
    hard = [(0.8 + 0.7 + 0.6 + 0.5 + 0.4) / 5, (0.5 + 0.1) / 2]
    easy = [(-0.2 + 0.0 + 0.4 + 0.5 + 0.6) / 5, (0.1 + 0.5) / 2]
    assert stats["positive"] == pytest.approx((0.9 + 0.3) / 2, abs=1e-6)
    assert stats["hard_negative"] == pytest.approx(sum(hard) / 2, abs=1e-6)
    assert stats["easy_negative"] == pytest.approx(sum(easy) / 2, abs=1e-6)
    assert stats["gap"] == pytest.approx((0.9 - hard[0] + 0.3 - hard[1]) / 2, abs=1e-6)
    assert stats["hardest_negative"] == pytest.approx((0.8 + 0.5) / 2, abs=1e-6)
    assert stats["precision@1"] == 50.0


def test_stats_detect_a_changed_negative():
    s_NK = torch.tensor([[0.9, 0.8, 0.1, 0.0, -0.1, -0.2, -0.3]])
    before = similarity_stats(s_NK)
    s_NK[0, 6] = 0.85  # now among the 5 hardest, and the easiest set loses it
    after = similarity_stats(s_NK)
    assert after["hard_negative"] > before["hard_negative"]
    assert after["easy_negative"] > before["easy_negative"]
    assert after["positive"] == before["positive"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"K >= 2, got \(3, 1\)"):
        similarity_stats(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="query 1 has no negative"):
        similarity_stats(torch.tensor([[1.0, 0.0], [1.0, -INF]]))


def test_write_json_and_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    scores = {
        "CIRR": torch.rand(50, 20, generator=g) * 0.5 + torch.tensor([0.4] + [0.0] * 19),
        "Synthetic-Hard": torch.rand(30, 4, generator=g),
    }
    stats = write_similarity(scores, tmp_path / "sim.json", tmp_path / "sim.png", title="t")
    assert json.loads((tmp_path / "sim.json").read_text()) == stats
    assert stats["CIRR"]["gap"] > stats["Synthetic-Hard"]["gap"]
    png = (tmp_path / "sim.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
