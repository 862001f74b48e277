"""The benchmarks' one harness: machine record, pinned threads, interleaved median timing, peak
memory of one call, and the JSON + markdown result files with their tables.

Run every benchmark from the repository root as a module (`python -m benchmarks.bench_loss`);
each takes --quick (its smallest configuration, a smoke test whose numbers mean nothing) and --out
(where the result files go; default benchmarks/results/).

Timing: the CPU is shared and noisy, so every repeat runs each provider once, in an order that
rotates from repeat to repeat, and the median over repeats is reported. Ratios are taken between
medians of the same run, never across runs.

Peak memory (CPU): a fresh interpreter builds the inputs, warms the provider up, resets the
kernel's peak-RSS counter of the process (write "5" to /proc/self/clear_refs, so the peak equals
the current RSS), runs ONE call and reports peak RSS after minus RSS before. The peak is read from
VmHWM in /proc/self/status, the per-process figure that getrusage's ru_maxrss is built from:
ru_maxrss itself cannot be reset and, in a child started by vfork (Python's subprocess), starts at
the parent's peak. Where clear_refs is not writable the ru_maxrss delta is used instead. On a GPU:
torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory allocated before.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Machine and versions
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return [f for f in flags if f.startswith(("avx", "fma", "amx"))]
    except OSError:
        pass
    return []


def machine_slug() -> str:
    """Short file-name-safe machine name, e.g. "amd-epyc-2c"."""
    model = _cpu_model().lower()
    for junk in ("(r)", "(tm)", "processor", "cpu", "@"):
        model = model.replace(junk, " ")
    words = [w for w in model.split() if w and not w.endswith("ghz")][:3]
    return "-".join(words + [f"{os.cpu_count()}c"])


def machine_record() -> dict:
    """Date, CPU, cores and the versions of everything that shapes the timings."""
    import hardneg
    import torch

    info = hardneg.build_info()
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "glibc": "-".join(platform.libc_ver()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_parallel": torch.__config__.parallel_info().splitlines()[:6],
        "hardneg": info["version"],
        "hardneg_cxx_compiler": info["cxx_compiler"],
        "git_commit": _git_commit(),
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def pin_threads(threads: int) -> int:
    """Run torch's intra-op work, and hardneg's OpenMP kernels (they take
    torch.get_num_threads()), on `threads` threads. Every timed or measured process calls it."""
    import torch

    torch.set_num_threads(threads)
    return threads


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    return time.perf_counter(), time.process_time()


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    before: Callable[[], object] | None = None,
    after: Callable[[], object] | None = None,
) -> dict[str, dict]:
    """Median wall and CPU seconds of each call over `repeats` rounds; every round runs every call
    once, the order rotating by one per round so no provider always follows the same neighbour
    (the order is the same in every process, so calls that hold collectives match across ranks).
    A call that returns a (wall, cpu) tuple timed itself (e.g. a backward after an untimed
    forward): those seconds are used. before() runs untimed before each call (e.g. a barrier and a
    device sync), after() inside the timed span after it (e.g. a device sync).

    CPU seconds are the process's (all threads): with one thread they are the work of the call
    without the time other processes held the core, the steadier figure on a shared machine.

    Returns {name: {"median_s", "cpu_median_s", "min_s", "max_s", "times_s", "cpu_times_s"}}.
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if before is not None:
                before()
            w0, c0 = clock()
            own = calls[name]()
            if after is not None:
                after()
            w1, c1 = clock()
            w, c = own if isinstance(own, tuple) else (w1 - w0, c1 - c0)
            wall[name].append(w)
            cpu[name].append(c)
    return {
        name: {
            "median_s": statistics.median(wall[name]),
            "cpu_median_s": statistics.median(cpu[name]),
            "min_s": min(wall[name]),
            "max_s": max(wall[name]),
            "times_s": wall[name],
            "cpu_times_s": cpu[name],
        }
        for name in names
    }


# ---------------------------------------------------------------------------------------------
# Peak memory of one call, in a fresh process
# ---------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Set the process's peak RSS (VmHWM) to its current RSS; False where Linux does not allow."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_call_peak(call: Callable[[], object], device=None) -> dict:
    """Extra peak memory of one call, in MiB, relative to the memory in use just before it: the
    process's RSS on the CPU, torch's allocator on a CUDA `device`.

    Run it in a fresh process once inputs exist and the call was warmed up (see module docstring).
    """
    import gc

    gc.collect()
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {
            "extra_peak_mib": (peak - before) / 2**20,
            "method": "torch.cuda.max_memory_allocated",
        }
    if reset_peak_rss():
        before_kib = _status_kib("VmRSS")
        call()
        peak_kib = _status_kib("VmHWM")
        method = "VmHWM after clear_refs"
    else:
        before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call()
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss delta"
    return {"extra_peak_mib": (peak_kib - before_kib) / 1024, "method": method}


def run_probe(module: str, args: list[str], *, timeout_s: float = 900) -> dict:
    """Run `python -m module *args` in a fresh interpreter; its last stdout line is JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"memory probe {module} {' '.join(args)} failed (rc {out.returncode}):\n"
            f"{out.stderr[-3000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def spawn_ranks(fn: Callable, world: int, *args) -> object:
    """Run fn(rank, world, port, *args, out_json) in `world` local processes (torch
    multiprocessing, a free localhost port for the process group); returns what rank 0 wrote to
    out_json."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        mp.spawn(fn, args=(world, port, *args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def add_output_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """The options every benchmark takes: --quick (its smallest configuration) and --out."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="directory for the JSON + markdown results (default benchmarks/results/; "
        "point smoke runs elsewhere)",
    )


def markdown_header(title: str, machine: dict) -> list[str]:
    """The opening lines of every results markdown: what, where, when, and the versions."""
    m = machine
    return [
        f"# {title} on {m['cpu']} ({m['logical_cores']} cores), {m['date']}",
        "",
        f"torch {m['torch']}, hardneg {m['hardneg']} (git {m['git_commit']}), "
        f"{m['hardneg_cxx_compiler']}, {m['glibc']}, Python {m['python']}; CPU flags: "
        f"{' '.join(m['cpu_flags'])}.",
        "",
    ]


def ratio(a: float, b: float | None, digits: int = 2) -> str:
    """a / b as "1.23x" ("" when b is missing or zero)."""
    return f"{a / b:.{digits}f}x" if b else ""


def memory_table(
    mib: dict[str, float], baseline: str, header=("provider", "extra peak MiB", "x baseline")
) -> str:
    """Extra peak MiB per provider and its ratio to the baseline provider's."""
    base = mib.get(baseline)
    rows = [[p, v, f"{v / base:.3f}" if base else ""] for p, v in mib.items()]
    return markdown_table(list(header), rows)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    op: str, record: dict, markdown: str, *, out_dir: Path = RESULTS_DIR, slug: str | None = None
) -> Path:
    """Write <out_dir>/<op>_<machine>_<date>.json and .md; returns the JSON path. record must hold
    "machine" (machine_record()); slug names the machine instead of machine_slug() (a GPU)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{op}_{slug or machine_slug()}_{record['machine']['date']}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)
    return json_path
