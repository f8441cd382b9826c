"""Stage `train`: heads on the cached frozen features, one folder per variant.

Variants (`train.variants`):
- `linear`: linear probe (plain cross-entropy: no mixup, no label smoothing);
- `mlp`: one-hidden-layer MLP head + plain mixup;
- `mofe`: MoFE with MLP experts (mofe.py) + plain mixup;
- `mofe_dynmix`: MoFE + Dynamic-β Mixup (mixup.py): the method.
MoFE trains in the paper's three phases (`train.mofe.training: phased`: base ->
each expert on its group -> router) or in one (`joint`).

Output per variant, `<models_dir>/<variant>/`:
- `model.safetensors`: the weights (no pickle anywhere, checkpoints included);
- `config.json`: architecture (enough for `load_model`), class names, class
  groups, the params used, the final ID validation accuracy;
- `history.csv`: one row per epoch (DVC plot data): epoch, phase, loss, lr,
  ID val accuracy, the mixup alpha of every class in use.
  While phase 2 runs, `val_accuracy` routes each sample by its true group (the
  router is trained last, in phase 3); everywhere else the model predicts as
  it will at test time.
plus `<models_dir>/metrics.json` (per variant: final val accuracy, epochs; no timings: DVC
tracks the folder, and its hash must be the same on every machine. Timings go to the log).

Deterministic: every epoch draws its shuffle, mixup and dropout from
generators seeded by (base.seed, phase, epoch), so a run resumed from a
checkpoint (`train.checkpoint_dir`, written after every epoch) continues
exactly as an uninterrupted one.

Data-parallel (mofe_ood/distributed.py): with `train.gpus` > 1 on a machine
with CUDA, or `train.processes` > 1 (on a CPU-only machine: gloo processes),
`run` relaunches itself under torchrun, one process per GPU. Each rank trains
on its part of every global batch and the gradients are summed; the global
batches, mixup and dropout draws are those of one process, so the weights
equal one process's up to float rounding. Rank 0 writes the outputs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mofe_ood import distributed
from mofe_ood import mofe as mofe_mod
from mofe_ood.mixup import DynamicBetaMixup, Mixup, soft_targets
from mofe_ood.params import ParamError, check_choice, check_number, merged

log = logging.getLogger(__name__)

VARIANTS = ("linear", "mlp", "mofe", "mofe_dynmix")
FORMAT = "mofe-ood-head/1"

# The train section's keys and defaults (params.yaml lists them all; a missing key takes these).
DEFAULTS = {
    "variants": list(VARIANTS),
    "epochs": 15,             # linear / mlp heads, MoFE phase 1 ("base") and the joint variant
    "expert_epochs": 6,       # MoFE phase 2, per expert
    "router_epochs": 6,       # MoFE phase 3
    "batch_size": 256,
    "lr": 1.0e-3,             # AdamW (0.9, 0.99), cosine schedule with linear warm-up
    "linear_lr": 1.0e-2,      # lr of a linear layer trained alone: the linear probe, MoFE's router (phase 3)
    "weight_decay": 0.05,     # not on biases and norms
    "warmup_epochs": 1,
    "min_lr_ratio": 0.01,     # final lr = lr * min_lr_ratio
    "label_smoothing": 0.1,   # all but the linear probe
    "hidden_features": 256,   # MLP head, MLP experts and stem
    "drop": 0.1,              # dropout inside MLP head / experts
    "mixup_alpha": 0.2,       # plain mixup of `mlp` and `mofe` (0 = off)
    "mofe": {
        "num_experts": 3,
        "groups": "kmeans",   # kmeans | agglomerative (class-mean features, cosine)
        "group_table": None,  # or a class -> group list, e.g. [0, 1, 0, 0, 2, 2, 1]
        "expert": "mlp",      # mlp (cached features); block needs fine-tuning (finetune.py)
        "stem_blocks": 1,     # MLP blocks below the experts (trained in phase 1; the router reads them)
        "router": "hard",     # hard (paper: top-1) | soft (top_k gated mixture)
        "top_k": 1,
        "training": "phased",  # phased (paper's 3 phases) | joint
        "other_weight": 0.1,  # phase 2: weight of the out-of-group "other" target
    },
    "dynmix": {
        "alpha_min": 0.1,
        "alpha_max": 1.0,
        "power": 1.0,
        "momentum": 0.9,      # EMA of per-class accuracy, updated every epoch
        "difficulty": "accuracy",  # accuracy | counts
        "accuracy_from": "val",    # val | train: whose per-class accuracy feeds the EMA
    },
    "checkpoint_dir": None,   # a folder: checkpoint every epoch and resume from it
    "num_threads": 1,         # 1: tiny matmuls lose to thread overhead on a busy 2-core machine; same results
    "gpus": 0,                # Kubeflow: GPUs of the step; > 1: one data-parallel process per GPU
    "processes": None,        # data-parallel processes; None: `gpus` where CUDA is available, else 1
}


# ---------------------------------------------------------------- params

def config(params: dict) -> dict:
    """params["train"] over DEFAULTS, validated (before any data is read or any training)."""
    p = merged(DEFAULTS, params.get("train") or {})
    variants = p["variants"]
    if not isinstance(variants, list) or not variants:
        raise ParamError(f"train.variants: {variants!r} must be a non-empty list")
    for v in variants:
        check_choice("train.variants", v, VARIANTS)
    if len(set(variants)) != len(variants):
        raise ParamError(f"train.variants: {variants!r} lists a variant twice")
    for key in ("epochs", "expert_epochs", "router_epochs", "batch_size"):
        check_number(f"train.{key}", p[key], low=1, integer=True)
    for key in ("lr", "linear_lr"):
        check_number(f"train.{key}", p[key], low=0)
        if p[key] <= 0:
            raise ParamError(f"train.{key}: {p[key]!r} must be > 0")
    check_number("train.weight_decay", p["weight_decay"], low=0)
    check_number("train.warmup_epochs", p["warmup_epochs"], low=0)
    check_number("train.min_lr_ratio", p["min_lr_ratio"], low=0, high=1)
    check_number("train.label_smoothing", p["label_smoothing"], low=0, high=0.99)
    check_number("train.hidden_features", p["hidden_features"], low=1, integer=True)
    check_number("train.drop", p["drop"], low=0, high=0.99)
    check_number("train.mixup_alpha", p["mixup_alpha"], low=0)
    check_number("train.num_threads", p["num_threads"], low=1, integer=True, allow_none=True)
    check_number("train.gpus", p["gpus"], low=0, integer=True)
    check_number("train.processes", p["processes"], low=1, integer=True, allow_none=True)
    if p["checkpoint_dir"] is not None and not isinstance(p["checkpoint_dir"], str):
        raise ParamError(f"train.checkpoint_dir: {p['checkpoint_dir']!r} is not a path or null")

    m = p["mofe"]
    check_number("train.mofe.num_experts", m["num_experts"], low=1, integer=True)
    check_number("train.mofe.stem_blocks", m["stem_blocks"], low=0, integer=True)
    check_choice("train.mofe.groups", m["groups"], mofe_mod.GROUP_METHODS)
    check_choice("train.mofe.expert", m["expert"], mofe_mod.EXPERT_KINDS)
    check_choice("train.mofe.router", m["router"], mofe_mod.ROUTER_MODES)
    check_choice("train.mofe.training", m["training"], ("phased", "joint"))
    check_number("train.mofe.top_k", m["top_k"], low=1, high=m["num_experts"], integer=True)
    check_number("train.mofe.other_weight", m["other_weight"], low=0)
    if m["router"] == "hard" and m["top_k"] != 1:
        raise ParamError(f"train.mofe.top_k: {m['top_k']} needs train.mofe.router: soft (hard routing is top-1)")
    if m["expert"] == "block" and any(v.startswith("mofe") for v in variants):
        raise ParamError("train.mofe.expert: 'block' experts are ViT blocks and need images "
                         "(mofe_ood.finetune); the train stage on cached features uses 'mlp'")
    if m["group_table"] is not None:
        table = m["group_table"]
        if not isinstance(table, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in table):
            raise ParamError(f"train.mofe.group_table: {table!r} must be a list of integer group ids or null")

    d = p["dynmix"]
    check_number("train.dynmix.alpha_min", d["alpha_min"], low=0)
    check_number("train.dynmix.alpha_max", d["alpha_max"], low=0)
    if d["alpha_min"] <= 0:
        raise ParamError(f"train.dynmix.alpha_min: {d['alpha_min']!r} must be > 0")
    if d["alpha_min"] > d["alpha_max"]:
        raise ParamError(f"train.dynmix.alpha_min: {d['alpha_min']!r} is larger than "
                         f"train.dynmix.alpha_max {d['alpha_max']!r}")
    check_number("train.dynmix.power", d["power"], low=0)
    if d["power"] <= 0:
        raise ParamError(f"train.dynmix.power: {d['power']!r} must be > 0")
    check_number("train.dynmix.momentum", d["momentum"], low=0, high=0.999)
    check_choice("train.dynmix.difficulty", d["difficulty"], ("accuracy", "counts"))
    check_choice("train.dynmix.accuracy_from", d["accuracy_from"], ("val", "train"))
    return p


def finetune_enabled(params: dict) -> bool:
    enabled = (params.get("finetune") or {}).get("enabled", False)
    if not isinstance(enabled, bool):
        raise ParamError(f"finetune.enabled: {enabled!r} is not true or false")
    return enabled


def trained_variants(params: dict) -> list[str]:
    """What the train stage writes under models/: `train.variants` (+ the fine-tuned one)."""
    variants = list((params.get("train") or {}).get("variants") or [])
    if finetune_enabled(params):
        from mofe_ood.finetune import config as finetune_config

        name = finetune_config(params)["variant"]
        if name in variants:
            raise ParamError(f"finetune.variant: {name!r} is also in train.variants; give it another name")
        variants.append(name)
    return variants


def check_against_data(p: dict, num_classes: int) -> None:
    """The params that depend on the data: the number of experts and the group table."""
    m = p["mofe"]
    if not any(v.startswith("mofe") for v in p["variants"]):
        return
    if m["num_experts"] > num_classes:
        raise ParamError(f"train.mofe.num_experts: {m['num_experts']} is larger than the "
                         f"{num_classes} ID classes (every expert needs a class group)")
    if m["group_table"] is not None:
        try:
            mofe_mod.check_groups(m["group_table"], num_classes, m["num_experts"])
        except ValueError as err:
            raise ParamError(f"train.mofe.group_table: {err}") from None


# ---------------------------------------------------------------- data and models

@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_val, self.y_val):
            h.update(t.numpy().tobytes())
        h.update(json.dumps(self.classes).encode())
        return h.hexdigest()


def load_data(features_dir: str | Path) -> Data:
    from mofe_ood.extract import load_features

    features_dir = Path(features_dir)
    info = json.loads((features_dir / "info.json").read_text())
    arrays = {}
    for split in ("train", "val"):
        feats, labels = load_features(features_dir, split)
        if len(feats) == 0:
            raise ValueError(f"{features_dir}/{split}.npz is empty: nothing to train on")
        if not np.isfinite(feats).all():
            raise ValueError(f"{features_dir}/{split}.npz has NaN or infinite features")
        if labels.min() < 0 or labels.max() >= len(info["classes"]):
            raise ValueError(f"{features_dir}/{split}.npz has labels outside 0..{len(info['classes']) - 1}")
        arrays[split] = (torch.from_numpy(np.ascontiguousarray(feats, np.float32)),
                         torch.from_numpy(labels.astype(np.int64)))
    missing = sorted(set(range(len(info["classes"]))) - set(arrays["train"][1].tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no training samples in {features_dir}/train.npz")
    return Data(*arrays["train"], *arrays["val"], list(info["classes"]))


def architecture(variant: str, p: dict, dim: int, num_classes: int, groups: np.ndarray | None) -> dict:
    if variant == "linear":
        return {"kind": "linear", "dim": dim, "num_classes": num_classes}
    if variant == "mlp":
        return {"kind": "mlp", "dim": dim, "num_classes": num_classes,
                "hidden_features": p["hidden_features"], "drop": p["drop"]}
    m = p["mofe"]
    return {"kind": "mofe", "dim": dim, "num_classes": num_classes, "expert": m["expert"],
            "hidden_features": p["hidden_features"], "drop": p["drop"], "router": m["router"],
            "top_k": m["top_k"], "stem_blocks": m["stem_blocks"], "groups": [int(g) for g in groups]}


def build_model(arch: dict, init_from: nn.Module | None = None) -> nn.Module:
    kind = arch["kind"]
    if kind == "linear":
        return mofe_mod.LinearProbe(arch["dim"], arch["num_classes"])
    if kind == "mlp":
        return mofe_mod.MLPHead(arch["dim"], arch["num_classes"], arch["hidden_features"], arch["drop"])
    if kind == "mofe":
        if arch["expert"] == "block" and init_from is None:
            from mofe_ood.backbones import create_backbone

            # Shapes only: the weights come from the state dict loaded next.
            init_from = create_backbone(arch["backbone"], "random", arch["image_size"], num_classes=0,
                                        **arch.get("backbone_kwargs", {}))
        return mofe_mod.MoFE(arch["dim"], arch["num_classes"], arch["groups"], expert=arch["expert"],
                             hidden_features=arch["hidden_features"], drop=arch["drop"],
                             router=arch["router"], top_k=arch["top_k"], stem_blocks=arch.get("stem_blocks", 0),
                             init_from=init_from)
    raise ValueError(f"unknown model kind {kind!r} in config.json")


def load_model(model_dir: str | Path) -> tuple[nn.Module, dict]:
    """The trained head of `model_dir` in eval mode, and its config; `module(features)` returns
    dict(feature, logits[, router_logits, gates])."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{model_dir}/config.json: format {cfg.get('format')!r} is not {FORMAT!r}")
    model = build_model(cfg["architecture"])
    model.load_state_dict(load_file(model_dir / "model.safetensors"), strict=True)
    return model.eval(), cfg


