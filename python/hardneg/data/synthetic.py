"""Compositional synthetic image-text set in MMEB-train and MMEB-eval layout (no download).

    python -m hardneg.data.synthetic --out DIR --n N [--seed S] [--image-size 32] [--n-eval 200]

A scene is (shape, colour, position, count): 4 shapes x 6 colours x 4 positions x 3 counts = 288
scenes, drawn with PIL on a black square (objects of image_size/4 px in the named half, jittered per
rendering). Caption: "two red circles on the left". A scene's neighbours differ from it in exactly
one attribute (3 + 5 + 3 + 2 = 13 of them): they are the hard negatives. Every scene is rendered
TRAIN_VARIANTS times for training and EVAL_VARIANTS other times for evaluation, so evaluation
images are renderings the model never saw.

DIR/train (MMEB-train: one parquet per subset, N rows in all; images under DIR/train/images/):
    synthetic_t2i   caption -> image;            negative: a neighbour's image
    synthetic_i2t   image -> caption;            negative: a neighbour's caption
    synthetic_vqa   image + question -> answer;  negative: another answer to the question
    synthetic_cls   image -> "colour shape";     negative: a neighbour's class name
DIR/eval/<Dataset>/test.parquet (MMEB-eval: qry_text, qry_img_path, tgt_text[], tgt_img_path[],
candidate 0 the positive; images under DIR/eval/images/), n_eval queries each; chance = P@1 of a
random ranking = mean over queries of 1 / candidates:
    SyntheticT2I         retrieval       1 + 19 images of other scenes               chance 5.00%
    SyntheticI2T         retrieval       1 + 19 captions of other scenes             chance 5.00%
    SyntheticHardNegT2I  hard negatives  1 + 13 neighbour images (one attribute off) chance 7.14%
    SyntheticHardNegI2T  hard negatives  1 + 13 neighbour captions                   chance 7.14%
    SyntheticCls         classification  all 24 "colour shape" classes               chance 4.17%
    SyntheticVQA         VQA             every answer of the question type (6/4/3/4) chance ~25%
DIR/eval/datasets.json lists each data set's meta-task, candidates and exact chance level.
Rows also carry *_scene columns (scene indices) so tests and analyses can check the attributes.

Deterministic given the arguments; idempotent: existing images and files are kept, and DIR/
synthetic.json records the arguments (a re-run with other arguments into the same DIR is refused).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
# Saturated, far-apart RGB colours: easy to tell apart after CLIP normalisation at 32 px.
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 255),
    "yellow": (240, 230, 30),
    "magenta": (230, 40, 230),
    "cyan": (30, 220, 230),
}
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = (1, 2, 3)
ATTRIBUTES = ("shape", "colour", "position", "count")
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "What shape are they?",
    "count": "How many shapes are there?",
    "position": "Which side of the image are the shapes on?",
}

TRAIN_VARIANTS = 4
EVAL_VARIANTS = 2
RETRIEVAL_CANDIDATES = 20
TRAIN_SUBSETS = ("synthetic_t2i", "synthetic_i2t", "synthetic_vqa", "synthetic_cls")
IMAGE_TEXT = "<|image_1|>\nRepresent the given image."
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    count: int

    @property
    def caption(self) -> str:
        plural = "s" if self.count > 1 else ""
        return (
            f"{_COUNT_WORDS[self.count]} {self.colour} {self.shape}{plural} "
            f"{_POSITION_PHRASES[self.position]}"
        )

    @property
    def class_name(self) -> str:
        return f"{self.colour} {self.shape}"

    def answer(self, attribute: str) -> str:
        value = getattr(self, attribute)
        return _COUNT_WORDS[value] if attribute == "count" else value


ALL_SCENES = [
    Scene(s, c, p, n) for s, c, p, n in itertools.product(SHAPES, COLOURS, POSITIONS, COUNTS)
]
SCENE_INDEX = {scene: k for k, scene in enumerate(ALL_SCENES)}
_VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "position": POSITIONS, "count": COUNTS}


def neighbours(scene: Scene) -> list[Scene]:
    """The 13 scenes that differ from `scene` in exactly one attribute."""
    out = []
    for attribute in ATTRIBUTES:
        for value in _VALUES[attribute]:
            if value != getattr(scene, attribute):
                out.append(Scene(**{**scene.__dict__, attribute: value}))
    return out


def attribute_differences(a: Scene, b: Scene) -> list[str]:
    return [k for k in ATTRIBUTES if getattr(a, k) != getattr(b, k)]


def render(scene: Scene, *, variant: int, size: int = 32, seed: int = 0) -> Image.Image:
    """The scene drawn at size x size: `count` objects along the named half, with a per-(seed,
    scene, variant) jitter of position (+-size/16) and object size (+-1 px)."""
    rng = random.Random(f"{seed}/{SCENE_INDEX[scene]}/{variant}")
    im = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(im)
    half = size / 2
    obj = size / 4 + rng.choice((-1, 0, 1))
    jitter = size / 16
    horizontal_half = scene.position in ("left", "right")  # objects stacked vertically
    for k in range(scene.count):
        along = (k + 0.5) * size / scene.count + rng.uniform(-jitter, jitter) / 2
        across = half / 2 + rng.uniform(-jitter, jitter)
        if scene.position in ("right", "bottom"):
            across += half
        cx, cy = (across, along) if horizontal_half else (along, across)
        _draw_shape(draw, scene.shape, cx, cy, obj / 2, COLOURS[scene.colour])
    return im


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85  # equal area to the eye next to the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def _image_path(split: str, scene: Scene, variant: int) -> str:
    folder = "Train" if split == "train" else "Test"
    return f"synthetic/{folder}/s{SCENE_INDEX[scene]:03d}_v{variant}.png"


def _train_rows(subset: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}/train/{subset}")
    rows = []
    for _ in range(n):
        scene = rng.choice(ALL_SCENES)
        variant = rng.randrange(TRAIN_VARIANTS)
        image = _image_path("train", scene, variant)
        neg_scene = rng.choice(neighbours(scene))
        row = {"qry_scene": SCENE_INDEX[scene], "neg_scene": SCENE_INDEX[neg_scene]}
        if subset == "synthetic_t2i":
            row |= {
                "qry": f"Find me an image that matches the given caption: {scene.caption}",
                "qry_image_path": "",
                "pos_text": IMAGE_TEXT,
                "pos_image_path": image,
                "neg_text": IMAGE_TEXT,
                "neg_image_path": _image_path("train", neg_scene, variant),
            }
        elif subset == "synthetic_i2t":
            row |= {
                "qry": "<|image_1|>\nFind a caption describing the given image.",
                "qry_image_path": image,
                "pos_text": scene.caption,
                "pos_image_path": "",
                "neg_text": neg_scene.caption,
                "neg_image_path": "",
            }
        elif subset == "synthetic_vqa":
            attribute = rng.choice(ATTRIBUTES)
            neg_scene = Scene(
                **{
                    **scene.__dict__,
                    attribute: rng.choice(
                        [v for v in _VALUES[attribute] if v != getattr(scene, attribute)]
                    ),
                }
            )
            row |= {
                "qry": "<|image_1|>\nRepresent the given image with the following question: "
                + QUESTIONS[attribute],
                "qry_image_path": image,
                "pos_text": scene.answer(attribute),
                "pos_image_path": "",
                "neg_text": neg_scene.answer(attribute),
                "neg_image_path": "",
                "neg_scene": SCENE_INDEX[neg_scene],
            }
        else:  # synthetic_cls: the class is (colour, shape); a neighbour in one of them
            attribute = rng.choice(("colour", "shape"))
            neg_scene = Scene(
                **{
                    **scene.__dict__,
                    attribute: rng.choice(
                        [v for v in _VALUES[attribute] if v != getattr(scene, attribute)]
                    ),
                }
            )
            row |= {
                "qry": "<|image_1|>\nRepresent the given image for classification",
                "qry_image_path": image,
                "pos_text": scene.class_name,
                "pos_image_path": "",
                "neg_text": neg_scene.class_name,
                "neg_image_path": "",
                "neg_scene": SCENE_INDEX[neg_scene],
            }
        row["pos_scene"] = SCENE_INDEX[scene]
        rows.append(row)
    return rows


def _eval_row(qry_text, qry_img, candidates: list[tuple[str, str, Scene]], scene: Scene) -> dict:
    return {
        "qry_text": qry_text,
        "qry_img_path": qry_img,
        "tgt_text": [t for t, _, _ in candidates],
        "tgt_img_path": [p for _, p, _ in candidates],
        "qry_scene": SCENE_INDEX[scene],
        "tgt_scene": [SCENE_INDEX[s] for _, _, s in candidates],
    }


def _eval_rows(dataset: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}/eval/{dataset}")
    rows = []
    for _ in range(n):
        scene = rng.choice(ALL_SCENES)
        variant = TRAIN_VARIANTS + rng.randrange(EVAL_VARIANTS)
        image = _image_path("eval", scene, variant)
        caption_q = f"Find me an image that matches the given caption: {scene.caption}"
        describe_q = "<|image_1|>\nFind a caption describing the given image."
        if dataset in ("SyntheticT2I", "SyntheticI2T"):
            others = rng.sample([s for s in ALL_SCENES if s != scene], RETRIEVAL_CANDIDATES - 1)
            scenes = [scene, *others]
        elif dataset in ("SyntheticHardNegT2I", "SyntheticHardNegI2T"):
            scenes = [scene, *neighbours(scene)]
        if dataset in ("SyntheticT2I", "SyntheticHardNegT2I"):
            cands = [(IMAGE_TEXT, _image_path("eval", s, variant), s) for s in scenes]
            rows.append(_eval_row(caption_q, "", cands, scene))
        elif dataset in ("SyntheticI2T", "SyntheticHardNegI2T"):
            cands = [(s.caption, "", s) for s in scenes]
            rows.append(_eval_row(describe_q, image, cands, scene))
        elif dataset == "SyntheticCls":
            classes = [
                s for s in ALL_SCENES if s.position == scene.position and s.count == scene.count
            ]
            classes.sort(key=lambda s: s != scene)  # positive first, then the fixed class order
            cands = [(s.class_name, "", s) for s in classes]
            q = "<|image_1|>\nRepresent the given image for classification"
            rows.append(_eval_row(q, image, cands, scene))
        else:  # SyntheticVQA
            attribute = rng.choice(ATTRIBUTES)
            values = sorted(_VALUES[attribute], key=lambda v: v != getattr(scene, attribute))
            scenes = [Scene(**{**scene.__dict__, attribute: v}) for v in values]
            cands = [(s.answer(attribute), "", s) for s in scenes]
            q = (
                "<|image_1|>\nRepresent the given image with the following question: "
                + QUESTIONS[attribute]
            )
            rows.append(_eval_row(q, image, cands, scene))
    return rows


EVAL_DATASETS = {
    "SyntheticT2I": "retrieval",
    "SyntheticI2T": "retrieval",
    "SyntheticHardNegT2I": "hard_negative",
    "SyntheticHardNegI2T": "hard_negative",
    "SyntheticCls": "classification",
    "SyntheticVQA": "vqa",
}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _write_parquet(rows: list[dict], path: Path) -> bool:
    """Write rows atomically; False (nothing done) when the file already exists."""
    if path.exists():
        return False
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)
    return True


def _write_images(paths: Iterable[str], root: Path, size: int, seed: int) -> int:
    """Render every referenced image that does not exist yet; returns how many were written."""
    written = 0
    for rel in sorted(set(paths)):
        path = root / rel
        if path.exists():
            continue
        stem = path.stem  # s{scene}_v{variant}
        scene = ALL_SCENES[int(stem[1:4])]
        variant = int(stem.split("_v")[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        render(scene, variant=variant, size=size, seed=seed).save(tmp, format="PNG")
        os.replace(tmp, path)
        written += 1
    return written


def _split_counts(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def generate(
    out: str | os.PathLike, *, n: int, seed: int = 0, image_size: int = 32, n_eval: int = 200
) -> dict:
    """Write DIR/train and DIR/eval (see the module docstring); returns a summary
    {"train": {subset: rows}, "eval": {dataset: rows}, "images_written": int}."""
    if n < len(TRAIN_SUBSETS):
        raise ValueError(f"n must be >= {len(TRAIN_SUBSETS)} (one row per subset), got {n}")
    if n_eval < 1:
        raise ValueError(f"n_eval must be >= 1, got {n_eval}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 px, got {image_size}")
    out = Path(out)
    args = {
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "n_eval": n_eval,
        "version": FORMAT_VERSION,
    }
    manifest = out / "synthetic.json"
    if manifest.exists():
        previous = json.loads(manifest.read_text())
        if previous != args:
            raise ValueError(
                f"{manifest} records arguments {previous}, not {args}: write to another --out "
                "(mixing files of two settings would corrupt the set)"
            )
    out.mkdir(parents=True, exist_ok=True)
    # Recorded first, so an interrupted run can only be resumed with the same arguments.
    manifest.write_text(json.dumps(args, indent=2) + "\n")
    summary = {"train": {}, "eval": {}, "images_written": 0}
    image_paths: dict[str, list[str]] = {"train": [], "eval": []}

    for subset, count in zip(TRAIN_SUBSETS, _split_counts(n, len(TRAIN_SUBSETS)), strict=True):
        rows = _train_rows(subset, count, seed)
        _write_parquet(rows, out / "train" / f"{subset}.parquet")
        image_paths["train"] += [
            p for r in rows for p in (r["qry_image_path"], r["pos_image_path"], r["neg_image_path"])
        ]
        summary["train"][subset] = len(rows)

    info = {}
    for dataset, meta_task in EVAL_DATASETS.items():
        rows = _eval_rows(dataset, n_eval, seed)
        _write_parquet(rows, out / "eval" / dataset / "test.parquet")
        image_paths["eval"] += [r["qry_img_path"] for r in rows]
        image_paths["eval"] += [p for r in rows for p in r["tgt_img_path"]]
        counts = [len(r["tgt_text"]) for r in rows]
        info[dataset] = {
            "meta_task": meta_task,
            "num_queries": len(rows),
            "candidates_per_query": sorted(set(counts)),
            "chance_precision_at_1": round(100 * sum(1 / c for c in counts) / len(counts), 2),
        }
        summary["eval"][dataset] = len(rows)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "datasets.json").write_text(json.dumps(info, indent=2) + "\n")

    for split in ("train", "eval"):
        paths = [p for p in image_paths[split] if p]
        summary["images_written"] += _write_images(paths, out / split / "images", image_size, seed)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hardneg.data.synthetic",
        description="Write the compositional synthetic set (MMEB-train and MMEB-eval layout).",
    )
    parser.add_argument("--out", required=True, help="output folder (DIR/train, DIR/eval)")
    parser.add_argument("--n", type=int, required=True, help="training pairs over all subsets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32, help="square image side in px")
    parser.add_argument("--n-eval", type=int, default=200, help="queries per eval data set")
    a = parser.parse_args(argv)
    summary = generate(a.out, n=a.n, seed=a.seed, image_size=a.image_size, n_eval=a.n_eval)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
