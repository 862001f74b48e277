"""Two-GPU checks of the cross-device loss over NCCL, run by tools/gpu_check.sh under torchrun:

    torchrun --standalone --nproc_per_node=2 tools/gpu_ring_check.py

1. ring (hardneg's NCCL communicator) and allgather agree with each other and with the fp64
   reference for 100 iterations in a row (buffer, event and communicator reuse), bf16 and fp32;
2. the default process group destroyed and re-created: the next call builds a new communicator
   and still agrees (a dead one reused would hang or fail);
3. tensors on a device that is not the current one (rank r's tensors on cuda:r while the current
   device is the other GPU): the communicator and its events follow the tensors' device.
Prints one line per check and exits non-zero on the first failure (every rank raises).
"""

from __future__ import annotations

import os
import sys

import hardneg
import torch
import torch.distributed as dist


def _inputs(step: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(step)
    B, M, D = 96, 2, 256
    q = torch.nn.functional.normalize(
        torch.randn(2 * B, D, generator=g, dtype=torch.float64), dim=-1
    )
    t = torch.nn.functional.normalize(q + torch.randn_like(q), dim=-1)
    h = torch.nn.functional.normalize(torch.randn(2 * B, M, D, generator=g, dtype=q.dtype), dim=-1)
    ids = torch.arange(2 * B) % (B // 2)
    rank = dist.get_rank()
    sl = slice(rank * B, (rank + 1) * B)
    local = [x[sl].to(device=device, dtype=dtype) for x in (q, t, h)]
    return (q, t, h, ids), local, ids[sl].to(device)


def _run(strategy: str, local, ids, **kw) -> tuple[float, torch.Tensor]:
    leaves = [x.clone().requires_grad_() for x in local]
    loss = hardneg.fused_hardneg_loss(
        leaves[0], leaves[1], hard_negatives=leaves[2], target_ids=ids, symmetric=True,
        group=dist.group.WORLD, strategy=strategy, **kw,
    )  # fmt: skip
    loss.backward()
    return loss.item(), leaves[0].grad.float()


def check_iterations(device: torch.device, n: int = 100) -> None:
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for step in range(n):
            full, local, ids = _inputs(step, dtype, device)
            ring, dq_ring = _run("ring", local, ids, transport="nccl")
            gather, dq_gather = _run("allgather", local, ids)
            if step % 25 == 0:
                want = hardneg.hardneg_loss_reference(
                    full[0], full[1], hard_negatives=full[2], target_ids=full[3], symmetric=True
                ).item()
                assert abs(ring - want) <= tol * abs(want), (dtype, step, ring, want)
            assert abs(ring - gather) <= tol * abs(gather), (dtype, step, ring, gather)
            assert torch.allclose(dq_ring, dq_gather, rtol=tol, atol=tol * dq_gather.abs().max())
    print(f"rank {dist.get_rank()}: {n} iterations x 2 dtypes, ring == allgather == reference")


def main() -> int:
    rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    check_iterations(device)
    # 2. A destroyed and re-created default group gets a new communicator.
    dist.destroy_process_group()
    dist.init_process_group("nccl", device_id=device)
    check_iterations(device, n=5)
    print(f"rank {rank}: re-created group OK")
    # 3. Tensors on this rank's GPU while the current device is the other one.
    torch.cuda.set_device(1 - rank)
    _, local, ids = _inputs(7, torch.float32, device)
    ring, _ = _run("ring", local, ids, transport="nccl")
    torch.cuda.set_device(device)
    _, local, ids = _inputs(7, torch.float32, device)
    again, _ = _run("ring", local, ids, transport="nccl")
    assert abs(ring - again) <= 1e-6 * abs(again), (ring, again)
    print(f"rank {rank}: tensors on a non-current device OK")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
