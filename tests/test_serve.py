"""The query service against a real (tiny, untrained) model directory: auth and roles, rate limits, the audit
trail, small-cell suppression, validation, batching, explanations, fuzzing over the OpenAPI schema, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch

from foresight import tokens as T
from foresight import warehouse
from foresight.forecast import BUILTIN_TASKS, Forecaster, cohort_as_of, risk_from_futures, weekly_history
from foresight.serve import (
    AuditLog,
    RateLimiter,
    ServeConfig,
    SuppressionRule,
    create_app,
    generate_key,
    revoke_key,
    suppress_count,
    verify_audit_log,
)

from .conftest import run_cli, tiny_llama, tiny_warehouse

REPO = Path(__file__).resolve().parents[1]


def build_model_dir(root: Path, n_subjects: int = 60, hidden: int = 32, layers: int = 2, heads: int = 2,
                    seed: int = 0) -> tuple[Path, Path]:
    """A real model directory (LlamaForCausalLM.save_pretrained + vocab.json) and its warehouse.

    Randomly initialised: the service's mechanics, not forecasting skill, are under test. bench/serve.py uses it too.
    """

    root.mkdir(parents=True, exist_ok=True)
    db = tiny_warehouse(root / "warehouse.duckdb", n_subjects=n_subjects)
    T.tokenize(db, root / "tokens", T.TokenizerConfig(min_subjects=3))
    vocab = T.Vocabulary.load(root / "tokens" / "vocab.json")
    model_dir = root / "model"
    tiny_llama(vocab, hidden=hidden, layers=layers, heads=heads, seed=seed).save_pretrained(model_dir)
    shutil.copyfile(root / "tokens" / "vocab.json", model_dir / "vocab.json")
    (model_dir / "code_descriptions.json").write_text(json.dumps({"ADMIT//EMERGENCY": "Emergency admission"}))
    return model_dir, db


def sample_events(n_admissions: int = 2) -> list[dict]:
    """A plausible posted timeline in the codes of the tiny warehouse."""
    t = datetime(2021, 3, 1, 8, 0)
    ev = [{"time": None, "code": "GENDER//F"}, {"time": "1960-05-01T00:00:00", "code": "MEDS_BIRTH"}]
    for k in range(n_admissions):
        ev.append({"time": t.isoformat(), "code": "ADMIT//EMERGENCY"})
        ev.append({"time": (t + timedelta(hours=1)).isoformat(), "code": "LAB//MIMIC//50912", "numeric_value": 1.3})
        ev.append({"time": (t + timedelta(days=3)).isoformat(), "code": "DX//ICD10CM//I10"})
        ev.append({"time": (t + timedelta(days=3)).isoformat(), "code": "DISCHARGE//HOME"})
        t += timedelta(days=40 + 17 * k)
    return ev


def parsed(events: list[dict]) -> list[dict]:
    return [{**e, "time": datetime.fromisoformat(e["time"]) if e["time"] else None} for e in events]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    model_dir, db = build_model_dir(root)
    keys = root / "keys.json"
    out = {"root": root, "model": model_dir, "db": db, "keys": keys}
    for name, role, rate, burst in (("researcher", "researcher", 6000, 1000), ("analyst", "analyst", 6000, 1000),
                                    ("slow", "researcher", 1, 3), ("fuzz", "analyst", 60000, 100000)):
        out[name], _ = generate_key(keys, role, rate_per_minute=rate, burst=burst, label=name)
    out["fc"] = Forecaster.from_pretrained(model_dir)
    return out


def make_app(built: dict, audit: Path, **overrides):
    """An app on the module's model (loaded once), with its own audit log and any ServeConfig overrides."""
    cfg = ServeConfig(model_dir=built["model"], keys_file=built["keys"], audit_log=audit, db=built["db"],
                      **overrides)
    return create_app(cfg, forecaster=built["fc"])


@pytest.fixture(scope="module")
def client(built: dict):
    from fastapi.testclient import TestClient

    # this app loads the model itself (the real from_pretrained path)
    app = create_app(ServeConfig(model_dir=built["model"], keys_file=built["keys"], db=built["db"],
                                 audit_log=built["root"] / "audit.jsonl", max_events=50, max_body_bytes=20_000))
    with TestClient(app) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- auth, roles, rate limits -----------------------------------------------------------------------------------


