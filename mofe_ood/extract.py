"""Stage `extract`: frozen-backbone features for every prepared split.

Output (the interface users feed to their own tools): `data/features/<split>.npz`
with `features` (N x D float32) and `labels` (N int64, -1 for OOD), for the
splits `train`, `val`, `test` and one per OOD set, plus `info.json`
(backbone, image size, feature dim, class names, split kinds and groups).

Scale-out (the Kubeflow pipeline): `run_shard` featurises one contiguous run of
whole batches of every split, `merge_shards` concatenates them into the same
layout: every image is computed in the same batch as by `run`, so the merged
arrays equal `run`'s (tests/test_pipeline.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mofe_ood.backbones import (Preprocess, create_backbone, for_inference, pooled_features, preprocess_config,
                                torch_device)
from mofe_ood.params import check_number
from mofe_ood.images import load_rgb
from mofe_ood.prepare import Images, load_split


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
    return preprocess(np.stack([load_rgb(p, size=prep.image_size) for p in images.paths[start:stop]]), prep)


@torch.inference_mode()
def features_of(model: torch.nn.Module, images: Images, prep: Preprocess, batch_size: int,
                desc: str = "", rows: range | None = None) -> np.ndarray:
    """Pooled features of `images` (or of the `rows` of it), in order, float32."""
    rows = rows if rows is not None else range(len(images))
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(rows.start, rows.stop, batch_size), desc=desc, unit="batch",
                      leave=False, disable=None):
        x = image_batch(images, start, min(start + batch_size, rows.stop), prep).to(device)
        out.append(pooled_features(model, x).float().cpu().numpy())
    dim = int(model.num_features)
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def load_model(params: dict) -> tuple[torch.nn.Module, Preprocess]:
    p = params["extract"]
    size = p.get("image_size")
    device = torch_device("extract.device", p.get("device", "auto"))
    if device.type == "cuda":
        # Float32 convolutions, not TF32 (cuDNN's default): GPU features then equal the CPU's up
        # to rounding, as `mofe score` (on the CPU) must reproduce evaluate's numbers.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model = create_backbone(p.get("backbone"), str(p.get("weights")), size, num_classes=0)
    return for_inference(model.to(device), size), preprocess_config(model, size)


def configure_threads(params: dict) -> None:
    threads = check_number("extract.num_threads", params["extract"].get("num_threads"), low=1,
                           integer=True, allow_none=True)
    if threads:
        torch.set_num_threads(threads)


def run(params: dict, prepared_dir: str | Path = "data/prepared",
        out_dir: str | Path = "data/features") -> dict:
    """Featurise every split of the manifest; `out_dir` is replaced in one move at the end."""
    return _extract(params, prepared_dir, out_dir, shard=None)


def shard_count(params: dict) -> int:
    """`extract.shards`: how many workers featurise the splits side by side (Kubeflow)."""
    return check_number("extract.shards", params["extract"].get("shards", 1), low=1, integer=True)


def shard_rows(count: int, index: int, shards: int, batch_size: int = 1) -> range:
    """The rows of shard `index`: batches [index*B/shards, (index+1)*B/shards) of the B batches.

    Whole batches, not rows [index*count/shards, ...): a backbone's output for an image can
    differ in the last bits with the batch around it (oneDNN picks other kernels for a
    batch of 1), so shards batch exactly like `run` does to give the same arrays.
    """
    batches = -(-count // batch_size)
    start, stop = (min(i * batches // shards * batch_size, count) for i in (index, index + 1))
    return range(start, stop)


def run_shard(params: dict, prepared_dir: str | Path, out_dir: str | Path, index: int) -> dict:
    """Shard `index` of `extract.shards`: the same layout as `run`, for `shard_rows` of every split.

    Its info.json adds `shard` (index, shards, rows per split); `merge_shards` joins the shards
    back into exactly what `run` writes.
    """
    shards = shard_count(params)
    check_number("extract shard index", index, low=0, high=shards - 1, integer=True)
    return _extract(params, prepared_dir, out_dir, shard=(index, shards))


def _extract(params: dict, prepared_dir: str | Path, out_dir: str | Path,
             shard: tuple[int, int] | None) -> dict:
    p = params["extract"]
    batch_size = check_number("extract.batch_size", p.get("batch_size", 64), low=1, integer=True)
    check_number("extract.gpus", p.get("gpus", 0), low=0, integer=True)  # the pod's; the device is extract.device
    configure_threads(params)
    torch.manual_seed(int(params.get("base", {}).get("seed", 0)))
    model, prep = load_model(params)
    manifest = json.loads((Path(prepared_dir) / "manifest.json").read_text())

    tmp = _fresh_tmp(out_dir)
    rows_of = {}
    for name in manifest["splits"]:
        images = load_split(prepared_dir, name)
        rows = shard_rows(len(images), *shard, batch_size) if shard else range(len(images))
        feats = features_of(model, images, prep, batch_size, desc=name, rows=rows)
        np.savez(tmp / f"{name}.npz", features=feats,
                 labels=images.labels[rows.start:rows.stop].astype(np.int64))
        rows_of[name] = [rows.start, rows.stop]
    info = {
        "backbone": p["backbone"], "weights": str(p["weights"]), "image_size": prep.image_size,
        "feature_dim": int(model.num_features), "classes": manifest["classes"],
        "splits": {name: {"kind": s["kind"], "group": s["group"], "count": s["count"]}
                   for name, s in manifest["splits"].items()},
    }
    if shard:
        info["shard"] = {"index": shard[0], "shards": shard[1], "rows": rows_of}
    (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    _replace(tmp, out_dir)
    return info


def merge_shards(shard_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Concatenate the folders written by `run_shard` (in any order) into `run`'s layout in `out_dir`."""
    shards = sorted(((Path(d), json.loads((Path(d) / "info.json").read_text())) for d in shard_dirs),
                    key=lambda item: item[1].get("shard", {}).get("index", -1))
    found = [(info.get("shard") or {}).get("index") for _, info in shards]
    of = sorted({(info.get("shard") or {}).get("shards") for _, info in shards}, key=str)
    if not shards:
        raise ValueError("no shard folders to merge")
    if found != list(range(len(shards))) or of != [len(shards)]:
        raise ValueError(f"expected all shards 0..{len(shards) - 1} of one extraction, each once; "
                         f"got shards {found} of {of}")
    merged = {k: v for k, v in shards[0][1].items() if k != "shard"}
    for d, info in shards[1:]:
        if {k: v for k, v in info.items() if k != "shard"} != merged:
            raise ValueError(f"{d}: a shard of another extraction (backbone, classes or splits differ)")

    tmp = _fresh_tmp(out_dir)
    for name, split in merged["splits"].items():
        rows = [info["shard"]["rows"][name] for _, info in shards]
        ends = [0] + [stop for _, stop in rows]
        if [start for start, _ in rows] != ends[:-1] or ends[-1] != split["count"]:
            raise ValueError(f"split {name!r}: shard rows {rows} do not tile 0..{split['count']}")
        parts = [load_features(d, name) for d, _ in shards]
        np.savez(tmp / f"{name}.npz", features=np.concatenate([f for f, _ in parts]),
                 labels=np.concatenate([labels for _, labels in parts]))
    (tmp / "info.json").write_text(json.dumps(merged, indent=2) + "\n")
    _replace(tmp, out_dir)
    return merged


def _fresh_tmp(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _replace(tmp: Path, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def load_features(features_dir: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(Path(features_dir) / f"{name}.npz") as f:
        return f["features"], f["labels"]
