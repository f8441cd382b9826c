"""presets/full.yaml's run end to end on this CPU: DINOv2-S with random weights, a few dozen images.

The preset is the paper's regime (a DINOv2 backbone, the whole image model fine-tuned, block
experts, the fine-tuned MoFE registered); it is meant for a GPU and hub weights. Here the real
stages run in order (prepare -> extract -> train -> evaluate) on the preset's params, resolved
by `mofe_ood.params.load` as every `--params presets/full.yaml` is, with only the keys in
`cpu_sized` changed, each for the reason its comment gives. Everything else is the preset's
(and params.yaml's under it): every `train.variants` head and trunk variant, the fine-tuning
recipe (layer decay, drop-path, Dynamic-beta Mixup, three phases), `*.gpus: 1` (a CPU runs one
process), the evaluate variants and K candidates. ~1.5 min on 2 busy cores.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mofe_ood import evaluate, extract, prepare, train, variants
from mofe_ood.backbones import Preprocess, preprocess
from mofe_ood.params import load, merged
from mofe_ood.splits import load_features, load_split
from mofe_ood.training import finetuning

pytestmark = pytest.mark.slow

BACKBONE = "vit_small_patch14_dinov2"  # DINOv2 ViT-S/14: 384 wide, 12 blocks, ~22M parameters


def cpu_sized(root) -> dict:
    """The keys of the preset this run changes, and why; nothing else differs from the preset."""
    return {
        # A few dozen images instead of all of Fashion-MNIST and the OOD sets: 7 classes x (4 train,
        # 2 val, 2 test) ID images, 5 per OOD set (1 validation + 4 test each, prepare.ood_split).
        "prepare": {"id": {"train_per_class": 4, "val_per_class": 2, "test_per_class": 2},
                    "ood": {name: {"count": 5} for name in ("fmnist_near", "mnist", "textile", "textures")}},
        "extract": {
            "weights": "random",    # the preset's `hub` needs the network (HF_HUB_OFFLINE=1 here)
            "backbone": BACKBONE,   # ViT-S, not the preset's ViT-B: a quarter of the compute, same architecture
            "image_size": 56,       # not 224: 16 patches + CLS (a multiple of 14, as DINOv2 needs)
            "device": "cpu"},       # the preset's `cuda` fails at once where there is no GPU (by design)
        # One epoch per phase instead of 60/20/20 (and 8/3/3 for the trunk variants): every phase runs.
        "train": {"epochs": 1, "expert_epochs": 1, "router_epochs": 1,
                  "top": {"epochs": 1, "expert_epochs": 1, "router_epochs": 1}},
        "finetune": {"epochs": 1, "expert_epochs": 1, "router_epochs": 1,
                     "batch_size": 8,  # not 64: several optimizer steps per phase on 28 training images
                     "device": "cpu",  # as extract.device
                     # the preset's is on the cluster's data PVC (/data); a folder of the run (still checkpointed)
                     "checkpoint_dir": str(root / "checkpoints")},
    }


def history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def image_batch(root, split: str, cfg: dict) -> tuple[torch.Tensor, np.ndarray]:
    """A prepared split as the saved model's config.json says to preprocess it, and its labels."""
    ft, images = cfg["finetuned"], load_split(root / "data" / "prepared", split)
    return preprocess(images.images, Preprocess(ft["image_size"], tuple(ft["mean"]), tuple(ft["std"]))), images.labels


def snapshot(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, project_root):
    """The four stages on the CPU-sized preset; `seen`: the fine-tuned model in memory after
    training, its backbone before training, and its state when the router phase began."""
    root = tmp_path_factory.mktemp("full_preset")
    params = merged(load(project_root / "presets" / "full.yaml"), cpu_sized(root))
    seen, real_fit = {}, finetuning.fit

    def spying_fit(task, steps, loop):
        seen["model"], seen["initial"], real_enter = task.model, snapshot(task.model.backbone), task.enter

        def enter(step):
            if step.phase == "router" and "before_router" not in seen:
                seen["before_router"] = snapshot(task.model)
            return real_enter(step)

        task.enter = enter
        return real_fit(task, steps, loop)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetuning, "fit", spying_fit)
        prepare.run(params, root / "data" / "prepared")
        extract.run(params, root / "data" / "prepared", root / "data" / "features")
        summary = train.run(params, root / "data" / "features", root / "models", root / "data" / "prepared")
        result = evaluate.run(params, root / "data" / "features", root / "models", root / "reports")
    return root, params, summary, result, seen


