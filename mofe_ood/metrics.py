"""OOD detection metrics, shared by every score (as OpenOOD keeps `evaluators/metrics.py` apart).

Conventions (docs/method.md section 5):
- A score is "higher = more in-distribution (ID)"; a sample is accepted as ID
  when `score >= threshold`.
- ID is the positive class for AUROC, FPR95 and AUPR-In (the paper's and most
  OOD papers' convention). AUPR-Out and `fpr95_openood` take OOD as the
  positive class with negated scores, as OpenOOD v1.5 does.
- Every value is a python float, a fraction in [0, 1] (not a percentage).

All metrics are computed here in numpy (no scikit-learn at import time); the
tests check them against `sklearn.metrics` to 1e-9, ties included.
"""

from __future__ import annotations

import math

import numpy as np

# The metrics of one OOD set, in metrics.json's order: the one list of their names.
METRIC_KEYS = ("auroc", "fpr95", "fpr95_openood", "aupr_in", "aupr_out")


def _checked(scores, what: str) -> np.ndarray:
    """`scores` as a 1-D float64 array; a ValueError naming `what` if empty or not finite."""
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what} is empty")
    nan, inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    if nan or inf:
        bad = " and ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if p)
        raise ValueError(f"{what} has {bad} scores (of {arr.size})")
    return arr


def _kth_largest(values: np.ndarray, fraction: float) -> float:
    """The largest threshold t such that at least `fraction` of `values` are >= t."""
    # The tolerance keeps e.g. 0.95 * 100 = 95.00000000000001 from asking for 96 samples.
    need = max(1, math.ceil(fraction * values.size - 1e-9))
    return float(np.partition(values, values.size - need)[values.size - need])


def _fpr_at_tpr(positives: np.ndarray, negatives: np.ndarray, tpr: float) -> float:
    """Fraction of negatives with score >= the threshold that keeps `tpr` of the positives."""
    threshold = _kth_largest(positives, tpr)
    return float(np.mean(negatives >= threshold))


def _auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(pos > neg) + P(pos == neg) / 2, the Mann-Whitney U statistic (= trapezoidal ROC area)."""
    both = np.concatenate([positives, negatives])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    # Tied values share the mean of the ranks they span (1-based).
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = mean_rank[inverse[: positives.size]].sum()
    n_pos, n_neg = positives.size, negatives.size
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_precision(positives: np.ndarray, negatives: np.ndarray) -> float:
    """sum_n (R_n - R_{n-1}) P_n over the distinct thresholds, highest first (no interpolation).

    The same step-wise definition as `sklearn.metrics.average_precision_score`:
    all samples tied at one score enter at once.
    """
    both = np.concatenate([positives, negatives])
    is_pos = np.concatenate([np.ones(positives.size), np.zeros(negatives.size)])
    order = np.argsort(-both, kind="stable")
    both, is_pos = both[order], is_pos[order]
    # Last index of each run of tied scores: the points of the precision-recall curve.
    ends = np.flatnonzero(np.append(np.diff(both) != 0, True))
    tp = np.cumsum(is_pos)[ends]
    precision = tp / (ends + 1)
    recall_gain = np.diff(tp, prepend=0.0) / positives.size
    return float(np.sum(recall_gain * precision))


def ood_metrics(id_scores, ood_scores, name: str = "ood") -> dict[str, float]:
    """AUROC, FPR95, FPR95 (OpenOOD), AUPR-In and AUPR-Out of one OOD set against the ID test set.

    Higher score = more ID; every value is a fraction in [0, 1].
    - `auroc`: ID positive; the probability that a random ID sample scores above
      a random OOD sample, ties counting one half (= `roc_auc_score`, which is
      symmetric: OOD positive with negated scores gives the same number).
    - `fpr95` (the paper's "FPR@95%TPR"): with t the largest threshold that
      accepts (score >= t) at least 95% of the ID samples, the fraction of OOD
      samples with score >= t. OOD samples tied with t count as accepted (the
      pessimistic side), and when ID samples tie at t more than 95% may be
      accepted. Equals `fpr[argmax(tpr >= 0.95)]` of `roc_curve` with ID positive.
    - `fpr95_openood` (OpenOOD v1.5): OOD positive, scores negated: with u the
      smallest threshold that flags (score <= u) at least 95% of the OOD samples,
      the fraction of ID samples with score <= u (ties flagged). It differs from
      `fpr95`: it measures the ID samples lost at 95% OOD recall, not the OOD
      samples let in at 95% ID recall.
    - `aupr_in`: average precision with ID positive (`average_precision_score`;
      OpenOOD integrates the PR curve with the trapezoid rule instead, which
      differs slightly).
    - `aupr_out`: average precision with OOD positive and negated scores.

    Raises ValueError naming `name` when either input is empty or not finite.
    """
    id_arr = _checked(id_scores, f"the ID set (scored against OOD set {name!r})")
    ood_arr = _checked(ood_scores, f"OOD set {name!r}")
    values = (_auroc(id_arr, ood_arr), _fpr_at_tpr(id_arr, ood_arr, 0.95), _fpr_at_tpr(-ood_arr, -id_arr, 0.95),
              _average_precision(id_arr, ood_arr), _average_precision(-ood_arr, -id_arr))
    return dict(zip(METRIC_KEYS, values, strict=True))


def threshold_at_tpr(id_scores, tpr: float = 0.95) -> float:
    """The decision threshold (`score >= threshold` means ID) that accepts `tpr` of `id_scores`.

    The largest such threshold: one of the ID scores, so that at least `tpr` of
    them are accepted (more when several tie at it). Calibrate it on ID
    validation scores, never on test or OOD data.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    return _kth_largest(_checked(id_scores, "the ID validation set"), tpr)


def accuracy(logits_or_predictions, labels) -> float:
    """Top-1 accuracy: `logits_or_predictions` is (N, C) logits/probabilities or (N,) class indices."""
    pred = np.asarray(logits_or_predictions)
    labels = np.asarray(labels).reshape(-1)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    elif pred.ndim != 1:
        raise ValueError(f"accuracy: expected (N, C) logits or (N,) predictions, got shape {pred.shape}")
    if pred.shape[0] != labels.shape[0]:
        raise ValueError(f"accuracy: {pred.shape[0]} predictions but {labels.shape[0]} labels")
    if labels.size == 0:
        raise ValueError("accuracy: no samples")
    return float(np.mean(pred == labels))


def average(metric_dicts: list[dict]) -> dict[str, float]:
    """The mean of each metric over several OOD sets (e.g. the near-OOD or far-OOD average)."""
    if not metric_dicts:
        raise ValueError("average: no metric dicts to average")
    keys = list(metric_dicts[0])
    for d in metric_dicts[1:]:
        if set(d) != set(keys):
            raise ValueError(f"average: metric dicts have different keys: {sorted(keys)} vs {sorted(d)}")
    return {k: float(np.mean([d[k] for d in metric_dicts])) for k in keys}
