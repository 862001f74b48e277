"""Benchmark of hardneg_loss (the fused hard-negative contrastive loss) on the CPU and, with
--device cuda, on a GPU (benchmarks/bench_loss_gpu.py: bf16, its own providers and shapes).

CPU providers, side by side in one run:
  hardneg        hardneg.fused_hardneg_loss (row chunks, fused C++ kernel, gradient in the forward)
  reference      hardneg.reference.hardneg_loss_reference, eager (materialised B x N logits)
  compile        torch.compile(hardneg_loss_reference)
  torch_chunked  the strongest loss a user could write without hardneg: the same row chunks and
                 chunk size, torch elementwise ops (in place where possible), the gradient computed
                 in the forward the same way (benchmarks/torch_chunked.py, tested against the
                 reference by tests/test_torch_chunked.py)
  gemm           the bound: the 3 bare fp32 GEMMs of the same shapes (S = Q C^T; dQ = dS C and
                 dC = dS^T Q), timed in the same rounds
Modes: forward (under no_grad), backward (backward only, after an untimed forward), full (both).
Threads: 1 and 2 (common.pin_threads; hardneg passes torch.get_num_threads() to OpenMP).
GPU providers: hardneg, eager_autocast (bf16 autocast, what users write), torch_chunked (bf16) and
gemm (hardneg's 3 cuBLAS GEMMs alone); modes forward and full; CUDA-event timing.

    python -m benchmarks.bench_loss                 # full CPU run, writes benchmarks/results/
    python -m benchmarks.bench_loss --quick --out /tmp/bench   # small shapes: a smoke test
    python -m benchmarks.bench_loss --shapes 0 1 --no-ablation # the CPU target shapes only
    python -m benchmarks.bench_loss --device cuda   # GPU run (bf16); without a GPU: says so
    python -m benchmarks.bench_loss --render benchmarks/results/bench_loss_<machine>_<date>.json

Legend: B queries, M hard negatives per query, N = B + B*M candidates, D embedding dim,
R rows in a chunk. Suffixes name shapes: q_BD, c_ND, s_RN.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

import hardneg
import torch
from hardneg import _schedule
from hardneg import loss as hardneg_loss_module
from hardneg._constants import ALPHA, EGA_BETA, EGA_MARGIN, TEMPERATURE
from hardneg._spec import LossSpec
from hardneg.reference import hardneg_loss_reference
from torch import Tensor

from benchmarks import bench_loss_gpu, common
from benchmarks.bench_loss_report import render_gpu_markdown, render_markdown
from benchmarks.loss_shapes import (
    GPU_SHAPES,
    QUICK_GPU_SHAPES,
    QUICK_SHAPES,
    SHAPES,
    Shape,
    make_inputs,
)
from benchmarks.torch_chunked import torch_chunked_hardneg_loss

__all__ = ["QUICK_SHAPES", "SHAPES", "Shape", "make_inputs", "main", "make_call", "provider_fn"]

PROVIDERS = ("hardneg", "reference", "compile", "torch_chunked")
# What --providers accepts on the CPU: the providers and the forced recomputing backward.
CPU_PROVIDER_NAMES = (*PROVIDERS, "hardneg_recompute")
MODES = ("forward", "backward", "full")


def loss_kwargs(shape: Shape) -> dict:
    return {"mode": shape.mode, "symmetric": shape.symmetric}


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------

_compiled_reference = None


def provider_fn(name: str, shape: Shape):
    """fn(**inputs) -> scalar loss for one provider."""
    global _compiled_reference
    kw = loss_kwargs(shape)
    if name == "hardneg":
        return lambda **x: hardneg.fused_hardneg_loss(**x, **kw)
    if name == "hardneg_recompute":
        # The recomputing backward (the path reduction="none" takes), forced for the ablation.
        return lambda **x: _hardneg_recompute(x, kw)
    if name.startswith("hardneg_chunk"):
        rows = int(name.removeprefix("hardneg_chunk"))
        return lambda **x: hardneg.fused_hardneg_loss(**x, **kw, chunk_size=rows)
    if name == "reference":
        return lambda **x: hardneg_loss_reference(**x, **kw)
    if name == "compile":
        if _compiled_reference is None:
            # Shapes, grad mode and thread count each compile a graph; keep them all compiled
            # rather than let dynamo fall back to eager silently at its default limit of 8.
            torch._dynamo.config.recompile_limit = 256
            torch._dynamo.config.accumulated_recompile_limit = 4096
            _compiled_reference = torch.compile(hardneg_loss_reference, dynamic=False)
        return lambda **x: _compiled_reference(**x, **kw)
    if name == "torch_chunked":
        return lambda **x: torch_chunked_hardneg_loss(**x, **kw)
    raise ValueError(f"unknown provider {name!r}")


def _hardneg_recompute(x: dict, kw: dict) -> Tensor:
    wants_grad = torch.is_grad_enabled() and x["query"].requires_grad
    spec = LossSpec(kw["mode"], TEMPERATURE, ALPHA, EGA_BETA, EGA_MARGIN, kw["symmetric"])
    loss, _, _ = hardneg_loss_module._hardneg_loss_op(
        x["query"],
        x["target"],
        x["hard_negatives"],
        x["target_ids"],
        x["hard_negative_ids"],
        spec.encode(),
        False,
    )
    assert not wants_grad or loss.requires_grad
    return loss


def _with_grad(inputs: dict) -> dict:
    return {
        k: (
            v.detach().requires_grad_(True)
            if k in ("query", "target", "hard_negatives") and v is not None
            else v
        )
        for k, v in inputs.items()
    }


def _clear_grads(x: dict) -> None:
    for k in ("query", "target", "hard_negatives"):
        if x[k] is not None:
            x[k].grad = None


def make_call(fn, inputs: dict, mode: str):
    """A zero-argument callable running `mode` once; a backward call times itself and returns the
    (wall, cpu) seconds of the backward alone."""
    if mode == "forward":

        def call():
            with torch.no_grad():
                return fn(**inputs)

        return call
    x = _with_grad(inputs)

    if mode == "full":

        def call():
            _clear_grads(x)
            fn(**x).backward()

        return call

    def call():
        _clear_grads(x)
        loss = fn(**x)
        w0, c0 = common.clock()
        loss.backward()
        w1, c1 = common.clock()
        return w1 - w0, c1 - c0

    return call


def gemm_calls(shape: Shape, inputs: dict) -> dict:
    """The bound: fp32 GEMMs of the loss's shapes (plus the B x B ones when symmetric)."""
    q_BD, t_BD = inputs["query"], inputs["target"]
    h = inputs["hard_negatives"]
    c_ND = t_BD if h is None else torch.cat([t_BD, h.flatten(0, 1)])
    B, N, D = shape.B, c_ND.shape[0], shape.D
    s_BN = torch.empty(B, N)
    ds_BN = torch.randn(B, N) * 1e-3
    dq_BD, dc_ND = torch.empty(B, D), torch.empty(N, D)
    sym = shape.symmetric
    s_BB, dt_BD = torch.empty(B, B), torch.empty(B, D)

    def fwd():
        torch.mm(q_BD, c_ND.T, out=s_BN)  # (B, D) x (D, N)
        if sym:
            torch.mm(t_BD, q_BD.T, out=s_BB)

    def bwd():
        torch.mm(ds_BN, c_ND, out=dq_BD)  # (B, N) x (N, D)
        torch.mm(ds_BN.T, q_BD, out=dc_ND)  # (N, B) x (B, D)
        if sym:
            torch.mm(s_BB, q_BD, out=dt_BD)
            torch.mm(s_BB.T, t_BD, out=dq_BD)

    return {"gemm_fwd": fwd, "gemm_bwd": bwd}


