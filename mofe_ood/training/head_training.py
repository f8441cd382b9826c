"""Heads on the cached frozen features (the `train` stage's variants), trained by loop.fit.

MoFE trains in the paper's three phases (`train.mofe.training: phased`: base ->
each expert on its group -> router) or in one (`joint`, ours). While phase 2
runs, validation routes each sample by its true group (the router is trained
last, in phase 3); everywhere else the model predicts as it will at test time.

Data-parallel (`world` of several ranks): each rank computes the loss of its
part of every global batch, weighted by its share (training/distributed.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mofe_ood import mofe as mofe_mod
from mofe_ood.config import as_dict
from mofe_ood.mixup import DynamicBetaMixup, make_mixup, soft_targets
from mofe_ood.training import distributed, phases
from mofe_ood.training.data import Data
from mofe_ood.training.loop import (Loop, Step, batches, decay_groups, fit, per_class_accuracy, phased_steps,
                                    seed_of)
from mofe_ood.training.settings import TrainConfig
from mofe_ood.variants import VARIANTS, architecture, block_architecture, build_model

# What the weights do not depend on (a checkpoint of a run differing only in these is resumed).
NOT_IN_FINGERPRINT = ("variants", "seeds", "checkpoint_dir", "num_threads", "gpus", "processes")


def schedule(variant: str, cfg: TrainConfig) -> list[Step]:
    spec = VARIANTS[variant]
    if spec.kind != "mofe":
        return [Step("head", cfg.epochs)]
    epochs, expert_epochs, router_epochs = ((cfg.top.epochs, cfg.top.expert_epochs, cfg.top.router_epochs)
                                            if spec.trunk else (cfg.epochs, cfg.expert_epochs, cfg.router_epochs))
    if not spec.experts:  # the fine-tuned top alone: phase 1, one expert
        return [Step("base", epochs)]
    if cfg.mofe.training == "joint":
        return [Step("joint", epochs)]
    return phased_steps(epochs, expert_epochs, router_epochs, cfg.mofe.num_experts)


def class_groups(data: Data, cfg: TrainConfig, seed: int) -> np.ndarray:
    """class -> expert group from the class-mean pooled features (or `train.mofe.group_table`)."""
    x, y = data.x_train, data.y_train
    means = np.stack([x[y == c].double().mean(0).numpy() for c in range(data.num_classes)])
    return mofe_mod.class_groups(means, cfg.mofe.num_experts, cfg.mofe.groups, cfg.mofe.group_table, seed=seed)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, step: Step | None = None, labels: torch.Tensor | None = None,
            batch_size: int = 1024) -> torch.Tensor:
    """Class logits; during phase 1 through expert 0, during phase 2 routed by the true `labels`.
    (1,024 rows a batch: a CNN top's activations on 4,096 trunk maps would take a GB.)"""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        if step is not None and step.phase == "base":
            out.append(model(xb, expert=0)["logits"].cpu())
        elif step is not None and step.phase == "experts":
            out.append(model(xb, route_labels=labels[i:i + batch_size].to(device))["logits"].cpu())
        else:
            out.append(model(xb)["logits"].cpu())
    return torch.cat(out)


class HeadTask:
    """loop.Task of one head variant on `data`."""

    def __init__(self, variant: str, cfg: TrainConfig, data: Data, model: nn.Module, groups, mixup,
                 world: distributed.World):
        self.variant, self.cfg, self.data, self.model, self.groups = variant, cfg, data, model, groups
        self.mixup, self.world, self.y_val = mixup, world, data.y_val

    def begin(self, step: Step) -> None:
        if step.phase == "experts" and step.expert == 0:
            self.model.copy_expert(0)  # every expert starts from the phase-1 expert

    def enter(self, step: Step) -> list[dict]:
        if step.phase == "head":
            self.model.train()
            params = phases.set_trainable(self.model, list(self.model.parameters()))
        else:
            params = phases.enter_phase(self.model, step.phase, step.expert)
        return decay_groups(params, self.cfg.weight_decay)

    def base_lr(self, step: Step) -> float:
        if VARIANTS[self.variant].linear or step.phase == "router":
            return self.cfg.linear_lr
        return self.cfg.top.lr if VARIANTS[self.variant].trunk else self.cfg.lr

    def batches(self, step: Step, gen: torch.Generator) -> list[tuple]:
        return batches(step, self.data.y_train, self.groups, self.cfg.batch_size, gen)

    def loss(self, step: Step, batch: tuple, gen: torch.Generator) -> torch.Tensor | None:
        rows, other_rows = batch
        x, y = self.data.x_train[rows], self.data.y_train[rows]
        x_other = None if other_rows is None else self.data.x_train[other_rows]
        if not self.world.distributed:
            return self._loss(step, x, y, x_other, self.mixup, gen)
        part = self.world.part(len(x))
        if part.start == part.stop:
            # Only an epoch's last batch can be shorter than the number of ranks, so skipping its
            # draws (mixup, dropout) changes no later batch: both generators are re-seeded per epoch.
            return None
        device = self.world.device
        mixup = None if self.mixup is None else distributed.GlobalBatchMixup(self.mixup, x, y, part, device)
        x_other = None if x_other is None else x_other[part].to(device)
        with distributed.global_batch(self.model, part, len(x)):
            loss = self._loss(step, x[part].to(device), y[part].to(device), x_other, mixup, gen)
        return (part.stop - part.start) / len(x) * loss

    def _loss(self, step: Step, x, y, x_other, mixup, gen) -> torch.Tensor:
        cfg = self.cfg
        if step.phase != "head":
            return phases.phase_loss(self.model, step.phase, x, y, expert=step.expert, x_other=x_other, mixup=mixup,
                                     generator=gen, label_smoothing=cfg.label_smoothing,
                                     other_weight=cfg.mofe.other_weight)
        if mixup is None:
            # The linear probe is the standard one: plain cross-entropy (smoothing flattens the
            # logits that MSP, energy and ViM read).
            smoothing = 0.0 if VARIANTS[self.variant].linear else cfg.label_smoothing
            targets = soft_targets(y, self.model.classifier.out_features, smoothing)
            return phases.soft_cross_entropy(self.model(x)["logits"], targets)
        xm, t, _ = mixup(x, y, y, gen)
        return phases.soft_cross_entropy(self.model(xm)["logits"], t)

    def validate(self, step: Step) -> torch.Tensor:
        return predict(self.model, self.data.x_val, step, self.data.y_val)

    def mixup_accuracy(self, step: Step, val_logits: torch.Tensor) -> np.ndarray | None:
        if not isinstance(self.mixup, DynamicBetaMixup):
            return None
        data = self.data
        if self.cfg.dynmix.accuracy_from == "val":
            return per_class_accuracy(val_logits, data.y_val, data.num_classes)
        return per_class_accuracy(predict(self.model, data.x_train, step, data.y_train), data.y_train,
                                  data.num_classes)


TOP = "top"  # the fine-tuned top alone: phase 1 of the routed trunk variants


def shares_phase_one(variant: str, cfg: TrainConfig) -> bool:
    """A routed trunk variant trained in phases starts phase 2 from `top` (see `train_variant`'s `base`)."""
    spec = VARIANTS[variant]
    return spec.trunk and spec.routed and cfg.mofe.training == "phased"


def train_sharing_phase_one(variant: str, cfg: TrainConfig, data: Data, seed: int, ckpt_dir, phase_one: dict,
                            **inputs) -> tuple[nn.Module, dict, list[dict]]:
    """`train_variant`, with `top` trained once per seed: it is both the `top` variant and phase 1 of
    every routed trunk variant. `ckpt_dir(name)`: the checkpoint folder of variant `name` (or None);
    `phase_one`: seed -> `top`'s (model, architecture, history), filled here; `inputs`: train_variant's."""
    if variant != TOP and not shares_phase_one(variant, cfg):
        return train_variant(variant, cfg, data, seed, ckpt_dir(variant), **inputs)
    if seed not in phase_one:
        phase_one[seed] = train_variant(TOP, cfg, data, seed, ckpt_dir(TOP), **inputs)
    if variant == TOP:
        return phase_one[seed]
    top, _, history = phase_one[seed]
    return train_variant(variant, cfg, data, seed, ckpt_dir(variant), base=(top, history), **inputs)


def _start_from(task: HeadTask, top: nn.Module, steps: list[Step]) -> list[Step]:
    """Load phase 1's weights (stem, expert 0, classifier) from `top`; -> the steps after phase 1."""
    spec = VARIANTS[task.variant]
    if not (spec.trunk and spec.routed):
        raise ValueError(f"variant {task.variant!r} trains its own phase 1; only routed trunk variants "
                         "start from `top`")
    for name in ("stem", "classifier"):
        getattr(task.model, name).load_state_dict(getattr(top, name).state_dict())
    task.model.experts[0].load_state_dict(top.experts[0].state_dict())
    if isinstance(task.mixup, DynamicBetaMixup):  # difficulty from phase 1's end, as if trained here
        first = Step("base", 1)
        task.mixup.update(task.mixup_accuracy(first, task.validate(first)))
    return [s for s in steps if s.phase != "base"]


def train_variant(variant: str, cfg: TrainConfig, data: Data, seed: int, ckpt_dir=None,
                  world: distributed.World | None = None, trunk: Data | None = None,
                  backbone: nn.Module | None = None, backbone_spec: dict | None = None,
                  base: tuple[nn.Module, list[dict]] | None = None) -> tuple[nn.Module, dict, list[dict]]:
    """Train `variant` (data-parallel: this rank's part); -> (model in eval mode on the CPU, its
    architecture, history rows).

    A trunk variant (`top`, `mofe_block*`) trains on `trunk` (the cached activations entering
    the backbone's top, same rows as `data`), its experts copied from `backbone`'s top
    (`backbone_spec`: name, image_size, top_blocks); its groups come from `data`'s pooled features.
    `base`: (`top`'s trained model, its history) of this seed: a routed trunk variant starts phase 2
    from it, as the paper's experts start from the fine-tuned baseline, instead of training its own
    phase 1 (the same weights for `mofe_block` and `mofe_block_dynmix`: their ablation differs in
    the experts' mixup alone, and the full train split's phase 1 is trained once).
    """
    world = world or distributed.World()
    spec = VARIANTS[variant]
    num_classes, dim = data.num_classes, data.x_train.shape[1]
    groups = class_groups(data, cfg, seed) if spec.routed else None
    if spec.trunk:
        if trunk is None or backbone is None:
            raise ValueError(f"variant {variant!r} trains on the cached trunk: pass `trunk` and `backbone`")
        if groups is None:  # the top alone: one expert that every class goes to
            groups = np.zeros(num_classes, np.int64)
        torch.manual_seed(seed_of(seed, "init", variant))
        # What the router reads of the trunk: a CNN's channels (N x C x H x W), a ViT's token width
        # (N x T x D), not its token count (shape[1] there: DINOv2 crashed on it).
        router_dim = int(mofe_mod.router_input(trunk.x_train[:1]).shape[1])
        model = mofe_mod.MoFE(int(backbone.num_features), num_classes, groups, expert="block",
                              router="hard" if not spec.experts else cfg.mofe.router,
                              top_k=1 if not spec.experts else cfg.mofe.top_k, init_from=backbone,
                              router_dim=router_dim, top_blocks=backbone_spec["top_blocks"])
        arch = block_architecture(model, backbone_spec["backbone"], backbone_spec["image_size"], {})
        model = model.to(world.device)
        data = trunk
    else:
        arch = architecture(variant, cfg, dim, num_classes, groups)
        torch.manual_seed(seed_of(seed, "init", arch["kind"]))
        model = build_model(arch).to(world.device)
    if world.distributed:
        distributed.use_global_batch_dropout(model)
    counts = np.bincount(data.y_train.numpy(), minlength=num_classes)
    smoothing = 0.0 if spec.linear else cfg.label_smoothing
    mixup = make_mixup(spec.mixup, num_classes, counts, smoothing, cfg.mixup_alpha, cfg.dynmix)
    knobs = {k: v for k, v in as_dict(cfg).items() if k not in NOT_IN_FINGERPRINT}
    loop = Loop(variant, (seed,), "dropout", cfg.warmup_epochs, cfg.min_lr_ratio, checkpoint_dir=ckpt_dir,
                fingerprint=str(seed_of(variant, knobs, seed, data.fingerprint())), world=world)
    task, steps = HeadTask(variant, cfg, data, model, groups, mixup, world), schedule(variant, cfg)
    if base is not None:
        steps = _start_from(task, base[0], steps)
    history = fit(task, steps, loop)
    if base is not None:  # phase 1's rows first, numbered on
        history = [*base[1], *({**row, "epoch": len(base[1]) + row["epoch"]} for row in history)]
    for q in model.parameters():
        q.requires_grad_(True)
    return model.cpu().eval(), arch, history
