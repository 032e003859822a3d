"""Forecasting mechanics on a tiny model: next-event distributions, batched futures, task labels, metrics."""

from __future__ import annotations

import contextlib
import math
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from foresight import tokens as T
from foresight import warehouse
from foresight.evaluate import backtest_rates, bootstrap_ci, expected_calibration_error, risk_metrics
from foresight.forecast import Forecaster
from foresight.forecast.cohorts import cohort_as_of, like_patterns, weekly_history
from foresight.forecast.population import forecast_cohort, population_rates, weekly_counts
from foresight.forecast.risks import RB_INTERVAL, WILSON_INTERVAL, risk_with_interval, risks_with_intervals
from foresight.forecast.tasks import BUILTIN_TASKS, TaskSpec, load_task, risk_from_futures, wilson
from foresight.warehouse import extract_end

from .conftest import alive_timelines, simulated_warehouse, tiny_llama, tiny_warehouse


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Forecaster, Path]:
    """A synthetic warehouse, its tokens, and a randomly initialised tiny Llama (mechanics, not skill)."""

    d = tmp_path_factory.mktemp("fc")
    db = tiny_warehouse(d / "w.duckdb", n_subjects=60)
    T.tokenize(db, d / "tok", T.TokenizerConfig(min_subjects=3))
    vocab = T.Vocabulary.load(d / "tok" / "vocab.json")
    return Forecaster(tiny_llama(vocab), vocab), db


def test_next_events_probabilities_and_filters(tiny):
    fc, db = tiny
    tl = alive_timelines(fc, db, 1)[0]
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
    tls = alive_timelines(fc, db, 4)
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
    tl = alive_timelines(fc, db, 1)[0]
    tl.as_of = tl.clock + timedelta(days=800)  # two quiet years since the last record
    futs = fc.sample_futures([tl], 6, 60, seed=0, max_new_tokens=60)[0]
    for fut in futs:
        assert all(tl.as_of <= e["time"] <= tl.as_of + timedelta(days=60) for e in fut)


def test_prompts_are_anchored_at_the_true_last_event_not_the_token_clock(tiny):
    """After gaps of months the token clock is off the truth by days; a prompt cut at an event must still start
    its future at that event's real time (a lagging clock made futures 'wait' and lose the rest of a stay)."""
    fc, db = tiny
    with warehouse.connect(db, read_only=True) as con:
        rows = con.execute("SELECT subject_id, time FROM events WHERE code LIKE 'ADMIT//%' ORDER BY 1, 2").fetchall()
        off = []
        for sid, t in rows:
            tl = fc.timeline_from_warehouse(con, sid, as_of=t)
            assert tl.clock == t and tl.as_of == t  # the last event is the admission itself, at its real time
            chunk = T.encode_subjects(con, fc.vocab, sid, sid, as_of=t)
            off.append(abs(int(chunk.clock_s[-1]) - int(T.to_epoch(t))))
    assert max(off) > 86400  # the case is real: some token clocks are more than a day off at an admission
    for fut in fc.sample_futures([tl], 4, 30, seed=1, max_new_tokens=40)[0]:
        assert all(tl.as_of <= e["time"] <= tl.as_of + timedelta(days=30) for e in fut)


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
    tls = alive_timelines(fc, db, 5)
    as_of = max(t.clock for t in tls)
    for t in tls:
        t.as_of = as_of
    fc_rates = population_rates(fc, tls, as_of, 28, samples=6, codes=("ADMIT//*",), seed=3, method="monte_carlo")
    assert fc_rates.cohort_size == 5 and len(fc_rates.weeks) == 4
    for w in fc_rates.weeks:
        assert w["p05"] <= w["p25"] <= w["p50"] <= w["p75"] <= w["p95"]
    # monte_carlo: the weekly means are the per-sample cohort totals averaged; recompute from the decoded futures
    # (the same draws: counting tokens without decoding finds the same events in the same weeks)
    futs = fc.sample_futures(tls, 6, 28, seed=3)
    counts = weekly_counts(futs, as_of, 28, ("ADMIT//*",))
    assert [w["mean"] for w in fc_rates.weeks] == pytest.approx(counts.mean(0).tolist())
    # expected (the default): the same paths, each step's P(admission) summed instead of the sampled 0/1
    rb = population_rates(fc, tls, as_of, 28, samples=6, codes=("ADMIT//*",), seed=3)
    assert rb.method == "expected" and rb.total["mean"] == pytest.approx(sum(w["mean"] for w in rb.weeks))
    bt = backtest_rates([{"mean": 10, "p05": 5, "p25": 8, "p75": 12, "p95": 15}] * 2, [12, 20])
    assert bt["mape"] == pytest.approx((2 / 12 + 10 / 20) / 2) and bt["coverage50"] == 0.5
    assert bt["coverage90"] == 0.5


