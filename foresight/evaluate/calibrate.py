"""Recalibration of the model's risks, fitted on the TUNING split and applied to held-out points.

The model's Monte Carlo risks rank well but can sit off the diagonal (a tiny model trained briefly over- or
under-states rare outcomes). A recalibrator fitted on tuning prediction points — never on the points it is scored
on — corrects that without touching the ranking much:

- ``platt`` (default): Platt scaling on the logit, ``p' = sigmoid(a * logit(p) + b)``, scikit-learn's
  ``LogisticRegression`` fitted on one feature. Two parameters: stable with a few dozen positives, monotone, so
  the AUROC is unchanged.
- ``isotonic``: scikit-learn's ``IsotonicRegression`` (clipped outside the fitted range). More flexible, needs
  hundreds of positives, and its steps can tie risks (the AUROC can move a little).

A calibrator is only fitted when the tuning points hold both outcomes and at least ``min_positives`` positives
and negatives, and (Platt) only when its slope is positive — a map that reverses the model's ranking on the tuning
points is noise, not calibration; otherwise :func:`fit_calibrator` says why and the model is reported
uncalibrated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

METHODS = ("platt", "isotonic")
_EPS = 1e-6  # keeps logit(p) finite for risks of exactly 0 or 1 (a model that never saw the outcome)


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=float), _EPS, 1 - _EPS)
    return np.log(q / (1 - q))


@dataclass
class Calibrator:
    """A fitted recalibration map from the model's risk to a calibrated risk."""

    method: str
    fitted: Any  # the scikit-learn estimator
    points: int
    positives: int

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Calibrated risks for ``p``; NaN (a subject not at risk) stays NaN."""
        p = np.asarray(p, dtype=float)
        out = np.full_like(p, np.nan)
        ok = np.isfinite(p)
        if ok.any():
            if self.method == "platt":
                out[ok] = self.fitted.predict_proba(_logit(p[ok]).reshape(-1, 1))[:, 1]
            else:
                out[ok] = self.fitted.predict(p[ok])
        return out

    def to_json(self) -> dict[str, Any]:
        """What was fitted, on how many tuning points: enough to check it was not fitted on held-out labels."""
        params: dict[str, Any]
        if self.method == "platt":
            params = {"slope": float(self.fitted.coef_[0][0]), "intercept": float(self.fitted.intercept_[0])}
        else:
            params = {"knots": len(self.fitted.X_thresholds_)}
        return {"method": self.method, "fitted_on": "tuning", "points": self.points, "positives": self.positives,
                **params}


def fit_calibrator(p: np.ndarray, y: np.ndarray, method: str = "platt",
                   min_positives: int = 5) -> tuple[Calibrator | None, str | None]:
    """Fit a recalibrator of the model's risks ``p`` to outcomes ``y`` (tuning points only).

    Returns ``(calibrator, None)``, or ``(None, reason)`` when the points cannot support one (too few positives
    or negatives, or no finite risks). Raises ``ValueError`` on an unknown method.
    """
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}: use one of {', '.join(METHODS)}")
    p, y = np.asarray(p, dtype=float), np.asarray(y, dtype=int)
    ok = np.isfinite(p)
    p, y = p[ok], y[ok]
    pos = int(y.sum())
    if min(pos, len(y) - pos) < min_positives:
        return None, (f"not calibrated: {pos} positive and {len(y) - pos} negative tuning points "
                      f"(needs {min_positives} of each)")
    if method == "platt":
        # a very weak penalty: two parameters on hundreds of points need no shrinkage, but separable data must
        # still give a finite slope
        fitted = LogisticRegression(C=1e4).fit(_logit(p).reshape(-1, 1), y)
        if fitted.coef_[0][0] <= 0:  # a map that reverses the ranking would turn noise into a worse model
            return None, (f"not calibrated: the model's risks do not rank the tuning outcomes (Platt slope "
                          f"{fitted.coef_[0][0]:.3f} <= 0 on {len(y)} points, {pos} positive)")
    else:
        fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
    return Calibrator(method, fitted, points=len(y), positives=pos), None
