"""The FHIR R4 source: the real Synthea bundles (counts against Python's json module, notes, UTC times), the
CSV-vs-FHIR reconciliation of the same export, hand-written bundles with every kind of bad input, the CLI and
the Prefect flow for the new sources."""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from foresight import schema, sources, warehouse
from foresight.sources import fhir

from .conftest import SHARED_DATA, load_into, rows

SYNTHEA = SHARED_DATA / "synthea-ca-59pt"
requires_synthea = pytest.mark.skipif(not (SYNTHEA / "fhir").is_dir(),
                                      reason=f"Synthea export not found at {SYNTHEA} (../shared/data is absent)")


@pytest.fixture(scope="module")
def both_dbs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, warehouse.LoadSummary]:
    """The same Synthea export loaded twice, from csv/ and from fhir/, into separate warehouses."""
    if not (SYNTHEA / "fhir").is_dir():
        pytest.skip(f"Synthea export not found at {SYNTHEA}")
    d = tmp_path_factory.mktemp("fhir")
    load_into("synthea", SYNTHEA / "csv", d / "csv.duckdb")
    summary = load_into("fhir", SYNTHEA / "fhir", d / "fhir.duckdb")
    return d / "csv.duckdb", d / "fhir.duckdb", summary


@requires_synthea
def test_real_bundles_every_entry_accounted(both_dbs):
    _, db, s = both_dbs
    # independent count of the bundles' entries with Python's json module
    counts: Counter[str] = Counter()
    for f in fhir.bundle_files(SYNTHEA / "fhir"):
        with gzip.open(f) as fh:
            for e in json.load(fh)["entry"]:
                counts[e["resource"]["resourceType"]] += 1
    tables = {t.table: t for t in s.tables}
    for rtype, table in fhir.RESOURCE_TABLES.items():
        assert tables[table].rows_read == counts[rtype], rtype
    assert tables["other_resources"].rows_read == sum(n for t, n in counts.items() if t not in fhir.RESOURCE_TABLES)
    assert s.rows_read == sum(counts.values()) == s.rows_loaded + s.rows_quarantined + s.rows_dropped
    assert s.rows_quarantined == 0 and s.subjects == counts["Patient"] == 50
    assert s.dropped_reasons["other_resources: resource type not loaded: Claim"] == counts["Claim"]
    # DocumentReference text went to the notes table, decoded
    assert s.notes == counts["DocumentReference"] == rows(db, "SELECT count(*) FROM notes")[0][0]
    text, note_type = rows(db, "SELECT text, note_type FROM notes ORDER BY time LIMIT 1")[0]
    assert "# Chief Complaint" in text and note_type == "LOINC//34117-2"
    assert rows(db, "SELECT count(*) FROM notes WHERE time IS NULL OR encounter_id IS NULL")[0][0] == 0


@requires_synthea
def test_fhir_times_are_utc(both_dbs):
    _, db, _ = both_dbs
    # Jorge Luis88's first encounter: period.start 2021-08-22T20:26:50-07:00 = 2021-08-23T03:26:50Z (the CSV value)
    sid = schema.uuid_subject_id("593aaa05-d864-1df7-5b96-155fbdb19f28")
    first = rows(db, "SELECT min(time) FROM events WHERE subject_id = ? AND code LIKE 'ENCOUNTER//%'", [sid])[0][0]
    assert first == datetime(2021, 8, 23, 3, 26, 50)


# Synthea's FHIR exporter folds its encounter classes into FHIR's v3 ActCode classes: wellness, ambulatory,
# outpatient and urgent care -> AMB; home and hospice -> HH; skilled nursing -> IMP. The CSV keeps Synthea's own.
FHIR_CLASS = {"WELLNESS": "ENCOUNTER//AMBULATORY", "AMBULATORY": "ENCOUNTER//AMBULATORY",
              "OUTPATIENT": "ENCOUNTER//AMBULATORY", "URGENTCARE": "ENCOUNTER//AMBULATORY",
              "HOME": "ENCOUNTER//HOME", "HOSPICE": "ENCOUNTER//HOME", "SNF": "ADMIT//INPATIENT"}
# Kinds both exports carry with the same precision: identical events.
EXACT = ("GENDER", "RACE", "ETHNICITY", "MEDS_BIRTH", "PX", "RX_START", "IMMUNIZATION", "IMAGING")
# Kinds whose CSV time is coarser (a local DATE: conditions' onset and stop, allergies, care plans, death) or
# anchored differently (the CSV times a diagnosis at its encounter's end; FHIR knows the onset to the second):
# the same (subject, code) events, at times at most 36 hours apart.
DATED = ("DX", "DX_END", "ALLERGY", "CAREPLAN", "CAREPLAN_END", "MEDS_DEATH")


