"""Mine hard negatives for MMEB-train with an embedder, offline, into a new folder.

One process:
    python recipes/mine_negatives.py --model runs/tiny/final --data-root MMEB-train \
        --out MMEB-train-mined --k 4
Every GPU of a node (each rank embeds a shard of the distinct items, rank 0 mines and writes):
    torchrun --standalone --nproc_per_node 8 recipes/mine_negatives.py --model CKPT \
        --data-root MMEB-train --out MMEB-train-mined --k 4 --subsets MSCOCO_t2i,CIRR
Then train with the mined negatives (images stay where they are):
    torchrun ... recipes/train_llave.py --config CONFIG --data.root MMEB-train-mined \
        --data.image_root MMEB-train --data.num_hard_negatives 4

Per subset, the queries and the subset's distinct positives (the candidate pool) are embedded once
(cached under --cache-dir, so a rerun embeds only what is missing); each row gets the k
best-scoring candidates that are not its positive nor a duplicate of it (same text and image), and
not above --fn-threshold x the positive's score (NV-Retriever's TopK-PercPos filter, arXiv
2407.15831: 0.95 is their best setting; inf turns it off). OUT mirrors the input files
(OUT/<Subset>/<split>-00000-of-00001.parquet, every column kept, neg_text / neg_image_path set:
strings for --k 1, as MMEB-train's own, lists otherwise) and holds mining_summary.json and .md
(score distributions, filtered candidates, rows left with fewer than k). The input files are only
read. Bad input (a missing model, subset, column or image) ends the run with one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hardneg.data.images import ImageLoadError
from hardneg.eval.mining import FN_THRESHOLD, mine_mmeb_train
from hardneg.models import load_embedder
from hardneg.models.inputs import PROMPT_FORMATS

# Errors of the user's input (missing files, bad rows): one line, not a traceback per rank.
USER_ERRORS = (FileNotFoundError, ImageLoadError, ValueError)


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _fraction(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (inf: no filter), got {value}")
    return x


def _names(value: str) -> list[str]:
    return [n for n in value.split(",") if n]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help='checkpoint directory, or "tiny[:SEED]"')
    p.add_argument("--data-root", required=True, help="MMEB-train: ROOT/<Subset>/<split>*.parquet")
    p.add_argument("--out", required=True, help="new folder for the mined files and the summary")
    p.add_argument("--k", required=True, type=_positive_int, help="negatives per row")
    p.add_argument("--subsets", type=_names, default=None, help="comma-separated (default: all)")
    p.add_argument(
        "--splits", type=_names, default=["original"], help="comma-separated file prefixes"
    )
    # NV-Retriever's TopK-PercPos: drop candidates scoring above this fraction of the positive.
    p.add_argument("--fn-threshold", type=_fraction, default=FN_THRESHOLD)
    p.add_argument(
        "--image-root",
        default=None,
        help="folder the image paths are relative to (MMEB-train: the snapshot root holding "
        "images/); default: the first of ROOT/images, ROOT holding the images",
    )
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: OUT/cache)")
    p.add_argument("--no-cache", action="store_true", help="keep embeddings in memory only")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    # The checkpoint's own prompt format unless overridden (models/inputs.py): mine with the
    # prompt the model will be trained with.
    p.add_argument("--prompt-format", default=None, choices=PROMPT_FORMATS)
    # bf16 halves memory and time on GPUs; embeddings and scores are fp32 either way.
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    args = p.parse_args(argv)
    if math.isnan(args.fn_threshold):
        p.error("--fn-threshold must be a number > 0")
    return args


def mine(args: argparse.Namespace) -> dict | None:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        # Only object collectives run here (work lists, embeddings to rank 0): gloo suffices.
        dist.init_process_group("gloo")
    try:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        out = Path(args.out)
        cache_dir = None if args.no_cache else Path(args.cache_dir or out / "cache")
        embedder = load_embedder(args.model, device, args.dtype, args.prompt_format)
        return mine_mmeb_train(
            embedder,
            args.data_root,
            out,
            k=args.k,
            subsets=args.subsets,
            splits=args.splits,
            fn_threshold=args.fn_threshold,
            image_root=args.image_root,
            cache_dir=cache_dir,
            batch_size=args.batch_size,
            model_name=args.model,
        )
    finally:
        if distributed:
            dist.destroy_process_group()


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = mine(args)
    except USER_ERRORS as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"mine_negatives: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if summary is not None:
        print((Path(args.out) / "mining_summary.md").read_text())
    return summary


if __name__ == "__main__":
    main()
