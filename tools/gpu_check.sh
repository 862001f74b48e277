#!/usr/bin/env bash
# Validates hardneg on a GPU machine in one command, in at most 8 minutes on one GPU:
#   build with CUDA and NCCL; the CUDA tests; compute-sanitizer memcheck, racecheck and synccheck
#   on the loss kernels; the loss benchmark in bf16 (python -m benchmarks.bench_loss --device cuda:
#   hardneg against its 3 cuBLAS GEMMs, eager torch under autocast and the pure-torch chunked
#   peer); a 1-GPU run of the tiny training config; with 2+ GPUs, the NCCL ring tests and the tiny
#   config on 2 GPUs over NCCL.
# Writes benchmarks/results/gpu_check_<date>_<host>.{json,md} and the benchmark's
# bench_loss_gpu_<gpu>_<date>.{json,md} there, and prints a one-screen summary.
# Without a GPU it says so in one line and exits 0, running nothing.
#
#   tools/gpu_check.sh            # from the repository, inside the Python environment to test
#
# Environment: PYTHON (default python), HARDNEG_GPU_CHECK_BUDGET (seconds, default 480),
# HARDNEG_NVIDIA_SMI (default nvidia-smi: how GPUs are counted).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

smi=${HARDNEG_NVIDIA_SMI:-nvidia-smi}
if ! command -v "$smi" >/dev/null 2>&1 || ! gpus=$("$smi" -L 2>/dev/null | grep -c '^GPU ') ||
  [[ "$gpus" -lt 1 ]]; then
  echo "gpu_check: no NVIDIA GPU found (nvidia-smi -L lists none); nothing was run"
  exit 0
fi

PYTHON=${PYTHON:-python}
PATH="$PATH:${CUDA_HOME:-/usr/local/cuda}/bin"  # compute-sanitizer ships with the toolkit
budget=${HARDNEG_GPU_CHECK_BUDGET:-480}
start=$SECONDS
stamp=$(date -u +%Y-%m-%d_%H%M%S)
out_dir=benchmarks/results
name="gpu_check_${stamp}_$(hostname -s)"
work=$(mktemp -d "${TMPDIR:-/tmp}/hardneg_gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT  # logs end up in the report (their tails)
steps="$work/steps.tsv"
: >"$steps"
mkdir -p "$out_dir"

# step NAME TIMEOUT_S COMMAND...: runs COMMAND with a timeout (never past the budget), records
# name, status (pass / fail / timeout / skipped), seconds and the log file.
step() {
  local step_name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  local log="$work/${step_name}.log"
  if ((left < 10)); then
    printf '%s\tskipped\t0\t%s\n' "$step_name" "$log" >>"$steps"
    echo "time budget spent: not run" >"$log"
    return
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS status
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  case $? in
    0) status=pass ;;
    124 | 137) status=timeout ;;
    *) status=fail ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$step_name" "$status" "$((SECONDS - t0))" "$log" >>"$steps"
  printf '%-28s %-8s %4ss\n' "$step_name" "$status" "$((SECONDS - t0))"
}

# compute-sanitizer TOOL [OPTIONS]: the kernel smoke test (tools/gpu_kernel_smoke.py) under it;
# racecheck and synccheck instrument hardneg's kernels only (cuBLAS's are not ours to check).
sanitize() {
  local tool=$1
  shift
  compute-sanitizer --tool "$tool" --error-exitcode 1 "$@" "$PYTHON" tools/gpu_kernel_smoke.py
}

train_args=(recipes/train_llave.py --config recipes/configs/synthetic_tiny.yaml
  --train.max_steps 8 --train.epochs 0)

step build 240 env HARDNEG_CUDA=ON HARDNEG_NCCL=ON "$PYTHON" -m pip install --no-deps -e .
step build_info 30 "$PYTHON" tools/check_cuda_compat.py
step cuda_tests 120 "$PYTHON" -m pytest -q -x tests/test_loss_cuda.py tests/test_build.py \
  tests/test_cuda_compat.py
if command -v compute-sanitizer >/dev/null 2>&1; then
  export -f sanitize
  export PYTHON
  step memcheck 90 bash -c 'sanitize memcheck'
  step racecheck 90 bash -c 'sanitize racecheck --kernel-name kns=hardneg_loss'
  step synccheck 90 bash -c 'sanitize synccheck --kernel-name kns=hardneg_loss'
