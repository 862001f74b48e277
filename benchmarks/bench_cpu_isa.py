"""Benchmark of the portable CPU build (run-time ISA dispatch) against a -march=native build of the
same sources, side by side in one process.

Both _C modules are loaded at once: the installed package's (HARDNEG_CPU_ARCH=portable) and a
native one from its own build directory, imported under another package name. Before each call the
benchmark points hardneg._ops at the module under test (and, for the portable module's forced
variants, calls its set_cpu_isa), so every round runs every provider once, interleaved, in a
rotating order (benchmarks/common.time_interleaved), and the machine's load hits them alike.

Providers:  native             the HARDNEG_CPU_ARCH=native build (one variant)
            portable           the installed portable build, the variant CPUID picked
            portable/<isa>     the same build forced to another variant (avx2, baseline)
            <name>             any extra build given with --extra NAME=PATH
Levels:     loss    fused_hardneg_loss, forward + backward (bench_loss's "full" call)
            kernel  the fused kernel alone (hardneg_loss_rows with the gradient) on the first row
                    chunk of S = Q C^T; the GEMMs around it dominate the loss at large D, so this
                    is where an ISA difference shows first
Shapes: bench_loss.SHAPES[:2] (B, N, D) = (512, 8192, 1024) and (1024, 16384, 64), fp32, 1 thread.
1 thread, so times are process CPU times (what the call cost, without the time other processes
held the core); ratios to native are medians of the per-round ratios (the two calls of a round
run back to back, so slow drifts of the load cancel).

    # the native build, in its own directory (cmake, ninja, pybind11 in the environment):
    python -m benchmarks.bench_cpu_isa --build-native build/native
    python -m benchmarks.bench_cpu_isa --native build/native   # writes benchmarks/results/
    python -m benchmarks.bench_cpu_isa --native build/native --quick   # smoke test
    python -m benchmarks.bench_cpu_isa --native build/native --extra before=DIR --note "..."

Legend: B queries, M hard negatives per query, N = B + B*M candidates, D embedding dim, R rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import hardneg
import torch
from hardneg import _ops, _schedule
from hardneg._constants import MODES

from benchmarks import bench_loss, common

LEVELS = ("loss", "kernel")
WITHIN = 0.05  # the portable build's goal: at most 5% slower than native
PORTABLE_C = _ops._C  # the installed (portable) module; use() points hardneg._ops elsewhere


def build_native(build_dir: Path) -> None:
    """Configure and build the CPU module with HARDNEG_CPU_ARCH=native into build_dir."""
    import pybind11

    subprocess.run(
        [
            "cmake",
            "-S",
            str(common.REPO_ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            "-DHARDNEG_CPU_ARCH=native",
            "-DHARDNEG_CUDA=OFF",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ],
        check=True,
    )
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "_C"], check=True)


def load_module(name: str, path: Path) -> ModuleType:
    """The _C extension at `path` (a file, or a build directory holding one) as `<name>._C`."""
    if path.is_dir():
        found = sorted(path.glob("_C.*.so"))
        if not found:
            raise FileNotFoundError(f"no _C.*.so in {path}: build it first (--build-native)")
        path = found[0]
    spec = importlib.util.spec_from_file_location(f"{name}._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def providers(native: ModuleType, extra: dict[str, ModuleType]) -> dict[str, tuple]:
    """{label: (module, forced isa or None)}."""
    out = {"native": (native, None), "portable": (PORTABLE_C, "auto")}
    for isa in PORTABLE_C.cpu_isas_supported()[1:]:
        out[f"portable/{isa}"] = (PORTABLE_C, isa)
    out.update({name: (module, None) for name, module in extra.items()})
    return out


def use(module: ModuleType, isa: str | None) -> None:
    """Route hardneg's CPU kernels to `module` (variant `isa`)."""
    _ops._C = module
    if isa is not None:
        module.set_cpu_isa(isa)


def loss_call(shape: bench_loss.Shape, inputs: dict):
    return bench_loss.make_call(bench_loss.provider_fn("hardneg", shape), inputs, "full")


