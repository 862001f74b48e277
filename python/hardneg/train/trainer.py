"""The LLaVE training loop: data, engine, checkpoints and metrics of a RunConfig, step after step.

One optimizer step = `train.grad_accum_steps` per-rank micro-batches of `train.batch_size` queries
(each with its target and `data.num_hard_negatives` hard negatives), run by hardneg.train.step;
micro-batches left over at the end of an epoch are skipped. The loss is
hardneg.fused_hardneg_loss over the whole world's batch when `loss.cross_device` (every rank's
targets are every query's negatives, LLaVE's cross-device negatives), else over this rank's batch.

Data position. hardneg.data.TrainBatchSampler is a pure function of (seed, epoch): global batches of
K * batch_size indices, rank r taking the r-th slice of each (so the concatenation of the ranks'
batches is the global batch, in rank order). A checkpoint stores (epoch, micro-batches done, a
multiple of grad_accum_steps) and resume
starts the sampler there; the DataLoader has its own generator so creating it mid-epoch draws
nothing from the global RNG, and the restored RNG states replay the same dropout masks.

Pieces: engine.py (model + DDP / DeepSpeed), step.py (one step), checkpoint.py (save / resume),
metrics.py (TensorBoard, bar, log), export.py (the final save_pretrained).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hardneg.data import ChunkedCollate, MMEBTrainDataset, TrainBatchSampler, TrainCollator
from hardneg.train import checkpoint as ckpt
from hardneg.train import distributed as dist_util
from hardneg.train import engine as engine_mod
from hardneg.train import export, step
from hardneg.train.config import RunConfig, save_config
from hardneg.train.metrics import MetricsLog

log = logging.getLogger("hardneg.train")


class Trainer:
    """Builds everything from a RunConfig and runs (or resumes) the training loop."""

    def __init__(self, cfg: RunConfig, *, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = device or dist_util.pick_device()
        self.out = Path(cfg.train.output_dir)
        d, t = cfg.data, cfg.train
        torch.manual_seed(t.seed)
        self.embedder = engine_mod.build_embedder(cfg)
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
        steps_per_epoch = len(self.sampler) // t.grad_accum_steps
        if steps_per_epoch == 0:
            raise ValueError(
                f"data.root {d.root!r} has {len(self.dataset)} examples: not one optimizer step of "
                f"train.grad_accum_steps {t.grad_accum_steps} x train.batch_size {t.batch_size} x "
                f"{dist_util.world_size()} ranks"
            )
        self.collate = ChunkedCollate(
            TrainCollator(self.embedder, num_hard_negatives=d.num_hard_negatives),
            t.gradcache_chunk_size,
            image_in_every_chunk=t.engine == "deepspeed",
        )
        self.total_steps = t.max_steps or t.epochs * steps_per_epoch
        self.engine = engine_mod.build_engine(cfg, self.embedder, self.device, self.total_steps)
        self.checkpoints = ckpt.CheckpointManager(
            self.out / "checkpoints", keep_last=cfg.checkpoint.keep_last
        )
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0
        self.group = dist_util.loss_group() if cfg.loss.cross_device else None
        self.history: list[dict] = []

    def train_step(self, batches: list[dict] | dict) -> dict:
        """Forward, loss and backward of this rank's micro-batches (one batch, or the
        train.grad_accum_steps of one step), then the optimizer step."""
        batches = [batches] if isinstance(batches, dict) else batches
        return step.train_step(
            batches, engine=self.engine, cfg=self.cfg, device=self.device, group=self.group
        )

    # -- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self, *, write_hook=None) -> Path:
        """Atomic checkpoint of model, optimizer, scheduler, RNG and data position."""

        def write(tmp: Path) -> None:
            ckpt.save_training_state(tmp, self.engine)
            if write_hook is not None:
                write_hook(tmp)

        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": dist_util.world_size(),
        }
        return self.checkpoints.save(self.step, write, state)

    def load_checkpoint(self, path: Path) -> None:
        state = ckpt.read_state(path)
        if state["world_size"] != dist_util.world_size():
            raise ValueError(
                f"checkpoint {path} was written by {state['world_size']} ranks, this run has "
                f"{dist_util.world_size()}: the data position and RNG states would not match"
            )
        ckpt.load_training_state(path, self.engine, self.device)
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]

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
        cfg = self.cfg
        if dist_util.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        metrics_log = MetricsLog(
            self.out,
            total_steps=self.total_steps,
            initial_step=self.step,
            log_every=cfg.train.log_every,
            bar=cfg.train.progress_bar,
        )
        samples = cfg.train.batch_size * dist_util.world_size() * cfg.train.grad_accum_steps
        with metrics_log:
            while self.step < self.total_steps:
                micro: list[dict] = []
                for batch in self._loader():
                    micro.append(batch)
                    if len(micro) < cfg.train.grad_accum_steps:
                        continue
                    start = time.perf_counter()
                    metrics = self.train_step(micro)
                    self.step += 1
                    self.batch_in_epoch += len(micro)
                    metrics["lr"] = self.engine.lr()
                    metrics["samples_per_s"] = samples / (time.perf_counter() - start)
                    metrics["step"] = self.step
                    self.history.append(metrics)
                    metrics_log.record(self.step, metrics)
                    every = cfg.checkpoint.every_steps
                    if every and self.step % every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                    if self.step >= self.total_steps:
                        break
                    micro = []
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
        return self.history

    # -- after training ------------------------------------------------------------------

    def export(self) -> Path:
        """save_pretrained of the trained embedder (LoRA merged) into output_dir/final."""
        return export.export(self.engine, self.out / "final")

    def eval_embedder(self, final: Path):
        """The embedder to evaluate (see export.eval_embedder)."""
        return export.eval_embedder(self.engine, final, self.device)
