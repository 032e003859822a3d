"""The code-naming rule, split assignment and SQL macros: Python and SQL must agree exactly."""

from __future__ import annotations

import pytest

from foresight import schema, warehouse


@pytest.fixture(scope="module")
def con():
    with warehouse.connect(":memory:") as c:
        yield c


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("  ew emer. ", "EW_EMER."), ("BLACK/CAPE VERDEAN", "BLACK/CAPE_VERDEAN"), ("a//b", "A/B"), ("a///b", "A/B"),
     ("", "UNK"), ("Tab\tand  spaces", "TAB_AND_SPACES")],
)
def test_code_part_matches_sql_macro(con, raw, expected):
    assert schema.code_part(raw) == expected
    assert con.execute("SELECT fs_part(?)", [raw]).fetchall()[0][0] == expected


def test_make_code_and_kind():
    assert schema.make_code("dx", "ICD10CM", "E11.9 ") == "DX//ICD10CM//E11.9"
    assert schema.code_kind("DX//ICD10CM//E119") == "DX"
    assert schema.code_kind(schema.DEATH_CODE) == "MEDS"
    with pytest.raises(ValueError, match="unknown code kind"):
        schema.make_code("NOPE", "X")


def test_splits_are_stable_and_match_sql(con):
    ids = list(range(10_000_000, 10_005_000))
    py = [schema.split_of(i) for i in ids]
    sql = [r[0] for r in con.execute("SELECT fs_split(i) FROM unnest(?::BIGINT[]) t(i)", [ids]).fetchall()]
    assert py == sql
    share = {s: py.count(s) / len(py) for s in schema.SPLITS}
    assert share["train"] == pytest.approx(0.8, abs=0.03)
    assert share["tuning"] == pytest.approx(0.1, abs=0.02)
    assert share["held_out"] == pytest.approx(0.1, abs=0.02)
    # Stable: a known id keeps its split forever (a change here reshuffles every user's held-out set).
    assert schema.split_of(10000032) == "tuning"


def test_icd_prefixes(con):
    got = con.execute("SELECT fs_prefixes('DX//ICD10CM//', 'E1165', 3)").fetchall()[0][0]
    assert got == ["DX//ICD10CM//E116", "DX//ICD10CM//E11"]
    assert con.execute("SELECT fs_prefixes('DX//ICD10CM//', 'I10', 3)").fetchall()[0][0] == []


@pytest.mark.parametrize(
    ("raw", "ok"),
    [("2180-07-23 12:35:00", True), ("2180-07-23", True), ("2180-07-23T12:35:00", True), ("bad", False),
     ("2180-13-01", False)],
)
def test_time_parsing(con, raw, ok):
    assert (con.execute("SELECT fs_ts(?)", [raw]).fetchall()[0][0] is not None) == ok


def test_ddl_creates_every_table(tmp_path):
    con = warehouse.connect(tmp_path / "w.duckdb")
    names = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert set(schema.WAREHOUSE_TABLES) <= names
    cols = [r[0] for r in con.execute("DESCRIBE events").fetchall()]
    assert tuple(cols) == schema.EVENT_COLUMNS
