"""The steps of :meth:`foresight.warehouse.Load.finish_table`: every staged row of one input table accounted for.

Each step reads the staging tables an adapter's SQL built for ``table``: ``raw_<table>`` (the rows read),
``v_<table>(_line, _quarantine, _drop, ...)`` (one row per raw row), ``e_<table>`` (its events) and optionally
``n_<table>`` (its free-text notes). ``keep(alias)`` is the opt-out filter (:func:`optout_lines`): a SQL condition
``AND <alias>._line NOT IN optout_lines``, or "" when no subject is excluded.
"""

from __future__ import annotations

from collections.abc import Callable

import duckdb

from foresight.optout import OPT_OUT_REASON
from foresight.warehouse.results import ReconciliationError, TableResult

Keep = Callable[[str], str]


def table_shape(con: duckdb.DuckDBPyConnection, table: str) -> tuple[set[str], bool]:
    """The columns of ``v_<table>`` and whether the table stages notes (a TEMP view ``n_<table>``)."""
    v_cols = {r[0] for r in con.execute(f"DESCRIBE v_{table}").fetchall()}
    has_notes = bool(con.execute(
        "SELECT 1 FROM duckdb_views() WHERE view_name = ? AND temporary", [f"n_{table}"]
    ).fetchall())
    return v_cols, has_notes


def optout_lines(con: duckdb.DuckDBPyConnection, table: str, v_cols: set[str], has_notes: bool, active: bool
                 ) -> tuple[int, Keep]:
    """Lines of ``table`` that belong to opted-out subjects (TEMP ``optout_lines``) and a SQL filter maker.

    A line is opted out when it produced an event or note of a listed subject (TEMP ``fs_optout``), or when
    ``v_<table>`` has a ``subject_id`` column naming one (so their invalid rows are dropped rather than
    quarantined). Returns (line count, ``keep``); with no list (``active`` false), (0, a filter that keeps all).
    """
    if not active:
        return 0, lambda alias: ""
    optout = "(SELECT subject_id FROM fs_optout)"
    parts = [f"SELECT _line FROM e_{table} WHERE subject_id IN {optout}"]
    if has_notes:
        parts.append(f"SELECT _line FROM n_{table} WHERE subject_id IN {optout}")
    if "subject_id" in v_cols:
        parts.append(f"SELECT _line FROM v_{table} WHERE TRY_CAST(subject_id AS BIGINT) IN {optout}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE optout_lines AS {' UNION '.join(parts)}")
    n = con.execute("SELECT count(*) FROM optout_lines").fetchall()[0][0]
    return int(n), lambda alias: f"AND {alias}._line NOT IN (SELECT _line FROM optout_lines)"


def stage_quarantine(con: duckdb.DuckDBPyConnection, table: str, v_cols: set[str], keep: Keep, *, run_id: str,
                     source: str, file: str, lines: dict[int, int] | None = None) -> None:
    """Stage the rows with a ``_quarantine`` reason, raw row kept as JSON, named by file and row (multi-file
    inputs name them in ``v_<table>._source_file/_source_row``; default: the table's file and ``_line``, or the
    physical line ``lines`` gives for that record number)."""
    file_expr = "coalesce(v._source_file, ?)" if "_source_file" in v_cols else "?"
    row_expr = "v._source_row" if "_source_row" in v_cols else "coalesce(m.line, v._line)"
    con.execute("CREATE OR REPLACE TEMP TABLE fs_line_map (record BIGINT, line BIGINT)")
    if lines:
        con.execute("INSERT INTO fs_line_map SELECT unnest(?::BIGINT[]), unnest(?::BIGINT[])",
                    [list(lines), list(lines.values())])
    con.execute(
        f"""
        INSERT INTO staged_quarantine
        SELECT ?, ?, {file_expr}, {row_expr}, v._quarantine, to_json(r), ?
        FROM v_{table} v JOIN raw_{table} r USING (_line) LEFT JOIN fs_line_map m ON m.record = v._line
        WHERE v._quarantine IS NOT NULL {keep("v")};
        """,
        [run_id, source, file, table],
    )
    con.execute("DROP TABLE fs_line_map")


