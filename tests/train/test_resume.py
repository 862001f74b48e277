"""Exact resume: 6 steps straight == 3 steps, crash, `--resume auto`, 3 more (losses and weights),
with attention dropout on (so the RNG states must be restored too) and GradCache chunks; and a
crash while writing a checkpoint leaves the previous one loadable."""

from __future__ import annotations

import pytest
import torch
from hardneg.train import checkpoint as checkpoint_mod
from hardneg.train import engine as engine_mod
from hardneg.train.config import load_config
from hardneg.train.engine import unwrap
from hardneg.train.trainer import Trainer

DROPOUT = 0.1


@pytest.fixture(autouse=True)
def dropout_on(monkeypatch):
    build = engine_mod.build_embedder

    def build_with_dropout(cfg):
        embedder = build(cfg)
        for module in embedder.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = DROPOUT
        return embedder

    monkeypatch.setattr(engine_mod, "build_embedder", build_with_dropout)


def _cfg(root, out, max_steps=6):
    return load_config(
        None,
        [
            "--data.root",
            str(root),
            "--data.num_hard_negatives",
            "1",
            "--train.output_dir",
            str(out),
            "--train.batch_size",
            "4",
            "--train.gradcache_chunk_size",
            "3",
            "--train.max_steps",
            "6",
            "--train.lr",
            "1e-3",
            "--train.precision",
            "fp32",
            "--train.progress_bar",
            "false",
            "--checkpoint.every_steps",
            "3",
            "--checkpoint.keep_last",
            "2",
        ],
    )


def _weights(trainer):
    return {k: v.clone() for k, v in unwrap(trainer.engine.model).state_dict().items()}


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_resume_reproduces_the_straight_run(mmeb_train_dir, tmp_path):
    straight = Trainer(_cfg(mmeb_train_dir, tmp_path / "straight"))
    losses = [m["loss"] for m in straight.fit()]
    final = _weights(straight)
    assert len(losses) == 6 and len(set(losses)) == 6

    out = tmp_path / "resumed"
    first = Trainer(_cfg(mmeb_train_dir, out))
    step = first.train_step

    def crash_after_three(batch):
        if first.step == 3:
            raise Crash("killed after step 3 (injected)")
        return step(batch)

    first.train_step = crash_after_three
    with pytest.raises(Crash):
        first.fit()
    assert [m["loss"] for m in first.history] == losses[:3]
    assert first.checkpoints.steps() == [3]

    # A crash inside the writer of a new save of step 3 leaves the old step 3 intact.
    def failing_writer(tmp):
        raise OSError("disk full (injected)")

    with pytest.raises(OSError, match="injected"):
        first.save_checkpoint(write_hook=failing_writer)
    assert first.checkpoints.steps() == [3]

    second = Trainer(_cfg(mmeb_train_dir, out))
    assert second.resume("auto") and second.step == 3
    resumed = [m["loss"] for m in second.fit()]
    assert resumed == losses[3:]
    weights = _weights(second)
    for name, value in final.items():
        assert torch.equal(weights[name], value), name


@pytest.mark.slow
def test_resume_without_rng_restore_differs(mmeb_train_dir, tmp_path, monkeypatch):
    """The equality above can fail: skipping the RNG restore changes the dropout masks."""
    out = tmp_path / "run"
    first = Trainer(_cfg(mmeb_train_dir, out, max_steps=4))
    losses = [m["loss"] for m in first.fit()]  # checkpoint at step 3, then step 4
    monkeypatch.setattr(checkpoint_mod, "load_rng", lambda path: None)
    second = Trainer(_cfg(mmeb_train_dir, out, max_steps=4))
    second.resume(str(out / "checkpoints" / "step_00000003"))
    torch.manual_seed(12345)  # any RNG state other than the saved one
    assert second.fit()[0]["loss"] != losses[3]
