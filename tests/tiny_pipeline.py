"""A real, tiny run of the pipeline (prepare -> extract -> train -> evaluate) for the
inference and registry tests: real images, the packaged backbone at 32 px, a small
MoFE + Dynamic-β Mixup head. Built once per test session (~20-40 s on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mofe_ood.params import load, merged

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "mofe_dynmix"
TINY_RUN = {
    "prepare": {
        "id": {"train_per_class": 20, "val_per_class": 10, "test_per_class": 10},
        "ood": {"fmnist_near": {"count": 60}, "mnist": {"count": 20}, "textile": {"count": 4},
                "textures": {"count": 6, "crop_size": 32}},
    },
    "extract": {"image_size": 32, "batch_size": 64},
    "train": {"variants": [VARIANT], "epochs": 3, "expert_epochs": 2, "router_epochs": 2,
              "batch_size": 64, "hidden_features": 32, "mofe": {"num_experts": 2}},
    "evaluate": {"variants": ["frozen", VARIANT], "scores": ["knn", "energy"], "default_score": "knn",
                 "tpr": 0.95, "knn_k": [5], "vim_dim": [8], "extra_ood": {}},
    "register": {"variant": VARIANT, "model_name": "mofe-ood", "experiment": "mofe-ood-test",
                 "gate_metric": "near.auroc", "margin": 0.001, "accuracy_tolerance": 0.005},
}
_built: dict[str, Path] = {}


def tiny_params() -> dict:
    return merged(load(ROOT / "params.yaml"), TINY_RUN)


def build(tmp_path_factory) -> Path:
    """The project folder (data/, models/, reports/, images/<split>/*.png), built once."""
    if "root" in _built:
        return _built["root"]
    from mofe_ood import evaluate, extract, prepare, train

    root = tmp_path_factory.mktemp("tiny_pipeline")
    params = tiny_params()
    prepare.run(params, root / "data" / "prepared")
    extract.run(params, root / "data" / "prepared", root / "data" / "features")
    train.run(params, root / "data" / "features", root / "models")
    evaluate.run(params, root / "data" / "features", root / "models", root / "reports")
    for split in ("test", "fmnist_near"):  # what a user would point `mofe score` at
        images = prepare.load_split(root / "data" / "prepared", split).images
        (root / "images" / split).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / "images" / split / f"{i:04d}.png")
    _built["root"] = root
    return root


def split_images(root: Path, split: str) -> np.ndarray:
    from mofe_ood.prepare import load_split

    return load_split(root / "data" / "prepared", split).images
