"""Check that the training job's numbers are unchanged: per-step losses and per-set P@1, bitwise.

Runs recipes/train_llave.py with recipes/configs/synthetic_tiny.yaml on 2 gloo ranks (torchrun),
shortened (a small synthetic set, 6 steps, GradCache chunks that do not divide the batch, a
checkpoint on the way), under DDP and under DeepSpeed ZeRO-2, then compares every TensorBoard scalar
of every step (loss, positive and hardest-negative similarity, lr), the exported weights and
eval.json's P@1 per data set with the numbers recorded in tools/train_equivalence.json. A code
change that is meant to move no number must pass it.

    python tools/train_equivalence.py                 # run every case, compare, exit 1 on change
    python tools/train_equivalence.py --record        # run and (re)write the recorded numbers
    python tools/train_equivalence.py --compare A B   # compare two finished runs' output dirs

Bitwise equality holds on one machine and one torch build (the same kernels in the same order);
record again, from the code before the change, when either differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECORD = Path(__file__).with_suffix(".json")
SCALARS = ("train/loss", "train/pos_sim", "train/hardest_neg_sim", "train/lr")
# engine name -> extra overrides; both engines build the same model and see the same batches.
CASES = {
    "ddp": [],
    "deepspeed": [
        "--train.engine",
        "deepspeed",
        "--train.deepspeed_config",
        "recipes/deepspeed/zero2.json",
    ],
}


def _overrides(data: Path, out: Path) -> list[str]:
    return [
        "--data.root",
        str(data / "train"),
        "--data.synthetic.generate_if_missing",
        "false",
        "--eval.root",
        str(data / "eval"),
        "--train.output_dir",
        str(out),
        "--train.batch_size",
        "8",
        "--train.gradcache_chunk_size",
        "5",
        "--train.max_steps",
        "6",
        "--train.progress_bar",
        "false",
        "--checkpoint.every_steps",
        "3",
    ]


def read_run(out: Path) -> dict:
    """{"steps": {tag: [values per step]}, "precision@1": {dataset: P@1}} of a finished run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = {tag: [e.value for e in events.Scalars(tag)] for tag in SCALARS}
    evaluation = json.loads((out / "eval.json").read_text())
    p_at_1 = {name: d["precision@1"] for name, d in evaluation["datasets"].items()}
    return {"steps": steps, "precision@1": p_at_1, "final_weights": weights_digest(out / "final")}


def weights_digest(folder: Path) -> str:
    """sha256 over the exported tensors (names, dtypes, shapes and bytes, in name order)."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_case(name: str, data: Path, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "recipes/train_llave.py",
        "--config",
        "recipes/configs/synthetic_tiny.yaml",
        *_overrides(data, out),
        *CASES[name],
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return read_run(out)


def differences(expected: dict, got: dict) -> list[str]:
    """Human-readable list of every value that differs (empty when bitwise equal)."""
    diffs = []
    for tag, values in expected["steps"].items():
        mine = got["steps"].get(tag, [])
        if len(mine) != len(values):
            diffs.append(f"{tag}: {len(mine)} steps logged, expected {len(values)}")
        for step, (a, b) in enumerate(zip(values, mine, strict=False), start=1):
            if a != b:
                diffs.append(f"{tag} step {step}: {b!r} != recorded {a!r}")
    if expected["final_weights"] != got["final_weights"]:
        diffs.append("final exported weights differ")
    for dataset, value in expected["precision@1"].items():
        if got["precision@1"].get(dataset) != value:
            diffs.append(f"P@1 {dataset}: {got['precision@1'].get(dataset)!r} != {value!r}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true", help="write tools/train_equivalence.json")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), type=Path)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated engines")
    args = parser.parse_args(argv)
    if args.compare:
        diffs = differences(read_run(args.compare[0]), read_run(args.compare[1]))
        print("\n".join(diffs) or "identical: every step's scalars and every P@1")
        return 1 if diffs else 0

    from hardneg.data.synthetic import generate

    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases {unknown} unknown; choose from {sorted(CASES)}")
    recorded = json.loads(RECORD.read_text()) if RECORD.exists() else {"cases": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="hardneg-equivalence-") as tmp:
        data = Path(tmp) / "synthetic"
        generate(data, n=320, n_eval=40, seed=0)
        for name in cases:
            got = run_case(name, data, Path(tmp) / name)
            if args.record:
                recorded["cases"][name] = got
                continue
            if name not in recorded["cases"]:
                print(f"{name}: no recorded numbers (run with --record first)")
                failed = True
                continue
            diffs = differences(recorded["cases"][name], got)
            failed |= bool(diffs)
            print(f"{name}: " + ("\n  ".join(["CHANGED", *diffs]) if diffs else "identical"))
    if args.record:
        recorded["recorded_on"] = {
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        }
        RECORD.write_text(json.dumps(recorded, indent=1) + "\n")
        print(f"recorded {sorted(recorded['cases'])} in {RECORD}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
