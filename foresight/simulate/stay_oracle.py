"""The oracle of a stay in progress, in closed form: in-hospital death, an ICU transfer, a long stay.

The simulator draws a stay's whole course at its admission (:meth:`Engine.sample_stays`): its cause (which
admission process fired), its length ``LOS = los_min + exp(mu(cause, age) + sigma * z)``, an ICU transfer
``icu_after_hours`` in with probability ``p_icu(cause)``, and death at its end with probability
``p_death(cause, age, comorbidities, ICU)``. Nothing else happens until the discharge. Given the posterior over
the cause (:meth:`Oracle.stay_posterior`: the admission type, and what the record shows so far — labs, an ICU
transfer, the stay lasting this long), each outcome is a finite sum over (cause, ICU), with no Monte Carlo. With
``e`` the time since the admission (0 at the admission itself) and ``W`` the window after ``as_of``:

- ``in_hospital_death``: ``sum_c w_c sum_icu P(icu | c, record) p_death(c, icu) P(LOS <= e + W | LOS > e, c)``
  (the death is recorded at the discharge, as ``DISCHARGE//DIED`` and ``MEDS_DEATH``);
- ``icu_during_stay``: ``sum_c w_c p_icu(c)`` while the transfer time is still ahead (and within ``W``), else 0
  (a transfer already recorded is not "after as_of");
- ``stay_over``: neither discharge nor death within ``W``: ``sum_c w_c P(LOS > e + W | LOS > e, c)``.

These are the labels of ``foresight.evaluate``'s admission tasks ``in_hospital_mortality`` (window 365 days),
``icu_during_stay`` (365) and ``los_over_7d`` (``stay_over`` with W = 7), scored at each admission.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_ndtr

from foresight.simulate.engine import HOUR
from foresight.simulate.history import Snapshot
from foresight.simulate.model import YEAR, Model

STAY_EVENTS = ("in_hospital_death", "icu_during_stay", "stay_over")


def los_z(t: np.ndarray, mu: np.ndarray, stays: dict[str, Any]) -> np.ndarray:
    """Standardised log length of stay beyond the minimum, at a stay age of ``t`` days (-inf below the minimum)."""
    excess = t - stays["los_min_days"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(excess > 0, (np.log(np.maximum(excess, 1e-300)) - mu) / stays["los_sigma"], -np.inf)


def stay_probability(model: Model, snap: Snapshot, pairs: np.ndarray, cause: np.ndarray, w: np.ndarray,
                     event: str, window_days: float) -> np.ndarray:
    """P(``event``) within ``window_days`` after as_of for each pair in a stay (``cause``, ``w``: its posterior).

    ``pairs`` index ``snap`` and must all be in a stay; ``w`` is (pairs, causes) from ``Oracle.stay_posterior``.
    """
    if event not in STAY_EVENTS:
        raise ValueError(f"unknown stay event {event!r}; known: {', '.join(STAY_EVENTS)}")
    stays = model.config["stays"]
    t_adm = snap.t_adm[pairs]
    elapsed = (snap.t[pairs] - t_adm)[:, None]  # (n, 1)
    icu_at = stays["icu_after_hours"] * HOUR
    icu_known = elapsed >= icu_at
    p_icu = model.p_icu[cause][None, :]  # (1, C)
    if event == "icu_during_stay":
        ahead = ~icu_known & (icu_at - elapsed <= window_days)
        return (w * np.where(ahead, p_icu, 0.0)).sum(1)
    age = ((t_adm - snap.birth[pairs]) / YEAR)[:, None]
    mu = model.los_log_mu(cause[None, :], age)
    # log P(LOS > e + W | LOS > e, cause): the survival ratio, in logs so a long stay's tail keeps its digits
    log_stay = np.minimum(log_ndtr(-los_z(elapsed + window_days, mu, stays)) - log_ndtr(-los_z(elapsed, mu, stays)),
                          0.0)
    if event == "stay_over":
        return (w * np.exp(log_stay)).sum(1)
    ends = -np.expm1(log_stay)  # the stay ends (and a death at its end is recorded) within the window
    p1 = np.where(icu_known, snap.icu_seen[pairs][:, None].astype(float), p_icu)  # P(ICU | cause, record)
    shape = w.shape
    c = np.broadcast_to(cause[None, :], shape).ravel()
    a = np.broadcast_to(age, shape).ravel()
    cond = np.broadcast_to(snap.cond[pairs][:, None], shape).ravel()
    die = [model.p_death(c, a, cond, np.full(c.size, icu, bool)).reshape(shape) for icu in (False, True)]
    return (w * ((1.0 - p1) * die[0] + p1 * die[1]) * ends).sum(1)
