"""OOD scores: each ranks ID above OOD, KNN matches scikit-learn, Mahalanobis/ViM match direct
computations, hyper-parameter selection on ID data, the registry (a toy tuned score, end to end)."""

import itertools
import json

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from mofe_ood import evaluate, scores, tuning
from mofe_ood.metrics import ood_metrics
from mofe_ood.params import ParamError, load, merged
from mofe_ood.neighbours import knn_kth_distance
from mofe_ood.scores import SCORES, ViM, make_score
from mofe_ood.tuning import select_hyper


def synthetic(seed=0, n_train=100, n_val=50, n_ood=150, d=16, classes=4):
    """Gaussian ID classes along the first axes, OOD cluster along an axis no class uses.

    Noise is large in the first half of the dims and small in the second half,
    where the OOD mean lies (outside ViM's principal subspace). The head is
    the nearest-mean linear classifier: logit_c = mu_c.x - |mu_c|^2 / 2.
    """
    rng = np.random.default_rng(seed)
    scale = np.r_[np.ones(d // 2), np.full(d - d // 2, 0.1)]
    means = 5.0 * np.eye(d)[:classes]

    def draw(mean_rows):
        return mean_rows + rng.normal(size=mean_rows.shape) * scale

    y_train, y_val = np.repeat(np.arange(classes), n_train), np.repeat(np.arange(classes), n_val)
    ood = draw(np.tile(5.0 * np.eye(d)[d - 3], (n_ood, 1)))
    head = (means, -0.5 * (means ** 2).sum(1))
    return draw(means[y_train]), y_train, draw(means[y_val]), y_val, ood, head


def logits_of(x, head):
    return x @ head[0].T + head[1]


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.mark.parametrize("name", list(SCORES))
def test_each_score_ranks_id_above_ood(name, data):
    x_train, y_train, x_val, y_val, x_ood, head = data
    score = make_score(name).fit(x_train, y_train, logits_of(x_train, head), head)
    s_id, s_ood = score.score(x_val, logits_of(x_val, head)), score.score(x_ood, logits_of(x_ood, head))
    assert s_id.dtype == np.float64 and s_id.shape == (len(x_val),) and np.isfinite(s_id).all()
    m = ood_metrics(s_id, s_ood, name="far cluster")
    assert m["auroc"] > 0.98, m
    assert m["fpr95"] < 0.1, m


def test_flags_say_what_a_score_needs():
    assert {n for n, c in SCORES.items() if c.needs_logits} == {"msp", "maxlogit", "energy"}
    assert {n for n, c in SCORES.items() if c.needs_head} == {"vim"}
    with pytest.raises(ValueError, match="needs logits"):
        make_score("msp").score(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="head"):
        make_score("vim").fit(np.zeros((5, 3)), np.zeros(5))


def test_logit_scores_by_hand():
    z = np.array([[2.0, 0.0, -1.0], [100.0, 100.0, 100.0], [-3.0, 4.0, 1.0]])
    x = np.zeros((3, 2))
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    assert np.allclose(make_score("msp").score(x, z), np.exp(z.max(1) - lse), rtol=1e-12)
    assert np.allclose(make_score("msp").score(x, z)[1], 1 / 3)
    assert np.array_equal(make_score("maxlogit").score(x, z), z.max(1))
    assert np.allclose(make_score("energy").score(x, z), lse, rtol=1e-12)
    t = 4.0
    lse_t = t * np.log(np.exp(z / t).sum(1))
    assert np.allclose(make_score("energy", temperature=t).score(x, z), lse_t, rtol=1e-12)


@pytest.mark.parametrize("k,chunk", [(1, None), (5, 7), (30, 1)])
def test_knn_kth_distance_matches_sklearn(k, chunk):
    rng = np.random.default_rng(k)
    bank = rng.normal(size=(300, 24)).astype(np.float32) + rng.normal(size=24).astype(np.float32)
    queries = np.concatenate([rng.normal(size=(60, 24)).astype(np.float32), bank[:5]])
    ours = knn_kth_distance(bank, queries, k, chunk_size=chunk)
    ref = NearestNeighbors(n_neighbors=k, metric="cosine").fit(bank).kneighbors(queries)[0][:, -1]
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    if k == 1:
        np.testing.assert_allclose(ours[-5:], 0.0, atol=1e-6)  # a query in the bank finds itself


def test_inside_the_neighbour_cache_every_k_gives_the_same_bits_from_one_product_per_array(monkeypatch):
    from mofe_ood import neighbours

    rng = np.random.default_rng(5)
    bank, val, test = (rng.normal(size=(n, 16)).astype(np.float32) for n in (400, 30, 20))
    ks = [1, 5, 10, 200]  # 200 > KEPT: kept anew, wider
    arrays = (("val", val), ("test", test))
    want = {(k, name): make_score("knn", k=k).fit(bank).score(q) for k in ks for name, q in arrays}
    products = []
    real = neighbours._top_similarities
    monkeypatch.setattr(neighbours, "_top_similarities",
                        lambda b, q, k, chunk: products.append((len(q), k)) or real(b, q, k, chunk))
    with neighbours.neighbour_cache():
        for k in ks:  # as evaluate chooses K: a new fitted score per candidate, the same arrays
            for name, q in arrays:
                np.testing.assert_array_equal(make_score("knn", k=k).fit(bank).score(q), want[(k, name)])
    assert products == [(30, neighbours.KEPT), (20, neighbours.KEPT), (30, 200), (20, 200)]
    make_score("knn", k=5).fit(bank).score(val)  # outside: no cache, one product a call
    assert products[-1] == (30, 5)


def test_knn_score_is_minus_kth_distance_and_needs_k_within_bank():
    rng = np.random.default_rng(3)
    bank, queries = rng.normal(size=(50, 8)), rng.normal(size=(9, 8))
    score = make_score("knn", k=4).fit(bank, np.zeros(50))
    np.testing.assert_allclose(score.score(queries), -knn_kth_distance(bank, queries, 4), atol=1e-12)
    # Scale does not matter (cosine): the L2 normalisation comes first.
    np.testing.assert_allclose(score.score(queries * 7.5), score.score(queries), atol=1e-6)
    with pytest.raises(ValueError, match="k=51"):
        make_score("knn", k=51).fit(bank, np.zeros(50))
    with pytest.raises(ValueError, match="dims"):
        score.score(np.zeros((2, 5)))


def mahalanobis_direct(x_train, y_train, x):
    classes = np.unique(y_train)
    means = np.stack([x_train[y_train == c].mean(0) for c in classes])
    centred = x_train - means[y_train]
    precision = np.linalg.pinv(centred.T @ centred / len(x_train))
    dists = np.stack([np.einsum("nd,de,ne->n", x - m, precision, x - m) for m in means], axis=1)
    return -dists.min(axis=1)


def test_mahalanobis_matches_direct_numpy(data):
    x_train, y_train, x_val, _, x_ood, _ = data
    queries = np.concatenate([x_val[:40], x_ood[:40]])
    ours = make_score("mahalanobis").fit(x_train, y_train).score(queries)
    np.testing.assert_allclose(ours, mahalanobis_direct(x_train, y_train, queries), rtol=1e-8, atol=1e-8)

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    ours_pp = make_score("mahalanobis_pp").fit(x_train, y_train).score(queries)
    np.testing.assert_allclose(ours_pp, mahalanobis_direct(unit(x_train), y_train, unit(queries)),
                               rtol=1e-8, atol=1e-8)


def test_vim_hand_built_case():
    # Train: every corner of {-3, 3}^2 x {-0.1, 0.1}^2, so the second moment about the origin is
    # diag(9, 9, 0.01, 0.01): with dim=2 the principal space is dims 0-1, the residual dims 2-3.
    x_train = np.array(list(itertools.product([-3.0, 3.0], [-3.0, 3.0], [-0.1, 0.1], [-0.1, 0.1])))
    w, b = np.eye(4)[:2], np.zeros(2)  # logits = (x0, x1), origin u = -pinv(W) b = 0
    vim = ViM(dim=2).fit(x_train, np.zeros(len(x_train)), head=(w, b))
    np.testing.assert_allclose(vim.origin_, 0.0, atol=1e-12)
    # alpha = mean train max-logit / mean residual norm = ((3 + 3 + 3 - 3) / 4) / sqrt(0.02)
    assert vim.alpha_ == pytest.approx(1.5 / np.sqrt(0.02), rel=1e-10)
    x = np.array([[1.0, 2.0, 0.3, -0.4], [0.0, 0.0, 0.0, 0.0], [-2.0, 5.0, 1.0, 0.0]])
    expected = np.log(np.exp(x[:, 0]) + np.exp(x[:, 1])) - vim.alpha_ * np.linalg.norm(x[:, 2:], axis=1)
    np.testing.assert_allclose(vim.score(x), expected, rtol=1e-10)
    np.testing.assert_allclose(vim.score(x, logits=x[:, :2]), expected, rtol=1e-10)  # given logits win
    # A bias moves the origin to where the logits vanish.
    biased = ViM(dim=2).fit(x_train, None, head=(w, np.array([1.0, -2.0])))
    np.testing.assert_allclose(biased.origin_, [-1.0, 2.0, 0.0, 0.0], atol=1e-12)


def test_vim_default_dim():
    def fitted_dim(d, dim=None):
        x = np.random.default_rng(0).normal(size=(3 * d, d))
        head = (np.eye(d)[:3], np.zeros(3))
        return ViM(dim).fit(x, None, head=head).dim_

    assert fitted_dim(16) == 8  # small D: D // 2
    assert fitted_dim(16, dim=5) == 5
    assert fitted_dim(16, dim=64) == 8  # no residual left otherwise
    assert ViM()._dim_for(768) == 512 and ViM()._dim_for(2048) == 1000 and ViM()._dim_for(1280) == 512


def test_select_hyper_knn_picks_a_candidate_deterministically(data):
    x_train, y_train, x_val, y_val, _, _ = data
    candidates = [{"k": 1}, {"k": 10}, {"k": 50}, {"k": len(x_train)}]
    best, table = select_hyper("knn", candidates, x_train, y_train, x_val, y_val)
    assert best in candidates
    assert [row["hyper"] for row in table] == candidates
    assert best == max(table, key=lambda row: row["auroc"])["hyper"]
    # K = the whole bank measures nothing local: clearly worse than a small K.
    assert table[-1]["auroc"] < table[1]["auroc"] - 0.1
    assert best != {"k": len(x_train)}
    again = select_hyper("knn", candidates, x_train, y_train, x_val, y_val)
    assert again == (best, table)
    assert all(len(row["fold_auroc"]) == 4 for row in table)  # 4 classes: one held out per fold


def test_select_hyper_with_logits_and_head(data):
    x_train, y_train, x_val, y_val, _, head = data
    kwargs = dict(train_logits=logits_of(x_train, head), val_logits=logits_of(x_val, head), head=head)
    best, table = select_hyper("vim", [{"dim": 2}, {"dim": 8}], x_train, y_train, x_val, y_val, folds=2, **kwargs)
    assert best in [{"dim": 2}, {"dim": 8}] and len(table[0]["fold_auroc"]) == 2
    assert all(0.5 < row["auroc"] <= 1.0 for row in table)
    best, _ = select_hyper("energy", [{"temperature": 1.0}, {"temperature": 10.0}], x_train, y_train,
                           x_val, y_val, **kwargs)
    assert best in [{"temperature": 1.0}, {"temperature": 10.0}]
    with pytest.raises(ValueError, match="needs logits"):
        select_hyper("msp", [{}], x_train, y_train, x_val, y_val)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown OOD score 'bogus'.*msp.*knn.*vim"):
        make_score("bogus")
    with pytest.raises(ValueError, match="unknown OOD score 'bogus'"):
        select_hyper("bogus", [{}], np.zeros((4, 2)), np.arange(4), np.zeros((4, 2)), np.arange(4))
    with pytest.raises(ValueError, match=r"'knn'.*dim.*takes: k, chunk_size"):
        make_score("knn", dim=3)
    assert isinstance(make_score("knn", k=3), scores.KNN) and make_score("knn", k=3).k == 3


def test_select_hyper_skips_a_k_larger_than_the_bank(data):
    x_train, y_train, x_val, y_val, _, _ = data
    best, table = select_hyper("knn", [{"k": 5}, {"k": 10_000}], x_train, y_train, x_val, y_val, folds=2)
    assert best == {"k": 5} and table[1]["auroc"] is None and table[1]["fold_auroc"] == []
    with pytest.raises(ValueError, match="no candidate fits"):
        select_hyper("knn", [{"k": 10_000}], x_train, y_train, x_val, y_val)


def test_each_tuned_score_declares_its_candidates_key():
    assert {n: {h: t.key for h, t in c.tuned.items()} for n, c in SCORES.items() if c.tuned} == {
        "knn": {"k": "knn_k"}, "vim": {"dim": "vim_dim"}}
    cfg = evaluate.config(load("params.yaml"))
    assert cfg.candidates("knn") == [{"k": k} for k in (1, 5, 10, 20, 50, 100)]
    assert cfg.candidates("vim") == [{"dim": 32}, {"dim": 64}, {"dim": 128}]
    assert cfg.candidates("msp") == [{}]
    with pytest.raises(ParamError, match="evaluate.vim_dim: 0 is below the minimum 1"):
        evaluate.config(merged(load("params.yaml"), {"evaluate": {"vim_dim": [0, 32]}}))


# ---- a new tuned score, end to end: one class + its candidates in the evaluate section


@pytest.fixture
def toy_score(monkeypatch):
    """Registers `first_dims`: distance to the nearest class mean in the first `dims` features."""
    monkeypatch.setattr(scores, "SCORES", dict(scores.SCORES))  # the registration ends with the test

    @scores.register("first_dims")
    class FirstDims(scores.OODScore):
        tuned = {"dims": scores.Tuned("first_dims_dims", low=1)}

        def __init__(self, dims: int = 1):
            self.dims = int(dims)

        def fit(self, features, labels, logits=None, head=None):
            x = np.asarray(features)[:, :self.dims]
            self.means_ = np.stack([x[labels == c].mean(0) for c in np.unique(labels)])
            return self

        def score(self, features, logits=None):
            x = np.asarray(features)[:, :self.dims]
            return -((x[:, None] - self.means_[None]) ** 2).sum(-1).min(1)

    return FirstDims


def write_features(folder, splits: dict[str, tuple[np.ndarray, np.ndarray, str | None]]):
    """A data/features folder: name -> (features, labels, OOD group or None for ID)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, y, _) in splits.items():
        np.savez(folder / f"{name}.npz", features=x.astype(np.float32), labels=y.astype(np.int64))
    info = {"backbone": "toy", "image_size": 0, "splits": {
        name: {"kind": "ood" if group else "id", "group": group, "count": len(x)}
        for name, (x, _, group) in splits.items()}}
    (folder / "info.json").write_text(json.dumps(info))


def test_a_registered_toy_score_is_tuned_on_id_data_only_and_evaluated(toy_score, tmp_path, data):
    x_train, y_train, x_val, y_val, x_ood, _ = data
    x_test, y_test = synthetic(seed=1)[2:4]
    params = merged(load("params.yaml"), {"evaluate": {
        "variants": ["frozen"], "scores": ["first_dims"], "default_score": "first_dims",
        "first_dims_dims": [2, 16]}})
    # Two OOD sets that disagree on `dims`: a far cluster (16 dims see it) and ID samples moved
    # off the class axes along dims 0 and 1 (2 dims see it better). Neither may change the choice.
    moved = x_test[:150] + np.r_[3.0, 3.0, np.zeros(14)]
    results = {}
    for name, ood in (("cluster", x_ood), ("moved", moved)):
        write_features(tmp_path / name / "features", {
            "train": (x_train, y_train, None), "val": (x_val, y_val, None), "test": (x_test, y_test, None),
            "ood": (ood, -np.ones(len(ood)), "far")})
        all_metrics = evaluate.run(params, tmp_path / name / "features", tmp_path / "no-models", tmp_path / name)
        thresholds = json.loads((tmp_path / name / "thresholds.json").read_text())
        results[name] = (thresholds["frozen"], all_metrics["frozen"]["first_dims"]["far"]["auroc"])
    best, table = tuning.select_hyper("first_dims", [{"dims": 2}, {"dims": 16}], x_train, y_train, x_val, y_val)
    assert best == {"dims": 16} and table[0]["auroc"] < table[1]["auroc"]  # held-out classes share dims 0, 1
    for calibration, _ in results.values():
        assert calibration["score"] == "first_dims" and calibration["hyper"] == best
    assert results["cluster"][0]["threshold"] == results["moved"][0]["threshold"]  # ID val only
    assert results["cluster"][1] > 0.99 and results["moved"][1] != results["cluster"][1]
    with pytest.raises(ParamError, match="evaluate.first_dims_dims: missing"):
        evaluate.config(load("params.yaml"))


def test_choices_read_the_ood_validation_parts_and_never_the_test_parts(tmp_path, data):
    """K, the default score and the variant come from ID val against each OOD set's validation
    part (`<set>_val`, kind ood_val); replacing the test parts changes only the test metrics."""
    x_train, y_train, x_val, y_val, x_ood, _ = data
    x_test, y_test = synthetic(seed=1)[2:4]
    params = merged(load("params.yaml"), {"evaluate": {
        "variants": ["frozen"], "scores": ["knn", "mahalanobis"], "default_score": "auto",
        "knn_k": [1, 50], "selection": ["far.auroc"]}})
    near_id = x_val[:60] + 0.3  # close to ID: what K must separate
    results = {}
    for name, test_ood in (("a", x_ood), ("b", x_test[:100] + 5.0)):
        splits = {"train": (x_train, y_train, None), "val": (x_val, y_val, None), "test": (x_test, y_test, None),
                  "ood_val": (near_id, -np.ones(len(near_id)), "far"),
                  "ood": (test_ood, -np.ones(len(test_ood)), "far")}
        write_features(tmp_path / name / "features", splits)
        info = json.loads((tmp_path / name / "features" / "info.json").read_text())
        info["splits"]["ood_val"]["kind"] = "ood_val"
        (tmp_path / name / "features" / "info.json").write_text(json.dumps(info))
        test = evaluate.run(params, tmp_path / name / "features", tmp_path / "no-models", tmp_path / name)
        read = {f: json.loads((tmp_path / name / f).read_text())
                for f in ("metrics_val.json", "thresholds.json", "selection.json")}
        results[name] = (test, read)
    (test_a, read_a), (test_b, read_b) = results["a"], results["b"]
    assert read_a == read_b  # every choice, the thresholds and the val metrics: test parts unread
    assert test_a != test_b
    val = read_a["metrics_val.json"]["frozen"]
    best = "mahalanobis"
    # K is the candidate with the best validation objective; the default score the best on val
    rows = val["knn"]["candidates"]
    assert [r["hyper"] for r in rows] == [{"k": 1}, {"k": 50}] and rows[0]["selection"] != rows[1]["selection"]
    assert val["knn"]["hyper"] == max(rows, key=lambda r: r["selection"])["hyper"]
    assert val["knn"]["selection"] == pytest.approx(max(r["selection"] for r in rows))
    assert val["mahalanobis"]["selection"] > 0.99 > val["knn"]["selection"]
    assert read_a["thresholds.json"]["frozen"]["score"] == "mahalanobis"
    assert val[best]["selection"] == pytest.approx(val[best]["far"]["auroc"])
    assert read_a["selection.json"]["split"] == "val" and read_a["selection.json"]["variant"] is None  # frozen only
    with pytest.raises(ParamError, match="evaluate.selection: 'near.accuracy'"):
        evaluate.config(merged(params, {"evaluate": {"selection": ["near.accuracy"]}}))


def test_train_seeds_give_mean_and_sd_in_the_report(tmp_path, data):
    """train.seeds trains each variant again per seed (models/<variant>/seeds/<seed>/); evaluate
    reports each seed's default-score metrics and their mean ± sd (seeds.json, results.md)."""
    from mofe_ood import train

    x_train, y_train, x_val, y_val, x_ood, _ = data
    x_test, y_test = synthetic(seed=1)[2:4]
    features = tmp_path / "features"
    write_features(features, {"train": (x_train, y_train, None), "val": (x_val, y_val, None),
                              "test": (x_test, y_test, None), "ood_val": (x_ood[:50], -np.ones(50), "far"),
                              "ood": (x_ood[50:], -np.ones(100), "far")})
    info = json.loads((features / "info.json").read_text())
    info["splits"]["ood_val"]["kind"] = "ood_val"
    info["classes"] = [f"c{i}" for i in range(4)]
    (features / "info.json").write_text(json.dumps(info))
    params = merged(load("params.yaml"), {"train": {"variants": ["linear"], "seeds": [1, 2], "epochs": 3},
                                          "evaluate": {"variants": ["linear"], "scores": ["energy"],
                                                       "default_score": "energy", "selection": ["far.auroc"]}})
    train.run(params, features, tmp_path / "models")
    runs = [tmp_path / "models" / "linear" / p for p in (".", "seeds/1", "seeds/2")]
    weights = [(r / "model.safetensors").read_bytes() for r in runs]
    assert len(set(weights)) == 3  # three seeds, three models
    evaluate.run(params, features, tmp_path / "models", tmp_path / "reports")
    seeds = json.loads((tmp_path / "reports" / "seeds.json").read_text())["linear"]
    assert list(seeds["seeds"]) == ["base", "1", "2"] and seeds["score"] == "energy"
    values = [r["far.auroc"] for r in seeds["seeds"].values()]
    assert seeds["mean"]["far.auroc"] == pytest.approx(np.mean(values))
    assert seeds["sd"]["far.auroc"] == pytest.approx(np.std(values, ddof=1))
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert seeds["seeds"]["base"]["far.auroc"] == metrics["linear"]["energy"]["far"]["auroc"]
    assert "## Seeds" in (tmp_path / "reports" / "results.md").read_text()
    with pytest.raises(ParamError, match="repeats base.seed 0"):
        train.run(merged(params, {"train": {"seeds": [0]}}), features, tmp_path / "again")
