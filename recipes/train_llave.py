"""Train a universal multimodal embedder with LLaVE's hardness-weighted contrastive loss.

Every knob lives in the YAML config (recipes/configs/*.yaml, each key commented with why);
any key can be overridden on the command line as --section.key VALUE.

CPU demo (the main job: generates the synthetic set, trains the tiny model on 2 ranks, reports
retrieval P@1 against chance in runs/synthetic_tiny/eval.json):

    torchrun --standalone --nproc_per_node=2 recipes/train_llave.py \
        --config recipes/configs/synthetic_tiny.yaml

One node, 8 GPUs (LLaVE-0.5B; the data and model come from environment variables):

    MODEL=path/to/llava-onevision-qwen2-0.5b-ov-hf MMEB_TRAIN=path/to/MMEB-train \
    torchrun --standalone --nproc_per_node=8 recipes/train_llave.py \
        --config recipes/configs/llave_0.5b.yaml

Several nodes (run on every node, NODE_RANK = 0 .. NNODES-1, MASTER_ADDR = node 0's address):

    torchrun --nnodes=$NNODES --node_rank=$NODE_RANK --nproc_per_node=8 \
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 \
        recipes/train_llave.py --config recipes/configs/llave_7b.yaml

Continue an interrupted run from its latest checkpoint (same config, same world size):

    torchrun ... recipes/train_llave.py --config ... --resume auto

A config error (unknown key, bad value, unset ${MODEL}, no model at the path) is printed as one
line, once, and the run exits with status 2 before any process group is created.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from hardneg.data.synthetic import generate
from hardneg.eval import evaluate_mmeb
from hardneg.train import distributed as dist_util
from hardneg.train.config import ConfigError, EvalConfig, RunConfig, check_paths, load_config
from hardneg.train.trainer import Trainer

log = logging.getLogger("hardneg.train")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument(
        "--resume", default="", help="'auto' (latest checkpoint in the output dir) or a path"
    )
    return parser.parse_known_args(argv)


def load_or_exit(args: argparse.Namespace, overrides: list[str]) -> RunConfig:
    """The checked config; on a ConfigError one line on rank 0 (every rank hits the same error,
    before any process group exists) and exit status 2 on every rank."""
    try:
        cfg = load_config(args.config, overrides)
        check_paths(cfg)
        return cfg
    except ConfigError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"train_llave.py: error: {err}", file=sys.stderr)
        sys.exit(2)


def ensure_synthetic_data(cfg: RunConfig) -> None:
    """Generate the synthetic set into data.root's parent when data.synthetic asks for it and
    data.root does not exist yet (call on one rank)."""
    syn, root = cfg.data.synthetic, Path(cfg.data.root)
    if syn.generate_if_missing and not root.exists():
        log.info("generating the synthetic data set (%d pairs) into %s", syn.n, root.parent)
        generate(root.parent, n=syn.n)


def evaluate(embedder, ev: EvalConfig) -> dict | None:
    """P@1 per data set of ev.root with the chance level (1/K for a query with K candidates,
    averaged), on rank 0 (None elsewhere). Every rank calls it: the embedding is sharded."""
    evaluation = evaluate_mmeb(
        embedder,
        Path(ev.root),
        datasets=ev.datasets or None,
        image_root=ev.image_root or None,
        batch_size=ev.batch_size,
        group=dist_util.loss_group(),
        show_progress_bar=False,
    )
    if evaluation is None:
        return None
    per = {}
    for name, result in evaluation.results.items():
        chance = float((1.0 / result.num_candidates_N.double()).mean() * 100)
        per[name] = {
            "precision@1": round(result.precision_at_1, 2),
            "chance": round(chance, 2),
            "num_queries": int(result.scores_NK.shape[0]),
        }
    n = len(per)
    return {
        "metric": "precision@1 (%), candidate 0 is the ground truth",
        "datasets": per,
        "mean_precision@1": round(sum(d["precision@1"] for d in per.values()) / n, 2),
        "mean_chance": round(sum(d["chance"] for d in per.values()) / n, 2),
        "report": evaluation.report(),
    }


def write_eval(result: dict, out: Path, root: str) -> None:
    """eval.json (atomically: temporary file + rename) and one log line per data set."""
    tmp = out / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "eval.json")
    width = max(len(name) for name in result["datasets"])
    for name, d in result["datasets"].items():
        log.info(
            "%-*s P@1 %6.2f%%  (chance %5.2f%%, %d queries)",
            width,
            name,
            d["precision@1"],
            d["chance"],
            d["num_queries"],
        )
    log.info(
        "%-*s P@1 %6.2f%%  (chance %5.2f%%) on %s",
        width,
        "mean",
        result["mean_precision@1"],
        result["mean_chance"],
        root,
    )


def main(argv: list[str] | None = None) -> dict | None:
    args, overrides = parse_args(argv)
    cfg = load_or_exit(args, overrides)
    device = dist_util.init_distributed(backend=cfg.train.backend)
    logging.basicConfig(
        level=logging.INFO if dist_util.is_main() else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    with dist_util.main_first():
        if dist_util.is_main():
            ensure_synthetic_data(cfg)
    trainer = Trainer(cfg, device=device)
    trainer.resume(args.resume)
    trainer.fit()
    final = trainer.export()
    result = None
    if cfg.eval.root:
        result = evaluate(trainer.eval_embedder(final), cfg.eval)
        if result is not None:
            write_eval(result, trainer.out, cfg.eval.root)
    dist_util.destroy_distributed()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
