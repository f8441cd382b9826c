"""Mixture of Feature Experts (MoFE, docs/method.md section 3) and the heads it is compared with.

MoFE = E feature experts, each owning the feature subspace of one group of ID
classes, a router that predicts the ID class and sends the sample to its
class's group expert, and ONE shared linear classifier over all ID classes on
the routed feature. The routed feature replaces the backbone feature: the KNN
score reads it, ViM reads the classifier (`classifier_weights`).

On pooled features a `stem` of MLP blocks stands in for the backbone layers
below the paper's last block: trained in phase 1, frozen after, and read by
the router. (The paper's router reads the fine-tuned CLS token entering the
last block; a linear router on frozen features is only as good as a linear
probe.) With block experts the backbone's trunk plays this part: a fine-tuned ViT's
(training/finetuning.py), or the frozen backbone's cached activations (the train stage's
trunk variants), which the router reads through `router_input`.

Expert kinds are a registry (`EXPERTS`, filled by `@register_expert(name)`) of
modules with one constructor signature `(dim, hidden_features, drop, init_from)`
and a class attribute `reads_tokens` (True: the trunk's activations, ViT tokens
N x T x D or CNN maps N x C x H x W, plus a `top_blocks` argument; False: pooled
features N x D):
- `BlockExpert` ("block", the paper's): a copy of the backbone's top (a ViT's last
  block(s) + final norm; a CNN's last stage(s) + head conv, ours) on the trunk's
  activations: trained on images (fine-tuning, GPU) or on cached activations (the
  train stage's `top` / `mofe_block*` variants, CPU);
- `MLPExpert` ("mlp", ours): residual MLP + LayerNorm on pooled features (cached
  frozen features, CPU).
A new kind is one class here (or in a module imported before training) and
its name in `train.mofe.expert`.

Training (mofe_ood/training/phases.py), the paper's three phases:
1. "base": the baseline (feature path: stem + expert 0 + classifier, every
   sample through expert 0; fine-tuning: backbone + classifier). Then `copy_expert(0)`
   initialises every expert from it, as the paper copies the fine-tuned block.
2. "experts": expert e alone on its group: in-group samples with their labels
   (mixed by (Dynamic-β) mixup), paired 1:1 with out-of-group samples whose
   target is an extra "other" logit (`other_heads[e]`, ours), weighted 0.1.
   The shared classifier stays frozen so every expert keeps mapping into it.
3. "router": the router alone, everything else frozen.
Plus "joint" (ours): everything in one phase, hard routing by the true
label's group while training (teacher forcing).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mofe_ood.backbones import is_cnn, top_modules

ROUTER_MODES = ("hard", "soft")
GROUP_METHODS = ("kmeans", "agglomerative")


# ---------------------------------------------------------------- class groups

def check_groups(table, num_classes: int, num_experts: int) -> np.ndarray:
    """A class->group table as an int array; every one of the E groups must own a class."""
    groups = np.asarray(table)
    if groups.shape != (num_classes,) or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"group table: expected {num_classes} integer group ids (one per class), got {table!r}")
    if groups.min() < 0 or groups.max() >= num_experts:
        raise ValueError(f"group table: ids must lie in 0..{num_experts - 1}, got {groups.tolist()}")
    empty = sorted(set(range(num_experts)) - set(groups.tolist()))
    if empty:
        raise ValueError(f"group table: groups {empty} own no class (every expert needs a group)")
    return groups.astype(np.int64)


def class_groups(class_means, num_experts: int, method: str = "kmeans", table=None,
                 seed: int = 0) -> np.ndarray:
    """class -> group (int array, groups numbered by first class): `table` if given, else a
    clustering of the L2-normalised class-mean features (cosine geometry, as the KNN score's)."""
    means = np.asarray(class_means, np.float64)
    num_classes = len(means)
    if not 1 <= num_experts <= num_classes:
        raise ValueError(f"num_experts {num_experts} must be between 1 and the {num_classes} classes")
    if table is not None:
        return check_groups(table, num_classes, num_experts)
    unit = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    if num_experts == 1:
        raw = np.zeros(num_classes, np.int64)
    elif method == "kmeans":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=num_experts, n_init=10, random_state=seed).fit(unit)
        raw = _fill_empty(km.labels_, unit, num_experts)
    elif method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        raw = AgglomerativeClustering(n_clusters=num_experts, metric="cosine",
                                      linkage="average").fit_predict(unit)
    else:
        raise ValueError(f"group method {method!r} is not one of {GROUP_METHODS}")
    order = {g: i for i, g in enumerate(dict.fromkeys(raw.tolist()))}
    return check_groups(np.array([order[g] for g in raw], np.int64), num_classes, num_experts)


