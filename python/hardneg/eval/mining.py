"""Offline hard-negative mining on MMEB-train style data: the selection rule and the whole run.

For each subset (and split) of an MMEB-train folder, the queries (one per row) and the candidate
pool, the subset's distinct positives (pos_text, pos_image_path), are embedded once through the
evaluation's embedding cache, split over the ranks (mmeb.embed_items). Each query then gets the k
best-scoring candidates that are
  - neither its positive nor a duplicate of it: the pool is deduplicated with the key the training
    reader gives one target id (data.mmeb_train.target_key: same text and image path), so the
    positive and its duplicates are one pool entry, and that entry is excluded;
  - nor a likely false negative: NV-Retriever's positive-aware "TopK-PercPos" filter (Moreira et
    al., arXiv 2407.15831; their best setting 95%) caps a negative's score at a percentage of the
    positive's score, so candidates scoring above fn_threshold x the positive's score are dropped.
The rows are written to new files in the same layout with neg_text / neg_image_path filled
(mining_io.py), with a summary of the score distributions and of what was filtered.

Legend: N queries (rows of a subset), U distinct candidates, K negatives per query, D embedding dim.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from hardneg.data.images import ImageResolver
from hardneg.eval.cache import EmbeddingCache, ImageDigests, model_fingerprint
from hardneg.eval.mining_io import (
    IMAGE_ROOT_HINT,
    MiningSubset,
    find_mining_subsets,
    markdown_summary,
    negative_columns,
    read_subset,
    score_stats,
    write_subset,
)
from hardneg.eval.mmeb import embed_items

__all__ = [
    "FN_THRESHOLD",
    "MinedNegatives",
    "false_negative_threshold",
    "mine_mmeb_train",
    "mine_negatives",
]

# NV-Retriever's best TopK-PercPos setting: a negative may score at most 95% of the positive.
FN_THRESHOLD = 0.95
# Query rows scored at once: a (rows x U) fp32 block, 400 MB for U = 100K (MMEB's largest pools).
_CHUNK_ROWS = 1024
SUMMARY_NAME = "mining_summary"
RULE = (
    "top-k by cosine, excluding the positive and its duplicates (same text and image) and "
    "candidates scoring above fn_threshold x the positive's score (TopK-PercPos, NV-Retriever, "
    "arXiv 2407.15831)"
)


@dataclass
class MinedNegatives:
    """What mine_negatives chose for N queries.

    index_NK: pool indices of the chosen negatives, best first, -1 where a query has fewer than K;
    score_NK: their scores (NaN at -1); positive_N: the positive's score; filtered_N: candidates
    dropped by the false-negative filter; top1_N: the positive outscores every other candidate."""

    index_NK: Tensor
    score_NK: Tensor
    positive_N: Tensor
    filtered_N: Tensor
    top1_N: Tensor

    @property
    def count_N(self) -> Tensor:
        """Negatives chosen per query."""
        return (self.index_NK >= 0).sum(dim=1)


def false_negative_threshold(positive_N: Tensor, fraction: float) -> Tensor:
    """The highest score a kept negative may have: fraction x the positive's score (TopK-PercPos,
    NV-Retriever, arXiv 2407.15831). Written as positive - (1 - fraction) |positive|, the same
    value for a positive score >= 0 (the paper's case), and still below the positive when its score
    is negative (where fraction x positive would lie above it). fraction = inf: no limit."""
    if math.isinf(fraction):
        return torch.full_like(positive_N, math.inf)
    return positive_N - (1.0 - fraction) * positive_N.abs()


def _check_options(k, fn_threshold) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(fn_threshold, (int, float)) or not fn_threshold > 0:
        raise ValueError(
            f"fn_threshold must be a number > 0 (inf: no filter), got {fn_threshold!r}"
        )


def mine_negatives(
    q_ND: Tensor,
    c_UD: Tensor,
    positive_N: Tensor,
    *,
    k: int,
    fn_threshold: float = FN_THRESHOLD,
    chunk_rows: int = _CHUNK_ROWS,
) -> MinedNegatives:
    """The top-k negatives of each query among the candidates, by s = q . c (cosine for unit
    embeddings), excluding candidate positive_N[i] (the positive, which stands for its duplicates
    too) and every candidate scoring above false_negative_threshold(s_pos, fn_threshold).

    q_ND: (N, D) queries; c_UD: (U, D) candidates; positive_N: (N,) long, each query's positive's
    row of c_UD. The scores are computed in fp32 on q_ND's device, chunk_rows queries at a time
    (the N x U matrix is never held whole). Ties are broken by torch.topk."""
    _check_options(k, fn_threshold)
    if q_ND.ndim != 2 or c_UD.ndim != 2 or q_ND.shape[1] != c_UD.shape[1]:
        raise ValueError(
            f"q_ND {tuple(q_ND.shape)} and c_UD {tuple(c_UD.shape)} must be (N, D) and (U, D)"
        )
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    N, U = q_ND.shape[0], c_UD.shape[0]
    positive_N = torch.as_tensor(positive_N, dtype=torch.long, device=q_ND.device)
    if positive_N.shape != (N,):
        raise ValueError(f"positive_N has shape {tuple(positive_N.shape)}, expected ({N},)")
    if N and (int(positive_N.min()) < 0 or int(positive_N.max()) >= U):
        raise ValueError(f"positive_N holds indices outside [0, {U}) of c_UD")
    c_UD = c_UD.to(device=q_ND.device, dtype=torch.float32)
    kk = min(k, U)
    index_NK = torch.full((N, k), -1, dtype=torch.long)
    score_NK = torch.full((N, k), math.nan, dtype=torch.float32)
    positive_scores, filtered, top1 = [], [], []
    for r0 in range(0, N, chunk_rows):
        q_RD = q_ND[r0 : r0 + chunk_rows].float()
        rows_R = torch.arange(q_RD.shape[0], device=q_RD.device)
        pos_idx_R = positive_N[r0 : r0 + chunk_rows]
        s_RU = q_RD @ c_UD.T  # (R, U)
        pos_R = s_RU[rows_R, pos_idx_R].clone()
        s_RU[rows_R, pos_idx_R] = -math.inf
        top1.append(s_RU.max(dim=1).values < pos_R)  # all -inf when U == 1: True
        drop_RU = s_RU > false_negative_threshold(pos_R, fn_threshold)[:, None]
        filtered.append(drop_RU.sum(dim=1))
        s_RU.masked_fill_(drop_RU, -math.inf)
        values_RK, index_RK = s_RU.topk(kk, dim=1)
        kept_RK = torch.isfinite(values_RK)
        r1 = r0 + q_RD.shape[0]
        index_NK[r0:r1, :kk] = index_RK.masked_fill(~kept_RK, -1).cpu()
        score_NK[r0:r1, :kk] = values_RK.masked_fill(~kept_RK, math.nan).cpu()
        positive_scores.append(pos_R)

    def cat(parts, dtype):
        return torch.cat(parts).cpu() if parts else torch.empty(0, dtype=dtype)

    return MinedNegatives(
        index_NK,
        score_NK,
        cat(positive_scores, torch.float32),
        cat(filtered, torch.long),
        cat(top1, torch.bool),
    )


def subset_summary(data: MiningSubset, mined: MinedNegatives, k: int, files: list[str]) -> dict:
    """The summary entry of one mined subset: sizes, score distributions, what was filtered."""
    count_N = mined.count_N
    hardest_N = mined.score_NK[:, 0]
    return {
        "subset": data.name,
        "split": data.split,
        "files": files,
        "rows": len(data.queries),
        "candidates": len(data.candidates),
        "positive": score_stats(mined.positive_N),
        "negatives": score_stats(mined.score_NK.reshape(-1)),
        "hardest_negative": score_stats(hardest_N),
        "positive_minus_hardest": score_stats(mined.positive_N - hardest_N),
        "positive_top1": round(float(mined.top1_N.float().mean()), 4) if len(count_N) else None,
        "filtered": {
            "candidates": int(mined.filtered_N.sum()),
            "queries": int((mined.filtered_N > 0).sum()),
        },
        "queries_with_fewer_than_k": int((count_N < k).sum()),
        "queries_without_negative": int((count_N == 0).sum()),
    }


def _embed_subset(embedder, data: MiningSubset, common: dict) -> tuple[Tensor, Tensor]:
    """(q_ND, c_UD) on rank 0 (None elsewhere): texts as in the files, no extra instruction."""
    c_UD = embed_items(
        embedder,
        data.candidates,
        [None] * len(data.candidates),
        role="target",
        desc=f"{data.name} candidates",
        **common,
    )
    q_ND = embed_items(
        embedder,
        data.queries,
        [None] * len(data.queries),
        role="query",
        desc=f"{data.name} queries",
        **common,
    )
    return q_ND, c_UD


def mine_mmeb_train(
    embedder,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    k: int,
    subsets: Sequence[str] | None = None,
    splits: Sequence[str] = ("original",),
    fn_threshold: float = FN_THRESHOLD,
    image_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    group=None,
    model_name: str = "",
    show_progress_bar: bool = True,
) -> dict | None:
    """Mine k hard negatives per row of every subset and split under data_root into out_dir.

    out_dir mirrors data_root's files (out_dir/<Subset>/<split>-....parquet, every column kept,
    neg_text / neg_image_path replaced) and receives mining_summary.json and .md. Every subset is
    read and checked (columns, image paths) before anything is embedded. With torch.distributed
    initialised (or `group` given) each rank embeds a shard and rank 0 mines and writes; rank 0
    returns the summary, other ranks None.
    """
    _check_options(k, fn_threshold)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root, out = Path(data_root), Path(out_dir)
    if out.resolve() == root.resolve():
        raise ValueError(
            f"out_dir {str(out)!r} is data_root: the original files are never overwritten; "
            "choose another folder"
        )
    start = time.perf_counter()
    bases = [image_root] if image_root is not None else [root / "images", root]
    resolve = ImageResolver(bases, hint=IMAGE_ROOT_HINT)
    loaded = [
        read_subset(root, name, split, files, resolve)
        for split, name, files in find_mining_subsets(root, subsets, splits)
    ]
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    fingerprint = model_fingerprint(embedder)
    digests = ImageDigests()
    device = getattr(embedder, "device", torch.device("cpu"))
    entries = []
    for data in loaded:
        common = dict(
            cache=EmbeddingCache(cache_dir, dataset=data.name, fingerprint=fingerprint),
            digests=digests,
            batch_size=batch_size,
            group=group,
            show_progress_bar=show_progress_bar,
        )
        q_ND, c_UD = _embed_subset(embedder, data, common)
        if rank != 0:
            continue
        positive_N = torch.tensor(data.positive_index, dtype=torch.long)
        mined = mine_negatives(
            q_ND.to(device), c_UD.to(device), positive_N, k=k, fn_threshold=fn_threshold
        )
        texts, paths = negative_columns(data, mined.index_NK, k)
        files = write_subset(data, texts, paths, root, out, k=k)
        entries.append(subset_summary(data, mined, k, [str(f.relative_to(out)) for f in files]))
    if rank != 0:
        return None
    summary = {
        "model": model_name,
        "fingerprint": fingerprint,
        "data_root": str(root),
        "image_root": str(resolve.base) if resolve.base is not None else None,
        "k": k,
        "fn_threshold": fn_threshold,
        "rule": RULE,
        "splits": list(splits),
        "subsets": entries,
        "seconds": round(time.perf_counter() - start, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{SUMMARY_NAME}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / f"{SUMMARY_NAME}.md").write_text(markdown_summary(summary, out))
    return summary
