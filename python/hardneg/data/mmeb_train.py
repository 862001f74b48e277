"""MMEB-train reader: (query, positive target, explicit negatives) examples, one file per subset.

Layouts read under `root` (first match per subset):
    root/<subset>.parquet | root/<subset>.jsonl            (one file per subset; the synthetic set)
    root/<subset>/<split>*.parquet | <split>*.jsonl        (the Hugging Face TIGER-Lab/MMEB-train
                                                           snapshot, split "original" or
                                                           "diverse_instruction")
Row fields (facts.md): qry, qry_image_path, pos_text, pos_image_path, and optionally neg_text,
neg_image_path (a string or a list). "" or null means "none"; a file lacking a required column is
an error naming the subset, the file and the column. Image paths are relative to `image_root`, by
default root/images or root (MMEB-train's paths, "images/<Subset>/Train/x.jpg", are relative to
the snapshot root): the first image found settles which, once (images.ImageResolver), and a root
under which none of a subset's first images exists is an error at construction.

A text carrying the "<|image_1|>" placeholder on an item without an image (MMEB-train's WebQA
queries: "<|image_1|>\nFind a Wikipedia image..." with an empty qry_image_path) loses the
placeholder; the count per subset is logged and kept in `placeholders_stripped`.

Per-subset caps keep the first `cap` rows of a subset (VLM2Vec / LLaVE: 50K each). Per-subset
weights resample a subset inside the epoch: weight 2 lists every row twice, 0.5 a fixed random half
(seeded), so any sampler over range(len(dataset)) sees the weighted mix. Target ids: equal targets
(same text and image path) get equal ids, over targets and negatives of every subset, so the loss
can mask false negatives (a duplicate of a query's positive, e.g. the VQA answer "yes" in two rows).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch.utils.data import Dataset

from hardneg.data.images import (
    MMEB_IMAGE_PLACEHOLDER,
    ImageLoadError,
    ImageResolver,
    load_image,
    strip_image_placeholder,
)
from hardneg.data.sampler import TrainBatchSampler

__all__ = [
    "MMEBTrainDataset",
    "TrainBatchSampler",
    "clean_item",
    "find_subset_files",
    "read_rows",
    "target_key",
]

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
NEGATIVE_FIELDS = ("neg_text", "neg_image_path")
ON_MISSING_IMAGE = ("error", "skip")
_EXTENSIONS = (".parquet", ".jsonl")
IMAGE_ROOT_HINT = (
    "set image_root (data.image_root in a training config) to the folder the image paths are "
    "relative to: for MMEB-train, the snapshot root holding images/"
)
# Image paths tried per subset at construction before the image root is declared wrong.
_IMAGE_ROOT_PROBES = 64
# (text field, image field) of the items of a row.
_ITEM_FIELDS = (("qry", "qry_image_path"), ("pos_text", "pos_image_path"))


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


def _missing_field(subset: str, path: Path, field: str, present, row: int | None = None):
    at = f" row {row}" if row is not None else ""
    return ValueError(
        f"subset {subset!r}: {path}{at} has no column {field!r} (columns: {sorted(present)}); "
        f"MMEB-train rows have {list(REQUIRED_FIELDS)} and optionally {list(NEGATIVE_FIELDS)}"
    )


def read_rows(subset: str, files: Sequence[Path]) -> list[dict]:
    """Every row of a subset's files; ValueError naming the subset, file and column when a
    required column is missing."""
    rows: list[dict] = []
    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            for field in REQUIRED_FIELDS:
                if field not in table.column_names:
                    raise _missing_field(subset, path, field, table.column_names)
            rows.extend(table.to_pylist())
            continue
        with open(path, encoding="utf-8") as f:
            new = [json.loads(line) for line in f if line.strip()]
        for r, row in enumerate(new):
            for field in REQUIRED_FIELDS:
                if field not in row:
                    raise _missing_field(subset, path, field, row, r)
        rows.extend(new)
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


def _strip_if_no_image(text: str | None, image: str | None) -> tuple[str | None, int]:
    """(text, 1) with the placeholder removed when the item has none of the image it announces,
    else (text, 0); an emptied text becomes None."""
    if text is None or image is not None or MMEB_IMAGE_PLACEHOLDER not in text:
        return text, 0
    return _none_if_empty(strip_image_placeholder(text)), 1


def clean_item(text, image_path) -> tuple[str | None, str | None, int]:
    """One raw (text, image path) of a row as the reader keeps it: (text, image path, number of
    placeholders removed), "" and null becoming None, the placeholder removed from a text whose
    item has no image."""
    image = _none_if_empty(image_path)
    text, stripped = _strip_if_no_image(_none_if_empty(text), image)
    return text, image, stripped


def target_key(text: str | None, image_path: str | None) -> tuple[str, str]:
    """What makes two targets equal (one target id, masked as each other's false negative): the
    text without surrounding whitespace and the image path, of items cleaned by clean_item."""
    return (text or "").strip(), image_path or ""


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
    negatives = [(_none_if_empty(t), _none_if_empty(p)) for t, p in zip(texts, paths, strict=True)]
    return [(t, p) for t, p in negatives if t is not None or p is not None]


def _image_fields(row: dict) -> list[tuple[str, str]]:
    """(field, path) of every image a kept row refers to."""
    fields = [("qry_image_path", row["qry_image_path"]), ("pos_image_path", row["pos_image_path"])]
    fields += [("neg_image_path", p) for _, p in row["negatives"]]
    return [(f, p) for f, p in fields if p is not None]


class MMEBTrainDataset(Dataset):
    """Map-style dataset of MMEB-train examples.

    dataset[i] = {"query": item, "target": item, "hard_negatives": [item, ...], "target_id": int,
    "hard_negative_ids": [int, ...], "subset": str, "row": int}, items {"text": str | None,
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
        bases = [image_root] if image_root is not None else [self.root / "images", self.root]
        self.resolve = ImageResolver(bases, hint=IMAGE_ROOT_HINT)
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
        self.placeholders_stripped: dict[str, int] = {}
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
        raw = read_rows(subset, files)
        if cap is not None:
            if cap < 0:
                raise ValueError(f"cap of subset {subset!r} must be >= 0, got {cap}")
            raw = raw[:cap] if cap > 0 else raw
        rows = []
        skipped = stripped = 0
        for r, row in enumerate(raw):
            kept, n_stripped = self._read_row(row, subset, r)
            stripped += n_stripped
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
        if stripped:
            self.placeholders_stripped[subset] = stripped
            log.warning(
                "subset %s: image placeholder removed from %d texts without an image",
                subset,
                stripped,
            )
        if not rows:
            hint = "" if self.resolve.base else f"; images {self.resolve.not_found('...')}"
            raise ValueError(f"subset {subset!r} has no usable rows ({len(raw)} read){hint}")
        if self.on_missing_image == "error":
            self._check_image_root(subset, rows)
        return rows

    def _read_row(self, row: dict, subset: str, r: int) -> tuple[dict, int]:
        """One raw row -> kept fields (None for "none", placeholders without an image removed)
        and the number of placeholders removed."""
        kept: dict = {"_row": r}
        stripped = 0
        for text_field, image_field in _ITEM_FIELDS:
            text, image, n = clean_item(row.get(text_field), row.get(image_field))
            kept[text_field], kept[image_field] = text, image
            stripped += n
        kept["negatives"] = []
        for text, image in _negatives_of(row, subset, r):
            text, n = _strip_if_no_image(text, image)
            stripped += n
            if text is not None or image is not None:
                kept["negatives"].append((text, image))
        return kept, stripped

    def _check_image_root(self, subset: str, rows: list[dict]) -> None:
        """A wrong image root fails here, not mid-epoch: among the subset's first
        _IMAGE_ROOT_PROBES image paths one must exist. (A single missing file is reported when
        its row is read, by ImageLoadError.)"""
        images = ((row["_row"], f, p) for row in rows for f, p in _image_fields(row))
        tried = []
        for r, field, path in itertools.islice(images, _IMAGE_ROOT_PROBES):
            if self.resolve(path) is not None:
                return
            tried.append((r, field, path))
        if tried:
            r, field, path = tried[0]
            raise FileNotFoundError(
                f"subset {subset!r} row {r}: {field} {path!r} {self.resolve.not_found(path)} "
                f"(nor any of the subset's first {len(tried)} images)"
            )

    def _id_of(self, text: str | None, image_path: str | None) -> int:
        return self._ids.setdefault(target_key(text, image_path), len(self._ids))

    def _resolve(self, path: str) -> Path:
        """The file of `path`, or where it should be (under the one chosen image base)."""
        return self.resolve(path) or self.resolve.expected(path)

    def _images_exist(self, row: dict) -> bool:
        return all(self.resolve(p) is not None for _, p in _image_fields(row))

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
            "hard_negatives": [
                self._item(t, p, subset, row, "neg_image_path") for t, p in row["negatives"]
            ],
            "target_id": row["target_id"],
            "hard_negative_ids": list(row["negative_ids"]),
            "subset": subset,
            "row": row["_row"],
        }
