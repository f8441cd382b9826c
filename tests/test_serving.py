"""The served model and `mofe score` against hostile input (issue 19): paths, limits, errors, pixels, logs.

The first part needs no model: decoding (every mode against a reference conversion, EXIF
orientation) and the served model's row parsing (path policy, limits checked before
decoding, the error vocabulary). The second part runs a small detector (a random
EfficientNet-Lite0 at 32 px, KNN on a random bank): concurrent requests sharing forward
passes, and the detector as MLflow serves it: in process through MLflow's own request
handler, and as `mlflow models serve` on loopback for what only a real server shows (the
next request, memory).
"""

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mofe_ood import images
from mofe_ood.bench._rows import SECRET_PPM, declared_png, hostile_rows
from mofe_ood.images import BadImage, escaped, load_rgb, read_image
from mofe_ood.serving import pyfunc
from mofe_ood.serving.pyfunc import BadRequest, batch_size_from, rows_from_input

ROOT = Path(__file__).resolve().parents[1]
VOCABULARY = (images.NOT_BASE64, images.NOT_AN_IMAGE, images.TOO_LARGE, images.CORRUPT, images.UNSUPPORTED_MODE,
              images.PATH_NOT_ALLOWED, images.ROW_LIMIT, images.WRONG_TYPE, images.EMPTY_ROW)


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


RNG = np.random.default_rng(0)
GRAY16 = RNG.integers(0, 65536, (12, 10), dtype=np.uint16)
RGB8 = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (12, 10), dtype=np.uint8)


