"""The one step loop: heads on cached features and fine-tuning on images both train through `fit`.

A run is a list of `Step`s (a head: one; MoFE: base, one per expert, router);
each step gets a fresh AdamW (0.9, 0.99) over the param groups the task
returns, a cosine lr schedule with linear warm-up, and epochs of batches.
After every epoch: the ID validation accuracy, a history row, the mixup's
per-class update, and a checkpoint (`save_checkpoint`: weights, optimizer,
mixup state and history, safetensors + JSON, no pickle).

Deterministic: epoch e of step s draws its shuffle and mixup from a generator
seeded by (seed prefix, s, e) and its dropout from the global generator seeded
the same way, so a run resumed from a checkpoint continues exactly as an
uninterrupted one.

Hooks: `Loop.autocast` (bf16 on CUDA for fine-tuning) wraps each loss;
`Loop.world` (data parallelism) sums gradients and losses over the ranks and
hands every rank rank 0's mixup update; only rank 0 writes checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mofe_ood.atomic import replacing
from mofe_ood.training.distributed import World

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One block of epochs with one optimizer: a head, or one MoFE phase (one expert in phase 2)."""

    phase: str  # head | base | experts | router | joint
    epochs: int
    expert: int | None = None

    @property
    def name(self) -> str:
        return self.phase if self.expert is None else f"expert{self.expert}"


def phased_steps(epochs: int, expert_epochs: int, router_epochs: int, num_experts: int) -> list[Step]:
    """MoFE's three phases (the paper's): base, each expert on its group, the router."""
    return [Step("base", epochs), *(Step("experts", expert_epochs, e) for e in range(num_experts)),
            Step("router", router_epochs)]


def seed_of(*parts) -> int:
    """A 63-bit seed from (base seed, names, numbers): independent streams per phase and epoch."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lr_at(base_lr: float, min_lr_ratio: float, it: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` iterations, then cosine down to base_lr * min_lr_ratio."""
    if it < warmup:
        return base_lr * (it + 1) / warmup
    progress = (it - warmup) / max(1, total - warmup)
    low = base_lr * min_lr_ratio
    return low + (base_lr - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norms; full lr (`lr_scale` 1)."""
    return [{"params": [q for q in params if q.ndim >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0}]


def batches(step: Step, y: torch.Tensor, groups: np.ndarray | None, batch_size: int, gen: torch.Generator):
    """(rows, other_rows) per batch of the samples labelled `y`; phase 2 pairs each in-group
    row with an out-of-group row (its "other" target)."""
    if step.phase != "experts":
        perm = torch.randperm(len(y), generator=gen)
        return [(perm[i:i + batch_size], None) for i in range(0, len(perm), batch_size)]
    in_group = torch.as_tensor(groups)[y] == step.expert
    rows = torch.nonzero(in_group, as_tuple=True)[0]
    rows = rows[torch.randperm(len(rows), generator=gen)]
    pool = torch.nonzero(~in_group, as_tuple=True)[0]
    if len(pool) == 0:
        others = None
    elif len(pool) >= len(rows):
        others = pool[torch.randperm(len(pool), generator=gen)[:len(rows)]]
    else:
        others = pool[torch.randint(len(pool), (len(rows),), generator=gen)]
    return [(rows[i:i + batch_size], None if others is None else others[i:i + batch_size])
            for i in range(0, len(rows), batch_size)]


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Accuracy of each class (NaN for a class without samples): what Dynamic-β Mixup's EMA reads."""
    hit = (logits.argmax(1) == labels).double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add(0, labels, hit)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan).numpy()


class Task(Protocol):
    """What `fit` trains: a model, its data and its losses (head_training.HeadTask, finetuning.FinetuneTask)."""

    model: nn.Module
    mixup: object | None      # Mixup, DynamicBetaMixup or None
    y_val: torch.Tensor       # the ID validation labels

    def begin(self, step: Step) -> None:
        """`step` starts afresh (not resumed): e.g. every expert starts from the phase-1 one."""

    def enter(self, step: Step) -> list[dict]:
        """Train/eval modes and requires_grad for `step`; -> its AdamW param groups (with `lr_scale`)."""

    def base_lr(self, step: Step) -> float: ...

    def batches(self, step: Step, gen: torch.Generator) -> list[tuple]: ...

    def loss(self, step: Step, batch: tuple, gen: torch.Generator) -> torch.Tensor | None:
        """None: this rank holds no row of the batch (data parallelism)."""

    def validate(self, step: Step) -> torch.Tensor:
        """Logits of the validation samples as `step` predicts them."""

    def mixup_accuracy(self, step: Step, val_logits: torch.Tensor) -> np.ndarray | None:
        """The per-class accuracy the mixup updates from (None: no update)."""


@dataclass
class Loop:
    """How `fit` runs: seeds, lr schedule, checkpoints, and the autocast / data-parallel hooks."""

    name: str                  # for the log
    seed_prefix: tuple         # (base.seed, ...): the head of every epoch's seed
    dropout_tag: str           # the last part of the dropout seed
    warmup_epochs: float
    min_lr_ratio: float
    max_steps_per_epoch: int | None = None
    checkpoint_dir: Path | None = None
    fingerprint: str = ""      # what the weights depend on: a checkpoint of another one is ignored
    autocast: Callable[[], ContextManager] = nullcontext
    world: World = field(default_factory=World)


