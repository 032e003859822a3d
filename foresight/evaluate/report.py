"""The whole evaluation of a model: next-event accuracy, every risk task at its prediction points, report.json
and calibration.png."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from foresight import warehouse
from foresight.evaluate.calibrate import METHODS
from foresight.evaluate.crosssource import tokens_for_model
from foresight.evaluate.locate import locate_warehouse
from foresight.evaluate.next_event import next_event_accuracy
from foresight.evaluate.points import PredictionPoint, points_of_kind
from foresight.evaluate.risks import RISK_SAMPLES, evaluate_task
from foresight.evaluate.tasks import EvalTask, plan_tasks, point_kinds
from foresight.forecast import Forecaster

Oracle = Callable[[EvalTask, Sequence[PredictionPoint]], np.ndarray]


def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    *,
    db: str | Path | None = None,
    tasks: Sequence[EvalTask] = (),
    admission_tasks: Sequence[EvalTask] | None = None,
    at: Sequence[str] | None = None,
    as_of: datetime | None = None,
    samples: int = RISK_SAMPLES,
    max_points: int = 500,
    out_dir: str | Path | None = None,
    oracle: Oracle | None = None,
    seed: int = 0,
    max_rows: int | None = None,
    calibration: str | None = "platt",
) -> dict[str, Any]:
    """Next-event accuracy on held_out and each risk task against baselines; report.json + calibration.png.

    Warehouse (labels, prompts, baselines): ``db``, else the one ``data_dir`` was tokenized from
    (:func:`locate_warehouse`). Without one, every risk task is listed under ``skipped`` with the reason.

    Prediction points, ``at`` (default: the discharges — or everyone alive at ``as_of`` when it is given — and
    the admissions; ``as-of`` may be spelled with a dash):

    - ``"discharges"``: held-out discharges with 30 days of follow-up (up to 3 per subject), for ``tasks``;
    - ``"as_of"``: held-out subjects alive at ``as_of``, for ``tasks``;
    - ``"admissions"``: held-out admissions whose stay is complete (up to 3 per subject), for
      ``admission_tasks`` (default :data:`ADMISSION_TASKS`; admission tasks named in ``tasks`` go here too);
      skipped, with the reason, when the warehouse records no admissions.

    Each kind is a seeded subsample of at most ``max_points`` held-out points; the baselines are fitted on the
    same kind of points of train subjects (at most 4 x ``max_points``). ``oracle(task, points)`` (e.g.
    :func:`foresight.pipeline.simulator_oracle`) adds the true risk where it can answer the task.

    ``calibration`` (``platt`` or ``isotonic``; ``None`` for none): the model's risks are also reported
    recalibrated (``model_calibrated``) by a map fitted on the same kind of points of TUNING subjects (at most
    ``max_points``), never on held-out ones.
    """
    if calibration is not None and calibration not in METHODS:
        raise ValueError(f"unknown calibration {calibration!r}: use one of {', '.join(METHODS)} or none")
    plan = plan_tasks(point_kinds(at, as_of), tasks, admission_tasks)
    forecaster = Forecaster.from_pretrained(model_dir)
    out_dir = Path(out_dir or Path(model_dir) / "evaluation")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": str(model_dir), "data": str(data_dir), "created": datetime.now().isoformat()}
    # tokens of another source: re-read in the model's vocabulary, with the share of events that lost their code
    tokens_dir, report["cross_source"] = tokens_for_model(data_dir, forecaster.vocab, Path(model_dir) / "vocab.json",
                                                          out_dir)
    report["lost_code_share"] = report["cross_source"]["lost_code_share"]
    report["next_event"] = next_event_accuracy(forecaster, tokens_dir, max_rows=max_rows).to_json()
    found, report["warehouse"] = _warehouse_for(data_dir, db)
    scoring = RiskScoring(forecaster, as_of=as_of, samples=samples, max_points=max_points, oracle=oracle, seed=seed,
                          calibration=calibration)
    if found is None:
        for kind, task_list in plan:
            scoring.skip(kind, task_list, f"no warehouse to take labels from: {report['warehouse']['missing']}")
    elif any(task_list for _, task_list in plan):
        scoring.run(found, plan)
    return _write_report(report, scoring, out_dir)


def _warehouse_for(data_dir: str | Path, db: str | Path | None) -> tuple[Path | None, dict[str, Any]]:
    """The warehouse to take labels from (``db`` when given) and the report's note of how it was found."""
    if db is not None:
        return Path(db), {"path": str(db), "found": "given (--db)"}
    found, how = locate_warehouse(data_dir)
    return found, {"path": str(found) if found else None, "found" if found else "missing": how}


