"""Forecasts from the time head (Delphi-2M's rates, foresight.model): next_events' time-to-next view, the closed-form
task risk, `foresight predict` and `evaluate_task`, on a tiny model really trained with the head (and one without).
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from foresight import model as M
from foresight import tokens as T
from foresight import train as TR
from foresight import warehouse
from foresight.forecast.forecaster import Forecaster
from foresight.forecast.risks import risks_with_intervals
from foresight.forecast.tasks import BUILTIN_TASKS, TaskSpec

from .conftest import alive_timelines, tiny_warehouse

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread, here and in child runs


# A few steps are enough: the test checks the arithmetic on whatever the weights are, not the model's skill.
FAST = dict(preset="tiny", seq_len=64, micro_batch=4, max_steps=20, lr=3e-3, min_lr=3e-4, warmup_steps=2,
            eval_every=0, eval_rows=4, checkpoint_every=0, log_every=1000, seed=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A synthetic warehouse, its tokens, and two tiny models trained on them: with and without the time head."""
    d = tmp_path_factory.mktemp("th")
    db = tiny_warehouse(d / "w.duckdb", n_subjects=60)
    T.tokenize(db, d / "tok", T.TokenizerConfig(min_subjects=3))
    for name, head in (("head", True), ("plain", False)):
        TR.train(d / "tok", d / name, TR.TrainConfig(**FAST, time_head=head))
    return {"db": db, "head": d / "head", "plain": d / "plain"}


def _last_logits(fc: Forecaster, tokens: np.ndarray) -> torch.Tensor:
    """The logits at a prompt's last position from a plain forward pass (no packing, no gap tokens)."""
    with torch.no_grad():
        return fc.model(input_ids=torch.from_numpy(tokens)[None], use_cache=False).logits[0, -1].float()


def test_next_events_carry_the_time_head_view(models):
    fc = Forecaster.from_pretrained(models["head"])
    assert fc.has_time_head
    bias = torch.from_numpy(M.event_log_bias(fc.vocab))
    for tl in alive_timelines(fc, models["db"], 3):
        nxt = fc.next_events(tl, top_k=5)
        assert nxt.time_to_next_source == "interval_tokens"  # the interval-token distribution is still there
        assert math.isclose(sum(x["probability"] for x in nxt.time_to_next), 1.0, abs_tol=1e-9)
        head = nxt.time_head
        assert head is not None and head["source"] == "time_head"
        # 1 / Lambda, Lambda from the model's own logits by foresight.model.time_to_event
        ref = M.time_to_event(_last_logits(fc, tl.tokens), bias)
        assert head["expected_days"] > 0
        assert head["expected_days"] == pytest.approx(float(ref["expected_days"]), rel=1e-4)
        assert head["rate_per_day"] == pytest.approx(float(ref["rate"]), rel=1e-4)
        # the same bins as the interval tokens, cumulative: P(within h) = 1 - exp(-Lambda h), monotone in h
        within = head["within"]
        assert [w["bin"] for w in within] == [x["bin"] for x in nxt.time_to_next[1:]]
        probs = [w["probability"] for w in within]
        assert all(0.0 <= p <= 1.0 for p in probs) and probs == sorted(probs)
        days = [w["days"] for w in within]
        assert days[-1] is None and probs[-1] == 1.0  # the open-ended "1Y" bin
        assert days[:-1] == sorted(days[:-1]) and {1.0, 7.0, 30.0, 365.25} <= set(days)  # what predict prints
        for w in within[:-1]:
            assert w["probability"] == pytest.approx(1 - math.exp(-float(ref["rate"]) * w["days"]), rel=1e-4)
        d = nxt.to_dict()
        assert d["time_head"] == head and d["time_to_next"] == nxt.time_to_next
        json.dumps(d)  # JSON-ready as it stands


def test_time_head_task_risk_is_the_closed_form(models):
    fc = Forecaster.from_pretrained(models["head"])
    tls = alive_timelines(fc, models["db"], 4)
    tls[1].as_of = tls[1].clock + timedelta(days=40)  # a later start: memoryless clocks give the same risk
    bias = torch.from_numpy(M.event_log_bias(fc.vocab)).double()
    for name in ("admission_30d", "readmission_30d", "mortality_30d"):
        task = BUILTIN_TASKS[name]
        got = fc.time_head_risks(tls, task)
        assert got is not None and got.shape == (len(tls),)
        for tl, r in zip(tls, got, strict=True):
            lam = torch.exp(_last_logits(fc, tl.tokens).double() + bias)  # per-token rates; 0 for non-events
            total = sum(float(lam[i]) for i, t in enumerate(fc.vocab.tokens) if task.matches(t))
            assert r == pytest.approx(1 - math.exp(-task.window_days * total), rel=1e-4)
    # a longer window is a larger risk; a code the vocabulary does not know has none
    wide = fc.time_head_risks(tls, TaskSpec("a", ("ADMIT//*",), 365))
    assert np.all(wide >= fc.time_head_risks(tls, BUILTIN_TASKS["admission_30d"]))
    assert np.all(fc.time_head_risks(tls, TaskSpec("none", ("NO//SUCH",), 30)) == 0.0)
    # tasks the frozen-rate closed form cannot answer, and the dead
    assert fc.time_head_risks(tls, BUILTIN_TASKS["in_hospital_mortality"]) is None
    assert not BUILTIN_TASKS["length_of_stay"].time_head_applicable
    assert [BUILTIN_TASKS[t].time_head_applicable for t in ("admission_30d", "emergency_admission_30d",
                                                             "readmission_30d", "icu_admission_30d")] == [True] * 4
    tls[0].dead = True
    assert np.isnan(fc.time_head_risks(tls, BUILTIN_TASKS["admission_30d"])[0])