def test_auth_required_and_role_checked(built, client):
    body = {"events": sample_events()}
    assert client.get("/healthz").status_code == 200
    r = client.post("/v1/next-events", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.post("/v1/next-events", json=body, headers=auth("not-a-key")).status_code == 401
    key_id = built["researcher"].split("_")[1]
    forged = f"fsk_{key_id}_" + "A" * 43  # a real key id with a wrong secret
    assert client.post("/v1/next-events", json=body, headers=auth(forged)).status_code == 401
    assert client.get("/v1/model").status_code == 401
    assert client.post("/v1/next-events", json=body, headers=auth(built["researcher"])).status_code == 200
    # a researcher may not look subjects up; an analyst may
    lookup = {"subject_id": 1, "top_k": 5}
    r = client.post("/v1/next-events", json=lookup, headers=auth(built["researcher"]))
    assert r.status_code == 403 and "analyst" in r.json()["detail"]
    r = client.post("/v1/next-events", json=lookup, headers=auth(built["analyst"]))
    assert r.status_code == 200, r.text
    fc = built["fc"]
    with warehouse.connect(built["db"], read_only=True) as con:
        expected = fc.next_events(fc.timeline_from_warehouse(con, 1), top_k=5)
    assert [e["token"] for e in r.json()["events"]] == [e["token"] for e in expected.events]
    assert [e["probability"] for e in r.json()["events"]] == pytest.approx([e["probability"] for e in expected.events])
    assert client.post("/v1/next-events", json={"subject_id": 99999}, headers=auth(built["analyst"])).status_code == 404
    # only hashes at rest
    text = built["keys"].read_text()
    for name in ("researcher", "analyst", "slow", "fuzz"):
        assert built[name] not in text and built[name].split("_", 2)[2] not in text


def test_rate_limit_trips_with_retry_after(built, client):
    body = {"events": sample_events(1), "top_k": 3}
    codes = [client.post("/v1/next-events", json=body, headers=auth(built["slow"])).status_code for _ in range(3)]
    assert codes == [200, 200, 200]  # the burst
    r = client.post("/v1/next-events", json=body, headers=auth(built["slow"]))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    # other keys are unaffected
    assert client.post("/v1/next-events", json=body, headers=auth(built["researcher"])).status_code == 200


def test_token_bucket_refills():
    from foresight.serve import ApiKey

    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    key = ApiKey("k", "researcher", "0" * 64, rate_per_minute=60, burst=2)
    assert limiter.take(key) == 0 and limiter.take(key) == 0
    assert limiter.take(key) == pytest.approx(1.0)  # one request per second: wait a second
    now[0] = 1.0
    assert limiter.take(key) == 0


# --- the national data opt-out and key scopes ------------------------------------------------------------------


def _lookups(sid: int) -> list[tuple[str, dict]]:
    """One subject lookup on every endpoint that takes a subject_id."""
    return [("/v1/next-events", {"subject_id": sid, "top_k": 3}),
            ("/v1/risk", {"subject_id": sid, "task": "admission_30d", "samples": 2}),
            ("/v1/explain", {"subject_id": sid, "max_events": 2})]


def test_opted_out_subjects_are_never_served(built, tmp_path):
    from fastapi.testclient import TestClient

    from foresight.optout import digest

    big = datetime(2021, 6, 1)  # the alive, active cohort here is >= 8 (see the cohort-rate test)
    with warehouse.connect(built["db"], read_only=True) as con:
        ids = cohort_as_of(con, big)
    assert len(ids) >= 8
    kept = [s for s in ids if s % 7][:3]  # subjects % 7 == 0 die: their record has no next event to serve
    listed = [s for s in ids if s not in kept]
    opt_out = tmp_path / "opt-out.txt"
    opt_out.write_text("# national data opt-out\n" + "\n".join(map(str, listed)) + "\n")
    with TestClient(make_app(built, tmp_path / "audit.jsonl", exclude_subjects_file=opt_out)) as c:
        h = auth(built["analyst"])
        for path, body in _lookups(99999):  # an id the warehouse never held
            unknown = c.post(path, json=body, headers=h)
            assert unknown.status_code == 404, (path, unknown.text)
            for sid in (listed[0], listed[-1]):  # opted out: the very same answer, so the list is not revealed
                r = c.post(path, json={**body, "subject_id": sid}, headers=h)
                assert r.status_code == 404, (path, r.text)
                assert r.json()["detail"] == unknown.json()["detail"].replace("99999", str(sid)), path
        assert c.post("/v1/next-events", json={"subject_id": kept[0]}, headers=h).status_code == 200
        # cohort rates leave them out: 3 subjects remain, too few to release anything
        r = c.post("/v1/cohort-rate", json={"as_of": big.isoformat()}, headers=auth(built["researcher"]))
        assert r.status_code == 200 and r.json()["cohort_size"] == "<8" and r.json()["weeks"] == []
        # a new opt-out applies without a restart: the file is re-read when it changes
        opt_out.write_text(opt_out.read_text() + f"{kept[0]}\n")
        r = c.post("/v1/next-events", json={"subject_id": kept[0]}, headers=h)
        assert r.status_code == 404 and r.json()["detail"] == f"subject {kept[0]} has no events"
        # the model card says a list is honoured and which one (its digest), never who is on it
        card = c.get("/v1/model", headers=h).json()["opt_out"]
        assert card == {"honoured": True, "list_sha256": digest([*listed, kept[0]])}
        # a list broken while running never un-hides anybody: the last good list stays in force
        opt_out.write_text("12 13\n")
        assert c.post("/v1/next-events", json={"subject_id": kept[0]}, headers=h).status_code == 404
        assert c.post("/v1/next-events", json={"subject_id": kept[1]}, headers=h).status_code == 200
    # a malformed list stops the service before it answers anything
    with pytest.raises(ValueError, match="line 1"):
        make_app(built, tmp_path / "audit2.jsonl", exclude_subjects_file=opt_out)


def test_key_scoped_to_splits(built, tmp_path):
    from fastapi.testclient import TestClient

    from foresight.serve import load_keys

    keys = tmp_path / "keys.json"
    scoped, _ = generate_key(keys, "analyst", rate_per_minute=6000, burst=1000, splits=["held_out"])
    anyone, _ = generate_key(keys, "analyst", rate_per_minute=6000, burst=1000)
    stored = json.loads(keys.read_text())["keys"]
    # a scope is stored as a list; an unscoped key is written as keys were before scopes (no field at all)
    assert stored[0]["splits"] == ["held_out"] and "splits" not in stored[1]
    with warehouse.connect(built["db"], read_only=True) as con:
        split_of = dict(con.execute("SELECT subject_id, split FROM subject_splits").fetchall())
    held = sorted(s for s, sp in split_of.items() if sp == "held_out" and s % 7)  # alive: a next event exists
    train = min(s for s, sp in split_of.items() if sp == "train" and s % 7)
    opt_out = tmp_path / "opt-out.txt"
    opt_out.write_text(f"{held[1]}\n")
    app = create_app(ServeConfig(model_dir=built["model"], keys_file=keys, audit_log=tmp_path / "audit.jsonl",
                                 db=built["db"], exclude_subjects_file=opt_out), forecaster=built["fc"])
    with TestClient(app) as c:
        assert c.post("/v1/next-events", json={"subject_id": held[0]}, headers=auth(scoped)).status_code == 200
        for path, body in _lookups(train):
            r = c.post(path, json=body, headers=auth(scoped))
            assert r.status_code == 403 and "held_out split(s) only" in r.json()["detail"], (path, r.text)
        assert c.post("/v1/next-events", json={"subject_id": train}, headers=auth(anyone)).status_code == 200
        # unknown and opted-out ids get the same 404 from a scoped key as from an unscoped one
        unknown = c.post("/v1/next-events", json={"subject_id": 99999}, headers=auth(anyone))
        for sid in (99999, held[1]):
            r = c.post("/v1/next-events", json={"subject_id": sid}, headers=auth(scoped))
            assert r.status_code == 404 and r.json()["detail"] == unknown.json()["detail"].replace("99999", str(sid))
        # cohort rates: only over the splits the key may see, and it must say which
        rate = {"as_of": "2021-06-01T00:00:00", "samples": 2, "history_weeks": 0}
        for split in (None, "train"):
            r = c.post("/v1/cohort-rate", json={**rate, "split": split}, headers=auth(scoped))
            assert r.status_code == 403 and "set `split`" in r.json()["detail"], split
        r = c.post("/v1/cohort-rate", json={**rate, "split": "held_out"}, headers=auth(scoped))
        assert r.status_code == 200, r.text
    # a misspelt split is an error naming the entry, never silently an unrestricted key
    stored[0]["splits"] = ["heldout"]
    keys.write_text(json.dumps({"version": 1, "keys": stored}))
    with pytest.raises(ValueError, match=r"keys\[0\].*heldout"):
        load_keys(keys)
    with pytest.raises(ValueError, match="at least one"):
        generate_key(keys.with_name("k2.json"), "analyst", splits=[])


# --- the audit trail --------------------------------------------------------------------------------------------


def test_audit_log_records_every_request_without_content(built, tmp_path):
    from fastapi.testclient import TestClient

    audit = tmp_path / "audit.jsonl"
    secret_code, secret_time, secret_value = "DX//ICD10CM//Q87410", "2021-07-13T04:05:06", 987.654321
    events = [*sample_events(), {"time": secret_time, "code": secret_code, "numeric_value": secret_value}]
    with TestClient(make_app(built, audit)) as c:
        assert c.post("/v1/next-events", json={"events": events}, headers=auth(built["researcher"])).status_code == 200
        assert c.post("/v1/next-events", json={"events": events}).status_code == 401
        bad = c.post("/v1/next-events", json={"events": events[::-1]}, headers=auth(built["researcher"]))
        assert bad.status_code == 422
        assert c.post("/v1/next-events", json={"subject_id": 3}, headers=auth(built["analyst"])).status_code == 200
        assert c.get("/nowhere").status_code == 404
    # the lifespan's exit flushed and closed the log
    lines = audit.read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["status"] for r in records] == [200, 401, 422, 200, 404]
    ok, unauth, _, lookup, missing = records
    assert ok["key_id"] == built["researcher"].split("_")[1] and ok["role"] == "researcher"
    assert ok["endpoint"] == "/v1/next-events" and ok["events"] == len(events)
    assert ok["request_bytes"] > 0 and ok["response_bytes"] > 0 and ok["ms"] >= 0
    assert unauth["key_id"] is None and lookup["subject_id"] == 3 and lookup["role"] == "analyst"
    assert missing["endpoint"] == "(no such endpoint)"
    text = audit.read_text()
    for needle in (secret_code, "Q87410", secret_time, "2021-07-13", "987.65", "ADMIT//EMERGENCY", "GENDER//F"):
        assert needle not in text
    # hash chain: intact, continues across restarts, and shows a deleted record
    assert verify_audit_log(audit) == 5
    with TestClient(make_app(built, audit)) as c:
        c.get("/healthz")
    assert verify_audit_log(audit) == 6
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match="chain broken"):  # a keyed log is checked with its key
        verify_audit_log(tampered, key_file=audit.with_name("audit.jsonl.key"))


