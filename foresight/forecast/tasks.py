"""Zero-shot tasks as data, and their risks: from sampled futures (Wilson interval) or the time head's closed form.

- :class:`TaskSpec` — a zero-shot task: a code predicate (glob patterns) and a window after the prediction time,
  optionally stopped by another predicate (e.g. in-hospital = before ``DISCHARGE//*``). The risk is the share of
  futures in which the predicate fires, with a Wilson interval (:func:`risk_from_futures`).
- :func:`time_head_risk` — the time head's closed form for the tasks it can answer (see
  :attr:`TaskSpec.time_head_applicable`): ``1 - exp(-D * sum_{v in task} lambda_v)`` from one forward pass.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foresight.forecast.timeline import DAY


@dataclass(frozen=True)
class TaskSpec:
    """A zero-shot task: does an event matching ``codes`` happen within ``window_days`` of the prediction time?

    ``codes`` are glob patterns over Foresight codes/tokens (``ADMIT//*``, ``ICU//ADMIT``, ``MEDS_DEATH``).
    ``stop_codes`` end the window early (``DISCHARGE//*`` for in-hospital outcomes). ``value`` = "time" makes a
    numeric task: days until the first match (e.g. length of stay with ``codes=DISCHARGE//*``).
    """

    name: str
    codes: tuple[str, ...]
    window_days: float
    stop_codes: tuple[str, ...] = ()
    value: str = "binary"  # or "time"
    description: str = ""

    @property
    def time_head_applicable(self) -> bool:
        """Whether the time head's closed form answers this task (:meth:`Forecaster.time_head_risks`).

        It answers "does an event from a set of codes happen within D days from the prediction time": a binary
        task without stop codes. Built-ins: admission, emergency admission, readmission (the prediction time is
        the discharge, which is where the prompt ends), mortality and ICU admission within 30 days. Not
        in-hospital mortality (its window ends at a discharge that has not happened yet, a random time the
        frozen rates cannot place) nor length of stay (a number of days, not a probability).
        """
        return self.value == "binary" and not self.stop_codes

    def matches(self, code: str, patterns: Sequence[str] | None = None) -> bool:
        return any(fnmatch.fnmatchcase(code, p) for p in (patterns or self.codes))

    def label(self, future: Sequence[dict[str, Any]], start: datetime) -> float | None:
        """1.0/0.0 (binary) or days to the first match (time; None when none) for one future."""
        end = start + timedelta(days=self.window_days)
        for e in future:
            t = e.get("time")
            if t is None or t < start:
                continue
            if t > end:
                break
            if self.matches(e["code"]):
                return (t - start).total_seconds() / DAY if self.value == "time" else 1.0
            if self.stop_codes and self.matches(e["code"], self.stop_codes):
                break
        return None if self.value == "time" else 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        d = dict(d)
        d["codes"] = tuple(d["codes"] if isinstance(d["codes"], list | tuple) else [d["codes"]])
        d["stop_codes"] = tuple(d.get("stop_codes", ()))
        return cls(**d)


BUILTIN_TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("admission_30d", ("ADMIT//*",), 30, description="any hospital admission within 30 days"),
    TaskSpec("emergency_admission_30d", ("ADMIT//EMERGENCY",), 30,
             description="emergency admission within 30 days"),
    TaskSpec("readmission_30d", ("ADMIT//*",), 30,
             description="readmission within 30 days (predict at discharge)"),
    TaskSpec("mortality_30d", ("MEDS_DEATH",), 30, description="death within 30 days"),
    # A death in hospital is recorded as DISCHARGE//DIED and MEDS_DEATH at one timestamp, and the discharge comes
    # first in token order: without DISCHARGE//DIED among the codes it would stop the window before the death.
    TaskSpec("in_hospital_mortality", ("MEDS_DEATH", "DISCHARGE//DIED"), 365, stop_codes=("DISCHARGE//*",),
             description="death before discharge (predict at admission)"),
    TaskSpec("icu_admission_30d", ("ICU//ADMIT",), 30, description="ICU admission within 30 days"),
    TaskSpec("icu_during_stay", ("ICU//ADMIT",), 365, stop_codes=("DISCHARGE//*",),
             description="ICU admission before discharge (predict at admission)"),
    TaskSpec("length_of_stay", ("DISCHARGE//*",), 365, value="time",
             description="days until discharge (predict at admission)"),
)}


def load_task(spec: str | Path | dict[str, Any]) -> TaskSpec:
    """A task by built-in name, from a JSON/YAML file, or from a dict."""
    if isinstance(spec, dict):
        return TaskSpec.from_dict(spec)
    if isinstance(spec, str) and spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec]
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"unknown task {spec!r}: not a built-in ({', '.join(BUILTIN_TASKS)}) nor a file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return TaskSpec.from_dict(yaml.safe_load(text))
    return TaskSpec.from_dict(json.loads(text))


@dataclass
class Risk:
    task: str
    probability: float
    low: float  # 95% Wilson interval over the Monte Carlo samples
    high: float
    samples: int
    mean_value: float | None = None  # time tasks: mean days among futures where it happened


def wilson(k: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (scipy's binomtest)."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    ci = binomtest(round(k), n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def risk_from_futures(task: TaskSpec, futures: Sequence[Sequence[dict[str, Any]]], start: datetime) -> Risk:
    """The risk of ``task`` from one timeline's futures (share of futures where it fires)."""
    labels = [task.label(f, start) for f in futures]
    if task.value == "time":
        hits = [x for x in labels if x is not None]
        k = len(hits)
        lo, hi = wilson(k, len(labels))
        return Risk(task.name, k / len(labels), lo, hi, len(labels), float(np.mean(hits)) if hits else None)
    k = float(sum(labels))
    lo, hi = wilson(k, len(labels))
    return Risk(task.name, k / len(labels), lo, hi, len(labels))


def time_head_risk(logits: torch.Tensor, event_bias: torch.Tensor, match: torch.Tensor,
                   window_days: float) -> np.ndarray:
    """The time head's risk per row: ``1 - exp(-D * sum_{v in task} lambda_v)``.

    ``logits`` (B, V) at each prompt's last position, ``event_bias`` (V,) from
    :func:`foresight.model.event_log_bias`, ``match`` (V,) the task's tokens, ``D = window_days``.
    ``lambda_v = exp(logit_v + bias_v)``: under competing exponential clocks this is the probability that a task
    code's clock rings within the window, with the rates frozen at the prediction time (Delphi-2M's closed form;
    events in between would change the rates, which only sampled futures follow). Exponential clocks are
    memoryless, so a window starting later than the last recorded event (``as_of``) has the same risk.
    """
    match = match & torch.isfinite(event_bias)
    if not bool(match.any()):  # no event token of the vocabulary matches: no clock that could ring
        return np.zeros(len(logits))
    log_rate = torch.logsumexp(logits[:, match].double() + event_bias[match].double(), -1)
    return (-torch.expm1(-window_days * torch.exp(log_rate))).numpy()
