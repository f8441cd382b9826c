"""What a person reads of an evaluation (written by the evaluate stage, read by nobody's choice):
results.md's table, the ROC/histogram plots and DVC's ROC rows, the page the Kubeflow UI shows
(`plots_html`), the dashboard numbers of its Metrics artifact (`dashboard`) and the few lines
`mofe evaluate` prints (`summary`). The numbers themselves come from mofe_ood.evaluate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mofe_ood.headline import numbers
from mofe_ood.params import ParamError
from mofe_ood.splits import GROUPS, ID_SPLITS


def seeds_table(seeds: dict) -> str:
    """results.md's section on seeds: mean ± sd (%) over base.seed and train.seeds."""
    if not seeds:
        return ""
    keys = list(next(iter(seeds.values()))["mean"])
    lines = ["", "## Seeds (mean ± sd over base.seed and train.seeds, test parts; val = the objective)", "",
             "| variant | score | seeds | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for variant, s in seeds.items():
        cells = [f"{100 * s['mean'][k]:.1f} ± {100 * s['sd'][k]:.1f}" for k in keys]
        lines.append(f"| {variant} | {s['score']} | {len(s['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def dashboard(all_metrics: dict, val_metrics: dict, thresholds: dict, variant: str) -> dict[str, float | str]:
    """What a dashboard shows (flat keys): `variant` at its default score, and the best other
    (variant, score) on validation (`evaluate.selection`'s objective in metrics_val.json, as
    every other choice), each with its test numbers (headline.numbers). Picking the baseline
    by its test AUROC would report a winner's-curse number."""
    if variant not in thresholds:
        raise ParamError(f"{variant!r} was not evaluated (evaluated: {', '.join(thresholds)})")
    out: dict[str, float | str] = {f"{variant}/{k}": v for k, v in
                                   numbers(all_metrics[variant], thresholds[variant]["score"]).items()}
    others = [(v, s) for v, entry in val_metrics.items() if v != variant and v in all_metrics
              for s, m in entry.items() if isinstance(m, dict) and m.get("selection") is not None]
    if others:
        v, s = max(others, key=lambda vs: val_metrics[vs[0]][vs[1]]["selection"])
        out.update({f"best_baseline/{k}": x for k, x in numbers(all_metrics[v], s).items()})
        out["best_baseline/name"] = f"{v}/{s}"
    return out


def summary(all_metrics: dict, params: dict, reports_dir: str | Path = "reports") -> str:
    """What `mofe evaluate` prints: each variant at its default score (thresholds.json: chosen on
    validation), on the test parts, in % (every score and OOD set: reports/results.md; every
    number: reports/metrics.json)."""
    thresholds = json.loads((Path(reports_dir) / "thresholds.json").read_text())
    lines = [f"{'variant':<18} {'score':<15} {'ID acc':>6} {'near AUROC':>10} {'near FPR95':>10} "
             f"{'far AUROC':>9} {'far FPR95':>9}"]
    for variant, entry in all_metrics.items():
        score = thresholds[variant]["score"]
        cells = [entry.get("id_accuracy"), *((entry[score].get(g) or {}).get(k)
                                             for g in GROUPS for k in ("auroc", "fpr95"))]
        text = [("-" if v is None else f"{100 * v:.1f}").rjust(w) for v, w in zip(cells, (6, 10, 10, 9, 9))]
        lines.append(f"{variant:<18} {score:<15} " + " ".join(text))
    return "\n".join(lines + ["all scores and OOD sets: reports/results.md"])


def pooled_roc(reports_dir: str | Path, variant: str) -> dict[str, list[float]]:
    """ROC of `variant`'s default score, ID test against every OOD set pooled (ID positive)."""
    reports_dir = Path(reports_dir)
    score = json.loads((reports_dir / "thresholds.json").read_text())[variant]["score"]
    with np.load(reports_dir / "scores" / f"{variant}__{score}.npz") as f:
        values = dict(f)
    ood = np.concatenate([v for name, v in values.items() if name not in ID_SPLITS])
    both = np.concatenate([values["test"], ood])
    cuts = np.unique(np.quantile(both, np.linspace(0, 1, 101)))[::-1]
    return {"fpr": [float((ood >= t).mean()) for t in cuts],
            "tpr": [float((values["test"] >= t).mean()) for t in cuts],
            "threshold": [float(t) for t in cuts]}


def plots_html(reports_dir: str | Path) -> str:
    """results.md's table and every plot in one self-contained page (images inline)."""
    import base64
    import html

    reports_dir = Path(reports_dir)
    parts = ["<html><head><meta charset='utf-8'><title>MoFE OOD evaluation</title>"
             "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}</style>"
             "</head><body>", markdown_html((reports_dir / "results.md").read_text())]
    for png in sorted((reports_dir / "plots").glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"<h3>{html.escape(png.stem)}</h3><img src='data:image/png;base64,{data}'/>")
    return "\n".join(parts + ["</body></html>"])


def markdown_html(text: str) -> str:
    """The Markdown that results_table writes (headings, paragraphs, pipe tables, **bold**) as HTML,
    so the KFP UI shows a table, not pipes (no Markdown package: this subset is all we write)."""
    import html
    import re

    def inline(s: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(s.strip()))

    out, table = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = line.strip().strip("|").split("|")
            if not all(set(c.strip()) <= set("-:") for c in cells):  # not the |---| rule
                table.append(cells)
            continue
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</table>")
            table = []
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            out.append(f"<h{level}>{inline(line.lstrip('#'))}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    return "\n".join(out)


def results_table(all_metrics: dict, info: dict, val_metrics: dict | None = None, thresholds: dict | None = None,
                  selection: dict | None = None) -> str:
    """Markdown: variants x scores on the test parts, near/far AUROC and FPR95 (%), every OOD set's
    AUROC, ID accuracy and the validation objective; best per column in bold; then which variant
    validation chose and why, and which sets are saturated."""
    val_metrics, thresholds = val_metrics or {}, thresholds or {}
    sets = [k for k in info["splits"] if info["splits"][k]["kind"] == "ood"]
    rows = []
    for variant, entry in all_metrics.items():
        for score, m in entry.items():
            if score == "id_accuracy":
                continue
            default = (thresholds.get(variant) or {}).get("score") == score
            rows.append([variant, score + (" *" if default else ""), entry["id_accuracy"],
                         m.get("near", {}).get("auroc"), m.get("near", {}).get("fpr95"),
                         m.get("far", {}).get("auroc"), m.get("far", {}).get("fpr95"),
                         *(m.get(s, {}).get("auroc") for s in sets),
                         (val_metrics.get(variant, {}).get(score) or {}).get("selection")])
    lower = {4, 6}
    best = {}
    for col in range(2, 8 + len(sets)):
        values = [r[col] for r in rows if r[col] is not None]
        if values:
            best[col] = min(values) if col in lower else max(values)
    lines = [
        f"# OOD detection results ({info['backbone']}, {info['image_size']} px)", "",
        "Test parts of the OOD sets. AUROC and FPR95 in %, ID is the positive class (FPR95 = OOD "
        "accepted at 95% ID TPR); far = the mean of the far sets, each shown beside it. `val` = the "
        "validation objective (mean of " + ", ".join(selection["selection"] if selection else ["-"]) +
        " on ID val against each OOD set's validation part), what every choice reads. "
        "* = the variant's default score. Best per column in bold.", "",
        "| variant | score | ID acc | near AUROC | near FPR95 | far AUROC | far FPR95 | "
        + "".join(f"{s} AUROC | " for s in sets) + "val |",
        "|---|---|---|---|---|---|---|" + "---|" * len(sets) + "---|",
    ]
    for r in rows:
        cells = []
        for col, value in enumerate(r[2:], start=2):
            text = "-" if value is None else f"{100 * value:.1f}"
            cells.append(f"**{text}**" if value is not None and np.isclose(value, best[col]) else text)
        lines.append(f"| {r[0]} | {r[1]} | " + " | ".join(cells) + " |")
    if selection and selection.get("variant"):
        others = sorted(((v, c["value"]) for v, c in selection["candidates"].items() if v != selection["variant"]),
                        key=lambda item: -item[1])
        lines += ["", "## Selection (validation only)", "",
                  f"`register.variant: auto` registers **{selection['variant']}** ({selection['score']}): "
                  f"its validation objective {100 * selection['value']:.1f} is the best of the trained "
                  "variants at their default scores"
                  + (" (" + ", ".join(f"{v} {100 * x:.1f}" for v, x in others) + ")" if others else "") + "."]
    saturated = [s for s in sets if all(
        (entry.get(t["score"]) or {}).get(s, {}).get("auroc", 0) >= 0.99
        for v, t in thresholds.items() for entry in [all_metrics[v]])]
    if saturated:
        lines += ["", f"Saturated (every variant's default score >= 99 AUROC): {', '.join(saturated)}; "
                  "the far average says little beyond the other far sets."]
    return "\n".join(lines) + "\n"


def roc_points(id_scores: np.ndarray, ood_scores: np.ndarray, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) with ID positive at `points` thresholds spread over the score quantiles."""
    both = np.concatenate([id_scores, ood_scores])
    thresholds = np.unique(np.quantile(both, np.linspace(0, 1, points)))[::-1]
    tpr = (id_scores[None, :] >= thresholds[:, None]).mean(1)
    fpr = (ood_scores[None, :] >= thresholds[:, None]).mean(1)
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, tpr, 1.0]


def plot_variant(variant: str, score: str, score_dir: Path, ood_sets: dict, plot_dir: Path) -> dict[str, list]:
    """Draw `variant`'s ROC curves and histograms; return each OOD set's ROC points (DVC plot rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with np.load(score_dir / f"{variant}__{score}.npz") as f:
        values = dict(f)
    fig, (roc_ax, hist_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    curves = {}
    bins = np.linspace(min(v.min() for v in values.values()), max(v.max() for v in values.values()), 60)
    hist_ax.hist(values["test"], bins=bins, density=True, alpha=0.5, label="ID test")
    for name, group in ood_sets.items():
        fpr, tpr = roc_points(values["test"], values[name])
        roc_ax.plot(fpr, tpr, label=f"{name} ({group})")
        hist_ax.hist(values[name], bins=bins, density=True, histtype="step", label=name)
        curves[name] = [{"fpr": round(float(a), 5), "tpr": round(float(b), 5)} for a, b in zip(fpr, tpr, strict=True)]
    roc_ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    roc_ax.set(xlabel="FPR (OOD accepted)", ylabel="TPR (ID accepted)", title=f"{variant} / {score}: ROC")
    hist_ax.set(xlabel=f"{score} score (higher = more ID)", ylabel="density", title="score histograms")
    roc_ax.legend(fontsize=8)
    hist_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_dir / f"{variant}__{score}.png", dpi=90)
    plt.close(fig)
    return curves
