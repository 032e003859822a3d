"""A cohort's weekly counts from its sampled futures: expected counts, predictive intervals, strata, open cohorts.

The sampler (:meth:`foresight.forecast.FutureSampler.weekly_tallies`) gives, per person, future and week, the
count of each event group (e.g. ``ADMIT//EMERGENCY``, ``ADMIT//ELECTIVE``) twice: *realized* (what the sampled
future holds) and *expected* (Rao-Blackwellised: the probability of such an event summed over the path's steps).
:func:`summarise` turns them into the cohort's expected count per week with its predictive interval
(:mod:`foresight.forecast.intervals`):

- the mean: the weighted sum over people of ``expected`` (method ``expected``, the default: same mean, far less
  Monte Carlo noise) or of ``realized`` (method ``monte_carlo``), averaged over futures;
- its standard error: the spread of the per-future totals over the square root of their number, plus, when the
  people are a weighted stratified subset (:func:`foresight.forecast.cohorts.stratified_subsample`), the
  subsampling variance ``sum_h N_h^2 (1 - n_h / N_h) s_h^2 / n_h``;
- the outcome's dispersion: the per-person variance of the realized counts across futures, summed (weighted)
  over people, over the expected count (1 = Poisson; readmissions make it larger).

**Open cohorts.** The forecast is for the people in the warehouse at ``as_of`` (alive, with an event in the three
years before). Admissions of people who are not — born later, moved in, back after three quiet years — are
added as an *inflow* term: the admissions of people who were not in the cohort one year earlier (364 days) in
the same weeks after that date (:func:`foresight.forecast.cohorts.arrival_events`), spread evenly over the
weeks, with Poisson noise in both its estimate and its outcome. The closed-cohort forecast is reported too.

**Strata.** ``type`` (the event group: EMERGENCY, ELECTIVE, ...) and ``age`` (band at ``as_of``; arrivals by
their age at the event): each stratum's numbers are computed the same way; their means sum to the total.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from foresight.forecast.intervals import predictive_quantiles
from foresight.suppression import SuppressionRule, suppress_count

AGE_BANDS = ((0, "0-17"), (18, "18-44"), (45, "45-64"), (65, "65-79"), (80, "80+"))
STRATA = ("type", "age")
METHODS = ("expected", "monte_carlo")
QUANTILE_KEYS = ("p05", "p25", "p50", "p75", "p95")


def age_band(age: float | None) -> str:
    """The age band label of an age in years (``unknown`` without one)."""
    if age is None or not np.isfinite(age):
        return "unknown"
    label = AGE_BANDS[0][1]
    for lo, name in AGE_BANDS:
        if age >= lo:
            label = name
    return label


def group_label(code: str) -> str:
    """The stratum name of an event group: the code's last part (``ADMIT//EMERGENCY`` -> ``EMERGENCY``)."""
    return code.rsplit("//", 1)[-1]


@dataclass
class Tallies:
    """Per person, future, week and event group: realized and expected counts, and who the people stand for."""

    realized: np.ndarray  # (P, S, W, K) int
    expected: np.ndarray  # (P, S, W, K) float
    groups: list[str]  # (K,) the event token of each group
    ages: list[str]  # (P,) age band at as_of
    weights: np.ndarray  # (P,) people each stands for (1 without subsampling)
    design: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (P,) sampling stratum
    design_sizes: dict[int, int] = field(default_factory=dict)  # people in each sampling stratum


@dataclass
class Inflow:
    """The open-cohort term: arrivals' expected events per week, from the same weeks a year earlier."""

    events: list[tuple[int, str, float | None]]  # (week, code, age) of last year's arrivals' events
    weeks: int
    lag_days: int = 364

    def weekly(self, group: str | None = None, age: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mean, standard error) per week for one stratum (or all): the year-earlier count spread evenly."""
        n = sum(1 for _, c, a in self.events
                if (group is None or c == group) and (age is None or age_band(a) == age))
        return np.full(self.weeks, n / self.weeks), np.full(self.weeks, np.sqrt(n) / self.weeks)


@dataclass
class Summary:
    """One cell's weekly forecast and its horizon total: mean, standard error and dispersion of each."""

    mean: np.ndarray  # (W,)
    se: np.ndarray
    dispersion: np.ndarray
    total: tuple[float, float, float]  # mean, se, dispersion over the whole horizon


def _sub_variance(t: Tallies, per_person: np.ndarray) -> np.ndarray:
    """Subsampling variance of a weighted total, from each person's mean over futures (``per_person``: (P, ...))."""
    out = np.zeros(per_person.shape[1:])
    for h, size in t.design_sizes.items():
        sel = t.design == h
        n = int(sel.sum())
        if n > 1 and size > n:
            out += size ** 2 * (1 - n / size) * per_person[sel].var(0, ddof=1) / n
    return out