def over_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The reference alpha conversion: colour x alpha / 255, rounded half up."""
    return np.floor(rgb.astype(np.float64) * alpha[..., None] / 255 + 0.5).astype(np.uint8)


def gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1)


# ---------------------------------------------------------------- pixels (item 4)

def test_16_bit_gray_scales_by_its_range_in_tiff_png_and_pgm():
    want = gray3(np.floor(GRAY16 / 65535 * 255 + 0.5).astype(np.uint8))
    for fmt in ("TIFF", "PNG", "PPM"):
        data = encoded(Image.fromarray(GRAY16), fmt)
        assert Image.open(io.BytesIO(data)).mode in ("I;16", "I"), fmt  # what PIL clipped before
        np.testing.assert_array_equal(read_image(data, max_side=64), want, err_msg=fmt)
    # PIL's own conversion, for the record: most of these pixels come out white
    clipped = np.asarray(Image.open(io.BytesIO(encoded(Image.fromarray(GRAY16), "TIFF"))).convert("RGB"))
    assert (clipped == 255).mean() > 0.99


def test_32_bit_integer_tiff_scales_by_its_declared_bits():
    values = np.array([[0, 2**30, -5, 2**31 - 1]], np.int32)  # signed: 0..2^31-1, negatives are black
    got = read_image(encoded(Image.fromarray(values), "TIFF"), max_side=64)
    np.testing.assert_array_equal(got[..., 0], [[0, 128, 0, 255]])


def test_float_images_read_0_to_1_as_black_to_white():
    values = np.array([[0.0, 0.25, 0.5, 1.0, 2.0, -1.0, np.nan]], np.float32)
    got = read_image(encoded(Image.fromarray(values, mode="F"), "TIFF"), max_side=64)
    np.testing.assert_array_equal(got[..., 0], [[0, 64, 128, 255, 255, 0, 0]])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_alpha_is_composited_over_black(mode):
    if mode == "RGBA":
        image, rgb = Image.fromarray(np.dstack([RGB8, ALPHA])), RGB8
    elif mode == "LA":
        gray = RGB8[..., 0]
        image, rgb = Image.fromarray(np.dstack([gray, ALPHA]), mode="LA"), gray3(gray)
    else:  # a palette with alpha per pixel (no file format stores it: PIL makes it in memory)
        palette = Image.fromarray(RGB8).quantize(16)
        rgb = np.asarray(palette.convert("RGB"))
        image = palette.convert("PA")
        image.putalpha(Image.fromarray(ALPHA))
    assert image.mode == mode
    got = np.asarray(images.to_rgb(image)) if mode == "PA" else read_image(encoded(image, "PNG"), max_side=64)
    np.testing.assert_array_equal(got, over_black(rgb, ALPHA))


def test_a_palette_with_a_transparent_entry_is_composited_and_one_without_is_unchanged():
    palette = Image.fromarray(RGB8).quantize(8)
    index = np.asarray(palette)
    colours = np.asarray(palette.convert("RGB"))
    plain = read_image(encoded(palette, "PNG"), max_side=64)
    np.testing.assert_array_equal(plain, colours)
    see_through = encoded(palette, "PNG", transparency=int(index[0, 0]))
    want = np.where((index == index[0, 0])[..., None], 0, colours)
    np.testing.assert_array_equal(read_image(see_through, max_side=64), want)


def test_cmyk_converts_by_the_usual_formula():
    cmyk = RNG.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    got = read_image(encoded(Image.fromarray(cmyk, mode="CMYK"), "TIFF"), max_side=64)
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    want = (255 - c) * (255 - k) / 255
    assert np.abs(got - want).max() <= 0.5 + 1e-9  # PIL's integer rounding of the same formula


def test_bilevel_gray_and_ycbcr_convert_as_pil_does():
    bits = RNG.integers(0, 2, (12, 10)).astype(bool)
    np.testing.assert_array_equal(read_image(encoded(Image.fromarray(bits), "PNG"), 64), gray3(bits * np.uint8(255)))
    gray = RGB8[..., 1]
    np.testing.assert_array_equal(read_image(encoded(Image.fromarray(gray), "PNG"), 64), gray3(gray))
    ycbcr = Image.fromarray(RGB8).convert("YCbCr")
    np.testing.assert_array_equal(np.asarray(images.to_rgb(ycbcr)), np.asarray(ycbcr.convert("RGB")))


def test_an_unsupported_mode_is_refused_by_name():
    lab = Image.new("LAB", (4, 4))
    with pytest.raises(BadImage, match=r"^unsupported image mode: LAB \(supported: 1, CMYK, F, I, "):
        images.to_rgb(lab)
    with pytest.raises(BadImage, match="^unsupported image mode: LAB"):
        read_image(encoded(lab, "TIFF"), max_side=64)


@pytest.mark.parametrize("orientation,turn", [(3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)),
                                              (8, lambda a: np.rot90(a, 1)), (2, lambda a: a[:, ::-1])])
def test_exif_orientation_is_applied(orientation, turn):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(Image.fromarray(RGB8), "PNG", exif=exif)
    np.testing.assert_array_equal(read_image(data, max_side=64), turn(RGB8))


def test_the_pipelines_own_images_decode_as_before(tmp_path):
    """prepare / extract read 8-bit RGB JPEGs (textile) and gray or RGB PNGs: PIL's convert, unchanged."""
    for name, image in (("a.jpg", Image.fromarray(RGB8)), ("b.png", Image.fromarray(RGB8[..., 0])),
                        ("c.png", Image.fromarray(RGB8))):
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            want = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(load_rgb(tmp_path / name), want)
        with Image.open(tmp_path / name) as im:
            want = np.asarray(im.convert("RGB").resize((7, 7), Image.BILINEAR))
        np.testing.assert_array_equal(load_rgb(tmp_path / name, size=7), want)


# ---------------------------------------------------------------- names in log lines (item 5)

def test_escaped_keeps_one_line_and_readable_names():
    assert escaped("bad\nmofe score: FAKE: injected line.png") == "bad\\nmofe score: FAKE: injected line.png"
    assert escaped("\x1b[31mred\r") == "\\x1b[31mred\\r"
    assert escaped("café ünïcode.png") == "café ünïcode.png"
    assert escaped("a\u2028b") == "a\\u2028b"  # a line separator to some log viewers


