"""The rows and bodies the serving benchmark and the serving tests send (ours): good, bad and hostile.

`hostile_rows` is the mix the probe of issue 19 found (paths to the server's files, a
secret behind a PPM header, wrong types, bombs), each row with the start of the error it
must get; `hostile_bodies` adds what only a whole request can do (a 30 MB row, more rows
than serve.max_rows, a bad batch_size).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

ROW_KINDS = ("not base64", "truncated", "too many pixels")


def declared_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 1-bit pixels with almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + chunk(b"IEND", b""))


# A file whose first bytes made PIL quote them in its error message (the probe's leak)
SECRET_PPM = b"P6\nSECRET-TOKEN-0123456789abcdef\n"


def hostile_rows(good: list[bytes], outside: str, missing: str) -> list[tuple[dict, str | None]]:
    """One request's rows: good images between every bad kind the probe found, each with the start of
    the error it must get (None: a prediction). `outside`: an existing file outside any path root."""
    from PIL import Image

    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    lab = io.BytesIO()
    Image.new("LAB", (8, 8)).save(lab, format="TIFF")
    text = b"just text"
    return [({"image": b64(good[0])}, None),
            ({"image": "not base64!"}, "not base64"),
            ({"path": outside}, "path not allowed"),
            ({"path": missing}, "path not allowed"),
            ({"path": "/etc/passwd"}, "path not allowed"),
            ({"path": "../../../../../../proc/self/environ"}, "path not allowed"),
            ({"path": "x\nmofe_ood.serving.detector: FAKE injected line"}, "path not allowed"),
            ({"image": b64(SECRET_PPM)}, "truncated or corrupt image"),
            ({"image": b64(declared_png(50_000, 50_000))}, "image too large"),
            ({"image": b64(declared_png(9000, 9000))}, "image too large: 9000x9000 pixels"),
            ({"image": b64(text)}, "not an image"),
            ({"image": b64(good[-1][: len(good[-1]) // 2])}, "truncated or corrupt image"),
            ({"image": 5}, "wrong type: int"),
            ({"image": True}, "wrong type: bool"),
            ({"image": [1, 2]}, "wrong type: list"),
            ({"image": {"a": 1}}, "wrong type: dict"),
            ({"image": b64(lab.getvalue())}, "unsupported image mode: LAB"),
            ({"image": b64(good[-1])}, None)]


def bad_row(kind: str, good_png: bytes) -> str:
    if kind == "not base64":
        return "this is not base64!"
    if kind == "truncated":
        return base64.b64encode(good_png[: len(good_png) // 2]).decode()
    return base64.b64encode(declared_png(50_000, 50_000)).decode()


def request_body(rows: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}}).encode()


def hostile_bodies(images: list[bytes], max_rows: int, workdir: Path) -> list[tuple[str, bytes, object]]:
    """(name, body, what must come back) for each hostile request; `what` is a list of per-row error
    starts (None: a prediction), or an int: the HTTP status of a request refused whole."""
    import numpy as np

    from mofe_ood.images import encode_png

    outside = workdir / "outside.png"  # exists, outside any path root
    outside.write_bytes(images[0])
    rows = hostile_rows(images[:2], str(outside), str(workdir / "missing.png"))
    big = base64.b64encode(encode_png(np.add.outer(np.arange(3000), np.arange(4000)).astype(np.uint8))).decode()
    good = base64.b64encode(images[2]).decode()

    def records(pairs):
        return json.dumps({"dataframe_records": [r for r, _ in pairs]}).encode(), [w for _, w in pairs]

    mix, mix_want = records(rows)
    large, large_want = records([({"image": big}, None), ({"image": good}, None)])
    return [("mix", mix, mix_want),
            ("12 MP image", large, large_want),
            ("30 MB row", request_body(["A" * 30_000_000, good]), ["image too large", None]),
            ("rows past max_rows", request_body([good] * (max_rows + 8)), [None] * max_rows + ["row limit"] * 8),
            ("batch_size -5", json.dumps({"dataframe_split": {"columns": ["image"], "data": [[good]]},
                                          "params": {"batch_size": -5}}).encode(), 400)]