@requires_synthea
def test_csv_and_fhir_copies_reconcile(both_dbs):
    """The two exports of one Synthea population give the same subjects and, resource by resource, the same
    coded events; every difference is one of the explained ones below."""
    csv_db, fhir_db, _ = both_dbs
    con = duckdb.connect()
    con.execute(f"ATTACH '{csv_db}' AS c (READ_ONLY); ATTACH '{fhir_db}' AS f (READ_ONLY)")
    q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
    # Subjects: the 50 bundles' patients are 50 of the CSV's 59 (9 bundles of 4 MiB or more were not copied),
    # with the SAME subject ids (both hash the patient UUID).
    fhir_ids = {r[0] for r in q("SELECT source_id FROM f.subject_map")}
    csv_ids = {r[0] for r in q("SELECT source_id FROM c.subject_map")}
    assert len(fhir_ids) == 50 and fhir_ids < csv_ids and len(csv_ids - fhir_ids) == 9
    assert q("SELECT count(*) FROM f.subject_map m JOIN c.subject_map n USING (source_id) "
             "WHERE m.subject_id <> n.subject_id")[0][0] == 0
    con.execute("CREATE TEMP TABLE ce AS SELECT *, split_part(code, '//', 1) AS kind FROM c.events "
                "WHERE subject_id IN (SELECT subject_id FROM f.events)")
    con.execute("CREATE TEMP TABLE fe AS SELECT *, split_part(code, '//', 1) AS kind FROM f.events")
    con.execute("UPDATE ce SET kind = 'MEDS_BIRTH' WHERE code = 'MEDS_BIRTH'; "
                "UPDATE ce SET kind = 'MEDS_DEATH' WHERE code = 'MEDS_DEATH'; "
                "UPDATE fe SET kind = 'MEDS_BIRTH' WHERE code = 'MEDS_BIRTH'; "
                "UPDATE fe SET kind = 'MEDS_DEATH' WHERE code = 'MEDS_DEATH'")

    def differ(kinds: tuple[str, ...], cols: str, a: str = "ce", b: str = "fe") -> int:
        ks = ", ".join(f"'{k}'" for k in kinds)
        return q(f"""SELECT (SELECT count(*) FROM (SELECT {cols} FROM {a} WHERE kind IN ({ks})
                                                  EXCEPT ALL SELECT {cols} FROM {b} WHERE kind IN ({ks})))
                          + (SELECT count(*) FROM (SELECT {cols} FROM {b} WHERE kind IN ({ks})
                                                  EXCEPT ALL SELECT {cols} FROM {a} WHERE kind IN ({ks})))""")[0][0]

    full = "subject_id, time, code, numeric_value, text_value"
    assert differ(EXACT, full) == 0
    # Observations: the same events, once three quirks of Synthea's exporters are allowed for: FHIR times a
    # result when `issued` (< 1 s after the effective time, all the CSV has); the CSV rounds values to one
    # decimal, FHIR to five significant digits; the CSV writes commas in text answers as spaces, and types the
    # income answer (LOINC 63586-2) as text without a unit where FHIR has a valueQuantity in '/a'.
    n_obs = q("SELECT count(*) FROM fe WHERE kind IN ('LAB', 'VITAL')")[0][0]
    assert n_obs == q("SELECT count(*) FROM ce WHERE kind IN ('LAB', 'VITAL')")[0][0] == 13742
    (paired, bad_value, bad_text, bad_unit, income) = q("""
        WITH a AS (SELECT subject_id, date_trunc('second', time) AS t, code, numeric_value AS v, text_value AS x,
                          unit, row_number() OVER (PARTITION BY subject_id, date_trunc('second', time), code
                                                   ORDER BY numeric_value, text_value) AS n
                   FROM ce WHERE kind IN ('LAB', 'VITAL')),
             b AS (SELECT subject_id, date_trunc('second', time) AS t, code, numeric_value AS v, text_value AS x,
                          unit, row_number() OVER (PARTITION BY subject_id, date_trunc('second', time), code
                                                   ORDER BY numeric_value, text_value) AS n
                   FROM fe WHERE kind IN ('LAB', 'VITAL'))
        SELECT count(*),
               count(*) FILTER (WHERE code <> 'LAB//LOINC//63586-2' AND a.v IS DISTINCT FROM b.v
                                AND NOT abs(a.v - b.v) <= 0.0501 + 1e-4 * abs(b.v)),
               count(*) FILTER (WHERE code <> 'LAB//LOINC//63586-2' AND a.x IS DISTINCT FROM replace(b.x, ',', ' ')),
               count(*) FILTER (WHERE code <> 'LAB//LOINC//63586-2' AND a.unit IS DISTINCT FROM b.unit),
               count(*) FILTER (WHERE code = 'LAB//LOINC//63586-2' AND b.unit = '/a'
                                AND abs(TRY_CAST(a.x AS DOUBLE) - b.v) <= 1e-4 * b.v)
                   - count(*) FILTER (WHERE code = 'LAB//LOINC//63586-2')
        FROM a JOIN b USING (subject_id, t, code, n)""")[0]
    assert (paired, bad_value, bad_text, bad_unit, income) == (n_obs, 0, 0, 0, 0)
    # Encounters: identical once the CSV's classes are folded the way Synthea's FHIR exporter folds them; the
    # skilled-nursing stays that FHIR calls inpatient also get a DISCHARGE there, which the CSV has not
    con.execute("CREATE TEMP TABLE fold (csv_code VARCHAR, fhir_code VARCHAR)")
    con.executemany("INSERT INTO fold VALUES (?, ?)", [[f"ENCOUNTER//{k}", v] for k, v in FHIR_CLASS.items()])
    con.execute("CREATE TEMP TABLE ce_enc AS SELECT subject_id, time, coalesce(fhir_code, code) AS code, text_value, "
                "split_part(coalesce(fhir_code, code), '//', 1) AS kind FROM ce LEFT JOIN fold ON csv_code = code "
                "WHERE kind IN ('ADMIT', 'ENCOUNTER', 'DISCHARGE')")
    enc = "subject_id, time, code, text_value"
    assert differ(("ADMIT", "ENCOUNTER"), enc, "ce_enc") == 0
    snf = q("SELECT count(*) FROM ce WHERE code = 'ENCOUNTER//SNF'")[0][0]
    assert snf > 0
    assert q("SELECT count(*) FROM (SELECT subject_id, time, code FROM ce_enc WHERE kind = 'DISCHARGE' "
             "EXCEPT ALL SELECT subject_id, time, code FROM fe WHERE kind = 'DISCHARGE')")[0][0] == 0
    assert q("SELECT count(*) FROM fe WHERE kind = 'DISCHARGE'")[0][0] == \
        q("SELECT count(*) FROM ce WHERE kind = 'DISCHARGE'")[0][0] + snf
    # Date-level kinds: same (subject, code) events; paired in time order, at most 36 h apart, and for the kinds
    # the CSV has only as a date never earlier in the CSV than the true (FHIR) time: leak-free
    assert differ(DATED, "subject_id, code") == 0
    ks = ", ".join(f"'{k}'" for k in DATED)
    pairs = q(f"""
        WITH a AS (SELECT kind, subject_id, code, time, row_number() OVER (PARTITION BY subject_id, code ORDER BY time)
                   AS n FROM ce WHERE kind IN ({ks})),
             b AS (SELECT subject_id, code, time, row_number() OVER (PARTITION BY subject_id, code ORDER BY time)
                   AS n FROM fe WHERE kind IN ({ks}))
        SELECT a.kind, epoch(a.time) - epoch(b.time) FROM a JOIN b USING (subject_id, code, n)""")
    assert len(pairs) == q(f"SELECT count(*) FROM fe WHERE kind IN ({ks})")[0][0]
    assert all(abs(d) <= 36 * 3600 for _, d in pairs)
    assert all(d >= 0 for k, d in pairs if k in ("DX_END", "CAREPLAN_END", "MEDS_DEATH"))
    # What only one export carries: RX_STOP and devices (CSV; R4 MedicationRequest has no stop time and R4
    # Device no use period), DiagnosticReport panels (FHIR).
    only_csv = {r[0] for r in q("SELECT DISTINCT kind FROM ce EXCEPT SELECT DISTINCT kind FROM fe")}
    only_fhir = {r[0] for r in q("SELECT DISTINCT kind FROM fe EXCEPT SELECT DISTINCT kind FROM ce")}
    assert only_csv == {"RX_STOP", "DEVICE", "DEVICE_END"} and only_fhir == {"REPORT"}


