"""Evaluate an embedder on MMEB-eval, or on any data set in its layout (the synthetic one included).

One process:
    python recipes/eval_mmeb.py --model runs/tiny/final --data-root data/synthetic/eval \
        --output runs/tiny/mmeb.json --similarity
Every GPU of a node (each rank embeds a shard of the distinct items, rank 0 scores), on the
Hugging Face snapshot of TIGER-Lab/MMEB-eval (MMEB-eval/<Dataset>/test-00000-of-00001.parquet)
with its images unzipped next to it (unzip images.zip -d MMEB-eval/eval_images):
    torchrun --standalone --nproc_per_node 8 recipes/eval_mmeb.py --model CKPT \
        --data-root MMEB-eval --image-root MMEB-eval/eval_images --output out/mmeb.json

--model is an Embedder checkpoint directory (Embedder.save_pretrained, or a downloaded llava-hf
LLaVA-OneVision checkpoint), or "tiny[:SEED]" for the random tiny model (a smoke test and the speed
benchmark of this script); --prompt-format llave embeds with LLaVE's exact prompt and pooling.
Writes OUT.json (leaderboard-style), OUT.md (the table) and, with --similarity,
OUT.similarity.json + .png (LLaVE Table 1 analysis). Embeddings are cached under --cache-dir
(default: beside OUT), so a rerun or an interrupted run only embeds what is missing. Texts are
embedded exactly as in the files (VLM2Vec's protocol) unless --instructions asks otherwise. Bad
input (a missing model, dataset, column or image) ends the run with one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from hardneg.data.images import ImageLoadError
from hardneg.eval import evaluate_mmeb, markdown_table, write_similarity
from hardneg.eval.mmeb import INSTRUCTION_POLICIES, MMEBFormatError
from hardneg.models import load_embedder
from hardneg.models.inputs import PROMPT_FORMATS

# Errors of the user's input: reported as one line, not a traceback per rank.
USER_ERRORS = (FileNotFoundError, MMEBFormatError, ImageLoadError)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help='checkpoint directory, or "tiny[:SEED]"')
    p.add_argument("--data-root", required=True, help="ROOT/<Dataset>/<split>*.parquet|.jsonl")
    p.add_argument("--datasets", default="", help="comma-separated subset (default: all found)")
    p.add_argument("--split", default="test")
    p.add_argument(
        "--image-root",
        default=None,
        help="folder the image paths are relative to (MMEB-eval: where images.zip was unzipped); "
        "default: the first of ROOT/eval_images, ROOT/images, ROOT holding the images",
    )
    p.add_argument("--output", required=True, help="OUT.json; OUT.md is written beside it")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: OUT dir/cache)")
    p.add_argument("--no-cache", action="store_true", help="keep embeddings in memory only")
    p.add_argument("--batch-size", type=int, default=32)
    # MMEB-eval rows carry their instructions inline and are scored as they are ("none"), as
    # VLM2Vec does. "missing" adds an MMEB dataset's instruction to texts that lack it
    # (tasks.needs_instruction), "always" to every text; both log how many texts they changed.
    p.add_argument("--instructions", default="none", choices=INSTRUCTION_POLICIES)
    p.add_argument("--max-queries", type=int, default=None, help="first N rows per dataset")
    p.add_argument("--similarity", action="store_true", help="write the similarity analysis")
    # The checkpoint's own prompt format unless overridden: "llave" embeds with LLaVE's exact
    # prompt and pooling, "hardneg" with the checkpoint's chat template (models/inputs.py).
    p.add_argument("--prompt-format", default=None, choices=PROMPT_FORMATS)
    # bf16 halves memory and time on GPUs; the embedding is returned in fp32 either way.
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        evaluate(args)
    except USER_ERRORS as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"eval_mmeb: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def evaluate(args: argparse.Namespace) -> None:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        # Only object collectives run here (work lists, embeddings to rank 0): gloo suffices.
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    output = Path(args.output)
    cache_dir = None if args.no_cache else Path(args.cache_dir or output.parent / "cache")

    start = time.perf_counter()
    embedder = load_embedder(args.model, device, args.dtype, args.prompt_format)
    result = evaluate_mmeb(
        embedder,
        args.data_root,
        datasets=[d for d in args.datasets.split(",") if d] or None,
        split=args.split,
        image_root=args.image_root,
        cache_dir=cache_dir,
        batch_size=args.batch_size,
        instructions=args.instructions,
        max_queries=args.max_queries,
        model_name=args.model,
    )
    if rank == 0:
        report = result.report()
        report["seconds"] = {"total": round(time.perf_counter() - start, 2)}
        report["seconds"].update({n: round(t, 2) for n, t in result.timings_s.items()})
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        table = markdown_table(report)
        output.with_suffix(".md").write_text(table)
        print(table)
        if args.similarity:
            write_similarity(
                {n: r.scores_NK for n, r in result.results.items()},
                output.with_suffix(".similarity.json"),
                output.with_suffix(".similarity.png"),
                title=args.model,
            )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
