"""Where `prepare` reads images from: a registry of data sources, one signature each (ours).

A source is a function `load(request, ctx) -> Images` registered under the name
params use as `source:`. `request` says which set it is for (`what`, the param to
name in messages), which of the source's own splits (`split`: "train" or "test"; OOD
sets read "test"), whether class labels matter (`labelled`: the ID splits), how many
images will be drawn (`count`: prepare draws them from what the source returns; a source
that generates images makes that many) and the set's own keys the source declared
(`options`, e.g. textures' `crop_size`; the ID splits get `{"root": prepare.id.root}`).
`ctx` holds the prepare settings every source may read (seed, download, folders, max_side).

Adding a source is one function in `mofe_ood/datasets.py` (the built-in sources, which
`prepare` imports so they are registered):

    @source("my_set", options=("path",))
    def my_set(request: Request, ctx: Context) -> Images:
        ...

then `prepare.ood.<name>: {source: my_set, group: far, count: null, path: ...}`.
`id_source=True` lets `prepare.id.source` name it too (it must then give class labels
and `class_names` for both "train" and "test"); `pixels=True` stores a path-backed
set's pixels (downscaled to max_side) instead of its paths once the count is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mofe_ood import storage
from mofe_ood.errors import UserError
from mofe_ood.params import ParamError
from mofe_ood.splits import Images


@dataclass(frozen=True)
class Request:
    """What prepare asks one source for (see the module docstring)."""

    what: str
    split: str
    labelled: bool
    count: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """The prepare settings every source may read, and where s3:// folders are copied to."""

    seed: int
    download: bool
    cache_dir: Path
    fashion_mnist_dir: str
    max_side: int
    bad_images: str
    files_dir: Path | None = None  # s3:// image folders are copied here (inside the output)
    scratch: Path | None = None    # s3:// raw files read once, deleted with the stage

    def local(self, where: str, what: str, keep: bool) -> Path:
        """A folder param as a local folder: an s3:// URI is downloaded first.

        `keep`: the files stay part of the output (image folders, read later by extract);
        otherwise they are read once and dropped with the stage's scratch folder.
        """
        if not storage.is_s3(where):
            return Path(where)
        base = self.files_dir if keep else self.scratch
        if base is None:
            raise UserError(f"{what}: {where} is on S3, which this call cannot read")
        dest = base / what.replace("prepare.", "").replace("evaluate.", "")
        if not dest.is_dir():  # the same URI twice (train and test files): one download
            storage.download(where, dest, what)
        return dest


Loader = Callable[[Request, Context], Images]


@dataclass(frozen=True)
class Source:
    """A registered source: its loader and what it declares (see the module docstring)."""

    name: str
    load: Loader
    id_source: bool = False
    options: tuple[str, ...] = ()
    pixels: bool = False


SOURCES: dict[str, Source] = {}


def source(name: str, *, id_source: bool = False, options: tuple[str, ...] = (),
           pixels: bool = False) -> Callable[[Loader], Loader]:
    """Register the decorated `load(request, ctx) -> Images` as data source `name`."""
    def register(load: Loader) -> Loader:
        SOURCES[name] = Source(name, load, id_source, tuple(options), pixels)
        return load
    return register


def get(name: str, what: str, id_only: bool = False) -> Source:
    """The registered source `name` (`id_only`: one prepare.id may name); a ParamError listing the allowed."""
    allowed = [n for n, s in SOURCES.items() if s.id_source or not id_only]
    if name not in allowed:
        raise ParamError(f"{what}: {name!r} is not one of {', '.join(map(repr, allowed))}")
    return SOURCES[name]
