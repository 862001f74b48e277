"""A small cost model for cross-device negatives: ring vs all-gather (design section 3).

Per training step (forward + backward of hardneg_loss over K ranks, per-rank batch B, M hard
negatives, dim D), with F the fp32 GEMM throughput (the loss GEMMs run in fp32 whatever the input
dtype), W the link bandwidth per direction, a its per-message latency, e the element cost of the
fused kernels, E the bytes of one input element on the wire:

    block  = B (1 + M) [+ B when symmetric] rows of D;   x = block D E / W + a  (one block hop)
    gemm   = 2 B N_k D / F per GEMM over one block (N_k its candidate columns, both directions)
    elem   = e B N_k per kernel sweep of one block
    g      = block D 4 / W + a                           (one hop of fp32 partial gradients)

    ring      forward   K steps of max(gemm + elem, x)           (the next block hides behind)
              backward  K steps of max(gemm (kept) or 2 gemm (recomputed) + gemm + elem, x + g)
                        + g                                      (the last partial goes home)
    allgather (K - 1) x  +  K (3 gemm + 2 elem)  +  (K - 1) g    (nothing overlaps)

The ring sends every block twice (forward and backward) and recomputes logits that did not fit the
keep budget, but hides its transfers behind the GEMMs once a block's GEMM outlasts its transfer,
i.e. once 2 B W / (F E) > 1: its advantage grows with the per-rank batch B. The all-gather pays
each transfer once, in the open, and wins at small B. `crossover` finds the per-rank batch where
the ring starts to pay. The hardware numbers below are datasheet-derived estimates, not
measurements, until benchmarks/bench_ring.py has run on such machines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hardneg._constants import KEEP_LOGITS_BYTES

STRATEGIES = ("ring", "allgather")
# This machine kind's link and compute as measured by `benchmarks/bench_ring.py
# --save-calibration` (loopback gloo, one thread per rank); rerun it when the machine changes.
CALIBRATION_FILE = Path(__file__).with_name("calibration_cpu.json")


@dataclass(frozen=True)
class Link:
    """A link between two ranks: bandwidth per direction (bytes/s) and latency per message (s)."""

    name: str
    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Compute:
    """One rank's throughput: fp32 GEMM (flop/s) and the fused kernels' cost per logit per sweep
    (s)."""

    name: str
    gemm_flops: float
    elem_seconds: float


# NVLink 4 (H100 SXM): 450 GB/s per direction on paper; NCCL send/recv reaches about 80 %.
NVLINK = Link("nvlink4", 360e9, 10e-6)
# InfiniBand NDR, one 400 Gb/s HCA per GPU: 50 GB/s on paper, about 45 GB/s achieved.
INFINIBAND = Link("ib-ndr400", 45e9, 20e-6)
# H100 SXM: 67 TFLOP/s fp32 (no TF32) on paper, ~50 in practice; the fused kernels stream S at
# ~3 TB/s, 8 bytes (read + write) per logit and sweep.
H100 = Compute("h100-fp32", 50e12, 8 / 3e12)


def load_calibration(path: Path = CALIBRATION_FILE) -> tuple[Link, Compute]:
    """The (link, compute) a bench_ring calibration file measured."""
    calib = json.loads(Path(path).read_text())
    link = Link("gloo-loopback", calib["link_bandwidth"], calib["link_latency_s"])
    return link, Compute("cpu", calib["gemm_flops"], calib["elem_seconds"])


LOOPBACK_GLOO, CPU = load_calibration()


def _wire_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def predict(
    strategy: str,
    *,
    batch: int,
    dim: int,
    world_size: int,
    hard_negatives: int = 0,
    dtype: torch.dtype = torch.float32,
    link: Link = NVLINK,
    compute: Compute = H100,
    symmetric: bool = False,
    keep_logits_bytes: int | None = None,
) -> dict[str, float]:
    """Predicted seconds of one forward + backward per rank: {"total", "compute", "comm",
    "exposed_comm"} (comm = all transfer time, exposed_comm = the part not hidden by compute)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if keep_logits_bytes is None:
        keep_logits_bytes = KEEP_LOGITS_BYTES
    K, B, D = world_size, batch, dim
    cols = B * (1 + hard_negatives) + (B if symmetric else 0)  # columns of one block, both passes
    rows = cols
    gemm = 2.0 * B * cols * D / compute.gemm_flops
    elem = compute.elem_seconds * B * cols
    x = rows * D * _wire_bytes(dtype) / link.bandwidth + link.latency
    g = rows * D * 4 / link.bandwidth + link.latency
    if strategy == "allgather":
        comp = K * (3 * gemm + 2 * elem)
        comm = (K - 1) * (x + g)
        return {"total": comp + comm, "compute": comp, "comm": comm, "exposed_comm": comm}
    kept = 4 * B * cols * K <= keep_logits_bytes
    fwd_step = gemm + elem
    bwd_step = (2 if kept else 3) * gemm + elem
    total = K * max(fwd_step, x) + (K - 1) * max(bwd_step, x + g) + bwd_step + g
    # The last step of each ring has nothing in flight but the backward's final partial hop.
    comp = K * (fwd_step + bwd_step)
    comm = (K - 1) * (2 * x + g) + g
    return {"total": total, "compute": comp, "comm": comm, "exposed_comm": max(0.0, total - comp)}


