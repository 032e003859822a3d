"""Paired differences of two predictors on the same points: a patient-level paired bootstrap that finds a known
difference, gives exactly zero for identical predictors, and does not mistake a patient's repeated points for
independent evidence. Synthetic predictions only: no model is trained."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from foresight.cli.model import paired_summary
from foresight.evaluate import bootstrap_ci, paired_block, paired_difference, patient_resamples
from foresight.evaluate.baselines import EARLY_STOPPING_MIN_CASES, gradient_boosting


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def draw(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels drawn from a true risk ``q`` (about 25% positive), ``q`` itself (the informative predictor) and an
    uninformative predictor with the same spread of values (an independent draw of the same risk distribution)."""
    q = sigmoid(2.0 * rng.normal(size=n) - 1.5)
    y = (rng.random(n) < q).astype(int)
    noise = sigmoid(2.0 * rng.normal(size=n) - 1.5)
    return y, q, noise


@pytest.fixture(scope="module")
def population() -> dict[str, float]:
    """The population differences (informative minus uninformative), from a very large sample."""
    y, q, noise = draw(1_000_000, np.random.default_rng(123))
    return {"auroc": roc_auc_score(y, q) - roc_auc_score(y, noise),
            "brier": float(np.mean((q - y) ** 2) - np.mean((noise - y) ** 2))}


def test_a_known_difference_is_found_and_its_ci_covers_the_population_value(population):
    rng = np.random.default_rng(7)
    y, q, noise = draw(1200, rng)
    groups = np.arange(1200) // 3  # 400 patients with 3 points each
    d = paired_difference(y, q, noise, groups, n_boot=300, seed=0)
    assert d["points"] == 1200
    assert d["ci"][0] > 0 and d["brier_ci"][1] < 0  # the informative predictor wins on both, resolvably
    assert d["ci"][0] <= population["auroc"] <= d["ci"][1]
    assert d["brier_ci"][0] <= population["brier"] <= d["brier_ci"][1]
    # the point estimate is the plain difference of the two metrics on these points
    assert d["auroc"] == pytest.approx(roc_auc_score(y, q) - roc_auc_score(y, noise))


def test_the_paired_ci_is_narrower_than_two_separate_cis_suggest():
    # two strong, correlated predictors: most of the bootstrap noise is shared, so the paired CI of their
    # difference is much narrower than the difference of their separate CIs would suggest
    rng = np.random.default_rng(3)
    y, q, _ = draw(1000, rng)
    a, b = sigmoid(np.log(q / (1 - q)) + 0.3 * rng.normal(size=1000)), q
    groups = np.arange(1000)
    d = paired_difference(y, a, b, groups, n_boot=200, seed=1)
    ci_a, ci_b = bootstrap_ci(y, a, groups, n_boot=200, seed=1)["auroc"], bootstrap_ci(y, b, groups, n_boot=200,
                                                                                          seed=1)["auroc"]
    assert d["ci"][1] - d["ci"][0] < 0.5 * ((ci_a[1] - ci_a[0]) + (ci_b[1] - ci_b[0]))


def test_identical_predictors_differ_by_exactly_zero():
    rng = np.random.default_rng(5)
    y, q, _ = draw(300, rng)
    d = paired_difference(y, q, q.copy(), np.arange(300) // 2, n_boot=100, seed=0)
    assert d["auroc"] == 0 and d["brier"] == 0
    assert d["ci"] == [0.0, 0.0] and d["brier_ci"] == [0.0, 0.0]


def test_a_patients_repeated_points_do_not_shrink_the_ci():
    """Every patient's one point copied 4 times is no more evidence than the point once: the patient bootstrap
    keeps the CI about as wide, while a point-level bootstrap (each point its own group) halves it (sqrt 4)."""
    rng = np.random.default_rng(11)
    y, q, noise = draw(500, rng)
    once = paired_difference(y, q, noise, np.arange(500), n_boot=300, seed=2)
    rep = np.repeat(np.arange(500), 4)  # point i of patient p at 4 * p + copy
    by_patient = paired_difference(y[rep], q[rep], noise[rep], rep, n_boot=300, seed=2)
    by_point = paired_difference(y[rep], q[rep], noise[rep], np.arange(2000), n_boot=300, seed=2)

    def width(d: dict, key: str = "ci") -> float:
        return d[key][1] - d[key][0]

    assert by_patient["auroc"] == pytest.approx(once["auroc"])  # the same AUROCs: copies do not move the ranks
    for key in ("ci", "brier_ci"):
        assert width(by_patient, key) == pytest.approx(width(once, key), rel=0.25)
        assert width(by_point, key) < 0.7 * width(by_patient, key)


def test_patient_resamples_keep_each_patients_points_together():
    groups = np.array([5, 5, 9, 2, 9, 9, 2])
    for idx in patient_resamples(groups, n_boot=50, seed=0):
        picked = groups[idx]
        draws = 0
        for g in (2, 5, 9):  # a drawn patient brings all of its points, as many times as it was drawn
            assert (picked == g).sum() % (groups == g).sum() == 0
            draws += (picked == g).sum() // (groups == g).sum()
        assert draws == 3  # as many patients drawn as there are patients


def test_the_paired_block_compares_the_model_with_what_was_scored_on_the_points_each_answers():
    rng = np.random.default_rng(2)
    y, q, noise = draw(400, rng)
    oracle = q.copy()
    oracle[:100] = np.nan  # an oracle that answers only some points is compared on those
    block = paired_block(y, {"model": noise, "prevalence": np.full(400, y.mean()), "logistic_counts": q,
                             "oracle": oracle}, np.arange(400) // 2, n_boot=50, seed=0)
    assert set(block) == {"model-logistic_counts", "model-oracle"}  # no GBM fitted here; prevalence is not paired
    assert block["model-oracle"]["points"] == 300 and block["model-logistic_counts"]["points"] == 400
    assert block["model-logistic_counts"]["auroc"] < 0  # the model here is the noise
    line = paired_summary(block)
    assert line.startswith("paired, model minus: logistic_counts AUROC -") and "; oracle AUROC" in line


def test_one_class_only_leaves_the_auroc_difference_undefined():
    y = np.zeros(50, dtype=int)
    d = paired_difference(y, np.linspace(0, 1, 50), np.full(50, 0.1), np.arange(50), n_boot=20, seed=0)
    assert np.isnan(d["auroc"]) and d["ci"] is None
    assert d["brier"] > 0 and d["brier_ci"] is not None


@pytest.mark.parametrize("positives", [1, 2, 9, 10])
def test_the_gbm_baseline_fits_a_rare_outcome_with_one_or_a_few_positives(positives):
    """A small cohort (the MIMIC-IV demo, a 300-life simulation) can have one positive among its train points:
    the stratified early-stopping split cannot be drawn then, and the baseline must still fit, not abort evaluate."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = np.zeros(200, dtype=int)
    y[:positives] = 1
    model = gradient_boosting(0, positives).fit(x, y)
    p = model.predict_proba(x)[:, 1]
    assert p.shape == (200,) and np.all((p > 0) & (p < 1))
    assert model.early_stopping is (positives >= EARLY_STOPPING_MIN_CASES)
