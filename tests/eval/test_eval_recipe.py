"""recipes/eval_mmeb.py with the tiny Embedder: outputs, identical-candidate sanity, and torchrun
with 2 gloo ranks giving the single-process results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import write_dataset, write_small_benchmark
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "eval_mmeb.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("eval_mmeb_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb")
    write_small_benchmark(root)
    # The ground-truth candidate is the query itself (same text, same image, same prompt: the
    # default query and target templates are equal), so any model must score 100.
    rows = [
        {
            "qry_text": f"<|image_1|> the {c} one",
            "qry_img_path": f"colours/{c}.png",
            "tgt_text": [f"<|image_1|> the {c} one", f"<|image_1|> the {o} one", f"the {c} one"],
            "tgt_img_path": [f"colours/{c}.png", f"colours/{o}.png", ""],
        }
        for c, o in [("red", "blue"), ("green", "red"), ("blue", "cyan"), ("cyan", "green")]
    ]
    write_dataset(root, "Identical", rows)
    return root


@pytest.fixture(scope="module")
def single_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "mmeb.json"
    args = ["--model", "tiny", "--data-root", str(data), "--output", str(out), "--similarity"]
    _recipe().main(args + ["--batch-size", "4"])
    return out


def test_outputs(single_run):
    report = json.loads(single_run.read_text())
    names = ["ImageNet-1K", "MSCOCO_t2i", "Identical", "Synthetic-Colours"]
    assert list(report["datasets"]) == names
    assert report["datasets"]["Identical"]["precision@1"] == 100.0
    assert report["meta_tasks"]["classification"]["num_datasets"] == 1
    assert report["other"]["num_datasets"] == 2
    assert report["seconds"]["total"] > 0
    assert "| Identical | other | - | 4 | 100.0 |" in single_run.with_suffix(".md").read_text()
    sim = json.loads(single_run.with_suffix(".similarity.json").read_text())
    assert sim["Identical"]["positive"] == pytest.approx(1.0, abs=1e-5)
    assert sim["Identical"]["gap"] > 0
    assert single_run.with_suffix(".similarity.png").read_bytes()[:4] == b"\x89PNG"


def _cached_rows(cache: Path) -> int:
    total = 0
    for part in cache.rglob("part-*.safetensors"):
        with safe_open(part, framework="pt") as f:
            total += len(json.loads(f.metadata()["keys"]))
    return total


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(data, single_run, tmp_path):
    out = tmp_path / "mmeb.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(RECIPE), "--model", "tiny", "--data-root", str(data), "--output", str(out)]
    cmd += ["--similarity", "--batch-size", "3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads(single_run.read_text())
    sharded = json.loads(out.read_text())
    assert sharded["datasets"] == single["datasets"]
    sim_single = json.loads(single_run.with_suffix(".similarity.json").read_text())
    sim_sharded = json.loads(out.with_suffix(".similarity.json").read_text())
    for name, stats in sim_single.items():
        for key, value in stats.items():
            # Other batch compositions change the padding, hence the GEMM rounding only.
            assert sim_sharded[name][key] == pytest.approx(value, abs=1e-5), (name, key)
    # Each distinct item was embedded by exactly one rank: the cache holds no duplicate row.
    assert _cached_rows(tmp_path / "cache") == _cached_rows(single_run.parent / "cache")
