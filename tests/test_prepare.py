import numpy as np
import pytest
from PIL import Image

from mofe_ood import prepare, sources
from mofe_ood.images import BadImage
from mofe_ood.params import ParamError, merged, load
from mofe_ood.splits import Images, load_split

SMALL = {
    "prepare": {
        "id": {"train_per_class": 20, "val_per_class": 5, "test_per_class": 10},
        "ood": {
            "fmnist_near": {"count": 30},
            "mnist": {"count": 40},
            "textile": {"count": 12},
            "textures": {"count": 9, "crop_size": 32},
        },
    },
}


@pytest.fixture(scope="module")
def small_params():
    return merged(load("params.yaml"), SMALL)


def _write_folder(root, classes=("a", "b"), per_class=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_default_benchmark_splits(tmp_path, small_params):
    manifest = prepare.run(small_params, tmp_path / "prepared")
    splits = manifest["splits"]
    assert list(splits) == ["train", "val", "test", "fmnist_near_val", "fmnist_near", "mnist_val", "mnist",
                            "textile_val", "textile", "textures_val", "textures"]
    assert manifest["ood_split"] == {"val_fraction": 0.2, "seed": 0}
    assert manifest["classes"] == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Sandal", "Sneaker", "Bag"]
    assert splits["train"]["counts_per_class"] == {c: 20 for c in manifest["classes"]}
    assert splits["val"]["counts_per_class"] == {c: 5 for c in manifest["classes"]}
    assert splits["test"]["count"] == 70
    assert {n: splits[n]["group"] for n in ("fmnist_near", "mnist", "textile", "textures")} == {
        "fmnist_near": "near", "mnist": "far", "textile": "far", "textures": "far"}
    assert {splits[n]["kind"] for n in splits if n.endswith("_val") and n != "val"} == {"ood_val"}
    train = load_split(tmp_path / "prepared", "train")
    assert train.images.shape == (140, 28, 28) and train.images.dtype == np.uint8
    assert set(train.labels) == set(range(7))
    # every OOD set: 20% to its validation part, the rest to its test part
    for name, val_shape, test_shape in (("mnist", (8, 28, 28), (32, 28, 28)), ("textures", (2, 32, 32), (7, 32, 32))):
        ood, val = (load_split(tmp_path / "prepared", n) for n in (name, name + "_val"))
        assert ood.images.shape == test_shape and val.images.shape == val_shape
        assert (ood.labels == -1).all() and (val.labels == -1).all()
    textile = load_split(tmp_path / "prepared", "textile").images
    # 250 px photos downscaled to max_side, gray like the ID images (params: gray: true)
    assert textile.shape == (10, 128, 128) and textile.dtype == np.uint8
    # Same seed, same bytes.
    again = prepare.run(small_params, tmp_path / "again")
    assert {n: s["sha256"] for n, s in again["splits"].items()} == {n: s["sha256"] for n, s in splits.items()}


def test_ood_val_and_test_parts_are_disjoint_deterministic_and_per_set():
    images = Images(np.full(50, -1), images=np.arange(50))  # the "image" is its own index
    val, test = prepare.ood_val_test(images, 0.2, 0, "mnist")
    assert len(val) == 10 and len(test) == 40
    assert not set(val.images) & set(test.images) and set(val.images) | set(test.images) == set(range(50))
    again, _ = prepare.ood_val_test(images, 0.2, 0, "mnist")
    assert np.array_equal(again.images, val.images)  # fixed seed: the same parts every run
    other, _ = prepare.ood_val_test(images, 0.2, 0, "textile")  # another set draws its own
    assert not np.array_equal(other.images, val.images)
    assert not np.array_equal(prepare.ood_val_test(images, 0.2, 1, "mnist")[0].images, val.images)


def test_gray_is_pil_luma():
    rgb = np.random.default_rng(0).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    want = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])
    assert np.abs(prepare.to_gray(rgb).astype(int) - want).max() <= 1


