"""Stage `register`: log the run to MLflow and register the method's model behind a promotion gate.

One registration = one MLflow run (params, metrics, plots, results.md, the DVC
hashes of data and models, the git commit) + one new version of the registered
model `register.model_name`, whose artifact is a `Detector` bundle served by the
pyfunc in serving/model.py. The version's tags say what it is (variant, dataset,
near/far AUROC and FPR95, gate metric) and what the gate decided.

Which variant: `register.variant` (a name), or `auto`: the trained variant evaluate chose
on validation (reports/selection.json). The gate reads that variant's validation metrics
(reports/metrics_val.json: ID val against each OOD set's validation part; recorded as
`gate_split: val`), never the test parts.

The gate: alias `champion` moves to the new version only if its gate metric
beats the champion's by more than `register.margin` and its ID accuracy is at
most `register.accuracy_tolerance` below the champion's; otherwise the version
gets alias `challenger` and the reason as a tag. Everything is decided before
the registry is written; the alias move comes last, and a failure before it
leaves the old champion in place. Registering the same content again (same
bundle, same metrics) reuses its version. `mofe promote` applies the same gate
to an existing version (or skips it with --force).

Tracking URI: $MLFLOW_TRACKING_URI, default an embedded `sqlite:///mlflow.db` in the
project root ($DVC_ROOT, which DVC sets for every stage and points at the project even
when `dvc exp run` works in a temporary copy; else the working directory) with artifacts
in `mlruns/` beside it.

DVC experiments (ours): a stage run by `dvc exp run` (DVC sets $DVC_EXP_NAME) registers
its model as `challenger` at best, never `champion`: a parameter sweep must not ship a
model. The version is tagged with the experiment's name; `mofe promote` is how a person
ships it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mofe_ood.config import section
from mofe_ood.errors import UserError
from mofe_ood.headline import numbers
from mofe_ood.params import ParamError, check_number
from mofe_ood.registry.gate import (CHALLENGER, CHAMPION, Candidate, Decision, candidate, decide, gate_metric,
                                    registered_variant)
from mofe_ood.registry.tracking import connect, experiment_id, shown, tracking_uri
from mofe_ood.serving import pyfunc
from mofe_ood.serving.bundle import from_pipeline, save, serve

log = logging.getLogger(__name__)


class PromotionRefused(UserError):
    """The gate says no; the message says why."""


# ---------------------------------------------------------------- params

@dataclass(frozen=True)
class Config:
    """The `register` section (params.yaml documents each key)."""

    variant: str
    model_name: str
    experiment: str
    gate_metric: str
    margin: float
    accuracy_tolerance: float

    def __post_init__(self):
        for key in ("variant", "model_name", "experiment"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ParamError(f"register.{key}: {getattr(self, key)!r} must be a non-empty string")
        gate_metric(self.gate_metric)
        check_number("register.margin", self.margin, low=0, high=1)
        check_number("register.accuracy_tolerance", self.accuracy_tolerance, low=0, high=1)


def config(params: dict) -> Config:
    serve(params)
    return section(Config, params.get("register"), "register")


# ---------------------------------------------------------------- what gets logged

def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:  # no checkout (a container): the commit its image was built from
        baked = os.environ.get("MOFE_GIT_COMMIT")
        if baked and baked != "unknown":
            return {"git_commit": baked.removesuffix("-dirty"), "git_dirty": str(baked.endswith("-dirty")).lower()}
        return {"git_commit": "unknown"}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}


def dvc_hashes(lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """`dvc.<path>` -> content hash of every stage output recorded in dvc.lock."""
    import yaml

    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return {"dvc.lock": "absent"}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    out = {}
    for stage in (lock.get("stages") or {}).values():
        for entry in stage.get("outs") or []:
            digest = entry.get("md5") or entry.get("etag") or entry.get("hash")
            if entry.get("path") and digest:
                out[f"dvc.{entry['path']}"] = str(digest)
    return out


def benchmark_id(info: dict) -> str:
    """Which data the metrics were measured on: a digest of the classes and the splits."""
    blob = json.dumps({"classes": info["classes"], "splits": info["splits"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def content_hash(bundle_dir: Path, entry: dict, variant: str) -> str:
    digest = hashlib.sha256(f"{variant}\n{json.dumps(entry, sort_keys=True)}\n".encode())
    for f in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(bundle_dir).as_posix()}\n".encode())
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


# ---------------------------------------------------------------- the gate

def gate(new: Candidate, champion_version: str | None, champion: Candidate | None, p: dict) -> Decision:
    """`decide`, except that a DVC experiment's model never takes `champion` (see module doc)."""
    decision = decide(new, champion_version, champion, p.margin, p.accuracy_tolerance)
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment and decision.alias == CHAMPION:
        return Decision(CHALLENGER, f"DVC experiment {experiment!r} registers as challenger only (the gate "
                        f"said: {decision.reason}); promote it with `mofe promote`", champion_version)
    return decision


