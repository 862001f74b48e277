"""What was built: build_info(), the CPU module always, the CUDA module whenever nvcc was there.

These run on every machine: a GPU is never needed to import hardneg or hardneg._C_cuda (the CUDA
runtime is linked statically; the driver is only needed when a kernel runs).
"""

from __future__ import annotations

import importlib
import shutil

import hardneg
import pytest
import torch
from hardneg import _build_config


def _cuda_expected() -> bool:
    """The CUDA module must exist when nvcc is on PATH and the build did not opt out."""
    return shutil.which("nvcc") is not None and _build_config.CUDA_REQUEST != "OFF"


def test_build_info_keys_and_types():
    info = hardneg.build_info()
    assert {"cpu", "cuda", "nccl", "version"} <= info.keys()
    for key in ("cpu", "cuda", "nccl"):
        assert isinstance(info[key], bool), f"build_info()[{key!r}] = {info[key]!r}"
    assert info["cpu"] is True
    assert isinstance(info["version"], str) and info["version"] == hardneg.__version__
    assert _build_config.CUDA_REQUEST in ("AUTO", "ON", "OFF")


def test_cpu_module_imports_and_exposes_kernels():
    c = importlib.import_module("hardneg._C")
    for name in ("hardneg_loss_rows", "hardneg_loss_block_update", "hardneg_loss_block_grad"):
        assert callable(getattr(c, name)), name
    params = c.HardnegLossParams()
    params.rows = 3
    assert params.rows == 3


def test_cuda_module_built_when_nvcc_present():
    if not _cuda_expected():
        pytest.skip(
            "no nvcc on PATH or the install was built with HARDNEG_CUDA=OFF "
            f"(CUDA_REQUEST={_build_config.CUDA_REQUEST!r}): no CUDA module is expected"
        )
    assert hardneg.build_info()["cuda"] is True, (
        "nvcc is on PATH and HARDNEG_CUDA was not OFF, yet the CUDA module was not built"
    )
    cu = importlib.import_module("hardneg._C_cuda")
    for name in ("hardneg_loss_rows", "hardneg_loss_block_update", "hardneg_loss_block_grad"):
        assert callable(getattr(cu, name)), name


def test_both_modules_load_in_one_process():
    if not hardneg.build_info()["cuda"]:
        pytest.skip("this install has no CUDA module (build_info()['cuda'] is False)")
    c = importlib.import_module("hardneg._C")
    cu = importlib.import_module("hardneg._C_cuda")
    # Each module registers its own (module-local) params class; neither shadows the other.
    assert type(c.HardnegLossParams()) is not type(cu.HardnegLossParams())
    cpu_params, cuda_params = c.HardnegLossParams(), cu.HardnegLossParams()
    cpu_params.cols, cuda_params.cols = 5, 9
    assert (cpu_params.cols, cuda_params.cols) == (5, 9)
    q, t = torch.randn(4, 16), torch.randn(4, 16)
    torch.testing.assert_close(
        hardneg.fused_hardneg_loss(q, t), hardneg.hardneg_loss_reference(q, t), rtol=1e-5, atol=0
    )


def test_cuda_kernels_report_errors_without_a_gpu():
    if not hardneg.build_info()["cuda"]:
        pytest.skip("this install has no CUDA module (build_info()['cuda'] is False)")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-driver error path cannot be exercised")
    cu = importlib.import_module("hardneg._C_cuda")
    params = cu.HardnegLossParams()
    cu.hardneg_loss_rows(params)  # an empty block launches nothing and touches no driver
    params.rows, params.cols, params.ld_s = 2, 3, 3
    params.s = 4096  # never dereferenced: the driver lookup fails first
    with pytest.raises(RuntimeError, match="hardneg CUDA error"):
        cu.hardneg_loss_rows(params)
