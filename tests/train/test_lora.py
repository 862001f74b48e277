"""LoRA + gradient checkpointing + bf16 autocast through the trainer: a step trains the adapters
and the projector only, and the export is a plain checkpoint with the adapters merged."""

from __future__ import annotations

import math

import torch
from hardneg.models import Embedder
from hardneg.train.config import load_config
from hardneg.train.engine import unwrap
from hardneg.train.trainer import Trainer


def test_lora_gradient_checkpointing_bf16(mmeb_train_dir, tmp_path):
    cfg = load_config(
        None,
        [
            "--data.root", str(mmeb_train_dir),
            "--model.lora.enabled", "true",
            "--model.lora.r", "4",
            "--model.gradient_checkpointing", "true",
            "--train.output_dir", str(tmp_path / "run"),
            "--train.batch_size", "8",
            "--train.gradcache_chunk_size", "4",
            "--train.max_steps", "2",
            "--train.lr", "1e-2",
            "--train.precision", "bf16",
            "--train.progress_bar", "false",
            "--checkpoint.every_steps", "0",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainable = [n for n, p in unwrap(trainer.engine.model).named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert all(math.isfinite(m["loss"]) for m in trainer.fit())
    path = trainer.export()

    exported = Embedder.from_pretrained(path).state_dict()
    assert not any("lora_" in k for k in exported)
    initial = Embedder.tiny(seed=0).state_dict()
    changed = {k for k in initial if not torch.equal(initial[k], exported[k])}
    # Adapters merged into the LM projections; the projector trained in full; nothing else moved.
    assert any("language_model" in k and "q_proj.weight" in k for k in changed)
    assert any("multi_modal_projector" in k for k in changed)
    assert all("language_model" in k or "multi_modal_projector" in k for k in changed)
    assert not any("vision_tower" in k or "embed_tokens" in k for k in changed)