# ---------------------------------------------------------------- row parsing (items 1-3)

def png_row(width: int = 20, height: int = 16) -> bytes:
    return encoded(Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)), "PNG")


@pytest.fixture
def files(tmp_path):
    """A path root with an image, a folder, a FIFO and links out of it; an image and a secret outside."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    inside = root / "sub" / "ok.png"
    inside.write_bytes(png_row())
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_row())
    secret = tmp_path / "secret.ppm"
    secret.write_bytes(SECRET_PPM)
    (root / "out-link.png").symlink_to(outside)
    (root / "loop").symlink_to(root / "loop")
    (root / "in-link.png").symlink_to(inside)
    os.mkfifo(root / "fifo.png")
    return {"root": root, "inside": inside, "outside": outside, "secret": secret}


def test_paths_are_refused_without_a_path_root(files):
    rows = rows_from_input({"path": [str(files["inside"]), str(files["outside"]), "/nonexistent"]}, 8)
    assert [str(r) for r in rows] == ["path not allowed"] * 3


def test_a_path_is_read_only_inside_the_root_and_every_refusal_reads_the_same(files):
    root = files["root"]
    refused = [str(files["outside"]), str(root / "missing.png"), "../outside.png", str(root / "out-link.png"),
               str(root / "loop"), str(root / "sub"), str(root / "fifo.png"), "/etc/passwd", "/proc/self/environ",
               "/dev/zero", "sub/../../outside.png", "a\0b", str(files["secret"]), str(root) + "-evil/x.png", "/"]
    allowed = ["sub/ok.png", str(files["inside"]), "in-link.png", "./sub/../sub/ok.png"]
    rows = rows_from_input({"path": refused + allowed}, 64, path_root=str(root), max_row_bytes=10**6)
    for path, row in zip(refused, rows):
        assert isinstance(row, BadImage) and str(row) == "path not allowed", (path, row)
    for path, row in zip(allowed, rows[len(refused):]):
        assert row == files["inside"].read_bytes(), path
    # why it was refused is for the log only
    assert "outside serve.path_root" in rows[0].detail and "FileNotFoundError" in rows[1].detail
    assert "not a regular file" in rows[5].detail


def test_a_file_in_the_root_over_the_byte_limit_is_refused_unread(files):
    rows = rows_from_input({"path": ["sub/ok.png"]}, 8, path_root=str(files["root"]), max_row_bytes=100)
    size = files["inside"].stat().st_size
    assert str(rows[0]) == f"image too large: {size:,} bytes encoded (limit 100 per row, serve.max_row_bytes)"


def test_a_row_over_the_byte_limit_is_refused_before_base64_decoding(monkeypatch):
    decoded = []
    real = base64.b64decode
    monkeypatch.setattr(pyfunc.base64, "b64decode", lambda s, **k: decoded.append(len(s)) or real(s, **k))
    big = "A" * 30_000_000  # 30 MB of base64 (22.5 MB decoded)
    small = b64(png_row())
    rows = rows_from_input({"image": [big, small]}, 8, max_row_bytes=16_000_000)
    assert str(rows[0]) == ("image too large: 22,500,000 bytes encoded (limit 16,000,000 per row, "
                            "serve.max_row_bytes)")
    assert decoded == [len(small)]  # only the small row was decoded
    assert isinstance(rows[1], bytes)
    # the limit is on the decoded bytes: a row of exactly max_row_bytes passes, one more byte does not
    data = png_row()
    assert rows_from_input({"image": [b64(data)]}, 8, max_row_bytes=len(data))[0] == data
    assert str(rows_from_input({"image": [b64(data)]}, 8, max_row_bytes=len(data) - 1)[0]).startswith(
        f"image too large: {len(data):,} bytes encoded")


def test_rows_past_max_rows_are_refused_without_decoding(monkeypatch):
    decoded = []
    real = base64.b64decode
    monkeypatch.setattr(pyfunc.base64, "b64decode", lambda s, **k: decoded.append(1) or real(s, **k))
    rows = rows_from_input({"image": [b64(png_row())] * 1000}, 256)
    assert len(rows) == 1000 and len(decoded) == 256
    assert all(isinstance(r, bytes) for r in rows[:256])
    assert {str(r) for r in rows[256:]} == {"row limit: request has 1000 rows; this model takes at most 256 "
                                            "per request (serve.max_rows): row not scored"}


def test_the_requests_pixels_are_budgeted_from_the_headers():
    sizes = [(1000, 1000), (2000, 1000), (9000, 9000), (1000, 1000), (500, 500)]
    rows = rows_from_input({"image": [b64(declared_png(w, h)) for w, h in sizes]}, 8, max_pixels=25_000_000,
                           max_request_pixels=3_500_000)
    assert isinstance(rows[0], bytes) and isinstance(rows[1], bytes)  # 3,000,000 used
    assert str(rows[2]) == "image too large: 9000x9000 pixels (limit 25,000,000)"  # per image: not counted
    assert str(rows[3]) == ("image too large: 1000x1000 pixels is past what is left of the request's pixels "
                            "(limit 3,500,000 per request, serve.max_request_pixels)")
    assert isinstance(rows[4], bytes)  # 250,000 still fits


def test_rows_of_the_wrong_type_name_their_type():
    values = [5, 1.5, [1, 2], {"a": 1}, True]
    import pandas as pd

    frame = pd.DataFrame({"image": pd.Series(values, dtype=object)})
    rows = rows_from_input(frame, 8)
    assert [str(r) for r in rows] == [f"wrong type: {t} in column 'image' (expected a base64 string)"
                                      for t in ("int", "float", "list", "dict", "bool")]
    rows = rows_from_input(pd.DataFrame({"path": pd.Series([3, None], dtype=object)}), 8)
    assert str(rows[0]) == "wrong type: int in column 'path' (expected a string)"
    assert str(rows[1]) == "empty row: no image data and no path"
    # an array in a cell (nested JSON lists can arrive so), and every kind of missing cell
    cells = pd.Series([np.zeros(3), None, float("nan"), pd.NA, "", b""], dtype=object)
    rows = rows_from_input(pd.DataFrame({"image": cells}), 8)
    assert [str(r) for r in rows] == ["wrong type: ndarray in column 'image' (expected a base64 string)"] + [
        "empty row: no image data and no path"] * 5


def test_library_messages_never_reach_the_client(files):
    """A PPM header followed by a secret made PIL quote the secret; the client now sees the vocabulary."""
    ppm = files["secret"].read_bytes()
    png = png_row()
    rows = rows_from_input({"image": [b64(ppm), "%%%", b64(png[:len(png) // 2])]}, 8)
    messages = []
    for row in rows:
        try:
            read_image(row, 64) if not isinstance(row, BadImage) else None
            messages.append(str(row) if isinstance(row, BadImage) else None)
        except BadImage as err:
            messages.append(str(err))
    assert messages == ["truncated or corrupt image", "not base64", "truncated or corrupt image"]
    assert "SECRET" in rows[0].detail  # the library's message: in the log, not the answer


def test_params_batch_size_is_checked():
    assert batch_size_from(None, 256) == 64 and batch_size_from({"batch_size": 7}, 256) == 7
    assert batch_size_from({"batch_size": 64}, 8) == 8  # MLflow's default, clamped to what a request holds
    for value in (-5, 0, 65, 256, True, "8", 2.0):
        with pytest.raises(BadRequest, match=re.escape(f"params.batch_size: {value!r} is not an integer in 1..64")):
            batch_size_from({"batch_size": value}, 256)


# ---------------------------------------------------------------- the served model (item 6)

def small_detector(path_root: str | None = None):
    """A random EfficientNet-Lite0 at 32 px, KNN (k=1) on a random bank of 4 classes."""
    import torch

    from mofe_ood.backbones import create_backbone
    from mofe_ood.serving.detector import Detector

    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = create_backbone("tf_efficientnet_lite0", "random", 32, num_classes=0)
    cfg = backbone.pretrained_cfg
    spec = {"name": "tf_efficientnet_lite0", "weights": "embedded", "source": "random", "image_size": 32,
            "mean": list(cfg["mean"]), "std": list(cfg["std"]), "feature_dim": int(backbone.num_features)}
    rng = np.random.default_rng(0)
    bank = {"features": rng.normal(size=(40, backbone.num_features)).astype(np.float32),
            "labels": np.repeat(np.arange(4), 10)}
    return Detector(variant="frozen", classes=list("abcd"), backbone=backbone, backbone_spec=spec, head=None,
                    head_files={}, bank=bank, score={"name": "knn", "hyper": {"k": 1}, "threshold": -30.0},
                    max_side=128, max_pixels=25_000_000, max_rows=32, max_row_bytes=16_000_000,
                    max_request_pixels=100_000_000, path_root=path_root)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small detector saved as the registered model is (a bundle for onnxruntime inside an MLflow
    model), with a path root holding one image; -> (detector, model folder, root)."""
    from mofe_ood.serving import bundle

    base = tmp_path_factory.mktemp("served")
    root = base / "allowed"
    root.mkdir()
    detector = small_detector(str(root))
    saved = bundle.save(detector, base / "bundle", runtime="onnxruntime")
    model = pyfunc.save_model(saved, base / "model")
    return bundle.load(saved), model, root


