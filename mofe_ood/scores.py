"""OOD scores ("postprocessors" in OpenOOD): fit on ID train data, then score any array.

Every score has the same two calls, `fit(features, labels, logits=None, head=None)`
and `score(features, logits=None)`, and returns one float64 per row, higher =
more in-distribution. `needs_logits` / `needs_head` say what a score reads
besides the features, so the evaluate stage can skip scores that a variant
cannot feed (frozen backbone features have no classifier).

The paper's score is `KNN` (section 2 of docs/method.md); the others are the
baselines of section 5. A score declares its tuned hyper-parameters in `tuned`
(KNN's K, ViM's dim): their candidates are lists in params.yaml's `evaluate`
section, and mofe_ood.tuning picks one on ID data only.

A new score is one class in one file, registered by name:

    @register("my_score")
    class MyScore(OODScore):
        tuned = {"t": Tuned("my_score_t", low=1)}   # candidates: evaluate.my_score_t
        def __init__(self, t: int = 1): ...
        def fit(self, features, labels, logits=None, head=None): ...; return self
        def score(self, features, logits=None): ...  # higher = more ID

plus `my_score_t: [1, 2, 4]` under `evaluate` in params.yaml and `my_score` in evaluate.scores.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from mofe_ood.neighbours import kth_distance, normalised_tensor
from mofe_ood.params import ParamError, check_number

def as_2d(x, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (samples x dims), got shape {arr.shape}")
    return arr


def _logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)  # a zero vector stays zero, as in sklearn


@dataclass(frozen=True)
class Tuned:
    """A hyper-parameter chosen on ID data (mofe_ood.tuning): its candidates are the list at
    `evaluate.<key>` in params.yaml, numbers in [low, high] (integers unless `integer=False`)."""

    key: str
    low: float | None = None
    high: float | None = None
    integer: bool = True

    def check(self, values) -> list:
        where = f"evaluate.{self.key}"
        if not isinstance(values, list) or not values:
            raise ParamError(f"{where}: {values!r} is not a non-empty list of candidates")
        for value in values:
            check_number(where, value, low=self.low, high=self.high, integer=self.integer)
        return list(values)


class OODScore:
    """Base class: `fit` on ID train data, then `score` (higher = more ID, float64, one per row).

    `tuned`: hyper-parameter name -> Tuned, the keyword arguments chosen on ID data.
    """

    needs_logits: ClassVar[bool] = False
    needs_head: ClassVar[bool] = False
    tuned: ClassVar[dict[str, Tuned]] = {}

    def fit(self, features, labels, logits=None, head=None) -> "OODScore":
        return self

    def score(self, features, logits=None) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def hyper_for_bank(hyper: dict, fraction: float, bank_size: int) -> dict:
        """`hyper` adapted to a bank holding `fraction` of the train set (used by `select_hyper`)."""
        return hyper

    def _logits(self, logits, rows: int) -> np.ndarray:
        if logits is None:
            raise ValueError(f"{type(self).__name__} needs logits (a variant with a classifier head)")
        logits = as_2d(logits, "logits").astype(np.float64)
        if logits.shape[0] != rows:
            raise ValueError(f"{logits.shape[0]} logit rows for {rows} feature rows")
        return logits

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.endswith("_"))
        return f"{type(self).__name__}({hyper})"


# ---- logit scores: they ignore the features


SCORES: dict[str, type[OODScore]] = {}


def register(name: str):
    """Class decorator: register an OODScore subclass as score `name` (what evaluate.scores lists)."""
    def add(cls: type[OODScore]) -> type[OODScore]:
        SCORES[name] = cls
        return cls
    return add


@register("msp")
class MSP(OODScore):
    """Maximum softmax probability (Hendrycks & Gimpel 2017), the classic baseline."""

    needs_logits = True

    def score(self, features, logits=None) -> np.ndarray:
        z = self._logits(logits, len(features))
        return np.exp(z.max(axis=1) - _logsumexp(z))


@register("maxlogit")
class MaxLogit(OODScore):
    """Maximum logit (Hendrycks et al. 2022, "MaxLogit"): MSP without the softmax normalisation."""

    needs_logits = True

    def score(self, features, logits=None) -> np.ndarray:
        return self._logits(logits, len(features)).max(axis=1)


@register("energy")
class Energy(OODScore):
    """Negative free energy (Liu et al. 2020): T * logsumexp(logits / T)."""

    needs_logits = True

    def __init__(self, temperature: float = 1.0):
        if not temperature > 0:
            raise ParamError(f"Energy: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def score(self, features, logits=None) -> np.ndarray:
        t = self.temperature
        return t * _logsumexp(self._logits(logits, len(features)) / t)


# ---- feature scores


@register("knn")
class KNN(OODScore):
    """The paper's score (Sun et al. 2022, "deep nearest neighbours"): minus the cosine distance
    of the L2-normalised feature to its K-th nearest ID train feature.

    K must grow with the bank: the paper's K = 300 is for a ~640k ImageNet bank;
    K is chosen among `evaluate.knn_k` on ID data (mofe_ood.tuning).
    """

    tuned = {"k": Tuned("knn_k", low=1)}

    def __init__(self, k: int = 10, chunk_size: int | None = None):
        if int(k) < 1:
            raise ParamError(f"KNN: k must be >= 1, got {k}")
        self.k = int(k)
        self.chunk_size = chunk_size

    def fit(self, features, labels=None, logits=None, head=None) -> "KNN":
        features = as_2d(features, "KNN bank features")
        if self.k > len(features):
            raise ParamError(f"KNN: k={self.k} is larger than the bank ({len(features)} train features)")
        self.bank_ = normalised_tensor(features)
        self.source_ = features
        return self

    def score(self, features, logits=None) -> np.ndarray:
        queries = as_2d(features, "features")
        if queries.shape[1] != self.bank_.shape[1]:
            raise ValueError(f"KNN: fitted on {self.bank_.shape[1]} dims, got {queries.shape[1]}")
        return -kth_distance(self.bank_, queries, self.k, self.chunk_size, bank_source=self.source_)

    @staticmethod
    def hyper_for_bank(hyper: dict, fraction: float, bank_size: int) -> dict:
        # The K-th neighbour distance estimates a density at the quantile K / bank size:
        # keep that quantile when the bank shrinks.
        k = hyper["k"]
        return {**hyper, "k": int(min(bank_size, max(1, round(k * fraction))))}


def _eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric eigendecomposition in float64 through torch: numpy's OpenBLAS eigh of a
    1280 x 1280 covariance took 51 s on a busy 2-core machine (threads fighting), torch's 2-8 s."""
    eigval, eigvec = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float64)))
    return eigval.numpy(), eigvec.numpy()


