"""DeepSpeed's checkpoint files read with torch.load(weights_only=True) instead of a full unpickle.

engine.save_checkpoint writes torch.save pickles (mp_rank_*_model_states.pt,
zero_pp_rank_*_optim_states.pt), and DeepSpeed's own TorchCheckpointEngine.load reads them back
with a full unpickle, weights_only off (deepspeed 0.19: runtime/checkpoint_engine/
torch_checkpoint_engine.py), which runs whatever code a tampered file carries. The engine's
load_checkpoint reads every file through engine.checkpoint_engine, so hardneg swaps in
`SafeTorchCheckpointEngine`: saving is unchanged, loading allows tensors, plain data and the few
plain DeepSpeed types the ZeRO-2/3 files hold (their loss scaler, the ZeRO stage enum, fragment
addresses); any other object is refused with CheckpointError naming the file.
"""

from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from hardneg.train.safe_state import CheckpointError

# Data-only classes found in DeepSpeed's ZeRO-2/3 checkpoint files: their state is attributes,
# restored without calling any code of the file's choosing.
SAFE_DEEPSPEED_TYPES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path, map_location=None):
    """torch.load(path, weights_only=True) with SAFE_DEEPSPEED_TYPES allowed; CheckpointError
    naming the file when it holds anything else."""
    try:
        with torch.serialization.safe_globals(SAFE_DEEPSPEED_TYPES):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line for line in str(err).splitlines() if "GLOBAL" in line), str(err))
        raise CheckpointError(
            f"{path} holds a pickled object that is not plain data ({reason.strip()}): refusing "
            "to load it, since unpickling it could run code"
        ) from err


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine whose load is load_weights_only."""

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location=map_location)


def use_safe_loading(engine) -> None:
    """Replace a DeepSpeed engine's TorchCheckpointEngine by SafeTorchCheckpointEngine."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(
            f"DeepSpeed checkpoint engine {type(current).__name__} is not supported: hardneg "
            "loads DeepSpeed checkpoints through torch.load(weights_only=True) and needs the torch "
            "checkpoint engine (remove the checkpoint engine settings from the DeepSpeed JSON)"
        )
    # Built as DeepSpeed builds its own (create_checkpoint_engine: TorchCheckpointEngine(config)).
    engine.checkpoint_engine = SafeTorchCheckpointEngine(config_params=engine._config)
