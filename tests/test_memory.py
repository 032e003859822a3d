"""Flat memory (issue 19): the memory budget every stage honours, loads staged on disk (same rows under a small
budget, nothing left behind, a crash leaves the previous run) and the vocabulary fit chunked by subject (exactly the
one-shot fit)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import duckdb
import psutil
import pytest

from foresight import sources, warehouse
from foresight import tokens as T
from foresight.tokens import fit as fit_module
from foresight.warehouse import connection, governor, slices

from .conftest import SHARED_DATA, load_into, rows, run_cli, simulated_warehouse

SMALL = "256MB"  # below what the loads would hold in memory: DuckDB must spill
EVENT_COLUMNS = "subject_id, time, code, numeric_value, text_value, unit, encounter_id, source, source_table"
FHIR = SHARED_DATA / "synthea-ca-59pt" / "fhir"


def _setting(db: Path, name: str) -> str:
    with warehouse.connect(db, read_only=True) as con:
        return con.execute(f"SELECT current_setting('{name}')").fetchall()[0][0]


def test_the_budget_is_applied_from_the_argument_the_environment_and_the_machine(tmp_path, monkeypatch):
    db = tmp_path / "w.duckdb"
    monkeypatch.delenv(connection.MEMORY_ENV, raising=False)
    monkeypatch.delenv(connection.LEGACY_MEMORY_ENV, raising=False)
    with warehouse.connect(db, memory_limit="300MB") as con:
        assert con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0] == "286.1 MiB"
        assert con.execute("SELECT current_setting('temp_directory')").fetchall()[0][0] == str(db.resolve()) + ".tmp"
        # the settings that follow the budget: one thread for 300 MB, the allocator flushing at 1/8 and 1/4 of it
        assert con.execute("SELECT current_setting('threads')").fetchall()[0][0] == 1
        assert con.execute("SELECT current_setting('allocator_bulk_deallocation_flush_threshold')"
                           ).fetchall()[0][0] == "71.5 MiB"
    with warehouse.connect(db, memory_limit="8GB") as con:  # a large budget: every core, DuckDB's own thresholds
        assert con.execute("SELECT current_setting('threads')").fetchall()[0][0] == (os.cpu_count() or 1)
        assert con.execute("SELECT current_setting('allocator_bulk_deallocation_flush_threshold')"
                           ).fetchall()[0][0] == "512.0 MiB"
    monkeypatch.setenv(connection.MEMORY_ENV, "1.5GiB")
    assert _setting(db, "memory_limit") == "1.5 GiB"
    monkeypatch.delenv(connection.MEMORY_ENV)
    default = connection.memory_budget()  # derived from the machine: 1 GB a core, <= half the free RAM
    assert connection.MIN_DEFAULT <= default <= connection.PER_CORE * (os.cpu_count() or 1)
    shown = connection.parse_memory(_setting(db, "memory_limit").replace(" ", ""))
    assert abs(shown - default) < 0.01 * default


@pytest.mark.parametrize("bad", ["1.5 gigs", "lots", "-2GB", "0%", "1KB"])
def test_a_malformed_budget_is_a_clear_error(tmp_path, monkeypatch, bad):
    with pytest.raises(warehouse.MemoryBudgetError, match="FORESIGHT_MEMORY: "):
        monkeypatch.setenv(connection.MEMORY_ENV, bad)
        warehouse.connect(tmp_path / "w.duckdb")
    assert not (tmp_path / "w.duckdb").exists()  # refused before the file was created


def test_cli_memory_option_validates_and_tokenize_names_a_bad_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(connection.MEMORY_ENV, raising=False)
    bad = run_cli("--memory", "1.5 gigs", "tokenize", "--db", str(tmp_path / "w.duckdb"), "--out", str(tmp_path))
    assert bad.returncode == 2 and "--memory: '1.5 gigs' is not a memory size" in bad.stderr
    assert "Traceback" not in bad.stderr
    db = tmp_path / "w.duckdb"
    warehouse.connect(db).close()
    monkeypatch.setenv(connection.MEMORY_ENV, "nonsense")
    with pytest.raises(T.TokenizeError, match="FORESIGHT_MEMORY: 'nonsense' is not a memory size"):
        T.tokenize(db, tmp_path / "tok")  # the CLI prints TokenizeError as one line with exit 2


def _events(db: Path) -> list[tuple]:
    return rows(db, f"SELECT {EVENT_COLUMNS} FROM events ORDER BY ALL")


def _quarantine(db: Path) -> list[tuple]:
    return rows(db, "SELECT source, source_file, row_number, reason, raw FROM quarantine ORDER BY ALL")


def test_mimic_demo_under_a_small_budget_loads_the_same_rows(demo_db, mimic_demo, tmp_path, monkeypatch):
    db = tmp_path / "small.duckdb"
    monkeypatch.setenv(connection.MEMORY_ENV, SMALL)
    with warehouse.connect(db) as con:
        assert con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0] == "244.1 MiB"
        s = sources.load("mimic-iv", con, mimic_demo)
    assert s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_dropped
    assert _events(db) == _events(demo_db)
    assert _quarantine(db) == _quarantine(demo_db)
    splits = "SELECT * FROM subject_splits ORDER BY 1"
    assert rows(db, splits) == rows(demo_db, splits)
    assert not Path(str(db) + ".staging").exists()  # the staging file goes with the commit


def test_mimic_demo_validated_in_slices_loads_the_same_rows(demo_db, mimic_demo, tmp_path, monkeypatch):
    """Big tables' validation is written in slices of lines (one statement each) so DuckDB's per-statement
    bookkeeping does not grow with the input; with slices of 997 lines the demo's big tables take many statements
    and the load is row for row the one-statement load."""
    runs: dict[str, int] = {}
    real = slices.run_sliced

    def counted(con, statement, raw, slice_lines):
        runs[raw] = real(con, statement, raw, slice_lines)
        return runs[raw]

    monkeypatch.setattr(slices, "SLICE_LINES", 997)
    monkeypatch.setattr(slices, "run_sliced", counted)
    db = tmp_path / "sliced.duckdb"
    s = load_into("mimic-iv", mimic_demo, db)
    assert runs["raw_labevents"] > 100 and runs["raw_emar"] > 30 and runs["raw_omr"] > 1  # really sliced
    assert "raw_patients" not in runs  # core.sql is not row-wise (first-row windows): one statement
    assert s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_dropped
    assert _events(db) == _events(demo_db)
    assert _quarantine(db) == _quarantine(demo_db)
    per_table = "SELECT * EXCLUDE (run_id) FROM etl_tables ORDER BY ALL"
    assert rows(db, per_table) == rows(demo_db, per_table)
    splits = "SELECT * FROM subject_splits ORDER BY 1"
    assert rows(db, splits) == rows(demo_db, splits)


def test_a_statement_marked_for_slices_must_be_row_wise_create_as(tmp_path):
    con = duckdb.connect()
    con.execute("CREATE TABLE raw_x AS SELECT i + 2 AS _line, (i % 7)::VARCHAR AS v FROM range(50) t(i)")
    con.execute("CREATE TABLE lookup AS SELECT i::VARCHAR AS v, i * 10 AS w FROM range(5) t(i)")
    one = ("-- sliced by line: raw_x\nCREATE OR REPLACE TABLE v_x AS\n"
           "SELECT r._line, r.v, l.w FROM raw_x r LEFT JOIN lookup l USING (v);")
    slices.run_script(con, one.replace("v_x", "whole"), slice_lines=1000)
    slices.run_script(con, one, slice_lines=8)
    assert slices.run_sliced(con, one, "raw_x", 8) == 7  # lines 2..51 in slices of 8
    assert con.execute("SELECT * FROM v_x").fetchall() == con.execute("SELECT * FROM whole").fetchall()
    with pytest.raises(ValueError, match="reads raw_x 2 times"):
        slices.run_script(con, "-- sliced by line: raw_x\nCREATE OR REPLACE TABLE v_y AS SELECT * FROM raw_x "
                               "WHERE _line > (SELECT avg(_line) FROM fs.raw_x);", slice_lines=8)
    with pytest.raises(ValueError, match="must be CREATE OR REPLACE TABLE"):
        slices.run_script(con, "-- sliced by line: raw_x\nINSERT INTO v_x SELECT * FROM raw_x;", slice_lines=8)
    with pytest.raises(ValueError, match="at least 1"):
        slices.run_script(con, one, slice_lines=0)


def _limit_is(con: duckdb.DuckDBPyConnection, limit: int) -> bool:
    """DuckDB's limit is ``limit`` bytes (as DuckDB prints both: to a tenth of a MiB or GiB)."""
    return con.execute(f"SELECT current_setting('memory_limit') = format_bytes({limit // 1024 * 1024})"
                       ).fetchall()[0][0]


