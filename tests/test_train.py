import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mofe_ood import train
from mofe_ood.params import ParamError, merged
from mofe_ood import variants
from mofe_ood.training import loop

@pytest.fixture(scope="module")
def features(tmp_path_factory, synthetic_features):
    return synthetic_features(tmp_path_factory.mktemp("features"))


POOLED = [v for v, spec in variants.VARIANTS.items() if not spec.trunk]  # the heads on pooled features


@pytest.fixture(scope="module")
def trained(features, tmp_path_factory, train_params):
    models = tmp_path_factory.mktemp("run") / "models"
    summary = train.run(train_params(variants=POOLED), features, models)
    return models, summary


def val_data(features):
    with np.load(features / "val.npz") as f:
        return torch.from_numpy(f["features"]), torch.from_numpy(f["labels"])


def history(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_variant_writes_its_files_and_loads_back(features, trained):
    models, summary = trained
    x, y = val_data(features)
    assert sorted(summary) == sorted(POOLED)
    assert json.loads((models / "metrics.json").read_text()) == summary
    for variant in POOLED:
        folder = models / variant
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "history.csv", "model.safetensors"]
        model, cfg = variants.load_head(folder)
        assert cfg["variant"] == variant and cfg["classes"] == [f"class{i}" for i in range(6)]
        assert cfg["params"]["seed"] == 0 and cfg["params"]["train"]["epochs"] == 10
        with torch.no_grad():
            out = model(x)
        # the reloaded model predicts exactly what the trained one did on the last epoch
        assert float((out["logits"].argmax(1) == y).double().mean()) == cfg["val_accuracy"]
        assert cfg["val_accuracy"] == summary[variant]["val_accuracy"]
        weight, bias = model.classifier_weights()
        assert torch.allclose(out["logits"], out["feature"] @ weight.T + bias, atol=1e-5)
        rows = history(folder / "history.csv")
        assert float(rows[-1]["val_accuracy"]) == cfg["val_accuracy"]
        assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    with torch.no_grad():
        assert torch.equal(variants.load_head(models / "linear")[0](x)["feature"], x)
        assert variants.load_head(models / "mlp")[0](x)["feature"].shape == (len(x), 64)
        out = variants.load_head(models / "mofe_dynmix")[0](x)
    assert out["feature"].shape == (len(x), 8) and torch.equal(out["gates"].sum(1), torch.ones(len(x)))
    cfg = json.loads((models / "mofe" / "config.json").read_text())
    assert len(cfg["groups"]) == 6 and sorted(set(cfg["groups"])) == [0, 1, 2]


def test_history_records_phases_and_alphas(trained):
    models, _ = trained
    rows = history(models / "mofe_dynmix" / "history.csv")
    phases = [r["phase"] for r in rows]
    assert phases == ["base"] * 10 + ["expert0"] * 4 + ["expert1"] * 4 + ["expert2"] * 4 + ["router"] * 4
    alphas = np.array([[float(r[f"alpha_{c}"]) for c in range(6)] for r in rows])
    assert ((alphas >= 0.1 - 1e-9) & (alphas <= 1.0 + 1e-9)).all()
    assert len({tuple(a) for a in alphas}) > 1  # re-estimated every epoch
    plain = history(models / "mofe" / "history.csv")
    assert {float(r["alpha_0"]) for r in plain} == {0.2}
    assert "alpha_0" not in history(models / "linear" / "history.csv")[0]


def test_mofe_dynmix_is_at_least_as_accurate_as_the_linear_probe(trained):
    _, summary = trained
    assert summary["mofe_dynmix"]["val_accuracy"] >= summary["linear"]["val_accuracy"]
    assert summary["mlp"]["val_accuracy"] > summary["linear"]["val_accuracy"]  # the task is non-linear


