"""What evaluate scores: risk tasks, the admission tasks and their aliases, and which points each task is scored at.

Discharge (or as-of) tasks are the forecast's :class:`~foresight.forecast.TaskSpec`; the admission tasks are
outcomes of the stay that begins at the prediction point (:data:`ADMISSION_TASKS`), one of them a
:class:`ComplementTask`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from foresight.forecast import BUILTIN_TASKS, TaskSpec, load_task


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


@dataclass(frozen=True, eq=False)
class LabelledTask:
    """A binary task whose labels come with its prediction points instead of from a rule: ``labels[(subject_id,
    prediction_time)]`` (an ACES config's labels, :mod:`foresight.evaluate.aces`). The model's risk is read out
    from futures with ``spec``; :func:`~foresight.evaluate.points.observed_labels` returns the given labels."""

    name: str
    spec: TaskSpec
    labels: Mapping[tuple[int, datetime], bool]
    description: str = ""
    value: str = "binary"

    @property
    def window_days(self) -> float:
        return self.spec.window_days

    def label(self, future: Sequence[dict[str, Any]], start: datetime) -> float:
        return float(self.spec.label(future, start) or 0.0)

    def observed(self, points: Sequence[Any]) -> list[float]:
        """The given label of each point (``subject_id``, ``time``); ValueError naming a point without one."""
        missing = [p for p in points if (p.subject_id, p.time) not in self.labels]
        if missing:
            raise ValueError(f"task {self.name}: no label for subject {missing[0].subject_id} at {missing[0].time} "
                             f"({len(missing)} point(s) without a label)")
        return [float(self.labels[(p.subject_id, p.time)]) for p in points]


EvalTask = TaskSpec | ComplementTask | LabelledTask

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
    if isinstance(task, LabelledTask):
        return task.spec, False
    return (task.of, True) if isinstance(task, ComplementTask) else (task, False)



def resolve_tasks(names: Sequence[str] | None) -> tuple[list[TaskSpec], list[EvalTask] | None]:
    """Task names (built-in names or spec files) -> ``(tasks, admission_tasks)`` for :func:`evaluate_model`.

    Names of admission tasks, or their aliases (``length_of_stay``), go to ``admission_tasks``; every other name
    is loaded with :func:`foresight.forecast.load_task` (ValueError when it is neither a built-in nor a file).
    No names: the :data:`DEFAULT_DISCHARGE_TASKS`, and ``admission_tasks`` None (all :data:`ADMISSION_TASKS`).
    """
    tasks: list[TaskSpec] = []
    admission: list[EvalTask] = []
    for name in names or DEFAULT_DISCHARGE_TASKS:
        adm = ADMISSION_TASKS.get(ADMISSION_ALIASES.get(name, name))
        if adm is not None:
            admission.append(adm)
        else:
            tasks.append(load_task(name))
    return tasks, None if names is None else admission


def point_kinds(at: Sequence[str] | None, as_of: datetime | None) -> tuple[str, ...]:
    """The kinds of prediction points to score (``as-of`` may be spelled with a dash); checked.

    Default: the discharges (or everyone alive at ``as_of`` when it is given) and the admissions.
    """
    kinds = tuple(a.replace("-", "_") for a in at) if at else (("as_of",) if as_of else ("discharges",)) + (
        "admissions",)
    unknown = [a for a in kinds if a not in EVAL_POINTS]
    if unknown:
        raise ValueError(f"unknown evaluation points {unknown} (choose from {', '.join(EVAL_POINTS)})")
    if "as_of" in kinds and as_of is None:
        raise ValueError("evaluation points 'as_of' need an as-of date")
    return kinds


def plan_tasks(kinds: Sequence[str], tasks: Sequence[EvalTask],
               admission_tasks: Sequence[EvalTask] | None) -> list[tuple[str, list[EvalTask]]]:
    """Each kind of point with the tasks scored there: admission tasks at admissions, the others elsewhere.

    Admission tasks named among ``tasks`` are scored at admissions, whatever list they came in; ``admission_tasks``
    None means all of :data:`ADMISSION_TASKS`.
    """
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
    return [(kind, adm_tasks if kind == "admissions" else point_tasks) for kind in kinds]
