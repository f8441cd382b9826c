"""OOD metrics: agreement with scikit-learn (ties included), FPR95 hand cases, input errors."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from mofe_ood.metrics import METRIC_KEYS, accuracy, average, ood_metrics, threshold_at_tpr


def sklearn_reference(id_scores, ood_scores):
    """The same five numbers the long way, with scikit-learn (ID = 1)."""
    scores = np.concatenate([id_scores, ood_scores])
    is_id = np.concatenate([np.ones(len(id_scores)), np.zeros(len(ood_scores))])
    fpr, tpr, _ = roc_curve(is_id, scores, drop_intermediate=False)
    fpr_o, tpr_o, _ = roc_curve(1 - is_id, -scores, drop_intermediate=False)  # OpenOOD v1.5
    return {
        "auroc": roc_auc_score(is_id, scores),
        "fpr95": fpr[np.argmax(tpr >= 0.95)],
        "fpr95_openood": fpr_o[np.argmax(tpr_o >= 0.95)],
        "aupr_in": average_precision_score(is_id, scores),
        "aupr_out": average_precision_score(1 - is_id, -scores),
    }


def score_sets():
    rng = np.random.default_rng(0)
    yield "random", rng.normal(1.0, 1.0, 500), rng.normal(0.0, 1.5, 300)
    yield "unbalanced", rng.normal(0.5, 1.0, 37), rng.normal(0.0, 1.0, 1000)
    yield "ties", rng.integers(0, 5, 400).astype(float), rng.integers(-1, 3, 250).astype(float)
    yield "heavy ties", rng.integers(0, 2, 300).astype(float), rng.integers(0, 2, 200).astype(float)
    yield "all tied", np.zeros(50), np.zeros(30)
    yield ("float32 ties", rng.normal(size=200).astype(np.float32).round(1),
           rng.normal(-0.3, 1, 150).astype(np.float32).round(1))


@pytest.mark.parametrize("case", list(score_sets()), ids=lambda c: c[0])
def test_metrics_agree_with_sklearn(case):
    _, id_scores, ood_scores = case
    ours = ood_metrics(id_scores, ood_scores, name="x")
    ref = sklearn_reference(id_scores, ood_scores)
    assert list(ours) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert isinstance(ours[key], float)
        assert 0.0 <= ours[key] <= 1.0
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key


def test_perfect_separation():
    m = ood_metrics(np.linspace(1, 2, 100), np.linspace(-2, 0, 70))
    assert m == {"auroc": 1.0, "fpr95": 0.0, "fpr95_openood": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    flipped = ood_metrics(np.linspace(-2, 0, 70), np.linspace(1, 2, 100))
    assert flipped["auroc"] == 0.0 and flipped["fpr95"] == 1.0


def test_identical_distributions():
    rng = np.random.default_rng(1)
    m = ood_metrics(rng.normal(size=20000), rng.normal(size=20000))
    assert m["auroc"] == pytest.approx(0.5, abs=0.01)
    assert m["fpr95"] == pytest.approx(0.95, abs=0.01)
    assert m["fpr95_openood"] == pytest.approx(0.95, abs=0.01)


def test_fpr95_hand_case():
    id_scores = np.arange(1.0, 21.0)  # 1..20: accepting 19 of 20 (95%) puts the threshold at 2
    ood_scores = np.array([0.0, 1.5, 2.0, 3.0, 10.0])
    m = ood_metrics(id_scores, ood_scores)
    assert m["fpr95"] == pytest.approx(3 / 5)  # 2 (tied with the threshold: accepted), 3, 10
    # OpenOOD: catching 95% of 5 OOD samples needs all 5 (score <= 10): ID 1..10 are flagged.
    assert m["fpr95_openood"] == pytest.approx(10 / 20)
    # AUROC by hand: pairs (id > ood) + ties / 2, over 20 * 5.
    wins = sum((i > o) + 0.5 * (i == o) for i in id_scores for o in ood_scores)
    assert m["auroc"] == pytest.approx(wins / 100)


def test_fpr95_ties_at_threshold_count_as_accepted():
    m = ood_metrics(np.full(10, 5.0), np.array([5.0, 4.0, 6.0, 1.0]))
    assert m["fpr95"] == pytest.approx(2 / 4)


def test_threshold_at_tpr():
    scores = np.random.default_rng(2).permutation(np.arange(100.0))
    t = threshold_at_tpr(scores, 0.95)
    assert t == 5.0 and np.mean(scores >= t) == 0.95
    assert threshold_at_tpr(scores, 1.0) == 0.0
    t = threshold_at_tpr(np.arange(7.0), 0.95)  # 95% of 7 = 6.65: all 7 must be accepted
    assert t == 0.0
    assert np.mean(np.arange(10.0) >= threshold_at_tpr(np.arange(10.0), 0.5)) == 0.5
    with pytest.raises(ValueError, match="tpr"):
        threshold_at_tpr(scores, 0.0)
    with pytest.raises(ValueError, match="empty"):
        threshold_at_tpr([], 0.95)


def test_errors_name_the_set():
    good = np.arange(10.0)
    with pytest.raises(ValueError, match="OOD set 'mnist' is empty"):
        ood_metrics(good, [], name="mnist")
    with pytest.raises(ValueError, match=r"the ID set \(scored against OOD set 'mnist'\) is empty"):
        ood_metrics([], good, name="mnist")
    bad = good.copy()
    bad[[1, 4, 7]] = np.nan
    with pytest.raises(ValueError, match="OOD set 'textile' has 3 NaN scores"):
        ood_metrics(good, bad, name="textile")
    with pytest.raises(ValueError, match="'textile'.*2 infinite"):
        ood_metrics(np.array([1.0, np.inf, -np.inf]), good, name="textile")


def test_accuracy_and_average():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1, 0])
    assert accuracy(logits, labels) == 0.75
    assert accuracy(np.array([0, 1, 2, 0]), labels) == 0.75
    with pytest.raises(ValueError, match="3 predictions but 4 labels"):
        accuracy(np.array([0, 1, 2]), labels)
    avg = average([{"auroc": 0.5, "fpr95": 0.2}, {"auroc": 1.0, "fpr95": 0.4}])
    assert avg == pytest.approx({"auroc": 0.75, "fpr95": 0.3})
    with pytest.raises(ValueError, match="different keys"):
        average([{"auroc": 0.5}, {"fpr95": 0.1}])
    with pytest.raises(ValueError):
        average([])
