"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU gloo ranks: a few GradCache steps train the tiny model.

Checks: the loss is finite at every step, the parameters move, and the exported model (ZeRO-3
gathers its shards for save_pretrained) loads back with the trained weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _launch import spawn  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _worker(rank: int, overrides: list[str], out: str) -> None:
    from hardneg.train.config import load_config
    from hardneg.train.trainer import Trainer

    trainer = Trainer(load_config(None, overrides))
    history = trainer.fit()
    trainer.export()
    if rank == 0:
        Path(out).write_text(json.dumps([m["global_loss"] for m in history]))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains(stage, mmeb_train_dir, tmp_path):
    from hardneg.models import Embedder

    run = tmp_path / "run"
    overrides = [
        "--data.root",
        str(mmeb_train_dir),
        "--data.num_negatives",
        "1",
        "--train.output_dir",
        str(run),
        "--train.engine",
        "deepspeed",
        "--train.deepspeed_config",
        str(REPO / f"recipes/deepspeed/zero{stage}.json"),
        "--train.batch_size",
        "4",
        "--train.gradcache_chunk_size",
        "2",
        "--train.max_steps",
        "3",
        "--train.lr",
        "1e-3",
        "--train.precision",
        "fp32",
        "--train.progress_bar",
        "false",
        "--checkpoint.every_steps",
        "0",
    ]
    spawn(_worker, 2, overrides, str(tmp_path / "losses.json"))
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    trained = Embedder.from_pretrained(run / "final").state_dict()
    initial = Embedder.tiny(seed=0).state_dict()
    moved = [
        k for k in initial if "language_model" in k and not torch.equal(initial[k], trained[k])
    ]
    frozen = [k for k in initial if "vision_tower" in k and not torch.equal(initial[k], trained[k])]
    assert len(moved) > 5, "the language model did not train"
    assert frozen == [], f"frozen vision tower changed: {frozen[:3]}"
