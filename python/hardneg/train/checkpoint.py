"""Atomic training checkpoints and exact resume; every file holds only tensors and plain data.

Layout: <output_dir>/checkpoints/step_00000012/ holds everything needed to continue bit for bit:
  model.safetensors                         (DDP / single process; rank 0 writes it)
  optimizer.{safetensors,json}              (DDP / single process: AdamW state, see safe_state)
  scheduler.{safetensors,json}              (DDP / single process: LambdaLR state)
  deepspeed/                                (engine "deepspeed": engine.save_checkpoint's files)
  rng_rank{r}.{safetensors,json}            (python, numpy, torch CPU and CUDA RNG per rank)
  trainer_state.json                        (step, data position; written last)

Nothing of ours is a pickle: loading a checkpoint folder from elsewhere runs no code from it (a
pickle in place of one of these files is refused, naming the file). DeepSpeed's own files under
deepspeed/ are torch.save pickles; they are read through a checkpoint engine that calls
torch.load(weights_only=True) with the few plain DeepSpeed types they hold allowed
(hardneg.train.deepspeed_checkpoint), so a pickle carrying anything else is refused too.

Atomicity: a checkpoint is written into a temporary directory in the same parent
(.tmp-step_...), every file is fsync'ed, then the directory is renamed into place with os.replace
(atomic on POSIX within one file system) and the parent directory is fsync'ed. A crash at any point
leaves either the complete new checkpoint or none, never a half-written step_* directory; only
step_* directories count when resuming, and leftovers of a crashed save are removed by the next.
Older checkpoints beyond keep_last are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from hardneg.train import distributed as dist_util
from hardneg.train.engine import Engine, unwrap
from hardneg.train.safe_state import load_state, save_state

_STEP_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------


def capture_rng() -> dict:
    """This process's python, numpy, torch CPU and (when initialised) CUDA RNG states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Durable writes
# ---------------------------------------------------------------------------------------------


def fsync_tree(path: Path) -> None:
    """fsync every file under path, then every directory (so their entries are durable too)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Numbered checkpoints under root: atomic save, keep-last-K pruning, latest lookup.

    In a distributed run every rank calls save() (each writes its own files through `write`);
    rank 0 creates the temporary directory, renames it and prunes, with barriers in between.
    root must be on a file system every rank sees (shared storage on multi-node runs)."""

    def __init__(self, root: str | os.PathLike, *, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path_for(steps[-1]) if steps else None

    def save(self, step: int, write: Callable[[Path], None], state: dict) -> Path:
        """Write checkpoint `step` atomically: write(tmp_dir) on every rank, then rank 0 adds
        trainer_state.json (state), fsyncs, renames into place and prunes. Returns the path."""
        final = self.path_for(step)
        tmp = self.root / f".tmp-{final.name}"
        if dist_util.is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # leftover of a crashed save
            tmp.mkdir()
        dist_util.barrier()
        write(tmp)
        fsync_tree(tmp)
        dist_util.barrier()
        if dist_util.is_main():
            state_path = tmp / STATE_FILE
            state_path.write_text(json.dumps(state, indent=2))
            fsync_tree(tmp)
            if final.exists():
                # Re-saving a step (after a resume): move the old copy aside, swap, then delete.
                old = self.root / f".old-{final.name}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        dist_util.barrier()
        return final

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            shutil.rmtree(self.path_for(step))
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
                shutil.rmtree(p)


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def save_rng(path: Path) -> None:
    save_state(capture_rng(), path / f"rng_rank{dist_util.rank()}")


def load_rng(path: Path) -> None:
    stem = path / f"rng_rank{dist_util.rank()}"
    if not stem.with_suffix(".json").is_file() and not stem.with_suffix(".pt").is_file():
        raise FileNotFoundError(
            f"{stem}.json is missing: the checkpoint was written by a run with fewer ranks; "
            "resume with the same world size"
        )
    restore_rng(load_state(stem))


# ---------------------------------------------------------------------------------------------
# Model, optimizer and scheduler of an engine
# ---------------------------------------------------------------------------------------------


def save_training_state(tmp: Path, engine: Engine) -> None:
    """Every rank: the engine's model, optimizer and scheduler state, and this rank's RNG."""
    if engine.is_deepspeed:
        engine.model.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
    elif dist_util.is_main():
        save_model(unwrap(engine.model), str(tmp / "model.safetensors"))
        save_state(engine.optimizer.state_dict(), tmp / "optimizer")
        save_state(engine.scheduler.state_dict(), tmp / "scheduler")
    save_rng(tmp)


def load_training_state(path: Path, engine: Engine, device: torch.device) -> None:
    """Every rank: restore what save_training_state wrote (RNG last)."""
    if engine.is_deepspeed:
        engine.model.load_checkpoint(
            str(path / "deepspeed"),
            tag="state",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    else:
        load_model(unwrap(engine.model), str(path / "model.safetensors"), device=str(device))
        engine.optimizer.load_state_dict(load_state(path / "optimizer"))
        engine.scheduler.load_state_dict(load_state(path / "scheduler"))
    load_rng(path)