def test_unwritable_audit_log_refuses_requests(built, tmp_path):
    from fastapi.testclient import TestClient

    app = make_app(built, tmp_path / "audit.jsonl")
    rt = app.state.runtime
    good = rt.audit.path
    rt.audit.path = tmp_path / "no-such-dir" / "audit.jsonl"  # the disk went away
    body = {"events": sample_events()}
    with TestClient(app) as c:
        c.get("/healthz")
        rt.audit.flush()
        assert not rt.audit.healthy
        assert c.post("/v1/next-events", json=body, headers=auth(built["researcher"])).status_code == 503
        rt.audit.path = good  # the disk is back: the next record (a refusal) retries what was owed
        assert c.post("/v1/next-events", json=body, headers=auth(built["researcher"])).status_code == 503
        rt.audit.flush()
        assert rt.audit.healthy
        assert c.post("/v1/next-events", json=body, headers=auth(built["researcher"])).status_code == 200
    statuses = [json.loads(x)["status"] for x in good.read_text().splitlines()]
    # nothing lost, chain intact; the first answer was withheld (503), since its record could not be written
    assert statuses == [503, 503, 503, 200] and verify_audit_log(good) == 4


# --- small-cell suppression -------------------------------------------------------------------------------------


def test_suppression_rule():
    # an empty cell is suppressed too (issue 17: 0 beside "<8" one request later identified a person)
    assert [suppress_count(x) for x in (0, 1, 7, 8, 10, 12, 13, 17.6, 1003)] == ["<8", "<8", "<8", 10, 10, 10, 15,
                                                                                   20, 1005]
    rule = SuppressionRule(threshold=11, rounding=10)
    assert [suppress_count(x, rule) for x in (3, 10, 11, 14, 15, 26)] == ["<11", "<11", 10, 10, 20, 30]
    with pytest.raises(ValueError):
        SuppressionRule(threshold=0)


