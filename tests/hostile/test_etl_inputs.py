"""Hostile ETL inputs (issue 17, defects 6, 9, 10 and the ETL cases of 11): every input is built here at test time.

The class behind them: an input that is there but cannot be read must be an error naming it (never "table absent",
which replaces that table's earlier rows with nothing); a file the CSV reader chokes on gets quarantine with its
physical line number, or one clear error naming the file; a failing transaction reports its cause. Every test
checks the warehouse's earlier rows are all still there after a failure, and that successful loads balance.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from foresight import sources, warehouse

from ..conftest import load_into, rows, run_cli, write_csv_gz

ICU_COLS = ["subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime", "los"]
LAB_COLS = ["labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "charttime", "storetime", "value",
            "valuenum", "valueuom", "comments"]


def snapshot(db: Path) -> dict[str, object]:
    """What a failed load must not change: every row of events, quarantine and the run log, by content."""
    q = {
        "events": "SELECT count(*), sum(hash(subject_id, time, code, numeric_value, source_table)) FROM events",
        "by_table": "SELECT source_table, count(*) FROM events GROUP BY 1 ORDER BY 1",
        "quarantine": "SELECT count(*), sum(hash(source_file, row_number, reason)) FROM quarantine",
        "runs": "SELECT count(*) FROM etl_runs",
    }
    return {k: rows(db, sql) for k, sql in q.items()}


def balanced(s: warehouse.LoadSummary) -> None:
    assert s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_dropped
    for t in s.tables:
        assert t.rows_read == t.rows_loaded + t.rows_quarantined + t.rows_dropped, t


@pytest.fixture
def mimic(tiny_mimic: Path) -> Path:
    """The hand-written MIMIC-IV folder of conftest plus an ICU stay, so a lost icu/ shows as lost rows."""
    write_csv_gz(tiny_mimic / "icu" / "icustays.csv.gz", ICU_COLS, [
        [1, 101, 1001, "MICU", "MICU", "2150-05-02 00:00:00", "2150-05-03 00:00:00", "1.0"],
    ])
    return tiny_mimic


@pytest.fixture
def loaded(mimic: Path, tmp_path: Path) -> tuple[Path, Path, dict[str, object]]:
    """(input, warehouse, snapshot) after one good MIMIC-IV load."""
    db = tmp_path / "w.duckdb"
    balanced(load_into("mimic-iv", mimic, db))
    before = snapshot(db)
    assert dict(before["by_table"])["labevents"] == 2 and dict(before["by_table"])["icustays"] >= 1
    return mimic, db, before


# --- defect 6: present but unreadable is an error, never "absent" ----------------------------------------------


def dangling(p: Path) -> None:
    _remove(p)
    p.symlink_to(p.parent / "moved-away.csv.gz")


def loop(p: Path) -> None:
    _remove(p)
    p.symlink_to(p.name)  # a link to itself


def directory(p: Path) -> None:
    _remove(p)
    p.mkdir()


def fifo(p: Path) -> None:
    _remove(p)
    os.mkfifo(p)


def a_file(p: Path) -> None:
    _remove(p)
    p.write_text("not a folder")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        for child in p.iterdir():
            child.unlink()
        p.rmdir()
    else:
        p.unlink()


def case(rel: str, damage: Callable[[Path], None], why: str, *marks: pytest.MarkDecorator) -> object:
    return pytest.param(rel, damage, why, id=f"{rel}-{damage.__name__}", marks=marks)


MIMIC_BREAKS = [
    case("hosp/labevents.csv.gz", dangling, "broken symbolic link"),
    case("hosp/labevents.csv.gz", loop, "symbolic link loop"),
    case("hosp/labevents.csv.gz", directory, "a directory where a file is expected"),
    case("hosp/labevents.csv.gz", fifo, "not a regular file", pytest.mark.timeout(120)),  # a FIFO blocks a reader
    case("icu", loop, "symbolic link loop"),
    case("icu", a_file, "a file where a folder is expected"),
    case("hosp/d_icd_diagnoses.csv.gz", dangling, "broken symbolic link"),  # a dictionary: descriptions lost
    case("hosp/patients.csv.gz", dangling, "broken symbolic link"),  # required: say why, not "missing"
]


@pytest.mark.parametrize(("rel", "damage", "why"), MIMIC_BREAKS)
def test_unreadable_mimic_input_is_an_error_and_keeps_the_warehouse(loaded, rel, damage, why):
    root, db, before = loaded
    damage(root / rel)
    with pytest.raises(warehouse.SourceError) as err:
        load_into("mimic-iv", root, db)
    assert str(root / rel) in str(err.value) and why in str(err.value)
    assert snapshot(db) == before


def _synthea(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "patients.csv").write_text("Id,BIRTHDATE,GENDER\np1,1980-02-01,F\np2,1970-01-01,M\n")
    (root / "conditions.csv").write_text("START,PATIENT,CODE\n2019-03-01,p1,44054006\n2019-04-01,p2,38341003\n")
    return root


def _fhir(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    for i, pid in enumerate(("pa-1", "pb-2", "pc-3")):
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1980-02-01"}},
            {"resource": {"resourceType": "Condition", "id": f"c{i}", "subject": {"reference": f"Patient/{pid}"},
                          "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                          "onsetDateTime": "2019-03-01T01:00:00Z"}}]}
        (root / ("sub" if i == 2 else ".") / f"{pid}.json").write_text(json.dumps(bundle))
    return root


def _meds(root: Path) -> Path:
    (root / "data" / "more").mkdir(parents=True)
    for i, name in enumerate(("0.parquet", "more/1.parquet")):
        pq.write_table(pa.table({
            "subject_id": pa.array([i + 1, i + 1], pa.int64()),
            "time": pa.array([datetime(1980, 1, 1), datetime(2019, 3, 1)], pa.timestamp("us")),
            "code": pa.array(["MEDS_BIRTH", "DX//ICD10CM//I10"]),
            "numeric_value": pa.array([None, None], pa.float32()),
        }), root / "data" / name)
    return root


OTHER_BREAKS = [
    ("synthea", _synthea, "conditions.csv", dangling, "broken symbolic link"),
    ("synthea", _synthea, "conditions.csv", directory, "a directory where a file is expected"),
    ("fhir", _fhir, "pb-2.json", dangling, "broken symbolic link"),  # was skipped: its patient deleted
    ("fhir", _fhir, "sub", loop, "symbolic link loop"),
    ("meds", _meds, "data/more/1.parquet", dangling, "broken symbolic link"),
    ("meds", _meds, "data/more", loop, "symbolic link loop"),
    ("meds", _meds, "metadata", loop, "symbolic link loop"),  # metadata/codes.parquet: descriptions lost
]


@pytest.mark.parametrize(("kind", "make", "rel", "damage", "why"), OTHER_BREAKS,
                         ids=[f"{k}-{r}-{d.__name__}" for k, _, r, d, _ in OTHER_BREAKS])
def test_unreadable_input_of_every_source_is_an_error(tmp_path, kind, make, rel, damage, why):
    root, db = make(tmp_path / kind), tmp_path / "w.duckdb"
    balanced(load_into(kind, root, db))
    before = snapshot(db)
    if not (root / rel).exists():
        (root / rel).mkdir()
    damage(root / rel)
    with pytest.raises(warehouse.SourceError) as err:
        load_into(kind, root, db)
    assert str(root / rel) in str(err.value) and why in str(err.value)
    assert snapshot(db) == before


def test_cli_unreadable_inputs_exit_2_with_one_line_naming_the_path(loaded):
    root, db, before = loaded
    labs = root / "hosp" / "labevents.csv.gz"
    good = labs.read_bytes()
    dangling(labs)
    proc = run_cli("etl", "mimic-iv", "--input", str(root), "--db", str(db))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(root / "hosp" / "labevents.csv.gz") in errors[0]
    assert "broken symbolic link" in errors[0]
    labs.unlink()
    labs.write_bytes(good)
    loop(root / "icu")
    proc = run_cli("etl", "mimic-iv", "--input", str(root), "--db", str(db))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {root / 'icu'}: cannot be read: symbolic link loop" in proc.stderr
    assert snapshot(db) == before


# --- defect 9: CSV and gzip damage is quarantine or one clear error, never a traceback --------------------------


def rewrite_labs(root: Path, *, name: str = "labevents.csv.gz", newline: str = "\n", after: bytes = b"") -> Path:
    """Rewrite the tiny labevents with other line endings, or as plain CSV, or with bytes after the gzip stream."""
    old = root / "hosp" / "labevents.csv.gz"
    with gzip.open(old, "rt", newline="") as fh:
        table = list(csv.reader(fh))
    buf = io.StringIO()
    csv.writer(buf, lineterminator=newline).writerows(table)
    data = buf.getvalue().encode()
    old.unlink()
    path = root / "hosp" / name
    path.write_bytes((gzip.compress(data) if name.endswith(".gz") else data) + after)
    return path


def lab_quarantine(db: Path) -> dict[int, str]:
    return dict(rows(db, "SELECT row_number, reason FROM quarantine WHERE source_file LIKE 'hosp/labevents%'"))


@pytest.mark.parametrize("name", ["labevents.csv.gz", "labevents.csv"])
def test_cr_only_line_endings_load_like_lf(mimic, tmp_path, name):
    lf = tmp_path / "lf.duckdb"
    balanced(load_into("mimic-iv", mimic, lf))
    rewrite_labs(mimic, name=name, newline="\r")
    cr = tmp_path / "cr.duckdb"
    s = load_into("mimic-iv", mimic, cr)
    balanced(s)
    assert {t.table: t.rows_read for t in s.tables}["labevents"] == 5
    assert snapshot(cr)["events"] == snapshot(lf)["events"]
    assert lab_quarantine(cr) == lab_quarantine(lf) and set(lab_quarantine(cr)) == {4, 5, 6}


def test_cr_only_synthea_and_mixed_line_endings(tmp_path):
    root, db = _synthea(tmp_path / "synthea"), tmp_path / "w.duckdb"
    for f in ("patients.csv", "conditions.csv"):
        (root / f).write_bytes((root / f).read_bytes().replace(b"\n", b"\r"))
    s = load_into("synthea", root, db)
    balanced(s)
    assert {t.table: t.rows_loaded for t in s.tables}["conditions"] == 2
    before = snapshot(db)
    # LF header, then CR and LF mixed: no reader can tell the rows apart; one error naming the file
    (root / "conditions.csv").write_bytes(b"START,PATIENT,CODE\n2019-03-01,p1,1\r2019-04-01,p2,2\n2019-05-01,p2,3\n")
    with pytest.raises(warehouse.SourceError) as err:
        load_into("synthea", root, db)
    assert str(err.value).startswith(f"{root / 'conditions.csv'}: cannot be read as CSV: ")
    assert "\n" not in str(err.value)
    assert snapshot(db) == before


@pytest.mark.parametrize("after", [b"garbage after the stream", b"\0" * 512], ids=["garbage", "zero-padding"])
def test_bytes_after_the_gzip_stream_are_quarantined_and_every_row_kept(mimic, tmp_path, after):
    good = tmp_path / "good.duckdb"
    balanced(load_into("mimic-iv", mimic, good))
    rewrite_labs(mimic, after=after)
    db = tmp_path / "w.duckdb"
    s = load_into("mimic-iv", mimic, db)
    balanced(s)
    labs = {t.table: t for t in s.tables}["labevents"]
    assert (labs.rows_read, labs.rows_loaded, labs.rows_quarantined) == (6, 2, 4)
    assert snapshot(db)["events"] == snapshot(good)["events"]
    q = lab_quarantine(db)
    assert q[7].startswith(f"bytes after the end of the gzip stream ({len(after)} byte(s) that are not gzip)")


def test_bytes_after_a_gzip_stream_without_a_final_line_break(tmp_path):
    root, db = _synthea(tmp_path / "synthea"), tmp_path / "w.duckdb"
    text = (root / "conditions.csv").read_bytes().rstrip(b"\n")
    (root / "conditions.csv").unlink()
    (root / "conditions.csv.gz").write_bytes(gzip.compress(text) + b"PK\x03\x04junk")
    s = load_into("synthea", root, db)
    balanced(s)
    cond = {t.table: t for t in s.tables}["conditions"]
    assert (cond.rows_loaded, cond.rows_quarantined) == (2, 1)  # the last row is whole; the junk is quarantined
    assert rows(db, "SELECT row_number FROM quarantine WHERE source_file = 'conditions.csv.gz'") == [(4,)]


def test_a_truncated_gzip_still_loads_the_rows_before_the_damage(mimic, tmp_path):
    path = rewrite_labs(mimic)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 12])  # the trailer and some data gone
    s = load_into("mimic-iv", mimic, tmp_path / "w.duckdb")
    balanced(s)
    reasons = lab_quarantine(tmp_path / "w.duckdb").values()
    assert any(r.startswith("truncated gzip stream") for r in reasons)


# --- defect 10: a full disk reports its cause; the failed rollback does not mask it ----------------------------


class FullDisk:
    """A warehouse connection whose disk fills up at the first statement starting with ``trigger``: DuckDB aborts
    the transaction itself and the statement fails with an I/O error, as it does on a real full disk."""

    def __init__(self, con: duckdb.DuckDBPyConnection, trigger: str) -> None:
        self.con, self.trigger = con, trigger

    def execute(self, query: object, *args: object, **kw: object) -> object:
        if isinstance(query, str) and query.lstrip().startswith(self.trigger):
            self.con.execute("ROLLBACK")
            raise duckdb.IOException('IO Error: Could not write to file "w.duckdb.wal": No space left on device')
        return self.con.execute(query, *args, **kw)

    def __getattr__(self, name: str) -> Callable[..., object]:
        return getattr(self.con, name)


@pytest.mark.parametrize("trigger", ["INSERT INTO events", "INSERT INTO etl_runs", "COMMIT"])
def test_disk_full_during_publish_reports_its_cause_and_keeps_the_warehouse(loaded, trigger):
    root, db, before = loaded
    with warehouse.connect(db) as con, pytest.raises(duckdb.IOException) as err:
        sources.load("mimic-iv", FullDisk(con, trigger), root)
    assert "No space left on device" in str(err.value)
    assert "cannot rollback" not in str(err.value)
    assert any("rollback after it also failed" in n for n in getattr(err.value, "__notes__", []))
    assert snapshot(db) == before


# --- defect 11 (ETL): physical line numbers, a real reason for an over-long line, x.csv beside x.csv.gz ----------


def lines_of(*records: list[object], blank_after: tuple[int, ...] = ()) -> bytes:
    """CSV text of ``records``, with a blank line after the records whose index is in ``blank_after``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for i, r in enumerate(records):
        w.writerow(r)
        if i in blank_after:
            buf.write("\n")
    return buf.getvalue().encode()


