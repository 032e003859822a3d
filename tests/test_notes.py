"""Notes -> MedCAT concepts -> NOTE//... events: packs built from small dictionaries, context (negation, family,
hypothetical, history) sentence by sentence, the warehouse load (lineage, reconciliation, bad input), FHIR notes
from the warehouse, multiprocessing, the CLI and the Prefect flow."""

from __future__ import annotations

import base64
import csv
import json
import random
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from foresight import concepts, sources, warehouse
from foresight.concepts.context import ContextRules
from foresight.optout import OPT_OUT_REASON
from foresight.sources import notes

from .conftest import SHARED_DATA, run_cli

TOY_PACK = SHARED_DATA / "medcat-v2-test-resources" / "mct2_model_pack.zip"

DICTIONARY = """cui,name,ontologies,name_status,description
44054006,Diabetes mellitus type 2|type 2 diabetes|diabetes,SNOMED,P,
233604007,Pneumonia,SNOMED,P,
38341003,Hypertension|high blood pressure,SNOMED,P,
254837009,Breast cancer|malignant neoplasm of breast,SNOMED,P,
29857009,Chest pain,SNOMED,P,
195967001,Asthma,SNOMED,P,
22298006,Myocardial infarction|heart attack,SNOMED,P,
428251008,History of appendectomy,SNOMED,P,
840539006,COVID-19,SNOMED,P,
840544004,Suspected COVID-19,SNOMED,P,
"""
DM, PNA, HTN, BRCA, CP, ASTHMA, MI, HX_APPY, COVID, SUSP_COVID = (
    f"NOTE//SNOMED//{c}" for c in ("44054006", "233604007", "38341003", "254837009", "29857009", "195967001",
                                   "22298006", "428251008", "840539006", "840544004"))


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pack")
    (d / "concepts.csv").write_text(DICTIONARY)
    return Path(concepts.build_pack([d / "concepts.csv"], d / "small_pack").pack)


@pytest.fixture(scope="module")
def cat(pack: Path):
    return concepts.load_pack(pack)


def _codes(cat, text: str) -> dict[str, str]:
    """code -> status of the mentions in one sentence."""
    return {m.code: m.status for m in concepts.annotate_note(cat, "t", text)}


# --- packs and codes --------------------------------------------------------------------------------------------


def test_small_pack_finds_the_right_codes(cat):
    assert _codes(cat, "Patient has type 2 diabetes and high blood pressure.") == {DM: "current", HTN: "current"}
    assert _codes(cat, "Admitted with pneumonia; ECG after chest pain.") == {PNA: "current", CP: "current"}
    assert _codes(cat, "HEART ATTACK in 2019.") == {MI: "current"}
    assert _codes(cat, "Nothing of note today.") == {}
    # every mention carries its span, the text it matched and the concept's name
    m = concepts.annotate_note(cat, "n1", "Known asthma.")[0]
    assert (m.note_id, m.text, m.name, "Known asthma."[m.start:m.end]) == ("n1", "asthma", "Asthma", "asthma")