def _released(cell: int | str, rule: SuppressionRule = SuppressionRule()) -> bool:
    return cell == 0 or cell == f"<{rule.threshold}" or (isinstance(cell, int) and cell % rule.rounding == 0
                                                         and cell >= rule.threshold)


def test_cohort_rate_suppresses_small_cells(built, client):
    with warehouse.connect(built["db"], read_only=True) as con:
        # an as-of date where the alive, active cohort is small (1-7 people), and one where it is large; Mondays,
        # since the service moves as_of to the Monday of its week (fixed calendar weeks, issue 17)
        small = next(d for d in (datetime(2019, 12, 30) + timedelta(weeks=k) for k in range(45))
                     if 1 <= len(cohort_as_of(con, d)) < 8)
        big = datetime(2021, 5, 31)
        ids = cohort_as_of(con, big)
        truth = weekly_history(con, ids, big, 26, ("ADMIT//*",))
    assert len(ids) >= 8
    r = client.post("/v1/cohort-rate", json={"as_of": small.isoformat()}, headers=auth(built["researcher"]))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["cohort_size"] == "<8" and out["weeks"] == [] and out["history"] == [] and out["warnings"]
    body = {"as_of": big.isoformat(), "horizon_days": 21, "samples": 4, "history_weeks": 26}
    out = client.post("/v1/cohort-rate", json=body, headers=auth(built["researcher"])).json()
    assert out["cohort_size"] == suppress_count(len(ids)) and len(out["weeks"]) == 3
    for w in out["weeks"]:
        assert all(_released(w[k]) for k in ("mean", "p05", "p25", "p50", "p75", "p95"))
    # observed history: each cell is the true count passed through the rule, and the true counts do hold 1-7s
    assert [h["observed"] for h in out["history"]] == [suppress_count(n) for _, n in truth]
    assert any(1 <= n < 8 for _, n in truth) and "<8" in [h["observed"] for h in out["history"]]
    # a cohort narrowed by a code that nobody had: an empty cell looks like a small one (issue 17)
    narrowed = client.post("/v1/cohort-rate", json={**body, "cohort_codes": ["DX//NOPE//*"]},
                           headers=auth(built["researcher"])).json()
    assert narrowed["cohort_size"] == "<8" and narrowed["weeks"] == []


