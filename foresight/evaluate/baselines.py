"""Baselines of the risk tasks: the train prevalence, and a logistic regression and a gradient-boosted model on
the same count features.

All are fitted on train prediction points of the same kind as the scored points, so the model is compared with
what a simple model learns from the same records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from foresight.evaluate.points import PredictionPoint, observed_labels, points_table
from foresight.evaluate.tasks import EvalTask

# Kinds whose prior event counts are the logistic baseline's features (with age and sex).
COUNT_KINDS = ("ADMIT", "DX", "RX_START", "LAB", "ICU", "ED", "RX")


def count_features(con: Any, points: Sequence[PredictionPoint], kinds: Sequence[str]) -> np.ndarray:
    """Per point: age (years), sex (F=1), and counts of prior events per kind — the logistic baseline's input."""
    if not len(points):
        return np.zeros((0, 2 + len(kinds)))
    # one query for all points (thousands of train points per task)
    points_table(con, "feature_points", points)
    rows = con.execute(
        f"""SELECT p.i, date_diff('day', min(e.time) FILTER (WHERE e.code = 'MEDS_BIRTH'), p.t) / 365.25,
                   max(CASE WHEN e.code = 'GENDER//F' THEN 1 ELSE 0 END),
                   {', '.join(f"count(e.code) FILTER (WHERE fs_kind(e.code) = '{k}' AND e.time <= p.t)"
                              for k in kinds)}
            FROM feature_points p LEFT JOIN events e ON e.subject_id = p.subject_id
            GROUP BY p.i, p.t ORDER BY p.i""").fetchall()
    x = np.array([[np.nan if v is None else float(v) for v in row[1:]] for row in rows], dtype=float)
    if len(x):
        col_mean = np.nanmean(np.where(np.isnan(x), np.nan, x), axis=0)
        x = np.where(np.isnan(x), np.nan_to_num(col_mean), x)
        x[:, 2:] = np.log1p(x[:, 2:])
    return x



EARLY_STOPPING_MIN_CASES = 10  # fewer cases of the rarer class: no stratified validation split is possible


def gradient_boosting(seed: int = 0, minority_cases: int | None = None) -> Any:
    """The gradient-boosted baseline as an analyst would set it up on a few thousand rows: scikit-learn's
    HistGradientBoostingClassifier, shallow trees, a small learning rate and early stopping on a seeded 20%
    validation split (without it, boosting's defaults overfit a rare outcome), seeded so reruns agree.

    With fewer than :data:`EARLY_STOPPING_MIN_CASES` cases of the rarer class (``minority_cases``) the stratified
    split cannot be drawn (scikit-learn raises on a class with one member), so a short fixed number of rounds
    replaces early stopping.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    early = minority_cases is None or minority_cases >= EARLY_STOPPING_MIN_CASES
    return HistGradientBoostingClassifier(learning_rate=0.05, max_iter=300 if early else 50, max_leaf_nodes=15,
                                          min_samples_leaf=20, l2_regularization=1.0, early_stopping=early,
                                          validation_fraction=0.2, n_iter_no_change=20, random_state=seed)


def baseline_predictions(con: Any, task: EvalTask, points: Sequence[PredictionPoint],
                         train_points: Sequence[PredictionPoint], seed: int = 0) -> dict[str, np.ndarray]:
    """Risks at ``points`` from baselines fitted on ``train_points``: ``prevalence``, and on the same count
    features ``logistic_counts`` (logistic regression) and ``gbm_counts`` (:func:`gradient_boosting`).

    Empty without train points; no fitted baseline when the train labels are all one class.
    """
    from sklearn.linear_model import LogisticRegression

    preds: dict[str, np.ndarray] = {}
    if not train_points:
        return preds
    kinds = list(COUNT_KINDS)
    y_train = observed_labels(con, task, train_points)
    prevalence = float(y_train.mean())
    preds["prevalence"] = np.full(len(points), prevalence)
    if len(set(y_train.tolist())) == 2:
        x_train, x = count_features(con, train_points, kinds), count_features(con, points, kinds)
        preds["logistic_counts"] = LogisticRegression(max_iter=1000).fit(x_train, y_train).predict_proba(x)[:, 1]
        minority = int(min(y_train.sum(), len(y_train) - y_train.sum()))
        preds["gbm_counts"] = gradient_boosting(seed, minority).fit(x_train, y_train).predict_proba(x)[:, 1]
    return preds
