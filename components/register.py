"""Component `register`: the model into the MLflow registry, behind the gate (mofe_ood.register.run)."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import component, sections, with_gpus


@component
def register(base: str, prepare: str, extract: str, train: str, finetune: str, evaluate: str,
             register: str, serve: str, extract_gpus: int, train_gpus: int, features: Input[Dataset],
             models: Input[Model], reports: Input[Dataset], registration: Output[Artifact], kfp_run_id: str = "",
             image: str = ""):
    """Register `register.variant` (MLflow endpoint and credentials from the environment).

    All sections (`serve`: the input limits written into the bundle): the MLflow run records the
    whole configuration. Its lineage tags: the KFP
    run, the input artifacts' URIs, the image, and the commit baked into it (MOFE_GIT_COMMIT).
    """
    from mofe_ood import register as stage

    params = with_gpus(sections(base=base, prepare=prepare, extract=extract, train=train, finetune=finetune,
                                evaluate=evaluate, register=register, serve=serve),
                       extract=extract_gpus, train=train_gpus)
    lineage = {"kfp_run_id": kfp_run_id, "image": image, "features_uri": features.uri,
               "models_uri": models.uri, "reports_uri": reports.uri}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # the candidate file is for DVC; reports is an input here
        result = stage.run(params, models.path, reports.path, features.path, out=registration.path,
                           lineage=lineage, candidate_out=f"{tmp}/candidate.json")
    registration.metadata.update({k: result.get(k) for k in ("model_name", "version", "alias", "reason",
                                                             "run_id", "tracking_uri")})
    registration.metadata["model_uri"] = f"models:/{result['model_name']}/{result['version']}"
    registration.metadata["decision"] = result.get("alias")