# --- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"events": sample_events()[:2] + sample_events()[2:][::-1]}, 422, "time order"),
    ({"events": [{"time": 5, "code": "ADMIT//EMERGENCY"}]}, 422, "ISO 8601"),
    ({"events": [{"time": "2020-01-01T00:00:00", "code": 12}]}, 422, "string"),
    ({"events": "ADMIT//EMERGENCY"}, 422, "list"),
    ({"events": sample_events(), "top_k": "many"}, 422, "integer"),
    ({"events": sample_events(), "subject_id": 3}, 422, "exactly one"),
    ({}, 422, "exactly one"),
    ({"events": sample_events(), "colour": "red"}, 422, "Extra inputs"),
    ({"events": [{"time": "2020-01-01T00:00:00", "code": "TIME//1D-2D"}]}, 422, "reserved token"),
    ({"events": [{"time": "2020-01-01T00:00:00", "code": "Q3"}]}, 422, "reserved token"),
    ({"events": [{"time": None, "code": "DX//ICD10CM//I10"}]}, 422, "static facts"),
    ({"events": [{"time": "1492-10-12T00:00:00", "code": "ADMIT//EMERGENCY"}]}, 422, "outside"),
    ({"events": [{"time": "2020-01-01T00:00:00", "code": "ADMIT//EMERGENCY", "numeric_value": "NaN"}]}, 422,
     "finite"),
    ({"events": [*sample_events(), {"time": "2030-01-01T00:00:00", "code": "MEDS_DEATH"}]}, 422, "MEDS_DEATH"),
    ({"events": sample_events()[1:], "as_of": "2000-01-01T00:00:00"}, 422, "no events"),
    ({"events": sample_events(20)}, 422, "at most 50"),
])
def test_malformed_requests_get_clear_4xx(built, client, body, status, needle):
    r = client.post("/v1/next-events", json=body, headers=auth(built["researcher"]))
    assert r.status_code == status, r.text
    assert needle.lower() in json.dumps(r.json()).lower()


