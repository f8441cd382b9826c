"""Component `validate`: every params section checked at once, before any stage runs
(mofe_ood.validate.run): a typo fails the run in seconds, not after extraction and training."""

from components import component, sections


@component
def validate(base: str, prepare: str, extract: str, train: str, finetune: str, evaluate: str,
             register: str, serve: str, evaluate__extra_ood: str, reference: str):
    """`reference`: the params the pipeline was compiled with (JSON): a key they lack is a typo.

    Also what a run's arguments cannot change: `evaluate__extra_ood` is prepare's copy of
    `evaluate.extra_ood` (edit both in the Runs UI), and `<stage>.gpus` must be the count the
    pods were compiled with (their GPU limit is a literal: backends before 2.4.0 read no other).
    """
    import json

    from mofe_ood import validate as stage
    from mofe_ood.params import ParamError

    params = sections(base=base, prepare=prepare, extract=extract, train=train, finetune=finetune,
                      evaluate=evaluate, register=register, serve=serve)
    compiled = json.loads(reference)
    problems = []
    for name, text in {"evaluate__extra_ood": evaluate__extra_ood}.items():
        section, _, key = name.partition("__")
        if json.loads(text) != params[section].get(key):
            problems.append(f"{name}: {text} differs from {section}.{key}: "
                            f"{json.dumps(params[section].get(key))} (the same key: give both the same value)")
    for section, values in params.items():
        if "gpus" in values and values["gpus"] != compiled[section]["gpus"]:
            problems.append(f"{section}.gpus: {values['gpus']!r}, but the pipeline was compiled with "
                            f"{compiled[section]['gpus']} (its pods' GPU limit): submit again with "
                            f"--set {section}.gpus={values['gpus']}")
    try:
        stage.run(params, compiled)
    except ParamError as err:
        problems.insert(0, str(err))
    if problems:
        raise ParamError("; ".join(problems))
