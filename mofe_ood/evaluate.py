"""Stage `evaluate`: every variant x every applicable OOD score x every OOD set.

Outputs under `reports/` (their layout is part of the interface):
- `metrics.json`: {variant: {"id_accuracy": float | null, score: {"near": M, "far": M, <set>: M}}}
  with M = {auroc, fpr95, fpr95_openood, aupr_in, aupr_out}, fractions in [0, 1], on the
  OOD sets' test parts (reported, never read by a choice);
- `metrics_val.json`: the same on validation (ID val against each OOD set's validation
  part `<set>_val`), plus per score `selection` (the objective, `evaluate.selection`),
  the chosen `hyper` and every candidate's objective: what every choice reads;
- `selection.json`: the best trained variant on validation (`register.variant: auto`);
- `seeds.json`: per variant trained with `train.seeds`, each seed's metrics, mean and sd;
- `scores/<variant>__<score>.npz`: per-sample scores (higher = more ID), one array
  per set (`test` = ID test, then each OOD set);
- `headline.json`: the few numbers DVC's metrics are (mofe_ood.headline);
- `results.md`: the table a person reads first;
- `thresholds.json`: per variant, its default score's hyper-parameters and the
  decision threshold accepting `tpr` of ID validation samples (for inference);
- `roc/<variant>__<OOD set>.json` (DVC plot data: one file per curve, so `dvc plots show`
  draws each as its own line) and `plots/*.png`: ROC curves and score histograms.
Score hyper-parameters (KNN's K, ViM's dim: each score's `tuned`, candidates in this
section of params.yaml), `default_score: auto` and the variant are chosen on validation
(mofe_ood.tuning; OpenOOD v1.5's protocol). Without OOD validation parts
(`prepare.ood_split.val_fraction: 0`) hyper-parameters fall back to ID data only
(held-out classes as pseudo-OOD, ours) and nothing else is chosen.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from mofe_ood import atomic, metrics, neighbours, scores, tuning
from mofe_ood.config import section
from mofe_ood.headline import FILE as HEADLINE_FILE
from mofe_ood.headline import write as write_headline
from mofe_ood.params import ParamError, check_choice, check_number
from mofe_ood.registry.gate import AUTO as REGISTER_AUTO
from mofe_ood.report import plot_variant, results_table, seeds_table
from mofe_ood.report import summary as summary  # what `mofe evaluate` prints (the CLI looks for it)
from mofe_ood.splits import GROUPS, ID_SPLITS, VAL_SUFFIX, DataError
from mofe_ood.variants import FROZEN, Outputs, trained_variants, variant_outputs

AUTO = "auto"  # evaluate.default_score: the best score on validation, per variant
OUTPUTS = ("metrics.json", "metrics_val.json", "selection.json", "seeds.json", HEADLINE_FILE, "thresholds.json",
           "roc", "results.md", "scores", "plots")  # as dvc.yaml lists them


def applicable(score_names: list[str], has_logits: bool) -> list[str]:
    return [s for s in score_names
            if has_logits or not (scores.SCORES[s].needs_logits or scores.SCORES[s].needs_head)]


def set_metrics(id_scores: np.ndarray, per_set: dict[str, np.ndarray], sets: dict[str, str]) -> dict:
    """{near: M, far: M, <set>: M}: every set in `sets` (name -> group) against `id_scores`, and
    each group's average."""
    result = {s: metrics.ood_metrics(id_scores, per_set[s], name=s) for s in sets}
    groups = {g: metrics.average([result[s] for s, sg in sets.items() if sg == g])
              for g in GROUPS if g in sets.values()}
    return {**groups, **result}


