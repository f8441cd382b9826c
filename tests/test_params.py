"""params.yaml and the presets: every section validates, presets are small overlays of params.yaml,
and `mofe validate` names every bad key at once."""

from pathlib import Path

import pytest
import yaml

from mofe_ood import validate
from mofe_ood.cli import main
from mofe_ood.params import ParamError, load, merged

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
FILES = [ROOT / "params.yaml", *PRESETS]
# Mappings whose keys the user names: their keys are values, not params.yaml's keys.
OPEN = ("ood", "extra_ood", "backbone_kwargs", "gpu_node_selector")


def keys(tree: dict, prefix: str = "") -> set[str]:
    """Every key path, e.g. `train.mofe.router`; free-form maps and their entries count as leaves."""
    out = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict) and key not in OPEN:
            out |= keys(value, path + ".")
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_mofe_validate_finds_no_problem_in_the_shipped_params(path):
    assert validate.problems(load(path)) == []


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_a_preset_is_an_overlay_of_params_yaml_keys_only(path):
    raw = yaml.safe_load(path.read_text())
    assert (path.parent / raw.pop("overlay_of")).resolve() == ROOT / "params.yaml"
    base = load(ROOT / "params.yaml")
    # Only keys params.yaml has (a typo would add a key no stage reads) ...
    assert keys(raw) <= keys(base), sorted(keys(raw) - keys(base))
    # ... and the merge keeps params.yaml's key set: the preset changes values, never the layout.
    assert keys(load(path)) == keys(base)
    # A preset holds only what differs: a key with params.yaml's value is noise.
    merged = load(path)
    for section, body in raw.items():
        for key, value in body.items():
            if not isinstance(value, dict):
                assert base[section][key] != value, f"{path.name}: {section}.{key} repeats params.yaml's value"
    assert merged["base"] == base["base"]
    if path.name == "full.yaml":
        assert merged["extract"]["backbone"] == "vit_base_patch14_dinov2"


def test_an_overlay_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "base.yaml").write_text("a: {x: 1, y: [1, 2], z: {p: 1, q: 2}}\nb: {k: v}\n")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "p.yaml").write_text("overlay_of: ../base.yaml\na: {y: [3], z: {q: 5}}\n")
    assert load(tmp_path / "presets" / "p.yaml") == {"a": {"x": 1, "y": [3], "z": {"p": 1, "q": 5}}, "b": {"k": "v"}}
    (tmp_path / "loop.yaml").write_text("overlay_of: loop.yaml\n")
    with pytest.raises(ParamError, match="overlays itself"):
        load(tmp_path / "loop.yaml")
    (tmp_path / "gone.yaml").write_text("overlay_of: nowhere.yaml\n")
    with pytest.raises(ParamError, match="nowhere.yaml' does not exist"):
        load(tmp_path / "gone.yaml")


def test_mofe_params_writes_the_merged_preset_for_dvc(tmp_path, capsys):
    out = tmp_path / "params.yaml"
    assert main(["params", "--params", str(ROOT / "presets" / "full.yaml"), "--set", "base.seed=3",
                 "--out", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    assert written == {**load(ROOT / "presets" / "full.yaml"), "base": {"seed": 3}}
    assert "overlay_of" not in written
    assert main(["params"]) == 0 and yaml.safe_load(capsys.readouterr().out) == load(ROOT / "params.yaml")


def test_an_unknown_variant_to_evaluate_names_the_param():
    params = load(ROOT / "params.yaml")
    params["evaluate"]["variants"].append("mofe_finetune")  # not trained: finetune is off
    assert any("evaluate.variants: 'mofe_finetune'" in line for line in validate.problems(params))


def test_mofe_validate_names_every_bad_key_at_once(capsys):
    code = main(["validate", "--set", "register.variantt=mofe", "--set", "prepare.id.classes=[0]",
                 "--set", "extract.image_size=8", "--set", "evaluate.tpr=2", "--set", "finetune.device=tpu",
                 "--set", "kfp.train_timeout=0", "--set", "trian.epochs=3",
                 "--set", "prepare.ood.mine={source: imagefolder, group: near, path: /x}"])
    err = capsys.readouterr().err
    assert code == 2 and "7 problem(s)" in err
    for expected in ("prepare.id.classes: [0] must hold at least 2 distinct classes",
                     "register.variantt: not a known key (did you mean register.variant?)",
                     "extract.image_size: 8 must be an integer >= 16", "evaluate.tpr: 2 is above the maximum",
                     "finetune.device: 'tpu' is not one of 'auto', 'cpu', 'cuda'",
                     "kfp.train_timeout: 0 is below the minimum 1", "trian: not a known key (did you mean train?)"):
        assert expected in err
    assert "prepare.ood.mine" not in err  # OOD sets are the user's to name


def test_mofe_validate_names_each_bad_value_of_one_section_on_its_own_line(capsys):
    # A config stops at its first bad value: validate sets each named key back and builds it again.
    code = main(["validate", "--set", "train.epochs=-1", "--set", "train.lr=-1", "--set", "train.batch_size=0",
                 "--set", "train.epocs=3", "--set", "train.lrr=2", "--set", "train.mofe.router=sideways"])
    err = capsys.readouterr().err
    lines = [line.strip() for line in err.splitlines()[1:]]
    assert code == 2 and "6 problem(s)" in err.splitlines()[0]
    assert sorted(lines) == sorted([
        "train.epochs: -1 is below the minimum 1", "train.lr: -1 is below the minimum 0",
        "train.batch_size: 0 is below the minimum 1",
        "train.epocs: not a known key (did you mean train.epochs?)",
        "train.lrr: not a known key (did you mean train.lr?)",
        "train.mofe.router: 'sideways' is not one of 'hard', 'soft'"])
    # a key with no close match lists what is allowed, once
    (line,) = validate.problems(merged(load(ROOT / "params.yaml"), {"base": {"zzz": 1}}))
    assert line == "base.zzz: not a known key (known: seed)"