def test_same_seed_same_weights_and_metrics(features, trained, tmp_path, train_params):
    models, summary = trained
    again = train.run(train_params(variants=["linear", "mofe_dynmix"]), features, tmp_path / "models")
    for variant in ("linear", "mofe_dynmix"):
        assert again[variant]["val_accuracy"] == summary[variant]["val_accuracy"]
        assert (tmp_path / "models" / variant / "model.safetensors").read_bytes() == \
            (models / variant / "model.safetensors").read_bytes()
        assert (tmp_path / "models" / variant / "history.csv").read_text() == \
            (models / variant / "history.csv").read_text()
    other = merged(train_params(variants=["linear"]), {"base": {"seed": 1}})
    train.run(other, features, tmp_path / "seed1")
    assert (tmp_path / "seed1" / "linear" / "model.safetensors").read_bytes() != \
        (models / "linear" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("stop_after", [12, 10])  # mid-phase 2; exactly at the end of phase 1
def test_a_resumed_run_equals_an_uninterrupted_one(features, trained, tmp_path, monkeypatch, stop_after,
                                                   train_params):
    models, summary = trained
    ckpt = tmp_path / "ckpt"
    p = train_params(variants=["mofe_dynmix"], checkpoint_dir=str(ckpt))
    save, calls = loop.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == stop_after:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(p, features, tmp_path / "models")
    assert (ckpt / "mofe_dynmix" / "state.json").is_file() and not (tmp_path / "models").exists()
    monkeypatch.setattr(loop, "save_checkpoint", save)
    resumed = train.run(p, features, tmp_path / "models")
    assert resumed["mofe_dynmix"]["epochs"] == 26
    assert (tmp_path / "models" / "mofe_dynmix" / "model.safetensors").read_bytes() == \
        (models / "mofe_dynmix" / "model.safetensors").read_bytes()
    assert (tmp_path / "models" / "mofe_dynmix" / "history.csv").read_text() == \
        (models / "mofe_dynmix" / "history.csv").read_text()
    assert not (ckpt / "mofe_dynmix").exists()  # done: the checkpoint is removed


def test_checkpoint_of_other_params_is_ignored(features, tmp_path, train_params):
    ckpt = tmp_path / "ckpt"
    small = train_params(variants=["linear"], epochs=2, checkpoint_dir=str(ckpt))
    train.run(small, features, tmp_path / "a")
    (ckpt / "linear").mkdir(parents=True)  # left behind by a run of other params
    (ckpt / "linear" / "state.json").write_text(json.dumps({"fingerprint": "other", "step": 0, "epoch": 1}))
    train.run(small, features, tmp_path / "b")
    assert (tmp_path / "a" / "linear" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "linear" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("mofe", [{"training": "joint"}, {"router": "soft", "top_k": 2},
                                  {"groups": "agglomerative", "group_table": [0, 0, 1, 1, 2, 2]}])
def test_mofe_options_train_and_load(features, tmp_path, mofe, train_params):
    p = train_params(variants=["mofe"], epochs=3, expert_epochs=1, router_epochs=1, mofe=mofe)
    summary = train.run(p, features, tmp_path / "models")
    model, cfg = variants.load_head(tmp_path / "models" / "mofe")
    if "group_table" in mofe:
        assert cfg["groups"] == [0, 0, 1, 1, 2, 2]
    x, _ = val_data(features)
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out["gates"].sum(1), torch.ones(len(x)))
    assert summary["mofe"]["epochs"] == (3 if mofe.get("training") == "joint" else 3 + 3 + 1)


@pytest.mark.parametrize("override, name", [
    ({"mofe": {"num_experts": 7}}, "train.mofe.num_experts"),
    ({"dynmix": {"alpha_min": 2.0, "alpha_max": 1.0}}, "train.dynmix.alpha_min"),
    ({"mofe": {"expert": "transformer"}}, "train.mofe.expert"),
    ({"mofe": {"expert": "block"}, "variants": ["mofe"]}, "train.mofe.expert"),  # checked where MLP experts train
    ({"variants": ["linear", "mofe_fancy"]}, "train.variants"),
    ({"variants": []}, "train.variants"),
    ({"mofe": {"router": "random"}}, "train.mofe.router"),
    ({"mofe": {"top_k": 2}}, "train.mofe.top_k"),
    ({"mofe": {"training": "sometimes"}}, "train.mofe.training"),
    ({"mofe": {"groups": "wordnet"}}, "train.mofe.groups"),
    ({"mofe": {"group_table": [0, 1, 2]}}, "train.mofe.group_table"),
    ({"lr": -0.001}, "train.lr"),
    ({"epochs": 0}, "train.epochs"),
    ({"batch_size": 2.5}, "train.batch_size"),
    ({"label_smoothing": 1.0}, "train.label_smoothing"),
    ({"dynmix": {"difficulty": "vibes"}}, "train.dynmix.difficulty"),
    ({"dynmix": {"momentum": 1.0}}, "train.dynmix.momentum"),
])
def test_bad_params_fail_before_training_naming_the_param(features, tmp_path, monkeypatch, override, name,
                                                         train_params):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "train_sharing_phase_one", no_training)
    with pytest.raises(ParamError, match=name.replace(".", r"\.")):
        train.run(train_params(**override), features, tmp_path / "models")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("dynmix", [{"difficulty": "counts"}, {"alpha_min": 0.4, "alpha_max": 0.4}])
