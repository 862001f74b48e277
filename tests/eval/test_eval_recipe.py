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


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    from fixtures.mmeb_layout import write_mmeb_eval

    root = tmp_path_factory.mktemp("MMEB-eval")
    write_mmeb_eval(root)
    return root


def test_real_layout_run(real_layout, tmp_path):
    out = tmp_path / "mmeb.json"
    _recipe().main(["--model", "tiny", "--data-root", str(real_layout), "--output", str(out)])
    report = json.loads(out.read_text())
    assert list(report["datasets"]) == ["ImageNet-1K", "OK-VQA", "MSCOCO_t2i", "WebQA"]
    webqa = report["datasets"]["WebQA"]
    assert webqa["placeholders_stripped"] == {"queries": 3, "candidates": 0}
    assert webqa["instructions_added"] == {"queries": 0, "candidates": 0}
    for d in report["datasets"].values():
        assert 0 <= d["precision@1_tie_aware"] <= d["precision@1"] <= 100
    assert "| P@1 ties shared |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_model", "no model at '{root}/nope' (no such directory)"),
        ("no_images", "not found under {root}/eval_images or {root}/images or {root}; pass "),
        ("no_column", "dataset 'OK-VQA': {root}/OK-VQA/test-00000-of-00001.parquet has no column"),
    ],
)
def test_user_errors_are_one_line(real_layout, tmp_path, capsys, case, message):
    import shutil

    import pyarrow.parquet as pq

    root = tmp_path / "MMEB-eval"
    shutil.copytree(real_layout, root)
    model = "tiny"
    if case == "no_model":
        model, root = str(root / "nope"), root
    elif case == "no_images":
        (root / "eval_images").rename(tmp_path / "elsewhere")
    else:
        path = root / "OK-VQA" / "test-00000-of-00001.parquet"
        pq.write_table(pq.read_table(path).drop_columns(["tgt_text"]), path)
    args = ["--model", model, "--data-root", str(root), "--output", str(tmp_path / "o.json")]
    with pytest.raises(SystemExit) as exit_info:
        _recipe().main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval_mmeb: error: "), err
    assert message.format(root=root) in err[0]
    if case == "no_images":
        assert "--image-root" in err[0]


def test_prompt_format_flag(tmp_path):
    import torch

    recipe = _recipe()
    cpu = torch.device("cpu")
    assert recipe.load_embedder("tiny", cpu, "float32").config.prompt_format == "hardneg"
    llave = recipe.load_embedder("tiny:1", cpu, "float32", "llave")
    assert llave.config.prompt_format == "llave"
    llave.save_pretrained(tmp_path / "ckpt")
    saved = recipe.load_embedder(str(tmp_path / "ckpt"), cpu, "float32")
    assert saved.config.prompt_format == "llave"  # the checkpoint's own format by default
    switched = recipe.load_embedder(str(tmp_path / "ckpt"), cpu, "float32", "hardneg")
    assert switched.config.prompt_format == "hardneg"
    assert (
        recipe.parse_args(["--model", "m", "--data-root", "r", "--output", "o"]).prompt_format
        is None
    )
