"""Data-parallel training (mofe_ood/training/distributed.py): 2 gloo processes under torchrun train the
same weights as one process.

Tolerance 1e-5 (absolute, weights and every history column): float32 rounding
only. Summing two ranks' weighted gradients instead of one batch's gradient
changes the summation order, ~1e-7 per step, and it stays ~1e-7 over this run
(measured: <= 2e-7). A real mismatch (another mixup partner, another dropout
mask, a per-rank mean instead of the global one) moves the weights by ~1e-2.
Val accuracies must be equal: a tiny weight difference flips no prediction here
(and a flip would change the Dynamic-beta alphas and show up in the weights).
"""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mofe_ood import train
from mofe_ood.training import distributed

VARIANTS = ["mlp", "mofe_dynmix"]
# batch 33 of 600 rows splits 16 / 17; with groups of 100 / 200 / 300 rows, phase 2 of expert 0
# ends with a batch of 1 row: one rank holds none of it.
DDP = {"variants": VARIANTS, "batch_size": 33, "mofe": {"group_table": [0, 1, 1, 2, 2, 2]}}
ATOL = 1e-5


def history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def features(tmp_path_factory, synthetic_features):
    # harder than test_train's blobs: accuracies well below 1, so they can tell runs apart
    return synthetic_features(tmp_path_factory.mktemp("features"), dim=6, blobs=5)


@pytest.mark.slow
def test_two_gloo_processes_train_what_one_process_does(features, tmp_path, monkeypatch, train_params):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the workers use gloo on the CPU, also on a GPU machine
    one = train.run(train_params(**DDP), features, tmp_path / "one")
    two = train.run(train_params(processes=2, **DDP), features, tmp_path / "two")  # torchrun, 2 processes

    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted([*VARIANTS, "metrics.json"])
    assert json.loads((tmp_path / "two" / "metrics.json").read_text()) == two
    for variant in VARIANTS:
        assert two[variant]["val_accuracy"] == one[variant]["val_accuracy"]
        assert two[variant]["epochs"] == one[variant]["epochs"]
        a = load_file(tmp_path / "one" / variant / "model.safetensors")
        b = load_file(tmp_path / "two" / variant / "model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=0, msg=f"{variant} {name}")
        rows_one = history(tmp_path / "one" / variant / "history.csv")
        rows_two = history(tmp_path / "two" / variant / "history.csv")
        assert [r.keys() for r in rows_two] == [r.keys() for r in rows_one]
        for r1, r2 in zip(rows_one, rows_two, strict=True):
            assert r2["phase"] == r1["phase"] and r2["val_accuracy"] == r1["val_accuracy"]
            for key in r1.keys() - {"phase"}:
                assert float(r2[key]) == pytest.approx(float(r1[key]), abs=ATOL), (variant, r1["epoch"], key)
        cfg_one = json.loads((tmp_path / "one" / variant / "config.json").read_text())
        cfg_two = json.loads((tmp_path / "two" / variant / "config.json").read_text())
        assert cfg_two["params"]["train"]["processes"] == 2
        cfg_two["params"]["train"]["processes"] = None
        assert cfg_two == cfg_one


def test_global_batch_dropout_is_the_rank_rows_of_one_process_mask():
    x = torch.randn(33, 16)
    torch.manual_seed(5)
    whole = F.dropout(x, 0.3, True)
    parts = []
    for rank in range(2):
        rows = distributed.World(rank=rank, size=2).part(33)
        model = distributed.use_global_batch_dropout(torch.nn.Sequential(torch.nn.Dropout(0.3))).train()
        torch.manual_seed(5)
        with distributed.global_batch(model, rows, 33):
            parts.append(model(x[rows]))
        assert model[0].rows is None  # the rows hold for that block only
    assert torch.equal(torch.cat(parts), whole)
    torch.manual_seed(5)
    assert torch.equal(model(x), whole)  # outside a block: plain dropout


@pytest.mark.parametrize("size", [1, 2, 3])
def test_rank_parts_cover_every_batch_once(size):
    for n in range(0, 12):
        parts = [distributed.World(rank=r, size=size).part(n) for r in range(size)]
        assert [i for s in parts for i in range(n)[s]] == list(range(n))
        assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1


def test_how_many_processes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.processes(gpus=4, requested=None) == 1  # no GPU: one process, as always
    assert distributed.processes(gpus=1, requested=3) == 3     # forced: gloo on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.processes(gpus=4, requested=None) == 4
    assert distributed.processes(gpus=1, requested=None) == 1


def test_bad_process_count_fails_naming_the_param(features, tmp_path, train_params):
    from mofe_ood.params import ParamError

    with pytest.raises(ParamError, match=r"train\.processes"):
        train.run(train_params(processes=0), features, tmp_path / "models")
