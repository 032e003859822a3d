"""Population rates: expected weekly events for a cohort, with 50% and 90% intervals over sampled futures.

- :func:`population_rates` — expected events (e.g. admissions) per week for a cohort's timelines, with 50% and
  90% intervals from the per-sample weekly counts.
- :func:`forecast_cohort` — the whole sequence the CLI, the pipeline, the flow and the server run: select the
  cohort alive at ``as_of`` from the warehouse, encode it (:func:`select_cohort`), sample its futures, count
  weekly rates (:func:`population_rates`). The server runs the two halves on different threads (the warehouse
  half with the other lookups, the sampling half on its own worker, stoppable through ``should_stop``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from foresight.forecast.cohorts import cohort_as_of, subsample, weekly_history, with_codes
from foresight.forecast.forecaster import Forecaster
from foresight.forecast.timeline import DAY, Timeline


@dataclass
class PopulationForecast:
    """Weekly expected counts for a cohort, with intervals over Monte Carlo samples."""

    as_of: str
    horizon_days: float
    codes: tuple[str, ...]
    cohort_size: int
    samples: int
    weeks: list[dict[str, Any]]  # week_start, mean, p05, p25, p50, p75, p95
    history: list[dict[str, Any]] = field(default_factory=list)  # week_start, observed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def weekly_counts(futures: Sequence[Sequence[Sequence[dict[str, Any]]]], as_of: datetime, horizon_days: float,
                  codes: Sequence[str]) -> np.ndarray:
    """(samples, weeks) matching-event counts summed over the cohort."""
    n_weeks = math.ceil(horizon_days / 7)
    n = len(futures[0]) if futures else 0
    counts = np.zeros((n, n_weeks), dtype=np.int64)
    for subject in futures:
        for j, fut in enumerate(subject):
            for e in fut:
                if any(fnmatch.fnmatchcase(e["code"], p) for p in codes):
                    w = int((e["time"] - as_of).total_seconds() // (7 * DAY))
                    if 0 <= w < n_weeks:
                        counts[j, w] += 1
    return counts


def population_rates(forecaster: Forecaster, timelines: Sequence[Timeline], as_of: datetime, horizon_days: float,
                     *, samples: int = 20, codes: Sequence[str] = ("ADMIT//*",), seed: int = 0,
                     history: Sequence[tuple[datetime, int]] = (),
                     should_stop: Callable[[], bool] | None = None) -> PopulationForecast:
    """Expected weekly counts of ``codes`` events in the cohort over the horizon, with 50%/90% intervals.

    ``should_stop``: see :meth:`~foresight.forecast.FutureSampler.sample_futures` (raises
    :class:`~foresight.forecast.sampling.SamplingCancelled` when it answers True).
    """
    futures = forecaster.sample_futures(timelines, samples, horizon_days, seed=seed, should_stop=should_stop)
    counts = weekly_counts(futures, as_of, horizon_days, codes)
    weeks = []
    for w in range(counts.shape[1]):
        c = counts[:, w]
        q = np.percentile(c, [5, 25, 50, 75, 95]) if len(c) else [0] * 5
        weeks.append({"week_start": (as_of + timedelta(days=7 * w)).date().isoformat(), "mean": float(c.mean()),
                      "p05": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]),
                      "p95": float(q[4])})
    return PopulationForecast(as_of.date().isoformat(), horizon_days, tuple(codes), len(timelines), samples, weeks,
                              [{"week_start": d.date().isoformat(), "observed": int(n)} for d, n in history])


def plot_population(forecast: PopulationForecast, path: str | Path, title: str | None = None) -> Path:
    """PNG: observed weekly history, forecast mean, 50% and 90% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    if forecast.history:
        hx = [datetime.fromisoformat(h["week_start"]) for h in forecast.history]
        ax.plot(hx, [h["observed"] for h in forecast.history], color="black", lw=1.2, label="observed")
    fx = [datetime.fromisoformat(w["week_start"]) for w in forecast.weeks]
    ax.fill_between(fx, [w["p05"] for w in forecast.weeks], [w["p95"] for w in forecast.weeks], alpha=0.2,
                    color="tab:blue", label="90% interval")
    ax.fill_between(fx, [w["p25"] for w in forecast.weeks], [w["p75"] for w in forecast.weeks], alpha=0.35,
                    color="tab:blue", label="50% interval")
    ax.plot(fx, [w["mean"] for w in forecast.weeks], color="tab:blue", lw=1.5, label="forecast (mean)")
    ax.axvline(datetime.fromisoformat(forecast.as_of), color="grey", ls="--", lw=1)
    ax.set_ylabel(f"{', '.join(forecast.codes)} per week")
    ax.set_title(title or f"Weekly forecast for {forecast.cohort_size:,} subjects as of {forecast.as_of}")
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class CohortForecast:
    """What :func:`forecast_cohort` found and forecast."""

    cohort_size: int  # subjects in the cohort at as_of (after cohort_codes, before the max_subjects subset)
    subject_ids: list[int]  # the subjects forecast for: the cohort, or its seeded random subset
    # None when the cohort is smaller than min_size (nothing was encoded or sampled) or nobody in it is alive
    forecast: PopulationForecast | None

    @property
    def subsampled(self) -> bool:
        """Whether the forecast is for a random subset of the cohort (``max_subjects``)."""
        return len(self.subject_ids) < self.cohort_size


