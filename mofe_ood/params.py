"""params.yaml: the single source of every knob, shared by `dvc repro` and Kubeflow.

A preset (presets/*.yaml) is an overlay: its top-level `overlay_of` names the file it
changes (relative to the preset), and it holds only the keys whose values differ. `load`
merges it onto that file, so every command that takes `--params` takes a preset (ours).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from mofe_ood.errors import UserError


class ParamError(UserError):
    """A parameter has a value the code cannot use; the message names it."""


OVERLAY_KEY = "overlay_of"


def load(path: str | Path = "params.yaml", _seen: tuple[Path, ...] = ()) -> dict:
    """The params of `path`; a preset comes back merged onto the file it overlays."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"params file {str(path)!r} does not exist")
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    base = params.pop(OVERLAY_KEY, None)
    if base is None:
        return params
    if not isinstance(base, str) or not base:
        raise ParamError(f"{path}: {OVERLAY_KEY}: {base!r} must be the path of a params file")
    base_path = (path.parent / base).resolve()
    if base_path in _seen or base_path == path.resolve():
        raise ParamError(f"{path}: {OVERLAY_KEY}: {base!r} overlays itself (a cycle of presets)")
    return merged(load(base_path, (*_seen, path.resolve())), params)


def merged(base: dict, override: dict | None) -> dict:
    """`base` updated recursively by `override` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = list(allowed)
    if value not in allowed:
        raise ParamError(f"{name}: {value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 integer: bool = False, allow_none: bool = False) -> Any:
    """Reject non-numbers and values outside [low, high] with a message naming the param."""
    if value is None and allow_none:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ParamError(f"{name}: {value!r} is not {'an integer' if integer else 'a number'}")
    if low is not None and value < low:
        raise ParamError(f"{name}: {value!r} is below the minimum {low}")
    if high is not None and value > high:
        raise ParamError(f"{name}: {value!r} is above the maximum {high}")
    return value
