"""Cross-device jobs exit cleanly on gloo: nothing of hardneg's outlives destroy_process_group.

The failure this guards against: a job printed correct results, then aborted at exit with
"terminate called without an active exception" (about 1 run in 20 on a loaded machine). A gloo
process group that outlives destroy_process_group keeps its worker threads into interpreter
teardown; one of them still releasing a finished work (a barrier's work holding the previous
all_reduce's tensors) must take the GIL there, Python makes it exit instead, and the forced unwind
through a noexcept destructor calls std::terminate. hardneg kept the group alive twice: its op
registry held it, and its first custom-op call imported torch.distributed.nn.functional, whose
defaults capture the default group.

- test_no_group_or_thread_survives_destroy: after ring and all-gather calls, forward and backward,
  every exchange the ring posted was waited before the call returned, and destroy_process_group
  frees the group and its threads (both were kept before the fix, in every run).
- test_exit_code_with_starved_gloo_threads: whole 2-rank torchrun jobs with the failing order
  made likely (torch's and gloo's threads at SCHED_IDLE, all threads on one CPU, from the final
  all_reduce on); before the fix 5 of 6 such runs aborted in a row, but fewer when the machine
  was saturated by other jobs (gloo's threads then also run whenever the main thread waits), so
  the first test is the one that fails on every run of the old code.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hardneg import fused_hardneg_loss
from hardneg.distributed import ops
from ring_cases import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STRESS = os.path.join(ROOT, "tools", "stress_exit.py")
# Jobs in a row: at the 5-in-6 abort rate seen before the fix, 3 runs all pass with probability
# 1/216 (test_no_group_or_thread_survives_destroy catches the cause itself in every run).
RUNS = 3


class _Tracked:
    """A transport handle that remembers whether it was waited."""

    def __init__(self, handle, posted: list) -> None:
        self.handle, self.waited = handle, False
        posted.append(self)

    def wait(self) -> None:
        self.handle.wait()
        self.waited = True


class _TrackingTransport:
    def __init__(self, inner, posted: list) -> None:
        self.inner, self.posted = inner, posted
        self.rank, self.world_size = inner.rank, inner.world_size

    def exchange(self, dst, sends, src, recvs):
        return _Tracked(self.inner.exchange(dst, sends, src, recvs), self.posted)


def _thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return names


def _liveness_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    posted: list[_Tracked] = []
    make = ops.make_transport
    ops.make_transport = lambda *a: _TrackingTransport(make(*a), posted)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    unwaited = []
    for strategy in ("ring", "allgather"):
        B = (5, 9)[rank]
        q = torch.randn(B, 48, requires_grad=True)
        t = torch.randn(B, 48, requires_grad=True)
        h = torch.randn(B, 2, 48)
        loss = fused_hardneg_loss(
            q, t, hard_negatives=h, symmetric=True, group=dist.group.WORLD, strategy=strategy
        )
        unwaited.append(sum(not p.waited for p in posted))
        loss.backward()
        unwaited.append(sum(not p.waited for p in posted))
    summary = torch.ones(1)
    dist.all_reduce(summary)
    dist.barrier()
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    gc.collect()
    result = {
        "posted": len(posted),
        "unwaited": unwaited,
        "group_alive": group() is not None,
        "gloo_threads": [n for n in _thread_names() if "gloo" in n],
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_no_group_or_thread_survives_destroy(tmp_path):
    mp.spawn(_liveness_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            r = json.load(f)
        # 2 ring calls forward and backward: 1 + (K - 1) exchanges each on K = 2 ranks, and so on.
        assert r["posted"] > 0, "the tracking transport saw no exchange: the check ran on nothing"
        assert r["unwaited"] == [0, 0, 0, 0], f"rank {rank}: exchanges left in flight {r}"
        assert not r["group_alive"], f"rank {rank}: the default group outlived destroy"
        assert r["gloo_threads"] == [], f"rank {rank}: gloo threads outlived destroy {r}"


def _launch_job(port: int) -> subprocess.Popen:
    """One 2-rank torchrun job of tools/stress_exit.py (2 loss calls, then the forced teardown
    order). torchrun as users run it: with its agent's store the failing order is reached in most
    runs (without it, rank 0 serves the store and the ranks' waits on it let gloo's threads run)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    cmd += ["--master-addr=127.0.0.1", f"--master-port={port}"]
    cmd += [STRESS, "--worker", "--cases=2", "--starve"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_exit_code_with_starved_gloo_threads():
    for run in range(RUNS):
        job = _launch_job(free_port())
        try:
            out, err = job.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            job.kill()
            out, err = job.communicate()
        ok = job.returncode == 0 and "STRESS_OK" in out
        abort = "terminate called" in err or "SIGABRT" in err
        assert ok, f"run {run + 1}: torchrun exited {job.returncode}, abort={abort}: {err[-800:]}"
