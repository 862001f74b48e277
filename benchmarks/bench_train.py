"""Training step of the tiny Embedder with and without GradCache: peak memory and samples/s.

One step = embed B text queries and B image targets, hardneg loss (llave, symmetric), backward,
AdamW update. Providers:
  plain      one forward of each whole stream with grad, loss, backward (memory grows with B);
  gradcache  GradCache with chunks of --chunk rows: a no-grad pass, the loss on cached embeddings,
             then chunk-by-chunk replay with grad (memory of one chunk, ~1.5x the compute).
Model inputs are prepared before timing (the DataLoader's job in training), so the numbers are the
model's.

Peak memory: each (provider, B) runs in a fresh interpreter (benchmarks/common.py): the model, the
optimizer state and the allocator are warmed with a one-chunk step, the peak-RSS counter is reset,
one step at batch B runs, and the extra peak RSS over the RSS before it is reported (median of 3
processes, glibc's mmap threshold fixed at 64 KiB so RSS follows the live tensors).
Throughput: both providers run interleaved in one process per B, median over repeats, 1 thread.

Targets (the train issue): GradCache peak at B=256 within 1.3x of its peak at B=32 (chunk 16);
GradCache at least 0.7x the samples/s of the plain step at a batch both fit.

    python benchmarks/bench_train.py            # writes results/bench_train_<machine>_<date>.*
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

BATCHES = (32, 64, 128, 256)
THROUGHPUT_BATCHES = (32, 64, 128)
PROVIDERS = ("plain", "gradcache")
COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white"]
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star"]


def _items(n: int, seed: int):
    """n (text query, image target) pairs: random coloured 32 px images and short captions."""
    from PIL import Image

    rng = random.Random(seed)
    queries, targets = [], []
    for _ in range(n):
        colour = tuple(rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", (32, 32), colour)
        words = [rng.choice(COLOURS), rng.choice(SHAPES), "on the", rng.choice(["left", "right"])]
        queries.append(
            {
                "text": "Find me an image that matches the given caption: " + " ".join(words),
                "image": None,
            }
        )
        targets.append({"text": "Represent the given image.", "image": image})
    return queries, targets


class Setup:
    """The tiny embedder, its optimizer and prepared inputs for batches of B, in chunks."""

    def __init__(self, batch: int, chunk: int, seed: int = 0) -> None:
        import torch
        from hardneg.models import Embedder

        torch.manual_seed(seed)
        self.embedder = Embedder.tiny(seed=seed).train()
        for name, p in self.embedder.named_parameters():
            if "vision_tower" in name:
                p.requires_grad_(False)  # LLaVE's default
        params = [p for p in self.embedder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.chunk = chunk
        self.inputs = {b: self._prepare(b, seed) for b in {batch, chunk}}

    def _prepare(self, batch: int, seed: int) -> dict:
        queries, targets = _items(batch, seed)
        prep = self.embedder.prepare
        return {
            "whole": {"query": prep(queries, role="query"), "target": prep(targets, role="target")},
            "chunks": {
                "query": [
                    prep(queries[i : i + self.chunk], role="query")
                    for i in range(0, batch, self.chunk)
                ],
                "target": [
                    prep(targets[i : i + self.chunk], role="target")
                    for i in range(0, batch, self.chunk)
                ],
            },
        }

    @staticmethod
    def _loss(embs):
        from hardneg import fused_hardneg_loss

        return fused_hardneg_loss(embs["query"], embs["target"], mode="llave", symmetric=True)

    def step(self, provider: str, batch: int) -> None:
        from hardneg.train.gradcache import gradcache_step

        inputs = self.inputs[batch]
        if provider == "plain":
            embs = {n: self.embedder(**x) for n, x in inputs["whole"].items()}
            self._loss(embs).backward()
        else:
            gradcache_step(lambda x: self.embedder(**x), inputs["chunks"], self._loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def probe_memory(provider: str, batch: int, chunk: int) -> dict:
    import torch

    torch.set_num_threads(1)
    setup = Setup(batch, chunk)
    # Warm-up at one chunk: lazy initialisation, optimizer state, allocator pools.
    setup.step(provider, chunk)
    return common.measure_call_peak(lambda: setup.step(provider, batch))


def probe_throughput(batch: int, chunk: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    setup = Setup(batch, chunk)
    timed = common.time_interleaved(
        {p: (lambda p=p: setup.step(p, batch)) for p in PROVIDERS}, repeats=repeats, warmup=1
    )
    return {p: {**t, "samples_per_s": batch / t["median_s"]} for p, t in timed.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probe", choices=("memory", "throughput"))
    parser.add_argument("--provider", choices=PROVIDERS)
    parser.add_argument("--batch", type=int)
    args = parser.parse_args()
    if args.probe == "memory":
        print(json.dumps(probe_memory(args.provider, args.batch, args.chunk)))
        return
    if args.probe == "throughput":
        print(json.dumps(probe_throughput(args.batch, args.chunk, args.repeats)))
        return

    # A fixed mmap threshold: tensors above 64 KiB are mapped and unmapped, so RSS follows the
    # live tensors instead of glibc's adaptive heap high-water mark (a few MiB of noise).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

    def memory_probe(provider: str, batch: int) -> dict:
        # Median of 3 fresh processes: one chunk's activations are ~10 MiB, near the noise.
        probe = ["--probe", "memory", "--provider", provider, "--batch", str(batch)]
        probe += ["--chunk", str(args.chunk)]
        runs = [
            common.run_probe("benchmarks.bench_train", probe)["extra_peak_mib"] for _ in range(3)
        ]
        return {"extra_peak_mib": statistics.median(runs), "runs_mib": runs}

    memory = {p: {b: memory_probe(p, b) for b in BATCHES} for p in PROVIDERS}
    speed = {
        b: common.run_probe(
            "benchmarks.bench_train",
            [
                "--probe",
                "throughput",
                "--batch",
                str(b),
                "--chunk",
                str(args.chunk),
                "--repeats",
                str(args.repeats),
            ],
        )
        for b in THROUGHPUT_BATCHES
    }
    gc_mem = {b: memory["gradcache"][b]["extra_peak_mib"] for b in BATCHES}
    checks = {
        "gradcache_peak_256_over_32": gc_mem[256] / gc_mem[32],
        "gradcache_peak_target": 1.3,
        "gradcache_speed_ratio": {
            b: speed[b]["gradcache"]["samples_per_s"] / speed[b]["plain"]["samples_per_s"]
            for b in THROUGHPUT_BATCHES
        },
        "gradcache_speed_target": 0.7,
    }
    record = {
        "machine": common.machine_record(),
        "model": "Embedder.tiny (hidden 64, 2+2 layers, 32 px images), vision tower frozen",
        "step": "text queries + image targets, llave symmetric loss, backward, AdamW",
        "chunk": args.chunk,
        "threads": 1,
        "memory_extra_peak_mib": memory,
        "throughput": speed,
        "checks": checks,
    }
    rows = [
        [
            b,
            memory["plain"][b]["extra_peak_mib"],
            gc_mem[b],
            *(
                [
                    speed[b]["plain"]["samples_per_s"],
                    speed[b]["gradcache"]["samples_per_s"],
                    checks["gradcache_speed_ratio"][b],
                ]
                if b in speed
                else ["", "", ""]
            ),
        ]
        for b in BATCHES
    ]
    md = (
        f"# bench_train ({record['machine']['date']}, {record['machine']['cpu']}, 1 thread, "
        f"torch {record['machine']['torch']})\n\n"
        f"Tiny Embedder training step, GradCache chunk {args.chunk}. Extra peak RSS of one step "
        "(MiB, fresh process); samples/s median of "
        f"{args.repeats} interleaved repeats.\n\n"
        + common.markdown_table(
            [
                "batch",
                "plain peak MiB",
                "gradcache peak MiB",
                "plain samples/s",
                "gradcache samples/s",
                "gradcache/plain speed",
            ],
            rows,
        )
        + f"\n\nGradCache peak B=256 / B=32: {checks['gradcache_peak_256_over_32']:.2f} "
        "(target <= 1.3). Speed ratio target >= 0.7.\n\n"
        "Reading the speed ratio: GradCache runs every chunk forward twice (the last chunk's "
        "graph is kept, so one forward less) and always at the chunk's size, while the plain "
        "step's GEMMs grow with B. On this tiny model (hidden 64) per-call overheads are a large "
        "share of a 16-row chunk, so the ratio falls as the plain batch grows; with real models "
        "the chunk's GEMMs are large and the ratio approaches (F + B) / (2F + B) for forward "
        "cost F and backward cost B (about 0.75 at B = 2F).\n"
    )
    path = common.write_results("bench_train", record, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
