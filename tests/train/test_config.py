"""Config loading: YAML + dotted overrides into typed dataclasses; errors name key and value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hardneg.train.config import ConfigError, load_config, parse_overrides, save_config, to_dict

CONFIGS = sorted((Path(__file__).parents[2] / "recipes" / "configs").glob("*.yaml"))


def _write(tmp_path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_overrides_are_typed_and_nested(tmp_path):
    path = _write(tmp_path, {"train": {"lr": 1e-4, "batch_size": 8}, "loss": {"mode": "infonce"}})
    cfg = load_config(
        path, ["--train.lr", "1e-5", "--loss.symmetric=false", "--data.subsets", "[A, B]"]
    )
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 8
    assert cfg.loss.mode == "infonce" and cfg.loss.symmetric is False
    assert cfg.data.subsets == ["A", "B"]


def test_int_is_accepted_for_float_but_not_the_reverse(tmp_path):
    assert load_config(None, ["--train.lr", "1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"train.batch_size must be an int, got 2.5"):
        load_config(None, ["--train.batch_size", "2.5"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--train.lrr", "1"], r"unknown config key 'train.lrr'"),
        (["--trian.lr", "1"], r"unknown config key 'trian'"),
        (["--train.epochs", "yes"], r"train.epochs must be an int, got True"),
        (["--loss.symmetric", "3"], r"loss.symmetric must be a bool, got 3"),
        (["--loss.mode", "focal"], r"loss.mode must be one of .*, got 'focal'"),
        (["--train.batch_size", "0"], r"train.batch_size must be > 0, got 0"),
        (["--data.weights", "[1, 2]"], r"data.weights must be a mapping, got \[1, 2\]"),
        (["--data.weights", "{A: x}"], r"data.weights.A must be a float, got 'x'"),
        (["--train.lr"], r"override '--train.lr' has no value"),
        (["train.lr", "1"], r"override 'train.lr' must look like --section.key VALUE"),
    ],
)
def test_errors_name_the_key_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_env_substitution(tmp_path, monkeypatch):
    path = _write(
        tmp_path,
        {
            "model": {"name_or_path": "${HN_TEST_MODEL}"},
            "data": {"root": "${HN_TEST_ROOT:-data/x}"},
        },
    )
    with pytest.raises(
        ConfigError,
        match=r"model.name_or_path = '\$\{HN_TEST_MODEL\}' needs "
        "environment variable HN_TEST_MODEL",
    ):
        load_config(path)
    monkeypatch.setenv("HN_TEST_MODEL", "some/model")
    cfg = load_config(path)
    assert cfg.model.name_or_path == "some/model" and cfg.data.root == "data/x"
    # An override replaces the reference before it is expanded.
    assert load_config(path, ["--data.root", "d"]).data.root == "d"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--train.lr", "3e-5", "--model.lora.enabled", "true"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert to_dict(load_config(tmp_path / "resolved.yaml")) == to_dict(cfg)


def test_parse_overrides_scalars():
    assert parse_overrides(["--a.b", "2e-3", "--a.c", "x"]) == {"a": {"b": 2e-3, "c": "x"}}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path, monkeypatch):
    for name in ("MODEL", "MMEB_TRAIN", "MMEB_TRAIN_IMAGES", "MMEB_EVAL", "OUTPUT_DIR"):
        monkeypatch.setenv(name, f"/x/{name.lower()}")
    cfg = load_config(path)
    text = path.read_text()
    # No absolute paths in the files themselves: only ${...} references or relative paths.
    assert "/home/" not in text and "/mnt/" not in text and "/data/" not in text
    assert cfg.train.batch_size > 0