def test_risks_with_intervals_give_what_predict_and_the_server_computed_by_hand(tiny):
    """Binary tasks: mean +- 1.96 SE of the Rao-Blackwellised paths; time tasks: one shared set of futures over
    the longest window, share of hits with a Wilson interval."""
    fc, db = tiny
    tl = alive_timelines(fc, db, 1)[0]
    tasks = [BUILTIN_TASKS["admission_30d"], BUILTIN_TASKS["length_of_stay"], TaskSpec("lab", ("LAB//*",), 7,
                                                                                       value="time")]
    got = risks_with_intervals(fc, tl, tasks, 8, seed=4)
    p, se = fc.task_risks([tl], tasks[0], 8, seed=4)
    assert got[0].to_dict() == {"task": "admission_30d", "probability": float(p[0]),
                                "low": max(0.0, float(p[0] - 1.96 * se[0])),
                                "high": min(1.0, float(p[0] + 1.96 * se[0])), "samples": 8}
    assert got[0].interval == RB_INTERVAL and got[0].warnings == []
    futures = fc.sample_futures([tl], 8, 365, seed=4)[0]  # the longest window of the time tasks
    for est, task in zip(got[1:], tasks[1:], strict=True):
        ref = risk_from_futures(task, futures, tl.as_of)
        assert est.to_dict() == {"task": ref.task, "probability": ref.probability, "low": ref.low,
                                 "high": ref.high, "samples": 8, "mean_value": ref.mean_value}
        assert est.interval == WILSON_INTERVAL
    one = risk_with_interval(fc, tl, tasks[0], 1, seed=4)  # one path: no spread, no interval
    assert (one.low, one.high) == (0.0, 1.0) and one.warnings == ["one future gives no interval: ask for more "
                                                                  "samples"]
    assert "time_head_risk" not in got[0].to_dict()  # no time head: predict's JSON has no such key


def _cohort_by_hand(fc, con, as_of, *, samples, max_subjects, history_weeks, seed):
    """The sequence `foresight forecast` ran before forecast_cohort existed (+ [END] as censoring at the
    warehouse's last event)."""
    ids = cohort_as_of(con, as_of, limit=max_subjects, seed=seed)
    history = weekly_history(con, ids, as_of, history_weeks, ("ADMIT//*",))
    timelines = fc.timelines_from_warehouse(con, ids, as_of)
    return ids, population_rates(fc, timelines, as_of, 21, samples=samples, codes=("ADMIT//*",), seed=seed,
                                 history=history, extract_end=extract_end(con))


def test_forecast_cohort_is_the_cli_sequence_and_narrows_by_codes(tiny):
    fc, db = tiny
    with warehouse.connect(db, read_only=True) as con:
        first, last = con.execute("SELECT min(time), max(time) FROM events WHERE code <> 'MEDS_BIRTH'").fetchone()
        as_of = first + (last - first) / 2
        everyone = cohort_as_of(con, as_of)
        assert len(everyone) > 6
        ids, ref = _cohort_by_hand(fc, con, as_of, samples=3, max_subjects=6, history_weeks=4, seed=2)
        messages = []
        run = forecast_cohort(fc, con, as_of, 21, samples=3, max_subjects=6, history_weeks=4, seed=2,
                              status=lambda m: messages.append(m) or contextlib.nullcontext())
        assert run.subject_ids == ids and run.cohort_size == len(everyone) and run.subsampled
        assert run.forecast is not None and run.forecast.to_json() == ref.to_json()
        assert messages == ["encoding 6 timelines", "sampling 3 futures for 6 subjects"]
        # narrowed to subjects with an admission on or before as_of, by hand
        admitted = sorted({r[0] for r in con.execute(
            "SELECT subject_id FROM events WHERE code LIKE $p ESCAPE '\\' AND time <= $t",
            {"p": like_patterns(["ADMIT//*"])[0], "t": as_of}).fetchall()} & set(everyone))
        coded = forecast_cohort(fc, con, as_of, 7, samples=1, cohort_codes=["ADMIT//*"], history_weeks=0)
        assert coded.subject_ids == admitted and coded.forecast is not None and coded.forecast.history == []
        small = forecast_cohort(fc, con, as_of, 7, samples=1, min_size=len(everyone) + 1)
        assert small.forecast is None and small.cohort_size == len(everyone)
        assert forecast_cohort(fc, con, first - timedelta(days=1), 7).forecast is None  # nobody before the data


