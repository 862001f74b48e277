"""MMEB-eval reader: one dataset's rows from disk, validated, candidates deduplicated.

Layout read (the Hugging Face snapshot of TIGER-Lab/MMEB-eval, as VLM2Vec's and LLaVE's eval code
read it): ROOT/<Dataset>/<split>-00000-of-00001.parquet (or <split>*.jsonl / <split>*.json), rows
{qry_text: str, qry_img_path: str, tgt_text: list[str], tgt_img_path: list[str]}, "" for "no
image", candidate 0 the ground truth. Images: `unzip images.zip -d eval_images/` gives
eval_images/<Dataset>/...; the paths in the rows are relative to that folder (--image-root), which
defaults to the first of ROOT/eval_images, ROOT/images, ROOT holding the dataset's first image.

Texts are kept exactly as VLM2Vec sees them, with two exceptions, both counted and logged per
dataset: (1) a text carrying the "<|image_1|>" placeholder on an item without an image (MMEB's
WebQA queries) loses the placeholder; (2) under instructions="missing" or "always" (opt-in) an MMEB
dataset's instruction is given to the embedder (tasks.py).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from hardneg.data.images import MMEB_IMAGE_PLACEHOLDER, ImageResolver, strip_image_placeholder
from hardneg.eval.tasks import MMEB_TASKS, MMEBTask, find_task, needs_instruction

log = logging.getLogger(__name__)

# "none": texts as in the files (VLM2Vec's protocol). "missing": add the dataset's instruction to
# texts that do not start with it. "always": add it to every text.
INSTRUCTION_POLICIES = ("none", "missing", "always")
COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
IMAGE_ROOT_HINT = (
    "pass --image-root DIR (image_root=), the folder the image paths are relative to: for "
    "MMEB-eval, where images.zip was unzipped (eval_images/)"
)


class MMEBFormatError(ValueError):
    """A malformed MMEB-eval file or row; the message names the dataset, the file or row, and the
    column."""


@dataclass
class MMEBDataset:
    """One evaluation dataset, candidates deduplicated.

    queries: N items {"text", "image"}; candidates: U distinct items; candidate_index[i]: indices
    into candidates of row i's list, [0] the ground truth. *_instructions: the instruction given
    to the embedder per item (None: none). placeholders_stripped / instructions_added: how many
    query rows and distinct candidates had their placeholder removed / got an instruction.
    """

    name: str
    task: MMEBTask | None
    files: list[Path]
    queries: list[dict]
    query_instructions: list[str | None]
    candidates: list[dict]
    candidate_instructions: list[str | None]
    candidate_index: list[list[int]]
    placeholders_stripped: dict[str, int] = field(default_factory=dict)
    instructions_added: dict[str, int] = field(default_factory=dict)
    image_base: Path | None = None


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
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} is not a directory")
    names = [p.name for p in root.iterdir() if p.is_dir() and _data_files(root, p.name, split)]
    mmeb_order = {n: i for i, n in enumerate(MMEB_TASKS)}

    def order(name: str):
        task = find_task(name)
        return (0, mmeb_order[task.name], name) if task else (1, 0, name)

    return sorted(names, key=order)


def _read_columns(name: str, path: Path) -> dict[str, list]:
    """The four MMEB-eval columns of one file; MMEBFormatError naming the dataset, the file (and
    row, for JSON) and the column when one is missing."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for column in COLUMNS:
            if column not in table.column_names:
                raise MMEBFormatError(
                    f"dataset {name!r}: {path} has no column {column!r} (columns: "
                    f"{table.column_names}); MMEB-eval files have {list(COLUMNS)}"
                )
        return {c: table.column(c).to_pylist() for c in COLUMNS}
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()] if path.suffix == ".jsonl" else None
        rows = json.load(f) if rows is None else rows
    for r, row in enumerate(rows):
        for column in COLUMNS:
            if column not in row:
                raise MMEBFormatError(
                    f"dataset {name!r}: {path} row {r} has no column {column!r} (keys: "
                    f"{sorted(row)}); MMEB-eval rows have {list(COLUMNS)}"
                )
    return {c: [row[c] for row in rows] for c in COLUMNS}


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


