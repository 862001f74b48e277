"""Training state in files that run no code when read: tensors in safetensors, the rest in JSON.

`save_state(state, stem)` writes stem.safetensors (every tensor and numpy array, flattened under
numbered keys) and stem.json (the rest of the structure, with a reference in place of each tensor).
`load_state(stem)` rebuilds the object exactly: tensors keep dtype, shape and bytes; tuples stay
tuples (random.setstate needs them), dict keys keep their type (optimizer state is keyed by int),
floats round-trip through JSON's repr (nan and inf included). Nothing is unpickled, so a checkpoint
folder from anywhere can be loaded without executing code from it; a file that is not what it
claims to be (a pickle renamed, say) is refused with CheckpointError naming it.

State accepted: tensors, numpy arrays, dict, list, tuple, str, int, float, bool, None. Anything else
raises TypeError naming where in the state it sits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

_TENSOR, _ARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"
_MARKERS = (_TENSOR, _ARRAY, _TUPLE, _ITEMS)


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed or holds something other than tensors and plain
    data; the message names the file."""


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        return {_ARRAY: key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}
        return {
            _ITEMS: [
                [_encode(k, tensors, f"{where} key {k!r}"), _encode(v, tensors, f"{where}[{k!r}]")]
                for k, v in value.items()
            ]
        }
    raise TypeError(
        f"{where} is a {type(value).__name__}: checkpoints hold only tensors, numpy arrays and "
        "plain data (dict, list, tuple, str, int, float, bool, None)"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor], file: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, file) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _MARKERS:
        ((marker, payload),) = value.items()
        if marker in (_TENSOR, _ARRAY):
            if payload not in tensors:
                raise CheckpointError(f"{file} refers to tensor {payload!r}, absent from its data")
            t = tensors[payload]
            return t.numpy() if marker == _ARRAY else t
        if marker == _TUPLE:
            return tuple(_decode(v, tensors, file) for v in payload)
        return {_hashable(_decode(k, tensors, file)): _decode(v, tensors, file) for k, v in payload}
    return {k: _decode(v, tensors, file) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def save_state(state: Any, stem: Path) -> list[Path]:
    """Write state to stem.safetensors + stem.json; returns the two paths."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, stem.name)
    data, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    save_file(tensors, str(data))
    meta.write_text(json.dumps(structure) + "\n")
    return [data, meta]


def load_state(stem: Path) -> Any:
    """The object save_state(…, stem) wrote. Raises CheckpointError naming the file when a file is
    missing or is not safetensors / JSON (nothing is ever unpickled)."""
    data, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for file in (data, meta):
        if not file.is_file():
            raise CheckpointError(f"{file} is missing{_pickle_hint(stem)}")
    try:
        tensors = load_file(str(data))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{data} is not a safetensors file ({err}); checkpoints hold tensors in safetensors "
            "and the rest in JSON, and a pickle is never loaded"
        ) from err
    try:
        structure = json.loads(meta.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta} is not JSON ({err})") from err
    return _decode(structure, tensors, meta)


def _pickle_hint(stem: Path) -> str:
    legacy = stem.with_suffix(".pt")
    if legacy.exists():
        return (
            f"; {legacy} is a pickle (an older checkpoint layout) and is not loaded, since "
            "unpickling can run code"
        )
    return ""
