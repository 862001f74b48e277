"""recipes/ablate.py bookkeeping: the arm grid, mean/std over seeds, the table and the plot.

Training itself is the trainer's (tests/train); the full ablation is a multi-minute run whose
output is committed under benchmarks/results/ablation_*."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "ablate.py"


@pytest.fixture(scope="module")
def ablate():
    spec = importlib.util.spec_from_file_location("ablate_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(ablate, tmp_path, *extra):
    return ablate.parse_args(["--results-dir", str(tmp_path), *extra])


def test_arm_grid(ablate, tmp_path):
    arms = ablate.arms(_args(ablate, tmp_path))
    assert len(arms) == 3 * 2 * 3
    assert len({ablate.arm_name(a) for a in arms}) == len(arms)
    swept = ablate.arms(_args(ablate, tmp_path, "--sweep", "--seeds", "0"))
    grid = len(ablate.SWEEP_BETAS) * len(ablate.SWEEP_MARGINS)
    assert len(swept) == 3 * 2 + grid - 1  # the default (beta, margin) is not run twice
    arm = arms[0]
    flat = ablate.overrides(arm, argparse.Namespace(out="o", steps=7, batch_size=4), Path("d"))
    pairs = dict(zip(flat[::2], flat[1::2], strict=True))
    assert pairs["--loss.mode"] == arm["mode"] and pairs["--train.max_steps"] == "7"
    assert pairs["--loss.cross_device"] == ("true" if arm["negatives"] == "cross" else "false")


def _fake(ablate, mode, negatives, seed, hard):
    datasets = ablate.EVAL_DATASETS
    p1 = {d: hard + 10 * i for i, d in enumerate(datasets)}
    sim = {
        d: {"positive": 0.8, "hard_negative": 0.5 + seed / 10, "easy_negative": 0.1, "gap": 0.3}
        for d in ablate.HARD_DATASETS
    }
    return {
        "mode": mode,
        "negatives": negatives,
        "seed": seed,
        "ega_beta": 5.0,
        "ega_margin": 0.1,
        "steps": 3,
        "batch_size_per_rank": 4,
        "world_size": 2,
        "precision@1": p1,
        "similarity": sim,
    }


def test_summary_and_report(ablate, tmp_path):
    results = [
        _fake(ablate, m, n, s, hard=h + s)
        for m, h in (("llave", 20.0), ("infonce", 10.0))
        for n in ("cross", "local")
        for s in (0, 1, 2)
    ]
    rows = ablate.summarise(results)
    assert [(r["mode"], r["negatives"]) for r in rows] == [
        ("infonce", "local"),
        ("infonce", "cross"),
        ("llave", "local"),
        ("llave", "cross"),
    ]
    infonce = rows[0]
    # Hard P@1 per seed = mean of the two hard datasets = (h + s) + 5; seeds 0, 1, 2.
    assert infonce["hard_p1"][0] == pytest.approx(10 + 1 + 5)
    assert infonce["hard_p1"][1] == pytest.approx(statistics.stdev([15, 16, 17]))
    assert infonce["hard_negative"][0] == pytest.approx(0.6)
    assert infonce["ega_beta"] is None and infonce["seeds"] == [0, 1, 2]
    md = ablate.report(_args(ablate, tmp_path), results).read_text()
    assert "| infonce | local | - | - | 0,1,2 | 16.0 ± 1.0 |" in md
    png = next(tmp_path.glob("ablation_*.png")).read_bytes()
    assert png[:4] == b"\x89PNG"