def test_the_governor_gives_duckdb_the_budget_less_the_memory_outside_it(tmp_path):
    """The process's memory outside DuckDB's buffers (here a 200 MiB Python buffer) comes off DuckDB's limit, comes
    back when freed, and never takes the limit under the floor; the budget is restored on exit."""
    mib = 1 << 20
    with warehouse.connect(tmp_path / "w.duckdb", memory_limit="4GB") as con:
        assert governor.budget_of(con) == 4_000_000_000  # exact, though DuckDB shows "3.7 GiB"
        rss = psutil.Process().memory_info().rss  # this test process: DuckDB's buffers hold next to nothing
        budget = rss + 512 * mib
        with warehouse.MemoryGovernor(con, budget=budget, floor=0.1, interval=3600) as gov:  # adjusted by hand
            assert gov.floor == governor.MIN_LIMIT  # a tenth of the budget is less than the least a load needs
            base = gov.adjust()
            assert abs(base - 512 * mib) < 48 * mib and _limit_is(con, base)
            held = bytearray(200 * mib)
            held[:: 4096] = b"\1" * len(held[:: 4096])  # touch every page so it is resident
            lowered = gov.adjust()
            assert abs((base - lowered) - 200 * mib) < 24 * mib and _limit_is(con, lowered)
            del held
            assert abs(gov.adjust() - base) < 24 * mib
            huge = bytearray(budget)
            huge[:: 4096] = b"\1" * len(huge[:: 4096])
            assert gov.adjust() == gov.floor and _limit_is(con, gov.floor)
            del huge
            assert gov.lowest == gov.floor
        assert _limit_is(con, budget)  # the budget again once the load is over
    small = warehouse.MemoryGovernor(duckdb.connect(), budget=200 * mib)  # under the least a load needs:
    assert small.floor == small.budget and small.target(rss=4 << 30, in_buffers=0) == small.budget  # never lowered