def test_train_and_val_are_disjoint_per_class():
    ids = np.arange(100)
    images = Images(ids % 4, images=ids)  # the "image" is its own index
    val, train = prepare._per_class(images, [0, 1, 2, 3], [5, 10], np.random.default_rng(0))
    assert len(val) == 20 and len(train) == 40
    assert not set(val.images) & set(train.images)
    assert (np.diff(train.images) > 0).all()  # source order kept


def test_per_class_asking_for_too_many_names_the_class():
    images = Images(np.zeros(10, np.int64), images=np.arange(10))
    with pytest.raises(ParamError, match="class 0 has 10 images"):
        prepare._per_class(images, [0], [5, 6], np.random.default_rng(0))


def test_image_folder_id_source(tmp_path, small_params):
    _write_folder(tmp_path / "ds" / "train", per_class=8)
    _write_folder(tmp_path / "ds" / "test", per_class=2)
    params = merged(small_params, {"prepare": {"id": {
        "source": "imagefolder", "root": str(tmp_path / "ds"), "classes": None,
        "train_per_class": None, "val_per_class": 3, "test_per_class": None}, "ood": {}}})
    manifest = prepare.run(params, tmp_path / "out")
    assert manifest["classes"] == ["a", "b"]
    assert manifest["splits"]["train"]["counts_per_class"] == {"a": 5, "b": 5}
    assert manifest["splits"]["train"]["storage"] == "paths"
    test = load_split(tmp_path / "out", "test")
    assert len(test.paths) == 4 and all(p.endswith(".png") for p in test.paths)


@pytest.mark.parametrize("mode", ["skip", "fail"])
def test_corrupt_images_are_skipped_and_counted_or_fail(tmp_path, small_params, mode):
    folder = tmp_path / "extra"
    _write_folder(folder, classes=("x",), per_class=3)
    (folder / "x" / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "x" / "empty.jpg").write_bytes(b"")
    params = merged(small_params, {"prepare": {"bad_images": mode, "ood": {}},
                                   "evaluate": {"extra_ood": {"mine": {"path": str(folder), "group": "far"}}}})
    if mode == "fail":
        with pytest.raises(BadImage, match="prepare.ood.mine: 2 unreadable .*broken.png"):
            prepare.run(params, tmp_path / "out")
        return
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        manifest = prepare.run(params, tmp_path / "out")
    assert manifest["splits"]["mine"]["count"] + manifest["splits"]["mine_val"]["count"] == 3
    assert manifest["splits"]["mine"]["bad_files_skipped"] == 2
    assert manifest["splits"]["mine"]["group"] == "far"


@pytest.mark.parametrize("override, error, match", [
    ({"prepare": {"id": {"source": "imagenet21k"}}}, ParamError, "prepare.id.source: 'imagenet21k'"),
    ({"prepare": {"ood": {"mnist": {"source": "emnist"}}}}, ParamError, "prepare.ood.mnist.source: 'emnist'"),
    ({"prepare": {"ood": {"mnist": {"group": "medium"}}}}, ParamError, "prepare.ood.mnist.group: 'medium'"),
    ({"prepare": {"id": {"source": "imagefolder", "root": "/no/such/folder"}}}, FileNotFoundError,
     "/no/such/folder/train"),
    ({"evaluate": {"extra_ood": {"mine": {"path": "/no/such/ood", "group": "near"}}}}, FileNotFoundError,
     "prepare.ood.mine: image folder '/no/such/ood' does not exist"),
    ({"prepare": {"fashion_mnist_dir": "/no/fmnist"}}, FileNotFoundError, "Fashion-MNIST not found: /no/fmnist"),
    ({"prepare": {"ood": {"mnist": {"count": 999999}}}}, ParamError, "prepare.ood.mnist.count: 999999"),
    ({"prepare": {"ood_split": {"val_fraction": 0.95, "seed": 0}}}, ParamError,
     "prepare.ood_split.val_fraction: 0.95"),
    ({"prepare": {"ood_split": {"fraction": 0.2}}}, ParamError, "prepare.ood_split: expected"),
    ({"prepare": {"ood": {"mnist": {"gray": "yes"}}}}, ParamError, "prepare.ood.mnist.gray: 'yes'"),
    ({"prepare": {"id": {"train_per_class": -3}}}, ParamError, "prepare.id.train_per_class: -3"),
    ({"prepare": {"id": {"source": "mnist"}}}, ParamError, "prepare.id.source: 'mnist' is not one of .*'cifar10'"),
    ({"prepare": {"ood": {"textures": {"crop_sise": 32}}}}, ParamError,
     r"prepare.ood.textures.crop_sise: not a key of a textures set \(did you mean prepare.ood.textures.crop_size"),
    ({"prepare": {"ood": {"train": {"source": "mnist", "group": "far"}}}}, ParamError,
     "prepare.ood.train: the name is taken by an ID split"),
    ({"prepare": {"max_sid": 64}}, ParamError, r"prepare.max_sid: not a known key \(did you mean prepare.max_side"),
    ({"prepare": {"id": {"val_per_class": None}}}, ParamError, "fewer than the"),  # null: all to val
])
def test_bad_params_give_a_clear_error(tmp_path, small_params, override, error, match):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    with pytest.raises(error, match=match):
        prepare.run(merged(small_params, override), out)
    assert (out / "keep.txt").read_text() == "earlier result"  # a failed run loses nothing


