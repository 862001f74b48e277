"""MMEB evaluation: embed each distinct item once, score Precision@1, report.

Protocol (VLM2Vec's MMEB, facts.md): each row is a query and a candidate list whose entry 0 is the
ground truth; a row is correct when its best-scoring candidate is entry 0 (the first maximum, as
np.argmax in VLM2Vec's eval.py). Scores are percentages; meta-task, IND, OOD and overall scores are
plain means of dataset scores (tasks.py). Beside that number the report gives a tie-aware P@1 and
warns when many rows have a tied top (scoring.py). Reading and validating the files: mmeb_reader.py.

Work: candidates are deduplicated by (text, image) at load time, so a classification set with 1,000
queries x 1,000 classes embeds 1,000 labels once, not a million times. Embeddings go through the
on-disk cache (cache.py). With a process group, the missing items are split round-robin over the
ranks (in length order, so batches pad little), gathered on rank 0, and rank 0 scores.

Legend: N queries, U distinct candidates, K candidates per query (padded), D embedding dim.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from hardneg.eval.cache import EmbeddingCache, ImageDigests, item_key, model_fingerprint
from hardneg.eval.mmeb_reader import (
    COLUMNS,
    INSTRUCTION_POLICIES,
    MMEBDataset,
    MMEBFormatError,
    list_datasets,
    load_dataset,
)
from hardneg.eval.scoring import (
    TIE_ATOL,
    candidate_index_tensor,
    leaderboard,
    markdown_table,
    precision_at_1,
    score_candidates,
    tie_aware_precision_at_1,
    tie_warning,
    tied_top_fraction,
)
from hardneg.eval.tasks import MMEBTask

__all__ = [
    "COLUMNS",
    "INSTRUCTION_POLICIES",
    "DatasetResult",
    "MMEBDataset",
    "MMEBEvaluation",
    "MMEBFormatError",
    "embed_items",
    "evaluate_mmeb",
    "leaderboard",
    "list_datasets",
    "load_dataset",
    "markdown_table",
    "precision_at_1",
    "score_candidates",
]

log = logging.getLogger(__name__)

# Items embedded between two cache flushes, in batches: what an interruption can lose at most.
_FLUSH_BATCHES = 8


@dataclass
class DatasetResult:
    """Scores of one dataset: scores_NK[i, k] = cos(query i, its k-th candidate), -inf padding;
    candidate_index_NK[i, k] the distinct candidate behind it (-1 padding)."""

    name: str
    task: MMEBTask | None
    scores_NK: Tensor
    num_candidates_N: Tensor
    num_distinct_candidates: int
    candidate_index_NK: Tensor
    placeholders_stripped: dict[str, int] = field(default_factory=dict)
    instructions_added: dict[str, int] = field(default_factory=dict)

    @property
    def precision_at_1(self) -> float:
        """VLM2Vec's P@1 (a tie at the top counts as correct)."""
        return precision_at_1(self.scores_NK)

    @property
    def precision_at_1_tie_aware(self) -> float:
        return tie_aware_precision_at_1(self.scores_NK, self.candidate_index_NK, atol=TIE_ATOL)

    @property
    def tied_top_fraction(self) -> float:
        return tied_top_fraction(self.scores_NK, self.candidate_index_NK, atol=TIE_ATOL)

    @property
    def warning(self) -> str | None:
        return tie_warning(
            self.name, self.tied_top_fraction, self.precision_at_1, self.precision_at_1_tie_aware
        )


@dataclass
class MMEBEvaluation:
    """What rank 0 gets back: per-dataset scores, and the leaderboard report built from them."""

    results: dict[str, DatasetResult]
    fingerprint: str
    split: str
    model_name: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict:
        report = leaderboard(
            {n: r.precision_at_1 for n, r in self.results.items()},
            tie_aware={n: r.precision_at_1_tie_aware for n, r in self.results.items()},
            tied_fraction={n: round(r.tied_top_fraction, 4) for n, r in self.results.items()},
            num_queries={n: int(r.scores_NK.shape[0]) for n, r in self.results.items()},
            model_name=self.model_name,
            fingerprint=self.fingerprint,
            split=self.split,
            warnings=[r.warning for r in self.results.values() if r.warning],
        )
        for name, r in self.results.items():
            report["datasets"][name]["placeholders_stripped"] = dict(r.placeholders_stripped)
            report["datasets"][name]["instructions_added"] = dict(r.instructions_added)
        return report


# ---------------------------------------------------------------------------------------------
# Embedding through the cache, sharded over ranks
# ---------------------------------------------------------------------------------------------


def _rank_world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _encode(embedder, items: list[dict], instructions: list[str | None], role: str, batch_size):
    """Embed items; the ones with and without an instruction go in separate encode calls."""
    groups = {
        True: [i for i, ins in enumerate(instructions) if ins],
        False: [i for i, ins in enumerate(instructions) if not ins],
    }
    out: list[Tensor | None] = [None] * len(items)
    for with_instruction, idx in groups.items():
        if not idx:
            continue
        emb_ND = embedder.encode(
            [items[i] for i in idx],
            role=role,
            batch_size=batch_size,
            show_progress_bar=False,
            instructions=[instructions[i] for i in idx] if with_instruction else None,
        )
        for j, i in enumerate(idx):
            out[i] = emb_ND[j]
    return torch.stack(out).float().cpu()


