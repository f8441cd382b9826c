"""End-to-end fine-tuning: a ViT backbone + MoFE with block experts, on images (the paper's setting).

The three phases of mofe.py, on images, through the same loop as the heads
(loop.fit; GPU, or a CPU for tests on a tiny ViT):
1. backbone + the shared classifier, every sample through the whole backbone
   (AdamW (0.9, 0.99), layer-wise lr decay, cosine schedule with warm-up,
   drop-path, label smoothing, image-space mixup);
2. E block experts copied from the fine-tuned last block (+ final norm), each
   trained on its class group with image-space Dynamic-β Mixup, the trunk
   (every block but the last) frozen;
3. the router on the CLS token entering the last block, everything else frozen.
bf16 autocast on CUDA (the loop's autocast hook). A checkpoint after every
epoch (`finetune.checkpoint_dir`); a resumed run equals an uninterrupted one
(bit for bit on CPU).

Output, `<models_dir>/<variant>/`:
- `backbone.safetensors`: the fine-tuned backbone (timm state dict, loads with
  `create_backbone(name, path)`); `mofe.safetensors`: the MoFE (token input);
  `variants.load_image_model(dir)` rebuilds the image model (images -> dict(feature, logits, ...));
- `features/<split>.npz` + `info.json`: the routed feature of every prepared
  split (extract's layout), and `model.safetensors` + `config.json`: the shared
  classifier as a `linear` head on those features, so `variants.load_head` and
  the feature-based scores work on a fine-tuned variant as on the others;
- `history.csv`: per epoch, as the heads' (training/history.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mofe_ood import mofe as mofe_mod
from mofe_ood.atomic import replacing
from mofe_ood.backbones import create_backbone, is_vit, pooled_features, preprocess_config, torch_device
from mofe_ood.config import as_dict, base
from mofe_ood.mixup import make_mixup, soft_targets
from mofe_ood.params import ParamError
from mofe_ood.training import phases
from mofe_ood.training.data import Images, images_on, load_split
from mofe_ood.training.history import write_history
from mofe_ood.training.loop import Loop, Step, batches, decay_groups, fit, per_class_accuracy, phased_steps, seed_of
from mofe_ood.training.settings import FinetuneConfig, TrainConfig, finetune_config, train_config
from mofe_ood.variants import FinetunedMoFE, save_image_model

log = logging.getLogger(__name__)

EXPERT = "block"  # the expert kind fine-tuning trains: a copy of the ViT's last block


def autocast(device: torch.device, cfg: FinetuneConfig):
    """bf16 autocast on CUDA when `finetune.amp` (a no-op context elsewhere)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")


def build(backbone: torch.nn.Module, groups: np.ndarray, num_classes: int, tcfg: TrainConfig) -> FinetunedMoFE:
    """The image model: `backbone`'s trunk -> MoFE whose experts are copies of its last block."""
    m = tcfg.mofe
    mofe = mofe_mod.MoFE(backbone.num_features, num_classes, groups, expert=EXPERT, router=m.router,
                         top_k=m.top_k, init_from=backbone)
    return FinetunedMoFE(backbone, mofe)


def param_groups(model: FinetunedMoFE, step: Step, cfg: FinetuneConfig) -> list[dict]:
    """Phase 1: the backbone with layer-wise lr decay (timm's grouping) + the classifier; later
    phases: the phase's MoFE parameters at the full lr. Sets train/eval modes and requires_grad."""
    if step.phase == "base":
        from timm.optim import param_groups_layer_decay

        model.backbone.requires_grad_(True)
        groups = param_groups_layer_decay(model.backbone, weight_decay=cfg.weight_decay,
                                          layer_decay=cfg.layer_decay)
        groups += decay_groups(list(model.mofe.classifier.parameters()), cfg.weight_decay)
        phases.set_trainable(model, [q for g in groups for q in g["params"]])
        model.eval()
        model.backbone.train()
        return groups
    model.backbone.requires_grad_(False)
    params = phases.enter_phase(model.mofe, step.phase, step.expert)
    model.backbone.eval()
    return decay_groups(params, cfg.weight_decay)


