"""hardneg_loss on one GPU against its bound, for tools/gpu_check.sh.

Providers, timed side by side (CUDA events, median of the repeats, forward + backward):
  hardneg        hardneg.fused_hardneg_loss on CUDA tensors
  torch_chunked  the pure-torch row-chunked peer of benchmarks/bench_loss.py (fp32 only)
  gemm           the 3 bare cuBLAS GEMMs of the same shapes and dtype (S = Q C^T, dQ = dS C,
                 dC = dS^T Q): the floor hardneg's extra work is measured against
in fp32 (TF32 off) and bf16, on the first shapes of bench_loss's list. Writes one JSON.

    python tools/gpu_bench_loss.py --out result.json [--device cuda] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hardneg  # noqa: E402

from benchmarks.bench_loss import SHAPES, Shape, make_inputs, torch_chunked_hardneg_loss  # noqa: E402

GPU_SHAPES = (SHAPES[0], SHAPES[1], SHAPES[4])  # D 1024, D 64 (elementwise-bound), ega masked


def _timer(device: torch.device):
    """fn -> seconds of one call, measured on the device's stream (or the host clock on CPU)."""
    if device.type == "cuda":

        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return run

    def run_cpu(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run_cpu


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    x = make_inputs(shape)
    out = {}
    for k, v in x.items():
        if v is None or not v.is_floating_point():
            out[k] = None if v is None else v.to(device)
        else:
            out[k] = v.to(device=device, dtype=dtype).requires_grad_(True)
    return out


def _loss_call(fn, x: dict, shape: Shape):
    def call():
        for v in x.values():
            if v is not None and v.grad is not None:
                v.grad = None
        fn(**x, mode=shape.mode, symmetric=shape.symmetric).backward()

    return call


def _gemm_call(x: dict):
    q_BD, t_BD, h = x["query"].detach(), x["target"].detach(), x["hard_negatives"]
    c_ND = t_BD if h is None else torch.cat([t_BD, h.detach().flatten(0, 1)])
    ds_BN = torch.randn(q_BD.shape[0], c_ND.shape[0], device=q_BD.device).to(q_BD.dtype)

    def call():
        torch.mm(q_BD, c_ND.T)  # (B, D) x (D, N)
        torch.mm(ds_BN, c_ND)  # (B, N) x (N, D)
        torch.mm(ds_BN.T, q_BD)  # (N, B) x (B, D)

    return call


def bench(device: torch.device, repeats: int, shapes=GPU_SHAPES) -> list[dict]:
    time_one = _timer(device)
    rows = []
    torch.backends.cuda.matmul.allow_tf32 = False
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            x = _inputs(shape, dtype, device)
            calls = {
                "hardneg": _loss_call(hardneg.fused_hardneg_loss, x, shape),
                "gemm": _gemm_call(x),
            }
            if dtype == torch.float32:
                calls["torch_chunked"] = _loss_call(torch_chunked_hardneg_loss, x, shape)
            times = {name: [] for name in calls}
            for call in calls.values():
                call()  # warm-up (module load, cuBLAS handles, allocator)
            for _ in range(repeats):  # interleaved, so drift hits every provider alike
                for name, call in calls.items():
                    times[name].append(time_one(call))
            med = {name: statistics.median(t) for name, t in times.items()}
            flops = shape.gemm_flops("full")
            row = {
                "shape": shape.name,
                "dtype": str(dtype).replace("torch.", ""),
                "median_ms": {k: v * 1e3 for k, v in med.items()},
                "gemm_tflops": flops / med["gemm"] / 1e12,
                "hardneg_over_gemm": med["hardneg"] / med["gemm"],
            }
            if "torch_chunked" in med:
                row["torch_chunked_over_hardneg"] = med["torch_chunked"] / med["hardneg"]
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="one small shape (a smoke test)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = (Shape(64, 512, 32),) if args.quick else GPU_SHAPES
    record = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "build_info": hardneg.build_info(),
        "results": bench(device, args.repeats, shapes),
    }
    Path(args.out).write_text(json.dumps(record, indent=1))
    for r in record["results"]:
        ms = r["median_ms"]
        print(
            f"{r['shape']:<32} {r['dtype']:<9} hardneg {ms['hardneg']:8.3f} ms  gemm "
            f"{ms['gemm']:8.3f} ms  ratio {r['hardneg_over_gemm']:5.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
