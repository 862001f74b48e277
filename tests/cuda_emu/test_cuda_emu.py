"""The CUDA kernels and the NCCL communicator's logic, run on the CPU.

The C++ harness in this folder compiles the real csrc/cuda sources for the host: the kernels of
hardneg_loss_kernels.cu through cuda_emu.h (a CPU thread per CUDA thread, barriers for
__syncthreads / __syncwarp / warp shuffles, blocks in turn), the real launch and dispatch code, and
nccl_comm.cpp, against an emulated CUDA driver and NCCL (emu_driver.cpp, emu_nccl.cpp). Each
program prints "N passed, M failed" and exits non-zero on a failure.

Each runs plainly, under AddressSanitizer + UBSan and under ThreadSanitizer; a positive control
shows ThreadSanitizer reports the race that a dropped __syncthreads leaves in the kernels. The
kernels' bf16 / fp16 dS output is held against torch's .to() of their fp32 dS, bit for bit.
Skipped, with the reason, only when no C++ compiler exists.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++, c++ or clang++) found")

VARIANTS = {
    "plain": ["-O1"],
    "asan": [
        "-O1",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
    ],
    "tsan": ["-O1", "-fsanitize=thread"],
}
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66",
}
KERNEL_UNIT = CUDA_SRC / "hardneg_loss_kernels.cu"
HOST_UNITS = [CUDA_SRC / n for n in ("hardneg_loss.cpp", "kernel_image.cpp", "cuda_driver.cpp")]
HOST_UNITS.append(HERE / "emu_driver.cpp")
KERNEL_TESTS = [HERE / "test_kernels.cpp", HERE / "test_dispatch.cpp"]
NCCL_UNITS = [CUDA_SRC / "nccl_comm.cpp", HERE / "emu_nccl.cpp", HERE / "test_nccl_comm.cpp"]


def _nccl_include() -> Path | None:
    """The folder of nccl.h: the nvidia-nccl wheel's, NCCL_ROOT's or the system's."""
    candidates = []
    try:
        import nvidia.nccl as wheel

        candidates += [Path(p) / "include" for p in wheel.__path__]
    except ImportError:
        pass
    if os.environ.get("NCCL_ROOT"):
        candidates.append(Path(os.environ["NCCL_ROOT"]) / "include")
    candidates.append(Path("/usr/include"))
    return next((c for c in candidates if (c / "nccl.h").exists()), None)


@functools.cache
def _build_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="hardneg_cuda_emu_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _flags(variant: str) -> list[str]:
    include = [
        f"-I{HERE / 'include'}",
        f"-I{HERE}",
        f"-I{ROOT / 'csrc' / 'include'}",
        f"-I{CUDA_SRC}",
    ]
    nccl = _nccl_include()
    if nccl is not None:
        include.append(f"-I{nccl}")
    # -g1: line tables and inlined frames for the sanitizers' reports, at a third less compile time.
    return ["-std=c++17", "-g1", "-pthread", *VARIANTS[variant], *include]


