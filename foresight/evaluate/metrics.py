"""Risk metrics (AUROC, AUPRC, Brier, ECE), patient-bootstrap CIs, paired differences, calibration tables and
rate backtests.

Metrics are scikit-learn's where it has them; this module only adds the patient-level bootstrap (several
prediction points of one patient move together: :func:`patient_resamples`, the one resampler), the paired
difference of two predictors on the same resamples, and the calibration error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """ECE with equal-width probability bins: sum over bins of (bin share) x |mean(y) - mean(p)|."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(ece)


def risk_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC, Brier and ECE (scikit-learn where it has them); NaN when a metric is undefined."""
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    both = len(set(y.tolist())) == 2
    return {
        "auroc": float(roc_auc_score(y, p)) if both else math.nan,
        "auprc": float(average_precision_score(y, p)) if both else math.nan,
        "brier": float(brier_score_loss(y, p, pos_label=1)) if len(y) else math.nan,
        "ece": expected_calibration_error(y, p),
        "prevalence": float(y.mean()) if len(y) else math.nan,
        "n": len(y),
    }


def patient_resamples(groups: np.ndarray, n_boot: int = 200, seed: int = 0) -> Iterator[np.ndarray]:
    """``n_boot`` bootstrap resamples as point indices: patients (``groups``) drawn with replacement, each drawn
    patient bringing all of its points — several points of one patient move together, never apart."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # points grouped by patient, in their original order
    members = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1])
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        yield np.concatenate([members[g] for g in pick])


def percentile_interval(draws: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap draws."""
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return float(np.percentile(draws, lo_q)), float(np.percentile(draws, hi_q))


def bootstrap_ci(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int = 200, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile CIs of every metric of :func:`risk_metrics`, resampling groups (patients) with replacement."""
    draws: dict[str, list[float]] = {}
    for idx in patient_resamples(groups, n_boot, seed):
        for k, v in risk_metrics(y[idx], p[idx]).items():
            if k != "n" and not math.isnan(v):
                draws.setdefault(k, []).append(v)
    return {k: percentile_interval(v, level) for k, v in draws.items()}


def paired_difference(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, groups: np.ndarray, n_boot: int = 200,
                      seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """AUROC and Brier of predictor a minus predictor b on the same points, with paired patient-bootstrap CIs.

    Paired: every resample of patients (:func:`patient_resamples`, the ones :func:`bootstrap_ci` draws for the
    same points and seed) scores both predictors on the same points, and the CI is the percentile interval of the
    per-resample differences — far narrower than comparing two separate CIs, since most of the sampling noise
    (which patients happened to be drawn) is shared. Scored on the points where both give a number; a
    difference that is undefined (one class only) is NaN with ``None`` as its CI. AUROC up is better, Brier down.
    """
    from sklearn.metrics import roc_auc_score

    y, p_a, p_b = np.asarray(y, dtype=int), np.asarray(p_a, dtype=float), np.asarray(p_b, dtype=float)
    ok = np.isfinite(p_a) & np.isfinite(p_b)
    y, p_a, p_b, groups = y[ok], p_a[ok], p_b[ok], np.asarray(groups)[ok]

    def diffs(idx: np.ndarray) -> tuple[float, float]:
        yy, a, b = y[idx], p_a[idx], p_b[idx]
        auc = roc_auc_score(yy, a) - roc_auc_score(yy, b) if len(set(yy.tolist())) == 2 else math.nan
        return float(auc), float(np.mean((a - yy) ** 2) - np.mean((b - yy) ** 2)) if len(yy) else math.nan

    auroc, brier = diffs(np.arange(len(y)))
    draws = [diffs(idx) for idx in patient_resamples(groups, n_boot, seed)] if len(y) else []
    ci = {}
    for j, name in enumerate(("auroc", "brier")):
        vals = [d[j] for d in draws if not math.isnan(d[j])]
        ci[name] = list(percentile_interval(vals, level)) if vals else None
    return {"auroc": auroc, "ci": ci["auroc"], "brier": brier, "brier_ci": ci["brier"], "points": len(y)}


def calibration_table(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Observed vs predicted per probability bin (scikit-learn's calibration_curve, uniform bins)."""
    from sklearn.calibration import calibration_curve

    if len(set(np.asarray(y).tolist())) < 2:
        return []
    frac, mean_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    return [{"predicted": float(a), "observed": float(b)} for a, b in zip(mean_pred, frac, strict=True)]



def backtest_rates(forecast_weeks: Sequence[dict[str, Any]], observed: Sequence[int]) -> dict[str, float]:
    """MAPE of the weekly mean vs observed counts, and how often the observed week fell in the 50%/90% bands."""
    f = np.array([w["mean"] for w in forecast_weeks], dtype=float)
    o = np.array(observed, dtype=float)[: len(f)]
    nz = o > 0
    mape = float(np.mean(np.abs(f[nz] - o[nz]) / o[nz])) if nz.any() else math.nan
    in50 = np.mean([(w["p25"] <= x <= w["p75"]) for w, x in zip(forecast_weeks, o, strict=False)])
    in90 = np.mean([(w["p05"] <= x <= w["p95"]) for w, x in zip(forecast_weeks, o, strict=False)])
    return {"mape": mape, "coverage50": float(in50), "coverage90": float(in90), "weeks": len(o),
            "forecast_total": float(f.sum()), "observed_total": float(o.sum())}

