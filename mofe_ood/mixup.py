"""Dynamic-β Mixup (docs/method.md section 4) and the plain mixup it generalises.

Each sample i draws its own interpolation weight lambda_i ~ Beta(a, a) with
a = alpha of its class y_i; its partner is the reversed batch (sample B-1-i):

    x~_i = lambda_i x_i + (1 - lambda_i) x_{B-1-i}, targets mixed the same way
    (label smoothing applied before mixing).

Hard classes get a large alpha (lambda near 0.5: strong mixing), easy classes a
small one (lambda near 0 or 1). Class difficulty comes from class counts or
from per-class accuracy, an EMA re-estimated every epoch (`update`); the
reference code reads accuracies once and sets alpha_min = alpha_max, which is
plain mixup. Works on any batch-first tensor: images (fine-tuning) and feature
vectors (cached features) alike.

Sampling uses only an explicit `torch.Generator` (Gamma variates by
Marsaglia-Tsang from its normal and uniform draws), so a run is reproducible
and resumable: torch's own Beta sampler takes no generator.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def class_difficulty(counts=None, accuracies=None, power: float = 1.0, eps: float = 1e-8) -> np.ndarray:
    """d_c in [0, 1] per class from counts n_c or accuracies a_c (exactly one of them).

    d_c = clamp(1 - (v_c - min v) / (max v - min v + eps), 0, 1) ** power; all equal: d_c = 1.
    Few samples or low accuracy = hard = d near 1.
    """
    if (counts is None) == (accuracies is None):
        raise ValueError("class_difficulty: give exactly one of counts or accuracies")
    v = np.asarray(counts if counts is not None else accuracies, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0 or not np.isfinite(v).all():
        raise ValueError(f"class_difficulty: expected a non-empty vector of finite values, got {v!r}")
    if power <= 0:
        raise ValueError(f"class_difficulty: power {power} must be > 0")
    low, high = v.min(), v.max()
    d = np.ones_like(v) if high == low else 1.0 - (v - low) / (high - low + eps)
    return np.clip(d, 0.0, 1.0) ** power


def class_alphas(difficulty, alpha_min: float, alpha_max: float) -> np.ndarray:
    """alpha_c = alpha_min + d_c (alpha_max - alpha_min)."""
    if not 0 < alpha_min <= alpha_max:
        raise ValueError(f"class_alphas: need 0 < alpha_min <= alpha_max, got {alpha_min}, {alpha_max}")
    return alpha_min + np.asarray(difficulty, dtype=np.float64) * (alpha_max - alpha_min)


def _log_gamma_variates(shape: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """log of Gamma(shape, 1) draws (float64), one per entry of `shape` (> 0)."""
    shape = shape.double()
    boosted = shape + (shape < 1).double()  # shape < 1: draw Gamma(shape + 1), then scale by U^(1/shape)
    d = boosted - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(shape)
    pending = torch.arange(len(shape))
    while len(pending):
        z = torch.randn(len(pending), generator=generator, dtype=torch.float64)
        u = torch.rand(len(pending), generator=generator, dtype=torch.float64)
        v = (1.0 + c[pending] * z) ** 3
        dp = d[pending]
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + dp - dp * v + dp * torch.log(v.clamp_min(1e-300)))
        out[pending[ok]] = torch.log(dp[ok]) + torch.log(v[ok])
        pending = pending[~ok]
    small = shape < 1
    if small.any():
        u = torch.rand(int(small.sum()), generator=generator, dtype=torch.float64)
        out[small] += torch.log(u) / shape[small]
    return out


def sample_beta(alpha, generator: torch.Generator | None = None) -> torch.Tensor:
    """lambda_i ~ Beta(alpha_i, alpha_i), one per entry of `alpha` (float64, in [0, 1])."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
    if (alpha <= 0).any():
        raise ValueError("sample_beta: every alpha must be > 0")
    # Both Gamma draws in one call: a fixed order of draws from the generator.
    logs = _log_gamma_variates(torch.cat([alpha, alpha]), generator)
    a, b = logs[: len(alpha)], logs[len(alpha):]
    return torch.sigmoid(a - b)  # G1 / (G1 + G2), computed in log space (alpha = 0.1 underflows)


