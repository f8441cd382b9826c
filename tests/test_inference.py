"""Detector (mofe_ood.inference) and `mofe score`: the numbers evaluate reports, from image files."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mofe_ood import cli, metrics
from mofe_ood.images import encode_png
from mofe_ood.splits import load_split
from mofe_ood.serving import bundle
from mofe_ood.serving.detector import Detector
from mofe_ood.serving.pyfunc import rows_from_input


# Every test here builds or reads the tiny pipeline (or fine-tunes a tiny ViT).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tiny_project):
    return tiny_project


@pytest.fixture(scope="module")
def detector(project, tiny_variant, tiny_run):
    return bundle.from_pipeline(tiny_variant, project / "models", project / "data" / "features",
                                project / "reports", tiny_run())


def reports(project, name):
    return json.loads((project / "reports" / name).read_text())


def bad_files(folder):
    """One file per way an input can be unusable."""
    folder.mkdir()
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    good = encode_png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])  # header intact, pixels cut
    Image.new("1", (9000, 9000)).save(folder / "huge.png")  # 81 MP header, tiny file
    return {"zero.png": "empty file", "notes.png": "not an image", "truncated.png": "corrupt image",
            "huge.png": "image too large"}


def test_detector_computes_what_evaluate_computes(project, detector, tiny_variant, tiny_images):
    # The same folded backbone as extract (BatchNorm in the convolutions), the same numbers.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in detector.backbone.modules())
    ref = np.load(project / "reports" / "scores" / f"{tiny_variant}__knn.npz")
    test, near = (detector.predict(tiny_images(s)) for s in ("test", "fmnist_near"))
    np.testing.assert_allclose(test.ood_score, ref["test"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(near.ood_score, ref["fmnist_near"], rtol=0, atol=1e-5)
    auroc = metrics.ood_metrics(test.ood_score, near.ood_score)["auroc"]
    assert abs(auroc - reports(project, "metrics.json")[tiny_variant]["knn"]["fmnist_near"]["auroc"]) <= 1e-6
    # The decision is evaluate's calibrated threshold; the class is the head's argmax.
    assert detector.threshold == reports(project, "thresholds.json")[tiny_variant]["threshold"]
    assert (test.is_ood == (test.ood_score < detector.threshold)).all()
    labels = load_split(project / "data" / "prepared", "test").labels
    assert np.mean(test.class_index == labels) == pytest.approx(
        reports(project, "metrics.json")[tiny_variant]["id_accuracy"], abs=1e-9)
    np.testing.assert_allclose(test.probabilities.sum(1), 1, atol=1e-5)


def test_bundle_is_safetensors_and_json_and_loads_back_identical(detector, tmp_path):
    saved = bundle.save(detector, tmp_path / "bundle")
    suffixes = {f.suffix for f in saved.rglob("*") if f.is_file()}
    assert suffixes <= {".json", ".safetensors"}
    loaded = bundle.load(saved)
    batch = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    a, b = detector.predict(batch), loaded.predict(batch)
    np.testing.assert_array_equal(a.ood_score, b.ood_score)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    # A backbone without a weights package (a local file, a fine-tuned one) travels in the bundle.
    embedded = Detector(variant=detector.variant, classes=detector.classes, backbone=detector.saved_backbone,
                        backbone_spec={**detector.backbone_spec, "weights": "embedded"}, head=detector.head,
                        head_files=detector.head_files, bank=detector.bank, score=detector.score_spec,
                        max_side=detector.max_side)
    again = bundle.load(bundle.save(embedded, tmp_path / "embedded"))
    assert (tmp_path / "embedded" / "backbone.safetensors").is_file()
    np.testing.assert_array_equal(again.predict(batch).ood_score, a.ood_score)


def test_a_bundle_for_onnxruntime_runs_the_exported_backbone_to_torch_precision(detector, tmp_path):
    saved = bundle.save(detector, tmp_path / "onnx", runtime="onnxruntime")
    spec = json.loads((saved / "detector.json").read_text())["backbone"]
    assert spec["onnx"] == "backbone.onnx" and (saved / "backbone.onnx").stat().st_size > 100_000
    # No source paths in the graph (the exporter's debug notes): the same bytes in any checkout or image.
    assert str(Path(__file__).resolve().parents[1]).encode() not in (saved / "backbone.onnx").read_bytes()
    loaded = bundle.load(saved)
    assert loaded.session is not None and detector.session is None
    # Any batch size (the export's batch axis is dynamic); features as torch computes them.
    for n in (1, 7):
        x = torch.randn(n, 3, detector.prep.image_size, detector.prep.image_size)
        want, got = detector.outputs(x)[0], loaded.outputs(x)[0]
        assert want.shape == got.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    batch = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    a, b = detector.predict(batch), loaded.predict(batch)
    np.testing.assert_allclose(b.ood_score, a.ood_score, atol=1e-4)
    assert (a.class_index == b.class_index).all()
    # Saving the loaded bundle for torch drops the ONNX graph; the served model's requirements follow.
    plain = bundle.save(loaded, tmp_path / "plain")
    assert not (plain / "backbone.onnx").exists() and bundle.load(plain).session is None
    from mofe_ood.serving.pyfunc import requirements

    assert any(r.startswith("onnxruntime") for r in requirements(saved))
    assert not any(r.startswith("onnxruntime") for r in requirements(plain))


def test_serve_runtime_must_be_a_known_one(tiny_run):
    params = tiny_run()
    with pytest.raises(ValueError, match=r"serve.runtime: 'tensorrt' is not one of onnxruntime, torch"):
        bundle.serve({**params, "serve": {**params["serve"], "runtime": "tensorrt"}})


@pytest.mark.parametrize("key,value,message", [
    ("path_root", "data/images", r"serve.path_root: 'data/images' is not an absolute folder path"),
    ("path_root", 5, r"serve.path_root: 5 is not an absolute folder path"),
    ("max_row_bytes", 0, r"serve.max_row_bytes: 0 is below the minimum 1"),
    ("max_request_pixels", 1.5, r"serve.max_request_pixels: 1.5 is not an integer"),
])
def test_serve_limits_are_checked(tiny_run, key, value, message):
    params = tiny_run()
    with pytest.raises(ValueError, match=message):
        bundle.serve({**params, "serve": {**params["serve"], key: value}})


def test_the_bundle_carries_the_serve_limits(project, tiny_variant, tiny_run, tmp_path):
    params = tiny_run()
    params["serve"].update(path_root=str(tmp_path), max_row_bytes=1234, max_request_pixels=5678, max_rows=9)
    built = bundle.from_pipeline(tiny_variant, project / "models", project / "data" / "features",
                                 project / "reports", params)
    loaded = bundle.load(bundle.save(built, tmp_path / "bundle"))
    assert (loaded.path_root, loaded.max_row_bytes, loaded.max_request_pixels, loaded.max_rows, loaded.max_pixels) \
        == (str(tmp_path), 1234, 5678, 9, 25_000_000)


def test_paths_bytes_and_arrays_give_the_same_predictions(project, detector, tmp_path, tiny_images):
    gray = tiny_images("test")[:5]
    paths = sorted((project / "images" / "test").glob("*.png"))[:5]
    from_array = detector.predict(gray)
    for images in (paths, [str(p) for p in paths], [p.read_bytes() for p in paths], list(gray),
                   rows_from_input({"image": [p.read_bytes() for p in paths]}, 64),
                   rows_from_input({"path": [str(p) for p in paths]}, 64, path_root=str(project / "images")),
                   rows_from_input({"path": [f"test/{p.name}" for p in paths]}, 64, path_root=str(project / "images"))):
        np.testing.assert_allclose(detector.predict(images).ood_score, from_array.ood_score, atol=1e-6)
    # Mixed sizes and colour in one batch: each image as if it came alone.
    rgb = np.random.default_rng(1).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    mixed = detector.predict([gray[0], rgb, gray[1]])
    alone = detector.predict([rgb])
    assert mixed.ood_score[1] == pytest.approx(alone.ood_score[0], abs=1e-5)
    assert mixed.ood_score[0] == pytest.approx(from_array.ood_score[0], abs=1e-5)


def test_unusable_inputs_are_reported_and_the_rest_predicted(project, detector, tmp_path):
    expected = bad_files(tmp_path / "bad")
    good = sorted((project / "images" / "test").glob("*.png"))[:3]
    inputs = [good[0], *(tmp_path / "bad" / n for n in expected), tmp_path / "missing.png", good[1],
              np.zeros((4, 4), np.float32), b"", good[2]]
    result = detector.predict(inputs, batch_size=4)
    messages = [*expected.values(), "no such file", None, "must be uint8", "empty image data", None]
    for error, want in zip(result.errors, [None, *messages]):
        assert (error is None) if want is None else (want in error), (error, want)
    ok = [i for i, e in enumerate(result.errors) if e is None]
    np.testing.assert_allclose(result.ood_score[ok], detector.predict(good).ood_score, atol=1e-6)
    assert np.isnan(result.ood_score[1])
    frame = result.to_frame()
    assert list(frame.columns) == ["class", "probability", "probabilities", "ood_score", "is_ood", "error"]
    assert frame["error"].notna().sum() == len(inputs) - 3


def test_model_input_rows_fail_one_by_one_and_past_the_row_limit(project, detector):
    """The served model's parsing: per-row errors; only a request without image/path columns fails whole."""
    import base64

    png = sorted((project / "images" / "test").glob("*.png"))[0].read_bytes()
    good = base64.b64encode(png).decode()
    rows = rows_from_input({"image": [good, "%%%", "", None, base64.b64encode(png[: len(png) // 2]).decode(), good],
                            "path": [None, None, None, None, None, None]}, max_rows=5)
    result = detector.predict(rows)
    assert result.errors[0] is None and result.errors[1].startswith("not base64")
    assert result.errors[2] == result.errors[3] == "empty row: no image data and no path"
    assert result.errors[4] == "truncated or corrupt image"
    assert result.errors[5].startswith("row limit:") and "at most 5 per request (serve.max_rows)" in result.errors[5]
    assert result.ood_score[0] == pytest.approx(detector.predict([png]).ood_score[0], abs=1e-9)
    with pytest.raises(ValueError, match="expected a column 'image'.*got columns \\['img'\\]"):
        rows_from_input({"img": [good]}, max_rows=5)


def test_score_cli_json_lines_give_evaluate_auroc(project, monkeypatch, capsys, tiny_variant):
    monkeypatch.chdir(project)
    assert cli.main(["score", "images/test", "images/fmnist_near", "--model", f"models/{tiny_variant}"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 70 + 48  # the near set's test part (its other 12 images are its validation part)
    assert set(rows[0]) == {"path", "class", "probability", "ood_score", "is_ood"}
    scores = {s: np.array([r["ood_score"] for r in rows if f"/{s}/" in r["path"]]) for s in ("test", "fmnist_near")}
    auroc = metrics.ood_metrics(scores["test"], scores["fmnist_near"])["auroc"]
    assert abs(auroc - reports(project, "metrics.json")[tiny_variant]["knn"]["near"]["auroc"]) <= 1e-6
    assert {r["class"] for r in rows} <= set(json.loads((project / "data/features/info.json").read_text())["classes"])


def test_score_cli_csv_reports_bad_files_and_goes_on(project, tmp_path, monkeypatch, capsys, tiny_variant):
    monkeypatch.chdir(project)
    folder = tmp_path / "mixed"
    expected = bad_files(folder)
    for p in sorted((project / "images" / "fmnist_near").glob("*.png"))[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "scores.csv"
    code = cli.main(["score", str(folder), str(tmp_path / "missing.png"), "--model", f"models/{tiny_variant}",
                     "--out", str(out), "--stats", "--batch-size", "3"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 + len(expected) + 1
    by_name = {r["path"].rsplit("/", 1)[1]: r for r in rows}
    for name, message in {**expected, "missing.png": "no such file"}.items():
        assert message in by_name[name]["error"] and by_name[name]["ood_score"] == ""
    good = [r for r in rows if not r["error"]]
    assert len(good) == 4 and all(r["class"] and float(r["probability"]) > 0 for r in good)
    err = capsys.readouterr().err
    assert all(name in err for name in expected) and "images/s" in err and "4 images scored, 5 unreadable" in err


def test_score_cli_errors(project, tmp_path, monkeypatch, capsys, tiny_variant):
    monkeypatch.chdir(project)
    (tmp_path / "empty").mkdir()
    assert cli.main(["score", str(tmp_path / "empty"), "--model", f"models/{tiny_variant}"]) == 2
    assert "no image files" in capsys.readouterr().err
    assert cli.main(["score", "images/test", "--model", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    bad_files(tmp_path / "bad")
    assert cli.main(["score", str(tmp_path / "bad"), "--model", f"models/{tiny_variant}"]) == 1  # nothing scored


def test_a_finetuned_variant_predicts_through_its_own_image_model(tmp_path, finetune_params, prepared_images):
    """The fine-tuned variant: images -> its ViT + block-expert MoFE -> the routed feature -> head."""
    import torch

    from mofe_ood import scores
    from mofe_ood.splits import load_features
    from mofe_ood.training import finetuning
    from mofe_ood.variants import load_head

    data, params, variant = prepared_images(tmp_path / "prepared"), finetune_params(), "mofe_finetune"
    finetuning.run(params, data, tmp_path / "models")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "thresholds.json").write_text(json.dumps(
        {variant: {"score": "knn", "hyper": {"k": 3}, "tpr": 0.95, "threshold": -0.5}}))
    detector = bundle.from_pipeline(variant, tmp_path / "models", tmp_path / "no-features",
                                      tmp_path / "reports", params)
    images = load_split(data, "ood").images
    got = detector.predict(images)
    # What evaluate computes for it: the head on the variant's own features, KNN fitted on train.
    head, _ = load_head(tmp_path / "models" / variant)
    with torch.inference_mode():
        train, ood = (head(torch.from_numpy(load_features(tmp_path / "models" / variant / "features", s)[0]))
                      for s in ("train", "ood"))
    knn = scores.make_score("knn", k=3).fit(train["feature"].numpy(), None)
    np.testing.assert_allclose(got.ood_score, knn.score(ood["feature"].numpy()), atol=1e-5)
    np.testing.assert_array_equal(got.class_index, ood["logits"].argmax(1).numpy())
    loaded = bundle.load(bundle.save(detector, tmp_path / "bundle"))
    assert not (tmp_path / "bundle" / "backbone.safetensors").exists()  # it travels in head/
    np.testing.assert_array_equal(loaded.predict(images).ood_score, got.ood_score)
