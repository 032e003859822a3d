"""ACES task configs: the shipped configs label the same points as Foresight's own TaskSpec where the two mean the
same thing; `foresight evaluate --task-config` scores a real (tiny) model on ACES's labels with the report shape of
the built-in tasks and writes meds-evaluation predictions; a bad config is one clear error."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import meds
import pyarrow.parquet as pq
import pytest

from foresight import tokens as T
from foresight import warehouse
from foresight.evaluate import observed_labels, prediction_points
from foresight.evaluate.aces import (
    AcesConfigError,
    aces_labels,
    load_task_config,
    prediction_schema,
    readout_spec,
)
from foresight.forecast import BUILTIN_TASKS

from .conftest import REPO, cli_json, run_cli, simulated_warehouse, tiny_warehouse

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = REPO / "tasks"
# (ACES config, Foresight TaskSpec, kind of prediction point, prediction_points options): the same task twice
SHARED = [
    ("mortality/in_hospital/at_admission.yaml", "in_hospital_mortality", "admissions", {}),
    ("icu_admission/during_stay.yaml", "icu_during_stay", "admissions", {}),
    ("readmission/30d.yaml", "readmission_30d", "events", {"after_code": "DISCHARGE//%", "min_follow_up_days": 30}),
]
FAST = dict(preset="tiny", seq_len=64, micro_batch=4, max_steps=10, lr=3e-3, min_lr=3e-4, warmup_steps=2,
            eval_every=0, eval_rows=4, checkpoint_every=0, log_every=1000, seed=3)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """250 simulated lives (admissions, ICU stays, deaths) loaded and tokenized, their MEDS export, and a tiny
    model trained for a few steps (its skill is not under test, only the plumbing)."""
    from foresight.train import TrainConfig, train

    d = tmp_path_factory.mktemp("aces")
    db = simulated_warehouse(d, 250, seed=5)
    with warehouse.connect(db, read_only=True) as con:
        warehouse.export_meds(con, d / "meds")
    train(d / "tok", d / "model", TrainConfig(**FAST))
    return {"db": db, "meds": d / "meds", "tok": d / "tok", "model": d / "model"}


def _ours(db: Path, task: str, mode: str, options: dict) -> set[tuple[int, datetime, bool]]:
    """Every point of a TaskSpec task (all subjects, all points) with its observed label."""
    with warehouse.connect(db, read_only=True) as con:
        ids = [r[0] for r in con.execute("SELECT DISTINCT subject_id FROM events").fetchall()]
        points = prediction_points(con, ids, mode=mode, max_per_subject=10**6, **options)
        y = observed_labels(con, BUILTIN_TASKS[task], points)
    return {(p.subject_id, p.time, bool(v)) for p, v in zip(points, y, strict=True)}


def _aces(config: str | Path, meds_root: Path) -> set[tuple[int, datetime, bool]]:
    table = aces_labels(load_task_config(TASKS / config), meds_root)
    meds.LabelSchema.validate(table)
    return {(r["subject_id"], r["prediction_time"], r["boolean_value"]) for r in table.to_pylist()}


@pytest.mark.parametrize(("config", "task", "mode", "options"), SHARED, ids=[s[1] for s in SHARED])
def test_aces_labels_the_same_points_as_the_taskspec(sim, config, task, mode, options):
    ours, theirs = _ours(sim["db"], task, mode, options), _aces(config, sim["meds"])
    assert len(ours) > 100 and 0 < sum(y for *_, y in ours) < len(ours)  # both labels present: a real check
    assert theirs == ours


def test_readmission_differs_only_on_day_30_exactly(tmp_path):
    """The one documented difference: Foresight's follow-up rule accepts a last event exactly 30 days after the
    discharge, ACES's censoring window wants one strictly after. Everything else agrees."""
    db = tiny_warehouse(tmp_path / "w.duckdb", n_subjects=40)
    t = datetime(2021, 3, 1, 8, 0)
    with warehouse.connect(db) as con:
        con.executemany("INSERT INTO events VALUES (?, ?, ?, NULL, NULL, NULL, NULL, 'test', 'test', 'test')",
                        [(999, t, "ADMIT//EMERGENCY"), (999, t + timedelta(days=2), "DISCHARGE//HOME"),
                         (999, t + timedelta(days=32), "LAB//MIMIC//50912")])
        con.execute("INSERT INTO subject_splits VALUES (999, fs_split(999))")
        warehouse.export_meds(con, tmp_path / "meds")
    ours = _ours(db, "readmission_30d", "events", SHARED[2][3])
    theirs = _aces(SHARED[2][0], tmp_path / "meds")
    assert ours - theirs == {(999, t + timedelta(days=2), False)} and theirs <= ours


