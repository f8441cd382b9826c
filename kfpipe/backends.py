"""Which Kubeflow Pipelines backend a compiled IR needs, read from the IR itself.

Supported: backends from 2.2.0 (Kubeflow 1.9) on. Each feature below is what a backend older
than its version does not run, as read in kubeflow/pipelines at the release tags (`git show
TAG:path`); the IR carries a feature only when the params ask for it (pipeline.py), and
`submit` refuses an IR whose needs the server does not meet, before uploading anything.

Why an older backend cannot simply be handed a newer IR: its driver parses each step's
Kubernetes config strictly up to 2.4.0 (`jsonpb.UnmarshalString`, backend/src/v2/cmd/driver/
main.go: an unknown field fails the step) and drops unknown fields from 2.4.1 on; the container
spec is parsed with unknown fields dropped at every version (compiler.GetDeploymentConfig).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

from mofe_ood.stages import OLDEST_KFP_BACKEND, version


def walk(node) -> Iterator[tuple[str, object]]:
    """Every (key, value) pair of a nested dict/list, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def has_key(*names: str) -> Callable[[dict, dict], bool]:
    return lambda spec, platform: any(key in names for key, _ in walk([spec, platform]))


def parameter_gpu_count(spec: dict, platform: dict) -> bool:
    """An accelerator count read from a pipeline parameter (`resourceCount` with no literal `count`)."""
    return any(key == "accelerator" and "count" not in value and value.get("resourceCount")
               for key, value in walk(spec) if isinstance(value, dict))


def optional_env(spec: dict, platform: dict) -> bool:
    """A Secret or ConfigMap as env that may be missing (`optional: true`)."""
    return any(key in ("secretAsEnv", "configMapAsEnv") and any(e.get("optional") for e in value)
               for key, value in walk(platform))


def job_placeholder(spec: dict, platform: dict) -> bool:
    return any(isinstance(value, str) and re.search(r"\{\{\$\.pipeline_(job|task)_", value)
               for _, value in walk(spec))


@dataclass(frozen=True)
class Feature:
    name: str
    since: str                  # the first backend that runs it
    source: str                 # where kubeflow/pipelines shows it (for the next reader to re-check)
    used: Callable[[dict, dict], bool]  # (pipeline spec, platform spec) -> does the IR use it


FEATURES = (
    Feature("a memory-backed /dev/shm on GPU steps (emptyDirMounts)", "2.3.0",
            "EmptyDirMount enters the kubernetes_platform proto the 2.3.0 backend builds with; "
            "driver.go applies GetEmptyDirMounts from 2.3.0", has_key("emptyDirMounts")),
    Feature("a GPU count from a pipeline parameter (accelerator resourceCount)", "2.4.0",
            "driver.go resolves GetResourceCount from 2.4.0; 2.2.0-2.3.0 read only the literal count",
            parameter_gpu_count),
    Feature("retries (retryPolicy)", "2.4.1",
            "argocompiler/container.go getTaskRetryPolicySpec, first at 2.4.1; older backends ignore it",
            has_key("retryPolicy")),
    Feature("Secret / ConfigMap / PVC names from parameters (secretNameParameter, ...)", "2.5.0",
            "kubeflow/pipelines PR 11621, first in tag 2.5.0",
            has_key("secretNameParameter", "configMapNameParameter", "pvcNameParameter")),
    Feature("job and task placeholders ({{$.pipeline_job_uuid}}, ...)", "2.5.0",
            "kubeflow/pipelines PR 11599 (driver.go), first in tag 2.5.0; older backends pass the text as is",
            job_placeholder),
    Feature("dsl.Collected over a ParallelFor (extract.shards > 1)", "2.14.0",
            "kubeflow/pipelines PR 11725, first in tag 2.14.0 (not in 2.5.0)", has_key("isArtifactList")),
    Feature("an optional Secret / ConfigMap as env (optional: true)", "2.15.0",
            "kubeflow/pipelines PR 12216, first in tag 2.15.0", optional_env),
)


def needs(spec: dict, platform: dict) -> list[Feature]:
    """The features of `OLDEST_KFP_BACKEND`'s successors the IR uses, newest first."""
    used = [f for f in FEATURES if version(f.since) > version(OLDEST_KFP_BACKEND) and f.used(spec, platform)]
    return sorted(used, key=lambda f: version(f.since), reverse=True)


def minimum(spec: dict, platform: dict) -> str:
    """The oldest backend that runs the IR."""
    found = needs(spec, platform)
    return found[0].since if found else OLDEST_KFP_BACKEND


def allows(settings_backend: str, feature_key: str) -> bool:
    """Whether `kfp.backend` (the oldest backend the IR must run on) admits the feature whose
    name contains `feature_key`: pipeline.py asks here before it adds an optional feature."""
    (feature,) = [f for f in FEATURES if feature_key in f.name]
    return version(feature.since) <= version(settings_backend)


def older_form(config: dict) -> dict:
    """A step's Kubernetes config with kfp-kubernetes' newer duplicate fields taken out where the
    older field says the same: `use_secret_as_env("s")` writes `secretName: s` and, for backends
    from 2.5.0, `secretNameParameter: {runtimeValue: {constant: s}}`; a 2.2.0-2.4.0 driver fails
    the step on the second, and a later one reads the first alike. A name that comes from a real
    parameter stays (and the IR then needs 2.5.0: FEATURES). Likewise `optional: false` on a
    Secret / ConfigMap as env (2.15.0's field; false is what older backends do anyway)."""
    pairs = {"secretAsEnv": ("secretName", "secretNameParameter"),
             "secretAsVolume": ("secretName", "secretNameParameter"),
             "configMapAsEnv": ("configMapName", "configMapNameParameter"),
             "configMapAsVolume": ("configMapName", "configMapNameParameter"),
             "pvcMount": ("constant", "pvcNameParameter"),
             "imagePullSecret": ("secretName", "secretNameParameter")}
    for field, (old, new) in pairs.items():
        for entry in config.get(field, []):
            if new in entry and entry.get(old) and entry[new] == {"runtimeValue": {"constant": entry[old]}}:
                del entry[new]
            if field.endswith("AsEnv") and entry.get("optional") is False:
                del entry["optional"]
    return config


def parse(tag: str) -> tuple[int, ...] | None:
    """`2.14.3` / `v2.5.0` / `2.2.0-rc.1` as (2, 14, 3); None where no version is found."""
    numbers = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", tag or "")
    return tuple(int(n or 0) for n in numbers.groups()) if numbers else None
