"""What training reads: the cached features of `extract` and the prepared images of `prepare`.

The only place the training library touches those stages' file layouts (their
readers move to a shared library module when one exists).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mofe_ood.backbones import image_batch
from mofe_ood.splits import DataError, Images, load_features, load_split, load_trunk

__all__ = ["Data", "Images", "load_data", "load_trunk_data", "load_split", "images_on"]


@dataclass
class Data:
    """The ID train and validation features (and labels) a head trains on."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_val, self.y_val):
            h.update(t.numpy().tobytes())
        h.update(json.dumps(self.classes).encode())
        return h.hexdigest()


def load_data(features_dir: str | Path) -> Data:
    """The `train` and `val` splits of `features_dir`, checked (finite, labels in range, no empty class)."""
    features_dir = Path(features_dir)
    info = json.loads((features_dir / "info.json").read_text())
    arrays = {}
    for split in ("train", "val"):
        feats, labels = load_features(features_dir, split)
        if len(feats) == 0:
            raise DataError(f"{features_dir}/{split}.npz is empty: nothing to train on")
        if not np.isfinite(feats).all():
            raise DataError(f"{features_dir}/{split}.npz has NaN or infinite features")
        if labels.min() < 0 or labels.max() >= len(info["classes"]):
            raise DataError(f"{features_dir}/{split}.npz has labels outside 0..{len(info['classes']) - 1}")
        arrays[split] = (torch.from_numpy(np.ascontiguousarray(feats, np.float32)),
                         torch.from_numpy(labels.astype(np.int64)))
    missing = sorted(set(range(len(info["classes"]))) - set(arrays["train"][1].tolist()))
    if missing:
        raise DataError(f"classes {missing} have no training samples in {features_dir}/train.npz")
    return Data(*arrays["train"], *arrays["val"], list(info["classes"]))


def load_trunk_data(features_dir: str | Path, data: Data) -> Data:
    """`data` with the cached trunk activations (float32) in place of the pooled features."""
    features_dir = Path(features_dir)
    x = {}
    for split, labels in (("train", data.y_train), ("val", data.y_val)):
        trunk = load_trunk(features_dir, split)
        if len(trunk) != len(labels):
            raise DataError(f"{features_dir}/{split}.npz: {len(trunk)} trunk rows for {len(labels)} labels")
        x[split] = torch.from_numpy(trunk.astype(np.float32))
    return Data(x["train"], data.y_train, x["val"], data.y_val, data.classes)


def images_on(images: Images, rows, prep, device: torch.device) -> torch.Tensor:
    """The preprocessed images `rows` of `images`, as one batch on `device`."""
    return image_batch(images.take(np.asarray(rows)), 0, len(rows), prep).contiguous().to(device)
