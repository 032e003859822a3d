"""Evaluation: strict next-event accuracy, risk metrics with patient-bootstrap CIs, baselines, backtests.

Metrics are scikit-learn's (AUROC, AUPRC, Brier, calibration curve); this module only decides *what* is
compared:

- **Next-event accuracy, strictly**: at every held-out position whose true next token is an event code, is
  that code among the model's top-k over the WHOLE vocabulary (time, value and marker tokens compete too)?
  Reported overall, for new vs recurrent codes (first occurrence in the subject's timeline or not) and by
  kind. Baselines on the same positions: the k most frequent train codes, and a first-order Markov chain on
  codes (next code given the previous code, fitted on train).
- **Risk tasks**: labels from what really happened in the warehouse after each prediction time; predictions
  from Monte Carlo futures. Prediction points: each held-out discharge (30-day tasks: readmission framing) or
  everyone alive at an as-of date, and each held-out admission (outcomes of that stay: in-hospital mortality,
  ICU before discharge, length of stay over 7 days; :data:`ADMISSION_TASKS`). Baselines in the same run:
  prevalence and a logistic regression on count features (age, sex, counts of prior codes per kind) fitted on
  train prediction points. 95% CIs resample subjects (a patient-level bootstrap), so several prediction points
  of one patient move together.
- **Backtests of rates**: cut at an as-of date, forecast weekly counts, compare with the observed weeks
  (MAPE and interval coverage).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foresight.dataset import IGNORE_INDEX, PackedSplit
from foresight.forecast import BUILTIN_TASKS, Forecaster, TaskSpec, Timeline, _like_patterns
from foresight.schema import code_kind

# --- metrics -------------------------------------------------------------------------------------------------


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """ECE with equal-width probability bins: sum over bins of (bin share) x |mean(y) - mean(p)|."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(ece)


def risk_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC, Brier and ECE (scikit-learn where it has them); NaN when a metric is undefined."""
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    both = len(set(y.tolist())) == 2
    return {
        "auroc": float(roc_auc_score(y, p)) if both else math.nan,
        "auprc": float(average_precision_score(y, p)) if both else math.nan,
        "brier": float(brier_score_loss(y, p, pos_label=1)) if len(y) else math.nan,
        "ece": expected_calibration_error(y, p),
        "prevalence": float(y.mean()) if len(y) else math.nan,
        "n": len(y),
    }


def bootstrap_ci(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int = 200, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile CIs of every metric of :func:`risk_metrics`, resampling groups (patients) with replacement."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[g] for g in pick])
        for k, v in risk_metrics(y[idx], p[idx]).items():
            if k != "n" and not math.isnan(v):
                draws.setdefault(k, []).append(v)
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q))) for k, v in draws.items()}


def calibration_table(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Observed vs predicted per probability bin (scikit-learn's calibration_curve, uniform bins)."""
    from sklearn.calibration import calibration_curve

    if len(set(np.asarray(y).tolist())) < 2:
        return []
    frac, mean_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    return [{"predicted": float(a), "observed": float(b)} for a, b in zip(mean_pred, frac, strict=True)]


# --- strict next-event accuracy ------------------------------------------------------------------------------


@dataclass
class NextEventReport:
    positions: int
    topk: dict[str, float]  # "top1", "top5", "top10"
    new: dict[str, float]
    recurrent: dict[str, float]
    by_kind: dict[str, dict[str, float]]
    baselines: dict[str, dict[str, float]]

    def to_json(self) -> dict[str, Any]:
        return self.__dict__


