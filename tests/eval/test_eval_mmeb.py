"""MMEB protocol: P@1 against hand computation, aggregation, caching, malformed rows.

Sharding over ranks is tested end to end with the tiny model in test_eval_recipe.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from eval_fixtures import StandinEmbedder, write_dataset, write_small_benchmark
from hardneg.eval import (
    MMEB_TASKS,
    EmbeddingCache,
    MMEBFormatError,
    evaluate_mmeb,
    leaderboard,
    load_dataset,
    markdown_table,
    model_fingerprint,
)
from hardneg.eval.mmeb import precision_at_1
from hardneg.eval.tasks import EXPECTED_COUNTS, find_task, needs_instruction


def _text_rows(pairs):
    """Rows (query text, candidate texts) with no images."""
    return [
        {"qry_text": q, "qry_img_path": "", "tgt_text": c, "tgt_img_path": [""] * len(c)}
        for q, c in pairs
    ]


def test_precision_at_1_matches_hand_computation(tmp_path):
    pairs = [
        ("red circle", ["red circle", "blue square", "green star"]),  # gt identical: right
        ("green star", ["blue square", "green star"]),  # a distractor identical: wrong
        ("small blue square", ["blue square", "red circle", "yellow moon"]),
        ("yellow moon at night", ["green star", "yellow moon", "red circle", "blue square"]),
        ("a purple thing", ["purple thing", "red circle"]),
    ]
    write_dataset(tmp_path, "Toy", _text_rows(pairs))
    embedder = StandinEmbedder()
    run = evaluate_mmeb(embedder, tmp_path, show_progress_bar=False)
    result = run.results["Toy"]

    # By hand: embed every text alone, dot products in float64, count rows whose max is entry 0.
    def emb(text):
        return embedder.encode([{"text": text, "image": None}])[0].double()

    hits = 0
    for row, (q, cands) in enumerate(pairs):
        sims = [float(emb(q) @ emb(c)) for c in cands]
        hits += sims[0] == max(sims)
        expected = torch.tensor(sims, dtype=torch.float32)
        torch.testing.assert_close(result.scores_NK[row, : len(cands)], expected, atol=1e-5, rtol=0)
    assert result.precision_at_1 == pytest.approx(100 * hits / len(pairs))
    # Rows 0 and 1 are decided by construction; the hand count must agree with them.
    assert result.scores_NK[0].argmax() == 0 and result.scores_NK[1].argmax() == 1
    # Distinct candidates only: 5 distinct texts among 14 candidate slots.
    assert result.num_distinct_candidates == 5


def test_precision_at_1_can_fail():
    s_NK = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.8, -float("inf")], [0.5, 0.5, 0.1]])
    # Row 1 is wrong; row 2 ties at the top and counts as right (lowest index, as np.argmax).
    assert precision_at_1(s_NK) == pytest.approx(200 / 3)
    assert precision_at_1(s_NK[1:2]) == 0.0


def test_identical_ground_truth_scores_100(tmp_path):
    write_small_benchmark(tmp_path)
    rows = [
        {
            "qry_text": f"<|image_1|> item {i}",
            "qry_img_path": f"colours/{c}.png",
            "tgt_text": [f"<|image_1|> item {i}", f"<|image_1|> item {i + 1}", "item"],
            "tgt_img_path": [f"colours/{c}.png", f"colours/{c}.png", f"colours/{c}.png"],
        }
        for i, c in enumerate(["red", "green", "blue", "cyan"])
    ]
    write_dataset(tmp_path, "Same", rows)
    run = evaluate_mmeb(StandinEmbedder(), tmp_path, datasets=["Same"], show_progress_bar=False)
    assert run.results["Same"].precision_at_1 == 100.0
    torch.testing.assert_close(run.results["Same"].scores_NK[:, 0], torch.ones(4))


def test_small_benchmark_report(tmp_path):
    write_small_benchmark(tmp_path)
    run = evaluate_mmeb(StandinEmbedder(), tmp_path, show_progress_bar=False, model_name="standin")
    report = run.report()
    assert list(report["datasets"]) == ["ImageNet-1K", "MSCOCO_t2i", "Synthetic-Colours"]
    p = {n: d["precision@1"] for n, d in report["datasets"].items()}
    assert report["meta_tasks"]["classification"]["score"] == pytest.approx(p["ImageNet-1K"])
    assert report["meta_tasks"]["retrieval"]["score"] == pytest.approx(p["MSCOCO_t2i"])
    assert report["IND"]["score"] == pytest.approx((p["ImageNet-1K"] + p["MSCOCO_t2i"]) / 2)
    assert report["OOD"]["score"] is None and report["OOD"]["num_datasets"] == 0
    assert report["other"]["score"] == pytest.approx(p["Synthetic-Colours"])
    assert not report["complete"]
    # Synthetic-Colours: the query text equals candidate 0's text, candidate 1 is an image only.
    assert p["Synthetic-Colours"] == 100.0
    table = markdown_table(report)
    assert "| standin |" in table and "| 2/20 |" in table and "Synthetic-Colours" in table
    json.dumps(report)


def test_leaderboard_aggregation():
    names = list(MMEB_TASKS)
    scores = {n: float(i) for i, n in enumerate(names)}
    scores["My-Synthetic"] = 90.0
    report = leaderboard(scores, model_name="m")
    assert report["complete"]
    for meta in ("classification", "vqa", "retrieval", "grounding"):
        members = [scores[n] for n in names if MMEB_TASKS[n].meta_task == meta]
        assert report["meta_tasks"][meta]["score"] == pytest.approx(sum(members) / len(members))
        assert report["meta_tasks"][meta]["num_datasets"] == EXPECTED_COUNTS[meta]
    assert [EXPECTED_COUNTS[m] for m in ("classification", "vqa", "retrieval", "grounding")] == [
        10,
        10,
        12,
        4,
    ]
    ind = [scores[n] for n in names if MMEB_TASKS[n].distribution == "IND"]
    ood = [scores[n] for n in names if MMEB_TASKS[n].distribution == "OOD"]
    assert (len(ind), len(ood)) == (20, 16)
    assert report["IND"]["score"] == pytest.approx(sum(ind) / 20)
    assert report["OOD"]["score"] == pytest.approx(sum(ood) / 16)
    assert report["overall"]["score"] == pytest.approx(sum(range(36)) / 36)
    assert report["other"]["score"] == 90.0 and report["datasets"]["My-Synthetic"]["meta_task"]
    # The OOD list of facts.md, exactly.
    assert set(n for n in names if MMEB_TASKS[n].distribution == "OOD") == {
        "Place365",
        "ImageNet-A",
        "ImageNet-R",
        "ObjectNet",
        "Country211",
        "ScienceQA",
        "VizWiz",
        "GQA",
        "TextVQA",
        "OVEN",
        "FashionIQ",
        "EDIS",
        "Wiki-SS-NQ",
        "Visual7W-Pointing",
        "RefCOCO",
        "RefCOCO-Matching",
    }


def test_dataset_names_and_instructions():
    assert find_task("ImageNet_1K").name == "ImageNet-1K"
    assert find_task("refcoco-matching").name == "RefCOCO-Matching"
    assert find_task("Synthetic-Colours") is None
    vqa = MMEB_TASKS["OK-VQA"].query_instruction
    assert not needs_instruction(
        "<|image_1|>\nRepresent the given image with the following question: What is it?", vqa
    )
    assert needs_instruction("What is it?", vqa)
    assert not needs_instruction("anything", "")


def test_instruction_policies(tmp_path):
    write_small_benchmark(tmp_path)
    rows = _text_rows([("What colour?", ["red", "blue"])])
    rows[0]["qry_img_path"] = "colours/red.png"
    write_dataset(tmp_path, "OK-VQA", rows)
    # Default: texts as in the files, whatever they look like.
    assert load_dataset(tmp_path, "OK-VQA").query_instructions == [None]
    missing = load_dataset(tmp_path, "OK-VQA", instructions="missing")
    assert missing.query_instructions == [MMEB_TASKS["OK-VQA"].query_instruction]
    assert missing.candidate_instructions == [None, None]  # VQA answers carry no instruction
    inline = load_dataset(tmp_path, "ImageNet-1K", instructions="missing")
    assert set(inline.query_instructions) == {None}  # already inline in MMEB-eval texts
    always = load_dataset(tmp_path, "ImageNet-1K", instructions="always")
    assert set(always.query_instructions) == {MMEB_TASKS["ImageNet-1K"].query_instruction}
    with pytest.raises(ValueError, match="instructions must be one of"):
        load_dataset(tmp_path, "OK-VQA", instructions="sometimes")


def test_cache_second_run_embeds_nothing_and_resumes(tmp_path):
    write_small_benchmark(tmp_path)
    cache = tmp_path / "cache"
    distinct = _distinct_items(tmp_path)
    # An interrupted first run: batch 1 flushes the cache every 8 items; it stops at item 10.
    interrupted = StandinEmbedder(fail_after=10)
    with pytest.raises(KeyboardInterrupt):
        evaluate_mmeb(interrupted, tmp_path, cache_dir=cache, batch_size=1, show_progress_bar=False)
    saved = sum(
        len(EmbeddingCache(cache, dataset=d.name, fingerprint=model_fingerprint(interrupted)))
        for d in cache.iterdir()
    )
    assert 0 < saved < interrupted.num_encoded
    first = StandinEmbedder()
    run1 = evaluate_mmeb(first, tmp_path, cache_dir=cache, show_progress_bar=False)
    assert first.num_encoded == distinct - saved  # resumed: flushed chunks are not redone
    second = StandinEmbedder()
    run2 = evaluate_mmeb(second, tmp_path, cache_dir=cache, show_progress_bar=False)
    assert second.num_encoded == 0
    for name, r in run1.results.items():
        torch.testing.assert_close(run2.results[name].scores_NK, r.scores_NK, atol=0, rtol=0)
    # Same as an uncached run, up to the GEMM rounding of other batch compositions (~1 ulp).
    fresh = evaluate_mmeb(StandinEmbedder(), tmp_path, show_progress_bar=False)
    for name, r in fresh.results.items():
        torch.testing.assert_close(run1.results[name].scores_NK, r.scores_NK, atol=1e-6, rtol=0)
    # A different model (other weights) must not hit the first model's cache.
    other = StandinEmbedder(seed=1)
    evaluate_mmeb(other, tmp_path, cache_dir=cache, show_progress_bar=False)
    assert other.num_encoded == distinct


def test_within_run_deduplication(tmp_path):
    write_small_benchmark(tmp_path)
    embedder = StandinEmbedder()
    evaluate_mmeb(embedder, tmp_path, datasets=["ImageNet-1K"], show_progress_bar=False)
    # 6 images as queries, 6 labels as candidates, though the rows list 36 candidate slots.
    assert embedder.num_encoded == 12


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda rows: rows[2].update(qry_img_path="colours/missing.png"), "row 2: qry_img_path"),
        (lambda rows: rows[3].update(tgt_text=[], tgt_img_path=[]), "row 3: empty candidate list"),
        (
            lambda rows: rows[1].update(tgt_img_path=["", "colours/nope.png"] + [""] * 4),
            r"row 1: tgt_img_path\[1\] 'colours/nope.png' not found",
        ),
        (lambda rows: rows[4].update(tgt_img_path=[""]), "row 4: tgt_text has 6 entries"),
        (lambda rows: rows[0].update(qry_text="", qry_img_path=""), "row 0: query has no text"),
    ],
)
def test_malformed_rows_name_dataset_and_row(tmp_path, mutate, message):
    rows = write_small_benchmark(tmp_path)["ImageNet-1K"]
    mutate(rows)
    write_dataset(tmp_path, "ImageNet-1K", rows, fmt="jsonl")
    os.remove(tmp_path / "ImageNet-1K" / "test-00000-of-00001.parquet")
    with pytest.raises(MMEBFormatError, match=f"dataset 'ImageNet-1K' {message}"):
        evaluate_mmeb(StandinEmbedder(), tmp_path, show_progress_bar=False)


def test_image_root_and_missing_dataset(tmp_path):
    write_small_benchmark(tmp_path)
    # Images moved elsewhere: found through image_root, not without it.
    moved = tmp_path / "elsewhere"
    (tmp_path / "images").rename(moved)
    with pytest.raises(MMEBFormatError, match="not found under"):
        load_dataset(tmp_path, "ImageNet-1K")
    assert len(load_dataset(tmp_path, "ImageNet-1K", image_root=moved).queries) == 6
    with pytest.raises(FileNotFoundError, match="dataset 'Nope'"):
        load_dataset(tmp_path, "Nope")


def _distinct_items(root) -> int:
    total = 0
    for name in ("ImageNet-1K", "MSCOCO_t2i", "Synthetic-Colours"):
        d = load_dataset(root, name)
        keys = zip(d.queries, d.query_instructions, strict=True)
        total += len({(q["text"], q["image"], i) for q, i in keys})
        total += len(d.candidates)
    return total
