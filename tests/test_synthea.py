"""The Synthea CSV source: the real 59-patient export (counts against Python's csv module, leak-free times, stable
ids, idempotency) and a hand-written export with one bad row of each kind (quarantined with file, line, reason)."""

from __future__ import annotations

import csv
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from foresight import schema, warehouse
from foresight.sources import synthea

from .conftest import SHARED_DATA, load_into, rows

SYNTHEA = SHARED_DATA / "synthea-ca-59pt"
requires_synthea = pytest.mark.skipif(not (SYNTHEA / "csv" / "patients.csv").exists(),
                                      reason=f"Synthea export not found at {SYNTHEA} (../shared/data is absent)")

# Tables whose every valid row is exactly one event (observations: minus its dropped QALY/DALY/QOLS rows).
ONE_EVENT_PER_ROW = ("procedures", "immunizations", "allergies", "imaging_studies", "observations")


def _csvrows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def synthea_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, warehouse.LoadSummary]:
    if not (SYNTHEA / "csv" / "patients.csv").exists():
        pytest.skip(f"Synthea export not found at {SYNTHEA}")
    db = tmp_path_factory.mktemp("synthea") / "w.duckdb"
    return db, load_into("synthea", SYNTHEA, db)  # the export root: the source finds csv/ in it


@requires_synthea
def test_real_export_counts_match_the_files(synthea_db):
    db, s = synthea_db
    assert s.subjects == 59 and s.rows_quarantined == 0 and s.missing_tables == []
    per_table = {t.table: t for t in s.tables}
    events_by_table = dict(rows(db, "SELECT source_table, count(*) FROM events GROUP BY 1"))
    for group in synthea.GROUPS:
        for table in group.tables:
            n_file = len(_csvrows(SYNTHEA / "csv" / f"{table.name}.csv"))  # independent count
            t = per_table[table.name]
            assert t.rows_read == n_file == t.rows_loaded + t.rows_quarantined + t.rows_dropped, table.name
            assert events_by_table.get(table.name, 0) == t.events, table.name
            if table.name in ONE_EVENT_PER_ROW:
                assert t.events == n_file - t.rows_dropped, table.name
    obs = [r for r in _csvrows(SYNTHEA / "csv" / "observations.csv") if r["CODE"] in ("QALY", "DALY", "QOLS")]
    assert per_table["observations"].rows_dropped == len(obs) == 1512
    # conditions: one DX each, one DX_END per resolved condition
    conditions = _csvrows(SYNTHEA / "csv" / "conditions.csv")
    assert s.events_by_kind["DX"] == len(conditions)
    assert s.events_by_kind["DX_END"] == sum(1 for r in conditions if r["STOP"])
    assert rows(db, "SELECT count(*) FROM events WHERE code = 'MEDS_BIRTH'")[0][0] == 59


@requires_synthea
def test_subject_ids_are_the_stable_uuid_hash(synthea_db):
    db, _ = synthea_db
    patients = _csvrows(SYNTHEA / "csv" / "patients.csv")
    mapped = dict(rows(db, "SELECT source_id, subject_id FROM subject_map WHERE source = 'synthea'"))
    assert mapped == {p["Id"]: schema.uuid_subject_id(p["Id"]) for p in patients}
    births = dict(rows(db, "SELECT subject_id, time FROM events WHERE code = 'MEDS_BIRTH'"))
    for p in patients:
        assert births[schema.uuid_subject_id(p["Id"])] == datetime.fromisoformat(p["BIRTHDATE"])


@requires_synthea
def test_diagnoses_are_known_at_the_end_of_their_encounter(synthea_db):
    """Leak-free: a condition recorded in an inpatient stay is timed at discharge, never at admission."""
    db, _ = synthea_db
    enc = {r["Id"]: r for r in _csvrows(SYNTHEA / "csv" / "encounters.csv")}
    dx = rows(db, "SELECT encounter_id, time FROM events WHERE code LIKE 'DX//%'")
    conds = {(r["ENCOUNTER"], r["START"]) for r in _csvrows(SYNTHEA / "csv" / "conditions.csv")}
    assert len(dx) == 1534
    utc = lambda s: datetime.fromisoformat(s.replace("Z", ""))  # noqa: E731
    inpatient = 0
    for enc_id, time in dx:
        stop = utc(enc[enc_id]["STOP"])
        assert time >= stop, enc_id  # never before the recording encounter is over
        if enc[enc_id]["ENCOUNTERCLASS"] == "inpatient":
            inpatient += 1
            assert time > utc(enc[enc_id]["START"])
    assert inpatient > 0 and len(conds) > 0
    # a date-only STOP is known by the end of that day in the westernmost zone: date + 35:59:59 UTC
    (t,) = rows(db, "SELECT time FROM events WHERE code = 'DX_END//SNOMED//359817006' "
                     "AND subject_id = ?", [schema.uuid_subject_id("ac71ad72-4172-803c-4e82-448f043d8db3")])[0]
    assert t == datetime(2014, 3, 9) + timedelta(hours=35, minutes=59, seconds=59)