def test_the_governor_thread_outlives_a_limit_duckdb_cannot_reach_yet(tmp_path, monkeypatch):
    """A limit below DuckDB's pinned memory is an OutOfMemoryException: the thread retries, it does not die."""
    calls: list[str] = []
    real = warehouse.MemoryGovernor.adjust

    def flaky(self):
        calls.append("try")
        if len(calls) == 1:
            raise duckdb.OutOfMemoryException("could not free up enough memory for the new limit")
        return real(self)

    monkeypatch.setattr(warehouse.MemoryGovernor, "adjust", flaky)
    with warehouse.connect(tmp_path / "w.duckdb", memory_limit="4GB") as con:
        budget = psutil.Process().memory_info().rss + 512 * (1 << 20)
        with warehouse.MemoryGovernor(con, budget=budget, floor=0.1, interval=0.01) as gov:
            deadline = time.monotonic() + 30
            while gov.lowest == budget and time.monotonic() < deadline:
                time.sleep(0.02)
        assert len(calls) >= 2 and gov.lowest < budget  # it failed once, then set a lower limit


def test_a_load_runs_governed_and_ends_with_the_budget(tiny_mimic, tmp_path, monkeypatch):
    """Every load runs under the governor: in this test process (Python, pytest and everything the suite imported
    live outside DuckDB) the limit during the load is under the budget; after it, the budget again, and the load
    is already in the database file (checkpointed while governed)."""
    monkeypatch.setenv(connection.MEMORY_ENV, "1GB")
    seen: list[bool] = []
    with warehouse.connect(tmp_path / "w.duckdb") as con:
        budget = governor.budget_of(con)
        probe = con.cursor()
        monkeypatch.setattr(governor, "INTERVAL", 0.01)  # several measurements before the first group ends
        s = sources.load("mimic-iv", con, tiny_mimic, on_group_done=lambda group: seen.append(_limit_is(probe, budget)))
        assert s.rows_read == s.rows_loaded + s.rows_quarantined + s.rows_dropped
        assert seen and not all(seen)  # lowered while the load ran
        assert _limit_is(con, budget)
        # checkpointed under the governor, not at close: nothing is left in the write-ahead log
        wal = tmp_path / "w.duckdb.wal"
        assert not wal.exists() or wal.stat().st_size == 0
        assert not any("waits for the close" in w for w in s.warnings)