class _RowReader:
    """Turns raw column values into items, with the dataset's image resolver and counters."""

    def __init__(self, name: str, resolve: ImageResolver):
        self.name = name
        self.resolve = resolve
        self.stripped = 0

    def error(self, row: int, message: str) -> MMEBFormatError:
        return MMEBFormatError(f"dataset {self.name!r} row {row}: {message}")

    def item(self, text, image_path, row: int, what: str) -> tuple[str | None, str | None, bool]:
        """(text, absolute image path, placeholder stripped?) of one query or candidate."""
        for value, column in ((text, what.replace("img_path", "text")), (image_path, what)):
            if value is not None and not isinstance(value, str):
                raise self.error(row, f"{column} is {value!r}, not a string")
        image = None
        if not _blank(image_path):
            found = self.resolve(image_path)
            if found is None:
                raise self.error(row, f"{what} {image_path!r} {self.resolve.not_found(image_path)}")
            image = str(found)
        stripped = False
        if image is None and text and MMEB_IMAGE_PLACEHOLDER in text:
            text, stripped = strip_image_placeholder(text), True
        return (None if _blank(text) else text), image, stripped

    def candidates(self, texts, images, row: int) -> list[tuple[str | None, str | None, bool]]:
        """The items of one row's candidate list, validated."""
        for value, column in ((texts, "tgt_text"), (images, "tgt_img_path")):
            if not isinstance(value, (list, tuple)):
                raise self.error(row, f"{column} is {type(value).__name__} {value!r}, not a list")
        if len(texts) != len(images):
            raise self.error(
                row, f"tgt_text has {len(texts)} entries but tgt_img_path has {len(images)}"
            )
        if not texts:
            raise self.error(row, "empty candidate list")
        items = []
        for k, (text, image) in enumerate(zip(texts, images, strict=True)):
            item = self.item(text, image, row, f"tgt_img_path[{k}]")
            if item[0] is None and item[1] is None:
                raise self.error(row, f"candidate {k} has no text and no image")
            items.append(item)
        return items


def load_dataset(
    data_root: str | os.PathLike,
    name: str,
    *,
    split: str = "test",
    image_root: str | os.PathLike | None = None,
    instructions: str = "none",
    max_queries: int | None = None,
) -> MMEBDataset:
    """Read and validate one dataset (every row, every image path) before anything is embedded.

    instructions: see INSTRUCTION_POLICIES; the default leaves every text as in the files.
    Raises MMEBFormatError naming the dataset, the file or row and the column of the first problem.
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
    bases = (
        [image_root] if image_root is not None else [root / "eval_images", root / "images", root]
    )
    reader = _RowReader(name, ImageResolver(bases, hint=IMAGE_ROOT_HINT))
    task = find_task(name)

    def instruction_for(text: str | None, instruction: str) -> str | None:
        if instructions == "none" or not instruction:
            return None
        if instructions == "always" or needs_instruction(text, instruction):
            return instruction
        return None

    data = MMEBDataset(name, task, files, [], [], [], [], [])
    candidate_ids: dict[tuple, int] = {}
    stripped_queries = 0
    for path in files:
        columns = _read_columns(name, path)
        for i in range(len(columns["qry_text"])):
            row = len(data.queries)
            if max_queries is not None and row >= max_queries:
                break
            q_text, q_image, stripped = reader.item(
                columns["qry_text"][i], columns["qry_img_path"][i], row, "qry_img_path"
            )
            stripped_queries += stripped
            if q_text is None and q_image is None:
                raise reader.error(row, "query has no text and no image")
            index = []
            for text, image, stripped in reader.candidates(
                columns["tgt_text"][i], columns["tgt_img_path"][i], row
            ):
                key = (text, image)
                if key not in candidate_ids:
                    candidate_ids[key] = len(data.candidates)
                    data.candidates.append({"text": text, "image": image})
                    data.candidate_instructions.append(
                        instruction_for(text, task.target_instruction if task else "")
                    )
                    reader.stripped += stripped
                index.append(candidate_ids[key])
            data.queries.append({"text": q_text, "image": q_image})
            data.query_instructions.append(
                instruction_for(q_text, task.query_instruction if task else "")
            )
            data.candidate_index.append(index)
    if not data.queries:
        raise MMEBFormatError(f"dataset {name!r}: no rows in {', '.join(map(str, files))}")
    data.placeholders_stripped = {"queries": stripped_queries, "candidates": reader.stripped}
    data.instructions_added = {
        "queries": sum(i is not None for i in data.query_instructions),
        "candidates": sum(i is not None for i in data.candidate_instructions),
    }
    data.image_base = reader.resolve.base
    _log_counts(data, instructions)
    return data


def _log_counts(data: MMEBDataset, policy: str) -> None:
    s, a = data.placeholders_stripped, data.instructions_added
    log.info(
        "dataset %s: %d queries, %d distinct candidates; image placeholder removed from %d query "
        "and %d candidate texts without an image; instructions (policy %r) added to %d queries "
        "and %d candidates",
        data.name,
        len(data.queries),
        len(data.candidates),
        s["queries"],
        s["candidates"],
        policy,
        a["queries"],
        a["candidates"],
    )
