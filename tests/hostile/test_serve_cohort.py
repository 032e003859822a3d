"""Hostile requests to /v1/cohort-rate (issue 17, defects 2 and 4): differencing attacks on the suppression, and
requests heavy enough to hold the service.

The warehouse is built here with known members (AS_OF is a Monday, history window = the 8 weeks before it):

- subjects 1-30 and 400 have DX I10 (the base cohort, 31 people); subject 1 also has a dementia diagnosis (F03)
  in the window; subject 400 dies three days after AS_OF (a date shift of one week drops exactly them);
- subject 100 (the target) has Z9049 and a dementia diagnosis in the week of 2021-05-03, nothing else in common;
- for k = 2..8, subjects 200+10k .. 200+10k+k-1 carry code Z{k}00: [I10, Z{k}00] adds exactly k people;
- subjects 300-310 have K21; 300-309 are in the train split, 310 in held_out (split=train drops exactly one).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from foresight import tokens as T
from foresight import warehouse
from foresight.forecast import Forecaster
from foresight.serve import ServeConfig, create_app, generate_key

from ..conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

AS_OF = datetime(2021, 6, 7)  # a Monday
TARGET = 100
DYING = 400
I10 = "DX//ICD10CM//I10"
DEMENTIA = "DX//ICD10CM//F03*"
CELLS = ("mean", "p05", "p25", "p50", "p75", "p95")


def _subject(sid: int, codes: list[str], admit: datetime) -> list[tuple]:
    rows = [(sid, datetime(1950 + sid % 30, 1 + sid % 12, 1), "MEDS_BIRTH", None),
            (sid, None, "GENDER//" + ("F" if sid % 2 else "M"), None)]
    for t in (admit, admit + timedelta(days=300 + sid % 40)):  # the second admission falls in 2021
        rows.append((sid, t, "ADMIT//EMERGENCY", None))
        rows.append((sid, t + timedelta(hours=2), "LAB//MIMIC//50912", 1.0 + (sid % 5) / 10))
        rows += [(sid, t + timedelta(days=2), c, None) for c in codes]
        rows.append((sid, t + timedelta(days=2), "DISCHARGE//HOME", None))
    return rows


def build_warehouse(path: Path) -> Path:
    rows: list[tuple] = []
    splits: dict[int, str] = {}
    start = datetime(2020, 6, 1)
    for sid in [*range(1, 31), DYING]:
        rows += _subject(sid, [I10], start + timedelta(days=sid % 100))
    rows.append((1, datetime(2021, 5, 20, 10), "DX//ICD10CM//F039", None))  # in the I10 cohort's history
    rows.append((DYING, AS_OF + timedelta(days=3), "MEDS_DEATH", None))
    rows += _subject(TARGET, ["DX//ICD10CM//Z9049"], start + timedelta(days=40))
    rows.append((TARGET, datetime(2021, 5, 5, 9), "DX//ICD10CM//F039", None))  # the week of 2021-05-03
    for k in range(2, 9):
        for j in range(k):
            rows += _subject(200 + 10 * k + j, [f"DX//ICD10CM//Z{k}00"], start + timedelta(days=50 + j))
    for sid in range(300, 311):
        rows += _subject(sid, ["DX//ICD10CM//K21"], start + timedelta(days=sid - 290))
        splits[sid] = "held_out" if sid == 310 else "train"
    with warehouse.connect(path) as con:
        con.executemany("INSERT INTO events VALUES (?, ?, ?, ?, NULL, NULL, NULL, 'test', 'test', 'test')", rows)
        ids = sorted({r[0] for r in rows})
        con.executemany("INSERT INTO subject_splits VALUES (?, ?)", [(s, splits.get(s, "train")) for s in ids])
        con.execute("INSERT INTO codes SELECT DISTINCT code, NULL, fs_kind(code), [], 'test' FROM events")
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cohort")
    db = build_warehouse(root / "warehouse.duckdb")
    T.tokenize(db, root / "tokens", T.TokenizerConfig(min_subjects=3))
    vocab = T.Vocabulary.load(root / "tokens" / "vocab.json")
    model_dir = root / "model"
    tiny_llama(vocab).save_pretrained(model_dir)
    shutil.copyfile(root / "tokens" / "vocab.json", model_dir / "vocab.json")
    keys = root / "keys.json"
    out: dict[str, Any] = {"root": root, "db": db, "model": model_dir, "keys": keys}
    for name in ("attacker", "accomplice", "clinician"):
        out[name], _ = generate_key(keys, "researcher", rate_per_minute=60000, burst=10000, label=name)
    out["fc"] = Forecaster.from_pretrained(model_dir)
    return out


def make_client(served: dict[str, Any], tmp_path: Path, **overrides: Any):
    from fastapi.testclient import TestClient

    cfg = ServeConfig(model_dir=served["model"], keys_file=served["keys"], audit_log=tmp_path / "audit.jsonl",
                      db=served["db"], **overrides)
    return TestClient(create_app(cfg, forecaster=served["fc"]))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


BASE = {"as_of": AS_OF.isoformat(), "horizon_days": 7, "samples": 2, "history_weeks": 8, "codes": [DEMENTIA]}
# a request that really samples: codes the vocabulary has (no token matches DEMENTIA at this floor, and a forecast
# of codes the model cannot write is zero without sampling a single future)
HEAVY = {"codes": ["ADMIT//*"]}


def published(r: Any) -> dict[str, Any]:
    """The released numbers of an answer (warnings aside)."""
    out = r.json()
    return {k: out[k] for k in ("as_of", "cohort_size", "subjects_forecast", "weeks", "history")}


def refused_or_same(first: Any, second: Any) -> bool:
    """A differencing pair is safe when the second answer is refused or publishes exactly the first's numbers."""
    assert first.status_code == 200, first.text
    if second.status_code == 403:
        return "fewer than 8" in second.json()["detail"]
    return second.status_code == 200 and published(second) == published(first)