@pytest.mark.parametrize(("sentence", "code", "status"), [
    # negated: no event
    ("No evidence of pneumonia.", PNA, "negated"),
    ("Patient denies chest pain, fever or pneumonia.", PNA, "negated"),
    ("Negative for diabetes.", DM, "negated"),
    ("Pneumonia was ruled out by chest CT.", PNA, "negated"),
    ("She has no history of asthma.", ASTHMA, "negated"),
    ("Without chest pain at rest.", CP, "negated"),
    # someone else: no event
    ("Mother had breast cancer.", BRCA, "family"),
    ("Family history of diabetes.", DM, "family"),
    ("FAMILY HISTORY:, Father with myocardial infarction at 50. SOCIAL HISTORY:, nonsmoker.", MI, "family"),
    ("Diabetes runs in the family.", DM, "family"),
    # hypothetical: no event
    ("Possible pneumonia.", PNA, "hypothetical"),
    ("Rule out myocardial infarction.", MI, "hypothetical"),
    ("r/o pneumonia", PNA, "hypothetical"),
    ("Return if chest pain recurs.", CP, "hypothetical"),
    # the past: an event before the note
    ("History of asthma.", ASTHMA, "historical"),
    ("h/o heart attack", MI, "historical"),
    ("Status post myocardial infarction.", MI, "historical"),
    ("PAST MEDICAL HISTORY:, Significant for hypertension. PLAN:, follow up.", HTN, "historical"),
    ("# History of Present Illness\nPatient has a history of asthma.", ASTHMA, "historical"),
    # affirmed now
    ("Patient is presenting with pneumonia.", PNA, "current"),
    ("The patient is a 71-year-old woman with pneumonia.", PNA, "current"),
    ("History of asthma, now presenting with pneumonia.", PNA, "current"),
    ("Denies fever but reports chest pain.", CP, "current"),
    ("No increase in pneumonia.", PNA, "current"),  # a pseudo-trigger, not a negation
    # a trigger inside a concept's own name modifies nothing
    ("Presenting with history of appendectomy, pneumonia.", HX_APPY, "current"),
    ("Presenting with history of appendectomy, pneumonia.", PNA, "current"),
    ("Presenting with suspected COVID-19, pneumonia.", SUSP_COVID, "current"),
    ("Presenting with suspected COVID-19, pneumonia.", PNA, "current"),
])
def test_context_of_specific_sentences(cat, sentence, code, status):
    assert _codes(cat, sentence).get(code) == status


@pytest.mark.shared_data
@pytest.mark.skipif(not TOY_PACK.exists(), reason=f"{TOY_PACK} not found (../shared/data is absent)")
def test_a_medcat_pack_from_elsewhere_loads_unchanged():
    """CogStack's toy v2 pack: a read-only .zip, no model card, a spaCy config (spaCy is not installed here)."""
    cat = concepts.load_pack(TOY_PACK)
    assert _codes(cat, "Patient with kidney failure, no diabetes.") == {"NOTE//CUI//C01": "current",
                                                                       "NOTE//CUI//C02": "negated"}
    m = concepts.annotate_note(cat, "t", "kidney failure", vocab="snomed-ct")[0]
    assert m.code == "NOTE//SNOMED//C01"  # --vocab names the vocabulary of a pack that does not


def test_meta_annotations_take_precedence_over_rules():
    ma = concepts.context_from_meta_anns
    assert ma({"Presence": {"value": "True"}, "Experiencer": {"value": "Family"}}) == {"family"}
    assert ma({"Presence": {"value": "Hypothetical (N/A)"}}) == {"hypothetical"}
    assert ma({"Time": {"value": "Recent"}}) == frozenset()  # known task, nothing to exclude
    assert ma({"Sentiment": {"value": "x"}}) is None  # unknown tasks: the rules decide


def test_context_scored_against_human_labels(tmp_path):
    text = "No evidence of pneumonia. Known asthma. Mother had breast cancer."
    anns = [{"start": 15, "end": 24, "value": "pneumonia", "status": "Other"},
            {"start": 32, "end": 38, "value": "asthma", "status": "Other"},       # we say current: an error
            {"start": 51, "end": 64, "value": "breast cancer", "status": "Confirmed"}]
    export = {"projects": [{"documents": [{"text": text, "annotations": [
        {"start": a["start"], "end": a["end"], "value": a["value"], "cui": "x",
         "meta_anns": [{"name": "Status", "value": a["status"]}]} for a in anns]}]}]}
    (tmp_path / "export.json").write_text(json.dumps(export))
    r = concepts.evaluate_context(tmp_path / "export.json")
    assert r["annotations"] == 3 and r["other"] == 2
    assert r["assertion"] == {"accuracy": 0.667, "other_precision": 1.0, "other_recall": 0.5, "other_f1": 0.667}
    assert r["exclusion"]["accuracy"] == 0.333  # family counts as "Other" there; the label said Confirmed
    assert r["confusion"] == {"Confirmed -> family": 1, "Other -> current": 1, "Other -> negated": 1}
    assert [e["mention"] for e in r["errors"]] == ["asthma"]