def test_readout_reads_the_same_tokens_as_the_taskspec(sim):
    """The model's risk for an ACES config is read with the TaskSpec's own codes and window; the at-admission
    configs also stop at a death without a discharge (the stay ends there)."""
    vocab = T.Vocabulary.load(sim["tok"] / "vocab.json").tokens
    for config, task, *_ in SHARED:
        spec, ours = readout_spec(load_task_config(TASKS / config), vocab), BUILTIN_TASKS[task]
        assert {t for t in vocab if spec.matches(t)} == {t for t in vocab if ours.matches(t)}
        assert {t for t in vocab if spec.stop_codes and spec.matches(t, spec.stop_codes)} == (
            {t for t in vocab if ours.stop_codes and ours.matches(t, ours.stop_codes)}
            | ({"MEDS_DEATH"} if ours.stop_codes else set()))
        assert spec.window_days == ours.window_days
    # MEDS-DEV's first_24h predicts 24 h after admission; the label window starts 24 h later and ends at the stay's end
    spec = readout_spec(load_task_config(TASKS / "mortality/in_hospital/first_24h.yaml"), vocab)
    assert spec.window_days == pytest.approx(366) and "MEDS_DEATH" in spec.codes


def test_evaluate_task_config_scores_the_model_on_aces_labels(sim, tmp_path):
    out = tmp_path / "ev"
    report = cli_json("evaluate", "--model", str(sim["model"]), "--data", str(sim["tok"]), "--task-config",
                      str(TASKS / "icu_admission/during_stay.yaml"), "--samples", "1", "--max-points", "20",
                      "--out", str(out))
    assert report["task"] == "icu_admission/during_stay" and report["warehouse"]["path"] == str(sim["db"])
    (res,) = report["tasks"]
    assert res["at"] == "aces" and res["points"] == report["eval_points"]["aces"]["held_out"] == 20
    for name in ("model", "prevalence"):  # the same shape as the built-in tasks' entries
        assert {"metrics", "calibration", "ci95"} <= set(res[name])
        assert {"auroc", "brier", "ece", "n"} <= set(res[name]["metrics"])
    assert report["labels"]["train"]["points"] > report["labels"]["held_out"]["points"] > 20
    assert json.loads(Path(report["report"]).read_text())["tasks"][0]["task"] == res["task"]
    # predictions: meds-evaluation's schema, one row per scored point, ACES's label on each
    pred = pq.read_table(report["predictions"])
    assert pred.schema.names == ["subject_id", "prediction_time", "boolean_value", "predicted_boolean_value",
                                 "predicted_boolean_probability"]
    prediction_schema().validate(pred)
    labels = {(r["subject_id"], r["prediction_time"]): r["boolean_value"]
              for r in pq.read_table(out / "labels.parquet").to_pylist()}
    rows = pred.to_pylist()
    assert len(rows) == 20 and all(labels[(r["subject_id"], r["prediction_time"])] == r["boolean_value"]
                                   for r in rows)
    assert all(0.0 <= r["predicted_boolean_probability"] <= 1.0 for r in rows)
    assert res["model"]["metrics"]["prevalence"] == pytest.approx(sum(r["boolean_value"] for r in rows) / 20)


HEAD = "predicates:\n  a: {code: ADMIT//EMERGENCY}\ntrigger: a\nwindows:\n  w: {start: trigger, end: start + 1d, "
BAD = {  # file: (text, the reason the error gives)
    "undefined.yaml": (HEAD + "start_inclusive: False, end_inclusive: True, label: nope, index_timestamp: start}\n",
                       "not a valid ACES task config"),
    "nolabel.yaml": (HEAD + "start_inclusive: False, end_inclusive: True, index_timestamp: start}\n",
                     "no label window"),
    "broken.yaml": ("predicates: [\n", "not a valid ACES task config"),
}


def test_bad_config_is_one_clear_error(sim, tmp_path):
    for name, (text, reason) in BAD.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(AcesConfigError, match=reason):
            load_task_config(tmp_path / name)
    proc = run_cli("evaluate", "--model", str(sim["model"]), "--data", str(sim["tok"]), "--task-config",
                   str(tmp_path / "nolabel.yaml"), "--json")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(tmp_path / "nolabel.yaml") in proc.stderr and "no label window" in proc.stderr
    # a label the model's futures cannot show (a value threshold) is refused with the reason
    (tmp_path / "value.yaml").write_text(
        "predicates:\n  a: {code: ADMIT//EMERGENCY}\n  high: {code: LAB//X, value_min: 2}\ntrigger: a\nwindows:\n"
        "  w: {start: trigger, end: start + 1d, start_inclusive: False, end_inclusive: True, label: high, "
        "index_timestamp: start}\n")
    with pytest.raises(AcesConfigError, match="needs values"):
        readout_spec(load_task_config(tmp_path / "value.yaml"), ["LAB//X", "ADMIT//EMERGENCY"])