@torch.no_grad()
def next_event_accuracy(forecaster: Forecaster, data_dir: str | Path, split: str = "held_out",
                        ks: Sequence[int] = (1, 5, 10), seq_len: int | None = None, batch_size: int = 8,
                        max_rows: int | None = None) -> NextEventReport:
    """Strict top-k next-event accuracy on ``split``, with the frequency and Markov baselines."""
    vocab = forecaster.vocab
    model = forecaster.model
    ps = PackedSplit(data_dir, split, vocab)
    train = PackedSplit(data_dir, "train", vocab)
    is_event = vocab.is_event
    seq_len = seq_len or int(forecaster.meta.get("training", {}).get("seq_len", 0) or 256)
    seq_len = min(seq_len, int(getattr(model.config, "max_position_embeddings", seq_len)))
    freq, markov = _fit_baselines(train, is_event, max(ks))

    plan = ps.plan(seq_len, seed=0, epoch=0)
    n_rows = plan.n_rows if max_rows is None else min(plan.n_rows, max_rows)
    hits = {k: [] for k in ks}
    base_hits: dict[str, dict[int, list[bool]]] = {"frequency": {k: [] for k in ks}, "markov": {k: [] for k in ks}}
    new_flags, kinds = [], []
    first_seen = _first_occurrences(ps)
    for r0 in range(0, n_rows, batch_size):
        rows = [ps.row(plan, r) for r in range(r0, min(r0 + batch_size, n_rows))]
        ids = torch.tensor(np.stack([x["input_ids"] for x in rows]))
        pos = torch.tensor(np.stack([x["position_ids"] for x in rows]))
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        for b, x in enumerate(rows):
            labels = x["labels"]
            ok = (labels != IGNORE_INDEX) & is_event[np.maximum(labels, 0)]
            where = np.flatnonzero(ok)
            if not len(where):
                continue
            target = labels[where]
            lg = logits[b, where]
            rank = (lg > lg[torch.arange(len(where)), torch.tensor(target)][:, None]).sum(-1).numpy()
            for k in ks:
                hits[k].extend((rank < k).tolist())
            prev = _previous_event(x["input_ids"], where, is_event)
            for k in ks:
                base_hits["frequency"][k].extend(np.isin(target, freq[:k]).tolist())
                base_hits["markov"][k].extend([int(t) in markov.get(int(pv), freq)[:k] for t, pv in zip(target, prev,
                                                                                                  strict=True)])
            subj, absolute = _absolute_positions(plan, ps, r0 + b, x)
            # the label at input position w is the token at w + 1: new if that is its first occurrence
            new_flags.extend([first_seen.get((int(subj[w + 1]), int(t)), -1) == absolute[w + 1]
                              for w, t in zip(where, target, strict=True)])
            kinds.extend(code_kind(vocab.tokens[int(t)]) for t in target)
    new = np.array(new_flags, dtype=bool)
    kinds_a = np.array(kinds)

    def acc(mask: np.ndarray | None = None, source: dict[int, list[bool]] | None = None) -> dict[str, float]:
        src = source or hits
        out = {}
        for k in ks:
            h = np.array(src[k], dtype=bool)
            out[f"top{k}"] = float(h[mask].mean()) if (mask is None or mask.any()) and len(h) else math.nan
        return out

    return NextEventReport(
        positions=len(new),
        topk=acc(),
        new=acc(new),
        recurrent=acc(~new),
        by_kind={k: {**acc(kinds_a == k), "n": int((kinds_a == k).sum())} for k in sorted(set(kinds))},
        baselines={name: acc(source=src) for name, src in base_hits.items()},
    )


