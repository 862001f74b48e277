"""A small MMEB-train style folder for the training tests (two subsets, images, one negative each).

Small on purpose (tests must run in seconds); the synthetic generator makes the demo's data."""

from __future__ import annotations

import json

import pytest
from hardneg.data.synthetic import COLOURS as SYNTHETIC_COLOURS
from PIL import Image, ImageDraw

# Four of the synthetic generator's colours, one palette for the project.
COLOURS = {c: SYNTHETIC_COLOURS[c] for c in ("red", "green", "blue", "yellow")}
SIDES = ("left", "right")


def _image(colour: str, side: str) -> Image.Image:
    im = Image.new("RGB", (32, 32), (0, 0, 0))
    x0 = 2 if side == "left" else 18
    ImageDraw.Draw(im).rectangle([x0, 8, x0 + 12, 24], fill=COLOURS[colour])
    return im


def write_mmeb_train(root, *, rows_per_subset: int = 24) -> None:
    """root/<subset>.jsonl + root/images/*.png, MMEB-train fields."""
    (root / "images").mkdir(parents=True)
    combos = [(c, s) for c in COLOURS for s in SIDES]
    for c, s in combos:
        _image(c, s).save(root / "images" / f"{c}_{s}.png")
    t2i, i2t = [], []
    for r in range(rows_per_subset):
        c, s = combos[r % len(combos)]
        other = SIDES[1 - SIDES.index(s)]
        t2i.append(
            {
                "qry": f"Find me an image that matches the given caption: a {c} square on the {s}",
                "qry_image_path": "",
                "pos_text": "<|image_1|>\nRepresent the given image.",
                "pos_image_path": f"images/{c}_{s}.png",
                "neg_text": "<|image_1|>\nRepresent the given image.",
                "neg_image_path": f"images/{c}_{other}.png",
            }
        )
        i2t.append(
            {
                "qry": "<|image_1|>\nFind a caption describing the given image.",
                "qry_image_path": f"images/{c}_{s}.png",
                "pos_text": f"a {c} square on the {s} number {r}",
                "pos_image_path": "",
                "neg_text": f"a {c} square on the {other} number {r}",
                "neg_image_path": "",
            }
        )
    for name, rows in (("Shapes_t2i", t2i), ("Shapes_i2t", i2t)):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="session")
def mmeb_train_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb_train")
    write_mmeb_train(root)
    return root
