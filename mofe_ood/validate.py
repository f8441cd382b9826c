"""`mofe validate`: every params section checked at once, before any stage runs (ours).

Two kinds of mistakes, all reported together, each naming its key:
- a key that params.yaml does not have (a typo: the stage would silently take its default);
- a value a stage would refuse: each section goes through its stage's own checker, the code
  the stage runs first, so the rules live in one place.

The Kubeflow pipeline runs this as its first step, so a typo in `register` fails in seconds
instead of after extraction and training. A device is checked as a choice, not for being
there: the step that checks may run where the GPU step will not.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Callable

from mofe_ood.params import ParamError, check_choice, check_number, load

REFERENCE = Path(__file__).resolve().parents[1] / "params.yaml"
# Mappings whose keys the user names (OOD sets, node labels, timm kwargs): any key goes.
OPEN = {"prepare.ood", "evaluate.extra_ood", "finetune.backbone_kwargs", "kfp.gpu_node_selector"}
DEVICES = ("auto", "cpu", "cuda")


def unknown_keys(params: dict, reference: dict, prefix: str = "") -> list[str]:
    """Keys of `params` that `reference` lacks, as `section.key` lines."""
    found = []
    for key, value in params.items():
        name = f"{prefix}{key}"
        if key not in reference:
            close = difflib.get_close_matches(str(key), [str(k) for k in reference], n=1, cutoff=0.7)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            found.append(f"{name}: not a known key{hint}; known: {', '.join(map(str, reference))}")
        elif isinstance(value, dict) and isinstance(reference[key], dict) and name not in OPEN:
            found.extend(unknown_keys(value, reference[key], name + "."))
    return found


def _prepare(params: dict) -> None:
    from mofe_ood import prepare

    prepare._context(params)
    prepare.check_classes((params["prepare"].get("id") or {}).get("classes"))
    for name, spec in prepare.ood_specs(params).items():
        if not isinstance(spec, dict):
            raise ParamError(f"prepare.ood.{name}: expected a mapping with source and group, got {spec!r}")
        check_choice(f"prepare.ood.{name}.source", spec.get("source"), prepare.OOD_SOURCES)
        check_choice(f"prepare.ood.{name}.group", spec.get("group"), prepare.GROUPS)
    check_choice("prepare.id.source", (params["prepare"].get("id") or {}).get("source"), prepare.ID_SOURCES)


def _extract(params: dict) -> None:
    from mofe_ood import backbones

    p = params.get("extract") or {}
    backbones._check(str(p.get("backbone")), str(p.get("weights")), p.get("image_size"))
    check_number("extract.batch_size", p.get("batch_size"), low=1, integer=True)
    check_number("extract.num_threads", p.get("num_threads"), low=1, integer=True, allow_none=True)
    check_number("extract.shards", p.get("shards", 1), low=1, integer=True)
    check_number("extract.gpus", p.get("gpus", 0), low=0, integer=True)


def _train(params: dict) -> None:
    from mofe_ood import train

    train.config(params)


def _finetune(params: dict) -> None:
    from mofe_ood import finetune

    finetune.config(params)


def _evaluate(params: dict) -> None:
    from mofe_ood import evaluate
    from mofe_ood.train import trained_variants

    evaluate.check(params, [evaluate.FROZEN, *trained_variants(params)])


def _register(params: dict) -> None:
    from mofe_ood import register

    register.config(params)


CHECKS: dict[str, Callable[[dict], None]] = {
    "prepare": _prepare, "extract": _extract, "train": _train, "finetune": _finetune,
    "evaluate": _evaluate, "register": _register,
}


def problems(params: dict, reference: dict | None = None) -> list[str]:
    """Every problem of `params`, one line each (empty: the params are good)."""
    reference = load(REFERENCE) if reference is None else reference
    found = unknown_keys(params, reference)
    checkable = copy.deepcopy(params)
    for section in ("extract", "finetune"):  # a choice here; whether CUDA is there, in the stage
        p = checkable.get(section)
        if isinstance(p, dict):
            try:
                check_choice(f"{section}.device", p.get("device", "auto"), DEVICES)
            except ParamError as err:
                found.append(str(err))
            p["device"] = "cpu"
    for section, check in CHECKS.items():
        try:
            check(copy.deepcopy(checkable))
        except (ParamError, TypeError, KeyError, AttributeError) as err:  # a wrong type reads as these
            found.append(str(err) if isinstance(err, ParamError) else f"{section}: {type(err).__name__}: {err}")
    return found


def run(params: dict, reference: dict | None = None) -> dict:
    """Raise one ParamError listing every problem; return the sections checked.

    `reference`: the params whose keys are the known ones (default: the project's params.yaml).
    """
    found = problems(params, reference)
    if found:
        raise ParamError(f"{len(found)} problem(s) in the params:\n  " + "\n  ".join(found))
    return {"checked": sorted(params), "problems": 0}