@dataclass
class RiskScoring:
    """Scores risk tasks at their kinds of prediction points in one warehouse; collects results and skips."""

    forecaster: Forecaster
    as_of: datetime | None
    samples: int
    max_points: int
    oracle: Oracle | None
    seed: int
    calibration: str | None = "platt"
    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    points_used: dict[str, dict[str, int]] = field(default_factory=dict)

    def skip(self, kind: str, task_list: Sequence[EvalTask], reason: str) -> None:
        """Record that ``task_list`` was not scored at ``kind``, and why."""
        self.skipped.extend({"task": t.name, "at": kind, "reason": reason} for t in task_list)

    def run(self, db: Path, plan: Sequence[tuple[str, Sequence[EvalTask]]]) -> None:
        """Score every (kind of point, tasks) of ``plan`` with labels from warehouse ``db``."""
        with warehouse.connect(db, read_only=True) as con:
            # one generator for every subsample, in plan order: the points drawn depend only on the seed
            rng = np.random.default_rng(self.seed)
            ids = {s: [r[0] for r in con.execute("SELECT subject_id FROM subject_splits WHERE split = ?",
                                                  [s]).fetchall()] for s in ("train", "tuning", "held_out")}
            for kind, task_list in plan:
                if task_list:
                    self._score_kind(con, db, kind, task_list, ids, rng)

    def _score_kind(self, con: Any, db: Path, kind: str, task_list: Sequence[EvalTask],
                    ids: dict[str, list[int]], rng: np.random.Generator) -> None:
        if kind == "admissions" and not con.execute(
                "SELECT count(*) FROM (SELECT 1 FROM events WHERE code LIKE 'ADMIT//%' LIMIT 1)").fetchall()[0][0]:
            self.skip(kind, task_list, f"{db} records no admissions (no ADMIT//* events)")
            return
        held = points_of_kind(con, kind, ids["held_out"], self.as_of, self.seed, self.max_points, rng)
        train = points_of_kind(con, kind, ids["train"], self.as_of, self.seed, 4 * self.max_points, rng)
        # drawn after the others, so the held-out and train points do not depend on whether we calibrate
        tuning = (points_of_kind(con, kind, ids["tuning"], self.as_of, self.seed, self.max_points, rng)
                  if self.calibration else [])
        self.points_used[kind] = {"held_out": len(held), "train": len(train), "tuning": len(tuning)}
        if not held:
            self.skip(kind, task_list, f"no held-out prediction points at {kind} in {db}")
            return
        for task in task_list:
            if task.value != "binary":
                self.skip(kind, [task], f"{task.value}-valued task: only binary tasks are scored "
                                        f"(length of stay is scored as los_over_7d at admissions)")
                continue
            orc = (lambda pts, t=task: self.oracle(t, pts)) if self.oracle else None
            res = evaluate_task(self.forecaster, con, task, held, samples=self.samples, seed=self.seed,
                                train_points=train, oracle=orc, tuning_points=tuning,
                                calibration=self.calibration or "platt")
            res["at"] = kind
            res["description"] = task.description
            self.results.append(res)


def _write_report(report: dict[str, Any], scoring: RiskScoring, out_dir: Path) -> dict[str, Any]:
    """Add the risk results to ``report`` and write report.json (and calibration.png when a task was scored)."""
    report["eval_points"] = scoring.points_used
    report["tasks"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in scoring.results]
    report["skipped"] = scoring.skipped
    report["calibration_plot"] = (str(plot_calibration(scoring.results, out_dir / "calibration.png"))
                                  if scoring.results else None)
    report["points_file"] = str(write_points(scoring.results, out_dir / "points.parquet")) if scoring.results \
        else None
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    report["report"] = str(out_dir / "report.json")
    return report


def write_points(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """Every scored point of every task: ``task``, ``at``, ``subject_id``, the outcome ``y`` and each predictor's
    risk (NaN where a predictor gave none), in scoring order — so two models scored with the same seed can be
    compared point by point (a paired difference), and a user can compute any metric of their own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted({k for r in results for k in r["_p"]})
    cols: dict[str, list[Any]] = {"task": [], "at": [], "subject_id": [], "y": [], **{n: [] for n in names}}
    for r in results:
        n = len(r["_y"])
        cols["task"] += [r["task"]] * n
        cols["at"] += [r.get("at", "")] * n
        cols["subject_id"] += list(r["_subjects"])
        cols["y"] += list(r["_y"])
        for name in names:
            cols[name] += list(r["_p"].get(name, [math.nan] * n))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def skipped_notes(report: dict[str, Any]) -> list[str]:
    """One line per reason the report skipped tasks: ``skipped T1, T2 at KIND; T3 at KIND2: REASON``."""
    by_reason: dict[str, dict[str, list[str]]] = {}
    for s in report["skipped"]:
        by_reason.setdefault(s["reason"], {}).setdefault(s["at"], []).append(s["task"])
    return ["skipped " + "; ".join(f"{', '.join(names)} at {kind}" for kind, names in kinds.items())
            + f": {reason}" for reason, kinds in by_reason.items()]


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
        for name in ("model", "model_calibrated", "model_time_head", "logistic_counts", "gbm_counts", "oracle"):
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

