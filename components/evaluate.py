"""Component `evaluate`: every variant x score x OOD set (mofe_ood.evaluate.run)."""

from kfp.dsl import ClassificationMetrics, Dataset, HTML, Input, Markdown, Metrics, Model, Output

from components import component, sections


@component
def evaluate(base: str, train: str, finetune: str, evaluate: str, register: str, features: Input[Dataset],
             models: Input[Model], reports: Output[Dataset], metrics: Output[Metrics],
             results: Output[Markdown], roc: Output[ClassificationMetrics], plots: Output[HTML]):
    """Write the reports folder (metrics.json, scores, plots), and what the KFP UI renders:
    the headline numbers (the variant `register.variant` at its default score and the best
    other variant/score on validation), results.md, that variant's ROC curve and every plot."""
    from mofe_ood import evaluate as stage
    from mofe_ood import report

    params = sections(base=base, train=train, finetune=finetune, evaluate=evaluate, register=register)
    all_metrics = stage.run(params, features.path, models.path, reports.path)
    import json
    from pathlib import Path

    from mofe_ood.registry.gate import registered_variant

    variant = registered_variant(params["register"]["variant"], reports.path)  # auto: chosen on validation
    thresholds, val_metrics = (json.loads((Path(reports.path) / f).read_text())
                               for f in ("thresholds.json", "metrics_val.json"))
    for name, value in report.dashboard(all_metrics, val_metrics, thresholds, variant).items():
        if isinstance(value, str):
            metrics.metadata[name] = value
        else:
            metrics.log_metric(name, float(value))
    Path(results.path).write_text((Path(reports.path) / "results.md").read_text())
    curve = report.pooled_roc(reports.path, variant)
    roc.log_roc_curve(curve["fpr"], curve["tpr"], curve["threshold"])
    Path(plots.path).write_text(report.plots_html(reports.path))
