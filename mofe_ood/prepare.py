"""Stage `prepare`: build the ID splits and the OOD sets as arrays plus a manifest.

Output (under `data/prepared/`, the format of mofe_ood.splits): one `<split>.npz` per
split with `labels` and either `images` or `paths`, and `manifest.json` (source,
counts per class, checksums). ID splits are `train`, `val` (carved from the source's
train data, never from its test data) and `test`; every OOD set is named by its key
in params and tagged near or far, and split (`prepare.ood_split`: fraction and seed,
recorded in the manifest) into a validation part `<set>_val` (kind `ood_val`: what
every choice reads) and a test part `<set>` (kind `ood`: reported only). A set with
`gray: true` is converted to grayscale (ours: the ID images are gray, so a colour set
would be told apart by colour alone). Images come from the data sources of
mofe_ood.sources (built-ins: mofe_ood.datasets).

Raw data can come from S3 (ours: a container step reads no host folder): any folder
param (`fashion_mnist_dir`, `id.root`, an OOD or `extra_ood` `path`) may be an
`s3://bucket/prefix` URI, read with the environment's endpoint and credentials
(mofe_ood.storage). Fashion-MNIST's files are read and dropped; an image folder is
copied into `files/<name>/` of the output, and its `paths` are stored relative to the
output folder, so the next step (another container) finds them in the artifact.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mofe_ood import atomic, datasets, sources  # noqa: F401  (datasets registers the built-in sources)
from mofe_ood.config import base, section
from mofe_ood.images import load_rgb
from mofe_ood.params import ParamError, check_choice, check_number
from mofe_ood.sources import Context, Request
from mofe_ood.splits import GROUPS, ID_SPLITS, VAL_SUFFIX, DataError, Images

log = logging.getLogger(__name__)

# What params.yaml says `fashion_mnist_dir: null` means.
FASHION_MNIST_ENV, FASHION_MNIST_DIR = "FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"
OOD_KEYS = ("source", "group", "count", "classes", "gray")  # plus the keys its source declares


# ---------------------------------------------------------------- config

def check_classes(classes, count: int | None = None, what: str = "prepare.id.classes") -> list[int] | None:
    """null (all), or at least 2 distinct class indices below `count`."""
    if classes is None:
        return None
    if not isinstance(classes, list):
        raise ParamError(f"{what}: {classes!r} is not a list of class indices or null")
    for c in classes:
        check_number(what, c, low=0, high=None if count is None else count - 1, integer=True)
    if len(set(classes)) < 2 or len(set(classes)) != len(classes):
        raise ParamError(f"{what}: {classes} must hold at least 2 distinct classes")
    return list(classes)


@dataclass(frozen=True)
class IdSpec:
    """`prepare.id`: the ID source, its classes and how many images per class each split takes."""

    source: str
    classes: list[int] | None
    root: str | None
    train_per_class: int | None
    val_per_class: int | None
    test_per_class: int | None

    def __post_init__(self):
        sources.get(self.source, "prepare.id.source", id_only=True)
        check_classes(self.classes)
        for key in ("train_per_class", "val_per_class", "test_per_class"):
            check_number(f"prepare.id.{key}", getattr(self, key), low=1, integer=True, allow_none=True)


@dataclass(frozen=True)
class OodSet:
    """One OOD set: an entry of prepare.ood or evaluate.extra_ood, checked (`what` names it)."""

    what: str
    source: str
    group: str
    count: int | None
    classes: list[int] | None
    options: Mapping[str, Any]
    gray: bool = False  # convert to grayscale (as the ID images are), so colour alone gives nothing away


def ood_set(what: str, entry: Any) -> OodSet:
    """`entry` checked: source and group required, count and classes optional (null = all), plus
    every key its source declares (e.g. textures: crop_size); no other key."""
    if not isinstance(entry, Mapping):
        raise ParamError(f"{what}: expected a mapping with source and group, got {entry!r}")
    src = sources.get(entry.get("source"), f"{what}.source")
    group = check_choice(f"{what}.group", entry.get("group"), GROUPS)
    allowed = (*OOD_KEYS, *src.options)
    for key in entry:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.7)
            hint = f" (did you mean {what}.{close[0]}?)" if close else ""
            raise ParamError(f"{what}.{key}: not a key of a {src.name} set{hint}; known: {', '.join(allowed)}")
    missing = [key for key in src.options if key not in entry]
    if missing:
        raise ParamError(f"{what}: a {src.name} set needs {', '.join(missing)}")
    count = check_number(f"{what}.count", entry.get("count"), low=1, integer=True, allow_none=True)
    classes = entry.get("classes")
    if classes is not None and (not isinstance(classes, list) or not classes
                                or any(isinstance(c, bool) or not isinstance(c, int) for c in classes)):
        raise ParamError(f"{what}.classes: {classes!r} is not a list of class indices or null")
    gray = entry.get("gray", False)
    if not isinstance(gray, bool):
        raise ParamError(f"{what}.gray: {gray!r} is not true or false")
    return OodSet(what, src.name, group, count, classes, {k: entry[k] for k in src.options}, gray)


def _extra_ood(name: str, entry: Any) -> OodSet:
    """An evaluate.extra_ood entry, {path, group}: an image-folder OOD set."""
    what = f"evaluate.extra_ood.{name}"
    if not isinstance(entry, Mapping) or set(entry) != {"path", "group"}:
        raise ParamError(f"{what}: expected {{path: <image folder>, group: near|far}}, got {entry!r}")
    check_choice(f"{what}.group", entry["group"], GROUPS)
    return ood_set(f"prepare.ood.{name}", {"source": "imagefolder", **entry})


@dataclass(frozen=True)
class Prepare:
    """The `prepare` section (params.yaml documents every key)."""

    id: IdSpec
    ood: dict | None
    max_side: int
    bad_images: str
    download: bool
    cache_dir: str
    fashion_mnist_dir: str | None
    ood_split: Mapping  # {val_fraction, seed}: every OOD set -> a validation part and a test part

    def __post_init__(self):
        split = self.ood_split
        if not isinstance(split, Mapping) or set(split) != {"val_fraction", "seed"}:
            raise ParamError(f"prepare.ood_split: expected {{val_fraction: <0..1>, seed: <int>}}, got {split!r}")
        check_number("prepare.ood_split.val_fraction", split["val_fraction"], low=0, high=0.9)
        check_number("prepare.ood_split.seed", split["seed"], low=0, integer=True)
        if self.ood is not None and not isinstance(self.ood, Mapping):
            raise ParamError(f"prepare.ood: expected a mapping of named OOD sets or null, got {self.ood!r}")
        check_number("prepare.max_side", self.max_side, low=16, integer=True)
        check_choice("prepare.bad_images", self.bad_images, ("skip", "fail"))
        if not isinstance(self.download, bool):
            raise ParamError(f"prepare.download: {self.download!r} is not true or false")
        if not isinstance(self.cache_dir, str):
            raise ParamError(f"prepare.cache_dir: {self.cache_dir!r} is not a folder path")
        if self.fashion_mnist_dir is not None and not isinstance(self.fashion_mnist_dir, str):
            raise ParamError(f"prepare.fashion_mnist_dir: {self.fashion_mnist_dir!r} is not a folder path or null")


@dataclass(frozen=True)
class Config:
    """What the stage reads: base.seed, the prepare section, and every OOD set checked
    (prepare.ood, then the image folders of evaluate.extra_ood)."""

    seed: int
    prepare: Prepare
    sets: dict[str, OodSet]


def config(params: Mapping) -> Config:
    """The stage's params, every value checked (mofe validate calls this too)."""
    p = section(Prepare, params.get("prepare"), "prepare")
    evaluate = params.get("evaluate")
    if not isinstance(evaluate, Mapping) or "extra_ood" not in evaluate:
        raise ParamError("evaluate.extra_ood: missing (prepare reads its image folders; {} for none)")
    extra = evaluate["extra_ood"] or {}
    if not isinstance(extra, Mapping):
        raise ParamError(f"evaluate.extra_ood: expected a mapping of named image folders, got {extra!r}")
    sets = {}
    for name, entry in (p.ood or {}).items():
        if name in ID_SPLITS:
            raise ParamError(f"prepare.ood.{name}: the name is taken by an ID split ({', '.join(ID_SPLITS)})")
        sets[name] = ood_set(f"prepare.ood.{name}", entry)
    for name, entry in extra.items():
        if name in sets or name in ID_SPLITS:
            raise ParamError(f"evaluate.extra_ood.{name}: the name is already taken by a built-in split")
        sets[name] = _extra_ood(name, entry)
    return Config(base(params).seed, p, sets)


