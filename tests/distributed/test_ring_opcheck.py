"""torch.library.opcheck of the cross-device ops on 2 gloo ranks: hardneg::hardneg_loss_ring and
hardneg::hardneg_loss_allgather with their backward ops (schema, fake implementation against the
real outputs, autograd registration, AOT dispatch).

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
from hardneg import KEEP_LOGITS_BYTES, fused_hardneg_loss
from hardneg._spec import GroupSpec, LossSpec
from hardneg.distributed.layout import register_group
from ring_cases import SIZES, free_port

D, M = 7, 2

# (strategy, keep_logits_bytes, reduction, fuse_grad): the forward paths of both ops.
FORWARD = [
    ("ring", KEEP_LOGITS_BYTES, "mean", False),
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
    sizes = tuple(b for k in range(2) for b in (SIZES[2][k], M))
    spec = LossSpec("ega", 0.05, 9.0, 2.0, 0.0, True, reduction, 2, True)
    gspec = GroupSpec(register_group(group), sizes, strategy, "torch", keep)
    args = (query, target, hard_negatives, target_ids, hard_negative_ids)
    args += (spec.encode(), gspec.encode())
    return args + ((fuse_grad,) if strategy == "allgather" else ())


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
            strategy = case[0]
            forward = getattr(torch.ops.hardneg, f"hardneg_loss_{strategy}")
            backward = getattr(torch.ops.hardneg, f"hardneg_loss_{strategy}_backward")
            args = _args(rank, group, *case, requires_grad=True)
            torch.library.opcheck(forward.default, args)
            done.append(f"forward-{strategy}-{case[2]}-keep{case[1]}")
            # The backward op on what this forward saved for it.
            args = _args(rank, group, *case, requires_grad=False)
            _, saved_a, saved_b = forward(*args)
            B = args[0].shape[0]
            grad_loss = torch.randn(B) if case[2] == "none" else torch.tensor(1.7)
            bwd_args = (grad_loss, *args[:5], saved_a, saved_b, *args[5:7])
            torch.library.opcheck(backward.default, bwd_args)
            done.append(f"backward-{strategy}-{case[2]}-keep{case[1]}")
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


@pytest.mark.parametrize(
    ("strategy", "transport", "keep", "message"),
    [
        ("ringg", "auto", 0, "strategy must be one of .* got 'ringg'"),
        ("auto", "mpi", 0, "transport must be one of .* got 'mpi'"),
        ("ring", "auto", -1, "keep_logits_bytes must be an int >= 0, got -1"),
    ],
)
def test_group_options_are_rejected_by_name(strategy, transport, keep, message):
    """The group options are checked before any collective: in the spec, and in the public entry
    (which needs no process group to reject them)."""
    with pytest.raises(ValueError, match=message):
        GroupSpec("unused", (1, 0), strategy, transport, keep)
    q = torch.randn(2, 3)
    with pytest.raises(ValueError, match=message):
        fused_hardneg_loss(q, q, strategy=strategy, transport=transport, keep_logits_bytes=keep)
