"""Image paths and image loading shared by the data readers and the embedder: one place that finds
and opens files, so a missing or unreadable image always fails the same way, naming the file (and,
from the readers, the data set row), and one rule for MMEB's "<|image_1|>" placeholder.

Paths in MMEB rows are relative to one folder per data set (MMEB-train: the snapshot root, paths
"images/<Subset>/Train/x.jpg"; MMEB-eval: the folder images.zip was unzipped into, paths
"<Subset>/x.jpg"). ImageResolver settles on that folder once, from the first path found, and from
then on joins every path to it: an error names the one place the file was expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

# The image placeholder of MMEB train/eval text ("<|image_1|>\nRepresent the given image.").
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"
# The placeholder and the whitespace after it: "<|image_1|>\nFind ..." -> "Find ...".
_PLACEHOLDER_RE = re.compile(re.escape(MMEB_IMAGE_PLACEHOLDER) + r"\s*")


class ImageLoadError(OSError):
    """An image file is missing or cannot be decoded. `path` is the file, `where` names the data
    set row it came from (empty when unknown)."""

    def __init__(self, path: str | os.PathLike, reason: str, where: str = ""):
        self.path = str(path)
        self.reason = reason
        self.where = where
        location = f" ({where})" if where else ""
        super().__init__(f"cannot load image {self.path}{location}: {reason}")


def strip_image_placeholder(text: str) -> str:
    """`text` without MMEB's image placeholder (and the whitespace that follows it), for rows
    whose text announces an image that the row does not have (MMEB's WebQA queries:
    "<|image_1|>\\nFind a Wikipedia image..." with an empty image path)."""
    return _PLACEHOLDER_RE.sub("", text).strip()


class ImageResolver:
    """Relative image path -> file, under one base folder chosen once.

    bases: the folders the paths may be relative to, in order of preference. The first path that
    exists under one of them fixes the base for every later path, so a missing file is reported at
    the single place it should be (never as base/base/path). `hint` is appended to "not found"
    messages: the flag or setting that sets the base (e.g. "pass --image-root DIR").
    """

    def __init__(self, bases: Sequence[str | os.PathLike], *, hint: str = ""):
        if not bases:
            raise ValueError("bases is empty")
        self.bases = [Path(b) for b in bases]
        self.base: Path | None = self.bases[0] if len(self.bases) == 1 else None
        self.hint = hint
        self._found: dict[str, Path | None] = {}

    def __call__(self, path: str) -> Path | None:
        """The existing file `path` names, or None."""
        if path in self._found:
            return self._found[path]
        p = Path(path)
        if p.is_absolute():
            found = p if p.is_file() else None
        elif self.base is not None:
            found = self.base / p if (self.base / p).is_file() else None
        else:
            self.base = next((b for b in self.bases if (b / p).is_file()), None)
            found = None if self.base is None else self.base / p
        self._found[path] = found
        return found

    def expected(self, path: str) -> Path:
        """Where `path` should be: itself if absolute, else under the chosen base (the first
        candidate while none is chosen)."""
        p = Path(path)
        return p if p.is_absolute() else (self.base or self.bases[0]) / p

    def not_found(self, path: str) -> str:
        """ "not found ..." in words: where `path` was looked for, and the hint."""
        if Path(path).is_absolute():
            where = "not found (no such file)"
        elif self.base is not None:
            where = f"not found: expected at {self.base / path}"
        else:
            where = "not found under " + " or ".join(str(b) for b in self.bases)
        return f"{where}{'; ' + self.hint if self.hint else ''}"


def load_image(path: str | os.PathLike, *, where: str = "") -> Image.Image:
    """Open and fully decode an image as RGB (grayscale, palette and CMYK files included).
    Raises ImageLoadError naming the file and `where`.

    Decoding happens here (not lazily at first pixel access) so a truncated file fails inside the
    reader that knows the row, not later inside the processor."""
    if not os.path.isfile(path):
        raise ImageLoadError(path, "no such file", where)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(path, f"{type(err).__name__}: {err}", where) from err
