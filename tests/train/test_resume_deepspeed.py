"""Exact resume under DeepSpeed ZeRO-2 on 2 gloo ranks: engine.save_checkpoint / load_checkpoint
inside the atomic checkpoint scheme restore model, optimizer, scheduler, RNG and data position,
and every DeepSpeed file is read with torch.load(weights_only=True)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _launch import spawn

REPO = Path(__file__).resolve().parents[2]


class Crash(RuntimeError):
    pass


def _cfg(root: str, out: Path):
    from hardneg.train.config import load_config

    return load_config(
        None,
        [
            "--data.root", root,
            "--train.output_dir", str(out),
            "--train.engine", "deepspeed",
            "--train.deepspeed_config", str(REPO / "recipes/deepspeed/zero2.json"),
            "--train.batch_size", "4",
            "--train.gradcache_chunk_size", "2",
            "--train.max_steps", "4",
            "--train.lr", "1e-3",
            "--train.precision", "fp32",
            "--train.progress_bar", "false",
            "--checkpoint.every_steps", "2",
        ],
    )  # fmt: skip


def _worker(rank: int, root: str, tmp: str, out: str) -> None:
    from hardneg.train import deepspeed_checkpoint
    from hardneg.train.trainer import Trainer

    loaded = []
    load_weights_only = deepspeed_checkpoint.load_weights_only

    def recording(path, map_location=None):
        loaded.append(Path(path).name)
        return load_weights_only(path, map_location=map_location)

    deepspeed_checkpoint.load_weights_only = recording

    tmp = Path(tmp)
    straight = [m["global_loss"] for m in Trainer(_cfg(root, tmp / "a")).fit()]

    first = Trainer(_cfg(root, tmp / "b"))
    step = first.train_step

    def crash_after_two(batch):
        if first.step == 2:
            raise Crash("killed after step 2 (injected)")
        return step(batch)

    first.train_step = crash_after_two
    try:
        first.fit()
    except Crash:
        pass
    second = Trainer(_cfg(root, tmp / "b"))
    assert second.resume("auto") and second.step == 2
    resumed = [m["global_loss"] for m in second.fit()]
    if rank == 0:
        result = {"straight": straight, "resumed": resumed, "loaded": loaded}
        Path(out).write_text(json.dumps(result))


@pytest.mark.slow
def test_deepspeed_resume_reproduces_the_straight_run(mmeb_train_dir, tmp_path):
    out = tmp_path / "losses.json"
    spawn(_worker, 2, str(mmeb_train_dir), str(tmp_path), str(out))
    got = json.loads(out.read_text())
    assert len(got["straight"]) == 4 and len(set(got["straight"])) == 4
    assert got["resumed"] == got["straight"][2:]
    # DeepSpeed read its model and ZeRO files through the weights_only loader.
    assert "mp_rank_00_model_states.pt" in got["loaded"]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in got["loaded"]
