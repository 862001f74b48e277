"""On-disk embedding cache: each distinct item is embedded once per model, and a run resumes.

Layout: <cache_dir>/<dataset>/<model fingerprint>/part-*.safetensors. A part holds the embeddings
of one flushed chunk (`embeddings`, (n, D) fp32) and their keys (safetensors metadata, JSON list).
Parts are written to a temporary name and renamed, so an interrupted run leaves only whole parts and
the next run embeds only what is missing. Ranks write parts under distinct names, so ranks sharing
a file system never collide.

Keys hash what decides an embedding: the role (query / target prompt), the instruction, the text
and the image content (file bytes, not the path, so a moved image still hits). The model side is
the fingerprint: the embedder's configuration plus a strided sample of every parameter, cheap even
for a 7B model yet different for any two trained checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

# Elements sampled per parameter for the fingerprint: enough that any training step changes it.
_FINGERPRINT_SAMPLES = 4096


def model_fingerprint(embedder: torch.nn.Module) -> str:
    """A short hex id of the embedder's weights and embedding-relevant settings.

    An embedder may define `fingerprint()` itself; otherwise its class, its `config` / `settings`
    (when present) and a strided sample of each parameter and buffer are hashed.
    """
    own = getattr(embedder, "fingerprint", None)
    if callable(own):
        return str(own())
    h = hashlib.sha256(type(embedder).__qualname__.encode())
    for attr in ("config", "settings"):
        value = getattr(embedder, attr, None)
        if value is not None:
            as_dict = value.to_dict() if hasattr(value, "to_dict") else value
            h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in list(embedder.named_parameters()) + list(embedder.named_buffers()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
            sample = flat[::step].to(device="cpu", dtype=torch.float32).contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:20]


class ImageDigests:
    """Content hashes of images, memoised per path (MMEB candidates repeat the same files)."""

    def __init__(self) -> None:
        self._by_path: dict[str, str] = {}

    def __call__(self, image) -> str:
        if image is None:
            return ""
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if path not in self._by_path:
                with open(path, "rb") as f:
                    self._by_path[path] = hashlib.sha256(f.read()).hexdigest()
            return self._by_path[path]
        # A PIL image held in memory.
        h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
        return h.hexdigest()


def item_key(role: str, instruction: str | None, text: str | None, image_digest: str) -> str:
    """Cache key of one item: hex sha256 of everything that decides its embedding."""
    payload = json.dumps([role, instruction or "", text or "", image_digest])
    return hashlib.sha256(payload.encode()).hexdigest()


class EmbeddingCache:
    """Embeddings by key for one dataset and one model; on disk when `directory` is given.

    get(keys) returns the cached rows; add(keys, embeddings_ND) stores new rows (and writes one part
    file). Without a directory it is an in-memory dict (the run still embeds each item once).
    """

    def __init__(self, directory: str | os.PathLike | None, *, dataset: str, fingerprint: str):
        self.path = None if directory is None else Path(directory) / dataset / fingerprint
        self._rows: dict[str, Tensor] = {}
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            self.reload()

    def reload(self) -> None:
        """Read every part on disk (parts written by other ranks included)."""
        if self.path is None:
            return
        for part in sorted(self.path.glob("part-*.safetensors")):
            with safe_open(part, framework="pt") as f:
                keys = json.loads(f.metadata()["keys"])
                rows_ND = f.get_tensor("embeddings")
            for key, row in zip(keys, rows_ND, strict=True):
                self._rows.setdefault(key, row)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, keys: list[str]) -> Tensor:
        """(len(keys), D) fp32 rows of cached keys (all must be present)."""
        return torch.stack([self._rows[k] for k in keys])

    def add(self, keys: list[str], embeddings_ND: Tensor, *, write: bool = True) -> None:
        """Store rows; with a directory and `write`, also as one new part file."""
        assert len(keys) == embeddings_ND.shape[0], (len(keys), tuple(embeddings_ND.shape))
        rows = embeddings_ND.detach().to(device="cpu", dtype=torch.float32).contiguous()
        new = [i for i, k in enumerate(keys) if k not in self._rows]
        if not new:
            return
        for i in new:
            self._rows[keys[i]] = rows[i]
        if self.path is None or not write:
            return
        name = f"part-{uuid.uuid4().hex}"
        tmp = self.path / f".{name}.tmp"
        save_file(
            {"embeddings": rows[new].contiguous()},
            tmp,
            metadata={"keys": json.dumps([keys[i] for i in new])},
        )
        os.replace(tmp, self.path / f"{name}.safetensors")
