"""The steps of :meth:`foresight.warehouse.Load.publish`: staged rows replace a source's rows in one transaction.

Every step but :func:`attach_staging` and :func:`drop_staging_area` runs inside the caller's transaction and reads
the staging tables (``staged_events``, ``staged_quarantine``, ``staged_notes``, ``staged_codes``,
``staged_subject_map``, ``staged_splits``, in the load's staging database file ``fs_stage``) and the TEMP
``fs_optout`` (the load's opt-out list). The transaction writes only the warehouse; the staging file is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from foresight.version import __version__
from foresight.warehouse.connection import sql_literal
from foresight.warehouse.results import TableResult

TOTALS = ("rows_read", "rows_loaded", "rows_quarantined", "rows_dropped", "events")


def totals(tables: Iterable[TableResult]) -> tuple[dict[str, int], dict[str, int]]:
    """The load's counts summed over its tables, and its drop reasons (already prefixed by table)."""
    tables = list(tables)
    counts = {k: sum(getattr(t, k) for t in tables) for k in TOTALS}
    dropped_reasons: dict[str, int] = {}
    for t in tables:
        dropped_reasons.update(t.dropped_reasons)
    return counts, dropped_reasons


def replace_rows(con: duckdb.DuckDBPyConnection, source: str) -> None:
    """Delete the source's events, quarantine rows and notes, insert the staged ones; add its subject_map rows
    (existing rows win) and drop map rows of subjects who have opted out since an earlier load."""
    con.execute("DELETE FROM events WHERE source = ?", [source])
    con.execute("DELETE FROM quarantine WHERE source = ?", [source])
    con.execute("INSERT INTO events SELECT * FROM staged_events")
    con.execute("INSERT INTO quarantine SELECT * EXCLUDE (source_table) FROM staged_quarantine")
    con.execute("DELETE FROM notes WHERE source = ?", [source])
    con.execute("INSERT INTO notes SELECT * FROM staged_notes")
    con.execute("INSERT OR IGNORE INTO subject_map SELECT * FROM staged_subject_map "
                "WHERE subject_id NOT IN (SELECT subject_id FROM fs_optout)")
    # an earlier load of this source may have mapped (and split) a subject who has since opted out
    con.execute("DELETE FROM subject_map WHERE source = ? AND subject_id IN (SELECT subject_id FROM fs_optout)",
                [source])


def write_codes(con: duckdb.DuckDBPyConnection, source: str) -> None:
    """Describe every code of the load and all its ancestors (highest-priority staged description wins)."""
    con.execute(
        """
        INSERT OR REPLACE INTO codes
        SELECT e.code, c.description, fs_kind(e.code), coalesce(c.parent_codes, []::VARCHAR[]), ?
        FROM (
            -- the load's codes and all their ancestors, so a parent a tokenizer maps to is described
            SELECT DISTINCT code FROM staged_events
            UNION
            SELECT DISTINCT unnest(s.parent_codes) FROM staged_codes s
            WHERE s.code IN (SELECT code FROM staged_events)
        ) e
        LEFT JOIN (
            SELECT code, arg_max(description, priority) AS description,
                   arg_max(parent_codes, priority) AS parent_codes
            FROM staged_codes GROUP BY code
        ) c USING (code)
        """,
        [source],
    )


def write_splits(con: duckdb.DuckDBPyConnection) -> None:
    """Give every new subject a split (given by the input first, else the stable hash); splits never change.
    Opted-out subjects left without events lose theirs."""
    con.execute(
        """
        INSERT INTO subject_splits
        SELECT subject_id, any_value(split) FROM staged_splits
        WHERE subject_id IN (SELECT subject_id FROM staged_events)
          AND subject_id NOT IN (SELECT subject_id FROM subject_splits)
        GROUP BY subject_id
        """
    )
    con.execute(
        """
        INSERT INTO subject_splits
        SELECT DISTINCT subject_id, fs_split(subject_id) FROM staged_events
        WHERE subject_id NOT IN (SELECT subject_id FROM subject_splits)
        """
    )
    # The events subquery keeps only opted-out subjects: ``NOT IN`` is a mark join that hashes all of its subquery,
    # and over every event's subject id it was the whole load's memory peak (25M ids at 100x the MIMIC demo).
    con.execute("DELETE FROM subject_splits WHERE subject_id IN (SELECT subject_id FROM fs_optout) "
                "AND subject_id NOT IN (SELECT subject_id FROM events "
                "WHERE subject_id IN (SELECT subject_id FROM fs_optout))")


