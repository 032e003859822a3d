"""Cohorts and their observed history, read from the warehouse: who is alive at a date, who had some codes, and
how many matching events they had per week before it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np


def like_patterns(codes: Sequence[str]) -> list[str]:
    """Glob patterns over codes (``ADMIT//*``) as SQL LIKE patterns (escape character ``\\``)."""
    return [p.replace("%", r"\%").replace("_", r"\_").replace("*", "%").replace("?", "_") for p in codes]


def subsample(subject_ids: Sequence[int], limit: int | None, seed: int = 0) -> list[int]:
    """A seeded random subset of at most ``limit`` subjects, sorted (all of them when they fit)."""
    ids = list(subject_ids)
    if limit is not None and len(ids) > limit:
        rng = np.random.default_rng(seed)
        ids = sorted(rng.choice(ids, size=limit, replace=False).tolist())
    return ids


def cohort_as_of(con: Any, as_of: datetime, *, split: str | None = None, active_days: float | None = 3 * 365,
                 limit: int | None = None, seed: int = 0) -> list[int]:
    """Subjects alive at ``as_of`` with an event on or before it (and, by default, one in the last 3 years)."""
    where, params = ["e.time <= $as_of"], {"as_of": as_of}
    if split:
        where.append("e.subject_id IN (SELECT subject_id FROM subject_splits WHERE split = $split)")
        params["split"] = split
    rows = con.execute(
        f"""
        SELECT e.subject_id FROM events e
        WHERE {' AND '.join(where)}
        GROUP BY e.subject_id
        HAVING count(*) FILTER (WHERE e.code = 'MEDS_DEATH') = 0
           AND ($active IS NULL OR max(e.time) FILTER (WHERE e.code <> 'MEDS_BIRTH') >= $as_of - to_days($active))
        ORDER BY e.subject_id
        """,
        {**params, "active": None if active_days is None else int(active_days)},
    ).fetchall()
    return subsample([r[0] for r in rows], limit, seed)




def with_codes(con: Any, subject_ids: Sequence[int], as_of: datetime, codes: Sequence[str]) -> list[int]:
    """The subjects among ``subject_ids`` with an event matching one of ``codes`` (globs) on or before ``as_of``."""
    con.execute("CREATE OR REPLACE TEMP TABLE coded_cohort AS SELECT unnest(?::BIGINT[]) AS subject_id",
                [list(subject_ids)])
    return [r[0] for r in con.execute(
        "SELECT DISTINCT e.subject_id FROM events e JOIN coded_cohort USING (subject_id) "
        "WHERE e.time <= $as_of AND EXISTS (SELECT 1 FROM unnest($p::VARCHAR[]) p(pat) "
        "WHERE e.code LIKE p.pat ESCAPE '\\') ORDER BY 1",
        {"as_of": as_of, "p": like_patterns(codes)}).fetchall()]


def weekly_history(con: Any, subject_ids: Sequence[int], as_of: datetime, weeks: int,
                   codes: Sequence[str] = ("ADMIT//*",)) -> list[tuple[datetime, int]]:
    """Observed weekly counts of ``codes`` events among ``subject_ids`` in the ``weeks`` before ``as_of``."""
    start = as_of - timedelta(days=7 * weeks)
    con.execute("CREATE OR REPLACE TEMP TABLE history_cohort AS SELECT unnest(?::BIGINT[]) AS subject_id",
                [list(subject_ids)])
    counts = dict(con.execute(
        """
        SELECT floor(date_diff('second', $start, e.time) / (7 * 86400))::INTEGER AS w, count(*)
        FROM events e JOIN history_cohort USING (subject_id)
        WHERE e.time >= $start AND e.time < $as_of
          AND EXISTS (SELECT 1 FROM unnest($patterns::VARCHAR[]) p(pat) WHERE e.code LIKE p.pat ESCAPE '\\')
        GROUP BY w
        """,
        {"start": start, "as_of": as_of, "patterns": like_patterns(codes)},
    ).fetchall())
    return [(start + timedelta(days=7 * w), int(counts.get(w, 0))) for w in range(weeks)]


EventKey = tuple[int, str, str, int]  # subject_id, ISO time, code, occurrence (repeats of one event stay apart)


def weekly_history_events(con: Any, subject_ids: Sequence[int], as_of: datetime, weeks: int,
                          codes: Sequence[str] = ("ADMIT//*",)) -> list[tuple[datetime, frozenset[EventKey]]]:
    """The events behind each :func:`weekly_history` cell: per week, the set of matching events (its size is the
    week's count). The query service compares these sets across requests, so that two cells that differ by a
    handful of events (the differencing attack) are never both released."""
    start = as_of - timedelta(days=7 * weeks)
    con.execute("CREATE OR REPLACE TEMP TABLE history_cohort AS SELECT unnest(?::BIGINT[]) AS subject_id",
                [list(subject_ids)])
    rows = con.execute(
        """
        SELECT floor(date_diff('second', $start, e.time) / (7 * 86400))::INTEGER AS w, e.subject_id,
               strftime(e.time, '%Y-%m-%dT%H:%M:%S.%f') AS t, e.code,
               row_number() OVER (PARTITION BY e.subject_id, e.time, e.code) AS k
        FROM events e JOIN history_cohort USING (subject_id)
        WHERE e.time >= $start AND e.time < $as_of
          AND EXISTS (SELECT 1 FROM unnest($patterns::VARCHAR[]) p(pat) WHERE e.code LIKE p.pat ESCAPE '\\')
        """,
        {"start": start, "as_of": as_of, "patterns": like_patterns(codes)},
    ).fetchall()
    cells: list[set[EventKey]] = [set() for _ in range(weeks)]
    for w, sid, t, code, k in rows:
        if 0 <= w < weeks:
            cells[w].add((int(sid), t, code, int(k)))
    return [(start + timedelta(days=7 * w), frozenset(c)) for w, c in enumerate(cells)]


def arrival_events(con: Any, as_of: datetime, weeks: int, codes: Sequence[str] = ("ADMIT//*",), *,
                   split: str | None = None, lag_days: int = 364) -> list[tuple[int, str, float | None]] | None:
    """The open-cohort term's data: matching events of people who were NOT in the cohort at ``as_of - lag_days``
    (born, moved in, or back after three quiet years) in the ``weeks`` weeks after that earlier date, as
    (week index, code, age in years at the event shifted by the lag, None without a birth). The same weeks one
    year earlier (364 days: the same weekday, the same season). None when the warehouse has no event before the
    earlier date (nothing to estimate from)."""
    origin = as_of - timedelta(days=lag_days)
    first = con.execute("SELECT min(time) FROM events WHERE code <> 'MEDS_BIRTH'").fetchall()[0][0]
    if first is None or first > origin:
        return None
    members = cohort_as_of(con, origin, split=split)
    con.execute("CREATE OR REPLACE TEMP TABLE arrival_base AS SELECT unnest(?::BIGINT[]) AS subject_id", [members])
    split_sql = ("AND e.subject_id IN (SELECT subject_id FROM subject_splits WHERE split = $split)" if split
                 else "")
    rows = con.execute(
        f"""
        SELECT floor(date_diff('second', $origin, e.time) / (7 * 86400))::INTEGER AS w, e.code,
               date_diff('day', b.birth, e.time) / 365.25 AS age
        FROM events e
        LEFT JOIN (SELECT subject_id, min(time) AS birth FROM events WHERE code = 'MEDS_BIRTH' GROUP BY 1) b
          USING (subject_id)
        WHERE e.time >= $origin AND e.time < $origin + to_days($days)
          AND e.subject_id NOT IN (SELECT subject_id FROM arrival_base) {split_sql}
          AND EXISTS (SELECT 1 FROM unnest($patterns::VARCHAR[]) p(pat) WHERE e.code LIKE p.pat ESCAPE '\\')
        """,
        {"origin": origin, "days": 7 * weeks, "patterns": like_patterns(codes),
         **({"split": split} if split else {})}).fetchall()
    shift = lag_days / 365.25
    return [(int(w), str(c), None if a is None else float(a) + shift) for w, c, a in rows if 0 <= w < weeks]


ACTIVITY_DAYS = (90, 365)  # subsampling strata: days since the last event (recent, this year, quieter)


def stratified_subsample(con: Any, subject_ids: Sequence[int], as_of: datetime, limit: int,
                         seed: int = 0) -> tuple[list[int], dict[int, float], dict[int, int], dict[int, int]]:
    """A stratified random subset of ``limit`` subjects that stands for the whole cohort.

    Strata by days since the last event before ``as_of`` (:data:`ACTIVITY_DAYS`), where the
    admission rate differs most; each stratum gets a share of ``limit`` proportional to its size times the
    square root of its admissions per person in the year before (Neyman allocation for Poisson-like counts),
    at least 2 when it has 2. Weight = stratum size / subjects drawn from it, so weighted sums estimate the
    whole cohort's totals. Returns (ids, weight per id, stratum per id, people per stratum)."""
    ids = np.array(sorted(int(s) for s in subject_ids), dtype=np.int64)
    con.execute("CREATE OR REPLACE TEMP TABLE sub_cohort AS SELECT unnest(?::BIGINT[]) AS subject_id", [ids.tolist()])
    rows = con.execute(
        """
        SELECT subject_id, date_diff('day', max(time), $as_of),
               count(*) FILTER (WHERE code LIKE 'ADMIT//%' AND time >= $as_of - INTERVAL 365 DAY)
        FROM events JOIN sub_cohort USING (subject_id)
        WHERE time <= $as_of AND code <> 'MEDS_BIRTH' GROUP BY 1
        """, {"as_of": as_of}).fetchall()
    quiet = {int(s): (d, a) for s, d, a in rows}
    days = np.array([quiet.get(int(s), (10**6, 0))[0] for s in ids])
    adm = np.array([quiet.get(int(s), (0, 0))[1] for s in ids], dtype=float)
    stratum = np.searchsorted(np.array(ACTIVITY_DAYS), days, side="right")
    sizes = np.bincount(stratum, minlength=len(ACTIVITY_DAYS) + 1)
    rate = np.array([adm[stratum == h].mean() if sizes[h] else 0.0 for h in range(len(sizes))])
    share = sizes * np.sqrt(rate + 0.01)
    take = np.minimum(sizes, np.maximum(np.minimum(sizes, 2), np.floor(limit * share / share.sum()))).astype(int)
    rng = np.random.default_rng(seed)
    chosen, weights, strata = [], {}, {}
    for h in range(len(sizes)):
        if take[h] == 0:
            continue
        pick = rng.choice(ids[stratum == h], size=int(take[h]), replace=False)
        for s in pick.tolist():
            chosen.append(s)
            weights[s] = float(sizes[h] / take[h])
            strata[s] = h
    return sorted(chosen), weights, strata, {h: int(sizes[h]) for h in range(len(sizes)) if take[h]}