def embed_items(
    embedder,
    items: list[dict],
    instructions: list[str | None],
    *,
    role: str,
    cache: EmbeddingCache,
    digests: ImageDigests,
    batch_size: int = 32,
    group=None,
    desc: str = "",
    show_progress_bar: bool = True,
) -> Tensor | None:
    """(n, D) embeddings of items on rank 0 (None on other ranks); only what the cache lacks is
    embedded, each distinct key once, split over the ranks of `group`."""
    rank, world = _rank_world(group)
    keys = [
        item_key(role, ins, it["text"], digests(it["image"]))
        for it, ins in zip(items, instructions, strict=True)
    ]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    missing = [k for k in first if k not in cache]
    if world > 1:
        # Rank 0's view decides, so every rank agrees on the work list even if caches differ.
        shared = [missing]
        dist.broadcast_object_list(shared, group=group, group_src=0)
        missing = shared[0]

    def cost(k: str):
        item = items[first[k]]
        return (
            item["image"] is not None,
            instructions[first[k]] is not None,
            len(item["text"] or ""),
        )

    mine = sorted(missing, key=cost)[rank::world]
    todo = [k for k in mine if k not in cache]
    flush = max(1, batch_size * _FLUSH_BATCHES)
    with tqdm(
        total=len(todo), desc=desc, unit="item", disable=not show_progress_bar or rank != 0
    ) as bar:
        for c0 in range(0, len(todo), flush):
            chunk = todo[c0 : c0 + flush]
            idx = [first[k] for k in chunk]
            emb_ND = _encode(
                embedder, [items[i] for i in idx], [instructions[i] for i in idx], role, batch_size
            )
            cache.add(chunk, emb_ND)
            bar.update(len(chunk))
    if world > 1:
        payload = (mine, cache.get(mine) if mine else None)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(payload, gathered, group=group, group_dst=0)
        if rank != 0:
            return None
        cache.reload()  # on a shared file system the other ranks' parts are already there
        for their_keys, their_emb in gathered:
            if their_keys:
                cache.add(their_keys, their_emb)
    return cache.get(keys)


# ---------------------------------------------------------------------------------------------
# The whole protocol
# ---------------------------------------------------------------------------------------------


def evaluate_mmeb(
    embedder,
    data_root: str | os.PathLike,
    *,
    datasets: Sequence[str] | None = None,
    split: str = "test",
    image_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    instructions: str = "none",
    max_queries: int | None = None,
    group=None,
    model_name: str = "",
    show_progress_bar: bool = True,
) -> MMEBEvaluation | None:
    """Evaluate `embedder` (anything with Embedder.encode) on MMEB-eval style data.

    Every dataset is read and validated first, so a malformed row fails the run before any
    embedding. Texts are embedded as in the files unless `instructions` says otherwise
    (mmeb_reader.INSTRUCTION_POLICIES). With torch.distributed initialised (or `group` given)
    each rank embeds a shard and rank 0 scores; rank 0 returns the evaluation, other ranks None.
    A dataset with many tied top scores is reported with a warning (logged, and in the report).
    """
    names = list(datasets) if datasets else list_datasets(data_root, split=split)
    if not names:
        raise FileNotFoundError(f"no dataset with {split}*.parquet/.jsonl/.json under {data_root}")
    loaded = [
        load_dataset(
            data_root,
            n,
            split=split,
            image_root=image_root,
            instructions=instructions,
            max_queries=max_queries,
        )
        for n in names
    ]
    rank, _ = _rank_world(group)
    was_training = getattr(embedder, "training", False)
    if hasattr(embedder, "eval"):
        embedder.eval()
    fingerprint = model_fingerprint(embedder)
    digests = ImageDigests()
    results, timings = {}, {}
    try:
        for data in loaded:
            start = time.perf_counter()
            cache = EmbeddingCache(cache_dir, dataset=data.name, fingerprint=fingerprint)
            common = dict(
                cache=cache,
                digests=digests,
                batch_size=batch_size,
                group=group,
                show_progress_bar=show_progress_bar,
            )
            c_UD = embed_items(
                embedder,
                data.candidates,
                data.candidate_instructions,
                role="target",
                desc=f"{data.name} candidates",
                **common,
            )
            q_ND = embed_items(
                embedder,
                data.queries,
                data.query_instructions,
                role="query",
                desc=f"{data.name} queries",
                **common,
            )
            if rank == 0:
                results[data.name] = _score(data, q_ND, c_UD)
                timings[data.name] = time.perf_counter() - start
    finally:
        if hasattr(embedder, "train"):
            embedder.train(was_training)
    if rank != 0:
        return None
    return MMEBEvaluation(results, fingerprint, split, model_name=model_name, timings_s=timings)


def _score(data: MMEBDataset, q_ND: Tensor, c_UD: Tensor) -> DatasetResult:
    scores_NK, lengths_N = score_candidates(q_ND, c_UD, data.candidate_index)
    result = DatasetResult(
        data.name,
        data.task,
        scores_NK,
        lengths_N,
        len(data.candidates),
        candidate_index_tensor(data.candidate_index)[0],
        placeholders_stripped=dict(data.placeholders_stripped),
        instructions_added=dict(data.instructions_added),
    )
    if result.warning:
        log.warning("!" * 20 + " %s", result.warning)
    return result