def _moments(t: Tallies, x: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, se, outcome variance) of weighted totals; ``x`` the estimates and ``r`` the realized counts,
    both (P, S, ...)."""
    w = t.weights.reshape((-1,) + (1,) * (x.ndim - 1))
    per_future = (w * x).sum(0)  # (S, ...)
    s = x.shape[1]
    mean = per_future.mean(0)
    # one future gives no spread: bound its Monte Carlo variance by that of one realized future (about the
    # outcome's Poisson variance; a Rao-Blackwellised future varies less), so the band errs wide, never narrow
    var = per_future.var(0, ddof=1) / s if s > 1 else mean * float(t.weights.max(initial=1.0))
    if len(t.design):
        var = var + _sub_variance(t, x.mean(1))
    outcome = (w[:, 0] * r.var(1, ddof=1)).sum(0) if s > 1 else mean
    return mean, np.sqrt(var), outcome


def summarise(t: Tallies, method: str = "expected", *, people: np.ndarray | None = None,
              groups: np.ndarray | None = None, inflow: tuple[np.ndarray, np.ndarray] | None = None) -> Summary:
    """The weekly forecast of one cell: the people in ``people`` (bool mask), the groups in ``groups`` (bool
    mask), plus the ``inflow`` (mean, se per week) of people not yet in the cohort."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    pm = np.ones(len(t.weights), dtype=bool) if people is None else people
    gm = np.ones(len(t.groups), dtype=bool) if groups is None else groups
    r = t.realized[pm][..., gm].sum(-1).astype(np.float64)  # (P, S, W)
    x = t.expected[pm][..., gm].sum(-1).astype(np.float64) if method == "expected" else r
    sub = Tallies(t.realized, t.expected, t.groups, t.ages, t.weights[pm],
                  t.design[pm] if len(t.design) else t.design, t.design_sizes)
    weekly = _moments(sub, x, r)
    total = _moments(sub, x.sum(-1)[..., None], r.sum(-1)[..., None])
    parts = []
    for (mean, se, outcome) in (weekly, total):
        mean, se, outcome = np.atleast_1d(mean), np.atleast_1d(se), np.atleast_1d(outcome)
        if inflow is not None:
            im, ise = inflow if mean.shape == inflow[0].shape else (inflow[0].sum(keepdims=True),
                                                                    np.sqrt((inflow[1] ** 2).sum(keepdims=True)))
            mean, se, outcome = mean + im, np.sqrt(se ** 2 + ise ** 2), outcome + im
        disp = np.where(mean > 0, np.clip(outcome / np.maximum(mean, 1e-12), 1.0, 20.0), 1.0)
        parts.append((mean, se, disp))
    (m, s, d), (tm, ts, td) = parts
    return Summary(m, s, d, (float(tm[0]), float(ts[0]), float(td[0])))


def interval(mean: float, se: float, dispersion: float) -> dict[str, float]:
    """``mean`` and the predictive quantiles p05..p95 of one count."""
    return {"mean": float(mean), **dict(zip(QUANTILE_KEYS, predictive_quantiles(mean, se, dispersion),
                                            strict=True))}


def week_rows(as_of: datetime, s: Summary) -> list[dict[str, Any]]:
    """Per week: week_start, mean, p05, p25, p50, p75, p95, se (of the mean), dispersion (of the outcome)."""
    return [{"week_start": (as_of + timedelta(days=7 * w)).date().isoformat(),
             **interval(s.mean[w], s.se[w], s.dispersion[w]), "se": float(s.se[w]),
             "dispersion": float(s.dispersion[w])} for w in range(len(s.mean))]


def strata_rows(t: Tallies, as_of: datetime, kinds: tuple[str, ...], method: str = "expected",
                inflow: Inflow | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per stratification kind (``type``, ``age``): one row per stratum with its horizon total and its weeks;
    the strata of one kind partition the cohort, so their means sum to the total."""
    out: dict[str, list[dict[str, Any]]] = {}
    ages = np.array(t.ages)
    for kind in kinds:
        if kind not in STRATA:
            raise ValueError(f"unknown stratum {kind!r}: choose from {', '.join(STRATA)}")
        rows = []
        if kind == "type":
            cells = [(group_label(g), None, np.arange(len(t.groups)) == k, g, None) for k, g in enumerate(t.groups)]
        else:
            found = {a for a in t.ages} | ({age_band(a) for _, _, a in inflow.events} if inflow else set())
            names = [n for _, n in AGE_BANDS] + ["unknown"]
            cells = [(n, ages == n, None, None, n) for n in names if n in found]
        for name, people, groups, g, a in cells:
            flow = inflow.weekly(g, a) if inflow is not None else None
            s = summarise(t, method, people=people, groups=groups, inflow=flow)
            rows.append({"stratum": name, **interval(*s.total), "weeks": week_rows(as_of, s)})
        out[kind] = rows
    return out


def published(strata: dict[str, list[dict[str, Any]]],
              rule: SuppressionRule = SuppressionRule()) -> dict[str, list[dict[str, Any]]]:
    """The strata as they may leave the building: every number suppressed or rounded by the service's rule
    (:func:`foresight.suppression.suppress_count`: 0-7 -> "<8", else the nearest 5)."""
    keys = ("mean", *QUANTILE_KEYS)
    return {kind: [{"stratum": r["stratum"], **{k: suppress_count(r[k], rule) for k in keys},
                    "weeks": [{"week_start": w["week_start"], **{k: suppress_count(w[k], rule) for k in keys}}
                              for w in r["weeks"]]} for r in rows]
            for kind, rows in strata.items()}