def check_validation(con: duckdb.DuckDBPyConnection, table: str, keep: Keep, file: str, ranges: list[str]) -> int:
    """Check ``v_<table>`` has one row per raw row and no event comes from a quarantined row or lacks a subject or
    code (``ReconciliationError`` otherwise); returns the quarantined rows (opted-out ones excluded). ``ranges``:
    the table's ranges of lines (:func:`foresight.warehouse.slices.line_ranges`)."""
    n_raw, n_q = con.execute(
        f"SELECT count(*), count(v._quarantine) FILTER (WHERE true {keep('v')}) FROM v_{table} v").fetchall()[0]
    # a GROUP BY, not count(DISTINCT _line): DuckDB spills a grouping beyond the budget but holds a DISTINCT
    # aggregate whole (the 1,000x MIMIC demo's 36M emar lines ran a 1 GB budget out of memory here)
    dups = sum(con.execute(f"SELECT count(*) FROM (SELECT _line FROM v_{table} WHERE {within} GROUP BY _line "
                           "HAVING count(*) > 1)").fetchall()[0][0] for within in ranges)
    staged = con.execute(f"SELECT count(*) FROM raw_{table}").fetchall()[0][0]
    if n_raw != staged or dups:
        raise ReconciliationError(f"{file}: validation produced {n_raw} rows for {staged} read")
    # the quarantined lines are few: a semi join on them, not a hash join of every event with every row (its
    # hash table for the 1,000x demo's 24M emar events needed one 256 MiB block and ran a 1 GB budget out)
    bad = con.execute(
        f"""SELECT count(*) FROM e_{table} e WHERE e.subject_id IS NULL OR e.code IS NULL
            OR e._line IN (SELECT _line FROM v_{table} WHERE _quarantine IS NOT NULL)"""
    ).fetchall()[0][0]
    if bad:
        raise ReconciliationError(f"{file}: {bad} events from quarantined rows or with NULL subject/code")
    return int(n_q)


def field_warnings(con: duckdb.DuckDBPyConnection, table: str, v_cols: set[str], keep: Keep, file: str,
                   *, show: int = 5) -> list[str]:
    """One warning for the kept rows of ``table`` whose ``v_<table>._field_issue`` says an optional field failed
    its check and was set to NULL (the row is loaded, so it counts as loaded, not quarantined): how many rows, and
    the first ``show`` lines with their reasons. Empty when the table has no such column or no such row."""
    if "_field_issue" not in v_cols:
        return []
    n, first = con.execute(
        f"""SELECT count(*), list('line ' || _line || ': ' || _field_issue ORDER BY _line)[:{int(show)}]
            FROM v_{table} v WHERE v._field_issue IS NOT NULL AND v._quarantine IS NULL {keep("v")}"""
    ).fetchall()[0]
    if not n:
        return []
    more = f"; ... ({n - len(first)} more)" if n > len(first) else ""
    return [f"{file}: {n} row(s) kept with an invalid optional field set to NULL: " + "; ".join(first) + more]


