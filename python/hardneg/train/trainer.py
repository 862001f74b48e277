"""The LLaVE training loop: Embedder + hardness-weighted loss, DDP or DeepSpeed, GradCache, resume.

One optimizer step = one per-rank batch of `train.batch_size` queries (each with its target and
`data.num_negatives` hard negatives). The loss is hardneg.fused_hardneg_loss over the whole world's
batch when `loss.cross_device` (every rank's targets are every query's negatives, LLaVE's
cross-device negatives), else over this rank's batch.

Gradient scale. With cross-device negatives the loss is the global loss, identical on every rank,
and each rank's backward yields d(global loss)/d(its local embeddings); the parameter gradient is
the SUM of those over ranks. DDP and DeepSpeed AVERAGE gradients over the K ranks, so the loss is
multiplied by K before backward. With rank-local losses the engine's average is already the mean
of the K losses, so no factor.

Data position. hardneg.data.TrainBatchSampler is a pure function of (seed, epoch): global batches of
K * batch_size indices, rank r taking the r-th slice of each (so the concatenation of the ranks'
batches is the global batch, in rank order). A checkpoint stores (epoch, batches done) and resume
starts the sampler there; the DataLoader has its own generator so creating it mid-epoch draws
nothing from the global RNG, and the restored RNG states replay the same dropout masks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hardneg import fused_hardneg_loss
from hardneg.train import checkpoint as ckpt
from hardneg.train import distributed as dist_util
from hardneg.train.config import RunConfig, save_config, to_dict
from hardneg.train.gradcache import EngineHooks, gradcache_step, split_rows

log = logging.getLogger("hardneg.train")

STREAMS = ("query", "target", "negatives")


# ---------------------------------------------------------------------------------------------
# Data: a collator that cuts the batch into GradCache chunks
# ---------------------------------------------------------------------------------------------


@dataclass
class ChunkInputs:
    """Model inputs of one chunk of one stream; the last extra_rows rows are a dummy image item
    whose embedding is not part of the batch."""

    inputs: dict[str, Tensor]
    extra_rows: int = 0


class ChunkedCollate:
    """Examples -> {"chunks": [{stream: ChunkInputs} per chunk of chunk_size examples],
    "target_ids" (B,), "negative_ids" (B, M) | None}. chunk_size 0 keeps one chunk.

    image_in_every_chunk: a stream chunk without any image gets one dummy image item appended
    (M for the negatives stream). DeepSpeed needs it: ZeRO-3 gathers parameters module by module
    in every forward, and ZeRO-2 reduces gradient buckets in every backward, so every rank must
    call the same modules (vision tower, projector) in every forward; a text-only chunk would skip
    them. (DDP needs no such thing: find_unused_parameters covers it.) The dummy row's embedding
    enters the graph with weight 0, so its parameters get zero gradients on every rank."""

    def __init__(self, collator, chunk_size: int, *, image_in_every_chunk: bool = False) -> None:
        from PIL import Image

        self.collator = collator
        self.chunk_size = chunk_size
        self.image_in_every_chunk = image_in_every_chunk
        dummy = {"text": None, "image": Image.new("RGB", (32, 32))}
        M = collator.num_negatives
        self.dummy_example = {
            "query": dummy,
            "target": dummy,
            "negatives": [dummy] * M,
            "target_id": -1,
            "negative_ids": [-1] * M,
            "subset": "",
        }

    def _chunk(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        out = {n: None if batch[n] is None else ChunkInputs(batch[n]) for n in STREAMS}
        text_only = [n for n in STREAMS if batch[n] is not None and "pixel_values" not in batch[n]]
        if self.image_in_every_chunk and text_only:
            padded = self.collator([*examples, self.dummy_example])
            for n in text_only:
                rows = 1 if n != "negatives" else self.collator.num_negatives
                out[n] = ChunkInputs(padded[n], extra_rows=rows)
        out["target_ids"], out["negative_ids"] = batch["target_ids"], batch["negative_ids"]
        return out

    def __call__(self, examples: list[dict]) -> dict:
        size = self.chunk_size or len(examples)
        chunks = [self._chunk(examples[s]) for s in split_rows(len(examples), size)]
        neg = [c["negative_ids"] for c in chunks]
        return {
            "chunks": chunks,
            "target_ids": torch.cat([c["target_ids"] for c in chunks]),
            "negative_ids": None if neg[0] is None else torch.cat(neg),
        }


# ---------------------------------------------------------------------------------------------
# Model and engine
# ---------------------------------------------------------------------------------------------


def build_embedder(cfg: RunConfig):
    """The Embedder of cfg.model with frozen parts, LoRA and gradient checkpointing applied."""
    from hardneg.models import Embedder

    m = cfg.model
    dtype = getattr(torch, m.dtype)
    if m.name_or_path == "tiny":
        embedder = Embedder.tiny(seed=m.tiny_seed).to(dtype)
    else:
        embedder = Embedder.from_pretrained(m.name_or_path, dtype=dtype)
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


def build_engine(cfg: RunConfig, embedder, device: torch.device, total_steps: int) -> Engine:
    from transformers import get_cosine_schedule_with_warmup

    t = cfg.train
    params = [p for p in embedder.parameters() if p.requires_grad]
    warmup = math.ceil(t.warmup_ratio * total_steps)

    def make_scheduler(optimizer):
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)

    if t.engine == "deepspeed":
        return _deepspeed_engine(cfg, embedder, params, device, make_scheduler)

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
    ds["gradient_accumulation_steps"] = 1  # GradCache, not accumulation, makes big batches
    return ds


def _deepspeed_engine(cfg, embedder, params, device, make_scheduler) -> Engine:
    import deepspeed

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


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------


def _to_device(chunk: ChunkInputs, device) -> ChunkInputs:
    inputs = {k: v.to(device, non_blocking=True) for k, v in chunk.inputs.items()}
    return ChunkInputs(inputs, chunk.extra_rows)


def similarity_stats(q_BD: Tensor, t_BD: Tensor, h_ND: Tensor | None, ids: dict) -> dict:
    """Mean positive cosine and mean hardest-negative cosine over this rank's batch (in-batch
    targets and explicit negatives as candidates, false negatives excluded)."""
    c_ND = t_BD if h_ND is None else torch.cat([t_BD, h_ND])
    s_BN = q_BD @ c_ND.T
    B = q_BD.shape[0]
    neg_BN = torch.ones_like(s_BN, dtype=torch.bool)
    neg_BN[torch.arange(B), torch.arange(B)] = False
    cand_ids = ids["target_ids"]
    if h_ND is not None and ids["negative_ids"] is not None:
        cand_ids = torch.cat([cand_ids, ids["negative_ids"].reshape(-1)])
    neg_BN &= cand_ids[None, :] != ids["target_ids"][:, None]
    pos = s_BN.diagonal().mean()
    hardest = s_BN.masked_fill(~neg_BN, -2.0).max(dim=1).values
    valid = neg_BN.any(dim=1)
    hard = hardest[valid].mean() if bool(valid.any()) else torch.tensor(float("nan"))
    return {"pos_sim": float(pos), "hardest_neg_sim": float(hard)}


class Trainer:
    """Builds everything from a RunConfig and runs (or resumes) the training loop."""

    def __init__(self, cfg: RunConfig, *, device: torch.device | None = None) -> None:
        from hardneg.data import MMEBTrainDataset, TrainBatchSampler, TrainCollator

        self.cfg = cfg
        self.device = device or dist_util.pick_device()
        self.out = Path(cfg.train.output_dir)
        d, t = cfg.data, cfg.train
        torch.manual_seed(t.seed)
        self.embedder = build_embedder(cfg)
        self.dataset = MMEBTrainDataset(
            d.root,
            subsets=d.subsets or None,
            caps=d.cap_per_subset or None,
            weights=d.weights or None,
            image_root=d.image_root or None,
            on_missing_image=d.on_missing_image,
            seed=t.seed,
        )
        self.sampler = TrainBatchSampler(
            self.dataset,
            t.batch_size,
            same_subset=d.same_subset,
            seed=t.seed,
            num_replicas=dist_util.world_size(),
            rank=dist_util.rank(),
        )
        steps_per_epoch = len(self.sampler)
        if steps_per_epoch == 0:
            raise ValueError(
                f"data.root {d.root!r} has {len(self.dataset)} examples: not one global batch of "
                f"train.batch_size {t.batch_size} x {dist_util.world_size()} ranks"
            )
        self.collate = ChunkedCollate(
            TrainCollator(self.embedder, num_negatives=d.num_negatives),
            t.gradcache_chunk_size,
            image_in_every_chunk=t.engine == "deepspeed",
        )
        self.total_steps = t.max_steps or t.epochs * steps_per_epoch
        self.engine = build_engine(cfg, self.embedder, self.device, self.total_steps)
        self.checkpoints = ckpt.CheckpointManager(
            self.out / "checkpoints", keep_last=cfg.checkpoint.keep_last
        )
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0
        self.group = dist_util.loss_group() if cfg.loss.cross_device else None
        self.history: list[dict] = []

    # -- one optimizer step --------------------------------------------------------------

    def _autocast(self) -> AbstractContextManager:
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _loss(self, embs: dict[str, Tensor], ids: dict) -> Tensor:
        L = self.cfg.loss
        q_BD, t_BD = embs["query"], embs["target"]
        h = embs.get("negatives")
        B, D = q_BD.shape
        loss = fused_hardneg_loss(
            q_BD,
            t_BD,
            hard_negatives=None if h is None else h.view(B, -1, D),
            target_ids=ids["target_ids"],
            hard_negative_ids=None if h is None else ids["negative_ids"],
            mode=L.mode,
            temperature=L.temperature,
            alpha=L.alpha,
            ega_beta=L.ega_beta,
            ega_margin=L.ega_margin,
            symmetric=L.symmetric,
            group=self.group,
        )
        return loss

    def _grad_scale(self) -> float:
        """K when the loss is global and the engine averages gradients over K ranks, else 1."""
        if self.group is not None and self.engine.averages_gradients:
            return float(dist_util.world_size())
        return 1.0

    def train_step(self, batch: dict) -> dict:
        """Forward, loss and backward of one per-rank batch, then the optimizer step."""
        ids = {
            "target_ids": batch["target_ids"].to(self.device),
            "negative_ids": None
            if batch["negative_ids"] is None
            else batch["negative_ids"].to(self.device),
        }
        streams = {
            name: [_to_device(c[name], self.device) for c in batch["chunks"]]
            for name in STREAMS
            if batch["chunks"][0][name] is not None
        }
        # Metrics and the loss see only real rows: a dummy row (ChunkedCollate) joins the graph
        # with weight 0.
        scale = self._grad_scale()
        model = self.engine.model

        def loss_fn(embs):
            return self._loss(embs, ids) * scale

        def encode(chunk: ChunkInputs) -> Tensor:
            emb = model(**chunk.inputs)
            if not chunk.extra_rows:
                return emb
            keep = emb.shape[0] - chunk.extra_rows
            return emb[:keep] + 0.0 * emb[keep:].sum()

        if self.cfg.train.gradcache_chunk_size:
            # Every rank runs as many forwards per stream as the rank with the most chunks.
            counts = torch.tensor([len(streams[n]) for n in streams])
            counts = dist_util.all_reduce(counts, "max").tolist()
            loss, embs = gradcache_step(
                encode,
                streams,
                loss_fn,
                hooks=self.engine.hooks,
                num_forwards=dict(zip(streams, counts, strict=True)),
                autocast=self._autocast,
            )
        else:
            with self.engine.hooks.sync(True):
                with self._autocast():
                    out = {n: encode(c[0]) for n, c in streams.items()}
                out = {n: e.float() for n, e in out.items()}
                loss = loss_fn(out)
                self.engine.hooks.backward(loss)
            loss, embs = loss.detach(), {n: e.detach() for n, e in out.items()}
        self.engine.step()
        stats = similarity_stats(embs["query"], embs["target"], embs.get("negatives"), ids)
        return {"loss": float(loss) / scale, **stats}

    # -- checkpoints ---------------------------------------------------------------------

    def _state(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": dist_util.world_size(),
        }

    def save_checkpoint(self, *, write_hook=None) -> Path:
        """Atomic checkpoint of model, optimizer, scheduler, RNG and data position."""

        def write(tmp: Path) -> None:
            if self.engine.is_deepspeed:
                self.engine.model.save_checkpoint(
                    str(tmp / "deepspeed"), tag="state", save_latest=False
                )
            elif dist_util.is_main():
                from safetensors.torch import save_model

                save_model(unwrap(self.engine.model), str(tmp / "model.safetensors"))
                torch.save(self.engine.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.engine.scheduler.state_dict(), tmp / "scheduler.pt")
            ckpt.save_rng(tmp)
            if write_hook is not None:
                write_hook(tmp)

        return self.checkpoints.save(self.step, write, self._state())

    def load_checkpoint(self, path: Path) -> None:
        state = ckpt.read_state(path)
        if state["world_size"] != dist_util.world_size():
            raise ValueError(
                f"checkpoint {path} was written by {state['world_size']} ranks, this run has "
                f"{dist_util.world_size()}: the data position and RNG states would not match"
            )
        if self.engine.is_deepspeed:
            self.engine.model.load_checkpoint(
                str(path / "deepspeed"),
                tag="state",
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        else:
            from safetensors.torch import load_model

            load_model(
                unwrap(self.engine.model), str(path / "model.safetensors"), device=str(self.device)
            )
            # Our own files (optimizer / scheduler state dicts hold plain Python values).
            self.engine.optimizer.load_state_dict(
                torch.load(path / "optimizer.pt", weights_only=False)
            )
            self.engine.scheduler.load_state_dict(
                torch.load(path / "scheduler.pt", weights_only=False)
            )
        self.step, self.epoch, self.batch_in_epoch = (
            state["step"],
            state["epoch"],
            state["batch_in_epoch"],
        )
        ckpt.load_rng(path)

    def resume(self, spec: str) -> bool:
        """spec: "auto" (latest checkpoint under output_dir, if any), "" / "none", or a path."""
        if spec in ("", "none"):
            return False
        path = self.checkpoints.latest() if spec == "auto" else Path(spec)
        if path is None:
            return False
        if not (path / ckpt.STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume {spec}: {path} is not a complete checkpoint")
        self.load_checkpoint(path)
        if dist_util.is_main():
            log.info("resumed from %s at step %d", path, self.step)
        return True

    # -- the loop ------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        self.sampler.load_state_dict({"epoch": self.epoch, "position": self.batch_in_epoch})
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collate,
            num_workers=self.cfg.data.num_workers,
            # Its own generator: creating a loader (at resume, mid-epoch) must not draw from the
            # global RNG, or the dropout masks after a resume would differ.
            generator=torch.Generator().manual_seed(self.cfg.train.seed + self.epoch),
            persistent_workers=False,
        )

    def fit(self) -> list[dict]:
        """Train until total_steps; returns the per-step metrics of this process."""
        cfg, main = self.cfg, dist_util.is_main()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"))
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (main and cfg.train.progress_bar),
            desc="train",
        )
        global_batch = cfg.train.batch_size * dist_util.world_size()
        try:
            while self.step < self.total_steps:
                for batch in self._loader():
                    start = time.perf_counter()
                    metrics = self.train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    metrics["lr"] = self.engine.lr()
                    metrics["samples_per_s"] = global_batch / (time.perf_counter() - start)
                    metrics["step"] = self.step
                    self.history.append(metrics)
                    self._log(metrics, writer, bar)
                    every = cfg.checkpoint.every_steps
                    if every and self.step % every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                    if self.step >= self.total_steps:
                        break
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return self.history

    def _log(self, metrics: dict, writer, bar) -> None:
        keys = ("loss", "pos_sim", "hardest_neg_sim")
        mean = dist_util.all_reduce(torch.tensor([metrics[k] for k in keys]), "mean").tolist()
        metrics.update({f"global_{k}": v for k, v in zip(keys, mean, strict=True)})
        if writer is None:
            return
        for k in keys:
            writer.add_scalar(f"train/{k}", metrics[f"global_{k}"], self.step)
        writer.add_scalar("train/lr", metrics["lr"], self.step)
        writer.add_scalar("train/samples_per_s", metrics["samples_per_s"], self.step)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['global_loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps:
            log.info(
                "step %d/%d loss %.4f pos %.3f hardest-neg %.3f lr %.2e %.1f samples/s",
                self.step,
                self.total_steps,
                metrics["global_loss"],
                metrics["global_pos_sim"],
                metrics["global_hardest_neg_sim"],
                metrics["lr"],
                metrics["samples_per_s"],
            )

    # -- export --------------------------------------------------------------------------

    def eval_embedder(self, final: Path):
        """The embedder to evaluate: the live module, or under ZeRO-3 (whose forwards are
        collective and would need the same number of batches on every rank) the export."""
        if self.engine.is_deepspeed and self.engine.model.zero_optimization_stage() == 3:
            from hardneg.models import Embedder

            return Embedder.from_pretrained(final).to(self.device)
        return unwrap(self.engine.model)

    def export(self) -> Path:
        """save_pretrained of the trained embedder (LoRA merged) into output_dir/final."""
        path = self.out / "final"
        embedder = unwrap(self.engine.model)
        if self.engine.is_deepspeed and self.engine.model.zero_optimization_stage() == 3:
            import deepspeed

            # ZeRO-3 holds a shard of every parameter per rank: gather them for the save.
            with deepspeed.zero.GatheredParameters(list(embedder.parameters()), modifier_rank=0):
                if dist_util.is_main():
                    embedder.save_pretrained(path)
        elif dist_util.is_main():
            embedder.save_pretrained(path)
        dist_util.barrier()
        return path


def ensure_synthetic_data(cfg: RunConfig) -> None:
    """Generate the synthetic set into data.root's parent when data.synthetic asks for it and
    data.root does not exist yet (call on one rank)."""
    syn = cfg.data.synthetic
    root = Path(cfg.data.root)
    if not syn.generate_if_missing or root.exists():
        return
    log.info("generating the synthetic data set (%d pairs) into %s", syn.n, root.parent)
    cmd = [sys.executable, "-m", "hardneg.data.synthetic", "--out", str(root.parent)]
    subprocess.run([*cmd, "--n", str(syn.n)], check=True)


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file + os.replace) on rank 0."""
    if not dist_util.is_main():
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


__all__ = [
    "ChunkedCollate",
    "Engine",
    "Trainer",
    "build_embedder",
    "build_engine",
    "deepspeed_config",
    "similarity_stats",
    "to_dict",
    "unwrap",
    "write_json",
]