# ---------------------------------------------------------------------------------------------
# Checks, timing and memory
# ---------------------------------------------------------------------------------------------


def check_providers(shapes) -> None:
    """Every provider agrees with the eager reference (value and query gradient) before timing."""
    for shape in shapes:
        small = dataclasses.replace(shape, B=min(shape.B, 64), N=min(shape.B, 64) * (shape.M + 1))
        small = dataclasses.replace(small, N=small.B * (min(shape.M, 3) + 1))
        inputs = make_inputs(small, seed=1)
        x_ref = _with_grad(inputs)
        ref = hardneg_loss_reference(**x_ref, **loss_kwargs(small))
        ref.backward()
        for name in ("hardneg", "hardneg_recompute", "torch_chunked"):
            x = _with_grad(inputs)
            val = provider_fn(name, small)(**x)
            val.backward()
            torch.testing.assert_close(val, ref, rtol=1e-4, atol=1e-5, msg=f"{name} loss, {small}")
            for k in ("query", "target"):
                torch.testing.assert_close(
                    x[k].grad, x_ref[k].grad, rtol=1e-3, atol=1e-6, msg=f"{name} d{k}, {small}"
                )


def time_shape(shape: Shape, threads: int, providers, *, repeats: int) -> dict:
    common.pin_threads(threads)
    inputs = make_inputs(shape)
    out = {}
    gemms = gemm_calls(shape, inputs)
    for mode in MODES:
        calls = {p: make_call(provider_fn(p, shape), inputs, mode) for p in providers}
        calls.update(gemms)
        timed = common.time_interleaved(calls, repeats=repeats, warmup=1)
        out[mode] = timed
        print(
            f"  {shape.name} t={threads} {mode}: "
            + ", ".join(f"{k} {v['median_s'] * 1e3:.1f}" for k, v in timed.items())
            + " ms",
            flush=True,
        )
    return out