def current_champion(client, name: str) -> tuple[str | None, Candidate | None]:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None, None
        raise
    return str(version.version), Candidate.from_tags(version.tags)


def apply(client, name: str, version: str, decision: Decision, how: str) -> None:
    """The registry writes of a decision: tags first, the alias move last."""
    client.set_model_version_tag(name, version, "decision", decision.alias)
    client.set_model_version_tag(name, version, "reason", f"{how}: {decision.reason}")
    client.set_registered_model_alias(name, decision.alias, version)
    if decision.alias == CHAMPION:
        aliases = client.get_registered_model(name).aliases
        if str(aliases.get(CHALLENGER)) == str(version):
            client.delete_registered_model_alias(name, CHALLENGER)
    client.set_model_version_tag(name, version, "registration", "done")


# ---------------------------------------------------------------- stage

def run(params: dict, models_dir: str | Path = "models", reports_dir: str | Path = "reports",
        features_dir: str | Path = "data/features", out: str | Path | None = None,
        lineage: dict[str, str] | None = None, candidate_out: str | Path | None = None) -> dict:
    """Register `register.variant`; writes and returns {version, alias, reason, ...} (registration.json).

    Also writes `candidate_out` (default reports/candidate.json): what was registered (variant,
    score, gate value), without anything that depends on the registry (no version, run id or
    alias), so its bytes are the same on every machine. It is the stage's DVC output: a fresh
    clone lacks it, so its first `dvc repro` registers (a stage without outputs whose deps
    match dvc.lock is skipped), and a second one, finding it unchanged, adds no version.
    Written last: a failed registration leaves none, and the next `dvc repro` tries again.

    `lineage`: where the inputs came from when no dvc.lock says it (a Kubeflow run: its id,
    the input artifacts' URIs, the image); tagged on the MLflow run instead of the DVC hashes.
    """
    p = config(params)
    models_dir, reports_dir, features_dir = Path(models_dir), Path(reports_dir), Path(features_dir)
    out = Path(out) if out is not None else reports_dir / "registration.json"
    candidate_out = Path(candidate_out) if candidate_out is not None else reports_dir / "candidate.json"
    variant = registered_variant(p.variant, reports_dir)
    metrics_all = _read_json(reports_dir / "metrics.json")
    metrics_val = _read_json(reports_dir / "metrics_val.json")
    thresholds = _read_json(reports_dir / "thresholds.json")
    info = _read_json(features_dir / "info.json")
    if variant not in metrics_all or variant not in thresholds:
        raise ParamError(f"register.variant: {variant!r} was not evaluated (reports/metrics.json has "
                         f"{', '.join(metrics_all) or 'nothing'})")
    entry, score = metrics_all[variant], thresholds[variant]["score"]
    # The gate reads validation metrics only: the registered number carries no winner's curse.
    new = candidate(variant, metrics_val.get(variant, {}), score, p.gate_metric, benchmark_id(info), "val")

    uri = tracking_uri()
    client = connect(uri)  # fails here, before any work or write, when the server is down
    with tempfile.TemporaryDirectory(prefix="mofe-register-") as tmp:
        limits = serve(params)
        detector = from_pipeline(variant, models_dir, features_dir, reports_dir, params,
                                 max_pixels=limits.max_pixels, max_rows=limits.max_rows)
        bundle = save(detector, Path(tmp) / "detector", limits.runtime)
        digest = content_hash(bundle, entry, variant)
        result = _register(client, uri, p, params, new, entry, info, bundle, digest, reports_dir,
                           lineage)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    # From params and metrics.json alone: the bundle's content hash is left out, as its bank's
    # float bits can change with the thread count (registration.json has it, and the version).
    registered = {"model_name": p.model_name, **asdict(new)}
    candidate_out.parent.mkdir(parents=True, exist_ok=True)
    candidate_out.write_text(json.dumps(registered, indent=2) + "\n")
    return result