# --- admission-time evaluation points and the forecast flow, on a small simulated warehouse --------------------


@pytest.fixture(scope="module")
def sim_small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """400 simulated lives in a warehouse, tokenized, and a randomly initialised tiny model saved as a model folder."""

    d = tmp_path_factory.mktemp("simsmall")
    simulated_warehouse(d, 400, seed=3)
    vocab = T.Vocabulary.load(d / "tok" / "vocab.json")
    tiny_llama(vocab).save_pretrained(d / "model")
    vocab.save(d / "model" / "vocab.json")
    return {"sim": d / "sim", "db": d / "w.duckdb", "data": d / "tok", "model": d / "model"}


def test_admission_points_and_stay_labels_match_the_record(sim_small):
    from itertools import groupby

    from foresight.evaluate import ADMISSION_TASKS, observed_labels, prediction_points

    with warehouse.connect(sim_small["db"], read_only=True) as con:
        ids = [r[0] for r in con.execute("SELECT subject_id FROM subject_splits").fetchall()]
        points = prediction_points(con, ids, mode="admissions", max_per_subject=10_000)
        labels = {name: observed_labels(con, t, points) for name, t in ADMISSION_TASKS.items()}
        rows = con.execute(
            """SELECT subject_id, time, code FROM events WHERE time IS NOT NULL AND (code LIKE 'ADMIT//%'
               OR code LIKE 'DISCHARGE//%' OR code IN ('MEDS_DEATH', 'ICU//ADMIT')) ORDER BY subject_id, time"""
        ).fetchall()
    # by hand: a stay runs from its ADMIT to the first discharge or death after it; stays the extract cuts off
    # before they end have no outcome and are not prediction points
    stays = {}
    for sid, group in groupby(rows, key=lambda r: r[0]):
        evs = [(t, c) for _, t, c in group]
        for t, c in evs:
            if c.startswith("ADMIT//"):
                after = [(u, x) for u, x in evs if u > t]
                end = next((u for u, x in after if x.startswith("DISCHARGE//") or x == "MEDS_DEATH"), None)
                if end is not None:
                    stays[(sid, t)] = (end - t, [x for u, x in after if u <= end])
    assert sorted(stays) == sorted((p.subject_id, p.time) for p in points) and len(points) > 300
    at = {(p.subject_id, p.time): i for i, p in enumerate(points)}

    def pick(want) -> tuple[int, datetime]:
        return next(k for k, (los, codes) in stays.items() if want(los, codes))

    week = timedelta(days=7)
    died = pick(lambda los, codes: "DISCHARGE//DIED" in codes)
    icu = pick(lambda los, codes: "ICU//ADMIT" in codes and "MEDS_DEATH" not in codes and los <= week)
    long_home = pick(lambda los, codes: los > week and not {"ICU//ADMIT", "MEDS_DEATH"} & set(codes))
    short_home = pick(lambda los, codes: los <= week and codes[-1] == "DISCHARGE//HOME" and len(codes) == 1)
    expected = {died: (1, None, None), icu: (0, 1, 0), long_home: (0, 0, 1), short_home: (0, 0, 0)}
    for key, (death, in_icu, long) in expected.items():
        i = at[key]
        assert labels["in_hospital_mortality"][i] == death, key
        if in_icu is not None:
            assert labels["icu_during_stay"][i] == in_icu and labels["los_over_7d"][i] == long, key
    # every in-hospital death of the simulator is recorded as DISCHARGE//DIED: the label counts exactly those
    assert labels["in_hospital_mortality"].sum() == sum("DISCHARGE//DIED" in c for _, c in stays.values()) > 0
    assert labels["los_over_7d"].sum() == sum(los > week for los, _ in stays.values())


