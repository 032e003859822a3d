"""The `pipeline` flow end to end on a small simulated cohort: every stage runs, the gate decides, a re-run with
unchanged inputs is served from the cache; a gate that does not pass leaves the forecast to the last released
model; canaries planted by the pipeline are audited; the forecast flow's as_of="latest"."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TRAIN = {"preset": "tiny", "seq_len": 128, "max_steps": 30, "warmup_steps": 5, "eval_every": 0,
         "checkpoint_every": 0}
# the shipped gate, made cheaper to run (fewer bootstrap replicates, one extraction prompt length, no synthetic
# cohort): its decisions still follow the defaults
CHEAP_AUDIT = """
[audit]
bootstrap = 100
[extraction]
ks = [10]
max_pairs = 20
[synthetic]
samples = 0
"""
# every limit open: the gate PASSes any model, so a test can release one through the real release path
LENIENT = """
[audit]
bootstrap = 100
[mia]
max_auc = 1.0
unresolvable = "PASS"
tpr_limits = [{fpr = 0.001, max_tpr = 1.0}]
[canaries]
missing = "PASS"
fail_if_exposed = []
validity_repeats = 1000
unverified = "PASS"
[extraction]
ks = [10]
max_pairs = 20
max_exact_gap_points = 100.0
eidetic = "PASS"
no_pairs = "PASS"
[vocab_floor]
min_subjects = 1
named_below_floor = "PASS"
[synthetic]
samples = 0
"""


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 simulated lives (MEDS), shared by the tests of this module."""
    from foresight.demo import demo_config
    from foresight.simulate import simulate

    out = tmp_path_factory.mktemp("pipeline") / "sim"
    simulate(600, out, seed=5, config=demo_config())
    return out