def test_the_preset_trains_every_variant_and_the_fine_tuned_dinov2_s(full_run):
    root, params, summary, _, _ = full_run
    assert params["finetune"]["enabled"] and params["register"]["variant"] == "mofe_finetune"  # the preset's
    assert set(summary) == {*params["train"]["variants"], "mofe_finetune"}
    out = root / "models" / "mofe_finetune"
    assert sorted(p.name for p in out.iterdir()) == ["backbone.safetensors", "config.json", "features",
                                                      "history.csv", "model.safetensors", "mofe.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    ft = cfg["finetuned"]
    assert (ft["backbone"], ft["image_size"], ft["backbone_kwargs"]) == (BACKBONE, 56, {})  # the real ViT-S
    assert (ft["mofe"]["dim"], ft["mofe"]["router_dim"], ft["mofe"]["expert"]) == (384, 384, "block")
    assert cfg["params"]["finetune"]["layer_decay"] == 0.75 and cfg["params"]["finetune"]["mixup"] == "dynamic"
    backbone = load_file(out / "backbone.safetensors")
    assert backbone["cls_token"].shape == (1, 1, 384)
    assert {int(k.split(".")[1]) for k in backbone if k.startswith("blocks.")} == set(range(12))
    assert not (root / "checkpoints" / "mofe_finetune").exists()  # removed once the model is written
    # the cached-trunk block experts of the same backbone: their router reads the 384-wide CLS token
    block = json.loads((root / "models" / "mofe_block_dynmix" / "config.json").read_text())["finetuned"]["mofe"]
    assert (block["dim"], block["router_dim"]) == (384, 384)


def test_history_has_the_three_phases_with_finite_losses(full_run):
    root, _, summary, _, _ = full_run
    rows = history(root / "models" / "mofe_finetune" / "history.csv")
    assert [r["phase"] for r in rows] == ["base", "expert0", "expert1", "expert2", "router"]  # 3 experts
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    assert summary["mofe_finetune"]["epochs"] == 5


def test_phase_one_fine_tunes_the_whole_backbone_and_the_experts_train_apart(full_run):
    root, _, _, _, seen = full_run
    out = root / "models" / "mofe_finetune"
    model, _ = variants.load_image_model(out)
    initial, tuned = seen["initial"], model.backbone.state_dict()
    for k in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc1.weight", "patch_embed.proj.weight"):
        assert not torch.equal(initial[k], tuned[k]), k  # layer decay shrinks the lower blocks' lr, not to 0
    experts = [e.top[0].state_dict() for e in model.mofe.experts]
    for name in ("attn.qkv.weight", "mlp.fc1.weight"):
        weights = [e[name] for e in experts]
        for i, w in enumerate(weights):
            assert not torch.equal(w, initial[f"blocks.11.{name}"])  # not the random block
            assert not torch.equal(w, tuned[f"blocks.11.{name}"])    # nor the fine-tuned one they start from
            assert all(not torch.equal(w, v) for v in weights[i + 1:])  # each trained on its own group


def test_phase_three_trains_the_router_alone(full_run):
    _, _, _, _, seen = full_run
    before, after = seen["before_router"], snapshot(seen["model"])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"mofe.router.fc.weight", "mofe.router.fc.bias"}


def test_the_saved_model_loads_back_and_predicts_as_the_trained_one(full_run):
    root, _, _, _, seen = full_run
    out = root / "models" / "mofe_finetune"
    loaded, cfg = variants.load_image_model(out)
    x, _ = image_batch(root, "val", cfg)
    trained = seen["model"].eval()
    with torch.no_grad():
        got, want = loaded(x), trained(x)
    assert got["feature"].shape == (14, 384)
    for key in ("feature", "logits", "gates"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)
    saved, _ = load_features(out / "features", "val")  # what evaluate reads for this variant
    np.testing.assert_allclose(got["feature"].numpy(), saved, rtol=0, atol=1e-4)


def test_evaluate_scores_the_fine_tuned_variant_on_its_own_features(full_run):
    root, params, _, result, seen = full_run
    assert set(result) >= set(params["evaluate"]["variants"])
    cfg = json.loads((root / "models" / "mofe_finetune" / "config.json").read_text())
    x, labels = image_batch(root, "test", cfg)
    with torch.no_grad():
        predicted = seen["model"].eval()(x)["logits"].argmax(1).numpy()
    assert result["mofe_finetune"]["id_accuracy"] == pytest.approx(float(np.mean(predicted == labels)))
    knn = result["mofe_finetune"]["knn"]
    assert all(math.isfinite(knn[name]["auroc"]) for name in ("near", "far", "fmnist_near", "mnist"))
    assert knn["near"] != result["frozen"]["knn"]["near"]  # not the frozen features' scores
    thresholds = json.loads((root / "reports" / "thresholds.json").read_text())
    assert "mofe_finetune" in thresholds
