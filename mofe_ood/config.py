"""Typed, frozen views of params.yaml sections: params.yaml holds every default, the code none (ours).

A stage declares its section as a frozen dataclass whose fields are exactly the
section's keys (nested sections are nested dataclasses) and whose
`__post_init__` checks the values. `section` builds one from the params mapping:
a missing key, an unknown key (with a "did you mean") or a bad value is a
`ParamError` naming `section.key`. Mappings whose keys the user names (OOD
sets, node labels, timm kwargs) are typed `dict` and taken as they are.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping, TypeVar

from mofe_ood.params import ParamError, check_number

T = TypeVar("T")


def section(cls: type[T], data: Any, where: str) -> T:
    """`data` as the frozen dataclass `cls`; every field is required, no other key is allowed."""
    if not isinstance(data, Mapping):
        raise ParamError(f"{where}: expected a mapping of keys, got {data!r}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    problems = [unknown_key(f"{where}.{key}", f"{where}.", names) for key in data if key not in names]
    problems += [f"{where}.{name}: missing (params.yaml lists every key)" for name in names if name not in data]
    if problems:  # one line each: `mofe validate` reports every line as its own problem
        raise ParamError("\n".join(problems))
    hints = typing.get_type_hints(cls)
    values = {}
    for name in names:
        kind = hints[name]
        values[name] = section(kind, data[name], f"{where}.{name}") if dataclasses.is_dataclass(kind) \
            else data[name]
    return cls(**values)


def unknown_key(name: str, prefix: str, known: list[str]) -> str:
    """`name` is not a key of its section: the close match if there is one, else every known key."""
    close = difflib.get_close_matches(name[len(prefix):], known, n=1, cutoff=0.7)
    allowed = f"did you mean {prefix}{close[0]}?" if close else f"known: {', '.join(known)}"
    return f"{name}: not a known key ({allowed})"


def as_dict(config: Any) -> dict:
    """A config object back as the plain mapping params.yaml has (for hashing, logging and JSON)."""
    return dataclasses.asdict(config)


@dataclasses.dataclass(frozen=True)
class Base:
    """The `base` section: what every stage shares."""

    seed: int

    def __post_init__(self):
        check_number("base.seed", self.seed, low=0, integer=True)


def base(params: Mapping) -> Base:
    return section(Base, params.get("base"), "base")