def test_quarantine_lines_are_physical_after_quoted_newlines_and_blank_lines(mimic, tmp_path):
    (mimic / "hosp" / "labevents.csv.gz").unlink()
    t = "2150-05-01 11:00:00"
    data = lines_of(
        LAB_COLS,                                                                   # line 1
        [1, 1, 101, 11, 50912, t, "", "1.1", "1.1", "mg/dL", "two\nline comment"],  # lines 2-3, then blank 4
        [2, 1, 101, 11, 50931, "not a time", "", "NEG", "", "", ""],                # line 5: bad charttime
        [3, 1, 101, 11, 50931, t, "", "NEG", "", "", "", "extra field"],            # line 6, then blank 7
        [4, 1, 101, 11, 50912, t, "", "1.2", "1.2", "mg/dL", "a\nb\nc"],            # lines 8-10
        [5, 2, "", 13, 50912, "1900-01-01 00:00:00", "", "0.9", "0.9", "mg/dL", ""],  # line 11: before birth
        blank_after=(1, 3),
    )
    (mimic / "hosp" / "labevents.csv.gz").write_bytes(gzip.compress(data))
    db = tmp_path / "w.duckdb"
    s = load_into("mimic-iv", mimic, db)
    balanced(s)
    q = lab_quarantine(db)
    assert sorted(q) == [5, 6, 11]
    assert q[5] == "unparseable charttime: not a time" and q[11].startswith("time before birth")
    assert q[6].startswith("unparseable CSV row: TOO MANY COLUMNS")