@requires_synthea
def test_codes_carry_the_export_descriptions(synthea_db):
    db, _ = synthea_db
    got = dict(rows(db, "SELECT code, description FROM codes WHERE code IN "
                         "('DX//SNOMED//359817006', 'RX_START//RXNORM//198405', 'VITAL//LOINC//8302-2')"))
    assert got == {"DX//SNOMED//359817006": "Closed fracture of hip",
                   "RX_START//RXNORM//198405": "Ibuprofen 100 MG Oral Tablet",
                   "VITAL//LOINC//8302-2": "Body Height"}


@requires_synthea
def test_reload_is_idempotent(tmp_path):
    db = tmp_path / "w.duckdb"
    first = load_into("synthea", SYNTHEA / "csv", db)
    fp = "SELECT count(*), sum(hash(subject_id, time, code, numeric_value, text_value)) FROM events"
    before = rows(db, fp)
    second = load_into("synthea", SYNTHEA / "csv", db)
    assert rows(db, fp) == before and first.events == second.events
    assert rows(db, "SELECT count(*) FROM subject_map")[0][0] == 59
    assert rows(db, "SELECT count(*) FROM etl_runs")[0][0] == 2


# --- a hand-written export with one bad row of each kind ---------------------------------------------------

P1, P2, P3, P4 = ("11111111-aaaa-4000-8000-000000000001", "22222222-bbbb-4000-8000-000000000002",
                  "33333333-cccc-4000-8000-000000000003", "44444444-dddd-4000-8000-000000000004")
E1, E2 = "e1e1e1e1-0000-4000-8000-000000000001", "e2e2e2e2-0000-4000-8000-000000000002"
FUTURE = (datetime.now() + timedelta(days=400)).strftime("%Y-%m-%d")


