"""torchrun entry of the simulated multi-node test: every rank runs a few ring_cases on gloo and
prints the sentinel line RING_MULTINODE_OK when its loss and gradients meet the error rule of
tests/loss_testing.py against the fp64 reference (ring_cases.check_result).

Launched as a file, it finds its helpers through PYTHONPATH (tests/distributed and tests/), which
test_ring_multinode.py sets for the torchrun it starts:

    PYTHONPATH=tests/distributed:tests torchrun --nnodes=2 --nproc_per_node=1 \\
        --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:PORT \\
        tests/distributed/ring_multinode_worker.py
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from ring_cases import Case, check_result, run_cases

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
        problems = []
        for result in run_cases(CASES, dist.group.WORLD):
            try:
                check_result(result)
            except AssertionError as e:
                problems.append(str(e))
        if not problems:
            print(f"RING_MULTINODE_OK rank={rank} node={os.environ.get('GROUP_RANK')}", flush=True)
        else:
            print(f"RING_MULTINODE_FAIL rank={rank}: {'; '.join(problems)}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
