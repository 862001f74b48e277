"""Retrieval P@1 of a trained embedder on an MMEB-eval style folder, with the chance level.

Scoring is hardneg.eval's (candidate 0 is the ground truth, P@1 in percent). Chance is what a
random ranking scores: 1/K for a query with K candidates, averaged over queries, so "well above
chance" can be judged per dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

from hardneg.train import distributed as dist_util


def evaluate_retrieval(
    embedder,
    root: str | os.PathLike,
    *,
    datasets: list[str] | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    show_progress_bar: bool = False,
) -> dict | None:
    """{"datasets": {name: {"precision@1", "chance", "num_queries"}}, "mean_precision@1",
    "mean_chance", "report": leaderboard} on rank 0 (None elsewhere). Every rank must call it:
    the embedding is sharded over the ranks."""
    from hardneg.eval import evaluate_mmeb

    evaluation = evaluate_mmeb(
        embedder,
        Path(root),
        datasets=datasets or None,
        batch_size=batch_size,
        cache_dir=cache_dir,
        group=dist_util.loss_group(),
        show_progress_bar=show_progress_bar,
    )
    if evaluation is None:
        return None
    per = {}
    for name, result in evaluation.results.items():
        chance = float((1.0 / result.num_candidates_N.double()).mean() * 100)
        per[name] = {
            "precision@1": round(result.precision_at_1, 2),
            "chance": round(chance, 2),
            "num_queries": int(result.scores_NK.shape[0]),
        }
    n = len(per)
    return {
        "metric": "precision@1 (%), candidate 0 is the ground truth",
        "datasets": per,
        "mean_precision@1": round(sum(d["precision@1"] for d in per.values()) / n, 2),
        "mean_chance": round(sum(d["chance"] for d in per.values()) / n, 2),
        "report": evaluation.report(),
    }