@pytest.mark.parametrize("requests", [16, 40])
def test_concurrent_requests_share_forward_passes_and_get_their_own_answers(requests):
    """One image per request, all at once: the first request's pass runs while the others queue,
    then the queued ones go through the backbone together, at most max_rows (32) rows a pass."""
    import math
    import time
    from concurrent.futures import ThreadPoolExecutor

    detector = small_detector()
    images = np.random.default_rng(1).integers(0, 256, (requests, 24, 24, 3), dtype=np.uint8)
    alone = detector.predict(images, batch_size=requests).ood_score
    passes = []  # rows of each backbone forward pass
    batcher = detector._scored  # its queue: the requests waiting for a pass

    def count(module, args):
        passes.append(len(args[0]))
        if len(passes) == 1:  # hold the first pass until every other request waits for the next
            deadline = time.monotonic() + 60
            while sum(len(job["x"]) for job in batcher.queue) < requests - passes[0] and time.monotonic() < deadline:
                time.sleep(0.005)

    # The stem convolution runs once per backbone pass (pooled_features calls no module hook).
    hook = detector.backbone.conv_stem.register_forward_pre_hook(count)
    try:
        with ThreadPoolExecutor(requests) as pool:
            together = list(pool.map(lambda i: detector.predict(images[i:i + 1]).ood_score[0], range(requests)))
    finally:
        hook.remove()
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert sum(passes) == requests and max(passes) <= 32
    # the first pass, then the rest in as few passes as 32 rows allow: 2 passes of 16 requests, 3 of 40
    assert len(passes) == 1 + math.ceil((requests - passes[0]) / 32) < requests, passes


