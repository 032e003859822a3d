"""Recalibration of the model's risks: fitted on tuning points only, it moves risks toward the diagonal without
reading a held-out label."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from foresight import tokens as T
from foresight import warehouse
from foresight.evaluate import evaluate_task, expected_calibration_error, fit_calibrator, prediction_points
from foresight.evaluate.metrics import risk_metrics
from foresight.forecast import Forecaster, TaskSpec

from .conftest import tiny_llama, tiny_warehouse

pytestmark = pytest.mark.usefixtures("one_thread")


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn from a true risk, and a model that squares the odds (over-confident at both ends)."""
    rng = np.random.default_rng(seed)
    true = rng.beta(1, 8, n)
    y = (rng.random(n) < true).astype(int)
    odds = (true / (1 - true)) ** 2
    return odds / (1 + odds), y


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_a_calibrator_fitted_on_one_sample_fixes_the_ece_of_another(method):
    p_tune, y_tune = _overconfident(4000, seed=1)
    p_test, y_test = _overconfident(4000, seed=2)
    cal, why = fit_calibrator(p_tune, y_tune, method=method)
    assert cal is not None, why
    before, after = expected_calibration_error(y_test, p_test), expected_calibration_error(y_test, cal.apply(p_test))
    assert before > 0.03 and after < before / 2, (before, after)
    if method == "platt":  # a monotone map: the ranking, hence the AUROC, is unchanged
        assert risk_metrics(y_test, cal.apply(p_test))["auroc"] == pytest.approx(risk_metrics(y_test, p_test)["auroc"])
    assert cal.to_json()["fitted_on"] == "tuning" and cal.to_json()["points"] == 4000


def test_too_few_positives_gives_no_calibrator_and_says_why():
    cal, why = fit_calibrator(np.full(50, 0.1), np.r_[np.ones(3), np.zeros(47)].astype(int))
    assert cal is None and "3 positive" in why


def test_a_map_that_would_reverse_the_ranking_is_refused():
    p, y = _overconfident(2000, seed=5)
    cal, why = fit_calibrator(1 - p, y)  # risks that rank the outcomes backwards
    assert cal is None and "slope" in why


def test_nan_risks_stay_nan_and_an_unknown_method_is_refused():
    p, y = _overconfident(500, seed=3)
    cal, _ = fit_calibrator(p, y)
    out = cal.apply(np.array([np.nan, 0.2]))
    assert np.isnan(out[0]) and 0 < out[1] < 1
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibrator(p, y, method="temperature-of-the-room")


YEAR_ADMISSION = TaskSpec("admission_365d", ("ADMIT//*",), 365.0, description="any admission within a year")


def _points(db: Path, split: str, per_subject: int = 2) -> list:
    with warehouse.connect(db, read_only=True) as con:
        ids = [r[0] for r in con.execute("SELECT subject_id FROM subject_splits WHERE split = ?", [split]).fetchall()]
        return prediction_points(con, ids, mode="events", min_follow_up_days=365, max_per_subject=per_subject)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_the_calibrator_is_fitted_on_tuning_only_perturbing_held_out_labels_leaves_it_unchanged(tmp_path, method):
    db = tiny_warehouse(tmp_path / "w.duckdb", n_subjects=500, seed=4)
    T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=3))
    vocab = T.Vocabulary.load(tmp_path / "tok" / "vocab.json")
    fc = Forecaster(tiny_llama(vocab), vocab)
    held, tuning, train = _points(db, "held_out", 1), _points(db, "tuning"), _points(db, "train")[:300]
    # the same warehouse with every held-out subject's admissions after its prediction point removed: the held-out
    # labels change, their prompts (the record up to the point) and every tuning subject's record do not
    flipped = tmp_path / "flipped.duckdb"
    shutil.copy(db, flipped)
    with warehouse.connect(flipped) as con:
        for pt in held:
            con.execute("DELETE FROM events WHERE subject_id = ? AND code LIKE 'ADMIT//%' AND time > ?",
                        [pt.subject_id, pt.time])
    results = []
    for path in (db, flipped):
        with warehouse.connect(path, read_only=True) as con:
            results.append(evaluate_task(fc, con, YEAR_ADMISSION, held, samples=2, tuning_points=tuning,
                                         train_points=train, n_boot=20, calibration=method))
    a, b = results
    assert a["_y"] != b["_y"] and sum(b["_y"]) == 0  # the held-out labels really changed
    assert a["_p"]["model"] == b["_p"]["model"]  # ...the model's held-out risks did not
    if method == "isotonic":  # always fitted here (Platt is refused when the untrained model ranks backwards)
        assert "calibrator" in a, a.get("calibration_note")
    assert a.get("calibrator") == b.get("calibrator") and a.get("calibration_note") == b.get("calibration_note")
    if "calibrator" in a:
        assert a["calibrator"]["fitted_on"] == "tuning" and a["calibrator"]["points"] > 0
        assert np.allclose(a["_p"]["model_calibrated"], b["_p"]["model_calibrated"])  # ...nor the map
        assert {"model_calibrated-logistic_counts", "model-logistic_counts"} <= set(a["paired"])
