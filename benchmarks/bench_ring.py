"""Cross-device hardneg_loss: ring vs all-gather vs the naive path, per training step (fwd + bwd).

Providers (K ranks, each with its own B queries, B targets, B*M hard negatives):
  ring       hardneg.ring's ring: K double-buffered steps forward, K backward (logits recomputed
             or kept within the keep budget), partial candidate gradients travelling home.
  allgather  hardneg.ring's all-gather: one all-gather, the fused row-chunked loss with its
             gradient in one pass, a reduce-scatter of candidate gradients.
  naive      what a user writes without hardneg: all-gather, the materialised eager loss
             (hardneg.reference's math over local queries x all candidates) with autograd, a
             reduce-scatter of the gathered candidates' gradient.

Per step and provider: total time T (median over repeats, interleaved), compute time C (the same
schedule with the transfers replaced by local copies), communication time X (the same transfers
alone), exposed communication E = max(0, T - C), hidden = max(0, X - E), overlap efficiency =
hidden / X, and the extra peak memory of one step (fresh processes; CPU: VmHWM, GPU:
max_memory_allocated). The cost model (hardneg.costmodel) is calibrated from this machine's
bare GEMM, kernel and link speeds and its predictions are printed beside the measurements.

    python -m benchmarks.bench_ring                       # gloo, 2 ranks on this CPU
    python -m benchmarks.bench_ring --backend nccl        # NCCL, one rank per GPU
    python -m benchmarks.bench_ring --quick --out /tmp/bench   # one tiny shape: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hardneg import _ops, _schedule
from hardneg._constants import KEEP_LOGITS_BYTES
from hardneg._spec import LossSpec
from hardneg.distributed import allgather, costmodel, layout, ring
from hardneg.distributed.transport import TorchTransport
from hardneg.reference import _direction_loss

from benchmarks import common

PROVIDERS = ("ring", "allgather", "naive")
# (B per rank, D, M): the timing shapes (small enough for 2 CPU cores) and the memory target.
TIMING_SHAPES = [(64, 256, 3), (256, 256, 3), (1024, 256, 3), (512, 1024, 7)]
MEMORY_SHAPE = (2048, 1024, 7)
QUICK_SHAPES, QUICK_MEMORY_SHAPE, QUICK_REPEATS = [(32, 64, 1)], (64, 64, 1), 2
GPU_TIMING_SHAPES = [(256, 1024, 7), (1024, 1024, 7), (4096, 1024, 7), (8192, 1024, 7)]


# ---------------------------------------------------------------------------------------------
# One step of each provider (inside a rank)
# ---------------------------------------------------------------------------------------------


class _LocalTransport:
    """Stands in for the link: receives are filled from local data, so the compute schedule is
    unchanged while nothing crosses the wire (the compute-only time C)."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size

    def exchange(self, dst, sends, src, recvs):
        for s, r in zip(sends, recvs, strict=False):
            if s.shape == r.shape:
                r.copy_(s)
        return _Done()


class _Done:
    def wait(self):
        return None