def _fill_empty(labels: np.ndarray, points: np.ndarray, k: int) -> np.ndarray:
    """Give every empty cluster the point farthest from its centroid in the largest cluster."""
    labels = labels.copy()
    for g in range(k):
        if (labels == g).any():
            continue
        big = np.bincount(labels, minlength=k).argmax()
        members = np.flatnonzero(labels == big)
        centre = points[members].mean(0)
        labels[members[np.linalg.norm(points[members] - centre, axis=1).argmax()]] = g
    return labels


# ---------------------------------------------------------------- experts

EXPERTS: dict[str, type[nn.Module]] = {}


def register_expert(name: str):
    """Class decorator: make the expert class available as `train.mofe.expert: <name>`."""
    def add(cls):
        if EXPERTS.get(name, cls) is not cls:
            raise ValueError(f"expert kind {name!r} is registered already ({EXPERTS[name].__name__})")
        if not isinstance(getattr(cls, "reads_tokens", None), bool):
            raise ValueError(f"expert kind {name!r}: {cls.__name__}.reads_tokens must be True or False")
        EXPERTS[name] = cls
        return cls
    return add


@register_expert("mlp")
class MLPExpert(nn.Module):
    """Feature expert on pooled features (ours): LayerNorm(x + MLP(x)); at init (zero last layer) LayerNorm(x)."""

    reads_tokens = False

    def __init__(self, dim: int, hidden_features: int | None = None, drop: float = 0.0,
                 init_from: nn.Module | None = None):
        super().__init__()
        hidden = hidden_features or dim
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        if init_from is not None:
            self.load_state_dict(init_from.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(self.drop(self.act(self.fc1(x)))))