def _quiet(message: str) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


@dataclass
class CohortInputs:
    """The warehouse half of a cohort forecast: who is in the cohort, and the prompts to sample from."""

    cohort_size: int  # subjects in the cohort at as_of (after cohort_codes, before the max_subjects subset)
    cohort_ids: list[int]  # the whole cohort
    subject_ids: list[int]  # the subjects forecast for: the cohort, or its seeded random subset
    timelines: list[Timeline] = field(default_factory=list)  # their prompts, the dead left out; [] when too small
    history: list[tuple[datetime, int]] = field(default_factory=list)  # observed weekly counts before as_of


def select_cohort(forecaster: Forecaster, con: Any, as_of: datetime, *, codes: Sequence[str] = ("ADMIT//*",),
                  split: str | None = None, cohort_codes: Sequence[str] | None = None,
                  max_subjects: int | None = None, history_weeks: int = 52, seed: int = 0, min_size: int = 1,
                  status: Callable[[str], contextlib.AbstractContextManager[Any]] = _quiet) -> CohortInputs:
    """The cohort alive at ``as_of`` and its prompts (see :func:`forecast_cohort`); nothing is encoded when it
    is smaller than ``min_size``."""
    cohort = cohort_as_of(con, as_of, split=split)
    if cohort_codes:
        cohort = with_codes(con, cohort, as_of, cohort_codes)
    size = len(cohort)
    if size < max(min_size, 1):
        return CohortInputs(size, cohort, cohort)
    ids = subsample(cohort, max_subjects, seed)
    with status(f"encoding {len(ids):,} timelines"):
        timelines = [t for t in forecaster.timelines_from_warehouse(con, ids, as_of) if not t.dead]
    if not timelines:
        return CohortInputs(size, cohort, ids)
    history = weekly_history(con, ids, as_of, history_weeks, codes) if history_weeks else []
    return CohortInputs(size, cohort, ids, timelines, history)


def forecast_cohort(forecaster: Forecaster, con: Any, as_of: datetime, horizon_days: float, *, samples: int = 20,
                    codes: Sequence[str] = ("ADMIT//*",), split: str | None = None,
                    cohort_codes: Sequence[str] | None = None, max_subjects: int | None = None,
                    history_weeks: int = 52, seed: int = 0, min_size: int = 1,
                    status: Callable[[str], contextlib.AbstractContextManager[Any]] = _quiet,
                    should_stop: Callable[[], bool] | None = None) -> CohortForecast:
    """Weekly ``codes`` events expected over ``horizon_days`` for the cohort alive at ``as_of``.

    The cohort is :func:`~foresight.forecast.cohorts.cohort_as_of` (in ``split``), narrowed to subjects with one
    of ``cohort_codes`` on or before ``as_of``. Smaller than ``min_size``: nothing is encoded or sampled (the
    server's suppression threshold). Larger than ``max_subjects``: a random subset drawn with ``seed``. The
    timelines are cut at ``as_of`` (the dead are left out), ``samples`` futures each, with ``history_weeks``
    observed weeks before ``as_of``. ``con``: an open warehouse connection (the caller's, so the server's
    opt-out views apply). ``status(message)``: a context manager wrapped around the two slow steps (a spinner).
    ``should_stop``: asked between sampling steps; True stops the work (``SamplingCancelled``).
    """
    inputs = select_cohort(forecaster, con, as_of, codes=codes, split=split, cohort_codes=cohort_codes,
                           max_subjects=max_subjects, history_weeks=history_weeks, seed=seed, min_size=min_size,
                           status=status)
    if not inputs.timelines:
        return CohortForecast(inputs.cohort_size, inputs.subject_ids, None)
    with status(f"sampling {samples} futures for {len(inputs.timelines):,} subjects"):
        result = population_rates(forecaster, inputs.timelines, as_of, horizon_days, samples=samples, codes=codes,
                                  seed=seed, history=inputs.history, should_stop=should_stop)
    return CohortForecast(inputs.cohort_size, inputs.subject_ids, result)
