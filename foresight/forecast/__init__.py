"""Forecasts from a trained timeline model: next events, Monte Carlo futures, zero-shot risks, population rates.

Where things live (each module imports only the ones before it):

- :mod:`~foresight.forecast.timeline` — :class:`Timeline`, the prompt every forecast starts from.
- :mod:`~foresight.forecast.tasks` — :class:`TaskSpec` (a zero-shot task as data), the built-in tasks, risks
  from sampled futures with a Wilson interval, and the time head's closed-form risk.
- :mod:`~foresight.forecast.sampling` — :class:`FutureSampler`: KV-cached, batched Monte Carlo futures and
  Rao-Blackwellised task risks.
- :mod:`~foresight.forecast.forecaster` — :class:`Forecaster`: loading a model directory, encoding prompts, the
  next-event distribution, leave-one-event-out explanations, the time head's view.
- :mod:`~foresight.forecast.risks` — :func:`risk_with_interval`: a task's risk for one timeline with its 95%
  interval, as ``foresight predict`` and the server report it.
- :mod:`~foresight.forecast.cohorts` — cohorts and their observed weekly history from the warehouse.
- :mod:`~foresight.forecast.population` — weekly population rates with 50%/90% bands, and
  :func:`forecast_cohort`, the cohort forecast sequence every front end runs.
"""

from foresight.forecast.cohorts import (
    cohort_as_of,
    like_patterns,
    subsample,
    weekly_history,
    weekly_history_events,
    with_codes,
)
from foresight.forecast.forecaster import EventDistribution, Explanation, Forecaster, NextEvents
from foresight.forecast.population import (
    CohortForecast,
    CohortInputs,
    PopulationForecast,
    forecast_cohort,
    plot_population,
    population_rates,
    select_cohort,
    weekly_counts,
)
from foresight.forecast.risks import (
    RB_INTERVAL,
    WILSON_INTERVAL,
    RiskEstimate,
    risk_with_interval,
    risks_with_intervals,
)
from foresight.forecast.sampling import FutureSampler, SamplingCancelled
from foresight.forecast.tasks import BUILTIN_TASKS, Risk, TaskSpec, load_task, risk_from_futures, time_head_risk, wilson
from foresight.forecast.timeline import DAY, Timeline

__all__ = [
    "BUILTIN_TASKS",
    "DAY",
    "RB_INTERVAL",
    "WILSON_INTERVAL",
    "CohortForecast",
    "CohortInputs",
    "EventDistribution",
    "Explanation",
    "Forecaster",
    "FutureSampler",
    "NextEvents",
    "PopulationForecast",
    "Risk",
    "RiskEstimate",
    "SamplingCancelled",
    "TaskSpec",
    "Timeline",
    "cohort_as_of",
    "forecast_cohort",
    "like_patterns",
    "load_task",
    "plot_population",
    "population_rates",
    "risk_from_futures",
    "risk_with_interval",
    "risks_with_intervals",
    "select_cohort",
    "subsample",
    "time_head_risk",
    "weekly_counts",
    "weekly_history",
    "weekly_history_events",
    "wilson",
    "with_codes",
]
