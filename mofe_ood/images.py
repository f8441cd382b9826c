"""Images in, uint8 RGB arrays out: the one decoding path of prepare, extract, evaluate and serving.

`load_rgb` is how `prepare` stores a file image (RGB, longer side downscaled to
max_side) and how `extract` reads image-folder splits (resized to image_size);
`read_image` adds the checks for untrusted input (`mofe score`, the served
model): empty data, unknown formats, truncated files and decompression bombs
become a `BadImage` naming the cause, raised per image so a batch goes on.
"""

from __future__ import annotations

import io
import re
import warnings
from os import PathLike
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mofe_ood.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# An image over this many pixels is refused before decoding (24 MP photos pass; bombs do not).
MAX_PIXELS = 64_000_000


class BadImage(UserError):
    """One input image cannot be used; the message says why (shown per file, the batch goes on)."""


# ---------------------------------------------------------------- reading images

def read_image(source: str | PathLike | bytes, max_side: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file (or its encoded bytes) as uint8 RGB, exactly as `prepare` stores file images."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadImage("empty image data (0 bytes)")
        opener = lambda: io.BytesIO(bytes(source))  # noqa: E731
    else:
        path = Path(source)
        if not path.is_file():
            raise BadImage("no such file" if not path.exists() else "not a regular file")
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        opener = lambda: path  # noqa: E731
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(opener()) as im:  # reads the header only
                width, height = im.size
            if width * height > max_pixels:
                raise BadImage(f"image too large: {width}x{height} pixels (limit {max_pixels:,})")
            return load_rgb(opener(), max_side=max_side)
    except BadImage:
        raise
    except Image.DecompressionBombError as err:  # PIL's own guard fires first, at over 2x its limit
        declared = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(declared.group(1)):,} pixels" if declared else "too many pixels"
        raise BadImage(f"image too large: {size} (limit {max_pixels:,})") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
        raise BadImage(f"corrupt image ({type(err).__name__}: {err})") from None


def as_image(item: Any, max_side: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One input (file path, encoded bytes or uint8 H x W [x C] array) -> uint8 H x W or H x W x 3.

    A `BadImage` given as the item (a row the caller already found bad) is raised as it is.
    """
    if isinstance(item, BadImage):
        raise item
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise BadImage(f"array images must be uint8, got {item.dtype}")
        if item.ndim == 3 and item.shape[-1] in (1, 3, 4):
            item = item[..., 0] if item.shape[-1] == 1 else item[..., :3]
        if item.ndim not in (2, 3) or min(item.shape[:2]) < 1:
            raise BadImage(f"array image of shape {item.shape} is not H x W or H x W x 3")
        if item.shape[0] * item.shape[1] > max_pixels:
            raise BadImage(f"image too large: {item.shape[1]}x{item.shape[0]} pixels (limit {max_pixels:,})")
        return item
    if isinstance(item, (str, PathLike, bytes, bytearray, memoryview)):
        return read_image(item, max_side, max_pixels)
    raise BadImage(f"unsupported input of type {type(item).__name__} (a path, image bytes or a uint8 array)")


def list_images(paths: Iterable[str | PathLike]) -> list[Path]:
    """Files named directly, plus image files found recursively in named folders (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                          and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)  # missing or unreadable files are reported per file by predict
    return out


def readable(path: Path) -> bool:
    from PIL import Image

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.verify()
        return True
    except Exception:  # PIL raises many types for corrupt, truncated or huge files
        return False


def load_rgb(path: Path | str, max_side: int | None = None, size: int | None = None) -> np.ndarray:
    """One image file as uint8 RGB, downscaled so its longer side is max_side, or resized to size."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            im = im.resize((size, size), Image.BILINEAR)
        elif max_side and max(im.size) > max_side:
            scale = max_side / max(im.size)
            im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 H x W or H x W x 3 array as PNG bytes (lossless: decodes to the same pixels)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()
