"""Forecasting mechanics on a tiny model: next-event distributions, batched futures, task labels, metrics."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from foresight import tokenizer as T
from foresight import warehouse
from foresight.evaluate import backtest_rates, bootstrap_ci, expected_calibration_error, risk_metrics
from foresight.forecast import (
    BUILTIN_TASKS,
    Forecaster,
    TaskSpec,
    load_task,
    population_rates,
    risk_from_futures,
    weekly_counts,
    wilson,
)

from .test_tokenizer import _tiny_warehouse


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Forecaster, Path]:
    """A synthetic warehouse, its tokens, and a randomly initialised tiny Llama (mechanics, not skill)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("fc")
    db = _tiny_warehouse(d / "w.duckdb", n_subjects=60)
    T.tokenize(db, d / "tok", T.TokenizerConfig(min_subjects=3))
    vocab = T.Vocabulary.load(d / "tok" / "vocab.json")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab.tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                      pad_token_id=vocab.index["[PAD]"])
    return Forecaster(LlamaForCausalLM(cfg), vocab), db


def _alive_timelines(fc: Forecaster, db: Path, n: int = 6):
    con = warehouse.connect(db, read_only=True)
    try:
        ids = [r[0] for r in con.execute("SELECT DISTINCT subject_id FROM events ORDER BY 1").fetchall()]
        tls = [fc.timeline_from_warehouse(con, s) for s in ids]
    finally:
        con.close()
    return [t for t in tls if not t.dead][:n]


def test_next_events_probabilities_and_filters(tiny):
    fc, db = tiny
    tl = _alive_timelines(fc, db, 1)[0]
    full = fc.next_events(tl, top_k=50)
    assert 0 < full.probability_mass <= 1 + 1e-9
    probs = [e["probability"] for e in full.events]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= full.probability_mass + 1e-9
    assert all(e["kind"] not in ("TIME", "AGE", "YEAR", "BIRTH") for e in full.events)  # events, not tokens
    assert math.isclose(sum(x["probability"] for x in full.time_to_next), 1.0, abs_tol=1e-9)
    assert full.expected_days_to_next is not None and full.expected_days_to_next >= 0
    dx = fc.next_events(tl, top_k=50, kinds=["DX"])
    assert dx.events and all(e["kind"] == "DX" for e in dx.events)
    assert dx.probability_mass <= full.probability_mass
    new = fc.next_events(tl, top_k=50, new_only=True)
    seen = {fc.vocab.tokens[int(t)] for t in tl.tokens}
    assert all(e["new"] and e["token"] not in seen for e in new.events)


def test_futures_are_reproducible_and_move_forward(tiny):
    fc, db = tiny
    tls = _alive_timelines(fc, db, 4)
    horizon = 400.0
    a = fc.sample_futures(tls, 5, horizon, seed=7, max_new_tokens=80)
    b = fc.sample_futures(tls, 5, horizon, seed=7, max_new_tokens=80)
    c = fc.sample_futures(tls, 5, horizon, seed=8, max_new_tokens=80)
    assert a == b and a != c
    n_events = 0
    for tl, futs in zip(tls, a, strict=True):
        assert len(futs) == 5
        for fut in futs:
            times = [e["time"] for e in fut]
            assert times == sorted(times)  # never back in time
            assert all(tl.as_of <= t <= tl.as_of + timedelta(days=horizon) for t in times)
            codes = [e["code"] for e in fut]
            assert "[END]" not in codes and "[PAD]" not in codes and "[BOS]" not in codes
            if "MEDS_DEATH" in codes:
                assert codes[-1] == "MEDS_DEATH"  # nothing happens after death
            n_events += len(fut)
    assert n_events > 0


def test_future_starts_after_as_of_even_long_after_the_last_event(tiny):
    fc, db = tiny
    tl = _alive_timelines(fc, db, 1)[0]
    tl.as_of = tl.clock + timedelta(days=800)  # two quiet years since the last record
    futs = fc.sample_futures([tl], 6, 60, seed=0, max_new_tokens=60)[0]
    for fut in futs:
        assert all(tl.as_of <= e["time"] <= tl.as_of + timedelta(days=60) for e in fut)


