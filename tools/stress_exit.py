"""Exit-cleanliness stress test of cross-device hardneg_loss jobs on gloo (CPU).

Runs a whole torchrun job N times and counts the runs that exit non-zero. Each job does what a
user's does: about a hundred fused_hardneg_loss calls over dist.group.WORLD (ring and
allgather, uneven per-rank batches, D = 48, with and without hard negatives, id masking,
symmetric), each checked against the fp64 reference, then an all_reduce of the summary, a
barrier, destroy_process_group() and a normal interpreter exit. A job that printed correct
results but died at exit (SIGABRT: "terminate called without an active exception") counts as a
failure, and its output is kept.

    python tools/stress_exit.py --runs 50 --nproc 2
    python tools/stress_exit.py --runs 50 --nproc 4 --cases 48
    python tools/stress_exit.py --runs 20 --gdb    # each rank under gdb: backtrace on abort
    python tools/stress_exit.py --runs 50 --cores  # core dumps; backtraces of failed runs

Runs in the job itself with --worker (torchrun starts it so).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

D = 48
SIZES = (5, 9, 3, 7)  # rows of rank r: SIZES[r % 4]


def _cases(n: int):
    product = itertools.product(
        ("ring", "allgather"), (0, 2), (False, True), (False, True), ("llave", "infonce", "ega")
    )
    return list(itertools.islice(itertools.cycle(product), n))


def _starve_workers() -> None:
    """Every thread of this process onto one CPU, and every thread but this one to SCHED_IDLE:
    torch's and gloo's worker threads then run only while the main thread sleeps, so a worker
    still holding a finished work when the main thread reaches interpreter teardown (the failing
    order) becomes the rule rather than a 1-in-20 accident of scheduling."""
    me = threading.get_native_id()
    cpu = {min(os.sched_getaffinity(0))}
    for tid in map(int, os.listdir("/proc/self/task")):
        os.sched_setaffinity(tid, cpu)
        if tid != me:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def _worker(num_cases: int, starve: bool) -> int:
    import torch
    import torch.distributed as dist
    from hardneg import fused_hardneg_loss, hardneg_loss_reference

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [SIZES[k % len(SIZES)] for k in range(world)]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    worst = 0.0
    for i, (strategy, m, ids, sym, mode) in enumerate(_cases(num_cases)):
        g = torch.Generator().manual_seed(i)
        B = sum(sizes)
        unit = torch.nn.functional.normalize
        q = unit(torch.randn(B, D, generator=g, dtype=torch.float64))
        t = unit(q + torch.randn(B, D, generator=g, dtype=torch.float64))
        h = torch.randn(B, m, D, generator=g, dtype=torch.float64) if m else None
        t_ids = torch.randint(B // 2, (B,), generator=g) if ids else None
        h_ids = torch.randint(B // 2, (B, m), generator=g) if ids and m else None
        kw = dict(mode=mode, symmetric=sym, target_ids=t_ids, hard_negative_ids=h_ids)
        want = hardneg_loss_reference(q, t, hard_negatives=h, **kw)
        kw["target_ids"] = t_ids[lo:hi] if ids else None
        kw["hard_negative_ids"] = h_ids[lo:hi] if ids and m else None
        local_q = q[lo:hi].float().requires_grad_(True)
        got = fused_hardneg_loss(
            local_q,
            t[lo:hi].float(),
            hard_negatives=h[lo:hi].float() if m else None,
            group=dist.group.WORLD,
            strategy=strategy,
            **kw,
        )
        got.backward()
        worst = max(worst, abs(got.item() - want.item()) / max(1.0, abs(want.item())))
    if starve:
        _starve_workers()
    summary = torch.tensor([worst])
    dist.all_reduce(summary, op=dist.ReduceOp.MAX)
    dist.barrier()
    if rank == 0:
        print(f"STRESS_OK cases={num_cases} world={world} worst_rel_err={summary.item():.2e}")
    dist.destroy_process_group()
    return 0 if summary.item() < 1e-4 else 2  # fp32 loss against the fp64 reference


def _launch(args, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}"]
    cmd += ["--master-addr=127.0.0.1", f"--master-port={port}"]
    if args.gdb:
        # Each rank under gdb: on SIGABRT it prints every thread's stack, then exits non-zero.
        cmd += ["--no-python", "gdb", "-q", "-batch", "-return-child-result"]
        cmd += ["-ex", "set pagination off", "-ex", "handle SIGPIPE nostop noprint"]
        cmd += ["-ex", "run", "-ex", "thread apply all bt 30", "--args", sys.executable]
    cmd += [os.path.abspath(__file__), "--worker", f"--cases={args.cases}"]
    return cmd + ["--starve"] * args.starve


def _allow_cores() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _core_backtraces(cwd: str) -> str:
    """Every thread's stack from each core file the run left in cwd (core_pattern "core")."""
    out = []
    for core in glob.glob(os.path.join(cwd, "core*")):
        cmd = ["gdb", "-q", "-batch", "-ex", "thread apply all bt 40", sys.executable, core]
        bt = subprocess.run(cmd, capture_output=True, text=True)
        out.append(f"\n===== {os.path.basename(core)} =====\n{bt.stdout}{bt.stderr}")
    return "".join(out)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--cases", type=int, default=96)
    p.add_argument("--gdb", action="store_true", help="run each rank under gdb (backtraces)")
    p.add_argument("--starve", action="store_true", help="worker threads to SCHED_IDLE at the end")
    p.add_argument("--cores", action="store_true", help="core dumps, backtraces of failed runs")
    p.add_argument("--keep", default=None, help="folder for the logs of failed runs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _worker(args.cases, args.starve)
    keep = args.keep or tempfile.mkdtemp(prefix="stress_exit_")
    failures = 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    for run in range(args.runs):
        t0 = time.perf_counter()
        cwd = tempfile.mkdtemp(prefix="run", dir=keep)
        proc = subprocess.run(
            _launch(args, _free_port()),
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            preexec_fn=_allow_cores if args.cores else None,
        )
        out = proc.stdout + proc.stderr + _core_backtraces(cwd)
        shutil.rmtree(cwd)
        ok = proc.returncode == 0 and "STRESS_OK" in out
        failures += not ok
        dt = time.perf_counter() - t0
        print(f"run {run + 1}/{args.runs}: rc={proc.returncode} {dt:.1f}s", flush=True)
        if not ok or args.gdb and "SIGABRT" in out:
            path = os.path.join(keep, f"run{run + 1}.log")
            with open(path, "w") as f:
                f.write(out)
            print(f"  log: {path}", flush=True)
    print(f"{failures} of {args.runs} runs exited non-zero ({args.nproc} ranks)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
