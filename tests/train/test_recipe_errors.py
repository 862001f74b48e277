"""recipes/train_llave.py on a bad config: one line naming the key and value, printed once (rank 0
only, no traceback from any rank), exit status 2, before any process group or model exists."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hardneg.models import Embedder
from hardneg.train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "train_llave.py"
TINY = "recipes/configs/synthetic_tiny.yaml"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("train_llave_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "config,args,message",
    [
        (TINY, ["--train.lrr", "1"], r"unknown config key 'train.lrr'"),
        (TINY, ["--train.batch_size", "0"], r"train.batch_size must be > 0, got 0"),
        (TINY, ["--loss.mode", "focal"], r"loss.mode must be one of .*, got 'focal'"),
        (
            "recipes/configs/llave_0.5b.yaml",
            [],
            r"model.name_or_path = '\$\{MODEL\}' needs environment variable MODEL",
        ),
        (TINY, ["--model.name_or_path", "no/such/dir"], r"model.name_or_path: no model at"),
        (TINY, ["--train.output_dir", ""], r"train.output_dir must not be empty, got ''"),
        ("no/such.yaml", [], r"config file 'no/such.yaml' not found"),
    ],
)
def test_config_errors_are_one_line(recipe, monkeypatch, capsys, config, args, message):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MODEL", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--config", config, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_llave.py: error: ")
    assert re.search(message, err), err


def test_other_ranks_stay_silent(recipe, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--config", TINY, "--train.lrr", "1"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


def test_empty_eval_root_is_the_empty_string():
    tiny = REPO / TINY
    assert load_config(tiny, ["--eval.root", ""]).eval.root == ""
    assert load_config(tiny, ["--eval.root="]).eval.root == ""
    with pytest.raises(ConfigError, match=r"data.root must not be empty, got ''"):
        load_config(tiny, ["--data.root", ""])


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model at '.*missing'"):
        Embedder.from_pretrained(tmp_path / "missing")


@pytest.mark.slow
def test_torchrun_prints_the_error_once():
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(RECIPE), "--config", TINY, "--train.lrr", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MODEL")}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert out.count("unknown config key 'train.lrr'") == 1, out
    assert 'train_llave.py", line' not in out, out  # no Python traceback from a rank
