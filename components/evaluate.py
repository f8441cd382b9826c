"""Component `evaluate`: every variant x score x OOD set (mofe_ood.evaluate.run)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import component, log_metrics, sections


@component
def evaluate(base: str, train: str, finetune: str, evaluate: str, features: Input[Dataset],
             models: Input[Model], reports: Output[Dataset], metrics: Output[Metrics]):
    """Write the reports folder (metrics.json, scores, plots); the metrics also to the KFP UI."""
    from mofe_ood import evaluate as stage

    params = sections(base=base, train=train, finetune=finetune, evaluate=evaluate)
    log_metrics(metrics, stage.run(params, features.path, models.path, reports.path))