# ---------------------------------------------------------------- the schedule

@dataclass(frozen=True)
class Step:
    """One block of epochs with one optimizer: a head, or one MoFE phase (one expert in phase 2)."""

    phase: str  # head | base | experts | router | joint
    epochs: int
    expert: int | None = None

    @property
    def name(self) -> str:
        return self.phase if self.expert is None else f"expert{self.expert}"


def schedule(variant: str, p: dict) -> list[Step]:
    if variant in ("linear", "mlp"):
        return [Step("head", p["epochs"])]
    m = p["mofe"]
    if m["training"] == "joint":
        return [Step("joint", p["epochs"])]
    return [Step("base", p["epochs"]),
            *(Step("experts", p["expert_epochs"], e) for e in range(m["num_experts"])),
            Step("router", p["router_epochs"])]


def make_mixup(variant: str, p: dict, num_classes: int, counts: np.ndarray):
    if variant == "linear":
        return None
    if variant in ("mlp", "mofe"):
        return Mixup(num_classes, p["mixup_alpha"], p["label_smoothing"]) if p["mixup_alpha"] > 0 else None
    d = p["dynmix"]
    return DynamicBetaMixup(num_classes, d["alpha_min"], d["alpha_max"], power=d["power"],
                            momentum=d["momentum"], label_smoothing=p["label_smoothing"], counts=counts,
                            difficulty=d["difficulty"])