def soft_targets(targets: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """Class indices (N,) or soft targets (N, K) -> smoothed soft targets (N, K), float32."""
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        t = F.one_hot(targets.long(), num_classes).float()
    else:
        t = targets.float()
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + label_smoothing / t.shape[1]
    return t


def mix(x: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x~ = lam x + (1 - lam) x.flip(0), and the same for targets; lam is one weight per sample."""
    lam_x = lam.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))
    lam_t = lam.to(targets.device, targets.dtype).view(-1, 1)
    return lam_x * x + (1 - lam_x) * x.flip(0), lam_t * targets + (1 - lam_t) * targets.flip(0)


class Mixup:
    """Plain mixup (Zhang et al. 2018), one lambda per sample (timm's "elem" mode), reversed-batch partner."""

    def __init__(self, num_classes: int, alpha: float, label_smoothing: float = 0.0):
        if alpha <= 0:
            raise ValueError(f"Mixup: alpha {alpha} must be > 0")
        self.num_classes, self.alpha, self.label_smoothing = num_classes, float(alpha), label_smoothing

    @property
    def alphas(self) -> np.ndarray:
        return np.full(self.num_classes, self.alpha)

    def update(self, per_class_accuracy) -> None:
        """Plain mixup ignores difficulty (same interface as DynamicBetaMixup)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __call__(self, x, targets, labels=None, generator=None):
        lam = sample_beta(torch.full((len(x),), self.alpha, dtype=torch.float64), generator)
        mixed_x, mixed_t = mix(x, soft_targets(targets, self.num_classes, self.label_smoothing), lam)
        return mixed_x, mixed_t, lam


class DynamicBetaMixup:
    """Dynamic-β Mixup: per-sample lambda ~ Beta(alpha_y, alpha_y), alpha from the class's difficulty.

    `difficulty="accuracy"` (ours): alphas start from the class counts (balanced
    classes: all equal, so every class starts at alpha_max) and follow an EMA of
    per-class accuracy fed by `update` once per epoch. `difficulty="counts"`:
    fixed alphas from the counts. alpha_min == alpha_max is plain mixup exactly.
    """

    def __init__(self, num_classes: int, alpha_min: float, alpha_max: float, power: float = 1.0,
                 momentum: float = 0.9, label_smoothing: float = 0.0, counts=None,
                 difficulty: str = "accuracy", eps: float = 1e-8):
        if difficulty not in ("accuracy", "counts"):
            raise ValueError(f"DynamicBetaMixup: difficulty {difficulty!r} is not 'accuracy' or 'counts'")
        if not 0 <= momentum < 1:
            raise ValueError(f"DynamicBetaMixup: momentum {momentum} must be in [0, 1)")
        class_alphas(np.zeros(1), alpha_min, alpha_max)  # validates the range
        self.num_classes = num_classes
        self.alpha_min, self.alpha_max, self.power, self.eps = float(alpha_min), float(alpha_max), power, eps
        self.momentum, self.label_smoothing, self.difficulty = momentum, label_smoothing, difficulty
        self.counts = None if counts is None else np.asarray(counts, np.float64)
        if self.counts is not None and len(self.counts) != num_classes:
            raise ValueError(f"DynamicBetaMixup: {len(self.counts)} counts for {num_classes} classes")
        self.accuracy_ema: np.ndarray | None = None
        self._refresh()

    def _refresh(self) -> None:
        if self.accuracy_ema is not None:
            d = class_difficulty(accuracies=self.accuracy_ema, power=self.power, eps=self.eps)
        elif self.counts is not None:
            d = class_difficulty(counts=self.counts, power=self.power, eps=self.eps)
        else:
            d = np.ones(self.num_classes)  # nothing known yet: all classes equal
        self.alphas = class_alphas(d, self.alpha_min, self.alpha_max)

    def update(self, per_class_accuracy) -> None:
        """Fold one epoch's per-class accuracy into the EMA (NaN = class not seen: kept as it was)."""
        if self.difficulty != "accuracy":
            return
        acc = np.asarray(per_class_accuracy, np.float64)
        if acc.shape != (self.num_classes,):
            raise ValueError(f"update: expected {self.num_classes} accuracies, got shape {acc.shape}")
        if self.accuracy_ema is None:
            fill = np.nanmean(acc) if np.isfinite(acc).any() else 1.0
            self.accuracy_ema = np.where(np.isfinite(acc), acc, fill)
        else:
            new = self.momentum * self.accuracy_ema + (1 - self.momentum) * acc
            self.accuracy_ema = np.where(np.isfinite(acc), new, self.accuracy_ema)
        self._refresh()

    def state_dict(self) -> dict:
        return {"accuracy_ema": None if self.accuracy_ema is None else self.accuracy_ema.tolist()}

    def load_state_dict(self, state: dict) -> None:
        ema = state.get("accuracy_ema")
        self.accuracy_ema = None if ema is None else np.asarray(ema, np.float64)
        self._refresh()

    def __call__(self, x: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        """-> (mixed x, mixed soft targets, lambdas). `labels` (class indices) pick the alphas;
        they default to `targets` when those are class indices."""
        if labels is None:
            if targets.is_floating_point():
                raise ValueError("DynamicBetaMixup: soft targets need `labels` to pick each sample's alpha")
            labels = targets
        alpha = torch.as_tensor(self.alphas, dtype=torch.float64)[labels.long().cpu()]
        lam = sample_beta(alpha, generator).to(x.device)
        mixed_x, mixed_t = mix(x, soft_targets(targets, self.num_classes, self.label_smoothing), lam)
        return mixed_x, mixed_t, lam


def make_mixup(kind: str, num_classes: int, counts: np.ndarray, label_smoothing: float, mixup_alpha: float,
               dynmix) -> Mixup | DynamicBetaMixup | None:
    """The mixup of `kind` (none | plain | dynamic): plain needs `mixup_alpha` > 0 (`train.mixup_alpha`);
    dynamic reads `dynmix` (the `train.dynmix` section: alpha_min, alpha_max, power, momentum, difficulty)."""
    if kind == "plain" and mixup_alpha > 0:
        return Mixup(num_classes, mixup_alpha, label_smoothing)
    if kind == "dynamic":
        return DynamicBetaMixup(num_classes, dynmix.alpha_min, dynmix.alpha_max, power=dynmix.power,
                                momentum=dynmix.momentum, label_smoothing=label_smoothing, counts=counts,
                                difficulty=dynmix.difficulty)
    return None
