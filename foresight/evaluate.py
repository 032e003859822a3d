"""Evaluation: strict next-event accuracy, risk metrics with patient-bootstrap CIs, baselines, backtests.

Metrics are scikit-learn's (AUROC, AUPRC, Brier, calibration curve); this module only decides *what* is
compared:

- **Next-event accuracy, strictly**: at every held-out position whose true next token is an event code, is
  that code among the model's top-k over the WHOLE vocabulary (time, value and marker tokens compete too)?
  Reported overall, for new vs recurrent codes (first occurrence in the subject's timeline or not) and by
  kind. Baselines on the same positions: the k most frequent train codes, and a first-order Markov chain on
  codes (next code given the previous code, fitted on train).
- **Risk tasks**: labels from what really happened in the warehouse after each prediction time; predictions
  from Monte Carlo futures. Baselines in the same run: prevalence and a logistic regression on count
  features (age, sex, counts of prior codes per kind) fitted on train prediction points. 95% CIs resample
  subjects (a patient-level bootstrap), so several prediction points of one patient move together.
- **Backtests of rates**: cut at an as-of date, forecast weekly counts, compare with the observed weeks
  (MAPE and interval coverage).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foresight.dataset import IGNORE_INDEX, PackedSplit
from foresight.forecast import Forecaster, TaskSpec, Timeline
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


def _is_event_token(vocab: Any) -> np.ndarray:
    toks = vocab.tokens
    return np.array([not (t.startswith(("TIME//", "AGE//", "YEAR//", "BIRTH//")) or (t[0] == "Q" and t[1:].isdigit())
                          or t in ("[PAD]", "[BOS]", "[END]", "AGE//UNK")) and not vocab.is_static[i]
                     for i, t in enumerate(toks)])


@torch.no_grad()
def next_event_accuracy(forecaster: Forecaster, data_dir: str | Path, split: str = "held_out",
                        ks: Sequence[int] = (1, 5, 10), seq_len: int | None = None, batch_size: int = 8,
                        max_rows: int | None = None) -> NextEventReport:
    """Strict top-k next-event accuracy on ``split``, with the frequency and Markov baselines."""
    vocab = forecaster.vocab
    model = forecaster.model
    ps = PackedSplit(data_dir, split, vocab)
    train = PackedSplit(data_dir, "train", vocab)
    is_event = _is_event_token(vocab)
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


def prediction_points(con: Any, subject_ids: Sequence[int], *, mode: str = "as_of", as_of: datetime | None = None,
                      after_code: str = "DISCHARGE//%", max_per_subject: int = 1, seed: int = 0,
                      min_follow_up_days: float = 0) -> list[PredictionPoint]:
    """Where to predict: one fixed ``as_of`` for everyone alive then, or at events (e.g. each discharge)."""
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
    if mode == "events":
        rows = con.execute(
            """SELECT e.subject_id, e.time FROM events e JOIN eval_subjects USING (subject_id)
               WHERE e.code LIKE $code AND e.time + to_days($fu) <=
                     (SELECT max(time) FROM events x WHERE x.subject_id = e.subject_id)
               ORDER BY 1, 2""", {"code": after_code, "fu": int(min_follow_up_days)}).fetchall()
        rng = np.random.default_rng(seed)
        by_subject: dict[int, list[datetime]] = {}
        for sid, t in rows:
            by_subject.setdefault(sid, []).append(t)
        out = []
        for sid, times in by_subject.items():
            pick = sorted(rng.choice(len(times), size=min(max_per_subject, len(times)), replace=False).tolist())
            out += [PredictionPoint(sid, times[i]) for i in pick]
        return out
    raise ValueError(f"unknown mode {mode!r} (as_of or events)")


def observed_labels(con: Any, task: TaskSpec, points: Sequence[PredictionPoint]) -> np.ndarray:
    """What really happened after each point, by the task's own rule (events strictly after the point)."""
    labels = []
    for pt in points:
        rows = con.execute(
            "SELECT time, code FROM events WHERE subject_id = ? AND time > ? AND time <= ? ORDER BY time",
            [pt.subject_id, pt.time, pt.time + timedelta(days=task.window_days)]).fetchall()
        labels.append(task.label([{"time": t, "code": c} for t, c in rows], pt.time))
    return np.array([0.0 if x is None else x for x in labels])


def count_features(con: Any, points: Sequence[PredictionPoint], kinds: Sequence[str]) -> np.ndarray:
    """Per point: age (years), sex (F=1), and counts of prior events per kind — the logistic baseline's input."""
    feats = []
    for pt in points:
        row = con.execute(
            f"""SELECT date_diff('day', min(time) FILTER (WHERE code = 'MEDS_BIRTH'), $t) / 365.25,
                       max(CASE WHEN code = 'GENDER//F' THEN 1 ELSE 0 END),
                       {', '.join(f"count(*) FILTER (WHERE fs_kind(code) = '{k}' AND time <= $t)" for k in kinds)}
                FROM events WHERE subject_id = $s""", {"t": pt.time, "s": pt.subject_id}).fetchall()[0]
        feats.append([np.nan if v is None else float(v) for v in row])
    x = np.array(feats, dtype=float)
    if len(x):
        col_mean = np.nanmean(np.where(np.isnan(x), np.nan, x), axis=0)
        x = np.where(np.isnan(x), np.nan_to_num(col_mean), x)
        x[:, 2:] = np.log1p(x[:, 2:])
    return x


