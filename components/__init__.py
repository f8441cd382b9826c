"""Kubeflow Pipelines components: one thin typed wrapper per stage of `mofe_ood`.

A component maps KFP artifacts to folders (an artifact's `.path` is the stage's
directory) and calls the stage's `run`, the same function `dvc repro` calls, so
the two orchestrators cannot drift.

Params travel as one JSON text per params.yaml section, and each component
takes the sections its stage reads (the stage table's, as dvc.yaml lists them), so KFP
caches a step on exactly those; where a stage reads single keys of a section
(`Stage.partial`), it takes `section__key` instead. No step rewrites a param: GPU
counts stay in their sections, and what only a pod knows (the image, the run id, the
raw data's location) comes as env. Not `dict` parameters: KFP's SDK rejects null values in
them (params.yaml has many) and its local runner turns every int into a float
(64 -> 64.0), which the cluster does not; JSON keeps the values as written.

KFP ships each function's source alone into the container, so bodies import
what they use and the helpers below travel as `additional_funcs`. The image
holds mofe_ood and kfp: nothing is pip-installed when a step starts (the local
SubprocessRunner installs nothing either). pipeline.py sets each task's image.
"""

from kfp import dsl

# A repository without a tag: pipeline.py tags it with the commit (infra/image.sh tag).
DEFAULT_IMAGE = "mofe-ood"


def sections(**texts: str) -> dict:
    """The params dict a stage's `run` takes, from its sections' JSON texts (`section__key`: that
    one key of the section)."""
    import json

    params: dict = {}
    for name, text in texts.items():
        section, _, key = name.partition("__")
        if key:
            params.setdefault(section, {})[key] = json.loads(text)
        else:
            params[section] = {**json.loads(text), **params.get(section, {})}
    return params


def log_metrics(metrics, values, prefix: str = "") -> None:
    """Log every number of a nested dict to a KFP Metrics artifact as `a/b/c` (None skipped)."""
    for key, value in (values or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            log_metrics(metrics, value, name + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(name, float(value))


def component(func):
    """`dsl.component` for this project: the project image, no run-time pip installs."""
    return dsl.component(func, base_image=DEFAULT_IMAGE, packages_to_install=[],
                         install_kfp_package=False, additional_funcs=[sections, log_metrics])
