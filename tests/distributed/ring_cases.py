"""Cases of the cross-device hardneg_loss, run inside every rank of a gloo (or NCCL) world.

Every rank builds the same global batch from the case's seed (tests/loss_testing.make_inputs, in
fp32), keeps its own rows (uneven sizes, a rank with B = 1 included), runs the distributed loss and
measures its loss and gradients against the fp64 single-process reference over the concatenated
batch (rank order), under the one error rule of tests/loss_testing.py with plain torch = the same
reference in fp32. The result of a wrong positive layout (targets rotated by one rank's rows),
judged the same way, must fail the rule by far, or the comparison could not see a misplaced
positive.
The measurements travel back to the test process, which asserts on them (check_result).

Legend: K ranks, B global batch, B_r rows of rank r, M hard negatives per query, D dim.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from hardneg import KEEP_LOGITS_BYTES, fused_hardneg_loss
from loss_testing import (
    assert_within,
    grad_output_for,
    loss_and_grads,
    make_inputs,
    measure,
    reference_outputs,
    rule_for,
)

D = 59  # odd, not a multiple of any vector width

# Rows per rank: uneven, with a single-row rank, for each world size.
SIZES = {2: (5, 1), 4: (3, 1, 6, 2)}

# A rotated target layout must exceed the rule's budget this many times (loss or query gradient).
WRONG_LAYOUT_FACTOR = 100.0


@dataclass(frozen=True)
class Case:
    mode: str = "llave"
    symmetric: bool = False
    hard_negatives: int = 0  # M per query
    ids: bool = False
    strategy: str = "ring"
    reduction: str = "mean"
    keep_logits_bytes: int | None = None  # None: the default budget (every block kept here)
    chunk_size: int | None = None
    seed: int = 0
    transport: str = "auto"  # the ring's transport: "torch", "nccl" or "auto"

    @property
    def name(self) -> str:
        parts = [self.strategy, self.mode, self.reduction, f"M{self.hard_negatives}"]
        parts += ["sym"] * self.symmetric + ["ids"] * self.ids
        if self.keep_logits_bytes is not None:
            parts.append(f"keep{self.keep_logits_bytes}")
        if self.chunk_size:
            parts.append(f"chunk{self.chunk_size}")
        if self.transport != "auto":
            parts.append(self.transport)
        return "-".join(parts)

    @property
    def options(self) -> dict:
        """The loss options the reference shares with the op."""
        return {"mode": self.mode, "symmetric": self.symmetric, "reduction": self.reduction}


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


def _rows(outputs: dict, lo: int, hi: int, reduction: str) -> dict:
    """Rows lo:hi of every per-row tensor (a reduced loss is shared by all ranks)."""
    return {
        k: v if (k == "loss" and reduction != "none") or v is None else v[lo:hi]
        for k, v in outputs.items()
    }


def run_case(case: Case, group, device="cpu") -> dict:
    """This rank's measurements of one case: {"errors": {output: {"error", "allowed"}},
    "wrong_layout": how many times the rotated layout exceeds the budget}."""
    sizes = SIZES[dist.get_world_size(group)]
    rank = dist.get_rank(group)
    B = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    inputs = make_inputs(
        B, D, case.hard_negatives, ids=case.ids, dtype=torch.float32, seed=case.seed
    )
    grad_output = grad_output_for(case.reduction, B, seed=1000 + case.seed)
    call = {"grad_output": grad_output, **case.options}
    truth = _rows(reference_outputs(inputs, dtype=torch.float64, **call), lo, hi, case.reduction)
    plain = _rows(reference_outputs(inputs, dtype=torch.float32, **call), lo, hi, case.reduction)

    local = {k: None if v is None else v[lo:hi].to(device) for k, v in inputs.items()}
    keep = KEEP_LOGITS_BYTES if case.keep_logits_bytes is None else case.keep_logits_bytes
    local_grad = grad_output[lo:hi] if case.reduction == "none" else grad_output
    got = loss_and_grads(
        fused_hardneg_loss,
        local,
        grad_output=local_grad,
        group=group,
        strategy=case.strategy,
        transport=case.transport,
        keep_logits_bytes=keep,
        chunk_size=case.chunk_size,
        **case.options,
    )
    got = {k: v.cpu() for k, v in got.items()}
    # The global batch sets the row weight of a "mean" (1 / B), this rank's rows those of "none".
    rule = rule_for(B, local_grad, **case.options)
    # The rotated layout's result, as an op that misplaced the positives would return it.
    rotated = {**inputs, "target": torch.roll(inputs["target"], sizes[0], dims=0)}
    wrong = _rows(reference_outputs(rotated, dtype=torch.float64, **call), lo, hi, case.reduction)
    wrong_errors = measure(wrong, truth, plain, **rule)
    return {
        "errors": measure(got, truth, plain, **rule),
        "wrong_layout": max(
            wrong_errors[k]["error"] / wrong_errors[k]["allowed"] for k in ("loss", "d_query")
        ),
    }


def run_cases(cases: list[Case], group, device="cpu") -> list[dict]:
    """[{"case": ..., "rank": r, "errors": ..., "wrong_layout": ...}] of every case on this rank."""
    rank = dist.get_rank(group)
    return [{"case": asdict(c), "rank": rank, **run_case(c, group, device)} for c in cases]


def check_result(result: dict) -> None:
    """AssertionError unless the case met the rule on its rank and a rotated layout did not."""
    context = f"{Case(**result['case']).name} on rank {result['rank']}"
    assert_within(result["errors"], context)
    assert result["wrong_layout"] > WRONG_LAYOUT_FACTOR, (
        f"{context}: a rotated target layout exceeds the budget only "
        f"{result['wrong_layout']:.3g}x (a misplaced positive could go unnoticed)"
    )


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
    every case, measurements to out_dir/rank<r>.json."""
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
