"""Hostile MIMIC-IV rows (issue 17, defect 7 and the MIMIC time-zone case of 11): one bad optional field must not
drop a patient, an unreadable patients row must be named as the reason its other rows are quarantined, and a time
with a zone offset is never silently stripped.

Each test builds a small MIMIC-IV folder by hand: two or three patients, each with an admission, a diagnosis and
labs, so a patient lost through the subject check shows up as rows lost in every table.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

from ..conftest import load_into, rows, write_csv_gz

PATIENT_COLS = ["subject_id", "gender", "anchor_age", "anchor_year", "dod"]
ADM_COLS = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type", "admission_location",
            "discharge_location", "insurance", "language", "marital_status", "race", "edregtime", "edouttime"]
DX_COLS = ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"]
LAB_COLS = ["labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "charttime", "storetime", "value",
            "valuenum", "valueuom"]


def adm(sid: int, hadm: int, admit: str, disch: str, death: str = "", edreg: str = "", edout: str = "") -> list:
    return [sid, hadm, admit, disch, death, "EW EMER.", "EMERGENCY ROOM", "HOME", "Medicare", "ENGLISH", "MARRIED",
            "WHITE", edreg, edout]


def lab(n: int, sid: int, hadm: int | str, chart: str, store: str = "", value: str = "1.1", num: str = "1.1"
        ) -> list:
    return [n, sid, hadm, n, 50912, chart, store, value, num, "mg/dL"]


def mimic(root: Path, *, patients: list | None = None, admissions: list | None = None, labs: list | None = None,
          diagnoses: list | None = None) -> Path:
    """A MIMIC-IV folder: subjects 1 and 2 (both sound unless ``patients`` says otherwise), one admission, one
    diagnosis and two labs each."""
    write_csv_gz(root / "hosp" / "patients.csv.gz", PATIENT_COLS, patients or [
        [1, "F", 50, 2150, ""],
        [2, "M", 30, 2160, ""],
    ])
    write_csv_gz(root / "hosp" / "admissions.csv.gz", ADM_COLS, admissions or [
        adm(1, 101, "2150-05-01 10:00:00", "2150-05-06 12:00:00"),
        adm(2, 201, "2160-01-10 09:00:00", "2160-01-12 09:00:00"),
    ])
    write_csv_gz(root / "hosp" / "diagnoses_icd.csv.gz", DX_COLS, diagnoses or [
        [1, 101, 1, "I10", 10],
        [2, 201, 1, "J189", 10],
    ])
    write_csv_gz(root / "hosp" / "labevents.csv.gz", LAB_COLS, labs or [
        lab(1, 1, 101, "2150-05-01 11:00:00", "2150-05-01 12:00:00"),
        lab(2, 1, 101, "2150-05-02 11:00:00"),
        lab(3, 2, 201, "2160-01-10 10:00:00"),
        lab(4, 2, 201, "2160-01-11 10:00:00"),
    ])
    return root


def corrupt_byte(path: Path, find: bytes, replace: bytes) -> None:
    """Replace bytes inside a gzipped CSV (a non-UTF-8 byte, say) and re-compress it."""
    data = gzip.decompress(path.read_bytes())
    assert find in data
    path.write_bytes(gzip.compress(data.replace(find, replace, 1)))


def load(root: Path, tmp_path: Path):
    db = tmp_path / "w.duckdb"
    s = load_into("mimic-iv", root, db)
    assert s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_dropped
    for t in s.tables:
        assert t.rows_read == t.rows_loaded + t.rows_quarantined + t.rows_dropped, t.table
    return s, db


def quarantine(db: Path) -> dict[tuple[str, int], str]:
    return {(f.split("/")[-1].split(".")[0], line): reason
            for f, line, reason in rows(db, "SELECT source_file, row_number, reason FROM quarantine")}


def events_by_table(db: Path, subject_id: int) -> dict[str, int]:
    return dict(rows(db, "SELECT source_table, count(*) FROM events WHERE subject_id = ? GROUP BY 1", [subject_id]))


def field_warnings(summary) -> list[str]:
    return [w for w in summary.warnings if "kept with an invalid optional field set to NULL" in w]


# --- defect 7: one bad optional field ---------------------------------------------------------------------------


def test_dod_9999_12_31_keeps_the_patient_and_every_row_and_reports_the_field(tmp_path):
    root = mimic(tmp_path / "m", patients=[
        [1, "F", 50, 2150, "9999-12-31"],             # implausible date of death (optional field)
        [2, "M", 30, 2160, ""],
    ])
    s, db = load(root, tmp_path)
    assert s.rows_quarantined == 0
    assert {"patients", "admissions", "diagnoses_icd", "labevents"} <= set(events_by_table(db, 1))
    assert rows(db, "SELECT count(*) FROM events WHERE subject_id = 1 AND code = 'MEDS_DEATH'") == [(0,)]
    (warning,) = field_warnings(s)
    assert warning == ("hosp/patients.csv.gz: 1 row(s) kept with an invalid optional field set to NULL: "
                       "line 2: implausible dod: 9999-12-31")


def test_every_kind_of_bad_dod_is_a_field_problem_not_a_lost_patient(tmp_path):
    root = mimic(tmp_path / "m", patients=[
        [1, "F", 50, 2150, "not a date"],             # unparseable
        [2, "M", 30, 2160, "2050-01-01"],             # before birth (born 2130)
        [3, "F", 40, 2170, "2171-03-04 00:00:00+02:00"],  # a zone offset in a local-time column
    ])
    s, db = load(root, tmp_path)
    assert s.tables[0].table == "patients" and s.tables[0].rows_loaded == 3
    assert s.rows_quarantined == 0
    assert rows(db, "SELECT count(*) FROM events WHERE code = 'MEDS_DEATH'") == [(0,)]
    (warning,) = field_warnings(s)
    assert warning.startswith("hosp/patients.csv.gz: 3 row(s) kept")
    assert "line 2: unparseable dod: not a date" in warning
    assert "line 3: dod before birth: 2050-01-01" in warning
    assert "line 4: time zone in dod" in warning


def test_a_non_utf8_patients_row_is_quarantined_and_its_rows_name_it(tmp_path):
    root = mimic(tmp_path / "m")
    corrupt_byte(root / "hosp" / "patients.csv.gz", b"2,M,30", b"2,M\xff,30")
    _, db = load(root, tmp_path)
    q = quarantine(db)
    assert q[("patients", 3)].startswith("unparseable CSV row: INVALID ENCODING")
    cascade = {k: r for k, r in q.items() if k[0] != "patients"}
    assert set(cascade) == {("admissions", 3), ("diagnoses_icd", 3), ("labevents", 4), ("labevents", 5)}
    for reason in cascade.values():
        assert reason.startswith("subject_id 2: its patients row was quarantined (line 3: unparseable CSV row: "
                                 "INVALID ENCODING"), reason
        assert "unknown subject_id" not in reason
    # subject 1 is untouched
    assert events_by_table(db, 1)["labevents"] == 2


def test_a_patient_missing_a_required_field_is_named_in_the_cascade(tmp_path):
    root = mimic(tmp_path / "m", patients=[
        [1, "F", 50, 2150, ""],
        [2, "", 30, 2160, ""],                        # no gender: a required field, the row is quarantined
    ])
    _, db = load(root, tmp_path)
    q = quarantine(db)
    assert q[("patients", 3)] == "missing gender"
    assert q[("admissions", 3)] == "subject_id 2: its patients row was quarantined (line 3: missing gender)"


def test_a_subject_not_in_the_patients_table_is_still_unknown(tmp_path):
    root = mimic(tmp_path / "m", labs=[
        lab(1, 1, 101, "2150-05-01 11:00:00"),
        lab(2, 9, "", "2150-05-01 11:00:00"),         # no such patient
    ])
    corrupt_byte(root / "hosp" / "patients.csv.gz", b"2,M,30", b"2,M\xff,30")  # another subject's row unreadable
    _, db = load(root, tmp_path)
    assert quarantine(db)[("labevents", 3)] == "unknown subject_id (not in the patients table): 9"


# --- neighbours: other optional fields -----------------------------------------------------------------------


def test_garbage_deathtime_and_ed_times_keep_the_admission_and_its_diagnoses(tmp_path):
    root = mimic(tmp_path / "m", admissions=[
        adm(1, 101, "2150-05-01 10:00:00", "2150-05-06 12:00:00", death="garbage", edreg="31/12/2149"),
        adm(2, 201, "2160-01-10 09:00:00", "2160-01-12 09:00:00", edout="2160-01-10 08:00:00-05:00"),
    ])
    s, db = load(root, tmp_path)
    assert s.rows_quarantined == 0
    t = {x.table: x for x in s.tables}
    assert t["admissions"].rows_loaded == 2 and t["diagnoses_icd"].rows_loaded == 2
    assert rows(db, "SELECT count(*) FROM events WHERE code IN ('MEDS_DEATH', 'ED//REGISTRATION', 'ED//OUT')") == [
        (0,)]
    (warning,) = field_warnings(s)
    assert "line 2: unparseable deathtime: garbage; unparseable edregtime: 31/12/2149" in warning
    assert "line 3: time zone in edouttime" in warning


def test_lab_values_that_are_not_numbers_keep_the_row(tmp_path):
    root = mimic(tmp_path / "m", labs=[
        lab(1, 1, 101, "2150-05-01 11:00:00", value="NEG", num=""),      # a text result: a valid row
        lab(2, 1, 101, "2150-05-01 11:00:00", value="trace", num="trace"),  # text in valuenum: field set NULL
        lab(3, 1, 101, "2150-05-01 11:00:00", value="1e300", num="1e300"),  # absurd number: quarantined
    ])
    s, db = load(root, tmp_path)
    got = rows(db, "SELECT numeric_value, text_value FROM events WHERE source_table = 'labevents' ORDER BY 2")
    assert got == [(None, "NEG"), (None, "trace")]
    assert quarantine(db)[("labevents", 4)] == "absurd valuenum: 1e300"
    (warning,) = field_warnings(s)
    assert warning == ("hosp/labevents.csv.gz: 1 row(s) kept with an invalid optional field set to NULL: "
                       "line 3: non-numeric valuenum: trace")


# --- defect 11: time-zone offsets in MIMIC times --------------------------------------------------------------


def test_time_zone_offsets_in_required_mimic_times_are_quarantined_not_stripped(tmp_path):
    root = mimic(tmp_path / "m", admissions=[
        adm(1, 101, "2150-05-01 10:00:00+02:00", "2150-05-06 12:00:00"),
        adm(2, 201, "2160-01-10 09:00:00", "2160-01-12 09:00:00"),
    ], labs=[
        lab(1, 1, "", "2150-05-01 11:00:00Z"),
        lab(2, 2, 201, "2160-01-10T10:00:00-0500"),
        lab(3, 2, 201, "2160-01-10 10:00:00 UTC"),
        lab(4, 2, 201, "2160-01-10 10:00:00.250"),   # fractional seconds: no zone, loaded
    ])
    _, db = load(root, tmp_path)
    q = quarantine(db)
    assert q[("admissions", 2)] == ("time zone in admittime (this source's times are local, without a zone): "
                                    "2150-05-01 10:00:00+02:00")
    assert q[("labevents", 2)].startswith("time zone in charttime")
    assert q[("labevents", 3)].endswith("2160-01-10T10:00:00-0500")
    assert q[("labevents", 4)].endswith("2160-01-10 10:00:00 UTC")
    assert ("labevents", 5) not in q
    # no event was loaded at a time with its offset silently dropped
    assert rows(db, "SELECT count(*) FROM events WHERE time = TIMESTAMP '2150-05-01 10:00:00'") == [(0,)]


def test_a_time_zone_offset_in_an_optional_time_sets_that_time_to_null(tmp_path):
    root = mimic(tmp_path / "m", labs=[
        lab(1, 1, 101, "2150-05-01 11:00:00", store="2150-05-01 12:00:00+01:00"),
    ])
    s, db = load(root, tmp_path)
    assert s.rows_quarantined == 0
    # timed at the draw time, as a lab without a storetime is
    assert rows(db, "SELECT time FROM events WHERE source_table = 'labevents'")[0][0].hour == 11
    (warning,) = field_warnings(s)
    assert "line 2: time zone in storetime" in warning


# --- the same class in the other patient-keyed sources ----------------------------------------------------------

PA, PB = "11111111-aaaa-4000-8000-000000000001", "22222222-bbbb-4000-8000-000000000002"


def write_csv(path: Path, header: list[str], rows_: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows_])


def test_synthea_bad_deathdate_keeps_the_patient_and_a_bad_birthdate_is_named_in_the_cascade(tmp_path):
    root = tmp_path / "csv"
    write_csv(root / "patients.csv", ["Id", "BIRTHDATE", "DEATHDATE", "RACE", "ETHNICITY", "GENDER"], [
        [PA, "1980-02-01", "9999-12-31", "white", "nonhispanic", "F"],   # line 2: implausible DEATHDATE
        [PB, "01/02/1980", "", "white", "nonhispanic", "M"],             # line 3: BIRTHDATE (required) unreadable
    ])
    write_csv(root / "encounters.csv", ["Id", "START", "STOP", "PATIENT", "ENCOUNTERCLASS", "CODE", "DESCRIPTION"], [
        ["e1", "2019-03-01T08:00:00Z", "2019-03-01T09:00:00Z", PA, "ambulatory", "1", "x"],
        ["e2", "2019-03-01T08:00:00Z", "2019-03-01T09:00:00Z", PB, "ambulatory", "1", "x"],
        ["e3", "2019-03-01T08:00:00Z", "2019-03-01T09:00:00Z", "nobody", "ambulatory", "1", "x"],
    ])
    db = tmp_path / "w.duckdb"
    s = load_into("synthea", root, db)
    assert s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_dropped
    q = {(f, line): r for f, line, r in rows(db, "SELECT source_file, row_number, reason FROM quarantine")}
    assert ("patients.csv", 2) not in q and ("encounters.csv", 2) not in q
    assert rows(db, "SELECT count(*) FROM events WHERE code = 'MEDS_DEATH'") == [(0,)]
    assert ("patients.csv: 1 row(s) kept with an invalid optional field set to NULL: line 2: implausible "
            "DEATHDATE: 9999-12-31") in s.warnings
    assert q[("patients.csv", 3)] == "unparseable BIRTHDATE: 01/02/1980"
    assert q[("encounters.csv", 3)] == (f"PATIENT {PB}: its patients row was quarantined (line 3: unparseable "
                                        "BIRTHDATE: 01/02/1980)")
    assert q[("encounters.csv", 4)] == "unknown patient (not among the loaded patients): PATIENT nobody"


def test_fhir_bad_birth_and_death_dates_keep_the_patient_and_their_resources(tmp_path):
    root = tmp_path / "fhir"
    root.mkdir()
    patient = {"resourceType": "Patient", "id": PA, "gender": "female", "birthDate": "02/01/1980",
               "deceasedDateTime": "9999-12-31T00:00:00Z"}
    obs = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": f"urn:uuid:{PA}"},
           "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]}, "valueQuantity": {"value": 5},
           "effectiveDateTime": "2019-03-01T02:00:00-07:00"}
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in (patient, obs)]}
    (root / "a.json").write_text(json.dumps(bundle))
    db = tmp_path / "w.duckdb"
    s = load_into("fhir", root, db)
    assert s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_dropped
    assert s.rows_quarantined == 0 and s.subjects == 1
    assert {c for (c,) in rows(db, "SELECT code FROM events")} == {"GENDER//F", "LAB//LOINC//2339-0"}
    (warning,) = field_warnings(s)
    assert "unparseable birthDate: 02/01/1980; implausible deceasedDateTime: 9999-12-31T00:00:00Z" in warning