def loss(model: FinetunedMoFE, step: Step, x, y, x_other, mixup, gen, cfg: FinetuneConfig,
         tcfg: TrainConfig) -> torch.Tensor:
    """The loss of one batch of images `x` (labels `y`) in `step`; image-space mixup."""
    if step.phase in ("base", "experts"):
        if mixup is not None:
            x, t, _ = mixup(x, y, y, gen)
        else:
            t = soft_targets(y, model.mofe.num_classes, cfg.label_smoothing)
        if step.phase == "base":
            logits = model.mofe.classifier(pooled_features(model.backbone, x))
            return phases.soft_cross_entropy(logits, t.to(logits.device))
        with torch.no_grad():  # the trunk is frozen from phase 2 on
            tokens = model.tokens(x)
            other = None if x_other is None else model.tokens(x_other)
        return phases.phase_loss(model.mofe, "experts", tokens, y, expert=step.expert, x_other=other,
                                 targets=t.to(tokens.device), other_weight=tcfg.mofe.other_weight)
    with torch.no_grad():
        tokens = model.tokens(x)
    return phases.phase_loss(model.mofe, "router", tokens, y, label_smoothing=cfg.label_smoothing)


@torch.no_grad()
def predict(model: FinetunedMoFE, images: Images, prep, device, cfg: FinetuneConfig, step: Step | None = None,
            features: bool = False):
    """Logits (and routed features) of every image; phase 1: whole backbone, phase 2: routed by label."""
    model.eval()
    logits, feats = [], []
    for start in range(0, len(images), cfg.eval_batch_size):
        rows = np.arange(start, min(start + cfg.eval_batch_size, len(images)))
        x = images_on(images, rows, prep, device)
        with autocast(device, cfg):
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


def class_groups(backbone, images: Images, prep, device, cfg: FinetuneConfig, tcfg: TrainConfig, seed: int,
                 num_classes: int) -> np.ndarray:
    """class -> group from class-mean features of the (not yet fine-tuned) backbone."""
    m = tcfg.mofe
    if m.group_table is not None:
        return mofe_mod.check_groups(m.group_table, num_classes, m.num_experts)
    rows = np.concatenate([np.flatnonzero(images.labels == c)[:cfg.group_samples_per_class]
                           for c in range(num_classes)])
    feats = []
    backbone.eval()
    with torch.no_grad():
        for start in range(0, len(rows), cfg.eval_batch_size):
            x = images_on(images, rows[start:start + cfg.eval_batch_size], prep, device)
            feats.append(pooled_features(backbone, x).float().cpu().numpy())
    feats, labels = np.concatenate(feats), images.labels[rows]
    means = np.stack([feats[labels == c].mean(0) for c in range(num_classes)])
    return mofe_mod.class_groups(means, m.num_experts, m.groups, seed=seed)


class FinetuneTask:
    """loop.Task of fine-tuning `model` on the prepared `train` images."""

    def __init__(self, model: FinetunedMoFE, train: Images, val: Images, prep, device, groups, mixup,
                 cfg: FinetuneConfig, tcfg: TrainConfig):
        self.model, self.train, self.val, self.prep, self.device = model, train, val, prep, device
        self.groups, self.mixup, self.cfg, self.tcfg = groups, mixup, cfg, tcfg
        self.y_train = torch.from_numpy(train.labels.astype(np.int64))
        self.y_val = torch.from_numpy(val.labels.astype(np.int64))

    def begin(self, step: Step) -> None:
        if step.phase == "experts" and step.expert == 0:
            backbone = self.model.backbone  # every expert starts from the fine-tuned last block
            fresh = mofe_mod.EXPERTS[EXPERT](backbone.num_features, init_from=backbone).state_dict()
            for expert in self.model.mofe.experts:
                expert.load_state_dict(fresh)

    def enter(self, step: Step) -> list[dict]:
        return param_groups(self.model, step, self.cfg)

    def base_lr(self, step: Step) -> float:
        return self.cfg.lr

    def batches(self, step: Step, gen: torch.Generator) -> list[tuple]:
        return batches(step, self.y_train, self.groups, self.cfg.batch_size, gen)

    def loss(self, step: Step, batch: tuple, gen: torch.Generator) -> torch.Tensor:
        rows, other_rows = batch
        x = images_on(self.train, rows.numpy(), self.prep, self.device)
        x_other = None if other_rows is None else images_on(self.train, other_rows.numpy(), self.prep, self.device)
        return loss(self.model, step, x, self.y_train[rows].to(self.device), x_other, self.mixup, gen, self.cfg,
                    self.tcfg)

    def validate(self, step: Step) -> torch.Tensor:
        return predict(self.model, self.val, self.prep, self.device, self.cfg, step)[0]

    def mixup_accuracy(self, step: Step, val_logits: torch.Tensor) -> np.ndarray:
        num_classes = self.model.mofe.num_classes
        if self.tcfg.dynmix.accuracy_from == "val":
            return per_class_accuracy(val_logits, self.y_val, num_classes)
        # `train`: one more pass over the training images an epoch (as the cached heads do).
        return per_class_accuracy(predict(self.model, self.train, self.prep, self.device, self.cfg, step)[0],
                                  self.y_train, num_classes)


