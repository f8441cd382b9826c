"""params.yaml and the presets: every section validates, and the presets cannot drift from it."""

from pathlib import Path

import pytest

from mofe_ood import evaluate, register, train
from mofe_ood.finetune import config as finetune_config
from mofe_ood.params import ParamError, load

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "params.yaml", *sorted((ROOT / "presets").glob("*.yaml"))]


def keys(tree: dict, prefix: str = "") -> set[str]:
    """Every key path, e.g. `train.mofe.router`; values that are free-form maps count as leaves."""
    out = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict) and key not in ("ood", "extra_ood", "backbone_kwargs"):
            out |= keys(value, path + ".")
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_section_validates(path):
    params = load(path)
    train.config(params)
    finetune_config(params)
    evaluate.check(params, ["frozen", *train.trained_variants(params)])
    assert register.config(params).variant in train.trained_variants(params)


@pytest.mark.parametrize("path", FILES[1:], ids=lambda p: p.name)
def test_presets_have_exactly_the_keys_of_params_yaml(path):
    assert keys(load(path)) == keys(load(ROOT / "params.yaml"))


def test_the_code_defaults_are_the_params_yaml_values():
    """train.DEFAULTS (what a missing key takes) and params.yaml say the same."""
    params = load(ROOT / "params.yaml")
    assert train.config(params) == train.config({"train": {}})


def test_an_unknown_variant_to_evaluate_names_the_param():
    params = load(ROOT / "params.yaml")
    params["evaluate"]["variants"].append("mofe_finetune")  # not trained: finetune is off
    with pytest.raises(ParamError, match="evaluate.variants: 'mofe_finetune'"):
        evaluate.check(params, ["frozen", *train.trained_variants(params)])


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_mofe_validate_finds_no_problem_in_the_shipped_params(path):
    from mofe_ood import validate

    assert validate.problems(load(path)) == []


def test_mofe_validate_names_every_bad_key_at_once(capsys):
    from mofe_ood.cli import main

    code = main(["validate", "--set", "register.variantt=mofe", "--set", "prepare.id.classes=[0]",
                 "--set", "extract.image_size=8", "--set", "evaluate.tpr=2", "--set", "finetune.device=tpu",
                 "--set", "prepare.ood.mine={source: imagefolder, group: near, path: /x}"])
    err = capsys.readouterr().err
    assert code == 2 and "5 problem(s)" in err
    for expected in ("prepare.id.classes: [0] must hold at least 2 distinct classes","register.variantt: not a known key (did you mean register.variant?)",
                     "extract.image_size: 8 must be an integer >= 16", "evaluate.tpr: 2 is above the maximum",
                     "finetune.device: 'tpu' is not one of 'auto', 'cpu', 'cuda'"):
        assert expected in err
    assert "prepare.ood.mine" not in err  # OOD sets are the user's to name
