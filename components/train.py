"""Component `train`: the MoFE variants on frozen features (mofe_ood.train.run)."""

from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components import component, log_metrics, sections


@component
def train(base: str, extract: str, train: str, finetune: str, prepared: Input[Dataset], features: Input[Dataset],
          models: Output[Model], metrics: Output[Metrics], history: Output[Markdown]):
    """Train every variant of `train.variants` into `models/<variant>/`; `history`: each
    variant's epochs as a table the KFP UI renders.

    The pod has `train.gpus` GPUs; > 1: `run` starts one data-parallel process per GPU
    (torchrun), as `mofe train` does.
    """
    from pathlib import Path

    from mofe_ood import train as stage

    params = sections(base=base, extract=extract, train=train, finetune=finetune)
    result = stage.run(params, features.path, models.path, prepared.path)
    log_metrics(metrics, result if isinstance(result, dict) else {})
    Path(history.path).write_text(stage.history_markdown(models.path))