def test_torchvision_sets_need_download_and_say_so(tmp_path, small_params):
    params = merged(small_params, {"prepare": {"id": {"source": "cifar10"}, "cache_dir": str(tmp_path)}})
    with pytest.raises(FileNotFoundError, match="cifar10 is not in .*prepare.download: true"):
        prepare.run(params, tmp_path / "out")


def test_download_while_offline_is_a_clear_error(tmp_path, small_params, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    params = merged(small_params, {"prepare": {"ood": {"svhn": {"source": "svhn", "group": "far"}},
                                               "download": True, "cache_dir": str(tmp_path)}})
    with pytest.raises(ConnectionError, match="downloading svhn .* offline"):
        prepare.run(params, tmp_path / "out")


# ---- a new data source, end to end: one registered function, named by an OOD set


@pytest.fixture
def stripes_source(monkeypatch):
    """Registers `stripes`: `count` gray images with vertical stripes `width` pixels wide."""
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))  # the registration ends with the test

    @sources.source("stripes", options=("width",))
    def stripes(request: sources.Request, ctx: sources.Context) -> Images:
        columns = (np.arange(16) // request.options["width"]) % 2 * 255
        images = np.broadcast_to(columns.astype(np.uint8), (request.count, 16, 16)).copy()
        images[:, 0, 0] = np.arange(request.count)  # tell them apart
        return Images(np.full(request.count, -1, np.int64), images=images)

    return stripes


def test_a_registered_toy_source_becomes_an_ood_set(tmp_path, small_params, stripes_source):
    params = merged(small_params, {"prepare": {"ood": {
        "zebra": {"source": "stripes", "group": "far", "count": 4, "width": 2}}}})
    params["prepare"]["ood"] = {"zebra": params["prepare"]["ood"]["zebra"]}  # only the toy set
    params["prepare"]["ood_split"]["val_fraction"] = 0  # all four in the test part
    manifest = prepare.run(params, tmp_path / "out")
    assert list(manifest["splits"]) == ["train", "val", "test", "zebra"]
    assert {k: manifest["splits"]["zebra"][k] for k in ("kind", "group", "source", "count", "shape")} == {
        "kind": "ood", "group": "far", "source": "stripes", "count": 4, "shape": [16, 16]}
    zebra = load_split(tmp_path / "out", "zebra")
    assert (zebra.labels == -1).all() and zebra.images[:, 0, 0].tolist() == [0, 1, 2, 3]
    assert zebra.images[0, 1, :6].tolist() == [0, 0, 255, 255, 0, 0]
    with pytest.raises(ParamError, match="prepare.ood.zebra: a stripes set needs width"):
        prepare.config(merged(small_params, {"prepare": {"ood": {"zebra": {"source": "stripes", "group": "far"}}}}))
    with pytest.raises(ParamError, match="prepare.id.source: 'stripes' is not one of"):
        prepare.config(merged(small_params, {"prepare": {"id": {"source": "stripes"}}}))
