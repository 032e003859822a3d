"""The simulation engine: lives as competing risks, vectorised over subjects (numpy; no per-event Python loop).

Every row of a :class:`State` is one life (or, for the oracle, one replicate of one life from a given moment).
Hazards are constant between *boundaries* (a birthday, 30/90/365 days after the last discharge, the end time), so
each loop iteration does, for every active row at once:

1. evaluate all hazards (one matrix product of features and log hazard ratios, plus the base rate at this age);
2. draw the time to the next candidate event from the total dominating rate ``sum_k rate_k * (1 + amplitude_k)``;
   a candidate beyond the next boundary just moves the row to the boundary;
3. pick the process of the candidate in proportion to its dominating rate and accept it with probability
   ``season_k(t) / (1 + amplitude_k)`` (thinning: exact for the seasonal hazards, no time grid);
4. apply accepted events: an onset sets a condition bit; an admission runs the whole stay at once (length, ICU,
   in-hospital death, discharge, effects) and moves the row to its discharge; a death ends the row.

While a row's interval runs, the outputs that change nothing (primary-care visits with their vitals, labs and
prescriptions) are drawn for it from the ``gp`` processes, when a :class:`Sink` collects events.

The oracle runs the same loop on replicated rows with a :class:`Task`: the target part of each process is removed
from the path and its hazard integrated instead (Rao-Blackwellisation), so P(event by t_end) per replicate is
``1 - exp(-integral)`` unless the path reaches the target another way (an in-hospital death, a pending ICU
transfer), in which case it is 1.
"""

from __future__ import annotations

import numpy as np

from foresight.simulate import catalog as cat
from foresight.simulate.model import RECENCY_EDGES, YEAR, Model
from foresight.simulate.state import (
    E_ACUTE,
    E_DIAGNOSIS,
    E_ELECTIVE,
    E_EMERGENCY,
    E_ROUTINE,
    F_DX_ACUTE,
    F_DX_CHRONIC,
    F_DX_EXTRA,
    F_DX_PRINCIPAL,
    F_DX_SECONDARY,
    N_ACUTE,
    N_DIAGNOSIS,
    N_DISCHARGE,
    N_ROUTINE,
    Pending,
    Sink,
    State,
    Task,
)

HOUR = 1.0 / 24.0


_CAUSE_SETS = np.array([sum(1 << cat.BIT[b] for b in c.sets) for c in cat.CAUSES], dtype=np.int64)
_CAUSE_ELECTIVE = np.array([c.admit == "ELECTIVE" for c in cat.CAUSES])
_CAUSE_CODE = np.array([cat.CODE_ID[f"CAUSE_{c.name}"] for c in cat.CAUSES], dtype=np.int32)
_CAUSE_PX = np.array([cat.CODE_ID.get(f"PX_{c.name}", -1) for c in cat.CAUSES], dtype=np.int32)
_CAUSE_EXTRA = np.array([cat.CODE_ID[f"DX_{c.extra_dx[0]}"] if c.extra_dx else -1 for c in cat.CAUSES],
                        dtype=np.int32)
_CAUSE_EVIDENCE = np.array([cat.BIT_EVIDENCE.get(cat.VOCAB.codes[_CAUSE_CODE[i]], 0)
                            | (cat.BIT_EVIDENCE.get(cat.VOCAB.codes[_CAUSE_PX[i]], 0) if _CAUSE_PX[i] >= 0 else 0)
                            for i in range(len(cat.CAUSES))], dtype=np.int64)
