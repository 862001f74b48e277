"""hardneg's NCCL communicator and the ring over NCCL.

The bootstrap (the loaded NCCL's version, a fresh ncclUniqueId) needs no GPU: it runs wherever
hardneg was built with NCCL (build_info()["nccl"]). The ring over NCCL (torch.distributed's
transport and hardneg's own communicator) runs the gloo cases on CUDA tensors and is skipped, with
the reason, unless at least 2 GPUs exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hardneg
import pytest
import torch
import torch.multiprocessing as mp
from hardneg.distributed.transport import nccl_module
from ring_cases import Case, check_result, free_port, spawn_worker

needs_nccl_build = pytest.mark.skipif(
    not hardneg.build_info()["nccl"],
    reason="hardneg was built without its NCCL communicator (no CUDA or no nccl.h at build time)",
)


def _loaded_nccl_copies() -> set[str]:
    maps = Path("/proc/self/maps").read_text().splitlines()
    return {line.split()[-1] for line in maps if "libnccl.so" in line}


@needs_nccl_build
def test_bootstrap_without_a_gpu():
    cu = nccl_module()
    version = cu.nccl_version()
    # NCCL codes are major * 10000 + minor * 100 + patch since 2.9.
    assert version >= 20900, version
    major, minor = version // 10000, version // 100 % 100
    assert major == 2 and minor >= 9, version
    uid_a, uid_b = cu.nccl_unique_id(), cu.nccl_unique_id()
    assert isinstance(uid_a, bytes) and len(uid_a) == 128
    assert uid_a != uid_b, "two unique ids must differ"
    # Opened by soname: one copy of libnccl in the process, the one the loader resolved.
    assert len(_loaded_nccl_copies()) == 1, _loaded_nccl_copies()


@needs_nccl_build
def test_communicator_rejects_bad_arguments():
    cu = nccl_module()
    with pytest.raises(ValueError, match="unique_id must be 128 bytes, got 3"):
        cu.NcclComm(b"abc", 2, 0, 0)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, nranks = 2\)"):
        cu.NcclComm(cu.nccl_unique_id(), 2, 2, 0)


NCCL_CASES = [
    Case(mode, sym, m, ids, strategy, reduction, transport=transport, seed=i)
    for i, (mode, sym, m, ids, strategy, reduction, transport) in enumerate(
        [
            ("llave", False, 3, True, "ring", "mean", "torch"),
            ("llave", True, 3, True, "ring", "mean", "nccl"),
            ("ega", True, 2, True, "ring", "none", "nccl"),
            ("infonce", False, 0, False, "ring", "sum", "nccl"),
            ("llave", True, 3, True, "allgather", "mean", "auto"),
        ]
    )
] + [Case("llave", True, 2, True, "ring", "mean", keep_logits_bytes=0, transport="nccl")]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL ring needs at least 2 GPUs")
def test_ring_over_nccl_matches_the_reference(tmp_path):
    needs_own = any(c.transport == "nccl" for c in NCCL_CASES)
    if needs_own and not hardneg.build_info()["nccl"]:
        pytest.skip("hardneg was built without its NCCL communicator")
    mp.spawn(
        spawn_worker,
        args=(2, free_port(), NCCL_CASES, str(tmp_path), "nccl"),
        nprocs=2,
        join=True,
    )
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        seen = 0
        for r in results:
            if "case" not in r:
                continue
            seen += 1
            check_result(r)
        assert seen == len(NCCL_CASES), f"rank {rank} reported {seen} of {len(NCCL_CASES)} cases"
    assert os.path.exists(tmp_path / "rank1.json")
