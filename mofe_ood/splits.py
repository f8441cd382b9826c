"""The two on-disk formats the stages hand each other: prepared splits and feature splits.

- `data/prepared/<split>.npz` (written by `prepare`): `labels` and either `images`
  (uint8, N x H x W gray or N x H x W x 3 RGB) or `paths` (image files, read lazily;
  relative ones are inside the prepared folder), read by `load_split` as `Images`.
- `data/features/<split>.npz` (written by `extract`): `features` (N x D float32) and
  `labels` (N int64, -1 for OOD), read by `load_features`; with `extract.top_blocks` > 0
  also `trunk` (float16, the activations entering the backbone's top), read by `load_trunk`.

A library module: extract, train, evaluate and serving read these without importing
the stage that wrote them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mofe_ood.errors import UserError


ID_SPLITS = ("train", "val", "test")  # the ID splits, in this order; every other split is an OOD set
GROUPS = ("near", "far")  # what an OOD set is tagged (manifest.json, info.json)
# `<set>_val` (kind "ood_val"): the validation part of OOD set `<set>` (kind "ood", the test part)
VAL_SUFFIX = "_val"


class DataError(UserError):
    """Input data a stage cannot use (an empty set, unreadable images, NaN features); the message names it."""


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


def load_split(prepared_dir: str | Path, name: str) -> Images:
    """One split of `prepared_dir`; relative image paths (files copied from S3) resolved against it."""
    with np.load(Path(prepared_dir) / f"{name}.npz", allow_pickle=False) as f:
        paths = f["paths"] if "paths" in f else None
        if paths is not None:
            base = Path(prepared_dir).resolve()
            paths = np.array([p if os.path.isabs(p) else str(base / p) for p in paths.tolist()])
        return Images(f["labels"], images=f["images"] if "images" in f else None, paths=paths)


def load_features(features_dir: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of one split of `features_dir`."""
    with np.load(Path(features_dir) / f"{name}.npz") as f:
        return f["features"], f["labels"]


def load_trunk(features_dir: str | Path, name: str) -> np.ndarray:
    """The cached trunk activations of one split (float16, N x C x H x W or N x T x D): what block
    experts read; written when `extract.top_blocks` > 0."""
    path = Path(features_dir) / f"{name}.npz"
    with np.load(path) as f:
        if "trunk" not in f:
            raise DataError(f"{path} holds no trunk activations: run extract with extract.top_blocks >= 1")
        return f["trunk"]