def _context(cfg: Config, files_dir: Path | None = None, scratch: Path | None = None) -> Context:
    p = cfg.prepare
    return Context(seed=cfg.seed, download=p.download, cache_dir=Path(os.path.expanduser(p.cache_dir)),
                   fashion_mnist_dir=p.fashion_mnist_dir or os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR),
                   max_side=p.max_side, bad_images=p.bad_images, files_dir=files_dir, scratch=scratch)


# ---------------------------------------------------------------- splits

def _per_class(images: Images, classes: list[int], take: list[int | None], rng) -> list[Images]:
    """Disjoint random subsets per class, sizes `take` (None = all that is left), in source order."""
    parts: list[list[np.ndarray]] = [[] for _ in take]
    for c in classes:
        index = rng.permutation(np.flatnonzero(images.labels == c))
        start = 0
        for part, n in zip(parts, take, strict=True):
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


def id_splits(spec: IdSpec, ctx: Context) -> tuple[dict[str, Images], list[str]]:
    """train, val (carved from the source's train data) and test, relabelled 0..C-1; the class names."""
    load = sources.SOURCES[spec.source].load
    train, test = (load(Request("prepare.id", split, True, None, {"root": spec.root}), ctx)
                   for split in ("train", "test"))
    names = train.class_names
    classes = check_classes(spec.classes, len(names)) or list(range(len(names)))
    rng = np.random.default_rng(ctx.seed)
    val, train = _per_class(train, classes, [spec.val_per_class, spec.train_per_class], rng)
    (test,) = _per_class(test, classes, [spec.test_per_class], rng)
    splits = {name: _relabel(part, classes) for name, part in zip(ID_SPLITS, (train, val, test), strict=True)}
    return splits, [names[c] for c in classes]


