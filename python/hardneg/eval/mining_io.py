"""Files of hard-negative mining: MMEB-train subsets in, the same files with negatives out.

Reading follows the training reader (data.mmeb_train: its layouts, required columns, item
cleaning and duplicate key), with every image path checked before anything is embedded. Writing
mirrors each input file under the output folder (same relative path, same name, every column
kept in place) with neg_text / neg_image_path set; the inputs are only read. Column types:
MMEB-train's own negatives are single strings ("" for none), so k = 1 writes strings and k > 1
writes list<string> per row (shorter lists where fewer were found); data.MMEBTrainDataset reads
both. A Hugging Face "features" record in the parquet metadata is dropped, since it would
describe the old negative columns (the datasets library reads the schema itself without it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch import Tensor

from hardneg.data.images import ImageResolver
from hardneg.data.mmeb_train import (
    NEGATIVE_FIELDS,
    clean_item,
    find_subset_files,
    read_rows,
    target_key,
)

IMAGE_ROOT_HINT = (
    "pass --image-root DIR (image_root=), the folder the image paths are relative to: for "
    "MMEB-train, the snapshot root holding images/"
)
_QUANTILES = (0.05, 0.5, 0.95)


@dataclass
class MiningSubset:
    """One subset and split, read for mining.

    queries: N items {"text", "image": absolute path | None}, one per row, in file order;
    candidates: U distinct positives (by target_key), same form; candidate_fields: their raw
    (pos_text, pos_image_path) as first written in the files, what the negatives are written as;
    positive_index: per row, its positive's index in candidates."""

    name: str
    split: str
    files: list[Path]
    rows_per_file: list[int] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    candidate_fields: list[tuple[str, str]] = field(default_factory=list)
    positive_index: list[int] = field(default_factory=list)


def find_mining_subsets(
    root: Path, subsets: Sequence[str] | None, splits: Sequence[str]
) -> list[tuple[str, str, list[Path]]]:
    """(split, subset, files) for every requested subset found under root, split by split.
    A named subset found in none of the splits is an error, as is finding nothing."""
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} is not a directory")
    if not splits:
        raise ValueError("splits is empty")
    found = {split: find_subset_files(root, split) for split in splits}
    if subsets is not None:
        missing = [s for s in subsets if not any(s in f for f in found.values())]
        if missing:
            present = sorted({s for f in found.values() for s in f})
            raise ValueError(
                f"subsets {missing} not found under {str(root)!r} for splits {list(splits)} "
                f"(found: {present})"
            )
    units = [
        (split, name, files)
        for split in splits
        for name, files in sorted(found[split].items())
        if subsets is None or name in subsets
    ]
    if not units:
        raise FileNotFoundError(
            f"no subset files for splits {list(splits)} under {str(root)!r} "
            "(<Subset>/<split>*.parquet|.jsonl or <Subset>.parquet|.jsonl)"
        )
    return units


def _image(resolve: ImageResolver, path: str | None, where: str, column: str) -> str | None:
    if path is None:
        return None
    found = resolve(path)
    if found is None:
        raise FileNotFoundError(f"{where}: {column} {path!r} {resolve.not_found(path)}")
    return str(found)


def read_subset(
    root: Path, name: str, split: str, files: list[Path], resolve: ImageResolver
) -> MiningSubset:
    """Read one subset's files: queries, the deduplicated positives, every image path checked.
    Errors name the subset, the file, the row (numbered over the subset's files, as the training
    reader numbers them) and the column."""
    data = MiningSubset(name, split, list(files))
    ids: dict[tuple[str, str], int] = {}
    for path in files:
        rows = read_rows(name, [path])
        data.rows_per_file.append(len(rows))
        for row in rows:
            where = f"subset {name!r}: {path} row {len(data.queries)}"
            q_text, q_image, _ = clean_item(row["qry"], row["qry_image_path"])
            p_text, p_image, _ = clean_item(row["pos_text"], row["pos_image_path"])
            for text, image, what in ((q_text, q_image, "query"), (p_text, p_image, "positive")):
                if text is None and image is None:
                    raise ValueError(f"{where}: the {what} has no text and no image")
            data.queries.append(
                {"text": q_text, "image": _image(resolve, q_image, where, "qry_image_path")}
            )
            key = target_key(p_text, p_image)
            if key not in ids:
                ids[key] = len(data.candidates)
                image = _image(resolve, p_image, where, "pos_image_path")
                data.candidates.append({"text": p_text, "image": image})
                data.candidate_fields.append((row["pos_text"] or "", row["pos_image_path"] or ""))
            data.positive_index.append(ids[key])
    return data


