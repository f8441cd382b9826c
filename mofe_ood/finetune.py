"""End-to-end fine-tuning: a ViT backbone + MoFE with block experts, on images (the paper's setting).

The three phases of mofe.py, on images (GPU; a CPU runs it for tests on a tiny ViT):
1. backbone + the shared classifier, every sample through the whole backbone
   (AdamW (0.9, 0.99), layer-wise lr decay, cosine schedule with warm-up,
   drop-path, label smoothing, image-space mixup);
2. E block experts copied from the fine-tuned last block (+ final norm), each
   trained on its class group with image-space Dynamic-β Mixup, the trunk
   (every block but the last) frozen;
3. the router on the CLS token entering the last block, everything else frozen.
bf16 autocast on CUDA. A checkpoint after every epoch (`finetune.checkpoint_dir`);
a resumed run equals an uninterrupted one (bit for bit on CPU).

Output, `<models_dir>/<variant>/`:
- `backbone.safetensors`: the fine-tuned backbone (timm state dict, loads with
  `create_backbone(name, path)`); `mofe.safetensors`: the MoFE (token input);
  `load_finetuned(dir)` rebuilds the image model (images -> dict(feature, logits, ...));
- `features/<split>.npz` + `info.json`: the routed feature of every prepared
  split (extract's layout), and `model.safetensors` + `config.json`: the shared
  classifier as a `linear` head on those features, so `train.load_model` and
  the feature-based scores work on a fine-tuned variant as on the others;
- `history.csv`: per epoch, as train.py writes it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mofe_ood import mofe as mofe_mod
from mofe_ood import train as train_mod
from mofe_ood.backbones import torch_device
from mofe_ood.params import ParamError, check_choice, check_number, merged

log = logging.getLogger(__name__)

DEFAULTS = {
    "enabled": False,         # train stage: also fine-tune (a GPU's job: DINOv2 + block experts on images)
    "variant": "mofe_finetune",
    "epochs": 10,             # phase 1
    "expert_epochs": 3,       # phase 2, per expert
    "router_epochs": 2,       # phase 3
    "batch_size": 64,
    "lr": 5.0e-4,             # peak lr of the last layers; layer i of L gets lr * layer_decay ** (L - i)
    "layer_decay": 0.75,
    "weight_decay": 0.05,
    "warmup_epochs": 1,
    "min_lr_ratio": 0.01,
    "drop_path": 0.1,
    "label_smoothing": 0.1,
    "mixup": "dynamic",       # dynamic (train.dynmix) | plain (train.mixup_alpha) | none
    "max_steps_per_epoch": None,  # cap (quick runs and tests); null = every sample once per epoch
    "group_samples_per_class": 100,  # images per class whose mean backbone feature groups the classes
    "device": "auto",         # auto | cpu | cuda
    "amp": True,              # bf16 autocast on CUDA
    "eval_batch_size": 128,
    "checkpoint_dir": None,
    "backbone_kwargs": {},    # extra timm.create_model arguments (tests: a tiny ViT, e.g. depth: 2)
}


def config(params: dict) -> dict:
    p = merged(DEFAULTS, params.get("finetune") or {})
    for key in ("epochs", "expert_epochs", "router_epochs", "batch_size", "eval_batch_size",
                "group_samples_per_class"):
        check_number(f"finetune.{key}", p[key], low=1, integer=True)
    check_number("finetune.max_steps_per_epoch", p["max_steps_per_epoch"], low=1, integer=True, allow_none=True)
    check_number("finetune.lr", p["lr"], low=0)
    if p["lr"] <= 0:
        raise ParamError(f"finetune.lr: {p['lr']!r} must be > 0")
    check_number("finetune.layer_decay", p["layer_decay"], low=0, high=1)
    check_number("finetune.weight_decay", p["weight_decay"], low=0)
    check_number("finetune.warmup_epochs", p["warmup_epochs"], low=0)
    check_number("finetune.min_lr_ratio", p["min_lr_ratio"], low=0, high=1)
    check_number("finetune.drop_path", p["drop_path"], low=0, high=0.99)
    check_number("finetune.label_smoothing", p["label_smoothing"], low=0, high=0.99)
    check_choice("finetune.mixup", p["mixup"], ("dynamic", "plain", "none"))
    torch_device("finetune.device", p["device"])
    if not isinstance(p["backbone_kwargs"], dict):
        raise ParamError(f"finetune.backbone_kwargs: {p['backbone_kwargs']!r} is not a mapping")
    if not isinstance(p["variant"], str) or not p["variant"] or "/" in p["variant"]:
        raise ParamError(f"finetune.variant: {p['variant']!r} is not a folder name")
    return p


class FinetunedMoFE(nn.Module):
    """Images -> the ViT trunk (all blocks but the last) -> MoFE with block experts."""

    def __init__(self, backbone: nn.Module, mofe: mofe_mod.MoFE):
        super().__init__()
        self.backbone, self.mofe = backbone, mofe

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return mofe_mod.tokens_before_last_block(self.backbone, images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.mofe(self.tokens(images))

    def classifier_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mofe.classifier_weights()


def _autocast(device: torch.device, p: dict):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(p["amp"]) and device.type == "cuda")


def _images(images, rows, prep, device) -> torch.Tensor:
    from mofe_ood.extract import image_batch

    return image_batch(images.take(np.asarray(rows)), 0, len(rows), prep).contiguous().to(device)


def _mixup(p: dict, tp: dict, num_classes: int, counts: np.ndarray):
    from mofe_ood.mixup import DynamicBetaMixup, Mixup

    if p["mixup"] == "dynamic":
        d = tp["dynmix"]
        return DynamicBetaMixup(num_classes, d["alpha_min"], d["alpha_max"], power=d["power"],
                                momentum=d["momentum"], label_smoothing=p["label_smoothing"], counts=counts,
                                difficulty=d["difficulty"])
    if p["mixup"] == "plain" and tp["mixup_alpha"] > 0:
        return Mixup(num_classes, tp["mixup_alpha"], p["label_smoothing"])
    return None


def _param_groups(model: FinetunedMoFE, step: train_mod.Step, p: dict) -> list[dict]:
    """Phase 1: the backbone with layer-wise lr decay (timm's grouping) + the classifier; later
    phases: the phase's MoFE parameters at the full lr."""
    if step.phase == "base":
        from timm.optim import param_groups_layer_decay

        model.backbone.requires_grad_(True)
        groups = param_groups_layer_decay(model.backbone, weight_decay=p["weight_decay"],
                                          layer_decay=p["layer_decay"])
        head = list(model.mofe.classifier.parameters())
        groups += [{"params": [q for q in head if q.ndim >= 2], "weight_decay": p["weight_decay"], "lr_scale": 1.0},
                   {"params": [q for q in head if q.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
        keep = [q for g in groups for q in g["params"]]
        mofe_mod.set_trainable(model, keep)
        model.eval()
        model.backbone.train()
        return groups
    model.backbone.requires_grad_(False)
    params = mofe_mod.enter_phase(model.mofe, step.phase, step.expert)
    model.backbone.eval()
    return [{"params": [q for q in params if q.ndim >= 2], "weight_decay": p["weight_decay"], "lr_scale": 1.0},
            {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0}]


def _loss(model: FinetunedMoFE, step, x, y, x_other, mixup, gen, p, tp, num_classes) -> torch.Tensor:
    from mofe_ood.mixup import soft_targets

    if step.phase in ("base", "experts"):
        if mixup is not None:
            x, t, _ = mixup(x, y, y, gen)  # image space
        else:
            t = soft_targets(y, num_classes, p["label_smoothing"])
        if step.phase == "base":
            from mofe_ood.backbones import pooled_features

            logits = model.mofe.classifier(pooled_features(model.backbone, x))
            return mofe_mod.soft_cross_entropy(logits, t.to(logits.device))
        with torch.no_grad():  # the trunk is frozen from phase 2 on
            tokens = model.tokens(x)
            other = None if x_other is None else model.tokens(x_other)
        return mofe_mod.phase_loss(model.mofe, "experts", tokens, y, expert=step.expert, x_other=other,
                                   targets=t.to(tokens.device), other_weight=tp["mofe"]["other_weight"])
    with torch.no_grad():
        tokens = model.tokens(x)
    return mofe_mod.phase_loss(model.mofe, "router", tokens, y, label_smoothing=p["label_smoothing"])


@torch.no_grad()
def _predict(model: FinetunedMoFE, images, prep, device, p, step=None, features: bool = False):
    """Logits (and routed features) of every image; phase 1: whole backbone, phase 2: routed by label."""
    from mofe_ood.backbones import pooled_features

    model.eval()
    logits, feats = [], []
    for start in range(0, len(images), p["eval_batch_size"]):
        rows = np.arange(start, min(start + p["eval_batch_size"], len(images)))
        x = _images(images, rows, prep, device)
        with _autocast(device, p):
            if step is not None and step.phase == "base":
                f = pooled_features(model.backbone, x)
                out = {"feature": f, "logits": model.mofe.classifier(f)}
            elif step is not None and step.phase == "experts":
                out = model.mofe(model.tokens(x), route_labels=torch.as_tensor(images.labels[rows], device=device))
            else:
                out = model(x)
        logits.append(out["logits"].float().cpu())
        if features:
            feats.append(out["feature"].float().cpu())
    return torch.cat(logits), (torch.cat(feats) if features else None)


def run(params: dict, prepared_dir: str | Path = "data/prepared", models_dir: str | Path = "models") -> dict:
    """Fine-tune; writes `<models_dir>/<finetune.variant>/` (replacing only that folder)."""
    from mofe_ood.backbones import create_backbone, is_vit, preprocess_config
    from mofe_ood.prepare import load_split

    p = config(params)
    tp = train_mod.config(params)
    seed = check_number("base.seed", (params.get("base") or {}).get("seed", 0), low=0, integer=True)
    ex = params.get("extract") or {}
    name, weights, size = ex.get("backbone"), str(ex.get("weights")), ex.get("image_size")
    if not is_vit(str(name)):
        raise ParamError(f"extract.backbone: fine-tuning with block experts needs a ViT (DINOv2), not {name!r}")
    prepared_dir, models_dir = Path(prepared_dir), Path(models_dir)
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    classes = list(manifest["classes"])
    train_mod.check_against_data(merged(tp, {"variants": ["mofe"]}), len(classes))
    device = torch_device("finetune.device", p["device"])
    if device.type == "cuda":  # same seed, same result, as far as CUDA kernels allow
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    train_images, val_images = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    num_classes = len(classes)
    y_train = torch.from_numpy(train_images.labels.astype(np.int64))
    y_val = torch.from_numpy(val_images.labels.astype(np.int64))
    counts = np.bincount(train_images.labels, minlength=num_classes)

    torch.manual_seed(train_mod._seed(seed, "finetune-init"))
    backbone = create_backbone(name, weights, size, num_classes=0, drop_path_rate=p["drop_path"],
                               **p["backbone_kwargs"]).to(device)
    prep = preprocess_config(backbone, size)
    groups = _groups(backbone, train_images, prep, device, p, tp, seed, num_classes)
    m = tp["mofe"]
    mofe = mofe_mod.MoFE(backbone.num_features, num_classes, groups, expert="block", router=m["router"],
                         top_k=m["top_k"], init_from=backbone)
    model = FinetunedMoFE(backbone, mofe).to(device)
    mixup = _mixup(p, tp, num_classes, counts)
    steps = [train_mod.Step("base", p["epochs"]),
             *(train_mod.Step("experts", p["expert_epochs"], e) for e in range(mofe.num_experts)),
             train_mod.Step("router", p["router_epochs"])]
    knobs = {k: v for k, v in p.items() if k not in ("checkpoint_dir", "device", "eval_batch_size")}
    fingerprint = str(train_mod._seed(knobs, {k: v for k, v in tp.items() if k in ("mofe", "dynmix", "mixup_alpha")},
                                      seed, name, weights, size, manifest))
    ckpt_dir = Path(p["checkpoint_dir"]) / p["variant"] if p["checkpoint_dir"] else None
    ckpt = train_mod._load_checkpoint(ckpt_dir, fingerprint) if ckpt_dir else None
    history: list[dict] = []
    start_step, start_epoch = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if mixup is not None:
            mixup.load_state_dict(ckpt["mixup"])
        history, start_step, start_epoch = ckpt["history"], ckpt["step"], ckpt["epoch"]

    started = time.perf_counter()
    for si, step in enumerate(steps):
        if si < start_step:
            continue
        resumed = si == start_step and start_epoch > 0
        if step.phase == "experts" and step.expert == 0 and not resumed:
            for expert in mofe.experts:  # every expert starts from the fine-tuned last block
                expert.load_state_dict(mofe_mod.BlockExpert(backbone.num_features, init_from=backbone).state_dict())
        groups_ = _param_groups(model, step, p)
        optimizer = torch.optim.AdamW(groups_, lr=p["lr"], betas=(0.9, 0.99))
        if resumed:
            optimizer.load_state_dict(ckpt["optimizer"])
        per_epoch = len(train_mod._batches(step, y_train, groups, p["batch_size"], torch.Generator().manual_seed(0)))
        if p["max_steps_per_epoch"]:
            per_epoch = min(per_epoch, p["max_steps_per_epoch"])
        total, warmup = step.epochs * per_epoch, round(p["warmup_epochs"] * per_epoch)
        for epoch in range(start_epoch if resumed else 0, step.epochs):
            gen = torch.Generator().manual_seed(train_mod._seed(seed, "finetune", step.name, epoch))
            torch.manual_seed(train_mod._seed(seed, "finetune", step.name, epoch, "drop"))
            _param_groups(model, step, p)  # train/eval modes (checkpoint loads and evals change them)
            losses = []
            batches = train_mod._batches(step, y_train, groups, p["batch_size"], gen)[:per_epoch]
            for b, (rows, other_rows) in enumerate(batches):
                lr = train_mod._lr_at(p["lr"], p, epoch * per_epoch + b, total, warmup)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                x = _images(train_images, rows.numpy(), prep, device)
                x_other = None if other_rows is None else _images(train_images, other_rows.numpy(), prep, device)
                with _autocast(device, p):
                    loss = _loss(model, step, x, y_train[rows].to(device), x_other, mixup, gen, p, tp, num_classes)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            val_logits, _ = _predict(model, val_images, prep, device, p, step)
            row = {"epoch": len(history) + 1, "phase": step.name, "loss": float(np.mean(losses)), "lr": lr,
                   "val_accuracy": float((val_logits.argmax(1) == y_val).double().mean())}
            if mixup is not None:
                row.update({f"alpha_{c}": float(a) for c, a in enumerate(mixup.alphas)})
                mixup.update(train_mod.per_class_accuracy(val_logits, y_val, num_classes))
            history.append(row)
            log.info("finetune %s epoch %d: loss %.4f val acc %.4f", step.name, epoch + 1, row["loss"],
                     row["val_accuracy"])
            if ckpt_dir is not None:
                train_mod._save_checkpoint(ckpt_dir, fingerprint, model, optimizer, si, epoch + 1, mixup, history)
    seconds = time.perf_counter() - started
    _write(models_dir / p["variant"], model, prepared_dir, manifest, prep, device, p, tp, seed, name, weights,
           size, classes, history)
    if ckpt_dir is not None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info("finetune %s: %.1f s", p["variant"], seconds)
    return {p["variant"]: {"val_accuracy": history[-1]["val_accuracy"], "epochs": len(history)}}


def _groups(backbone, images, prep, device, p, tp, seed, num_classes) -> np.ndarray:
    """class -> group from class-mean features of the (not yet fine-tuned) backbone."""
    from mofe_ood.backbones import pooled_features

    m = tp["mofe"]
    if m["group_table"] is not None:
        return mofe_mod.check_groups(m["group_table"], num_classes, m["num_experts"])
    rows = np.concatenate([np.flatnonzero(images.labels == c)[:p["group_samples_per_class"]]
                           for c in range(num_classes)])
    feats = []
    backbone.eval()
    with torch.no_grad():
        for start in range(0, len(rows), p["eval_batch_size"]):
            x = _images(images, rows[start:start + p["eval_batch_size"]], prep, device)
            feats.append(pooled_features(backbone, x).float().cpu().numpy())
    feats, labels = np.concatenate(feats), images.labels[rows]
    means = np.stack([feats[labels == c].mean(0) for c in range(num_classes)])
    return mofe_mod.class_groups(means, m["num_experts"], m["groups"], seed=seed)


def _write(out: Path, model: FinetunedMoFE, prepared_dir: Path, manifest: dict, prep, device, p, tp, seed,
           name, weights, size, classes, history) -> None:
    from mofe_ood.prepare import load_split

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "features").mkdir(parents=True)
    model = model.float()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()},
              tmp / "backbone.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.mofe.state_dict().items()},
              tmp / "mofe.safetensors")
    dim = int(model.backbone.num_features)
    for split in manifest["splits"]:
        images = load_split(prepared_dir, split)
        _, feats = _predict(model, images, prep, device, p, features=True)
        np.savez(tmp / "features" / f"{split}.npz", features=feats.numpy().astype(np.float32),
                 labels=images.labels.astype(np.int64))
    info = {"backbone": name, "weights": "finetuned", "image_size": size, "feature_dim": dim, "classes": classes,
            "splits": {k: {"kind": s["kind"], "group": s["group"], "count": s["count"]}
                       for k, s in manifest["splits"].items()}}
    (tmp / "features" / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    head = mofe_mod.LinearProbe(dim, len(classes))
    head.classifier.load_state_dict(model.mofe.classifier.state_dict())
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, tmp / "model.safetensors")
    mofe_arch = {"kind": "mofe", "dim": dim, "num_classes": len(classes), "expert": "block",
                 "hidden_features": None, "drop": 0.0, "router": model.mofe.router.mode,
                 "top_k": model.mofe.router.top_k, "stem_blocks": 0,
                 "groups": [int(g) for g in model.mofe.groups], "backbone": name, "image_size": size,
                 "backbone_kwargs": p["backbone_kwargs"]}
    cfg = {"format": train_mod.FORMAT, "variant": p["variant"],
           "architecture": {"kind": "linear", "dim": dim, "num_classes": len(classes)},
           "finetuned": {"backbone": name, "image_size": size, "backbone_kwargs": p["backbone_kwargs"],
                         "mean": list(prep.mean), "std": list(prep.std),
                         "mofe": mofe_arch, "input": "features/ holds this model's routed features"},
           "classes": classes, "groups": mofe_arch["groups"],
           "features": {"backbone": name, "weights": weights, "image_size": size, "feature_dim": dim},
           "params": {"seed": seed, "finetune": p, "train": {k: tp[k] for k in ("mofe", "dynmix", "mixup_alpha")}},
           "val_accuracy": history[-1]["val_accuracy"] if history else None}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    train_mod.write_history(tmp / "history.csv", history)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)


def load_finetuned(model_dir: str | Path) -> tuple[FinetunedMoFE, dict]:
    """The fine-tuned image model of `model_dir` (eval mode): images -> dict(feature, logits, ...)."""
    from mofe_ood.backbones import create_backbone

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    ft = cfg.get("finetuned")
    if not ft:
        raise ValueError(f"{model_dir}: not a fine-tuned variant (config.json has no 'finetuned')")
    backbone = create_backbone(ft["backbone"], "random", ft["image_size"], num_classes=0,
                               **ft.get("backbone_kwargs", {}))
    backbone.load_state_dict(load_file(model_dir / "backbone.safetensors"))
    mofe = train_mod.build_model(ft["mofe"], init_from=backbone)
    mofe.load_state_dict(load_file(model_dir / "mofe.safetensors"))
    return FinetunedMoFE(backbone, mofe).eval(), cfg