def test_dictionary_formats_and_vocabularies(tmp_path):
    icd10 = tmp_path / "icd10cm-order.csv"
    icd10.write_text('code,billable,short,long\nA00,0,Cholera,Cholera\nA009,1,"Cholera, unspecified",'
                     '"Cholera, unspecified"\nI10,1,Essential (primary) hypertension,Essential (primary) '
                     'hypertension\n')
    cat = concepts.load_pack(concepts.build_pack([icd10], tmp_path / "icd.zip").pack)  # a single .zip pack
    # "Cholera, unspecified" gives no synonym "cholera": the category A00 owns that title
    assert _codes(cat, "Cholera outbreak; essential hypertension.") == {"NOTE//ICD10CM//A00": "current",
                                                                        "NOTE//ICD10CM//I10": "current"}
    assert _codes(cat, "cholera, unspecified") == {"NOTE//ICD10CM//A009": "current"}

    mimic = tmp_path / "d_icd_diagnoses.csv"
    mimic.write_text("icd_code,icd_version,long_title\n4019,9,Unspecified essential hypertension\n"
                     "J189,10,\"Pneumonia, unspecified organism\"\n")
    cat = concepts.load_pack(concepts.build_pack([mimic], tmp_path / "mimic_pack").pack)
    # two vocabularies in one pack: the cui keeps its vocabulary, the code says it
    assert _codes(cat, "essential hypertension and pneumonia") == {"NOTE//ICD9CM//4019": "current",
                                                                   "NOTE//ICD10CM//J189": "current"}

    synthea = tmp_path / "conditions.csv"
    synthea.write_text("START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION\n2019-01-01,,p,e,36971009,Sinusitis "
                       "(disorder)\n2019-01-01,,p,e,80583007,Severe anxiety (panic) (finding\n")
    cat = concepts.load_pack(concepts.build_pack([synthea], tmp_path / "syn_pack").pack)
    assert _codes(cat, "Sinusitis and severe anxiety.") == {"NOTE//SNOMED//36971009": "current",
                                                            "NOTE//SNOMED//80583007": "current"}

    bad = tmp_path / "whatever.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(concepts.PackError, match="unknown dictionary format"):
        concepts.read_dictionary(bad)
    with pytest.raises(concepts.PackError, match="not a MedCAT model pack"):
        (tmp_path / "occupied").mkdir()
        (tmp_path / "occupied" / "keep.txt").write_text("mine")
        concepts.build_pack([synthea], tmp_path / "occupied")


def test_unsupervised_training_disambiguates_a_shared_name(tmp_path):
    """'cold' names two concepts: untrained, MedCAT cannot link it; trained on notes that use the concepts'
    unambiguous names, it picks the right one from the context."""
    d = tmp_path / "cold.csv"
    d.write_text("cui,name,ontologies,name_status\n82272006,common cold|coryza,SNOMED,P\n82272006,cold,SNOMED,A\n"
                 "703421000,cold sensation|feeling cold,SNOMED,P\n703421000,cold,SNOMED,A\n")
    rng = random.Random(0)
    virus = ["runny nose", "sneezing", "sore throat", "viral", "congestion", "cough", "rhinovirus", "nasal"]
    temp = ["shivering", "room temperature", "blanket", "hands", "winter", "freezing", "thermostat", "chills"]
    texts = []
    for _ in range(60):
        v, t = rng.sample(virus, 4), rng.sample(temp, 4)
        texts.append(f"Patient with {v[0]} and {v[1]} for days, diagnosed with common cold, {v[2]} and {v[3]}.")
        texts.append(f"Patient reports {t[0]} and {t[1]}, describes feeling cold, {t[2]} and {t[3]} at home.")
    virus_text = "Two days of sneezing, runny nose and a cold with sore throat."
    temp_text = "She is shivering, her hands are cold in the winter room."
    untrained = concepts.load_pack(concepts.build_pack([d], tmp_path / "p0").pack)
    assert _codes(untrained, virus_text) == {} and _codes(untrained, temp_text) == {}
    seen: list[tuple[int, int]] = []
    summary = concepts.build_pack([d], tmp_path / "p1", train_texts=texts, epochs=2,
                                  progress=lambda done, total: seen.append((done, total)))
    assert summary.training_notes == 120 and summary.trained_concepts == 2
    assert seen[-1] == (240, 240)  # both epochs ran (MedCAT would run a generator once)
    trained = concepts.load_pack(summary.pack)
    assert _codes(trained, virus_text) == {"NOTE//SNOMED//82272006": "current"}
    assert _codes(trained, temp_text) == {"NOTE//SNOMED//703421000": "current"}


