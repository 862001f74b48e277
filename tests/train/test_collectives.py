"""Every collective of hardneg.train runs on the process group's device.

An NCCL-only group has no backend for CPU tensors: a CPU scalar handed to all_reduce raises there,
while gloo (every CPU test) accepts it. Two checks make the rule hold without a GPU:
  1. comm_device maps each backend to the device it serves (nccl -> the current CUDA device,
     gloo -> cpu, mixed "cpu:gloo,cuda:nccl" -> cpu);
  2. a real 2-rank gloo training run (DDP, GradCache, cross-device loss, metrics) under a checker
     wrapping torch.distributed's collectives: every call issued from hardneg/train must come from
     hardneg/train/distributed.py with tensors that its to_comm_device placed on comm_device().
Together: under NCCL every tensor the training layer reduces is on the GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _launch import spawn
from hardneg.train import distributed as dist_util

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "gather",
    "scatter",
)
TRAIN_DIR = Path(dist_util.__file__).parent
TORCH_DIR = Path(torch.__file__).parent


@pytest.mark.parametrize(
    "backend,expected",
    [("nccl", "cuda:1"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("cuda:nccl", "cuda:1")],
)
def test_comm_device_is_the_device_the_backend_serves(monkeypatch, backend, expected):
    monkeypatch.setattr(dist_util, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert dist_util.comm_device() == torch.device(expected)


def test_all_reduce_without_a_group_is_local():
    value = torch.tensor([1.0, 2.0])
    assert torch.equal(dist_util.all_reduce(value, "max"), value)
    with pytest.raises(ValueError, match=r"op must be one of .*, got 'avg'"):
        dist_util.all_reduce(value, "avg")


def _caller() -> Path | None:
    """The first frame outside torch (and this file): who issued the collective."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if TORCH_DIR not in path.parents and path != Path(__file__).resolve():
            return path
        frame = frame.f_back
    return None


def install_checker() -> dict:
    """Wrap torch.distributed's collectives; returns the record of checked calls / violations."""
    record = {"checked": [], "violations": []}
    placed = []  # tensors to_comm_device returned (kept alive so their ids stay unique)
    to_comm = getattr(dist_util, "to_comm_device", None)
    if to_comm is not None:

        def recording_to_comm(value, group=None):
            out = to_comm(value, group)
            placed.append(out)
            return out

        dist_util.to_comm_device = recording_to_comm

    def check(name, fn):
        def wrapper(*args, **kwargs):
            caller = _caller()
            if caller is not None and TRAIN_DIR in caller.parents:
                where = f"{name} from {caller.name}"
                record["checked"].append(where)
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                if caller.name != "distributed.py":
                    record["violations"].append(f"{where}: not through train/distributed.py")
                for t in tensors:
                    if t.device != dist_util.comm_device() or all(t is not p for p in placed):
                        record["violations"].append(
                            f"{where}: a {t.device} tensor not placed on the group's device"
                        )
            return fn(*args, **kwargs)

        return wrapper

    for name in COLLECTIVES:
        setattr(dist, name, check(name, getattr(dist, name)))
    return record


def _worker(rank: int, root: str, out_dir: str, result: str) -> None:
    from hardneg.train.config import load_config
    from hardneg.train.trainer import Trainer

    record = install_checker()
    cfg = load_config(
        None,
        [
            "--data.root", root,
            "--data.num_hard_negatives", "1",
            "--train.output_dir", out_dir,
            "--train.batch_size", "4",
            "--train.gradcache_chunk_size", "3",
            "--train.max_steps", "2",
            "--train.precision", "fp32",
            "--train.progress_bar", "false",
            "--checkpoint.every_steps", "0",
        ],
    )  # fmt: skip
    Trainer(cfg).fit()
    if rank == 0:
        Path(result).write_text(json.dumps(record))


@pytest.mark.slow
def test_training_collectives_run_on_the_group_device(mmeb_train_dir, tmp_path):
    result = tmp_path / "record.json"
    spawn(_worker, 2, str(mmeb_train_dir), str(tmp_path / "run"), str(result))
    record = json.loads(result.read_text())
    assert record["violations"] == []
    # Per step: the GradCache chunk counts (max) and the metrics (mean).
    assert record["checked"].count("all_reduce from distributed.py") >= 4
