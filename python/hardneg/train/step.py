"""One optimizer step: embed ChunkedCollate micro-batches, the loss, backward, the engine's step.

Gradient scale. With cross-device negatives the loss is the global loss, identical on every rank,
and each rank's backward yields d(global loss)/d(its local embeddings); the parameter gradient is
the SUM of those over ranks. DDP and DeepSpeed AVERAGE gradients over the K ranks, so the loss is
multiplied by K before backward. With rank-local losses the engine's average is already the mean
of the K losses, so no factor.

Gradient accumulation (train.grad_accum_steps = A): A micro-batches per step, each loss weighted
1/A, the engine's reduction (DDP no_sync, DeepSpeed's accumulation boundary) on the last backward of
the last micro-batch only: the update follows the mean of the A micro-batch losses' gradients.

GradCache (train.gradcache_chunk_size > 0) embeds chunk by chunk (hardneg.train.gradcache); every
rank runs as many forwards per stream as the rank with the most chunks. Without it, one forward of
each stream's single chunk and one backward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from hardneg import fused_hardneg_loss
from hardneg.data.collate import STREAMS, ChunkInputs
from hardneg.train import distributed as dist_util
from hardneg.train.config import LossConfig, RunConfig
from hardneg.train.engine import Engine
from hardneg.train.gradcache import EngineHooks, gradcache_step
from hardneg.train.metrics import embedding_stats


def batch_loss(embs: dict[str, Tensor], ids: dict, cfg: LossConfig, group) -> Tensor:
    """fused_hardneg_loss of one batch's embeddings {stream: (rows, D)} (hard negatives: B*M
    rows, M per query in order); ids {"target_ids": (B,), "hard_negative_ids": (B, M) | None}.

    cfg.mask_duplicate_targets: the ids go to the loss, which masks a candidate with the
    positive's id (a repeated target) as a false negative; false passes no ids, so duplicates
    stay negatives (LLaVE)."""
    q_BD, t_BD = embs["query"], embs["target"]
    h = embs.get("hard_negatives")
    B, D = q_BD.shape
    mask = cfg.mask_duplicate_targets
    return fused_hardneg_loss(
        q_BD,
        t_BD,
        hard_negatives=None if h is None else h.view(B, -1, D),
        target_ids=ids["target_ids"] if mask else None,
        hard_negative_ids=ids["hard_negative_ids"] if mask and h is not None else None,
        mode=cfg.mode,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        ega_beta=cfg.ega_beta,
        ega_margin=cfg.ega_margin,
        symmetric=cfg.symmetric,
        group=group,
    )


def autocast(cfg: RunConfig, device: torch.device) -> Callable[[], AbstractContextManager]:
    """The context every model forward runs in: bf16 autocast or nothing (the loss stays fp32)."""
    if cfg.train.precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def _encoder(model) -> Callable[[ChunkInputs], Tensor]:
    def encode(chunk: ChunkInputs) -> Tensor:
        emb = model(**chunk.inputs)
        if not chunk.extra_rows:
            return emb
        # A dummy image row (ChunkedCollate) joins the graph with weight 0: the loss and the
        # metrics see only real rows.
        keep = emb.shape[0] - chunk.extra_rows
        return emb[:keep] + 0.0 * emb[keep:].sum()

    return encode


def _micro_step(
    batch: dict,
    *,
    engine: Engine,
    cfg: RunConfig,
    device: torch.device,
    group,
    factor: float,
    last: bool,
) -> dict:
    """Forward, loss (times factor) and backward of one micro-batch; the engine reduces gradients
    only when `last`. Returns this rank's {"loss" (unscaled), "pos_sim", "hardest_neg_sim"}."""
    hard_ids = batch["hard_negative_ids"]
    ids = {
        "target_ids": batch["target_ids"].to(device),
        "hard_negative_ids": None if hard_ids is None else hard_ids.to(device),
    }
    streams = {
        name: [c[name].to(device) for c in batch["chunks"]]
        for name in STREAMS
        if batch["chunks"][0][name] is not None
    }
    hooks = engine.hooks
    if not last:
        hooks = EngineHooks(sync=lambda is_last: engine.hooks.sync(False), backward=hooks.backward)
    encode, forward_context = _encoder(engine.model), autocast(cfg, device)

    def loss_fn(embs):
        return batch_loss(embs, ids, cfg.loss, group) * factor

    if cfg.train.gradcache_chunk_size:
        # Every rank runs as many forwards per stream as the rank with the most chunks.
        counts = torch.tensor([len(streams[n]) for n in streams])
        counts = dist_util.all_reduce(counts, "max").tolist()
        loss, embs = gradcache_step(
            encode,
            streams,
            loss_fn,
            hooks=hooks,
            num_forwards=dict(zip(streams, counts, strict=True)),
            autocast=forward_context,
        )
    else:
        with hooks.sync(True):
            with forward_context():
                out = {n: encode(c[0]) for n, c in streams.items()}
            out = {n: e.float() for n, e in out.items()}
            loss = loss_fn(out)
            hooks.backward(loss)
        loss, embs = loss.detach(), {n: e.detach() for n, e in out.items()}
    stats = embedding_stats(
        embs["query"],
        embs["target"],
        embs.get("hard_negatives"),
        ids["target_ids"],
        ids["hard_negative_ids"],
    )
    return {"loss": float(loss) / factor, **stats}


def train_step(
    batches: list[dict], *, engine: Engine, cfg: RunConfig, device: torch.device, group
) -> dict:
    """One optimizer step over A = len(batches) micro-batches (train.grad_accum_steps): each
    one's loss is back-propagated with weight 1/A, so the update follows the mean of the
    micro-batch losses' gradients; the engine reduces gradients on the last backward only.
    Returns this rank's metrics averaged over the micro-batches. group: the loss's process group
    or None."""
    A = len(batches)
    # K when the loss is global and the engine averages gradients over K ranks, else 1.
    global_loss = group is not None and engine.averages_gradients
    scale = float(dist_util.world_size()) if global_loss else 1.0
    results = [
        _micro_step(
            batch, engine=engine, cfg=cfg, device=device, group=group, factor=scale / A,
            last=i == A - 1,
        )
        for i, batch in enumerate(batches)
    ]  # fmt: skip
    engine.step()
    return {key: sum(r[key] for r in results) / A for key in results[0]}
