"""MMEB scoring: Precision@1 (VLM2Vec's rule and a tie-aware one) and the leaderboard report.

VLM2Vec's rule (eval.py + evaluation/eval_utils.get_pred; LLaVE's model_embed.py is the same): a
row is correct when np.argmax of its candidates' cosines is 0, candidate 0 being the ground truth.
np.argmax returns the first maximum, so a tie at the top counts as correct, and a collapsed model
(every embedding equal) scores 100%. `precision_at_1` is that number, kept for comparability.

`tie_aware_precision_at_1` shares a tie fairly: a row whose top score is reached by T distinct
candidates, the ground truth among them, earns 1/T (a copy of the ground truth later in its own
list is the ground truth, not a competitor). Scores within `atol` of the row's maximum count as
tied: the same input embedded in two batches differs by fp32 rounding (~1e-7 in cosine), which is
not a preference. `tie_stats` gives the fraction of rows with a tied top, for the warning.

Legend: N queries, K candidates per query (padded), U distinct candidates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hardneg.eval.tasks import (
    DISTRIBUTIONS,
    EXPECTED_COUNTS,
    META_TASK_HEADERS,
    META_TASKS,
    find_task,
)

# Two cosines closer than this are a tie (fp32 rounding of the same vector is ~1e-7).
TIE_ATOL = 1e-6
# Above this fraction of rows with a tied top, the report warns that P@1 is not trustworthy.
TIE_WARN_FRACTION = 0.05
# Bound on the (rows x U) similarity block scored at once, in elements (64 MiB of fp32).
_SCORE_BLOCK = 2**24


def candidate_index_tensor(candidate_index: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Per-row candidate lists -> (N, K) long tensor padded with -1, and the lengths (N,)."""
    lengths_N = torch.tensor([len(ix) for ix in candidate_index], dtype=torch.long)
    idx_NK = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(ix, dtype=torch.long) for ix in candidate_index],
        batch_first=True,
        padding_value=-1,
    )
    return idx_NK, lengths_N