def test_dynmix_options(features, tmp_path, dynmix, train_params):
    p = train_params(variants=["mofe_dynmix"], epochs=3, expert_epochs=1, router_epochs=1, dynmix=dynmix)
    train.run(p, features, tmp_path / "models")
    alphas = {tuple(float(r[f"alpha_{c}"]) for c in range(6))
              for r in history(tmp_path / "models" / "mofe_dynmix" / "history.csv")}
    # balanced counts -> every class at alpha_max, for good; equal bounds -> plain mixup
    assert alphas == {(dynmix.get("alpha_max", 1.0),) * 6}


@pytest.mark.parametrize("accuracy_from", ["val", "train"])
def test_dynmix_alphas_follow_the_accuracy_of_train_dynmix_accuracy_from(tmp_path, accuracy_from,
                                                                         synthetic_features, train_params):
    """Classes 0 and 1 are easy on train, and the hardest on validation, whose labels of the two
    are swapped (accuracy ~0): their alphas go to alpha_max from val, near alpha_min from train."""
    features = synthetic_features(tmp_path / "features", blobs=1)
    with np.load(features / "val.npz") as f:
        x, y = f["features"], f["labels"]
    np.savez(features / "val.npz", features=x, labels=np.choose(y, [1, 0, 2, 3, 4, 5]))
    p = train_params(variants=["mofe_dynmix"], epochs=3, expert_epochs=1, router_epochs=1,
                     dynmix={"accuracy_from": accuracy_from})
    low, high = p["train"]["dynmix"]["alpha_min"], p["train"]["dynmix"]["alpha_max"]
    train.run(p, features, tmp_path / "models")
    rows = history(tmp_path / "models" / "mofe_dynmix" / "history.csv")
    assert len(rows) == 7
    for row in rows[1:]:  # the first epoch runs on the counts' alphas (balanced: all alpha_max)
        swapped = [float(row[f"alpha_{c}"]) for c in (0, 1)]
        if accuracy_from == "val":
            assert min(swapped) > low + 0.9 * (high - low), row
        else:
            assert max(swapped) < low + 0.1 * (high - low), row


def test_the_train_section_is_params_yaml_with_no_default_in_code(train_params):
    p = train_params()
    cfg = train.config(p)
    assert cfg.mofe.num_experts == 3 and cfg.dynmix.alpha_max == 1.0 and cfg.epochs == 10
    with pytest.raises(ParamError, match=r"train\.epoch: not a known key \(did you mean train\.epochs\?\)"):
        train.config(merged(p, {"train": {"epoch": 3}}))
    del p["train"]["mofe"]["router"]
    with pytest.raises(ParamError, match=r"train\.mofe\.router: missing"):
        train.config(p)


