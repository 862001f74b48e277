"""Helpers of the multi-process training tests: free ports and a torch.multiprocessing launcher
that sets the torchrun environment (gloo on CPU)."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    from hardneg.train import distributed as dist_util

    dist_util.init_distributed(backend="gloo")
    try:
        fn(rank, *args)
    finally:
        dist_util.destroy_distributed()


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, *args) on `world` gloo ranks; fn must be a module-level function."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
