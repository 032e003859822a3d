"""A task's risk for one timeline with its 95% interval: the one answer `foresight predict` and the server give.

Binary tasks use Rao-Blackwellised futures (:meth:`Forecaster.task_risks`, the estimator ``foresight evaluate``
scores): each path carries the probability that the task fires, so the mean has a small Monte Carlo error and a
normal interval. Time tasks (days until the first match) count over plain sampled futures, with a Wilson interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from foresight.forecast.forecaster import Forecaster
from foresight.forecast.tasks import TaskSpec, risk_from_futures
from foresight.forecast.timeline import Timeline

RB_INTERVAL = "95% Monte Carlo interval (mean +- 1.96 SE over Rao-Blackwellised futures)"
WILSON_INTERVAL = "95% Wilson interval over the share of sampled futures where the task fired"


@dataclass
class RiskEstimate:
    """One task's risk for one timeline, with its interval and how that was computed."""

    task: str
    probability: float
    low: float
    high: float
    samples: int
    interval: str  # RB_INTERVAL or WILSON_INTERVAL
    value: str = "binary"  # the task's value: "binary" or "time"
    mean_value: float | None = None  # time tasks: mean days among futures where it happened
    time_head_risk: float | None = None  # the closed form (None where it does not apply), when asked for
    time_head: bool = False  # whether the time head's closed form was asked for
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``foresight predict``: task, probability, low, high, samples, plus mean_value for a
        time task and time_head_risk when the time head was asked for."""
        out: dict[str, Any] = {"task": self.task, "probability": self.probability, "low": self.low,
                               "high": self.high, "samples": self.samples}
        if self.value != "binary":
            out["mean_value"] = self.mean_value
        if self.time_head:
            out["time_head_risk"] = self.time_head_risk
        return out


def _rao_blackwell(forecaster: Forecaster, timeline: Timeline, task: TaskSpec, samples: int,
                   seed: int) -> RiskEstimate:
    risk, se = forecaster.task_risks([timeline], task, samples, seed=seed)
    p, err = float(risk[0]), float(se[0])
    if not math.isfinite(err):  # one path has no spread to measure
        return RiskEstimate(task.name, p, 0.0, 1.0, samples, RB_INTERVAL,
                            warnings=["one future gives no interval: ask for more samples"])
    return RiskEstimate(task.name, p, max(0.0, p - 1.96 * err), min(1.0, p + 1.96 * err), samples, RB_INTERVAL)


def risks_with_intervals(forecaster: Forecaster, timeline: Timeline, tasks: Sequence[TaskSpec], samples: int, *,
                         seed: int = 0, time_head: bool = False) -> list[RiskEstimate]:
    """Each task's risk for ``timeline`` from ``samples`` futures, with a 95% interval, in the order given.

    Binary tasks: mean +- 1.96 SE of Rao-Blackwellised paths, clipped to [0, 1] ((0, 1) and a warning when one
    path gives no SE). Time tasks share one set of plain futures, sampled over the longest of their windows.
    ``time_head``: add the time head's closed form where the model has the head.
    """
    timed = [t for t in tasks if t.value != "binary"]
    futures = forecaster.sample_futures([timeline], samples, max(t.window_days for t in timed), seed=seed)[0] \
        if timed else []
    out = []
    for task in tasks:
        if task.value == "binary":
            est = _rao_blackwell(forecaster, timeline, task, samples, seed)
        else:
            r = risk_from_futures(task, futures, timeline.as_of)
            est = RiskEstimate(r.task, r.probability, r.low, r.high, r.samples, WILSON_INTERVAL, task.value,
                               r.mean_value)
        if time_head and forecaster.has_time_head:
            th = forecaster.time_head_risks([timeline], task)
            est.time_head, est.time_head_risk = True, None if th is None else float(th[0])
        out.append(est)
    return out


def risk_with_interval(forecaster: Forecaster, timeline: Timeline, task: TaskSpec, samples: int, *, seed: int = 0,
                       time_head: bool = False) -> RiskEstimate:
    """One task's risk with its 95% interval (see :func:`risks_with_intervals`)."""
    return risks_with_intervals(forecaster, timeline, [task], samples, seed=seed, time_head=time_head)[0]