def _compile(source: Path, out: Path, flags: list[str], extra: tuple[str, ...] = ()) -> Path:
    if source == KERNEL_UNIT:  # the .cu file itself, compiled as C++ with the shim in front
        extra = ("-x", "c++", "-include", str(HERE / "cuda_emu.h"), "-D__CUDA_ARCH__=800", *extra)
    cmd = [CXX, *flags, *extra, "-c", str(source), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"compile failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
    return out


@functools.cache
def _objects(variant: str, drop_barrier: bool = False) -> dict[Path, Path]:
    """Object files of every source for `variant`, compiled two at a time."""
    out_dir = _build_dir() / (variant + ("_dropped" if drop_barrier else ""))
    out_dir.mkdir(exist_ok=True)
    flags = _flags(variant)
    sources = [KERNEL_UNIT]
    if not drop_barrier:
        sources += HOST_UNITS + KERNEL_TESTS + (NCCL_UNITS if _nccl_include() else [])
    extra = ("-DCUDA_EMU_DROP_SYNCTHREADS",) if drop_barrier else ()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        jobs = {
            s: pool.submit(_compile, s, out_dir / (s.name + ".o"), flags, extra) for s in sources
        }
        return {s: job.result() for s, job in jobs.items()}


def _link(variant: str, program: str, drop_barrier: bool = False) -> Path:
    objs = dict(_objects(variant))
    if drop_barrier:
        objs[KERNEL_UNIT] = _objects(variant, drop_barrier=True)[KERNEL_UNIT]
    units = [KERNEL_UNIT, *HOST_UNITS] + (KERNEL_TESTS if program == "kernels" else NCCL_UNITS)
    exe = _build_dir() / f"{program}_{variant}{'_dropped' if drop_barrier else ''}"
    cmd = [CXX, *_flags(variant), *[str(objs[u]) for u in units], "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"link failed: {' '.join(cmd)}\n{done.stderr[-4000:]}"
    return exe


def _run(exe: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **SANITIZER_ENV, **env_extra}
    return subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)


def _assert_clean(done: subprocess.CompletedProcess, expect_at_least: int) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"exit {done.returncode}\n{output[-6000:]}"
    assert "Sanitizer" not in output and "runtime error" not in output, output[-6000:]
    summary = re.search(r"(\d+) passed, (\d+) failed", done.stdout)
    assert summary, done.stdout[-2000:]
    passed, failed = int(summary[1]), int(summary[2])
    assert failed == 0 and passed >= expect_at_least, summary[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernels_match_the_fp64_reference(variant):
    """Every kernel instance, on awkward shapes, in every mode, both schedules, dS in place and
    apart from S in bf16 / fp16 / fp32 (531 checks)."""
    _assert_clean(_run(_link(variant, "kernels")), expect_at_least=530)


def _read(path: Path, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=dtype)


def _differ(got: torch.Tensor, want: torch.Tensor) -> int:
    return int((got.view(torch.int16) != want.view(torch.int16)).sum())


def test_low_precision_ds_is_torchs_cast_of_the_fp32_ds(tmp_path):
    """The rows and block-grad kernels' bf16 / fp16 dS output, over every case of
    test_kernels.cpp, is bit for bit torch's .to() of the fp32 dS the same kernels write in place
    (which the harness holds to the fp64 reference). Truncating instead of rounding is caught."""
    _assert_clean(_run(_link("plain", "kernels"), HARDNEG_EMU_DUMP=str(tmp_path)), 530)
    pairs = {torch.bfloat16: 0, torch.float16: 0}
    values = truncated_differ = 0
    for f32 in sorted(tmp_path.glob("*.f32")):
        ds = _read(f32, torch.float32)
        assert torch.isfinite(ds).all()
        for dtype, suffix in ((torch.bfloat16, ".bf16"), (torch.float16, ".fp16")):
            out = f32.with_suffix(suffix)
            if not out.exists():
                continue
            got = _read(out, dtype)
            assert _differ(got, ds.to(dtype)) == 0, f"{out.name} differs from torch's cast"
            pairs[dtype] += 1
            values += ds.numel()
            if dtype == torch.bfloat16:  # the comparison can fail: truncation is caught
                truncated = (ds.view(torch.int32) >> 16).to(torch.int16).view(dtype)
                truncated_differ += _differ(got, truncated)
    # 63 cases x (rows, blocks) per dtype.
    assert pairs == {torch.bfloat16: 126, torch.float16: 126}, pairs
    assert truncated_differ > values // 20, (truncated_differ, values)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nccl_comm_logic(variant):
    if _nccl_include() is None:
        pytest.skip("nccl.h not found (install nvidia-nccl-cu12/-cu13 or set NCCL_ROOT)")
    _assert_clean(_run(_link(variant, "nccl_comm")), expect_at_least=30)


def test_thread_sanitizer_catches_a_dropped_barrier():
    """Positive control: without the __syncthreads of the block-wide row reduction, warps read
    each other's partial (max, sum) from shared memory unsynchronised, and one warp's in-place
    dS writes race with another's reads of S (the barrier also orders every read of the row before
    any write); TSan must say so. Which of the two it reports first depends on the threads'
    timing, so either counts."""
    done = _run(_link("tsan", "kernels", drop_barrier=True))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "ThreadSanitizer: data race" in output, output[-3000:]
    racing = ("row_lse_reduce", "thread_grad")
    assert any(name in output for name in racing), output[-3000:]
