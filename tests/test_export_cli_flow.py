"""MEDS export, the `foresight` CLI contract, and the Prefect `etl` flow run end to end."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from foresight import schema, warehouse

from .conftest import run_cli


def test_meds_export_is_valid_meds(demo_db, tmp_path):
    with warehouse.connect(demo_db, read_only=True) as con:
        n_events = con.execute("SELECT count(*) FROM events").fetchall()[0][0]
        result = warehouse.export_meds(con, tmp_path / "meds", subjects_per_shard=30)
    assert result["shards"] == 4
    shards = sorted((tmp_path / "meds" / "data").glob("*.parquet"))
    seen: set[int] = set()
    total = 0
    for shard in shards:
        table = pq.read_table(shard)
        assert table.schema.equals(schema.meds_data_schema()), table.schema
        rows = table.to_pylist()
        total += len(rows)
        ids = {r["subject_id"] for r in rows}
        assert not ids & seen  # a subject lives in exactly one shard
        seen |= ids
        keys = [(r["subject_id"], r["time"] is not None, r["time"] or 0) for r in rows]
        assert keys == sorted(keys)  # sorted by subject, static (null time) first, then time
    assert total == n_events and len(seen) == 100
    codes = pq.read_table(tmp_path / "meds" / "metadata" / "codes.parquet")
    assert codes.schema.equals(schema.meds_codes_schema())
    splits = pq.read_table(tmp_path / "meds" / "metadata" / "subject_splits.parquet").to_pylist()
    assert len(splits) == 100 and {s["split"] for s in splits} <= set(schema.SPLITS)
    meta = json.loads((tmp_path / "meds" / "metadata" / "dataset.json").read_text())
    assert meta["meds_version"] == schema.MEDS_VERSION and meta["etl_name"] == "foresight"


@pytest.mark.parametrize("cmd", [[], ["etl"], ["etl", "mimic-iv"], ["export", "meds"], ["tokenize"], ["demo"]])
def test_every_command_has_help(cmd):
    proc = run_cli(*cmd, "--help", check=True)
    assert "Usage" in proc.stdout


def test_cli_etl_json_contract(mimic_demo, tmp_path):
    db = tmp_path / "w.duckdb"
    proc = run_cli("etl", "mimic-iv", "--input", str(mimic_demo), "--db", str(db), "--json", check=True)
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("subjects", "events", "events_by_kind", "rows_read", "rows_loaded", "rows_quarantined",
                "rows_dropped", "seconds"):
        assert key in payload
    assert payload["subjects"] == 100
    assert payload["rows_read"] == payload["rows_loaded"] + payload["rows_quarantined"] + payload["rows_dropped"]
    assert sum(payload["events_by_kind"].values()) == payload["events"]
    out = tmp_path / "meds"
    proc = run_cli("export", "meds", "--db", str(db), "--out", str(out), "--json", check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["events"] == payload["events"]


def test_cli_bad_input_is_a_clear_error(tmp_path):
    proc = run_cli("etl", "mimic-iv", "--input", str(tmp_path / "nowhere"), "--db", str(tmp_path / "w.duckdb"),
                check=False)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "not a folder" in proc.stderr
    (tmp_path / "empty" / "hosp").mkdir(parents=True)
    proc = run_cli("etl", "mimic-iv", "--input", str(tmp_path / "empty"), "--db", str(tmp_path / "w.duckdb"),
                check=False)
    assert proc.returncode == 2 and "patients.csv.gz" in proc.stderr


def test_prefect_etl_flow_end_to_end(mimic_demo, demo_db, tmp_path, prefect_server):

    from flows.etl import etl

    db = tmp_path / "flow.duckdb"
    state = etl(source="mimic-iv", input=mimic_demo, db=db, return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["reconciliation"]["rows_read"] == summary["rows_read"]
    # the flow's warehouse holds exactly what the library load produces
    fingerprints = []
    for path in (db, demo_db):
        with warehouse.connect(path, read_only=True) as con:
            fingerprints.append(con.execute(
                "SELECT count(*), sum(hash(subject_id, time, code, numeric_value, text_value)) FROM events"
            ).fetchall()[0])
    assert fingerprints[0] == fingerprints[1]


def test_flow_rejects_unknown_source(tmp_path):
    from flows.etl import etl

    with pytest.raises(ValueError, match="unknown source 'oracle'"):
        etl.fn(source="oracle", input=tmp_path, db=tmp_path / "w.duckdb")
