"""The GPU side of benchmarks/bench_loss.py (`--device cuda`): hardneg_loss against what a GPU user
already has, and against its floor.

Providers, bf16 inputs by default, side by side in one run:
  hardneg         hardneg.fused_hardneg_loss (bf16 GEMM operands, fp32 S, the fused CUDA kernels)
  eager_autocast  the loss as users write it: logits = q @ c.T / tau under bf16 autocast,
                  cross_entropy, backward (benchmarks/torch_eager.py; modes infonce and llave)
  torch_chunked   the pure-torch row-chunked peer in the inputs' dtype, hardneg's GPU chunk size
                  (benchmarks/torch_chunked.py)
  gemm            the floor: hardneg's 3 GEMMs alone, as hardneg._gemm runs them: S = Q C^T with
                  bf16 operands and an fp32 S (torch.mm(..., out_dtype=torch.float32)), then
                  dQ = dS C and dC = dS^T Q with dS in bf16, fp32 outputs (plus the B x B GEMMs of
                  the second direction when symmetric)
Modes: forward (under no_grad; floor: the S GEMM) and full (forward + backward; floor: all 3).

Timing: CUDA events around each call (the host synchronises before it, untimed), warm-up rounds,
then medians over repeats with the providers interleaved in an order rotating per round
(common.time_interleaved). Peak memory: torch.cuda.max_memory_allocated over one full call minus
the memory allocated before it, input gradients included. Before timing, each provider is checked
against the fp64 reference on a small version of the shape: on fp64 inputs it must compute the
same loss; in the timed dtype its relative errors are recorded.
benchmarks/roofline.py predicts these times for H100 and H200 (predictions, until this has run).

Without a GPU, `python -m benchmarks.bench_loss --device cuda` says so in one line and exits 0. The
functions also run on CPU tensors (host clock, fp32 GEMMs for the floor), which is how the tests
exercise them.

Legend: B queries, N candidates, D embedding dim. Suffixes name shapes: s_BN, c_ND.
"""

from __future__ import annotations

import dataclasses
import gc
import time

import hardneg
import torch
from hardneg.reference import hardneg_loss_reference

from benchmarks import common
from benchmarks.bench_loss_report import render_gpu_markdown
from benchmarks.loss_shapes import GPU_SHAPES, QUICK_GPU_SHAPES, Shape, make_inputs
from benchmarks.torch_chunked import torch_chunked_hardneg_loss
from benchmarks.torch_eager import EAGER_MODES, eager_autocast_loss

GPU_PROVIDERS = ("hardneg", "eager_autocast", "torch_chunked", "gemm")
GPU_MODES = ("forward", "full")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# On fp64 inputs every loss provider computes the reference's loss: fp64 arithmetic (eager without
# autocast, torch_chunked) or hardneg's fp32 kernels (~1e-7 relative; 1e-4 leaves a margin and
# still fails a 0.1% change of temperature).
MAX_EXACT_REL_ERR = 1e-4
# Positives at cosine ~0.24 (benchmarks.loss_shapes.make_inputs): losses of order 1, where relative
# errors mean something (the timed inputs' rows are all confident, loss ~1e-10).
ACCURACY_POSITIVE_WEIGHT = 0.25
LEAVES = ("query", "target", "hard_negatives")


def check_providers_known(providers) -> list[str]:
    """The providers as a list; ValueError naming any that is not a GPU provider."""
    providers = list(providers)
    unknown = [p for p in providers if p not in GPU_PROVIDERS]
    if unknown or not providers:
        raise ValueError(
            f"providers must be a non-empty subset of {GPU_PROVIDERS}, got {providers}"
        )
    return providers


def supports(provider: str, shape: Shape) -> bool:
    """Whether the provider computes this shape's loss (eager_autocast: infonce and llave only)."""
    return provider != "eager_autocast" or shape.mode in EAGER_MODES


