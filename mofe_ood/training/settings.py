"""The `train` and `finetune` sections of params.yaml as frozen, checked config objects.

params.yaml holds every default; these classes hold none. Each field is one key
of the section (nested sections are nested classes); `__post_init__` checks
the values and raises a ParamError naming `section.key`. Build them with
`mofe_ood.config.section` (what `train.config` / `finetune.config` do).
"""

from __future__ import annotations

from dataclasses import dataclass

from mofe_ood import mofe as mofe_mod
from mofe_ood.backbones import torch_device
from mofe_ood.config import section
from mofe_ood.params import ParamError, check_choice, check_number
from mofe_ood.variants import TRUNK_VARIANTS, VARIANTS


def _positive(name: str, value) -> None:
    check_number(name, value, low=0)
    if value <= 0:
        raise ParamError(f"{name}: {value!r} must be > 0")


@dataclass(frozen=True)
class MofeConfig:
    """`train.mofe`: the MoFE of the `mofe*` variants (and of fine-tuning)."""

    num_experts: int
    groups: str          # kmeans | agglomerative (class-mean features, cosine)
    group_table: list | None
    expert: str          # a kind of mofe.EXPERTS
    stem_blocks: int
    router: str          # hard (paper: top-1) | soft (top_k gated mixture, ours)
    top_k: int
    training: str        # phased (paper's 3 phases) | joint (ours)
    other_weight: float

    def __post_init__(self):
        check_number("train.mofe.num_experts", self.num_experts, low=1, integer=True)
        check_number("train.mofe.stem_blocks", self.stem_blocks, low=0, integer=True)
        check_choice("train.mofe.groups", self.groups, mofe_mod.GROUP_METHODS)
        check_choice("train.mofe.expert", self.expert, list(mofe_mod.EXPERTS))
        check_choice("train.mofe.router", self.router, mofe_mod.ROUTER_MODES)
        check_choice("train.mofe.training", self.training, ("phased", "joint"))
        check_number("train.mofe.top_k", self.top_k, low=1, high=self.num_experts, integer=True)
        check_number("train.mofe.other_weight", self.other_weight, low=0)
        if self.router == "hard" and self.top_k != 1:
            raise ParamError(f"train.mofe.top_k: {self.top_k} needs train.mofe.router: soft (hard routing is top-1)")
        table = self.group_table
        if table is not None and (not isinstance(table, list) or not all(
                isinstance(g, int) and not isinstance(g, bool) for g in table)):
            raise ParamError(f"train.mofe.group_table: {table!r} must be a list of integer group ids or null")

    def check_data(self, num_classes: int) -> None:
        """The keys that depend on the data: the number of experts and the group table."""
        if self.num_experts > num_classes:
            raise ParamError(f"train.mofe.num_experts: {self.num_experts} is larger than the "
                             f"{num_classes} ID classes (every expert needs a class group)")
        if self.group_table is not None:
            try:
                mofe_mod.check_groups(self.group_table, num_classes, self.num_experts)
            except ValueError as err:
                raise ParamError(f"train.mofe.group_table: {err}") from None


@dataclass(frozen=True)
class DynmixConfig:
    """`train.dynmix`: Dynamic-β Mixup (mixup.py)."""

    alpha_min: float
    alpha_max: float
    power: float
    momentum: float      # EMA of per-class accuracy, updated every epoch
    difficulty: str      # accuracy | counts
    accuracy_from: str   # val | train: whose per-class accuracy feeds the EMA

    def __post_init__(self):
        check_number("train.dynmix.alpha_max", self.alpha_max, low=0)
        _positive("train.dynmix.alpha_min", self.alpha_min)
        if self.alpha_min > self.alpha_max:
            raise ParamError(f"train.dynmix.alpha_min: {self.alpha_min!r} is larger than "
                             f"train.dynmix.alpha_max {self.alpha_max!r}")
        _positive("train.dynmix.power", self.power)
        check_number("train.dynmix.momentum", self.momentum, low=0, high=0.999)
        check_choice("train.dynmix.difficulty", self.difficulty, ("accuracy", "counts"))
        check_choice("train.dynmix.accuracy_from", self.accuracy_from, ("val", "train"))


@dataclass(frozen=True)
class TopConfig:
    """`train.top`: the backbone's top trained on cached trunk activations (`top`, `mofe_block*`)."""

    epochs: int          # phase 1: the top + the shared classifier
    expert_epochs: int   # phase 2, per expert
    router_epochs: int   # phase 3
    lr: float            # AdamW peak lr of phases 1 and 2 (the router: train.linear_lr)

    def __post_init__(self):
        for key in ("epochs", "expert_epochs", "router_epochs"):
            check_number(f"train.top.{key}", getattr(self, key), low=1, integer=True)
        _positive("train.top.lr", self.lr)