def test_body_limits_and_bad_json(built, client):
    key = auth(built["researcher"])
    big = {"events": sample_events(), "pad": "x" * 30_000}
    assert client.post("/v1/next-events", json=big, headers=key).status_code == 413

    def chunks():  # no Content-Length: the streamed body is counted as it arrives
        for _ in range(30):
            yield b" " * 1000

    r = client.post("/v1/next-events", content=chunks(), headers={**key, "content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/next-events", content=b"{not json", headers={**key, "content-type": "application/json"})
    assert r.status_code == 422


def test_unknown_codes_map_to_rare_with_a_warning(built, client):
    events = [*sample_events(), {"time": "2021-09-01T00:00:00", "code": "DX//ICD10CM//ZZZ9"}]
    r = client.post("/v1/next-events", json={"events": events, "top_k": 5}, headers=auth(built["researcher"]))
    assert r.status_code == 200
    assert any("DX//ICD10CM//ZZZ9" in w and "RARE" in w for w in r.json()["warnings"])
    # a code below the vocabulary's resolution climbs to its tokenised ancestor (ICD prefixes), and says so
    child = [*sample_events(), {"time": "2021-09-01T00:00:00", "code": "DX//ICD10CM//I109"}]
    rc = client.post("/v1/next-events", json={"events": child}, headers=auth(built["researcher"]))
    assert rc.status_code == 200 and "DX//ICD10CM//I109 -> DX//ICD10CM//I10" in rc.json()["warnings"][0]
    fc = built["fc"]
    tl = fc.timeline_from_events(parsed(events))
    assert fc.vocab.index[fc.vocab.token_for("DX//ICD10CM//ZZZ9")] in tl.tokens.tolist()
    expected = fc.next_events(tl, top_k=5)
    assert [e["probability"] for e in r.json()["events"]] == pytest.approx([e["probability"] for e in expected.events])


# --- answers: next events, risk, explain, model card -------------------------------------------------------------


def test_batched_distributions_equal_one_at_a_time(built):
    fc = built["fc"]
    with warehouse.connect(built["db"], read_only=True) as con:
        tls = [t for t in (fc.timeline_from_warehouse(con, s) for s in range(1, 16)) if not t.dead]
    assert len({len(t.tokens) for t in tls}) > 3  # different lengths: packing and padding are exercised
    batch = fc.next_events_batch(tls, top_k=15)
    # the three ways to the same numbers: packed tree mask (SDPA), the same with eager attention, and the
    # left-padded prompts + KV cache repeated per gap (the path for attention kernels without custom masks)
    packed = fc.event_distributions(tls)
    with torch.no_grad():
        cached = fc._distributions_cached(tls)
    impl = fc.model.config._attn_implementation
    try:
        fc.model.config._attn_implementation = "eager"
        eager = fc.event_distributions(tls)
    finally:
        fc.model.config._attn_implementation = impl
    limit = fc.max_cache_bytes
    try:
        fc.max_cache_bytes = 1  # every timeline its own chunk
        alone = fc.event_distributions(tls)
    finally:
        fc.max_cache_bytes = limit
    for a, b, c, d in zip(packed, cached, eager, alone, strict=True):
        for other in (b, c, d):
            assert torch.allclose(a.p_event, other.p_event, atol=1e-6)
            assert torch.allclose(a.p_gap, other.p_gap, atol=1e-6)
    for tl, b in zip(tls, batch, strict=True):
        one = fc.next_events(tl, top_k=15)
        assert [e["token"] for e in one.events] == [e["token"] for e in b.events]
        # float32 forward passes of different batch shapes agree to ~1e-8, not bit for bit
        assert [e["probability"] for e in b.events] == pytest.approx([e["probability"] for e in one.events], abs=1e-6)
        assert [x["probability"] for x in b.time_to_next] == pytest.approx([x["probability"] for x in one.time_to_next],
                                                                            abs=1e-6)


def test_concurrent_requests_share_a_forward_pass(built, tmp_path):
    import httpx

    app = make_app(built, tmp_path / "audit.jsonl", batch_wait_ms=300)
    bodies = [{"events": sample_events(1 + i % 4), "top_k": 4, "new_only": bool(i % 2)} for i in range(12)]

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*[c.post("/v1/next-events", json=b, headers=auth(built["researcher"]))
                                          for b in bodies])

    responses = asyncio.run(go())
    stats = app.state.runtime.batcher.stats()
    assert stats["requests"] == 12 and stats["largest_batch"] > 1 and stats["batches"] < 12
    fc = built["fc"]
    for body, r in zip(bodies, responses, strict=True):  # each caller got its own answer
        assert r.status_code == 200
        one = fc.next_events(fc.timeline_from_events(parsed(body["events"])), top_k=4, new_only=body["new_only"])
        assert [e["token"] for e in r.json()["events"]] == [e["token"] for e in one.events]


def test_risk_matches_the_python_api(built, client):
    events = sample_events()
    body = {"events": events, "task": "admission_30d", "samples": 16, "seed": 5}
    r = client.post("/v1/risk", json=body, headers=auth(built["researcher"]))
    assert r.status_code == 200, r.text
    out = r.json()
    fc = built["fc"]
    tl = fc.timeline_from_events(parsed(events))
    risk, se = fc.task_risks([tl], BUILTIN_TASKS["admission_30d"], 16, seed=5)  # the estimator evaluate scores
    assert out["probability"] == pytest.approx(float(risk[0]))
    assert out["low"] == pytest.approx(max(0.0, risk[0] - 1.96 * se[0]))
    assert out["high"] == pytest.approx(min(1.0, risk[0] + 1.96 * se[0]))
    assert out["samples"] == 16 and out["horizon_days"] == 30 and "Rao-Blackwellised" in out["interval"]
    custom = {"events": events, "task": {"name": "dx_90d", "codes": ["DX//*"], "window_days": 30},
              "horizon_days": 90, "samples": 8}
    r = client.post("/v1/risk", json=custom, headers=auth(built["researcher"]))
    assert r.status_code == 200 and r.json()["task"] == "dx_90d" and r.json()["horizon_days"] == 90
    # a time task (days to discharge) is the share of sampled futures, with a Wilson interval
    los = client.post("/v1/risk", json={"events": events, "task": "length_of_stay", "samples": 12, "seed": 2},
                      headers=auth(built["researcher"]))
    assert los.status_code == 200, los.text
    futures = fc.sample_futures([tl], 12, 365, seed=2)[0]
    expected = risk_from_futures(BUILTIN_TASKS["length_of_stay"], futures, tl.as_of)
    assert los.json()["probability"] == pytest.approx(expected.probability)
    assert (los.json()["low"], los.json()["high"]) == pytest.approx((expected.low, expected.high))
    r = client.post("/v1/risk", json={**body, "task": "../../etc/passwd"}, headers=auth(built["researcher"]))
    assert r.status_code == 422 and "unknown task" in r.json()["detail"]
    r = client.post("/v1/risk", json={**body, "samples": 5000}, headers=auth(built["researcher"]))
    assert r.status_code == 200 and r.json()["samples"] == 200 and r.json()["warnings"]