def loss_fn(provider: str, shape: Shape, *, autocast: bool = True):
    """fn(**inputs) -> scalar loss of a loss provider (not "gemm", which has no loss); autocast:
    eager_autocast's bf16 autocast (off for the exactness check)."""
    kw = {"mode": shape.mode, "symmetric": shape.symmetric}
    if provider == "hardneg":
        return lambda **x: hardneg.fused_hardneg_loss(**x, **kw)
    if provider == "eager_autocast":
        return lambda **x: eager_autocast_loss(**x, **kw, autocast=autocast)
    if provider == "torch_chunked":
        return lambda **x: torch_chunked_hardneg_loss(**x, **kw)
    raise ValueError(f"provider {provider!r} has no loss; loss providers: {GPU_PROVIDERS[:3]}")


def _leaves(inputs: dict) -> dict:
    """The inputs with query, target and hard negatives as fresh leaves that require grad."""
    return {
        k: v.detach().requires_grad_(True) if k in LEAVES and v is not None else v
        for k, v in inputs.items()
    }


def _clear_grads(x: dict) -> None:
    for k in LEAVES:
        if x[k] is not None:
            x[k].grad = None


def loss_call(fn, inputs: dict, mode: str):
    """(call, leaves): call() runs `mode` once on its own leaf copies of the inputs."""
    if mode == "forward":

        def forward():
            with torch.no_grad():
                fn(**inputs)

        return forward, inputs
    x = _leaves(inputs)

    def full():
        _clear_grads(x)
        fn(**x).backward()

    return full, x


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a @ b with a and b as operands: low-precision operands and an fp32 result on
    CUDA (what hardneg._gemm.mm runs), fp32 arithmetic elsewhere (aten::mm.dtype is CUDA only)."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif a.device.type == "cuda":
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        torch.mm(a.float(), b.float(), out=out)


def gemm_call(shape: Shape, inputs: dict, mode: str):
    """The floor of `mode`: hardneg's GEMMs on buffers allocated once, dS given in the operand
    dtype (the floor assumes it costs nothing to produce)."""
    q_BD, t_BD, h = inputs["query"], inputs["target"], inputs["hard_negatives"]
    c_ND = t_BD if h is None else torch.cat([t_BD, h.flatten(0, 1)])
    B, N, D = q_BD.shape[0], c_ND.shape[0], q_BD.shape[1]
    f32 = {"dtype": torch.float32, "device": q_BD.device}
    s_BN, dq_BD, dc_ND = (
        torch.empty(B, N, **f32),
        torch.empty(B, D, **f32),
        torch.empty(N, D, **f32),
    )
    ds_BN = (torch.randn(B, N, **f32) * 1e-3).to(q_BD.dtype)
    sym = shape.symmetric
    s_BB, dt_BD = torch.empty(B, B, **f32), torch.empty(B, D, **f32)
    ds_BB = s_BB.to(q_BD.dtype) if sym else None

    def call():
        _mm_fp32(q_BD, c_ND.T, s_BN)  # (B, D) x (D, N) -> (B, N)
        if sym:
            _mm_fp32(t_BD, q_BD.T, s_BB)  # (B, D) x (D, B)
        if mode == "forward":
            return
        _mm_fp32(ds_BN, c_ND, dq_BD)  # (B, N) x (N, D) -> (B, D)
        _mm_fp32(ds_BN.T, q_BD, dc_ND)  # (N, B) x (B, D) -> (N, D)
        if sym:
            _mm_fp32(ds_BB, q_BD, dt_BD)
            _mm_fp32(ds_BB.T, t_BD, dq_BD)

    return call


