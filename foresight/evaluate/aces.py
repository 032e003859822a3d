"""ACES task configs scored zero-shot: ACES's labels on the warehouse's MEDS export, the model's risk at each point.

An `ACES <https://github.com/justin13601/ACES>`_ task config (the format MEDS-DEV's tasks are written in; the
shipped ones are under ``tasks/`` at the repository root) says *where* to predict (each row's
``prediction_time``) and *what* happened (its ``boolean_value``). Here:

1. the warehouse is written as a MEDS dataset (:func:`foresight.warehouse.export_meds`) and ACES extracts the
   task from every shard (:func:`aces_labels`: the MEDS label schema, validated by the ``meds`` package);
2. the model's zero-shot risk at each prediction time is read out from its futures with a
   :class:`~foresight.forecast.TaskSpec` derived from the config (:func:`readout_spec`: the label predicate's codes,
   the label window's length or the predicate that ends it);
3. the points are scored exactly like the built-in tasks (:func:`~foresight.evaluate.risks.evaluate_task`: AUROC,
   AUPRC, Brier, ECE with patient-bootstrap CIs, the count baselines fitted on TRAIN points, the recalibrated model
   fitted on TUNING points) through a :class:`~foresight.evaluate.tasks.LabelledTask`, so every label — held-out,
   train, tuning — is ACES's;
4. the held-out predictions are written in the MEDS-DEV / meds-evaluation prediction schema (``subject_id``,
   ``prediction_time``, ``boolean_value``, ``predicted_boolean_value``, ``predicted_boolean_probability``).

The read-out is the model's probability that the label predicate fires between the prediction time and the end of
the label window. A config whose label window starts later (a gap) is read from the prediction time, so events in
the gap count for the model (the population ACES keeps is conditioned on the gap; the futures are not). Labels
that need values (``value_min``), other columns, static predicates or ``and(...)`` cannot be read from futures and
are refused with the reason.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from foresight import warehouse
from foresight.evaluate.calibrate import METHODS
from foresight.evaluate.locate import locate_warehouse
from foresight.evaluate.points import PredictionPoint
from foresight.evaluate.report import plot_calibration
from foresight.evaluate.risks import RISK_SAMPLES, evaluate_task
from foresight.evaluate.tasks import LabelledTask
from foresight.forecast import Forecaster, TaskSpec

# A label window that ends at an event (the end of the stay) is read out over at most this many days, like the
# built-in in-hospital tasks.
EVENT_WINDOW_DAYS = 365
AT = "aces"  # the "at" of an ACES task's result: its prediction times are the config's own


class AcesConfigError(ValueError):
    """An ACES task config that cannot be loaded or cannot be scored zero-shot (the message names the file)."""


@dataclass
class AcesTask:
    """A loaded ACES task config: its file, name (path under ``tasks/``), description and ACES's parsed config."""

    path: Path
    name: str
    description: str
    config: Any  # aces.config.TaskExtractorConfig


def load_task_config(path: str | Path) -> AcesTask:
    """Load and check an ACES task config; :class:`AcesConfigError` naming the file and the reason otherwise.

    Beyond ACES's own checks, a config scored here needs a label window (``label:``) and a prediction time
    (``index_timestamp:``).
    """
    import ruamel.yaml
    from aces.config import TaskExtractorConfig

    path = Path(path)
    if not path.is_file():
        raise AcesConfigError(f"{path}: no such ACES task config")
    try:
        with _quiet_aces():
            cfg = TaskExtractorConfig.load(config_path=path)
    except (KeyError, ValueError, TypeError, AttributeError, ruamel.yaml.YAMLError) as exc:
        raise AcesConfigError(f"{path}: not a valid ACES task config: {str(exc).strip() or type(exc).__name__}"
                              ) from exc
    if not cfg.label_window:
        raise AcesConfigError(f"{path}: the ACES config has no label window (a window with `label: PREDICATE`)")
    if not cfg.index_timestamp_window:
        raise AcesConfigError(f"{path}: the ACES config has no prediction time (a window with `index_timestamp: "
                              "start|end`)")
    try:
        description = str((ruamel.yaml.YAML(typ="safe", pure=True).load(path.read_text()) or {}).get(
            "description") or "").strip()
    except ruamel.yaml.YAMLError:
        description = ""
    return AcesTask(path, task_name(path), " ".join(description.split()), cfg)


