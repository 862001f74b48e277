"""Loading of the compiled modules: _C (CPU) always, _C_cuda only when a CUDA tensor needs it.

The CPU kernels come in ISA variants picked at run time from CPUID (cmake/cpu.cmake): the portable
build has "avx512", "avx2" and "baseline" on x86-64. The environment variable HARDNEG_CPU_ISA
forces one ("auto" or unset: the best this CPU runs), read once when hardneg is imported.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from hardneg import _C, _build_config

CPU_ISA_ENV = "HARDNEG_CPU_ISA"


def _select_cpu_isa() -> None:
    """Apply HARDNEG_CPU_ISA; ValueError naming the variable, its value and the variants that
    run here when the build lacks that variant or this CPU cannot run it."""
    forced = os.environ.get(CPU_ISA_ENV, "").strip().lower()
    if forced in ("", "auto"):
        return
    try:
        _C.set_cpu_isa(forced)
    except ValueError as err:
        raise ValueError(f"{CPU_ISA_ENV}={forced!r}: {err}") from None


_select_cpu_isa()


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
    """What this install was compiled with: {"cpu", "cuda", "nccl", "version", ...}.

    For the CUDA module: "cuda_runtime" is None (it links no CUDA runtime: the driver API is
    resolved from libcuda.so.1 at run time); "cuda_driver_min" is the oldest driver, as the CUDA
    version it supports ("11.8"), that runs the kernels (by JIT of the embedded PTX);
    "cuda_driver_min_sass" the oldest that loads the prebuilt cubins without JIT ("12.0" when they
    come from a CUDA 12 ptxas); "cuda_ptx_isa" the PTX ISA per architecture ("80:7.0,90:7.8").
    For the CPU module: "cpu_arch" is the build's HARDNEG_CPU_ARCH ("portable", or the -march
    value of a one-variant build such as "native"); "cpu_isa" the variant of the CPU kernels
    running in this process ("avx512", "avx2", "baseline", or the -march value; "none" when this
    CPU runs none of them).
    """
    cuda = bool(_build_config.CUDA)
    return {
        "version": _build_config.VERSION,
        "cpu": True,
        "cpu_arch": _build_config.CPU_ARCH,
        "cpu_isa": _C.cpu_isa(),
        "cuda": cuda,
        "nccl": bool(_build_config.NCCL),
        "cuda_architectures": _build_config.CUDA_ARCHITECTURES if cuda else "",
        "cuda_compiler": _build_config.CUDA_COMPILER_VERSION if cuda else "",
        "cuda_runtime": None,
        "cuda_driver_min": _build_config.CUDA_DRIVER_MIN if cuda else "",
        "cuda_driver_min_sass": _build_config.CUDA_DRIVER_MIN_SASS if cuda else "",
        "cuda_ptx_isa": _build_config.CUDA_PTX_ISA if cuda else "",
        "cuda_cubin_ptxas": _build_config.CUDA_CUBIN_PTXAS if cuda else "",
        "cxx_compiler": _build_config.CXX_COMPILER,
    }