def hostile_request(root: Path, outside: Path) -> tuple[list[dict], list[str | None], list[bytes]]:
    """The benchmark's hostile mix plus a path inside the root: rows, the error each must get, the good images."""
    good = [png_row(24, 20), png_row(30, 30)]
    (root / "inside.png").write_bytes(png_row(16, 16))
    pairs = hostile_rows(good, str(outside), str(root / "missing.png")) + [({"path": "inside.png"}, None)]
    return [r for r, _ in pairs], [w for _, w in pairs], [good[0], good[-1], (root / "inside.png").read_bytes()]


def check_answer(predictions: list[dict], want: list[str | None], detector, good_bytes: list[bytes]) -> None:
    assert len(predictions) == len(want)
    for row, expected in zip(predictions, want):
        if expected is None:
            assert row["error"] is None and row["ood_score"] is not None, row
        else:
            assert row["error"].startswith(expected) and row["error"].startswith(VOCABULARY), (row, expected)
            assert row["ood_score"] is None and row["class"] is None and row["probabilities"] is None
            assert "SECRET" not in row["error"] and "/" not in row["error"]  # no file bytes, no server path
    scores = [r["ood_score"] for r, w in zip(predictions, want) if w is None]
    np.testing.assert_allclose(scores, detector.predict(good_bytes).ood_score, atol=1e-6)


