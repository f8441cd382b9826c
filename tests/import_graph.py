"""The import graph of a package, read from its source (imports inside functions included):
tests/test_layout.py and tests/test_dvc_stages.py check it through conftest's fixtures."""

from __future__ import annotations

import ast
from pathlib import Path


def package_modules(package: Path) -> dict[str, Path]:
    """Every module of `package` by dotted name (a package by its own name, from its __init__.py)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that module `name` imports, at the top or inside functions.

    `from a import b` counts as a.b where a.b is a module, else as a; each package a module
    sits in counts too (Python runs its __init__ first), except the top package.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package up
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    with_parents = set()
    for module in found:
        parts = module.split(".")
        with_parents |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {m for m in with_parents if m in modules and m != name}


def build_import_graph(package: Path) -> dict[str, set[str]]:
    modules = package_modules(package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}