@pytest.fixture
def toy_expert():
    """A new expert kind, registered as a user would: one class with the shared signature."""
    from torch import nn

    from mofe_ood import mofe

    @mofe.register_expert("toy_residual")
    class ToyResidual(nn.Module):
        """x + Wx: the smallest residual expert."""

        reads_tokens = False

        def __init__(self, dim, hidden_features=None, drop=0.0, init_from=None):
            super().__init__()
            self.fc = nn.Linear(dim, dim)
            if init_from is not None:
                self.load_state_dict(init_from.state_dict())

        def forward(self, x):
            return x + self.fc(x)

    yield ToyResidual
    del mofe.EXPERTS["toy_residual"]


def test_a_registered_expert_kind_trains_a_mofe_and_loads_back(features, tmp_path, train_params, toy_expert):
    p = train_params(variants=["mofe"], epochs=4, expert_epochs=2, router_epochs=2, mofe={"expert": "toy_residual"})
    summary = train.run(p, features, tmp_path / "models")
    assert summary["mofe"]["epochs"] == 4 + 3 * 2 + 2
    model, cfg = variants.load_head(tmp_path / "models" / "mofe")
    assert cfg["architecture"]["expert"] == "toy_residual"
    assert [type(e) for e in model.experts] == [toy_expert] * 3
    x, y = val_data(features)
    with torch.no_grad():
        out = model(x)
    accuracy = float((out["logits"].argmax(1) == y).double().mean())
    assert accuracy == cfg["val_accuracy"] and accuracy > 0.5  # 6 classes: chance is 1/6
    w = [e.fc.weight for e in model.experts]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # each expert trained on its own group


# ---------------------------------------------------------------- block experts on the cached trunk

@pytest.fixture(scope="module")
def trunk_run(tmp_path_factory, prepared_images, train_params):
    """A real extract (EfficientNet-Lite0, random weights, 32 px, trunk cached) of 4 tiny classes,
    then the trunk variants trained on it: the paper's three phases on cached activations."""
    from mofe_ood import extract

    root = tmp_path_factory.mktemp("trunk")
    params = train_params(variants=["mofe_block", "top", "mofe_block_dynmix"], batch_size=16, mofe={"num_experts": 2},
                          top={"epochs": 2, "expert_epochs": 1, "router_epochs": 1, "lr": 1e-3})
    params["extract"].update(weights="random", image_size=32, batch_size=16, top_blocks=1)
    data = prepared_images(root / "prepared")
    extract.run(params, data, root / "features")
    summary = train.run(params, root / "features", root / "models", data)
    return root, params, summary


def test_trunk_variants_train_the_three_phases_on_cached_activations(trunk_run):
    from mofe_ood.splits import load_features, load_split, load_trunk

    root, params, summary = trunk_run
    info = json.loads((root / "features" / "info.json").read_text())
    assert info["trunk"] == {"top_blocks": 1, "shape": [192, 1, 1], "dtype": "float16"}
    assert load_trunk(root / "features", "train").dtype == np.float16
    phases = [r["phase"] for r in history(root / "models" / "mofe_block_dynmix" / "history.csv")]
    assert phases == ["base", "base", "expert0", "expert1", "router"]
    assert [r["phase"] for r in history(root / "models" / "top" / "history.csv")] == ["base", "base"]
    assert set(summary) == {"top", "mofe_block", "mofe_block_dynmix"}
    # An image model: the frozen trunk + the trained experts, its routed features in features/.
    model, cfg = variants.load_image_model(root / "models" / "mofe_block_dynmix")
    assert cfg["finetuned"]["mofe"]["top_blocks"] == 1 and len(model.mofe.experts) == 2
    assert cfg["finetuned"]["mofe"]["router_dim"] == 192
    frozen = variants.frozen_backbone("tf_efficientnet_lite0", "random", 32, params["base"]["seed"])
    for k, v in frozen.state_dict().items():  # the trunk stays the frozen backbone's
        torch.testing.assert_close(model.backbone.state_dict()[k], v)
    experts = [e.state_dict() for e in model.mofe.experts]
    assert any(not torch.equal(experts[0][k], experts[1][k]) for k in experts[0])  # trained apart
    from mofe_ood.backbones import image_batch, preprocess_config

    images = load_split(root / "prepared", "ood")
    with torch.inference_mode():
        served = model(image_batch(images, 0, len(images), preprocess_config(model.backbone, 32)))["feature"]
    cached, _ = load_features(root / "models" / "mofe_block_dynmix" / "features", "ood")
    # features/ come from the float16 cache of the folded backbone: equal up to that rounding
    np.testing.assert_allclose(served.numpy(), cached, rtol=0, atol=2e-3 * np.abs(cached).max())
    head, _ = variants.load_head(root / "models" / "mofe_block_dynmix")
    assert head(torch.from_numpy(cached))["logits"].shape == (len(cached), 4)


