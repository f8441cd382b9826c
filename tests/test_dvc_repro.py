"""The user's main path: `dvc repro` in a fresh clone runs the stages, a second run re-runs none."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_extract import TINY
from mofe_ood.params import load, merged

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sh(*cmd, cwd):
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    dest = tmp_path_factory.mktemp("clone")
    files = sh("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    params = merged(load(ROOT / "params.yaml"), TINY)
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


def test_a_param_change_reruns_only_what_depends_on_it(clone):
    sh("dvc", "repro", cwd=clone)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["extract"]["batch_size"] = 8
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc", "repro", cwd=clone)
    assert "Running stage 'extract'" in out and "Running stage 'prepare'" not in out