@pytest.fixture(scope="module")
def first_run(sim: Path, prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The whole chain once, from the MEDS files, with default canaries and a gate with every limit open, so its
    model is released (the real release path); the tests below re-run it and start from its warehouse."""
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("first")
    (root / "lenient.toml").write_text(LENIENT)
    kw = dict(source="meds", input=sim, workdir=root / "run", registry=root / "registry", as_of=datetime(2025, 9, 1),
              train_options=TRAIN, canary_references=200, privacy_config=root / "lenient.toml",
              tasks=["admission_30d"], eval_samples=3, eval_points=40, horizon_days=14, forecast_samples=3,
              forecast_split="held_out", forecast_max_subjects=40, oracle_dir=sim)
    t0 = time.perf_counter()
    result = pipeline(**kw)
    return {"kw": kw, "result": result, "seconds": time.perf_counter() - t0}


def test_pipeline_runs_then_reuses_cached_steps(first_run):
    from flows.pipeline import pipeline
    from privacy.release import model_checksum

    kw, first = first_run["kw"], first_run["result"]
    t1 = time.perf_counter()
    second = pipeline(**kw)
    t2 = time.perf_counter()
    assert first["etl"]["subjects"] > 500 and first["tokenize"]["vocab_size"] > 50
    assert first["train"]["metrics"]["steps"] == 30
    assert "next_event" in first["evaluate"] and first["evaluate"]["tasks"][0]["oracle"]
    # the summary carries the report's per-task block, its paired differences included (what demo_summary.json holds)
    task0 = first["evaluate"]["tasks"][0]
    in_report = json.loads(Path(first["evaluate"]["report"]).read_text())["tasks"][0]
    assert json.dumps(task0, sort_keys=True) == json.dumps(in_report, sort_keys=True)  # NaN-safe, tuples as lists
    assert "model-oracle" in task0["paired"] and ("gbm_counts" in task0) == ("model-gbm_counts" in task0["paired"])
    # default canaries: 5 per repeat count 1, 2, 4, 16, each group's exposure in the audit's summary
    assert first["canaries"]["canary_subjects"] == 5 * (1 + 2 + 4 + 16)
    assert [g["repeats"] for g in first["privacy"]["canaries"]] == [1, 2, 4, 16]
    # the gate passed: the model is released and the forecast is made with the released copy
    assert first["privacy"]["decision"] == "PASS", first["privacy"]["reasons"]
    released = Path(first["release"]["path"])
    assert released.parent == kw["registry"] and model_checksum(released)[0] == first["release"]["checksum"]
    assert first["forecast"]["model"] == str(released) and first["forecast"]["model_released"]
    assert first["forecast"]["cohort"] > 0
    # unchanged inputs: every cached stage returns the first run's result (its recorded seconds included)
    for stage in ("etl", "tokenize", "canaries", "train", "evaluate", "privacy"):  # (JSON: NaN metrics equal)
        assert json.dumps(second[stage], sort_keys=True, default=str) == \
            json.dumps(first[stage], sort_keys=True, default=str), stage
    assert second["release"].get("already_released")
    assert (t2 - t1) < 0.5 * first_run["seconds"]
    assert (kw["workdir"] / "model" / "config.json").exists()
    assert (kw["workdir"] / "privacy" / "report.html").exists()


def test_the_forecast_can_be_of_another_population_in_its_own_warehouse(first_run, tmp_path):
    """The demo forecasts a catchment the model never saw: a second population in its own warehouse, with its own
    simulator folder as the oracle. The cohort is that warehouse's, and the oracle's expectation is of its people."""
    from flows.pipeline import pipeline
    from foresight import sources, warehouse
    from foresight.demo import demo_config
    from foresight.forecast.cohorts import cohort_as_of
    from foresight.simulate import simulate

    other = tmp_path / "catchment"
    simulate(200, other / "sim", seed=9, config=demo_config(), first_subject_id=500_001)
    db = other / "w.duckdb"
    kw = {**first_run["kw"], "forecast_split": None, "forecast_max_subjects": None, "forecast_db": db,
          "forecast_oracle_dir": other / "sim"}
    with warehouse.connect(db) as con:
        sources.load("meds", con, other / "sim")
        alive = cohort_as_of(con, kw["as_of"])
    assert alive and min(alive) >= 500_001
    fc = pipeline(**kw)["forecast"]
    assert fc["cohort"] == len(alive)
    observed = json.loads(Path(fc["json"]).read_text())["observed_after"]
    with warehouse.connect(db, read_only=True) as con:
        expect = con.execute("SELECT count(*) FROM events WHERE code LIKE 'ADMIT//%' AND time >= ? AND time < ? + "
                             "INTERVAL 14 DAY AND list_contains(?, subject_id)",
                             [kw["as_of"], kw["as_of"], alive]).fetchall()[0][0]
    assert sum(w["observed"] for w in observed) == expect  # the catchment's admissions, not the run's own
    assert fc["oracle_total"] > 0  # the oracle found these people in the catchment's simulator folder


def test_failed_gate_forecasts_with_the_last_released_model_and_canaries_are_audited(first_run, tmp_path):
    """The first run loaded the cohort and released its model through a gate with every limit open. Run 2 starts
    from that warehouse (source="warehouse"), plants canaries, trains a different model and meets the shipped gate,
    which does not pass it (too few held-out subjects to resolve a 0.1% FPR): no release, and the forecast is
    made with the released model, not run 2's candidate."""
    from flows.forecast import forecast
    from flows.pipeline import pipeline
    from foresight import pipeline as P
    from foresight.dataset import PackedSplit
    from privacy.release import model_checksum

    (tmp_path / "cheap.toml").write_text(CHEAP_AUDIT)
    first_dir, registry, second_dir = first_run["kw"]["workdir"], first_run["kw"]["registry"], tmp_path / "second"
    released = P.latest_release(registry)
    assert released is not None and released.parent == registry

    db = first_dir / "warehouse.duckdb"
    second = pipeline(source="warehouse", input=db, workdir=second_dir, registry=registry, as_of=datetime(2025, 9, 1),
                      canaries=2, canary_repeats=[1, 16], canary_references=200,
                      train_options={**TRAIN, "max_steps": 20}, privacy_config=tmp_path / "cheap.toml",
                      tasks=["admission_30d"], eval_samples=2, eval_points=20, horizon_days=14, forecast_samples=2,
                      forecast_split="held_out", forecast_max_subjects=20)
    # the existing warehouse is used as it is: no load, no warehouse of its own
    assert second["etl"]["source"] == "warehouse" and second["etl"]["fingerprint"] == P.warehouse_fingerprint(db)
    assert second["etl"]["subjects"] == first_run["result"]["etl"]["subjects"]
    assert not (second_dir / "warehouse.duckdb").exists()

    # the gate did not pass: the release is skipped and the forecast uses the first run's released model
    assert second["privacy"]["decision"] != "PASS"
    assert second["release"]["skipped"] and second["release"]["reasons"] == second["privacy"]["reasons"]
    candidate = model_checksum(second_dir / "model")[0]
    assert candidate != model_checksum(released)[0]
    assert second["forecast"]["model"] == str(released) and second["forecast"]["model_released"]
    assert second["forecast"]["model_checksum"] == model_checksum(released)[0] == model_checksum(first_dir /
                                                                                                  "model")[0]
    assert second["forecast"]["cohort"] > 0 and Path(second["forecast"]["json"]).exists()

    # canaries: 2 per repeat count, planted 1 and 16 times, only in the copy training and the audit read
    assert second["canaries"]["canary_subjects"] == 2 * (1 + 16) and second["canaries"]["references"] <= 200
    canary_ids = PackedSplit(second_dir / "tokens+canaries", "train").index["subject_id"]
    assert int((canary_ids < 0).sum()) == 34
    for split in ("train", "tuning", "held_out"):  # the data evaluation reads holds no synthetic subject
        assert (PackedSplit(second_dir / "tokens", split).index["subject_id"] > 0).all()
    assert not (second_dir / "tokens" / "canaries.json").exists()
    meta = json.loads((second_dir / "model" / "foresight.json").read_text())
    assert Path(meta["data"]["dir"]) == (second_dir / "tokens+canaries").resolve()
    assert json.loads(Path(second["evaluate"]["report"]).read_text())["data"] == str(second_dir / "tokens")
    # ... and the audit found them through the manifest and reports each one's exposure
    assert [g["repeats"] for g in second["privacy"]["canaries"]] == [1, 16]
    assert all(g["canaries"] == 2 for g in second["privacy"]["canaries"])
    report = json.loads((second_dir / "privacy" / "report.json").read_text())
    assert report["data"]["canaries"]["canary_subjects"] == 34
    rows = report["probes"]["canaries"]["canaries"]
    assert len(rows) == 4 and all(np.isfinite(r["exposure_rank"]) and 0 <= r["p_value"] <= 1 for r in rows)
    assert report["data"]["subjects"]["train"] == second["tokenize"]["subjects"]["train"]  # canaries not counted

    # the Monday forecast flow: as_of="latest" is the day after the warehouse's last event ...
    last = P.warehouse_dates(db)[1]
    latest = forecast(db=db, registry=registry, as_of="latest", horizon_days=7, samples=2, max_subjects=10,
                      out_dir=tmp_path / "monday")
    assert Path(latest["json"]).name == f"forecast-{last.date() + timedelta(days=1):%Y%m%d}.json"
    # ... and a date where nobody is alive says so, with the dates the warehouse does hold
    with pytest.raises(ValueError, match=r"as_of=1900-01-01 .* events run from \d{4}-\d\d-\d\d to "
                                         rf"{last:%Y-%m-%d}.*as_of='latest'"):
        forecast(db=db, registry=registry, as_of=datetime(1900, 1, 1), out_dir=tmp_path / "none")


def test_existing_warehouse_latest_as_of_and_empty_cohort_message(tiny_mimic, tmp_path):
    """source="warehouse" reads a warehouse as it is; "latest" and the empty-cohort error on MIMIC's shifted dates."""
    from foresight import pipeline as P
    from foresight import sources, warehouse

    db = tmp_path / "warehouse.duckdb"
    with pytest.raises(FileNotFoundError, match="no warehouse at"):
        P.warehouse_stage(db)
    with warehouse.connect(db) as con:
        sources.load("mimic-iv", con, tiny_mimic)
    stage = P.warehouse_stage(db)
    assert stage["fingerprint"] == P.warehouse_fingerprint(db) != "missing"
    assert stage["subjects"] == 3 and list(stage["latest_loads"]) == ["mimic-iv"]
    # the last event is subject 3's death at 2171-03-04 06:00: "latest" is the midnight after it
    assert P.resolve_as_of(db, "latest") == datetime(2171, 3, 5)
    assert P.resolve_as_of(db, "2150-06-01") == datetime(2150, 6, 1) and P.resolve_as_of(db, None) is None
    msg = P.empty_cohort_message(db, datetime(2026, 1, 5))
    assert "as_of=2026-01-05" in msg and "events run from 2150-05-01 to 2171-03-04" in msg, msg