def ood_images(spec: OodSet, ctx: Context) -> Images:
    """The images of one OOD set: its source's test data, its classes, `count` drawn with the seed."""
    src = sources.SOURCES[spec.source]
    images = src.load(Request(spec.what, "test", False, spec.count, spec.options), ctx)
    if spec.classes is not None:
        images = images.take(np.flatnonzero(np.isin(images.labels, spec.classes)))
    if spec.count is not None:
        if spec.count > len(images):
            raise ParamError(f"{spec.what}.count: {spec.count} is more than the {len(images)} images available")
        index = np.random.default_rng(ctx.seed).permutation(len(images))[:spec.count]
        images = images.take(np.sort(index))
    if src.pixels or (spec.gray and images.images is None):
        # e.g. files inside a package: store the pixels, downscaled to max_side
        images = Images(images.labels, images=np.stack([load_rgb(p, ctx.max_side) for p in images.paths]))
    if spec.gray and images.images.ndim == 4:
        images = Images(images.labels, images=to_gray(images.images))
    if len(images) == 0:
        raise DataError(f"{spec.what}: the OOD set is empty")
    images.labels = np.full(len(images), -1, np.int64)
    return images


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x 3 -> N x H x W, ITU-R 601-2 luma (PIL's "L": 299/587/114 per mille)."""
    wide = rgb.astype(np.uint32)
    luma = wide[..., 0] * 299 + wide[..., 1] * 587 + wide[..., 2] * 114
    return ((luma + 500) // 1000).astype(np.uint8)


def ood_val_test(images: Images, val_fraction: float, seed: int, name: str) -> tuple[Images, Images]:
    """(validation part, test part) of one OOD set: disjoint, drawn with `seed` and the set's name
    (so adding a set changes no other set's split), each in source order."""
    rng = np.random.default_rng([seed, *name.encode()])
    order = rng.permutation(len(images))
    n_val = int(round(val_fraction * len(images)))
    return images.take(np.sort(order[:n_val])), images.take(np.sort(order[n_val:]))


# ---------------------------------------------------------------- stage

def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}{a.dtype}{a.shape}".encode())
        digest.update(a.tobytes() if a.dtype.kind != "U" else "\n".join(a.tolist()).encode())
    return digest.hexdigest()


def _relative(path: str, root: Path) -> str:
    root = str(root.resolve()) + os.sep
    return path[len(root):] if path.startswith(root) else path


def _entry(images: Images, kind: str, group: str | None, source: str, class_names: list[str],
           arrays: dict[str, np.ndarray]) -> dict:
    """One split's manifest entry."""
    entry = {"kind": kind, "group": group, "source": source, "count": len(images),
             "storage": "images" if images.images is not None else "paths",
             "bad_files_skipped": images.bad_files, "sha256": _checksum(arrays)}
    if images.images is not None:
        entry["shape"] = list(images.images.shape[1:])
    if kind == "id":
        entry["counts_per_class"] = {class_names[c]: int(n) for c, n in
                                     zip(*np.unique(images.labels, return_counts=True), strict=True)}
    return entry


def run(params: dict, out_dir: str | Path = "data/prepared") -> dict:
    """Build every split, then replace `out_dir` in one move (a failure leaves the old one)."""
    cfg = config(params)  # every OOD spec is checked before the slow loading starts
    with atomic.replacing(out_dir) as tmp, tempfile.TemporaryDirectory(prefix="mofe-prepare-") as scratch:
        ctx = _context(cfg, files_dir=tmp / "files", scratch=Path(scratch))
        splits, class_names = id_splits(cfg.prepare.id, ctx)
        kinds = {name: ("id", None, cfg.prepare.id.source) for name in splits}
        split = cfg.prepare.ood_split
        for name, spec in cfg.sets.items():
            images = ood_images(spec, ctx)
            if split["val_fraction"] > 0:
                if name + VAL_SUFFIX in cfg.sets:
                    raise ParamError(f"prepare.ood.{name}{VAL_SUFFIX}: the name is taken by the validation "
                                     f"part of {name!r}; rename that set")
                val, images = ood_val_test(images, split["val_fraction"], split["seed"], name)
                if len(val) == 0 or len(images) == 0:
                    raise DataError(f"{spec.what}: {len(val) + len(images)} images cannot be split into a "
                                    f"validation and a test part (prepare.ood_split.val_fraction "
                                    f"{split['val_fraction']})")
                splits[name + VAL_SUFFIX] = val
                kinds[name + VAL_SUFFIX] = ("ood_val", spec.group, spec.source)
            splits[name] = images
            kinds[name] = ("ood", spec.group, spec.source)
        manifest = {"classes": class_names, "seed": cfg.seed, "ood_split": dict(split), "splits": {}}
        for name, images in splits.items():
            if images.paths is not None:  # copied from S3 into the output: stored relative to it
                images.paths = np.array([_relative(p, tmp) for p in images.paths])
            arrays = {"labels": images.labels}
            arrays["images" if images.images is not None else "paths"] = (
                images.images if images.images is not None else images.paths)
            np.savez(tmp / f"{name}.npz", **arrays)
            manifest["splits"][name] = _entry(images, *kinds[name], class_names, arrays)
            log.info("%s: %d images (%s, %s)", name, len(images), kinds[name][0], kinds[name][2])
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