def _inputs(B, D, M, device, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    t = torch.nn.functional.normalize(q + torch.randn(B, D, generator=g), dim=-1)
    h = torch.nn.functional.normalize(torch.randn(B, M, D, generator=g), dim=-1)
    return q.to(device), t.to(device), h.to(device)


class _Step:
    """The three providers' forward + backward on one rank's inputs."""

    def __init__(self, B, D, M, group, device):
        self.group = group
        self.rank = dist.get_rank(group)
        self.K = dist.get_world_size(group)
        self.q, self.t, self.h = _inputs(B, D, M, device, seed=self.rank)
        self.spec = LossSpec("llave", 0.02, 9.0, 5.0, 0.1, check_finite=False)
        self.layout = layout.Layout(self.rank, (B,) * self.K, (M,) * self.K, False)
        self.device = device
        self.torch_transport = TorchTransport(group)
        self.local_transport = _LocalTransport(self.rank, self.K)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- ring --------------------------------------------------------------------------------
    def ring(self, transport):
        inputs = (self.q, self.t, self.h, None, None)
        keep = KEEP_LOGITS_BYTES
        loss_B, saved, kept = ring.ring_forward(inputs, self.layout, transport, self.spec, keep)
        one = torch.ones((), device=self.device)
        ring.ring_backward(one, inputs, saved, kept, self.layout, transport, self.spec, keep)

    def ring_comm(self):
        """The ring's transfers alone, same sizes and order."""
        lay, K, r = self.layout, self.K, self.rank
        D = self.q.shape[1]
        rows = lay.max_block_rows
        emb = [torch.empty(rows, D, dtype=self.q.dtype, device=self.device) for _ in range(2)]
        acc = [torch.zeros(rows, D, device=self.device) for _ in range(2)]
        inc = torch.empty(rows, D, device=self.device)
        tr, nxt, prv = self.torch_transport, (r + 1) % K, (r - 1) % K
        for backward in (False, True):
            for s in range(K):
                sends, recvs = ([emb[s % 2]], [emb[(s + 1) % 2]]) if s < K - 1 else ([], [])
                if backward and s >= 1:
                    sends.append(acc[(s - 1) % 2])
                    recvs.append(inc)
                tr.exchange(nxt, sends, prv, recvs).wait()
        tr.exchange(nxt, [acc[0]], prv, [inc]).wait()

    # -- allgather ----------------------------------------------------------------------------
    def allgather(self):
        inputs = (self.q, self.t, self.h, None, None)
        loss_B, dq, dc = allgather.allgather_compute(
            inputs, self.layout, self.group, self.spec, True, None
        )
        layout.finish_loss(loss_B, "mean", self.layout, self.group)
        allgather.allgather_grads(dq, dc, self.layout, self.group)

    def allgather_comm(self):
        K, X, D = self.K, self.layout.max_block_rows, self.q.shape[1]
        own = torch.empty(X, D, dtype=self.q.dtype, device=self.device)
        layout.all_gather_single(own.new_empty(K * X, D), own, self.group)
        g = torch.zeros(K * X, D, device=self.device)
        layout.reduce_scatter_single(g.new_empty(X, D), g, self.group)

    # -- naive ----------------------------------------------------------------------------------
    def naive(self):
        B, D = self.q.shape
        own = torch.cat([self.t, self.h.reshape(-1, D)])
        gathered = own.new_empty(self.K * own.shape[0], D)
        layout.all_gather_single(gathered, own, self.group)
        # Own block first so the positive of local query i is candidate i.
        blocks = gathered.view(self.K, -1, D)
        order = [self.rank] + [k for k in range(self.K) if k != self.rank]
        c = blocks[order].reshape(-1, D).requires_grad_(True)
        q = self.q.detach().requires_grad_(True)
        o = self.spec
        loss = _direction_loss(q, c, None, None, "llave", o.temperature, o.alpha, 5.0, 0.1)
        (loss.sum() / (B * self.K)).backward()
        grad = torch.empty_like(blocks)
        grad[order] = c.grad.view(self.K, -1, D)
        layout.reduce_scatter_single(own.new_empty(own.shape), grad.view(-1, D), self.group)

    naive_comm = allgather_comm


@contextlib.contextmanager
def _local_collectives():
    """The all-gather strategy's collectives turned into local copies (compute-only)."""

    def gather(out, inp, group):
        out.view(-1, *inp.shape)[:] = inp

    def scatter(out, inp, group):
        out.copy_(inp.view(-1, *out.shape)[0])

    saved = (allgather.all_gather_single, allgather.reduce_scatter_single)
    allgather.all_gather_single, allgather.reduce_scatter_single = gather, scatter
    try:
        yield
    finally:
        allgather.all_gather_single, allgather.reduce_scatter_single = saved


def _time_calls(calls: dict, step, repeats: int) -> dict[str, float]:
    """Median seconds of each call (common.time_interleaved): every rank runs the same rotating
    order, each call after a barrier and a device sync, timed to its device sync."""
    timed = common.time_interleaved(
        calls,
        repeats=repeats,
        before=lambda: (dist.barrier(step.group), step.sync()),
        after=step.sync,
    )
    return {name: t["median_s"] for name, t in timed.items()}


def _time_shape(B, D, M, group, device, repeats):
    step = _Step(B, D, M, group, device)
    calls = {}
    for p in PROVIDERS:
        if p == "ring":
            calls["ring_total"] = lambda: step.ring(step.torch_transport)
            calls["ring_compute"] = lambda: step.ring(step.local_transport)
        else:
            fn = getattr(step, p)
            calls[f"{p}_total"] = fn

            def compute(fn=fn):
                with _local_collectives():
                    fn()

            calls[f"{p}_compute"] = compute
        calls[f"{p}_comm"] = getattr(step, f"{p}_comm")
    seconds = _time_calls(calls, step, repeats)
    rows = {}
    for p in PROVIDERS:
        r = {f"{part}_s": seconds[f"{p}_{part}"] for part in ("total", "compute", "comm")}
        exposed = max(0.0, r["total_s"] - r["compute_s"])
        hidden = max(0.0, r["comm_s"] - exposed)
        r["exposed_comm_s"] = exposed
        r["overlap_efficiency"] = hidden / r["comm_s"] if r["comm_s"] > 0 else 0.0
        rows[p] = r
    return rows


def _calibrate(group, device, repeats):
    """This machine's fp32 GEMM throughput, fused-kernel cost per logit and link speed, measured
    on the sizes the ring uses, for the cost model."""
    a = torch.randn(512, 1024, device=device)
    b = torch.randn(4096, 1024, device=device)
    s = torch.empty(512, 4096, device=device)
    step = type("S", (), {"group": group, "sync": lambda self: None})()
    if device.type == "cuda":
        step.sync = torch.cuda.synchronize
    spec = LossSpec("llave", 0.02, 9.0, 5.0, 0.1, check_finite=False)
    params = _schedule.kernel_params(device, spec, False, 1.0)
    stats = torch.zeros(4, 512, device=device)
    stats[0] = -float("inf")
    params.s, params.rows, params.cols, params.ld_s = s.data_ptr(), 512, 4096, 4096
    params.pos_offset = 0
    params.run_max, params.run_sum = stats[0].data_ptr(), stats[1].data_ptr()
    params.z_pos, params.s_pos = stats[2].data_ptr(), stats[3].data_ptr()
    tr = TorchTransport(group)
    K, r = dist.get_world_size(group), dist.get_rank(group)
    small, big = torch.zeros(1, device=device), torch.zeros(4 << 20, device=device)
    t = _time_calls(
        {
            "gemm": lambda: torch.mm(a, b.T, out=s),
            "kernel": lambda: _ops.kernels_for(device).hardneg_loss_block_update(params),
            "latency": lambda: tr.exchange(
                (r + 1) % K, [small], (r - 1) % K, [small.clone()]
            ).wait(),
            "bandwidth": lambda: tr.exchange((r + 1) % K, [big], (r - 1) % K, [big.clone()]).wait(),
        },
        step,
        repeats,
    )
    t_gemm, t_elem, lat, t_big = t["gemm"], t["kernel"], t["latency"], t["bandwidth"]
    return {
        "gemm_flops": 2 * 512 * 4096 * 1024 / t_gemm,
        "elem_seconds": t_elem / (512 * 4096),
        "link_latency_s": lat,
        "link_bandwidth": big.numel() * 4 / max(t_big - lat, 1e-9),
    }


def _timing_worker(rank, world, port, backend, shapes, repeats, out):
    device = _setup(rank, world, port, backend)
    try:
        result = {"calibration": _calibrate(dist.group.WORLD, device, repeats), "shapes": []}
        for B, D, M in shapes:
            rows = _time_shape(B, D, M, dist.group.WORLD, device, repeats)
            result["shapes"].append({"B": B, "D": D, "M": M, "providers": rows})
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _memory_worker(rank, world, port, backend, provider, shape, out):
    device = _setup(rank, world, port, backend)
    try:
        B, D, M = shape
        step = _Step(B, D, M, dist.group.WORLD, device)
        call = (
            (lambda: step.ring(step.torch_transport))
            if provider == "ring"
            else (getattr(step, provider))
        )
        peak = common.measure_call_peak(call, device)
        peaks = [None] * world
        dist.all_gather_object(peaks, peak["extra_peak_mib"])
        if rank == 0:
            Path(out).write_text(json.dumps({"per_rank_mib": peaks, "method": peak["method"]}))
    finally:
        dist.destroy_process_group()


def _setup(rank, world, port, backend):
    common.pin_threads(max(1, (os.cpu_count() or 1) // world) if backend == "gloo" else 4)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _predictions(calib, shapes, world):
    link = costmodel.Link("measured", calib["link_bandwidth"], calib["link_latency_s"])
    comp = costmodel.Compute("measured", calib["gemm_flops"], calib["elem_seconds"])
    out = {}
    for B, D, M in shapes:
        for p in ("ring", "allgather"):
            pred = costmodel.predict(
                p, batch=B, dim=D, world_size=world, hard_negatives=M, link=link, compute=comp
            )
            out[(B, D, M, p)] = pred
    return out


def _crossover_table() -> str:
    rows = []
    for link in (costmodel.NVLINK, costmodel.INFINIBAND):
        for K in (2, 8):
            for keep, keep_name in ((None, "64 MiB (default)"), (1 << 40, "unbounded")):
                span = costmodel.crossover(
                    dim=1024, world_size=K, hard_negatives=7, link=link, keep_logits_bytes=keep
                )
                if span is None:
                    text = "never"
                elif span[1] is None:
                    text = f"{span[0]} .. beyond the search range"
                else:
                    text = f"{span[0]} .. {span[1]}"
                rows.append([link.name, K, keep_name, text])
    return common.markdown_table(
        ["link", "K ranks", "kept logits", "ring faster for B per rank in"], rows
    )


def _markdown(record: dict, preds: dict) -> str:
    calib, world = record["calibration"], record["world_size"]
    rows = []
    for entry in record["timing"]:
        B, D, M = entry["B"], entry["D"], entry["M"]
        for p, r in entry["providers"].items():
            pred = preds.get((B, D, M, p))
            rows.append([
                B, D, M, p, 1e3 * r["total_s"], 1e3 * r["compute_s"], 1e3 * r["comm_s"],
                1e3 * r["exposed_comm_s"], r["overlap_efficiency"],
                1e3 * pred["total"] if pred else "-",
            ])  # fmt: skip
    header = ["B/rank", "D", "M", "provider", "total", "compute", "comm", "exposed"]
    header += ["overlap eff.", "predicted"]
    title = f"bench_ring: {record['backend']}, {world} ranks"
    md = common.markdown_header(title, record["machine"]) + [
        "Per training step (forward + backward), median of "
        f"{record['repeats']} interleaved repeats; times in ms. compute: transfers replaced by "
        "local copies; comm: the transfers alone; exposed = max(0, total - compute); overlap "
        "efficiency = hidden / comm. predicted: hardneg.costmodel calibrated on this machine "
        f"(GEMM {calib['gemm_flops'] / 1e9:.1f} GFLOP/s fp32, kernel "
        f"{calib['elem_seconds'] * 1e9:.2f} ns/logit, link "
        f"{calib['link_bandwidth'] / 1e9:.2f} GB/s + {calib['link_latency_s'] * 1e6:.0f} us). "
        "Load average (1, 5, 15 min) at the end: "
        f"{', '.join(f'{v:.2f}' for v in record['load_average_1_5_15'])}.",
        "",
        common.markdown_table(header, rows),
        "",
    ]
    memory = record["memory"]
    if memory:
        B, D, M = record["memory_shape"]
        mib = {p: max(m["per_rank_mib"]) for p, m in memory.items()}
        md += [
            f"Extra peak memory of one step at B = {B} per rank, D = {D}, M = {M}, "
            f"{world} ranks, fp32 (MiB, worst rank; {memory['naive']['method']}):",
            "",
            common.memory_table(mib, "naive", header=("provider", "extra peak MiB", "x naive")),
            "",
        ]
    md += [
        "Predicted crossover on GPUs (hardneg.costmodel, H100 fp32 GEMMs, D = 1024, M = 7; a "
        "prediction until measured with --backend nccl):",
        "",
        _crossover_table(),
        "",
    ]
    return "\n".join(md)


def _save_calibration(path: Path, record: dict) -> None:
    machine = record["machine"]
    source = {
        "source": os.path.relpath(path),
        "machine": machine.get("cpu"),
        "date": machine.get("date"),
    }
    costmodel.CALIBRATION_FILE.write_text(
        json.dumps({**source, **record["calibration"]}, indent=1) + "\n"
    )
    print(f"wrote {costmodel.CALIBRATION_FILE}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_output_args(ap, "one tiny shape, 2 repeats (smoke test)")
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--shapes", help="BxDxM,... per rank (default: the built-in list)")
    ap.add_argument("--memory-shape", default="x".join(map(str, MEMORY_SHAPE)), help="BxDxM")
    ap.add_argument(
        "--save-calibration",
        action="store_true",
        help=f"write the measured link and compute to {costmodel.CALIBRATION_FILE.name}, "
        "which the cost model loads for CPU tensors (gloo only)",
    )
    args = ap.parse_args()
    if args.quick and args.save_calibration:
        sys.exit("--save-calibration needs a full run, not --quick")
    if args.backend == "nccl" and torch.cuda.device_count() < args.world:
        sys.exit(f"--backend nccl needs {args.world} GPUs, found {torch.cuda.device_count()}")
    shapes = GPU_TIMING_SHAPES if args.backend == "nccl" else TIMING_SHAPES
    memory_shape = tuple(int(v) for v in args.memory_shape.split("x"))
    if args.quick:
        shapes, memory_shape, args.repeats = QUICK_SHAPES, QUICK_MEMORY_SHAPE, QUICK_REPEATS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    timing = common.spawn_ranks(_timing_worker, args.world, args.backend, shapes, args.repeats)
    memory = {}
    if not args.no_memory:
        for p in PROVIDERS:
            memory[p] = common.spawn_ranks(
                _memory_worker, args.world, args.backend, p, memory_shape
            )
    preds = _predictions(timing["calibration"], shapes, args.world)
    record = {
        "machine": common.machine_record(),
        # Other jobs share the CPU: the load average says how much of it this run had.
        "load_average_1_5_15": os.getloadavg(),
        "backend": args.backend,
        "world_size": args.world,
        "repeats": args.repeats,
        "calibration": timing["calibration"],
        "timing": timing["shapes"],
        "predicted_total_s": {f"{k[0]}x{k[1]}x{k[2]}-{k[3]}": v["total"] for k, v in preds.items()},
        "memory_shape": memory_shape,
        "memory": memory,
    }
    md = _markdown(record, preds)
    path = common.write_results("bench_ring", record, md, out_dir=args.out)
    if args.save_calibration and args.backend == "gloo":
        _save_calibration(path, record)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
