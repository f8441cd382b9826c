import json

import numpy as np
import pytest
import torch
from PIL import Image

from mofe_ood import extract, prepare
from mofe_ood.backbones import Preprocess, features_of, preprocess
from mofe_ood.params import ParamError, merged
from mofe_ood.splits import Images, load_features, load_split, load_trunk

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_run):
    root = tmp_path_factory.mktemp("extract")
    params = small_run()
    prepare.run(params, root / "prepared")
    info = extract.run(params, root / "prepared", root / "features")
    return params, root, info


def test_preprocess_replicates_gray_and_normalises():
    prep = Preprocess(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    gray = np.full((2, 4, 4), 255, np.uint8)
    x = preprocess(gray, prep)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    rgb = np.zeros((1, 8, 8, 3), np.uint8)
    rgb[..., 1] = 255
    y = preprocess(rgb, prep)
    assert torch.allclose(y[0, 1], torch.ones(8, 8)) and torch.allclose(y[0, 0], -torch.ones(8, 8))


def test_features_layout(tiny):
    params, root, info = tiny
    sets = ["fmnist_near", "mnist", "textile", "textures"]
    names = ["train", "val", "test", *sets, *(f"{s}_val" for s in sets)]
    assert sorted(p.stem for p in (root / "features").glob("*.npz")) == sorted(names)
    assert info["feature_dim"] == 1280 and info["image_size"] == 64
    assert info["splits"]["fmnist_near"] == {"kind": "ood", "group": "near", "count": 4}
    assert info["splits"]["fmnist_near_val"] == {"kind": "ood_val", "group": "near", "count": 1}
    # the activations entering the top (blocks[6] at 64 px: 192 x 2 x 2), float16, one per image
    assert info["trunk"] == {"top_blocks": 1, "shape": [192, 2, 2], "dtype": "float16"}
    trunk = load_trunk(root / "features", "train")
    assert trunk.dtype == np.float16 and trunk.shape == (28, 192, 2, 2)
    assert json.loads((root / "features" / "info.json").read_text()) == info
    for name in names:
        feats, labels = load_features(root / "features", name)
        assert feats.dtype == np.float32 and feats.shape == (info["splits"][name]["count"], 1280)
        assert labels.dtype == np.int64 and np.isfinite(feats).all()
        assert (labels >= 0).all() if info["splits"][name]["kind"] == "id" else (labels == -1).all()
    train, labels = load_features(root / "features", "train")
    assert sorted(np.bincount(labels)) == [4] * 7
    # Real pretrained features, not noise: same-class images are closer than other-class ones.
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    sim = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    other = labels[:, None] != labels[None, :]
    assert sim[same].mean() > sim[other].mean() + 0.05


def test_extraction_is_deterministic(tiny, tmp_path):
    params, root, _ = tiny
    # the default runtime (auto) is ONNX Runtime on this CPU: a new export and session, the same arrays
    assert extract.runtime_of(extract.config(params), torch.device("cpu")) == "onnxruntime"
    extract.run(params, root / "prepared", tmp_path / "again")
    for name in ("train", "textile"):
        a = np.load(root / "features" / f"{name}.npz")
        b = np.load(tmp_path / "again" / f"{name}.npz")
        assert sorted(a.files) == sorted(b.files) == ["features", "labels", "trunk"]
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_image_files_give_the_same_features_as_arrays(tiny, tmp_path):
    params, root, _ = tiny
    model, prep = extract.load_model(params)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # folded for speed
    images = load_split(root / "prepared", "textile")
    paths = []
    for i, im in enumerate(images.images):
        Image.fromarray(im).resize((prep.image_size, prep.image_size), Image.BILINEAR).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    from_files = features_of(model, Images(images.labels, paths=np.array(paths)), prep, 8)
    resized = np.stack([np.asarray(Image.open(p)) for p in paths])
    from_arrays = features_of(model, Images(images.labels, images=resized), prep, 8)
    np.testing.assert_allclose(from_files, from_arrays, atol=1e-5)


def test_bad_extract_params_keep_earlier_features(tiny):
    params, root, _ = tiny
    before = (root / "features" / "train.npz").read_bytes()
    cases = [({"backbone": "vit_huge_dinov3"}, "extract.backbone: 'vit_huge_dinov3'"),
             ({"batch_size": 0}, "extract.batch_size: 0"),
             ({"device": "gpu"}, "extract.device: 'gpu' is not one of 'auto', 'cpu', 'cuda'"),
             ({"num_threads": 0}, "extract.num_threads: 0 is below the minimum 1"),
             ({"runtime": "tensorrt"}, "extract.runtime: 'tensorrt' is not one of 'auto', 'onnxruntime', 'torch'"),
             ({"top_blocks": 7}, r"extract.top_blocks: 7 must be an integer between 1 and 6 \(the backbone has 7"),
             ({"image_sise": 64}, r"extract.image_sise: not a known key \(did you mean extract.image_size\?\)")]
    if not torch.cuda.is_available():
        cases.append(({"device": "cuda"}, "extract.device: 'cuda' but no CUDA device"))
    for override, match in cases:
        with pytest.raises(ParamError, match=match):
            extract.run(merged(params, {"extract": override}), root / "prepared", root / "features")
    assert (root / "features" / "train.npz").read_bytes() == before
