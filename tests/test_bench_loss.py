"""benchmarks/bench_loss.py beyond its CPU numbers: the command line (provider and argument
errors, --device cuda without a GPU), the GPU providers and harness run on CPU tensors (the eager
autocast loss against the fp64 reference, the accuracy check that guards the timings, the report),
the roofline model's arithmetic, and gpu_check.sh's summary of a GPU benchmark record. Nothing here
times anything that is asserted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hardneg import TEMPERATURE, _schedule
from loss_testing import make_inputs

from benchmarks import bench_loss, bench_loss_gpu, roofline
from benchmarks.bench_loss_report import render_gpu_markdown, roofline_key
from benchmarks.loss_shapes import GPU_SHAPES, Shape
from benchmarks.torch_eager import eager_autocast_loss

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    Shape(24, 72, 16, repeats=1),
    Shape(16, 48, 8, mode="infonce", symmetric=True, masked=True, repeats=1),
)


# One thread (tests/conftest.py); the kernel's multi-threaded row split runs where a test asks.
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,names",
    [
        (["--providers", "bogus"], ["--providers", "bogus"]),
        (["--providers", "eager_autocast"], ["--providers", "eager_autocast", "--device cpu"]),
        (["--device", "cuda", "--providers", "compile"], ["--providers", "compile"]),
        (["--dtype", "bfloat16"], ["--dtype bfloat16", "--device cuda"]),
        (["--shapes", "0", "9"], ["--shapes", "9"]),
        (["--device", "cuda", "--shapes", "5"], ["--shapes", "5"]),
        (["--repeats", "0"], ["--repeats 0"]),
        (["--device", "tpu"], ["--device", "tpu"]),
    ],
)
def test_bad_arguments_name_the_option_and_value(argv, names, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_loss.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, err


def test_good_arguments_pick_the_devices_defaults():
    cpu = bench_loss.parse_args([])
    gpu = bench_loss.parse_args(["--device", "cuda", "--shapes", "0", "1"])
    assert (cpu.dtype, cpu.providers) == ("float32", None)
    assert (gpu.dtype, gpu.shapes) == ("bfloat16", [0, 1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_device_cuda_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_loss", "--device", "cuda", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "nothing was run" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_provider_selection_errors():
    with pytest.raises(ValueError, match="providers must be.*bogus"):
        bench_loss_gpu.check_providers_known(["hardneg", "bogus"])
    with pytest.raises(ValueError, match="providers must be"):
        bench_loss_gpu.check_providers_known([])
    assert bench_loss_gpu.check_providers_known(("gemm", "hardneg")) == ["gemm", "hardneg"]
    with pytest.raises(ValueError, match="'gemm' has no loss"):
        bench_loss_gpu.loss_fn("gemm", TINY[0])
    ega = Shape(16, 32, 8, mode="ega")
    assert not bench_loss_gpu.supports("eager_autocast", ega)
    assert bench_loss_gpu.supports("torch_chunked", ega)
    with pytest.raises(ValueError, match="got mode 'ega'"):
        eager_autocast_loss(torch.ones(2, 3), torch.ones(2, 3), mode="ega")


# ---------------------------------------------------------------------------------------------
# The eager provider: the same loss as the reference
# ---------------------------------------------------------------------------------------------


def _value_and_grads(fn, inputs):
    x = {
        k: v.clone().requires_grad_() if k in bench_loss_gpu.LEAVES and v is not None else v
        for k, v in inputs.items()
    }
    loss = fn(**x)
    leaves = [x[k] for k in bench_loss_gpu.LEAVES if x[k] is not None]
    return loss.detach(), torch.autograd.grad(loss, leaves)


def _worst(a, b) -> float:
    return max(
        (x - y).abs().max().item() for x, y in zip([a[0], *a[1]], [b[0], *b[1]], strict=True)
    )


# B = 1 (only its own positive), B = 7 with M = 2 and colliding ids, D = 59.
@pytest.mark.parametrize("B,M,ids", [(1, 2, False), (7, 2, True), (7, 0, True)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["q2t", "sym"])
@pytest.mark.parametrize("mode", ["infonce", "llave"])
def test_eager_loss_is_the_reference_in_fp64(B, M, ids, mode, symmetric):
    inputs = make_inputs(B, 59, M, ids=ids, dtype=torch.float64)
    kw = {"mode": mode, "symmetric": symmetric}
    ours = _value_and_grads(lambda **x: eager_autocast_loss(**x, **kw, autocast=False), inputs)
    ref = _value_and_grads(lambda **x: bench_loss_gpu.hardneg_loss_reference(**x, **kw), inputs)
    assert _worst(ours, ref) < 1e-12  # the same fp64 arithmetic, up to summation order


def test_eager_comparison_can_fail():
    """A 0.1% wrong temperature moves the loss or a gradient by far more than the 1e-12 above."""
    inputs = make_inputs(7, 59, 2, ids=True, dtype=torch.float64)
    wrong = _value_and_grads(
        lambda **x: eager_autocast_loss(**x, temperature=TEMPERATURE * 1.001, autocast=False),
        inputs,
    )
    ref = _value_and_grads(bench_loss_gpu.hardneg_loss_reference, inputs)
    assert _worst(wrong, ref) > 1e-6


# ---------------------------------------------------------------------------------------------
# The GPU harness on CPU tensors
# ---------------------------------------------------------------------------------------------


def test_gpu_harness_runs_and_reports_on_cpu(tmp_path):
    record = bench_loss_gpu.run(
        TINY, bench_loss_gpu.GPU_PROVIDERS, "cpu", torch.bfloat16, repeats=1, memory=False
    )
    assert [e["name"] for e in record["shapes"]] == [s.name for s in TINY]
    for entry in record["shapes"]:
        got = {(r["provider"], r["mode"]) for r in entry["summary"]}
        want = {(p, m) for p in bench_loss_gpu.GPU_PROVIDERS for m in bench_loss_gpu.GPU_MODES}
        assert got == want
        floor = {r["mode"]: r for r in entry["summary"] if r["provider"] == "gemm"}
        assert all(r["x_gemm"] == 1.0 for r in floor.values())
        acc = entry["accuracy"]
        assert set(acc) == {"hardneg", "eager_autocast", "torch_chunked"}
        # hardneg keeps fp32 S and logits: its bf16 loss is far closer to fp64 than eager's.
        assert acc["hardneg"]["loss_rel_err"] < 1e-5
        assert acc["hardneg"]["loss_rel_err"] < acc["eager_autocast"]["loss_rel_err"]
    path = tmp_path / "bench_loss_gpu_cpu_x.json"
    path.write_text(json.dumps(record))
    assert bench_loss.main(["--render", str(path)]) == 0
    md = path.with_suffix(".md").read_text()
    assert "## Summary: full forward + backward" in md
    assert all(s.name in md for s in TINY)


def test_accuracy_check_catches_another_loss(monkeypatch):
    """The check that guards every GPU timing fails a provider computing a slightly other loss."""
    real = bench_loss_gpu.loss_fn

    def off_by_a_little(provider, shape, *, autocast=True):
        if provider != "torch_chunked":
            return real(provider, shape, autocast=autocast)
        return lambda **x: bench_loss_gpu.torch_chunked_hardneg_loss(
            **x, mode=shape.mode, temperature=TEMPERATURE * 1.001
        )

    monkeypatch.setattr(bench_loss_gpu, "loss_fn", off_by_a_little)
    with pytest.raises(AssertionError, match="torch_chunked computes another loss"):
        bench_loss_gpu.accuracy(TINY[0], ["torch_chunked"], torch.device("cpu"), torch.bfloat16)


def test_summary_ratios():
    timed = {
        p: {"median_s": s, "min_s": s}
        for p, s in {
            "hardneg": 2.0,
            "eager_autocast": 5.0,
            "torch_chunked": 3.0,
            "gemm": 1.0,
        }.items()
    }
    rows = bench_loss_gpu.summarise(TINY[0], {"full": timed})
    h = next(r for r in rows if r["provider"] == "hardneg")
    assert (h["x_gemm"], h["eager_over"], h["chunked_over"]) == (2.0, 2.5, 1.5)
    assert h["tflops"] == pytest.approx(TINY[0].gemm_flops("full") / 2.0 / 1e12)


def test_gpu_check_summarises_a_benchmark_record(tmp_path):
    """gpu_check.sh's report writer (its Python heredoc) reads the benchmark's record and copies
    its files next to the report."""
    script = (ROOT / "tools" / "gpu_check.sh").read_text()
    writer = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S).group(1)
    (tmp_path / "writer.py").write_text(writer)
    work, results = tmp_path / "work", tmp_path / "results"
    (work / "bench_loss").mkdir(parents=True)
    results.mkdir()
    record = bench_loss_gpu.run(
        TINY[:1], ["hardneg", "gemm"], "cpu", torch.float32, repeats=1, memory=False
    )
    (work / "bench_loss" / "bench_loss_gpu_x_d.json").write_text(json.dumps(record))
    (work / "bench_loss" / "bench_loss_gpu_x_d.md").write_text(render_gpu_markdown(record))
    (work / "steps.tsv").write_text(f"bench_loss\tpass\t3\t{work / 'none.log'}\n")
    done = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "writer.py"),
            str(work / "steps.tsv"),
            str(work),
            str(results / "gpu_check_x"),
            "1",
            "5",
        ],
        capture_output=True,
        text=True,
        env={"HARDNEG_NVIDIA_SMI": "true", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    md = (results / "gpu_check_x.md").read_text()
    assert re.search(rf"\| {re.escape(TINY[0].name)} \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|", md), md
    assert (results / "bench_loss_gpu_x_d.json").exists()


# ---------------------------------------------------------------------------------------------
# The roofline model
# ---------------------------------------------------------------------------------------------


def test_floor_of_a_compute_bound_shape_is_its_flops_at_peak():
    shape = GPU_SHAPES[1]  # (8192, 65536, 4096): every GEMM compute-bound
    for gpu in roofline.GPUS.values():
        p = roofline.predict(shape, gpu, "peak")
        flops = 6.0 * shape.B * shape.N * shape.D
        assert p["gemm"]["ms"] == pytest.approx(1e3 * flops / (gpu.bf16_tflops * 1e12))
        assert p["gemm"]["tflop"] == pytest.approx(flops / 1e12)


def _bytes_per_s_elem(kernels, shape, *names):
    return sum(k.bytes for k in kernels if any(n in k.name for n in names)) / (shape.B * shape.N)


def test_hardneg_passes_over_s():
    """As built: S read twice and dS written in bf16 by the kernel (4 + 4 + 2 B), no cast pass;
    one read: 4 + 2; a 65536-wide fp32 row (256 KiB) cannot stay on chip."""
    shape, gpu = GPU_SHAPES[0], roofline.GPUS["h100-sxm"]
    built = roofline.hardneg_kernels(shape, gpu)
    assert _bytes_per_s_elem(built, shape, "kernel") == 10
    assert not any("-> bf16" in k.name for k in built)
    one = roofline.hardneg_kernels(shape, gpu, one_read=True)
    assert _bytes_per_s_elem(one, shape, "kernel") == 6
    wide = GPU_SHAPES[1]
    assert _bytes_per_s_elem(
        roofline.hardneg_kernels(wide, gpu, one_read=True), wide, "kernel"
    ) == _bytes_per_s_elem(roofline.hardneg_kernels(wide, gpu), wide, "kernel")
    # fp32 inputs: dS in place of S, written in fp32.
    assert _bytes_per_s_elem(roofline.hardneg_kernels(shape, gpu, e=4), shape, "kernel") == 12


def test_chunk_rows_follow_hardnegs_schedule(monkeypatch):
    """The model's chunk rows are hardneg._schedule's for a device of that memory size, with and
    without the chunk's bf16 dS buffer."""
    for gpu in roofline.GPUS.values():
        props = SimpleNamespace(total_memory=gpu.memory_mib * 2**20)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d, p=props: p)
        for n in (8192, 32768, 65536, 2**24):
            want = _schedule.default_chunk_size(n, torch.device("cuda"))
            assert roofline.chunk_rows(n, gpu) == want
            want = _schedule.default_chunk_size(n, torch.device("cuda"), torch.bfloat16)
            assert roofline.chunk_rows(n, gpu, ds_bytes=2) == want
    h100, h200 = roofline.GPUS["h100-sxm"], roofline.GPUS["h200"]
    assert roofline.chunk_rows(65536, h100) == 5097  # 81559 MiB / 64 of fp32 rows: 2 chunks
    assert roofline.chunk_rows(65536, h200) == 8192  # capped at 2 GiB: one chunk of 8192
    # With the bf16 dS (6 bytes a row element): 3 chunks of <= 3398 rows, 2 of <= 5461.
    assert roofline.chunk_rows(65536, h100, ds_bytes=2) == 3398
    assert roofline.chunk_rows(65536, h200, ds_bytes=2) == 5461


def test_variants_only_ever_remove_work_and_the_report_says_predicted():
    record = roofline.model()
    for entry in record["shapes"]:
        for by_scenario in entry["predictions"].values():
            for p in by_scenario.values():
                ms = [p[name]["ms"] for name in roofline.HARDNEG_VARIANTS]
                assert ms == sorted(ms, reverse=True)
                assert all(v["x_gemm"] >= 1.0 for v in p.values())
    md = roofline.render_markdown(record, "2026-11-30")
    assert "PREDICTIONS" in md and "no GPU has run these" in md
    assert record["predicted"] is True


def test_roofline_key_matches_gpu_names():
    assert roofline_key("NVIDIA H200") == "h200"
    assert roofline_key("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert roofline_key("NVIDIA H100 PCIe") is None
    assert roofline_key("NVIDIA A100-SXM4-80GB") is None
