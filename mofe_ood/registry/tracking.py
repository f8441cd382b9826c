"""The tracking server / registry connection shared by register, `mofe score` and the benches.

Embedded default: an sqlite store `mlflow.db` (artifacts in `mlruns/` beside it) in
the project root, DVC_ROOT under `dvc exp run`, so experiments share one registry.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

# Each HTTP call to a tracking server: a few quick retries, not MLflow's minutes of them.
ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    root = Path(os.environ.get("DVC_ROOT") or ".")
    return uri if uri else f"sqlite:///{(root / 'mlflow.db').resolve()}"


def shown(uri: str) -> str:
    """The URI without credentials, for messages and outputs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password or parts.username:
        return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
    return uri


def connect(uri: str | None = None, must_exist: bool = False):
    """An MlflowClient for `uri`, after checking that the server answers (5 s at most).

    Raises ConnectionError naming the URI before anything is written. `must_exist`:
    an embedded sqlite store must already exist (reading a registry that is not there).
    """
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}")
        except (OSError, urllib.error.URLError) as err:
            reason = getattr(err, "reason", err)
            raise ConnectionError(
                f"MLflow tracking server {shown(uri)} is unreachable ({reason}); start it "
                "(infra/services.sh) or point MLFLOW_TRACKING_URI at a running server") from None
    elif uri.startswith("sqlite:///") and must_exist:
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise FileNotFoundError(f"no MLflow registry at {uri}: run the pipeline's register stage "
                                    "first, or set MLFLOW_TRACKING_URI")
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the caller's cwd
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)
