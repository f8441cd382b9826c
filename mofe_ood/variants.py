"""The trained variants: what each one is, and how its model is built, saved, loaded and run.

`VARIANTS`, the one table of the head variants of `train.variants`: each one's
architecture kind (`ARCHITECTURES`: linear probe, MLP head, MoFE), mixup and inputs:
- `linear`: linear probe (plain cross-entropy: no mixup, no label smoothing);
- `mlp`: one-hidden-layer MLP head + plain mixup;
- `mofe`: MoFE (mofe.py) + plain mixup;
- `mofe_dynmix`: MoFE + Dynamic-β Mixup (mixup.py);
- `top`: the backbone's top trained on the cached trunk, one expert (no routing);
- `mofe_block`, `mofe_block_dynmix`: MoFE whose experts are copies of the backbone's top,
  on the cached trunk (+ Dynamic-β Mixup: the method).
The fine-tuned variant (`finetune.variant`) is a MoFE of token-reading experts
over a fine-tuned ViT (`FinetunedMoFE`); on disk it also holds a `linear` head
over its own routed features, so `load_head` reads every variant alike.
`FROZEN` names the backbone alone (no head): evaluate and serving use it.

The train stage writes these folders (mofe_ood/training/ trains the models); evaluate and
serving read them through this module, so neither imports any training code.

On disk, `<models_dir>/<variant>/`: `model.safetensors` (no pickle) and
`config.json` (format, architecture, classes, groups, params, val accuracy); an image
model (`save_image_model`) also `backbone.safetensors`, `mofe.safetensors` and `features/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mofe_ood import mofe as mofe_mod
from mofe_ood.backbones import create_backbone, trunk_of
from mofe_ood.params import ParamError, check_choice
from mofe_ood.splits import DataError, load_features

FORMAT = "mofe-ood-head/1"
FROZEN = "frozen"


@dataclass(frozen=True)
class Variant:
    """A head variant: its architecture kind, its mixup (none | plain | dynamic), its inputs and lr."""

    kind: str              # of ARCHITECTURES
    mixup: str
    linear: bool  # a linear layer trained alone: `train.linear_lr`, plain cross-entropy without mixup
    trunk: bool = False    # reads the cached trunk activations (block experts, `train.top`), not pooled features
    experts: bool = True   # False: phase 1 only, one expert (the fine-tuned top alone, the ablation's)

    @property
    def routed(self) -> bool:
        """A MoFE of several experts, each over a group of classes (`train.mofe.num_experts` of them)."""
        return self.kind == "mofe" and self.experts


VARIANTS = {"linear": Variant("linear", "none", linear=True), "mlp": Variant("mlp", "plain", linear=False),
            "mofe": Variant("mofe", "plain", linear=False), "mofe_dynmix": Variant("mofe", "dynamic", linear=False),
            "top": Variant("mofe", "plain", linear=False, trunk=True, experts=False),
            "mofe_block": Variant("mofe", "plain", linear=False, trunk=True),
            "mofe_block_dynmix": Variant("mofe", "dynamic", linear=False, trunk=True)}
TRUNK_VARIANTS = [name for name, v in VARIANTS.items() if v.trunk]  # read the cached trunk (extract.top_blocks)


def _key(params: Mapping, where: str):
    section, key = where.split(".")
    if not isinstance(params.get(section), Mapping) or key not in params[section]:
        raise ParamError(f"{where}: missing (params.yaml lists every key)")
    return params[section][key]


def trained_variants(params: Mapping) -> list[str]:
    """What the train stage writes under models/: `train.variants` (+ `finetune.variant` when enabled).

    It reads those three keys alone (evaluate's params in dvc.yaml); the train and finetune
    sections are checked whole by mofe_ood.training.settings (`mofe train`, `mofe validate`).
    """
    variants, enabled = _key(params, "train.variants"), _key(params, "finetune.enabled")
    if not isinstance(variants, list):
        raise ParamError(f"train.variants: {variants!r} must be a non-empty list")
    for v in variants:
        check_choice("train.variants", v, VARIANTS)
    variants = list(variants)
    if enabled:
        tuned = _key(params, "finetune.variant")
        if tuned in variants:
            raise ParamError(f"finetune.variant: {tuned!r} is also in train.variants; give it another name")
        variants.append(tuned)
    return variants


# ---------------------------------------------------------------- architectures

def architecture(variant: str, cfg, dim: int, num_classes: int, groups: np.ndarray | None) -> dict:
    """config.json's `architecture` of a head variant (`cfg`: the train section)."""
    kind = VARIANTS[variant].kind
    arch = {"kind": kind, "dim": dim, "num_classes": num_classes}
    if kind == "mlp":
        arch.update(hidden_features=cfg.hidden_features, drop=cfg.drop)
    elif kind == "mofe":
        m = cfg.mofe
        arch.update(expert=m.expert, hidden_features=cfg.hidden_features, drop=cfg.drop, router=m.router,
                    top_k=m.top_k, stem_blocks=m.stem_blocks, groups=[int(g) for g in groups])
    return arch


def _linear(arch: dict, init_from: nn.Module | None) -> nn.Module:
    return mofe_mod.LinearProbe(arch["dim"], arch["num_classes"])


def _mlp(arch: dict, init_from: nn.Module | None) -> nn.Module:
    return mofe_mod.MLPHead(arch["dim"], arch["num_classes"], arch["hidden_features"], arch["drop"])


def _mofe(arch: dict, init_from: nn.Module | None) -> nn.Module:
    if init_from is None and mofe_mod.EXPERTS[arch["expert"]].reads_tokens:
        # Shapes only: the weights come from the state dict loaded next.
        init_from = create_backbone(arch["backbone"], "random", arch["image_size"], num_classes=0,
                                    **arch.get("backbone_kwargs", {}))
    return mofe_mod.MoFE(arch["dim"], arch["num_classes"], arch["groups"], expert=arch["expert"],
                         hidden_features=arch["hidden_features"], drop=arch["drop"], router=arch["router"],
                         top_k=arch["top_k"], stem_blocks=arch.get("stem_blocks", 0), init_from=init_from,
                         router_dim=arch.get("router_dim"), top_blocks=arch.get("top_blocks", 1))


def block_architecture(mofe: mofe_mod.MoFE, backbone: str, image_size: int, backbone_kwargs: dict) -> dict:
    """config.json's `architecture` of a MoFE whose experts copy `backbone`'s top (what `_mofe` rebuilds)."""
    expert = mofe.experts[0]
    return {"kind": "mofe", "dim": mofe.dim, "num_classes": mofe.num_classes, "expert": "block",
            "hidden_features": None, "drop": 0.0, "router": mofe.router.mode, "top_k": mofe.router.top_k,
            "stem_blocks": 0, "groups": [int(g) for g in mofe.groups], "backbone": backbone,
            "image_size": image_size, "backbone_kwargs": backbone_kwargs,
            "router_dim": mofe.router.fc.in_features, "top_blocks": expert.top_blocks}


ARCHITECTURES = {"linear": _linear, "mlp": _mlp, "mofe": _mofe}


def build_model(arch: dict, init_from: nn.Module | None = None) -> nn.Module:
    """The (untrained) module of a config.json `architecture`; `init_from`: what token experts copy."""
    if arch["kind"] not in ARCHITECTURES:
        raise ValueError(f"unknown model kind {arch['kind']!r} in config.json; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch["kind"]](arch, init_from)


# ---------------------------------------------------------------- files

def save_weights(path: Path, module: nn.Module) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, path)


def write_config(out: Path, cfg: dict) -> None:
    (out / "config.json").write_text(json.dumps({"format": FORMAT, **cfg}, indent=2) + "\n")


def load_head(model_dir: str | Path) -> tuple[nn.Module, dict]:
    """The trained head of `model_dir` in eval mode, and its config; `module(features)` returns
    dict(feature, logits[, router_logits, gates])."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{model_dir}/config.json: format {cfg.get('format')!r} is not {FORMAT!r}")
    model = build_model(cfg["architecture"])
    model.load_state_dict(load_file(model_dir / "model.safetensors"), strict=True)
    return model.eval(), cfg


class FinetunedMoFE(nn.Module):
    """Images -> the backbone's trunk (all but its top) -> MoFE with block experts (copies of the top).

    A fine-tuned ViT (training/finetuning.py), or the frozen backbone whose top the `top` /
    `mofe_block*` variants trained on cached trunk activations (training/head_training.py).
    """

    def __init__(self, backbone: nn.Module, mofe: mofe_mod.MoFE):
        super().__init__()
        self.backbone, self.mofe = backbone, mofe

    def tokens(self, images):
        """The trunk's activations (ViT tokens, CNN maps): what the experts and the router read."""
        return trunk_of(self.backbone, images, self.mofe.experts[0].top_blocks)

    def forward(self, images):
        return self.mofe(self.tokens(images))

    def classifier_weights(self):
        return self.mofe.classifier_weights()


def frozen_backbone(name: str, weights: str, image_size: int, seed: int) -> nn.Module:
    """The backbone extract ran (random weights, tests only: the same draw as extract's, seeded by base.seed)."""
    if weights == "random":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return create_backbone(name, "random", image_size, num_classes=0)
    return create_backbone(name, weights, image_size, num_classes=0)


def save_image_model(out: Path, variant: str, model: FinetunedMoFE, split_features, splits: dict,
                     classes: list[str], spec: dict, params: dict, history: list[dict]) -> None:
    """Write an image model into the empty folder `out` (the layout finetuning.py's docstring gives),
    all but history.csv (the training's record: its caller writes it).

    `split_features`: (split, routed features, labels) of every split; `splits`: info.json's
    split entries; `spec`: backbone, weights, image_size, mean, std, backbone_kwargs.
    """
    (out / "features").mkdir()
    model = model.float()
    save_weights(out / "backbone.safetensors", model.backbone)
    save_weights(out / "mofe.safetensors", model.mofe)
    dim = int(model.mofe.dim)
    for split, feats, labels in split_features:
        np.savez(out / "features" / f"{split}.npz", features=np.asarray(feats, np.float32),
                 labels=np.asarray(labels, np.int64))
    name, size = spec["backbone"], spec["image_size"]
    info = {"backbone": name, "weights": "finetuned", "image_size": size, "feature_dim": dim, "classes": classes,
            "splits": {k: {"kind": s["kind"], "group": s["group"], "count": s["count"]} for k, s in splits.items()}}
    (out / "features" / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    head = mofe_mod.LinearProbe(dim, len(classes))
    head.classifier.load_state_dict(model.mofe.classifier.state_dict())
    save_weights(out / "model.safetensors", head)
    mofe_arch = block_architecture(model.mofe, name, size, spec.get("backbone_kwargs") or {})
    write_config(out, {
        "variant": variant, "architecture": {"kind": "linear", "dim": dim, "num_classes": len(classes)},
        "finetuned": {"backbone": name, "image_size": size, "backbone_kwargs": mofe_arch["backbone_kwargs"],
                      "mean": list(spec["mean"]), "std": list(spec["std"]),
                      "mofe": mofe_arch, "input": "features/ holds this model's routed features"},
        "classes": classes, "groups": mofe_arch["groups"],
        "features": {"backbone": name, "weights": spec["weights"], "image_size": size, "feature_dim": dim},
        "params": params, "val_accuracy": history[-1]["val_accuracy"] if history else None})


def load_image_model(model_dir: str | Path) -> tuple[FinetunedMoFE, dict]:
    """The fine-tuned image model of `model_dir` (eval mode): images -> dict(feature, logits, ...)."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    ft = cfg.get("finetuned")
    if not ft:
        raise ValueError(f"{model_dir}: not a fine-tuned variant (config.json has no 'finetuned')")
    backbone = create_backbone(ft["backbone"], "random", ft["image_size"], num_classes=0,
                               **ft.get("backbone_kwargs", {}))
    backbone.load_state_dict(load_file(model_dir / "backbone.safetensors"))
    mofe = build_model(ft["mofe"], init_from=backbone)
    mofe.load_state_dict(load_file(model_dir / "mofe.safetensors"))
    return FinetunedMoFE(backbone, mofe).eval(), cfg


# ---------------------------------------------------------------- what a variant gives on cached features

@dataclass
class Outputs:
    """What a variant gives for one split: the feature OOD scores read, and class logits."""

    features: np.ndarray
    logits: np.ndarray | None
    labels: np.ndarray


def variant_outputs(variant: str, features_dir: Path, models_dir: Path, splits: list[str]):
    """Per split Outputs of `variant`, plus its linear head (W, b) or None.

    A fine-tuned variant (training/finetuning.py) brings its own features, computed by its
    fine-tuned backbone, in `models/<variant>/features`; the others read the frozen ones.
    """
    own = models_dir / variant / "features"
    if variant != FROZEN and (own / "info.json").is_file():
        features_dir = own
    raw = {name: load_features(features_dir, name) for name in splits}
    for name, (feats, _) in raw.items():
        if len(feats) == 0:
            raise DataError(f"split {name!r} is empty: nothing to evaluate")
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        if bad:
            raise DataError(f"split {name!r} has {bad} samples with NaN or infinite features")
    if variant == FROZEN:
        return {name: Outputs(f, None, y) for name, (f, y) in raw.items()}, None
    model_dir = models_dir / variant
    if not model_dir.is_dir():
        raise FileNotFoundError(f"evaluate.variants: no trained model for {variant!r} in {model_dir}")
    model, _ = load_head(model_dir)
    model.eval()
    out = {}
    with torch.inference_mode():
        for name, (feats, labels) in raw.items():
            result = model(torch.from_numpy(feats))
            out[name] = Outputs(result["feature"].float().numpy(), result["logits"].float().numpy(), labels)
    weight, bias = model.classifier_weights()
    return out, (weight.detach().numpy().astype(np.float64), bias.detach().numpy().astype(np.float64))
