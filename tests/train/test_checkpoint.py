"""Atomic checkpoints: complete or absent, keep-last-K, crash in a save, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hardneg.train import checkpoint
from hardneg.train.checkpoint import CheckpointManager, capture_rng, restore_rng


def _writer(value):
    def write(tmp):
        torch.save({"w": torch.full((3,), float(value))}, tmp / "model.pt")

    return write


def test_save_latest_and_prune(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert mgr.latest() is None
    for step in (1, 2, 3):
        path = mgr.save(step, _writer(step), {"step": step})
        assert path.name == f"step_{step:08d}"
    assert mgr.steps() == [2, 3]
    assert checkpoint.read_state(mgr.latest()) == {"step": 3}
    assert sorted(p.name for p in mgr.root.iterdir()) == ["step_00000002", "step_00000003"]


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=1)
    mgr.save(5, _writer(5), {"step": 5})

    def crashing(tmp):
        _writer(6)(tmp)
        raise RuntimeError("disk full (injected)")

    with pytest.raises(RuntimeError, match="injected"):
        mgr.save(6, crashing, {"step": 6})
    # The half-written step 6 is invisible; step 5 is intact and loadable.
    assert mgr.steps() == [5]
    latest = mgr.latest()
    assert torch.load(latest / "model.pt")["w"].tolist() == [5.0] * 3
    assert (mgr.root / ".tmp-step_00000006").exists()
    # The next save cleans the leftover and proceeds.
    mgr.save(7, _writer(7), {"step": 7})
    assert mgr.steps() == [7]
    assert sorted(p.name for p in mgr.root.iterdir()) == ["step_00000007"]


def test_crash_during_rename_keeps_previous(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    mgr.save(1, _writer(1), {"step": 1})

    def failing_replace(src, dst):
        raise OSError("power cut (injected)")

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        mgr.save(2, _writer(2), {"step": 2})
    monkeypatch.undo()
    assert mgr.steps() == [1]


def test_resave_same_step_replaces_it(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    mgr.save(4, _writer(1), {"step": 4, "v": 1})
    mgr.save(4, _writer(2), {"step": 4, "v": 2})
    assert mgr.steps() == [4]
    assert checkpoint.read_state(mgr.latest())["v"] == 2


def test_rng_round_trip():
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be >= 1, got 0"):
        CheckpointManager(tmp_path, keep_last=0)