def test_multiprocess_annotation_matches_in_process(cat, pack):
    texts = [(f"n{i}", s) for i, s in enumerate(
        ["No evidence of pneumonia.", "Type 2 diabetes.", "", "Mother had breast cancer. History of asthma."] * 5)]
    one = dict(concepts.annotate(cat, texts, n_process=1, batch_chars=60))
    # a worker that loads the pack from disk, and this process; then two workers that get the pack pickled
    two = dict(concepts.annotate(cat, texts, n_process=2, batch_chars=60, pack_path=pack))
    three = dict(concepts.annotate(cat, texts, n_process=3, batch_chars=60))
    assert one == two == three and set(one) == {t[0] for t in texts}
    assert [(m.code, m.status) for m in one["n3"]] == [(BRCA, "family"), (ASTHMA, "historical")]


def test_long_notes_are_chunked_without_losing_offsets():
    text = ("Patient denies chest pain. " * 9000) + "Now pneumonia."
    chunks = concepts.split_long(text, 50_000)
    assert "".join(c for _, c in chunks) == text and all(len(c) <= 50_000 for _, c in chunks)
    assert all(text[off:off + len(c)] == c for off, c in chunks)
    rules = ContextRules()
    assert rules.classify(text, [(len(text) - 10, len(text) - 1)]) == [frozenset()]


# --- the warehouse load ---------------------------------------------------------------------------------------


@pytest.fixture
def mimic_db(tiny_mimic: Path, tmp_path: Path) -> Path:
    """A warehouse that knows subjects 1, 2 and 3 (the tiny MIMIC fixture)."""
    db = tmp_path / "w.duckdb"
    with warehouse.connect(db) as con:
        sources.load("mimic-iv", con, tiny_mimic)
    return db


def _write_notes(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["subject_id", "time", "note_id", "text"])
        w.writerows(rows)
    return path


def _load_notes(db: Path, input_path: Path, pack: Path, **kw) -> warehouse.LoadSummary:
    with warehouse.connect(db) as con:
        return sources.load("notes", con, input_path, model_pack=pack, **kw)