# --- hand-written bundles with every kind of bad input ----------------------------------------------------

PA, PB = "pa-0001", "pb-0002"


def _ref(rid: str) -> dict:
    return {"reference": f"urn:uuid:{rid}"}


def _cc(system: str, code: str, display: str = "") -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


SCT, LOINC, RXN, CVX = ("http://snomed.info/sct", "http://loinc.org", "http://www.nlm.nih.gov/research/umls/rxnorm",
                        "http://hl7.org/fhir/sid/cvx")
FUTURE = (datetime.now() + timedelta(days=400)).strftime("%Y-%m-%dT10:00:00-07:00")


def _bundle(*resources: dict | None) -> dict:
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} if r else {"request": {"method": "POST"}}
                      for r in resources]}


def _patient(pid: str, **kw) -> dict:
    race = {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": [
        {"url": "ombCategory", "valueCoding": {"code": "2106-3", "display": "White"}},
        {"url": "text", "valueString": "White"}]}
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1980-02-01",
            "extension": [race], **kw}


def _obs(oid: str, subject: str | None, **kw) -> dict:
    r = {"resourceType": "Observation", "id": oid, "status": "final",
         "category": [{"coding": [{"code": kw.pop("category", "laboratory")}]}],
         "effectiveDateTime": "2019-03-01T02:00:00-07:00", "issued": "2019-03-01T02:00:00-07:00", **kw}
    if subject:
        r["subject"] = _ref(subject)
    return r


