"""The real MIMIC-IV demo (100 patients) through the loader: counts, leak-free times, idempotency, crashes,
corrupted inputs. Needs ../shared/data; skips cleanly without it."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import zlib
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from foresight import warehouse
from foresight.sources import mimic_iv
from foresight.warehouse import slices

from .conftest import load_into, read_csv_rows

# Tables whose every valid row is exactly one event.
ONE_EVENT_PER_ROW = ("transfers", "services", "diagnoses_icd", "procedures_icd", "drgcodes", "hcpcsevents",
                     "labevents", "microbiologyevents", "omr", "outputevents", "datetimeevents")


def _ro(db: Path):
    return warehouse.connect(db, read_only=True)


def _fingerprint(db: Path) -> tuple:
    """Everything a load could change, reduced to comparable numbers."""
    with _ro(db) as con:
        return (
            con.execute("SELECT count(*), sum(hash(subject_id, time, code, numeric_value, text_value)) "
                        "FROM events").fetchall()[0],
            con.execute("SELECT count(*) FROM quarantine").fetchall()[0],
            con.execute("SELECT count(*) FROM etl_runs").fetchall()[0],
            con.execute("SELECT count(*), sum(hash(code, description)) FROM codes").fetchall()[0],
            con.execute("SELECT count(*) FROM subject_splits").fetchall()[0],
        )


def test_demo_subjects_admissions_and_kinds(demo_db):
    with _ro(demo_db) as con:
        assert con.execute("SELECT count(DISTINCT subject_id) FROM events").fetchall()[0][0] == 100
        assert con.execute("SELECT count(*) FROM events WHERE code LIKE 'ADMIT//%'").fetchall()[0][0] == 275
        assert con.execute("SELECT count(*) FROM events WHERE code LIKE 'GENDER//%' AND time IS NULL"
                           ).fetchall()[0][0] == 100
        assert con.execute("SELECT count(*) FROM events WHERE code = 'MEDS_BIRTH'").fetchall()[0][0] == 100
        assert con.execute("SELECT count(*) FROM quarantine").fetchall()[0][0] == 0
        # every event's subject has a split, and splits never overlap
        assert con.execute("SELECT count(*) FROM subject_splits").fetchall()[0][0] == 100
        assert con.execute("SELECT count(*) FROM (SELECT subject_id FROM subject_splits GROUP BY 1 "
                           "HAVING count(*) > 1)").fetchall()[0][0] == 0


def test_demo_counts_per_table_match_source_files(demo_db, mimic_demo):
    with _ro(demo_db) as con:
        run_id = con.execute("SELECT run_id FROM etl_runs").fetchall()[0][0]
        stats = {r[0]: r[1:] for r in con.execute(
            "SELECT source_table, rows_read, rows_loaded, rows_quarantined, rows_dropped, events "
            "FROM etl_tables WHERE run_id = ?", [run_id]).fetchall()}
        per_table_events = dict(con.execute(
            "SELECT source_table, count(*) FROM events GROUP BY 1").fetchall())
    for group in mimic_iv.GROUPS:
        for table in group.tables:
            path = mimic_iv.find_table(mimic_demo, table.folder, table.name)
            if path is None:
                assert stats[table.name][0] == 0
                continue
            n_source = len(read_csv_rows(path))  # independent count with Python's csv module
            read, loaded, quarantined, dropped, events = stats[table.name]
            assert read == n_source, table.name
            assert loaded + quarantined + dropped == n_source, table.name
            assert per_table_events.get(table.name, 0) == events, table.name
            if table.name in ONE_EVENT_PER_ROW:
                assert events == n_source - quarantined - dropped, table.name


def test_demo_diagnoses_are_timed_at_discharge(demo_db, mimic_demo):
    adm = {r["hadm_id"]: r for r in read_csv_rows(mimic_demo / "hosp" / "admissions.csv.gz")}
    with _ro(demo_db) as con:
        rows = con.execute("SELECT encounter_id, time FROM events WHERE code LIKE 'DX//%'").fetchall()
    assert len(rows) == 4506
    for hadm, time in rows:
        assert time == datetime.fromisoformat(adm[hadm]["dischtime"]), hadm
    # and never at admission (no admission in the demo is discharged at the minute it starts)
    assert not any(time == datetime.fromisoformat(adm[h]["admittime"]) for h, time in rows)


def test_demo_codes_have_descriptions(demo_db):
    with _ro(demo_db) as con:
        # codes that occur in events (ICD parents added for the hierarchy may lack a title in MIMIC's d_*)
        missing = dict(con.execute(
            "SELECT kind, count(*) FILTER (WHERE description IS NULL) FROM codes "
            "WHERE kind IN ('DX', 'LAB', 'DRG', 'RX_START', 'INPUT_START', 'MICRO') "
            "AND code IN (SELECT code FROM events) GROUP BY kind").fetchall())
        e119 = con.execute("SELECT description FROM codes WHERE code = 'DX//ICD10CM//E119'").fetchall()
    assert missing["DX"] == 0 and missing["LAB"] == 0 and missing["DRG"] == 0 and missing["RX_START"] == 0
    assert e119 and "diabetes" in e119[0][0].lower()


def test_rerun_is_idempotent(mimic_demo, tmp_path):
    db = tmp_path / "w.duckdb"
    first = load_into("mimic-iv", mimic_demo, db)
    before = _fingerprint(db)
    second = load_into("mimic-iv", mimic_demo, db)
    after = _fingerprint(db)
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]  # same events, not doubled
    assert after[2][0] == before[2][0] + 1  # the re-run is recorded in etl_runs
    assert first.events == second.events
    with _ro(db) as con:
        checksums = [r[0] for r in con.execute("SELECT input_checksums FROM etl_runs").fetchall()]
    assert checksums[0] == checksums[1]  # lineage: same inputs, same checksums


def test_crash_mid_load_leaves_previous_state(mimic_demo, tmp_path):
    db = tmp_path / "w.duckdb"
    load_into("mimic-iv", mimic_demo, db)
    before = _fingerprint(db)

    def boom(group: str) -> None:
        if group == "labs":
            raise RuntimeError("injected failure after the labs group")

    with pytest.raises(RuntimeError, match="injected"):
        load_into("mimic-iv", mimic_demo, db, on_group_done=boom)
    assert _fingerprint(db) == before


KILL_SCRIPT = r"""
import os, signal, sys
from foresight import warehouse
from foresight import sources