def run(params: dict, prepared_dir: str | Path, models_dir: str | Path) -> dict:
    """Fine-tune; writes `<models_dir>/<finetune.variant>/` (replacing only that folder)."""
    cfg, tcfg, seed = finetune_config(params), train_config(params), base(params).seed
    name, weights, size = params["extract"]["backbone"], str(params["extract"]["weights"]), \
        params["extract"]["image_size"]
    if not is_vit(str(name)):
        raise ParamError(f"extract.backbone: fine-tuning with block experts needs a ViT (DINOv2), not {name!r}")
    prepared_dir, models_dir = Path(prepared_dir), Path(models_dir)
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    classes = list(manifest["classes"])
    tcfg.mofe.check_data(len(classes))
    device = torch_device("finetune.device", cfg.device)
    if device.type == "cuda":  # same seed, same result, as far as CUDA kernels allow
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    torch.manual_seed(seed_of(seed, "finetune-init"))
    backbone = create_backbone(name, weights, size, num_classes=0, drop_path_rate=cfg.drop_path,
                               **cfg.backbone_kwargs).to(device)
    prep = preprocess_config(backbone, size)
    groups = class_groups(backbone, train, prep, device, cfg, tcfg, seed, len(classes))
    model = build(backbone, groups, len(classes), tcfg).to(device)
    counts = np.bincount(train.labels, minlength=len(classes))
    mixup = make_mixup(cfg.mixup, len(classes), counts, cfg.label_smoothing, tcfg.mixup_alpha, tcfg.dynmix)
    knobs = {k: v for k, v in as_dict(cfg).items() if k not in ("checkpoint_dir", "device", "eval_batch_size")}
    shared = {k: as_dict(tcfg)[k] for k in ("mofe", "dynmix", "mixup_alpha")}
    ckpt_dir = Path(cfg.checkpoint_dir) / cfg.variant if cfg.checkpoint_dir else None
    loop = Loop("finetune", (seed, "finetune"), "drop", cfg.warmup_epochs, cfg.min_lr_ratio,
                max_steps_per_epoch=cfg.max_steps_per_epoch, checkpoint_dir=ckpt_dir,
                fingerprint=str(seed_of(knobs, shared, seed, name, weights, size, manifest)),
                autocast=lambda: autocast(device, cfg))
    steps = phased_steps(cfg.epochs, cfg.expert_epochs, cfg.router_epochs, model.mofe.num_experts)
    started = time.perf_counter()
    history = fit(FinetuneTask(model, train, val, prep, device, groups, mixup, cfg, tcfg), steps, loop)
    seconds = time.perf_counter() - started
    spec = {"backbone": name, "weights": weights, "image_size": size, "seed": seed, "shared": shared}
    _write(models_dir / cfg.variant, model, prepared_dir, manifest, prep, device, cfg, spec, history)
    if ckpt_dir is not None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info("finetune %s: %.1f s", cfg.variant, seconds)
    return {cfg.variant: {"val_accuracy": history[-1]["val_accuracy"], "epochs": len(history)}}


def _write(out: Path, model: FinetunedMoFE, prepared_dir: Path, manifest: dict, prep, device,
           cfg: FinetuneConfig, spec: dict, history: list[dict]) -> None:
    def split_features():
        for split in manifest["splits"]:
            images = load_split(prepared_dir, split)
            _, feats = predict(model, images, prep, device, cfg, features=True)
            yield split, feats.numpy(), images.labels

    with replacing(out) as tmp:
        model = model.float()
        save_image_model(tmp, cfg.variant, model, split_features(), manifest["splits"], list(manifest["classes"]),
                         {"backbone": spec["backbone"], "weights": spec["weights"], "image_size": spec["image_size"],
                          "mean": prep.mean, "std": prep.std, "backbone_kwargs": cfg.backbone_kwargs},
                         {"seed": spec["seed"], "finetune": as_dict(cfg), "train": spec["shared"]}, history)
        write_history(tmp / "history.csv", history)
