"""dvc.yaml cannot drift from the code: its stages are the stage table's (mofe_ood.stages),
each depends on every module its code imports, and on every param that changes its result
(and on none that only says how to run)."""

from __future__ import annotations

from pathlib import Path

import yaml

from mofe_ood import stages as stage_table

ROOT = Path(__file__).resolve().parents[1]
# Files a stage uses without importing them: register logs serving/model.py by path as the
# served model's code.
USED_BY_PATH = {"register": {"serving/model"}}
# Keys that say how a stage runs, not what it computes: listing them would re-run the stage.
RUN_ONLY = {"extract": {"num_threads", "shards", "gpus"},
            "train": {"num_threads", "gpus", "processes", "checkpoint_dir"},
            "finetune": {"checkpoint_dir"}}


def closure(graph: dict[str, set[str]], name: str) -> set[str]:
    seen, todo = {name}, [name]
    while todo:
        for module in graph[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    return seen


def source_file(module: str) -> str:
    path = module.replace(".", "/")
    return f"{path}/__init__.py" if (ROOT / path).is_dir() else f"{path}.py"


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_has_the_stages_of_the_stage_table_in_its_order():
    assert list(dvc_stages()) == stage_table.names()
    for stage in stage_table.STAGES:
        body = dvc_stages()[stage.name]
        assert body["cmd"] == f"mofe {stage.name}", stage.name
        # What DVC re-runs the stage on is what its Kubeflow component is given (and cached on).
        listed = {p.split(".")[0] for p in body.get("params", []) if isinstance(p, str)}
        assert listed <= set(stage.sections), f"{stage.name}: dvc.yaml lists {sorted(listed)}, " \
                                              f"the table gives it {stage.sections}"
        assert (ROOT / source_file(stage.module)).is_file() and (ROOT / "components" / f"{stage.name}.py").is_file()


def test_each_stage_depends_on_exactly_the_modules_its_code_imports(import_graph):
    for stage, body in dvc_stages().items():
        listed = {d for d in body["deps"] if d.startswith("mofe_ood/")}
        expected = {source_file(m) for m in closure(import_graph, f"mofe_ood.{stage}")}
        expected |= {f"mofe_ood/{m}.py" for m in USED_BY_PATH.get(stage, ())}
        assert listed == expected, (f"{stage}: dvc.yaml misses {sorted(expected - listed)}, "
                                    f"lists more than it imports: {sorted(listed - expected)}")


def test_the_import_graph_follows_imports_inside_functions(import_graph, import_graph_of, tmp_path):
    """A module importing another only inside a function still depends on it."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg import b\n    return b\n")
    (package / "b.py").write_text("from . import c\nimport json\n")
    (package / "c.py").write_text("")
    assert import_graph_of(package) == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": set()}
    assert "mofe_ood.params" in closure(import_graph, "mofe_ood.prepare")


def test_params_are_listed_by_key_where_some_keys_only_say_how_to_run():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    listed = {p for body in dvc_stages().values() for p in body.get("params", []) if isinstance(p, str)}
    for section, run_only in RUN_ONLY.items():
        assert section not in listed, f"{section} is listed whole: its run-only keys would re-run it"
        keys = set(params[section])
        assert run_only <= keys, f"{section}: {sorted(run_only - keys)} are not keys of params.yaml"
        assert not {f"{section}.{k}" for k in run_only} & listed
        # Every other key changes the result: some stage must depend on it.
        missing = {k for k in keys - run_only if f"{section}.{k}" not in listed}
        assert not missing, f"{section}: no stage depends on {sorted(missing)}"
