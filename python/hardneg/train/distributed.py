"""Process-group helpers for torchrun (single or multi node): init, rank queries, reductions.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the run is a
single process and no process group is created (every helper then degrades to the local case).
Backend: nccl when the run uses CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


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


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce a tensor over all ranks (out of place); op: "sum", "mean", "max" or "min"."""
    if not is_distributed():
        return value.clone()
    out = value.detach().clone()
    red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM}.get(op)
    red = red or {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(out, op=red)
    return out / world_size() if op == "mean" else out


def all_reduce_int(value: int, op: str = "max", *, device: torch.device | None = None) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device or _comm_device())
    return int(all_reduce(t, op).item())


def broadcast_object(obj, src: int = 0):
    """Rank src's Python object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def loss_group():
    """The process group the loss gathers negatives over: the whole world, or None when alone."""
    return dist.group.WORLD if is_distributed() and world_size() > 1 else None


def _comm_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def main_first():
    """Rank 0 runs the body first (e.g. generating data), the others follow once it is done."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
