"""Collators: MMEBTrainDataset examples -> model inputs, whole (TrainCollator) or cut into
GradCache chunks (ChunkedCollate, which wraps a TrainCollator).

TrainCollator output (B examples, M = num_hard_negatives):
    {"query": inputs (B rows), "target": inputs (B rows),
     "hard_negatives": inputs (B*M rows, row-major per query: rows b*M .. b*M+M-1 belong to
                       example b) or None when M = 0,
     "target_ids": LongTensor (B,), "hard_negative_ids": LongTensor (B, M) or None,
     "subsets": list[str] (B,)}
so the loss gets hard_negatives = embed(hard_negatives).view(B, M, D) with hard_negative_ids.

ChunkedCollate output: {"chunks": [{stream: ChunkInputs} per chunk of chunk_size examples],
"target_ids" (B,), "hard_negative_ids" (B, M) | None}, the streams being STREAMS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

# The three model-input streams of a batch, in the order the trainer embeds them.
STREAMS = ("query", "target", "hard_negatives")


def split_rows(n: int, chunk_size: int) -> list[slice]:
    """[0, n) cut into consecutive slices of chunk_size rows (the last may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(i, min(n, i + chunk_size)) for i in range(0, n, chunk_size)]


class TrainCollator:
    """Builds batches with the embedder's input builder (processor + prompts, not the model, so
    the collator is cheap to send to DataLoader workers).

    num_hard_negatives: hard negatives per query taken from each example's "negatives" (the first
    M). An example with fewer raises ValueError naming it, unless
    missing_hard_negatives="repeat_target": then the gap is filled with copies of the example's
    own target under its target id, which the loss masks for that query as a false negative (for
    other queries it is one more in-batch negative, counted twice).
    """

    def __init__(
        self, embedder, num_hard_negatives: int = 0, *, missing_hard_negatives: str = "error"
    ):
        if num_hard_negatives < 0:
            raise ValueError(f"num_hard_negatives must be >= 0, got {num_hard_negatives}")
        if missing_hard_negatives not in ("error", "repeat_target"):
            raise ValueError(
                "missing_hard_negatives must be 'error' or 'repeat_target', got "
                f"{missing_hard_negatives!r}"
            )
        self.prepare = embedder.input_builder
        self.num_hard_negatives = num_hard_negatives
        self.missing_hard_negatives = missing_hard_negatives

    def __call__(self, examples: Sequence[dict]) -> dict:
        if len(examples) == 0:
            raise ValueError("examples is empty")
        M = self.num_hard_negatives
        batch = {
            "query": self.prepare([ex["query"] for ex in examples], role="query"),
            "target": self.prepare([ex["target"] for ex in examples], role="target"),
            "target_ids": torch.tensor([ex["target_id"] for ex in examples], dtype=torch.long),
            "hard_negatives": None,
            "hard_negative_ids": None,
            "subsets": [ex.get("subset", "") for ex in examples],
        }
        if M == 0:
            return batch
        items, ids = [], []
        for b, ex in enumerate(examples):
            mine, mine_ids = list(ex["hard_negatives"][:M]), list(ex["hard_negative_ids"][:M])
            if len(mine) < M:
                if self.missing_hard_negatives == "error":
                    raise ValueError(
                        f"example {b} (subset {ex.get('subset', '?')} row {ex.get('row', '?')}) "
                        f"has {len(ex['hard_negatives'])} hard negatives but "
                        f"num_hard_negatives={M}; "
                        "use same-subset batches, num_hard_negatives=0, or "
                        "missing_hard_negatives='repeat_target'"
                    )
                fill = M - len(mine)
                mine += [ex["target"]] * fill
                mine_ids += [ex["target_id"]] * fill
            items += mine
            ids.append(mine_ids)
        batch["hard_negatives"] = self.prepare(items, role="target")
        batch["hard_negative_ids"] = torch.tensor(ids, dtype=torch.long)
        return batch


@dataclass
class ChunkInputs:
    """Model inputs of one chunk of one stream; the last extra_rows rows are a dummy image item
    whose embedding is not part of the batch."""

    inputs: dict[str, Tensor]
    extra_rows: int = 0

    def to(self, device: torch.device) -> ChunkInputs:
        inputs = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        return ChunkInputs(inputs, self.extra_rows)


class ChunkedCollate:
    """A TrainCollator's batch cut into GradCache chunks of chunk_size examples (0: one chunk).

    image_in_every_chunk: a stream chunk without any image gets one dummy image item appended
    (M for the hard-negatives stream). DeepSpeed needs it: ZeRO-3 gathers parameters module by
    module in every forward, and ZeRO-2 reduces gradient buckets in every backward, so every rank
    must call the same modules (vision tower, projector) in every forward; a text-only chunk would
    skip them. (DDP needs no such thing: find_unused_parameters covers it.) The dummy row's
    embedding enters the graph with weight 0, so its parameters get zero gradients on every
    rank."""

    def __init__(
        self, collator: TrainCollator, chunk_size: int, *, image_in_every_chunk: bool = False
    ) -> None:
        self.collator = collator
        self.chunk_size = chunk_size
        self.image_in_every_chunk = image_in_every_chunk
        dummy = {"text": None, "image": Image.new("RGB", (32, 32))}
        M = collator.num_hard_negatives
        # In the dataset's example format (MMEBTrainDataset).
        self.dummy_example = {
            "query": dummy,
            "target": dummy,
            "hard_negatives": [dummy] * M,
            "target_id": -1,
            "hard_negative_ids": [-1] * M,
            "subset": "",
        }

    def _chunk(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        out = {n: None if batch[n] is None else ChunkInputs(batch[n]) for n in STREAMS}
        text_only = [n for n in STREAMS if batch[n] is not None and "pixel_values" not in batch[n]]
        if self.image_in_every_chunk and text_only:
            padded = self.collator([*examples, self.dummy_example])
            for n in text_only:
                rows = 1 if n != "hard_negatives" else self.collator.num_hard_negatives
                out[n] = ChunkInputs(padded[n], extra_rows=rows)
        out["target_ids"] = batch["target_ids"]
        out["hard_negative_ids"] = batch["hard_negative_ids"]
        return out

    def __call__(self, examples: list[dict]) -> dict:
        size = self.chunk_size or len(examples)
        chunks = [self._chunk(examples[s]) for s in split_rows(len(examples), size)]
        hard_ids = [c["hard_negative_ids"] for c in chunks]
        return {
            "chunks": chunks,
            "target_ids": torch.cat([c["target_ids"] for c in chunks]),
            "hard_negative_ids": None if hard_ids[0] is None else torch.cat(hard_ids),
        }