def kernel_call(shape: bench_loss.Shape, inputs: dict):
    """hardneg_loss_rows with the gradient on the first row chunk of S; times itself (the copy
    that restores S before each call is not counted)."""
    q_BD, t_BD, h = inputs["query"], inputs["target"], inputs["hard_negatives"]
    c_ND = t_BD if h is None else torch.cat([t_BD, h.flatten(0, 1)])
    R = min(shape.B, _schedule.default_chunk_size(c_ND.shape[0]))
    s0_RN = q_BD[:R] @ c_ND.T  # (R, D) x (D, N)
    s_RN = torch.empty_like(s0_RN)
    stats = {k: torch.empty(R) for k in ("lse", "loss", "z_pos", "s_pos")}

    def call():
        s_RN.copy_(s0_RN)
        p = _ops.new_params(s_RN.device)
        p.s, p.rows, p.cols, p.ld_s = s_RN.data_ptr(), R, s_RN.shape[1], s_RN.stride(0)
        for name, t in stats.items():
            setattr(p, name, t.data_ptr())
        p.mode, p.inv_tau, p.alpha = MODES.index("llave"), 1 / hardneg.TEMPERATURE, hardneg.ALPHA
        p.need_grad = True
        w0, c0 = common.clock()
        _ops.kernels_for(s_RN.device).hardneg_loss_rows(p)
        w1, c1 = common.clock()
        return w1 - w0, c1 - c0

    return call, R


def paired_ratios(timed: dict, name: str, base: str, key: str) -> list[float]:
    return [a / b for a, b in zip(timed[name][key], timed[base][key], strict=True)]


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def time_level(shape, level, provs, repeats) -> dict:
    inputs = bench_loss.make_inputs(shape)
    if level == "loss":
        body, rows = loss_call(shape, inputs), shape.B
    else:
        body, rows = kernel_call(shape, inputs)

    def routed(module, isa):
        def call():
            use(module, isa)
            return body()

        return call

    calls = {label: routed(*p) for label, p in provs.items()}
    load_before = os.getloadavg()
    timed = common.time_interleaved(calls, repeats=repeats, warmup=2)
    load_after = os.getloadavg()
    use(PORTABLE_C, "auto")
    rows_out = []
    for label, t in timed.items():
        ratios = paired_ratios(timed, label, "native", "cpu_times_s")
        q1, q3 = quartiles(ratios)
        cpu_ms = [c * 1e3 for c in t["cpu_times_s"]]
        rows_out.append(
            {
                "provider": label,
                "cpu_median_ms": statistics.median(cpu_ms),
                "cpu_min_ms": min(cpu_ms),
                "cpu_max_ms": max(cpu_ms),
                "cpu_iqr_ms": list(quartiles(cpu_ms)),
                "wall_median_ms": t["median_s"] * 1e3,
                "ratio_vs_native": statistics.median(ratios),
                "ratio_iqr": [q1, q3],
            }
        )
    return {
        "shape": shape.name,
        "level": level,
        "rows": rows,
        "repeats": repeats,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "summary": rows_out,
        "raw": timed,
    }


def render_markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        f"# bench_cpu_isa: portable vs native CPU build on {m['cpu']} ({m['logical_cores']} "
        f"cores), {m['date']}",
        "",
        f"torch {m['torch']}, hardneg {m['hardneg']} (git {m['git_commit']}), "
        f"{m['hardneg_cxx_compiler']}, {m['glibc']}, Python {m['python']}; CPU flags: "
        f"{' '.join(m['cpu_flags'])}.",
        "",
        f"Builds: portable = the installed package (cpu_isa picked here: "
        f"{record['portable_isa']}; variants {', '.join(record['portable_variants'])}); "
        f"native = HARDNEG_CPU_ARCH=native built from the same sources "
        f"({record['native_path']})"
        + "".join(f"; {k} = {v}" for k, v in record.get("extra", {}).items())
        + ".",
        "",
        *([record["note"], ""] if record.get("note") else []),
        "Generated by `python -m benchmarks.bench_cpu_isa --native <dir>`. 1 thread, fp32, "
        "llave, temperature 0.02. Each round runs every provider once, interleaved in a "
        "rotating order; times are process CPU times (ms): median, [min, max] and interquartile "
        "range over the rounds. `vs native` is the median of the per-round ratios "
        "provider / native, with its interquartile range. loss = fused_hardneg_loss forward + "
        "backward; kernel = hardneg_loss_rows with the gradient on one row chunk of S. "
        f"{record['load_note']}",
        "",
        "| shape | level | provider | CPU ms median | [min, max] | IQR | vs native | IQR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in record["results"]:
        for r in entry["summary"]:
            lines.append(
                f"| {entry['shape']} | {entry['level']} (R={entry['rows']}) | {r['provider']} | "
                f"{r['cpu_median_ms']:.2f} | [{r['cpu_min_ms']:.2f}, {r['cpu_max_ms']:.2f}] | "
                f"{r['cpu_iqr_ms'][0]:.2f}-{r['cpu_iqr_ms'][1]:.2f} | "
                f"{r['ratio_vs_native']:.3f} | {r['ratio_iqr'][0]:.3f}-{r['ratio_iqr'][1]:.3f} |"
            )
    lines += ["", verdict(record), ""]
    return "\n".join(lines)


