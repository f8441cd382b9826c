"""End-to-end fine-tuning on CPU: a tiny random-weight DINOv2 + MoFE with block experts, a few steps."""

import json

import numpy as np
import pytest
import torch

from mofe_ood import train, variants
from mofe_ood.params import ParamError, merged
from mofe_ood.training import finetuning, loop

@pytest.fixture(scope="module")
def data(tmp_path_factory, prepared_images):
    return prepared_images(tmp_path_factory.mktemp("ft") / "prepared")


@pytest.fixture(scope="module")
def finetuned(data, tmp_path_factory, finetune_params):
    models = tmp_path_factory.mktemp("ft_models")
    summary = finetuning.run(finetune_params(), data, models)
    return models, summary


def test_finetune_writes_a_loadable_model_and_features(data, finetuned):
    models, summary = finetuned
    out = models / "mofe_finetune"
    assert summary["mofe_finetune"]["epochs"] == 2 + 2 * 1 + 1
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["backbone.safetensors", "config.json", "features", "history.csv",
                            "mofe.safetensors", "model.safetensors"])
    model, cfg = variants.load_image_model(out)
    images = np.load(data / "val.npz")["images"]
    from mofe_ood.backbones import Preprocess
    from mofe_ood.backbones import preprocess

    x = preprocess(images, Preprocess(28, tuple(cfg["finetuned"]["mean"]), tuple(cfg["finetuned"]["std"])))
    with torch.no_grad():
        result = model(x)
    saved = np.load(out / "features" / "val.npz")
    assert np.allclose(result["feature"].numpy(), saved["features"], atol=1e-4)
    assert torch.allclose(result["gates"].sum(1), torch.ones(len(x)))
    e0, e1 = (e.top[0].mlp.fc1.weight for e in model.mofe.experts)
    assert not torch.equal(e0, e1)  # each expert trained on its own group
    # the feature-based head over the routed features = the fine-tuned model's classifier
    head, _ = variants.load_head(out)
    with torch.no_grad():
        logits = head(torch.from_numpy(saved["features"]))["logits"]
    assert torch.allclose(logits, result["logits"], atol=1e-4)
    info = json.loads((out / "features" / "info.json").read_text())
    assert info["feature_dim"] == 32 and info["splits"]["ood"]["kind"] == "ood"


