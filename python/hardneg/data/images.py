"""Image loading shared by the data readers and the embedder: one place that opens files, so a
missing or unreadable image always fails the same way, naming the file (and, from the readers, the
data set row)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

# The image placeholder of MMEB train/eval text ("<|image_1|>\nRepresent the given image.").
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"


class ImageLoadError(OSError):
    """An image file is missing or cannot be decoded. `path` is the file, `where` names the data
    set row it came from (empty when unknown)."""

    def __init__(self, path: str | os.PathLike, reason: str, where: str = ""):
        self.path = str(path)
        self.reason = reason
        self.where = where
        location = f" ({where})" if where else ""
        super().__init__(f"cannot load image {self.path}{location}: {reason}")


def resolve_image_path(path: str, image_root: str | os.PathLike | None) -> Path:
    """`path` as stored in a data set row, made absolute against `image_root` when relative."""
    p = Path(path)
    if p.is_absolute() or image_root is None:
        return p
    return Path(image_root) / p


def load_image(path: str | os.PathLike, *, where: str = "") -> Image.Image:
    """Open and fully decode an image as RGB. Raises ImageLoadError naming the file and `where`.

    Decoding happens here (not lazily at first pixel access) so a truncated file fails inside the
    reader that knows the row, not later inside the processor."""
    if not os.path.isfile(path):
        raise ImageLoadError(path, "no such file", where)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(path, f"{type(err).__name__}: {err}", where) from err