def test_the_routed_trunk_variants_start_phase_2_from_top(trunk_run):
    """The paper's experts start from the fine-tuned baseline: both MoFE variants' phase 1 is `top`
    (listed after one of them), so their ablation differs in phase 2's mixup alone. Phase 2 and 3
    leave the classifier alone: it stays top's, to the bit."""
    root = trunk_run[0]
    model = {v: variants.load_image_model(root / "models" / v)[0] for v in ("top", "mofe_block", "mofe_block_dynmix")}
    keys = ("phase", "loss", "lr", "val_accuracy")
    top_rows = [{k: r[k] for k in keys} for r in history(root / "models" / "top" / "history.csv")]
    for v in ("mofe_block", "mofe_block_dynmix"):
        torch.testing.assert_close(model[v].mofe.classifier.weight, model["top"].mofe.classifier.weight,
                                   rtol=0, atol=0)
        rows = history(root / "models" / v / "history.csv")
        assert [{k: r[k] for k in keys} for r in rows[:2]] == top_rows
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    # ...and then trained apart: the experts differ between the two variants
    a, b = model["mofe_block"].mofe.experts[0].state_dict(), model["mofe_block_dynmix"].mofe.experts[0].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("training", ["phased", "joint"])
def test_top_is_trained_once_per_seed_and_only_for_phased_routed_trunk_variants(monkeypatch, train_params,
                                                                              training):
    from mofe_ood.training import head_training
    from mofe_ood.training.settings import train_config

    calls = []

    def fake_train(variant, cfg, data, seed, ckpt_dir, base=None, **inputs):
        calls.append((variant, seed, None if base is None else base[0]))
        return f"{variant}@{seed}", {}, []

    monkeypatch.setattr(head_training, "train_variant", fake_train)
    cfg, phase_one = train_config(train_params(mofe={"training": training})), {}
    for variant in ["mofe_block", "linear", "top", "mofe_block_dynmix"]:
        for seed in (0, 1):
            model, _, _ = head_training.train_sharing_phase_one(variant, cfg, None, seed, lambda name: None,
                                                                phase_one)
            assert model == (f"top@{seed}" if variant == "top" else f"{variant}@{seed}")
    if training == "phased":
        assert calls == [("top", 0, None), ("mofe_block", 0, "top@0"), ("top", 1, None), ("mofe_block", 1, "top@1"),
                         ("linear", 0, None), ("linear", 1, None),
                         ("mofe_block_dynmix", 0, "top@0"), ("mofe_block_dynmix", 1, "top@1")]
    else:  # joint: no phase 1 to share; `top` itself is still trained once per seed
        assert calls == [("mofe_block", 0, None), ("mofe_block", 1, None), ("linear", 0, None), ("linear", 1, None),
                         ("top", 0, None), ("top", 1, None), ("mofe_block_dynmix", 0, None),
                         ("mofe_block_dynmix", 1, None)]