def task_name(path: Path) -> str:
    """``mortality/in_hospital/first_24h`` for ``.../tasks/mortality/in_hospital/first_24h.yaml`` (MEDS-DEV's
    naming); the file's stem outside a ``tasks`` folder."""
    parts = path.resolve().with_suffix("").parts
    if "tasks" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("tasks"):])
    return path.stem


@contextmanager
def _quiet_aces() -> Iterator[None]:
    """ACES logs every step at INFO and warns on its own findings: keep the CLI's stderr to errors."""
    log = logging.getLogger("aces")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# --- the model's read-out: a TaskSpec from the config --------------------------------------------------------


def readout_spec(task: AcesTask, vocab_tokens: Sequence[str]) -> TaskSpec:
    """The :class:`TaskSpec` the model's futures are scored with for ``task``.

    Codes: every token of the model's vocabulary that the label predicate matches (a code, ``any`` list or
    ``regex``; ``or(...)`` of those). Window: from the prediction time to the label window's end — a fixed
    offset (``start + 30d``) gives ``window_days``; an event (``start -> discharge_or_death``) gives that
    predicate's tokens as stop codes over :data:`EVENT_WINDOW_DAYS`.
    """
    cfg = task.config
    win = cfg.windows[cfg.label_window]
    codes = _vocab_matches(task, win.label, vocab_tokens)
    if not codes:
        raise AcesConfigError(f"{task.path}: no token of the model's vocabulary matches the label predicate "
                              f"{win.label!r}: the model cannot predict it")
    pred_at = _offset(cfg, cfg.index_timestamp_window, cfg.windows[cfg.index_timestamp_window].index_timestamp)
    if pred_at is None:
        raise AcesConfigError(f"{task.path}: the prediction time is set by an event, not a fixed offset from the "
                              "trigger: no zero-shot read-out")
    ref, _, event = _boundary(win.end) if win.end is not None else ("", timedelta(0), "_RECORD_END")
    if event and not event.startswith("-") and ref == "start":
        stop = _vocab_matches(task, event, vocab_tokens) if event in cfg.predicates else ()
        start = _offset(cfg, cfg.label_window, "start")
        if start is None or start < pred_at:
            raise AcesConfigError(f"{task.path}: label window {cfg.label_window!r} must start at a fixed time "
                                  "at or after the prediction time for a zero-shot read-out")
        return TaskSpec(task.name, codes, EVENT_WINDOW_DAYS + _days(start - pred_at), stop_codes=stop,
                        description=task.description)
    end = _offset(cfg, cfg.label_window, "end")
    if end is None or end <= pred_at:
        raise AcesConfigError(f"{task.path}: label window {cfg.label_window!r} must end at a fixed time after the "
                              "prediction time, or at an event after its start, for a zero-shot read-out")
    return TaskSpec(task.name, codes, _days(end - pred_at), description=task.description)


def _days(d: timedelta) -> float:
    return d.total_seconds() / 86400.0


def _vocab_matches(task: AcesTask, predicate: str, vocab_tokens: Sequence[str]) -> tuple[str, ...]:
    """The vocabulary tokens ``predicate`` matches, as literal glob patterns."""
    tests = [_code_test(task, p) for p in _plain_predicates(task, predicate)]
    return tuple(re.sub(r"([*?\[])", r"[\1]", t) for t in vocab_tokens if any(test(t) for test in tests))


def _plain_predicates(task: AcesTask, name: str) -> list[Any]:
    """The plain predicates ``name`` is an ``or`` of (itself when plain); refuses what futures cannot show."""
    pred = task.config.predicates.get(name)
    if pred is None:
        raise AcesConfigError(f"{task.path}: predicate {name!r} is not defined")
    if not pred.is_plain:
        if pred.is_and:
            raise AcesConfigError(f"{task.path}: predicate {name!r} is an and(...): a zero-shot read-out needs "
                                  "codes (or an or(...) of codes)")
        return [p for n in pred.input_predicates for p in _plain_predicates(task, n)]
    if pred.static or pred.other_cols or pred.value_min is not None or pred.value_max is not None:
        raise AcesConfigError(f"{task.path}: predicate {name!r} needs values, other columns or static data: a "
                              "zero-shot read-out needs codes only")
    return [pred]


