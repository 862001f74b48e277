"""Loading of the compiled modules: _C (CPU) always, _C_cuda only when a CUDA tensor needs it."""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from hardneg import _C, _build_config


@functools.cache
def _cuda_module() -> ModuleType:
    if not _build_config.CUDA:
        raise RuntimeError(
            "hardneg was built without CUDA (nvcc was not found or HARDNEG_CUDA=OFF); "
            "reinstall with nvcc on PATH to use CUDA tensors"
        )
    from hardneg import _C_cuda

    return _C_cuda


def kernels_for(device: torch.device) -> ModuleType:
    """The module whose hardneg_loss_* kernels run on `device`."""
    if device.type == "cpu":
        return _C
    if device.type == "cuda":
        return _cuda_module()
    raise ValueError(f"hardneg has no kernels for device {device}; use a CPU or CUDA tensor")


def new_params(device: torch.device) -> object:
    params = kernels_for(device).HardnegLossParams()
    if device.type == "cuda":
        params.stream = torch.cuda.current_stream(device).cuda_stream
    else:
        params.num_threads = torch.get_num_threads()
    return params


def build_info() -> dict:
    """What this install was compiled with: {"cpu", "cuda", "nccl", "version", ...}."""
    return {
        "version": _build_config.VERSION,
        "cpu": True,
        "cuda": bool(_build_config.CUDA),
        "nccl": bool(_build_config.NCCL),
        "cuda_architectures": _build_config.CUDA_ARCHITECTURES if _build_config.CUDA else "",
        "cuda_compiler": _build_config.CUDA_COMPILER_VERSION if _build_config.CUDA else "",
        "cxx_compiler": _build_config.CXX_COMPILER,
    }
