"""The oracle: the true probability of an event, given a subject's recorded history, under the simulator's hazards.

Every hazard depends only on what the record shows (age, sex, race, ethnicity, the conditions coded so far, prior
admissions, time since the last discharge, the calendar), so the state at ``as_of`` is rebuilt exactly from the
events at or before ``as_of``, and no model could do better than these probabilities.

A probability is an average over ``samples`` simulated futures from that state, each Rao-Blackwellised: the target
part of every hazard is integrated along the path instead of being sampled, so a replicate contributes
``1 - exp(-integral)`` (or 1 if the path reaches the target otherwise, e.g. an in-hospital death). The standard
error across replicates is returned with every probability; for a subject whose state cannot change much within
the horizon it is ~0.

When ``as_of`` falls inside a hospital stay (admitted, not yet discharged), the stay's hidden course (its cause,
remaining length, ICU transfer, in-hospital death) is drawn from its exact posterior given what the record shows
so far: the admission type, the admission labs (which tests were drawn and their values, as rounded), whether an
ICU transfer has happened, and that the stay has lasted this long.

Events (:data:`EVENTS`), counted strictly after ``as_of`` and up to ``as_of + horizon``:

- ``admission``: any hospital admission (``ADMIT//*``);
- ``emergency_admission``: ``ADMIT//EMERGENCY``;
- ``death``: ``MEDS_DEATH`` (in or out of hospital);
- ``icu_admission``: ``ICU//ADMIT``;
- ``readmission_30d``: any admission within 30 days; ``as_of`` should be a discharge time.

The outcomes of the stay in progress at ``as_of`` (:data:`STAY_EVENTS`, e.g. at an admission: in-hospital death,
an ICU transfer, a stay over 7 days) are exact sums over the posterior of its course: :meth:`Oracle.stay_risk`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import log_ndtr, ndtr, ndtri

from foresight.simulate import catalog as cat
from foresight.simulate.engine import HOUR, Engine
from foresight.simulate.history import (
    K_ADMIT_EL,
    K_ADMIT_EM,
    K_BIRTH,
    K_DEATH,
    K_DISCHARGE,
    US_PER_DAY,
    History,
    Snapshot,
    read_history,
    snapshot,
)
from foresight.simulate.model import YEAR, Model
from foresight.simulate.state import Pending, State, Task
from foresight.simulate.stay_oracle import STAY_EVENTS, los_z, stay_probability

EVENTS = ("admission", "emergency_admission", "death", "icu_admission", "readmission_30d")


@dataclass
class Risk:
    """Oracle probabilities for (subject, as_of) pairs; NaN where the subject is not alive at ``as_of``."""

    event: str
    horizon_days: float
    subject_id: np.ndarray
    as_of: np.ndarray  # datetime64[us]
    probability: np.ndarray
    stderr: np.ndarray
    samples: int

    def to_arrow(self) -> Any:
        """The pairs and their probabilities as a pyarrow Table."""
        import pyarrow as pa

        return pa.table({"subject_id": self.subject_id, "as_of": self.as_of, "probability": self.probability,
                         "stderr": self.stderr})


@dataclass
class WeeklyExpectation:
    """Expected admissions per week after ``as_of`` for the cohort alive at ``as_of``."""

    as_of: np.datetime64
    week_start: np.ndarray  # datetime64[us]
    expected: np.ndarray
    stderr: np.ndarray
    subjects: int
    samples: int
    emergency_only: bool


# --- the oracle -------------------------------------------------------------------------------------------


class Oracle:
    """True risks under a simulator configuration (the default one unless given)."""

    def __init__(self, model: Model | None = None) -> None:
        self.model = model if model is not None else Model.from_config()
        self.engine = Engine(self.model)

    @classmethod
    def from_dir(cls, path: str | Path) -> Oracle:
        """The oracle of a simulated dataset: reads the ``simulator.json`` written next to it."""
        path = Path(path)
        for candidate in (path / "metadata" / "simulator.json", path / "simulator.json"):
            if candidate.exists():
                meta = json.loads(candidate.read_text())
                return cls(Model.from_config(meta["config"]))
        raise FileNotFoundError(f"{path}: no metadata/simulator.json (is this a `foresight simulate` output?)")

    def task(self, event: str) -> Task:
        """The engine task of an oracle event name."""
        m, pe = self.model, self.engine.pe
        admit = self.engine.is_admission.astype(float)
        if event in ("admission", "readmission_30d"):
            return Task(admit)
        if event == "emergency_admission":
            return Task(m.emergency.astype(float))
        if event == "icu_admission":
            p = np.where(self.engine.is_admission, m.p_icu[np.maximum(m.target[:pe], 0)], 0.0)
            return Task(p, icu=True)
        if event == "death":
            return Task((m.kind[:pe] == 2).astype(float), death=True)
        raise ValueError(f"unknown event {event!r}; known: {', '.join(EVENTS)}")

    def true_risk(self, history: Any, as_of: Any, horizon_days: float | None, event: str, *,
                  subjects: Any = None, samples: int = 64, seed: int = 0, max_rows: int = 400_000) -> Risk:
        """P(``event`` in (as_of, as_of + horizon]) for each (subject, as_of) pair, with its standard error.

        ``history``: events (pyarrow/pandas/dict/MEDS folder) covering at least the subjects asked about; only
        rows at or before each pair's ``as_of`` are used. ``subjects``: ids (default: every subject in the
        history); ``as_of``: one time for all or one per subject. Pairs whose subject is unborn, dead or unknown
        at ``as_of`` get NaN. Batched: all pairs and replicates go through the engine together.
        """
        if event == "readmission_30d" and horizon_days is None:
            horizon_days = 30.0
        if horizon_days is None or horizon_days <= 0:
            raise ValueError("horizon_days must be positive")
        h = history if isinstance(history, History) else read_history(history, self.model)
        sids = h.subjects if subjects is None else np.asarray(subjects, dtype=np.int64).ravel()
        t = _days(as_of, sids.size)
        snap = snapshot(h, self.model, sids, t)
        task = self.task(event)
        prob = np.full(sids.size, np.nan)
        se = np.full(sids.size, np.nan)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
        valid = np.flatnonzero(snap.valid)
        per_batch = max(1, max_rows // samples)
        for b0 in range(0, valid.size, per_batch):
            pairs = valid[b0:b0 + per_batch]
            st, pending = self._replicate(snap, pairs, samples, t[pairs] + horizon_days, rng, task)
            out = self.engine.run(st, rng, task=task, pending=pending)
            p = np.where(out["hit"] <= st.t_end, 1.0, -np.expm1(-out["acc"])).reshape(pairs.size, samples)
            prob[pairs] = p.mean(1)
            se[pairs] = p.std(1, ddof=1) / np.sqrt(samples) if samples > 1 else np.nan
        return Risk(event, float(horizon_days), sids, _to_datetime(t), prob, se, samples)

    def stay_risk(self, history: Any, as_of: Any, event: str, *, subjects: Any = None,
                  window_days: float | None = None) -> Risk:
        """P(``event`` of the stay in progress, in (as_of, as_of + window]) for each (subject, as_of) pair, exactly.

        ``event`` (:data:`STAY_EVENTS`): ``in_hospital_death``, ``icu_during_stay`` (window None: the whole stay)
        or ``stay_over`` (the stay outlasts the window: neither discharge nor death within it; window needed).
        At an admission's own time this is the admission-time prediction of ``foresight.evaluate``'s
        ``in_hospital_mortality``, ``icu_during_stay`` and ``los_over_7d`` (``stay_over``, 7 days). Closed form
        over the posterior of the stay's cause (see :mod:`~foresight.simulate.stay_oracle`): ``stderr`` is 0 and
        ``samples`` 0. NaN for a pair not in a hospital stay at ``as_of`` (or unborn, dead or unknown), and for
        ``as_of`` before the cohort's ``alive_from``: the cohort is everyone alive on that date, so a stay before
        it is survivor-selected (no one in the cohort died in it), which these probabilities do not model.
        """
        if event not in STAY_EVENTS:
            raise ValueError(f"unknown stay event {event!r}; known: {', '.join(STAY_EVENTS)}")
        if window_days is None and event == "stay_over":
            raise ValueError("stay_over needs window_days (e.g. 7: a stay longer than 7 days)")
        window = math.inf if window_days is None else float(window_days)
        if not window > 0:
            raise ValueError("window_days must be positive")
        h = history if isinstance(history, History) else read_history(history, self.model)
        sids = h.subjects if subjects is None else np.asarray(subjects, dtype=np.int64).ravel()
        t = _days(as_of, sids.size)
        snap = snapshot(h, self.model, sids, t)
        prob = np.full(sids.size, np.nan)
        pairs = np.flatnonzero(snap.in_stay & (t >= self.model.alive_from))
        if pairs.size:
            cause, w = self.stay_posterior(snap, pairs)
            prob[pairs] = stay_probability(self.model, snap, pairs, cause, w, event, window)
        return Risk(event, window, sids, _to_datetime(t), prob, np.where(np.isnan(prob), np.nan, 0.0), 0)

    def expected_weekly_admissions(self, history: Any, as_of: Any, weeks: int = 26, *, emergency_only: bool = False,
                                   samples: int = 32, seed: int = 0) -> WeeklyExpectation:
        """Expected admissions per week over ``weeks`` weeks after ``as_of``, for everyone alive at ``as_of``.

        Each replicate sums, over the cohort, the admission hazard integrated over each week along a simulated
        future (the compensator, whose expectation is the expected count); the standard error is across
        replicates. Subjects born after ``as_of`` are not in the cohort: compare with admissions of the same
        people.
        """
        h = history if isinstance(history, History) else read_history(history, self.model)
        t = float(_days(as_of, 1)[0])
        snap = snapshot(h, self.model, h.subjects, np.full(h.subjects.size, t))
        valid = np.flatnonzero(snap.valid)
        edges = t + 7.0 * np.arange(weeks + 1)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
        totals = np.zeros((samples, weeks))
        per_batch = max(1, 400_000 // samples)
        for b0 in range(0, valid.size, per_batch):
            pairs = valid[b0:b0 + per_batch]
            st, pending = self._replicate(snap, pairs, samples, np.full(pairs.size, edges[-1]), rng, None)
            out = self.engine.run(st, rng, weekly_edges=edges, weekly_emergency_only=emergency_only,
                                  pending=pending)
            totals += out["weekly"].reshape(pairs.size, samples, weeks).sum(0)
        return WeeklyExpectation(
            as_of=np.datetime64(round(t * US_PER_DAY), "us"),
            week_start=_to_datetime(edges[:-1]),
            expected=totals.mean(0), stderr=totals.std(0, ddof=1) / np.sqrt(samples) if samples > 1 else
            np.full(weeks, np.nan), subjects=int(valid.size), samples=samples, emergency_only=emergency_only)

    def compensator(self, history: Any, start: Any, end: Any, event: str) -> dict[str, np.ndarray]:
        """Expected number of ``event`` per subject-interval of observed person-time in [start, end).

        Integrates the event's hazard along each subject's *recorded* history (state rebuilt at every change,
        birthday and recency mark; nothing while in hospital or after death), in closed form for seasonality.
        Returns columns subject_id, seg_start, seg_end, age (years, whole), expected. Only hazard-driven events
        are covered: for ``death`` that is death out of hospital. Used to check simulated event counts against
        the configured hazards (observed - expected is a martingale with variance ~ expected).
        """
        m = self.model
        h = history if isinstance(history, History) else read_history(history, m)
        t0, t1 = float(_days(start, 1)[0]), float(_days(end, 1)[0])
        task = self.task(event)
        # Breakpoints: start/end, state-changing rows, birthdays, recency marks.
        subj_birth = np.full(h.subjects.size, np.inf)
        rr = np.searchsorted(h.subjects, h.subject_id)
        bmask = h.kind == K_BIRTH
        np.minimum.at(subj_birth, rr[bmask], h.time[bmask])
        change = (h.bits != 0) | np.isin(h.kind, (K_ADMIT_EM, K_ADMIT_EL, K_DISCHARGE, K_DEATH))
        pts_s = [h.subject_id[change]]
        pts_t = [h.time[change]]
        for edge in (30.0, 90.0, 365.0):
            d = h.kind == K_DISCHARGE
            pts_s.append(h.subject_id[d])
            pts_t.append(h.time[d] + edge)
        first_age = np.floor(np.maximum(t0 - subj_birth, 0.0) / YEAR)
        n_bd = np.clip(np.ceil((t1 - subj_birth) / YEAR) - first_age + 1, 0, 200).astype(np.int64)
        n_bd = np.where(np.isfinite(subj_birth), n_bd, 0)
        s_rep = np.repeat(np.arange(h.subjects.size), n_bd)
        k = np.arange(n_bd.sum()) - np.repeat(np.cumsum(n_bd) - n_bd, n_bd)
        pts_s.append(h.subjects[s_rep])
        pts_t.append(subj_birth[s_rep] + (first_age[s_rep] + k) * YEAR)
        alive_subj = np.isfinite(subj_birth)
        pts_s += [h.subjects[alive_subj], h.subjects[alive_subj]]
        pts_t += [np.full(alive_subj.sum(), t0), np.full(alive_subj.sum(), t1)]
        ps, pt = np.concatenate(pts_s), np.concatenate(pts_t)
        birth_of = subj_birth[np.searchsorted(h.subjects, ps)]
        pt = np.maximum(pt, birth_of)
        keep = (pt >= t0) & (pt <= t1) & np.isfinite(pt)
        ps, pt = ps[keep], pt[keep]
        order = np.lexsort((pt, ps))
        ps, pt = ps[order], pt[order]
        uniq = np.ones(ps.size, bool)
        uniq[1:] = (ps[1:] != ps[:-1]) | (pt[1:] - pt[:-1] > 1e-9)
        ps, pt = ps[uniq], pt[uniq]
        seg = np.flatnonzero(ps[:-1] == ps[1:])
        s_sub, s_lo, s_hi = ps[seg], pt[seg], pt[seg + 1]
        # State at each segment start; hazards are constant on the segment.
        snap = snapshot(h, m, s_sub, s_lo + 1e-9)
        live = snap.valid & ~snap.in_stay
        age = (s_lo - snap.birth) / YEAR
        x = m.features(snap.male, snap.race, snap.hisp, snap.cond, snap.n_adm, s_lo - snap.last_dis)
        lam = m.rates(age, x, snap.cond, slice(0, self.engine.pe))
        expected = np.where(live, m.season_integral(lam * task.frac, s_lo, s_hi, slice(0, self.engine.pe)), 0.0)
        return {"subject_id": s_sub, "seg_start": s_lo, "seg_end": s_hi, "age": np.floor(age + 1e-9),
                "expected": expected}

    # -- internals --

    def _replicate(self, snap: Snapshot, pairs: np.ndarray, samples: int, t_end: np.ndarray,
                   rng: np.random.Generator, task: Task | None) -> tuple[State, Pending | None]:
        """``samples`` engine rows per pair, starting at as_of (in-stay pairs get their stay drawn)."""
        rep = np.repeat(pairs, samples)
        n = rep.size
        st = State(
            birth=snap.birth[rep].astype(np.float64), male=snap.male[rep], race=snap.race[rep], hisp=snap.hisp[rep],
            cond=snap.cond[rep].copy(), n_adm=snap.n_adm[rep].copy(), last_dis=snap.last_dis[rep].copy(),
            t=snap.t[rep].copy(), t_end=np.repeat(t_end, samples).astype(np.float64), alive=np.ones(n, bool),
            death_t=np.full(n, np.inf),
        )
        stay_rows = np.flatnonzero(snap.in_stay[rep])
        if stay_rows.size == 0:
            return st, None
        # The record already counts this admission; completing the stay counts it again.
        st.n_adm[stay_rows] -= 1
        return st, self._draw_pending(snap, rep, stay_rows, st.t_end[stay_rows], rng, task)

    def stay_posterior(self, snap: Snapshot, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior over the cause of each pair's stay in progress: (causes (C,), weights (n, C)).

        Prior: each admission process's hazard at the admission time, in the state just before it. Evidence:
        the admission type; the stay has lasted this long; the ICU transfer seen or not (once its time has
        passed); which admission labs were drawn (once their time has passed) and their values, as rounded.
        """
        m, pe = self.model, self.engine.pe
        stays = m.config["stays"]
        t_adm, now = snap.t_adm[pairs], snap.t[pairs]
        elapsed = now - t_adm
        age = (t_adm - snap.birth[pairs]) / YEAR
        x = m.features(snap.male[pairs], snap.race[pairs], snap.hisp[pairs], snap.cond[pairs],
                       np.maximum(snap.n_adm[pairs] - 1, 0), t_adm - snap.last_dis[pairs])
        lam = m.rates(age, x, snap.cond[pairs], slice(0, pe)).astype(np.float64)
        procs = np.flatnonzero(self.engine.is_admission)
        cause = m.target[procs]
        lam = lam[:, procs] * m.season(np.broadcast_to(procs, lam[:, procs].shape),
                                       np.broadcast_to(t_adm[:, None], lam[:, procs].shape))
        elective = np.array([cat.CAUSES[c].admit == "ELECTIVE" for c in cause])
        logw = np.log(np.maximum(lam, 1e-300))
        logw[elective[None, :] != snap.adm_elective[pairs][:, None]] = -np.inf
        # Length so far: P(LOS > elapsed | cause).
        mu = m.los_log_mu(cause[None, :], age[:, None])
        logw += log_ndtr(-los_z(elapsed[:, None], mu, stays))
        # ICU transfer seen or not (known once its time has passed).
        icu_known = elapsed >= stays["icu_after_hours"] * HOUR
        p_icu = m.p_icu[cause][None, :]
        with np.errstate(divide="ignore"):
            logw += np.where(icu_known[:, None], np.where(snap.icu_seen[pairs][:, None], np.log(p_icu),
                                                          np.log1p(-p_icu)), 0.0)
        # Admission labs: which were drawn and their values (as rounded: an interval of the log-normal).
        labs_known = elapsed >= stays["labs_after_hours"] * HOUR
        pos = np.searchsorted(pairs, snap.lab_pair)
        inside = (pos < pairs.size) & (pairs[np.minimum(pos, pairs.size - 1)] == snap.lab_pair)
        drawn = np.zeros((pairs.size, m.lab_ids.size), bool)
        drawn[pos[inside], snap.lab_j[inside]] = True
        p_draw = m.lab_draw[:, cause].T  # (C, L)
        with np.errstate(divide="ignore"):
            log_draw = np.where(drawn[:, None, :], np.log(p_draw[None]), np.log1p(-p_draw[None]))
        logw += np.where(labs_known[:, None], log_draw.sum(2), 0.0)
        li = np.flatnonzero(inside)
        if li.size:
            pi, j, v = pos[li], snap.lab_j[li], snap.lab_value[li]
            decimals = np.array([next(mm.decimals for mm in cat.MEASURES
                                      if mm.loinc == cat.VOCAB.codes[c].rsplit("//", 1)[-1]) for c in m.lab_ids])
            half = 0.5 * 10.0 ** -decimals[j].astype(float)
            male = snap.male[pairs][pi].astype(float)
            for ci, c in enumerate(cause):
                mu_l = m.lab_log_mu(np.full(li.size, c), age[pi], male, snap.cond[pairs][pi])[np.arange(li.size), j]
                sig = m.lab_sigma[j]
                hi_z = (np.log(v + half) - mu_l) / sig
                lo_z = np.where(v - half > 0, (np.log(np.maximum(v - half, 1e-300)) - mu_l) / sig, -np.inf)
                # In the upper tail, from the other side: the difference of two numbers near 1 loses every digit.
                mass = np.where(lo_z > 0, ndtr(-lo_z) - ndtr(-hi_z), ndtr(hi_z) - ndtr(lo_z))
                with np.errstate(divide="ignore"):
                    np.add.at(logw[:, ci], pi, np.log(np.maximum(mass, 0.0)))
        logw -= logw.max(1, keepdims=True)
        w = np.exp(logw)
        return cause, w / w.sum(1, keepdims=True)

    def _draw_pending(self, snap: Snapshot, rep: np.ndarray, rows: np.ndarray, t_end: np.ndarray,
                      rng: np.random.Generator, task: Task | None) -> Pending:
        """Draw the hidden course of stays in progress (one per row) from their posterior.

        For the ICU and death tasks the stay's own target (a transfer still to come; dying before the horizon)
        is integrated exactly over cause, ICU and length of stay, and the path is drawn given that it did NOT
        happen: ``acc0`` carries -log P(no hit), so the estimate has no Monte-Carlo error from the stay.
        """
        m = self.model
        stays = m.config["stays"]
        p_of_row = rep[rows]
        uniq, inv = np.unique(p_of_row, return_inverse=True)
        cause, w = self.stay_posterior(snap, uniq)
        t_adm = snap.t_adm[uniq]
        elapsed = (snap.t[uniq] - t_adm)[:, None]
        age = ((t_adm - snap.birth[uniq]) / YEAR)[:, None]
        cond = snap.cond[uniq][:, None]
        horizon = (t_end - snap.t_adm[p_of_row])  # per row; the same for every row of a pair
        h_pair = np.zeros(uniq.size)
        h_pair[inv] = horizon
        icu_known = (elapsed >= stays["icu_after_hours"] * HOUR)[:, 0]
        p_icu = m.p_icu[cause][None, :]
        mu = m.los_log_mu(cause[None, :], age)
        z_e = los_z(elapsed, mu, stays)
        z_h = los_z(h_pair[:, None], mu, stays)
        # P(discharged by the horizon | cause, still in at as_of)
        g = np.where(z_h > z_e, 1.0 - ndtr(-z_h) / np.maximum(ndtr(-z_e), 1e-300), 0.0)
        icu_task = task is not None and task.icu
        death_task = task is not None and task.death
        seen = snap.icu_seen[uniq][:, None]
        # Joint weights over (cause, ICU on this stay) and the probability that the stay itself hits the target.
        p1 = np.where(icu_known[:, None], seen.astype(float), p_icu)  # P(ICU | cause, record)
        weight = np.stack([w * (1 - p1), w * p1], axis=2)  # (U, C, icu)
        hit = np.zeros_like(weight)
        if icu_task:
            in_time = (stays["icu_after_hours"] * HOUR <= h_pair)[:, None]
            hit[:, :, 1] = np.where(icu_known[:, None], 0.0, 1.0) * in_time
        if death_task:
            for i in (0, 1):
                hit[:, :, i] = m.p_death(np.broadcast_to(cause, w.shape).ravel(), np.broadcast_to(age, w.shape)
                                         .ravel(), np.broadcast_to(cond, w.shape).ravel(),
                                         np.full(w.size, i, bool)).reshape(w.shape) * g
        q = (weight * hit).sum((1, 2))
        cond_w = (weight * (1 - hit)).reshape(uniq.size, -1)
        cond_w /= np.maximum(cond_w.sum(1, keepdims=True), 1e-300)
        # Draw (cause, ICU) per row given no hit.
        cdf = np.cumsum(cond_w, 1)[inv]
        k = np.minimum((cdf < rng.random(rows.size)[:, None]).sum(1), cond_w.shape[1] - 1)
        ci, icu = k // 2, (k % 2).astype(bool)
        c = cause[ci]
        r_age, r_cond = age[inv, 0], cond[inv, 0]
        p_die = m.p_death(c, r_age, r_cond, icu)
        # Length of stay given it exceeds the elapsed time (and, for the death task, given no death by the
        # horizon: discharged alive before it, or still in hospital after it).
        ze, zh, gr = z_e[inv, ci], z_h[inv, ci], g[inv, ci]
        if death_task:
            before = gr * (1 - p_die)
            early = rng.random(rows.size) < before / np.maximum(before + (1 - gr), 1e-300)
            lo = np.where(early, ze, np.maximum(ze, zh))
            hi = np.where(early, zh, np.inf)
        else:
            lo, hi = ze, np.full(rows.size, np.inf)
        z = _truncated_normal(rng, lo, hi)
        los = stays["los_min_days"] + np.exp(m.los_log_mu(c, r_age) + stays["los_sigma"] * z)
        los = np.maximum(los, elapsed[inv, 0] + 1e-9)
        die = np.zeros(rows.size, bool) if death_task else rng.random(rows.size) < p_die
        return Pending(rows=rows, t_adm=snap.t_adm[p_of_row], cause=c, los=los, icu=icu,
                       p_die=np.zeros(rows.size), die=die, acc0=-np.log1p(-np.minimum(q[inv], 1 - 1e-12)))