def test_a_vit_trunk_variant_routes_on_the_cls_token_width_not_the_token_count(train_params):
    """A ViT's cached trunk is N x T x D: the router reads the CLS token (D wide). It used to be
    built T wide (shape[1], right for a CNN's N x C x H x W only), so DINOv2 crashed in phase 1."""
    from mofe_ood.backbones import create_backbone, pooled_features, trunk_of
    from mofe_ood.training.data import Data
    from mofe_ood.training.head_training import train_variant
    from mofe_ood.training.settings import train_config

    torch.manual_seed(0)
    vit = create_backbone("vit_small_patch14_dinov2", "random", 28, num_classes=0, depth=2, embed_dim=32,
                          num_heads=2).eval()
    images, labels = torch.randn(16, 3, 28, 28), torch.arange(4).repeat(4)
    with torch.no_grad():
        tokens, pooled = trunk_of(vit, images, 1), pooled_features(vit, images)
    assert tokens.shape == (16, 5, 32)  # 4 patches + CLS, 32 wide: T != D, as for every real ViT
    classes = list("abcd")
    cfg = train_config(train_params(mofe={"num_experts": 2}, top={"epochs": 1, "expert_epochs": 1,
                                                                  "router_epochs": 1, "lr": 1e-3}))
    model, arch, history = train_variant(
        "mofe_block", cfg, Data(pooled, labels, pooled, labels, classes), 0,
        trunk=Data(tokens, labels, tokens, labels, classes), backbone=vit,
        backbone_spec={"backbone": "vit_small_patch14_dinov2", "image_size": 28, "top_blocks": 1})
    assert model.router.fc.in_features == arch["router_dim"] == 32
    assert [r["phase"] for r in history] == ["base", "expert0", "expert1", "router"]
    assert model(tokens)["logits"].shape == (16, 4)


def test_trunk_variants_need_the_cached_trunk(tmp_path, prepared_images, train_params):
    from mofe_ood import extract

    params = train_params(variants=["top"])
    params["extract"].update(weights="random", image_size=32, top_blocks=0)
    data = prepared_images(tmp_path / "prepared")
    extract.run(params, data, tmp_path / "features")
    with pytest.raises(ParamError, match="extract.top_blocks >= 1"):
        train.run(params, tmp_path / "features", tmp_path / "models", data)


def test_a_trunk_variant_is_served_through_its_image_model(trunk_run, tmp_path):
    """bundle/detector load a trunk variant as a fine-tuned one (torch runtime): images -> the
    frozen trunk -> the routed expert -> the head; the KNN score evaluate computes, to the
    float16 cache's rounding, and the same numbers after a bundle round trip."""
    from mofe_ood import scores
    from mofe_ood.serving import bundle
    from mofe_ood.splits import load_features, load_split

    root, params, _ = trunk_run
    variant, models = "mofe_block_dynmix", root / "models"
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "thresholds.json").write_text(json.dumps(
        {variant: {"score": "knn", "hyper": {"k": 3}, "tpr": 0.95, "threshold": -0.5}}))
    detector = bundle.from_pipeline(variant, models, root / "features", tmp_path / "reports", params)
    assert detector.finetuned
    images = load_split(root / "prepared", "ood").images
    got = detector.predict(images)
    head, _ = variants.load_head(models / variant)
    with torch.inference_mode():
        train_out, ood_out = (head(torch.from_numpy(load_features(models / variant / "features", s)[0]))
                              for s in ("train", "ood"))
    knn = scores.make_score("knn", k=3).fit(train_out["feature"].numpy(), None)
    np.testing.assert_allclose(got.ood_score, knn.score(ood_out["feature"].numpy()), atol=2e-3)
    loaded = bundle.load(bundle.save(detector, tmp_path / "bundle", runtime="onnxruntime"))
    assert loaded.session is None  # an image model runs on torch, whatever serve.runtime says
    np.testing.assert_array_equal(loaded.predict(images).ood_score, got.ood_score)
