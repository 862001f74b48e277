"""MMEB-train reader: (query, positive target, explicit negatives) examples, one file per subset.

Layouts read under `root` (first match per subset):
    root/<subset>.parquet | root/<subset>.jsonl            (one file per subset; the synthetic set)
    root/<subset>/<split>*.parquet | <split>*.jsonl        (the Hugging Face TIGER-Lab/MMEB-train
                                                           snapshot, split "original" or
                                                           "diverse_instruction")
Row fields (facts.md): qry, qry_image_path, pos_text, pos_image_path, and optionally neg_text,
neg_image_path (a string or a list). "" or null means "none". Image paths are relative to
`image_root`, by default tried under root/images then root.

Per-subset caps keep the first `cap` rows of a subset (VLM2Vec / LLaVE: 50K each). Per-subset
weights resample a subset inside the epoch: weight 2 lists every row twice, 0.5 a fixed random half
(seeded), so any sampler over range(len(dataset)) sees the weighted mix. Target ids: equal targets
(same text and image path) get equal ids, over targets and negatives of every subset, so the loss
can mask false negatives (a duplicate of a query's positive, e.g. the VQA answer "yes" in two rows).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from hardneg.data.images import (
    MMEB_IMAGE_PLACEHOLDER,
    ImageLoadError,
    load_image,
)

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
NEGATIVE_FIELDS = ("neg_text", "neg_image_path")
ON_MISSING_IMAGE = ("error", "skip")
_EXTENSIONS = (".parquet", ".jsonl")


def find_subset_files(root: Path, split: str) -> dict[str, list[Path]]:
    """{subset name: its files} under root, per the layouts in the module docstring."""
    found: dict[str, list[Path]] = {}
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix in _EXTENSIONS:
            found.setdefault(path.stem, []).append(path)
        elif path.is_dir() and path.name != "images":
            files = sorted(
                p for p in path.iterdir() if p.suffix in _EXTENSIONS and p.name.startswith(split)
            )
            if files:
                found.setdefault(path.name, []).extend(files)
    return found


def _read_rows(files: Sequence[Path]) -> list[dict]:
    rows: list[dict] = []
    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(path).to_pylist())
        else:
            with open(path, encoding="utf-8") as f:
                rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def _none_if_empty(value) -> str | None:
    if value is None:
        return None
    value = str(value)
    return value if value.strip() else None


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class MMEBTrainDataset(Dataset):
    """Map-style dataset of MMEB-train examples.

    dataset[i] = {"query": item, "target": item, "negatives": [item, ...], "target_id": int,
    "negative_ids": [int, ...], "subset": str, "row": int}, items {"text": str | None,
    "image": PIL.Image | None} with images decoded (RGB). "row" is the row's index in its subset's
    file(s), the number error messages use.

    on_missing_image: "error" raises ImageLoadError naming the file, subset and row when an example
    is read; "skip" drops rows whose image files do not exist at construction (counted per subset in
    `skipped`), and an example whose image exists but cannot be decoded is replaced by the next
    readable row of its subset (counted in `skipped_unreadable`, per process).
    image_token: replaces the "<|image_1|>" placeholder in texts; None keeps it (hardneg's Embedder
    maps it to its own image token).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        subsets: Sequence[str] | None = None,
        caps: int | Mapping[str, int] | None = None,
        weights: Mapping[str, float] | None = None,
        image_root: str | os.PathLike | None = None,
        on_missing_image: str = "error",
        *,
        split: str = "original",
        image_token: str | None = None,
        seed: int = 0,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root {str(self.root)!r} is not a directory")
        if on_missing_image not in ON_MISSING_IMAGE:
            raise ValueError(
                f"on_missing_image must be one of {ON_MISSING_IMAGE}, got {on_missing_image!r}"
            )
        self.on_missing_image = on_missing_image
        self.image_token = image_token
        self.image_bases = (
            [Path(image_root)] if image_root is not None else [self.root / "images", self.root]
        )
        files = find_subset_files(self.root, split)
        if subsets is None:
            subsets = sorted(files)
        missing = [s for s in subsets if s not in files]
        if missing:
            raise ValueError(
                f"subsets {missing} not found under {str(self.root)!r} (found: {sorted(files)})"
            )
        if not subsets:
            raise ValueError(f"no subset files (*.parquet, *.jsonl) under {str(self.root)!r}")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(subsets))
        if unknown:
            raise ValueError(f"weights name unknown subsets {unknown}; subsets are {list(subsets)}")
        for name, w in weights.items():
            if not (isinstance(w, (int, float)) and w >= 0 and math.isfinite(w)):
                raise ValueError(f"weights[{name!r}] must be a finite number >= 0, got {w!r}")
        if isinstance(caps, Mapping):
            bad = sorted(set(caps) - set(subsets))
            if bad:
                raise ValueError(f"caps name unknown subsets {bad}; subsets are {list(subsets)}")

        self.subsets = list(subsets)
        self.weights = {s: float(weights.get(s, 1.0)) for s in self.subsets}
        self.skipped: dict[str, int] = {}
        self.skipped_unreadable = 0
        self._rows: dict[str, list[dict]] = {}  # per subset: kept rows (with "_row")
        self._ids: dict[tuple[str, str], int] = {}
        self._index: list[tuple[str, int]] = []  # (subset, position in self._rows[subset])
        rng = random.Random(seed)
        for subset in self.subsets:
            cap = caps.get(subset) if isinstance(caps, Mapping) else caps
            self._rows[subset] = self._load_subset(subset, files[subset], cap)
            self._index.extend(self._weighted_positions(subset, rng))
        self.num_rows = {s: len(r) for s, r in self._rows.items()}
        self._subset_code = {s: k for k, s in enumerate(self.subsets)}

    # -- construction ------------------------------------------------------------------------

    def _load_subset(self, subset: str, files: list[Path], cap: int | None) -> list[dict]:
        raw = _read_rows(files)
        missing_fields = [f for f in REQUIRED_FIELDS if raw and f not in raw[0]]
        if missing_fields:
            raise ValueError(
                f"subset {subset!r} ({files[0]}) lacks field(s) {missing_fields}; MMEB-train rows "
                f"have {REQUIRED_FIELDS + NEGATIVE_FIELDS}"
            )
        if cap is not None:
            if cap < 0:
                raise ValueError(f"cap of subset {subset!r} must be >= 0, got {cap}")
            raw = raw[:cap] if cap > 0 else raw
        rows = []
        skipped = 0
        for r, row in enumerate(raw):
            kept = {
                "_row": r,
                "qry": _none_if_empty(row.get("qry")),
                "qry_image_path": _none_if_empty(row.get("qry_image_path")),
                "pos_text": _none_if_empty(row.get("pos_text")),
                "pos_image_path": _none_if_empty(row.get("pos_image_path")),
                "negatives": self._negatives_of(row, subset, r),
            }
            if self.on_missing_image == "skip" and not self._images_exist(kept):
                skipped += 1
                continue
            kept["target_id"] = self._id_of(kept["pos_text"], kept["pos_image_path"])
            kept["negative_ids"] = [self._id_of(t, p) for t, p in kept["negatives"]]
            rows.append(kept)
        if skipped:
            self.skipped[subset] = skipped
            log.warning(
                "subset %s: skipped %d of %d rows whose image file is missing",
                subset,
                skipped,
                len(raw),
            )
        if not rows:
            raise ValueError(f"subset {subset!r} has no usable rows ({len(raw)} read)")
        return rows

    @staticmethod
    def _negatives_of(row: dict, subset: str, r: int) -> list[tuple[str | None, str | None]]:
        texts = _as_list(row.get("neg_text"))
        paths = _as_list(row.get("neg_image_path"))
        n = max(len(texts), len(paths))
        if texts and paths and len(texts) != len(paths):
            raise ValueError(
                f"subset {subset!r} row {r}: neg_text has {len(texts)} entries but neg_image_path "
                f"has {len(paths)}"
            )
        texts += [None] * (n - len(texts))
        paths += [None] * (n - len(paths))
        negatives = [
            (_none_if_empty(t), _none_if_empty(p)) for t, p in zip(texts, paths, strict=True)
        ]
        return [(t, p) for t, p in negatives if t is not None or p is not None]

    def _id_of(self, text: str | None, image_path: str | None) -> int:
        key = ((text or "").strip(), image_path or "")
        return self._ids.setdefault(key, len(self._ids))

    def _resolve(self, path: str) -> Path:
        p = Path(path)
        if p.is_absolute():
            return p
        for base in self.image_bases:
            if (base / p).exists():
                return base / p
        return self.image_bases[0] / p

    def _images_exist(self, row: dict) -> bool:
        paths = [row["qry_image_path"], row["pos_image_path"]] + [p for _, p in row["negatives"]]
        return all(self._resolve(p).is_file() for p in paths if p is not None)

    def _weighted_positions(self, subset: str, rng: random.Random) -> list[tuple[str, int]]:
        n, w = len(self._rows[subset]), self.weights[subset]
        copies, frac = int(w), w - int(w)
        positions = list(range(n)) * copies
        extra = round(frac * n)
        if extra:
            positions += sorted(rng.sample(range(n), extra))
        return [(subset, p) for p in positions]

    # -- access ------------------------------------------------------------------------------

    @property
    def num_ids(self) -> int:
        """Number of distinct targets (and negatives) seen: ids are in [0, num_ids)."""
        return len(self._ids)

    def subset_of(self, index: int) -> str:
        return self._index[index][0]

    def subset_codes(self) -> list[int]:
        """Per index, the position of its subset in `subsets` (for batch samplers)."""
        return [self._subset_code[s] for s, _ in self._index]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict:
        subset, pos = self._index[index]
        rows = self._rows[subset]
        for attempt in range(len(rows)):
            row = rows[(pos + attempt) % len(rows)]
            try:
                return self._example(subset, row)
            except ImageLoadError:
                if self.on_missing_image == "error":
                    raise
                self.skipped_unreadable += 1
                log.warning("skipping unreadable image in subset %s row %d", subset, row["_row"])
        raise ImageLoadError(self.root, "no readable row left", f"subset {subset}")

    def _item(self, text, image_path, subset, row, field) -> dict:
        image = None
        if image_path is not None:
            where = f"subset {subset} row {row['_row']}, field {field}"
            image = load_image(self._resolve(image_path), where=where)
        if text is not None and self.image_token is not None:
            text = text.replace(MMEB_IMAGE_PLACEHOLDER, self.image_token)
        return {"text": text, "image": image}

    def _example(self, subset: str, row: dict) -> dict:
        return {
            "query": self._item(row["qry"], row["qry_image_path"], subset, row, "qry_image_path"),
            "target": self._item(
                row["pos_text"], row["pos_image_path"], subset, row, "pos_image_path"
            ),
            "negatives": [
                self._item(t, p, subset, row, "neg_image_path") for t, p in row["negatives"]
            ],
            "target_id": row["target_id"],
            "negative_ids": list(row["negative_ids"]),
            "subset": subset,
            "row": row["_row"],
        }


class TrainBatchSampler(Sampler[list[int]]):
    """Deterministic, resumable batches of dataset indices, optionally one subset per batch.

    Each epoch shuffles with seed (seed, epoch). With same_subset, every global batch (batch_size x
    num_replicas indices, rank r taking slice r) comes from one subset, so all in-batch and
    cross-device negatives share the query's task (VLM2Vec's "same source" batches); a subset's
    remainder that cannot fill a global batch is dropped when drop_last. Rank r yields its slice.

    Resuming: state_dict() = {"epoch", "position"} (batches already yielded this epoch);
    load_state_dict() makes the next iteration start there. set_epoch(e) starts epoch e at 0.
    """

    def __init__(
        self,
        dataset: MMEBTrainDataset | Sequence[int],
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