def negative_columns(data: MiningSubset, index_NK: Tensor, k: int) -> tuple[list, list]:
    """(neg_text, neg_image_path) values per row: the chosen candidates' raw fields, single
    strings ("" for none) when k == 1, lists otherwise."""
    texts, paths = [], []
    for row in index_NK.tolist():
        chosen = [data.candidate_fields[j] for j in row if j >= 0]
        row_texts, row_paths = [t for t, _ in chosen], [p for _, p in chosen]
        if k == 1:
            texts.append(row_texts[0] if chosen else "")
            paths.append(row_paths[0] if chosen else "")
        else:
            texts.append(row_texts)
            paths.append(row_paths)
    return texts, paths


def _write_parquet(source: Path, target: Path, columns: dict[str, list], kind: pa.DataType):
    table = pq.read_table(source)
    for name, values in columns.items():
        array = pa.array(values, type=kind)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    metadata = dict(table.schema.metadata or {})
    metadata.pop(b"huggingface", None)
    table = table.replace_schema_metadata(metadata or None)
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, target)


def _write_jsonl(source: Path, target: Path, columns: dict[str, list]):
    with open(source, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for name, values in columns.items():
        for row, value in zip(rows, values, strict=True):
            row[name] = value
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, target)


def write_subset(
    data: MiningSubset, texts: list, paths: list, root: Path, out: Path, *, k: int
) -> list[Path]:
    """Write each of the subset's files to out/<its path under root> with the negative columns
    set (rows in file order; strings when k == 1, lists otherwise); the written paths."""
    kind = pa.string() if k == 1 else pa.list_(pa.string())
    written, start = [], 0
    for source, n in zip(data.files, data.rows_per_file, strict=True):
        target = out / source.relative_to(root)
        if target.resolve() == source.resolve():
            raise ValueError(f"refusing to overwrite the input file {source}")
        target.parent.mkdir(parents=True, exist_ok=True)
        text_field, image_field = NEGATIVE_FIELDS
        columns = {text_field: texts[start : start + n], image_field: paths[start : start + n]}
        if source.suffix == ".parquet":
            _write_parquet(source, target, columns, kind)
        else:
            _write_jsonl(source, target, columns)
        written.append(target)
        start += n
    return written


def score_stats(scores: Tensor) -> dict:
    """count, mean, std, min, 5% / 50% / 95% quantiles and max of the finite scores."""
    x = scores.detach().double().cpu().numpy().reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"count": 0}
    q05, q50, q95 = np.quantile(x, _QUANTILES)
    values = {"mean": x.mean(), "std": x.std(), "min": x.min(), "p05": q05, "p50": q50}
    values.update(p95=q95, max=x.max())
    return {"count": int(x.size), **{n: round(float(v), 4) for n, v in values.items()}}


def _mean(stats: dict) -> str:
    return f"{stats['mean']:.3f}" if stats.get("count") else "-"


def markdown_summary(summary: dict, out: Path) -> str:
    """The summary as a markdown table, with the training settings that read the output."""
    lines = [
        f"# Hard-negative mining: k = {summary['k']}, fn_threshold = {summary['fn_threshold']}",
        "",
        f"Model {summary['model'] or '-'} (fingerprint {summary['fingerprint']}). "
        f"Rule: {summary['rule']}.",
        "",
        "| subset | split | rows | pool | positive | negatives | hardest | filtered (cands / "
        "queries) | < k | none |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in summary["subsets"]:
        lines.append(
            f"| {e['subset']} | {e['split']} | {e['rows']} | {e['candidates']} | "
            f"{_mean(e['positive'])} | {_mean(e['negatives'])} | {_mean(e['hardest_negative'])} | "
            f"{e['filtered']['candidates']} / {e['filtered']['queries']} | "
            f"{e['queries_with_fewer_than_k']} | {e['queries_without_negative']} |"
        )
    image_root = summary["image_root"] or "IMAGE_ROOT"
    lines += [
        "",
        "Scores are cosines (means shown; mining_summary.json has the distributions). Train on it "
        f"with `--data.root {out} --data.image_root {image_root} --data.num_hard_negatives N`, "
        "N at most the fewest negatives of a row (the '< k' and 'none' columns count the rows "
        "short).",
        "",
    ]
    return "\n".join(lines)
