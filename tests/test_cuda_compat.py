"""tools/check_cuda_compat.py: the CUDA module needs no CUDA runtime and no newer driver than
torch's CUDA 12 line (r525+), checked on the built shared object; and the checker's parts."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import hardneg
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "check_cuda_compat", ROOT / "tools/check_cuda_compat.py"
)
compat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compat)


def _cubin_header(abi: int) -> bytes:
    header = bytearray(b"\x7fELF" + bytes(16))
    header[8] = abi
    header[18:20] = compat.EM_CUDA.to_bytes(2, "little")
    return bytes(header)


def test_embedded_images_are_found():
    data = b"junk\n.version 7.8\n.target sm_90\n" + _cubin_header(7) + b"\x7fELF" + bytes(16)
    ptx, abis = compat.embedded_images(data)
    assert ptx == [(7, 8)]
    assert abis == [7], "only CUDA ELF images count (the second header is not EM_CUDA)"


def test_ptx_isa_per_driver_line():
    assert compat.ptx_isa_for_driver((12, 0)) == (8, 0)
    assert compat.ptx_isa_for_driver((11, 8)) == (7, 8)
    assert compat.ptx_isa_for_driver((12, 8)) == (8, 7)
    assert compat.ptx_isa_for_driver((13, 0)) == (9, 0)


@pytest.mark.skipif(
    shutil.which("readelf") is None or shutil.which("nm") is None, reason="needs binutils"
)
def test_a_module_with_a_runtime_and_new_images_fails(tmp_path):
    """The checker can fail: a fake module carrying a static runtime, PTX 9.0 and a CUDA 13 cubin
    (what the build produced before: nvcc 13's cudart and fatbin)."""
    so = tmp_path / "fake.so"
    so.write_bytes(
        Path(hardneg._C.__file__).read_bytes()
        + b"cudaErrorInsufficientDriver\n"
        + b"\n.version 9.0\n"
        + _cubin_header(8)
    )
    info = {"cuda_driver_min": "13.0", "cuda_driver_min_sass": "13.0"}
    problems = compat.check(so, (12, 0), sass=True, info=info)
    assert any("statically linked CUDA runtime" in p for p in problems), problems
    assert any("PTX ISA 9.0 > 8.0" in p for p in problems), problems
    assert any("cubin ELF ABI version 8 > 7" in p for p in problems), problems
    assert any("cuda_driver_min" in p for p in problems), problems


@pytest.mark.skipif(not hardneg.build_info()["cuda"], reason="no CUDA module in this install")
@pytest.mark.skipif(
    shutil.which("readelf") is None or shutil.which("nm") is None, reason="needs binutils"
)
def test_cuda_module_runs_on_cuda_12_drivers():
    import hardneg._C_cuda as module

    info = hardneg.build_info()
    assert info["cuda_runtime"] is None
    problems = compat.check(Path(module.__file__), (12, 0), sass=False, info=info)
    assert problems == []
    assert compat._version(info["cuda_driver_min"]) <= (11, 8), info
    assert module.kernel_images() and all(
        " cubin" in n or " PTX" in n for n in module.kernel_images()
    )
