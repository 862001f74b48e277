"""Every shipped LLaVE config trains on the released MMEB-train layout with its own engine (ZeRO-3),
prompt format, duplicate-target rule and accumulation: 2 steps on 2 CPU gloo ranks under torchrun.

llave_*.yaml reproduce LLaVE (its prompt, repeated targets kept as negatives, the mean of 8
accumulated micro-batch losses); llave_*_gradcache.yaml is hardneg's improvement (one GradCache
batch, duplicate targets masked, hardneg's prompt). Only what the CPU cannot hold is overridden:
the model (the tiny LLaVA-OneVision), fp32 instead of bf16, the subsets of the fixture, and the
batch sizes; the accumulation stays > 1 where the config accumulates.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures.mmeb_layout import write_mmeb_train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mmeb_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("MMEB-train")
    write_mmeb_train(root)
    return root


# (config, expected prompt format, duplicate masking, accumulation, GradCache chunk)
CONFIGS = [
    ("llave_0.5b", "llave", False, 8, 0),
    ("llave_2b", "llave", False, 8, 0),
    ("llave_7b", "llave", False, 8, 0),
    ("llave_0.5b_gradcache", "hardneg", True, 1, 4),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "prompt", "masked", "accum", "chunk"), CONFIGS)
def test_config_trains_two_steps_on_two_ranks(
    mmeb_train, tmp_path, name, prompt, masked, accum, chunk
):
    config = REPO / "recipes" / "configs" / f"{name}.yaml"
    shipped = yaml.safe_load(config.read_text())
    assert shipped["model"]["prompt_format"] == prompt
    assert shipped["loss"]["mask_duplicate_targets"] is masked
    assert shipped["train"]["grad_accum_steps"] == accum
    assert shipped["train"]["gradcache_chunk_size"] == chunk
    assert shipped["train"]["deepspeed_config"] == "recipes/deepspeed/zero3.json"
    run = tmp_path / "run"
    overrides = {
        "data.subsets": "[HatefulMemes, ImageNet_1K, WebQA]",
        "data.num_workers": 0,
        "model.dtype": "float32",
        "train.precision": "fp32",
        "train.batch_size": 2 if chunk == 0 else 4,
        "train.grad_accum_steps": min(accum, 2),
        "train.gradcache_chunk_size": min(chunk, 2),
        "train.max_steps": 2,
        "train.epochs": 8,
        "train.log_every": 1,
        "train.progress_bar": "false",
        "checkpoint.every_steps": 0,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO / "recipes" / "train_llave.py"), "--config", str(config)]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = {
        **os.environ,
        "MODEL": "tiny",
        "MMEB_TRAIN": str(mmeb_train),
        "MMEB_EVAL": "",
        "OUTPUT_DIR": str(run),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["engine"] == "deepspeed"
    assert resolved["model"]["prompt_format"] == prompt
    assert resolved["loss"]["mask_duplicate_targets"] is masked
    steps = [line for line in proc.stderr.splitlines() if " step " in line and " loss " in line]
    assert len(steps) == 2, proc.stderr[-3000:]
    for line in steps:
        assert math.isfinite(float(line.split(" loss ")[1].split()[0]))
    exported = json.loads((run / "final" / "hardneg_embedder.json").read_text())
    assert exported["prompt_format"] == prompt