def score_candidates(
    query_ND: Tensor, candidate_UD: Tensor, candidate_index: list[list[int]]
) -> tuple[Tensor, Tensor]:
    """scores_NK[i, k] = query_i . candidate_{index[i][k]} (-inf beyond row i's list) and the
    list lengths (N,). Similarities are taken against the U distinct candidates in row blocks,
    then gathered, so no N x K x D tensor exists."""
    idx_NK, lengths_N = candidate_index_tensor(candidate_index)
    valid_NK = idx_NK >= 0
    scores_NK = torch.empty(idx_NK.shape, dtype=torch.float32)
    q_ND, c_UD = query_ND.float(), candidate_UD.float()
    rows = max(1, _SCORE_BLOCK // max(1, c_UD.shape[0]))
    for r0 in range(0, q_ND.shape[0], rows):
        s_RU = q_ND[r0 : r0 + rows] @ c_UD.T  # (R, D) x (D, U) -> (R, U)
        scores_NK[r0 : r0 + rows] = s_RU.gather(1, idx_NK[r0 : r0 + rows].clamp_min(0))
    return scores_NK.masked_fill(~valid_NK, float("-inf")), lengths_N


def precision_at_1(scores_NK: Tensor) -> float:
    """VLM2Vec's P@1 in percent: rows whose first maximum is column 0 (a tie counts as right)."""
    return float((scores_NK.argmax(dim=1) == 0).double().mean() * 100)


def _top_ties(scores_NK: Tensor, idx_NK: Tensor, atol: float) -> tuple[Tensor, Tensor]:
    """Per row: the number of distinct candidates at the top (within atol), and whether the
    ground truth (candidate 0's distinct item) is among them."""
    valid_NK = idx_NK >= 0
    top_N = scores_NK.masked_fill(~valid_NK, float("-inf")).max(dim=1).values
    at_top_NK = valid_NK & (scores_NK >= top_N[:, None] - atol)
    ids_NK = torch.where(at_top_NK, idx_NK, -1).sort(dim=1).values
    new_NK = torch.ones_like(ids_NK, dtype=torch.bool)
    new_NK[:, 1:] = ids_NK[:, 1:] != ids_NK[:, :-1]
    distinct_N = (new_NK & (ids_NK >= 0)).sum(dim=1)
    gt_at_top_N = (at_top_NK & (idx_NK == idx_NK[:, :1])).any(dim=1)
    return distinct_N, gt_at_top_N


def tie_aware_precision_at_1(scores_NK: Tensor, idx_NK: Tensor, *, atol: float = TIE_ATOL) -> float:
    """P@1 in percent with a tie at the top shared: 1/T per row when the ground truth is one of
    the T distinct candidates within atol of the row's best score, else 0. idx_NK: the distinct
    candidate id of each entry (-1 padding), so duplicates of the ground truth are not rivals."""
    distinct_N, gt_at_top_N = _top_ties(scores_NK, idx_NK, atol)
    credit_N = gt_at_top_N.double() / distinct_N.clamp_min(1).double()
    return float(credit_N.mean() * 100)


def tied_top_fraction(scores_NK: Tensor, idx_NK: Tensor, *, atol: float = TIE_ATOL) -> float:
    """Fraction of rows whose best score is shared by two or more distinct candidates."""
    distinct_N, _ = _top_ties(scores_NK, idx_NK, atol)
    return float((distinct_N > 1).double().mean())


def tie_warning(name: str, tied: float, p1: float, p1_tie_aware: float) -> str | None:
    """The warning text when more than TIE_WARN_FRACTION of a dataset's rows have a tied top."""
    if tied <= TIE_WARN_FRACTION:
        return None
    return (
        f"dataset {name}: {tied:.0%} of rows have their top score tied between distinct "
        f"candidates (collapsed or saturated embeddings?). VLM2Vec's rule counts a tie as "
        f"correct: P@1 {p1:.1f} (VLM2Vec-compatible) vs {p1_tie_aware:.1f} with ties shared; "
        "by VLM2Vec's rule a model whose embeddings are all equal scores 100"
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def leaderboard(
    scores: dict[str, float],
    *,
    tie_aware: dict[str, float] | None = None,
    tied_fraction: dict[str, float] | None = None,
    num_queries: dict[str, int] | None = None,
    model_name: str = "",
    fingerprint: str = "",
    split: str = "test",
    warnings: list[str] | None = None,
) -> dict:
    """Leaderboard-style report from per-dataset P@1 (percent; VLM2Vec's rule), with the tie-aware
    P@1 beside it when given.

    MMEB datasets (by name, case and separators ignored) count toward their meta-task, IND/OOD and
    overall means; every group reports how many of its datasets were present, so a partial run is
    never mistaken for a full one. Other datasets are averaged under "other" only.
    """
    groups = {g: [] for g in (*META_TASKS, *DISTRIBUTIONS, "overall", "other")}
    groups_ta = {g: [] for g in groups}
    datasets = {}
    for name, score in scores.items():
        task = find_task(name)
        ta = (tie_aware or {}).get(name)
        datasets[name] = {
            "precision@1": round(score, 4),
            "precision@1_tie_aware": None if ta is None else round(ta, 4),
            "tied_top_fraction": (tied_fraction or {}).get(name),
            "num_queries": (num_queries or {}).get(name),
            "meta_task": task.meta_task if task else "other",
            "distribution": task.distribution if task else None,
        }
        members = (task.meta_task, task.distribution, "overall") if task else ("other",)
        for g in members:
            groups[g].append(score)
            if ta is not None:
                groups_ta[g].append(ta)

    def summary(g: str) -> dict:
        mean, mean_ta = _mean(groups[g]), _mean(groups_ta[g])
        complete_ta = len(groups_ta[g]) == len(groups[g])
        return {
            "score": None if mean is None else round(mean, 4),
            "score_tie_aware": None if mean_ta is None or not complete_ta else round(mean_ta, 4),
            "num_datasets": len(groups[g]),
            "expected": EXPECTED_COUNTS.get(g),
        }

    return {
        "model": model_name,
        "fingerprint": fingerprint,
        "split": split,
        "metric": "precision@1 (%): VLM2Vec's rule (a tie at the top counts as correct); "
        "precision@1_tie_aware shares ties",
        "complete": len(groups["overall"]) == EXPECTED_COUNTS["overall"],
        "meta_tasks": {m: summary(m) for m in META_TASKS},
        "IND": summary("IND"),
        "OOD": summary("OOD"),
        "overall": summary("overall"),
        "other": {**summary("other"), "expected": None},
        "datasets": datasets,
        "warnings": list(warnings or []),
    }


def _fmt(value: float | None) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"
    )


def markdown_table(report: dict) -> str:
    """The leaderboard rows (Cls / VQA / Ret / Grd / IND / OOD / Overall: VLM2Vec's P@1, the
    tie-aware P@1, "n/expected" datasets), a per-dataset table and the warnings."""
    heads = [META_TASK_HEADERS[m] for m in META_TASKS] + ["IND", "OOD", "Overall"]
    summaries = [report["meta_tasks"][m] for m in META_TASKS]
    summaries += [report["IND"], report["OOD"], report["overall"]]
    if report["other"]["num_datasets"]:
        heads.append("Other")
        summaries.append(report["other"])
    model = report["model"] or "-"
    lines = [
        "| Model | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(heads),
        f"| {model} | " + " | ".join(_fmt(s["score"]) for s in summaries) + " |",
        f"| {model} (ties shared) | "
        + " | ".join(_fmt(s["score_tie_aware"]) for s in summaries)
        + " |",
        "| datasets | "
        + " | ".join(
            f"{s['num_datasets']}/{s['expected']}" if s["expected"] else str(s["num_datasets"])
            for s in summaries
        )
        + " |",
        "",
        "| Dataset | Meta-task | Split | Queries | P@1 | P@1 ties shared | tied rows % |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, d in report["datasets"].items():
        tied = d.get("tied_top_fraction")
        lines.append(
            f"| {name} | {d['meta_task']} | {d['distribution'] or '-'} | "
            f"{d['num_queries'] if d['num_queries'] is not None else '-'} | "
            f"{_fmt(d['precision@1'])} | {_fmt(d.get('precision@1_tie_aware'))} | "
            f"{_fmt(None if tied is None else 100 * tied)} |"
        )
    lines += [""] + [f"**Warning**: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines).rstrip() + "\n"