def evaluate_task(forecaster: Forecaster, con: Any, task: TaskSpec, points: Sequence[PredictionPoint], *,
                  samples: int = 20, seed: int = 0, train_points: Sequence[PredictionPoint] = (),
                  oracle: Callable[[Sequence[PredictionPoint]], np.ndarray] | None = None,
                  n_boot: int = 200) -> dict[str, Any]:
    """Model risk vs observed outcome for ``points``, with baselines (and the oracle when given)."""
    from sklearn.linear_model import LogisticRegression

    timelines = _timelines_at(forecaster, con, points)
    p_model, _ = forecaster.task_risks(timelines, task, samples, seed=seed)  # Rao-Blackwellised futures
    alive = ~np.isnan(p_model)  # a subject dead at the prediction time is at no risk of anything: not scored
    points = [p for p, a in zip(points, alive, strict=True) if a]
    p_model = p_model[alive]
    y = observed_labels(con, task, points)
    groups = np.array([pt.subject_id for pt in points])
    result: dict[str, Any] = {"task": task.name, "samples": samples, "points": len(points)}
    preds = {"model": p_model}
    kinds = ["ADMIT", "DX", "RX_START", "LAB", "ICU", "ED", "RX"]
    if train_points:
        y_train = observed_labels(con, task, train_points)
        prevalence = float(y_train.mean())
        preds["prevalence"] = np.full(len(points), prevalence)
        if len(set(y_train.tolist())) == 2:
            clf = LogisticRegression(max_iter=1000).fit(count_features(con, train_points, kinds), y_train)
            preds["logistic_counts"] = clf.predict_proba(count_features(con, points, kinds))[:, 1]
    if oracle is not None:
        preds["oracle"] = np.asarray(oracle(points), dtype=float)
    for name, p in preds.items():
        result[name] = {"metrics": risk_metrics(y, p), "ci95": bootstrap_ci(y, p, groups, n_boot=n_boot, seed=seed),
                        "calibration": calibration_table(y, p)}
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
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False)
    for ax, res in zip(axes[0], results, strict=False):
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
        for name in ("model", "logistic_counts", "oracle"):
            if name in res and res[name]["calibration"]:
                c = res[name]["calibration"]
                auc = res[name]["metrics"]["auroc"]
                ax.plot([x["predicted"] for x in c], [x["observed"] for x in c], marker="o", ms=3,
                        label=f"{name} (AUROC {auc:.2f})")
        ax.set_title(res["task"])
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


def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    *,
    db: str | Path | None = None,
    tasks: Sequence[TaskSpec] = (),
    as_of: datetime | None = None,
    samples: int = 20,
    max_points: int = 500,
    out_dir: str | Path | None = None,
    oracle: Callable[[TaskSpec, Sequence[PredictionPoint]], np.ndarray] | None = None,
    seed: int = 0,
    max_rows: int | None = None,
) -> dict[str, Any]:
    """Next-event accuracy on held_out, and (with ``db``) each task with baselines; JSON + PNG in ``out_dir``.

    Task prediction points: everyone alive at ``as_of`` when given (held-out subjects; train subjects for the
    baselines), otherwise each discharge with 30 days of follow-up (the readmission framing).
    """
    import json

    from foresight import warehouse

    forecaster = Forecaster.from_pretrained(model_dir)
    out_dir = Path(out_dir or Path(model_dir) / "evaluation")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": str(model_dir), "data": str(data_dir), "created": datetime.now().isoformat()}
    report["next_event"] = next_event_accuracy(forecaster, data_dir, max_rows=max_rows).to_json()
    task_results = []
    if db is not None and tasks:
        con = warehouse.connect(db, read_only=True)
        try:
            rng = np.random.default_rng(seed)
            ids = {s: [r[0] for r in con.execute("SELECT subject_id FROM subject_splits WHERE split = ?",
                                                  [s]).fetchall()] for s in ("train", "held_out")}
            kw = {"mode": "as_of", "as_of": as_of} if as_of else {"mode": "events", "min_follow_up_days": 30,
                                                                  "max_per_subject": 3, "seed": seed}
            held = prediction_points(con, ids["held_out"], **kw)
            train = prediction_points(con, ids["train"], **kw)
            if len(held) > max_points:
                held = [held[i] for i in sorted(rng.choice(len(held), max_points, replace=False))]
            if len(train) > 4 * max_points:
                train = [train[i] for i in sorted(rng.choice(len(train), 4 * max_points, replace=False))]
            for task in tasks:
                if task.value != "binary":
                    continue
                orc = (lambda pts, t=task: oracle(t, pts)) if oracle else None
                res = evaluate_task(forecaster, con, task, held, samples=samples, seed=seed, train_points=train,
                                    oracle=orc)
                task_results.append(res)
        finally:
            con.close()
    report["tasks"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in task_results]
    if task_results:
        report["calibration_plot"] = str(plot_calibration(task_results, out_dir / "calibration.png"))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    report["report"] = str(out_dir / "report.json")
    return report
