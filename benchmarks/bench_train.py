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

Inputs: scenes of the synthetic set (hardneg.data.synthetic: its captions, its 32 px renderings).

    python -m benchmarks.bench_train            # writes results/bench_train_<machine>_<date>.*
    python -m benchmarks.bench_train --quick --out /tmp/bench   # batches 8 and 16: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics

from hardneg.data.synthetic import ALL_SCENES, render

from benchmarks import common

BATCHES = (32, 64, 128, 256)
THROUGHPUT_BATCHES = (32, 64, 128)
# --quick: batches, throughput batches, chunk, repeats, memory runs per point.
QUICK = ((8, 16), (8,), 4, 2, 1)
PROVIDERS = ("plain", "gradcache")


def _items(n: int, seed: int):
    """n (text query, image target) pairs: synthetic scenes' captions and 32 px renderings."""
    rng = random.Random(seed)
    queries, targets = [], []
    for k in range(n):
        scene = rng.choice(ALL_SCENES)
        queries.append(
            {
                "text": f"Find me an image that matches the given caption: {scene.caption}",
                "image": None,
            }
        )
        targets.append(
            {"text": "Represent the given image.", "image": render(scene, variant=k, seed=seed)}
        )
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

    common.pin_threads(1)
    setup = Setup(batch, chunk)
    # Warm-up at one chunk: lazy initialisation, optimizer state, allocator pools.
    setup.step(provider, chunk)
    return common.measure_call_peak(lambda: setup.step(provider, batch))


def probe_throughput(batch: int, chunk: int, repeats: int) -> dict:

    common.pin_threads(1)
    setup = Setup(batch, chunk)
    timed = common.time_interleaved(
        {p: (lambda p=p: setup.step(p, batch)) for p in PROVIDERS}, repeats=repeats, warmup=1
    )
    return {p: {**t, "samples_per_s": batch / t["median_s"]} for p, t in timed.items()}


def _probe(*args: object) -> dict:
    return common.run_probe("benchmarks.bench_train", [str(a) for a in args])


def _measure(batches, throughput_batches, chunk: int, repeats: int, runs: int):
    """Extra peak MiB per provider and batch (median of `runs` fresh processes: one chunk's
    activations are ~10 MiB, near the noise) and samples/s per throughput batch."""
    # A fixed mmap threshold: tensors above 64 KiB are mapped and unmapped, so RSS follows the
    # live tensors instead of glibc's adaptive heap high-water mark (a few MiB of noise).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

    def memory_probe(provider: str, batch: int) -> dict:
        probe = ("--probe", "memory", "--provider", provider, "--batch", batch, "--chunk", chunk)
        mib = [_probe(*probe)["extra_peak_mib"] for _ in range(runs)]
        return {"extra_peak_mib": statistics.median(mib), "runs_mib": mib}

    memory = {p: {b: memory_probe(p, b) for b in batches} for p in PROVIDERS}
    probe = ("--probe", "throughput", "--chunk", chunk, "--repeats", repeats)
    speed = {b: _probe(*probe, "--batch", b) for b in throughput_batches}
    return memory, speed


def _markdown(record: dict, batches) -> str:
    memory, speed, checks = record["memory_extra_peak_mib"], record["throughput"], record["checks"]
    rows = []
    for b in batches:
        row = [b, memory["plain"][b]["extra_peak_mib"], memory["gradcache"][b]["extra_peak_mib"]]
        if b in speed:
            plain, gc = speed[b]["plain"]["samples_per_s"], speed[b]["gradcache"]["samples_per_s"]
            row += [plain, gc, checks["gradcache_speed_ratio"][b]]
        else:
            row += ["", "", ""]
        rows.append(row)
    header = ["batch", "plain peak MiB", "gradcache peak MiB", "plain samples/s"]
    header += ["gradcache samples/s", "gradcache/plain speed"]
    first, last = batches[0], batches[-1]
    lines = common.markdown_header("bench_train: training step, 1 thread", record["machine"])
    lines += [
        f"Tiny Embedder training step, GradCache chunk {record['chunk']}. Extra peak RSS of one "
        f"step (MiB, fresh process); samples/s median of {record['repeats']} interleaved repeats.",
        "",
        common.markdown_table(header, rows),
        "",
        f"GradCache peak B={last} / B={first}: "
        f"{checks[f'gradcache_peak_{last}_over_{first}']:.2f} (target <= 1.3). Speed ratio "
        "target >= 0.7.",
        "",
        "Reading the speed ratio: GradCache runs every chunk forward twice (the last chunk's "
        "graph is kept, so one forward less) and always at the chunk's size, while the plain "
        "step's GEMMs grow with B. On this tiny model (hidden 64) per-call overheads are a large "
        "share of a 16-row chunk, so the ratio falls as the plain batch grows; with real models "
        "the chunk's GEMMs are large and the ratio approaches (F + B) / (2F + B) for forward "
        "cost F and backward cost B (about 0.75 at B = 2F).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_output_args(parser, "batches 8 and 16, chunk 4, 2 repeats (smoke test)")
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

    batches, throughput_batches, runs = BATCHES, THROUGHPUT_BATCHES, 3
    if args.quick:
        batches, throughput_batches, args.chunk, args.repeats, runs = QUICK
    memory, speed = _measure(batches, throughput_batches, args.chunk, args.repeats, runs)
    gc_mem = {b: memory["gradcache"][b]["extra_peak_mib"] for b in batches}
    first, last = batches[0], batches[-1]
    checks = {
        f"gradcache_peak_{last}_over_{first}": gc_mem[last] / gc_mem[first],
        "gradcache_peak_target": 1.3,
        "gradcache_speed_ratio": {
            b: speed[b]["gradcache"]["samples_per_s"] / speed[b]["plain"]["samples_per_s"]
            for b in throughput_batches
        },
        "gradcache_speed_target": 0.7,
    }
    record = {
        "machine": common.machine_record(),
        "model": "Embedder.tiny (hidden 64, 2+2 layers, 32 px images), vision tower frozen",
        "step": "text queries + image targets, llave symmetric loss, backward, AdamW",
        "chunk": args.chunk,
        "repeats": args.repeats,
        "threads": 1,
        "memory_extra_peak_mib": memory,
        "throughput": speed,
        "checks": checks,
    }
    md = _markdown(record, batches)
    path = common.write_results("bench_train", record, md, out_dir=args.out)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