def _fit_baselines(train: PackedSplit, is_event: np.ndarray, k: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Most frequent train event codes, and for each code the k most frequent next codes (Markov)."""
    toks = np.asarray(train.tokens, dtype=np.int64)
    ev = is_event[toks]
    counts = np.bincount(toks[ev], minlength=len(is_event))
    freq = np.argsort(-counts, kind="stable")[:k]
    # consecutive event codes within a subject
    subj = np.repeat(np.arange(len(train.index)), train.index["length"])
    e_pos = np.flatnonzero(ev)
    a, b = e_pos[:-1], e_pos[1:]
    same = subj[a] == subj[b]
    pairs = Counter(zip(toks[a][same].tolist(), toks[b][same].tolist(), strict=True))
    nxt: dict[int, Counter] = {}
    for (x, y), c in pairs.items():
        nxt.setdefault(x, Counter())[y] = c
    markov = {x: np.array([y for y, _ in c.most_common(k)]) for x, c in nxt.items()}
    return freq, markov


def _previous_event(ids: np.ndarray, where: np.ndarray, is_event: np.ndarray) -> np.ndarray:
    """For each label position w (predicting token w+1), the last event token at or before w (or -1)."""
    ev = is_event[ids]
    last = np.where(ev, np.arange(len(ids)), -1)
    last = np.maximum.accumulate(last)
    prev = np.where(last[where] >= 0, ids[np.maximum(last[where], 0)], -1)
    return prev


def _first_occurrences(ps: PackedSplit) -> dict[tuple[int, int], int]:
    """(subject index, token) -> absolute position of its first occurrence in the subject's timeline."""
    out: dict[tuple[int, int], int] = {}
    for i in range(len(ps)):
        toks = ps.subject_tokens(i)
        uniq, first = np.unique(toks, return_index=True)
        off = int(ps.index[i]["offset"])
        for t, f in zip(uniq.tolist(), first.tolist(), strict=True):
            out[(i, t)] = off + f
    return out


def _absolute_positions(plan: Any, ps: PackedSplit, r: int, row: dict[str, np.ndarray]) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """For each input position of row r: (subject index, absolute token position) of the token it holds."""
    lo, hi = np.searchsorted(plan.row, [r, r + 1])
    subj = np.full(len(row["input_ids"]) + 1, -1, dtype=np.int64)
    absolute = np.full(len(row["input_ids"]) + 1, -1, dtype=np.int64)
    n = 0
    for p in range(lo, hi):
        i, s, ln = int(plan.subject[p]), int(plan.start[p]), int(plan.length[p])
        pre = len(ps.continuation_prefix(i, s)) if plan.continuation[p] else s - int(ps.index[i]["offset"])
        width = pre + ln
        seg = slice(n, min(n + width, len(subj)))
        subj[seg] = i
        body = np.arange(s - pre, s + ln) if not plan.continuation[p] else \
            np.concatenate([np.full(pre, -1), np.arange(s, s + ln)])
        absolute[seg] = body[: seg.stop - seg.start]
        n += width
    return subj, absolute


# --- risk tasks --------------------------------------------------------------------------------------------


@dataclass
class PredictionPoint:
    subject_id: int
    time: datetime


@dataclass(frozen=True)
class ComplementTask:
    """A binary task that is "not ``of``": ``1 - P(of)`` from the same futures, ``1 - label(of)`` from the record.

    Length of stay over 7 days is "neither discharge nor death within 7 days of the admission". TaskSpec has no
    negation, and the complement of the Rao-Blackwellised estimate of ``of`` is just as unbiased.
    """

    name: str
    of: TaskSpec
    description: str = ""
    value: str = "binary"

    @property
    def window_days(self) -> float:
        return self.of.window_days

    def label(self, future: Sequence[dict[str, Any]], start: datetime) -> float:
        return 1.0 - float(self.of.label(future, start) or 0.0)


EvalTask = TaskSpec | ComplementTask

# Outcomes of the stay that begins at the prediction point, scored at each held-out admission (the prompt ends
# right after the admission's timestamp). A stay ends at a discharge or a death.
STAY_END = ("DISCHARGE//*", "MEDS_DEATH")
ADMISSION_TASKS: dict[str, EvalTask] = {t.name: t for t in (
    BUILTIN_TASKS["in_hospital_mortality"],
    BUILTIN_TASKS["icu_during_stay"],
    ComplementTask("los_over_7d", TaskSpec("stay_ends_within_7d", STAY_END, 7),
                   description="length of stay over 7 days (predict at admission)"),
)}
# Built-in names that mean an admission task (the numeric length_of_stay is scored as its binary form).
ADMISSION_ALIASES = {"length_of_stay": "los_over_7d"}
DEFAULT_DISCHARGE_TASKS = ("admission_30d", "emergency_admission_30d", "mortality_30d")
EVAL_POINTS = ("discharges", "as_of", "admissions")


def task_spec(task: EvalTask) -> tuple[TaskSpec, bool]:
    """The TaskSpec the futures and the record are scored with, and whether the task is its complement."""
    return (task.of, True) if isinstance(task, ComplementTask) else (task, False)


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


def _points_table(con: Any, name: str, points: Sequence[PredictionPoint]) -> None:
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
    spec, flip = task_spec(task)
    if not len(points):
        return np.zeros(0)
    _points_table(con, "label_points", points)
    rows = con.execute(
        """SELECT p.i, e.time, e.code FROM label_points p JOIN events e
               ON e.subject_id = p.subject_id AND e.time > p.t AND e.time <= p.t + to_seconds($window_s)
           WHERE EXISTS (SELECT 1 FROM unnest($patterns::VARCHAR[]) x(pat) WHERE e.code LIKE x.pat ESCAPE '\\')""",
        {"window_s": float(spec.window_days) * 86400.0,
         "patterns": _like_patterns([*spec.codes, *spec.stop_codes])}).fetchall()
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


def count_features(con: Any, points: Sequence[PredictionPoint], kinds: Sequence[str]) -> np.ndarray:
    """Per point: age (years), sex (F=1), and counts of prior events per kind — the logistic baseline's input."""
    if not len(points):
        return np.zeros((0, 2 + len(kinds)))
    # one query for all points (thousands of train points per task)
    _points_table(con, "feature_points", points)
    rows = con.execute(
        f"""SELECT p.i, date_diff('day', min(e.time) FILTER (WHERE e.code = 'MEDS_BIRTH'), p.t) / 365.25,
                   max(CASE WHEN e.code = 'GENDER//F' THEN 1 ELSE 0 END),
                   {', '.join(f"count(e.code) FILTER (WHERE fs_kind(e.code) = '{k}' AND e.time <= p.t)"
                              for k in kinds)}
            FROM feature_points p LEFT JOIN events e ON e.subject_id = p.subject_id
            GROUP BY p.i, p.t ORDER BY p.i""").fetchall()
    x = np.array([[np.nan if v is None else float(v) for v in row[1:]] for row in rows], dtype=float)
    if len(x):
        col_mean = np.nanmean(np.where(np.isnan(x), np.nan, x), axis=0)
        x = np.where(np.isnan(x), np.nan_to_num(col_mean), x)
        x[:, 2:] = np.log1p(x[:, 2:])
    return x


def evaluate_task(forecaster: Forecaster, con: Any, task: EvalTask, points: Sequence[PredictionPoint], *,
                  samples: int = 20, seed: int = 0, train_points: Sequence[PredictionPoint] = (),
                  oracle: Callable[[Sequence[PredictionPoint]], np.ndarray] | None = None,
                  n_boot: int = 200) -> dict[str, Any]:
    """Model risk vs observed outcome for ``points``, with baselines (and the oracle when given).

    Each predictor is scored on the points where it gives a number: an oracle that cannot answer the task
    (all NaN) is reported as ``oracle_note`` instead of as metrics.
    """
    from sklearn.linear_model import LogisticRegression

    spec, flip = task_spec(task)
    timelines = _timelines_at(forecaster, con, points)
    p_model, _ = forecaster.task_risks(timelines, spec, samples, seed=seed)  # Rao-Blackwellised futures
    if flip:
        p_model = 1.0 - p_model  # NaN (dead) stays NaN
    alive = ~np.isnan(p_model)  # a subject dead at the prediction time is at no risk of anything: not scored
    points = [p for p, a in zip(points, alive, strict=True) if a]
    p_model = p_model[alive]
    y = observed_labels(con, task, points)
    groups = np.array([pt.subject_id for pt in points])
    result: dict[str, Any] = {"task": task.name, "samples": samples, "points": len(points)}
    preds = {"model": p_model}
    # the time head's closed form (one forward pass per point) scored as one more predictor, when it applies
    p_head = forecaster.time_head_risks(timelines, spec)
    if p_head is not None:
        preds["model_time_head"] = (1.0 - p_head if flip else p_head)[alive]
    kinds = ["ADMIT", "DX", "RX_START", "LAB", "ICU", "ED", "RX"]
    if train_points:
        y_train = observed_labels(con, task, train_points)
        prevalence = float(y_train.mean())
        preds["prevalence"] = np.full(len(points), prevalence)
        if len(set(y_train.tolist())) == 2:
            clf = LogisticRegression(max_iter=1000).fit(count_features(con, train_points, kinds), y_train)
            preds["logistic_counts"] = clf.predict_proba(count_features(con, points, kinds))[:, 1]
    if oracle is not None:
        p_oracle = np.asarray(oracle(points), dtype=float)
        if len(p_oracle) and np.isfinite(p_oracle).any():
            preds["oracle"] = p_oracle
        else:
            result["oracle_note"] = f"no oracle: the oracle gives no probability for {task.name}"
    for name, p in preds.items():
        ok = np.isfinite(p)
        yk, pk, gk = (y, p, groups) if ok.all() else (y[ok], p[ok], groups[ok])
        result[name] = {"metrics": risk_metrics(yk, pk), "calibration": calibration_table(yk, pk),
                        "ci95": bootstrap_ci(yk, pk, gk, n_boot=n_boot, seed=seed) if len(yk) else {}}
    result["observed_rate"] = float(y.mean()) if len(y) else math.nan
    result["_y"], result["_p"] = y.tolist(), {k: v.tolist() for k, v in preds.items()}
    result["_subjects"] = groups.tolist()  # the scored points' subjects (for pooling and patient bootstraps)
    return result


def _timelines_at(forecaster: Forecaster, con: Any, points: Sequence[PredictionPoint]) -> list[Timeline]:
    by_time: dict[datetime, list[int]] = {}
    for i, pt in enumerate(points):
        by_time.setdefault(pt.time, []).append(i)
    out: list[Timeline | None] = [None] * len(points)
    for t, idx in by_time.items():
        tls = {tl.subject_id: tl for tl in forecaster.timelines_from_warehouse(
            con, [points[i].subject_id for i in idx], t)}
        for i in idx:
            out[i] = tls[points[i].subject_id]
    return [t for t in out if t is not None]


# --- backtests of population rates ---------------------------------------------------------------------------


def backtest_rates(forecast_weeks: Sequence[dict[str, Any]], observed: Sequence[int]) -> dict[str, float]:
    """MAPE of the weekly mean vs observed counts, and how often the observed week fell in the 50%/90% bands."""
    f = np.array([w["mean"] for w in forecast_weeks], dtype=float)
    o = np.array(observed, dtype=float)[: len(f)]
    nz = o > 0
    mape = float(np.mean(np.abs(f[nz] - o[nz]) / o[nz])) if nz.any() else math.nan
    in50 = np.mean([(w["p25"] <= x <= w["p75"]) for w, x in zip(forecast_weeks, o, strict=False)])
    in90 = np.mean([(w["p05"] <= x <= w["p95"]) for w, x in zip(forecast_weeks, o, strict=False)])
    return {"mape": mape, "coverage50": float(in50), "coverage90": float(in90), "weeks": len(o),
            "forecast_total": float(f.sum()), "observed_total": float(o.sum())}


def plot_calibration(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One calibration panel per task: observed vs predicted for the model and each baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(results))
    cols = min(n, 3)  # discharge and admission tasks together: a grid, not one long row
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    for ax, res in zip(axes.ravel(), results, strict=False):
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
        for name in ("model", "model_time_head", "logistic_counts", "oracle"):
            if name in res and res[name]["calibration"]:
                c = res[name]["calibration"]
                auc = res[name]["metrics"]["auroc"]
                ax.plot([x["predicted"] for x in c], [x["observed"] for x in c], marker="o", ms=3,
                        label=f"{name} (AUROC {auc:.2f})")
        ax.set_title(res["task"] + (f" (at {res['at']})" if res.get("at") else ""))
        ax.set_xlabel("predicted risk")
        ax.set_ylabel("observed rate")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no positive outcomes: calibration undefined", ha="center", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the whole report ------------------------------------------------------------------------------------------


def _data_fingerprint(db: Path, opt_out_sha256: str | None) -> str | None:
    """The tokenizer's data fingerprint of warehouse ``db``, or None if it is no warehouse."""
    import duckdb

    from foresight.tokens import data_fingerprint

    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error:
        return None
    try:
        return data_fingerprint(con, opt_out_sha256)
    except duckdb.Error:
        return None
    finally:
        con.close()


def locate_warehouse(data_dir: str | Path) -> tuple[Path | None, str]:
    """The warehouse that ``data_dir`` was tokenized from, and how it was found; (None, why not) otherwise.

    ``foresight tokenize`` records the warehouse in ``tokenize_summary.json`` (``db``). Token folders written
    before it did, or whose warehouse has moved, are matched by their data fingerprint (``vocab.json``: the
    warehouse's ETL run history) against the ``*.duckdb`` files in the folder and next to it, so a different
    warehouse is never picked by its name.
    """
    import json

    data_dir = Path(data_dir)
    summary, vocab_path = data_dir / "tokenize_summary.json", data_dir / "vocab.json"
    recorded = None
    if summary.exists():
        try:
            recorded = json.loads(summary.read_text()).get("db")
        except (OSError, ValueError) as exc:
            return None, f"{summary}: unreadable ({exc})"
    expected = opt_out = None
    if vocab_path.exists():
        try:
            vocab = json.loads(vocab_path.read_text())
            expected = vocab.get("fingerprint") or None
            opt_out = (vocab.get("report", {}).get("opt_out") or {}).get("list_sha256")
        except (OSError, ValueError) as exc:
            return None, f"{vocab_path}: unreadable ({exc})"
    if recorded and Path(recorded).exists():
        db = Path(recorded)
        how = f"recorded in {summary}"
        if expected and _data_fingerprint(db, opt_out) not in (None, expected):
            how += ("; its load history changed since the tokens were made, so labels come from the warehouse as "
                    "it is now")
        return db, how
    if recorded:
        where = f"{recorded} (recorded in {summary}) does not exist"
    else:
        where = f"{summary} records none" if summary.exists() else f"{summary} is missing"
    if expected:
        for cand in sorted({*data_dir.glob("*.duckdb"), *data_dir.parent.glob("*.duckdb")}):
            if _data_fingerprint(cand, opt_out) == expected:
                return cand, f"{where}; found by the data fingerprint of {vocab_path}"
    return None, (f"{where}, and no *.duckdb in {data_dir} or next to it has the data fingerprint of "
                  f"{vocab_path} (pass --db)")


def _points_for(con: Any, kind: str, subject_ids: Sequence[int], as_of: datetime | None, seed: int,
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


def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    *,
    db: str | Path | None = None,
    tasks: Sequence[EvalTask] = (),
    admission_tasks: Sequence[EvalTask] | None = None,
    at: Sequence[str] | None = None,
    as_of: datetime | None = None,
    samples: int = 20,
    max_points: int = 500,
    out_dir: str | Path | None = None,
    oracle: Callable[[EvalTask, Sequence[PredictionPoint]], np.ndarray] | None = None,
    seed: int = 0,
    max_rows: int | None = None,
) -> dict[str, Any]:
    """Next-event accuracy on held_out and each risk task against baselines; report.json + calibration.png.

    Warehouse (labels, prompts, baselines): ``db``, else the one ``data_dir`` was tokenized from
    (:func:`locate_warehouse`). Without one, every risk task is listed under ``skipped`` with the reason.

    Prediction points, ``at`` (default: the discharges — or everyone alive at ``as_of`` when it is given — and
    the admissions):

    - ``"discharges"``: held-out discharges with 30 days of follow-up (up to 3 per subject), for ``tasks``;
    - ``"as_of"``: held-out subjects alive at ``as_of``, for ``tasks``;
    - ``"admissions"``: held-out admissions whose stay is complete (up to 3 per subject), for
      ``admission_tasks`` (default :data:`ADMISSION_TASKS`; admission tasks named in ``tasks`` go here too);
      skipped, with the reason, when the warehouse records no admissions.

    Each kind is a seeded subsample of at most ``max_points`` held-out points; the baselines are fitted on the
    same kind of points of train subjects (at most 4 x ``max_points``). ``oracle(task, points)`` (e.g.
    :func:`foresight.pipeline.simulator_oracle`) adds the true risk where it can answer the task.
    """
    import json

    from foresight import warehouse

    at = tuple(at) if at else (("as_of",) if as_of else ("discharges",)) + ("admissions",)
    unknown = [a for a in at if a not in EVAL_POINTS]
    if unknown:
        raise ValueError(f"unknown evaluation points {unknown} (choose from {', '.join(EVAL_POINTS)})")
    if "as_of" in at and as_of is None:
        raise ValueError("evaluation points 'as_of' need an as-of date")
    # admission tasks named among the tasks are scored at admissions, whatever list they came in
    point_tasks: list[EvalTask] = []
    adm_tasks: list[EvalTask] = [] if admission_tasks is not None else list(ADMISSION_TASKS.values())
    adm_tasks += list(admission_tasks or ())
    for t in tasks:
        name = ADMISSION_ALIASES.get(t.name, t.name)
        if name in ADMISSION_TASKS:
            adm_tasks.append(ADMISSION_TASKS[name] if t.name in ADMISSION_ALIASES else t)
        else:
            point_tasks.append(t)
    adm_tasks = list({t.name: t for t in adm_tasks}.values())
    plan = [(kind, adm_tasks if kind == "admissions" else point_tasks) for kind in at]

    forecaster = Forecaster.from_pretrained(model_dir)
    out_dir = Path(out_dir or Path(model_dir) / "evaluation")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": str(model_dir), "data": str(data_dir), "created": datetime.now().isoformat()}
    report["next_event"] = next_event_accuracy(forecaster, data_dir, max_rows=max_rows).to_json()
    if db is not None:
        found: Path | None = Path(db)
        report["warehouse"] = {"path": str(db), "found": "given (--db)"}
    else:
        found, how = locate_warehouse(data_dir)
        report["warehouse"] = {"path": str(found) if found else None, "found" if found else "missing": how}
    task_results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    points_used: dict[str, dict[str, int]] = {}

    def skip(kind: str, task_list: Sequence[EvalTask], reason: str) -> None:
        skipped.extend({"task": t.name, "at": kind, "reason": reason} for t in task_list)

    if found is None:
        for kind, task_list in plan:
            skip(kind, task_list, f"no warehouse to take labels from: {report['warehouse']['missing']}")
    elif any(task_list for _, task_list in plan):
        con = warehouse.connect(found, read_only=True)
        try:
            rng = np.random.default_rng(seed)
            ids = {s: [r[0] for r in con.execute("SELECT subject_id FROM subject_splits WHERE split = ?",
                                                  [s]).fetchall()] for s in ("train", "held_out")}
            for kind, task_list in plan:
                if not task_list:
                    continue
                if kind == "admissions" and not con.execute(
                        "SELECT count(*) FROM (SELECT 1 FROM events WHERE code LIKE 'ADMIT//%' LIMIT 1)"
                ).fetchall()[0][0]:
                    skip(kind, task_list, f"{found} records no admissions (no ADMIT//* events)")
                    continue
                held = _points_for(con, kind, ids["held_out"], as_of, seed, max_points, rng)
                train = _points_for(con, kind, ids["train"], as_of, seed, 4 * max_points, rng)
                points_used[kind] = {"held_out": len(held), "train": len(train)}
                if not held:
                    skip(kind, task_list, f"no held-out prediction points at {kind} in {found}")
                    continue
                for task in task_list:
                    if task.value != "binary":
                        skip(kind, [task], f"{task.value}-valued task: only binary tasks are scored "
                                           f"(length of stay is scored as los_over_7d at admissions)")
                        continue
                    orc = (lambda pts, t=task: oracle(t, pts)) if oracle else None
                    res = evaluate_task(forecaster, con, task, held, samples=samples, seed=seed,
                                        train_points=train, oracle=orc)
                    res["at"] = kind
                    res["description"] = task.description
                    task_results.append(res)
        finally:
            con.close()
    report["eval_points"] = points_used
    report["tasks"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in task_results]
    report["skipped"] = skipped
    report["calibration_plot"] = (str(plot_calibration(task_results, out_dir / "calibration.png"))
                                  if task_results else None)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    report["report"] = str(out_dir / "report.json")
    return report
