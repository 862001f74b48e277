"""The one shape list of benchmarks/bench_loss.py (CPU and GPU), and its inputs.

A Shape is (B queries, N = B + B*M candidates, D embedding dim) with the loss options the row
exercises; `make_inputs` builds L2-normalised query, target and hard negatives for it, on any
device and in any floating dtype, without large temporaries (the memory probes rely on it).
benchmarks/roofline.py predicts GPU times for the GPU shapes below.

Legend: B queries, M hard negatives per query, N = B + B*M candidates, D embedding dim.
Suffixes name shapes: q_BD, h_BMD.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int
    N: int
    D: int
    mode: str = "llave"
    symmetric: bool = False
    masked: bool = False  # duplicate ids, so the false-negative mask is exercised
    repeats: int = 7

    @property
    def M(self) -> int:
        return self.N // self.B - 1

    @property
    def name(self) -> str:
        extra = "+sym" if self.symmetric else ""
        extra += "+mask" if self.masked else ""
        return f"B={self.B} N={self.N} D={self.D} {self.mode}{extra}"

    def gemm_flops(self, mode: str) -> float:
        """FLOPs of the GEMMs the loss needs (elementwise work not counted)."""
        per_gemm = 2.0 * self.B * self.N * self.D
        sym = 2.0 * self.B * self.B * self.D if self.symmetric else 0.0
        n_gemms = {"forward": 1, "backward": 2, "full": 3}[mode]
        return n_gemms * (per_gemm + sym)


# CPU: the three target shapes first, then an infonce symmetric masked row and an ega masked row.
# Fewer repeats where the eager reference takes seconds per call.
SHAPES = (
    Shape(512, 8192, 1024),
    Shape(1024, 16384, 64),
    Shape(1024, 65536, 256, repeats=3),
    Shape(512, 4096, 256, mode="infonce", symmetric=True, masked=True),
    Shape(512, 8192, 256, mode="ega", masked=True),
)
QUICK_SHAPES = (
    Shape(64, 512, 32, repeats=3),
    Shape(64, 256, 16, mode="infonce", symmetric=True, masked=True, repeats=3),
    Shape(48, 192, 24, mode="ega", masked=True, repeats=3),
)

# GPU (bf16 by default): the two target shapes of a GradCache-sized batch first, then the CPU
# target shapes (small for a GPU: launch overheads weigh), D = 64 (elementwise-bound) and a
# symmetric masked row. Modes the eager provider supports (infonce, llave) only.
GPU_SHAPES = (
    Shape(4096, 32768, 1024, repeats=10),
    Shape(8192, 65536, 4096, repeats=5),
    Shape(512, 8192, 1024, repeats=20),
    Shape(1024, 16384, 64, repeats=20),
    Shape(2048, 16384, 256, mode="infonce", symmetric=True, masked=True, repeats=20),
)
QUICK_GPU_SHAPES = (
    Shape(64, 512, 32, repeats=3),
    Shape(48, 192, 24, mode="infonce", symmetric=True, masked=True, repeats=3),
)


def make_inputs(
    shape: Shape,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    positive_weight: float = 2.0,
) -> dict:
    """L2-normalised query (B, D), target (B, D), hard_negatives (B, M, D) in `dtype` on `device`
    and, when masked, int64 ids with duplicates. Drawn in fp32 from a generator on `device` (on the
    CPU the same numbers for a seed as always), normalised, then cast.

    target_i = normalise(positive_weight * query_i + noise): cosine ~0.89 at the default 2, where
    at tau = 0.02 and D >= 256 every row is confident (loss far below 1e-6: timing does not care);
    ~0.24 at 0.25 gives losses of order 1 (the GPU accuracy check)."""
    device = torch.device(device)
    g = torch.Generator(device).manual_seed(seed)
    B, M, D = shape.B, shape.M, shape.D
    q_BD = torch.randn(B, D, generator=g, device=device)
    t_BD = torch.randn(B, D, generator=g, device=device)
    h_BMD = torch.randn(B, M, D, generator=g, device=device)
    for x in (q_BD, t_BD, h_BMD):
        x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True))
    # Correlate positives with their queries so the loss is not at its random-init plateau.
    t_BD.add_(q_BD, alpha=positive_weight).div_(
        torch.linalg.vector_norm(t_BD, dim=-1, keepdim=True)
    )
    if dtype != torch.float32:
        q_BD, t_BD, h_BMD = (x.to(dtype) for x in (q_BD, t_BD, h_BMD))
    inputs = {"query": q_BD, "target": t_BD, "hard_negatives": h_BMD if M > 0 else None}
    if shape.masked:
        # Every 16th target repeats an earlier id; hard negatives draw ids that sometimes collide.
        inputs["target_ids"] = torch.arange(B, device=device) % (B - B // 16)
        inputs["hard_negative_ids"] = torch.randint(0, 4 * B, (B, M), generator=g, device=device)
    else:
        inputs["target_ids"] = None
        inputs["hard_negative_ids"] = None
    return inputs