def test_a_crash_leaves_the_previous_run_and_the_next_load_clears_its_staging(tiny_mimic, tmp_path, monkeypatch):
    monkeypatch.setenv(connection.MEMORY_ENV, SMALL)
    db = tmp_path / "w.duckdb"
    first = load_into("mimic-iv", tiny_mimic, db)
    before = rows(db, "SELECT count(*), max(load_id) FROM events")[0]

    def crash(group: str) -> None:
        if group == "labs":
            raise RuntimeError("killed mid-load")

    with warehouse.connect(db) as con, pytest.raises(RuntimeError, match="killed"):
        sources.load("mimic-iv", con, tiny_mimic, on_group_done=crash)
    staging = Path(str(db) + ".staging")
    assert staging.exists()  # staged rows were on disk, not in the warehouse
    assert rows(db, "SELECT count(*), max(load_id) FROM events")[0] == before == (first.events, first.run_id)
    again = load_into("mimic-iv", tiny_mimic, db)  # idempotent re-run: same rows, nothing duplicated
    assert again.events == first.events and rows(db, "SELECT count(*) FROM events")[0][0] == first.events
    assert rows(db, "SELECT count(*) FROM quarantine")[0][0] == first.rows_quarantined > 0
    assert not staging.exists()


@pytest.mark.skipif(not FHIR.is_dir(), reason=f"Synthea FHIR export not found at {FHIR}")
def test_fhir_under_a_small_budget_loads_the_same_rows(tmp_path, monkeypatch):
    monkeypatch.delenv(connection.MEMORY_ENV, raising=False)
    big = tmp_path / "default.duckdb"
    small = tmp_path / "small.duckdb"
    a = load_into("fhir", FHIR, big)
    monkeypatch.setenv(connection.MEMORY_ENV, SMALL)
    b = load_into("fhir", FHIR, small)
    assert (a.events, a.rows_read, a.rows_quarantined, a.notes) == (b.events, b.rows_read, b.rows_quarantined, b.notes)
    assert _events(big) == _events(small)
    assert _quarantine(big) == _quarantine(small)
    notes = "SELECT subject_id, time, note_id, note_type, text FROM notes ORDER BY ALL"
    assert rows(big, notes) == rows(small, notes)


@pytest.fixture(scope="module")
def sim_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulated_warehouse(tmp_path_factory.mktemp("memsim"), 400, seed=3)


def _fit(db: Path, config: T.TokenizerConfig, chunk: int, memory: str | None = None) -> T.Vocabulary:
    with warehouse.connect(db, read_only=True, memory_limit=memory) as con:
        return T.fit_vocabulary(con, config, chunk_subjects=chunk)


@pytest.mark.parametrize("k", [10, 40])
def test_chunked_fit_is_exactly_the_one_shot_fit(sim_db, k):
    config = T.TokenizerConfig(min_subjects=k, subjects_per_chunk=50)
    one_shot = _fit(sim_db, config, 10**9)
    n_train = one_shot.report["train_subjects"]
    assert n_train > 200
    for chunk in (7, 64):
        chunked = _fit(sim_db, config, chunk)
        assert chunked.tokens == one_shot.tokens
        assert chunked.code_map == one_shot.code_map
        assert chunked.marker_map == one_shot.marker_map
        assert chunked.quantile_edges == one_shot.quantile_edges
        assert chunked.report == one_shot.report  # the floor's report, marker coarsening counts included
    # the floor is a real constraint here: some codes and marker values were pooled or sent to RARE
    assert one_shot.report["codes_to_rare"] + one_shot.report["codes_to_parent"] > 0
    assert any(s["subjects_coarsened"] or s["subjects_to_rare"] for s in one_shot.report["markers"].values())


def test_chunked_fit_runs_under_a_tiny_budget(sim_db):
    config = T.TokenizerConfig(min_subjects=10)
    assert _fit(sim_db, config, 25, memory="64MB").tokens == _fit(sim_db, config, 10**9).tokens


def test_train_chunks_cover_every_subject_once():
    import numpy as np

    ids = np.array([3, 5, 8, 13, 21, 34, 55])
    chunks = fit_module.train_chunks(ids, 3)
    assert chunks == [(3, 8), (13, 34), (55, 55)]
    assert fit_module.train_chunks(ids, 7) == [None]
    with pytest.raises(ValueError):
        fit_module.train_chunks(ids, 0)


def test_duckdb_rejects_what_the_budget_forbids(tmp_path):
    """The budget is a real limit (so the loads above really ran within it): an aggregate that cannot spill and
    needs more fails under it."""
    with warehouse.connect(tmp_path / "w.duckdb", memory_limit="32MB") as con, pytest.raises(duckdb.Error):
        con.execute("SELECT list(range) FROM range(20000000)").fetchall()


