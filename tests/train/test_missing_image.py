"""A missing training image stops the run with an error naming the file (data.on_missing_image
"error"), and "skip" trains on without the rows that reference it."""

from __future__ import annotations

import shutil

import pytest
from hardneg.data import ImageLoadError
from hardneg.train.config import load_config
from hardneg.train.trainer import Trainer


def _cfg(root, out, policy):
    return load_config(
        None,
        [
            "--data.root",
            str(root),
            "--data.on_missing_image",
            policy,
            "--train.output_dir",
            str(out),
            "--train.batch_size",
            "16",
            "--train.max_steps",  # 3 x 16 rows: the whole epoch is read, the missing rows too
            "3",
            "--train.precision",
            "fp32",
            "--train.progress_bar",
            "false",
            "--checkpoint.every_steps",
            "0",
        ],
    )


@pytest.fixture
def broken_dir(mmeb_train_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(mmeb_train_dir, root)
    (root / "images" / "red_left.png").unlink()
    return root


def test_missing_image_names_the_file(broken_dir, tmp_path):
    trainer = Trainer(_cfg(broken_dir, tmp_path / "run", "error"))
    with pytest.raises(ImageLoadError, match=r"red_left\.png.*no such file"):
        trainer.fit()


def test_skip_policy_trains_without_the_rows(broken_dir, tmp_path):
    trainer = Trainer(_cfg(broken_dir, tmp_path / "run", "skip"))
    assert sum(trainer.dataset.skipped.values()) > 0
    assert len(trainer.fit()) == 3
