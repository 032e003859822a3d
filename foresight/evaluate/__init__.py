"""Evaluation: strict next-event accuracy, risk metrics with patient-bootstrap CIs, baselines, backtests.

Metrics are scikit-learn's (AUROC, AUPRC, Brier, calibration curve); this module only decides *what* is
compared:

- **Next-event accuracy, strictly**: at every held-out position whose true next token is an event code, is
  that code among the model's top-k over the WHOLE vocabulary (time, value and marker tokens compete too)?
  Reported overall, for new vs recurrent codes (first occurrence in the subject's timeline or not) and by
  kind. Baselines on the same positions: the k most frequent train codes, and a first-order Markov chain on
  codes (next code given the previous code, fitted on train).
- **Risk tasks**: labels from what really happened in the warehouse after each prediction time; predictions
  from Monte Carlo futures. Prediction points: each held-out discharge (30-day tasks: readmission framing) or
  everyone alive at an as-of date, and each held-out admission (outcomes of that stay: in-hospital mortality,
  ICU before discharge, length of stay over 7 days; :data:`ADMISSION_TASKS`). Baselines in the same run:
  prevalence, and a logistic regression and a gradient-boosted model on the same count features (age, sex,
  counts of prior codes per kind) fitted on train prediction points. 95% CIs resample subjects (a patient-level
  bootstrap), so several prediction points of one patient move together; each comparison (model minus a
  baseline, model minus the oracle) is also a PAIRED difference on the same points and the same resamples.
- **Backtests of rates**: cut at an as-of date, forecast weekly counts, compare with the observed weeks
  (MAPE and interval coverage).

Modules: :mod:`~foresight.evaluate.metrics` (risk metrics, patient bootstrap, paired differences, calibration,
rate backtests), :mod:`~foresight.evaluate.next_event` (strict top-k with its baselines),
:mod:`~foresight.evaluate.tasks` (the tasks, their aliases and where each is scored),
:mod:`~foresight.evaluate.points` (prediction points and labels from the warehouse),
:mod:`~foresight.evaluate.baselines` (prevalence; logistic regression and gradient boosting on count features),
:mod:`~foresight.evaluate.risks` (one task scored), :mod:`~foresight.evaluate.calibrate` (recalibration fitted on
tuning points), :mod:`~foresight.evaluate.locate` (which warehouse a token
folder came from) and :mod:`~foresight.evaluate.report` (the whole report).
"""

from __future__ import annotations

from foresight.evaluate.aces import AcesConfigError, aces_labels, evaluate_aces_task, load_task_config, readout_spec
from foresight.evaluate.baselines import COUNT_KINDS, baseline_predictions, count_features, gradient_boosting
from foresight.evaluate.calibrate import Calibrator, fit_calibrator
from foresight.evaluate.locate import locate_warehouse, warehouse_fingerprint
from foresight.evaluate.metrics import (
    backtest_rates,
    bootstrap_ci,
    calibration_table,
    expected_calibration_error,
    paired_difference,
    patient_resamples,
    percentile_interval,
    risk_metrics,
)
from foresight.evaluate.next_event import NextEventReport, next_event_accuracy
from foresight.evaluate.points import (
    PredictionPoint,
    observed_labels,
    points_of_kind,
    points_table,
    prediction_points,
)
from foresight.evaluate.report import RiskScoring, evaluate_model, plot_calibration, skipped_notes
from foresight.evaluate.risks import PAIRED_AGAINST, calibrated_risks, evaluate_task, paired_block, score_predictor
from foresight.evaluate.tasks import (
    ADMISSION_ALIASES,
    ADMISSION_TASKS,
    DEFAULT_DISCHARGE_TASKS,
    EVAL_POINTS,
    STAY_END,
    ComplementTask,
    EvalTask,
    LabelledTask,
    plan_tasks,
    point_kinds,
    resolve_tasks,
    task_spec,
)

__all__ = [
    "ADMISSION_ALIASES", "ADMISSION_TASKS", "COUNT_KINDS", "DEFAULT_DISCHARGE_TASKS", "EVAL_POINTS", "PAIRED_AGAINST",
    "STAY_END", "AcesConfigError", "Calibrator", "ComplementTask", "EvalTask", "LabelledTask", "NextEventReport",
    "PredictionPoint", "RiskScoring", "aces_labels", "backtest_rates", "baseline_predictions", "bootstrap_ci",
    "calibrated_risks", "calibration_table", "count_features", "evaluate_aces_task", "evaluate_model", "evaluate_task",
    "expected_calibration_error", "fit_calibrator", "gradient_boosting", "load_task_config", "locate_warehouse",
    "next_event_accuracy", "observed_labels", "paired_block", "paired_difference", "patient_resamples",
    "percentile_interval", "plan_tasks", "plot_calibration", "point_kinds", "points_of_kind", "points_table",
    "prediction_points", "readout_spec", "resolve_tasks", "risk_metrics", "score_predictor", "skipped_notes",
    "task_spec", "warehouse_fingerprint",
]
