"""The MEDS source: a round trip through `foresight export meds` gives identical events, splits and codes; schema
validation accepts compatible types and rejects what is not MEDS; bad rows are quarantined with shard and row."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from foresight import warehouse
from foresight.schema import split_of

from .conftest import cli_json, load_into, rows

CORE = "subject_id, time, code, numeric_value, text_value"


def test_round_trip_of_the_mimic_warehouse_is_identical(demo_db, tmp_path):
    """MIMIC demo warehouse -> `foresight export meds` -> `foresight etl meds` into a new warehouse."""
    out, db = tmp_path / "meds", tmp_path / "w.duckdb"
    exported = cli_json("export", "meds", "--db", str(demo_db), "--out", str(out), "--subjects-per-shard", "30")
    loaded = cli_json("etl", "meds", "--input", str(out), "--db", str(db))
    assert loaded["events"] == exported["events"] and loaded["subjects"] == 100 == exported["subjects"]
    assert loaded["rows_quarantined"] == 0 and loaded["rows_read"] == loaded["rows_loaded"] == loaded["events"]
    with warehouse.connect(db) as con:
        con.execute(f"ATTACH '{demo_db}' AS src (READ_ONLY)")
        diff = lambda a, b, cols: con.execute(  # noqa: E731
            f"SELECT count(*) FROM (SELECT {cols} FROM {a} EXCEPT ALL SELECT {cols} FROM {b})").fetchall()[0][0]
        assert diff("src.events", "events", CORE) == diff("events", "src.events", CORE) == 0
        assert diff("src.subject_splits", "subject_splits", "*") == 0
        assert diff("subject_splits", "src.subject_splits", "*") == 0
        used = "(SELECT code, description, parent_codes FROM {} WHERE code IN (SELECT code FROM src.events))"
        assert diff(used.format("src.codes"), used.format("codes"), "*") == 0
        shards = con.execute("SELECT count(*) FROM etl_runs, json_each(input_checksums) WHERE key LIKE 'data/%'"
                             ).fetchall()[0][0]
    assert shards == exported["shards"] == 4  # every shard's checksum is in the lineage


def _table(**cols: pa.Array) -> pa.Table:
    return pa.table(cols)


def _dataset(root: Path, tables: dict[str, pa.Table], splits: pa.Table | None = None) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name, t in tables.items():
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, root / "data" / name)
    if splits is not None:
        (root / "metadata").mkdir(exist_ok=True)
        pq.write_table(splits, root / "metadata" / "subject_splits.parquet")
    return root


def test_compatible_types_bad_rows_splits_and_units(tmp_path):
    t0 = datetime(2020, 1, 1)
    # shard 1 in MEDS v0.4 types; shard 2 in compatible ones (int32 ids, ns timestamps, float64, large_string,
    # a dictionary-encoded code) with an extra column and a unit
    a = _table(subject_id=pa.array([1, 1, 1, None, 2], pa.int64()),
               time=pa.array([None, t0, datetime(2021, 1, 1), t0, t0], pa.timestamp("us")),
               code=pa.array(["GENDER//F", "MEDS_BIRTH", "LAB//X", "LAB//X", None], pa.string()),
               numeric_value=pa.array([None, None, 1.5, None, None], pa.float32()),
               text_value=pa.array([None, None, None, None, None], pa.large_string()))
    b = _table(subject_id=pa.array([2, 2, 3, 3], pa.int32()),
               time=pa.array([datetime(2019, 5, 1), datetime(2019, 5, 2), datetime(2019, 1, 1), t0],
                             pa.timestamp("ns")),
               code=pa.array(["MEDS_BIRTH", "LAB//Y", "MEDS_BIRTH", "LAB//Z"]).dictionary_encode(),
               numeric_value=pa.array([None, float("nan"), None, 1e39], pa.float64()),
               text_value=pa.array([None, "high", None, None], pa.large_string()),
               unit=pa.array([None, "mg/dL", None, None], pa.string()),
               site=pa.array(["x"] * 4))
    # subject 2: born 2019-05-01 but with an event before (in shard 1: 2020 is after, fine); subject 3's LAB//Z
    # is 1e39 (no float32); a NaN value; a row without subject; a row without code
    c = _table(subject_id=pa.array([2], pa.int64()), time=pa.array([datetime(2018, 1, 1)], pa.timestamp("us")),
               code=pa.array(["LAB//EARLY"]))
    splits = _table(subject_id=pa.array([1, 2, 3], pa.int64()), split=pa.array(["held_out", "validation", "train"]))
    root = _dataset(tmp_path / "ds", {"1.parquet": a, "train/2.parquet": b, "train/3.parquet": c}, splits)
    db = tmp_path / "w.duckdb"
    s = load_into("meds", root, db)
    assert s.rows_read == 10 == s.rows_loaded + s.rows_quarantined
    q = {(f, r): why for f, r, why in rows(db, "SELECT source_file, row_number, reason FROM quarantine")}
    assert q == {
        ("data/1.parquet", 4): "missing subject_id",
        ("data/1.parquet", 5): "missing code",
        ("data/train/2.parquet", 2): "non-finite numeric_value: nan",
        ("data/train/2.parquet", 4): "numeric_value does not fit float32: 1e+39",
        ("data/train/3.parquet", 1): "time before MEDS_BIRTH (2019-05-01 00:00:00): 2018-01-01 00:00:00",
    }
    assert any("ignored non-MEDS column(s) ['site']" in w for w in s.warnings)
    assert any("validation" in w for w in s.warnings)
    events = rows(db, f"SELECT {CORE}, unit FROM events ORDER BY subject_id, time NULLS FIRST, code")
    assert events[0] == (1, None, "GENDER//F", None, None, None)
    assert (1, datetime(2021, 1, 1), "LAB//X", 1.5, None, None) in events
    # a subject's split from the dataset; an unknown split name falls back to the stable hash split
    splits_got = dict(rows(db, "SELECT subject_id, split FROM subject_splits"))
    assert splits_got[1] == "held_out" and splits_got[3] == "train"
    assert splits_got[2] == split_of(2)


def test_unit_column_is_kept(tmp_path):
    t = _table(subject_id=pa.array([7], pa.int64()), time=pa.array([datetime(2020, 1, 1)], pa.timestamp("us")),
               code=pa.array(["LAB//K"]), numeric_value=pa.array([4.2], pa.float32()), unit=pa.array(["mmol/L"]))
    db = tmp_path / "w.duckdb"
    load_into("meds", _dataset(tmp_path / "ds", {"0.parquet": t}), db)
    got = rows(db, "SELECT code, numeric_value::DOUBLE, unit FROM events")
    assert got == [("LAB//K", pytest.approx(4.2), "mmol/L")]


def test_not_meds_is_rejected_naming_the_path(tmp_path):
    db = tmp_path / "w.duckdb"
    with pytest.raises(warehouse.SourceError, match="not a folder"):
        load_into("meds", tmp_path / "nowhere", db)
    (tmp_path / "csvs").mkdir()
    (tmp_path / "csvs" / "patients.csv").write_text("Id\n1\n")
    with pytest.raises(warehouse.SourceError, match=rf"{tmp_path / 'csvs'}: not a MEDS dataset: no data/"):
        load_into("meds", tmp_path / "csvs", db)
    no_code = _table(subject_id=pa.array([1], pa.int64()), time=pa.array([datetime(2020, 1, 1)]))
    root = _dataset(tmp_path / "a", {"0.parquet": no_code})
    with pytest.raises(warehouse.SourceError, match=r"0\.parquet: not MEDS data: missing required column\(s\) "
                                                    r"\['code'\]"):
        load_into("meds", root, db)
    str_ids = _table(subject_id=pa.array(["p1"]), time=pa.array([datetime(2020, 1, 1)]), code=pa.array(["X"]))
    root = _dataset(tmp_path / "b", {"0.parquet": str_ids})
    with pytest.raises(warehouse.SourceError, match="column subject_id has type string, not compatible with MEDS"):
        load_into("meds", root, db)
    (tmp_path / "c" / "data").mkdir(parents=True)
    (tmp_path / "c" / "data" / "0.parquet").write_text("not parquet")
    with pytest.raises(warehouse.SourceError, match="not a readable parquet file"):
        load_into("meds", tmp_path / "c", db)
    assert rows(db, "SELECT count(*) FROM events")[0][0] == 0


def test_reload_replaces_its_ownrows(tmp_path):
    t = _table(subject_id=pa.array([1, 2], pa.int64()), time=pa.array([None, None], pa.timestamp("us")),
               code=pa.array(["GENDER//F", "GENDER//M"]))
    root = _dataset(tmp_path / "ds", {"0.parquet": t})
    db = tmp_path / "w.duckdb"
    load_into("meds", root, db)
    load_into("meds", root, db)
    assert rows(db, "SELECT count(*) FROM events") == [(2,)]
    assert rows(db, "SELECT count(*) FROM etl_runs") == [(2,)]


def test_schemas_are_the_meds_packages_own():
    """The MEDS types, special codes and version come from the `meds` package, not from a copy of it."""
    import importlib.metadata

    import meds

    from foresight import schema

    assert schema.meds_data_schema().equals(meds.DataSchema.schema())
    assert schema.meds_codes_schema().equals(meds.CodeMetadataSchema.schema())
    assert schema.meds_splits_schema().equals(meds.SubjectSplitSchema.schema())
    assert (meds.birth_code, meds.death_code) == (schema.BIRTH_CODE, schema.DEATH_CODE)
    assert importlib.metadata.version("meds") == schema.MEDS_VERSION


def test_export_validates_with_meds_and_extra_columns_round_trip(tmp_path):
    """`export_meds(extra_columns=...)`: every file passes the `meds` package's schemas, dataset.json declares the
    extra columns, and the MEDS source loads them back (unit and encounter_id kept, nothing ignored)."""
    import json

    import meds

    from .conftest import tiny_warehouse

    src = tiny_warehouse(tmp_path / "src.duckdb", n_subjects=12)
    with warehouse.connect(src) as con:
        con.execute("UPDATE events SET unit = 'mg/dL', encounter_id = 'E' || subject_id WHERE code LIKE 'LAB//%'")
        out = warehouse.export_meds(con, tmp_path / "meds", subjects_per_shard=5,
                                    extra_columns=["unit", "encounter_id"])
        with pytest.raises(ValueError, match=r"unknown extra column\(s\) \['site'\]"):
            warehouse.export_meds(con, tmp_path / "bad", extra_columns=["site"])
    assert out["shards"] == 3 and out["extra_columns"] == ["unit", "encounter_id"]
    for shard in sorted((tmp_path / "meds" / "data").glob("*.parquet")):
        table = pq.read_table(shard)
        meds.DataSchema.validate(table)  # raises on a wrong type, a missing column or a null subject/code
        assert table.schema.names == [*meds.DataSchema.columns(), "unit", "encounter_id"]
    meds.CodeMetadataSchema.validate(pq.read_table(tmp_path / "meds" / "metadata" / "codes.parquet"))
    meds.SubjectSplitSchema.validate(pq.read_table(tmp_path / "meds" / "metadata" / "subject_splits.parquet"))
    meta = json.loads((tmp_path / "meds" / "metadata" / "dataset.json").read_text())
    meds.DatasetMetadataSchema.validate(meta)
    assert meta["code_modifier_columns"] == ["unit"] and meta["raw_source_id_columns"] == ["encounter_id"]
    back = tmp_path / "back.duckdb"
    s = load_into("meds", tmp_path / "meds", back)
    assert not any("ignored" in w for w in s.warnings), s.warnings
    cols = f"{CORE}, unit, encounter_id"
    with warehouse.connect(back) as con:
        con.execute(f"ATTACH '{src}' AS src (READ_ONLY)")
        for a, b in (("src.events", "events"), ("events", "src.events")):
            assert con.execute(f"SELECT count(*) FROM (SELECT {cols} FROM {a} EXCEPT ALL SELECT {cols} FROM {b})"
                               ).fetchall()[0][0] == 0
        assert con.execute("SELECT count(*) FROM events WHERE encounter_id IS NOT NULL").fetchall()[0][0] > 0


def test_extra_column_of_a_wrong_type_is_rejected(tmp_path):
    t = _table(subject_id=pa.array([1], pa.int64()), time=pa.array([datetime(2020, 1, 1)], pa.timestamp("us")),
               code=pa.array(["LAB//K"]), unit=pa.array([1.5]))
    with pytest.raises(warehouse.SourceError, match="column unit has type double, not compatible with MEDS"):
        load_into("meds", _dataset(tmp_path / "ds", {"0.parquet": t}), tmp_path / "w.duckdb")