def _code_test(task: AcesTask, pred: Any) -> Callable[[str], bool]:
    """Whether a code matches a plain predicate's ``code`` (exact, ``any`` list, or ``regex`` searched)."""
    code = pred.code
    if isinstance(code, dict) and "regex" in code:
        try:
            rx = re.compile(code["regex"])
        except re.error as exc:
            raise AcesConfigError(f"{task.path}: bad regex {code['regex']!r}: {exc}") from exc
        return lambda c: rx.search(c) is not None
    if isinstance(code, dict) and "any" in code:
        return set(code["any"]).__contains__
    return lambda c: c == code


def _boundary(text: str) -> tuple[str, timedelta, str | None]:
    """An ACES window boundary as ``(reference, offset, event)``: ``trigger + 24h`` -> ("trigger", 24h, None),
    ``start -> death`` -> ("start", 0, "death"), ``end <- admission`` -> ("end", 0, "-admission")."""
    from aces.utils import parse_timedelta

    for op, sign in (("->", ""), ("<-", "-")):
        if op in text:
            ref, event = (x.strip() for x in text.split(op))
            return ref, timedelta(0), sign + event
    for op, sign in (("+", ""), ("-", "-")):
        if op in text:
            ref, off = (x.strip() for x in text.split(op))
            return ref, parse_timedelta(sign + off), None
    return text.strip(), timedelta(0), None


def _offset(cfg: Any, window: str, side: str, depth: int = 0) -> timedelta | None:
    """When ``window``'s ``side`` (start/end) lies, relative to the trigger; None when an event sets it."""
    if depth > 50:  # ACES rejects cyclic windows; this only guards the recursion
        return None
    w = cfg.windows[window]
    text = w.start if side == "start" else w.end
    if text is None:
        return None
    ref, delta, event = _boundary(text)
    if event is not None:
        return None
    if ref == "trigger":
        base: timedelta | None = timedelta(0)
    elif ref in ("start", "end"):
        base = _offset(cfg, window, ref, depth + 1)
    else:
        other, other_side = ref.split(".")
        base = _offset(cfg, other, other_side, depth + 1)
    return None if base is None else base + delta


# --- labels --------------------------------------------------------------------------------------------------


def aces_labels(task: AcesTask, meds_root: str | Path) -> Any:
    """ACES's labels for ``task`` on every shard of the MEDS dataset at ``meds_root``: a pyarrow table in the MEDS
    label schema (``subject_id``, ``prediction_time``, ``boolean_value``), checked with ``meds.LabelSchema``."""
    import polars as pl
    import pyarrow as pa
    from aces import predicates, query
    from meds import LabelSchema
    from omegaconf import DictConfig

    frames = []
    for shard in sorted((Path(meds_root) / "data").rglob("*.parquet")):
        try:
            with _quiet_aces():
                df = predicates.get_predicates_df(task.config, DictConfig({"path": str(shard), "standard": "meds"}))
                result = query.query(task.config, df)
        except (KeyError, ValueError, TypeError, pl.exceptions.PolarsError) as exc:
            raise AcesConfigError(f"{task.path}: ACES could not extract the task from {shard}: {exc}") from exc
        if not result.is_empty():
            frames.append(result.select(pl.col("subject_id").cast(pl.Int64),
                                        pl.col("index_timestamp").cast(pl.Datetime("us")).alias("prediction_time"),
                                        (pl.col("label") > 0).alias("boolean_value")))
    if not frames:
        return LabelSchema.align(pa.table({"subject_id": pa.array([], pa.int64()),
                                           "prediction_time": pa.array([], pa.timestamp("us")),
                                           "boolean_value": pa.array([], pa.bool_())}))
    labels = pl.concat(frames).unique(["subject_id", "prediction_time"]).sort(["subject_id", "prediction_time"])
    table = LabelSchema.align(labels.to_arrow())
    LabelSchema.validate(table)
    return table


@functools.cache
def prediction_schema() -> Any:
    """The meds-evaluation prediction schema: the MEDS label schema plus ``predicted_boolean_value`` (bool) and
    ``predicted_boolean_probability`` (float32), built on ``meds.LabelSchema``."""
    import pyarrow as pa
    from flexible_schema import Optional
    from meds import LabelSchema

    # built with type(): this module's postponed annotations would reach flexible_schema as strings
    return type("PredictionSchema", (LabelSchema,), {"__module__": __name__, "__annotations__": {
        "predicted_boolean_value": Optional(pa.bool_()), "predicted_boolean_probability": Optional(pa.float32())}})


