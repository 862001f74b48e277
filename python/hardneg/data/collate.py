"""TrainCollator: a list of MMEBTrainDataset examples -> model inputs for the three streams.

Output (B examples, M = num_negatives):
    {"query": inputs (B rows), "target": inputs (B rows),
     "negatives": inputs (B*M rows, row-major per query: rows b*M .. b*M+M-1 belong to example b)
                  or None when M = 0,
     "target_ids": LongTensor (B,), "negative_ids": LongTensor (B, M) or None,
     "subsets": list[str] (B,)}
so the loss gets hard_negatives = embed(negatives).view(B, M, D) with hard_negative_ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class TrainCollator:
    """Builds batches with the embedder's input builder (processor + prompts, not the model, so
    the collator is cheap to send to DataLoader workers).

    num_negatives: explicit negatives per query taken from each example's "negatives" (the first
    M). An example with fewer raises ValueError naming it, unless missing_negatives="repeat_target":
    then the gap is filled with copies of the example's own target under its target id, which the
    loss masks for that query as a false negative (for other queries it is one more in-batch
    negative, counted twice).
    """

    def __init__(self, embedder, num_negatives: int = 0, *, missing_negatives: str = "error"):
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        if missing_negatives not in ("error", "repeat_target"):
            raise ValueError(
                f"missing_negatives must be 'error' or 'repeat_target', got {missing_negatives!r}"
            )
        self.prepare = embedder.input_builder
        self.num_negatives = num_negatives
        self.missing_negatives = missing_negatives

    def __call__(self, examples: Sequence[dict]) -> dict:
        if len(examples) == 0:
            raise ValueError("examples is empty")
        M = self.num_negatives
        batch = {
            "query": self.prepare([ex["query"] for ex in examples], role="query"),
            "target": self.prepare([ex["target"] for ex in examples], role="target"),
            "target_ids": torch.tensor([ex["target_id"] for ex in examples], dtype=torch.long),
            "negatives": None,
            "negative_ids": None,
            "subsets": [ex.get("subset", "") for ex in examples],
        }
        if M == 0:
            return batch
        negatives, negative_ids = [], []
        for b, ex in enumerate(examples):
            items, ids = list(ex["negatives"][:M]), list(ex["negative_ids"][:M])
            if len(items) < M:
                if self.missing_negatives == "error":
                    raise ValueError(
                        f"example {b} (subset {ex.get('subset', '?')} row {ex.get('row', '?')}) "
                        f"has {len(ex['negatives'])} negatives but num_negatives={M}; use "
                        "same-subset batches, num_negatives=0, or "
                        "missing_negatives='repeat_target'"
                    )
                fill = M - len(items)
                items += [ex["target"]] * fill
                ids += [ex["target_id"]] * fill
            negatives += items
            negative_ids.append(ids)
        batch["negatives"] = self.prepare(negatives, role="target")
        batch["negative_ids"] = torch.tensor(negative_ids, dtype=torch.long)
        return batch
