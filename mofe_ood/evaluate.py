"""Stage `evaluate`: every variant x every applicable OOD score x every OOD set.

Outputs under `reports/` (their layout is part of the interface):
- `metrics.json`: {variant: {"id_accuracy": float | null, score: {"near": M, "far": M, <set>: M}}}
  with M = {auroc, fpr95, fpr95_openood, aupr_in, aupr_out}, fractions in [0, 1];
- `scores/<variant>__<score>.npz`: per-sample scores (higher = more ID), one array
  per set (`test` = ID test, then each OOD set);
- `headline.json`: the few numbers DVC's metrics are (mofe_ood.headline);
- `results.md`: the table a person reads first;
- `thresholds.json`: per variant, its default score's hyper-parameters and the
  decision threshold accepting `tpr` of ID validation samples (for inference);
- `roc/<variant>__<OOD set>.json` (DVC plot data: one file per curve, so `dvc plots show`
  draws each as its own line) and `plots/*.png`: ROC curves and score histograms.
Score hyper-parameters (KNN's K, ViM's dim: each score's `tuned`, candidates in this
section of params.yaml) are chosen on ID data only (mofe_ood.tuning).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from mofe_ood import atomic, metrics, scores, tuning
from mofe_ood.config import section
from mofe_ood.headline import FILE as HEADLINE_FILE
from mofe_ood.headline import write as write_headline
from mofe_ood.params import ParamError, check_choice, check_number
from mofe_ood.splits import GROUPS, DataError
from mofe_ood.training.heads import FROZEN, Outputs, trained_variants, variant_outputs

ID_SPLITS = ("train", "val", "test")
# as dvc.yaml lists them
OUTPUTS = ("metrics.json", HEADLINE_FILE, "thresholds.json", "roc", "results.md", "scores", "plots")


def applicable(score_names: list[str], has_logits: bool) -> list[str]:
    return [s for s in score_names
            if has_logits or not (scores.SCORES[s].needs_logits or scores.SCORES[s].needs_head)]


def evaluate_variant(variant: str, outputs: dict[str, Outputs], head, ood_sets: dict[str, str],
                     cfg: "Evaluate", score_dir: Path) -> tuple[dict, dict]:
    """metrics.json entry of one variant, and the calibration of each of its scores."""
    train, val, test = (outputs[s] for s in ID_SPLITS)
    entry: dict = {"id_accuracy": None if test.logits is None else metrics.accuracy(test.logits, test.labels)}
    calibration = {}
    for name in applicable(cfg.scores, test.logits is not None):
        candidates = cfg.candidates(name)
        hyper, _ = tuning.select_hyper(name, candidates, train.features, train.labels, val.features,
                                       val.labels, train_logits=train.logits, val_logits=val.logits,
                                       head=head) if len(candidates) > 1 else (candidates[0], None)
        score = scores.make_score(name, **hyper).fit(train.features, train.labels, train.logits, head)
        per_set = {s: score.score(outputs[s].features, outputs[s].logits) for s in ["val", "test", *ood_sets]}
        np.savez(score_dir / f"{variant}__{name}.npz", **{s: v for s, v in per_set.items() if s != "val"})
        result = {s: metrics.ood_metrics(per_set["test"], per_set[s], name=s) for s in ood_sets}
        for group in GROUPS:
            members = [result[s] for s, g in ood_sets.items() if g == group]
            if members:
                result[group] = metrics.average(members)
        entry[name] = {k: result[k] for k in [*(g for g in GROUPS if g in result), *ood_sets]}
        calibration[name] = {"hyper": hyper, "tpr": cfg.tpr,
                             "threshold": metrics.threshold_at_tpr(per_set["val"], cfg.tpr)}
    return entry, calibration


@dataclass(frozen=True)
class Evaluate:
    """The `evaluate` section. `config` adds one field per candidate list the registered scores
    declare (`knn_k`, `vim_dim`: OODScore.tuned), so a new tuned score needs no edit here."""

    variants: list[str]
    scores: list[str]
    default_score: str
    tpr: float
    extra_ood: dict  # read (and checked) by prepare

    def __post_init__(self):
        for name in ("variants", "scores"):
            if not isinstance(getattr(self, name), list) or not getattr(self, name):
                raise ParamError(f"evaluate.{name}: {getattr(self, name)!r} is not a non-empty list")
        for s in self.scores:
            check_choice("evaluate.scores", s, scores.SCORES)
        check_choice("evaluate.default_score", self.default_score, self.scores)
        check_number("evaluate.tpr", self.tpr, low=0.5, high=0.999)
        for key, tuned in scores.tuned_keys().items():
            tuned.check(getattr(self, key))

    def candidates(self, score: str) -> list[dict]:
        """The keyword sets score `score` is tuned over ([{}] for an untuned score)."""
        return tuning.candidates(score, {key: getattr(self, key) for key in scores.tuned_keys()})


def config(params: Mapping) -> Evaluate:
    """The `evaluate` section, checked: every value, and each variant against what train makes."""
    fields = [(key, list) for key in scores.tuned_keys()]
    schema = dataclasses.make_dataclass("Evaluate", fields, bases=(Evaluate,), frozen=True)
    cfg = section(schema, params.get("evaluate"), "evaluate")
    for v in cfg.variants:
        check_choice("evaluate.variants", v, [FROZEN, *trained_variants(params)])
    return cfg


def run(params: dict, features_dir: str | Path = "data/features", models_dir: str | Path = "models",
        reports_dir: str | Path = "reports") -> dict:
    """Evaluate everything into a fresh folder, then replace our outputs in `reports_dir` in one move.

    Only OUTPUTS are replaced: reports/ also holds the register stage's registration.json.
    """
    features_dir, models_dir = Path(features_dir), Path(models_dir)
    cfg = config(params)
    info = json.loads((features_dir / "info.json").read_text())
    ood_sets = {n: s["group"] for n, s in info["splits"].items() if s["kind"] == "ood"}
    if not ood_sets:
        raise DataError(f"{features_dir}/info.json lists no OOD sets")
    for name in ood_sets:
        if info["splits"][name]["count"] == 0:
            raise DataError(f"OOD set {name!r} is empty")

    with atomic.replacing(reports_dir, items=OUTPUTS) as tmp:
        for folder in ("scores", "plots", "roc"):
            (tmp / folder).mkdir()
        all_metrics, thresholds = {}, {}
        for variant in cfg.variants:
            outputs, head = variant_outputs(variant, features_dir, models_dir, [*ID_SPLITS, *ood_sets])
            entry, calibration = evaluate_variant(variant, outputs, head, ood_sets, cfg, tmp / "scores")
            all_metrics[variant] = entry
            default = cfg.default_score if cfg.default_score in calibration else next(iter(calibration))
            thresholds[variant] = {"score": default, **calibration[default]}
            for name, curve in plot_variant(variant, default, tmp / "scores", ood_sets, tmp / "plots").items():
                (tmp / "roc" / f"{variant}__{name}.json").write_text(json.dumps(curve) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(all_metrics, indent=2) + "\n")
        (tmp / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
        write_headline(tmp / HEADLINE_FILE, all_metrics, thresholds, params)
        (tmp / "results.md").write_text(results_table(all_metrics, info))
    return all_metrics


# ---------------------------------------------------------------- report

def headline(all_metrics: dict, thresholds: dict, variant: str) -> dict[str, float]:
    """What a dashboard shows: `variant` at its default score, and the best other (variant,
    score) by near AUROC, each as near/far AUROC and FPR95 and ID accuracy (flat keys)."""
    def numbers(v: str, score: str) -> dict[str, float]:
        m = all_metrics[v][score]
        out = {f"{g}_{k}": m[g][k] for g in GROUPS for k in ("auroc", "fpr95") if g in m}
        if all_metrics[v].get("id_accuracy") is not None:
            out["id_accuracy"] = all_metrics[v]["id_accuracy"]
        return out

    if variant not in thresholds:
        raise ParamError(f"{variant!r} was not evaluated (evaluated: {', '.join(thresholds)})")
    out = {f"{variant}/{k}": v for k, v in numbers(variant, thresholds[variant]["score"]).items()}
    others = [(v, s) for v, entry in all_metrics.items() if v != variant
              for s, m in entry.items() if s != "id_accuracy" and "near" in m]
    if others:
        v, s = max(others, key=lambda vs: all_metrics[vs[0]][vs[1]]["near"]["auroc"])
        out.update({f"best_baseline/{k}": x for k, x in numbers(v, s).items()})
        out["best_baseline/name"] = f"{v}/{s}"
    return out


def summary(all_metrics: dict, params: dict) -> str:
    """What `mofe evaluate` prints: each variant at the default score, in % (every score and
    OOD set: reports/results.md; every number: reports/metrics.json)."""
    default = config(params).default_score
    lines = [f"{'variant':<16} {'score':<15} {'ID acc':>6} {'near AUROC':>10} {'near FPR95':>10} "
             f"{'far AUROC':>9} {'far FPR95':>9}"]
    for variant, entry in all_metrics.items():
        score = default if default in entry else next(s for s in entry if s != "id_accuracy")
        cells = [entry.get("id_accuracy"), *((entry[score].get(g) or {}).get(k)
                                             for g in GROUPS for k in ("auroc", "fpr95"))]
        text = [("-" if v is None else f"{100 * v:.1f}").rjust(w) for v, w in zip(cells, (6, 10, 10, 9, 9))]
        lines.append(f"{variant:<16} {score:<15} " + " ".join(text))
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


def results_table(all_metrics: dict, info: dict) -> str:
    """Markdown: variants x scores, near/far AUROC and FPR95 (%), ID accuracy; best per column in bold."""
    rows = []
    for variant, entry in all_metrics.items():
        for score, m in entry.items():
            if score == "id_accuracy":
                continue
            rows.append([variant, score, entry["id_accuracy"],
                         m.get("near", {}).get("auroc"), m.get("near", {}).get("fpr95"),
                         m.get("far", {}).get("auroc"), m.get("far", {}).get("fpr95")])
    best = {}
    for col, higher in ((2, True), (3, True), (4, False), (5, True), (6, False)):
        values = [r[col] for r in rows if r[col] is not None]
        if values:
            best[col] = max(values) if higher else min(values)
    lines = [
        f"# OOD detection results ({info['backbone']}, {info['image_size']} px)", "",
        "AUROC and FPR95 in %, ID is the positive class (FPR95 = OOD accepted at 95% ID TPR). "
        "Best per column in bold.", "",
        "| variant | score | ID acc | near AUROC | near FPR95 | far AUROC | far FPR95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for col, value in enumerate(r[2:], start=2):
            text = "-" if value is None else f"{100 * value:.1f}"
            cells.append(f"**{text}**" if value is not None and np.isclose(value, best[col]) else text)
        lines.append(f"| {r[0]} | {r[1]} | " + " | ".join(cells) + " |")
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
