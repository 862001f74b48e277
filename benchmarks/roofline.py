"""Roofline model of hardneg_loss on H100 SXM and H200 SXM: PREDICTED times of the GPU providers of
benchmarks/bench_loss.py (full forward + backward) at its GPU shapes. No GPU has run them; the
first GPU run of `python -m benchmarks.bench_loss --device cuda` replaces them with measurements.

Devices (NVIDIA's datasheets, SXM parts): dense bf16 tensor-core peak 989.4 TFLOP/s on both (the
datasheets print 1,979 "with sparsity", twice the dense figure); HBM 3.35 TB/s (H100 SXM, HBM3)
and 4.8 TB/s (H200, HBM3e); memory 81,559 / 143,771 MiB as nvidia-smi reports it (it sets
hardneg's chunk size). Two scenarios: "peak" (those figures) and "derated", an assumption until
measured: GEMMs at 70% of peak (~690 TFLOP/s, what cuBLAS bf16 GEMMs of these sizes commonly
reach) and memory-bound kernels at 85% of HBM bandwidth.

Model: every kernel takes max(FLOPs / compute, bytes / bandwidth); kernels run one after another
(no overlap) and their times add up. Bytes are HBM traffic: each operand read once and each output
written once (GEMM tiles re-read from L2 and id vectors that stay in L2 are not counted). Launch
and host overheads are not modelled: below ~0.1 ms per call they dominate, so the small shapes'
predictions are lower bounds. Elementwise passes are counted from the code each provider runs:
  hardneg        python/hardneg/loss.py, _schedule.row_pass, _gemm and the CUDA kernel
                 (csrc/cuda/hardneg_loss.cuh): per chunk of R rows the S GEMM writes fp32 S; the
                 kernel reads S for the statistics, reads it again and writes dS in bf16 into a
                 buffer of its own (_gemm.grad_dtype; the chunk budget holds S and that buffer,
                 6 bytes per element: _schedule.default_chunk_size); both gradient GEMMs read
                 that bf16 dS; dC accumulates in fp32 across chunks (addmm with an fp32
                 accumulator, which _gemm probes; without it each update adds a product and an
                 add). check_finite reads the inputs (isfinite, then all); backward scales dq,
                 dc (fp32) into bf16 in one pass (loss._scaled).
  eager_autocast benchmarks/torch_eager.py: bf16 logits, the llave shift (mul, add), the mask
                 (bool B x N, masked_fill), then F.cross_entropy. On CUDA it calls log_softmax
                 with the logits' own dtype (aten LossNLL.cpp), which autocast's fp32 rule for
                 softmax leaves alone, so log_softmax runs in bf16 and nll_loss (fp32 under
                 autocast) casts the B x N log-probabilities to fp32; backward: nll_loss's fp32
                 zeros, the cast back to bf16, the softmax backward, the division's. torch's
                 SoftMax.cu reads a row once when it fits a block's default 48 KiB of shared
                 memory, else three times (max, sum, write); its backward reads twice or thrice.
  torch_chunked  benchmarks/torch_chunked.py in bf16: mul_, logsumexp (amax, sub, exp, sum),
                 sub_ + exp_, mul_, addmm_ into bf16 accumulators.
  gemm           the floor: S = Q C^T (bf16 operands, fp32 S), dQ = dS C, dC = dS^T Q (bf16 dS).
hardneg variants show what the 1.3x target needs beyond what is built: "one read" (one read of S
per row, the row kept in shared memory: possible while 4 N bytes fit the 227 KiB a block can have
on sm_90, i.e. N <= 58,112), "lean" (also no check_finite scan: check_finite=False).

    python -m benchmarks.roofline [--out DIR] [--date YYYY-MM-DD]   # writes roofline_loss_*

Legend: B rows, N candidates, D embedding dim, R rows per chunk, e bytes per input element.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

from hardneg._schedule import CUDA_CHUNK_FRACTION, CUDA_CHUNK_MAX_BYTES

from benchmarks import common
from benchmarks.loss_shapes import GPU_SHAPES, Shape

SMEM_PER_BLOCK_OPTIN = 227 * 1024  # sm_90: the most shared memory one block can have
SOFTMAX_SMEM = 48 * 1024  # torch's softmax kernels cache a row in the default 48 KiB
TARGET_SHAPE = GPU_SHAPES[0]  # (4096, 32768, 1024): the 1.3x target
TARGET_RATIO = 1.3


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float  # dense tensor-core peak
    hbm_tbs: float
    memory_mib: int  # total memory as nvidia-smi reports it
    source: str


GPUS = {
    "h100-sxm": Gpu(
        "H100 SXM5 80GB",
        989.4,
        3.35,
        81559,
        "NVIDIA H100 datasheet, SXM column: BF16 tensor core 1,979 TFLOPS with sparsity "
        "(989.4 dense), GPU memory bandwidth 3.35 TB/s",
    ),
    "h200": Gpu(
        "H200 SXM 141GB",
        989.4,
        4.8,
        143771,
        "NVIDIA H200 datasheet, SXM column: BF16 tensor core 1,979 TFLOPS with sparsity "
        "(989.4 dense, the H100's compute die), GPU memory bandwidth 4.8 TB/s",
    ),
}
SCENARIOS = {"peak": (1.0, 1.0), "derated": (0.70, 0.85)}  # (GEMM, memory) fraction of peak
HARDNEG_VARIANTS = {
    "hardneg": {},
    "hardneg[one read]": {"one_read": True},
    "hardneg[lean]": {"one_read": True, "lean": True},
}


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float


def gemm(name: str, m: int, n: int, k: int, a_bytes: int, b_bytes: int, out_bytes: int, acc=False):
    """(m, k) x (k, n): reads both operands once, writes the output (reads it too when acc)."""
    traffic = m * k * a_bytes + k * n * b_bytes + m * n * out_bytes * (2 if acc else 1)
    return Kernel(name, 2.0 * m * n * k, float(traffic))


def mem(name: str, nbytes: float) -> Kernel:
    return Kernel(name, 0.0, float(nbytes))


def chunk_rows(n_cols: int, gpu: Gpu, ds_bytes: int = 0) -> int:
    """hardneg._schedule.default_chunk_size on this GPU (its memory as nvidia-smi reports it), for
    chunks that also hold a dS buffer of ds_bytes per element (0: none)."""
    budget = min(gpu.memory_mib * 2**20 // CUDA_CHUNK_FRACTION, CUDA_CHUNK_MAX_BYTES)
    return max(16, budget // ((4 + ds_bytes) * n_cols))


def _chunks(B: int, R: int) -> list[int]:
    return [min(R, B - r0) for r0 in range(0, B, R)]


# ---------------------------------------------------------------------------------------------
# Providers: kernel lists of one full forward + backward
# ---------------------------------------------------------------------------------------------


def _directions(shape: Shape) -> list[tuple[str, int, tuple[int, ...]]]:
    """(tag, rows, column blocks) of each direction: q->t over [target | hard negatives], and
    t->q over the queries when symmetric."""
    blocks = (shape.B,) if shape.M == 0 else (shape.B, shape.B * shape.M)
    dirs = [("q->t", shape.B, blocks)]
    if shape.symmetric:
        dirs.append(("t->q", shape.B, (shape.B,)))
    return dirs


def floor_kernels(shape: Shape, e: int = 2) -> list[Kernel]:
    out = []
    for tag, B, blocks in _directions(shape):
        N, D = sum(blocks), shape.D
        out += [
            gemm(f"{tag} S = Q C^T", B, N, D, e, e, 4),
            gemm(f"{tag} dQ = dS C", B, D, N, e, e, 4),
            gemm(f"{tag} dC = dS^T Q", N, D, B, e, e, 4),
        ]
    return out


def hardneg_kernels(shape: Shape, gpu: Gpu, e: int = 2, **variant) -> list[Kernel]:
    """dS in the operand dtype: a bf16 / fp16 buffer of its own (e = 2), in place (e = 4)."""
    one_read, lean = (variant.get(k, False) for k in ("one_read", "lean"))
    ds_buffer = 0 if e == 4 else e  # bytes per element of the chunk's separate dS
    D, out = shape.D, []
    if not lean:  # isfinite (read e, write 1 byte), then all (read 1) per input element
        out.append(mem("check_finite", (e + 2) * (shape.B + shape.N) * D))
    for d, (tag, B, blocks) in enumerate(_directions(shape)):
        N = sum(blocks)
        accumulate = d > 0  # the second direction adds into the first one's gradients
        single = one_read and 4 * N <= SMEM_PER_BLOCK_OPTIN
        for c, r in enumerate(_chunks(B, min(chunk_rows(N, gpu, ds_buffer), B))):
            for K in blocks:
                out.append(gemm(f"{tag} S = Q C^T", r, K, D, e, e, 4))
            stats = 0 if single else 4 * r * N  # the statistics' read of S
            out.append(mem(f"{tag} kernel", stats + 4 * r * N + e * r * N))
            for k, K in enumerate(blocks):
                out.append(gemm(f"{tag} dQ = dS C", r, D, K, e, e, 4, acc=accumulate or k > 0))
                acc = accumulate or c > 0
                out.append(gemm(f"{tag} dC = dS^T Q", K, D, r, e, e, 4, acc=acc))
    # backward: dq * grad_output, dc * grad_output, read in fp32 and written in the input dtype
    per_elem = 4 + e
    out.append(mem("backward scale + cast", per_elem * (shape.B + shape.N) * D))
    return out


def eager_kernels(shape: Shape, e: int = 2) -> list[Kernel]:
    """Under autocast the logits are bf16 whatever the inputs (lg = 2 bytes)."""
    D, lg, out = shape.D, 2, []
    if shape.M > 0:
        out.append(mem("cat candidates", 2 * e * shape.N * D))
    for tag, B, blocks in _directions(shape):
        N, BN = sum(blocks), B * sum(blocks)
        out.append(gemm(f"{tag} logits = Q C^T", B, N, D, e, e, lg))
        out.append(mem(f"{tag} / tau", 2 * lg * BN))
        if shape.mode == "llave":
            out.append(mem(f"{tag} alpha * sg(s)", 2 * lg * BN))
            out.append(mem(f"{tag} + shift", 3 * lg * BN))
        if shape.masked:
            out.append(mem(f"{tag} mask (zeros, ==)", 2 * BN))
            out.append(mem(f"{tag} masked_fill", (2 * lg + 1) * BN))
        reads = 1 if N * lg <= SOFTMAX_SMEM else 3
        out.append(mem(f"{tag} log_softmax (bf16)", (reads + 1) * lg * BN))
        out.append(mem(f"{tag} log-probs -> fp32 for nll_loss", (lg + 4) * BN))
        out.append(mem(f"{tag} nll_loss backward (fp32 zeros)", 4 * BN))
        out.append(mem(f"{tag} fp32 -> bf16 (the cast's backward)", (4 + lg) * BN))
        reads = 2 if 2 * N * lg <= SOFTMAX_SMEM else 3
        out.append(mem(f"{tag} log_softmax backward", (reads + 1) * lg * BN))
        if shape.masked:
            out.append(mem(f"{tag} masked_fill backward", (2 * lg + 1) * BN))
        out.append(mem(f"{tag} / tau backward", 2 * lg * BN))
        out.append(gemm(f"{tag} dQ = dlogits C", B, D, N, lg, e, e))
        out.append(gemm(f"{tag} dC = dlogits^T Q", N, D, B, lg, e, e))
    return out


def chunked_kernels(shape: Shape, gpu: Gpu, e: int = 2) -> list[Kernel]:
    D, out = shape.D, []
    if shape.M > 0:
        out.append(mem("cat candidates", 2 * e * shape.N * D))
    out.append(mem("zeros dq, dc", e * (shape.B + shape.N) * D))
    for tag, B, blocks in _directions(shape):
        N = sum(blocks)
        for r in _chunks(B, min(chunk_rows(N, gpu), B)):
            rN = r * N
            out.append(gemm(f"{tag} S = Q C^T", r, N, D, e, e, e))
            out.append(mem(f"{tag} mul_", 2 * e * rN))
            if shape.masked:
                out.append(mem(f"{tag} mask (==, masked_fill_)", (2 * e + 2) * rN))
            out.append(mem(f"{tag} logsumexp", 6 * e * rN))
            out.append(mem(f"{tag} sub_, exp_, mul_", 6 * e * rN))
            out.append(gemm(f"{tag} dQ += dS C", r, D, N, e, e, e, acc=True))
            out.append(gemm(f"{tag} dC += dS^T Q", N, D, r, e, e, e, acc=True))
    out.append(mem("backward scale", 2 * e * (shape.B + shape.N) * D))
    return out


def provider_kernels(shape: Shape, gpu: Gpu) -> dict[str, list[Kernel]]:
    out = {"gemm": floor_kernels(shape)}
    for name, variant in HARDNEG_VARIANTS.items():
        out[name] = hardneg_kernels(shape, gpu, **variant)
    out["eager_autocast"] = eager_kernels(shape)
    out["torch_chunked"] = chunked_kernels(shape, gpu)
    return out


# ---------------------------------------------------------------------------------------------
# Times and the report
# ---------------------------------------------------------------------------------------------


def kernel_seconds(k: Kernel, gpu: Gpu, scenario: str) -> float:
    gemm_eff, mem_eff = SCENARIOS[scenario]
    t_mem = k.bytes / (gpu.hbm_tbs * 1e12 * mem_eff)
    if k.flops == 0:
        return t_mem
    return max(k.flops / (gpu.bf16_tflops * 1e12 * gemm_eff), t_mem)


def predict(shape: Shape, gpu: Gpu, scenario: str) -> dict[str, dict]:
    """{provider: {"ms", "gemm_ms", "gb", "tflop", "kernels", "x_gemm"}} of one full forward +
    backward; gemm_ms is the part spent in GEMMs (at the roof of each)."""
    out = {}
    for name, kernels in provider_kernels(shape, gpu).items():
        out[name] = {
            "ms": 1e3 * sum(kernel_seconds(k, gpu, scenario) for k in kernels),
            "gemm_ms": 1e3 * sum(kernel_seconds(k, gpu, scenario) for k in kernels if k.flops),
            "gb": sum(k.bytes for k in kernels) / 1e9,
            "tflop": sum(k.flops for k in kernels) / 1e12,
            "kernels": len(kernels),
        }
    floor = out["gemm"]["ms"]
    for rec in out.values():
        rec["x_gemm"] = rec["ms"] / floor
    return out


def target_budget(gpu: Gpu, scenario: str) -> dict:
    """What the 1.3x target leaves at TARGET_SHAPE for the work beyond the 3 GEMMs: time, HBM
    bytes and bytes per element of S, against what each hardneg variant moves there."""
    shape = TARGET_SHAPE
    pred = predict(shape, gpu, scenario)
    _, mem_eff = SCENARIOS[scenario]
    spare_ms = (TARGET_RATIO - 1.0) * pred["gemm"]["ms"]
    spare_bytes = spare_ms * 1e-3 * gpu.hbm_tbs * 1e12 * mem_eff
    elems = shape.B * shape.N
    extra = {
        name: (pred[name]["gb"] - pred["gemm"]["gb"]) * 1e9 / elems for name in HARDNEG_VARIANTS
    }
    return {
        "spare_ms": spare_ms,
        "spare_gb": spare_bytes / 1e9,
        "spare_bytes_per_s_elem": spare_bytes / elems,
        "extra_bytes_per_s_elem": extra,
    }


def model(shapes=GPU_SHAPES) -> dict:
    record = {
        "predicted": True,
        "note": "Predictions of a roofline model; no GPU has run them.",
        "gpus": {k: dataclasses.asdict(g) for k, g in GPUS.items()},
        "scenarios": {
            k: {"gemm_fraction": g, "hbm_fraction": m} for k, (g, m) in SCENARIOS.items()
        },
        "shapes": [],
        "target": {},
    }
    for shape in shapes:
        entry = {"name": shape.name, **dataclasses.asdict(shape), "predictions": {}}
        for key, gpu in GPUS.items():
            entry["predictions"][key] = {s: predict(shape, gpu, s) for s in SCENARIOS}
            rows = chunk_rows(shape.N, gpu, ds_bytes=2)  # hardneg's: S and its bf16 dS
            entry.setdefault("chunk_rows", {})[key] = min(rows, shape.B)
        record["shapes"].append(entry)
    for key, gpu in GPUS.items():
        record["target"][key] = {s: target_budget(gpu, s) for s in SCENARIOS}
    return record


def render_markdown(record: dict, date: str) -> str:
    lines = [
        f"# hardneg_loss on H100 SXM and H200: roofline PREDICTIONS, {date}",
        "",
        "**Predicted, not measured: no GPU has run these.** Generated by `python -m "
        "benchmarks.roofline` (the model, its device figures and every pass it counts are in "
        "its docstring). Full forward + backward, bf16 inputs; ms per call; `x floor` = time / "
        "time of the 3 GEMMs alone (bf16 operands, fp32 S). Launch and host overheads are not "
        "modelled (they dominate below ~0.1 ms).",
        "",
    ]
    for gpu in record["gpus"].values():
        lines.append(
            f"- {gpu['name']}: {gpu['bf16_tflops']} TFLOP/s dense bf16, {gpu['hbm_tbs']} TB/s "
            f"HBM ({gpu['source']})."
        )
    lines += [
        "- Scenarios: peak = the datasheet figures; derated = GEMMs at 70% of peak, "
        "memory-bound kernels at 85% of HBM bandwidth (assumed).",
        "",
    ]
    names = list(record["shapes"][0]["predictions"]["h100-sxm"]["peak"])
    for scenario in SCENARIOS:
        lines += [f"## {scenario}", ""]
        header = ["shape", "GPU", "floor ms"] + [f"{n} (x floor)" for n in names[1:]]
        rows = []
        for entry in record["shapes"]:
            for key in record["gpus"]:
                p = entry["predictions"][key][scenario]
                cells = [f"{p[n]['ms']:.3g} ({p[n]['x_gemm']:.2f})" for n in names[1:]]
                rows.append([entry["name"], key, f"{p['gemm']['ms']:.3g}", *cells])
        lines += [common.markdown_table(header, rows), ""]
    lines += target_section(record)
    return "\n".join(lines) + "\n"


def target_section(record: dict) -> list[str]:
    shape = record["shapes"][0]
    lines = [
        f"## The 1.3x target at {shape['name']}",
        "",
        "Bytes of HBM traffic beyond the floor's, per element of the B x N matrix S, against what "
        "1.3x the floor leaves for them (the floor itself moves 8: S written in fp32, dS read "
        "twice in bf16):",
        "",
    ]
    header = ["GPU", "scenario", "1.3x leaves (B/elem)"] + list(HARDNEG_VARIANTS)
    rows = []
    for key in record["gpus"]:
        for scenario, t in record["target"][key].items():
            extra = [f"{v:.1f}" for v in t["extra_bytes_per_s_elem"].values()]
            rows.append([key, scenario, f"{t['spare_bytes_per_s_elem']:.1f}", *extra])
    lines += [common.markdown_table(header, rows), ""]
    p = shape["predictions"]["h100-sxm"]["peak"]
    rows = [[n, r["ms"], r["gemm_ms"], r["ms"] - r["gemm_ms"], r["gb"]] for n, r in p.items()]
    lines += [
        "Where the time goes on the H100 (peak): GEMMs vs the memory-bound passes, and the HBM "
        "traffic of the whole call:",
        "",
        common.markdown_table(["provider", "ms", "GEMM ms", "other ms", "GB moved"], rows),
        "",
    ]
    verdicts = []
    for name in HARDNEG_VARIANTS:
        ratios = {
            f"{key} {s}": shape["predictions"][key][s][name]["x_gemm"]
            for key in record["gpus"]
            for s in SCENARIOS
        }
        reached = [k for k, r in ratios.items() if r <= TARGET_RATIO]
        span = f"{min(ratios.values()):.2f}-{max(ratios.values()):.2f}x"
        verdicts.append(
            f"- {name}: {span} the floor; 1.3x reached on "
            + (", ".join(reached) if reached else "none")
            + "."
        )
    return lines + verdicts + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args(argv)
    record = model()
    record["date"] = args.date
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"roofline_loss_predicted_{args.date}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    md = render_markdown(record, args.date)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
