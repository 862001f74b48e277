"""Training: typed config, GradCache, engines, atomic checkpoints, metrics and the LLaVE trainer.

Entry point: recipes/train_llave.py (torchrun). Pieces, bottom up:
  typed_yaml   YAML + dotted overrides checked into dataclasses; ConfigError names key and value
  config       RunConfig: every knob with why; load_config, check_paths, save_config
  distributed  torchrun process group (gloo on CPU, nccl on GPU), rank helpers, the collectives
               (tensors on the group's device)
  gradcache    gradcache_step: chunked no-grad embedding, loss on cached embeddings, replay
  engine       build_embedder, build_engine: DDP or DeepSpeed ZeRO-2/3 behind one Engine
  safe_state   training state as safetensors + JSON (nothing unpickled on load)
  checkpoint   CheckpointManager: atomic save, keep-last-K; engine + RNG state save / load
  metrics      embedding_stats of a batch; TensorBoard, tqdm bar and log lines
  step         train_step: one optimizer step (GradCache or not) with fused_hardneg_loss
  export       save_pretrained of the trained embedder; the module to evaluate
  trainer      Trainer: the loop, resume and export of a RunConfig
"""

from hardneg.train.checkpoint import CheckpointManager
from hardneg.train.config import ConfigError, RunConfig, load_config, save_config
from hardneg.train.gradcache import EngineHooks, RngState, gradcache_step
from hardneg.train.safe_state import CheckpointError

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "ConfigError",
    "EngineHooks",
    "RngState",
    "RunConfig",
    "gradcache_step",
    "load_config",
    "save_config",
]
