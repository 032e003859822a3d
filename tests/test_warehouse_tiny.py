"""Warehouse load mechanics on a hand-written MIMIC-IV folder (runs without ../shared/data)."""

from __future__ import annotations

import gzip
import shutil
from datetime import datetime

import pytest

from foresight import warehouse

from .conftest import load_into, rows


def test_tiny_load_accounts_for_every_row(tiny_mimic, tmp_path):
    s = load_into("mimic-iv", tiny_mimic, tmp_path / "w.duckdb")
    assert s.subjects == 3
    assert s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_dropped
    t = {x.table: x for x in s.tables}
    assert (t["patients"].rows_read, t["patients"].rows_quarantined) == (4, 1)
    assert (t["admissions"].rows_read, t["admissions"].rows_quarantined) == (4, 1)
    assert (t["diagnoses_icd"].rows_loaded, t["diagnoses_icd"].rows_quarantined) == (3, 2)
    assert (t["labevents"].rows_loaded, t["labevents"].rows_quarantined) == (2, 3)
    assert "hosp/transfers.csv.gz" in s.missing_tables  # absent optional tables are reported, not fatal


def test_tiny_quarantine_reasons_name_file_line_and_value(tiny_mimic, tmp_path):
    db = tmp_path / "w.duckdb"
    load_into("mimic-iv", tiny_mimic, db)
    q = {(f, line): reason for f, line, reason in
         rows(db, "SELECT source_file, row_number, reason FROM quarantine")}
    assert q[("hosp/patients.csv.gz", 5)] == "non-integer subject_id: x7"
    assert q[("hosp/admissions.csv.gz", 5)] == "dischtime before admittime"
    assert q[("hosp/diagnoses_icd.csv.gz", 5)].startswith("hadm_id not in admissions")
    assert q[("hosp/diagnoses_icd.csv.gz", 6)].startswith("unknown subject_id")
    assert q[("hosp/labevents.csv.gz", 4)] == "unparseable charttime: not a time"
    assert q[("hosp/labevents.csv.gz", 5)].startswith("time before birth")
    assert q[("hosp/labevents.csv.gz", 6)] == "absurd valuenum: 1e300"
    raw = rows(db, "SELECT raw FROM quarantine WHERE row_number = 4 AND source_file LIKE '%labevents%'")[0][0]
    assert '"not a time"' in raw  # the offending row is kept as read


def test_tiny_diagnoses_timed_at_discharge_not_admission(tiny_mimic, tmp_path):
    db = tmp_path / "w.duckdb"
    load_into("mimic-iv", tiny_mimic, db)
    dx = dict(rows(db, "SELECT code, time FROM events WHERE code LIKE 'DX//%' AND subject_id = 1"))
    assert dx == {"DX//ICD10CM//E1165": datetime(2150, 5, 6, 12), "DX//ICD10CM//I10": datetime(2150, 5, 6, 12)}
    # ICD hierarchy: the parent is recorded (nearest first) and described.
    parents = rows(db, "SELECT parent_codes FROM codes WHERE code = 'DX//ICD10CM//E1165'")[0][0]
    assert parents == ["DX//ICD10CM//E116", "DX//ICD10CM//E11"]
    assert rows(db, "SELECT description FROM codes WHERE code = 'DX//ICD10CM//E11'")[0][0] == \
        "Type 2 diabetes mellitus"


def test_tiny_events_content(tiny_mimic, tmp_path):
    db = tmp_path / "w.duckdb"
    load_into("mimic-iv", tiny_mimic, db)
    codes = {r[0] for r in rows(db, "SELECT DISTINCT code FROM events")}
    assert {"ADMIT//EMERGENCY", "ADMIT//ELECTIVE", "ADMIT//URGENT", "ED//REGISTRATION", "GENDER//F",
            "MEDS_BIRTH", "MEDS_DEATH", "DISCHARGE//DIED", "LAB//MIMIC//50912"} <= codes
    # in-hospital death uses the precise deathtime from admissions, not the date-only dod
    assert rows(db, "SELECT time FROM events WHERE code = 'MEDS_DEATH' AND subject_id = 3") == [
        (datetime(2171, 3, 4, 6),)]
    # a lab result is known when it is stored, not when the blood was drawn
    assert rows(db, "SELECT time, numeric_value FROM events WHERE code = 'LAB//MIMIC//50912' AND subject_id = 1") \
        == [(datetime(2150, 5, 1, 12, 30), pytest.approx(1.1))]
    # a non-numeric result keeps its text
    assert rows(db, "SELECT text_value FROM events WHERE code = 'LAB//MIMIC//50931'") == [("NEG",)]
    splits = rows(db, "SELECT count(*), count(DISTINCT subject_id) FROM subject_splits")
    assert splits == [(3, 3)]


def test_missing_required_file_is_a_clear_error(tiny_mimic, tmp_path):
    (tiny_mimic / "hosp" / "patients.csv.gz").unlink()
    with pytest.raises(warehouse.SourceError, match=r"hosp/patients\.csv\.gz: required file missing"):
        load_into("mimic-iv", tiny_mimic, tmp_path / "w.duckdb")


def test_missing_required_column_names_file_and_column(tiny_mimic, tmp_path):
    p = tiny_mimic / "hosp" / "diagnoses_icd.csv.gz"
    with gzip.open(p, "rt") as fh:
        text = fh.read().replace("icd_version", "icd_ver")
    with gzip.open(p, "wt") as fh:
        fh.write(text)
    with pytest.raises(warehouse.SourceError, match=r"diagnoses_icd\.csv\.gz: missing required column\(s\) "
                                                    r"\['icd_version'\]"):
        load_into("mimic-iv", tiny_mimic, tmp_path / "w.duckdb")


def test_plain_csv_inputs_work_too(tiny_mimic, tmp_path):
    for gz in (tiny_mimic / "hosp").glob("*.csv.gz"):
        with gzip.open(gz, "rb") as src, open(gz.with_suffix(""), "wb") as dst:
            shutil.copyfileobj(src, dst)
        gz.unlink()
    s = load_into("mimic-iv", tiny_mimic, tmp_path / "w.duckdb")
    assert s.subjects == 3 and s.rows_quarantined == 7
