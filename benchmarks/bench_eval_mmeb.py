"""Time of the MMEB evaluation of the tiny model on 1,000 queries x 1,000 candidates per query.

Two MMEB-shaped data sets, written to --work: "Bench-I2T" (1,000 image queries, each listing all
1,000 labels, ground truth first: classification's shape) and "Bench-T2I" (1,000 caption queries,
each listing 1,000 of 1,000 images: retrieval's shape). A million candidate slots each, 2,000
distinct items each. Reports, per data set, the cold run (empty cache: deduplication only), the
warm run (every embedding from the on-disk cache) and the embedding count without deduplication.

    python benchmarks/bench_eval_mmeb.py --work /tmp/bench_eval --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple", "white", "grey"]
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
T2I_INSTRUCTION = "Find me an everyday image that matches the given caption:"
RGB = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "magenta": (220, 30, 200),
    "cyan": (30, 210, 210),
    "orange": (240, 140, 20),
    "purple": (120, 30, 160),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
}


def _image(path: Path, i: int, rng: random.Random) -> str:
    img = Image.new("RGB", (32, 32), tuple(rng.randrange(60) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(1 + i % 3):
        x, y, r = rng.randrange(4, 28), rng.randrange(4, 28), rng.randrange(3, 8)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=RGB[rng.choice(COLOURS)])
    img.save(path)
    return path.name


def write_bench(root: Path, n: int = 1000, seed: int = 0) -> None:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = [_image(root / "images" / f"img{i:04d}.png", i, rng) for i in range(n)]
    labels = [
        f"{c} {s} number {i}"
        for i, (c, s) in enumerate((rng.choice(COLOURS), rng.choice(SHAPES)) for _ in range(n))
    ]
    rows_i2t, rows_t2i = [], []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        rng.shuffle(others)
        order = [i] + others[: n - 1]
        rows_i2t.append(
            {
                "qry_text": "<|image_1|>\nRepresent the given image for classification",
                "qry_img_path": images[i],
                "tgt_text": [labels[j] for j in order],
                "tgt_img_path": [""] * n,
            }
        )
        rows_t2i.append(
            {
                "qry_text": f"{T2I_INSTRUCTION} {labels[i]}",
                "qry_img_path": "",
                "tgt_text": ["<|image_1|>\nRepresent the given image."] * n,
                "tgt_img_path": [images[j] for j in order],
            }
        )
    for name, rows in (("Bench-I2T", rows_i2t), ("Bench-T2I", rows_t2i)):
        (root / name).mkdir(exist_ok=True)
        table = pa.table({k: [r[k] for r in rows] for k in rows[0]})
        pq.write_table(table, root / name / "test-00000-of-00001.parquet")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/bench_eval_mmeb")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--output", default=None, help="JSON result (default: print only)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from hardneg.eval import evaluate_mmeb
    from hardneg.models import Embedder

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    write_bench(work / "data", n=args.n)
    write_s = time.perf_counter() - t0
    embedder = Embedder.tiny(seed=0)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "queries": args.n,
        "candidates_per_query": args.n,
        "batch_size": args.batch_size,
        "fixture_write_s": round(write_s, 1),
        "datasets": {},
    }
    for name in ("Bench-I2T", "Bench-T2I"):
        times = {}
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            run = evaluate_mmeb(
                embedder,
                work / "data",
                datasets=[name],
                cache_dir=work / "cache",
                batch_size=args.batch_size,
                show_progress_bar=False,
            )
            times[label] = round(time.perf_counter() - t0, 2)
        r = run.results[name]
        result["datasets"][name] = {
            "cold_s": times["cold"],
            "warm_s": times["warm"],
            "distinct_items_embedded": r.num_distinct_candidates + args.n,
            "items_without_dedup": args.n * args.n + args.n,
            "precision@1": round(r.precision_at_1, 2),
        }
        print(name, result["datasets"][name], flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