# --- defect 2: differencing ------------------------------------------------------------------------------------


def test_issue_attack_one_added_subject_is_refused_and_zeros_are_suppressed(served, tmp_path):
    """The issue's exact attack: [I10] then [I10, Z9049], which adds exactly the target."""
    with make_client(served, tmp_path) as c:
        a = c.post("/v1/cohort-rate", json={**BASE, "cohort_codes": [I10]}, headers=auth(served["attacker"]))
        assert a.status_code == 200, a.text
        cells = [h["observed"] for h in a.json()["history"]] + [w[k] for w in a.json()["weeks"] for k in CELLS]
        assert len(a.json()["history"]) == 8 and 0 not in cells  # an empty cell looks like a cell of 1-7
        b = c.post("/v1/cohort-rate", json={**BASE, "cohort_codes": [I10, "DX//ICD10CM//Z9049"]},
                   headers=auth(served["attacker"]))
        assert b.status_code == 403 and "differs from one already released by fewer than 8 subjects" in b.json()[
            "detail"], b.text
        assert refused_or_same(a, b)
        # the same request again is answered, with the same numbers (it discloses nothing new)
        again = c.post("/v1/cohort-rate", json={**BASE, "cohort_codes": [I10]}, headers=auth(served["attacker"]))
        assert again.status_code == 200 and published(again) == published(a)


def test_the_target_alone_and_the_issue_order_reversed(served, tmp_path):
    """The larger cohort first, then the one without the target: refused the same way."""
    with make_client(served, tmp_path) as c:
        b = c.post("/v1/cohort-rate", json={**BASE, "cohort_codes": [I10, "DX//ICD10CM//Z9049"]},
                   headers=auth(served["attacker"]))
        a = c.post("/v1/cohort-rate", json={**BASE, "cohort_codes": [I10]}, headers=auth(served["attacker"]))
        assert refused_or_same(b, a) and a.status_code == 403
        alone = c.post("/v1/cohort-rate", json={**BASE, "cohort_codes": ["DX//ICD10CM//Z9049"]},
                       headers=auth(served["attacker"]))
        assert alone.status_code == 200 and alone.json()["cohort_size"] == "<8" and alone.json()["history"] == []