def memory_probe(shape_index: int, provider: str, mode: str, quick: bool) -> dict:
    """Body of the fresh-process probe: extra peak RSS of one `mode` call of `provider`."""
    common.pin_threads(1)
    shapes = QUICK_SHAPES if quick else SHAPES
    shape = shapes[shape_index]
    fn = provider_fn(provider, shape)
    if provider == "compile":
        # Inductor compiles per shape: warm up on the measured shape so compilation is not counted.
        warm_inputs = make_inputs(shape)
    else:
        warm_inputs = make_inputs(dataclasses.replace(shape, B=16, N=16 * (min(shape.M, 3) + 1)))
    make_call(fn, warm_inputs, mode)()
    del warm_inputs
    inputs = make_inputs(shape)
    call = make_call(fn, inputs, mode)
    rec = common.measure_call_peak(call)
    rec.update(provider=provider, mode=mode, shape=shape.name)
    return rec


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def summarise(shape: Shape, timings: dict, *, basis: str) -> list[dict]:
    """Rows (provider, mode): median wall and CPU ms, GFLOP/s, ratio to the GEMMs and speed-up vs
    eager, the last three from `basis` ("cpu_median_s" or "median_s")."""
    rows = []
    for mode, timed in timings.items():
        gemm_s = {
            "forward": timed["gemm_fwd"][basis],
            "backward": timed["gemm_bwd"][basis],
            "full": timed["gemm_fwd"][basis] + timed["gemm_bwd"][basis],
        }[mode]
        ref_s = timed.get("reference", {}).get(basis)
        for name, t in timed.items():
            if name.startswith("gemm"):
                continue
            med = t[basis]
            rows.append(
                {
                    "provider": name,
                    "mode": mode,
                    "basis": basis,
                    "median_ms": t["median_s"] * 1e3,
                    "cpu_median_ms": t["cpu_median_s"] * 1e3,
                    "gflops": shape.gemm_flops(mode) / med / 1e9,
                    "x_gemm": med / gemm_s,
                    "speedup_vs_reference": ref_s / med if ref_s else None,
                    "gemm_ms": gemm_s * 1e3,
                }
            )
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: argparse's error (exit 2) names a bad option and its value."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    common.add_output_args(ap, "small shapes, 3 repeats (smoke test)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--dtype",
        choices=tuple(bench_loss_gpu.DTYPES),
        help="input dtype: float32 on cpu (the only one), bfloat16 by default on cuda",
    )
    ap.add_argument("--shapes", type=int, nargs="*", help="indices into the device's shape list")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="cpu only")
    ap.add_argument("--providers", nargs="*", help="default: all of the device's providers")
    ap.add_argument("--repeats", type=int, help="override each shape's repeats (cuda only)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--no-ablation", action="store_true", help="skip fused-vs-recompute and chunks")
    ap.add_argument("--render", metavar="JSON", help="rewrite the markdown of a results JSON")
    ap.add_argument("--probe-memory", nargs=3, metavar=("SHAPE", "PROVIDER", "MODE"))
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    known = bench_loss_gpu.GPU_PROVIDERS if cuda else CPU_PROVIDER_NAMES
    if args.providers is not None:
        unknown = [p for p in args.providers if p not in known]
        if unknown or not args.providers:
            ap.error(
                f"--providers {args.providers}: choose from {known} for --device {args.device}"
            )
    if args.dtype is None:
        args.dtype = "bfloat16" if cuda else "float32"
    elif not cuda and args.dtype != "float32":
        ap.error(f"--dtype {args.dtype} needs --device cuda (the CPU benchmark runs float32)")
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: must be at least 1")
    if args.shapes is not None:
        if cuda:
            n = len(QUICK_GPU_SHAPES if args.quick else GPU_SHAPES)
        else:
            n = len(QUICK_SHAPES if args.quick else SHAPES)
        bad = [i for i in args.shapes if not 0 <= i < n]
        if bad:
            ap.error(f"--shapes {bad}: out of range, the {args.device} list has {n} shapes")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        path = Path(args.render)
        record = json.loads(path.read_text())
        render = render_gpu_markdown if "device" in record["machine"] else render_markdown
        path.with_suffix(".md").write_text(render(record))
        return 0
    if args.probe_memory:
        idx, provider, mode = args.probe_memory
        print(json.dumps(memory_probe(int(idx), provider, mode, args.quick)))
        return 0
    if args.device == "cuda":
        return bench_loss_gpu.main(args)
    run_cpu(args)
    return 0