def test_task_labels_on_hand_built_futures():
    t0 = datetime(2030, 1, 1)
    fut = [{"time": t0 + timedelta(days=2), "code": "LAB//X"},
           {"time": t0 + timedelta(days=10), "code": "ADMIT//EMERGENCY"},
           {"time": t0 + timedelta(days=14), "code": "DISCHARGE//HOME"},
           {"time": t0 + timedelta(days=40), "code": "MEDS_DEATH"}]
    assert BUILTIN_TASKS["admission_30d"].label(fut, t0) == 1.0
    assert BUILTIN_TASKS["emergency_admission_30d"].label(fut, t0 + timedelta(days=11)) == 0.0
    assert BUILTIN_TASKS["mortality_30d"].label(fut, t0) == 0.0
    assert BUILTIN_TASKS["mortality_30d"].label(fut, t0 + timedelta(days=15)) == 1.0
    # in-hospital death: stopped by the discharge that comes first
    assert BUILTIN_TASKS["in_hospital_mortality"].label(fut, t0) == 0.0
    assert BUILTIN_TASKS["length_of_stay"].label(fut, t0 + timedelta(days=10)) == pytest.approx(4.0)
    custom = load_task({"name": "x", "codes": ["LAB//*"], "window_days": 1})
    assert custom.label(fut, t0) == 0.0 and custom.label(fut, t0 + timedelta(days=1.5)) == 1.0
    risk = risk_from_futures(BUILTIN_TASKS["admission_30d"], [fut, [], [], fut], t0)
    assert risk.probability == 0.5 and risk.low < 0.5 < risk.high
    with pytest.raises(ValueError, match="unknown task"):
        load_task("no_such_task")


def test_task_spec_files(tmp_path):
    p = tmp_path / "icu.yaml"
    p.write_text("name: icu_7d\ncodes: ['ICU//ADMIT']\nwindow_days: 7\n")
    assert load_task(str(p)) == TaskSpec("icu_7d", ("ICU//ADMIT",), 7)


def test_metrics_agree_with_reference_implementations():
    from scipy.stats import binomtest
    from sklearn.metrics import roc_auc_score

    y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.3, 0.6, 0.7, 0.5])
    m = risk_metrics(y, p)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    # ECE by hand, 2 bins: [0, .5) holds p = .1 .4 .35 .2 .3 (y 0 0 1 0 0); [.5, 1] holds .8 .9 .6 .7 .5 (y 1 1 1 1 0)
    lo = abs(np.mean([0, 0, 1, 0, 0]) - np.mean([0.1, 0.4, 0.35, 0.2, 0.3]))
    hi = abs(np.mean([1, 1, 1, 1, 0]) - np.mean([0.8, 0.9, 0.6, 0.7, 0.5]))
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.5 * lo + 0.5 * hi)
    ref = binomtest(7, 20).proportion_ci(method="wilson")
    assert wilson(7, 20) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert wilson(0, 0) == (0.0, 1.0)
    ci = bootstrap_ci(y, p, np.arange(len(y)), n_boot=300)
    assert ci["auroc"][0] <= m["auroc"] <= ci["auroc"][1]


def test_population_rates_and_backtest(tiny):
    fc, db = tiny
    tls = _alive_timelines(fc, db, 5)
    as_of = max(t.clock for t in tls)
    for t in tls:
        t.as_of = as_of
    fc_rates = population_rates(fc, tls, as_of, 28, samples=6, codes=("ADMIT//*",), seed=3)
    assert fc_rates.cohort_size == 5 and len(fc_rates.weeks) == 4
    for w in fc_rates.weeks:
        assert w["p05"] <= w["p25"] <= w["p50"] <= w["p75"] <= w["p95"]
    # the weekly means are the per-sample cohort totals averaged: recompute from the futures directly
    futs = fc.sample_futures(tls, 6, 28, seed=3)
    counts = weekly_counts(futs, as_of, 28, ("ADMIT//*",))
    assert [w["mean"] for w in fc_rates.weeks] == pytest.approx(counts.mean(0).tolist())
    bt = backtest_rates([{"mean": 10, "p05": 5, "p25": 8, "p75": 12, "p95": 15}] * 2, [12, 20])
    assert bt["mape"] == pytest.approx((2 / 12 + 10 / 20) / 2) and bt["coverage50"] == 0.5
    assert bt["coverage90"] == 0.5