@pytest.mark.parametrize("k", range(2, 9))
def test_cohorts_differing_by_k_subjects(served, tmp_path, k):
    """2..7 added subjects: refused; 8 (the threshold): answered, every cell still suppressed or rounded."""
    with make_client(served, tmp_path) as c:
        a = c.post("/v1/cohort-rate", json={**BASE, "cohort_codes": [I10]}, headers=auth(served["attacker"]))
        b = c.post("/v1/cohort-rate", json={**BASE, "cohort_codes": [I10, f"DX//ICD10CM//Z{k}00"]},
                   headers=auth(served["attacker"]))
    if k < 8:
        assert b.status_code == 403 and refused_or_same(a, b), b.text
    else:
        assert b.status_code == 200, b.text
        assert all(h["observed"] == "<8" or h["observed"] % 5 == 0 for h in b.json()["history"])


def test_a_second_key_cannot_difference_either(served, tmp_path):
    with make_client(served, tmp_path) as c:
        a = c.post("/v1/cohort-rate", json={**BASE, "cohort_codes": [I10]}, headers=auth(served["attacker"]))
        b = c.post("/v1/cohort-rate", json={**BASE, "cohort_codes": [I10, "DX//ICD10CM//Z9049"]},
                   headers=auth(served["accomplice"]))
        assert b.status_code == 403 and refused_or_same(a, b)


def test_differencing_through_max_subjects(served, tmp_path):
    """max_subjects n then n-1 (refused when the seeded subsets differ by < 8 subjects, else the same numbers), and
    the whole cohort (31) then all but one."""
    with make_client(served, tmp_path) as c:
        body = {**BASE, "cohort_codes": [I10]}
        a = c.post("/v1/cohort-rate", json={**body, "max_subjects": 20}, headers=auth(served["attacker"]))
        b = c.post("/v1/cohort-rate", json={**body, "max_subjects": 19}, headers=auth(served["attacker"]))
        assert refused_or_same(a, b)
    with make_client(served, tmp_path) as c:
        a = c.post("/v1/cohort-rate", json={**body, "max_subjects": 31}, headers=auth(served["attacker"]))
        b = c.post("/v1/cohort-rate", json={**body, "max_subjects": 30}, headers=auth(served["attacker"]))
        assert refused_or_same(a, b) and b.status_code == 403
        tiny = c.post("/v1/cohort-rate", json={**body, "max_subjects": 3}, headers=auth(served["attacker"]))
        assert tiny.status_code == 422 and "minimum cohort of 8" in tiny.json()["detail"]


def test_differencing_through_split(served, tmp_path):
    """[K21] in all splits, then in train only: exactly subject 310 differs."""
    with make_client(served, tmp_path) as c:
        body = {**BASE, "cohort_codes": ["DX//ICD10CM//K21"], "codes": ["ADMIT//*"]}
        a = c.post("/v1/cohort-rate", json=body, headers=auth(served["attacker"]))
        b = c.post("/v1/cohort-rate", json={**body, "split": "train"}, headers=auth(served["attacker"]))
        assert refused_or_same(a, b) and b.status_code == 403


def test_differencing_through_date_shifts(served, tmp_path):
    """A day later in the same week: the same calendar weeks, the same numbers. A week later: subject 400 has
    died, so the cohort lost exactly one person: refused."""
    with make_client(served, tmp_path) as c:
        body = {**BASE, "cohort_codes": [I10], "codes": ["ADMIT//*"]}
        a = c.post("/v1/cohort-rate", json=body, headers=auth(served["attacker"]))
        for shift in (timedelta(days=1), timedelta(days=6, hours=23)):
            b = c.post("/v1/cohort-rate", json={**body, "as_of": (AS_OF + shift).isoformat()},
                       headers=auth(served["attacker"]))
            assert b.status_code == 200 and published(b) == published(a), b.text
            assert any("moved to 2021-06-07" in w for w in b.json()["warnings"])
        later = c.post("/v1/cohort-rate", json={**body, "as_of": (AS_OF + timedelta(days=7)).isoformat()},
                       headers=auth(served["attacker"]))
        assert refused_or_same(a, later) and later.status_code == 403