def evaluate_variant(variant: str, outputs: dict[str, Outputs], head, ood_sets: dict[str, str],
                     cfg: "Evaluate", score_dir: Path, val_sets: dict[str, str] | None = None,
                     ) -> tuple[dict, dict, dict]:
    """metrics.json entry of one variant (test parts), its validation entry (ID val against each
    OOD set's validation part, `val_sets`: `<set>_val` -> `<set>`) and each score's calibration.

    Hyper-parameters (K, ViM's dim) are chosen on validation (`evaluate.selection` of the val
    metrics; without OOD validation parts: on ID data alone, tuning.select_hyper).
    """
    val_sets = val_sets or {}
    train, val, test = (outputs[s] for s in ID_SPLITS)
    entry: dict = {"id_accuracy": None if test.logits is None else metrics.accuracy(test.logits, test.labels)}
    val_entry: dict = {"id_accuracy": None if val.logits is None else metrics.accuracy(val.logits, val.labels)}
    val_groups = {name: ood_sets[of] for name, of in val_sets.items()}
    calibration = {}
    for name in applicable(cfg.scores, test.logits is not None):
        with neighbours.neighbour_cache():  # KNN: one product per array for every candidate K
            candidates = tuning.fitting(name, cfg.candidates(name), len(train.features))  # K <= the bank

            def fitted(hyper, name=name):
                return scores.make_score(name, **hyper).fit(train.features, train.labels, train.logits, head)

            def val_result(score):
                per_val = {s: score.score(outputs[s].features, outputs[s].logits) for s in ["val", *val_sets]}
                by_set = {val_sets[s]: v for s, v in per_val.items() if s != "val"}
                return set_metrics(per_val["val"], by_set, {val_sets[s]: g for s, g in val_groups.items()})

            if len(candidates) == 1:
                hyper, table = candidates[0], None
            elif val_sets:
                hyper, table = tuning.select_on_val(candidates, lambda h: val_result(fitted(h)), cfg.selection)
            else:
                hyper, _ = tuning.select_hyper(name, candidates, train.features, train.labels, val.features,
                                               val.labels, train_logits=train.logits, val_logits=val.logits, head=head)
                table = None
            score = fitted(hyper)
            per_set = {s: score.score(outputs[s].features, outputs[s].logits) for s in ["val", "test", *ood_sets]}
            np.savez(score_dir / f"{variant}__{name}.npz", **{s: v for s, v in per_set.items() if s != "val"})
            entry[name] = set_metrics(per_set["test"], per_set, ood_sets)
            if val_sets:
                val_entry[name] = val_result(score)
                # what was chosen, and from what: every candidate's validation objective
                val_entry[name].update(selection=tuning.objective(val_entry[name], cfg.selection), hyper=hyper,
                                       candidates=table or [{"hyper": hyper}])
            calibration[name] = {"hyper": hyper, "tpr": cfg.tpr,
                                 "threshold": metrics.threshold_at_tpr(per_set["val"], cfg.tpr)}
    return entry, val_entry, calibration


