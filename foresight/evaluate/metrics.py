"""Risk metrics (AUROC, AUPRC, Brier, ECE), patient-bootstrap CIs, calibration tables and rate backtests.

Metrics are scikit-learn's where it has them; this module only adds the patient-level bootstrap (several
prediction points of one patient move together) and the calibration error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def bootstrap_ci(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int = 200, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile CIs of every metric of :func:`risk_metrics`, resampling groups (patients) with replacement."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[g] for g in pick])
        for k, v in risk_metrics(y[idx], p[idx]).items():
            if k != "n" and not math.isnan(v):
                draws.setdefault(k, []).append(v)
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q))) for k, v in draws.items()}


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

