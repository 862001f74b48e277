"""Log lines and the tqdm bar share the terminal without overwriting each other: while the bar is
shown, console log records are written through tqdm (the bar is cleared, the line printed, the bar
redrawn), so every log line starts on its own line."""

from __future__ import annotations

import logging
import sys

from hardneg.train.config import load_config
from hardneg.train.trainer import Trainer


def _fit_with_console_log(root, out, *, bar: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)  # the terminal, as logging.basicConfig sets up
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    logger = logging.getLogger()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        cfg = load_config(
            None,
            [
                "--data.root", str(root),
                "--train.output_dir", str(out),
                "--train.batch_size", "4",
                "--train.max_steps", "3",
                "--train.precision", "fp32",
                "--train.progress_bar", str(bar).lower(),
                "--train.log_every", "1",
                "--checkpoint.every_steps", "0",
            ],
        )  # fmt: skip
        Trainer(cfg).fit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _log_lines(err: str) -> list[str]:
    """What each line holding a log record shows last (after the bar's carriage returns)."""
    return [line.split("\r")[-1] for line in err.split("\n") if "LOG step" in line]


def test_log_lines_do_not_land_inside_the_bar(mmeb_train_dir, tmp_path, capsys):
    _fit_with_console_log(mmeb_train_dir, tmp_path / "run", bar=True)
    err = capsys.readouterr().err
    assert "train:" in err and "3/3" in err  # the bar was drawn
    lines = _log_lines(err)
    assert len(lines) == 3
    for line in lines:
        assert line.startswith("LOG step "), repr(line)
