"""Process-group helpers for torchrun (single or multi node) and the training layer's collectives.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the run is a
single process and no process group is created (every helper then degrades to the local case).
Backend: nccl when the run uses CUDA, gloo on CPU.

One rule for collectives: every collective of hardneg.train goes through this module, and its
tensors are moved to the device the process group's backend serves (`comm_device`) and back. An
NCCL-only group has no backend for CPU tensors, so a CPU scalar handed to all_reduce under NCCL
would raise; gloo serves CPU tensors.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

_REDUCE_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_device() -> torch.device:
    """cuda:LOCAL_RANK when a GPU is visible, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(*, backend: str = "auto", timeout_minutes: float = 30.0) -> torch.device:
    """Create the default process group when launched by torchrun; returns this rank's device.

    backend "auto" picks nccl on CUDA and gloo on CPU. A second call is a no-op."""
    device = pick_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1 or is_distributed():
        return device
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("train.backend is 'nccl' but no CUDA device is visible; use gloo or auto")
    dist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        device_id=device if backend == "nccl" else None,
    )
    return device


def destroy_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def loss_group():
    """The process group the loss gathers negatives over: the whole world, or None when alone."""
    return dist.group.WORLD if is_distributed() and world_size() > 1 else None


# ---------------------------------------------------------------------------------------------
# Collectives (the only ones hardneg.train issues)
# ---------------------------------------------------------------------------------------------


def served_device_types(group=None) -> list[str]:
    """Device types ("cpu", "cuda", ...) the backend of `group` (default: world) moves tensors of.

    dist.get_backend names one backend ("gloo", "nccl") or device:backend pairs
    ("cpu:gloo,cuda:nccl"); a single backend serves the devices torch maps to it."""
    backend = str(dist.get_backend(group))
    if ":" in backend:
        return [pair.split(":")[0] for pair in backend.split(",")]
    mapping = dist.Backend.default_device_backend_map
    return [device for device, name in mapping.items() if name == backend]


def comm_device(group=None) -> torch.device:
    """The device whose tensors the group's backend moves: cpu when it serves CPU tensors (gloo),
    else this process's current accelerator (nccl: cuda:current_device())."""
    if not is_distributed():
        return torch.device("cpu")
    types = served_device_types(group)
    if "cpu" in types:
        return torch.device("cpu")
    if "cuda" in types:
        return torch.device("cuda", torch.cuda.current_device())
    raise RuntimeError(f"process group backend {dist.get_backend(group)!r} serves no CPU or CUDA")


def to_comm_device(value: torch.Tensor, group=None) -> torch.Tensor:
    """A private copy of value on comm_device(group), ready to be reduced in place."""
    return value.detach().to(comm_device(group), copy=True)


def all_reduce(value: torch.Tensor, op: str = "sum", *, group=None) -> torch.Tensor:
    """Reduce a tensor over the ranks of group (out of place; the result is on value's device).

    op: "sum", "mean", "max" or "min". The reduction runs on comm_device(group)."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"op must be one of {sorted(_REDUCE_OPS)}, got {op!r}")
    if not is_distributed():
        return value.detach().clone()
    work = to_comm_device(value, group)
    dist.all_reduce(work, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]), group=group)
    if op == "mean":
        work = work / dist.get_world_size(group)
    return work.to(value.device)


def barrier(group=None) -> None:
    if is_distributed():
        dist.barrier(group=group)


@contextmanager
def main_first():
    """Rank 0 runs the body first (e.g. generating data), the others follow once it is done."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