def run_cpu(args: argparse.Namespace) -> None:
    """The CPU benchmark: check, time (1 and 2 threads), memory, ablations; writes the results."""
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch._inductor")
    providers = args.providers or list(PROVIDERS)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    indices = args.shapes if args.shapes is not None else list(range(len(shapes)))
    check_providers([shapes[i] for i in indices])
    record = {"machine": common.machine_record(), "shapes": [], "ablations": {}}
    for i in indices:
        shape = shapes[i]
        entry = {"index": i, **dataclasses.asdict(shape), "name": shape.name, "timings": {}}
        for threads in args.threads:
            timings = time_shape(shape, threads, providers, repeats=shape.repeats)
            entry["timings"][str(threads)] = {
                "raw": timings,
                # One thread: CPU time, immune to other processes holding the core. Two: wall.
                "summary": summarise(
                    shape, timings, basis="cpu_median_s" if threads == 1 else "median_s"
                ),
            }
        if not args.no_memory:
            entry["memory_full"] = {}
            for p in providers:
                probe_args = ["--probe-memory", str(i), p, "full"] + (
                    ["--quick"] if args.quick else []
                )
                rec = common.run_probe("benchmarks.bench_loss", probe_args)
                entry["memory_full"][p] = rec
                print(f"  {shape.name} memory {p}: {rec['extra_peak_mib']:.0f} MiB", flush=True)
        record["shapes"].append(entry)
    if not args.no_ablation:
        record["ablations"] = run_ablations(shapes, indices, quick=args.quick)
    path = common.write_results("bench_loss", record, render_markdown(record), out_dir=args.out)
    print(f"wrote {path} and {path.with_suffix('.md')}")


def run_ablations(shapes, indices, *, quick: bool) -> dict:
    """Fused gradient in the forward vs recomputation in backward, and the chunk size, 1 thread."""
    common.pin_threads(1)
    out = {"fused_vs_recompute": [], "chunk_size": []}
    for i in indices[:2]:
        shape = shapes[i]
        inputs = make_inputs(shape)
        calls = {
            p: make_call(provider_fn(p, shape), inputs, "full")
            for p in ("hardneg", "hardneg_recompute")
        }
        timed = common.time_interleaved(calls, repeats=shape.repeats)
        out["fused_vs_recompute"].append({"shape": shape.name, "timings": timed})
        print(
            f"  ablation fused/recompute {shape.name}: "
            + ", ".join(f"{k} {v['median_s'] * 1e3:.1f} ms" for k, v in timed.items()),
            flush=True,
        )
        default_rows = _schedule.default_chunk_size(shape.N)
        rows_list = sorted(
            {r for r in (16, 64, 256, 1024, default_rows) if r <= shape.B} | {shape.B}
        )
        calls = {
            f"hardneg_chunk{r}": make_call(provider_fn(f"hardneg_chunk{r}", shape), inputs, "full")
            for r in rows_list
        }
        timed = common.time_interleaved(calls, repeats=shape.repeats)
        out["chunk_size"].append(
            {"shape": shape.name, "default_rows": default_rows, "timings": timed}
        )
        print(
            f"  ablation chunk {shape.name}: "
            + ", ".join(f"{k} {v['median_s'] * 1e3:.1f} ms" for k, v in timed.items()),
            flush=True,
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