@register("mahalanobis")
class Mahalanobis(OODScore):
    """Mahalanobis distance score (Lee et al. 2018): class means and one shared (tied) covariance.

    score = -min_c (x - mu_c)^T Sigma^+ (x - mu_c), the squared distance to the
    closest class mean (the square root would not change the ranking). Sigma is
    the pooled within-class covariance; its pseudo-inverse ignores directions
    with no variance (as sklearn's EmpiricalCovariance does).
    """

    normalise = False

    def fit(self, features, labels, logits=None, head=None) -> "Mahalanobis":
        x = self._prepared(as_2d(features, "features"))
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(x):
            raise ValueError(f"{len(labels)} labels for {len(x)} features")
        classes = np.unique(labels)
        means = np.stack([x[labels == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, labels)]
        cov = centred.T @ centred / len(x)
        eigval, eigvec = _eigh(cov)
        # Pseudo-inverse cut-off as numpy's pinv / sklearn's pinvh: relative to the top eigenvalue.
        keep = eigval > eigval.max() * len(eigval) * np.finfo(np.float64).eps
        self.whiten_ = eigvec[:, keep] / np.sqrt(eigval[keep])  # Sigma^+ = whiten_ @ whiten_.T
        self.means_ = means @ self.whiten_
        self.classes_ = classes
        return self

    def score(self, features, logits=None) -> np.ndarray:
        z = self._prepared(as_2d(features, "features")) @ self.whiten_
        sq = (z * z).sum(1)[:, None] - 2.0 * z @ self.means_.T + (self.means_ * self.means_).sum(1)[None, :]
        return -np.maximum(sq.min(axis=1), 0.0)

    def _prepared(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return _l2_normalise(x) if self.normalise else x


@register("mahalanobis_pp")
class MahalanobisPlusPlus(Mahalanobis):
    """Mahalanobis++ (Mueller et al. 2025): the same, on L2-normalised features (train and test)."""

    normalise = True


@register("vim")
class ViM(OODScore):
    """Virtual-logit Matching (Wang et al. 2022).

    The origin is moved to u = -pinv(W) b (where the logits are zero); the
    principal subspace is spanned by the top `dim` eigenvectors of the train
    features' second moment about u; the norm of a feature's residual (the part
    outside that subspace), scaled by alpha = mean train max-logit / mean train
    residual norm, is the "virtual logit". Score = logsumexp(logits) - alpha *
    ||x_residual|| (the paper's -energy of the virtual-logit softmax, up to the
    monotone log).

    `dim=None` takes the paper's choices (1000 for D >= 2048, 512 for D >= 768)
    and D // 2 for smaller features; a `dim` >= D (no residual left) falls back
    to D // 2. The fitted value is `dim_`. Logits are the given ones, or
    W x + b when none are given. `dim` is chosen among `evaluate.vim_dim` on ID data.
    """

    needs_head = True
    tuned = {"dim": Tuned("vim_dim", low=1)}

    def __init__(self, dim: int | None = None):
        if dim is not None and int(dim) < 1:
            raise ParamError(f"ViM: dim must be >= 1, got {dim}")
        self.dim = None if dim is None else int(dim)

    def _dim_for(self, d: int) -> int:
        if d < 2:
            raise ValueError(f"ViM needs features with at least 2 dims, got {d}")
        if self.dim is None:
            return 1000 if d >= 2048 else 512 if d >= 768 else d // 2
        return self.dim if self.dim < d else d // 2

    def fit(self, features, labels=None, logits=None, head=None) -> "ViM":
        if head is None:
            raise ValueError("ViM needs the linear head (W, b) that maps these features to logits")
        x = as_2d(features, "features").astype(np.float64)
        w, b = (np.asarray(a, dtype=np.float64) for a in head)
        if w.ndim != 2 or w.shape[1] != x.shape[1] or b.shape != (w.shape[0],):
            raise ValueError(f"ViM: head shapes W {w.shape}, b {b.shape} do not fit {x.shape[1]}-dim features")
        self.head_ = (w, b)
        self.origin_ = -np.linalg.pinv(w) @ b
        self.dim_ = self._dim_for(x.shape[1])
        centred = x - self.origin_
        eigval, eigvec = _eigh(centred.T @ centred / len(x))
        # eigh sorts ascending: the residual space is everything but the top dim_ directions.
        self.residual_basis_ = eigvec[:, : x.shape[1] - self.dim_]
        residual = self._residual_norm(x).mean()
        if not residual > 0:
            raise ParamError(f"ViM: the train features have no residual outside the top {self.dim_} "
                             "principal directions; use a smaller dim")
        self.alpha_ = float(self._logits_of(x, logits).max(axis=1).mean() / residual)
        return self

    def score(self, features, logits=None) -> np.ndarray:
        x = as_2d(features, "features").astype(np.float64)
        return _logsumexp(self._logits_of(x, logits)) - self.alpha_ * self._residual_norm(x)

    def _residual_norm(self, x: np.ndarray) -> np.ndarray:
        return np.linalg.norm((x - self.origin_) @ self.residual_basis_, axis=1)

    def _logits_of(self, x: np.ndarray, logits) -> np.ndarray:
        if logits is not None:
            return self._logits(logits, len(x))
        w, b = self.head_
        return x @ w.T + b


def score_class(name: str) -> type[OODScore]:
    """The class registered as `name`; a ParamError listing the allowed names otherwise."""
    if name not in SCORES:
        raise ParamError(f"unknown OOD score {name!r}; choose one of: {', '.join(SCORES)}")
    return SCORES[name]


def tuned_keys() -> dict[str, Tuned]:
    """Every `evaluate.<key>` holding candidates, as the registered scores declare them."""
    keys: dict[str, Tuned] = {}
    for name, cls in SCORES.items():
        for tuned in cls.tuned.values():
            if keys.setdefault(tuned.key, tuned) != tuned:
                raise ValueError(f"OOD score {name!r}: evaluate.{tuned.key} is declared twice, differently")
    return keys


def make_score(name: str, **hyper) -> OODScore:
    """The score registered as `name`, built with its hyper-parameters (e.g. `make_score("knn", k=50)`)."""
    cls = score_class(name)
    try:
        return cls(**hyper)
    except TypeError as err:  # an unknown keyword: say which score and what it takes
        allowed = list(inspect.signature(cls).parameters)
        raise ParamError(f"OOD score {name!r}: bad hyper-parameters {hyper} "
                         f"(it takes: {', '.join(allowed) or 'none'})") from err
