"""Time of the MMEB evaluation of the tiny model on 1,000 queries x 1,000 candidates per query.

Two MMEB-shaped data sets, written to --work: "Bench-I2T" (1,000 image queries, each listing all
1,000 labels, ground truth first: classification's shape) and "Bench-T2I" (1,000 caption queries,
each listing 1,000 of 1,000 images: retrieval's shape). A million candidate slots each, 2,000
distinct items each; images and labels are scenes of the synthetic set (hardneg.data.synthetic).
Reports, per data set, the cold run (empty cache: deduplication only), the warm run (every
embedding from the on-disk cache) and the embedding count without deduplication.

    python -m benchmarks.bench_eval_mmeb --work /tmp/bench_eval --threads 2
    python -m benchmarks.bench_eval_mmeb --quick --out /tmp/bench   # 64 x 64: a smoke test
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hardneg.data.synthetic import ALL_SCENES, render

from benchmarks import common

T2I_INSTRUCTION = "Find me an everyday image that matches the given caption:"
QUICK_N = 64


def _image(path: Path, i: int, scene, seed: int) -> str:
    render(scene, variant=i, seed=seed).save(path)
    return path.name


def write_bench(root: Path, n: int = 1000, seed: int = 0) -> None:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    scenes = [rng.choice(ALL_SCENES) for _ in range(n)]
    images = [
        _image(root / "images" / f"img{i:04d}.png", i, sc, seed) for i, sc in enumerate(scenes)
    ]
    labels = [f"{sc.caption} number {i}" for i, sc in enumerate(scenes)]
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


def _markdown(record: dict) -> str:
    rows = [
        [name, d["cold_s"], d["warm_s"], d["distinct_items_embedded"], d["items_without_dedup"]]
        for name, d in record["datasets"].items()
    ]
    header = ["data set", "cold s", "warm s", "items embedded", "items without dedup"]
    lines = common.markdown_header("bench_eval_mmeb: MMEB evaluation", record["machine"])
    lines += [
        f"Embedder.tiny, {record['queries']} queries x {record['candidates_per_query']} "
        f"candidates per data set, batch {record['batch_size']}, {record['threads']} threads. "
        "cold: empty embedding cache (deduplicated items only); warm: every embedding read "
        "from the on-disk cache.",
        "",
        common.markdown_table(header, rows),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_output_args(p, f"{QUICK_N} queries x {QUICK_N} candidates (smoke test)")
    p.add_argument("--work", default="/tmp/bench_eval_mmeb")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args()
    if args.quick:
        args.n = QUICK_N
    common.pin_threads(args.threads)
    from hardneg.eval import evaluate_mmeb
    from hardneg.models import Embedder

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    write_bench(work / "data", n=args.n)
    write_s = time.perf_counter() - t0
    embedder = Embedder.tiny(seed=0)
    result = {
        "machine": common.machine_record(),
        "threads": args.threads,
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
    md = _markdown(result)
    path = common.write_results("bench_eval_mmeb", result, md, out_dir=args.out)
    print(md)
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
