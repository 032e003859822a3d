"""What an analyst would forecast weekly admissions with instead of the model: time-series baselines fitted on
the weekly counts themselves, each giving a mean and predictive draws per week ahead.

- ``seasonal_naive``: the same week last year (52 weeks back), Poisson around it.
- ``moving_average``: the mean of the last 8 weeks, flat; over-dispersed (negative binomial) by the ratio of the
  last half-year's variance to its mean.
- ``glm``: a negative-binomial-like GLM (statsmodels Poisson GLM, the dispersion from Pearson's chi-square:
  quasi-Poisson) on a linear trend and two annual harmonics, fitted on the last three years.
- ``ets``: exponential smoothing with a damped additive trend (statsmodels ``ETSModel``), draws from its own
  simulation. No seasonal component: 52-week seasonality needs two full years per fit and is slow; the GLM
  carries the season.

Parameter uncertainty of the fits is left out of their bands (as an analyst's default output does).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from datetime import datetime

import numpy as np

DRAWS = 400
SEASON = 52


def _draw(mean: np.ndarray, dispersion: float, rng: np.random.Generator) -> np.ndarray:
    """(H, DRAWS) counts around ``mean``: Poisson, or negative binomial with variance ``dispersion * mean``."""
    lam = np.maximum(np.asarray(mean, dtype=float), 1e-9)[:, None]
    if dispersion <= 1.0 + 1e-9:
        return rng.poisson(np.broadcast_to(lam, (len(lam), DRAWS))).astype(float)
    n = lam / (dispersion - 1.0)
    return rng.negative_binomial(np.broadcast_to(n, (len(lam), DRAWS)), 1.0 / dispersion).astype(float)


def seasonal_naive(y: np.ndarray, weeks: list[datetime], horizon: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same week one year earlier (the last value when there is less than a year of history)."""
    y = np.asarray(y, dtype=float)
    if len(y) >= SEASON:
        mean = np.array([y[len(y) - SEASON + h] if h < SEASON else y[len(y) - 2 * SEASON + h]
                         for h in range(horizon)])
    else:
        mean = np.full(horizon, y[-1] if len(y) else 0.0)
    return mean, _draw(mean, 1.0, rng)


def moving_average(y: np.ndarray, weeks: list[datetime], horizon: int,
                   rng: np.random.Generator, window: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the last ``window`` weeks."""
    y = np.asarray(y, dtype=float)
    mean = np.full(horizon, y[-window:].mean() if len(y) else 0.0)
    recent = y[-26:]
    disp = float(recent.var(ddof=1) / recent.mean()) if len(recent) > 2 and recent.mean() > 0 else 1.0
    return mean, _draw(mean, max(1.0, disp), rng)


def _design(weeks: list[datetime], t0: datetime) -> np.ndarray:
    """Intercept, trend (years since ``t0``), two annual harmonics."""
    t = np.array([(w - t0).days / 365.25 for w in weeks])
    doy = np.array([w.timetuple().tm_yday / 365.25 for w in weeks])
    cols = [np.ones_like(t), t]
    for k in (1, 2):
        cols += [np.sin(2 * np.pi * k * doy), np.cos(2 * np.pi * k * doy)]
    return np.column_stack(cols)


def glm(y: np.ndarray, weeks: list[datetime], horizon: int,
        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Quasi-Poisson GLM with trend and season, on the last three years."""
    import statsmodels.api as sm

    y = np.asarray(y, dtype=float)[-3 * SEASON:]
    past = weeks[-len(y):]
    future = [past[-1] + (past[-1] - past[-2]) * (h + 1) for h in range(horizon)] if len(past) > 1 else []
    if len(y) < 8 or not future:
        return moving_average(y, weeks, horizon, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sm.GLM(y, _design(past, past[0]), family=sm.families.Poisson()).fit()
    mean = fit.predict(_design(future, past[0]))
    disp = float(fit.pearson_chi2 / max(fit.df_resid, 1))
    return mean, _draw(mean, max(1.0, disp), rng)


def ets(y: np.ndarray, weeks: list[datetime], horizon: int,
        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """ETS(A, Ad, N) on the last three years; draws from its simulated paths (cut at 0)."""
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    y = np.asarray(y, dtype=float)[-3 * SEASON:]
    if len(y) < 16:
        return moving_average(y, weeks, horizon, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ETSModel(y, error="add", trend="add", damped_trend=True).fit(disp=False)
        mean = np.maximum(np.asarray(fit.forecast(horizon)), 0.0)
        sims = fit.simulate(horizon, repetitions=DRAWS, anchor="end", rng=rng)
    return mean, np.maximum(np.asarray(sims).reshape(horizon, DRAWS), 0.0)


BASELINES: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "seasonal_naive": seasonal_naive, "moving_average": moving_average, "glm": glm, "ets": ets}
