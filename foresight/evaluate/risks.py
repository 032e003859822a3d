"""Risk tasks scored: the model's risk (Monte Carlo futures, and the time head's closed form) against the
observed outcome, beside the baselines and an optional oracle, with patient-bootstrap CIs, calibration, and the
paired differences model minus each baseline and minus the oracle."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import numpy as np

from foresight.evaluate.baselines import baseline_predictions
from foresight.evaluate.calibrate import fit_calibrator
from foresight.evaluate.metrics import bootstrap_ci, calibration_table, paired_difference, risk_metrics
from foresight.evaluate.points import PredictionPoint, observed_labels
from foresight.evaluate.tasks import EvalTask, task_spec
from foresight.forecast import Forecaster, Timeline
from foresight.warehouse import extract_end

# futures per prediction point: exits from the window are integrated (FutureSampler.integrate_exits), so 5 paths
# spread less than 20 sampled ones did, at about the same cost (~4x per path; bench/RESULTS.md, 2026-12-05 sixth
# session)
RISK_SAMPLES = 5


def evaluate_task(forecaster: Forecaster, con: Any, task: EvalTask, points: Sequence[PredictionPoint], *,
                  samples: int = RISK_SAMPLES, seed: int = 0, train_points: Sequence[PredictionPoint] = (),
                  oracle: Callable[[Sequence[PredictionPoint]], np.ndarray] | None = None,
                  n_boot: int = 200, tuning_points: Sequence[PredictionPoint] = (),
                  calibration: str = "platt") -> dict[str, Any]:
    """Model risk vs observed outcome for ``points``, with baselines (and the oracle when given).

    Each predictor is scored on the points where it gives a number: an oracle that cannot answer the task
    (all NaN) is reported as ``oracle_note`` instead of as metrics. With ``tuning_points`` (points of the tuning
    split, never of ``points``' subjects), the model's risks are also recalibrated by a map fitted on those
    points alone (:mod:`~foresight.evaluate.calibrate`) and scored as ``model_calibrated``; the fit is reported
    as ``calibrator`` (or why there is none as ``calibration_note``).
    """
    spec, flip = task_spec(task)
    timelines, p_model = _model_risks(forecaster, con, spec, flip, points, samples, seed)
    alive = ~np.isnan(p_model)  # a subject dead at the prediction time is at no risk of anything: not scored
    points = [p for p, a in zip(points, alive, strict=True) if a]
    p_model = p_model[alive]
    y = observed_labels(con, task, points)
    groups = np.array([pt.subject_id for pt in points])
    result: dict[str, Any] = {"task": task.name, "samples": samples, "points": len(points)}
    preds = {"model": p_model}
    if tuning_points:
        p_cal, fit = calibrated_risks(forecaster, con, task, tuning_points, p_model, samples=samples, seed=seed,
                                      method=calibration)
        if p_cal is not None:
            preds["model_calibrated"] = p_cal
            result["calibrator"] = fit
        else:
            result["calibration_note"] = fit
    # the time head's closed form (one forward pass per point) scored as one more predictor, when it applies
    p_head = forecaster.time_head_risks(timelines, spec)
    if p_head is not None:
        preds["model_time_head"] = (1.0 - p_head if flip else p_head)[alive]
    preds.update(baseline_predictions(con, task, points, train_points, seed=seed))
    if oracle is not None:
        p_oracle = np.asarray(oracle(points), dtype=float)
        if len(p_oracle) and np.isfinite(p_oracle).any():
            preds["oracle"] = p_oracle
        else:
            result["oracle_note"] = f"no oracle: the oracle gives no probability for {task.name}"
    for name, p in preds.items():
        result[name] = score_predictor(y, p, groups, n_boot=n_boot, seed=seed)
    result["paired"] = paired_block(y, preds, groups, n_boot=n_boot, seed=seed)
    result["observed_rate"] = float(y.mean()) if len(y) else math.nan
    result["_y"], result["_p"] = y.tolist(), {k: v.tolist() for k, v in preds.items()}
    result["_subjects"] = groups.tolist()  # the scored points' subjects (for pooling and patient bootstraps)
    return result


def _model_risks(forecaster: Forecaster, con: Any, spec: Any, flip: bool, points: Sequence[PredictionPoint],
                 samples: int, seed: int) -> tuple[list[Timeline], np.ndarray]:
    """The points' timelines and the model's risk at each (Rao-Blackwellised futures); NaN where dead."""
    timelines = _timelines_at(forecaster, con, points)
    # [END] in a sampled future means "no event before the warehouse's last record" (what it meant in training),
    # not a token to ban and renormalise away, which drew every gap too short (see FutureSampler.sample_futures)
    p, _ = forecaster.task_risks(timelines, spec, samples, seed=seed, extract_end=extract_end(con))
    return timelines, (1.0 - p if flip else p)  # NaN (dead) stays NaN


def calibrated_risks(forecaster: Forecaster, con: Any, task: EvalTask, tuning_points: Sequence[PredictionPoint],
                     p_model: np.ndarray, *, samples: int = RISK_SAMPLES, seed: int = 0,
                     method: str = "platt") -> tuple[np.ndarray | None, Any]:
    """``p_model`` recalibrated by a map fitted on the model's risks and the outcomes at ``tuning_points`` only.

    Returns ``(calibrated risks, the fit's description)`` or ``(None, why not)``. The held-out labels are never
    read here: only ``p_model`` (the model's held-out risks) is passed in, to be mapped.
    """
    spec, flip = task_spec(task)
    _, p_tune = _model_risks(forecaster, con, spec, flip, tuning_points, samples, seed)
    alive = ~np.isnan(p_tune)
    y_tune = observed_labels(con, task, [p for p, a in zip(tuning_points, alive, strict=True) if a])
    cal, why = fit_calibrator(p_tune[alive], y_tune, method=method)
    if cal is None:
        return None, why
    return cal.apply(p_model), cal.to_json()


def score_predictor(y: np.ndarray, p: np.ndarray, groups: np.ndarray, *, n_boot: int = 200,
                    seed: int = 0) -> dict[str, Any]:
    """Metrics, calibration table and patient-bootstrap 95% CIs of one predictor, on the points it answers."""
    ok = np.isfinite(p)
    yk, pk, gk = (y, p, groups) if ok.all() else (y[ok], p[ok], groups[ok])
    return {"metrics": risk_metrics(yk, pk), "calibration": calibration_table(yk, pk),
            "ci95": bootstrap_ci(yk, pk, gk, n_boot=n_boot, seed=seed) if len(yk) else {}}


# the comparisons of the paired block: the model against each baseline and against the oracle (its ceiling)
PAIRED_AGAINST = ("logistic_counts", "gbm_counts", "oracle")


def paired_block(y: np.ndarray, preds: dict[str, np.ndarray], groups: np.ndarray, *, n_boot: int = 200,
                 seed: int = 0) -> dict[str, dict[str, Any]]:
    """``{"model-NAME": paired difference}`` for each of :data:`PAIRED_AGAINST` that was scored: AUROC and Brier
    of the model minus NAME on the same points, with paired patient-bootstrap CIs
    (:func:`~foresight.evaluate.metrics.paired_difference`); ``"model_calibrated-NAME"`` likewise when the
    recalibrated model was scored."""
    return {f"{model}-{name}": paired_difference(y, preds[model], preds[name], groups, n_boot=n_boot, seed=seed)
            for model in ("model", "model_calibrated") if model in preds
            for name in PAIRED_AGAINST if name in preds}


def _timelines_at(forecaster: Forecaster, con: Any, points: Sequence[PredictionPoint]) -> list[Timeline]:
    """Each point's timeline up to its time: one warehouse read per distinct prediction time."""
    by_time: dict[datetime, list[int]] = {}
    for i, pt in enumerate(points):
        by_time.setdefault(pt.time, []).append(i)
    out: list[Timeline | None] = [None] * len(points)
    for t, idx in by_time.items():
        tls = {tl.subject_id: tl for tl in forecaster.timelines_from_warehouse(
            con, [points[i].subject_id for i in idx], t)}
        for i in idx:
            out[i] = tls[points[i].subject_id]
    return [t for t in out if t is not None]