@dataclass(frozen=True)
class Evaluate:
    """The `evaluate` section. `config` adds one field per candidate list the registered scores
    declare (`knn_k`, `vim_dim`: OODScore.tuned), so a new tuned score needs no edit here."""

    variants: list[str]
    scores: list[str]
    default_score: str   # a score of `scores`, or auto: per variant the best on validation
    selection: list[str]  # <near|far|set>.<metric> of the validation metrics; their mean decides
    tpr: float
    extra_ood: dict  # read (and checked) by prepare

    def __post_init__(self):
        for name in ("variants", "scores"):
            if not isinstance(getattr(self, name), list) or not getattr(self, name):
                raise ParamError(f"evaluate.{name}: {getattr(self, name)!r} is not a non-empty list")
        for s in self.scores:
            check_choice("evaluate.scores", s, scores.SCORES)
        check_choice("evaluate.default_score", self.default_score, [AUTO, *self.scores])
        tuning.check_selection(self.selection, "evaluate.selection")
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
    val_sets = {n: n[:-len(VAL_SUFFIX)] for n, s in info["splits"].items() if s["kind"] == "ood_val"}
    if not ood_sets:
        raise DataError(f"{features_dir}/info.json lists no OOD sets")
    for name in ood_sets:
        if info["splits"][name]["count"] == 0:
            raise DataError(f"OOD set {name!r} is empty")

    with atomic.replacing(reports_dir, items=OUTPUTS) as tmp:
        for folder in ("scores", "plots", "roc"):
            (tmp / folder).mkdir()
        all_metrics, val_metrics, thresholds = {}, {}, {}
        for variant in cfg.variants:
            outputs, head = variant_outputs(variant, features_dir, models_dir, [*ID_SPLITS, *ood_sets, *val_sets])
            entry, val_entry, calibration = evaluate_variant(variant, outputs, head, ood_sets, cfg, tmp / "scores",
                                                             val_sets)
            all_metrics[variant], val_metrics[variant] = entry, val_entry
            default = default_score(cfg, calibration, val_entry)
            thresholds[variant] = {"score": default, **calibration[default]}
            for name, curve in plot_variant(variant, default, tmp / "scores", ood_sets, tmp / "plots").items():
                (tmp / "roc" / f"{variant}__{name}.json").write_text(json.dumps(curve) + "\n")
        selection = select_variant(val_metrics, thresholds, cfg)
        seeds = seed_spread(cfg, features_dir, models_dir, thresholds, all_metrics, val_metrics, ood_sets, val_sets,
                            tmp / "scores")
        (tmp / "metrics.json").write_text(json.dumps(all_metrics, indent=2) + "\n")
        (tmp / "metrics_val.json").write_text(json.dumps(val_metrics, indent=2) + "\n")
        (tmp / "selection.json").write_text(json.dumps(selection, indent=2) + "\n")
        (tmp / "seeds.json").write_text(json.dumps(seeds, indent=2) + "\n")
        (tmp / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
        registered = params["register"]["variant"]  # auto: the one chosen above (None: register says why)
        write_headline(tmp / HEADLINE_FILE, all_metrics, thresholds,
                       selection.get("variant") if registered == REGISTER_AUTO else registered)
        (tmp / "results.md").write_text(results_table(all_metrics, info, val_metrics, thresholds, selection)
                                        + seeds_table(seeds))
    return all_metrics


def seed_spread(cfg: "Evaluate", features_dir: Path, models_dir: Path, thresholds: dict, all_metrics: dict,
                val_metrics: dict, ood_sets: dict, val_sets: dict, score_dir: Path) -> dict:
    """reports/seeds.json: for each variant trained with more seeds (train.seeds, under
    models/<variant>/seeds/<seed>/), its default score's test metrics per seed and their mean and
    sd (each seed's hyper-parameters chosen on validation as the variant's were), the val objective too."""
    out = {}
    for variant, calibration in thresholds.items():
        folder = models_dir / variant / "seeds"
        if variant == FROZEN or not folder.is_dir():
            continue
        score = calibration["score"]
        one = dataclasses.replace(cfg, scores=[score])
        rows = {"base": _seed_row(all_metrics[variant], val_metrics[variant], score, ood_sets)}
        for run in sorted(folder.iterdir(), key=lambda p: int(p.name)):
            outputs, head = variant_outputs(run.name, features_dir, folder, [*ID_SPLITS, *ood_sets, *val_sets])
            entry, val_entry, _ = evaluate_variant(f"{variant}__seed{run.name}", outputs, head, ood_sets, one,
                                                   score_dir, val_sets)
            (score_dir / f"{variant}__seed{run.name}__{score}.npz").unlink()  # per-sample scores: the base seed's only
            rows[run.name] = _seed_row(entry, val_entry, score, ood_sets)
        keys = list(rows["base"])
        out[variant] = {"score": score, "seeds": rows,
                        "mean": {k: float(np.mean([r[k] for r in rows.values()])) for k in keys},
                        "sd": {k: float(np.std([r[k] for r in rows.values()], ddof=1)) for k in keys}}
    return out


def _seed_row(entry: dict, val_entry: dict, score: str, ood_sets: dict) -> dict:
    m = entry[score]
    row = {"id_accuracy": entry["id_accuracy"], "near.auroc": m.get("near", {}).get("auroc"),
           "far.auroc": m.get("far", {}).get("auroc"), **{f"{s}.auroc": m[s]["auroc"] for s in ood_sets},
           "val": (val_entry.get(score) or {}).get("selection")}
    return {k: v for k, v in row.items() if v is not None}


def default_score(cfg: "Evaluate", calibration: dict, val_entry: dict) -> str:
    """The variant's default score: `evaluate.default_score`, or with `auto` the best on validation
    (`evaluate.selection`); a variant without that score (no logits) takes its first."""
    if cfg.default_score == AUTO:
        ranked = [s for s in calibration if "selection" in val_entry.get(s, {})]
        if ranked:
            return max(ranked, key=lambda s: val_entry[s]["selection"])  # ties: the earlier score
    return cfg.default_score if cfg.default_score in calibration else next(iter(calibration))


def select_variant(val_metrics: dict, thresholds: dict, cfg: "Evaluate") -> dict:
    """reports/selection.json: every trained variant at its default score by the validation
    objective, and the best one (what `register.variant: auto` registers). No test data read."""
    # no OOD validation parts (val_fraction 0): no score has a val entry, and nothing is chosen
    ranked = {v: (val_metrics[v].get(t["score"]) or {}).get("selection") for v, t in thresholds.items()
              if v != FROZEN}
    ranked = {v: x for v, x in ranked.items() if x is not None}
    best = max(ranked, key=lambda v: ranked[v]) if ranked else None
    return {"split": "val", "selection": list(cfg.selection), "variant": best,
            "score": thresholds[best]["score"] if best else None, "value": ranked.get(best),
            "candidates": {v: {"score": thresholds[v]["score"], "value": x} for v, x in ranked.items()}}


# ---------------------------------------------------------------- report
