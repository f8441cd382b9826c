"""dvc.yaml cannot drift from the code: each stage depends on every module its code imports,
and on every param that changes its result (and on none that only says how to run)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mofe_ood"
# Files a stage uses without importing them: register logs mlflow_model.py by path as the
# served model's code.
USED_BY_PATH = {"register": {"mlflow_model"}}
# Keys that say how a stage runs, not what it computes: listing them would re-run the stage.
RUN_ONLY = {"extract": {"num_threads", "shards", "gpus"},
            "train": {"num_threads", "gpus", "processes", "checkpoint_dir"},
            "finetune": {"checkpoint_dir"}}


def module_file(name: str) -> Path:
    return PACKAGE / (name.split(".", 1)[1].replace(".", "/") + ".py")


def imports(name: str) -> set[str]:
    """Modules of mofe_ood that module `name` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(module_file(name).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mofe_ood":
            found |= ({f"mofe_ood.{a.name}" for a in node.names} if node.module == "mofe_ood"
                      else {node.module})
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mofe_ood.")}
    return {m for m in found if module_file(m).is_file()}


def closure(name: str) -> set[str]:
    seen, todo = {name}, [name]
    while todo:
        for module in imports(todo.pop()) - seen:
            seen.add(module)
            todo.append(module)
    return seen


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_each_stage_depends_on_exactly_the_modules_its_code_imports():
    for stage, body in stages().items():
        listed = {d for d in body["deps"] if d.startswith("mofe_ood/")}
        expected = {f"mofe_ood/{m.split('.', 1)[1]}.py" for m in closure(f"mofe_ood.{stage}")}
        expected |= {f"mofe_ood/{m}.py" for m in USED_BY_PATH.get(stage, ())}
        assert listed == expected, (f"{stage}: dvc.yaml misses {sorted(expected - listed)}, "
                                    f"lists more than it imports: {sorted(listed - expected)}")


def test_the_closure_follows_imports_inside_functions():
    # train imports finetune inside a function; register imports inference the same way.
    assert "mofe_ood.finetune" in closure("mofe_ood.train")
    assert "mofe_ood.inference" in closure("mofe_ood.register")


def test_params_are_listed_by_key_where_some_keys_only_say_how_to_run():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    listed = {p for body in stages().values() for p in body.get("params", []) if isinstance(p, str)}
    for section, run_only in RUN_ONLY.items():
        assert section not in listed, f"{section} is listed whole: its run-only keys would re-run it"
        keys = set(params[section])
        assert run_only <= keys, f"{section}: {sorted(run_only - keys)} are not keys of params.yaml"
        assert not {f"{section}.{k}" for k in run_only} & listed
        # Every other key changes the result: some stage must depend on it.
        missing = {k for k in keys - run_only if f"{section}.{k}" not in listed}
        assert not missing, f"{section}: no stage depends on {sorted(missing)}"
