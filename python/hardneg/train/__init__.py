"""Training: typed config, GradCache, atomic checkpoints, distributed helpers and the LLaVE trainer.

Entry point: recipes/train_llave.py (torchrun). Pieces:
  config       RunConfig dataclasses, YAML + dotted overrides, errors naming key and value
  gradcache    gradcache_step: chunked no-grad embedding, loss on cached embeddings, replay
  checkpoint   CheckpointManager: atomic save (temp dir + fsync + rename), keep-last-K, RNG state
  distributed  torchrun process group (gloo on CPU, nccl on GPU), rank helpers, reductions
  trainer      Trainer: Embedder + fused_hardneg_loss under DDP or DeepSpeed ZeRO-2/3, resume
  evaluate     evaluate_retrieval: P@1 against chance on an MMEB-eval style folder
"""

from hardneg.train.checkpoint import CheckpointManager
from hardneg.train.config import ConfigError, RunConfig, load_config, save_config
from hardneg.train.gradcache import EngineHooks, RngState, gradcache_step

__all__ = [
    "CheckpointManager",
    "ConfigError",
    "EngineHooks",
    "RngState",
    "RunConfig",
    "gradcache_step",
    "load_config",
    "save_config",
]
