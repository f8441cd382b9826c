"""The servers tests start, apart from the fixtures that start them (conftest.py): SeaweedFS (a
real S3 server, through infra/services.sh, on free loopback ports), the free-port helpers and
the clean environment its subprocesses run in. The fake KFP API is tests/fake_kfp.py."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