class KillingConnection:
    # Delegates to DuckDB, but SIGKILLs the process at a chosen statement: a real crash, no cleanup.
    def __init__(self, con, needle):
        self._con, self._needle = con, needle
    def execute(self, sql, *args):
        if self._needle and self._needle in sql:
            os.kill(os.getpid(), signal.SIGKILL)
        return self._con.execute(sql, *args)
    def __getattr__(self, name):
        return getattr(self._con, name)

db, root, needle = sys.argv[1], sys.argv[2], sys.argv[3]
sources.load("mimic-iv", KillingConnection(warehouse.connect(db), needle), root)
"""


@pytest.mark.parametrize("needle", ["CREATE OR REPLACE TABLE fs_stage.v_labevents",  # while staging
                                    "INSERT INTO quarantine SELECT"])               # inside the publish transaction
def test_killed_process_leaves_previous_state(mimic_demo, tmp_path, needle):
    db = tmp_path / "w.duckdb"
    load_into("mimic-iv", mimic_demo, db)
    before = _fingerprint(db)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(db), str(mimic_demo), needle],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert _fingerprint(db) == before


def _corrupt_copy(src: Path, dst: Path) -> dict:
    """Copy the demo and damage it: bad dates, junk rows and bad ids in labevents, a truncated emar.gz,
    and an admission discharged before it began. Returns what was done, for the assertions."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.md", "*.txt", "_reference"))
    lab = dst / "hosp" / "labevents.csv.gz"
    with gzip.open(lab, "rt", newline="") as fh:
        lines = fh.read().split("\n")  # not splitlines(): fields may hold \x0b, \x1c and friends
    lines = [ln + "\n" for ln in lines[:-1]]
    n_original = len(lines) - 1
    # 1-based file lines (header = line 1) that get damaged
    cols = lines[1].rstrip("\n").split(",")
    bad_date = 11
    parts = lines[bad_date - 1].rstrip("\n").split(",")
    parts[6] = "2150-02-30 25:61:00"  # charttime column
    lines[bad_date - 1] = ",".join(parts) + "\n"
    extra_field = 21
    lines[extra_field - 1] = lines[extra_field - 1].rstrip("\n") + ",UNEXPECTED\n"
    bad_subject = 31
    parts = lines[bad_subject - 1].rstrip("\n").split(",")
    parts[1] = "not-a-subject"
    lines[bad_subject - 1] = ",".join(parts) + "\n"
    junk_line = 41
    lines.insert(junk_line - 1, "<<<junk row written by a broken exporter>>>\n")
    with gzip.open(lab, "wt", newline="") as fh:
        fh.writelines(lines)

    emar = dst / "hosp" / "emar.csv.gz"
    data = emar.read_bytes()
    emar.write_bytes(data[: len(data) // 2])  # truncated mid-stream
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    text = d.decompress(data[: len(data) // 2])
    complete_emar_rows = text.count(b"\n") - 1  # complete lines, minus the header

    adm = dst / "hosp" / "admissions.csv.gz"
    with gzip.open(adm, "rt", newline="") as fh:
        alines = [ln + "\n" for ln in fh.read().split("\n")[:-1]]
    a = alines[1].rstrip("\n").split(",")
    a[2], a[3] = a[3], a[2]  # admittime <-> dischtime
    alines[1] = ",".join(a) + "\n"
    with gzip.open(adm, "wt", newline="") as fh:
        fh.writelines(alines)
    return {"lab_rows": n_original + 1, "bad_date": bad_date, "extra_field": extra_field,
            "bad_subject": bad_subject, "junk": junk_line, "emar_complete": complete_emar_rows,
            "bad_hadm": a[1], "lab_cols": len(cols)}


@pytest.mark.parametrize("slice_lines", [None, 997])
def test_corrupted_copy_is_quarantined_and_nothing_lost(mimic_demo, tmp_path, monkeypatch, slice_lines):
    if slice_lines:  # big tables' validation written in slices of lines (as at scale): the same lines and reasons
        monkeypatch.setattr(slices, "SLICE_LINES", slice_lines)
    info = _corrupt_copy(mimic_demo, tmp_path / "mimic")
    db = tmp_path / "w.duckdb"
    s = load_into("mimic-iv", tmp_path / "mimic", db)
    t = {x.table: x for x in s.tables}
    for x in s.tables:
        assert x.rows_read == x.rows_loaded + x.rows_quarantined + x.rows_dropped, x.table

    lab = t["labevents"]
    assert lab.rows_read == info["lab_rows"]  # every line of the damaged file is accounted for
    with _ro(db) as con:
        q = {(f, line): reason for f, line, reason in con.execute(
            "SELECT source_file, row_number, reason FROM quarantine").fetchall()}
    lab_q = {line: r for (f, line), r in q.items() if f == "hosp/labevents.csv.gz"}
    assert lab_q[info["bad_date"]].startswith("unparseable charttime: 2150-02-30")
    assert "TOO MANY COLUMNS" in lab_q[info["extra_field"]]
    assert lab_q[info["bad_subject"]] == "non-integer subject_id: not-a-subject"
    assert "MISSING COLUMNS" in lab_q[info["junk"]]
    # rows after the junk line keep their true file line numbers
    assert lab.rows_quarantined == 4

    emar = t["emar"]
    assert emar.rows_quarantined == 1
    assert emar.rows_loaded + emar.rows_dropped == info["emar_complete"]
    (reason,) = [r for (f, _), r in q.items() if f == "hosp/emar.csv.gz"]
    assert reason.startswith("truncated gzip stream")

    bad_adm = [r for (f, _), r in q.items() if f == "hosp/admissions.csv.gz"]
    assert bad_adm == ["dischtime before admittime"]
    # the diagnoses of that admission cannot be timed, so they are quarantined too, with the reason
    dx_q = [r for (f, _), r in q.items() if f == "hosp/diagnoses_icd.csv.gz"]
    assert dx_q and all(r == f"hadm_id not in admissions (cannot be timed): {info['bad_hadm']}" for r in dx_q)


def test_prescriptions_pharmacy_emar_cover_orders_once(demo_db):
    with _ro(demo_db) as con:
        by_table = Counter(dict(con.execute(
            "SELECT source_table, count(*) FROM events WHERE code LIKE 'RX_START//%' GROUP BY 1").fetchall()))
        run = con.execute("SELECT dropped_reasons FROM etl_runs").fetchall()[0][0]
    assert by_table["prescriptions"] == 18087  # every order has a start
    assert 0 < by_table["pharmacy"] < 200      # only the orders prescriptions lacks
    assert "pharmacy: order already loaded from prescriptions (same pharmacy_id)" in run
