"""Images in, uint8 RGB arrays out: the one decoding path of prepare, extract, evaluate and serving.

`load_rgb` is how `prepare` stores a file image (RGB, longer side downscaled to
max_side) and how `extract` reads image-folder splits (resized to image_size);
`read_image` adds the checks for untrusted input (`mofe score`, the served
model): empty data, unknown formats, truncated files and decompression bombs
become a `BadImage` naming the cause, raised per image so a batch goes on.

Every mode is converted to RGB by its real range (`to_rgb`, ours): PIL's own
`convert("RGB")` clips 16-bit and 32-bit pixels at 255 (a 16-bit TIFF turned 99.6%
white) and drops alpha, showing whatever colour sits under transparent pixels.
EXIF orientation is applied. 8-bit RGB, gray, bilevel and palette images without
transparency (all of the pipeline's own data) convert exactly as before.
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

# The fixed vocabulary of what is wrong with one input (the start of every BadImage
# message): a client of the served model sees these plus our own numbers and names,
# never a library's message (PIL's may quote the file's bytes) nor a server path.
NOT_BASE64 = "not base64"
NOT_AN_IMAGE = "not an image"
TOO_LARGE = "image too large"
CORRUPT = "truncated or corrupt image"
UNSUPPORTED_MODE = "unsupported image mode"
PATH_NOT_ALLOWED = "path not allowed"
ROW_LIMIT = "row limit"
WRONG_TYPE = "wrong type"
EMPTY_ROW = "empty row"

# Modes `to_rgb` converts (PIL's names); any other (LAB, HSV, La, ...) is refused by name.
_PIL_RGB = {"1", "L", "P", "RGB", "RGBX", "YCbCr", "CMYK"}  # convert("RGB") is right for these
_ALPHA = {"LA", "PA", "RGBA", "RGBa"}
_HIGH_DEPTH = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
RGB_MODES = _PIL_RGB | _ALPHA | _HIGH_DEPTH


class BadImage(UserError):
    """One input image cannot be used (shown per file or row, the batch goes on).

    What the served model answers, `str(err)`, starts with one of the vocabulary above and
    adds only our own numbers and names; `detail` (a library's message, a path) is for the
    log, never for a client. `mofe score` also tells its caller why one of its own paths
    cannot be read ("no such file", "not a regular file", "empty file").
    """

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail


def escaped(text: Any) -> str:
    """`text` for one log line: control and other unprintable characters as Python escapes.

    A file named `a\\nmofe score: FAKE` must not write a second, fake log line.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


# ---------------------------------------------------------------- reading images

def _open_checked(opener, max_pixels: int):
    """The header of the image `opener()` gives -> (width, height), or the BadImage it earns."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(opener()) as im:  # reads the header only
                width, height = im.size
    except Image.DecompressionBombError as err:  # PIL's own guard fires first, at over 2x its limit
        declared = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(declared.group(1)):,} pixels" if declared else "too many pixels"
        raise BadImage(f"{TOO_LARGE}: {size} (limit {max_pixels:,})") from None
    except UnidentifiedImageError:
        raise BadImage(f"{NOT_AN_IMAGE} (unrecognised format)") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for damaged headers
        raise BadImage(CORRUPT, detail=f"{type(err).__name__}: {err}") from None
    if width * height > max_pixels:
        raise BadImage(f"{TOO_LARGE}: {width}x{height} pixels (limit {max_pixels:,})")
    return width, height


def image_size(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) that encoded image bytes declare, read from the header without decoding."""
    if len(data) == 0:
        raise BadImage(f"{NOT_AN_IMAGE}: empty image data (0 bytes)")
    return _open_checked(lambda: io.BytesIO(data), max_pixels)


def read_image(source: str | PathLike | bytes, max_side: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file (or its encoded bytes) as uint8 RGB, exactly as `prepare` stores file images."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadImage(f"{NOT_AN_IMAGE}: empty image data (0 bytes)")
        opener = lambda: io.BytesIO(bytes(source))  # noqa: E731
    else:  # a path of the caller's own (`mofe score`): it may hear what is wrong with its files
        path = Path(source)
        if not path.is_file():
            raise BadImage("no such file" if not path.exists() else "not a regular file")
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        opener = lambda: path  # noqa: E731
    from PIL import Image

    _open_checked(opener, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return load_rgb(opener(), max_side=max_side)
    except BadImage:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
        raise BadImage(CORRUPT, detail=f"{type(err).__name__}: {err}") from None


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
            raise BadImage(f"{TOO_LARGE}: {item.shape[1]}x{item.shape[0]} pixels (limit {max_pixels:,})")
        return item
    if isinstance(item, (str, PathLike, bytes, bytearray, memoryview)):
        return read_image(item, max_side, max_pixels)
    raise BadImage(f"{WRONG_TYPE}: {type(item).__name__} (a path, image bytes or a uint8 array)")


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


def load_rgb(path: Path | str | io.BytesIO, max_side: int | None = None, size: int | None = None) -> np.ndarray:
    """One image file as uint8 RGB, downscaled so its longer side is max_side, or resized to size."""
    from PIL import Image

    with Image.open(path) as im:
        im = to_rgb(im)
        if size is not None:
            im = im.resize((size, size), Image.BILINEAR)
        elif max_side and max(im.size) > max_side:
            scale = max_side / max(im.size)
            im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def to_rgb(im):
    """A PIL image of any supported mode -> an RGB one, upright (EXIF orientation), by its real range.

    16-bit gray (I;16*, and I from 16-bit PNG / PGM) scales 0..65535 to 0..255; 32-bit
    TIFF integers scale by their declared bits; float (F) reads 0..1 as black..white;
    alpha is composited over black, the background of the benchmark's images.
    """
    from PIL import Image, ImageOps

    orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation; 1 = as stored
    if orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode not in RGB_MODES:
        raise BadImage(f"{UNSUPPORTED_MODE}: {mode} (supported: {', '.join(sorted(RGB_MODES))})")
    if mode in _PIL_RGB and not (mode == "P" and "transparency" in im.info):
        return im.convert("RGB")
    if mode in _HIGH_DEPTH:
        pixels = np.asarray(im)
        if mode == "F":
            gray = np.clip(np.nan_to_num(pixels, nan=0.0), 0.0, 1.0) * 255.0
        else:
            gray = np.clip(pixels.astype(np.float64), 0, None) * (255.0 / _integer_range(im))
        return Image.fromarray(np.rint(gray).astype(np.uint8)).convert("RGB")
    if mode == "RGBa":  # already premultiplied: the colour over black
        return Image.fromarray(np.ascontiguousarray(np.asarray(im)[..., :3]))
    # alpha (and palettes with a transparent entry): rgb * alpha / 255, rounded = over black
    rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)
    rgb = (rgba[..., :3] * rgba[..., 3:] * 2 + 255) // 510
    return Image.fromarray(rgb.astype(np.uint8))


def _integer_range(im) -> int:
    """The largest value a high-depth integer image's pixels can take."""
    if im.mode.startswith("I;16"):
        return 65535
    tags = getattr(im, "tag_v2", None)  # TIFF: bits per sample and signedness are declared
    if tags is not None and tags.get(258):
        bits = int(tags[258][0] if isinstance(tags[258], tuple) else tags[258])
        return 2 ** (bits - 1) - 1 if tags.get(339) in (2, (2,)) else 2 ** bits - 1
    return 65535  # mode I from a 16-bit PNG or PGM (PIL scales PGM to 0..65535)


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 H x W or H x W x 3 array as PNG bytes (lossless: decodes to the same pixels)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()
