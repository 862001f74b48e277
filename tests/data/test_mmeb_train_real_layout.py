"""MMEB-train reader on the released layout (tests/fixtures/mmeb_layout.py): splits, WebQA rows
without their image, grayscale and CMYK JPEGs, missing columns and image paths."""

from __future__ import annotations

import logging
import shutil

import pyarrow.parquet as pq
import pytest
from fixtures.mmeb_layout import write_mmeb_train
from hardneg.data import ImageLoadError, MMEBTrainDataset, TrainCollator
from hardneg.models import Embedder


@pytest.fixture(scope="module")
def mmeb_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("MMEB-train")
    write_mmeb_train(root)
    return root


@pytest.fixture
def copy_of(mmeb_train, tmp_path):
    root = tmp_path / "MMEB-train"
    shutil.copytree(mmeb_train, root)
    return root


def _rows(ds, subset):
    return [ds[i] for i in range(len(ds)) if ds.subset_of(i) == subset]


def test_splits_and_fields(mmeb_train):
    original = MMEBTrainDataset(mmeb_train)
    assert original.subsets == ["HatefulMemes", "ImageNet_1K", "WebQA"]  # OK-VQA has no original
    assert original.num_rows == {"HatefulMemes": 4, "ImageNet_1K": 4, "WebQA": 3}
    diverse = MMEBTrainDataset(mmeb_train, subsets=["ImageNet_1K"], split="diverse_instruction")
    assert diverse[0]["query"]["text"] == "<|image_1|>\nWhat object is shown in this photo?\n"
    train = MMEBTrainDataset(mmeb_train, split="train")
    assert train.subsets == ["OK-VQA"] and len(train) == 3
    memes = _rows(original, "HatefulMemes")
    assert [m["target"]["text"] for m in memes] == ["No", "Yes", "No", "No"]
    assert [m["hard_negatives"] for m in memes][:2] == [
        [{"text": "Yes", "image": None}],
        [{"text": "No", "image": None}],
    ]
    # Texts as in the files (trailing newline included); every JPEG decodes to RGB whatever its
    # mode on disk (the fixture cycles RGB, grayscale and CMYK).
    cls = _rows(original, "ImageNet_1K")
    assert cls[0]["query"]["text"] == "<|image_1|>\nRepresent the given image for classification\n"
    assert {c["query"]["image"].mode for c in cls} == {"RGB"}
    for c, colour in zip(cls[:3], [(200, 30, 30), (30, 180, 40), (40, 60, 220)], strict=True):
        r, g, b = c["query"]["image"].getpixel((20, 3))
        if c is cls[1]:  # grayscale on disk: R = G = B, the luma of the colour
            assert r == g == b and abs(r - (0.299 * 30 + 0.587 * 180 + 0.114 * 40)) < 4
        else:
            assert max(abs(r - colour[0]), abs(g - colour[1]), abs(b - colour[2])) < 12


def test_webqa_placeholder_without_image_is_stripped_and_counted(mmeb_train, caplog):
    with caplog.at_level(logging.WARNING, logger="hardneg.data"):
        ds = MMEBTrainDataset(mmeb_train, subsets=["WebQA", "ImageNet_1K"])
    webqa = _rows(ds, "WebQA")
    # The collator builds the batch that used to raise "item 0 has an image placeholder".
    batch = TrainCollator(Embedder.tiny())(webqa)
    assert batch["query"]["input_ids"].shape[0] == 3 and "pixel_values" not in batch["query"]
    assert batch["target"]["pixel_values"].shape[0] == 3
    assert ds.placeholders_stripped == {"WebQA": 3}
    assert "subset WebQA: image placeholder removed from 3 texts without an image" in caplog.text
    assert webqa[0]["query"] == {
        "text": "Find a Wikipedia image that answers this question: Where is this bridge?",
        "image": None,
    }
    assert webqa[0]["target"]["text"].startswith("<|image_1|>\nRepresent the given Wikipedia")


@pytest.mark.parametrize("column", ["qry", "qry_image_path", "pos_text", "pos_image_path"])
def test_missing_or_renamed_column_is_named(copy_of, column):
    path = copy_of / "HatefulMemes" / "original-00000-of-00001.parquet"
    table = pq.read_table(path)
    table = table.rename_columns([c + "s" if c == column else c for c in table.column_names])
    pq.write_table(table, path)
    with pytest.raises(ValueError) as err:
        MMEBTrainDataset(copy_of, subsets=["HatefulMemes"])
    assert str(err.value).startswith(f"subset 'HatefulMemes': {path} has no column '{column}'")


def test_missing_image_is_reported_at_its_one_path(copy_of):
    (copy_of / "images" / "ImageNet_1K" / "Train" / "n01440764_2.JPEG").unlink()
    ds = MMEBTrainDataset(copy_of, subsets=["ImageNet_1K"])
    ds[1]
    with pytest.raises(ImageLoadError) as err:
        ds[2]
    expected = copy_of / "images" / "ImageNet_1K" / "Train" / "n01440764_2.JPEG"
    assert str(err.value).startswith(f"cannot load image {expected} (subset ImageNet_1K row 2")
    assert "images/images" not in str(err.value)


def test_wrong_image_root_fails_at_construction_with_the_fix(copy_of, tmp_path):
    (copy_of / "images").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError) as err:
        MMEBTrainDataset(copy_of, subsets=["OK-VQA"], split="train")
    message = str(err.value)
    assert message.startswith(
        "subset 'OK-VQA' row 0: qry_image_path "
        "'images/OK-VQA/Train/COCO_train2014_000000000000.jpg' not found under "
    )
    assert "set image_root (data.image_root" in message and "images/images" not in message
    # Pointing image_root at the folder the paths are relative to fixes it.
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "moved").rename(tmp_path / "snapshot" / "images")
    ds = MMEBTrainDataset(copy_of, split="train", image_root=tmp_path / "snapshot")
    assert ds[0]["query"]["image"].size == (23, 17)