@pytest.mark.slow
def test_forecast_flow_publishes_the_plot_and_the_json_as_artifacts(sim_small, tmp_path, prefect_server):
    import base64
    import json
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.forecast import forecast

    state = forecast(db=sim_small["db"], model=sim_small["model"], as_of=datetime(2025, 6, 1), horizon_days=14,
                     out_dir=tmp_path, samples=2, max_subjects=6, history_weeks=8, oracle_dir=sim_small["sim"],
                     backtest_origins=2, backtest_weeks=2, return_state=True)
    result = state.result()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    assert {"weekly-forecast", "forecast-summary", "forecast-json", "forecast-strata", "forecast-backtest"} <= set(
        by_key)
    # the strata table is published: every cell through the small-cell rule
    strata = json.loads(by_key["forecast-strata"].data)
    assert {r["stratification"] for r in strata} == {"type", "age"}
    assert all(r[k] == "<8" or (isinstance(r[k], int) and r[k] % 5 == 0) for r in strata for k in ("mean", "p95"))
    methods = {r["method"] for r in json.loads(by_key["forecast-backtest"].data)}
    assert {"model", "seasonal_naive", "glm", "ets", "oracle"} <= methods
    assert len(result["oracle_expected"]) == 2
    # the plot travels inside the artifact (the UI needs no access to the worker's disk): the PNG file's bytes
    embedded = re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", by_key["forecast-summary"].data)
    assert embedded is not None
    png = base64.b64decode(embedded.group(1))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png == Path(result["plot"]).read_bytes()
    published = json.loads(by_key["forecast-json"].data.removeprefix("```json\n").removesuffix("\n```"))
    assert published == json.loads(Path(result["json"]).read_text()) and len(published["weeks"]) == 2


def test_integrated_window_exits_agree_with_sampled_ones_and_never_score_zero(tiny):
    """task_risks with the exits from the window integrated (the default) estimates the same risk as sampling them
    (both unbiased: agreement within the two standard errors), with a smaller spread per path, and no path is
    worth exactly 0 because its first gap happened to be long. One prompt waits 3 days past its last event (the
    straddling gap bin), one has its extract end inside the window ([END] is redrawn, not an exit)."""
    fc, db = tiny
    tls = alive_timelines(fc, db, 3)
    tls[1].as_of = tls[1].clock + timedelta(days=3)
    task = BUILTIN_TASKS["admission_30d"]
    ends = [None, tls[2].clock + timedelta(days=10)]
    for end in ends:
        p_s, se_s = fc.task_risks(tls, task, 600, seed=1, integrate_exits=False, extract_end=end)
        p_i, se_i = fc.task_risks(tls, task, 150, seed=2, extract_end=end)
        assert fc.integrate_exits is True
        for k in range(len(tls)):
            assert abs(p_i[k] - p_s[k]) <= 4 * math.hypot(se_i[k], se_s[k]) + 1e-3, (k, p_i[k], p_s[k])
            assert se_i[k] * math.sqrt(150) < se_s[k] * math.sqrt(600)  # less spread per path
        assert (p_i > 0).all()
    few, _ = fc.task_risks(tls, task, 2, seed=3)
    assert (few > 0).all()  # two paths that each drew a long first gap still carry the in-window share


def test_exit_share_of_gaps_and_end(tiny):
    """_exit_share by hand: a gap leaves the window when its representative length is longer than the room left;
    while waiting, the part of its bin's log-uniform range above the room; [END] only where the extract ends after
    the window; nothing else leaves."""
    import torch

    fc, _ = tiny
    day = 86_400.0
    room = torch.tensor([10 * day, 10 * day])
    remaining = torch.tensor([0.0, 3 * day])
    share = fc._exit_share(remaining, room, torch.tensor([True, False]))
    t = torch.tensor(fc.vocab.time_ids)
    rep = fc.time_rep_s[t]
    assert share[0, t].tolist() == (rep > room[0]).double().tolist()
    lo = torch.maximum(fc.time_lower_s[t], remaining[1])
    hi = torch.maximum(fc.time_upper_s_finite[t], lo)
    for k, tok in enumerate(t.tolist()):
        if tok == fc.year_id:
            want = 1.0
        elif hi[k] <= lo[k]:
            want = float(lo[k] > room[1])
        else:
            cut = min(max(room[1].item(), lo[k].item()), hi[k].item())
            want = (math.log(hi[k]) - math.log(cut)) / (math.log(hi[k]) - math.log(lo[k]))
        assert share[1, tok].item() == pytest.approx(want, abs=1e-9), fc.vocab.tokens[tok]
    assert share[:, fc.end_id].tolist() == [1.0, 0.0]
    others = torch.ones(len(fc.vocab.tokens), dtype=torch.bool)
    others[t], others[fc.end_id] = False, False
    assert share[:, others].abs().sum().item() == 0.0
