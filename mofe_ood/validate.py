"""`mofe validate`: every params section checked at once, before any stage runs (ours).

Each section is built into its config object by the function its stage runs first
(`config(params)` of the stage module, see CONFIGS): a missing or unknown key (with a
"did you mean") and a value the stage would refuse are found there, so the rules live in
one place. Here they are only collected: every problem of every section, reported together.
A config stops at its first bad value, so each key it names is set back to params.yaml's
value (an unknown key removed) and the section built again, until it passes: three bad
values in `train` are three lines, not one.

The Kubeflow pipeline runs this as its first step, so a typo in `register` fails in seconds
instead of after extraction and training. A device is checked as a choice, not for being
there: the step that checks may run where the GPU step will not.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

from mofe_ood import stages
from mofe_ood.config import unknown_key
from mofe_ood.params import ParamError, check_choice, load

REFERENCE = Path(__file__).resolve().parents[1] / "params.yaml"
# Mappings whose keys the user names (OOD sets, node labels, timm kwargs): any key goes.
OPEN = {"prepare.ood", "evaluate.extra_ood", "finetune.backbone_kwargs", "kfp.gpu_node_selector"}
DEVICES = ("auto", "cpu", "cuda")
# Sections no stage module owns, and the function that builds each one's config object.
OTHER_CONFIGS = {"base": "mofe_ood.config:base", "finetune": "mofe_ood.training.settings:finetune_config",
                 "kfp": "mofe_ood.stages:kfp_config"}


def config_function(target: str) -> Callable[[dict], Any] | None:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name, None)


def configs() -> dict[str, str]:
    """section -> `module:function` building its config object (each stage's section: its `config`)."""
    out = {stage.name: f"{stage.module}:config" for stage in stages.STAGES}
    return {**out, **OTHER_CONFIGS}


def unknown_keys(params: dict, reference: dict, prefix: str = "") -> list[str]:
    """Keys of `params` that `reference` lacks, as `section.key` lines."""
    found = []
    for key, value in params.items():
        name = f"{prefix}{key}"
        if key not in reference:
            found.append(unknown_key(name, prefix, [str(k) for k in reference]))
        elif isinstance(value, dict) and isinstance(reference[key], dict) and name not in OPEN:
            found.extend(unknown_keys(value, reference[key], name + "."))
    return found


def checkable(params: dict, found: list[str]) -> dict:
    """`params` with each device checked as a choice here, then set to cpu for the config checks."""
    out = copy.deepcopy(params)
    for section in ("extract", "finetune"):  # whether CUDA is there is the stage's to find out
        p = out.get(section)
        if isinstance(p, dict) and "device" in p:
            try:
                check_choice(f"{section}.device", p["device"], DEVICES)
            except ParamError as err:
                found.append(str(err))
            p["device"] = "cpu"
    return out


def problems(params: dict, reference: dict | None = None) -> list[str]:
    """Every problem of `params`, one line each (empty: the params are good).

    `reference`: the params whose sections are the known ones (default: the project's
    params.yaml); a section of it that `params` lacks is not checked (a KFP step gets only
    the sections it reads).
    """
    reference = load(REFERENCE) if reference is None else reference
    found = unknown_keys({k: None for k in params}, reference)  # a section params.yaml lacks
    known = checkable(params, found)
    for section, target in configs().items():
        if section in params:
            found += section_problems(section, config_function(target), known, reference)
    return list(dict.fromkeys(found))  # a config that reads two sections (finetune: train's too) says it twice


def section_problems(section: str, build: Callable[[dict], Any], params: dict, reference: dict) -> list[str]:
    """Every problem `build` finds in `section`: after each error, the keys it names get params.yaml's
    value (an unknown key is dropped) and the section is built again, until it passes or an error
    names no key that can be set back."""
    params, found = copy.deepcopy(params), []
    for _ in range(MAX_ROUNDS):
        try:
            config = build(copy.deepcopy(params))
        except ParamError as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            found += lines
            if not all(set_back(params, reference, line) for line in lines):
                break
            continue
        except (TypeError, KeyError, AttributeError) as err:  # a wrong type reads as these
            found.append(f"{section}: {type(err).__name__}: {err}")
            break
        if not dataclasses.is_dataclass(config):  # a config still kept as a dict names no bad key
            found += unknown_keys({section: params[section]}, reference)
        break
    return found


# A section has a few dozen keys: more rounds than that means a key cannot be set back.
MAX_ROUNDS = 100


def set_back(params: dict, reference: dict, line: str) -> bool:
    """Set the key a problem line names (`a.b.c: ...`) to `reference`'s value, or drop it when
    `reference` lacks it; False when the line names no key of `params`."""
    name = line.split(":", 1)[0].strip()
    *parents, leaf = name.split(".")
    node, ref = params, reference
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        ref = ref.get(part) if isinstance(ref, dict) else None
    if not isinstance(node, dict) or not isinstance(ref, dict):  # e.g. inside an OOD set the user named
        return False
    if leaf in ref:
        if leaf in node and node[leaf] == ref[leaf]:
            return False  # already params.yaml's value: the problem lies elsewhere
        node[leaf] = copy.deepcopy(ref[leaf])
        return True
    if leaf in node:
        del node[leaf]
        return True
    return False


class Problems(ParamError):
    """Several problems, one line each: `lines` lets the CLI escape each line on its own (a
    newline inside a value stays escaped, the lines between problems do not)."""

    def __init__(self, found: list[str]):
        self.lines = [f"{len(found)} problem(s) in the params:", *(f"  {line}" for line in found)]
        super().__init__("\n".join(self.lines))


def run(params: dict, reference: dict | None = None) -> dict:
    """Raise one ParamError listing every problem; return the sections checked.

    `reference`: the params whose keys are the known ones (default: the project's params.yaml).
    """
    found = problems(params, reference)
    if found:
        raise Problems(found)
    return {"checked": sorted(params), "problems": 0}
