"""Synthetic generator: row counts, one-attribute hard negatives, determinism, idempotency."""

import hashlib
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from hardneg.data import MMEBTrainDataset
from hardneg.data.synthetic import (
    ALL_SCENES,
    EVAL_DATASETS,
    TRAIN_SUBSETS,
    attribute_differences,
    generate,
    neighbours,
    render,
)
from PIL import Image, ImageChops

N, N_EVAL = 42, 12
CAPTION_TO_SCENE = {s.caption: s for s in ALL_SCENES}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    summary = generate(out, n=N, seed=3, n_eval=N_EVAL)
    return out, summary


def _rows(path):
    return pq.read_table(path).to_pylist()


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_row_counts_and_layout(syn):
    out, summary = syn
    counts = {s: len(_rows(out / "train" / f"{s}.parquet")) for s in TRAIN_SUBSETS}
    assert sum(counts.values()) == N and counts == summary["train"]
    assert max(counts.values()) - min(counts.values()) <= 1
    info = json.loads((out / "eval" / "datasets.json").read_text())
    assert set(info) == set(EVAL_DATASETS)
    for name in EVAL_DATASETS:
        rows = _rows(out / "eval" / name / "test.parquet")
        assert len(rows) == N_EVAL
        for r in rows:
            assert len(r["tgt_text"]) == len(r["tgt_img_path"]) >= 2
            for rel in [r["qry_img_path"], *r["tgt_img_path"]]:
                assert rel == "" or (out / "eval" / "images" / rel).is_file()
    assert info["SyntheticT2I"]["chance_precision_at_1"] == 5.0
    assert info["SyntheticHardNegT2I"]["chance_precision_at_1"] == round(100 / 14, 2)
    assert info["SyntheticCls"]["chance_precision_at_1"] == round(100 / 24, 2)
    # The train split reads back through the MMEB-train reader, images included.
    ds = MMEBTrainDataset(out / "train")
    assert len(ds) == N and ds.subsets == sorted(TRAIN_SUBSETS)
    assert all(len(ds[i]["hard_negatives"]) == 1 for i in range(0, N, 5))


def test_hard_negatives_differ_in_exactly_one_attribute(syn):
    out, _ = syn
    for name in ("SyntheticHardNegT2I", "SyntheticHardNegI2T"):
        for r in _rows(out / "eval" / name / "test.parquet"):
            scenes = [ALL_SCENES[k] for k in r["tgt_scene"]]
            assert scenes[0] == ALL_SCENES[r["qry_scene"]]
            assert len(scenes) == 14 and len(set(scenes)) == 14
            assert all(len(attribute_differences(scenes[0], s)) == 1 for s in scenes[1:])
            if name.endswith("I2T"):  # the caption text says the same
                assert [CAPTION_TO_SCENE[t] for t in r["tgt_text"]] == scenes
    for r in _rows(out / "train" / "synthetic_t2i.parquet"):
        pos, neg = ALL_SCENES[r["pos_scene"]], ALL_SCENES[r["neg_scene"]]
        assert len(attribute_differences(pos, neg)) == 1
        assert r["qry"].endswith(pos.caption)
    for r in _rows(out / "train" / "synthetic_i2t.parquet"):
        pos, neg = CAPTION_TO_SCENE[r["pos_text"]], CAPTION_TO_SCENE[r["neg_text"]]
        assert len(attribute_differences(pos, neg)) == 1
    # The property check can fail: a random other scene usually differs in more.
    assert len(attribute_differences(ALL_SCENES[0], ALL_SCENES[-1])) == 4


def test_neighbour_images_differ_and_renderings_vary():
    scene = ALL_SCENES[100]
    base = render(scene, variant=0)
    assert len(neighbours(scene)) == 13
    for other in neighbours(scene):
        assert ImageChops.difference(base, render(other, variant=0)).getbbox() is not None
    assert ImageChops.difference(base, render(scene, variant=1)).getbbox() is not None
    assert ImageChops.difference(base, render(scene, variant=0)).getbbox() is None
    assert render(scene, variant=0, size=64).size == (64, 64)


def test_deterministic_idempotent_and_guarded(syn, tmp_path):
    out, _ = syn
    again = tmp_path / "again"
    generate(again, n=N, seed=3, n_eval=N_EVAL)
    assert _digest(again) == _digest(out)
    other = tmp_path / "other"
    generate(other, n=N, seed=4, n_eval=N_EVAL)
    assert _digest(other) != _digest(out)
    before = {p: p.stat().st_mtime_ns for p in again.rglob("*") if p.is_file()}
    (again / "train" / "synthetic_vqa.parquet").unlink()  # an interrupted run is completed
    summary = generate(again, n=N, seed=3, n_eval=N_EVAL)
    assert summary["images_written"] == 0
    assert _digest(again) == _digest(out)
    after = {p: p.stat().st_mtime_ns for p in again.rglob("*") if p.is_file()}
    changed = {p.name for p in before if before[p] != after[p]}
    assert changed <= {"synthetic_vqa.parquet", "datasets.json", "synthetic.json"}
    with pytest.raises(ValueError, match="records arguments"):
        generate(again, n=N + 1, seed=3, n_eval=N_EVAL)


def test_cli(tmp_path):
    cmd = [sys.executable, "-m", "hardneg.data.synthetic", "--out", str(tmp_path), "--n", "8"]
    res = subprocess.run(
        cmd + ["--n-eval", "3", "--image-size", "32"], capture_output=True, text=True, check=True
    )
    assert json.loads(res.stdout)["train"]["synthetic_t2i"] == 2
    im = Image.open(next((tmp_path / "train" / "images").rglob("*.png")))
    assert im.size == (32, 32)
