"""Typed YAML: a mapping (from YAML and dotted command-line overrides) checked into dataclasses.

Generic machinery of hardneg.train.config (which holds the run's dataclasses): every key and every
value is checked against the dataclass annotations, and an unknown key or a value of the wrong type
raises ConfigError naming the dotted key and the value. String values may reference environment
variables as ``${NAME}`` or ``${NAME:-default}``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key and the value."""


# ---------------------------------------------------------------------------------------------
# Type checking of one value against an annotation
# ---------------------------------------------------------------------------------------------


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return value converted to tp (int -> float only) or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_value(key, value, arm)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r} ({type(value).__name__})")
        (arm,) = typing.get_args(tp)
        return [_check_value(f"{key}[{i}]", v, arm) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r} ({type(value).__name__})")
        k_tp, v_tp = typing.get_args(tp)
        return {
            _check_value(f"{key} key", k, k_tp): _check_value(f"{key}.{k}", v, v_tp)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be a bool, got {value!r} ({type(value).__name__})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an int, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a float, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r} ({type(value).__name__})")
        return value
    raise AssertionError(f"unsupported annotation {tp} for {key}")


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build(cls, data: dict, prefix: str):
    """Instantiate dataclass cls from a (possibly partial) mapping, checking every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = _fields(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"unknown config key {key!r} (known under {prefix or '.'}: {sorted(hints)})"
        )
    kwargs = {}
    for name, tp in hints.items():
        if name not in data:
            continue
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, data[name] or {}, f"{key}.")
        else:
            kwargs[name] = _check_value(key, data[name], tp)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Environment substitution and overrides
# ---------------------------------------------------------------------------------------------

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {k: expand_env(v, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{key} = {value!r} needs environment variable {name} (set it, or override {key})"
        )

    return _ENV_RE.sub(sub, value)


def parse_overrides(args: list[str]) -> dict:
    """["--train.lr", "1e-5", "--loss.symmetric=false"] -> {"train": {"lr": 1e-5}, ...}.

    Values are parsed as YAML scalars/flow collections (1e-5 -> float, [a, b] -> list)."""
    nested: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"override {arg!r} must look like --section.key VALUE")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        value = _yaml_scalar(raw)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return nested


def _yaml_scalar(raw: str) -> Any:
    # An empty argument (--eval.root "") is the empty string; YAML would read it as null.
    if not raw.strip():
        return raw
    # YAML 1.1 reads "1e-5" as a string (it wants "1.0e-5"); accept what people type.
    try:
        return (
            float(raw)
            if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", raw)
            else yaml.safe_load(raw)
        )
    except yaml.YAMLError:
        return raw


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def fix_yaml_floats(value: Any) -> Any:
    # Same YAML 1.1 quirk inside files: "lr: 1e-5" arrives as a string.
    if isinstance(value, dict):
        return {k: fix_yaml_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [fix_yaml_floats(v) for v in value]
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return float(value)
    return value
