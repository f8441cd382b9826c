"""End-to-end fine-tuning on CPU: a tiny random-weight DINOv2 + MoFE with block experts, a few steps."""

import json

import numpy as np
import pytest
import torch

from mofe_ood import finetune, train
from mofe_ood.params import ParamError

CLASSES = ["a", "b", "c", "d"]


def prepared(root, seed=0):
    """prepare's layout: 28 px gray images whose brightness pattern depends on the class."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    splits = {}
    for name, n, kind in (("train", 12, "id"), ("val", 4, "id"), ("ood", 6, "ood")):
        labels = np.repeat(np.arange(4), n) if kind == "id" else np.full(n, -1)
        images = rng.integers(0, 60, (len(labels), 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            if y >= 0:
                images[i, 7 * y:7 * y + 7] += 150
        np.savez(root / f"{name}.npz", images=images, labels=labels.astype(np.int64))
        splits[name] = {"kind": kind, "group": None if kind == "id" else "far", "count": len(labels)}
    (root / "manifest.json").write_text(json.dumps({"classes": CLASSES, "splits": splits}))
    return root


def params(checkpoint_dir=None, **over):
    ft = {"epochs": 2, "expert_epochs": 1, "router_epochs": 1, "batch_size": 8, "max_steps_per_epoch": 2,
          "eval_batch_size": 16, "group_samples_per_class": 4, "lr": 1e-3, "checkpoint_dir": checkpoint_dir,
          "backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}, **over}
    return {"base": {"seed": 0},
            "extract": {"backbone": "vit_small_patch14_dinov2", "weights": "random", "image_size": 28},
            "train": {"mofe": {"num_experts": 2}, "dynmix": {"alpha_min": 0.1, "alpha_max": 1.0}},
            "finetune": ft}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared(tmp_path_factory.mktemp("ft") / "prepared")


@pytest.fixture(scope="module")
def finetuned(data, tmp_path_factory):
    models = tmp_path_factory.mktemp("ft_models")
    summary = finetune.run(params(), data, models)
    return models, summary


def test_finetune_writes_a_loadable_model_and_features(data, finetuned):
    models, summary = finetuned
    out = models / "mofe_finetune"
    assert summary["mofe_finetune"]["epochs"] == 2 + 2 * 1 + 1
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["backbone.safetensors", "config.json", "features", "history.csv",
                            "mofe.safetensors", "model.safetensors"])
    model, cfg = finetune.load_finetuned(out)
    images = np.load(data / "val.npz")["images"]
    from mofe_ood.backbones import Preprocess
    from mofe_ood.extract import preprocess

    x = preprocess(images, Preprocess(28, tuple(cfg["finetuned"]["mean"]), tuple(cfg["finetuned"]["std"])))
    with torch.no_grad():
        result = model(x)
    saved = np.load(out / "features" / "val.npz")
    assert np.allclose(result["feature"].numpy(), saved["features"], atol=1e-4)
    assert torch.allclose(result["gates"].sum(1), torch.ones(len(x)))
    e0, e1 = (e.block.mlp.fc1.weight for e in model.mofe.experts)
    assert not torch.equal(e0, e1)  # each expert trained on its own group
    # the feature-based head over the routed features = the fine-tuned model's classifier
    head, _ = train.load_model(out)
    with torch.no_grad():
        logits = head(torch.from_numpy(saved["features"]))["logits"]
    assert torch.allclose(logits, result["logits"], atol=1e-4)
    info = json.loads((out / "features" / "info.json").read_text())
    assert info["feature_dim"] == 32 and info["splits"]["ood"]["kind"] == "ood"


def test_finetune_resumes_to_the_same_result(data, finetuned, tmp_path, monkeypatch):
    models, _ = finetuned
    save, calls = train._save_checkpoint, []

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # inside phase 2
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_checkpoint", save_then_die)
    p = params(checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(KeyboardInterrupt):
        finetune.run(p, data, tmp_path / "models")
    monkeypatch.setattr(train, "_save_checkpoint", save)
    finetune.run(p, data, tmp_path / "models")
    for name in ("backbone.safetensors", "mofe.safetensors", "history.csv"):
        assert (tmp_path / "models" / "mofe_finetune" / name).read_bytes() == \
            (models / "mofe_finetune" / name).read_bytes(), name


def test_finetune_needs_a_vit(data, tmp_path):
    p = params()
    p["extract"] = {"backbone": "tf_efficientnet_lite0", "weights": "random", "image_size": 28}
    with pytest.raises(ParamError, match="extract.backbone"):
        finetune.run(p, data, tmp_path)
    with pytest.raises(ParamError, match="finetune.layer_decay"):
        finetune.run(params(layer_decay=1.5), data, tmp_path)