@register_expert("block")
class BlockExpert(nn.Module):
    """The paper's expert: a copy of the backbone's top; the trunk's activations -> the pooled feature.

    The top is a ViT's last `top_blocks` transformer blocks + final norm (the paper's, reading
    tokens N x T x D, pooled as the ViT pools: CLS token or patch mean, then its `fc_norm`), or
    a CNN's last `top_blocks` stages + head conv + its BatchNorm (ours, for the offline
    EfficientNet-Lite0: reading maps N x C x H x W, global average pooled).
    `init_from`: a timm model (its top is deep-copied) or another BlockExpert.
    `hidden_features`/`drop` are the copied top's own; accepted for the shared signature only.
    """

    reads_tokens = True

    def __init__(self, dim: int, hidden_features: int | None = None, drop: float = 0.0,
                 init_from: nn.Module | None = None, top_blocks: int = 1):
        super().__init__()
        if init_from is None:
            raise ValueError("BlockExpert needs init_from: a timm ViT or CNN (or a BlockExpert) to copy the top of")
        if isinstance(init_from, BlockExpert):
            self.top, self.fc_norm = copy.deepcopy(init_from.top), copy.deepcopy(init_from.fc_norm)
            self.pool, self.num_prefix_tokens = init_from.pool, init_from.num_prefix_tokens
            self.top_blocks, self.width = init_from.top_blocks, init_from.width
        else:
            self.top = nn.Sequential(*copy.deepcopy(top_modules(init_from, top_blocks)))
            self.top_blocks = top_blocks
            if is_cnn(init_from):
                self.fc_norm, self.pool, self.num_prefix_tokens = nn.Identity(), "map", 0
                self.width = init_from.bn2.num_features
            else:
                self.fc_norm = copy.deepcopy(getattr(init_from, "fc_norm", nn.Identity()))
                self.pool = getattr(init_from, "global_pool", "token")
                self.num_prefix_tokens = 1 if self.pool == "token" else getattr(init_from, "num_prefix_tokens", 1)
                self.width = init_from.norm.normalized_shape[0]
        if self.width != dim:
            raise ValueError(f"BlockExpert: the top has width {self.width}, not {dim}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.top(x)
        if self.pool == "map":  # CNN: global average pool, as timm's avg SelectAdaptivePool2d
            return x.mean((2, 3))
        x = x[:, 0] if self.pool == "token" else x[:, self.num_prefix_tokens:].mean(1)
        return self.fc_norm(x)


def router_input(h: torch.Tensor) -> torch.Tensor:
    """What the router reads of the experts' input: pooled features as they are, a ViT's tokens
    their CLS token (the paper's), a CNN's maps their spatial mean (ours)."""
    if h.ndim == 2:
        return h
    return h[:, 0] if h.ndim == 3 else h.mean((2, 3))


# ---------------------------------------------------------------- router

class Router(nn.Module):
    """The paper's router: linear on the input feature (the CLS token entering the last block)
    predicting the ID class; a fixed class->group table turns it into expert gates.

    mode "hard" (paper): top-1, each sample goes to its predicted class's group expert.
    mode "soft" (ours): group probability = sum of its classes' softmax, top_k kept, renormalised.
    """

    def __init__(self, dim: int, num_classes: int, class_to_group, mode: str = "hard", top_k: int = 1):
        super().__init__()
        if mode not in ROUTER_MODES:
            raise ValueError(f"router mode {mode!r} is not one of {ROUTER_MODES}")
        groups = torch.as_tensor(np.asarray(class_to_group), dtype=torch.long)
        self.num_experts = int(groups.max()) + 1
        if not 1 <= top_k <= self.num_experts:
            raise ValueError(f"router top_k {top_k} must be between 1 and {self.num_experts}")
        self.mode, self.top_k = mode, top_k
        self.fc = nn.Linear(dim, num_classes)
        self.register_buffer("class_to_group", groups)
        # membership[c, g] = 1 if class c is in group g: sums class probabilities into group ones
        self.register_buffer("membership", F.one_hot(groups, self.num_experts).float())

    def gates_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(self.class_to_group[labels], self.num_experts).float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (class logits N x C, gates N x E: non-negative, each row sums to 1)."""
        logits = self.fc(x)
        if self.mode == "hard":
            return logits, self.gates_from_labels(logits.argmax(1))
        group_probs = logits.softmax(1) @ self.membership
        top, idx = group_probs.topk(self.top_k, dim=1)
        gates = torch.zeros_like(group_probs).scatter(1, idx, top)
        return logits, gates / gates.sum(1, keepdim=True)


# ---------------------------------------------------------------- MoFE

class MoFE(nn.Module):
    """Mixture of Feature Experts: router -> one expert per group -> shared linear classifier.

    Input: pooled features N x D, or for experts that read the trunk (`reads_tokens`) a ViT's
    tokens N x T x D or a CNN's maps N x C x H x W. `dim`: the feature (expert output) width;
    `router_dim`: the width of `router_input(x)` when it differs (a CNN trunk's channels).
    `forward(x) -> dict(feature, logits, router_logits, gates)`; `feature` is the
    routed expert output (the gate-weighted sum of the top-k experts when soft).
    """

    def __init__(self, dim: int, num_classes: int, class_to_group, expert: str = "mlp",
                 hidden_features: int | None = None, drop: float = 0.0, router: str = "hard",
                 top_k: int = 1, stem_blocks: int = 0, init_from: nn.Module | None = None,
                 router_dim: int | None = None, top_blocks: int = 1):
        super().__init__()
        if expert not in EXPERTS:
            raise ValueError(f"expert kind {expert!r} is not one of {', '.join(EXPERTS)}")
        if stem_blocks and EXPERTS[expert].reads_tokens:
            raise ValueError(f"a stem is for pooled features; {expert!r} experts read the ViT trunk's tokens")
        groups = check_groups(class_to_group, num_classes, int(np.max(class_to_group)) + 1)
        self.dim, self.num_classes, self.num_experts = dim, num_classes, int(groups.max()) + 1
        self.stem = nn.Sequential(*(MLPExpert(dim, hidden_features, drop) for _ in range(stem_blocks)))
        # Only trunk-reading experts copy a top of some depth; pooled kinds keep the 4-argument signature.
        extra = {"top_blocks": top_blocks} if EXPERTS[expert].reads_tokens else {}
        self.experts = nn.ModuleList(
            EXPERTS[expert](dim, hidden_features, drop, init_from=init_from, **extra)
            for _ in range(self.num_experts))
        self.router = Router(router_dim or dim, num_classes, groups, mode=router, top_k=top_k)
        self.classifier = nn.Linear(dim, num_classes)
        self.other_heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(self.num_experts))

    @property
    def groups(self) -> np.ndarray:
        return self.router.class_to_group.cpu().numpy()

    def copy_expert(self, source: int = 0) -> None:
        """Initialise every expert from expert `source` (after phase 1)."""
        state = self.experts[source].state_dict()
        for e, expert in enumerate(self.experts):
            if e != source:
                expert.load_state_dict(state)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router on the experts' input `h` (the stem's output, or the trunk's: `router_input`)."""
        return self.router(router_input(h))

    def mix_experts(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Each sample through the experts its gate row selects (hard: exactly one), weighted."""
        out = None
        for e, expert in enumerate(self.experts):
            idx = torch.nonzero(gates[:, e] > 0, as_tuple=True)[0]
            if len(idx) == 0:
                continue
            y = expert(x[idx]) * gates[idx, e, None].to(x.dtype)
            out = y.new_zeros(len(x), y.shape[1]).index_add(0, idx, y) if out is None else out.index_add(0, idx, y)
        return out if out is not None else x.new_zeros(len(x), self.dim)

    def forward(self, x: torch.Tensor, route_labels: torch.Tensor | None = None,
                expert: int | None = None) -> dict[str, torch.Tensor]:
        """`route_labels`: route by these labels' groups (oracle / teacher forcing);
        `expert`: send every sample through that expert (phases 1 and 2)."""
        x = self.stem(x)
        router_logits, gates = self.route(x)
        if expert is not None:
            gates = F.one_hot(torch.full((len(x),), expert, dtype=torch.long, device=x.device),
                              self.num_experts).to(gates.dtype)
        elif route_labels is not None:
            gates = self.router.gates_from_labels(route_labels)
        feature = self.mix_experts(x, gates)
        return {"feature": feature, "logits": self.classifier(feature), "router_logits": router_logits,
                "gates": gates}

    def classifier_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) of the shared classifier, logits = feature @ W.T + b (for ViM)."""
        return self.classifier.weight, self.classifier.bias


# ---------------------------------------------------------------- heads compared with MoFE

class LinearProbe(nn.Module):
    """Linear probe on the input features; `feature` is the input itself."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"feature": x, "logits": self.classifier(x)}

    def classifier_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier.weight, self.classifier.bias


class MLPHead(nn.Module):
    """One hidden layer (fc -> GELU) and a linear classifier; `feature` is the hidden activation."""

    def __init__(self, dim: int, num_classes: int, hidden_features: int | None = None, drop: float = 0.0):
        super().__init__()
        hidden = hidden_features or dim
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feature = self.act(self.fc1(x))
        return {"feature": feature, "logits": self.classifier(self.drop(feature))}

    def classifier_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier.weight, self.classifier.bias
