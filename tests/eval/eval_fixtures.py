"""Helpers for the evaluation tests: a deterministic stand-in embedder and MMEB-eval fixtures.

The stand-in follows the Embedder interface (prepare / forward / encode) with features anyone can
recompute by hand: hashed character trigrams of "instruction + text" and a 4x4 thumbnail of the
image, through fixed random projections, L2-normalised. It ignores the role, so an item embedded
as a query and as a candidate gets the same vector (identical candidate = cosine 1).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from hardneg.data.synthetic import COLOURS
from PIL import Image

TEXT_BUCKETS = 256
THUMB = 4


def _text_features(text: str) -> torch.Tensor:
    f = torch.zeros(TEXT_BUCKETS)
    padded = f"  {text}  "
    for i in range(len(padded) - 2):
        f[zlib.crc32(padded[i : i + 3].encode()) % TEXT_BUCKETS] += 1.0
    return f


def _image_features(image) -> torch.Tensor:
    if image is None:
        return torch.zeros(THUMB * THUMB * 3)
    img = Image.open(image) if isinstance(image, (str, Path)) else image
    thumb = img.convert("RGB").resize((THUMB, THUMB), Image.BILINEAR)
    return torch.tensor(list(thumb.tobytes()), dtype=torch.float32) / 255.0 - 0.5


class StandinEmbedder(torch.nn.Module):
    """Deterministic embedder with the Embedder interface; counts what it embeds."""

    def __init__(self, dim: int = 32, seed: int = 0, fail_after: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.text_proj = torch.nn.Parameter(torch.randn(TEXT_BUCKETS, dim, generator=g))
        self.image_proj = torch.nn.Parameter(torch.randn(THUMB * THUMB * 3, dim, generator=g) * 4)
        self.num_encoded = 0
        self.fail_after = fail_after  # raise once this many items were embedded (interruption)

    def prepare(self, items, role="query", instructions=None):
        instructions = instructions or [None] * len(items)
        text = [
            _text_features(f"{ins} {it['text'] or ''}" if ins else it["text"] or "")
            for it, ins in zip(items, instructions, strict=True)
        ]
        image = [_image_features(it["image"]) for it in items]
        return {"text_features": torch.stack(text), "image_features": torch.stack(image)}

    def forward(self, text_features, image_features):
        emb = text_features @ self.text_proj + image_features @ self.image_proj
        return torch.nn.functional.normalize(emb, dim=-1)

    @torch.no_grad()
    def encode(
        self, items, role="query", batch_size=32, show_progress_bar=False, instructions=None
    ):
        out = []
        for b0 in range(0, len(items), batch_size):
            if self.fail_after is not None and self.num_encoded >= self.fail_after:
                raise KeyboardInterrupt("simulated interruption")
            batch = items[b0 : b0 + batch_size]
            ins = None if instructions is None else instructions[b0 : b0 + batch_size]
            out.append(self(**self.prepare(batch, role=role, instructions=ins)))
            self.num_encoded += len(batch)
        return torch.cat(out)


def save_image(path: Path, colour: tuple[int, int, int], size: int = 8) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size), colour)
    # A diagonal stripe in the complementary colour, so thumbnails differ in structure too.
    for i in range(size):
        img.putpixel((i, i), tuple(255 - c for c in colour))
    img.save(path)
    return str(path)


def write_dataset(root: Path, name: str, rows: list[dict], *, fmt: str = "parquet") -> Path:
    """Write MMEB-eval rows to root/name/test.<fmt> (parquet or jsonl)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        path = folder / "test-00000-of-00001.parquet"
        table = pa.table(
            {
                "qry_text": [r["qry_text"] for r in rows],
                "qry_img_path": [r["qry_img_path"] for r in rows],
                "tgt_text": pa.array([r["tgt_text"] for r in rows], type=pa.list_(pa.string())),
                "tgt_img_path": pa.array(
                    [r["tgt_img_path"] for r in rows], type=pa.list_(pa.string())
                ),
            }
        )
        pq.write_table(table, path)
    else:
        path = folder / "test.jsonl"
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return path


def write_small_benchmark(root: Path) -> dict[str, list[dict]]:
    """Three small datasets: an image->text classification one under an MMEB name (ImageNet-1K),
    a text->image retrieval one (MSCOCO_t2i) and a non-MMEB one (Synthetic-Colours, jsonl)."""
    images = {
        c: save_image(root / "images" / "colours" / f"{c}.png", v) for c, v in COLOURS.items()
    }
    rel = {c: f"colours/{c}.png" for c in COLOURS}
    names = list(COLOURS)
    cls_rows = [
        {
            "qry_text": "<|image_1|>\nRepresent the given image for classification",
            "qry_img_path": rel[c],
            "tgt_text": [c] + [o for o in names if o != c],
            "tgt_img_path": [""] * len(names),
        }
        for c in names
    ]
    t2i_rows = [
        {
            "qry_text": f"Find me an everyday image that matches the given caption: a {c} square",
            "qry_img_path": "",
            "tgt_text": ["<|image_1|>\nRepresent the given image."] * 4,
            "tgt_img_path": [rel[c]] + [rel[o] for o in names if o != c][:3],
        }
        for c in names
    ]
    other_rows = [
        {
            "qry_text": f"a {c} thing",
            "qry_img_path": "",
            "tgt_text": [f"a {c} thing", "", f"a {names[(i + 1) % len(names)]} thing"],
            "tgt_img_path": ["", rel[c], ""],
        }
        for i, c in enumerate(names)
    ]
    write_dataset(root, "ImageNet-1K", cls_rows)
    write_dataset(root, "MSCOCO_t2i", t2i_rows)
    write_dataset(root, "Synthetic-Colours", other_rows, fmt="jsonl")
    del images
    return {"ImageNet-1K": cls_rows, "MSCOCO_t2i": t2i_rows, "Synthetic-Colours": other_rows}