@pytest.fixture
def tiny_fhir(tmp_path: Path) -> Path:
    root = tmp_path / "fhir"
    root.mkdir()
    note = base64.b64encode(b"Patient has diabetes mellitus.").decode()
    a = _bundle(
        _patient(PA),
        {"resourceType": "Encounter", "id": "ea1", "status": "finished", "class": {"code": "IMP"},
         "type": [{"text": "Hospital admission"}], "subject": _ref(PA),
         "period": {"start": "2019-03-01T01:00:00-07:00", "end": "2019-03-04T05:00:00-07:00"}},
        {"resourceType": "Condition", "id": "ca1", "subject": _ref(PA), "encounter": _ref("ea1"),
         "code": _cc(SCT, "44054006", "Diabetes"), "onsetDateTime": "2019-03-01T01:00:00-07:00",
         "recordedDate": "2019-03-01T01:00:00-07:00", "abatementDateTime": "2019-04-01T10:00:00-07:00"},
        _obs("oa1", PA, category="vital-signs", code=_cc(LOINC, "85354-9", "Blood pressure"), component=[
            {"code": _cc(LOINC, "8480-6", "Systolic"), "valueQuantity": {"value": 120, "unit": "mm[Hg]"}},
            {"code": _cc(LOINC, "8462-4", "Diastolic"), "valueQuantity": {"value": 80, "unit": "mm[Hg]"}}]),
        _obs("oa2", PA, category="survey", code=_cc(LOINC, "72166-2", "Smoking"),
             valueCodeableConcept=_cc(SCT, "266919005", "Never smoker")),
        {"resourceType": "Medication", "id": "ma", "code": _cc(RXN, "860975", "Metformin")},
        {"resourceType": "MedicationRequest", "id": "mra", "status": "active", "subject": _ref(PA),
         "medicationReference": _ref("ma"), "authoredOn": "2019-03-02T02:00:00-07:00"},
        {"resourceType": "DocumentReference", "id": "da", "status": "current", "subject": _ref(PA),
         "type": _cc(LOINC, "34117-2", "H&P"), "date": "2019-03-01T01:00:00-07:00",
         "content": [{"attachment": {"contentType": "text/plain", "data": note}}],
         "context": {"encounter": [_ref("ea1")], "period": {"end": "2019-03-04T05:00:00-07:00"}}},
        {"resourceType": "Claim", "id": "cl1", "patient": _ref(PA)},
        _obs("oa2", PA, code=_cc(LOINC, "2339-0", "Glucose"), valueQuantity={"value": 5}),    # 10: duplicate id
        _obs("oa4", None, code=_cc(LOINC, "2339-0", "Glucose"), valueQuantity={"value": 5}),  # 11: no subject
        {"resourceType": "Condition", "id": "ca2", "subject": _ref("nobody"),                # 12: unknown patient
         "code": _cc(SCT, "38341003"), "onsetDateTime": "2019-03-01T01:00:00-07:00"},
        {"resourceType": "Procedure", "id": "pr1", "status": "completed", "subject": _ref(PA),  # 13: future
         "code": _cc(SCT, "1"), "performedPeriod": {"start": FUTURE, "end": FUTURE}},
        {"resourceType": "Immunization", "id": "im1", "status": "completed", "patient": _ref(PA),  # 14: pre-birth
         "vaccineCode": _cc(CVX, "08"), "occurrenceDateTime": "1970-01-01T00:00:00Z"},
        None,                                                                                # 15: no resource
    )
    (root / "a.json").write_text(json.dumps(a, indent=1))
    b = _bundle(_patient(PB, gender="male", deceasedDateTime="2020-01-15T22:00:00-08:00"),
                {"resourceType": "Encounter", "id": "eb1", "status": "finished", "class": {"code": "AMB"},
                 "subject": _ref(PB), "period": {"start": "2019-05-01T08:00:00Z", "end": "2019-05-01T08:15:00Z"}})
    with gzip.open(root / "b.json.gz", "wt") as fh:
        json.dump(b, fh)
    (root / "broken.json").write_text("this is not JSON {")
    (root / "latin1.json").write_bytes(json.dumps(_bundle(_patient("pc-3", name="Jos\u00e9")),
                                                 ensure_ascii=False).encode("latin-1"))
    (root / "empty.json").write_text("")
    (root / "lone.json").write_text(json.dumps(_patient("pd-4")))
    # a bulk-export style NDJSON file of bare resources
    (root / "sub" / "x.ndjson").parent.mkdir()
    (root / "sub" / "x.ndjson").write_text("\n".join(json.dumps(_obs(f"ob{i}", PB, code=_cc(LOINC, "2339-0"),
                                                                     valueQuantity={"value": i})) for i in (1, 2)))
    return root


