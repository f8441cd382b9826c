"""`mofe`: the stage table makes the commands; bad input is one line (exit 2), a bug keeps its
traceback, and `-v` shows every traceback. A new stage (CONTRIBUTING.md's recipe) is a stage
module, a component, a row of the stage table and a line of the pipeline function: the CLI runs
it, and the pipeline refuses to compile until its line is there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import mofe_ood
from mofe_ood import cli, stages
from mofe_ood.errors import UserError
from mofe_ood.params import load

ROOT = Path(__file__).resolve().parents[1]
PARAMS = str(ROOT / "params.yaml")


def test_every_stage_of_the_table_is_a_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    shown = capsys.readouterr().out
    for stage in stages.STAGES:
        assert stage.name in shown and stage.help[:40] in shown


# ------------------------------------------------------------------ errors


def failing_stage(monkeypatch, error: BaseException) -> None:
    """`mofe prepare` raises `error` (the stage's own code is not run)."""
    from mofe_ood import prepare

    def run(params):
        raise error

    monkeypatch.setattr(prepare, "run", run)


@pytest.mark.parametrize("error", [UserError("prepare.max_side: 3 is below the minimum 16"),
                                   FileNotFoundError("no such folder: /nowhere"),
                                   ConnectionError("no tracking server answers at http://127.0.0.1:1")])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, error):
    failing_stage(monkeypatch, error)
    assert cli.main(["prepare", "--params", PARAMS]) == 2
    err = capsys.readouterr().err
    assert err == f"mofe prepare: error: {error}\n"


def test_with_v_bad_input_shows_its_traceback_too(monkeypatch, capsys):
    failing_stage(monkeypatch, UserError("prepare.max_side: 3 is below the minimum 16"))
    assert cli.main(["-v", "prepare", "--params", PARAMS]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in run" in err
    assert err.endswith("mofe prepare: error: prepare.max_side: 3 is below the minimum 16\n")


@pytest.mark.parametrize("bug", [ValueError("could not broadcast shapes (3,) (4,)"), KeyError("splits"),
                                 TypeError("unsupported operand")])
def test_a_bug_is_not_dressed_as_bad_input(monkeypatch, bug):
    """A plain ValueError (numpy's, torch's, ours) is a bug: its traceback stays (Python prints it)."""
    failing_stage(monkeypatch, bug)
    with pytest.raises(type(bug)):
        cli.main(["prepare", "--params", PARAMS])


def test_bad_input_through_the_installed_entry_point(tmp_path):
    """The real process: one line on stderr, exit status 2, no traceback; a bad --set too."""
    for args, message in ((["prepare", "--params", "nowhere.yaml"], "params file 'nowhere.yaml' does not exist"),
                          (["prepare", "--params", PARAMS, "--set", "base.seed"], "--set 'base.seed': expected")):
        done = subprocess.run([sys.executable, "-m", "mofe_ood.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.startswith(f"mofe prepare: error: {message}")
        assert len(done.stderr.splitlines()) == 1, done.stderr


# ------------------------------------------------------------------ a new stage

TOY_STAGE = '''"""A toy stage: counts the variants evaluate wrote."""

import json
from pathlib import Path


def config(params: dict) -> float:
    return params["evaluate"]["tpr"]


def run(params: dict, reports_dir="reports", out_dir="reports/toy") -> dict:
    metrics = json.loads((Path(reports_dir) / "metrics.json").read_text())
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    summary = {"variants": len(metrics), "tpr": config(params)}
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary))
    return summary
'''
TOY_COMPONENT = '''"""Component `toy`."""

from kfp.dsl import Dataset, Input, Output

from components import component, sections


@component
def toy(base: str, evaluate: str, reports: Input[Dataset], summary: Output[Dataset]):
    from mofe_ood import toy as stage

    stage.run(sections(base=base, evaluate=evaluate), reports.path, summary.path)
'''


@pytest.fixture
def toy_stage(tmp_path, monkeypatch):
    """A stage `toy` after register: mofe_ood/toy.py, components/toy.py and a row of the table
    (written to a folder of this test, added to the two packages' search paths)."""
    import components

    for package, name, source in ((mofe_ood, "mofe_ood", TOY_STAGE), (components, "components", TOY_COMPONENT)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "toy.py").write_text(source)
        monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path / name)])
    toy = stages.Stage("toy", ("base", "evaluate"), "summarise the reports (a toy)",
                       stages.Resources(0.5, "1Gi", retries=0))
    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES, toy))
    yield toy
    for module in ("mofe_ood.toy", "components.toy"):
        sys.modules.pop(module, None)


