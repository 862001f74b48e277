"""Cases and checks of the cross-device hardneg_loss, run inside every rank of a gloo world.

Every rank builds the same global batch from the case's seed, keeps its own rows (uneven sizes,
a rank with B = 1 included), runs the distributed loss and compares its loss and its gradients
against the fp64 single-process reference over the concatenated batch (rank order). The errors
travel back to the test process, which asserts on them.

Legend: K ranks, B global batch, B_r rows of rank r, M hard negatives per query, D dim.
"""

from __future__ import annotations

import itertools
import os
import socket
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from hardneg import KEEP_LOGITS_BYTES, fused_hardneg_loss, hardneg_loss_reference
from torch import Tensor

D = 59  # odd, not a multiple of any vector width

# Rows per rank: uneven, with a single-row rank, for each world size.
SIZES = {2: (5, 1), 4: (3, 1, 6, 2)}

FLOAT_NAMES = ("query", "target", "hard_negatives")


@dataclass(frozen=True)
class Case:
    mode: str = "llave"
    symmetric: bool = False
    negatives: int = 0
    ids: bool = False
    strategy: str = "ring"
    reduction: str = "mean"
    keep_logits_bytes: int | None = None  # None: the default budget (every block kept here)
    chunk_size: int | None = None
    seed: int = 0
    transport: str = "auto"  # the ring's transport: "torch", "nccl" or "auto"

    @property
    def name(self) -> str:
        parts = [self.strategy, self.mode, self.reduction, f"M{self.negatives}"]
        parts += ["sym"] * self.symmetric + ["ids"] * self.ids
        if self.keep_logits_bytes is not None:
            parts.append(f"keep{self.keep_logits_bytes}")
        if self.chunk_size:
            parts.append(f"chunk{self.chunk_size}")
        if self.transport != "auto":
            parts.append(self.transport)
        return "-".join(parts)