def test_differencing_the_forecast_part(served, tmp_path):
    """No history at all: the forecast weeks alone of two cohorts one subject apart are not both released."""
    with make_client(served, tmp_path) as c:
        body = {**BASE, "history_weeks": 0, "codes": ["ADMIT//*", "DX//*"]}
        a = c.post("/v1/cohort-rate", json={**body, "cohort_codes": [I10]}, headers=auth(served["attacker"]))
        assert a.status_code == 200 and len(a.json()["weeks"]) == 1 and a.json()["history"] == []
        b = c.post("/v1/cohort-rate", json={**body, "cohort_codes": [I10, "DX//ICD10CM//Z9049"]},
                   headers=auth(served["attacker"]))
        assert refused_or_same(a, b) and b.status_code == 403


def test_differencing_through_the_counted_codes(served, tmp_path):
    """The same cohort, the codes widened by one event (subject 1's dementia diagnosis): refused per week."""
    with make_client(served, tmp_path) as c:
        body = {**BASE, "cohort_codes": [I10]}
        a = c.post("/v1/cohort-rate", json={**body, "codes": ["ADMIT//*"]}, headers=auth(served["attacker"]))
        assert a.status_code == 200, a.text
        b = c.post("/v1/cohort-rate", json={**body, "codes": ["ADMIT//*", DEMENTIA]},
                   headers=auth(served["attacker"]))
        assert b.status_code == 403 and "history week 2021-05-17" in b.json()["detail"], b.text
        assert "fewer than 8 events" in b.json()["detail"]
        # without the history the same widening is answered (the forecast is the model's, over the same people)
        c2 = c.post("/v1/cohort-rate", json={**body, "codes": ["ADMIT//*", DEMENTIA], "history_weeks": 0},
                    headers=auth(served["attacker"]))
        assert c2.status_code == 200, c2.text


# --- defect 4: bounded work per request ---------------------------------------------------------------------------


class StepCounter:
    """Counts the model's forward passes made on the cohort worker, each slowed by ``delay`` seconds."""

    def __init__(self, fc: Forecaster, delay: float) -> None:
        self.fc, self.delay, self.steps = fc, delay, 0
        self.forward = fc.model.forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name.startswith("foresight-cohort"):
            self.steps += 1
            time.sleep(self.delay)
        return self.forward(*args, **kwargs)


@pytest.fixture
def slow_cohorts(served, monkeypatch):
    counter = StepCounter(served["fc"], delay=0.05)
    monkeypatch.setattr(served["fc"].model, "forward", counter)
    return counter


