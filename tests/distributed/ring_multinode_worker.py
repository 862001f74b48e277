"""torchrun entry of the simulated multi-node test: every rank runs a few ring_cases on gloo and
prints the sentinel line RING_MULTINODE_OK when its loss and gradients match the fp64 reference.

    torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:PORT \\
        tests/distributed/ring_multinode_worker.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ring_cases import Case, run_cases  # noqa: E402

TOL = 1e-4
CASES = [
    Case("llave", True, 3, True, "ring", "mean"),
    Case("ega", False, 2, True, "allgather", "sum"),
    Case("infonce", True, 0, False, "ring", "none", keep_logits_bytes=0, chunk_size=2),
]


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        worst = 0.0
        for r in run_cases(CASES, dist.group.WORLD):
            errs = r["errors"]
            for name, err in errs.items():
                if name == "wrong_layout" or name.startswith("fp32_reference_"):
                    continue
                worst = max(worst, err / max(TOL, 2 * errs[f"fp32_reference_{name}"]))
        if worst <= 1.0:
            print(f"RING_MULTINODE_OK rank={rank} node={os.environ.get('GROUP_RANK')}", flush=True)
        else:
            print(f"RING_MULTINODE_FAIL rank={rank} worst_error_over_bound={worst:.3g}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