def test_explain_is_leave_one_event_out(built, client):
    events = sample_events(3)
    r = client.post("/v1/explain", json={"events": events, "max_events": 8}, headers=auth(built["researcher"]))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["method"] == "leave-one-event-out" and out["events_considered"] == 8 and len(out["events"]) == 8
    deltas = [abs(e["delta"]) for e in out["events"]]
    assert deltas == sorted(deltas, reverse=True)
    fc = built["fc"]
    # recompute one attribution by hand: the timeline without that event, one event at a time
    target = out["target"][0]
    full = {e["token"]: e["probability"] for e in fc.next_events(fc.timeline_from_events(parsed(events)),
                                                                  top_k=500).events}
    assert out["probability"] == pytest.approx(full[target])
    top = out["events"][0]
    rest = [e for i, e in enumerate(events) if i != top["index"]]
    without = {e["token"]: e["probability"] for e in fc.next_events(fc.timeline_from_events(parsed(rest)),
                                                                     top_k=500).events}
    assert top["probability_without"] == pytest.approx(without.get(target, 0.0), abs=1e-6)
    assert top["delta"] == pytest.approx(full[target] - without.get(target, 0.0), abs=1e-6)
    assert events[top["index"]]["code"] == top["code"]
    # a chosen target by pattern; an analyst explaining a warehouse subject
    r = client.post("/v1/explain", json={"events": events, "target": ["DX//*"]}, headers=auth(built["researcher"]))
    assert r.status_code == 200 and r.json()["target"] == ["DX//*"]
    r = client.post("/v1/explain", json={"subject_id": 2, "max_events": 4}, headers=auth(built["analyst"]))
    assert r.status_code == 200 and len(r.json()["events"]) <= 4


def test_model_card(built, client):
    r = client.get("/v1/model", headers=auth(built["researcher"]))
    assert r.status_code == 200
    card = r.json()
    assert card["vocab_size"] == len(built["fc"].vocab.tokens) and card["parameters"] > 0
    assert "admission_30d" in card["tasks"] and card["suppression"] == {"threshold": 8, "rounding": 5}
    assert "leave-one-event-out" in card["explain_method"] and card["serving"]["requests"] >= 0
    assert str(built["root"]) not in r.text  # no server paths


# --- fuzzing ----------------------------------------------------------------------------------------------------