def _write(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def tiny_synthea(tmp_path: Path) -> Path:
    """Patients P1 (alive), P2 (died 2020) and bad rows; only patients/encounters/conditions/observations/
    medications exist (the other tables are absent, as in a minimal export)."""
    root = tmp_path / "csv"
    _write(root / "patients.csv", ["Id", "BIRTHDATE", "DEATHDATE", "FIRST", "RACE", "ETHNICITY", "GENDER"], [
        [P1, "1980-02-01", "", "Ann", "white", "nonhispanic", "F"],
        [P2, "1950-06-30", "2020-01-15", "Bob", "black", "hispanic", "M"],
        [P1, "1981-01-01", "", "Dup", "white", "nonhispanic", "F"],              # line 4: duplicate Id
        [P3, FUTURE, "", "Fut", "asian", "nonhispanic", "F"],                   # line 5: born in the future
        [P4, "1990-01-01", "1989-01-01", "Rev", "white", "nonhispanic", "M"],   # line 6: died before birth (kept)
    ])
    _write(root / "encounters.csv", ["Id", "START", "STOP", "PATIENT", "ENCOUNTERCLASS", "CODE", "DESCRIPTION"], [
        [E1, "2019-03-01T08:00:00Z", "2019-03-04T12:00:00Z", P1, "inpatient", "1", "Hospital admission"],
        [E2, "2019-05-01T08:00:00Z", "2019-05-01T08:15:00Z", P2, "wellness", "2", "Check up"],
        ["e3", "2019-05-01T08:00:00Z", "2019-05-01T08:15:00Z", "nobody", "ambulatory", "3", "x"],  # line 4
        ["e4", "2019-05-02T08:00:00Z", "2019-05-01T08:15:00Z", P1, "ambulatory", "3", "x"],        # line 5
        ["e5", f"{FUTURE}T08:00:00Z", "", P1, "ambulatory", "3", "x"],                            # line 6
    ])
    _write(root / "conditions.csv", ["START", "STOP", "PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION"], [
        ["2019-03-01", "2019-04-01", P1, E1, "44054006", "Diabetes"],
        ["1979-01-01", "", P1, "", "38341003", "Hypertension"],                 # line 3: before birth
        ["2019-05-01", "", P1, E2, "38341003", "Hypertension"],                 # line 4: P2's encounter
        ["2019-05-01", "", P2, E2, "", "no code"],                              # line 5: missing CODE
    ])
    _write(root / "medications.csv", ["START", "PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION"], [   # no STOP column
        ["2019-03-02T09:00:00Z", P1, E1, "860975", "Metformin"],
    ])
    header = ["DATE", "PATIENT", "ENCOUNTER", "CATEGORY", "CODE", "DESCRIPTION", "VALUE", "UNITS", "TYPE"]
    _write(root / "observations.csv", header, [
        ["2019-03-01T09:00:00Z", P1, E1, "vital-signs", "8302-2", "Body Height", "160.5", "cm", "numeric"],
        ["2019-05-01T08:00:00Z", P2, E2, "survey", "72166-2", "Smoking", "Never smoker", "", "text"],
        ["2019-05-01T08:00:00Z", P2, E2, "laboratory", "2339-0", "Glucose", "high", "mg/dL", "numeric"],  # line 4
        ["2019-05-01T08:00:00Z", P2, E2, "", "QALY", "QALY", "50.0", "a", "numeric"],                    # line 5
        ["2019-05-01T08:00:00Z", P2, E2, "laboratory", "2339-0", "Glucose", "BAD", "mg/dL", "numeric"],  # line 6
    ])
    # line 6 gets a byte that is not UTF-8 (an exporter writing Latin-1)
    raw = (root / "observations.csv").read_bytes().replace(b"BAD", b"B\xe9D")
    (root / "observations.csv").write_bytes(raw)
    return root


def test_tiny_bad_rows_are_quarantined_with_reasons(tiny_synthea, tmp_path):
    db = tmp_path / "w.duckdb"
    s = load_into("synthea", tiny_synthea, db)
    assert s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_dropped
    q = {(f, line): r for f, line, r in rows(db, "SELECT source_file, row_number, reason FROM quarantine")}
    assert q[("patients.csv", 4)].startswith("duplicate patient Id (line 2 kept)")
    assert q[("patients.csv", 5)].startswith("time in the future (after the load ran): BIRTHDATE")
    # a bad optional DEATHDATE is set to NULL and reported; the patient stays (issue 17, defect 7)
    assert ("patients.csv", 6) not in q
    assert "patients.csv: 1 row(s) kept with an invalid optional field set to NULL: line 6: DEATHDATE before " \
           "BIRTHDATE: 1989-01-01" in s.warnings
    assert q[("encounters.csv", 4)] == "unknown patient (not among the loaded patients): PATIENT nobody"
    assert q[("encounters.csv", 5)] == "STOP before START"
    assert q[("encounters.csv", 6)].startswith("time in the future (after the load ran): START")
    assert q[("conditions.csv", 3)].startswith("time before birth: 1979-01-01")
    assert q[("conditions.csv", 4)] == f"ENCOUNTER belongs to another patient: {E2}"
    assert q[("conditions.csv", 5)] == "missing CODE"
    assert q[("observations.csv", 4)] == "non-numeric VALUE: high"
    assert q[("observations.csv", 6)].startswith("unparseable CSV row: INVALID ENCODING")  # the Latin-1 byte
    assert len(q) == 10 == s.rows_quarantined
    assert s.dropped_reasons == {"observations: Synthea simulator summary metric (QALY/DALY/QOLS), not a clinical "
                                 "observation": 1}
    # absent optional tables are reported, not fatal; the missing STOP column is simply absent
    assert {"procedures.csv", "immunizations.csv", "allergies.csv"} <= set(s.missing_tables)
    assert s.subjects == 3


def test_tiny_codes_values_and_times(tiny_synthea, tmp_path):
    db = tmp_path / "w.duckdb"
    load_into("synthea", tiny_synthea, db)
    p1, p2 = schema.uuid_subject_id(P1), schema.uuid_subject_id(P2)
    ev = {(sid, code): (t, num, txt, unit) for sid, code, t, num, txt, unit in rows(
        db, "SELECT subject_id, code, time, numeric_value, text_value, unit FROM events")}
    assert ev[(p1, "ADMIT//INPATIENT")][0] == datetime(2019, 3, 1, 8)
    assert ev[(p1, "DISCHARGE//INPATIENT")][0] == datetime(2019, 3, 4, 12)
    assert (p2, "ENCOUNTER//WELLNESS") in ev
    # diagnosed in the inpatient stay: known at discharge, not at admission
    assert ev[(p1, "DX//SNOMED//44054006")][0] == datetime(2019, 3, 4, 12)
    assert ev[(p1, "DX_END//SNOMED//44054006")][0] == datetime(2019, 4, 1) + timedelta(seconds=129599)
    assert ev[(p1, "RX_START//RXNORM//860975")][0] == datetime(2019, 3, 2, 9)
    assert ev[(p1, "VITAL//LOINC//8302-2")][1:] == (pytest.approx(160.5), None, "cm")
    assert ev[(p2, "LAB//LOINC//72166-2")][1:] == (None, "Never smoker", None)
    assert ev[(p2, "MEDS_DEATH")][0] == datetime(2020, 1, 15) + timedelta(seconds=129599)
    assert {code for sid, code in ev if sid == p2 and code.split("//")[0] in ("GENDER", "RACE", "ETHNICITY")} == {
        "GENDER//M", "RACE//BLACK", "ETHNICITY//HISPANIC"}
    assert rows(db, "SELECT count(*) FROM events WHERE code LIKE 'RX_STOP%'")[0][0] == 0


def test_tiny_missing_column_empty_folder_and_procedure_dates(tiny_synthea, tmp_path):
    db = tmp_path / "w.duckdb"
    with pytest.raises(warehouse.SourceError, match="not a folder"):
        load_into("synthea", tmp_path / "nowhere", db)
    (tmp_path / "empty").mkdir()
    with pytest.raises(warehouse.SourceError, match=r"patients\.csv: required file missing"):
        load_into("synthea", tmp_path / "empty", db)
    conditions = _csvrows(tiny_synthea / "conditions.csv")
    _write(tiny_synthea / "conditions.csv", ["START", "STOP", "PATIENT", "ENCOUNTER", "DESCRIPTION"],
           [[r["START"], r["STOP"], r["PATIENT"], r["ENCOUNTER"], r["DESCRIPTION"]] for r in conditions])
    with pytest.raises(warehouse.SourceError, match=r"conditions\.csv: missing required column\(s\) \['CODE'\]"):
        load_into("synthea", tiny_synthea, db)
    (tiny_synthea / "conditions.csv").unlink()
    _write(tiny_synthea / "procedures.csv", ["PATIENT", "CODE", "DESCRIPTION"], [[P1, "1", "x"]])
    with pytest.raises(warehouse.SourceError, match=r"procedures\.csv: missing required column: one of"):
        load_into("synthea", tiny_synthea, db)
    # nothing was published by the failed loads
    assert rows(db, "SELECT count(*) FROM events")[0][0] == 0


def test_crash_mid_load_leaves_the_warehouse_unchanged(tiny_synthea, tmp_path):
    db = tmp_path / "w.duckdb"
    load_into("synthea", tiny_synthea, db)
    fp = "SELECT count(*), sum(hash(subject_id, time, code)) FROM events"
    before = rows(db, fp), rows(db, "SELECT count(*) FROM quarantine"), rows(db, "SELECT count(*) FROM etl_runs")

    def boom(group: str) -> None:
        if group == "clinical":
            raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected"):
        load_into("synthea", tiny_synthea, db, on_group_done=boom)
    after = rows(db, fp), rows(db, "SELECT count(*) FROM quarantine"), rows(db, "SELECT count(*) FROM etl_runs")
    assert after == before


def test_subject_map_rows_are_kept_and_collisions_refused(tiny_synthea, tmp_path):
    db = tmp_path / "w.duckdb"
    with warehouse.connect(db) as con:
        con.execute("INSERT INTO subject_map VALUES ('synthea', ?, 42)", [P1])  # an existing mapping wins
    load_into("synthea", tiny_synthea, db)
    assert rows(db, "SELECT DISTINCT subject_id FROM events WHERE code = 'GENDER//F'") == [(42,)]
    assert rows(db, "SELECT subject_id FROM subject_map WHERE source_id = ?", [P2]) == [
        (schema.uuid_subject_id(P2),)]
    # another patient already holding P2's hash id is a collision: refused, nothing published
    db2 = tmp_path / "w2.duckdb"
    with warehouse.connect(db2) as con:
        con.execute("INSERT INTO subject_map VALUES ('fhir', 'someone-else', ?)", [schema.uuid_subject_id(P2)])
    with pytest.raises(warehouse.SourceError, match="hash collision in subject_map"):
        load_into("synthea", tiny_synthea, db2)
    assert rows(db2, "SELECT count(*) FROM events") == [(0,)]
