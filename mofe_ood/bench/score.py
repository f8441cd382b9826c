"""`mofe score` throughput (images/s) on a folder of 28 x 28 PNG files, as a user runs it.

`python -m mofe_ood.bench score [--images 2000] [--model models/mofe_dynmix | models:/mofe-ood@champion]`
Writes the PNGs (Fashion-MNIST test images when data/prepared has them, else noise)
to a temporary folder, loads the model as `mofe score` does, and times listing,
decoding, preprocessing, backbone, head and OOD score over the whole folder. With
no trained model it times the frozen packaged backbone + a KNN over a random bank
of the benchmark's size (the head and the score are a small part of the time).
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mofe_ood import params as params_mod
from mofe_ood.cli import parse_set
from mofe_ood.images import list_images
from mofe_ood.serving.bundle import load_detector
from mofe_ood.serving.detector import Detector, score_files


def synthetic_detector(params: dict, bank_size: int = 7000) -> Detector:
    from mofe_ood.backbones import create_backbone

    p = params["extract"]
    backbone = create_backbone(p["backbone"], str(p["weights"]), p["image_size"], num_classes=0)
    cfg = backbone.pretrained_cfg
    spec = {"name": p["backbone"], "weights": "package", "image_size": p["image_size"],
            "mean": list(cfg["mean"]), "std": list(cfg["std"])}
    rng = np.random.default_rng(0)
    bank = {"features": rng.random((bank_size, backbone.num_features), dtype=np.float32),
            "labels": np.zeros(bank_size, np.int64)}
    return Detector(variant="frozen", classes=[], backbone=backbone, backbone_spec=spec, head=None,
                    head_files={}, bank=bank, score={"name": "knn", "hyper": {"k": 10}, "threshold": 0.0},
                    max_side=params["prepare"].get("max_side", 128))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mofe_ood.bench score")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default=None, help="as `mofe score --model`; default: a synthetic detector")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    params = params_mod.merged(params_mod.load(args.params), parse_set(args.set))
    prepared = Path("data/prepared/test.npz")
    if prepared.is_file():
        with np.load(prepared) as f:
            images = f["images"][: args.images] if "images" in f else None
    else:
        images = None
    if images is None or len(images) < args.images:
        images = np.random.default_rng(0).integers(0, 256, (args.images, 28, 28), dtype=np.uint8)
    start = time.perf_counter()
    detector = load_detector(args.model, params=params) if args.model else synthetic_detector(params)
    loaded = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        for i, image in enumerate(images):
            Image.fromarray(image).save(Path(tmp) / f"{i:05d}.png")
        detector.predict(images[: args.batch_size])  # warm-up (oneDNN picks its kernels)
        start = time.perf_counter()
        paths = list_images([tmp])
        scored, failed = score_files(detector, paths, lambda path, record: None, args.batch_size, progress=False)
        seconds = time.perf_counter() - start
    print(f"model {args.model or 'synthetic (frozen backbone + KNN)'}: {detector.backbone_spec['name']}, "
          f"{detector.prep.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"loaded in {loaded:.1f} s")
    print(f"score: {scored} files in {seconds:.1f} s = {scored / seconds:.1f} images/s ({failed} failed)")
    return 0
