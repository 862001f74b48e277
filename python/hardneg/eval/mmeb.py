"""MMEB evaluation: read MMEB-eval rows from disk, embed each distinct item once, score Precision@1.

Protocol (VLM2Vec's MMEB, facts.md): each row is a query and a candidate list whose entry 0 is the
ground truth; a row is correct when its best-scoring candidate is entry 0 (torch.argmax, so a tie
goes to the lowest index, as the reference np.argmax evaluation does). Scores are percentages;
meta-task, IND, OOD and overall scores are plain means of dataset scores (tasks.py).

Layout read: ROOT/<Dataset>/<split>*.parquet (the Hugging Face snapshot of TIGER-Lab/MMEB-eval) or
<split>*.jsonl / <split>*.json, rows {qry_text, qry_img_path, tgt_text: list, tgt_img_path: list}
with "" for "no text" / "no image". Image paths are relative to --image-root, else ROOT/images,
else ROOT.

Work: candidates are deduplicated by (text, image) at load time, so a classification set with 1,000
queries x 1,000 classes embeds 1,000 labels once, not a million times. Embeddings go through the
on-disk cache (cache.py). With a process group, the missing items are split round-robin over the
ranks (in length order, so batches pad little), gathered on rank 0, and rank 0 scores.

Legend: N queries, U distinct candidates, K candidates per query (padded), D embedding dim.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from hardneg.eval.cache import EmbeddingCache, ImageDigests, item_key, model_fingerprint
from hardneg.eval.tasks import (
    DISTRIBUTIONS,
    EXPECTED_COUNTS,
    META_TASK_HEADERS,
    META_TASKS,
    MMEB_TASKS,
    MMEBTask,
    find_task,
    needs_instruction,
)

INSTRUCTION_POLICIES = ("auto", "always", "never")
_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
# Items embedded between two cache flushes, in batches: what an interruption can lose at most.
_FLUSH_BATCHES = 8
# Bound on the (rows x U) similarity block scored at once, in elements (64 MiB of fp32).
_SCORE_BLOCK = 2**24


class MMEBFormatError(ValueError):
    """A malformed MMEB-eval file or row; the message names the dataset, the row and the field."""


@dataclass
class MMEBDataset:
    """One evaluation dataset, candidates deduplicated.

    queries: N items {"text", "image"}; candidates: U distinct items; candidate_index[i]: indices
    into candidates of row i's list, [0] the ground truth. *_instructions: the instruction given
    to the embedder per item (None: the text already carries it, or the dataset has none).
    """

    name: str
    task: MMEBTask | None
    files: list[Path]
    queries: list[dict]
    query_instructions: list[str | None]
    candidates: list[dict]
    candidate_instructions: list[str | None]
    candidate_index: list[list[int]]


@dataclass
class DatasetResult:
    """Scores of one dataset: scores_NK[i, k] = cos(query i, its k-th candidate), -inf padding."""

    name: str
    task: MMEBTask | None
    scores_NK: Tensor
    num_candidates_N: Tensor
    num_distinct_candidates: int

    @property
    def precision_at_1(self) -> float:
        return precision_at_1(self.scores_NK)


@dataclass
class MMEBEvaluation:
    """What rank 0 gets back: per-dataset scores, and the leaderboard report built from them."""

    results: dict[str, DatasetResult]
    fingerprint: str
    split: str
    model_name: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict:
        return leaderboard(
            {n: r.precision_at_1 for n, r in self.results.items()},
            num_queries={n: int(r.scores_NK.shape[0]) for n, r in self.results.items()},
            model_name=self.model_name,
            fingerprint=self.fingerprint,
            split=self.split,
        )


# ---------------------------------------------------------------------------------------------
# Reading MMEB-eval files
# ---------------------------------------------------------------------------------------------


def _data_files(root: Path, name: str, split: str) -> list[Path]:
    folder = root / name
    files = []
    for ext in ("parquet", "jsonl", "json"):
        files += sorted(folder.glob(f"{split}*.{ext}"))
    return files


def list_datasets(data_root: str | os.PathLike, *, split: str = "test") -> list[str]:
    """Dataset folders under data_root holding a <split>*.parquet / .jsonl / .json file, MMEB
    datasets first (in MMEB order), then the others alphabetically."""
    root = Path(data_root)
    names = [p.name for p in root.iterdir() if p.is_dir() and _data_files(root, p.name, split)]
    mmeb_order = {n: i for i, n in enumerate(MMEB_TASKS)}

    def order(name: str):
        task = find_task(name)
        return (0, mmeb_order[task.name], name) if task else (1, 0, name)

    return sorted(names, key=order)


def _read_columns(path: Path) -> dict[str, list]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return {c: table.column(c).to_pylist() for c in _COLUMNS if c in table.column_names}
    with open(path) as f:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = json.load(f)
    present = {c for r in rows for c in r}
    return {c: [r.get(c) for r in rows] for c in _COLUMNS if c in present}


class _ImageResolver:
    """Relative image path -> existing absolute path, memoised; None when no base has it."""

    def __init__(self, bases: Sequence[Path]):
        self.bases = list(bases)
        self._found: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if path not in self._found:
            candidates = [Path(path)] if os.path.isabs(path) else [b / path for b in self.bases]
            self._found[path] = next((str(c) for c in candidates if c.is_file()), None)
        return self._found[path]


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def load_dataset(
    data_root: str | os.PathLike,
    name: str,
    *,
    split: str = "test",
    image_root: str | os.PathLike | None = None,
    instructions: str = "auto",
    max_queries: int | None = None,
) -> MMEBDataset:
    """Read and validate one dataset (every row, every image path) before anything is embedded.

    instructions: "auto" gives an MMEB dataset's instruction to items whose text does not already
    start with it, "always" to every item, "never" to none.
    Raises MMEBFormatError naming the dataset, row and field of the first malformed row.
    """
    if instructions not in INSTRUCTION_POLICIES:
        raise ValueError(
            f"instructions must be one of {INSTRUCTION_POLICIES}, got {instructions!r}"
        )
    root = Path(data_root)
    files = _data_files(root, name, split)
    if not files:
        raise FileNotFoundError(
            f"dataset {name!r}: no {split}*.parquet, {split}*.jsonl or {split}*.json under "
            f"{root / name}"
        )
    bases = [Path(image_root)] if image_root is not None else [root / "images", root]
    resolve = _ImageResolver(bases)
    task = find_task(name)

    def instruction_for(text: str | None, instruction: str) -> str | None:
        if instructions == "never" or not instruction:
            return None
        if instructions == "always" or needs_instruction(text, instruction):
            return instruction
        return None

    def image_of(value, row: int, what: str) -> str | None:
        if _blank(value):
            return None
        if not isinstance(value, str):
            raise MMEBFormatError(f"dataset {name!r} row {row}: {what} is {value!r}, not a path")
        found = resolve(value)
        if found is None:
            raise MMEBFormatError(
                f"dataset {name!r} row {row}: {what} {value!r} not found under "
                f"{', '.join(str(b) for b in resolve.bases)}"
            )
        return found

    queries, query_instructions = [], []
    candidates, candidate_instructions, candidate_index = [], [], []
    candidate_ids: dict[tuple, int] = {}
    row = 0
    for path in files:
        columns = _read_columns(path)
        if "tgt_text" not in columns and "tgt_img_path" not in columns:
            raise MMEBFormatError(
                f"dataset {name!r}: {path} has neither tgt_text nor tgt_img_path "
                f"(columns: {sorted(columns)})"
            )
        n = len(next(iter(columns.values()))) if columns else 0
        for i in range(n):
            if max_queries is not None and row >= max_queries:
                break
            q_text = columns.get("qry_text", [None] * n)[i]
            q_image = image_of(columns.get("qry_img_path", [None] * n)[i], row, "qry_img_path")
            if _blank(q_text) and q_image is None:
                raise MMEBFormatError(f"dataset {name!r} row {row}: query has no text and no image")
            t_texts = columns.get("tgt_text", [None] * n)[i]
            t_images = columns.get("tgt_img_path", [None] * n)[i]
            t_texts = [None] * len(t_images or []) if t_texts is None else list(t_texts)
            t_images = [None] * len(t_texts) if t_images is None else list(t_images)
            if len(t_texts) != len(t_images):
                raise MMEBFormatError(
                    f"dataset {name!r} row {row}: tgt_text has {len(t_texts)} entries but "
                    f"tgt_img_path has {len(t_images)}"
                )
            if not t_texts:
                raise MMEBFormatError(f"dataset {name!r} row {row}: empty candidate list")
            index = []
            for k, (t_text, t_image) in enumerate(zip(t_texts, t_images, strict=True)):
                image = image_of(t_image, row, f"tgt_img_path[{k}]")
                text = None if _blank(t_text) else t_text
                if text is None and image is None:
                    raise MMEBFormatError(
                        f"dataset {name!r} row {row}: candidate {k} has no text and no image"
                    )
                key = (text, image)
                if key not in candidate_ids:
                    candidate_ids[key] = len(candidates)
                    candidates.append({"text": text, "image": image})
                    candidate_instructions.append(
                        instruction_for(text, task.target_instruction if task else "")
                    )
                index.append(candidate_ids[key])
            text = None if _blank(q_text) else q_text
            queries.append({"text": text, "image": q_image})
            query_instructions.append(instruction_for(text, task.query_instruction if task else ""))
            candidate_index.append(index)
            row += 1
    if not queries:
        raise MMEBFormatError(f"dataset {name!r}: no rows in {', '.join(map(str, files))}")
    return MMEBDataset(
        name=name,
        task=task,
        files=files,
        queries=queries,
        query_instructions=query_instructions,
        candidates=candidates,
        candidate_instructions=candidate_instructions,
        candidate_index=candidate_index,
    )


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
# Scoring and aggregation
# ---------------------------------------------------------------------------------------------


def score_candidates(
    query_ND: Tensor, candidate_UD: Tensor, candidate_index: list[list[int]]
) -> tuple[Tensor, Tensor]:
    """scores_NK[i, k] = query_i . candidate_{index[i][k]} (-inf beyond row i's list) and the
    list lengths (N,). Similarities are taken against the U distinct candidates in row blocks,
    then gathered, so no N x K x D tensor exists."""
    lengths_N = torch.tensor([len(ix) for ix in candidate_index], dtype=torch.long)
    idx_NK = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(ix, dtype=torch.long) for ix in candidate_index], batch_first=True
    )
    valid_NK = torch.arange(idx_NK.shape[1])[None, :] < lengths_N[:, None]
    scores_NK = torch.empty(idx_NK.shape, dtype=torch.float32)
    q_ND, c_UD = query_ND.float(), candidate_UD.float()
    rows = max(1, _SCORE_BLOCK // max(1, c_UD.shape[0]))
    for r0 in range(0, q_ND.shape[0], rows):
        s_RU = q_ND[r0 : r0 + rows] @ c_UD.T  # (R, D) x (D, U) -> (R, U)
        scores_NK[r0 : r0 + rows] = s_RU.gather(1, idx_NK[r0 : r0 + rows])
    return scores_NK.masked_fill(~valid_NK, float("-inf")), lengths_N


def precision_at_1(scores_NK: Tensor) -> float:
    """Percentage of rows whose best candidate is column 0 (ties go to the lowest index)."""
    return float((scores_NK.argmax(dim=1) == 0).double().mean() * 100)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def leaderboard(
    scores: dict[str, float],
    *,
    num_queries: dict[str, int] | None = None,
    model_name: str = "",
    fingerprint: str = "",
    split: str = "test",
) -> dict:
    """Leaderboard-style report from per-dataset P@1 (percent).

    MMEB datasets (by name, case and separators ignored) count toward their meta-task, IND/OOD and
    overall means; every group reports how many of its datasets were present, so a partial run is
    never mistaken for a full one. Other datasets are averaged under "other" only.
    """
    datasets, groups = {}, {g: [] for g in (*META_TASKS, *DISTRIBUTIONS, "overall", "other")}
    for name, score in scores.items():
        task = find_task(name)
        datasets[name] = {
            "precision@1": round(score, 4),
            "num_queries": (num_queries or {}).get(name),
            "meta_task": task.meta_task if task else "other",
            "distribution": task.distribution if task else None,
        }
        if task is None:
            groups["other"].append(score)
            continue
        for g in (task.meta_task, task.distribution, "overall"):
            groups[g].append(score)

    def summary(g: str) -> dict:
        mean = _mean(groups[g])
        return {
            "score": None if mean is None else round(mean, 4),
            "num_datasets": len(groups[g]),
            "expected": EXPECTED_COUNTS.get(g),
        }

    return {
        "model": model_name,
        "fingerprint": fingerprint,
        "split": split,
        "metric": "precision@1 (%)",
        "complete": len(groups["overall"]) == EXPECTED_COUNTS["overall"],
        "meta_tasks": {m: summary(m) for m in META_TASKS},
        "IND": summary("IND"),
        "OOD": summary("OOD"),
        "overall": summary("overall"),
        "other": {**summary("other"), "expected": None},
        "datasets": datasets,
    }


def _fmt(value: float | None) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"
    )


def markdown_table(report: dict) -> str:
    """The leaderboard row (Cls / VQA / Ret / Grd / IND / OOD / Overall, "n/expected" datasets
    under each) and a per-dataset table."""
    heads = [META_TASK_HEADERS[m] for m in META_TASKS] + ["IND", "OOD", "Overall"]
    summaries = [report["meta_tasks"][m] for m in META_TASKS]
    summaries += [report["IND"], report["OOD"], report["overall"]]
    if report["other"]["num_datasets"]:
        heads.append("Other")
        summaries.append(report["other"])
    lines = [
        "| Model | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(heads),
        f"| {report['model'] or '-'} | " + " | ".join(_fmt(s["score"]) for s in summaries) + " |",
        "| datasets | "
        + " | ".join(
            f"{s['num_datasets']}/{s['expected']}" if s["expected"] else str(s["num_datasets"])
            for s in summaries
        )
        + " |",
        "",
        "| Dataset | Meta-task | Split | Queries | P@1 |",
        "|---|---|---|---:|---:|",
    ]
    for name, d in report["datasets"].items():
        lines.append(
            f"| {name} | {d['meta_task']} | {d['distribution'] or '-'} | "
            f"{d['num_queries'] if d['num_queries'] is not None else '-'} | "
            f"{_fmt(d['precision@1'])} |"
        )
    return "\n".join(lines) + "\n"


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
    instructions: str = "auto",
    max_queries: int | None = None,
    group=None,
    model_name: str = "",
    show_progress_bar: bool = True,
) -> MMEBEvaluation | None:
    """Evaluate `embedder` (anything with Embedder.encode) on MMEB-eval style data.

    Every dataset is read and validated first, so a malformed row fails the run before any
    embedding. With torch.distributed initialised (or `group` given) each rank embeds a shard
    and rank 0 scores; rank 0 returns the evaluation, other ranks None.
    """
    import time

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
                scores_NK, lengths_N = score_candidates(q_ND, c_UD, data.candidate_index)
                results[data.name] = DatasetResult(
                    data.name, data.task, scores_NK, lengths_N, len(data.candidates)
                )
                timings[data.name] = time.perf_counter() - start
    finally:
        if hasattr(embedder, "train"):
            embedder.train(was_training)
    if rank != 0:
        return None
    return MMEBEvaluation(results, fingerprint, split, model_name=model_name, timings_s=timings)