def write_predictions(path: str | Path, points: Sequence[PredictionPoint], y: Sequence[float],
                      p: Sequence[float], threshold: float = 0.5) -> Path:
    """The scored points as a meds-evaluation predictions parquet (validated against :func:`prediction_schema`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prob = np.asarray(p, dtype=float)
    table = pa.table({
        "subject_id": pa.array([pt.subject_id for pt in points], pa.int64()),
        "prediction_time": pa.array([pt.time for pt in points], pa.timestamp("us")),
        "boolean_value": pa.array([bool(v) for v in y], pa.bool_()),
        "predicted_boolean_value": pa.array((prob >= threshold).tolist(), pa.bool_()),
        "predicted_boolean_probability": pa.array(prob, pa.float32()),
    })
    schema = prediction_schema()
    table = schema.align(table)
    schema.validate(table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# --- scoring -------------------------------------------------------------------------------------------------


def evaluate_aces_task(model_dir: str | Path, config: str | Path, *, data_dir: str | Path | None = None,
                       db: str | Path | None = None, samples: int = RISK_SAMPLES, max_points: int = 500,
                       out_dir: str | Path | None = None, seed: int = 0,
                       calibration: str | None = "platt") -> dict[str, Any]:
    """Score the model zero-shot on an ACES task config; report.json, predictions.parquet, calibration.png.

    Warehouse: ``db``, else the one ``data_dir`` was tokenized from. Its MEDS export goes to ``OUT/meds`` and
    ACES's labels (every split) to ``OUT/labels.parquet``. Points: a seeded subsample of at most ``max_points``
    held-out labels (scored), ``4 x max_points`` train labels (the baselines) and ``max_points`` tuning labels
    (the recalibration, unless ``calibration`` is None); points at or after the subject's death are left out
    (nobody is at risk then) and counted. The result has the shape of :func:`~foresight.evaluate.evaluate_model`'s
    ``tasks`` entries, at ``"aces"``.
    """
    if calibration is not None and calibration not in METHODS:
        raise ValueError(f"unknown calibration {calibration!r}: use one of {', '.join(METHODS)} or none")
    task = load_task_config(config)
    db_path, wh = _warehouse(data_dir, db)
    forecaster = Forecaster.from_pretrained(model_dir)
    spec = readout_spec(task, forecaster.vocab.tokens)
    out = Path(out_dir or Path(model_dir) / "evaluation" / "aces" / task.name.replace("/", "__"))
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"task_config": str(task.path), "task": task.name, "description": task.description,
                              "model": str(model_dir), "data": str(data_dir) if data_dir else None,
                              "created": datetime.now().isoformat(), "warehouse": wh,
                              "readout": _readout_json(spec), "tasks": [], "skipped": []}
    with warehouse.connect(db_path, read_only=True) as con:
        report["meds_export"] = warehouse.export_meds(con, out / "meds")
        labels = aces_labels(task, out / "meds")
        _write_table(labels, out / "labels.parquet")
        by_split, report["labels"] = _points_by_split(con, labels)
        rng = np.random.default_rng(seed)
        held = _subsample(by_split["held_out"], max_points, rng)
        train = _subsample(by_split["train"], 4 * max_points, rng)
        tuning = _subsample(by_split["tuning"], max_points, rng) if calibration else []
        report["eval_points"] = {AT: {"held_out": len(held), "train": len(train), "tuning": len(tuning)}}
        if not held:
            report["skipped"].append({"task": task.name, "at": AT, "reason": f"ACES found no held-out prediction "
                                      f"points for {task.path} in {db_path}"})
            return _finish(report, [], out)
        labelled = LabelledTask(task.name, spec, {k: v for pts in by_split.values() for k, v in pts.items()},
                                description=task.description)
        res = evaluate_task(forecaster, con, labelled, list(held), samples=samples, seed=seed,
                            train_points=list(train), tuning_points=list(tuning),
                            calibration=calibration or "platt")
    res.update(at=AT, description=task.description)
    if len(res["_y"]) != len(held):  # every point was checked alive above; a mismatch would misalign the file
        raise RuntimeError(f"{task.name}: {len(held)} points but {len(res['_y'])} scored")
    report["predictions"] = str(write_predictions(out / "predictions.parquet", list(held), res["_y"],
                                                  res["_p"]["model"]))
    return _finish(report, [res], out)


def _warehouse(data_dir: str | Path | None, db: str | Path | None) -> tuple[Path, dict[str, Any]]:
    """The warehouse the labels come from: ``db``, else the one ``data_dir`` was tokenized from."""
    if db is not None:
        if not Path(db).is_file():
            raise FileNotFoundError(f"{db}: no such warehouse")
        return Path(db), {"path": str(db), "found": "given (--db)"}
    found, how = locate_warehouse(data_dir) if data_dir is not None else (None, "no --db and no --data")
    if found is None:
        raise FileNotFoundError(f"no warehouse to take ACES labels from: {how}")
    return Path(found), {"path": str(found), "found": how}


def _readout_json(spec: TaskSpec) -> dict[str, Any]:
    return {"codes": list(spec.codes[:20]), "n_codes": len(spec.codes), "stop_codes": list(spec.stop_codes[:20]),
            "n_stop_codes": len(spec.stop_codes), "window_days": spec.window_days,
            "time_head_applicable": spec.time_head_applicable}


def _points_by_split(con: Any, labels: Any) -> tuple[dict[str, dict[tuple[int, datetime], bool]], dict[str, Any]]:
    """ACES's labels by split (``{(subject_id, prediction_time): label}``), without points at or after the
    subject's death, and their counts."""
    con.register("aces_labels_view", labels)
    try:
        rows = con.execute(
            """SELECT l.subject_id, l.prediction_time, l.boolean_value, coalesce(s.split, fs_split(l.subject_id)),
                      d.death IS NOT NULL AND d.death <= l.prediction_time
               FROM aces_labels_view l LEFT JOIN subject_splits s USING (subject_id)
               LEFT JOIN (SELECT subject_id, min(time) AS death FROM events WHERE code = 'MEDS_DEATH'
                          GROUP BY 1) d USING (subject_id)
               ORDER BY 1, 2""").fetchall()
    finally:
        con.unregister("aces_labels_view")
    by_split: dict[str, dict[tuple[int, datetime], bool]] = {"train": {}, "tuning": {}, "held_out": {}}
    dead = 0
    for sid, t, y, split, after_death in rows:
        if after_death:
            dead += 1
        elif split in by_split:
            by_split[split][(int(sid), t)] = bool(y)
    counts: dict[str, Any] = {s: {"points": len(v), "positives": int(sum(v.values()))} for s, v in by_split.items()}
    counts["rows"] = len(rows)
    counts["dead_at_prediction_time"] = dead
    return by_split, counts