def line_outcomes(con: duckdb.DuckDBPyConnection, table: str, keep: Keep, has_notes: bool, n_optout: int, file: str,
                  ranges: list[str]) -> tuple[dict[str, int], int]:
    """(rows dropped by reason, lines loaded): valid rows that produced nothing (their ``_drop`` reason) plus the
    opted-out lines, and the valid lines that produced something (events, or for note tables notes).
    ``ReconciliationError`` when a valid row produced nothing and has no reason. ``ranges``: as for
    :func:`check_validation`."""
    # one grouping by line over the valid rows and the produced lines, a range of lines at a time: its hash table
    # stays a range's size whatever the table's (one grouping over the 108M labevents lines of 1,000x the MIMIC
    # demo ran a 1 GB budget out of memory beside the next group's scan). Joins of the rows with the produced
    # lines, and a separate count of the distinct produced lines, each asked DuckDB for one 256 MiB block at the
    # 1,000x demo's 24M emar events and ran a 1 GB budget out of memory.
    dropped: dict[str, int] = {}
    loaded = 0
    for within in ranges:
        notes = f"UNION ALL SELECT _line, NULL, 1 FROM n_{table} WHERE {within}" if has_notes else ""
        for reason, n, k in con.execute(
            f"""
            SELECT coalesce(reason, 'UNEXPLAINED'), count(*) FILTER (WHERE NOT produced),
                   count(*) FILTER (WHERE produced)
            FROM (
                SELECT any_value(_drop) FILTER (WHERE src = 0) AS reason, bool_or(src = 0) AS valid,
                       bool_or(src = 1) AS produced
                FROM (SELECT _line, _drop, 0 AS src FROM v_{table} v
                      WHERE v._quarantine IS NULL {keep("v")} AND {within}
                      UNION ALL SELECT _line, NULL, 1 FROM e_{table} WHERE {within} {notes})
                GROUP BY _line)
            WHERE valid
            GROUP BY ALL
            """
        ).fetchall():
            if n:
                dropped[reason] = dropped.get(reason, 0) + int(n)
            loaded += int(k)
    if n_optout:
        dropped[OPT_OUT_REASON] = dropped.get(OPT_OUT_REASON, 0) + n_optout
    if "UNEXPLAINED" in dropped:
        raise ReconciliationError(
            f"{file}: {dropped['UNEXPLAINED']} valid rows produced no event and have no drop reason"
        )
    return dropped, loaded


def stage_notes(con: duckdb.DuckDBPyConnection, table: str, keep: Keep, *, run_id: str, source: str, file: str
                ) -> int:
    """Check and stage the notes of ``n_<table>``; returns how many."""
    bad_notes = con.execute(
        f"""SELECT count(*) FROM n_{table} n JOIN v_{table} v USING (_line)
            WHERE v._quarantine IS NOT NULL OR n.subject_id IS NULL OR n.text IS NULL"""
    ).fetchall()[0][0]
    if bad_notes:
        raise ReconciliationError(f"{file}: {bad_notes} notes from quarantined rows or without subject/text")
    return int(con.execute(
        f"""
        INSERT INTO staged_notes
        SELECT subject_id, time, note_id, note_type, encounter_id, text, ?, ?, ? FROM n_{table} x
        WHERE true {keep("x")}
        """,
        [source, table, run_id],
    ).fetchall()[0][0])


def stage_events(con: duckdb.DuckDBPyConnection, table: str, keep: Keep, *, run_id: str, source: str) -> int:
    """Move the events of ``e_<table>`` into the staging area; returns how many."""
    return int(con.execute(
        f"""
        INSERT INTO staged_events
        SELECT subject_id, time, code, numeric_value, text_value, unit, encounter_id, ?, ?, ?
        FROM e_{table} x WHERE true {keep("x")}
        """,
        [source, table, run_id],
    ).fetchall()[0][0])


def settle(res: TableResult, *, loaded: int, quarantined: int, dropped: dict[str, int], events: int) -> TableResult:
    """Record the table's counts; ``ReconciliationError`` unless read = loaded + quarantined + dropped."""
    res.rows_loaded = loaded
    res.rows_quarantined += quarantined
    res.rows_dropped = sum(dropped.values())
    res.dropped_reasons = {f"{res.table}: {k}": v for k, v in dropped.items()}
    res.events = events
    if res.rows_read != res.rows_loaded + res.rows_quarantined + res.rows_dropped:
        raise ReconciliationError(
            f"{res.file}: read {res.rows_read} != loaded {res.rows_loaded} + quarantined "
            f"{res.rows_quarantined} + dropped {res.rows_dropped}"
        )
    return res
