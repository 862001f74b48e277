"""The model and its engine: the Embedder of a RunConfig, wrapped for DDP or DeepSpeed ZeRO-2/3.

An `Engine` is what the training step needs from either: the module to call, how gradients are
reduced across GradCache chunks (EngineHooks), and one `step()` that clips, updates, schedules and
zeroes. DDP (or a plain module on one process) uses torch's AdamW and transformers' cosine schedule;
DeepSpeed builds its own optimizer from recipes/deepspeed/*.json with the "auto" entries filled in
from the run config, and is handed the same schedule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from hardneg.models import Embedder
from hardneg.train import distributed as dist_util
from hardneg.train.config import RunConfig
from hardneg.train.gradcache import EngineHooks


def build_embedder(cfg: RunConfig) -> Embedder:
    """The Embedder of cfg.model with frozen parts, LoRA and gradient checkpointing applied."""
    m = cfg.model
    dtype = getattr(torch, m.dtype)
    if m.name_or_path == "tiny":
        embedder = Embedder.tiny(seed=m.tiny_seed, prompt_format=m.prompt_format).to(dtype)
    else:
        config = {"prompt_format": m.prompt_format}
        embedder = Embedder.from_pretrained(m.name_or_path, dtype=dtype, config=config)
    if m.lora.enabled:
        embedder.add_lora(
            r=m.lora.r,
            alpha=m.lora.alpha,
            dropout=m.lora.dropout,
            target_modules=_lora_targets(m.lora.target_modules),
        )
        # LoRA freezes everything but the adapters; LLaVE trains the projector in full.
        for name, p in embedder.named_parameters():
            if "multi_modal_projector" in name:
                p.requires_grad_(True)
    if m.freeze_vision_tower:
        for name, p in embedder.named_parameters():
            if "vision_tower" in name:
                p.requires_grad_(False)
    if m.gradient_checkpointing:
        embedder.gradient_checkpointing_enable()
    embedder.train()
    return embedder


def _lora_targets(names: list[str]) -> str:
    # Only the language model's projections: SigLIP has q/k/v_proj too.
    return rf".*language_model.*\.({'|'.join(names)})"


def unwrap(model: nn.Module) -> nn.Module:
    """The Embedder inside a DDP module or a DeepSpeed engine."""
    return getattr(model, "module", model)


@dataclass
class Engine:
    """The model as the step sees it, plus how this engine reduces gradients and steps."""

    model: nn.Module  # DDP / DeepSpeed engine / plain Embedder: called as model(**inputs)
    hooks: EngineHooks
    step: Callable[[], None]  # clips, updates, schedules, zeroes the gradients
    lr: Callable[[], float]  # current learning rate
    optimizer: object
    scheduler: object
    is_deepspeed: bool
    averages_gradients: bool  # DDP and DeepSpeed average parameter gradients over ranks

    @property
    def is_zero3(self) -> bool:
        """ZeRO-3 shards every parameter: forwards are collective, saving needs a gather."""
        return self.is_deepspeed and self.model.zero_optimization_stage() == 3


def build_engine(cfg: RunConfig, embedder, device: torch.device, total_steps: int) -> Engine:
    """DDP (or the plain module on one process) or DeepSpeed, per cfg.train.engine."""
    t = cfg.train
    params = [p for p in embedder.parameters() if p.requires_grad]
    warmup = math.ceil(t.warmup_ratio * total_steps)

    def make_scheduler(optimizer):
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)

    if t.engine == "deepspeed":
        return _deepspeed_engine(cfg, embedder, params, device, make_scheduler)
    return _ddp_engine(cfg, embedder, params, device, make_scheduler)


def _ddp_engine(cfg, embedder, params, device, make_scheduler) -> Engine:
    t = cfg.train
    embedder.to(device)
    model = embedder
    world = dist_util.world_size()
    if world > 1:
        # find_unused_parameters: a chunk of text-only items never reaches the projector, so the
        # set of used parameters changes from chunk to chunk.
        model = nn.parallel.DistributedDataParallel(
            embedder,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    optimizer = torch.optim.AdamW(
        params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay
    )
    scheduler = make_scheduler(optimizer)

    def step():
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def sync(is_last: bool) -> AbstractContextManager:
        return model.no_sync() if world > 1 and not is_last else nullcontext()

    return Engine(
        model=model,
        hooks=EngineHooks(sync=sync),
        step=step,
        lr=lambda: scheduler.get_last_lr()[0],
        optimizer=optimizer,
        scheduler=scheduler,
        is_deepspeed=False,
        averages_gradients=world > 1,
    )


def deepspeed_config(cfg: RunConfig) -> dict:
    """recipes/deepspeed/*.json with its "auto" entries filled from the run config."""
    t = cfg.train
    ds = json.loads(Path(t.deepspeed_config).read_text())
    fill = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in fill.items():
        if ds.get(key) == "auto":
            ds[key] = value
    if ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = t.precision == "bf16" and torch.cuda.is_available()
    opt = ds.get("optimizer", {}).get("params", {})
    for key, value in (
        ("lr", t.lr),
        ("betas", list(t.adam_betas)),
        ("weight_decay", t.weight_decay),
    ):
        if opt.get(key) == "auto":
            opt[key] = value
    ds["train_batch_size"] = t.batch_size * dist_util.world_size()
    # The step marks DeepSpeed's accumulation boundary itself (set_gradient_accumulation_boundary
    # on the last backward of GradCache chunks and train.grad_accum_steps micro-batches), and
    # scales the losses itself: DeepSpeed's own accumulation stays at 1.
    ds["gradient_accumulation_steps"] = 1
    return ds


def _deepspeed_engine(cfg, embedder, params, device, make_scheduler) -> Engine:
    # Imported on use: DeepSpeed probes the accelerator and logs at import.
    import deepspeed

    from hardneg.train.deepspeed_checkpoint import use_safe_loading

    if device.type == "cpu":
        # DeepSpeed's CPU shared-memory allreduce is a C++ op JIT-compiled on first use (minutes);
        # gloo does the job for CPU runs.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=embedder,
        model_parameters=params,
        config=deepspeed_config(cfg),
        lr_scheduler=make_scheduler,
    )
    use_safe_loading(engine)

    def sync(is_last: bool) -> AbstractContextManager:
        # ZeRO reduces (and partitions) gradients only at an accumulation boundary.
        engine.set_gradient_accumulation_boundary(is_last)
        return nullcontext()

    return Engine(
        model=engine,
        hooks=EngineHooks(
            sync=sync, backward=lambda scalar: engine.backward(scalar, scale_wrt_gas=False)
        ),
        step=engine.step,
        lr=lambda: engine.get_lr()[0],
        optimizer=optimizer,
        scheduler=scheduler,
        is_deepspeed=True,
        averages_gradients=True,
    )