def _q(db: Path, sql: str, params=None) -> list[tuple]:
    with warehouse.connect(db, read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def test_notes_load_events_context_timing_lineage(mimic_db, pack, tmp_path, monkeypatch):
    monkeypatch.setattr(notes, "PAGE_NOTES", 3)  # several pages of notes through one annotation run
    src = _write_notes(tmp_path / "notes.csv", [
        (1, "2150-05-03 10:00:00", "a", "Patient is presenting with pneumonia. No evidence of diabetes. "
                                        "Pneumonia again. History of asthma."),
        (1, "2150-05-04", "b", "Mother had breast cancer. Family history of diabetes."),
        (2, "2160-01-11 09:00:00", "c", "Rule out pneumonia. Denies chest pain."),
        (2, "2160-01-11 10:00:00", "d", "Nothing to code here."),
    ])
    s = _load_notes(mimic_db, src, pack)
    assert (s.rows_read, s.rows_loaded, s.rows_quarantined, s.rows_dropped) == (4, 1, 0, 3)
    assert s.dropped_reasons == {"notes: every concept mention negated, hypothetical or about family": 2,
                                 "notes: no concept found": 1}
    ev = _q(mimic_db, "SELECT subject_id, time, code FROM events WHERE source = 'notes' ORDER BY time")
    # one event per concept per note (pneumonia twice in note a -> once); negated/family/hypothetical -> none;
    # "history of asthma" a day before the note, the current concept at the note's time
    assert ev == [(1, datetime(2150, 5, 2, 10), ASTHMA), (1, datetime(2150, 5, 3, 10), PNA)]
    assert dict(_q(mimic_db, "SELECT code, description FROM codes WHERE code LIKE 'NOTE//%'")) == {
        ASTHMA: "Asthma", PNA: "Pneumonia"}
    run = _q(mimic_db, "SELECT run_id, source_kind, input_checksums FROM etl_runs WHERE source = 'notes'")
    assert len(run) == 1 and run[0][1] == "notes"
    checks = json.loads(run[0][2])
    assert any(k.endswith("notes.csv") for k in checks) and "model pack small_pack" in checks
    with warehouse.connect(mimic_db, read_only=True) as con:
        assert warehouse.reconcile(con, run[0][0])["rows_read"] == 4
    # idempotent: a re-run replaces its own rows, the MIMIC rows are untouched
    before = _q(mimic_db, "SELECT count(*) FROM events WHERE source = 'mimic-iv'")
    _load_notes(mimic_db, src, pack)
    assert _q(mimic_db, "SELECT count(*) FROM events WHERE source = 'notes'") == [(2,)]
    assert _q(mimic_db, "SELECT count(*) FROM events WHERE source = 'mimic-iv'") == before


def test_bad_notes_are_quarantined_or_dropped_never_lost(mimic_db, pack, tmp_path, monkeypatch):
    big = ("Routine follow up without complaints. " * 27_000) + "Assessment: pneumonia."
    assert len(big) > 1_000_000
    path = tmp_path / "notes.csv"
    _write_notes(path, [
        (1, "2150-05-03 10:00:00", "empty", ""),
        (1, "2150-05-03 11:00:00", "blank", "   \n  "),
        (1, "2150-05-03 12:00:00", "big", big),
        (99, "2150-05-03 12:00:00", "stranger", "Pneumonia."),
        ("x7", "2150-05-03 12:00:00", "not-an-id", "Pneumonia."),
        (1, "not a time", "badtime", "Pneumonia."),
        (1, "1900-01-01 00:00:00", "unborn", "Pneumonia."),
        (2, "2160-01-11 09:00:00", "ok", "Hypertension."),
        (2, "2160-01-11 09:00:00", "ok", "Hypertension."),
    ])
    with open(path, "ab") as fh:  # a row whose text is not UTF-8 (Latin-1 bytes)
        fh.write(b'2,2160-01-11 09:00:00,latin,"Fi\xe8vre et pneumonie"\r\n')
    s = _load_notes(mimic_db, path, pack)
    assert s.rows_read == 10 == s.rows_loaded + s.rows_quarantined + s.rows_dropped
    assert (s.rows_loaded, s.rows_quarantined, s.rows_dropped) == (2, 5, 3)
    assert s.dropped_reasons == {"notes: empty note": 2,
                                 "notes: duplicate note (same subject, note_id and text as an earlier row)": 1}
    # physical lines: the "blank" note's quoted line break makes it lines 3-4, so later rows sit one line lower
    q = dict(_q(mimic_db, "SELECT row_number, reason FROM quarantine WHERE source = 'notes'"))
    assert q[6].startswith("unknown subject") and q[7].startswith("unknown subject")
    assert q[8] == "unparseable time: not a time"
    assert q[9].startswith("time before birth")
    assert "INVALID ENCODING" in q[12] or "utf-8" in q[12].lower()
    # the 1 MB note was annotated in chunks: the concept at its very end is found
    assert _q(mimic_db, "SELECT code FROM events WHERE source = 'notes' AND subject_id = 1") == [(PNA,)]
    # a note over the size limit is quarantined with the limit named, not annotated
    monkeypatch.setenv("FORESIGHT_NOTES_MAX_CHARS", "500000")
    s = _load_notes(mimic_db, path, pack)
    assert s.rows_quarantined == 6 and s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_dropped
    q = dict(_q(mimic_db, "SELECT row_number, reason FROM quarantine WHERE source = 'notes'"))
    assert "over the limit of 500000" in q[5]


def test_parquet_notes_with_non_utf8_bytes(mimic_db, pack, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "notes.parquet"
    pq.write_table(pa.table({
        "subject_id": pa.array([3, 3], pa.int64()),
        "charttime": pa.array([datetime(2171, 3, 2), datetime(2171, 3, 2)], pa.timestamp("us")),
        "text": pa.array([b"History of hypertension.", b"pneumonia \xff\xfe"], pa.binary()),
    }), path)
    s = _load_notes(mimic_db, path, pack)
    assert (s.rows_read, s.rows_loaded, s.rows_quarantined) == (2, 1, 1)
    assert _q(mimic_db, "SELECT reason FROM quarantine WHERE source = 'notes'") == [("text is not valid UTF-8",)]
    assert _q(mimic_db, "SELECT time, code FROM events WHERE source = 'notes'") == [(datetime(2171, 3, 1), HTN)]


def test_fhir_notes_from_the_warehouse(pack, tmp_path):
    """DocumentReference text loaded by `etl fhir` is annotated from the warehouse's own notes table."""
    text = "Patient is presenting with pneumonia. Mother had breast cancer. History of hypertension."
    patient = {"resourceType": "Patient", "id": "pa-1", "gender": "female", "birthDate": "1980-02-01"}
    enc = {"resourceType": "Encounter", "id": "enc-1", "status": "finished", "class": {"code": "AMB"},
           "subject": {"reference": "urn:uuid:pa-1"},
           "period": {"start": "2019-03-01T09:00:00Z", "end": "2019-03-01T10:00:00Z"}}
    doc = {"resourceType": "DocumentReference", "id": "doc-1", "status": "current",
           "subject": {"reference": "urn:uuid:pa-1"}, "date": "2019-03-01T09:00:00Z",
           "type": {"coding": [{"system": "http://loinc.org", "code": "34117-2"}]},
           "content": [{"attachment": {"contentType": "text/plain",
                                       "data": base64.b64encode(text.encode()).decode()}}],
           "context": {"encounter": [{"reference": "urn:uuid:enc-1"}],
                       "period": {"end": "2019-03-01T10:00:00Z"}}}
    root = tmp_path / "fhir"
    root.mkdir()
    (root / "a.json").write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in (patient, enc, doc)]}))
    db = tmp_path / "w.duckdb"
    with warehouse.connect(db) as con:
        sources.load("fhir", con, root)
    s = _load_notes(db, db, pack)  # --input is the warehouse itself
    assert (s.rows_read, s.rows_loaded) == (1, 1)
    ev = _q(db, "SELECT time, code, encounter_id FROM events WHERE source = 'notes' ORDER BY time")
    assert ev == [(datetime(2019, 2, 28, 10), HTN, "enc-1"), (datetime(2019, 3, 1, 10), PNA, "enc-1")]
    subject = _q(db, "SELECT DISTINCT subject_id FROM events WHERE source = 'fhir'")
    assert _q(db, "SELECT DISTINCT subject_id FROM events WHERE source = 'notes'") == subject
    # the same notes read from another warehouse file (attached read-only)
    other = tmp_path / "other.duckdb"
    with warehouse.connect(other) as con:
        sources.load("fhir", con, root)
        s2 = sources.load("notes", con, db, model_pack=pack)
    assert s2.events == 2


