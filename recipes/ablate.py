"""Hardness ablation on the synthetic benchmark (LLaVE Tables 1 and 5, in miniature).

The tiny model is trained with each loss mode (infonce, llave, ega), with and without cross-device
negatives, for the same number of steps, over several seeds, then evaluated on the synthetic eval
split, above all on its hard-negative datasets (SyntheticHardNegT2I / I2T: every distractor differs
from the positive in exactly one attribute). Reported per arm: mean and std over seeds of P@1, and
the LLaVE Table 1 similarities (positive, 5 hardest negatives, their gap).

"Without cross-device negatives" runs on the same 2 ranks with loss.cross_device false: each
query's negatives come from its own rank's batch only (negatives of 1 rank vs of 2 ranks). Data
per step, gradient averaging and steps are then equal, and the only change is the negatives, as in
LLaVE's ablation (their "+ cross-device negatives" row).

All arms run inside one torchrun launch (no per-arm start-up); each arm's result is written as it
finishes, so a rerun skips finished arms. The report goes to
benchmarks/results/ablation_<date>.{md,json,png}.

    torchrun --standalone --nproc_per_node=2 recipes/ablate.py --out runs/ablation
    torchrun --standalone --nproc_per_node=2 recipes/ablate.py --out runs/ablation --sweep
    python recipes/ablate.py --out runs/ablation --report-only
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes" / "configs" / "synthetic_tiny.yaml"
MODES = ("infonce", "llave", "ega")
NEGATIVES = ("local", "cross")
HARD_DATASETS = ("SyntheticHardNegT2I", "SyntheticHardNegI2T")
EVAL_DATASETS = (*HARD_DATASETS, "SyntheticT2I", "SyntheticI2T", "SyntheticCls", "SyntheticVQA")
# The EGA sweep (cross-device negatives, every seed): amplification strength beta and the margin
# below the positive at which amplification starts (_constants.py documents the map), around the
# default 50 / 0.3: the plateau of the renormalised form on benchmarks/bench_hardness.py.
SWEEP_BETAS = (20.0, 50.0, 100.0)
SWEEP_MARGINS = (0.1, 0.3, 0.5)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="data, per-arm runs and results")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per arm (all equal)")
    # 16 queries per rank: 32 in-batch targets + 32 hard negatives per query with 2 ranks.
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--negatives", default=",".join(NEGATIVES))
    p.add_argument("--sweep", action="store_true", help="also the ega_beta x ega_margin grid")
    p.add_argument(
        "--sweep-points",
        default="",
        help='sweep only these "beta:margin,..." points (default: the full grid)',
    )
    p.add_argument("--n-train", type=int, default=4000, help="synthetic training pairs")
    # 300: at 100 queries per set the hard-negative P@1 (mean of 2 sets, ~7%) has a binomial
    # sampling error of about 1.8 points, as large as the differences looked for; 300 gives ~1.0.
    p.add_argument("--n-eval", type=int, default=300, help="queries per eval dataset")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--report-only", action="store_true", help="rebuild the report, train nothing")
    return p.parse_args(argv)


def arms(args) -> list[dict]:
    """Every (mode, negatives, seed) arm, then the sweep arms when asked."""
    from hardneg._constants import EGA_BETA, EGA_MARGIN

    seeds = [int(s) for s in args.seeds.split(",")]
    out = [
        {"mode": m, "negatives": n, "seed": s, "ega_beta": EGA_BETA, "ega_margin": EGA_MARGIN}
        for m, n, s in itertools.product(args.modes.split(","), args.negatives.split(","), seeds)
    ]
    if args.sweep:
        points = list(itertools.product(SWEEP_BETAS, SWEEP_MARGINS))
        if args.sweep_points:
            points = [tuple(map(float, p.split(":"))) for p in args.sweep_points.split(",")]
        for (beta, margin), seed in itertools.product(points, seeds):
            if (beta, margin) != (EGA_BETA, EGA_MARGIN):
                out.append(
                    {
                        "mode": "ega",
                        "negatives": "cross",
                        "seed": seed,
                        "ega_beta": beta,
                        "ega_margin": margin,
                    }
                )
    return out


def arm_name(arm: dict) -> str:
    name = f"{arm['mode']}-{arm['negatives']}-seed{arm['seed']}"
    if arm["mode"] == "ega":
        name += f"-beta{arm['ega_beta']:g}-margin{arm['ega_margin']:g}"
    return name


def overrides(arm: dict, args, data: Path) -> list[str]:
    run = Path(args.out) / "runs" / arm_name(arm)
    values = {
        "data.root": data / "train",
        "data.synthetic.generate_if_missing": "false",
        "model.tiny_seed": arm["seed"],
        "loss.mode": arm["mode"],
        "loss.cross_device": "true" if arm["negatives"] == "cross" else "false",
        "loss.ega_beta": arm["ega_beta"],
        "loss.ega_margin": arm["ega_margin"],
        "train.seed": arm["seed"],
        "train.output_dir": run,
        "train.max_steps": args.steps,
        "train.batch_size": args.batch_size,
        # One GradCache chunk per batch: the same loss and gradients as a plain step, and the
        # trainer's DDP path that keeps one backward per parameter per step.
        "train.gradcache_chunk_size": args.batch_size,
        "train.progress_bar": "false",
        "checkpoint.every_steps": 0,
        "eval.root": '""',  # evaluated here, with the similarity analysis
    }
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def run_arm(arm: dict, args, data: Path) -> dict | None:
    """Train one arm and evaluate it (every rank takes part); rank 0 returns its result."""
    import torch
    from hardneg.eval import evaluate_mmeb, similarity_analysis
    from hardneg.train import distributed as dist_util
    from hardneg.train.config import load_config
    from hardneg.train.engine import unwrap
    from hardneg.train.trainer import Trainer

    cfg = load_config(CONFIG, overrides(arm, args, data))
    start = time.perf_counter()
    trainer = Trainer(cfg, device=dist_util.pick_device())
    history = trainer.fit()
    train_s = time.perf_counter() - start
    embedder = unwrap(trainer.engine.model)
    run = evaluate_mmeb(
        embedder,
        data / "eval",
        datasets=list(EVAL_DATASETS),
        batch_size=64,
        show_progress_bar=False,
    )
    del trainer, embedder
    gc.collect()
    if run is None:
        return None
    sim = similarity_analysis({n: run.results[n].scores_NK for n in HARD_DATASETS})
    return {
        **arm,
        "name": arm_name(arm),
        "steps": args.steps,
        "batch_size_per_rank": args.batch_size,
        "world_size": dist_util.world_size(),
        "final_loss": history[-1]["global_loss"] if history else None,
        "train_s": round(train_s, 1),
        "precision@1": {n: r.precision_at_1 for n, r in run.results.items()},
        "similarity": sim,
        "torch_threads": torch.get_num_threads(),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_p1(result: dict, datasets) -> float:
    return statistics.fmean(result["precision@1"][d] for d in datasets)


def _mean_similarity(result: dict, key: str) -> float:
    return statistics.fmean(result["similarity"][d][key] for d in HARD_DATASETS)


def summarise(results: list[dict]) -> list[dict]:
    """One row per (mode, negatives, beta, margin): mean/std over seeds of the hard-negative P@1,
    of the mean P@1 over all eval datasets, and of the LLaVE similarities on the hard split."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["mode"], r["negatives"], r["ega_beta"], r["ega_margin"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (mode, negatives, beta, margin), rs in groups.items():
        row = {
            "mode": mode,
            "negatives": negatives,
            "ega_beta": beta if mode == "ega" else None,
            "ega_margin": margin if mode == "ega" else None,
            "seeds": sorted(r["seed"] for r in rs),
            "hard_p1": _mean_std([_mean_p1(r, HARD_DATASETS) for r in rs]),
            "all_p1": _mean_std([_mean_p1(r, r["precision@1"]) for r in rs]),
        }
        for key in ("positive", "hard_negative", "easy_negative", "gap"):
            row[key] = _mean_std([_mean_similarity(r, key) for r in rs])
        rows.append(row)
    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(
        key=lambda r: (
            order[r["mode"]],
            NEGATIVES.index(r["negatives"]),
            r["ega_beta"] or 0,
            r["ega_margin"] or 0,
        )
    )
    return rows


