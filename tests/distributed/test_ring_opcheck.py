"""torch.library.opcheck of the cross-device ops on 2 gloo ranks: hardneg::hardneg_loss_group and
hardneg::hardneg_loss_group_backward for both strategies (schema, fake implementation against
the real outputs, autograd registration, AOT dispatch).

Paths covered: the ring with every block's logits kept and with none kept (backward recomputes
them), the all-gather with the gradient fused into the forward ("mean") and recomputed in
backward ("none"). Every rank runs the same opcheck calls in the same order, so the collectives
inside the op match across ranks; a failure on one rank ends the world (mp.spawn raises).
"""

from __future__ import annotations

import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hardneg.distributed import ring
from ring_cases import SIZES, free_port

D, M = 7, 2

# (strategy, keep_logits_bytes, reduction, fuse_grad): the forward paths of hardneg_loss_group.
FORWARD = [
    ("ring", ring.KEEP_LOGITS_BYTES, "mean", False),
    ("ring", 0, "none", False),
    ("allgather", 0, "mean", True),
    ("allgather", 0, "none", False),
]


def _args(rank: int, group, strategy, keep, reduction, fuse_grad, *, requires_grad: bool):
    """The forward op's arguments on this rank: hard negatives, ids shared across ranks (every
    rank's target 0 has id 0, so masking crosses ranks), symmetric, 2-row chunks."""
    B = SIZES[2][rank]
    g = torch.Generator().manual_seed(rank)
    query, target = (torch.randn(B, D, generator=g) for _ in range(2))
    hard_negatives = torch.randn(B, M, D, generator=g)
    for t in (query, target, hard_negatives):
        t.requires_grad_(requires_grad)
    target_ids = torch.arange(B)
    hard_negative_ids = torch.arange(B * M).reshape(B, M) + 100
    sizes = [b for k in range(2) for b in (SIZES[2][k], M)]
    # mode, temperature, alpha, ega_beta, ega_margin, symmetric, reduction, chunk_size,
    # check_finite, fuse_grad
    loss_opts = ("ega", 0.05, 9.0, 2.0, 0.0, True, reduction, 2, True, fuse_grad)
    name = ring._register_group(group)
    return (
        query,
        target,
        hard_negatives,
        target_ids,
        hard_negative_ids,
        name,
        sizes,
        strategy,
        "torch",
        keep,
        *loss_opts,
    )


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        group = dist.group.WORLD
        done = []
        for case in FORWARD:
            args = _args(rank, group, *case, requires_grad=True)
            torch.library.opcheck(torch.ops.hardneg.hardneg_loss_group.default, args)
            done.append(f"forward-{case[0]}-{case[2]}-keep{case[1]}")
            # The backward op on what this forward saved for it.
            args = _args(rank, group, *case, requires_grad=False)
            _, a, b = torch.ops.hardneg.hardneg_loss_group(*args)
            B = args[0].shape[0]
            grad_loss = torch.randn(B) if case[2] == "none" else torch.tensor(1.7)
            bwd_args = (grad_loss, *args[:5], a, b, *args[5 : 5 + len(ring._OPT_NAMES)])
            torch.library.opcheck(torch.ops.hardneg.hardneg_loss_group_backward.default, bwd_args)
            done.append(f"backward-{case[0]}-{case[2]}-keep{case[1]}")
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(done, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def opchecked(tmp_path_factory) -> list[list[str]]:
    out_dir = str(tmp_path_factory.mktemp("opcheck"))
    mp.spawn(_worker, args=(free_port(), out_dir), nprocs=2, join=True)
    ranks = []
    for rank in range(2):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_opcheck_both_ops_on_every_rank(opchecked, strategy):
    want = [
        f"{d}-{s}-{r}-keep{k}"
        for s, k, r, _ in FORWARD
        if s == strategy
        for d in ("forward", "backward")
    ]
    for rank, done in enumerate(opchecked):
        got = [x for x in done if f"-{strategy}-" in x]
        assert got == want, f"rank {rank}: opcheck ran {got}, expected {want}"


def test_an_unknown_strategy_is_rejected_by_name():
    """Both ops validate the strategy before any collective (an unknown one is a ValueError)."""
    with pytest.raises(ValueError, match="strategy must be 'ring' or 'allgather', got 'ringg'"):
        ring._unpack("unused", [1, 0], "ringg")