def fit(task: Task, steps: list[Step], loop: Loop) -> list[dict]:
    """Train `task` through `steps` (resuming from `loop.checkpoint_dir`); -> the history rows."""
    history: list[dict] = []
    start_step, start_epoch, ckpt = 0, 0, None
    if loop.checkpoint_dir is not None:
        ckpt = load_checkpoint(loop.checkpoint_dir, loop.fingerprint)
    if ckpt is not None:
        task.model.load_state_dict(ckpt["model"])
        if task.mixup is not None:
            task.mixup.load_state_dict(ckpt["mixup"])
        history, start_step, start_epoch = ckpt["history"], ckpt["step"], ckpt["epoch"]
        log.info("%s: resuming after step %d epoch %d", loop.name, start_step, start_epoch)
    for si, step in enumerate(steps):
        if si < start_step:
            continue
        resumed = si == start_step and start_epoch > 0
        if not resumed:
            task.begin(step)
        groups = task.enter(step)
        optimizer = torch.optim.AdamW(groups, lr=task.base_lr(step), betas=(0.9, 0.99))
        if resumed:
            optimizer.load_state_dict(ckpt["optimizer"])
        per_epoch = len(task.batches(step, torch.Generator().manual_seed(0)))
        if loop.max_steps_per_epoch:
            per_epoch = min(per_epoch, loop.max_steps_per_epoch)
        for epoch in range(start_epoch if resumed else 0, step.epochs):
            row = _epoch(task, step, epoch, per_epoch, optimizer, loop, [q for g in groups for q in g["params"]])
            row["epoch"] = len(history) + 1
            history.append(row)
            log.info("%s %s epoch %d: loss %.4f val acc %.4f", loop.name, step.name, epoch + 1, row["loss"],
                     row["val_accuracy"])
            if loop.checkpoint_dir is not None and loop.world.main:
                save_checkpoint(loop.checkpoint_dir, loop.fingerprint, task.model, optimizer, si, epoch + 1,
                                task.mixup, history)
    return history


def _epoch(task: Task, step: Step, epoch: int, per_epoch: int, optimizer, loop: Loop,
           trainable: list[nn.Parameter]) -> dict:
    """One epoch of `step`: its batches, then validation and the mixup update; -> its history row."""
    world = loop.world
    gen = torch.Generator().manual_seed(seed_of(*loop.seed_prefix, step.name, epoch))
    torch.manual_seed(seed_of(*loop.seed_prefix, step.name, epoch, loop.dropout_tag))
    task.enter(step)  # train/eval modes again: checkpoint loads and validation change them
    base_lr, losses = task.base_lr(step), []
    total, warmup = step.epochs * per_epoch, round(loop.warmup_epochs * per_epoch)
    for b, batch in enumerate(task.batches(step, gen)[:per_epoch]):
        lr = lr_at(base_lr, loop.min_lr_ratio, epoch * per_epoch + b, total, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with loop.autocast():
            loss = task.loss(step, batch, gen)
        optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            loss.backward()
        world.sum_grads(trainable)
        optimizer.step()
        losses.append(0.0 if loss is None else loss.item())
    losses = world.sum(torch.tensor(losses, dtype=torch.float64)).tolist()  # the ranks' shares
    val_logits = task.validate(step)
    # "epoch" is set by fit; it comes first in the row (history.csv's column order)
    row = {"epoch": None, "phase": step.name, "loss": float(np.mean(losses)), "lr": lr,
           "val_accuracy": float((val_logits.argmax(1) == task.y_val).double().mean())}
    if task.mixup is not None:
        row.update({f"alpha_{c}": float(a) for c, a in enumerate(task.mixup.alphas)})
        accuracy = task.mixup_accuracy(step, val_logits)
        if accuracy is not None:
            # Every rank must draw the next epoch's mixup with the same alphas: rank 0's.
            task.mixup.update(world.broadcast(torch.from_numpy(accuracy)).numpy())
    return row


# ---------------------------------------------------------------- checkpoints (safetensors + JSON)

def save_checkpoint(ckpt_dir: Path, fingerprint: str, model: nn.Module, optimizer, step_index: int,
                    epoch: int, mixup, history: list[dict]) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"optim.{idx}.{k}"] = torch.as_tensor(v).cpu().contiguous()
    meta = {"fingerprint": fingerprint, "step": step_index, "epoch": epoch,
            "param_groups": opt["param_groups"], "mixup": mixup.state_dict() if mixup else {},
            "history": history}
    with replacing(ckpt_dir) as tmp:
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta))


def load_checkpoint(ckpt_dir: Path, fingerprint: str) -> dict | None:
    meta_file = ckpt_dir / "state.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("fingerprint") != fingerprint:
        log.warning("%s: a checkpoint of other params or data; starting afresh", ckpt_dir)
        return None
    tensors = load_file(ckpt_dir / "state.safetensors")
    meta["model"] = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    meta["optimizer"] = {"state": state, "param_groups": meta.pop("param_groups")}
    return meta
