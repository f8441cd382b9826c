"""Extraction on ONNX Runtime (extract.runtime): torch's features and trunk to 1e-4, shards, errors."""

import numpy as np
import pytest
import torch

from mofe_ood import extract, prepare
from mofe_ood.params import ParamError, merged
from mofe_ood.splits import load_features, load_trunk

SPLITS = ("train", "val", "test", "mnist", "textures")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_run):
    """Real images (a few dozen), the packaged pretrained backbone at 128 px, extract's batches of 8."""
    root = tmp_path_factory.mktemp("extract_onnx")
    params = merged(small_run(), {"extract": {"image_size": 128, "batch_size": 8}})
    prepare.run(params, root / "prepared")
    return params, root


def runtime(params: dict, name: str) -> dict:
    return merged(params, {"extract": {"runtime": name}})


def run_with_threads(params: dict, threads: int, prepared_dir, out_dir) -> None:
    """extract.run with extract.num_threads, torch's count restored after (it sets it for the process)."""
    before = torch.get_num_threads()
    try:
        extract.run(merged(params, {"extract": {"num_threads": threads}}), prepared_dir, out_dir)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def extracted(prepared):
    """The prepared splits extracted on each runtime (onnxruntime with 1 thread: see the next tests)."""
    params, root = prepared
    run_with_threads(runtime(params, "onnxruntime"), 1, root / "prepared", root / "onnxruntime")
    extract.run(runtime(params, "torch"), root / "prepared", root / "torch")
    return params, root


def test_onnxruntime_features_and_trunk_equal_torchs_to_1e_4(extracted):
    params, root = extracted
    assert params["extract"]["weights"] == "package" and params["extract"]["top_blocks"] == 1
    for split in SPLITS:
        want, labels = load_features(root / "torch", split)
        got, got_labels = load_features(root / "onnxruntime", split)
        np.testing.assert_array_equal(got_labels, labels)
        assert got.shape == want.shape and want.shape[1] == 1280
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert not np.array_equal(got, want)  # two runtimes ran: equal to float rounding, not to the bit
        # the trunk (blocks[5]'s output, 192 x 4 x 4 at 128 px) as stored: float16 of each runtime's
        # float32, so within 1e-4 of its largest value plus the float16 rounding of each value
        want_trunk, got_trunk = (load_trunk(root / r, split).astype(np.float32) for r in ("torch", "onnxruntime"))
        assert got_trunk.shape == want_trunk.shape == (len(want), 192, 4, 4)
        np.testing.assert_allclose(got_trunk, want_trunk, rtol=2 ** -10, atol=1e-4 * np.abs(want_trunk).max())


def test_onnxruntime_gives_the_same_bytes_on_any_thread_count(extracted, tmp_path):
    """DVC tracks data/features: a host with more cores must not change them."""
    params, root = extracted
    run_with_threads(runtime(params, "onnxruntime"), 3, root / "prepared", tmp_path / "three")
    for split in SPLITS:
        a, b = np.load(root / "onnxruntime" / f"{split}.npz"), np.load(tmp_path / "three" / f"{split}.npz")
        for key in ("features", "labels", "trunk"):
            np.testing.assert_array_equal(a[key], b[key])


def test_sharded_extraction_on_onnxruntime_equals_unsharded(extracted, tmp_path):
    params, root = extracted
    params = merged(runtime(params, "onnxruntime"), {"extract": {"shards": 2}})
    extract.run(params, root / "prepared", tmp_path / "whole")
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, out in enumerate(shards):
        extract.run_shard(params, root / "prepared", out, i)
    # the 28 train images in 4 batches of 8 (the last of 4): shards of 2 batches each
    assert [len(extract.shard_rows(28, i, 2, 8)) for i in range(2)] == [16, 12]
    info = extract.merge_shards(shards, tmp_path / "merged")
    assert info == extract.json.loads((tmp_path / "whole" / "info.json").read_text())
    for split in info["splits"]:
        a, b = np.load(tmp_path / "whole" / f"{split}.npz"), np.load(tmp_path / "merged" / f"{split}.npz")
        assert sorted(a.files) == sorted(b.files) == ["features", "labels", "trunk"]
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_an_export_that_differs_from_torch_fails_the_stage_and_says_what_to_set(prepared, tmp_path, monkeypatch):
    """Unit check of the export's check: the session's trunk moved by 1e-3 of its largest value."""
    params, root = prepared
    real = extract.onnx_runtime.Session.outputs

    def moved(self, x):
        features, trunk = real(self, x)
        return features, trunk + 1e-3 * trunk.abs().max()

    monkeypatch.setattr(extract.onnx_runtime.Session, "outputs", moved)
    with pytest.raises(RuntimeError, match=r"the ONNX export of the backbone's trunk differs from torch by "
                                           r"[0-9.e-]+ \(allowed [0-9.e-]+\); set extract.runtime: torch"):
        extract.run(runtime(params, "onnxruntime"), root / "prepared", tmp_path / "features")
    assert not (tmp_path / "features").exists()


def test_runtime_auto_is_onnxruntime_on_the_cpu_only_where_it_is_installed(small_run, monkeypatch):
    cfg = extract.config(small_run())
    assert cfg.runtime == "auto"
    assert extract.runtime_of(cfg, torch.device("cpu")) == "onnxruntime"
    assert extract.runtime_of(cfg, torch.device("cuda")) == "torch"
    with pytest.raises(ParamError, match="extract.runtime: onnxruntime runs on the CPU, but extract.device 'auto' "
                                         "gives cuda; set extract.device: cpu, or extract.runtime: auto or torch"):
        extract.runtime_of(extract.config(runtime(small_run(), "onnxruntime")), torch.device("cuda"))
    # Unit check without the package: auto falls back to torch; asked for by name, a clear error.
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    monkeypatch.setattr(extract.onnx_runtime.importlib.util, "find_spec",
                        lambda name: None if name == "onnxruntime" else object())
    assert extract.runtime_of(cfg, torch.device("cpu")) == "torch"
    with pytest.raises(ParamError, match=r"extract.runtime: onnxruntime needs the onnxruntime package "
                                         r"\(pip install 'mofe-ood\[pipeline\]'\), or set extract.runtime: torch"):
        extract.runtime_of(extract.config(runtime(small_run(), "onnxruntime")), torch.device("cpu"))
