"""MoFE's training phases (mofe.py's module docstring names them): what each phase trains and its loss.

1. "base": stem + expert 0 + classifier (fine-tuning: backbone + classifier);
2. "experts": expert e and its "other" head (ours) on its class group;
3. "router": the router alone;
plus "joint" (ours): everything at once, hard routing by the true label's group.
`enter_phase` sets requires_grad and train/eval mode for a phase (frozen parts
run in eval mode: no dropout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mofe_ood.mixup import soft_targets
from mofe_ood.mofe import MoFE

PHASES = ("base", "experts", "router", "joint")


def phase_modules(model: MoFE, phase: str, expert: int | None = None) -> list[nn.Module]:
    """The modules phase `phase` trains (phase "experts": those of expert `expert`)."""
    if phase == "base":
        modules = [model.stem, model.experts[0], model.classifier]
    elif phase == "experts":
        if expert is None or not 0 <= expert < model.num_experts:
            raise ValueError(f"phase 'experts' needs an expert index in 0..{model.num_experts - 1}, got {expert}")
        modules = [model.experts[expert], model.other_heads[expert]]
    elif phase == "router":
        modules = [model.router]
    elif phase == "joint":
        modules = [model.stem, model.experts, model.router, model.classifier]
    else:
        raise ValueError(f"phase {phase!r} is not one of {PHASES}")
    return modules


def trainable_parameters(model: MoFE, phase: str, expert: int | None = None) -> list[nn.Parameter]:
    """The parameters phase `phase` trains."""
    return [p for m in phase_modules(model, phase, expert) for p in m.parameters()]


def enter_phase(model: MoFE, phase: str, expert: int | None = None) -> list[nn.Parameter]:
    """Train mode and gradients for the phase's modules only; -> their parameters (for the optimizer)."""
    model.eval()
    for m in phase_modules(model, phase, expert):
        m.train()
    return set_trainable(model, trainable_parameters(model, phase, expert))


def set_trainable(root: nn.Module, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Freeze every parameter of `root` except `params` (returned, for the optimizer)."""
    keep = {id(p) for p in params}
    for p in root.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * logits.float().log_softmax(1)).sum(1).mean()


def phase_loss(model: MoFE, phase: str, x: torch.Tensor, labels: torch.Tensor, *, expert: int | None = None,
               x_other: torch.Tensor | None = None, mixup=None, generator: torch.Generator | None = None,
               label_smoothing: float = 0.0, other_weight: float = 0.1,
               targets: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of one batch in phase `phase` (see the module docstring).

    `x`, `labels`: the batch (phase "experts": the in-group samples of expert
    `expert`; `x_other`: as many out-of-group samples). `mixup`: a Mixup or
    DynamicBetaMixup (None: no mixing) for phases base, experts and joint.
    `targets`: soft targets of an `x` mixed already (image-space mixup upstream).
    """
    def mixed(inputs, ys):
        if targets is not None:
            return inputs, targets
        if mixup is None:
            return inputs, soft_targets(ys, model.num_classes, label_smoothing)
        mx, mt, _ = mixup(inputs, ys, ys, generator)
        return mx, mt

    if phase == "base":
        xm, t = mixed(x, labels)
        return soft_cross_entropy(model(xm, expert=0)["logits"], t)
    if phase == "experts":
        if expert is None:
            raise ValueError("phase 'experts' needs the expert index")
        xm, t = mixed(x, labels)
        t = F.pad(t, (0, 1))  # the "other" column: 0 for in-group samples
        net, other = model.experts[expert], model.other_heads[expert]

        def logits_of(inputs):
            f = net(model.stem(inputs))
            return torch.cat([model.classifier(f), other(f)], 1)

        loss = soft_cross_entropy(logits_of(xm), t)
        if x_other is not None and len(x_other):
            target = torch.full((len(x_other),), model.num_classes, dtype=torch.long, device=x.device)
            loss = loss + other_weight * F.cross_entropy(logits_of(x_other).float(), target)
        return loss
    if phase == "router":
        h = model.stem(x)
        router_logits, gates = model.route(h)
        loss = F.cross_entropy(router_logits.float(), labels, label_smoothing=label_smoothing)
        if model.router.mode == "soft":  # gates are differentiable: also fit the mixture's output
            logits = model.classifier(model.mix_experts(h, gates))
            loss = loss + F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        return loss
    if phase == "joint":
        xm, t = mixed(x, labels)
        out = model(xm, route_labels=labels if model.router.mode == "hard" else None)
        router_logits, _ = model.route(model.stem(x))
        return soft_cross_entropy(out["logits"], t) + F.cross_entropy(
            router_logits.float(), labels, label_smoothing=label_smoothing)
    raise ValueError(f"phase {phase!r} is not one of {PHASES}")
