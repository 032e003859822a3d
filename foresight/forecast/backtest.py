"""Rolling-origin backtest of weekly counts: the model against the time-series baselines an analyst would use
(:mod:`foresight.forecast.ts_baselines`) and, on simulated data, the simulator's oracle.

At each origin (spread evenly over the warehouse's years, the first two years left as history, so winters are
among them) every method forecasts the next ``horizon_weeks`` weekly counts of ``codes`` events among the
people of ``split`` (an open population: arrivals included), and is scored against what happened:

- ``mape``: mean absolute percentage error over the (origin, week) cells with at least one event;
- ``mase``: mean absolute error over that of ``seasonal_naive`` on the same cells (below 1 beats it);
- ``coverage50`` / ``coverage90``: share of cells inside the method's 50% / 90% band;
- ``crps``: mean continuous ranked probability score of the method's predictive draws
  (:func:`foresight.forecast.intervals.crps_samples`).

``model`` is the open-cohort forecast (closed cohort + inflow, :mod:`foresight.forecast.counts`),
``model_closed`` the closed cohort alone (what ignoring arrivals costs), ``oracle`` the simulator's expected
admissions for the same closed cohort plus the same inflow term (the ceiling of a forecast of this cohort).
The split defaults to ``held_out``: a model has seen the futures of its training subjects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from foresight.forecast.cohorts import cohort_as_of, like_patterns
from foresight.forecast.forecaster import Forecaster
from foresight.forecast.intervals import coverage, crps_samples, predictive_samples
from foresight.forecast.population import forecast_cohort
from foresight.forecast.ts_baselines import BASELINES, DRAWS

WEEK = timedelta(days=7)
MIN_HISTORY_WEEKS = 104


@dataclass
class Cell:
    """One method's forecast of one origin's weeks: means and predictive draws, and what happened."""

    observed: np.ndarray  # (H,)
    mean: np.ndarray  # (H,)
    draws: np.ndarray  # (H, DRAWS)


@dataclass
class BacktestResult:
    origins: list[str]
    horizon_weeks: int
    codes: tuple[str, ...]
    split: str | None
    methods: dict[str, dict[str, float]]
    seconds_per_forecast: float
    rows: list[dict[str, Any]] = field(default_factory=list)  # origin, method, week, observed, mean, p05, p95

    def to_json(self) -> dict[str, Any]:
        return {"origins": self.origins, "horizon_weeks": self.horizon_weeks, "codes": list(self.codes),
                "split": self.split, "methods": self.methods,
                "seconds_per_forecast": round(self.seconds_per_forecast, 2)}


def choose_origins(first: datetime, last: datetime, n: int, horizon_weeks: int, span_years: float = 3.0,
                   min_history_weeks: int = MIN_HISTORY_WEEKS) -> list[datetime]:
    """``n`` origins evenly spaced over the ``span_years`` before the last date whose horizon is observed (so
    every season, winters included, is among them), never less than ``min_history_weeks`` after ``first``;
    midnights."""
    hi = last - horizon_weeks * WEEK
    lo = max(first + min_history_weeks * WEEK, hi - timedelta(days=365.25 * span_years))
    if hi < lo:
        raise ValueError(f"the warehouse holds {(last - first).days} days: too short for {min_history_weeks} "
                         f"weeks of history and a {horizon_weeks}-week horizon")
    span = (hi - lo).total_seconds()
    pts = [lo + timedelta(seconds=span * k / max(n - 1, 1)) for k in range(n)]
    return [datetime(p.year, p.month, p.day) for p in pts]


def event_times(con: Any, codes: Sequence[str], split: str | None) -> np.ndarray:
    """Times (datetime64[s]) of every ``codes`` event of the people in ``split``, sorted."""
    where = "AND subject_id IN (SELECT subject_id FROM subject_splits WHERE split = $split)" if split else ""
    rows = con.execute(
        f"""SELECT time FROM events WHERE time IS NOT NULL {where}
            AND EXISTS (SELECT 1 FROM unnest($p::VARCHAR[]) x(pat) WHERE code LIKE x.pat ESCAPE '\\')
            ORDER BY time""", {"p": like_patterns(codes), **({"split": split} if split else {})}).fetchall()
    return np.array([r[0] for r in rows], dtype="datetime64[s]")


def weekly(times: np.ndarray, start: datetime, weeks: int) -> np.ndarray:
    """Counts in ``weeks`` consecutive 7-day bins from ``start``."""
    edges = np.array([start + k * WEEK for k in range(weeks + 1)], dtype="datetime64[s]")
    return np.diff(np.searchsorted(times, edges, side="left"))


def score(cells: Sequence[Cell], naive_mae: float | None = None) -> dict[str, float]:
    """mape, mase (against ``naive_mae``), coverage50, coverage90, crps, mae over every (origin, week) cell."""
    y = np.concatenate([c.observed for c in cells]).astype(float)
    m = np.concatenate([c.mean for c in cells])
    d = np.concatenate([c.draws for c in cells])
    q = np.quantile(d, [0.05, 0.25, 0.75, 0.95], axis=1)
    nz = y > 0
    mae = float(np.mean(np.abs(m - y)))
    return {"mape": float(np.mean(np.abs(m[nz] - y[nz]) / y[nz])) if nz.any() else float("nan"),
            "mase": mae / naive_mae if naive_mae else float("nan"),
            "coverage50": coverage(y, q[1], q[2]), "coverage90": coverage(y, q[0], q[3]),
            "crps": float(np.mean([crps_samples(d[i], y[i]) for i in range(len(y))])), "mae": mae}


def _model_cells(forecaster: Forecaster, con: Any, origin: datetime, observed: np.ndarray, horizon_weeks: int,
                 codes: Sequence[str], split: str | None, options: dict[str, Any],
                 oracle: Callable[[list[int], datetime, int], np.ndarray] | None) -> dict[str, Cell]:
    """The model's open and closed forecasts at one origin (and the oracle's, for the same people)."""
    run = forecast_cohort(forecaster, con, origin, 7 * horizon_weeks, codes=codes, split=split, history_weeks=0,
                          open_cohort=True, **options)
    out: dict[str, Cell] = {}
    if run.forecast is None:
        return out
    f = run.forecast
    seed = int(origin.timestamp()) % 2**31
    mean = np.array([w["mean"] for w in f.weeks])
    draws = np.stack([predictive_samples(w["mean"], w["se"], w["dispersion"], DRAWS, seed + i)
                      for i, w in enumerate(f.weeks)])
    out["model"] = Cell(observed, mean, draws)
    inflow = f.open_cohort["inflow_per_week"] if f.open_cohort else 0.0
    closed = np.array(f.open_cohort["closed_weeks"]) if f.open_cohort else mean
    out["model_closed"] = Cell(observed, closed, np.stack([predictive_samples(c, 0.0, 1.0, DRAWS, seed + 99 + i)
                                                           for i, c in enumerate(closed)]))
    if oracle is not None:
        everyone = cohort_as_of(con, origin, split=split)  # the whole cohort, also when the model took a subset
        exp = oracle(everyone, origin, horizon_weeks) + inflow
        out["oracle"] = Cell(observed, exp, np.stack([predictive_samples(e, 0.0, 1.0, DRAWS, seed + 199 + i)
                                                      for i, e in enumerate(exp)]))
    return out


def run_backtest(forecaster: Forecaster, con: Any, *, origins: int = 12, horizon_weeks: int = 12,
                 codes: Sequence[str] = ("ADMIT//EMERGENCY",), split: str | None = "held_out", samples: int = 4,
                 max_subjects: int | None = None, seed: int = 0,
                 oracle: Callable[[list[int], datetime, int], np.ndarray] | None = None,
                 status: Callable[[str], Any] | None = None) -> BacktestResult:
    """Every method at every origin (see the module docstring). ``max_subjects``: the model forecasts a
    weighted stratified subset of the cohort (:func:`foresight.forecast.cohorts.stratified_subsample`).
    ``oracle(subject_ids, origin, weeks)``: expected weekly counts of those people (simulated data)."""
    times = event_times(con, codes, split)
    first, last = con.execute("SELECT min(time), max(time) FROM events WHERE code <> 'MEDS_BIRTH'").fetchall()[0]
    chosen = choose_origins(first, last, origins, horizon_weeks)
    rng = np.random.default_rng(seed)
    cells: dict[str, list[Cell]] = {}
    spent: list[float] = []
    options = {"samples": samples, "max_subjects": max_subjects, "weighted": max_subjects is not None, "seed": seed}
    for origin in chosen:
        if status is not None:
            status(f"origin {origin.date()}")
        observed = weekly(times, origin, horizon_weeks)
        n_hist = min(int((origin - first) / WEEK), 3 * 52)  # the baselines use three years at most
        hist_start = origin - n_hist * WEEK
        history = weekly(times, hist_start, n_hist)
        hist_weeks = [hist_start + k * WEEK for k in range(n_hist)]
        for name, fit in BASELINES.items():
            mean, draws = fit(history, hist_weeks, horizon_weeks, rng)
            cells.setdefault(name, []).append(Cell(observed, np.asarray(mean, dtype=float), draws))
        t0 = time.process_time()
        for name, cell in _model_cells(forecaster, con, origin, observed, horizon_weeks, codes, split, options,
                                       oracle).items():
            cells.setdefault(name, []).append(cell)
        spent.append(time.process_time() - t0)
    naive = score(cells["seasonal_naive"])["mae"]
    methods = {name: score(c, naive) for name, c in cells.items()}
    rows = [{"origin": o.date().isoformat(), "method": name, "week": w, "observed": int(c.observed[w]),
             "mean": float(c.mean[w])} for name, cs in cells.items() for o, c in zip(chosen, cs, strict=False)
            for w in range(horizon_weeks)]
    return BacktestResult([o.date().isoformat() for o in chosen], horizon_weeks, tuple(codes), split, methods,
                          float(np.mean(spent)) if spent else 0.0, rows)


def simulator_oracle(sim_dir: str | Path, codes: Sequence[str]) -> Callable[[list[int], datetime, int], np.ndarray]:
    """``oracle(subject_ids, origin, weeks)`` from the simulator's MEDS output: expected admissions (all, or
    emergency only when ``codes`` is ``ADMIT//EMERGENCY``) of those people over the weeks after ``origin``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from foresight.simulate.oracle import Oracle

    emergency = tuple(codes) == ("ADMIT//EMERGENCY",)
    if not emergency and tuple(codes) != ("ADMIT//*",):
        raise ValueError("the simulator's oracle knows admissions only: codes ADMIT//* or ADMIT//EMERGENCY")
    table = ds.dataset(Path(sim_dir) / "data", format="parquet").to_table()
    orc = Oracle.from_dir(sim_dir)

    def oracle(ids: list[int], origin: datetime, weeks: int) -> np.ndarray:
        part = table.filter(pc.is_in(table["subject_id"], value_set=pa.array(ids, type=pa.int64())))
        return np.asarray(orc.expected_weekly_admissions(part, origin, weeks=weeks, emergency_only=emergency).expected)

    return oracle