def test_synthea_quarantine_lines_are_physical_too(tmp_path):
    root, db = _synthea(tmp_path / "synthea"), tmp_path / "w.duckdb"
    (root / "conditions.csv").write_bytes(lines_of(
        ["START", "PATIENT", "CODE", "DESCRIPTION"],
        ["2019-03-01", "p1", "44054006", "Diabetes,\nsecond line"],  # lines 2-3, then blank 4
        ["2019-04-01", "p2", "", "no code"],                         # line 5: missing CODE
        blank_after=(1,),
    ))
    balanced(load_into("synthea", root, db))
    assert rows(db, "SELECT row_number FROM quarantine WHERE source_file = 'conditions.csv'") == [(5,)]


def test_an_over_long_line_is_quarantined_with_a_real_reason(mimic, tmp_path):
    (mimic / "hosp" / "labevents.csv.gz").unlink()
    t = "2150-05-01 11:00:00"
    data = lines_of(LAB_COLS, [1, 1, 101, 11, 50912, t, "", "1.1", "1.1", "mg/dL", "x" * 2_100_000],
                    [2, 1, 101, 11, 50912, t, "", "1.2", "1.2", "mg/dL", ""])
    (mimic / "hosp" / "labevents.csv.gz").write_bytes(gzip.compress(data))
    db = tmp_path / "w.duckdb"
    balanced(load_into("mimic-iv", mimic, db))
    q = lab_quarantine(db)
    assert list(q) == [2] and "None" not in q[2]
    assert q[2].startswith("unparseable CSV row: LINE SIZE OVER MAXIMUM (Maximum line size of")


def test_csv_beside_csv_gz_reads_the_preferred_file_and_warns_naming_both(mimic, tmp_path):
    (mimic / "hosp" / "labevents.csv").write_text(",".join(LAB_COLS) + "\n")  # an emptied plain copy
    s = load_into("mimic-iv", mimic, tmp_path / "w.duckdb")
    assert {t.table: t.rows_read for t in s.tables}["labevents"] == 5  # the .csv.gz, as documented
    gz, plain = mimic / "hosp" / "labevents.csv.gz", mimic / "hosp" / "labevents.csv"
    assert f"{gz} and {plain} are both present: read labevents.csv.gz, ignored {plain}" in s.warnings
    root = _synthea(tmp_path / "synthea")
    (root / "conditions.csv.gz").write_bytes(gzip.compress(b"START,PATIENT,CODE\n"))
    s = load_into("synthea", root, tmp_path / "s.duckdb")
    assert {t.table: t.rows_read for t in s.tables}["conditions"] == 2  # Synthea writes .csv: it wins
    assert any(str(root / "conditions.csv.gz") in w and "both present" in w for w in s.warnings)
