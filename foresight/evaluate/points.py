"""Prediction points and their labels, read from the warehouse.

Where to predict (:func:`prediction_points`: everyone alive at an as-of date, each discharge, each admission
whose stay is complete) and what really happened after each point (:func:`observed_labels`, by the task's own
rule). Everything here is a query on the ``events`` table; nothing needs the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from foresight.evaluate.tasks import EvalTask, LabelledTask, task_spec
from foresight.forecast import like_patterns


@dataclass
class PredictionPoint:
    """Predict for ``subject_id`` with what was recorded up to ``time``."""

    subject_id: int
    time: datetime



def prediction_points(con: Any, subject_ids: Sequence[int], *, mode: str = "as_of", as_of: datetime | None = None,
                      after_code: str = "DISCHARGE//%", max_per_subject: int = 1, seed: int = 0,
                      min_follow_up_days: float = 0) -> list[PredictionPoint]:
    """Where to predict: one fixed ``as_of`` for everyone alive then, at events (e.g. each discharge), or at admissions.

    ``mode="admissions"``: each ``ADMIT//*`` whose stay is complete in the record (the next admission, discharge
    or death after it is a discharge or death, strictly later), so the stay's outcome is known; an admission
    whose stay runs past the end of the extract has no label and is left out. ``max_per_subject`` (drawn with
    ``seed``) caps the points per subject in the event modes.
    """
    con.execute("CREATE OR REPLACE TEMP TABLE eval_subjects AS SELECT unnest(?::BIGINT[]) AS subject_id",
                [list(subject_ids)])
    if mode == "as_of":
        if as_of is None:
            raise ValueError("mode='as_of' needs as_of")
        rows = con.execute(
            """SELECT e.subject_id FROM events e JOIN eval_subjects USING (subject_id)
               GROUP BY e.subject_id
               HAVING min(e.time) FILTER (WHERE e.code <> 'MEDS_BIRTH') <= $as_of
                  AND coalesce(min(e.time) FILTER (WHERE e.code = 'MEDS_DEATH'), $as_of + INTERVAL 1 DAY) > $as_of
               ORDER BY 1""", {"as_of": as_of}).fetchall()
        return [PredictionPoint(r[0], as_of) for r in rows]
    if mode in ("events", "admissions"):
        if mode == "events":
            rows = con.execute(
                """SELECT e.subject_id, e.time FROM events e JOIN eval_subjects USING (subject_id)
                   WHERE e.code LIKE $code AND e.time + to_days($fu) <=
                         (SELECT max(time) FROM events x WHERE x.subject_id = e.subject_id)
                   ORDER BY 1, 2""", {"code": after_code, "fu": int(min_follow_up_days)}).fetchall()
        else:
            # stay boundaries in time order; at one timestamp an earlier stay ends before the next one begins
            rows = con.execute(
                """WITH b AS (
                       SELECT e.subject_id, e.time, e.code LIKE 'ADMIT//%' AS is_admit,
                              lead(e.code LIKE 'ADMIT//%') OVER w AS next_admit, lead(e.time) OVER w AS next_time
                       FROM events e JOIN eval_subjects USING (subject_id)
                       WHERE e.time IS NOT NULL
                         AND (e.code LIKE 'ADMIT//%' OR e.code LIKE 'DISCHARGE//%' OR e.code = 'MEDS_DEATH')
                       WINDOW w AS (PARTITION BY e.subject_id ORDER BY e.time, e.code LIKE 'ADMIT//%', e.code))
                   SELECT DISTINCT subject_id, time FROM b
                   WHERE is_admit AND NOT next_admit AND next_time > time
                   ORDER BY 1, 2""").fetchall()
        rng = np.random.default_rng(seed)
        by_subject: dict[int, list[datetime]] = {}
        for sid, t in rows:
            by_subject.setdefault(sid, []).append(t)
        out = []
        for sid, times in by_subject.items():
            pick = sorted(rng.choice(len(times), size=min(max_per_subject, len(times)), replace=False).tolist())
            out += [PredictionPoint(sid, times[i]) for i in pick]
        return out
    raise ValueError(f"unknown mode {mode!r} (as_of, events or admissions)")


def points_table(con: Any, name: str, points: Sequence[PredictionPoint]) -> None:
    """A temp table ``name`` (i, subject_id, t) of the points, so one query can serve them all."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT unnest(?::BIGINT[]) AS i, "
                "unnest(?::BIGINT[]) AS subject_id, unnest(?::TIMESTAMP[]) AS t",
                [list(range(len(points))), [p.subject_id for p in points], [p.time for p in points]])


def observed_labels(con: Any, task: EvalTask, points: Sequence[PredictionPoint]) -> np.ndarray:
    """What really happened after each point, by the task's own rule (events strictly after the point).

    One query for all points, reading only the events the rule looks at (its codes and stop codes). Within one
    timestamp the stop codes come last: an ICU transfer recorded at the minute of discharge happened during the
    stay.
    """
    if isinstance(task, LabelledTask):  # labels given with the points (an ACES config's), not read by a rule
        return np.asarray(task.observed(points), dtype=float)
    spec, flip = task_spec(task)
    if not len(points):
        return np.zeros(0)
    points_table(con, "label_points", points)
    rows = con.execute(
        """SELECT p.i, e.time, e.code FROM label_points p JOIN events e
               ON e.subject_id = p.subject_id AND e.time > p.t AND e.time <= p.t + to_seconds($window_s)
           WHERE EXISTS (SELECT 1 FROM unnest($patterns::VARCHAR[]) x(pat) WHERE e.code LIKE x.pat ESCAPE '\\')""",
        {"window_s": float(spec.window_days) * 86400.0,
         "patterns": like_patterns([*spec.codes, *spec.stop_codes])}).fetchall()
    by_point: dict[int, list[dict[str, Any]]] = {}
    for i, t, c in rows:
        by_point.setdefault(i, []).append({"time": t, "code": c})
    labels = np.zeros(len(points))
    for i, pt in enumerate(points):
        evs = sorted(by_point.get(i, []), key=lambda e: (e["time"], bool(spec.stop_codes)
                                                         and spec.matches(e["code"], spec.stop_codes)))
        x = spec.label(evs, pt.time)
        labels[i] = 0.0 if x is None else float(x)
    return 1.0 - labels if flip else labels



def points_of_kind(con: Any, kind: str, subject_ids: Sequence[int], as_of: datetime | None, seed: int,
                   cap: int, rng: np.random.Generator) -> list[PredictionPoint]:
    """Prediction points of one kind (discharges, as_of, admissions), a seeded subsample of at most ``cap``."""
    if kind == "as_of":
        pts = prediction_points(con, subject_ids, mode="as_of", as_of=as_of)
    elif kind == "discharges":
        pts = prediction_points(con, subject_ids, mode="events", min_follow_up_days=30, max_per_subject=3,
                                seed=seed)
    else:
        pts = prediction_points(con, subject_ids, mode="admissions", max_per_subject=3, seed=seed)
    if len(pts) > cap:
        pts = [pts[i] for i in sorted(rng.choice(len(pts), cap, replace=False))]
    return pts