def wait_for(cond, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_issue_request_is_refused_with_its_cost_before_any_work(served, tmp_path, slow_cohorts):
    """{"horizon_days":365,"samples":20,"max_subjects":200}: within the schema, far over the cost limit."""
    with make_client(served, tmp_path) as c:
        body = {"as_of": AS_OF.isoformat(), "horizon_days": 365, "samples": 20, "max_subjects": 200}
        r = c.post("/v1/cohort-rate", json=body, headers=auth(served["attacker"]))
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "1,460,000 future-days (200 subjects x 20 samples x 365 days)" in detail and "224,000" in detail
        # the refusal is worked out from the request alone: a different cohort gets the same words (no size leak)
        other = c.post("/v1/cohort-rate", json={**body, "cohort_codes": ["DX//ICD10CM//Z9049"]},
                       headers=auth(served["attacker"]))
        assert other.status_code == 422 and other.json()["detail"] == detail
        assert slow_cohorts.steps == 0  # nothing was sampled
        card = c.get("/v1/model", headers=auth(served["attacker"])).json()["limits"]
        assert card["max_cohort_cost"] == 224_000 and card["cohort_deadline_s"] == 120


def test_deadline_stops_the_sampling(served, tmp_path, slow_cohorts):
    with make_client(served, tmp_path, cohort_deadline_s=0.5) as c:
        body = {**BASE, **HEAVY, "cohort_codes": [I10], "horizon_days": 28, "samples": 8, "history_weeks": 0}
        t0 = time.monotonic()
        r = c.post("/v1/cohort-rate", json=body, headers=auth(served["attacker"]))
        assert r.status_code == 503 and "deadline of 0.5 s" in r.json()["detail"], r.text
        assert time.monotonic() - t0 < 10
        steps = slow_cohorts.steps
        time.sleep(0.5)
        assert slow_cohorts.steps == steps > 0  # the worker stopped: no more forward passes
        # and the cohort worker is free again: the next (small) request runs
        ok = c.post("/v1/cohort-rate", json={**body, "samples": 1, "horizon_days": 1},
                    headers=auth(served["attacker"]))
        assert ok.status_code == 200 or "deadline" in ok.json()["detail"], ok.text


def test_a_client_that_disconnects_stops_the_sampling(served, tmp_path, slow_cohorts):
    cfg = ServeConfig(model_dir=served["model"], keys_file=served["keys"], audit_log=tmp_path / "audit.jsonl",
                      db=served["db"], cohort_deadline_s=60)
    app = create_app(cfg, forecaster=served["fc"])
    body = json.dumps({**BASE, **HEAVY, "cohort_codes": [I10], "horizon_days": 28, "samples": 8,
                       "history_weeks": 0}).encode()
    sent: list[dict[str, Any]] = []

    async def drive() -> None:
        gone = asyncio.Event()
        first = {"done": False}

        async def receive() -> dict[str, Any]:
            if not first["done"]:
                first["done"] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/cohort-rate", "raw_path": b"/v1/cohort-rate", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                             (b"authorization", f"Bearer {served['attacker']}".encode())]}
        task = asyncio.ensure_future(app(scope, receive, send))
        while slow_cohorts.steps < 3:  # sampling has begun
            assert not task.done(), sent
            await asyncio.sleep(0.02)
        gone.set()  # the client leaves
        await asyncio.wait_for(task, 10)
        await app.state.runtime.shutdown()

    asyncio.run(drive())
    steps = slow_cohorts.steps
    time.sleep(0.5)
    assert slow_cohorts.steps == steps  # nothing more ran after the client left
    assert app.state.runtime.cohort_stopped == 1
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [503]


def test_interactive_endpoints_answer_while_a_heavy_cohort_runs(served, tmp_path, slow_cohorts):
    """A cohort forecast of ~12 s runs; another key's next-events answers within 5 s meanwhile (it took the whole
    cohort forecast before), and a second cohort forecast is told to retry (one at a time)."""
    events = [{"time": None, "code": "GENDER//F"}, {"time": "1960-05-01T00:00:00", "code": "MEDS_BIRTH"},
              {"time": "2021-03-01T08:00:00", "code": "ADMIT//EMERGENCY"}]
    with make_client(served, tmp_path, cohort_deadline_s=12) as c:
        result: dict[str, Any] = {}
        heavy = {**BASE, **HEAVY, "cohort_codes": [I10], "horizon_days": 28, "samples": 8, "history_weeks": 0}

        def run_heavy() -> None:
            result["r"] = c.post("/v1/cohort-rate", json=heavy, headers=auth(served["attacker"]))

        th = threading.Thread(target=run_heavy)
        th.start()
        wait_for(lambda: slow_cohorts.steps >= 3)
        t0 = time.monotonic()
        r = c.post("/v1/next-events", json={"events": events, "top_k": 3}, headers=auth(served["clinician"]))
        elapsed = time.monotonic() - t0
        assert r.status_code == 200 and len(r.json()["events"]) == 3, r.text
        assert elapsed < 5.0, elapsed
        busy = c.post("/v1/cohort-rate", json=heavy, headers=auth(served["clinician"]))
        assert busy.status_code == 503 and "already running" in busy.json()["detail"]
        assert busy.headers["retry-after"] == "10"
        assert th.is_alive()  # the heavy request was still running all along
        th.join(30)
        assert result["r"].status_code in (200, 503), result["r"].text
