"""The package's shape, read from its source: no import cycle (imports inside functions
included), no stage module reaching another stage's module, small modules and functions.

Run as a script for the size report (the README's layout section quotes it):
    python tests/test_layout.py [N]     # the N (default 10) largest modules and functions
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from mofe_ood import stages

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mofe_ood"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# Over the limits today, being split on other branches of issue 13: this list is emptied when
# they merge. Do not add to it: split the module or function instead.
def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def reach(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` imports, directly or not -> the module that imports it (for the path)."""
    parent, todo = {start: ""}, [start]
    while todo:
        node = todo.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt not in parent:
                parent[nxt] = node
                todo.append(nxt)
    return parent


def path_to(parent: dict[str, str], end: str) -> str:
    chain = [end]
    while parent[chain[-1]]:
        chain.append(parent[chain[-1]])
    return " -> ".join(reversed(chain))


def function_sizes(tree: ast.AST, where: str, prefix: str = "") -> dict[str, int]:
    """`where:Class.method` -> lines, for every function in `tree` (nested ones too)."""
    out = {}
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[f"{where}:{prefix}{child.name}"] = child.end_lineno - child.lineno + 1
            out |= function_sizes(child, where, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            out |= function_sizes(child, where, f"{prefix}{child.name}.")
        else:
            out |= function_sizes(child, where, prefix)
    return out


def sizes(root: Path = PACKAGE) -> tuple[dict[str, int], dict[str, int]]:
    """Lines per module (`mofe_ood/x.py`) and per function (`mofe_ood/x.py:Class.method`)."""
    modules, functions = {}, {}
    for path in sorted(root.rglob("*.py")):
        name = str(path.relative_to(ROOT))
        source = path.read_text()
        modules[name] = len(source.splitlines())
        functions |= function_sizes(ast.parse(source), name)
    return modules, functions


def test_the_import_graph_has_no_cycle(import_graph):
    found = cycles(import_graph)
    assert not found, "import cycles (imports inside functions count): " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_stage_module_imports_another_stage_module(import_graph):
    """Shared code lives in library modules: a stage reaches no other stage, even through them."""
    names = {stage.module for stage in stages.STAGES}
    found = []
    for stage in sorted(names):
        parent = reach(import_graph, stage)
        found += [path_to(parent, other) for other in sorted(names - {stage}) if other in parent]
    assert not found, "a stage imports another stage: " + "; ".join(found)


def test_evaluate_and_serving_import_no_training_module(import_graph):
    """They read trained models through mofe_ood.variants: a training edit re-runs no evaluate under DVC."""
    readers = ["mofe_ood.evaluate", *(m for m in import_graph if m.startswith("mofe_ood.serving"))]
    found = []
    for reader in readers:
        parent = reach(import_graph, reader)
        found += [path_to(parent, m) for m in sorted(parent) if m.startswith("mofe_ood.training")]
    assert len(readers) > 3 and not found, "a model reader imports training code: " + "; ".join(found)


def test_modules_and_functions_are_small():
    modules, functions = sizes()
    large = {name: n for name, n in modules.items() if n > MAX_MODULE_LINES}
    large |= {name: n for name, n in functions.items() if n > MAX_FUNCTION_LINES}
    assert not large, f"over {MAX_MODULE_LINES} lines a module / {MAX_FUNCTION_LINES} a function: {large}"


def test_every_document_the_code_cites_is_in_the_repository():
    """The method and the stack are docs/method.md and docs/stack.md; nothing cites a file that is not there."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py", "*.md",
                            "*.yaml", "*.toml", "Makefile"], cwd=ROOT, capture_output=True, text=True).stdout
    missing, stale = [], []
    for name in files.split():
        if not (ROOT / name).is_file():
            continue
        for number, line in enumerate((ROOT / name).read_text().splitlines(), 1):
            stale += [f"{name}:{number}" for _ in re.findall(r"(?<![\w/])(?:METHOD|STACK)\.md", line)]
            missing += [f"{name}:{number}: {doc}" for doc in re.findall(r"\bdocs/[\w.-]+\.md", line)
                        if not (ROOT / doc).is_file()]
    assert not missing, f"cited documents that do not exist: {missing}"
    assert not stale, f"cite docs/method.md or docs/stack.md (the old top-level names are gone): {stale}"


def report(top: int = 10) -> str:
    modules, functions = sizes()
    lines = [f"largest modules (limit {MAX_MODULE_LINES} lines):"]
    lines += [f"  {n:5d}  {name}" for name, n in sorted(modules.items(), key=lambda kv: -kv[1])[:top]]
    lines += [f"largest functions (limit {MAX_FUNCTION_LINES} lines):"]
    lines += [f"  {n:5d}  {name}" for name, n in sorted(functions.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