def test_event_bounded_chunks_write_the_same_tokens(sim_db, tmp_path, monkeypatch):
    from foresight.tokens import from_warehouse

    with warehouse.connect(sim_db, read_only=True) as con:
        ids = fit_module.train_subject_ids(con)
        chunks = from_warehouse.subject_chunks(con, ids, "train", per=10**6, max_events=2_000)
        sizes = dict(con.execute("SELECT subject_id, count(*) FROM events JOIN subject_splits USING (subject_id) "
                                 "WHERE split = 'train' GROUP BY 1").fetchall())
    assert sum(n for _, _, n in chunks) == len(ids) and len(chunks) > 5
    for lo, hi, n in chunks:
        events = sum(c for s, c in sizes.items() if lo <= s <= hi)
        assert events <= 2_000 or n == 1  # a subject with more events is a chunk of its own
    config = T.TokenizerConfig(min_subjects=10)
    T.tokenize(sim_db, tmp_path / "default", config)
    monkeypatch.setattr(from_warehouse, "MIN_CHUNK_EVENTS", 500)
    monkeypatch.setattr(from_warehouse, "BYTES_PER_EVENT", 10**9)  # every chunk: a few subjects
    T.tokenize(sim_db, tmp_path / "small", config)
    for name in ("train.bin", "train.clock.bin", "held_out.bin"):
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "small" / name).read_bytes(), name
    # (vocab.json's quantile_edges keys come in DuckDB's aggregation order: compare the content)
    vocab_a, vocab_b = (json.loads((tmp_path / d / "vocab.json").read_text()) for d in ("default", "small"))
    assert vocab_a == vocab_b
    import numpy as np

    for split in ("train", "tuning", "held_out"):
        a, b = (np.load(tmp_path / d / f"{split}.index.npy") for d in ("default", "small"))
        assert a.dtype == b.dtype and (a == b).all()


def test_the_clock_error_sample_is_bounded_uniform_and_keeps_the_exact_maximum():
    """A split's clock errors are summarised from a fixed-size sample (it used to grow with every chunk)."""
    import numpy as np

    from foresight.tokens.shards import ClockErrorSample

    rng = np.random.default_rng(1)
    chunks = [rng.exponential(600.0, size=int(n)) for n in rng.integers(1, 5_000, size=60)]
    chunks[17][3] = 1e6  # one far outlier in the middle: the reported max must be it
    sample = ClockErrorSample(size=2_000)
    for c in chunks:
        sample.add(c)
    everything = np.concatenate(chunks)
    got = sample.values()
    assert len(got) == 2_000 < len(everything)
    assert got.max() == 1e6
    assert abs(np.percentile(got, 50) - np.percentile(everything, 50)) < 0.1 * np.percentile(everything, 50)
    again = ClockErrorSample(size=2_000)
    for c in chunks:
        again.add(c)
    assert np.array_equal(again.values(), got)  # the same every run (fixed seed): summaries do not flicker
    assert len(ClockErrorSample().values()) == 0


def test_the_fit_tables_live_in_a_scratch_database_that_leaves_nothing_behind(tmp_path):
    """The fit's per-subject tables go to an on-disk scratch database attached to the read-only warehouse connection
    (as TEMP tables their memory grew with the cohort), and the scratch folder is gone after the fit."""
    from foresight.tokens import scratch

    from .conftest import tiny_warehouse

    db = tiny_warehouse(tmp_path / "w.duckdb")
    spill = Path(_setting(db, "temp_directory"))
    with warehouse.connect(db, read_only=True) as con:
        with scratch.scratch_database(con) as path:
            assert path.parent.parent == spill
            scratch.create_table(con, "code_pairs", "(node VARCHAR, subject_id BIGINT)")
            con.execute("INSERT INTO code_pairs VALUES ('DX//X', 1)")  # the fit's plain names reach it
            assert con.execute("SELECT database_name, temporary FROM duckdb_tables() WHERE table_name = "
                               "'code_pairs'").fetchall() == [("fs_fit", False)]
        assert not path.parent.exists() and not spill.exists()  # the spill folder did not exist before
        # no scratch database attached (the sharded reduce): a TEMP table, as before
        scratch.create_table(con, "code_pairs", "(node VARCHAR)")
        assert con.execute("SELECT database_name, temporary FROM duckdb_tables() WHERE table_name = "
                           "'code_pairs'").fetchall() == [("temp", True)]
    T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=2))
    assert (tmp_path / "tok" / "vocab.json").exists() and not spill.exists()
