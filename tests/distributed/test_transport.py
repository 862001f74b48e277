"""The NCCL transport's device, bootstrap and lifetime logic, on CPU with a faked communicator.

No GPU runs here: fake_nccl stands in for hardneg._C_cuda's NcclComm (it records what it was
created with and each call) and for torch.cuda's current device and streams. What is checked is
the Python side a GPU run depends on:
- the communicator, its events and every exchange follow the tensors' device and that device's
  current stream, not whichever device is current;
- creating it is a collective of the group's own ranks only: no process group is created, so a
  subgroup of a larger world does not hang;
- it lives no longer than its process group: a destroyed and re-created default group gets a new
  communicator and the old one is destroyed; a freed group's communicators are destroyed; at
  exit every communicator is destroyed while the interpreter is still whole.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fake_nccl import FakeNccl, FakeTensor, fake_cuda
from hardneg.distributed import transport
from hardneg.distributed.transport import make_transport

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


def _init_single(path: str) -> None:
    """A one-rank gloo world (a file store: no port)."""
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)


@pytest.fixture
def world(tmp_path, monkeypatch):
    fake_cuda(monkeypatch)
    nccl = FakeNccl().install(monkeypatch)
    _init_single(str(tmp_path / "store0"))
    yield nccl
    if dist.is_initialized():
        dist.destroy_process_group()
    transport.release_comms()


def test_follows_the_tensors_device_not_the_current_one(world):
    """Tensors on cuda:1 while cuda:0 is current: the communicator is made for device 1 and every
    exchange and wait is ordered on device 1's current stream."""
    tr = make_transport(dist.group.WORLD, CUDA1, "nccl")
    assert [c[:3] for c in world.created] == [(1, 0, 1)]  # (nranks, rank, device)
    handle = tr.exchange(0, [FakeTensor(CUDA1)], 0, [FakeTensor(CUDA1, address=8192)])
    handle.wait()
    comm = world.comm(0)
    assert comm.exchanges[0][4] == 1001  # device 1's current stream, not device 0's (1000)
    assert comm.waits == [(1, 1001)]
    assert comm.exchanges[0][0] == [(4096, 48)] and comm.exchanges[0][2] == [(8192, 48)]


def test_rejects_tensors_on_another_device(world):
    tr = make_transport(dist.group.WORLD, CUDA1, "nccl")
    with pytest.raises(ValueError, match=r"recvs\[0\] is on cuda:0 but .* serves cuda:1"):
        tr.exchange(0, [FakeTensor(CUDA1)], 0, [FakeTensor(CUDA0)])


def test_one_comm_per_group_and_device(world):
    group = dist.group.WORLD
    make_transport(group, CUDA0, "nccl")
    make_transport(group, CUDA0, "nccl")
    assert len(world.created) == 1
    make_transport(group, CUDA1, "nccl")
    assert [c[2] for c in world.created] == [0, 1]


def test_recreated_default_group_gets_a_new_comm(world, tmp_path):
    """destroy_process_group() then init_process_group(): the new default group has the same name
    ("0") but is another group; reusing the old communicator would talk to a dead world. The old
    one is let go without a waiting destroy() (its peers may be gone)."""
    make_transport(dist.group.WORLD, CUDA0, "nccl")
    old = world.comm(0)
    dist.destroy_process_group()
    _init_single(str(tmp_path / "store1"))
    make_transport(dist.group.WORLD, CUDA0, "nccl")
    assert len(world.created) == 2 and world.comm(1) is not old
    assert not old.destroyed
    del old
    gc.collect()
    assert world.comm(0) is None and world.comm(1) is not None


def test_comm_freed_with_its_group(world):
    sub = dist.new_group([0])
    make_transport(sub, CUDA0, "nccl")
    assert world.comm(0) is not None
    dist.destroy_process_group(sub)
    del sub
    gc.collect()
    assert world.comm(0) is None


def test_release_comms_destroys_and_forgets(world):
    make_transport(dist.group.WORLD, CUDA0, "nccl")
    comm = world.comm(0)
    transport.release_comms(dist.group.WORLD)
    assert comm.destroyed
    make_transport(dist.group.WORLD, CUDA0, "nccl")
    assert len(world.created) == 2


@pytest.mark.parametrize(
    "backend, expected",
    [("gloo", "cpu"), ("nccl", "cuda:1"), ("cpu:gloo,cuda:nccl", "cpu"), ("cuda:nccl", "cuda:1")],
)
def test_bootstrap_device(monkeypatch, backend, expected):
    """The ncclUniqueId travels over the group itself: on the CPU where its backend serves CPU
    tensors, else on the tensors' device (an NCCL-only group)."""
    monkeypatch.setattr(dist, "get_backend", lambda group: backend)
    assert transport._bootstrap_device(object(), CUDA1) == torch.device(expected)


# The process group is destroyed by the first atexit hook registered, so it runs after
# hardneg's (hooks run last-in first-out): the communicator is let go while the group lives, and
# gloo's own threads are joined instead of torn down with the interpreter (an un-destroyed gloo
# group occasionally aborts the process at exit: "terminate called without an active exception").
_AT_EXIT = """
import atexit
import torch.distributed as dist
atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
from fake_nccl import FakeNccl, fake_cuda
from hardneg.distributed.transport import make_transport
fake_cuda()
FakeNccl(report="comm freed").install()
dist.init_process_group("gloo", init_method="file://{store}", rank=0, world_size=1)
make_transport(dist.group.WORLD, __import__("torch").device("cuda", 0), "nccl")
print("exiting", flush=True)
"""


def test_comms_end_at_exit_while_the_interpreter_is_alive(tmp_path):
    """A script that exits without destroying anything: the atexit hook lets its communicator go
    (the C++ destructor ends it, never waiting on peers) before interpreter teardown, not during
    it or never."""
    code = textwrap.dedent(_AT_EXIT.format(store=tmp_path / "store"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert lines[:2] == ["exiting", "comm freed destroyed=False finalizing=False"], out.stdout


def _subgroup_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Ranks 0 and 1 of a 3-rank world build NCCL transports over the subgroup [0, 1]; rank 2 does
    not take part (as in a ring over a subgroup). Then ranks 1 and 2 use a group made after."""
    fake_cuda()
    nccl = FakeNccl().install()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )
    # A group whose backend is not plain "gloo" (as "cpu:gloo,cuda:nccl" would be on GPUs).
    sub = dist.new_group([0, 1], backend="cpu:gloo")
    made = []
    if rank < 2:
        make_transport(sub, CUDA0, "nccl")
        made = [(n, r, d, uid.hex()) for n, r, d, uid in nccl.created]
    # Every rank must still agree on the groups created next (new_group is a collective of the
    # whole world: one called on ranks 0 and 1 only would shift their names off rank 2's).
    later = dist.new_group([1, 2])
    if rank > 0:
        total = torch.ones(1)
        dist.all_reduce(total, group=later)
        made.append(total.item())
    dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(made, f)
    dist.destroy_process_group()


def test_subgroup_bootstrap_involves_only_its_ranks(tmp_path):
    from ring_cases import free_port

    ctx = mp.start_processes(
        _subgroup_worker,
        args=(3, free_port(), str(tmp_path)),
        nprocs=3,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail("creating the communicators of a subgroup hung")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    made = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(3)]
    assert made[2] == [2.0]
    (c0,), (c1, total) = made[0], made[1]
    assert total == 2.0
    assert c0[:3] == [2, 0, 0] and c1[:3] == [2, 1, 0]
    assert c0[3] == c1[3]  # rank 1 received rank 0's ncclUniqueId
