"""TrainBatchSampler: deterministic, resumable batches of dataset indices for the training loop,
optionally one subset per global batch (VLM2Vec's "same source" batches)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch.utils.data import Sampler


class TrainBatchSampler(Sampler[list[int]]):
    """Deterministic, resumable batches of dataset indices, optionally one subset per batch.

    Each epoch shuffles with seed (seed, epoch). With same_subset, every global batch (batch_size x
    num_replicas indices, rank r taking slice r) comes from one subset, so all in-batch and
    cross-device negatives share the query's task (VLM2Vec's "same source" batches); a subset's
    remainder that cannot fill a global batch is dropped when drop_last. Rank r yields its slice.

    dataset: an MMEBTrainDataset (batches follow its subset_codes()) or a sequence of subset
    codes, one per index.

    Resuming: state_dict() = {"epoch", "position"} (batches already yielded this epoch);
    load_state_dict() makes the next iteration start there. set_epoch(e) starts epoch e at 0.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        same_subset: bool = False,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        codes = dataset.subset_codes() if hasattr(dataset, "subset_codes") else list(dataset)
        self.codes = codes
        self.batch_size = batch_size
        self.same_subset = same_subset
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0
        self._start = 0
        self._cache: tuple[int, list[list[int]]] | None = None  # (epoch, its global batches)

    def _global_batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        batches = self._make_global_batches()
        self._cache = (self.epoch, batches)
        return batches

    def _make_global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        G = self.batch_size * self.num_replicas
        if self.same_subset:
            groups: dict[int, list[int]] = {}
            for i, c in enumerate(self.codes):
                groups.setdefault(c, []).append(i)
            batches = []
            for c in sorted(groups):
                idx = groups[c]
                perm = torch.randperm(len(idx), generator=g).tolist()
                batches += self._chunk([idx[p] for p in perm], G)
            order = torch.randperm(len(batches), generator=g).tolist()
            return [batches[k] for k in order]
        perm = torch.randperm(len(self.codes), generator=g).tolist()
        return self._chunk(perm, G)

    def _chunk(self, idx: list[int], G: int) -> list[list[int]]:
        batches = [idx[k : k + G] for k in range(0, len(idx), G)]
        if batches and len(batches[-1]) < G and (self.drop_last or self.num_replicas > 1):
            batches.pop()  # uneven ranks would desynchronise collectives
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches()
        b = self.batch_size
        start, self._start = self._start, 0
        for k in range(start, len(batches)):
            self.position = k + 1
            yield batches[k][self.rank * b : (self.rank + 1) * b]

    def __len__(self) -> int:
        return len(self._global_batches())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0
        self._start = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch = int(state["epoch"])
        self.position = self._start = int(state["position"])
