"""MMEB-train reader, batch sampler and collator on a small parquet + jsonl fixture."""

import json
from collections import Counter

import hardneg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hardneg.data import ImageLoadError, MMEBTrainDataset, TrainBatchSampler, TrainCollator
from PIL import Image


def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


def _row(qry, qry_img="", pos="", pos_img="", neg_text=None, neg_img=None):
    return {
        "qry": qry,
        "qry_image_path": qry_img,
        "pos_text": pos,
        "pos_image_path": pos_img,
        "neg_text": neg_text,
        "neg_image_path": neg_img,
    }


@pytest.fixture
def mmeb_root(tmp_path):
    """Subset ImgCls (parquet, image queries, one negative each, rows 0 and 2 share a target),
    subset Caps (jsonl, text -> image, no negatives) and subset HFLayout (HF folder layout)."""
    for name, colour in [("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))]:
        _png(tmp_path / "images" / "ImgCls" / "Train" / f"{name}.png", colour)
    q = "<|image_1|>\nRepresent the given image for classification"
    cls_rows = [
        _row(q, "ImgCls/Train/a.png", "red", "", "blue", ""),
        _row(q, "ImgCls/Train/b.png", "green", "", "red", ""),
        _row(q, "ImgCls/Train/c.png", "red", "", "green", ""),
        _row(q, "ImgCls/Train/b.png", "green", "", "blue", ""),
    ]
    pq.write_table(pa.Table.from_pylist(cls_rows), tmp_path / "ImgCls.parquet")
    caps_rows = [
        _row(
            f"Find me an image that matches the given caption: caption {k}",
            pos="<|image_1|>\nRepresent the given image.",
            pos_img=f"ImgCls/Train/{n}.png",
        )
        for k, n in enumerate("abcab")
    ]
    with open(tmp_path / "Caps.jsonl", "w") as f:
        for r in caps_rows:
            f.write(json.dumps(r) + "\n")
    (tmp_path / "HFLayout").mkdir()
    hf = [_row(f"question {k}", pos=f"answer {k % 2}") for k in range(6)]
    pq.write_table(pa.Table.from_pylist(hf), tmp_path / "HFLayout" / "original-00000.parquet")
    pq.write_table(
        pa.Table.from_pylist([_row("other split", pos="x")]),
        tmp_path / "HFLayout" / "diverse_instruction-00000.parquet",
    )
    return tmp_path


def test_reads_all_layouts_and_fields(mmeb_root):
    ds = MMEBTrainDataset(mmeb_root)
    assert ds.subsets == ["Caps", "HFLayout", "ImgCls"]
    assert ds.num_rows == {"Caps": 5, "HFLayout": 6, "ImgCls": 4}
    assert len(ds) == 15
    ex = ds[[i for i in range(len(ds)) if ds.subset_of(i) == "ImgCls"][1]]
    assert ex["subset"] == "ImgCls" and ex["row"] == 1
    assert ex["query"]["text"].startswith("<|image_1|>\n")  # the placeholder is kept
    assert isinstance(ex["query"]["image"], Image.Image) and ex["query"]["image"].mode == "RGB"
    assert ex["query"]["image"].getpixel((0, 0)) == (0, 255, 0)
    assert ex["target"] == {"text": "green", "image": None}
    assert ex["hard_negatives"] == [{"text": "red", "image": None}]
    caps = ds[0]
    assert (
        caps["query"]["image"] is None and caps["hard_negatives"] == [] == caps["hard_negative_ids"]
    )
    assert caps["target"]["image"].getpixel((0, 0)) == (255, 0, 0)
    diverse = MMEBTrainDataset(mmeb_root, subsets=["HFLayout"], split="diverse_instruction")
    assert len(diverse) == 1 and diverse[0]["query"]["text"] == "other split"


def test_image_token_mapping(mmeb_root):
    ds = MMEBTrainDataset(mmeb_root, subsets=["ImgCls"], image_token="<image>")
    assert ds[0]["query"]["text"] == "<image>\nRepresent the given image for classification"


def test_caps_and_weights(mmeb_root):
    ds = MMEBTrainDataset(mmeb_root, caps=2)
    assert ds.num_rows == {"Caps": 2, "HFLayout": 2, "ImgCls": 2}
    ds = MMEBTrainDataset(mmeb_root, caps={"Caps": 3})
    assert ds.num_rows == {"Caps": 3, "HFLayout": 6, "ImgCls": 4}
    ds = MMEBTrainDataset(mmeb_root, weights={"Caps": 2, "HFLayout": 0.5, "ImgCls": 0})
    counts = Counter(ds.subset_of(i) for i in range(len(ds)))
    assert counts == {"Caps": 10, "HFLayout": 3}
    rows = Counter(ds[i]["row"] for i in range(len(ds)) if ds.subset_of(i) == "Caps")
    assert set(rows.values()) == {2}  # weight 2: every row exactly twice
    with pytest.raises(ValueError, match=r"weights name unknown subsets \['Nope'\]"):
        MMEBTrainDataset(mmeb_root, weights={"Nope": 1})
    with pytest.raises(ValueError, match=r"weights\['Caps'\] must be a finite number >= 0"):
        MMEBTrainDataset(mmeb_root, weights={"Caps": -1})
    with pytest.raises(ValueError, match=r"subsets \['Nope'\] not found"):
        MMEBTrainDataset(mmeb_root, subsets=["Nope"])


def test_target_ids_equal_for_equal_targets(mmeb_root):
    ds = MMEBTrainDataset(mmeb_root)
    by = {(ds[i]["subset"], ds[i]["row"]): ds[i] for i in range(len(ds))}
    cls = [by[("ImgCls", r)] for r in range(4)]
    assert cls[0]["target_id"] == cls[2]["target_id"]  # "red" twice
    assert cls[1]["target_id"] == cls[3]["target_id"]  # "green" twice
    assert cls[0]["target_id"] != cls[1]["target_id"]
    # A negative equal to another row's target shares its id (so the loss can mask it).
    assert cls[1]["hard_negative_ids"] == [cls[0]["target_id"]]
    assert cls[2]["hard_negative_ids"] == [cls[1]["target_id"]]
    caps = [by[("Caps", r)] for r in range(5)]
    assert caps[0]["target_id"] == caps[3]["target_id"]  # same text and image path
    assert len({c["target_id"] for c in caps}) == 3
    hf = [by[("HFLayout", r)] for r in range(6)]
    assert len({h["target_id"] for h in hf}) == 2
    ids = [by[k]["target_id"] for k in by]
    assert max(ids) < ds.num_ids


def test_missing_image_error_names_file_and_row(mmeb_root):
    (mmeb_root / "images" / "ImgCls" / "Train" / "c.png").unlink()
    ds = MMEBTrainDataset(mmeb_root, subsets=["ImgCls"])
    ds[0]
    with pytest.raises(
        ImageLoadError, match=r"c\.png \(subset ImgCls row 2, field qry_image_path\)"
    ):
        ds[2]


def test_missing_image_skipped_and_counted(mmeb_root):
    (mmeb_root / "images" / "ImgCls" / "Train" / "c.png").unlink()
    ds = MMEBTrainDataset(mmeb_root, on_missing_image="skip")
    assert ds.skipped == {"ImgCls": 1, "Caps": 1}  # ImgCls row 2, Caps row 2 (target c.png)
    assert ds.num_rows == {"Caps": 4, "HFLayout": 6, "ImgCls": 3}
    assert all(ds[i]["row"] != 2 for i in range(len(ds)) if ds.subset_of(i) != "HFLayout")


def test_unreadable_image(mmeb_root):
    (mmeb_root / "images" / "ImgCls" / "Train" / "b.png").write_bytes(b"not a png")
    ds = MMEBTrainDataset(mmeb_root, subsets=["ImgCls"])
    with pytest.raises(ImageLoadError, match=r"b\.png \(subset ImgCls row 1"):
        ds[1]
    ds = MMEBTrainDataset(mmeb_root, subsets=["ImgCls"], on_missing_image="skip")
    ex = ds[1]  # replaced by the next readable row of the subset
    assert ex["row"] == 2 and ds.skipped_unreadable == 1
    with pytest.raises(ValueError, match="on_missing_image must be one of"):
        MMEBTrainDataset(mmeb_root, on_missing_image="ignore")


def _codes(n_per_subset):
    return [k for k, n in enumerate(n_per_subset) for _ in range(n)]


def test_batch_sampler_same_subset_deterministic_resumable():
    codes = _codes([10, 7, 13])
    sampler = TrainBatchSampler(codes, 3, same_subset=True, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 4  # remainders dropped
    assert all(len({codes[i] for i in b}) == 1 for b in batches)
    assert len({i for b in batches for i in b}) == 27  # no index twice in an epoch
    assert list(TrainBatchSampler(codes, 3, same_subset=True, seed=5)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    # Mixed batches exist without same_subset (the same-subset check above can fail).
    mixed = list(TrainBatchSampler(codes, 3, seed=5))
    assert any(len({codes[i] for i in b}) > 1 for b in mixed)
    # Resume: stop after 4 batches, restore the state into a fresh sampler.
    sampler = TrainBatchSampler(codes, 3, same_subset=True, seed=5)
    sampler.set_epoch(2)
    it = iter(sampler)
    head = [next(it) for _ in range(4)]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "position": 4}
    resumed = TrainBatchSampler(codes, 3, same_subset=True, seed=5)
    resumed.load_state_dict(state)
    full = TrainBatchSampler(codes, 3, same_subset=True, seed=5)
    full.set_epoch(2)
    assert head + list(resumed) == list(full)


def test_batch_sampler_ranks_share_subset_and_split_rows():
    codes = _codes([16, 8])
    r0 = list(TrainBatchSampler(codes, 2, same_subset=True, seed=1, num_replicas=2, rank=0))
    r1 = list(TrainBatchSampler(codes, 2, same_subset=True, seed=1, num_replicas=2, rank=1))
    assert len(r0) == len(r1) == 6
    for a, b in zip(r0, r1, strict=True):
        assert not set(a) & set(b)
        assert len({codes[i] for i in a + b}) == 1


def test_collator_shapes_order_and_ids(mmeb_root):
    from hardneg.models import Embedder

    embedder = Embedder.tiny()
    ds = MMEBTrainDataset(mmeb_root, subsets=["ImgCls"])
    ex = [ds[i] for i in range(4)]
    batch = TrainCollator(embedder, num_hard_negatives=1)(ex)
    assert batch["query"]["input_ids"].shape[0] == 4
    assert batch["query"]["pixel_values"].shape[0] == 4
    assert batch["target"]["input_ids"].shape[0] == 4 and "pixel_values" not in batch["target"]
    assert batch["hard_negatives"]["input_ids"].shape[0] == 4
    assert batch["target_ids"].tolist() == [e["target_id"] for e in ex]
    assert batch["hard_negative_ids"].tolist() == [e["hard_negative_ids"] for e in ex]
    assert batch["subsets"] == ["ImgCls"] * 4
    # Row b of hard_negatives is example b's negative (row-major per query).
    want = embedder.prepare([ex[2]["hard_negatives"][0]], role="target")["input_ids"][0]
    got = batch["hard_negatives"]["input_ids"][2]
    assert got[batch["hard_negatives"]["attention_mask"][2].bool()].tolist() == want.tolist()
    none = TrainCollator(embedder)(ex)
    assert none["hard_negatives"] is None and none["hard_negative_ids"] is None

    caps = MMEBTrainDataset(mmeb_root, subsets=["Caps"])
    ex2 = [caps[0], ds[1]]
    with pytest.raises(ValueError, match=r"example 0 \(subset Caps row 0\) has 0 hard negatives"):
        TrainCollator(embedder, num_hard_negatives=1)(ex2)
    filled = TrainCollator(embedder, num_hard_negatives=2, missing_hard_negatives="repeat_target")(
        ex2
    )
    assert filled["hard_negatives"]["input_ids"].shape[0] == 4
    t0 = ex2[0]["target_id"]
    assert filled["hard_negative_ids"].tolist() == [
        [t0, t0],
        [ex2[1]["hard_negative_ids"][0], ex2[1]["target_id"]],
    ]

    # The batch feeds the embedder and the fused loss, gradients included.
    embedder.train()
    q = embedder(**batch["query"])
    t = embedder(**batch["target"])
    h = embedder(**batch["hard_negatives"]).view(4, 1, -1)
    loss = hardneg.fused_hardneg_loss(
        q,
        t,
        hard_negatives=h,
        target_ids=batch["target_ids"],
        hard_negative_ids=batch["hard_negative_ids"],
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert embedder.model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
