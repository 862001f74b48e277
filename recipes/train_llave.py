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
"""

from __future__ import annotations

import argparse
import logging
import sys

from hardneg.train import distributed as dist_util
from hardneg.train.config import load_config
from hardneg.train.evaluate import evaluate_retrieval
from hardneg.train.trainer import Trainer, ensure_synthetic_data, write_json


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument(
        "--resume", default="", help="'auto' (latest checkpoint in the output dir) or a path"
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
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
        embedder = trainer.eval_embedder(final)
        result = evaluate_retrieval(
            embedder, cfg.eval.root, datasets=cfg.eval.datasets, batch_size=cfg.eval.batch_size
        )
        write_json(trainer.out / "eval.json", result)
        if result is not None:
            logging.getLogger("hardneg.train").info(
                "P@1 %.2f%% (chance %.2f%%) on %s",
                result["mean_precision@1"],
                result["mean_chance"],
                cfg.eval.root,
            )
    dist_util.destroy_distributed()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
