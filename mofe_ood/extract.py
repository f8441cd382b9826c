"""Stage `extract`: frozen-backbone features for every prepared split.

Output (the interface users feed to their own tools): `data/features/<split>.npz`
with `features` (N x D float32) and `labels` (N int64, -1 for OOD), for the
splits `train`, `val`, `test` and one per OOD set, plus `info.json`
(backbone, image size, feature dim, class names, split kinds and groups).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mofe_ood.backbones import Preprocess, create_backbone, pooled_features, preprocess_config
from mofe_ood.params import check_number
from mofe_ood.prepare import Images, _load_rgb, load_split


def preprocess(images: np.ndarray | torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """uint8 images (N x H x W gray or N x H x W x 3) -> normalised float N x 3 x S x S.

    Gray is replicated to RGB; resizing is bilinear with antialiasing, batched.
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (prep.image_size, prep.image_size):
        x = F.interpolate(x, size=(prep.image_size, prep.image_size), mode="bilinear",
                          antialias=True, align_corners=False)
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def image_batch(images: Images, start: int, stop: int, prep: Preprocess) -> torch.Tensor:
    if images.images is not None:
        return preprocess(images.images[start:stop], prep)
    # Files of any size: resize each while decoding, then normalise as a batch.
    return preprocess(np.stack([_load_rgb(p, size=prep.image_size) for p in images.paths[start:stop]]), prep)


@torch.inference_mode()
def features_of(model: torch.nn.Module, images: Images, prep: Preprocess, batch_size: int,
                desc: str = "", rows: range | None = None) -> np.ndarray:
    """Pooled features of `images` (or of the `rows` of it), in order, float32."""
    rows = rows if rows is not None else range(len(images))
    out = []
    for start in tqdm(range(rows.start, rows.stop, batch_size), desc=desc, unit="batch",
                      leave=False, disable=None):
        x = image_batch(images, start, min(start + batch_size, rows.stop), prep)
        out.append(pooled_features(model, x).float().cpu().numpy())
    dim = int(model.num_features)
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def load_model(params: dict) -> tuple[torch.nn.Module, Preprocess]:
    p = params["extract"]
    size = p.get("image_size")
    model = create_backbone(p.get("backbone"), str(p.get("weights")), size, num_classes=0)
    model = model.eval().to(memory_format=torch.channels_last)
    return model, preprocess_config(model, size)


def configure_threads(params: dict) -> None:
    threads = check_number("extract.num_threads", params["extract"].get("num_threads"), low=1,
                           integer=True, allow_none=True)
    if threads:
        torch.set_num_threads(threads)


def run(params: dict, prepared_dir: str | Path = "data/prepared",
        out_dir: str | Path = "data/features") -> dict:
    """Featurise every split of the manifest; `out_dir` is replaced in one move at the end."""
    p = params["extract"]
    batch_size = check_number("extract.batch_size", p.get("batch_size", 64), low=1, integer=True)
    configure_threads(params)
    torch.manual_seed(int(params.get("base", {}).get("seed", 0)))
    model, prep = load_model(params)
    manifest = json.loads((Path(prepared_dir) / "manifest.json").read_text())

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in manifest["splits"]:
        images = load_split(prepared_dir, name)
        feats = features_of(model, images, prep, batch_size, desc=name)
        np.savez(tmp / f"{name}.npz", features=feats, labels=images.labels.astype(np.int64))
    info = {
        "backbone": p["backbone"], "weights": str(p["weights"]), "image_size": prep.image_size,
        "feature_dim": int(model.num_features), "classes": manifest["classes"],
        "splits": {name: {"kind": s["kind"], "group": s["group"], "count": s["count"]}
                   for name, s in manifest["splits"].items()},
    }
    (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return info


def load_features(features_dir: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(Path(features_dir) / f"{name}.npz") as f:
        return f["features"], f["labels"]
