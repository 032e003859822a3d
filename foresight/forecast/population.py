"""Population rates: expected weekly events for a cohort, with 50% and 90% predictive intervals.

- :func:`population_rates` — expected events (e.g. admissions) per week for a cohort's timelines, with 50% and
  90% predictive intervals (Monte Carlo noise of the estimate and the outcome's own noise:
  :mod:`foresight.forecast.counts`), by stratum (admission type, age band) when asked.
- :func:`forecast_cohort` — the whole sequence the CLI, the pipeline, the flow and the server run: select the
  cohort alive at ``as_of`` from the warehouse, encode it (:func:`select_cohort`), sample its futures, count
  weekly rates (:func:`population_rates`), add the open-cohort inflow. The server runs the two halves on
  different threads (the warehouse half with the other lookups, the sampling half on its own worker, stoppable
  through ``should_stop``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from foresight.forecast.cohorts import (
    arrival_events,
    cohort_as_of,
    stratified_subsample,
    subsample,
    weekly_history,
    with_codes,
)
from foresight.forecast.counts import Inflow, Tallies, age_band, interval, strata_rows, summarise, week_rows
from foresight.forecast.forecaster import Forecaster
from foresight.forecast.timeline import DAY, Timeline
from foresight.warehouse import extract_end


@dataclass
class PopulationForecast:
    """Weekly expected counts for a cohort, with predictive intervals (see :mod:`foresight.forecast.counts`)."""

    as_of: str
    horizon_days: float
    codes: tuple[str, ...]
    cohort_size: int
    samples: int
    weeks: list[dict[str, Any]]  # week_start, mean, p05, p25, p50, p75, p95, se
    history: list[dict[str, Any]] = field(default_factory=list)  # week_start, observed
    method: str = "expected"  # expected (Rao-Blackwellised counts) or monte_carlo (counted in the futures)
    total: dict[str, float] = field(default_factory=dict)  # the whole horizon: mean, p05..p95
    strata: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # kind -> rows (counts.strata_rows)
    # the open-cohort term: rule, per-week mean, and the closed-cohort forecast without it; None when not added
    open_cohort: dict[str, Any] | None = None
    subjects_sampled: int | None = None  # people sampled when a weighted subset stands for the cohort

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


def event_groups(forecaster: Forecaster, codes: Sequence[str]) -> list[str]:
    """The event tokens matching ``codes``, each counted as its own group (the ``type`` strata)."""
    vocab = forecaster.vocab
    return [t for t, ev in zip(vocab.tokens, vocab.is_event, strict=True)
            if ev and any(fnmatch.fnmatchcase(t, p) for p in codes)]


def population_rates(forecaster: Forecaster, timelines: Sequence[Timeline], as_of: datetime, horizon_days: float,
                     *, samples: int = 20, codes: Sequence[str] = ("ADMIT//*",), seed: int = 0,
                     history: Sequence[tuple[datetime, int]] = (),
                     should_stop: Callable[[], bool] | None = None, method: str = "expected",
                     strata: Sequence[str] = (), extract_end: datetime | None = None,
                     weights: Sequence[float] | None = None, design: Sequence[int] | None = None,
                     design_sizes: dict[int, int] | None = None, inflow: Inflow | None = None,
                     represents: int | None = None) -> PopulationForecast:
    """Expected weekly counts of ``codes`` events in the cohort over the horizon, with 50%/90% predictive
    intervals, and per stratum (``strata``: ``type``, ``age``) when asked.

    ``method``: ``expected`` (Rao-Blackwellised counts, the default) or ``monte_carlo`` (events counted in the
    futures). ``extract_end``: where the records the model learned from end (``[END]`` is censoring there; see
    :meth:`~foresight.forecast.FutureSampler.sample_futures`). ``weights``/``design``/``design_sizes``: a
    stratified subset standing for ``represents`` people (:func:`~foresight.forecast.cohorts.stratified_subsample`).
    ``inflow``: the open-cohort term, added to every week and stratum. ``should_stop``: see
    :meth:`~foresight.forecast.FutureSampler.sample_futures` (raises
    :class:`~foresight.forecast.sampling.SamplingCancelled` when it answers True).
    """
    groups = event_groups(forecaster, codes)
    n_weeks = math.ceil(horizon_days / 7)
    if groups:
        realized, expected = forecaster.weekly_tallies(timelines, samples, horizon_days, [[g] for g in groups],
                                                       seed=seed, extract_end=extract_end, should_stop=should_stop)
    else:  # no token matches: nothing can happen
        realized = np.zeros((len(timelines), samples, n_weeks, 0), dtype=np.int32)
        expected = np.zeros(realized.shape, dtype=np.float32)
    ages = [age_band((as_of - t.birth).days / 365.25 if t.birth else None) for t in timelines]
    tallies = Tallies(realized, expected, groups, ages,
                      np.ones(len(timelines)) if weights is None else np.asarray(weights, dtype=float),
                      np.asarray(design if design is not None else [], dtype=np.int64), dict(design_sizes or {}))
    flow = inflow.weekly() if inflow is not None else None
    total = summarise(tallies, method, inflow=flow)
    closed = summarise(tallies, method) if inflow is not None else None
    open_cohort = None if inflow is None else {
        "rule": f"closed cohort + admissions of people not in the cohort {inflow.lag_days} days earlier, in the "
                "same weeks after that date, spread evenly",
        "inflow_per_week": float(flow[0][0]), "closed_total": interval(*closed.total),
        "closed_weeks": [w["mean"] for w in week_rows(as_of, closed)]}
    return PopulationForecast(
        as_of.date().isoformat(), horizon_days, tuple(codes), represents or len(timelines), samples,
        week_rows(as_of, total), [{"week_start": d.date().isoformat(), "observed": int(n)} for d, n in history],
        method, {**interval(*total.total), "se": total.total[1], "dispersion": total.total[2]},
        strata_rows(tallies, as_of, tuple(strata), method, inflow) if strata else {},
        open_cohort, len(timelines) if weights is not None else None)


def plot_population(forecast: PopulationForecast, path: str | Path, title: str | None = None,
                    oracle: Sequence[float] | None = None) -> Path:
    """PNG: observed weekly history, forecast mean, 50% and 90% bands (and the simulator oracle's expectation)."""
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
    if oracle is not None:
        ax.plot(fx, list(oracle)[: len(fx)], color="tab:red", lw=1.2, ls=":", label="oracle (expected)")
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
    extract_end: datetime | None = None  # the warehouse's last event ([END] is censoring there)
    # weighted=True: a stratified subset standing for the whole cohort (weight and sampling stratum per timeline)
    weights: list[float] | None = None
    design: list[int] | None = None
    design_sizes: dict[int, int] = field(default_factory=dict)


def select_cohort(forecaster: Forecaster, con: Any, as_of: datetime, *, codes: Sequence[str] = ("ADMIT//*",),
                  split: str | None = None, cohort_codes: Sequence[str] | None = None,
                  max_subjects: int | None = None, history_weeks: int = 52, seed: int = 0, min_size: int = 1,
                  status: Callable[[str], contextlib.AbstractContextManager[Any]] = _quiet,
                  weighted: bool = False, among: Sequence[int] | None = None) -> CohortInputs:
    """The cohort alive at ``as_of`` and its prompts (see :func:`forecast_cohort`); nothing is encoded when it
    is smaller than ``min_size``."""
    cohort = cohort_as_of(con, as_of, split=split)
    if among is not None:
        keep = {int(s) for s in among}
        cohort = [s for s in cohort if s in keep]
    if cohort_codes:
        cohort = with_codes(con, cohort, as_of, cohort_codes)
    size = len(cohort)
    if size < max(min_size, 1):
        return CohortInputs(size, cohort, cohort)
    weights: dict[int, float] | None = None
    if weighted and max_subjects is not None and size > max_subjects:
        ids, weights, strata, sizes = stratified_subsample(con, cohort, as_of, max_subjects, seed)
    else:
        ids = subsample(cohort, max_subjects, seed)
    with status(f"encoding {len(ids):,} timelines"):
        timelines = [t for t in forecaster.timelines_from_warehouse(con, ids, as_of) if not t.dead]
    if not timelines:
        return CohortInputs(size, cohort, ids)
    history = weekly_history(con, ids, as_of, history_weeks, codes) if history_weeks else []
    inputs = CohortInputs(size, cohort, ids, timelines, history, extract_end(con))
    if weights is not None:
        inputs.weights = [weights[int(t.subject_id)] for t in timelines]
        inputs.design = [strata[int(t.subject_id)] for t in timelines]
        inputs.design_sizes = sizes
        inputs.history = weekly_history(con, cohort, as_of, history_weeks, codes) if history_weeks else []
    return inputs


def forecast_cohort(forecaster: Forecaster, con: Any, as_of: datetime, horizon_days: float, *, samples: int = 20,
                    codes: Sequence[str] = ("ADMIT//*",), split: str | None = None,
                    cohort_codes: Sequence[str] | None = None, max_subjects: int | None = None,
                    history_weeks: int = 52, seed: int = 0, min_size: int = 1,
                    status: Callable[[str], contextlib.AbstractContextManager[Any]] = _quiet,
                    should_stop: Callable[[], bool] | None = None, method: str = "expected",
                    strata: Sequence[str] = (), open_cohort: bool = False,
                    weighted: bool = False, among: Sequence[int] | None = None) -> CohortForecast:
    """Weekly ``codes`` events expected over ``horizon_days`` for the cohort alive at ``as_of``.

    The cohort is :func:`~foresight.forecast.cohorts.cohort_as_of` (in ``split``), narrowed to subjects with one
    of ``cohort_codes`` on or before ``as_of``. Smaller than ``min_size``: nothing is encoded or sampled (the
    server's suppression threshold). Larger than ``max_subjects``: a random subset drawn with ``seed`` — the
    forecast is for that subset, or, with ``weighted``, a stratified subset weighted to stand for the whole
    cohort. The timelines are cut at ``as_of`` (the dead are left out), ``samples`` futures each, with
    ``history_weeks`` observed weeks before ``as_of``; ``[END]`` is read as censoring at the warehouse's last
    event. ``open_cohort``: add the inflow of people not in the cohort (:mod:`foresight.forecast.counts`).
    ``strata``: ``type`` and/or ``age``. ``among``: only these subjects (a cohort defined elsewhere).
    ``con``: an open warehouse connection (the caller's, so the server's
    opt-out views apply). ``status(message)``: a context manager wrapped around the two slow steps (a spinner).
    ``should_stop``: asked between sampling steps; True stops the work (``SamplingCancelled``).
    """
    inputs = select_cohort(forecaster, con, as_of, codes=codes, split=split, cohort_codes=cohort_codes,
                           max_subjects=max_subjects, history_weeks=history_weeks, seed=seed, min_size=min_size,
                           status=status, weighted=weighted, among=among)
    if not inputs.timelines:
        return CohortForecast(inputs.cohort_size, inputs.subject_ids, None)
    n_weeks = math.ceil(horizon_days / 7)
    inflow = None
    if open_cohort:
        events = arrival_events(con, as_of, n_weeks, codes, split=split)
        inflow = Inflow(events, n_weeks) if events is not None else None
    with status(f"sampling {samples} futures for {len(inputs.timelines):,} subjects"):
        result = population_rates(forecaster, inputs.timelines, as_of, horizon_days, samples=samples, codes=codes,
                                  seed=seed, history=inputs.history, should_stop=should_stop, method=method,
                                  strata=strata, extract_end=inputs.extract_end, weights=inputs.weights,
                                  design=inputs.design, design_sizes=inputs.design_sizes, inflow=inflow,
                                  represents=inputs.cohort_size if inputs.weights is not None else None)
    return CohortForecast(inputs.cohort_size, inputs.subject_ids, result)
