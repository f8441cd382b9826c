"""Component `register`: the model into the MLflow registry, behind the gate (mofe_ood.register.run)."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import component, sections


@component
def register(base: str, prepare: str, extract: str, train: str, finetune: str, evaluate: str,
             register: str, features: Input[Dataset], models: Input[Model], reports: Input[Dataset],
             registration: Output[Artifact]):
    """Register `register.variant` (MLflow endpoint and credentials from the environment).

    All sections: the MLflow run records the whole configuration.
    """
    from mofe_ood import register as stage

    params = sections(base=base, prepare=prepare, extract=extract, train=train, finetune=finetune,
                      evaluate=evaluate, register=register)
    result = stage.run(params, models.path, reports.path, features.path, out=registration.path)
    registration.metadata.update({k: result.get(k) for k in ("model_name", "version", "alias")})