def all_cases() -> list[Case]:
    """The full product of modes, symmetry, hard negatives, masking and strategies, each with one
    of the reductions, plus the ring's recompute path (nothing kept) with tiny row chunks."""
    cases = []
    product = itertools.product(
        ("infonce", "llave", "ega"), (False, True), (0, 3), (False, True), ("ring", "allgather")
    )
    for i, (mode, sym, m, ids, strategy) in enumerate(product):
        reduction = ("mean", "sum", "none")[i % 3]
        cases.append(Case(mode, sym, m, ids, strategy, reduction, seed=i))
    for i, (mode, reduction) in enumerate(itertools.product(("llave", "ega"), ("mean", "none"))):
        cases.append(
            Case(mode, True, 2, True, "ring", reduction, keep_logits_bytes=0, chunk_size=2, seed=i)
        )
    return cases


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def global_inputs(case: Case, B: int) -> dict[str, Tensor | None]:
    """fp64 global batch: positives and hard negatives lean towards their query (cosine ~0.1) so
    several candidates per row carry probability at tau = 0.02; ids drawn from B // 2 values so
    duplicates span ranks."""
    g = torch.Generator().manual_seed(1000 + case.seed)
    q = _unit(torch.randn(B, D, generator=g, dtype=torch.float64))
    t = _unit(0.1 * q + _unit(torch.randn(B, D, generator=g, dtype=torch.float64)))
    out: dict[str, Tensor | None] = {"query": q, "target": t, "hard_negatives": None}
    out["target_ids"] = out["hard_negative_ids"] = None
    M = case.negatives
    if M:
        out["hard_negatives"] = _unit(
            0.08 * q[:, None] + _unit(torch.randn(B, M, D, generator=g, dtype=torch.float64))
        )
    if case.ids:
        out["target_ids"] = torch.randint(max(2, B // 2), (B,), generator=g)
        if M:
            out["hard_negative_ids"] = torch.randint(max(2, B // 2), (B, M), generator=g)
    out["grad_output"] = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    return out


def _options(case: Case) -> dict:
    return dict(mode=case.mode, symmetric=case.symmetric, reduction=case.reduction)


def reference(case: Case, inputs: dict, *, layout=None, dtype=torch.float64) -> dict[str, Tensor]:
    """Loss and gradients of the single-process reference over the whole batch, in `dtype` (fp64:
    the truth; fp32: plain torch's own round-off). layout: an optional permutation of the targets
    (to prove a wrong layout is caught)."""
    leaves = {
        k: inputs[k].to(dtype, copy=True).requires_grad_(True)
        for k in FLOAT_NAMES
        if inputs[k] is not None
    }
    target = leaves["target"] if layout is None else leaves["target"][layout]
    loss = hardneg_loss_reference(
        leaves["query"],
        target,
        hard_negatives=leaves.get("hard_negatives"),
        target_ids=inputs["target_ids"],
        hard_negative_ids=inputs["hard_negative_ids"],
        **_options(case),
    )
    go = inputs["grad_output"] if case.reduction == "none" else inputs["grad_output"][0]
    (loss * go.to(dtype)).sum().backward()
    out = {"loss": loss.detach()}
    out.update({f"d_{k}": v.grad for k, v in leaves.items()})
    return out


def distributed(case: Case, inputs: dict, sizes, group, device="cpu") -> dict[str, Tensor]:
    """This rank's fp32 loss and gradients from the distributed op, run on `device`."""
    rank = dist.get_rank(group)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    local = {}
    for k in FLOAT_NAMES:
        if inputs[k] is not None:
            local[k] = inputs[k][lo:hi].float().to(device).requires_grad_(True)
    ids = {
        k: None if inputs[k] is None else inputs[k][lo:hi].to(device)
        for k in ("target_ids", "hard_negative_ids")
    }
    keep = KEEP_LOGITS_BYTES if case.keep_logits_bytes is None else case.keep_logits_bytes
    loss = fused_hardneg_loss(
        local["query"],
        local["target"],
        hard_negatives=local.get("hard_negatives"),
        **ids,
        group=group,
        strategy=case.strategy,
        transport=case.transport,
        keep_logits_bytes=keep,
        chunk_size=case.chunk_size,
        **_options(case),
    )
    go = inputs["grad_output"]
    go = go[lo:hi].float() if case.reduction == "none" else go[0].float()
    (loss * go.to(device)).sum().backward()
    out = {"loss": loss.detach().cpu()}
    out.update({f"d_{k}": v.grad.cpu() for k, v in local.items()})
    return out


def rel_err(got: Tensor, want: Tensor) -> float:
    """Norm-wise relative error (the fp32-round-off scale of a whole tensor)."""
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


def local_part(case: Case, results: dict, sizes, rank: int) -> dict[str, Tensor]:
    """The rows of global results that rank `rank` owns (a reduced loss is shared by all)."""
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    out = {}
    for k, v in results.items():
        v = v.detach()
        out[k] = v if k == "loss" and case.reduction != "none" else v[lo:hi]
    return out


def compare(got: dict, want: dict) -> dict[str, float]:
    return {k: rel_err(v, want[k]) for k, v in got.items()}


def run_cases(cases: list[Case], group, device="cpu") -> list[dict]:
    """Errors of every case on this rank: [{"case": ..., "rank": r, "errors": {...}}]."""
    K = dist.get_world_size(group)
    rank = dist.get_rank(group)
    sizes = SIZES[K]
    results = []
    for case in cases:
        inputs = global_inputs(case, sum(sizes))
        want = reference(case, inputs)
        got = distributed(case, inputs, sizes, group, device)
        errs = compare(got, local_part(case, want, sizes, rank))
        # Plain torch in fp32 on the same data: the round-off floor the op is held to (a row whose
        # softmax is nearly one-hot loses digits to P - 1 in any fp32 computation).
        ref32 = local_part(case, reference(case, inputs, dtype=torch.float32), sizes, rank)
        for k, err in compare(ref32, local_part(case, want, sizes, rank)).items():
            errs[f"fp32_reference_{k}"] = err
        # The same distributed result against a wrong positive layout (targets rotated by one
        # rank's worth): must be far off, or the comparison could not see a misplaced positive.
        wrong = reference(case, inputs, layout=torch.roll(torch.arange(sum(sizes)), sizes[0]))
        wrong_errs = compare(got, local_part(case, wrong, sizes, rank))
        errs["wrong_layout"] = max(wrong_errs["loss"], wrong_errs["d_query"])
        results.append({"case": asdict(case), "rank": rank, "errors": errs})
    return results


def mismatch_message(group, device="cpu") -> str:
    """The error every rank raises when one rank passes another temperature (ranks that disagree
    on an option would otherwise compute different losses without a word)."""
    rank = dist.get_rank(group)
    q = torch.nn.functional.normalize(torch.randn(2, D, device=device), dim=-1)
    try:
        fused_hardneg_loss(q, q, temperature=0.02 if rank == 0 else 0.05, group=group)
    except ValueError as e:
        return str(e)
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_worker(
    rank: int, world_size: int, port: int, cases: list[Case], out_dir: str, backend: str = "gloo"
) -> None:
    """torch.multiprocessing.spawn target: one world (gloo on CPU, or NCCL with one GPU per rank),
    every case, errors to out_dir."""
    import json

    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        results = run_cases(cases, dist.group.WORLD, device)
        results.append({"mismatch": mismatch_message(dist.group.WORLD, device)})
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()
