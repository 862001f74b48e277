"""Evaluation: the MMEB protocol, the similarity analysis and zero-shot text-video retrieval."""

from hardneg.eval.cache import EmbeddingCache, model_fingerprint
from hardneg.eval.mmeb import (
    MMEBEvaluation,
    MMEBFormatError,
    evaluate_mmeb,
    leaderboard,
    list_datasets,
    load_dataset,
    markdown_table,
    precision_at_1,
)
from hardneg.eval.scoring import tie_aware_precision_at_1, tied_top_fraction
from hardneg.eval.similarity import similarity_analysis, similarity_stats, write_similarity
from hardneg.eval.tasks import META_TASKS, MMEB_TASKS, find_task
from hardneg.eval.video import evaluate_video_retrieval, recall_at_k, sample_frames

__all__ = [
    "META_TASKS",
    "MMEB_TASKS",
    "EmbeddingCache",
    "MMEBEvaluation",
    "MMEBFormatError",
    "evaluate_mmeb",
    "evaluate_video_retrieval",
    "find_task",
    "leaderboard",
    "list_datasets",
    "load_dataset",
    "markdown_table",
    "model_fingerprint",
    "precision_at_1",
    "recall_at_k",
    "sample_frames",
    "similarity_analysis",
    "similarity_stats",
    "tie_aware_precision_at_1",
    "tied_top_fraction",
    "write_similarity",
]