else
  for tool in memcheck racecheck synccheck; do
    printf '%s\tskipped\t0\t%s\n' "$tool" "$work/$tool.log" >>"$steps"
    echo "compute-sanitizer not on PATH (CUDA toolkit bin/)" >"$work/$tool.log"
  done
fi
step bench_loss 150 "$PYTHON" -m benchmarks.bench_loss --device cuda --out "$work/bench_loss"
step train_1gpu 120 env CUDA_VISIBLE_DEVICES=0 "$PYTHON" "${train_args[@]}" \
  --train.output_dir "$work/train_1gpu"
if ((gpus >= 2)); then
  step ring_nccl_tests 150 "$PYTHON" -m pytest -q -x tests/distributed/test_ring_nccl.py
  step ring_nccl_2gpu 150 env CUDA_VISIBLE_DEVICES=0,1 "$PYTHON" -m torch.distributed.run \
    --standalone --nproc_per_node=2 tools/gpu_ring_check.py
  step train_2gpu_nccl 150 env CUDA_VISIBLE_DEVICES=0,1 "$PYTHON" -m torch.distributed.run \
    --standalone --nproc_per_node=2 "${train_args[@]}" --train.backend nccl \
    --train.output_dir "$work/train_2gpu"
fi

"$PYTHON" - "$steps" "$work" "$out_dir/$name" "$gpus" "$((SECONDS - start))" <<'PY'
"""Writes the JSON + markdown report of the steps and prints the summary."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

steps_tsv, work, base, gpus, seconds = sys.argv[1:]
steps = []
for line in Path(steps_tsv).read_text().splitlines():
    name, status, secs, log = line.split("\t")
    text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
    steps.append({"step": name, "status": status, "seconds": int(secs),
                  "log_tail": text.splitlines()[-25:]})
smi = subprocess.run([os.environ.get("HARDNEG_NVIDIA_SMI", "nvidia-smi"), "--query-gpu=name,driver_version,memory.total",
                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
# The loss benchmark's own JSON + markdown go to the results beside this report.
bench_json = sorted((Path(work) / "bench_loss").glob("*.json"))
for f in bench_json:
    for g in (f, f.with_suffix(".md")):
        if g.exists():
            shutil.copy(g, Path(base).parent / g.name)
record = {"gpus": int(gpus), "nvidia_smi": smi.splitlines(), "seconds": int(seconds),
          "steps": steps, "bench_loss": json.loads(bench_json[0].read_text()) if bench_json else None}
try:
    import hardneg
    record["build_info"] = hardneg.build_info()
except Exception as e:  # the build step failed: say so in the report
    record["build_info"] = f"import hardneg failed: {e}"
Path(base + ".json").write_text(json.dumps(record, indent=1))
ok = all(s["status"] in ("pass", "skipped") for s in steps)
md = [f"# GPU check: {'PASS' if ok else 'FAIL'}", "", f"GPUs ({gpus}): " + "; ".join(record["nvidia_smi"]),
      f"Total {seconds} s. build_info: `{json.dumps(record['build_info'])}`", "",
      "| step | status | seconds |", "| --- | --- | --- |"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
if record["bench_loss"]:
    md += ["", f"bench_loss, full forward + backward, {record['bench_loss']['machine']['dtype']} "
           f"({bench_json[0].with_suffix('.md').name} has the rest):", "",
           "| shape | hardneg ms | 3 GEMMs ms | x floor | eager / hardneg | chunked / hardneg |",
           "| --- | --- | --- | --- | --- | --- |"]
    for entry in record["bench_loss"]["shapes"]:
        by = {r["provider"]: r for r in entry["summary"] if r["mode"] == "full"}
        if "hardneg" not in by or "gemm" not in by:
            continue
        h = by["hardneg"]
        cells = [f"{x:.2f}" if x else "" for x in (h["x_gemm"], h["eager_over"], h["chunked_over"])]
        md.append(f"| {entry['name']} | {h['median_ms']:.3f} | {by['gemm']['median_ms']:.3f} | "
                  + " | ".join(cells) + " |")
for s in steps:
    if s["status"] not in ("pass", "skipped"):
        md += ["", f"## {s['step']} ({s['status']})", "```", *s["log_tail"], "```"]
Path(base + ".md").write_text("\n".join(md) + "\n")
print("\n".join(md[: 12 + len(steps)]))
print(f"\nreport: {base}.json, {base}.md")
sys.exit(0 if ok else 1)
PY