def device_timed(call, device: torch.device):
    """call -> a call returning (seconds, host CPU seconds) of one run: CUDA events on the current
    stream on a GPU (started after a synchronisation), the host clock elsewhere."""
    if device.type != "cuda":
        return call

    def timed():
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        c0 = time.process_time()
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, time.process_time() - c0

    return timed


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _rel_errors(loss, x: dict, ref, ref_x: dict) -> dict:
    """|loss - ref| / |ref| and the largest ||grad - ref||_F / ||ref||_F over the leaves."""
    grad_err = max(
        float((x[k].grad.double() - ref_x[k].grad).norm() / ref_x[k].grad.norm())
        for k in LEAVES
        if x[k] is not None
    )
    return {
        "loss_rel_err": abs(loss.item() - ref.item()) / abs(ref.item()),
        "grad_rel_err": grad_err,
    }


def _errors(provider: str, shape: Shape, inputs: dict, *, autocast: bool) -> dict:
    """Errors of one full call of the provider against the fp64 reference on the same inputs."""
    kw = {"mode": shape.mode, "symmetric": shape.symmetric}
    ref_x = _leaves(
        {k: v.double() if k in LEAVES and v is not None else v for k, v in inputs.items()}
    )
    ref = hardneg_loss_reference(**ref_x, **kw)
    ref.backward()
    x = _leaves(inputs)
    loss = loss_fn(provider, shape, autocast=autocast)(**x)
    loss.backward()
    return _rel_errors(loss, x, ref, ref_x)


def accuracy(shape: Shape, providers, device: torch.device, dtype: torch.dtype) -> dict:
    """Each loss provider on a small version of the shape (same options, losses of order 1),
    against the fp64 reference: first on fp64 inputs without autocast, where it must agree to
    MAX_EXACT_REL_ERR (the same loss; hardneg computes fp64 inputs in fp32), AssertionError
    otherwise; then as timed (`dtype` inputs, eager under autocast), whose relative errors are
    returned."""
    B = min(shape.B, 256)
    small = dataclasses.replace(shape, B=B, N=B * (min(shape.M, 3) + 1), D=min(shape.D, 256))
    inputs = make_inputs(small, seed=1, device=device, positive_weight=ACCURACY_POSITIVE_WEIGHT)
    exact = {k: v.double() if k in LEAVES and v is not None else v for k, v in inputs.items()}
    timed = {k: v.to(dtype) if k in LEAVES and v is not None else v for k, v in inputs.items()}
    out = {}
    for p in providers:
        if p == "gemm" or not supports(p, small):
            continue
        err = _errors(p, small, exact, autocast=False)
        assert max(err.values()) <= MAX_EXACT_REL_ERR, (
            f"{p} computes another loss than the reference at {small.name}: {err}"
        )
        out[p] = _errors(p, small, timed, autocast=True)
    return out


def time_shape(shape: Shape, providers, device, dtype, *, repeats: int, warmup: int = 2) -> dict:
    """{mode: common.time_interleaved result} for every provider that supports the shape."""
    inputs = make_inputs(shape, device=device, dtype=dtype)
    out = {}
    for mode in GPU_MODES:
        calls = {}
        for p in providers:
            if not supports(p, shape):
                continue
            call = gemm_call(shape, inputs, mode) if p == "gemm" else None
            if call is None:
                call, _ = loss_call(loss_fn(p, shape), inputs, mode)
            calls[p] = device_timed(call, device)
        out[mode] = common.time_interleaved(
            calls, repeats=repeats, warmup=warmup, before=_sync(device), after=_sync(device)
        )
        print(
            f"  {shape.name} {mode}: "
            + ", ".join(f"{k} {v['median_s'] * 1e3:.3f}" for k, v in out[mode].items())
            + " ms",
            flush=True,
        )
    return out


def peak_memory(shape: Shape, providers, device, dtype) -> dict:
    """Extra peak MiB of one full call of each loss provider (common.measure_call_peak), the
    providers one after another on the same inputs."""
    inputs = make_inputs(shape, device=device, dtype=dtype)
    out = {}
    for p in providers:
        if p == "gemm" or not supports(p, shape):
            continue
        call, x = loss_call(loss_fn(p, shape), inputs, "full")
        call()  # warm-up: allocator pools, kernels loaded
        _clear_grads(x)
        gc.collect()
        out[p] = common.measure_call_peak(call, device)["extra_peak_mib"]
        _clear_grads(x)
        del call, x
    return out