def _register(client, uri, p, params, new: Candidate, entry, info, bundle: Path, digest: str,
              reports_dir: Path, lineage: dict[str, str] | None = None) -> dict:
    import mlflow

    name = p.model_name
    summary = {"model_name": name, "tracking_uri": shown(uri), "variant": new.variant,
               "content_hash": digest, "gate_metric": new.gate_metric, "gate_split": new.gate_split,
               "gate_value": new.gate_value}
    existing = _version_with_hash(client, name, digest)
    if existing is not None and existing.tags.get("registration") == "done":
        aliases = [a for a, v in client.get_registered_model(name).aliases.items()
                   if str(v) == str(existing.version)]
        return {**summary, "version": int(existing.version), "alias": ",".join(sorted(aliases)) or None,
                "run_id": existing.run_id, "new_version": False,
                "reason": f"already registered as version {existing.version} (same bundle and metrics)"}

    champion_version, champion = current_champion(client, name)
    if existing is not None:  # an earlier registration stopped before its alias move: finish it
        decision = (Decision(CHAMPION, "already the champion", champion_version)
                    if champion_version == str(existing.version) else gate(new, champion_version, champion, p))
        apply(client, name, existing.version, decision, "gate")
        return {**summary, "version": int(existing.version), "alias": decision.alias,
                "run_id": existing.run_id, "new_version": False, "reason": decision.reason,
                "previous_champion": champion_version}

    decision = gate(new, champion_version, champion, p)
    experiment = experiment_id(client, p.experiment, uri)
    with mlflow.start_run(experiment_id=experiment, run_name=f"{new.variant}-{digest[:8]}") as run:
        _log_run(params, entry, info, reports_dir, new, lineage)
        model_info = pyfunc.log_model(bundle)
    tags = _version_tags(new, entry, info, digest, decision, params)
    version = mlflow.register_model(model_info.model_uri, name, tags=tags, await_registration_for=60)
    try:
        apply(client, name, version.version, decision, "gate")
    except Exception:
        # Leave the registry as it was: no version without its alias; the old champion stays.
        try:
            client.delete_model_version(name, version.version)
        except Exception:  # the "pending" tag lets the next registration finish the job
            log.warning("could not remove version %s after a failed alias move", version.version)
        raise
    log.info("registered %s version %s as %s: %s", name, version.version, decision.alias, decision.reason)
    return {**summary, "version": int(version.version), "alias": decision.alias, "run_id": run.info.run_id,
            "new_version": True, "reason": decision.reason, "previous_champion": champion_version}


def _version_with_hash(client, name: str, digest: str):
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.content_hash = '{digest}'")
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


def _log_run(params: dict, entry: dict, info: dict, reports_dir: Path, new: Candidate,
             lineage: dict[str, str] | None = None) -> None:
    import mlflow

    flat = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flatten(params).items()}
    mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})
    metrics_all = _read_json(reports_dir / "metrics.json")
    mlflow.log_metrics({_metric_key(k): float(v) for k, v in flatten(metrics_all).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
    mlflow.log_metrics(numbers(entry, new.score))  # the test parts' (headline.json's); the gate read validation's
    where = {k: v for k, v in (lineage or {}).items() if v} or dvc_hashes()
    mlflow.set_tags({**git_state(), **where, "variant": new.variant, "score": new.score,
                     "backbone": info["backbone"], "image_size": str(info["image_size"])})
    for f in ("results.md", "metrics.json", "metrics_val.json", "selection.json", "thresholds.json"):
        if (reports_dir / f).is_file():
            mlflow.log_artifact(str(reports_dir / f), "reports")
    if (reports_dir / "plots").is_dir():
        mlflow.log_artifacts(str(reports_dir / "plots"), "reports/plots")


def _metric_key(name: str) -> str:
    """MLflow accepts letters, digits and `_-. /` in metric names; OOD set names come from users."""
    return re.sub(r"[^\w\-. /]", "_", name)


def _version_tags(new: Candidate, entry: dict, info: dict, digest: str, decision: Decision,
                  params: dict) -> dict[str, str]:
    source = ((params.get("prepare") or {}).get("id") or {}).get("source", "?")
    tags = {"variant": new.variant, "score": new.score, "dataset": f"{source} ({len(info['classes'])} classes)",
            "benchmark": new.benchmark, "backbone": info["backbone"], "gate_metric": new.gate_metric,
            "gate_split": new.gate_split, "gate_value": repr(new.gate_value), "id_accuracy": repr(new.id_accuracy),
            "content_hash": digest, "registration": "pending", "decision": decision.alias,
            "reason": f"gate: {decision.reason}"}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    for key, value in numbers(entry, new.score).items():  # the test parts' numbers: shown, not gated on
        tags[key if key != "id_accuracy" else "test_id_accuracy"] = f"{value:.6f}"
    return tags


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the stages before register (dvc repro)")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- promote

def promote(params: dict, version: int | str, force: bool = False) -> dict:
    """Move `champion` to `version` if the gate allows it (always with force)."""
    from mlflow.exceptions import MlflowException

    p = config(params)
    name = p.model_name
    client = connect(must_exist=True)
    try:
        target = client.get_model_version(name, str(version))
    except MlflowException as err:
        raise ParamError(f"registered model {name!r} has no version {version} ({err.message})") from None
    champion_version, champion = current_champion(client, name)
    if champion_version == str(target.version):
        return {"model_name": name, "version": int(target.version), "alias": CHAMPION,
                "reason": "already the champion", "previous_champion": champion_version}
    decision = decide(Candidate.from_tags(target.tags), champion_version, champion, p.margin,
                      p.accuracy_tolerance)
    if force:
        decision = Decision(CHAMPION, f"forced by mofe promote (the gate said: {decision.reason})",
                            champion_version)
    elif decision.alias != CHAMPION:
        raise PromotionRefused(f"version {target.version} not promoted: {decision.reason} "
                               "(--force promotes anyway)")
    apply(client, name, target.version, decision, "promote")
    return {"model_name": name, "version": int(target.version), "alias": CHAMPION,
            "reason": decision.reason, "previous_champion": champion_version}
