"""MMEB-eval in its real on-disk layout: P@1 per set against VLM2Vec's scoring rule, ties, the
WebQA placeholder rows, missing columns and image roots (fixture: tests/fixtures/mmeb_layout.py)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from eval_fixtures import StandinEmbedder
from fixtures.mmeb_layout import EVAL_COLUMNS, PH, write_eval_parquet, write_mmeb_eval
from hardneg.data.images import strip_image_placeholder
from hardneg.eval import MMEBFormatError, evaluate_mmeb, load_dataset, markdown_table
from hardneg.eval.scoring import tie_aware_precision_at_1

DATASETS = ["ImageNet-1K", "OK-VQA", "MSCOCO_t2i", "WebQA"]


@pytest.fixture(scope="module")
def mmeb_eval(tmp_path_factory):
    root = tmp_path_factory.mktemp("MMEB-eval")
    write_mmeb_eval(root)
    return root


def vlm2vec_precision_at_1(root, name, embed, *, first_max=True):
    """VLM2Vec's MMEB scoring (eval.py, evaluation/eval_utils.get_pred), written out: read the
    test split; embed each distinct (text, image path) pair of the query side and of the
    candidate side once; per row, cosine of the query with each listed candidate; the row is
    right when the first maximum is candidate 0. first_max=False takes the last maximum instead
    (a wrong rule, to show the comparison can fail)."""
    rows = pq.read_table(root / name / "test-00000-of-00001.parquet").to_pylist()
    queries = {(r["qry_text"], r["qry_img_path"]) for r in rows}
    targets = {p for r in rows for p in zip(r["tgt_text"], r["tgt_img_path"], strict=True)}
    q_emb = {p: embed(*p, "query") for p in sorted(queries)}
    t_emb = {p: embed(*p, "target") for p in sorted(targets)}
    correct = 0
    for r in rows:
        q = q_emb[(r["qry_text"], r["qry_img_path"])]
        t = np.stack([t_emb[p] for p in zip(r["tgt_text"], r["tgt_img_path"], strict=True)])
        scores = t @ q / (np.linalg.norm(t, axis=1) * np.linalg.norm(q))
        pred = (
            int(np.argmax(scores)) if first_max else len(scores) - 1 - int(np.argmax(scores[::-1]))
        )
        correct += pred == 0
    return 100.0 * correct / len(rows)


def model_input(root, text, img_path):
    """What an LLaVA-OneVision embedder is given for a raw (text, image path) pair: the image
    file, and the text with the placeholder removed when there is no image."""
    image = str(root / "eval_images" / img_path) if img_path else None
    if image is None and PH in text:
        text = strip_image_placeholder(text)
    return {"text": text, "image": image}


def test_precision_at_1_matches_vlm2vec_rule_per_set(mmeb_eval):
    embedder = StandinEmbedder(seed=3)

    def embed(text, img_path, role):
        item = model_input(mmeb_eval, text, img_path)
        return embedder.encode([item], role=role)[0].numpy()

    run = evaluate_mmeb(StandinEmbedder(seed=3), mmeb_eval, show_progress_bar=False)
    assert list(run.results) == DATASETS
    ours = {n: r.precision_at_1 for n, r in run.results.items()}
    theirs = {n: vlm2vec_precision_at_1(mmeb_eval, n, embed) for n in DATASETS}
    for name in DATASETS:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), (name, ours, theirs)
    assert not all(v in (0.0, 100.0) for v in ours.values()), ours


class ConstantEmbedder(StandinEmbedder):
    """A collapsed model: every input gets the same unit vector."""

    def forward(self, text_features, image_features):
        return torch.nn.functional.normalize(torch.ones(len(text_features), 8), dim=-1)


def test_collapsed_model_scores_100_and_is_flagged(mmeb_eval, caplog):
    embed = lambda text, img_path, role: np.ones(8, dtype=np.float32)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="hardneg.eval"):
        run = evaluate_mmeb(ConstantEmbedder(), mmeb_eval, show_progress_bar=False)
    report = run.report()
    for name, result in run.results.items():
        assert vlm2vec_precision_at_1(mmeb_eval, name, embed) == 100.0
        # Taking the last maximum instead of the first is a different rule: the check can fail.
        assert vlm2vec_precision_at_1(mmeb_eval, name, embed, first_max=False) == 0.0
        assert result.precision_at_1 == 100.0
        assert result.tied_top_fraction == 1.0
        # Ties shared: 1 / (distinct candidates in the row), averaged over rows.
        distinct = [len(set(ix)) for ix in load_dataset(mmeb_eval, name).candidate_index]
        want = 100 * float(np.mean([1 / d for d in distinct]))
        assert result.precision_at_1_tie_aware == pytest.approx(want)
        assert report["datasets"][name]["precision@1_tie_aware"] == pytest.approx(want, abs=1e-4)
    # OK-VQA: 4 distinct answers per row (the repeated ground truth is not a rival).
    assert run.results["OK-VQA"].precision_at_1_tie_aware == pytest.approx(25.0)
    assert len(report["warnings"]) == len(DATASETS)
    assert "collapsed" in caplog.text and "VLM2Vec" in caplog.text
    assert "**Warning**: dataset WebQA" in markdown_table(report)


def test_tie_aware_by_hand():
    inf = float("-inf")
    s_NK = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [0.7, 0.7, inf], [0.3, 0.3, 0.3]])
    idx_NK = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 0, -1], [4, 4, 5]])
    # Row 0: tie of 2 distinct -> 1/2. Row 1: wrong. Row 2: the tie is the ground truth twice -> 1.
    # Row 3: ground truth listed twice plus one rival, all tied -> 1/2.
    assert tie_aware_precision_at_1(s_NK, idx_NK) == pytest.approx(100 * (0.5 + 0 + 1 + 0.5) / 4)
    # Within 1e-6 counts as a tie; 1e-4 apart does not.
    near = torch.tensor([[0.5, 0.5 + 5e-7], [0.5, 0.5 + 1e-4]])
    assert tie_aware_precision_at_1(near, torch.tensor([[0, 1], [0, 1]])) == pytest.approx(25.0)


def test_texts_are_embedded_as_in_the_files_by_default(mmeb_eval, caplog):
    data = load_dataset(mmeb_eval, "ImageNet-1K")
    raw = pq.read_table(mmeb_eval / "ImageNet-1K" / "test-00000-of-00001.parquet").to_pylist()
    assert [q["text"] for q in data.queries] == [r["qry_text"] for r in raw]
    assert set(data.query_instructions) == set(data.candidate_instructions) == {None}
    # An image-only candidate under an MMEB name: left alone unless the user opts in.
    rows = [
        {
            "qry_text": "Find me an everyday image that matches the given caption: a red bike\n",
            "qry_img_path": "",
            "tgt_text": ["", f"{PH}\nRepresent the given image.\n"],
            "tgt_img_path": ["MSCOCO_t2i/COCO_val2014_000000000000.jpg"] * 2,
        }
    ]
    root = mmeb_eval.parent / "instructions"
    shutil.copytree(mmeb_eval / "eval_images", root / "eval_images")
    write_eval_parquet(root, "MSCOCO_t2i", rows)
    plain = load_dataset(root, "MSCOCO_t2i")
    assert plain.candidate_instructions == [None, None]
    assert plain.instructions_added == {"queries": 0, "candidates": 0}
    with caplog.at_level(logging.INFO, logger="hardneg.eval"):
        added = load_dataset(root, "MSCOCO_t2i", instructions="missing")
    assert added.candidate_instructions == ["Represent the given image.", None]
    assert added.instructions_added == {"queries": 0, "candidates": 1}
    assert "instructions (policy 'missing') added to 0 queries and 1 candidates" in caplog.text
    always = load_dataset(root, "MSCOCO_t2i", instructions="always")
    assert always.instructions_added == {"queries": 1, "candidates": 2}
    with pytest.raises(ValueError, match="instructions must be one of"):
        load_dataset(root, "MSCOCO_t2i", instructions="auto")


def test_webqa_placeholder_without_image(mmeb_eval, caplog):
    # The real embedder scores these rows (it raised on the placeholder before).
    from hardneg.models import Embedder

    images = mmeb_eval / "eval_images"
    run = evaluate_mmeb(
        Embedder.tiny(), mmeb_eval, datasets=["WebQA"], image_root=images, show_progress_bar=False
    )
    assert run.results["WebQA"].scores_NK.shape == (3, 3)
    assert run.report()["datasets"]["WebQA"]["placeholders_stripped"]["queries"] == 3
    with caplog.at_level(logging.INFO, logger="hardneg.eval"):
        data = load_dataset(mmeb_eval, "WebQA")
    assert data.queries[0] == {
        "text": "Find a Wikipedia image that answers this question: Which city is this bridge in?",
        "image": None,
    }
    assert data.placeholders_stripped == {"queries": 3, "candidates": 0}
    assert "dataset WebQA: 3 queries" in caplog.text
    assert "removed from 3 query and 0 candidate texts" in caplog.text


@pytest.mark.parametrize("column", EVAL_COLUMNS)
@pytest.mark.parametrize("how", ["missing", "renamed"])
def test_missing_or_renamed_column_is_named(mmeb_eval, tmp_path, column, how):
    root = tmp_path / "MMEB-eval"
    shutil.copytree(mmeb_eval, root)
    path = root / "OK-VQA" / "test-00000-of-00001.parquet"
    table = pq.read_table(path)
    if how == "missing":
        table = table.drop_columns([column])
    else:
        table = table.rename_columns([c + "s" if c == column else c for c in table.column_names])
    pq.write_table(table, path)
    with pytest.raises(MMEBFormatError) as err:
        evaluate_mmeb(
            StandinEmbedder(), root, image_root=root / "eval_images", show_progress_bar=False
        )
    message = str(err.value)
    assert message.startswith(f"dataset 'OK-VQA': {path} has no column '{column}'")


def test_image_root_found_once_and_suggested(mmeb_eval, tmp_path):
    root = tmp_path / "MMEB-eval"
    shutil.copytree(mmeb_eval, root)
    assert load_dataset(root, "OK-VQA").image_base == root / "eval_images"
    (root / "eval_images" / "OK-VQA" / "val2014_000000000002.jpg").unlink()
    with pytest.raises(MMEBFormatError) as err:
        load_dataset(root, "OK-VQA")
    expected = root / "eval_images" / "OK-VQA" / "val2014_000000000002.jpg"
    assert "row 2: qry_img_path 'OK-VQA/val2014_000000000002.jpg' not found: expected at " in (
        str(err.value)
    )
    assert str(expected) in str(err.value) and "--image-root" in str(err.value)
    moved = tmp_path / "elsewhere"
    (root / "eval_images").rename(moved)
    with pytest.raises(MMEBFormatError, match="not found under .* or .*; pass --image-root DIR"):
        load_dataset(root, "WebQA")
    assert load_dataset(root, "WebQA", image_root=moved).image_base == moved
