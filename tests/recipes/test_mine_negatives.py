"""recipes/mine_negatives.py on the released MMEB-train layout (tests/fixtures/mmeb_layout.py) with
the tiny Embedder: the written files against an fp64 selection oracle, the false-negative filter on
a planted near-duplicate, the training reader and collator on the output, the originals untouched,
torchrun with 2 gloo ranks giving the single-process files, and a short training run on them.

Planted in WebQA: a row whose positive is row 0's (same text) stored under another image path, a
byte copy, so it embeds exactly as row 0's positive (a near-duplicate, score ratio 1 > 0.95); and a
row whose positive is row 1's with trailing spaces (a duplicate: one target id, one pool entry).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fixtures.mmeb_layout import PH, write_mmeb_train, write_train_parquet
from hardneg.data import MMEBTrainDataset, TrainCollator
from hardneg.data.images import ImageResolver
from hardneg.eval.mining_io import find_mining_subsets, read_subset
from hardneg.models import Embedder

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "mine_negatives.py"
SPLITS = "original,train"
K = 2


def _recipe():
    spec = importlib.util.spec_from_file_location("mine_negatives_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_planted(root: Path) -> None:
    rows = write_mmeb_train(root)
    webqa = rows["WebQA"]["original"]
    shutil.copy(root / webqa[0]["pos_image_path"], root / "images/WebQA/Train/0_copy.jpg")
    near_duplicate = dict(
        webqa[0],
        qry=f"{PH}\nFind a Wikipedia image that answers this question: Is the bridge red?\n",
        pos_image_path="images/WebQA/Train/0_copy.jpg",
    )
    duplicate = dict(
        webqa[1],
        qry=f"{PH}\nFind a Wikipedia image that answers this question: What is it made of?\n",
        pos_text=webqa[1]["pos_text"] + "  ",
    )
    write_train_parquet(root, "WebQA", "original", webqa + [near_duplicate, duplicate])


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _mine(data: Path, out: Path, *extra: str) -> dict:
    args = ["--model", "tiny", "--data-root", str(data), "--out", str(out), "--k", str(K)]
    return _recipe().main(args + ["--splits", SPLITS, "--batch-size", "3", *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("MMEB-train")
    write_planted(root)
    return root


@pytest.fixture(scope="module")
def mined(data, tmp_path_factory):
    before = _digests(data)
    out = tmp_path_factory.mktemp("mined")
    summary = _mine(data, out)
    return out, summary, before


def expected_negatives(data: Path, fraction: float) -> dict:
    """{(subset, split): per row [(pos_text, pos_image_path) chosen]} and filtered counts, from
    the tiny model's embeddings (encoded here in one call per side) and an fp64 rule in Python."""
    embedder = Embedder.tiny()
    resolve = ImageResolver([data / "images", data])
    out = {}
    for split, name, files in find_mining_subsets(data, None, SPLITS.split(",")):
        sub = read_subset(data, name, split, files, resolve)
        q = embedder.encode(sub.queries, role="query").double()
        c = embedder.encode(sub.candidates, role="target").double()
        rows, filtered = [], 0
        for i, s in enumerate((q @ c.T).tolist()):
            p = sub.positive_index[i]
            limit = s[p] - (1 - fraction) * abs(s[p]) if math.isfinite(fraction) else math.inf
            others = [(v, j) for j, v in enumerate(s) if j != p]
            filtered += sum(v > limit for v, _ in others)
            kept = sorted((t for t in others if t[0] <= limit), key=lambda t: -t[0])[:K]
            rows.append([sub.candidate_fields[j] for _, j in kept])
        out[(name, split)] = (rows, filtered)
    return out


def _written(out: Path, name: str, split: str) -> list[list[tuple[str, str]]]:
    table = pq.read_table(out / name / f"{split}-00000-of-00001.parquet")
    return [
        list(zip(t, p, strict=True))
        for t, p in zip(
            table["neg_text"].to_pylist(), table["neg_image_path"].to_pylist(), strict=True
        )
    ]


def test_written_negatives_are_the_oracle_choice(data, mined):
    out, summary, _ = mined
    expected = expected_negatives(data, 0.95)
    assert {(e["subset"], e["split"]) for e in summary["subsets"]} == set(expected)
    for entry in summary["subsets"]:
        rows, filtered = expected[(entry["subset"], entry["split"])]
        assert _written(out, entry["subset"], entry["split"]) == rows, entry["subset"]
        assert entry["filtered"]["candidates"] == filtered
        assert entry["queries_with_fewer_than_k"] == sum(len(r) < K for r in rows)
        assert entry["queries_without_negative"] == sum(not r for r in rows)
        assert entry["negatives"]["count"] == sum(len(r) for r in rows)
        assert entry["rows"] == len(rows) and entry["positive"]["count"] == len(rows)
    assert sum(e["filtered"]["candidates"] for e in summary["subsets"]) > 0
    assert sum(e["negatives"]["count"] for e in summary["subsets"]) > 0
    assert json.loads((out / "mining_summary.json").read_text()) == summary
    assert "| WebQA | original | 5 | 4 |" in (out / "mining_summary.md").read_text()


