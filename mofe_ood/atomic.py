"""Stage outputs appear whole or not at all: write into a sibling folder, then rename.

A stage that fails half way leaves the previous outputs (and what DVC cached of
them) exactly as they were; only a finished folder replaces them.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


@contextmanager
def replacing(out_dir: str | Path, items: Iterable[str] | None = None, enabled: bool = True) -> Iterator[Path]:
    """Yield a fresh `<out_dir>.tmp`; when the block succeeds it replaces `out_dir`.

    `items`: replace only these names inside `out_dir` (a folder other stages
    also write to, such as reports/). `enabled=False` (a DDP rank other than 0)
    yields the temporary path and writes nothing.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if not enabled:
        yield tmp
        return
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if items is None:
        _remove(out_dir)
        tmp.rename(out_dir)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in items:
        _remove(out_dir / item)
        (tmp / item).rename(out_dir / item)
    shutil.rmtree(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