def staged_counts(con: duckdb.DuckDBPyConnection) -> tuple[int, dict[str, int]]:
    """Subjects of the staged events, and the events by code kind."""
    subjects = con.execute("SELECT count(DISTINCT subject_id) FROM staged_events").fetchall()[0][0]
    by_kind = dict(
        con.execute("SELECT fs_kind(code) AS k, count(*) FROM staged_events GROUP BY k ORDER BY k").fetchall()
    )
    return subjects, by_kind


def checkpoint(con: duckdb.DuckDBPyConnection, warnings: list[str]) -> None:
    """After the commit: write the load into the database file now (``CHECKPOINT``), while the load's memory
    governor runs, rather than when the connection closes, after it. At 1,000x the MIMIC demo that checkpoint at
    close was the load's peak (1,016 MiB at a 1 GB budget, against 960 while the load ran). The run has committed
    either way: a checkpoint that fails here (another transaction open, a full disk) is a warning, and DuckDB
    checkpoints again at close."""
    try:
        con.execute("CHECKPOINT")
    except duckdb.Error as exc:
        warnings.append(f"the load is committed; writing it into the database file waits for the close: {exc}")


def record_run(con: duckdb.DuckDBPyConnection, run: dict[str, Any], tables: Iterable[TableResult]) -> None:
    """Write the ``etl_runs`` row (``run`` holds its columns but the version) and one ``etl_tables`` row per
    table."""
    con.execute(
        "INSERT INTO etl_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            run["run_id"], run["source"], run["source_kind"], run["input_path"],
            json.dumps(run["checksums"], sort_keys=True), run["started_at"], datetime.now(),
            run["rows_read"], run["rows_loaded"], run["rows_quarantined"], run["rows_dropped"],
            json.dumps(run["dropped_reasons"], sort_keys=True), run["events"], run["subjects"],
            json.dumps(run["missing_tables"]), __version__,
        ],
    )
    con.executemany(
        "INSERT INTO etl_tables VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            [run["run_id"], t.table, t.file, t.sha256, t.rows_read, t.rows_loaded,
             t.rows_quarantined, t.rows_dropped, t.events]
            for t in tables
        ],
    )


def staging_path(con: duckdb.DuckDBPyConnection) -> Path | None:
    """The staging database file of the warehouse behind ``con`` (``<warehouse>.staging``), or None for an
    in-memory warehouse."""
    db = database_path(con)
    return None if db in ("", ":memory:") or db.startswith(":memory:") else Path(db + ".staging")


def attach_staging(con: duckdb.DuckDBPyConnection) -> Path | None:
    """Attach the load's staging database as ``fs_stage`` (a file beside the warehouse; in memory for an in-memory
    warehouse) and return its path. Already attached (a load retried on the same connection): kept. Not attached:
    a file left by a crashed load is deleted first (it held only staged rows; the warehouse never saw them).
    The file is a whole DuckDB database, so a load's staging could as well be written elsewhere (a worker)."""
    attached = {r[0] for r in con.execute("SELECT database_name FROM duckdb_databases()").fetchall()}
    path = staging_path(con)
    if "fs_stage" not in attached:
        if path is not None:
            remove_staging_file(path)
        con.execute(f"ATTACH {sql_literal(str(path) if path else ':memory:')} AS fs_stage")
    return path


def reopen_staging(con: duckdb.DuckDBPyConnection) -> None:
    """Detach the staging database file and attach it again (nothing for an in-memory one, which would be lost).

    DuckDB keeps in-memory bookkeeping (row groups, column segments, their statistics) for every table written in
    this session, outside its memory budget and in proportion to the rows: the staged events of a 1,000x MIMIC-IV
    load alone are 250M rows. A re-attached file reads it back lazily, as a query needs it. Call it only when no
    other cursor is using the staging database (between table groups)."""
    path = staging_path(con)
    if path is None:
        return
    con.execute("SET search_path = 'main'")
    con.execute("DETACH fs_stage")
    con.execute(f"ATTACH {sql_literal(str(path))} AS fs_stage")
    con.execute("SET search_path = 'main,fs_stage.main'")


def remove_staging_file(path: Path | None) -> None:
    """Delete a staging database file and its write-ahead log (nothing when ``path`` is None)."""
    if path is not None:
        for p in (path, path.with_name(path.name + ".wal")):
            p.unlink(missing_ok=True)


def drop_staging_area(con: duckdb.DuckDBPyConnection) -> None:
    """After the commit: drop the TEMP opt-out tables, detach the staging database and delete its file."""
    con.execute("DROP TABLE IF EXISTS fs_optout; DROP TABLE IF EXISTS optout_lines")
    path = staging_path(con)
    con.execute("SET search_path = 'main'")
    con.execute("DETACH fs_stage")
    remove_staging_file(path)


def database_path(con: duckdb.DuckDBPyConnection) -> str:
    """The file of the connection's current database."""
    return str(con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()")
               .fetchall()[0][0])