@dataclass(frozen=True)
class TrainConfig:
    """`train`: heads on the cached features (params.yaml documents every key)."""

    variants: list
    epochs: int            # linear / mlp heads, MoFE phase 1 ("base") and the joint variant
    expert_epochs: int     # MoFE phase 2, per expert
    router_epochs: int     # MoFE phase 3
    batch_size: int
    lr: float              # AdamW (0.9, 0.99), cosine schedule with linear warm-up
    linear_lr: float       # a linear layer trained alone: the linear probe, MoFE's router (phase 3)
    weight_decay: float    # not on biases and norms
    warmup_epochs: float
    min_lr_ratio: float    # final lr = lr * min_lr_ratio
    label_smoothing: float  # all but the linear probe
    hidden_features: int   # MLP head, MLP experts and stem
    drop: float            # dropout inside the MLP head / experts
    mixup_alpha: float     # plain mixup of `mlp` and `mofe` (0 = off)
    mofe: MofeConfig
    dynmix: DynmixConfig
    top: TopConfig
    seeds: list            # more seeds than base.seed: each variant again per seed, under <variant>/seeds/<seed>/
    checkpoint_dir: str | None
    num_threads: int | None
    gpus: int
    processes: int | None

    def __post_init__(self):
        variants = self.variants
        if not isinstance(variants, list) or not variants:
            raise ParamError(f"train.variants: {variants!r} must be a non-empty list")
        for v in variants:
            check_choice("train.variants", v, VARIANTS)
        if len(set(variants)) != len(variants):
            raise ParamError(f"train.variants: {variants!r} lists a variant twice")
        if not isinstance(self.seeds, list) or len(set(self.seeds)) != len(self.seeds):
            raise ParamError(f"train.seeds: {self.seeds!r} must be a list of distinct seeds ([] for none)")
        for s in self.seeds:
            check_number("train.seeds", s, low=0, integer=True)
        for key in ("epochs", "expert_epochs", "router_epochs", "batch_size", "hidden_features"):
            check_number(f"train.{key}", getattr(self, key), low=1, integer=True)
        _positive("train.lr", self.lr)
        _positive("train.linear_lr", self.linear_lr)
        check_number("train.weight_decay", self.weight_decay, low=0)
        check_number("train.warmup_epochs", self.warmup_epochs, low=0)
        check_number("train.min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_number("train.label_smoothing", self.label_smoothing, low=0, high=0.99)
        check_number("train.drop", self.drop, low=0, high=0.99)
        check_number("train.mixup_alpha", self.mixup_alpha, low=0)
        check_number("train.num_threads", self.num_threads, low=1, integer=True, allow_none=True)
        check_number("train.gpus", self.gpus, low=0, integer=True)
        check_number("train.processes", self.processes, low=1, integer=True, allow_none=True)
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            raise ParamError(f"train.checkpoint_dir: {self.checkpoint_dir!r} is not a path or null")
        on_pooled = [v for v in variants if VARIANTS[v].routed and not VARIANTS[v].trunk]
        if mofe_mod.EXPERTS[self.mofe.expert].reads_tokens and on_pooled:
            pooled = ", ".join(k for k, e in mofe_mod.EXPERTS.items() if not e.reads_tokens)
            raise ParamError(f"train.mofe.expert: {self.mofe.expert!r} experts read the trunk, not the pooled "
                             f"features of the {' / '.join(on_pooled)} variants; use one of: {pooled} (block "
                             f"experts on the cached trunk are the variants {', '.join(TRUNK_VARIANTS)})")


@dataclass(frozen=True)
class FinetuneConfig:
    """`finetune`: end-to-end fine-tuning on images (training/finetuning.py), a GPU's job."""

    enabled: bool          # the train stage also fine-tunes (needs a DINOv2 extract.backbone)
    variant: str
    epochs: int            # phase 1
    expert_epochs: int     # phase 2, per expert
    router_epochs: int     # phase 3
    batch_size: int
    lr: float              # peak lr of the last layers; layer i of L gets lr * layer_decay ** (L - i)
    layer_decay: float
    weight_decay: float
    warmup_epochs: float
    min_lr_ratio: float
    drop_path: float
    label_smoothing: float
    mixup: str             # dynamic (train.dynmix) | plain (train.mixup_alpha) | none
    max_steps_per_epoch: int | None  # cap (quick runs and tests); null = every sample once per epoch
    group_samples_per_class: int     # images per class whose mean backbone feature groups the classes
    device: str            # auto | cpu | cuda
    amp: bool              # bf16 autocast on CUDA
    eval_batch_size: int
    checkpoint_dir: str | None
    backbone_kwargs: dict  # extra timm.create_model arguments (tests: a tiny ViT, e.g. depth: 2)

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ParamError(f"finetune.enabled: {self.enabled!r} is not true or false")
        for key in ("epochs", "expert_epochs", "router_epochs", "batch_size", "eval_batch_size",
                    "group_samples_per_class"):
            check_number(f"finetune.{key}", getattr(self, key), low=1, integer=True)
        check_number("finetune.max_steps_per_epoch", self.max_steps_per_epoch, low=1, integer=True,
                     allow_none=True)
        _positive("finetune.lr", self.lr)
        check_number("finetune.layer_decay", self.layer_decay, low=0, high=1)
        check_number("finetune.weight_decay", self.weight_decay, low=0)
        check_number("finetune.warmup_epochs", self.warmup_epochs, low=0)
        check_number("finetune.min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_number("finetune.drop_path", self.drop_path, low=0, high=0.99)
        check_number("finetune.label_smoothing", self.label_smoothing, low=0, high=0.99)
        check_choice("finetune.mixup", self.mixup, ("dynamic", "plain", "none"))
        torch_device("finetune.device", self.device)
        if not isinstance(self.amp, bool):
            raise ParamError(f"finetune.amp: {self.amp!r} is not true or false")
        if not isinstance(self.backbone_kwargs, dict):
            raise ParamError(f"finetune.backbone_kwargs: {self.backbone_kwargs!r} is not a mapping")
        if not isinstance(self.variant, str) or not self.variant or "/" in self.variant:
            raise ParamError(f"finetune.variant: {self.variant!r} is not a folder name")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            raise ParamError(f"finetune.checkpoint_dir: {self.checkpoint_dir!r} is not a path or null")


def train_config(params) -> TrainConfig:
    return section(TrainConfig, params.get("train"), "train")


def finetune_config(params) -> FinetuneConfig:
    return section(FinetuneConfig, params.get("finetune"), "finetune")