def test_finetune_resumes_to_the_same_result(data, finetuned, tmp_path, monkeypatch, finetune_params):
    models, _ = finetuned
    save, calls = loop.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # inside phase 2
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    p = finetune_params(checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(KeyboardInterrupt):
        finetuning.run(p, data, tmp_path / "models")
    monkeypatch.setattr(loop, "save_checkpoint", save)
    finetuning.run(p, data, tmp_path / "models")
    for name in ("backbone.safetensors", "mofe.safetensors", "history.csv"):
        assert (tmp_path / "models" / "mofe_finetune" / name).read_bytes() == \
            (models / "mofe_finetune" / name).read_bytes(), name


def test_finetune_needs_a_vit(data, tmp_path, finetune_params):
    p = merged(finetune_params(), {"extract": {"backbone": "tf_efficientnet_lite0"}})
    with pytest.raises(ParamError, match="extract.backbone"):
        finetuning.run(p, data, tmp_path)
    with pytest.raises(ParamError, match="finetune.layer_decay"):
        finetuning.run(finetune_params(layer_decay=1.5), data, tmp_path)


def test_the_train_stage_fine_tunes_when_enabled_and_evaluate_reads_its_features(
        data, tmp_path, finetune_params, synthetic_features):
    """`finetune.enabled`: `mofe train` writes the fine-tuned variant next to the heads, and
    evaluate scores it on its own (fine-tuned) features, not on the frozen ones."""
    from mofe_ood import evaluate

    features = synthetic_features(tmp_path / "features", classes=4, dim=6, per_class=12, val_per_class=4)
    with np.load(features / "train.npz") as f:  # an OOD set for the frozen features
        np.savez(features / "ood.npz", features=f["features"][:6] + 5.0, labels=np.full(6, -1))
    info = json.loads((features / "info.json").read_text())
    info["splits"]["test"] = info["splits"]["val"]
    info["splits"]["ood"] = {"kind": "ood", "group": "far", "count": 6}
    (features / "info.json").write_text(json.dumps(info))
    (features / "test.npz").write_bytes((features / "val.npz").read_bytes())

    p = merged(finetune_params(enabled=True), {"train": {"variants": ["linear"], "epochs": 2}})
    summary = train.run(p, features, tmp_path / "models", prepared_dir=data)
    assert sorted(summary) == ["linear", "mofe_finetune"]
    assert (tmp_path / "models" / "mofe_finetune" / "backbone.safetensors").is_file()

    with pytest.raises(ParamError, match="evaluate.variants"):  # disabled: not a variant to evaluate
        evaluate.config(merged(p, {"finetune": {"enabled": False}, "evaluate": {
            "variants": ["mofe_finetune"], "scores": ["knn"], "knn_k": [1], "default_score": "knn"}}))
    p = merged(p, {"evaluate": {"variants": ["frozen", "mofe_finetune"], "scores": ["knn", "msp"], "knn_k": [1],
                                "vim_dim": [4], "default_score": "knn", "tpr": 0.95}})
    # the fine-tuned features lack the frozen split `test` of this toy set: give them one
    own = tmp_path / "models" / "mofe_finetune" / "features"
    (own / "test.npz").write_bytes((own / "val.npz").read_bytes())
    own_info = json.loads((own / "info.json").read_text())
    own_info["splits"]["test"] = own_info["splits"]["val"]
    (own / "info.json").write_text(json.dumps(own_info))
    result = evaluate.run(p, features, tmp_path / "models", tmp_path / "reports")
    assert result["mofe_finetune"]["id_accuracy"] is not None
    assert result["frozen"]["knn"]["ood"]["auroc"] != result["mofe_finetune"]["knn"]["ood"]["auroc"]


def test_fine_tuning_an_efficientnet_in_the_train_stage_is_refused_before_training(tmp_path, finetune_params):
    p = merged(finetune_params(enabled=True), {"extract": {"backbone": "tf_efficientnet_lite0"}})
    with pytest.raises(ParamError, match="finetune.enabled"):
        train.run(p, tmp_path / "no-features", tmp_path / "models")


@pytest.mark.parametrize("accuracy_from", ["val", "train"])
def test_fine_tuning_dynmix_reads_the_accuracy_of_train_dynmix_accuracy_from(accuracy_from, monkeypatch,
                                                                            finetune_params):
    # Validation logits are all wrong, the model's training-image logits all right: the per-class
    # accuracy Dynamic-β reads is 0 from `val` and 1 from `train` (the images themselves are not
    # run: a unit test of which split is read).
    from types import SimpleNamespace

    from mofe_ood.splits import Images
    from mofe_ood.training.settings import finetune_config, train_config

    params = merged(finetune_params(), {"train": {"dynmix": {"accuracy_from": accuracy_from}}})
    y_train, y_val = np.array([0, 1, 2, 2]), np.array([0, 1, 2])
    model = SimpleNamespace(mofe=SimpleNamespace(num_classes=3))
    task = finetuning.FinetuneTask(model, Images(y_train, images=np.zeros((4, 8, 8), np.uint8)),
                                   Images(y_val, images=np.zeros((3, 8, 8), np.uint8)), None, "cpu", None, None,
                                   finetune_config(params), train_config(params))
    right = torch.nn.functional.one_hot(torch.from_numpy(y_train), 3).float()
    monkeypatch.setattr(finetuning, "predict", lambda model, images, *a, **k: (right, None))
    wrong = torch.nn.functional.one_hot(torch.from_numpy((y_val + 1) % 3), 3).float()
    accuracy = task.mixup_accuracy(None, wrong)
    assert accuracy.tolist() == ([0.0, 0.0, 0.0] if accuracy_from == "val" else [1.0, 1.0, 1.0])
