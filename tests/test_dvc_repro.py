"""The user's main path: `dvc repro` in a fresh clone runs the stages, a second run re-runs none.

Slow (whole `dvc repro` runs, on the smallest run conftest.py's `small_run` gives).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def sh(*cmd, cwd):
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    env.pop("MLFLOW_TRACKING_URI", None)  # the clone's own embedded registry
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory, small_run):
    dest = tmp_path_factory.mktemp("clone")
    files = sh("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    params = small_run()
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone", cwd=dest)
    return dest


def test_dvc_repro_runs_every_stage_then_nothing(clone):
    first = sh("dvc", "repro", cwd=clone)
    assert "Running stage 'prepare'" in first and "Running stage 'extract'" in first
    assert (clone / "data" / "features" / "train.npz").is_file()
    assert (clone / "dvc.lock").is_file()
    second = sh("dvc", "repro", cwd=clone)
    assert "Running stage" not in second
    assert "up to date" in second


def test_a_fresh_clone_of_a_committed_run_registers_a_champion_once(clone, tmp_path):
    """The user's first `make run`: dvc.lock is committed and matches, yet register must run
    (its registry-independent output is missing), and a second run adds no version."""
    from mlflow import MlflowClient

    sh("dvc", "repro", cwd=clone)
    sh("git", "add", "dvc.lock", "reports/headline.json", cwd=clone)  # what a user commits after a run
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock", "--allow-empty", cwd=clone)
    fresh = tmp_path / "fresh"
    sh("git", "clone", "-q", str(clone), str(fresh), cwd=tmp_path)
    first = sh("dvc", "repro", cwd=fresh)
    assert "Running stage 'register'" in first
    name = yaml.safe_load((fresh / "params.yaml").read_text())["register"]["model_name"]
    uri = f"sqlite:///{fresh / 'mlflow.db'}"
    client = MlflowClient(uri, uri)  # the registry too: another test may have set mlflow's global one
    champion = client.get_registered_model(name).aliases["champion"]
    candidate = json.loads((fresh / "reports" / "candidate.json").read_text())
    tags = client.get_model_version(name, champion).tags
    assert (tags["variant"], float(tags["gate_value"])) == (candidate["variant"], candidate["gate_value"])
    assert sh("git", "status", "--porcelain", cwd=fresh) == ""  # dvc.lock as committed
    second = sh("dvc", "repro", cwd=fresh)
    assert "Running stage" not in second
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == [champion]


def test_a_param_change_reruns_only_what_depends_on_it(clone):
    sh("dvc", "repro", cwd=clone)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["extract"]["batch_size"] = 8
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc", "repro", cwd=clone)
    assert "Running stage 'extract'" in out and "Running stage 'prepare'" not in out


def stage_names(status_json: str) -> set[str]:
    return {name.rpartition(":")[2] for name in json.loads(status_json or "{}")}


def test_a_code_change_reruns_the_stages_that_import_it_and_a_thread_count_none(clone):
    sh("dvc", "repro", cwd=clone)
    assert stage_names(sh("dvc", "status", "--json", cwd=clone)) == set()
    params_file = clone / "params.yaml"
    before = params_file.read_text()
    params = yaml.safe_load(before)
    params["train"]["num_threads"] = 2  # how to run, not what: nothing re-runs
    params["train"]["gpus"] = 3
    params["extract"]["shards"] = 4
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    assert stage_names(sh("dvc", "status", "--json", cwd=clone)) == set()
    params_file.write_text(before)
    code = clone / "mofe_ood" / "mofe.py"
    source = code.read_text()
    code.write_text(source + "\n# a change\n")
    try:
        assert stage_names(sh("dvc", "status", "--json", cwd=clone)) == {"train", "evaluate", "register"}
    finally:
        code.write_text(source)


def test_an_experiment_registers_a_challenger_and_never_moves_champion(clone):
    from mlflow import MlflowClient

    sh("dvc", "repro", cwd=clone)
    uri = f"sqlite:///{clone / 'mlflow.db'}"
    client = MlflowClient(uri, uri)  # the registry too: another test may have set mlflow's global one
    name = yaml.safe_load((clone / "params.yaml").read_text())["register"]["model_name"]
    champion = client.get_registered_model(name).aliases["champion"]
    versions = {v.version for v in client.search_model_versions(f"name = '{name}'")}
    # --temp: DVC runs the stages in a copy under .dvc/tmp; the registry stays the project's.
    # Fewer epochs for every trained variant, so whichever `register.variant: auto` picks is new.
    out = sh("dvc", "exp", "run", "--temp", "-S", "train.epochs=1", "-S", "train.top.epochs=1", cwd=clone)
    assert "Running stage 'train'" in out
    aliases = client.get_registered_model(name).aliases
    assert aliases["champion"] == champion
    (new,) = [v for v in client.search_model_versions(f"name = '{name}'") if v.version not in versions]
    assert new.tags["dvc_experiment"] and new.tags["decision"] == "challenger"
    assert aliases["challenger"] == new.version
    assert not list((clone / ".dvc" / "tmp").rglob("mlflow.db"))


def test_dvc_plots_draw_one_roc_curve_per_variant_and_ood_set(clone):
    sh("dvc", "repro", cwd=clone)
    rendered = json.loads(sh("dvc", "plots", "show", "--json", cwd=clone))["data"]
    roc = {name for name in rendered if name.startswith("reports/roc/")}
    histories = ("training loss", "validation accuracy")  # dvc.yaml's plot ids: one quantity per chart
    assert all(name.startswith("reports/roc/") or name in histories for name in rendered)  # no duplicates
    params = yaml.safe_load((clone / "params.yaml").read_text())
    sets = {*params["prepare"]["ood"], *params["evaluate"]["extra_ood"]}
    assert roc == {f"reports/roc/{v}__{s}.json" for v in params["evaluate"]["variants"] for s in sets}
    for name in roc:  # each plot one curve: fpr from 0 to 1, tpr rising with it
        (plot,) = rendered[name]
        values = plot["content"]["data"]["values"]
        assert values[0]["fpr"] == 0.0 and values[-1]["fpr"] == 1.0
        assert [p["tpr"] for p in values] == sorted(p["tpr"] for p in values)
    for chart in histories:  # every variant's history.csv is a line of each chart
        (plot,) = rendered[chart]
        drawn = {row["filename"].split("/")[0] for row in plot["content"]["data"]["values"]}
        assert drawn == set(params["train"]["variants"]), chart


def readme_exp_show() -> list[list[str]]:
    """The `dvc exp show` commands README.md tells users to run (its `$ dvc exp show ...` lines)."""
    import re
    import shlex

    lines = re.findall(r"^\$ (dvc exp show .*)$", (ROOT / "README.md").read_text(), re.M)
    assert lines
    return [shlex.split(line, comments=True) for line in lines]


def test_an_experiment_compares_with_the_commit_on_the_headline_numbers(clone):
    import csv
    import io
    import json

    sh("dvc", "repro", cwd=clone)
    # reports/headline.json is DVC's metrics and is committed with dvc.lock; the rest is DVC's cache's
    ignored = subprocess.run(["git", "check-ignore", "reports/headline.json", "reports/metrics.json"], cwd=clone,
                             capture_output=True, text=True).stdout.split()
    assert ignored == ["reports/metrics.json"]
    sh("git", "add", "dvc.lock", "reports/headline.json", cwd=clone)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline", cwd=clone)
    base = json.loads((clone / "reports" / "headline.json").read_text())
    # train.top.epochs: the phase 1 of the variant validation registers here (top)
    sh("dvc", "exp", "run", "--temp", "-n", "two-epochs", "-S", "train.top.epochs=2", cwd=clone)
    diff = json.loads(sh("dvc", "exp", "diff", "HEAD", "two-epochs", "--json", cwd=clone))
    changes = diff["metrics"]["reports/headline.json"]
    assert changes["registered.near_auroc"]["old"] == base["registered"]["near_auroc"]
    assert changes["registered.near_auroc"]["new"] != base["registered"]["near_auroc"]
    # the commit's numbers load (no "failed to load some metrics")
    shown = json.loads(sh("dvc", "metrics", "show", "--json", "-a", cwd=clone))
    assert all("error" not in rev.get("data", {}).get("reports/headline.json", {}) for rev in shown.values())
    # README's commands: numbers for the commit and the experiment, in under 40 columns
    for command in readme_exp_show():
        table = list(csv.DictReader(io.StringIO(sh(*command, "--csv", cwd=clone))))
        assert len(table[0]) < 40, command
    table = list(csv.DictReader(io.StringIO(sh(*readme_exp_show()[0], "--csv", cwd=clone))))
    assert "train.top.epochs" in table[0] and not any(c.startswith("mofe_block_dynmix.") for c in table[0])
    rows = {r["Experiment"] or r["rev"]: r for r in table}
    assert float(rows["two-epochs"]["registered.near_auroc"]) == pytest.approx(
        changes["registered.near_auroc"]["new"], abs=1e-4)
    (commit,) = [r for name, r in rows.items() if name not in ("two-epochs", "workspace")]
    assert float(commit["registered.near_auroc"]) == pytest.approx(base["registered"]["near_auroc"], abs=1e-4)
