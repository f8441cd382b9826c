"""The promotion gate, pure: decide from a candidate and the champion, no registry calls.

A new model takes `champion` only when it beats the champion's gate metric (same
benchmark, same score and metric, read on the OOD validation parts: never on test
data) by more than `margin` without losing more than `accuracy_tolerance` of ID
accuracy; otherwise it becomes `challenger`, with the reason spelled out.
register.py applies the decision; `mofe promote` asks it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mofe_ood.metrics import METRIC_KEYS
from mofe_ood.params import ParamError

CHAMPION, CHALLENGER = "champion", "challenger"
AUTO = "auto"  # register.variant: the best trained variant on validation (evaluate's reports/selection.json)


def registered_variant(variant: str, reports_dir: str | Path) -> str:
    """`register.variant`, or with `auto` the variant evaluate chose on validation (selection.json)."""
    if variant != AUTO:
        return variant
    path = Path(reports_dir) / "selection.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run evaluate before register (dvc repro)")
    chosen = json.loads(path.read_text()).get("variant")
    if not chosen:
        raise ParamError("register.variant: auto, but evaluate chose no variant on validation (no trained "
                         "variant with validation metrics: prepare.ood_split.val_fraction > 0 and a trained "
                         "variant in evaluate.variants); name one instead")
    return chosen
LOWER_IS_BETTER = {"fpr95", "fpr95_openood"}


def gate_metric(name: str) -> tuple[str, str]:
    """`near.auroc` -> ("near", "auroc"); `id_accuracy` -> ("id_accuracy", "")."""
    if name == "id_accuracy":
        return name, ""
    group, _, metric = str(name).partition(".")
    if not group or metric not in METRIC_KEYS:
        raise ParamError(f"register.gate_metric: {name!r} is not 'id_accuracy' or <near|far|set>.<metric> "
                         f"with metric {', '.join(METRIC_KEYS)}")
    return group, metric


@dataclass
class Candidate:
    """What the gate compares: read from metrics.json for a new model, from tags for a version."""

    variant: str
    score: str
    gate_metric: str
    gate_value: float
    id_accuracy: float | None
    benchmark: str
    gate_split: str = "val"  # whose metrics: "val" (OOD validation parts); versions from before: "test"

    @classmethod
    def from_tags(cls, tags: dict) -> "Candidate":
        acc = tags.get("id_accuracy")
        return cls(tags.get("variant", "?"), tags.get("score", "?"), tags.get("gate_metric", "?"),
                   float(tags.get("gate_value", "nan")), None if acc in (None, "", "None") else float(acc),
                   tags.get("benchmark", "?"), tags.get("gate_split", "test"))


def candidate(variant: str, entry: dict, score: str, metric_name: str, benchmark: str,
              split: str = "val") -> Candidate:
    """The gate's view of `variant` from `entry`: its metrics_val.json entry (split "val")."""
    group, metric = gate_metric(metric_name)
    if metric_name == "id_accuracy":
        value = entry.get("id_accuracy")
    else:
        value = ((entry.get(score) or {}).get(group) or {}).get(metric)
    if value is None:
        raise ParamError(f"register.gate_metric: reports/metrics_{split}.json has no {metric_name} for "
                         f"{variant}/{score} (validation metrics need prepare.ood_split.val_fraction > 0)")
    return Candidate(variant, score, metric_name, float(value), entry.get("id_accuracy"), benchmark, split)


@dataclass
class Decision:
    alias: str
    reason: str
    champion: str | None  # the version holding `champion` when the decision was made


def decide(new: Candidate, champion_version: str | None, champion: Candidate | None, margin: float,
           accuracy_tolerance: float) -> Decision:
    if champion is None:
        return Decision(CHAMPION, "first registration: no champion yet", None)
    v = f"champion v{champion_version}"
    if champion.benchmark != new.benchmark:
        return Decision(CHALLENGER, f"{v} was evaluated on other data (benchmark {champion.benchmark}, "
                        f"this one {new.benchmark}); not comparable, promote by hand", champion_version)
    if champion.gate_split != new.gate_split:
        return Decision(CHALLENGER, f"{v} was gated on its {champion.gate_split} metrics, this one on "
                        f"{new.gate_split}; not comparable, promote by hand", champion_version)
    if (champion.gate_metric, champion.score) != (new.gate_metric, new.score):
        return Decision(CHALLENGER, f"{v} was gated on {champion.score} {champion.gate_metric}, this one "
                        f"on {new.score} {new.gate_metric}; not comparable, promote by hand", champion_version)
    sign = -1.0 if new.gate_metric.rpartition(".")[2] in LOWER_IS_BETTER else 1.0
    gain = sign * (new.gate_value - champion.gate_value)
    what = f"{new.gate_metric} {new.gate_value:.4f} vs {v}'s {champion.gate_value:.4f}"
    if not gain > margin:
        return Decision(CHALLENGER, f"{what}: gain {gain:+.4f} is not above the margin {margin}",
                        champion_version)
    if new.id_accuracy is not None and champion.id_accuracy is not None:
        drop = champion.id_accuracy - new.id_accuracy
        if drop > accuracy_tolerance:
            return Decision(CHALLENGER, f"{what} is better, but ID accuracy {new.id_accuracy:.4f} is "
                            f"{drop:.4f} below the champion's {champion.id_accuracy:.4f} (tolerance "
                            f"{accuracy_tolerance})", champion_version)
    return Decision(CHAMPION, f"{what}: gain {gain:+.4f} above the margin {margin}", champion_version)
