"""Choices made without test data: score hyper-parameters, the default score, the variant.

A score declares what is tuned (`OODScore.tuned`, mofe_ood.scores); `candidates` turns the
params' lists into the candidate keyword sets. With OOD validation parts (prepare.ood_split,
as OpenOOD v1.5) `select_on_val` picks the candidate whose validation metrics (ID val against
each OOD set's val part) give the best `objective`; without them `select_hyper` picks one on
ID data alone (held-out ID classes as pseudo-OOD, ours). No test sample is read by either.
"""

from __future__ import annotations

import itertools
from typing import Mapping

import numpy as np

from mofe_ood.errors import UserError
from mofe_ood.metrics import ood_metrics
from mofe_ood.params import ParamError
from mofe_ood.scores import as_2d, make_score, score_class


def candidates(name: str, lists: Mapping[str, list]) -> list[dict]:
    """Every combination of score `name`'s tuned hyper-parameters; `lists`: evaluate.<key> -> candidates.

    One tuned hyper-parameter gives its candidates in the params' order; none gives [{}].
    """
    tuned = score_class(name).tuned
    grids = [lists[t.key] for t in tuned.values()]
    return [dict(zip(tuned, values, strict=True)) for values in itertools.product(*grids)]


LOWER_IS_BETTER = ("fpr95", "fpr95_openood")


def check_selection(selection, what: str) -> list[str]:
    """A non-empty list of `<near|far|set>.<metric>` names (metric one of METRIC_KEYS)."""
    from mofe_ood.metrics import METRIC_KEYS

    if not isinstance(selection, list) or not selection:
        raise ParamError(f"{what}: {selection!r} is not a non-empty list of <near|far|set>.<metric>")
    for name in selection:
        group, _, metric = str(name).partition(".")
        if not group or metric not in METRIC_KEYS:
            raise ParamError(f"{what}: {name!r} is not <near|far|set>.<metric> with metric one of "
                             f"{', '.join(METRIC_KEYS)}")
    return selection


def objective(result: Mapping, selection: list[str]) -> float:
    """The mean of the `selection` metrics of one result ({near: M, far: M, <set>: M}), each turned
    so that higher is better (1 - FPR); a group or set `result` lacks is an error that names it."""
    values = []
    for name in selection:
        group, _, metric = name.partition(".")
        if group not in result:
            raise ParamError(f"evaluate.selection: {name!r}: no {group!r} among the validation sets "
                             f"({', '.join(k for k in result if k != 'selection')})")
        value = float(result[group][metric])
        values.append(1.0 - value if metric in LOWER_IS_BETTER else value)
    return float(np.mean(values))


def fitting(name: str, candidates: list[dict], bank_size: int) -> list[dict]:
    """The candidates of score `name` that a bank of `bank_size` train samples can hold (KNN's K
    at most the bank); a ParamError when none can."""
    cls = score_class(name)
    fit = [c for c in candidates if cls.hyper_for_bank(dict(c), 1.0, bank_size) == dict(c)]
    if not fit:
        raise ParamError(f"select_hyper({name!r}): no candidate fits {bank_size} train samples: {candidates}")
    return fit


def select_on_val(candidates: list[dict], val_result, selection: list[str]) -> tuple[dict, list[dict]]:
    """The candidate whose `val_result(candidate)` has the best `objective` (ties: the earlier one);
    -> (best, table of {hyper, selection})."""
    table = [{"hyper": dict(c), "selection": objective(val_result(c), selection)} for c in candidates]
    best = max(table, key=lambda row: row["selection"])
    return dict(best["hyper"]), table


def class_folds(labels, folds: int, seed: int = 0) -> list[np.ndarray]:
    """The ID classes, shuffled with `seed` and split into `folds` groups (at most one per class)."""
    classes = np.unique(np.asarray(labels))
    if len(classes) < 2:
        raise ValueError(f"held-out-class selection needs at least 2 ID classes, got {len(classes)}")
    order = np.random.default_rng(seed).permutation(classes)
    return [g for g in np.array_split(order, min(max(2, int(folds)), len(classes))) if len(g)]