def _truncated_normal(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Standard normal draws restricted to [lo, hi] (inverse CDF, from the tail side that keeps precision)."""
    upper = lo > 0
    a = np.where(upper, ndtr(-hi), ndtr(lo))
    b = np.where(upper, ndtr(-lo), ndtr(hi))
    u = a + rng.random(lo.shape) * (b - a)
    u = np.clip(u, 1e-300, 1 - 1e-16)
    z = np.where(upper, -ndtri(u), ndtri(u))
    return np.clip(z, lo, hi)


def _to_datetime(days: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(days) * US_PER_DAY).astype(np.int64).astype("datetime64[us]")


def _days(value: Any, n: int) -> np.ndarray:
    """Times (str, datetime, numpy/pandas timestamps; one or ``n``) -> days since 1970-01-01."""
    arr = np.asarray(value)
    if arr.dtype.kind in "iuf":
        out = arr.astype(np.float64)
    else:
        if arr.dtype.kind == "O" and arr.ndim == 0 and hasattr(value, "to_datetime64"):
            arr = np.asarray(value.to_datetime64())
        out = arr.astype("datetime64[us]").astype(np.int64).astype(np.float64) / US_PER_DAY
    out = np.atleast_1d(out)
    if out.size == 1 and n != 1:
        out = np.full(n, out[0])
    if out.size != n:
        raise ValueError(f"as_of has {out.size} values for {n} subjects")
    return out


def true_risk(subject_history: Any, as_of: Any, horizon: float | None, event: str, *,
              oracle: Oracle | None = None, **kwargs: Any) -> Risk:
    """The oracle under the default configuration (or ``oracle``): see :meth:`Oracle.true_risk`."""
    return (oracle or Oracle()).true_risk(subject_history, as_of, horizon, event, **kwargs)