def _subsample(points: dict[tuple[int, datetime], bool], cap: int, rng: np.random.Generator) -> list[PredictionPoint]:
    """At most ``cap`` of the points, a seeded draw kept in (subject, time) order."""
    keys = sorted(points)
    if len(keys) > cap:
        keys = [keys[i] for i in sorted(rng.choice(len(keys), cap, replace=False))]
    return [PredictionPoint(sid, t) for sid, t in keys]


def _write_table(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)


def _finish(report: dict[str, Any], results: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """The report's task entries (without the private arrays), the calibration plot and report.json."""
    report["tasks"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    report["calibration_plot"] = str(plot_calibration(results, out / "calibration.png")) if results else None
    report["report"] = str(out / "report.json")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def aces_summary(report: dict[str, Any]) -> str:
    """``evaluate --task-config``'s human summary: the labels, then the model's and the baselines' AUROC."""
    lab = report["labels"]
    lines = [f"ACES task {report['task']} ({report['task_config']}): {lab['held_out']['points']} held-out points "
             f"({lab['held_out']['positives']} positive), {lab['train']['points']} train, "
             f"{lab['tuning']['points']} tuning"]
    for t in report["tasks"]:
        def auc(name: str, t: dict[str, Any] = t) -> str:
            if name not in t:
                return "n/a"
            m, ci = t[name]["metrics"], t[name]["ci95"].get("auroc")
            return f"{m['auroc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        lines.append(f"{t['task']} ({t['points']} points): AUROC model {auc('model')} | logistic "
                     f"{auc('logistic_counts')} | GBM {auc('gbm_counts')}; Brier model "
                     f"{t['model']['metrics']['brier']:.4f}, ECE {t['model']['metrics']['ece']:.3f}")
    lines += [f"skipped {s['task']}: {s['reason']}" for s in report["skipped"]]
    if report.get("predictions"):
        lines.append(f"predictions: {report['predictions']}")
    lines.append(f"report: {report['report']}")
    return "\n".join(lines)