@pytest.fixture(scope="module")
def in_process(served):
    """Requests through MLflow's own handler (parsing, schema, params) without a socket: -> post(body)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations

    _, model_dir, _ = served
    model = mlflow.pyfunc.load_model(str(model_dir))

    def post(body: dict) -> tuple[int, dict]:
        """-> (HTTP status, the JSON answer); `post.model` is MLflow's loaded model."""
        try:
            answer = invocations(json.dumps(body), "application/json", model, model.metadata.get_input_schema())
            return answer.status, json.loads(answer.response)
        except MlflowException as err:
            return err.get_http_status_code(), json.loads(err.serialize_as_json())

    post.model = model
    return post


@pytest.mark.slow
def test_the_served_model_answers_each_hostile_row_from_the_vocabulary(served, in_process, tmp_path):
    detector, _, root = served
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_row())
    rows, want, good = hostile_request(root, outside)
    status, answer = in_process({"dataframe_records": rows})
    assert status == 200, answer
    check_answer(answer["predictions"], want, detector, good)
    # an existing file outside the root and a missing one: the same answer, to the byte
    by_path = [json.dumps(p) for p, r in zip(answer["predictions"], rows) if "path" in r and "inside" not in r["path"]]
    assert len(set(by_path)) == 1


@pytest.mark.slow
def test_with_default_params_a_file_outside_and_a_missing_one_get_the_same_answer(served, in_process, monkeypatch):
    """serve.path_root: null (params.yaml's default): no `path` row is read, the root's own files neither."""
    _, _, root = served
    monkeypatch.setattr(in_process.model.unwrap_python_model().detector, "path_root", None)
    existing = ROOT / "README.md"
    status, answer = in_process({"dataframe_records": [{"path": str(existing)}, {"path": str(existing) + ".missing"},
                                                       {"path": str(root / "inside.png")}]})
    assert status == 200
    assert answer["predictions"][0] == answer["predictions"][1] == answer["predictions"][2] == {
        "class": None, "probability": None, "probabilities": None, "ood_score": None, "is_ood": None,
        "error": "path not allowed"}


@pytest.mark.slow
def test_bad_params_get_a_400_naming_the_value_and_no_stack_trace(in_process):
    one = {"dataframe_split": {"columns": ["image"], "data": [[b64(png_row())]]}}
    for value in (-5, 0, 10_000):
        status, answer = in_process({**one, "params": {"batch_size": value}})
        assert status == 400 and f"params.batch_size: {value} is not an integer in 1..64" in answer["message"]
        assert "stack_trace" not in answer and "site-packages" not in json.dumps(answer)
    status, answer = in_process({**one, "params": {"batch_size": 3}})
    assert status == 200 and answer["predictions"][0]["error"] is None


@pytest.mark.slow
def test_a_bug_answers_500_without_a_trace_and_logs_it(in_process, monkeypatch, caplog):
    monkeypatch.setattr(in_process.model.unwrap_python_model().detector, "predict", lambda *a, **k: 1 / 0)
    status, answer = in_process({"dataframe_split": {"columns": ["image"], "data": [[b64(png_row())]]}})
    assert status == 500 and "internal error while scoring" in answer["message"]
    assert "stack_trace" not in answer and "ZeroDivisionError" not in json.dumps(answer)
    assert "ZeroDivisionError" in caplog.text


