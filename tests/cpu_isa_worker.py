"""Checks of one CPU kernel variant, run by tests/test_cpu_isa.py in a fresh interpreter with
HARDNEG_CPU_ISA set (the variant is chosen once, when hardneg is imported).

Every entry point of the variant is exercised:
  hardneg_loss_rows     fused_hardneg_loss against the fp64 reference, values and gradients of
                        query, target and hard negatives (tolerances of tests/test_loss.py)
  block_update / _grad  the column-block (ring) schedule over uneven blocks, the positives' block
                        first as in the ring, against the row kernel of the same variant and the
                        fp64 logsumexp
  hardneg_exp           ulp error over 5M points (bound of tests/test_kernel_math.py), special
                        values, the same bits in the vector body and the tail
  hardneg_round         bf16 / fp16 rounding of dS: torch's .to() bits over every class of fp32
                        bit pattern (tests/test_ds_rounding.py), body and tail alike
Prints one JSON line {"cpu_isa", "failures": [...], "exp_max_ulp"}; exits 0 either way, so the
caller asserts on the content. --perturb runs the fused loss and the column blocks at a
temperature 0.1% off, to prove the checks can fail.

Legend: B queries, M hard negatives per query, D embedding dim, N candidates.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

# Run as a script: its own folder (tests/) is first on sys.path, so loss_testing imports.
import hardneg  # noqa: E402
import torch
from hardneg import _C, TEMPERATURE, fused_hardneg_loss  # noqa: E402
from hardneg.distributed.ring import row_loss  # noqa: E402
from loss_testing import (  # noqa: E402
    check_close,
    loss_and_grads,
    make_inputs,
    reference_outputs,
    rule_for,
)
from test_ds_rounding import all_classes, hardneg_round, mismatches  # noqa: E402
from test_kernel_math import dense_grid, hardneg_exp, ulp_error  # noqa: E402

# (B, D, M, ids, mode, symmetric, reduction, chunk_size, threads): awkward sizes (B = 1, 7, 257;
# D = 59), masking, every mode, both directions, uneven chunks, and two OpenMP threads once.
CASES = (
    (1, 59, 2, False, "llave", False, "mean", None, 1),
    (7, 59, 2, True, "ega", True, "sum", 3, 1),
    (7, 128, 0, False, "infonce", True, "none", None, 1),
    (257, 59, 2, True, "llave", True, "mean", 16, 2),
    (257, 59, 3, True, "ega", False, "none", 64, 1),
)
MODE_CODES = {"infonce": 0, "llave": 1, "ega": 2}


def check_loss(failures: list[str], *, perturb: bool) -> None:
    for B, D, M, ids, mode, symmetric, reduction, chunk, threads in CASES:
        torch.set_num_threads(threads)
        inputs = make_inputs(B, D, M, ids=ids)
        options = {"mode": mode, "symmetric": symmetric, "reduction": reduction}
        g_out = 3.7 if reduction != "none" else torch.linspace(-2.0, 2.0, B, dtype=torch.float64)
        want = reference_outputs(inputs, dtype=torch.float64, grad_output=g_out, **options)
        plain = reference_outputs(inputs, dtype=torch.float32, grad_output=g_out, **options)
        tau = TEMPERATURE * (1.001 if perturb else 1.0)
        got = loss_and_grads(
            fused_hardneg_loss,
            inputs,
            grad_output=g_out,
            chunk_size=chunk,
            temperature=tau,
            **options,
        )
        try:
            check_close(got, want, plain, **rule_for(B, g_out, **options))
        except AssertionError as err:
            failures.append(f"loss B={B} D={D} M={M} {mode} sym={symmetric} {reduction}: {err}")
    torch.set_num_threads(1)


def _params(s_RC: torch.Tensor, stats: dict[str, torch.Tensor], **fields) -> object:
    p = _C.HardnegLossParams()
    p.s, p.rows, p.cols, p.ld_s = s_RC.data_ptr(), s_RC.shape[0], s_RC.shape[1], s_RC.stride(0)
    for name, t in stats.items():
        setattr(p, name, t.data_ptr())
    for name, value in fields.items():
        setattr(p, name, value)
    return p


def check_blocks(failures: list[str], *, perturb: bool) -> None:
    """Row kernel vs column blocks of 23 (every row's positive, swept first as the ring sweeps its
    own block: ega's u needs s_pos), 5 and the rest, ega with masking (every branch)."""
    B, N = 23, 61
    g = torch.Generator().manual_seed(3)
    s_BN = (torch.rand(B, N, generator=g) * 2 - 1).float()
    row_ids = torch.randint(0, 9, (B,), generator=g)
    col_ids = torch.randint(0, 9, (N,), generator=g)
    col_ids[:B] = row_ids  # the positive of row i is column i
    common = {
        "mode": MODE_CODES["ega"],
        "inv_tau": 1 / TEMPERATURE,
        "ega_beta": 50.0,
        "ega_margin": 0.3,
        "row_ids": row_ids.data_ptr(),
        "num_threads": 1,
    }
    rows = {k: torch.empty(B) for k in ("lse", "loss", "z_pos", "s_pos", "ega_loss")}
    ds_row = s_BN.clone()
    _C.hardneg_loss_rows(
        _params(ds_row, rows, col_ids=col_ids.data_ptr(), need_grad=True, **common)
    )
    # fp64 truth of lse: positives at 1/tau, masked duplicates out.
    z = s_BN.double() / TEMPERATURE
    masked = (col_ids[None, :] == row_ids[:, None]) & ~torch.eye(B, N, dtype=torch.bool)
    lse_true = torch.logsumexp(z.masked_fill(masked, -math.inf), dim=1)

    run = {k: torch.full((B,), -math.inf) for k in ("run_max", "run_max_u")}
    run.update({k: torch.zeros(B) for k in ("run_sum", "run_sum_u")})
    run.update({k: torch.empty(B) for k in ("z_pos", "s_pos", "loss", "ega_loss")})
    bounds = [0, B, B + 5, N]
    ds_blocks = s_BN.clone()
    if perturb:
        common["inv_tau"] *= 1.001
    for c0, c1 in zip(bounds[:-1], bounds[1:], strict=False):
        block = {"pos_offset": -c0, "col_ids": col_ids[c0:].data_ptr()}
        _C.hardneg_loss_block_update(_params(ds_blocks[:, c0:c1], run, **block, **common))
    # The ring's finish: the loss (and ega's L_u) from z_pos and the negatives' (max, sum);
    # backward reads L_u.
    run["loss"].copy_(row_loss(run["z_pos"], run["run_max"], run["run_sum"]))
    run["ega_loss"].copy_(row_loss(run["z_pos"], run["run_max_u"], run["run_sum_u"]))
    for c0, c1 in zip(bounds[:-1], bounds[1:], strict=False):
        block = {"pos_offset": -c0, "col_ids": col_ids[c0:].data_ptr()}
        _C.hardneg_loss_block_grad(_params(ds_blocks[:, c0:c1], run, **block, **common))
    checks = {
        "row lse vs fp64": (rows["lse"].double() - lse_true).abs().max().item() < 1e-4,
        "block loss vs row": torch.allclose(run["loss"], rows["loss"], rtol=1e-5, atol=1e-6),
        "block L_u vs row": torch.allclose(run["ega_loss"], rows["ega_loss"], rtol=1e-5, atol=1e-6),
        "block s_pos vs row": torch.equal(run["s_pos"], rows["s_pos"]),
        "block dS vs row": torch.allclose(ds_blocks, ds_row, rtol=1e-5, atol=1e-6),
    }
    failures += [f"block kernels: {name}" for name, ok in checks.items() if not ok]


def check_exp(failures: list[str]) -> float:
    x = dense_grid()
    worst = ulp_error(hardneg_exp(x), x).max().item()
    if not worst < 1.5:
        failures.append(f"exp: max error {worst:.3f} ulp (bound 1.5)")
    special = hardneg_exp(torch.tensor([-math.inf, math.inf, math.nan, 0.0, -100.0, 89.0]))
    if not (special[0] == 0 and special[1] == math.inf and math.isnan(special[2])):
        failures.append(f"exp: special values {special.tolist()}")
    if not (special[3] == 1 and special[4] == 0 and special[5] == math.inf):
        failures.append(f"exp: 0, underflow, overflow gave {special[3:].tolist()}")
    # Same bits in the SIMD body and the tail: every element shifted by one lane.
    x = x[:100_003]
    if not torch.equal(hardneg_exp(x), hardneg_exp(torch.cat([x[:1], x]))[1:]):
        failures.append("exp: the vector body and the tail disagree")
    return worst


def check_round(failures: list[str]) -> None:
    for dtype in (torch.bfloat16, torch.float16):
        x = all_classes(dtype)
        got = hardneg_round(x, dtype)
        bad = mismatches(got, x, dtype)
        if bad:
            failures.append(f"round to {dtype}: {bad} values differ from torch's .to()")
        shifted = hardneg_round(torch.cat([x[:1], x]), dtype)[1:]
        if not torch.equal(got.view(torch.int16), shifted.view(torch.int16)):
            failures.append(f"round to {dtype}: the vector body and the tail disagree")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perturb", action="store_true", help="temperature 0.1%% off")
    args = parser.parse_args()
    torch.set_num_threads(1)
    failures: list[str] = []
    check_loss(failures, perturb=args.perturb)
    check_blocks(failures, perturb=args.perturb)
    worst = check_exp(failures)
    check_round(failures)
    info = hardneg.build_info()
    print(json.dumps({"cpu_isa": info["cpu_isa"], "failures": failures, "exp_max_ulp": worst}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