def select_hyper(name: str, candidates: list[dict], train_features, train_labels, val_features, val_labels,
                 train_logits=None, val_logits=None, head=None, folds: int = 5,
                 seed: int = 0) -> tuple[dict, list[dict]]:
    """Pick the hyper-parameters of score `name` among `candidates` on ID data only.

    Rule (held-out-class pseudo-OOD): the ID classes are shuffled (`seed`) and
    split into `folds` groups. For each group, the score is fitted on the train
    samples of the other classes and scores the validation samples; the AUROC
    of kept-class validation samples (ID) against held-out-class validation
    samples (pseudo-OOD) is that fold's result. The candidate with the highest
    mean AUROC over the folds wins; ties go to the earlier candidate. No OOD or
    test data is touched.
    - KNN: the fold's bank is smaller than the full train set, so each K is
      scaled by the bank fraction for the fold (K is a density quantile, see
      `KNN.hyper_for_bank`); the selected K is the candidate as given, for the
      full bank.
    - Scores with logits/head (MSP, Energy, ViM, ...): the classifier was
      trained on all classes, so the held-out classes' logits (and rows of W, b)
      are dropped for the fold; the held-out samples then have no logit of
      their own, as a real OOD sample. (An approximation: the features still
      saw those classes in training.)

    Returns (best candidate, table) with one row per candidate:
    {"hyper": candidate, "auroc": mean, "fold_auroc": [...]}; a candidate that
    does not fit the full train set (K > bank size) is skipped, auroc None.
    """
    if not candidates:
        raise ValueError(f"select_hyper({name!r}): no candidates")
    cls = score_class(name)
    train_x, val_x = as_2d(train_features, "train features"), as_2d(val_features, "val features")
    train_y, val_y = np.asarray(train_labels).reshape(-1), np.asarray(val_labels).reshape(-1)
    needs_classifier = cls.needs_logits or cls.needs_head
    if needs_classifier and (head is None and (train_logits is None or val_logits is None)):
        raise ValueError(f"select_hyper({name!r}): this score needs logits (train and val) or the head")

    n_logits = max((np.asarray(a).shape[-1] for a in (train_logits, val_logits) if a is not None), default=None)
    if needs_classifier and n_logits is None:
        n_logits = np.asarray(head[0]).shape[0]
    if needs_classifier and not (train_y.min() >= 0 and max(train_y.max(), val_y.max()) < n_logits):
        raise ValueError(f"select_hyper({name!r}): labels must index the {n_logits} logits (0..{n_logits - 1})")

    # A candidate the full train set cannot hold (KNN's K above the bank size) is left out.
    table = [{"hyper": dict(c), "auroc": None, "fold_auroc": []} for c in candidates]
    fit = fitting(name, candidates, len(train_y))
    rows = [row for row in table if row["hyper"] in fit]
    for held_out in class_folds(train_y, folds, seed):
        kept_train, kept_val = ~np.isin(train_y, held_out), ~np.isin(val_y, held_out)
        if kept_val.all() or not kept_val.any():
            continue  # the validation split lacks these classes (or has only them): no pseudo-OOD
        fold_head, fold_train_logits, fold_val_logits = head, train_logits, val_logits
        if needs_classifier:
            fold_head, fold_train_logits, fold_val_logits = _kept_classifier(
                np.setdiff1d(np.unique(train_y), held_out), kept_train, head, train_logits, val_logits)
        bank_size = int(kept_train.sum())
        for row in rows:
            hyper = cls.hyper_for_bank(row["hyper"], bank_size / len(train_y), bank_size)
            score = make_score(name, **hyper).fit(train_x[kept_train], train_y[kept_train],
                                                  fold_train_logits, fold_head)
            s = score.score(val_x, fold_val_logits)
            row["fold_auroc"].append(ood_metrics(s[kept_val], s[~kept_val], name="held-out classes")["auroc"])
    if not rows[0]["fold_auroc"]:
        raise UserError(f"select_hyper({name!r}): no fold has validation samples of both kept and "
                        "held-out classes")
    for row in rows:
        row["auroc"] = float(np.mean(row["fold_auroc"]))
    best = max(rows, key=lambda row: row["auroc"])  # the first of equals: max keeps the earliest
    return dict(best["hyper"]), table


def _kept_classifier(kept: np.ndarray, kept_train: np.ndarray, head, train_logits, val_logits):
    """The head and logits of the `kept` classes alone (rows of W, b; columns of the logits)."""
    fold_head = None if head is None else (np.asarray(head[0])[kept], np.asarray(head[1])[kept])
    fold_train_logits = None if train_logits is None else np.asarray(train_logits)[kept_train][:, kept]
    fold_val_logits = None if val_logits is None else np.asarray(val_logits)[:, kept]
    return fold_head, fold_train_logits, fold_val_logits
