"""`reports/headline.json`: the few numbers DVC compares between commits and experiments (ours).

metrics.json holds every variant x score x OOD set x metric (~1,000 numbers): as DVC's
metrics that made `dvc exp show` 1,099 columns wide. DVC's metrics are this file instead
(`cache: false` and committed to git, as DVC's example projects do, so `dvc metrics diff
main` and `dvc exp show` read any commit's numbers); metrics.json stays an output.

Layout, every leaf a number (stable keys: a column of `dvc exp show` means the same thing
in every row, whichever score won):
    {"registered": N, "<variant>": N, ...}
    N = {near_auroc, near_fpr95, <set>_auroc, <set>_fpr95 for SETS, far_auroc, far_fpr95, id_accuracy}
`registered` is `register.variant` (with `auto`, the variant evaluate chose on validation) at
its default score (what `mofe register` would ship); each variant's entry is at its default
score, chosen on validation too (thresholds.json): never the best score on test data, which
would report a winner's-curse number. Which score that is, is in results.md and
thresholds.json (a string here would be one more column per variant).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

FILE = "headline.json"
METRICS = ("auroc", "fpr95")
# OOD sets reported on their own besides the near/far averages, when evaluated: MNIST is the
# far set the benchmark tables quote (docs/benchmark) and the one where trained heads lose most.
SETS = ("mnist",)
GROUPS = ("near", "far")


def numbers(entry: Mapping, score: str) -> dict[str, float]:
    """One variant's headline at `score`: near, SETS and far AUROC / FPR95, ID accuracy (if any)."""
    m = entry[score]
    out = {f"{name}_{k}": m[name][k] for name in (GROUPS[0], *SETS, *GROUPS[1:]) if name in m for k in METRICS}
    if entry.get("id_accuracy") is not None:
        out["id_accuracy"] = entry["id_accuracy"]
    return out


def content(all_metrics: Mapping, thresholds: Mapping, registered: str | None) -> dict:
    """metrics.json + thresholds.json -> headline.json's content (see the module docstring).

    `registered` is left out when it was not evaluated: register then stops with that error.
    """
    out = {}
    if registered in thresholds and registered in all_metrics:
        out["registered"] = numbers(all_metrics[registered], thresholds[registered]["score"])
    for variant, entry in all_metrics.items():
        out[variant] = numbers(entry, thresholds[variant]["score"])
    return out


def write(path: str | Path, all_metrics: Mapping, thresholds: Mapping, registered: str | None) -> dict:
    written = content(all_metrics, thresholds, registered)
    Path(path).write_text(json.dumps(written, indent=2) + "\n")
    return written