def choose_strategy(
    *,
    batch: int,
    dim: int,
    world_size: int,
    hard_negatives: int = 0,
    dtype: torch.dtype = torch.float32,
    link: Link = NVLINK,
    compute: Compute | None = None,
    symmetric: bool = False,
) -> str:
    """The strategy with the smaller predicted step time ("ring" or "allgather")."""
    compute = compute or (CPU if link is LOOPBACK_GLOO else H100)
    kw = dict(
        batch=batch,
        dim=dim,
        world_size=world_size,
        hard_negatives=hard_negatives,
        dtype=dtype,
        link=link,
        compute=compute,
        symmetric=symmetric,
    )
    ring = predict("ring", **kw)["total"]
    allgather = predict("allgather", **kw)["total"]
    return "ring" if ring < allgather else "allgather"


def default_link(device: torch.device) -> Link:
    """The link the ranks of a job most likely share: loopback gloo for CPU tensors; for CUDA,
    NVLink when the whole job fits one node (WORLD_SIZE <= LOCAL_WORLD_SIZE), InfiniBand
    otherwise."""
    if device.type != "cuda":
        return LOOPBACK_GLOO
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return NVLINK if world <= local else INFINIBAND


def crossover(
    *,
    dim: int,
    world_size: int,
    hard_negatives: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    link: Link = NVLINK,
    compute: Compute = H100,
    symmetric: bool = False,
    keep_logits_bytes: int | None = None,
    max_batch: int = 1 << 16,
) -> tuple[int, int] | None:
    """(first, last) per-rank batch of the range where the ring is predicted faster than the
    all-gather, or None when it never is up to max_batch; last is None when the ring is still
    faster at max_batch (the range extends beyond the search). The range can close again: once a
    rank's logits outgrow keep_logits_bytes the ring recomputes them (one more GEMM in 4), which
    costs more than the all-gather's exposed transfers at very large B."""
    kw = dict(
        dim=dim,
        world_size=world_size,
        hard_negatives=hard_negatives,
        dtype=dtype,
        link=link,
        compute=compute,
        symmetric=symmetric,
        keep_logits_bytes=keep_logits_bytes,
    )
    first = last = None
    b = searched = 1
    while b <= max_batch:
        ring = predict("ring", batch=b, **kw)["total"]
        if ring < predict("allgather", batch=b, **kw)["total"]:
            first = b if first is None else first
            last = b
        searched = b
        b += max(1, b // 16)  # ~6 % steps: fine enough for a table
    if first is None:
        return None
    return first, (None if last == searched else last)
