"""The CPU kernels' ISA variants (cmake/cpu.cmake, csrc/cpu/cpu_isa.cpp): what the build compiled,
which variant runs, HARDNEG_CPU_ISA, and every variant this machine runs checked end to end.

Each variant is checked in a fresh interpreter (tests/cpu_isa_worker.py) with HARDNEG_CPU_ISA
forcing it: the loss's value and gradients against the fp64 reference, the column-block kernels
against the row kernel, and the exp's ulp error. A forced variant the build lacks, or that this CPU
cannot run, stops `import hardneg` with a ValueError naming the variable, the value and the
variants that run here.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import hardneg
import pytest
from hardneg import _C

WORKER = Path(__file__).resolve().parent / "cpu_isa_worker.py"
PORTABLE = hardneg.build_info()["cpu_arch"] == "portable"
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
AVX512_FEATURES = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def run_python(
    args: list[str], isa: str | None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python *args` with HARDNEG_CPU_ISA=isa (unset when None)."""
    env = dict(os.environ)
    env.pop("HARDNEG_CPU_ISA", None)
    if isa is not None:
        env["HARDNEG_CPU_ISA"] = isa
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def run_worker(isa: str | None, *extra: str) -> dict:
    out = run_python([str(WORKER), *extra], isa)
    assert out.returncode == 0, f"worker failed (rc {out.returncode}):\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_build_info_reports_arch_and_isa():
    info = hardneg.build_info()
    assert isinstance(info["cpu_arch"], str) and info["cpu_arch"]
    compiled = _C.cpu_isas_compiled()
    assert info["cpu_isa"] in compiled
    if os.environ.get("HARDNEG_CPU_ISA", "auto") == "auto":
        # Nothing forced: the best variant this CPU runs.
        assert info["cpu_isa"] == _C.cpu_isas_supported()[0]


def test_compiled_variants():
    compiled = _C.cpu_isas_compiled()
    if not PORTABLE:
        assert compiled == [hardneg.build_info()["cpu_arch"]]
        return
    assert compiled == (["avx512", "avx2", "baseline"] if X86_64 else ["baseline"])
    # The baseline variant was compiled for the architecture's baseline: no CPUID feature needed.
    assert _C.cpu_isa_features("baseline") == []
    if X86_64:
        avx2 = set(_C.cpu_isa_features("avx2"))
        assert {"avx", "avx2", "fma"} <= avx2 and not avx2 & AVX512_FEATURES
        assert AVX512_FEATURES | {"avx2", "fma"} <= set(_C.cpu_isa_features("avx512"))
    assert "baseline" in _C.cpu_isas_supported()


@pytest.mark.parametrize("isa", _C.cpu_isas_supported())
def test_every_variant_matches_the_reference(isa):
    result = run_worker(isa)
    assert result["cpu_isa"] == isa
    assert result["failures"] == []
    assert result["exp_max_ulp"] < 1.5


def test_variant_checks_can_fail():
    """A temperature 0.1% off is caught in every loss case the worker runs and in the column
    blocks' logsumexp and dS."""
    failures = run_worker(None, "--perturb")["failures"]
    assert len([f for f in failures if f.startswith("loss ")]) == 5, failures
    assert "block kernels: block loss vs row" in failures
    assert "block kernels: block dS vs row" in failures


def test_unknown_forced_isa_stops_import():
    out = run_python(["-c", "import hardneg"], "sse9")
    assert out.returncode != 0
    msg = out.stderr.strip().splitlines()[-1]
    assert msg.startswith("ValueError: HARDNEG_CPU_ISA='sse9'"), msg
    assert "not compiled into this build" in msg
    assert ", ".join(_C.cpu_isas_compiled()) in msg


def test_auto_is_the_default():
    out = run_python(["-c", "import hardneg; print(hardneg.build_info()['cpu_isa'])"], "auto")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _C.cpu_isas_supported()[0]


@pytest.mark.parametrize(
    "isa", sorted(set(_C.cpu_isas_compiled()) - set(_C.cpu_isas_supported())) or ["none"]
)
def test_unsupported_forced_isa_stops_import(isa):
    if isa == "none":
        pytest.skip(
            "this CPU runs every compiled variant; test_refusal_names_missing_features "
            "checks the refusal with a reduced feature set"
        )
    out = run_python(["-c", "import hardneg"], isa)
    msg = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and "which this CPU lacks" in msg, msg


@pytest.mark.skipif(not (PORTABLE and X86_64), reason="needs the portable x86-64 build")
def test_refusal_names_missing_features():
    """The check set_cpu_isa applies, on a CPU with AVX2 and FMA but no AVX-512."""
    avx2_cpu = ["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "avx", "avx2", "fma"]
    problem = _C.cpu_isa_problem("avx512", avx2_cpu)
    assert problem.startswith("CPU ISA 'avx512' needs avx512f, avx512cd, avx512bw"), problem
    assert problem.endswith("which this CPU lacks")
    assert _C.cpu_isa_problem("avx2", avx2_cpu) == ""
    assert _C.cpu_isa_problem("baseline", []) == ""
    assert "needs sse3" in _C.cpu_isa_problem("avx2", [])
    with pytest.raises(ValueError, match="unknown CPU feature 'avx1024'"):
        _C.cpu_isa_problem("avx2", ["avx1024"])


def test_set_cpu_isa_in_process():
    before = _C.cpu_isa()
    try:
        for isa in _C.cpu_isas_supported():
            _C.set_cpu_isa(isa)
            assert _C.cpu_isa() == isa == hardneg.build_info()["cpu_isa"]
        with pytest.raises(ValueError, match="'avx9' was not compiled"):
            _C.set_cpu_isa("avx9")
        _C.set_cpu_isa("auto")
        assert _C.cpu_isa() == _C.cpu_isas_supported()[0]
    finally:
        _C.set_cpu_isa(before)
