"""The pipeline's stages, written once: read by the CLI (`mofe <stage>`), the Kubeflow
pipeline (pipeline.py: its steps, their order and pods) and the tests; dvc.yaml must agree
with it (tests/test_dvc_stages.py checks names, commands and params sections) (ours).

A stage is a module of this package with `run(params)` (its default paths are dvc.yaml's)
and `config(params)` (its section as a frozen config object, the check `mofe validate` runs),
a component in `components/<name>.py` named like the stage, and a dvc.yaml stage
`cmd: mofe <name>`. CONTRIBUTING.md has the recipe.

Also here: the `kfp` section (how the cluster runs the steps), as a frozen config object, so
`mofe validate` checks it without importing kfp.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Mapping

import re

from mofe_ood.config import section
from mofe_ood.params import ParamError, check_number

# The oldest Kubeflow Pipelines backend the compiled IR runs on: KFP 2.2.0 ships with Kubeflow 1.9.
OLDEST_KFP_BACKEND = "2.2.0"


def version(text: str) -> tuple[int, ...]:
    """`2.4.1` as (2, 4, 1)."""
    return tuple(int(n) for n in text.split("."))


@dataclass(frozen=True)
class Resources:
    """What one step asks of a Kubeflow cluster."""

    cpu: float               # cores requested; also the threads torch starts (OMP_NUM_THREADS)
    memory: str
    retries: int = 2         # every step is idempotent: it rewrites its own outputs
    cache: bool = False      # KFP reuses a cached output only where inputs fully determine it
    storage: bool = False    # gets the S3 / MLflow Secret and ConfigMap as env
    data: bool = False       # mounts kfp.data_pvc (image folders read by path) when one is set
    gpus: bool = False       # `<stage>.gpus` GPUs, an integer pipeline parameter `<stage>_gpus`


@dataclass(frozen=True)
class Stage:
    name: str                   # `mofe <name>`, the dvc.yaml stage, the KFP task
    sections: tuple[str, ...]   # the params sections its `run` reads (its component takes them)
    help: str
    pod: Resources
    # "section.key": of that section (one of `sections`), only these keys are read (dvc.yaml lists
    # them so); its component takes them as `section__key`, so KFP caches it on those keys alone.
    partial: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return f"mofe_ood.{self.name}"

    @property
    def component(self) -> str:
        """`module:function` of its KFP component."""
        return f"components.{self.name}:{self.name}"

    def load(self):
        """The stage module (imported on use: torch, mlflow and kfp are slow to import)."""
        return importlib.import_module(self.module)


STAGES: tuple[Stage, ...] = (
    Stage("prepare", ("base", "prepare", "evaluate"),
          "build the ID splits and OOD sets under data/prepared",
          Resources(2, "8Gi", cache=True, storage=True, data=True),  # raw data from S3 or the PVC
          partial=("evaluate.extra_ood",)),
    Stage("extract", ("base", "extract"),
          "frozen-backbone features under data/features",
          Resources(4, "16Gi", cache=True, data=True, gpus=True)),
    Stage("train", ("base", "extract", "train", "finetune"),
          "train the variants (heads on pooled features; top and block experts on the cached trunk) into models/",
          Resources(4, "32Gi", retries=1, data=True, gpus=True)),  # fine-tuning reads images
    Stage("evaluate", ("base", "train", "finetune", "evaluate", "register"),
          "every variant x OOD score x OOD set into reports/",
          Resources(4, "16Gi")),
    Stage("register", ("base", "prepare", "extract", "train", "finetune", "evaluate", "register", "serve"),
          "log the run to MLflow and register the model behind the promotion gate",
          Resources(1, "4Gi", storage=True)),  # same content again = same model version
)


def names() -> list[str]:
    return [s.name for s in STAGES]


def get(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ParamError(f"stage {name!r} is not one of {', '.join(names())}")


def sections() -> tuple[str, ...]:
    """Every params section a stage reads, in pipeline order (`base` first)."""
    out: list[str] = []
    for stage in STAGES:
        out += [s for s in stage.sections if s not in out]
    return tuple(out)


# ---------------------------------------------------------------- the kfp section

@dataclass(frozen=True)
class Kfp:
    """The `kfp` section: where and how the cluster runs the steps, not what they compute."""

    image: str                      # no tag: the checkout's commit is added (pipeline.with_tag)
    pipeline_root: str
    fashion_mnist: str | None       # None: s3://$S3_BUCKET/raw/fashion-mnist (mofe push-raw)
    gpu_node_selector: dict
    gpu_tolerations: list
    data_pvc: str | None
    data_mount: str
    train_timeout: int
    backend: str                    # the oldest KFP backend the IR must run on (kfpipe/backends.py)
    mlflow_auth_secret: str | None  # Secret with MLFLOW_TRACKING_USERNAME / _PASSWORD (MLflow basic auth)
    image_pull_secret: str | None   # a Secret every step pulls the image with
    image_pull_policy: str | None   # Always | IfNotPresent | Never

    def __post_init__(self):
        for key in ("image", "pipeline_root", "data_mount"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ParamError(f"kfp.{key}: {getattr(self, key)!r} must be a non-empty string")
        check_number("kfp.train_timeout", self.train_timeout, low=1, integer=True)
        if not (isinstance(self.backend, str) and re.fullmatch(r"\d+\.\d+\.\d+", self.backend)
                and version(self.backend) >= version(OLDEST_KFP_BACKEND)):
            raise ParamError(f"kfp.backend: {self.backend!r} must be a KFP backend version MAJOR.MINOR.PATCH, "
                             f"{OLDEST_KFP_BACKEND} (Kubeflow 1.9) or newer")
        if self.mlflow_auth_secret is not None and not (isinstance(self.mlflow_auth_secret, str)
                                                        and self.mlflow_auth_secret):
            raise ParamError(f"kfp.mlflow_auth_secret: {self.mlflow_auth_secret!r} must be a Secret's name or null")
        if self.image_pull_secret is not None and not (isinstance(self.image_pull_secret, str)
                                                       and self.image_pull_secret):
            raise ParamError(f"kfp.image_pull_secret: {self.image_pull_secret!r} must be a Secret's name or null")
        if self.image_pull_policy not in (None, "Always", "IfNotPresent", "Never"):
            raise ParamError(f"kfp.image_pull_policy: {self.image_pull_policy!r} must be one of Always, "
                             "IfNotPresent, Never or null")
        if not isinstance(self.gpu_node_selector, dict):
            raise ParamError(f"kfp.gpu_node_selector: {self.gpu_node_selector!r} must be a mapping")
        if not isinstance(self.gpu_tolerations, list) or not all(isinstance(t, dict) for t in self.gpu_tolerations):
            raise ParamError(f"kfp.gpu_tolerations: {self.gpu_tolerations!r} must be a list of "
                             "{key, operator, value, effect}")


def kfp_config(params: Mapping[str, Any]) -> Kfp:
    return section(Kfp, params.get("kfp"), "kfp")
