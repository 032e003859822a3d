"""End to end on simulated data with a CI-sized model: 30-day admission risk beats chance, and the forecast and
evaluation commands work on a real trained model."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from foresight import warehouse
from foresight.cli.model import evaluation_summary
from foresight.evaluate import evaluate_model, evaluate_task, prediction_points
from foresight.forecast import BUILTIN_TASKS, Forecaster
from foresight.pipeline import simulator_oracle

from .conftest import run_cli, simulated_warehouse

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """3,000 simulated lives (admission hazards x3), loaded, tokenized, and a tiny model trained for 300 steps."""
    from foresight.train import TrainConfig, train

    d = tmp_path_factory.mktemp("simeval")
    simulated_warehouse(d, 3000, seed=11)
    train(d / "tok", d / "model", TrainConfig(preset="tiny", seq_len=256, micro_batch=8, max_steps=300,
                                              warmup_steps=30, lr=3e-3, min_lr=3e-4, eval_every=0,
                                              checkpoint_every=0))
    return {"sim": d / "sim", "db": d / "w.duckdb", "data": d / "tok", "model": d / "model"}


def test_30_day_admission_auroc_lower_bound_above_chance(sim_model):
    fc = Forecaster.from_pretrained(sim_model["model"])
    task = BUILTIN_TASKS["admission_30d"]
    with warehouse.connect(sim_model["db"], read_only=True) as con:
        ids = [r[0] for r in con.execute(
            "SELECT subject_id FROM subject_splits WHERE split IN ('tuning', 'held_out')").fetchall()]
        train_ids = [r[0] for r in con.execute(
            "SELECT subject_id FROM subject_splits WHERE split = 'train' LIMIT 800").fetchall()]
        points = prediction_points(con, ids, mode="events", min_follow_up_days=30, max_per_subject=2)
        train_points = prediction_points(con, train_ids, mode="events", min_follow_up_days=30, max_per_subject=1)
        oracle = simulator_oracle(sim_model["sim"])
        res = evaluate_task(fc, con, task, points, samples=4, train_points=train_points,
                            oracle=lambda pts: oracle(task, pts), n_boot=300)
    model = res["model"]
    assert model["metrics"]["n"] > 300 and 0.01 < model["metrics"]["prevalence"] < 0.3
    lo, hi = model["ci95"]["auroc"]
    assert lo > 0.6, f"model AUROC {model['metrics']['auroc']:.3f} [{lo:.3f}, {hi:.3f}]"
    # the oracle (the simulator's true risk) is the ceiling; the prevalence baseline carries no signal
    assert res["oracle"]["metrics"]["auroc"] > 0.7
    assert res["prevalence"]["metrics"]["auroc"] == pytest.approx(0.5)
    assert 0 <= model["metrics"]["ece"] < 0.2


def test_forecast_and_evaluate_commands_on_a_trained_model(sim_model, tmp_path):
    out, plot = tmp_path / "fc.json", tmp_path / "fc.png"
    proc = subprocess.run([sys.executable, "-m", "foresight.cli", "forecast", "--model", str(sim_model["model"]),
                           "--db", str(sim_model["db"]), "--as-of", "2025-06-01", "--horizon-days", "28",
                           "--samples", "5", "--split", "held_out", "--plot", str(plot), "--out", str(out),
                           "--json"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(payload["weeks"]) == 4 and payload["cohort_size"] > 100 and plot.stat().st_size > 1000
    assert all(w["p05"] <= w["mean"] <= w["p95"] or w["p05"] == w["p95"] for w in payload["weeks"])
    assert json.loads(out.read_text())["weeks"] == payload["weeks"]
    # a subject-level query through the CLI
    with warehouse.connect(sim_model["db"], read_only=True) as con:  # a held-out subject alive at the as-of date
        sid = con.execute(
            """SELECT min(s.subject_id) FROM subject_splits s WHERE s.split = 'held_out'
                 AND EXISTS (SELECT 1 FROM events e WHERE e.subject_id = s.subject_id AND e.code = 'MEDS_BIRTH'
                               AND e.time <= TIMESTAMP '2025-06-01')
                 AND NOT EXISTS (SELECT 1 FROM events e WHERE e.subject_id = s.subject_id
                                   AND e.code = 'MEDS_DEATH' AND e.time <= TIMESTAMP '2025-06-01')""").fetchall()[0][0]
    proc = subprocess.run([sys.executable, "-m", "foresight.cli", "predict", "--model", str(sim_model["model"]),
                           "--db", str(sim_model["db"]), "--subject", str(sid), "--as-of", "2025-06-01", "--task",
                           "admission_30d", "--samples", "10", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    pred = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not pred["dead"]  # else there would be nothing to check below
    assert 0 < len(pred["next_events"]["events"]) <= 10
    assert 0 <= pred["risks"][0]["low"] <= pred["risks"][0]["probability"] <= pred["risks"][0]["high"] <= 1


def test_evaluate_report_with_baselines(sim_model, tmp_path):
    report = evaluate_model(sim_model["model"], sim_model["data"], db=sim_model["db"],
                            tasks=[BUILTIN_TASKS["admission_30d"]], at=["discharges"], as_of=None, samples=4,
                            max_points=120, out_dir=tmp_path / "ev", max_rows=60)
    ne = report["next_event"]
    assert ne["positions"] > 1000
    # strict accuracy: a trained model is far better than the code-frequency baseline
    assert ne["topk"]["top10"] > ne["baselines"]["frequency"]["top10"]
    assert set(ne["new"]) == set(ne["recurrent"]) == {"top1", "top5", "top10"}
    t = report["tasks"][0]
    assert {"model", "prevalence", "logistic_counts", "gbm_counts"} <= set(t)
    # the gradient-boosted baseline: same count features, same train points, the same metric shape as logistic
    for name in ("logistic_counts", "gbm_counts"):
        assert {"auroc", "auprc", "brier", "ece"} <= set(t[name]["metrics"]) <= set(t[name]["ci95"]) | {"n"}
        assert t[name]["calibration"] and 0 <= t[name]["metrics"]["brier"] < 0.25
    # paired differences on the same points: model (raw and recalibrated on tuning points) minus each baseline (no
    # oracle was given here)
    calibrated = "calibrator" in t  # fitted only when the tuning points hold >= 5 outcomes of each kind
    assert calibrated or t["calibration_note"].startswith("not calibrated")
    assert set(t["paired"]) == {f"{m}-{b}" for m in ("model", "model_calibrated")[:1 + calibrated]
                                for b in ("logistic_counts", "gbm_counts")}
    assert report["eval_points"]["discharges"]["tuning"] > 0
    for name, d in t["paired"].items():
        who, base = name.split("-")
        assert d["auroc"] == pytest.approx(t[who]["metrics"]["auroc"] - t[base]["metrics"]["auroc"])
        assert d["ci"][0] <= d["auroc"] <= d["ci"][1] and d["brier_ci"][0] <= d["brier"] <= d["brier_ci"][1]
        assert d["points"] == t["points"]
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["tasks"][0]["paired"] == t["paired"]
    assert (tmp_path / "ev" / "report.json").exists() and (tmp_path / "ev" / "calibration.png").exists()
    assert t["points"] > 50
    # no worse than always answering 0.5 (Brier 0.25): a 30-day risk is rare, so a calibrated model scores far below
    assert 0 <= t["model"]["metrics"]["brier"] < 0.25
    assert datetime.fromisoformat(report["created"])




def test_evaluate_without_db_finds_the_warehouse_and_scores_admission_tasks(sim_model, tmp_path):
    """`foresight evaluate --model --data` alone: the warehouse is the one the tokens came from; discharge tasks
    are scored at discharges and admission tasks at admissions (both by default), and the calibration plot is
    written."""
    tasks = ["admission_30d", "in_hospital_mortality", "icu_during_stay", "length_of_stay"]  # LOS: as LOS > 7 d
    proc = run_cli("evaluate", "--model", str(sim_model["model"]), "--data", str(sim_model["data"]),
                         *(a for t in tasks for a in ("--task", t)), "--samples", "4", "--max-points", "40",
                         "--oracle", str(sim_model["sim"]), "--out", str(tmp_path / "ev"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["warehouse"]["path"] == str(sim_model["db"].resolve()) and not report["skipped"]
    assert (tmp_path / "ev" / "calibration.png").stat().st_size > 1000 and report["calibration_plot"]
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["tasks"] == report["tasks"]
    tasks = {(t["task"], t["at"]): t for t in report["tasks"]}
    assert set(tasks) == {("admission_30d", "discharges"), ("in_hospital_mortality", "admissions"),
                          ("icu_during_stay", "admissions"), ("los_over_7d", "admissions")}
    assert report["eval_points"]["admissions"]["held_out"] == 40
    assert "oracle" in tasks[("admission_30d", "discharges")]  # the simulator's oracle answers 30-day admission
    assert {"model-logistic_counts", "model-gbm_counts", "model-oracle"} <= set(
        tasks[("admission_30d", "discharges")]["paired"])
    # the human summary: each task's AUROC line, then its paired differences on one line
    paired_lines = [ln for ln in evaluation_summary(report).splitlines() if ln.startswith("  paired, model minus: ")]
    assert len(paired_lines) == len(report["tasks"]) and "gbm_counts AUROC" in paired_lines[0]
    for name in ("in_hospital_mortality", "icu_during_stay", "los_over_7d"):
        t = tasks[(name, "admissions")]
        assert t["points"] == 40 and {"model", "prevalence", "logistic_counts"} <= set(t)
        # the simulator's stay oracle answers every admission from the cohort's entry date (2000) on
        assert "oracle" in t and "oracle_note" not in t and 0 < t["oracle"]["metrics"]["n"] <= 40
        assert "model-oracle" in t["paired"]
        assert np.isfinite(t["model"]["metrics"]["brier"]) and 0 <= t["model"]["metrics"]["ece"] <= 1
    # a long stay is common enough to be ranked: the model and the count baseline both carry signal
    los = tasks[("los_over_7d", "admissions")]
    assert 0.05 < los["observed_rate"] < 0.95 and np.isfinite(los["model"]["metrics"]["auroc"])
    # every scored point is kept, so two models scored with one seed can be compared point by point
    import pyarrow.parquet as pq

    pts = pq.read_table(report["points_file"]).to_pandas()
    for (name, at), t in tasks.items():
        mine = pts[(pts["task"] == name) & (pts["at"] == at)]
        assert len(mine) == t["model"]["metrics"]["n"] and abs(mine["y"].mean() - t["observed_rate"]) < 1e-9
        ok = mine["model"].notna()
        assert abs(((mine["model"][ok] - mine["y"][ok]) ** 2).mean() - t["model"]["metrics"]["brier"]) < 1e-9


def test_evaluate_says_which_tasks_it_skipped_when_the_warehouse_is_gone(sim_model, tmp_path):
    # the token folder as it would be after its warehouse was deleted: every file shared, the summary pointing at
    # a warehouse that no longer exists, and no other warehouse with its fingerprint next to it
    data = tmp_path / "tok"
    data.mkdir()
    for f in sim_model["data"].iterdir():
        if f.name != "tokenize_summary.json":
            (data / f.name).symlink_to(f)
    summary = json.loads((sim_model["data"] / "tokenize_summary.json").read_text())
    gone = tmp_path / "deleted.duckdb"
    (data / "tokenize_summary.json").write_text(json.dumps({**summary, "db": str(gone)}))
    proc = run_cli("evaluate", "--model", str(sim_model["model"]), "--data", str(data), "--out", str(tmp_path / "ev"),
                         "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tasks"] == [] and report["calibration_plot"] is None
    assert report["next_event"]["positions"] > 1000  # what needs no warehouse is still measured
    skipped = {(s["task"], s["at"]) for s in report["skipped"]}
    assert skipped == {(t, "discharges") for t in ("admission_30d", "emergency_admission_30d", "mortality_30d")} | {
        (t, "admissions") for t in ("in_hospital_mortality", "icu_during_stay", "los_over_7d")}
    assert all(f"{gone} (recorded in {data / 'tokenize_summary.json'}) does not exist" in s["reason"]
               for s in report["skipped"])
    assert "skipped" in proc.stderr and str(gone) in proc.stderr  # said where a person reads, not only in JSON
    assert not (tmp_path / "ev" / "calibration.png").exists()
