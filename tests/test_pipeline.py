"""The `pipeline` flow end to end on a small simulated cohort: every stage runs, the gate decides, a re-run with
unchanged inputs is served from the cache."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest

pytestmark = pytest.mark.slow


def test_pipeline_runs_then_reuses_cached_steps(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline
    from foresight.demo import demo_config
    from foresight.simulate import simulate

    simulate(600, tmp_path / "sim", seed=5, config=demo_config())
    kw = dict(source="meds", input=tmp_path / "sim", workdir=tmp_path / "run", as_of=datetime(2025, 9, 1),
              train_options={"preset": "tiny", "seq_len": 128, "max_steps": 30, "warmup_steps": 5,
                             "eval_every": 0, "checkpoint_every": 0},
              tasks=["admission_30d"], eval_samples=3, eval_points=40, horizon_days=14, forecast_samples=3,
              forecast_split="held_out", oracle_dir=tmp_path / "sim")
    with prefect_test_harness(server_startup_timeout=120):
        t0 = time.perf_counter()
        first = pipeline(**kw)
        t1 = time.perf_counter()
        second = pipeline(**kw)
        t2 = time.perf_counter()
    assert first["etl"]["subjects"] > 500 and first["tokenize"]["vocab_size"] > 50
    assert first["train"]["metrics"]["steps"] == 30
    assert "next_event" in first["evaluate"] and first["evaluate"]["tasks"][0]["oracle"]
    assert first["privacy"]["decision"] in ("PASS", "REVIEW", "FAIL")
    if first["privacy"]["decision"] != "PASS":  # a failed gate skips the release, and with it the forecast
        assert first["release"]["skipped"] and first["forecast"]["skipped"]
    else:
        assert first["forecast"]["cohort"] > 0
    # unchanged inputs: every cached stage returns the first run's result (its recorded seconds included)
    for stage in ("etl", "tokenize", "train", "evaluate", "privacy"):  # (JSON: NaN metrics compare equal)
        assert json.dumps(second[stage], sort_keys=True, default=str) == \
            json.dumps(first[stage], sort_keys=True, default=str), stage
    assert (t2 - t1) < 0.5 * (t1 - t0)
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert (tmp_path / "run" / "privacy" / "report.html").exists()