def test_planted_near_duplicate_is_filtered_and_true_negatives_kept(data, mined, tmp_path):
    out, _, _ = mined
    webqa = _written(out, "WebQA", "original")
    copy, original = "images/WebQA/Train/0_copy.jpg", "images/WebQA/Train/0.jpg"
    assert copy not in [path for _, path in webqa[0]]  # row 0's near-duplicate
    assert original not in [path for _, path in webqa[3]]  # and the reverse
    assert webqa[0]  # row 0 keeps a true negative
    # The check can fail: without the filter the near-duplicates are chosen.
    _mine(data, tmp_path / "unfiltered", "--subsets", "WebQA", "--fn-threshold", "inf")
    unfiltered = _written(tmp_path / "unfiltered", "WebQA", "original")
    assert copy in [path for _, path in unfiltered[0]]
    assert original in [path for _, path in unfiltered[3]]


def test_training_reader_returns_the_mined_negatives(data, mined):
    out, _, before = mined
    ds = MMEBTrainDataset(out, image_root=data)  # split "original": HatefulMemes, ImageNet, WebQA
    examples = [ds[i] for i in range(len(ds))]
    written = {
        name: _written(out, name, "original") for name in ("HatefulMemes", "ImageNet_1K", "WebQA")
    }
    for ex in examples:
        # The positive and its duplicates (same target id) are never among the negatives.
        assert ex["target_id"] not in ex["hard_negative_ids"]
        chosen = written[ex["subset"]][ex["row"]]
        assert len(ex["hard_negatives"]) == len(chosen)
        for item, (text, path) in zip(ex["hard_negatives"], chosen, strict=True):
            assert item["text"] == (text or None) and (item["image"] is None) == (path == "")
    with_negatives = [ex for ex in examples if ex["hard_negatives"]]
    assert with_negatives
    batch = TrainCollator(Embedder.tiny(), num_hard_negatives=1)(with_negatives)
    assert batch["hard_negatives"]["input_ids"].shape[0] == len(with_negatives)
    want_ids = [ex["hard_negative_ids"][0] for ex in with_negatives]
    assert batch["hard_negative_ids"][:, 0].tolist() == want_ids
    assert _digests(data) == before  # the originals are untouched


def test_layout_and_columns_mirror_the_originals(data, mined):
    out, _, _ = mined
    originals = sorted(
        p.relative_to(data)
        for p in data.rglob("*.parquet")
        if p.name.startswith(("original", "train"))
    )
    assert sorted(p.relative_to(out) for p in out.rglob("*.parquet")) == originals
    for rel in originals:
        old, new = pq.read_table(data / rel), pq.read_table(out / rel)
        names = old.column_names + [
            c for c in ("neg_text", "neg_image_path") if c not in old.column_names
        ]
        assert new.column_names == names, rel
        for column in old.column_names:
            if not column.startswith("neg_"):
                assert new[column].to_pylist() == old[column].to_pylist(), (rel, column)
        assert str(new.schema.field("neg_text").type) == "list<element: string>"


def test_k1_writes_single_strings_as_mmeb_train(data, tmp_path):
    summary = _mine(
        data, tmp_path / "k1", "--k", "1", "--subsets", "HatefulMemes", "--fn-threshold", "inf"
    )
    table = pq.read_table(tmp_path / "k1" / "HatefulMemes" / "original-00000-of-00001.parquet")
    assert str(table.schema.field("neg_text").type) == "string"
    # The pool is {"No", "Yes"}: each row's only negative is the other answer.
    answers = table["pos_text"].to_pylist()
    assert table["neg_text"].to_pylist() == ["Yes" if a == "No" else "No" for a in answers]
    assert table["neg_image_path"].to_pylist() == [""] * 4
    assert summary["subsets"][0]["filtered"]["candidates"] == 0