def test_tiny_bad_inputs_are_quarantined_with_file_and_entry(tiny_fhir, tmp_path):
    db = tmp_path / "w.duckdb"
    s = load_into("fhir", tiny_fhir, db)
    assert s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_dropped
    q = {(f, row): r for f, row, r in rows(db, "SELECT source_file, row_number, reason FROM quarantine")}
    assert q[("broken.json", None)].startswith("not a readable FHIR JSON file: ")
    assert "Malformed JSON" in q[("broken.json", None)] and "broken.json" in q[("broken.json", None)]
    assert "UTF-8" in q[("latin1.json", None)]
    assert q[("empty.json", None)] == "empty file: no JSON value"
    assert q[("lone.json", 1)].startswith("not a FHIR Bundle (Patient)")
    assert q[("a.json", 10)] == "duplicate Observation id oa2 (first in a.json entry 5)"
    assert q[("a.json", 11)] == "missing subject reference"
    assert q[("a.json", 12)] == "reference to an unknown Patient: urn:uuid:nobody"
    assert q[("a.json", 13)].startswith("time in the future (after the load ran): performed start")
    assert q[("a.json", 14)] == "time before birth: 1970-01-01 00:00:00"
    assert q[("a.json", 15)] == "Bundle entry without a resource"
    assert len(q) == s.rows_quarantined == 10
    raw = rows(db, "SELECT raw FROM quarantine WHERE row_number = 11")[0][0]
    assert '"oa4"' in raw  # the offending resource is kept as read
    assert s.dropped_reasons == {
        "other_resources: resource type not loaded: Claim": 1,
        "other_resources: Medication: read through the MedicationRequests that reference it": 1}
    assert s.subjects == 2 and s.notes == 1


def test_tiny_codes_values_and_leak_free_times(tiny_fhir, tmp_path):
    db = tmp_path / "w.duckdb"
    load_into("fhir", tiny_fhir, db)
    pa, pb = schema.uuid_subject_id(PA), schema.uuid_subject_id(PB)
    ev = Counter()
    got = {}
    for sid, code, t, num, txt, unit in rows(db, "SELECT subject_id, code, time, numeric_value, text_value, unit "
                                                  "FROM events"):
        ev[(sid, code)] += 1
        got[(sid, code)] = (t, num, txt, unit)
    assert got[(pa, "ADMIT//INPATIENT")][0] == datetime(2019, 3, 1, 8)       # -07:00 -> UTC
    assert got[(pa, "DISCHARGE//INPATIENT")][0] == datetime(2019, 3, 4, 12)
    assert got[(pa, "DX//SNOMED//44054006")][0] == datetime(2019, 3, 4, 12)  # known at discharge
    assert got[(pa, "DX_END//SNOMED//44054006")][0] == datetime(2019, 4, 1, 17)
    assert got[(pa, "VITAL//LOINC//8480-6")][1:] == (120.0, None, "mm[Hg]")  # components, not the panel
    assert (pa, "VITAL//LOINC//85354-9") not in got
    assert got[(pa, "LAB//LOINC//72166-2")][1:] == (None, "Never smoker", None)
    assert got[(pa, "RX_START//RXNORM//860975")][0] == datetime(2019, 3, 2, 9)  # through medicationReference
    assert got[(pb, "MEDS_DEATH")][0] == datetime(2020, 1, 16, 6)
    assert got[(pa, "RACE//WHITE")][0] is None and (pb, "GENDER//M") in got
    assert ev[(pb, "LAB//LOINC//2339-0")] == 2  # from the NDJSON file
    (note,) = rows(db, "SELECT subject_id, time, note_id, note_type, encounter_id, text FROM notes")
    assert note == (pa, datetime(2019, 3, 4, 12), "da", "LOINC//34117-2", "ea1", "Patient has diabetes mellitus.")