def verdict(record: dict) -> str:
    worst = max(
        r["ratio_vs_native"]
        for e in record["results"]
        for r in e["summary"]
        if r["provider"] == "portable"
    )
    ok = worst <= 1 + WITHIN
    return (
        f"Portable / native, worst median ratio over the shapes and levels: {worst:.3f} "
        f"({'within' if ok else 'NOT within'} the {WITHIN:.0%} goal)."
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--native", type=Path, help="the native _C: a build directory or the .so")
    ap.add_argument("--build-native", type=Path, metavar="DIR", help="build it into DIR, exit")
    ap.add_argument("--extra", nargs="*", default=[], metavar="NAME=PATH", help="more builds")
    ap.add_argument("--repeats", type=int, default=21, help="rounds per (shape, level)")
    ap.add_argument("--quick", action="store_true", help="small shapes, 3 rounds (smoke test)")
    ap.add_argument("--out", help="directory for the JSON + markdown (default benchmarks/results)")
    ap.add_argument("--note", default="", help="a paragraph for the report (e.g. what --extra is)")
    ap.add_argument("--render", metavar="JSON", help="rewrite the markdown of a results JSON")
    args = ap.parse_args(argv)
    if args.render:
        path = Path(args.render)
        record = json.loads(path.read_text())
        if args.note:
            record["note"] = args.note
            path.write_text(json.dumps(record, indent=1) + "\n")
        path.with_suffix(".md").write_text(render_markdown(record))
        return 0
    if args.build_native:
        build_native(args.build_native)
        return 0
    if args.native is None:
        ap.error("--native DIR is required (build one with --build-native DIR)")
    if hardneg.build_info()["cpu_arch"] != "portable":
        ap.error(f"the installed hardneg is not the portable build: {hardneg.build_info()}")
    torch.set_num_threads(1)
    native = load_module("hardneg_native", args.native)
    extra = {}
    for item in args.extra:
        name, path = item.split("=", 1)
        extra[name] = load_module(f"hardneg_{name.replace('-', '_')}", Path(path))
    provs = providers(native, extra)
    shapes = bench_loss.QUICK_SHAPES[:1] if args.quick else bench_loss.SHAPES[:2]
    repeats = 3 if args.quick else args.repeats
    results = []
    for shape in shapes:
        for level in LEVELS:
            entry = time_level(shape, level, provs, repeats)
            results.append(entry)
            print(
                f"{shape.name} {level}: "
                + ", ".join(
                    f"{r['provider']} {r['cpu_median_ms']:.2f} ms ({r['ratio_vs_native']:.3f})"
                    for r in entry["summary"]
                ),
                flush=True,
            )
    loads = [x for e in results for x in (e["loadavg_before"][0], e["loadavg_after"][0])]
    record = {
        "machine": common.machine_record(),
        "portable_isa": PORTABLE_C.cpu_isa(),
        "portable_variants": PORTABLE_C.cpu_isas_compiled(),
        "native_path": str(args.native),
        "extra": {k: v for k, v in (i.split("=", 1) for i in args.extra)},
        "note": args.note,
        "shapes": [dataclasses.asdict(s) for s in shapes],
        "results": results,
        "load_note": (
            f"The machine is shared: its 1-minute load average ran from {min(loads):.1f} to "
            f"{max(loads):.1f} during the run, on {os.cpu_count()} cores."
        ),
    }
    path = common.write_results(
        "bench_cpu_isa",
        record,
        render_markdown(record),
        out_dir=Path(args.out) if args.out else common.RESULTS_DIR,
    )
    print(verdict(record))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