_BIT_CODE = np.array([cat.CODE_ID[f"COND_{c.name}"] for c in cat.CONDITIONS], dtype=np.int32)
_ACUTE_CODE = np.array([cat.CODE_ID[f"ACUTE_{a.name}"] for a in cat.ACUTES], dtype=np.int32)
_DRUG_CODE = np.array([cat.CODE_ID[f"RX_{d.key}"] for d in cat.DRUGS], dtype=np.int32)
_DRUG_CHRONIC = np.array([d.chronic for d in cat.DRUGS])
_M = {m.key: cat.CODE_ID[f"M_{m.key}"] for m in cat.MEASURES}
_DEC = {m.key: m.decimals for m in cat.MEASURES}
_ANTIHYPERTENSIVE = sum(1 << cat.DRUG[k] for k in ("LISINOPRIL", "LOSARTAN", "AMLODIPINE", "HCTZ"))
_STATIN = 1 << cat.DRUG["SIMVASTATIN"]
_INSULIN = 1 << cat.DRUG["INSULIN_GLARGINE"]


def _bit(cond: np.ndarray, name: str) -> np.ndarray:
    return ((cond >> cat.BIT[name]) & 1).astype(bool)




class Engine:
    """Runs :class:`State` rows forward to their ``t_end`` under a :class:`Model`."""

    def __init__(self, model: Model) -> None:
        self.m = model
        pe = model.n_engine
        self.pe = pe
        self.is_admission = model.kind[:pe] == 1
        self.amp_e = model.amp[:pe]

    # -- the loop --

    def run(self, st: State, rng: np.random.Generator, *, sink: Sink | None = None, task: Task | None = None,
            weekly_edges: np.ndarray | None = None, weekly_emergency_only: bool = False,
            pending: Pending | None = None) -> dict[str, np.ndarray]:
        """Advance every live row to its ``t_end`` (or death).

        Returns ``acc`` (integrated target hazard) and ``hit`` (time the path reached the target, inf if not)
        for a task, and ``weekly`` ((n, W) expected admissions per bin, as compensator integrals) when
        ``weekly_edges`` are given.
        """
        m, pe = self.m, self.pe
        out: dict[str, np.ndarray] = {}
        acc = np.zeros(st.n) if task is not None else None
        hit = np.full(st.n, np.inf) if task is not None else None
        weekly = np.zeros((st.n, len(weekly_edges) - 1)) if weekly_edges is not None else None
        if weekly is not None:
            wmask = (m.emergency if weekly_emergency_only else self.is_admission).astype(float)
        if pending is not None:
            if acc is not None and pending.acc0 is not None:
                acc[pending.rows] += pending.acc0
            self._complete_stays(st, pending.rows, pending.cause, pending.t_adm, pending.los, pending.icu,
                                 pending.die, rng, sink, task, hit, acc, p_die=pending.p_die)
        frac = task.frac if task is not None else np.zeros(pe)
        keep = 1.0 - frac
        procs = slice(None) if sink is not None else slice(0, pe)
        active = np.flatnonzero(st.alive & (st.t < st.t_end))
        while active.size:
            idx = active
            t = st.t[idx]
            age = (t - st.birth[idx]) / YEAR
            since = t - st.last_dis[idx]
            cond = st.cond[idx]
            x = m.features(st.male[idx], st.race[idx], st.hisp[idx], cond, st.n_adm[idx], since)
            lam_all = m.rates(age, x, cond, procs)
            lam = lam_all[:, :pe]
            b = np.minimum(self._next_birthday(st.birth[idx], t, age), st.t_end[idx])
            b = np.minimum(b, _next_recency(st.last_dis[idx], t))
            lam_sim = lam * keep
            dom = lam_sim * (1.0 + self.amp_e)
            total = dom.sum(1)
            with np.errstate(divide="ignore"):
                tc = t + rng.standard_exponential(idx.size) / total
            happen = tc < b
            seg_end = np.where(happen, tc, b)
            if acc is not None:
                acc[idx] += m.season_integral(lam * frac, t, seg_end, slice(0, pe))
            if weekly is not None:
                weekly[idx] += self._binned_integral(lam * wmask, t, seg_end, weekly_edges)
            if sink is not None:
                self._gp_visits(st, idx, t, seg_end, lam_all[:, pe:], rng, sink)
            st.t[idx] = seg_end
            h = np.flatnonzero(happen)
            if h.size:
                self._apply_candidates(st, idx[h], tc[h], dom[h], total[h], rng, sink, task, hit, acc)
            done = ~st.alive[idx] | (st.t[idx] >= st.t_end[idx])
            if hit is not None:
                done |= hit[idx] <= st.t_end[idx]
            active = idx[~done]
        if acc is not None:
            out["acc"], out["hit"] = acc, hit
        if weekly is not None:
            out["weekly"] = weekly
        return out

    def _apply_candidates(self, st: State, rows: np.ndarray, tc: np.ndarray, dom: np.ndarray, total: np.ndarray,
                          rng: np.random.Generator, sink: Sink | None, task: Task | None, hit: np.ndarray | None,
                          acc: np.ndarray | None) -> None:
        """Pick each candidate's process by its dominating rate, thin by the season, and apply the accepted events:
        an onset, a whole stay, or a death (in this order, so the random stream is fixed)."""
        m, pe = self.m, self.pe
        u = rng.random(rows.size) * total
        k = np.minimum((np.cumsum(dom, 1) < u[:, None]).sum(1), pe - 1)
        ok = rng.random(rows.size) * (1.0 + self.amp_e[k]) < m.season(k, tc)
        rows, k, th = rows[ok], k[ok], tc[ok]
        kind = m.kind[k]
        sel = kind == 0
        if sel.any():
            self._onsets(st, rows[sel], m.target[k[sel]], th[sel], rng, sink)
        sel = kind == 1
        if sel.any():
            r, c, ta = rows[sel], m.target[k[sel]], th[sel]
            los, icu, die, p_die = self.sample_stays(st, r, c, ta, rng, no_icu=task is not None and task.icu)
            self._complete_stays(st, r, c, ta, los, icu, die, rng, sink, task, hit, acc, p_die=p_die)
        sel = kind == 2
        if sel.any():
            r = rows[sel]
            st.alive[r] = False
            st.death_t[r] = th[sel]
            if sink is not None:
                sink.emit(r, th[sel], cat.CODE_ID["DEATH"])
            if task is not None and task.death:
                hit[r] = np.minimum(hit[r], th[sel])

    @staticmethod
    def _next_birthday(birth: np.ndarray, t: np.ndarray, age: np.ndarray) -> np.ndarray:
        ai = np.floor(age + 1e-9)
        nb = birth + (ai + 1.0) * YEAR
        # Float rounding at a birthday must never give a boundary at or before now (the row would not move).
        return np.where(nb <= t + 1e-7, nb + YEAR, nb)

    def _binned_integral(self, w: np.ndarray, t0: np.ndarray, t1: np.ndarray, edges: np.ndarray) -> np.ndarray:
        """(n, W): integral of sum_k w_k season_k over [t0, t1) intersected with each bin of ``edges``."""
        m = self.m
        sl = slice(0, self.pe)
        a, ph = m.amp[sl], m.phase[sl]
        tot = w.sum(1)[:, None]
        c = (w @ (a * np.cos(ph)))[:, None]
        s = (w @ (a * np.sin(ph)))[:, None]
        lo = np.clip(edges[None, :-1], t0[:, None], t1[:, None])
        hi = np.clip(edges[None, 1:], t0[:, None], t1[:, None])
        om = 2.0 * np.pi / 365.2425
        return tot * (hi - lo) + (c * (np.sin(om * hi) - np.sin(om * lo))
                                  - s * (np.cos(om * hi) - np.cos(om * lo))) / om

    # -- stays --

    def sample_stays(self, st: State, rows: np.ndarray, cause: np.ndarray, t_adm: np.ndarray,
                     rng: np.random.Generator, *, no_icu: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Length of stay (days), ICU, in-hospital death and its probability for admissions at ``t_adm``."""
        m = self.m
        stays = m.config["stays"]
        age = (t_adm - st.birth[rows]) / YEAR
        los = stays["los_min_days"] + np.exp(m.los_log_mu(cause, age) + stays["los_sigma"] * rng.standard_normal(
            rows.size))
        icu = rng.random(rows.size) < m.p_icu[cause]
        if no_icu:
            icu[:] = False
        p_die = m.p_death(cause, age, st.cond[rows], icu)
        return los, icu, rng.random(rows.size) < p_die, p_die

    def _complete_stays(self, st: State, rows: np.ndarray, cause: np.ndarray, t_adm: np.ndarray, los: np.ndarray,
                        icu: np.ndarray, die: np.ndarray, rng: np.random.Generator, sink: Sink | None,
                        task: Task | None, hit: np.ndarray | None, acc: np.ndarray | None = None, *,
                        p_die: np.ndarray | None = None) -> None:
        """Run whole stays: emit their events, apply their effects, move the rows to their discharge."""
        t_dis = t_adm + los
        stays = self.m.config["stays"]
        t_icu = t_adm + stays["icu_after_hours"] * HOUR
        if task is not None:
            # Rao-Blackwellise the target marks of the stay: integrate their probability, keep the path without.
            in_time = t_dis <= st.t_end[rows]
            if task.death and p_die is not None:
                acc[rows] -= np.log1p(-p_die * in_time)
                die = np.zeros(rows.size, bool)
        cond_before = st.cond[rows]
        cond_after = cond_before | _CAUSE_SETS[cause]
        if sink is not None:
            self._emit_stays(st, rows, cause, t_adm, t_dis, t_icu, icu, die, cond_before, cond_after, rng, sink)
        if st.onset is not None:
            new = cond_after & ~cond_before
            for b in range(cat.N_BITS):
                nb = ((new >> b) & 1).astype(bool)
                st.onset[rows[nb], b] = t_dis[nb]
        st.cond[rows] = cond_after
        st.n_adm[rows] += 1
        st.last_dis[rows] = t_dis
        st.t[rows] = t_dis
        st.alive[rows[die]] = False
        st.death_t[rows[die]] = t_dis[die]
        if task is not None and task.death:
            hit[rows[die]] = np.minimum(hit[rows[die]], t_dis[die])

    def _emit_stays(self, st: State, rows: np.ndarray, cause: np.ndarray, t_adm: np.ndarray, t_dis: np.ndarray,
                    t_icu: np.ndarray, icu: np.ndarray, die: np.ndarray, cond_before: np.ndarray,
                    cond_after: np.ndarray, rng: np.random.Generator, sink: Sink) -> None:
        m = self.m
        n = rows.size
        stays = m.config["stays"]
        enc = sink.new_enc(n)
        elective = _CAUSE_ELECTIVE[cause]
        sink.emit(rows, t_adm, np.where(elective, cat.CODE_ID["ADMIT_ELECTIVE"], cat.CODE_ID["ADMIT_EMERGENCY"]), enc)
        sink.encounter(rows, enc, t_adm, t_dis, np.where(elective, E_ELECTIVE, E_EMERGENCY), cause)
        # Labs one hour in: the panel and the values depend on the cause (the oracle's posterior uses both).
        age = (t_adm - st.birth[rows]) / YEAR
        mu = m.lab_log_mu(cause, age, st.male[rows].astype(float), cond_before)
        t_lab = t_adm + stays["labs_after_hours"] * HOUR
        for j, code in enumerate(m.lab_ids):
            drawn = rng.random(n) < m.lab_draw[j, cause]
            z = rng.standard_normal(n)
            val = np.exp(mu[:, j] + m.lab_sigma[j] * z)
            key = cat.VOCAB.codes[code].rsplit("//", 1)[-1]
            dec = next(mm.decimals for mm in cat.MEASURES if mm.loinc == key)
            sink.emit(rows[drawn], t_lab[drawn], code, enc[drawn], np.round(val[drawn], dec))
        # ICU two hours in; leaves it part-way through the stay, or dies in it.
        if icu.any():
            r = np.flatnonzero(icu)
            end = np.where(die[r], t_dis[r], t_icu[r] + rng.uniform(0.3, 0.9, r.size) * (t_dis[r] - t_icu[r]))
            sink.emit(rows[r], t_icu[r], cat.CODE_ID["ICU_ADMIT"], enc[r])
            sink.emit(rows[r], end, cat.CODE_ID["ICU_DISCHARGE"], enc[r])
            for k, v in (("row", rows[r]), ("enc", enc[r]), ("start", t_icu[r]), ("stop", end)):
                sink.icu[k].append(v)
        # At discharge: the coding (principal, extra, procedure, every other known condition), where to, drugs.
        sink.emit(rows, t_dis, _CAUSE_CODE[cause], enc, flag=F_DX_PRINCIPAL)
        extra = _CAUSE_EXTRA[cause]
        has = extra >= 0
        sink.emit(rows[has], t_dis[has], extra[has], enc[has], flag=F_DX_EXTRA)
        fracture = cause == cat.CAUSE["HIP_FRACTURE"]
        px = _CAUSE_PX[cause]
        has_px = px >= 0
        sink.emit(rows[has_px], t_dis[has_px], px[has_px], enc[has_px])
        secondary = cond_after & ~_CAUSE_EVIDENCE[cause]
        bits = (secondary[:, None] >> np.arange(cat.N_BITS)) & 1
        ri, bi = np.nonzero(bits)
        sink.emit(rows[ri], t_dis[ri], _BIT_CODE[bi], enc[ri], flag=F_DX_SECONDARY)
        p_snf = 1.0 / (1.0 + np.exp(-(-3.5 + 0.07 * (age - 75.0) + 1.5 * _bit(cond_before, "DEMENTIA")
                                      + 1.5 * fracture + 1.2 * (cause == cat.CAUSE["STROKE"]))))
        u = rng.random(n)
        dest = np.where(die, 3, np.where(u < p_snf, 2, np.where(u < p_snf + 0.12 * (age > 65), 1, 0)))
        dis_codes = np.array([cat.CODE_ID[f"DISCHARGE_{d}"] for d in cat.DISCHARGES], dtype=np.int32)
        sink.emit(rows, t_dis, dis_codes[dest], enc)
        sink.emit(rows[die], t_dis[die], cat.CODE_ID["DEATH"])
        alive = ~die
        for ci in np.unique(cause[alive]):
            sel = np.flatnonzero(alive & (cause == ci))
            for key in cat.CAUSES[ci].discharge_rx:
                self._start_drug(st, rows[sel], t_dis[sel], enc[sel], cat.DRUG[key], 0.8, rng, sink)
        sink.note(rows, t_dis, N_DISCHARGE, cause, cond_after, (t_dis - st.birth[rows]) / YEAR, die)

    # -- onsets and primary care --

    def _onsets(self, st: State, rows: np.ndarray, bit: np.ndarray, t: np.ndarray, rng: np.random.Generator,
                sink: Sink | None) -> None:
        st.cond[rows] |= np.left_shift(1, bit)
        if st.onset is not None:
            st.onset[rows, bit] = t
        if sink is None:
            return
        n = rows.size
        enc = sink.new_enc(n)
        sink.emit(rows, t, cat.CODE_ID["GP"], enc)
        sink.emit(rows, t, _BIT_CODE[bit], enc, flag=F_DX_CHRONIC)
        sink.encounter(rows, enc, t, t + 0.25 * HOUR, E_DIAGNOSIS, bit)
        age = (t - st.birth[rows]) / YEAR
        sink.note(rows, t, N_DIAGNOSIS, bit, st.cond[rows], age)
        self._diagnostic_measures(st, rows, bit, t, enc, age, rng, sink)
        for b in np.unique(bit):
            sel = np.flatnonzero(bit == b)
            for key, p in cat.ONSET_RX.get(cat.CONDITIONS[b].name, ()):
                self._start_drug(st, rows[sel], t[sel], enc[sel], cat.DRUG[key], p, rng, sink)

    @staticmethod
    def _start_drug(st: State, rows: np.ndarray, t: np.ndarray, enc: np.ndarray, drug: int, p: float,
                    rng: np.random.Generator, sink: Sink) -> None:
        """Prescribe ``drug`` with probability ``p``; a chronic drug is started only once per life."""
        if rows.size == 0:
            return
        go = rng.random(rows.size) < p
        if _DRUG_CHRONIC[drug]:
            go &= (st.rx[rows] >> drug) & 1 == 0
            st.rx[rows[go]] |= 1 << drug
        sink.emit(rows[go], t[go], _DRUG_CODE[drug], enc[go])

    def _diagnostic_measures(self, st: State, rows: np.ndarray, bit: np.ndarray, t: np.ndarray, enc: np.ndarray,
                             age: np.ndarray, rng: np.random.Generator, sink: Sink) -> None:
        """The measurement that made the diagnosis, recorded at the diagnosis visit."""
        n = rows.size
        z = rng.standard_normal(n)
        sel = bit == cat.BIT["T2D"]
        _emit_measure(sink, "HBA1C", rows, t, enc, sel, np.clip(7.6 + 1.0 * z, 6.5, 14.0))
        sel = bit == cat.BIT["CKD"]
        egfr = np.clip(50.0 + 6.0 * z, 20.0, 59.0)
        _emit_measure(sink, "EGFR", rows, t, enc, sel, egfr)
        _emit_measure(sink, "CREAT", rows, t, enc, sel, _creatinine(egfr, age, st.male[rows], st.race[rows]))
        sel = bit == cat.BIT["HF"]
        _emit_measure(sink, "BNP", rows, t, enc, sel, np.exp(np.log(600.0) + 0.6 * z))
        sel = bit == cat.BIT["HTN"]
        sbp = np.maximum(150.0 + 10.0 * z, 140.0)
        _emit_measure(sink, "SBP", rows, t, enc, sel, sbp)
        _emit_measure(sink, "DBP", rows, t, enc, sel, 0.45 * sbp + 22.0 + 6.0 * rng.standard_normal(n))
        sel = bit == cat.BIT["OBESITY"]
        _emit_measure(sink, "BMI", rows, t, enc, sel, 30.0 + rng.gamma(2.0, 2.5, n))

    def _gp_visits(self, st: State, idx: np.ndarray, t0: np.ndarray, t1: np.ndarray, lam_gp: np.ndarray,
                   rng: np.random.Generator, sink: Sink) -> None:
        """Primary-care visits over [t0, t1) for rows ``idx`` (thinned for seasonal reasons)."""
        m, pe = self.m, self.pe
        amp = m.amp[pe:]
        dom = lam_gp * (1.0 + amp)
        total = dom.sum(1)
        dt = t1 - t0
        cnt = rng.poisson(total * dt)
        if not cnt.any():
            return
        r = np.repeat(np.arange(idx.size), cnt)
        tv = t0[r] + rng.random(r.size) * dt[r]
        u = rng.random(r.size) * total[r]
        g = np.minimum((np.cumsum(dom[r], 1) < u[:, None]).sum(1), dom.shape[1] - 1)
        keep = rng.random(r.size) * (1.0 + amp[g]) < m.season(pe + g, tv)
        r, tv, g = r[keep], tv[keep], g[keep]
        # Visits in time order within a row, so "started once" drugs go to the first visit that starts them.
        order = np.lexsort((tv, r))
        r, tv, g = r[order], tv[order], g[order]
        rows = idx[r]
        acute = m.target[pe + g]
        n = rows.size
        enc = sink.new_enc(n)
        sink.emit(rows, tv, cat.CODE_ID["GP"], enc)
        is_acute = acute >= 0
        sink.encounter(rows, enc, tv, tv + 0.25 * HOUR, np.where(is_acute, E_ACUTE, E_ROUTINE), acute)
        age = (tv - st.birth[rows]) / YEAR
        cond = st.cond[rows]
        a = np.flatnonzero(is_acute)
        sink.emit(rows[a], tv[a], _ACUTE_CODE[acute[a]], enc[a], flag=F_DX_ACUTE)
        for ai, spec in enumerate(cat.ACUTES):
            sel = a[acute[a] == ai]
            for key, p in spec.rx:
                self._start_drug(st, rows[sel], tv[sel], enc[sel], cat.DRUG[key], p, rng, sink)
        sink.note(rows[a], tv[a], N_ACUTE, acute[a], cond[a], age[a])
        rt = np.flatnonzero(~is_acute)
        sink.note(rows[rt], tv[rt], N_ROUTINE, -1, cond[rt], age[rt])
        self._routine_measures(st, rows, tv, enc, age, cond, is_acute, rng, sink)
        for key, need, p in cat.FOLLOWUP_RX:
            sel = rt[_bit(cond[rt], need)]
            self._start_drug(st, rows[sel], tv[sel], enc[sel], cat.DRUG[key], p, rng, sink)

    def _routine_measures(self, st: State, rows: np.ndarray, t: np.ndarray, enc: np.ndarray, age: np.ndarray,
                          cond: np.ndarray, is_acute: np.ndarray, rng: np.random.Generator, sink: Sink) -> None:
        """Vitals and labs at a primary-care visit: which are taken and their values follow the chronic state."""
        n = rows.size
        if n == 0:
            return
        u = lambda: rng.random(n)  # noqa: E731 - a fresh uniform per decision keeps the draws independent
        zz = lambda: rng.standard_normal(n)  # noqa: E731
        male = st.male[rows]
        rx = st.rx[rows]
        adult = age >= 18
        b = {name: _bit(cond, name) for name in ("HTN", "OBESITY", "T2D", "CKD", "HF", "AF", "CAD", "HX_MI")}
        since = {name: np.nan_to_num((t - st.onset[rows, cat.BIT[name]]) / YEAR) for name in ("T2D", "CKD", "HF")}
        routine = ~is_acute
        # Blood pressure
        sel = np.where(adult, u() < np.where(routine, 0.35 + 0.35 * b["HTN"], 0.2), u() < 0.1)
        treated = (rx & _ANTIHYPERTENSIVE) != 0
        sbp = (112.0 + 0.45 * np.maximum(age - 25.0, 0.0) + 14.0 * b["HTN"] - 8.0 * (b["HTN"] & treated)
               + 4.0 * b["OBESITY"] + 4.0 * male + 11.0 * zz())
        sbp = np.where(adult, sbp, 100.0 + 0.8 * age + 8.0 * zz())
        _emit_measure(sink, "SBP", rows, t, enc, sel, sbp)
        _emit_measure(sink, "DBP", rows, t, enc, sel, 0.45 * sbp + 18.0 + 6.0 * zz())
        # BMI
        sel = routine & (u() < np.where(adult, 0.25 + 0.25 * b["OBESITY"], 0.2))
        bmi = np.where(b["OBESITY"], 30.0 + rng.gamma(2.0, 2.5, n),
                       np.clip(24.5 + 0.04 * (age - 20.0) + 2.6 * zz(), 16.0, 29.9))
        bmi = np.where(adult, bmi, np.clip(15.5 + 0.35 * age + 2.0 * zz(), 12.0, 29.9))
        _emit_measure(sink, "BMI", rows, t, enc, sel, bmi)
        # HbA1c
        p = np.where(b["T2D"], 0.5, 0.12 * b["OBESITY"] + 0.04 * (age >= 40))
        sel = routine & adult & (u() < p)
        on_insulin = (rx & _INSULIN) != 0
        a1c = np.where(b["T2D"], np.clip(7.0 + 0.06 * since["T2D"] - 0.4 * on_insulin + 0.9 * zz(), 5.5, 15.0),
                       np.clip(5.3 + 0.006 * (age - 40.0) + 0.25 * b["OBESITY"] + 0.3 * zz(), 4.0, 6.4))
        _emit_measure(sink, "HBA1C", rows, t, enc, sel, a1c)
        # Kidney function: eGFR and the creatinine it is computed from
        p = np.maximum.reduce([0.6 * b["CKD"], 0.35 * b["T2D"], 0.25 * b["HTN"], 0.08 * (age >= 60)])
        sel = routine & adult & (u() < p)
        egfr = np.where(b["CKD"], np.clip(52.0 - 1.6 * since["CKD"] + 6.0 * zz(), 5.0, 59.0),
                        np.clip(105.0 - 0.75 * np.maximum(age - 30.0, 0.0) + 8.0 * zz(), 60.0, 140.0))
        _emit_measure(sink, "EGFR", rows, t, enc, sel, egfr)
        _emit_measure(sink, "CREAT", rows, t, enc, sel, _creatinine(egfr, age, male, st.race[rows]))
        # BNP
        sel = routine & (u() < 0.3 * b["HF"] + 0.05 * b["AF"])
        bnp = np.where(b["HF"], np.exp(np.log(300.0) + 0.1 * since["HF"] + 0.6 * zz()),
                       np.exp(np.log(30.0) + 0.02 * (age - 50.0) + 0.6 * zz()))
        _emit_measure(sink, "BNP", rows, t, enc, sel, bnp)
        # Lipids
        p = np.where(b["T2D"] | b["CAD"] | b["HX_MI"], 0.25, 0.08 * (age >= 40))
        sel = routine & (u() < p)
        chol = np.clip(195.0 + 0.4 * (age - 40.0) - 45.0 * ((rx & _STATIN) != 0) + 32.0 * zz(), 100.0, 350.0)
        _emit_measure(sink, "CHOL", rows, t, enc, sel, chol)
        _emit_measure(sink, "LDL", rows, t, enc, sel, np.clip(0.62 * chol - 8.0 + 10.0 * zz(), 30.0, 250.0))
        # Haemoglobin
        sel = routine & adult & (u() < 0.08 + 0.2 * b["CKD"])
        _emit_measure(sink, "HGB", rows, t, enc, sel, 13.4 + 1.4 * male - 1.2 * b["CKD"] + 1.0 * zz())


def _next_recency(last_dis: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The next 30/90/365-day mark after the last discharge that lies after ``t`` (inf if none)."""
    nxt = np.full(t.shape, np.inf)
    for edge in reversed(RECENCY_EDGES):
        mark = last_dis + edge
        nxt = np.where(mark > t + 1e-7, mark, nxt)
    return nxt


def _creatinine(egfr: np.ndarray, age: np.ndarray, male: np.ndarray, race: np.ndarray) -> np.ndarray:
    """Serum creatinine (mg/dL) that gives ``egfr`` under the 4-variable MDRD equation."""
    a = np.maximum(age, 18.0)
    k = 175.0 * a ** -0.203 * np.where(male, 1.0, 0.742) * np.where(race == 1, 1.212, 1.0)
    return (egfr / k) ** (-1.0 / 1.154)


def _emit_measure(sink: Sink, key: str, rows: np.ndarray, t: np.ndarray, enc: np.ndarray, sel: np.ndarray,
                  values: np.ndarray) -> None:
    sel = np.flatnonzero(sel)
    sink.emit(rows[sel], t[sel], _M[key], enc[sel], np.round(values[sel], _DEC[key]))