def test_empty_and_unreadable_folders_are_clear_errors(tmp_path):
    db = tmp_path / "w.duckdb"
    (tmp_path / "empty").mkdir()
    with pytest.raises(warehouse.SourceError, match="no FHIR Bundle files"):
        load_into("fhir", tmp_path / "empty", db)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.json").write_text("<html>not json</html>")
    with pytest.raises(warehouse.SourceError, match=r"no Patient resource in 1 file\(s\), 1 unreadable; first "
                                                    r"problem: x.json: not a readable FHIR JSON file"):
        load_into("fhir", tmp_path / "bad", db)


def test_reload_replaces_rows_and_keeps_ids(tiny_fhir, tmp_path):
    db = tmp_path / "w.duckdb"
    load_into("fhir", tiny_fhir, db)
    fp = ("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM quarantine), (SELECT count(*) FROM notes), "
          "(SELECT count(*) FROM subject_map), (SELECT sum(hash(subject_id, time, code)) FROM events)")
    before = rows(db, fp)
    load_into("fhir", tiny_fhir, db)
    assert rows(db, fp) == before


# --- the CLI and the Prefect flow for the new sources -----------------------------------------------------

def test_cli_etl_fhir_json_contract(tiny_fhir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "foresight.cli", "etl", "fhir", "--input", str(tiny_fhir),
                           "--db", str(tmp_path / "w.duckdb"), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("subjects", "events", "events_by_kind", "rows_read", "rows_loaded", "rows_quarantined",
                "rows_dropped", "seconds", "notes"):
        assert key in payload
    assert payload["rows_read"] == payload["rows_loaded"] + payload["rows_quarantined"] + payload["rows_dropped"]
    assert payload["rows_quarantined"] == 10 and payload["subjects"] == 2
    for kind in ("synthea", "fhir", "meds"):
        help_ = subprocess.run([sys.executable, "-m", "foresight.cli", "etl", kind, "--help"], capture_output=True,
                               text=True, timeout=120)
        assert "--input" in help_.stdout and "--db" in help_.stdout


def test_prefect_etl_flow_loads_each_new_source(tiny_fhir, tmp_path, prefect_server):
    """The same flow (one task per table group, then publish and reconcile) runs every new source."""

    from flows.etl import etl

    csv_root = tmp_path / "csv"
    csv_root.mkdir()
    (csv_root / "patients.csv").write_text("Id,BIRTHDATE,GENDER\np-1,1970-01-01,F\n")
    (csv_root / "conditions.csv").write_text("START,PATIENT,CODE\n2000-01-01,p-1,44054006\n2000-01-01,p-9,1\n")
    meds_root = tmp_path / "meds"
    with warehouse.connect(tmp_path / "src.duckdb") as con:
        sources.load("synthea", con, csv_root)
        warehouse.export_meds(con, meds_root)
    states = {kind: etl(source=kind, input=root, db=tmp_path / f"{kind}.duckdb", return_state=True)
              for kind, root in (("synthea", csv_root), ("fhir", tiny_fhir), ("meds", meds_root))}
    for kind, state in states.items():
        assert state.is_completed(), kind
        summary = state.result()
        assert summary["reconciliation"]["rows_read"] == summary["rows_read"], kind
    assert states["synthea"].result()["rows_quarantined"] == 1  # the unknown patient p-9
    assert states["fhir"].result()["rows_quarantined"] == 10
    assert states["meds"].result()["events"] == states["synthea"].result()["events"]
