"""What happened to similar patients after their ``as_of``: each indexed subject's observed future, and the
aggregate profile of a set of neighbours, released under small-cell suppression.

A subject's *future* is the set of distinct codes recorded in ``(as_of, as_of + horizon_days]`` and, for each of
:data:`OUTCOMES`, whether it happened in its window. The *profile* of ``n`` neighbours counts, per outcome and per
code, how many of them had it. :func:`released_profile` is the only form that leaves the library for a person: every
count goes through the service's small-cell rule (:func:`foresight.suppression.suppress_count`: 0-7 -> ``"<8"``,
else rounded to 5), codes held by fewer than ``threshold`` neighbours are not listed at all (listing a
code with ``"<8"`` would still say that someone near the query had it), and no subject id appears.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from foresight.suppression import SuppressionRule, suppress_count

# (name, glob patterns, window in days; None: the whole horizon)
OUTCOMES: tuple[tuple[str, tuple[str, ...], float | None], ...] = (
    ("admission_30d", ("ADMIT//*",), 30.0),
    ("admission", ("ADMIT//*",), None),
    ("emergency_admission", ("ADMIT//EMERGENCY",), None),
    ("icu_admission", ("ICU//ADMIT",), None),
    ("death", ("MEDS_DEATH",), None),
)
TOP_CODES = 10  # codes listed in a released profile, most common first


def subject_futures(con: Any, subject_ids: Sequence[int], as_of: datetime, horizon_days: float
                    ) -> dict[str, list[Any]]:
    """Columns ``subject_id``, ``codes`` (sorted distinct codes after ``as_of`` within the horizon) and one bool
    column per outcome, one row per subject of ``subject_ids`` (in that order; no events: no codes, all False)."""
    con.execute("CREATE OR REPLACE TEMP TABLE embed_futures AS SELECT unnest(?::BIGINT[]) AS subject_id",
                [[int(s) for s in subject_ids]])
    rows = con.execute(
        "SELECT e.subject_id, e.code, min(e.time) FROM events e JOIN embed_futures USING (subject_id) "
        "WHERE e.time > $as_of AND e.time <= $as_of + to_days(CAST($h AS BIGINT)) GROUP BY 1, 2",
        {"as_of": as_of, "h": round(horizon_days)}).fetchall()
    firsts: dict[int, dict[str, float]] = {}
    for sid, code, t in rows:
        firsts.setdefault(int(sid), {})[code] = (t - as_of).total_seconds() / 86400.0
    out: dict[str, list[Any]] = {"subject_id": [int(s) for s in subject_ids], "codes": []}
    for name, _, _ in OUTCOMES:
        out[name] = []
    for sid in out["subject_id"]:
        seen = firsts.get(sid, {})
        out["codes"].append(sorted(seen))
        for name, patterns, days in OUTCOMES:
            out[name].append(any((days is None or d <= days) and any(fnmatch.fnmatchcase(c, p) for p in patterns)
                                 for c, d in seen.items()))
    return out


@dataclass
class NeighbourProfile:
    """Raw counts over ``neighbours`` subjects: never shown to a person as they are (see released_profile)."""

    neighbours: int
    horizon_days: float
    outcomes: dict[str, int] = field(default_factory=dict)  # outcome -> neighbours who had it
    codes: list[tuple[str, int]] = field(default_factory=list)  # (code, neighbours who had it), most common first


def neighbour_profile(futures: dict[str, list[Any]], horizon_days: float) -> NeighbourProfile:
    """Counts over the rows of ``futures`` (the neighbours' rows of :func:`subject_futures`)."""
    n = len(futures["subject_id"])
    counts: Counter[str] = Counter(c for codes in futures["codes"] for c in set(codes))
    return NeighbourProfile(n, horizon_days, {name: int(np.sum(futures[name])) for name, _, _ in OUTCOMES},
                            sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def released_profile(profile: NeighbourProfile, rule: SuppressionRule = SuppressionRule(), top: int = TOP_CODES,
                     descriptions: dict[str, str] | None = None) -> dict[str, Any]:
    """The profile as it may be shown: every count through ``rule``; a share only where both its counts are
    released numbers; codes held by fewer than ``rule.threshold`` neighbours left out."""
    threshold = rule.threshold

    def count_rule(n: float) -> int | str:
        return suppress_count(n, rule)

    n = count_rule(profile.neighbours)

    def share(c: int | str) -> float | None:
        return round(c / n, 3) if isinstance(c, int) and isinstance(n, int) and n > 0 else None

    outcomes = []
    for name, patterns, days in OUTCOMES:
        c = count_rule(profile.outcomes.get(name, 0))
        outcomes.append({"outcome": name, "codes": list(patterns), "days": days or profile.horizon_days,
                         "neighbours_with": c, "share": share(c)})
    listed = [(code, c) for code, c in profile.codes if c >= threshold][:top]
    events = [{"code": code, "description": (descriptions or {}).get(code), "neighbours_with": count_rule(c),
               "share": share(count_rule(c))} for code, c in listed]
    return {"neighbours": n, "horizon_days": profile.horizon_days, "outcomes": outcomes, "next_events": events,
            "note": f"events within {profile.horizon_days:g} days after each neighbour's as_of; codes seen in fewer "
                    f"than {threshold} neighbours are not listed; counts below {threshold} show as '<{threshold}'"}