def test_model_without_the_head_has_no_time_head_keys(models):
    fc = Forecaster.from_pretrained(models["plain"])
    assert not fc.has_time_head
    assert json.loads((models["plain"] / "foresight.json").read_text())["time_head"]["enabled"] is False
    tl = alive_timelines(fc, models["db"], 1)[0]
    nxt = fc.next_events(tl, top_k=5)
    assert nxt.time_head is None and "time_head" not in nxt.to_dict()
    assert fc.time_head_risks([tl], BUILTIN_TASKS["admission_30d"]) is None
    with pytest.raises(ValueError, match="time head"):
        fc.time_head_view(fc.event_distributions([tl])[0])


def test_predict_cli_and_evaluate_report_the_time_head(models, tmp_path):
    from typer.testing import CliRunner

    from foresight.cli import app
    from foresight.evaluate import PredictionPoint, evaluate_task

    fc = Forecaster.from_pretrained(models["head"])
    tl = alive_timelines(fc, models["db"], 1)[0]
    # in-hospital death as a task file, with a short window so the futures stay short: has stop codes, no closed form
    stopped = tmp_path / "death_in_hospital_7d.json"
    stopped.write_text(json.dumps({"name": "death_in_hospital_7d", "codes": ["MEDS_DEATH"], "window_days": 7,
                                   "stop_codes": ["DISCHARGE//*"]}))
    args = ["predict", "--model", str(models["head"]), "--db", str(models["db"]), "--subject", str(tl.subject_id),
            "--top-k", "3", "--task", "admission_30d", "--task", str(stopped), "--samples", "2"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["next_events"]["time_head"]["expected_days"] == pytest.approx(fc.next_events(tl).time_head[
        "expected_days"], rel=1e-6)
    risks = {r["task"]: r for r in out["risks"]}
    expect = fc.time_head_risks([tl], BUILTIN_TASKS["admission_30d"])[0]
    assert risks["admission_30d"]["time_head_risk"] == pytest.approx(expect, rel=1e-6)
    assert risks["death_in_hospital_7d"]["time_head_risk"] is None  # has the head, but the task does not qualify
    human = CliRunner().invoke(app, args)
    assert human.exit_code == 0 and "(time head)" in human.output and "time head " in human.output
    plain = CliRunner().invoke(app, [*args[:2], str(models["plain"]), *args[3:], "--json"])
    body = json.loads(plain.stdout.strip().splitlines()[-1])
    assert "time_head" not in body["next_events"] and all("time_head_risk" not in r for r in body["risks"])
    # evaluate scores the closed form as one more predictor, on the same points as the futures' estimate
    with warehouse.connect(models["db"], read_only=True) as con:
        points = [PredictionPoint(t.subject_id, t.clock) for t in alive_timelines(fc, models["db"], 4)]
        task = BUILTIN_TASKS["admission_30d"]
        res = evaluate_task(fc, con, task, points, samples=2, n_boot=10)
        one_by_one = [fc.time_head_risks([fc.timeline_from_warehouse(con, p.subject_id, p.time)], task)[0]
                      for p in points]
        assert res["_p"]["model_time_head"] == pytest.approx(one_by_one, rel=1e-6)
        assert res["model_time_head"]["metrics"].keys() == res["model"]["metrics"].keys()
        assert "model_time_head" not in evaluate_task(fc, con, TaskSpec.from_dict(json.loads(stopped.read_text())),
                                                      points, samples=2, n_boot=10)


def test_risks_with_intervals_carry_the_closed_form_where_it_applies(models):
    fc = Forecaster.from_pretrained(models["head"])
    tl = alive_timelines(fc, models["db"], 1)[0]
    adm, los = BUILTIN_TASKS["admission_30d"], BUILTIN_TASKS["length_of_stay"]
    got = risks_with_intervals(fc, tl, [adm, los], 2, time_head=True)
    assert got[0].to_dict()["time_head_risk"] == float(fc.time_head_risks([tl], adm)[0])
    assert got[1].to_dict()["time_head_risk"] is None  # days until discharge: not a closed-form question