def summarise(shape: Shape, timings: dict) -> list[dict]:
    """Rows (provider, mode): median ms, GEMM TFLOP/s, time / floor, and time of eager_autocast
    and torch_chunked over it (above 1: this provider is faster)."""
    rows = []
    for mode, timed in timings.items():
        med = {p: t["median_s"] for p, t in timed.items()}
        floor = med.get("gemm")
        for p, t in med.items():
            rows.append(
                {
                    "provider": p,
                    "mode": mode,
                    "median_ms": t * 1e3,
                    "min_ms": timed[p]["min_s"] * 1e3,
                    "tflops": shape.gemm_flops(mode) / t / 1e12,
                    "x_gemm": t / floor if floor else None,
                    "eager_over": med["eager_autocast"] / t if "eager_autocast" in med else None,
                    "chunked_over": med["torch_chunked"] / t if "torch_chunked" in med else None,
                }
            )
    return rows


def device_record(device: torch.device, dtype: torch.dtype) -> dict:
    """The machine record plus the GPU, its CUDA build and the matmul settings."""
    rec = common.machine_record()
    info = hardneg.build_info()
    rec.update(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        hardneg_cuda={k: v for k, v in info.items() if k.startswith(("cuda", "nccl"))},
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_sms=props.multi_processor_count,
            torch_cuda=torch.version.cuda,
        )
    return rec


def run(shapes, providers, device, dtype, *, repeats: int | None = None, memory: bool = True):
    """The whole GPU benchmark: accuracy check, interleaved timing, peak memory per shape."""
    device = torch.device(device)
    providers = check_providers_known(providers)
    record = {"machine": device_record(device, dtype), "providers": providers, "shapes": []}
    for i, shape in enumerate(shapes):
        entry = {"index": i, **dataclasses.asdict(shape), "name": shape.name}
        entry["skipped"] = [p for p in providers if not supports(p, shape)]
        entry["accuracy"] = accuracy(shape, providers, device, dtype)
        reps = repeats or shape.repeats
        entry["timings"] = time_shape(shape, providers, device, dtype, repeats=reps)
        entry["summary"] = summarise(shape, entry["timings"])
        if memory:
            entry["memory_full"] = peak_memory(shape, providers, device, dtype)
            print(f"  {shape.name} peak MiB: {entry['memory_full']}", flush=True)
        record["shapes"].append(entry)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def gpu_slug(record: dict) -> str:
    """File-name-safe GPU name, e.g. "nvidia-h200" ("cpu" for a run on CPU tensors)."""
    name = record["machine"].get("gpu", "cpu").lower()
    return "-".join(w for w in name.replace("(r)", " ").split() if w.isalnum())[:40]


def main(args) -> int:
    """bench_loss --device cuda: run and write bench_loss_gpu_<gpu>_<date>.{json,md}."""
    if not torch.cuda.is_available():
        print(
            "bench_loss: --device cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is "
            "False: no GPU, no driver, or a CPU build of torch); nothing was run"
        )
        return 0
    shapes = QUICK_GPU_SHAPES if args.quick else GPU_SHAPES
    if args.shapes is not None:
        shapes = tuple(shapes[i] for i in args.shapes)
    providers = args.providers or GPU_PROVIDERS
    record = run(
        shapes,
        providers,
        "cuda",
        DTYPES[args.dtype],
        repeats=args.repeats,
        memory=not args.no_memory,
    )
    path = common.write_results(
        "bench_loss_gpu",
        record,
        render_gpu_markdown(record),
        out_dir=args.out,
        slug=gpu_slug(record),
    )
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0