def _pm(ms: tuple[float, float], digits: int) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def markdown(rows: list[dict], meta: dict) -> str:
    head = (
        "| Loss | Negatives | beta | margin | Seeds | P@1 hard-neg | P@1 all | cos pos | "
        "cos hard-5 | cos easy-5 | gap pos - hard-5 |"
    )
    lines = [
        f"# Hardness ablation, synthetic benchmark ({meta['date']})",
        "",
        f"Tiny LLaVA-OneVision (hidden 64), {meta['steps']} steps of {meta['batch_size']} queries "
        f"per rank on {meta['world_size']} gloo ranks (+1 explicit hard negative each), "
        f"{meta['n_train']} training pairs, {meta['n_eval']} queries per eval dataset. "
        "Mean ± std over seeds. P@1 hard-neg: mean of SyntheticHardNegT2I / I2T (chance "
        "7.14%); P@1 all: mean of the 6 synthetic eval datasets. Similarities (LLaVE Table 1) "
        "on the hard-negative datasets. Negatives: local = this rank's batch only, cross = "
        "both ranks' (cross-device).",
        "",
        head,
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        beta = "-" if r["ega_beta"] is None else f"{r['ega_beta']:g}"
        margin = "-" if r["ega_margin"] is None else f"{r['ega_margin']:g}"
        lines.append(
            f"| {r['mode']} | {r['negatives']} | {beta} | {margin} | "
            f"{','.join(map(str, r['seeds']))} | {_pm(r['hard_p1'], 1)} | {_pm(r['all_p1'], 1)} | "
            f"{_pm(r['positive'], 3)} | {_pm(r['hard_negative'], 3)} | "
            f"{_pm(r['easy_negative'], 3)} | {_pm(r['gap'], 3)} |"
        )
    lines += ["", f"Command: `{meta['command']}`; {meta['machine']}; torch {meta['torch']}.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r['mode']}\n{r['negatives']}"
        + (f"\nb{r['ega_beta']:g} m{r['ega_margin']:g}" if r["ega_beta"] is not None else "")
        for r in rows
    ]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(rows) + 4), 3.8))
    x = range(len(rows))
    for ax, key, title in (
        (axes[0], "hard_p1", "P@1 on the hard-negative split (%)"),
        (axes[1], "gap", "cos(positive) - cos(5 hardest negatives)"),
    ):
        ax.bar(
            x,
            [r[key][0] for r in rows],
            yerr=[r[key][1] for r in rows],
            capsize=3,
            color=["tab:blue" if r["negatives"] == "local" else "tab:orange" for r in rows],
        )
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].axhline(100 / 14, color="grey", ls="--", lw=1, label="chance")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, results: list[dict]) -> Path:
    import platform

    import torch

    date = datetime.date.today().isoformat()
    rows = summarise(results)
    first = results[0] if results else {}
    meta = {
        "date": date,
        "steps": first.get("steps", args.steps),
        "batch_size": first.get("batch_size_per_rank", args.batch_size),
        "world_size": first.get("world_size", "?"),
        "n_train": args.n_train,
        "n_eval": args.n_eval,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "command": "torchrun --standalone --nproc_per_node=2 recipes/ablate.py "
        + f"--steps {first.get('steps', args.steps)} "
        + f"--batch-size {first.get('batch_size_per_rank', args.batch_size)} --seeds {args.seeds}"
        + (" --sweep" if args.sweep else ""),
    }
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ablation_{date}"
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "runs": results}, indent=2) + "\n"
    )
    if rows:
        plot(rows, stem.with_suffix(".png"))
    return stem.with_suffix(".md")


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    results_dir = out / "results"
    if args.report_only:
        results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
        print(report(args, results).read_text())
        return
    from hardneg.data.synthetic import generate
    from hardneg.train import distributed as dist_util

    dist_util.init_distributed(backend="auto")
    data = out / "data"
    with dist_util.main_first():
        if dist_util.is_main():
            generate(data, n=args.n_train, n_eval=args.n_eval, seed=0)
            results_dir.mkdir(parents=True, exist_ok=True)
    for arm in arms(args):
        path = results_dir / f"{arm_name(arm)}.json"
        if path.exists():
            continue
        result = run_arm(arm, args, data)
        if result is not None:
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(
                f"{result['name']}: P@1 {result['precision@1']} ({result['train_s']} s)", flush=True
            )
        dist_util.barrier()
    if dist_util.is_main():
        results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
        print(report(args, results).read_text())
    dist_util.destroy_distributed()


if __name__ == "__main__":
    main()
