"""tools/gpu_check.sh without a GPU: one line saying so, exit 0, nothing run or written; and the
script passes shellcheck. (Its GPU path runs on GPU machines: README, Running on GPUs.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
RESULTS = ROOT / "benchmarks" / "results"


def _fake(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    "smi",
    [
        None,  # no nvidia-smi at all
        "echo 'NVIDIA-SMI has failed: no driver' >&2; exit 9",  # driver not loaded
        "echo 'No devices were found'; exit 6",  # driver, no GPU
    ],
    ids=["no-nvidia-smi", "no-driver", "no-device"],
)
def test_without_a_gpu_nothing_runs(tmp_path, smi):
    marker = tmp_path / "ran"
    fake_python = _fake(tmp_path / "python", f"touch {marker}; exit 1")
    env = {**os.environ, "PYTHON": str(fake_python), "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    env["HARDNEG_NVIDIA_SMI"] = (
        str(_fake(tmp_path / "nvidia-smi", smi)) if smi else str(tmp_path / "absent-smi")
    )
    before = sorted(RESULTS.iterdir()) if RESULTS.exists() else []
    done = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no NVIDIA GPU found"), done.stdout
    assert not marker.exists(), "the no-GPU path must run nothing"
    assert (sorted(RESULTS.iterdir()) if RESULTS.exists() else []) == before


def test_a_listed_gpu_is_counted(tmp_path):
    """The check can fail the other way: with a GPU listed, the script goes on to its steps (here
    stopped at once by a zero time budget, so nothing heavy runs)."""
    smi = _fake(tmp_path / "nvidia-smi", 'echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"')
    report = tmp_path / "report"
    fake_python = _fake(tmp_path / "python", f'echo "$@" >> {report}; exit 0')
    env = {
        **os.environ,
        "PYTHON": str(fake_python),
        "HARDNEG_NVIDIA_SMI": str(smi),
        "HARDNEG_GPU_CHECK_BUDGET": "0",
    }
    done = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60
    )
    assert "no NVIDIA GPU found" not in done.stdout
    # Every step was skipped by the budget; only the report writer (a Python heredoc) ran.
    calls = report.read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("- "), calls


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
