"""Component `validate`: every params section checked at once, before any stage runs
(mofe_ood.validate.run): a typo fails the run in seconds, not after extraction and training."""

from components import component, sections, with_gpus


@component
def validate(base: str, prepare: str, extract: str, train: str, finetune: str, evaluate: str,
             register: str, serve: str, extract_gpus: int, train_gpus: int, reference: str):
    """`reference`: the params the pipeline was compiled with (JSON): a key they lack is a typo."""
    import json

    from mofe_ood import validate as stage

    params = with_gpus(sections(base=base, prepare=prepare, extract=extract, train=train, finetune=finetune,
                                evaluate=evaluate, register=register, serve=serve),
                       extract=extract_gpus, train=train_gpus)
    stage.run(params, json.loads(reference))
