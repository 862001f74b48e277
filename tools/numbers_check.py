"""Bitwise fingerprint of the loss family's numbers, to prove a refactor changed none of them.

    python tools/numbers_check.py --save before.json      # on the old code
    python tools/numbers_check.py --compare before.json   # on the new code: exit 1 on any change

Every case runs the public `hardneg.fused_hardneg_loss` at fixed seeds on one thread and hashes
the bytes of the loss and of every input gradient. Single-process cases: every mode, symmetric or
not, hard negatives or not, id masking or not, every reduction, fp32 and bf16, a small chunk size.
Cross-device cases run in a 2-rank gloo world (uneven batches 5 and 9): ring and allgather, the
ring with and without kept logits, the same option product. The "emu-" cases repeat both in bf16
and fp16 on the low-precision GEMM path CUDA takes (hardneg._gemm.EMULATE_ON_CPU). Hashes only
compare runs of the same build on the same machine (the GEMM library's kernels depend on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import itertools
import json
import os
import socket
import sys
import tempfile

import hardneg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hardneg import _gemm

D = 24
M = 2
SIZES = (5, 9)  # rows per rank in the 2-rank world
LOW_PRECISION = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def _emulated():
    """The CUDA low-precision GEMM path (low-precision operands, fp32 S), run on the CPU."""
    _gemm.EMULATE_ON_CPU = True
    try:
        yield
    finally:
        _gemm.EMULATE_ON_CPU = False


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _inputs(seed: int, B: int, negatives: bool, ids: bool, dtype):
    g = torch.Generator().manual_seed(seed)
    q = _unit(torch.randn(B, D, generator=g)).to(dtype)
    t = _unit(q.float() + 0.7 * torch.randn(B, D, generator=g)).to(dtype)
    h = _unit(torch.randn(B, M, D, generator=g)).to(dtype) if negatives else None
    t_ids = torch.randint(0, max(2, B // 2), (B,), generator=g) if ids else None
    h_ids = torch.randint(0, max(2, B // 2), (B, M), generator=g) if ids and negatives else None
    return q, t, h, t_ids, h_ids


def _digest(loss, tensors) -> dict:
    h = hashlib.sha256()
    for x in (loss, *tensors):
        if x is not None:
            h.update(x.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return {"sha256": h.hexdigest(), "loss": float(loss.detach().double().sum())}


def _run(q, t, h, t_ids, h_ids, opts: dict, group=None) -> dict:
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (q, t, h)]
    kwargs = dict(opts)
    keep = kwargs.pop("keep_logits_bytes", None)
    if group is not None and keep is not None:
        if "keep_logits_bytes" in inspect.signature(hardneg.fused_hardneg_loss).parameters:
            kwargs["keep_logits_bytes"] = keep
        else:  # the layout before the public API reached the ring's options
            from hardneg.distributed.ring import ring_hardneg_loss as fn

            loss = fn(
                leaves[0],
                leaves[1],
                hard_negatives=leaves[2],
                target_ids=t_ids,
                hard_negative_ids=h_ids,
                group=group,
                keep_logits_bytes=keep,
                **{"alpha": hardneg.ALPHA, "ega_beta": hardneg.EGA_BETA, **_full(kwargs)},
            )
            return _backward(loss, leaves)
    loss = hardneg.fused_hardneg_loss(
        leaves[0],
        leaves[1],
        hard_negatives=leaves[2],
        target_ids=t_ids,
        hard_negative_ids=h_ids,
        group=group,
        **kwargs,
    )
    return _backward(loss, leaves)


def _full(kwargs: dict) -> dict:
    base = {"ega_margin": hardneg.EGA_MARGIN, "temperature": hardneg.TEMPERATURE}
    return {**base, **kwargs}


def _backward(loss, leaves) -> dict:
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape))
    return _digest(loss, [x.grad for x in leaves if x is not None])


def _option_product():
    for i, (mode, sym, neg, ids) in enumerate(
        itertools.product(("infonce", "llave", "ega"), (False, True), (False, True), (False, True))
    ):
        yield i, mode, sym, neg, ids, ("mean", "sum", "none")[i % 3]


def single_process_cases() -> dict:
    out = {}
    for i, mode, sym, neg, ids, reduction in _option_product():
        for dtype in (torch.float32, torch.bfloat16):
            opts = {"mode": mode, "symmetric": sym, "reduction": reduction}
            if mode == "ega":
                opts.update(ega_beta=3.0, ega_margin=0.1)
            if i % 4 == 0:
                opts["chunk_size"] = 3
            name = f"{mode}-{reduction}-sym{int(sym)}-neg{int(neg)}-ids{int(ids)}-{dtype}"
            out[name] = _run(*_inputs(i, 23, neg, ids, dtype), opts)
        for dtype in LOW_PRECISION:
            opts = {"mode": mode, "symmetric": sym, "reduction": reduction}
            if mode == "ega":
                opts.update(ega_beta=3.0, ega_margin=0.1)
            opts["chunk_size"] = (3, 7, None)[i % 3]  # None: the default, one chunk here
            name = f"emu-{mode}-{reduction}-sym{int(sym)}-neg{int(neg)}-ids{int(ids)}-{dtype}"
            with _emulated():
                out[name] = _run(*_inputs(200 + i, 23, neg, ids, dtype), opts)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = {}
    start = sum(SIZES[:rank])
    for i, mode, sym, neg, ids, reduction in _option_product():
        full = _inputs(100 + i, sum(SIZES), neg, ids, torch.float32)
        mine = [x[start : start + SIZES[rank]] if x is not None else None for x in full]
        for strategy, keep in (("ring", None), ("ring", 0), ("allgather", None)):
            opts = {"mode": mode, "symmetric": sym, "reduction": reduction, "strategy": strategy}
            if keep is not None:
                opts["keep_logits_bytes"] = keep
            name = f"{strategy}{'' if keep is None else '-keep0'}-{mode}-{reduction}"
            name += f"-sym{int(sym)}-neg{int(neg)}-ids{int(ids)}-rank{rank}"
            out[name] = _run(*mine, opts, group=dist.group.WORLD)
            for dtype in LOW_PRECISION:
                low = [x.to(dtype) if x is not None and x.is_floating_point() else x for x in mine]
                with _emulated():
                    opts_low = {**opts, "chunk_size": 2 + i % 3}  # chunk boundaries inside blocks
                    out[f"emu-{name}-{dtype}"] = _run(*low, opts_low, group=dist.group.WORLD)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def distributed_cases() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(port, out_dir), nprocs=2, join=True)
        out = {}
        for rank in range(2):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                out.update(json.load(f))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", help="write the fingerprints to this JSON file")
    g.add_argument("--compare", help="compare with fingerprints saved earlier")
    args = p.parse_args()
    torch.set_num_threads(1)
    numbers = {**single_process_cases(), **distributed_cases()}
    if args.save:
        with open(args.save, "w") as f:
            json.dump(numbers, f, indent=1, sort_keys=True)
        print(f"{len(numbers)} cases written to {args.save}")
        return 0
    with open(args.compare) as f:
        saved = json.load(f)
    changed = sorted(k for k in saved if numbers.get(k, {}).get("sha256") != saved[k]["sha256"])
    missing = sorted(set(saved) - set(numbers))
    for name in changed:
        new = numbers.get(name, {}).get("loss")
        print(f"CHANGED {name}: loss {saved[name]['loss']!r} -> {new!r}")
    print(f"{len(saved)} cases: {len(saved) - len(changed)} bitwise equal, {len(changed)} changed")
    return 1 if changed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