def _seed(*parts) -> int:
    """A 63-bit seed from (base seed, names, numbers): independent streams per phase and epoch."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _lr_at(base_lr: float, p: dict, it: int, total: int, warmup: int) -> float:
    if it < warmup:
        return base_lr * (it + 1) / warmup
    progress = (it - warmup) / max(1, total - warmup)
    low = base_lr * p["min_lr_ratio"]
    return low + (base_lr - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [q for q in params if q.ndim >= 2]
    no_decay = [q for q in params if q.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))


def _enter(model: nn.Module, step: Step) -> list[nn.Parameter]:
    """Train mode + gradients for what `step` trains; -> those parameters."""
    if step.phase == "head":
        model.train()
        return mofe_mod.set_trainable(model, list(model.parameters()))
    return mofe_mod.enter_phase(model, step.phase, step.expert)


def _batches(step: Step, y: torch.Tensor, groups: np.ndarray | None, batch_size: int, gen: torch.Generator):
    """(rows, other_rows) per batch of the samples labelled `y`; phase 2 pairs each in-group
    row with an out-of-group row."""
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


def _loss(model, step: Step, x, y, x_other, mixup, gen, p, world=None) -> torch.Tensor | None:
    """The loss of the batch `x`, `y`; data-parallel (`world`): this rank's part of it, weighted by
    its share of the batch so that the ranks' gradients sum to the batch's (None: no rows here)."""
    if world is not None and world.distributed:
        world.batch, world.batch_size = world.part(len(x)), len(x)
        rows = world.batch
        if rows.start == rows.stop:
            # Only an epoch's last batch can be shorter than the number of ranks, so skipping its
            # draws (mixup, dropout) changes no later batch: both generators are re-seeded per epoch.
            return None
        if mixup is not None:
            mixup = distributed.GlobalBatchMixup(mixup, x, y, world)
        x, y = x[rows].to(world.device), y[rows].to(world.device)
        x_other = None if x_other is None else x_other[rows].to(world.device)
        return (rows.stop - rows.start) / world.batch_size * _loss(model, step, x, y, x_other, mixup, gen, p)
    if step.phase == "head":
        if mixup is None:
            # The linear probe is the standard one: plain cross-entropy (smoothing flattens the
            # logits that MSP, energy and ViM read).
            smoothing = 0.0 if isinstance(model, mofe_mod.LinearProbe) else p["label_smoothing"]
            targets = soft_targets(y, model.classifier.out_features, smoothing)
            return mofe_mod.soft_cross_entropy(model(x)["logits"], targets)
        xm, t, _ = mixup(x, y, y, gen)
        return mofe_mod.soft_cross_entropy(model(xm)["logits"], t)
    return mofe_mod.phase_loss(model, step.phase, x, y, expert=step.expert, x_other=x_other, mixup=mixup,
                               generator=gen, label_smoothing=p["label_smoothing"],
                               other_weight=p["mofe"]["other_weight"])


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, step: Step | None = None, labels: torch.Tensor | None = None,
            batch_size: int = 4096) -> torch.Tensor:
    """Class logits; during phase 1 through expert 0, during phase 2 routed by the true `labels`."""
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


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    hit = (logits.argmax(1) == labels).double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add(0, labels, hit)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan).numpy()


# ---------------------------------------------------------------- checkpoints (safetensors + JSON)

def _save_checkpoint(ckpt_dir: Path, fingerprint: str, model: nn.Module, optimizer, step_index: int,
                     epoch: int, mixup, history: list[dict]) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"optim.{idx}.{k}"] = torch.as_tensor(v).cpu().contiguous()
    meta = {"fingerprint": fingerprint, "step": step_index, "epoch": epoch,
            "param_groups": opt["param_groups"], "mixup": mixup.state_dict() if mixup else {},
            "history": history}
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(meta))
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    tmp.rename(ckpt_dir)


def _load_checkpoint(ckpt_dir: Path, fingerprint: str) -> dict | None:
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


# ---------------------------------------------------------------- training one variant

def train_variant(variant: str, p: dict, data: Data, seed: int, ckpt_dir: Path | None = None,
                  world: distributed.World | None = None) -> tuple[nn.Module, dict, list[dict]]:
    """Train `variant` (data-parallel: this rank's part, see `run`); -> (model in eval mode on the
    CPU, its architecture, history rows)."""
    world = world or distributed.World()
    num_classes, dim = data.num_classes, data.x_train.shape[1]
    counts = np.bincount(data.y_train.numpy(), minlength=num_classes)
    groups = None
    if variant.startswith("mofe"):
        means = np.stack([data.x_train[data.y_train == c].double().mean(0).numpy() for c in range(num_classes)])
        groups = mofe_mod.class_groups(means, p["mofe"]["num_experts"], p["mofe"]["groups"],
                                       p["mofe"]["group_table"], seed=seed)
    arch = architecture(variant, p, dim, num_classes, groups)
    torch.manual_seed(_seed(seed, "init", arch["kind"]))
    model = build_model(arch).to(world.device)
    if world.distributed:
        distributed.use_global_batch_dropout(model, world)
    mixup = make_mixup(variant, p, num_classes, counts)
    steps = schedule(variant, p)
    # What the weights depend on (not which other variants run, nor where checkpoints go).
    knobs = {k: v for k, v in p.items() if k not in ("variants", "checkpoint_dir", "num_threads", "gpus",
                                                     "processes")}
    fingerprint = _seed(variant, knobs, seed, data.fingerprint())

    history: list[dict] = []
    start_step, start_epoch, ckpt = 0, 0, None
    if ckpt_dir is not None:
        ckpt = _load_checkpoint(ckpt_dir, str(fingerprint))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if mixup is not None:
            mixup.load_state_dict(ckpt["mixup"])
        history, start_step, start_epoch = ckpt["history"], ckpt["step"], ckpt["epoch"]
        log.info("%s: resuming after step %d epoch %d", variant, start_step, start_epoch)

    for si, step in enumerate(steps):
        if si < start_step:
            continue
        resumed = si == start_step and start_epoch > 0
        if step.phase == "experts" and step.expert == 0 and not resumed:
            model.copy_expert(0)  # every expert starts from the phase-1 expert
        lr = p["linear_lr"] if variant == "linear" or step.phase == "router" else p["lr"]
        trainable = _enter(model, step)
        optimizer = _optimizer(trainable, lr, p["weight_decay"])
        if resumed:
            optimizer.load_state_dict(ckpt["optimizer"])
        probe = _batches(step, data.y_train, groups, p["batch_size"], torch.Generator().manual_seed(0))
        per_epoch = len(probe)
        total, warmup = step.epochs * per_epoch, round(p["warmup_epochs"] * per_epoch)
        for epoch in range(start_epoch if resumed else 0, step.epochs):
            gen = torch.Generator().manual_seed(_seed(seed, step.name, epoch))
            torch.manual_seed(_seed(seed, step.name, epoch, "dropout"))
            _enter(model, step)
            losses = []
            for b, (rows, other_rows) in enumerate(_batches(step, data.y_train, groups, p["batch_size"], gen)):
                it_lr = _lr_at(lr, p, epoch * per_epoch + b, total, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = it_lr
                loss = _loss(model, step, data.x_train[rows], data.y_train[rows],
                             None if other_rows is None else data.x_train[other_rows], mixup, gen, p, world)
                optimizer.zero_grad(set_to_none=True)
                if loss is not None:
                    loss.backward()
                world.sum_grads(trainable)
                optimizer.step()
                losses.append(0.0 if loss is None else loss.item())
            losses = world.sum(torch.tensor(losses, dtype=torch.float64)).tolist()  # the ranks' shares
            val_logits = predict(model, data.x_val, step, data.y_val)
            val_acc = float((val_logits.argmax(1) == data.y_val).double().mean())
            row = {"epoch": len(history) + 1, "phase": step.name, "loss": float(np.mean(losses)),
                   "lr": it_lr, "val_accuracy": val_acc}
            if mixup is not None:
                row.update({f"alpha_{c}": float(a) for c, a in enumerate(mixup.alphas)})
            if isinstance(mixup, DynamicBetaMixup):
                if p["dynmix"]["accuracy_from"] == "val":
                    accuracy = per_class_accuracy(val_logits, data.y_val, num_classes)
                else:
                    accuracy = per_class_accuracy(predict(model, data.x_train, step, data.y_train),
                                                  data.y_train, num_classes)
                # Every rank must draw the next epoch's mixup with the same alphas: rank 0's.
                mixup.update(world.broadcast(torch.from_numpy(accuracy)).numpy())
            history.append(row)
            log.info("%s %s epoch %d: loss %.4f val acc %.4f", variant, step.name, epoch + 1, row["loss"], val_acc)
            if ckpt_dir is not None and world.main:
                _save_checkpoint(ckpt_dir, str(fingerprint), model, optimizer, si, epoch + 1, mixup, history)
    for q in model.parameters():
        q.requires_grad_(True)
    return model.cpu().eval(), arch, history


def _write_variant(out: Path, variant: str, model: nn.Module, arch: dict, history: list[dict], p: dict,
                   seed: int, data: Data, info: dict) -> None:
    out.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    cfg = {"format": FORMAT, "variant": variant, "architecture": arch, "classes": data.classes,
           "groups": arch.get("groups"),
           "features": {k: info.get(k) for k in ("backbone", "weights", "image_size", "feature_dim")},
           "params": {"seed": seed, "train": p},
           "val_accuracy": history[-1]["val_accuracy"] if history else None}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_history(out / "history.csv", history)


def write_history(path: Path, history: list[dict]) -> None:
    """One row per epoch (DVC plot data); columns in first-seen order (phases add alpha columns)."""
    columns = list(dict.fromkeys(k for row in history for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def history_markdown(models_dir: str | Path) -> str:
    """Every variant's history.csv as one Markdown table each (epoch, phase, loss, val accuracy)."""
    parts = []
    for path in sorted(Path(models_dir).glob("*/history.csv")):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        columns = [c for c in ("epoch", "phase", "loss", "val_accuracy") if rows and c in rows[0]]
        parts += [f"## {path.parent.name}", "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]
        for row in rows:
            parts.append("| " + " | ".join(_short(row[c]) for c in columns) + " |")
        parts.append("")
    return "\n".join(parts) or "no history.csv under the models folder\n"


def _short(text: str) -> str:
    try:
        return f"{float(text):.4f}".rstrip("0").rstrip(".")
    except ValueError:
        return text


def run(params: dict, features_dir: str | Path = "data/features", models_dir: str | Path = "models",
        prepared_dir: str | Path = "data/prepared") -> dict:
    """Train every variant of `train.variants`; `models_dir` is replaced in one move at the end.

    With `finetune.enabled`, the fine-tuned MoFE (mofe_ood.finetune, on the images of
    `prepared_dir`) is trained too, as variant `finetune.variant`, after the heads.

    More than one process (`distributed.processes`: train.processes, or train.gpus where CUDA is
    available): relaunch under torchrun and return rank 0's summary."""
    p = config(params)
    trained_variants(params)  # a bad finetune section fails here, before any training
    if finetune_enabled(params):
        from mofe_ood.backbones import is_vit

        backbone = str((params.get("extract") or {}).get("backbone"))
        if not is_vit(backbone):
            raise ParamError(f"finetune.enabled: fine-tuning with block experts needs a DINOv2 "
                             f"extract.backbone, not {backbone!r}")
    seed = check_number("base.seed", (params.get("base") or {}).get("seed", 0), low=0, integer=True)
    features_dir, models_dir = Path(features_dir), Path(models_dir)
    info = json.loads((features_dir / "info.json").read_text())
    check_against_data(p, len(info["classes"]))
    processes = distributed.processes(p)
    if processes > 1 and not distributed.under_torchrun():
        distributed.launch(processes, params, features_dir, models_dir)
        return json.loads((models_dir / "metrics.json").read_text())
    world = distributed.init()
    if world.distributed:
        log.info("train: rank %d of %d on %s", world.rank, world.size, world.device)
    else:
        log.info("train: one process, on the CPU")
    data = load_data(features_dir)

    tmp = models_dir.with_name(models_dir.name + ".tmp")
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    summary = {}
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        try:
            if p["num_threads"]:
                torch.set_num_threads(p["num_threads"])
            for variant in p["variants"]:
                ckpt_dir = Path(p["checkpoint_dir"]) / variant if p["checkpoint_dir"] else None
                start = time.perf_counter()
                model, arch, history = train_variant(variant, p, data, seed, ckpt_dir, world)
                seconds = time.perf_counter() - start
                if world.main:
                    _write_variant(tmp / variant, variant, model, arch, history, p, seed, data, info)
                summary[variant] = {"val_accuracy": history[-1]["val_accuracy"], "epochs": len(history)}
                log.info("train %s: %.1f s", variant, seconds)
        finally:
            torch.set_num_threads(threads)
    if world.main and finetune_enabled(params):
        from mofe_ood import finetune

        summary.update(finetune.run(params, prepared_dir, tmp))
    if world.main:
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        if models_dir.exists():
            shutil.rmtree(models_dir)
        tmp.rename(models_dir)
        if p["checkpoint_dir"]:  # finished: the checkpoints have served
            for variant in p["variants"]:
                shutil.rmtree(Path(p["checkpoint_dir"]) / variant, ignore_errors=True)
    world.barrier()  # the other ranks leave once rank 0 has written
    distributed.shutdown(world)
    return summary
