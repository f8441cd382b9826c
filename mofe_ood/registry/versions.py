"""The registry read back: `mofe registry`, and model references checked before a download (ours).

`versions` lists the registered model's versions as register and `mofe promote` left them:
aliases, the gate's value and split, the decision and its reason (the version's tags), the
run and the git commit (the run's tags). MLflow's UI shows the same tags, but its alias and
"promote" buttons move `champion` without the gate: `mofe promote --version N` applies it.

`resolve` turns `models:/NAME@ALIAS` or `models:/NAME/VERSION` into the version it names, or
a UserError naming what exists (MLflow's own error is a page of traceback).
"""

from __future__ import annotations

import re

from mofe_ood.errors import UserError

# Versions registered before the gate read validation numbers carry no `gate_split` tag:
# their gate value came from metrics.json, i.e. the ID test split and the whole OOD sets.
DEFAULT_SPLIT = "test"
COLUMNS = ("version", "aliases", "variant", "score", "gate", "split", "decision", "run", "commit", "reason")
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")


def _not_found(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def model_names(client) -> list[str]:
    return sorted(m.name for m in client.search_registered_models())


def registered_model(client, name: str, where: str = ""):
    """The registered model `name`, or a UserError (after `where`) naming the models there are."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if not _not_found(err):
            raise
        names = model_names(client)
        raise UserError(f"{where}no registered model {name!r} in this registry (models: "
                        f"{', '.join(names) or 'none: run the register stage first'})") from None


def versions(client, name: str) -> list[dict]:
    """Every version of `name`, newest first, one flat record each (`mofe registry --json`)."""
    model = registered_model(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    rows, commits = [], {}
    for v in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version)):
        tags = v.tags or {}
        if v.run_id and v.run_id not in commits:
            commits[v.run_id] = client.get_run(v.run_id).data.tags.get("git_commit")
        rows.append({"version": int(v.version), "aliases": sorted(by_version.get(str(v.version), [])),
                     "variant": tags.get("variant"), "score": tags.get("score"),
                     "gate_metric": tags.get("gate_metric"), "gate_value": _number(tags.get("gate_value")),
                     "split": tags.get("gate_split") or DEFAULT_SPLIT, "decision": tags.get("decision"),
                     "reason": tags.get("reason"), "run_id": v.run_id, "git_commit": commits.get(v.run_id),
                     "dvc_experiment": tags.get("dvc_experiment")})
    return rows


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "None") else None
    except ValueError:
        return None


def table(name: str, rows: list[dict]) -> str:
    """`rows` as aligned text columns (the reason last: it is the long one)."""
    def cells(r: dict) -> list[str]:
        gate = f"{r['gate_metric']}={r['gate_value']:.4f}" if r["gate_value"] is not None else "-"
        return [str(r["version"]), ",".join(r["aliases"]) or "-", r["variant"] or "-", r["score"] or "-", gate,
                r["split"], r["decision"] or "-", (r["run_id"] or "-")[:12], (r["git_commit"] or "-")[:10],
                r["reason"] or "-"]

    lines = [list(COLUMNS), *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS) - 1)]
    text = [f"registered model {name}: {len(rows)} version(s)"]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines]
    return "\n".join(text) + "\n"


def resolve(client, uri: str) -> dict | None:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> {name, version, alias}; None for other URIs.

    A name, alias or version that is not there is a UserError naming what is.
    """
    from mlflow.exceptions import MlflowException

    match = _URI.match(uri)
    if not match:
        return None
    name, alias, version = match["name"], match["alias"], match["version"]
    model = registered_model(client, name, f"{uri}: ")
    aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
    if alias is not None:
        if alias not in aliases:
            there = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
            raise UserError(f"{uri}: model {name!r} has no alias {alias!r} (aliases: {there})")
        version = aliases[alias]
    try:
        client.get_model_version(name, str(version))
    except MlflowException as err:
        if not _not_found(err) and getattr(err, "error_code", "") != "INVALID_PARAMETER_VALUE":
            raise
        numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise UserError(f"{uri}: model {name!r} has no version {version!r} "
                        f"(versions: {', '.join(map(str, numbers)) or 'none'})") from None
    return {"name": name, "version": int(version), "alias": alias}