def test_opted_out_subjects_notes_are_neither_annotated_nor_loaded(mimic_db, pack, tmp_path, monkeypatch):
    annotated: list[str] = []
    real = notes.annotate

    def spy(cat, pages, **kw):
        for line, text in pages:
            annotated.append(text)
            yield from real(cat, [(line, text)], **kw)

    monkeypatch.setattr(notes, "annotate", spy)
    src = _write_notes(tmp_path / "notes.csv", [
        (1, "2150-05-03 10:00:00", "a", "Pneumonia."),  # subject 1 opted out
        (2, "2160-01-11 09:00:00", "b", "Asthma."),
    ])
    s = _load_notes(mimic_db, src, pack, exclude_subjects=[1])
    assert (s.rows_read, s.rows_loaded) == (2, 1)
    assert sum(v for k, v in s.dropped_reasons.items() if k.endswith(OPT_OUT_REASON)) == 1
    assert annotated == ["Asthma."]
    assert _q(mimic_db, "SELECT subject_id, code FROM events WHERE source = 'notes'") == [(2, ASTHMA)]


def test_missing_pack_and_bad_input_are_clear_errors(mimic_db, pack, tmp_path, monkeypatch):
    src = _write_notes(tmp_path / "n.csv", [(1, "2150-05-03", "a", "Pneumonia.")])
    monkeypatch.delenv("FORESIGHT_MODEL_PACK", raising=False)
    with warehouse.connect(mimic_db) as con:
        with pytest.raises(warehouse.SourceError, match="MedCAT model pack"):
            sources.load("notes", con, src)
        with pytest.raises(warehouse.SourceError, match="model pack not found"):
            sources.load("notes", con, src, model_pack=tmp_path / "nope")
        (tmp_path / "x.txt").write_text("hello")
        with pytest.raises(warehouse.SourceError, match="not a notes file"):
            sources.load("notes", con, tmp_path / "x.txt", model_pack=tmp_path / "nope")
        (tmp_path / "notime.csv").write_text("subject_id,text\n1,Pneumonia\n")
        with pytest.raises(warehouse.SourceError, match="no time column"):
            sources.load("notes", con, tmp_path / "notime.csv", model_pack=pack)
    assert _q(mimic_db, "SELECT count(*) FROM events WHERE source = 'notes'") == [(0,)]