def test_flat_jsonl_layout(tmp_path):
    """The one-file-per-subset layout (root/<Subset>.jsonl) is mirrored as jsonl, keys kept."""
    root = tmp_path / "flat"
    root.mkdir()
    answers = ["red", "green", "blue", "red "]  # "red " duplicates "red"
    rows = [
        {
            "qry": f"What colour is thing {i}?",
            "qry_image_path": "",
            "pos_text": a,
            "pos_image_path": "",
            "source": f"s{i}",
        }
        for i, a in enumerate(answers)
    ]
    (root / "Colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", "tiny", "--data-root", str(root), "--out", str(tmp_path / "o")]
    _recipe().main(args + ["--k", "3", "--fn-threshold", "inf"])
    written = [json.loads(line) for line in (tmp_path / "o" / "Colours.jsonl").open()]
    assert [{k: v for k, v in r.items() if not k.startswith("neg_")} for r in written] == rows
    for row in written:
        # The pool is {red, green, blue}: two negatives each, never the positive's colour.
        assert sorted(row["neg_text"]) == sorted(
            {"red", "green", "blue"} - {row["pos_text"].strip()}
        )
        assert row["neg_image_path"] == ["", ""]
    ds = MMEBTrainDataset(tmp_path / "o")
    assert [len(ds[i]["hard_negatives"]) for i in range(len(ds))] == [2, 2, 2, 2]


@pytest.mark.parametrize(
    "case, message",
    [
        ("same_folder", "out_dir '{data}' is data_root: the original files are never overwritten"),
        ("no_subset", "subsets ['Nope'] not found under '{data}' for splits ['original', 'train']"),
        ("no_image", "subset 'OK-VQA': {copy}/OK-VQA/train-00000-of-00001.parquet row 0: "),
    ],
)
def test_user_errors_are_one_line(data, tmp_path, capsys, case, message):
    copy = tmp_path / "copy"
    args = ["--model", "tiny", "--data-root", str(data), "--out", str(tmp_path / "o"), "--k", "1"]
    args += ["--splits", SPLITS]
    if case == "same_folder":
        args[5] = str(data)
    elif case == "no_subset":
        args += ["--subsets", "Nope"]
    else:
        shutil.copytree(data, copy)
        shutil.rmtree(copy / "images" / "OK-VQA")
        args[3] = str(copy)
        args += ["--subsets", "OK-VQA"]
    with pytest.raises(SystemExit) as err:
        _recipe().main(args)
    assert err.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("mine_negatives: error: " + message.format(data=data, copy=copy)), line
    assert "\n" not in line


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_files(data, mined, tmp_path):
    out, summary, _ = mined
    sharded = tmp_path / "mined"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(RECIPE), "--model", "tiny", "--data-root", str(data), "--out", str(sharded)]
    cmd += ["--k", str(K), "--splits", SPLITS, "--batch-size", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in sorted(out.rglob("*.parquet")):
        rel = path.relative_to(out)
        assert pq.read_table(sharded / rel).equals(pq.read_table(path)), rel
    other = json.loads((sharded / "mining_summary.json").read_text())
    for mine, theirs in zip(summary["subsets"], other["subsets"], strict=True):
        for key in ("positive", "negatives", "hardest_negative"):
            # Other batch compositions change the padding, hence the GEMM rounding only.
            assert theirs[key] == pytest.approx(mine[key], abs=1e-4), key
        assert theirs["filtered"] == mine["filtered"]


@pytest.mark.slow
def test_training_on_mined_negatives(data, tmp_path):
    """Mined parquet -> recipes/train_llave.py with one explicit negative per query, 2 steps."""
    mined = tmp_path / "mined"
    # k 1 without the filter: every row of the pool-of-2+ subsets gets its one negative.
    _mine(data, mined, "--k", "1", "--fn-threshold", "inf")
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "recipes" / "train_llave.py")]
    cmd += ["--config", str(REPO / "recipes" / "configs" / "synthetic_tiny.yaml")]
    overrides = {
        "data.root": mined,
        "data.image_root": data,
        "data.num_hard_negatives": 1,
        "data.synthetic.generate_if_missing": "false",
        "train.output_dir": run,
        "train.batch_size": 4,
        "train.gradcache_chunk_size": 0,
        "train.max_steps": 2,
        "train.log_every": 1,
        "train.progress_bar": "false",
        "checkpoint.every_steps": 0,
        "eval.root": "''",  # a YAML empty string: no evaluation after training
    }
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [
        line for line in proc.stderr.splitlines() if " step " in line and "hardest-neg" in line
    ]
    assert [line.split(" step ")[1].split()[0] for line in steps] == ["1/2", "2/2"]
    for line in steps:
        loss = float(line.split(" loss ")[1].split()[0])
        assert math.isfinite(loss) and loss > 0
    assert (run / "final" / "config.json").is_file()
    assert "num_hard_negatives: 1" in (run / "config.yaml").read_text()
