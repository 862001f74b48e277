"""The trained embedder out of its engine: save_pretrained into a folder, and the module to score.

Under ZeRO-3 every rank holds a shard of every parameter, so the export gathers them first, and the
evaluation reloads the export: ZeRO-3 forwards are collective, which sharded evaluation (different
batches per rank) cannot promise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hardneg.models import Embedder
from hardneg.train import distributed as dist_util
from hardneg.train.engine import Engine, unwrap


def export(engine: Engine, path: Path) -> Path:
    """save_pretrained of the trained embedder (LoRA merged) into path on rank 0; every rank
    calls it (the ZeRO-3 gather and the closing barrier are collective)."""
    embedder = unwrap(engine.model)
    if engine.is_zero3:
        import deepspeed  # imported on use: only DeepSpeed runs need it

        with deepspeed.zero.GatheredParameters(list(embedder.parameters()), modifier_rank=0):
            if dist_util.is_main():
                embedder.save_pretrained(path)
    elif dist_util.is_main():
        embedder.save_pretrained(path)
    dist_util.barrier()
    return path


def eval_embedder(engine: Engine, final: Path, device: torch.device) -> Embedder:
    """The live embedder, or under ZeRO-3 the export at `final` loaded on device."""
    if engine.is_zero3:
        return Embedder.from_pretrained(final).to(device)
    return unwrap(engine.model)