# --- CLI and flow ---------------------------------------------------------------------------------------------




def test_cli_build_then_etl_notes(mimic_db, tmp_path):
    (tmp_path / "concepts.csv").write_text(DICTIONARY)
    src = _write_notes(tmp_path / "notes.csv", [
        (1, "2150-05-03 10:00:00", "a", "Presenting with pneumonia. No evidence of asthma."),
        (2, "2160-01-11 09:00:00", "b", "Hypertension. Hypertension is stable. Diabetes."),
    ])
    pack = tmp_path / "cli_pack"
    r = run_cli("concepts", "build", "--dictionary", str(tmp_path / "concepts.csv"), "--out", str(pack),
             "--train-on", str(src), "--json")
    assert r.returncode == 0, r.stderr
    built = json.loads(r.stdout.strip().splitlines()[-1])
    assert built["pack"] == str(pack) and built["concepts"] == 10 and built["training_notes"] == 2
    r = run_cli("etl", "notes", "--input", str(src), "--db", str(mimic_db), "--model-pack", str(pack), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["events_by_kind"] == {"NOTE": 3} and out["rows_read"] == 2
    assert out["mentions_by_status"] == {"current": 4, "negated": 1}
    r = run_cli("concepts", "annotate", "--model-pack", str(pack), "--text", "Mother had asthma.", "--json")
    assert json.loads(r.stdout.strip().splitlines()[-1])["mentions"][0]["status"] == "family"
    r = run_cli("etl", "notes", "--input", str(src), "--db", str(mimic_db), "--model-pack", str(tmp_path / "none"))
    assert r.returncode == 2 and "model pack not found" in r.stderr


def test_prefect_etl_flow_runs_the_notes_source(mimic_db, pack, tmp_path, monkeypatch, prefect_server):

    from flows.etl import etl

    src = _write_notes(tmp_path / "notes.csv", [(1, "2150-05-03 10:00:00", "a", "Pneumonia and asthma.")])
    monkeypatch.setenv("FORESIGHT_MODEL_PACK", str(pack))  # the flow passes only the input path
    state = etl(source="notes", input=src, db=mimic_db, return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["events"] == 2 and summary["reconciliation"]["rows_read"] == 1


def test_notes_of_subjects_mapped_by_uuid(pack, tmp_path):
    """A CSV may name FHIR/Synthea patients by their UUID: subject_map resolves it."""
    root = tmp_path / "csv"
    root.mkdir()
    (root / "patients.csv").write_text("Id,BIRTHDATE,GENDER\n5b873911-2d32-cc75-2e2f-e6ad79df3e28,1970-01-01,F\n")
    db = tmp_path / "w.duckdb"
    with warehouse.connect(db) as con:
        sources.load("synthea", con, root)
    when = (datetime(2020, 1, 1) + timedelta(hours=3)).isoformat()
    src = _write_notes(tmp_path / "n.csv", [("5B873911-2D32-CC75-2E2F-E6AD79DF3E28", when, "a", "Asthma.")])
    s = _load_notes(db, src, pack)
    assert s.rows_loaded == 1
    assert _q(db, "SELECT count(DISTINCT subject_id) FROM events") == [(1,)]