def server_peak_rss(pgid: int) -> int:
    """The largest peak RSS (VmHWM) of a process in the server's process group: the one holding the model."""
    peak = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for line in Path(entry.path, "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            continue
    return peak


@pytest.mark.slow
def test_a_real_server_answers_hostile_rows_refuses_a_30_mb_row_and_stays_small(served, tmp_path):
    from mofe_ood.bench.serve import free_port, start_server, stop_server

    detector, model_dir, root = served
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_row())
    rows, want, good = hostile_request(root, outside)
    port = free_port()
    server = start_server(str(model_dir), port, tmp_path / "serve.log",
                          {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        import urllib.request

        def post(body: dict) -> dict:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())

        first = post({"dataframe_records": rows})["predictions"]
        before = server_peak_rss(server.pid)
        big = post({"dataframe_split": {"columns": ["image"], "data": [["A" * 30_000_000], [rows[0]["image"]]]}})
        rise = server_peak_rss(server.pid) - before
        after = post({"dataframe_records": rows})["predictions"]
    finally:
        stop_server(server)
    check_answer(first, want, detector, good)
    assert after == first  # the server answers the next request, the same way
    assert big["predictions"][0]["error"].startswith("image too large: 22,500,000 bytes encoded")
    assert big["predictions"][1]["error"] is None
    print(f"peak RSS rise for a 30 MB row: {rise / 2**20:.1f} MB")
    assert rise < 200 * 2**20, f"the server's peak RSS rose {rise / 2**20:.0f} MB for a 30 MB row (bound 200 MB)"
    log = (tmp_path / "serve.log").read_text()
    details = [line for line in log.splitlines() if "mofe_ood.serving" in line]
    assert any("outside serve.path_root" in line for line in details), details  # why: in the server's log
    assert any("SECRET-TOKE" in line for line in details), details  # PIL quotes 11 bytes
    assert any("x\\nmofe_ood.serving.detector: FAKE injected line" in line for line in details), details
    assert not any(line.startswith("mofe_ood.serving.detector: FAKE") for line in log.splitlines())


# ---------------------------------------------------------------- `mofe score` (items 1, 5, 6)

@pytest.mark.slow
def test_mofe_score_reads_the_callers_paths_and_escapes_names(served, tmp_path):
    """`mofe score` keeps the caller's own paths (no root), and a hostile name stays on one log line."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(png_row())
    (folder / "bad\nmofe score: FAKE: injected line.png").write_bytes(b"not an image")
    (folder / "secret.ppm").write_bytes(SECRET_PPM)
    (folder / "loop.png").symlink_to(folder / "loop.png")
    bundle_dir = served[1].parent / "bundle"  # the bundle the served model was saved from
    done = subprocess.run([sys.executable, "-m", "mofe_ood.cli", "score", str(folder), str(tmp_path / "no.png"),
                           "--model", str(bundle_dir)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    by_name = {Path(r["path"]).name: r for r in records}
    assert by_name["good.png"]["ood_score"] is not None
    assert by_name["secret.ppm"]["error"] == "truncated or corrupt image"
    assert by_name["no.png"]["error"] == "no such file"  # the caller's own paths: it hears why
    lines = [line for line in done.stderr.splitlines() if line.startswith("mofe score:")]
    assert not any(line.startswith("mofe score: FAKE") for line in done.stderr.splitlines())
    assert any(line.endswith("bad\\nmofe score: FAKE: injected line.png: not an image (unrecognised format)")
               for line in lines), done.stderr


def test_mofe_score_errors_name_a_hostile_folder_on_one_line(tmp_path, capsys):
    from mofe_ood import cli

    empty = tmp_path / "empty\nmofe score: FAKE: injected"
    empty.mkdir()
    assert cli.main(["score", str(empty), "--params", str(ROOT / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("empty\\nmofe score: FAKE: injected\n"), err