def test_a_new_stage_is_a_command_of_the_cli(toy_stage, tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    (project / "reports").mkdir(parents=True)
    (project / "reports" / "metrics.json").write_text(json.dumps({"frozen": {}, "mofe": {}}))
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "summarise the reports (a toy)" in capsys.readouterr().out
    assert cli.main(["toy", "--params", PARAMS, "--set", "evaluate.tpr=0.9"]) == 0
    assert json.loads(capsys.readouterr().out) == {"variants": 2, "tpr": 0.9}
    assert json.loads((project / "reports" / "toy" / "summary.json").read_text())["variants"] == 2


# CONTRIBUTING.md's line of the toy stage in the pipeline function, after register's.
TOY_IMPORT = "from components.toy import toy as toy_op\n"
TOY_TASK = '''        if until == "register":
            return

        pod(toy_op(base=base, evaluate=evaluate, reports=reports.outputs["reports"]), "toy")
'''


def test_a_new_stage_is_a_step_of_the_pipeline(toy_stage, tmp_path, monkeypatch):
    """A row of the table alone: compiling says the pipeline function lacks it. With its line
    in the function (a copy of pipeline.py): a step wired to evaluate's reports, with its
    sections and pod."""
    import importlib.util

    import pipeline

    monkeypatch.setenv("MOFE_IMAGE", "registry.example.org/mofe-ood:test")
    params = load(ROOT / "params.yaml")
    with pytest.raises(TypeError, match="pipeline.py: the pipeline function disagrees with the stage table "
                                        r"\(mofe_ood/stages.py\): stage 'toy' has no task in the pipeline function"):
        pipeline.compile_ir(params, tmp_path / "pipeline.yaml")

    source = (ROOT / "pipeline.py").read_text()
    imports, end = "from components.validate import validate as validate_op\n", "\n    problems = wiring_problems("
    assert source.count(imports) == 1 and source.count(end) == 1  # where the recipe's lines go
    source = source.replace(imports, imports + TOY_IMPORT).replace(end, "\n" + TOY_TASK + end)
    (tmp_path / "pipeline_with_toy.py").write_text(source)
    spec_of = importlib.util.spec_from_file_location("pipeline_with_toy", tmp_path / "pipeline_with_toy.py")
    with_toy = importlib.util.module_from_spec(spec_of)
    spec_of.loader.exec_module(with_toy)
    out = with_toy.compile_ir(params, tmp_path / "pipeline.yaml")
    spec, _ = yaml.safe_load_all(out.read_text())
    task = spec["root"]["dag"]["tasks"]["toy"]
    assert task["inputs"]["artifacts"]["reports"]["taskOutputArtifact"] == {"outputArtifactKey": "reports",
                                                                             "producerTask": "evaluate"}
    assert task["inputs"]["parameters"] == {"base": {"componentInputParameter": "base"},
                                            "evaluate": {"componentInputParameter": "evaluate"}}
    resources = spec["deploymentSpec"]["executors"]["exec-toy"]["container"]["resources"]
    assert resources["resourceCpuRequest"] == "0.5" and resources["resourceMemoryLimit"] == "1Gi"
    assert "retryPolicy" not in task