def test_openapi_fuzz_never_5xx(built, tmp_path):
    """200 generated requests (valid and invalid per the schema) across every operation: never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st

    app = make_app(built, tmp_path / "audit.jsonl", max_samples=8, max_explain_events=8, max_cohort_subjects=10,
                   max_cohort_samples=2, max_events=200)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in ops} >= {
        "POST /v1/next-events", "POST /v1/risk", "POST /v1/explain", "POST /v1/cohort-rate", "GET /v1/model"}
    strategy = st.one_of(*[o.as_strategy() for o in ops])
    seen: list[int] = []
    keys = [built["fuzz"], built["researcher"], "garbage"]

    @settings(max_examples=200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case, k: int) -> None:
        response = case.call(headers=auth(keys[k]))
        seen.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])

    from hypothesis import given

    given(strategy, st.integers(0, 2))(run)()
    assert len(seen) >= 150 and any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)


def test_random_bodies_never_5xx(built, tmp_path):
    """Arbitrary JSON (and raw bytes) thrown at every POST endpoint: a 4xx, never a 5xx."""
    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
            st.sampled_from(["events", "time", "code", "numeric_value", "subject_id", "as_of", "top_k", "task",
                             "samples", "target", "kinds", "codes", "horizon_days", "x"]) | st.text(max_size=5),
            inner, max_size=5),
        max_leaves=12)
    event = st.fixed_dictionaries({"time": st.one_of(st.none(), st.datetimes().map(datetime.isoformat), st.text()),
                                   "code": st.one_of(st.sampled_from(["ADMIT//EMERGENCY", "LAB//MIMIC//50912",
                                                                      "MEDS_DEATH", "MEDS_BIRTH", "Q3", "[PAD]",
                                                                      "GENDER//F"]), st.text(max_size=8))},
                                  optional={"numeric_value": st.floats(allow_nan=False)})
    timelines = st.fixed_dictionaries(
        {"events": st.lists(event, max_size=6)},
        optional={"as_of": st.datetimes().map(datetime.isoformat), "top_k": st.integers(),
                  "task": st.sampled_from(list(BUILTIN_TASKS)), "samples": st.integers(1, 4),
                  "target": st.lists(st.text(max_size=6), max_size=2)})
    to_bytes = lambda v: json.dumps(v).encode()  # noqa: E731
    payload = st.one_of(json_values.map(to_bytes), timelines.map(to_bytes), st.binary(max_size=64))
    app = make_app(built, tmp_path / "audit.jsonl", max_samples=4, max_cohort_samples=2, max_cohort_subjects=5)
    paths = ["/v1/next-events", "/v1/risk", "/v1/explain", "/v1/cohort-rate"]
    with TestClient(app) as c:
        @settings(max_examples=120, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(payload, st.sampled_from(paths))
        def run(body: bytes, path: str) -> None:
            r = c.post(path, content=body, headers={**auth(built["fuzz"]), "content-type": "application/json"})
            assert r.status_code < 500, (path, body, r.text[:300])

        run()


# --- the Python API and the CLI ---------------------------------------------------------------------------------


def test_python_api_mirror(built):
    import foresight

    fc = foresight.Forecaster.from_pretrained(built["model"])
    tl = fc.timeline_from_events(parsed(sample_events()))
    nxt = fc.next_events(tl, top_k=3)
    assert len(nxt.events) == 3 and nxt.events[0]["probability"] >= nxt.events[-1]["probability"]
    code = "import sys, foresight; assert 'torch' not in sys.modules; print('lazy')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "lazy\n"




def test_cli_keygen_revoke(tmp_path):
    keys = tmp_path / "keys.json"
    r = run_cli("serve", "keygen", "--keys", str(keys), "--role", "analyst", "--rate-per-minute", "30", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["key"].startswith("fsk_") and out["role"] == "analyst"
    stored = json.loads(keys.read_text())["keys"]
    assert len(stored) == 1 and out["key"] not in keys.read_text() and stored[0]["rate_per_minute"] == 30
    assert keys.stat().st_mode & 0o077 == 0  # owner-only
    assert run_cli("serve", "keygen", "--keys", str(keys), "--role", "admin").returncode != 0
    r = run_cli("serve", "keygen", "--keys", str(keys), "--role", "analyst", "--splits", "held_out,tuning", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["splits"] == ["held_out", "tuning"]
    assert json.loads(keys.read_text())["keys"][1]["splits"] == ["held_out", "tuning"]
    r = run_cli("serve", "keygen", "--keys", str(keys), "--role", "analyst", "--splits", "test")
    assert r.returncode != 0 and "held_out" in r.stderr
    assert run_cli("serve", "revoke", "--keys", str(keys), "--key-id", json.loads(keys.read_text())["keys"][1]["key_id"]
                ).returncode == 0
    assert run_cli("serve", "revoke", "--keys", str(keys), "--key-id", out["key_id"]).returncode == 0
    assert json.loads(keys.read_text())["keys"] == []
    assert revoke_key(keys, out["key_id"]) is False


def test_cli_serve_rejects_a_bad_opt_out_list(built, tmp_path):
    bad = tmp_path / "opt-out.txt"
    bad.write_text("123\n45,67\n")
    r = run_cli("serve", "--model", str(built["model"]), "--keys", str(built["keys"]), "--db", str(built["db"]),
             "--exclude-subjects", str(bad), "--audit-log", str(tmp_path / "a.jsonl"), timeout=120)
    assert r.returncode == 2 and "line 2" in r.stderr and str(bad) in r.stderr
    assert not (tmp_path / "a.jsonl").exists()  # it never started


def test_cli_serves_over_http(built, tmp_path):
    """`foresight serve` under a real uvicorn on loopback: a keyed request round-trips, the audit file fills."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    audit = tmp_path / "audit.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "foresight.cli", "serve", "--model", str(built["model"]), "--keys", str(built["keys"]),
         "--audit-log", str(audit), "--port", str(port)], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        r = httpx.post(f"{url}/v1/next-events", json={"events": sample_events(), "top_k": 3},
                       headers=auth(built["researcher"]), timeout=30)
        assert r.status_code == 200 and len(r.json()["events"]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    statuses = [json.loads(x)["status"] for x in audit.read_text().splitlines()]
    assert 200 in statuses and verify_audit_log(audit) == len(statuses)


def test_audit_log_group_commit(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl")
    for i in range(50):
        log.write({"i": i})
    log.flush()
    assert [json.loads(x)["i"] for x in (tmp_path / "a.jsonl").read_text().splitlines()] == list(range(50))
    log.close()
    assert verify_audit_log(tmp_path / "a.jsonl") == 50
