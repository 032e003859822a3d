"""The DuckDB event warehouse: connections, transactional loads, lineage and quarantine.

A load is staged, then published. Every source adapter works the same way:

1. ``session = Load(con, source=..., source_kind=..., input_path=...)``
2. per input table: ``session.read_csv(table, path, columns)`` stages the raw rows (bad CSV rows and the
   unreadable tail of a truncated gzip go to quarantine with their line number), the adapter's SQL builds
   ``v_<table>`` (one row per raw row with ``_line``, a ``_quarantine`` reason or NULL and a ``_drop`` reason
   or NULL) and ``e_<table>`` (the events), and ``session.finish_table(table)`` accounts for every row:
   read = loaded + quarantined + dropped, or it raises.
3. ``session.publish(codes_sql)`` replaces this source's rows in ONE transaction (delete its old events and
   quarantine rows, insert the staged ones, add codes, splits and the ``etl_runs`` row) and commits.

Inputs that are not one CSV per table (FHIR bundles, MEDS parquet shards) stage ``fs_stage.raw_<table>``
themselves and account for it with ``register_scan(CsvScan(...))``; their ``v_<table>`` may carry
``_source_file`` and ``_source_row`` so a quarantined row names the exact bundle/shard and its position. A table
may also produce free-text notes (view ``n_<table>``), and a source may stage ``subject_map`` rows
(:meth:`Load.stage_subject_map`) and given splits (:meth:`Load.stage_splits`); all are written by ``publish``.

Staging lives in TEMP tables, outside any transaction, so a failing table can be retried and a crash at any
point before the commit leaves the warehouse exactly as it was.

**National data opt-out.** ``Load(..., exclude_subjects=ids)`` (or, for code that builds the ``Load`` inside a
source adapter, ``with excluding_subjects(ids): module.load(...)``) drops every row of a listed subject in
``finish_table`` with the reason ``national data opt-out``, including rows that would have been quarantined (the
quarantine keeps raw rows, so it would keep their data); their notes and ``subject_map`` rows are not written.
Accounting still balances. See :mod:`foresight.optout`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from foresight.optout import OPT_OUT_REASON
from foresight.schema import (
    EVENT_COLUMNS,
    MEDS_VERSION,
    SQL_MACROS,
    WAREHOUSE_DDL,
    meds_codes_schema,
    meds_data_schema,
    meds_splits_schema,
)
from foresight.version import __version__


class SourceError(Exception):
    """An input that cannot be loaded at all (missing required file, missing column, not a CSV)."""


class ReconciliationError(Exception):
    """Rows read did not equal rows loaded + quarantined + dropped: something would be silently lost."""


# --- connections -------------------------------------------------------------------------------------------


def connect(path: str | Path, *, read_only: bool = False, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) a warehouse file and make sure every table and macro exists.

    ``memory_limit`` defaults to ``$FORESIGHT_DUCKDB_MEMORY`` or 2GB; DuckDB spills to a temp folder beyond it,
    so large loads stay within a predictable footprint.
    """
    path = Path(path)
    if read_only and not path.exists():
        raise FileNotFoundError(f"warehouse {path} does not exist")
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path), read_only=read_only)
    con.execute(f"SET memory_limit = '{memory_limit or os.environ.get('FORESIGHT_DUCKDB_MEMORY', '2GB')}'")
    con.execute("SET preserve_insertion_order = true")  # row numbers of CSV scans follow the file
    con.execute("SET enable_progress_bar = false")  # our CLI shows its own progress on stderr
    if not read_only:
        con.execute(WAREHOUSE_DDL)
    con.execute(SQL_MACROS)
    return con


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (inputs can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _ident(name: str) -> str:
    # Table names are built from fixed source-table names, never from user data; check anyway.
    if not _NAME.match(name):
        raise ValueError(f"not a safe table name: {name!r}")
    return name


def sql_literal(value: str) -> str:
    """A SQL string literal, for the few places DuckDB accepts no bound parameter (table-function options)."""
    return "'" + value.replace("'", "''") + "'"


# --- results -----------------------------------------------------------------------------------------------


@dataclass
class TableResult:
    """Accounting for one input table of a load."""

    table: str
    file: str
    sha256: str
    rows_read: int = 0
    rows_loaded: int = 0
    rows_quarantined: int = 0
    rows_dropped: int = 0
    events: int = 0
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    notes: int = 0


@dataclass(frozen=True)
class CsvScan:
    """What :meth:`Load.scan_csv` read: row count, quarantined lines (line, reason, raw), unknown columns."""

    table: str
    file: str
    sha256: str
    rows: int
    quarantine: list[tuple[int, str, str]]
    unknown_columns: list[str]


@dataclass
class LoadSummary:
    """What a load did; ``to_json()`` is the ``--json`` contract shared by every source."""

    run_id: str
    source: str
    source_kind: str
    db: str
    input_path: str
    subjects: int
    events: int
    events_by_kind: dict[str, int]
    rows_read: int
    rows_loaded: int
    rows_quarantined: int
    rows_dropped: int
    dropped_reasons: dict[str, int]
    seconds: float
    tables: list[TableResult]
    missing_tables: list[str]
    warnings: list[str]
    notes: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tables"] = {t.table: {k: v for k, v in asdict(t).items() if k != "table"} for t in self.tables}
        return d


# --- the load session --------------------------------------------------------------------------------------

# The opt-out list a Load uses when it is not given one: set by `excluding_subjects`, so every source adapter
# honours the opt-out without each of them passing it through.
_EXCLUDED_SUBJECTS: ContextVar[frozenset[int] | None] = ContextVar("foresight_excluded_subjects", default=None)


@contextmanager
def excluding_subjects(subject_ids: Iterable[int] | None) -> Iterator[None]:
    """Within the block, every :class:`Load` created without ``exclude_subjects`` drops these subjects' rows."""
    token = _EXCLUDED_SUBJECTS.set(frozenset(int(s) for s in subject_ids) if subject_ids else None)
    try:
        yield
    finally:
        _EXCLUDED_SUBJECTS.reset(token)


class Load:
    """One staged, all-or-nothing load of a source into the warehouse (see module docstring)."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        *,
        source: str,
        source_kind: str,
        input_path: str | Path,
        exclude_subjects: Iterable[int] | None = None,
    ) -> None:
        self.con = con
        self.source = source
        self.source_kind = source_kind
        self.input_path = Path(input_path)
        self.run_id = f"{source_kind}-{datetime.now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.started_at = datetime.now()
        self._t0 = time.perf_counter()
        self.tables: dict[str, TableResult] = {}
        self.checksums: dict[str, str] = {}
        self.missing_tables: list[str] = []
        self.warnings: list[str] = []
        # Raw scans live in an attached in-memory database, visible to every cursor of this connection,
        # so files can be scanned on a second thread; the rest of the staging is connection-local TEMP.
        con.execute("ATTACH IF NOT EXISTS ':memory:' AS fs_stage")
        con.execute("SET search_path = 'main,fs_stage.main'")
        con.execute(
            """
            CREATE OR REPLACE TEMP TABLE staged_events AS SELECT * FROM events LIMIT 0;
            -- source_table: which input table staged the row, so a retried table can forget exactly its own rows
            -- (multi-file tables name a different source_file per row)
            CREATE OR REPLACE TEMP TABLE staged_quarantine AS
                SELECT *, NULL::VARCHAR AS source_table FROM quarantine LIMIT 0;
            CREATE OR REPLACE TEMP TABLE staged_codes (
                code VARCHAR, description VARCHAR, parent_codes VARCHAR[], priority INTEGER);
            CREATE OR REPLACE TEMP TABLE staged_notes AS SELECT * FROM notes LIMIT 0;
            CREATE OR REPLACE TEMP TABLE staged_subject_map AS SELECT * FROM subject_map LIMIT 0;
            CREATE OR REPLACE TEMP TABLE staged_splits AS SELECT * FROM subject_splits LIMIT 0;
            """
        )
        # national data opt-out: subject ids whose rows are dropped (see the module docstring)
        excluded = _EXCLUDED_SUBJECTS.get() if exclude_subjects is None else frozenset(exclude_subjects)
        self.excluded_subjects: frozenset[int] = frozenset(int(s) for s in excluded or ())
        con.execute("CREATE OR REPLACE TEMP TABLE fs_optout (subject_id BIGINT PRIMARY KEY)")
        if self.excluded_subjects:
            con.execute("INSERT INTO fs_optout SELECT unnest(?::BIGINT[])", [sorted(self.excluded_subjects)])

    # -- inputs --

    def relpath(self, path: Path) -> str:
        # An input that is one file (a notes CSV) names itself, not ".".
        base = self.input_path.parent if self.input_path.is_file() else self.input_path
        try:
            return str(path.relative_to(base))
        except ValueError:
            return str(path)

    def checksum(self, path: Path) -> str:
        """Record (and return) the sha256 of an input file for lineage."""
        key = self.relpath(path)
        if key not in self.checksums:
            self.checksums[key] = sha256_file(path)
        return self.checksums[key]

    def scan_csv(
        self,
        table: str,
        path: Path,
        columns: Sequence[str],
        *,
        optional_columns: Sequence[str] = (),
        ignored_columns: Sequence[str] = (),
    ) -> CsvScan:
        """Read ``path`` into ``fs_stage.raw_<table>(_line, <columns>)``, every column VARCHAR.

        Thread-safe: it works on its own cursor and touches no session state, so a source can scan the next
        files while the main thread validates earlier ones. Pass the result to :meth:`register_scan`.

        ``columns`` must be in the header (else ``SourceError`` naming the file and the column);
        ``optional_columns`` are NULL when absent; header columns in neither list nor ``ignored_columns``
        are reported as unknown. Rows the CSV reader cannot parse (too many/few fields, broken quotes,
        invalid UTF-8) and the unreadable tail of a truncated gzip are quarantined with their line number.
        ``_line`` is the row's line in the file (header = line 1).
        """
        table = _ident(table)
        file = self.relpath(path)
        sha = sha256_file(path)
        header = _read_header(path)
        missing = [c for c in columns if c not in header]
        if missing:
            raise SourceError(f"{path}: missing required column(s) {missing}; header has {header}")
        known = set(columns) | set(optional_columns) | set(ignored_columns)
        unknown = [c for c in header if c not in known]

        wanted = [c for c in (*columns, *optional_columns) if c in header]
        absent = [c for c in optional_columns if c not in header]
        col_types = "{" + ", ".join(f"{sql_literal(c)}: 'VARCHAR'" for c in header) + "}"
        select = ", ".join(f'"{c}"' for c in wanted) + "".join(f', NULL::VARCHAR AS "{c}"' for c in absent)
        rej, scan = f"rej_{table}", f"rejscan_{table}"
        cur = self.con.cursor()

        def scan_into_raw(read_path: Path) -> None:
            cur.execute(
                f"""
                CREATE OR REPLACE TABLE fs_stage.raw_{table} AS
                SELECT row_number() OVER () + 1 AS _line, {select}
                FROM read_csv({sql_literal(str(read_path))}, columns = {col_types}, header = true,
                              auto_detect = false, delim = ',', quote = '"', escape = '"',
                              store_rejects = true, rejects_table = '{rej}', rejects_scan = '{scan}',
                              rejects_limit = 0)
                """
            )

        truncation = None
        try:
            try:
                scan_into_raw(path)
            except duckdb.Error as exc:
                # A damaged gzip stream fails the whole scan. Only then is the file decompressed here, to keep
                # the complete lines before the damage and quarantine the rest (sound files cost nothing).
                truncation = _check_gzip(path) if path.suffix == ".gz" else None
                if truncation is None:
                    raise SourceError(f"{path}: cannot be read as CSV: {exc}") from exc
                try:
                    scan_into_raw(truncation.recovered_file)
                except duckdb.Error as exc2:
                    raise SourceError(f"{path}: cannot be read as CSV: {exc2}") from exc2
                finally:
                    truncation.recovered_file.unlink(missing_ok=True)

            # DuckDB may report several errors for one line (one per missing column): one row each.
            rejects = cur.execute(
                f"""SELECT line, arg_min(error_type || ' (' || error_message || ')', column_idx), any_value(csv_line)
                    FROM {rej} GROUP BY line ORDER BY line"""
            ).fetchall()
            if rejects:
                # _line so far is row number + 1. Map it back to the file line: good row r sits after every
                # rejected line L_i (i-th reject, 0-based) for which L_i - 2 - i < r (the lines before L_i,
                # minus the header, minus the earlier rejects, are good rows).
                cur.execute(
                    f"""
                    UPDATE fs_stage.raw_{table} SET _line = _line + (
                        SELECT count(*) FROM (
                            SELECT line - 2 - (row_number() OVER (ORDER BY line) - 1) AS good_before
                            FROM (SELECT DISTINCT line FROM {rej})
                        ) m WHERE m.good_before < fs_stage.raw_{table}._line - 1)
                    """
                )
            cur.execute(f"DROP TABLE {rej}; DROP TABLE {scan}")
            n_rows = cur.execute(f"SELECT count(*) FROM fs_stage.raw_{table}").fetchall()[0][0]
        finally:
            cur.close()
        quarantine = [(line, f"unparseable CSV row: {why}", raw) for line, why, raw in rejects]
        if truncation is not None:
            # The partial last line is one row read and quarantined; whatever followed it is unrecoverable
            # and the reason says so, so the loss is visible rather than silent.
            line = truncation.lines_recovered + 1
            quarantine.append((
                line,
                f"truncated gzip stream ({truncation.error}): file ends inside line {line}; "
                "any rows after it are unrecoverable",
                truncation.partial_line,
            ))
        return CsvScan(table, file, sha, n_rows, quarantine, unknown)

    def register_scan(self, scan: CsvScan) -> int:
        """Record a finished :meth:`scan_csv` in this load (checksum, quarantine, warnings)."""
        self.reset_table(scan.table)
        if scan.sha256:  # multi-file tables (FHIR, MEDS shards) record each file's checksum themselves
            self.checksums[scan.file] = scan.sha256
        self.tables[scan.table] = TableResult(
            table=scan.table,
            file=scan.file,
            sha256=scan.sha256,
            rows_read=scan.rows + len(scan.quarantine),
            rows_quarantined=len(scan.quarantine),
        )
        if scan.quarantine:
            self.con.executemany(
                "INSERT INTO staged_quarantine VALUES (?, ?, ?, ?, ?, ?, ?)",
                [[self.run_id, self.source, scan.file, line, why, raw, scan.table]
                 for line, why, raw in scan.quarantine],
            )
        if scan.unknown_columns:
            self.warnings.append(f"{scan.file}: ignored unknown column(s) {scan.unknown_columns}")
        return scan.rows

    def read_csv(
        self,
        table: str,
        path: Path,
        columns: Sequence[str],
        *,
        optional_columns: Sequence[str] = (),
        ignored_columns: Sequence[str] = (),
    ) -> int:
        """:meth:`scan_csv` then :meth:`register_scan`; returns the rows staged."""
        return self.register_scan(
            self.scan_csv(table, path, columns, optional_columns=optional_columns, ignored_columns=ignored_columns)
        )

    def empty_table(self, table: str, file: str, columns: Sequence[str]) -> None:
        """Stage an absent optional input as an empty ``raw_<table>``, so the SQL runs unchanged.

        The absence is recorded in the summary (``missing_tables``), not treated as an error.
        """
        table = _ident(table)
        self.reset_table(table)
        self.tables[table] = TableResult(table=table, file=file, sha256="")
        cols = ", ".join(f'NULL::VARCHAR AS "{c}"' for c in columns)
        self.con.execute(
            f"CREATE OR REPLACE TABLE fs_stage.raw_{table} AS SELECT NULL::BIGINT AS _line, {cols} LIMIT 0"
        )
        self.missing_tables.append(file)

    # -- per-table accounting --

    def reset_table(self, table: str) -> None:
        """Forget anything staged for ``table`` (used when a table is retried)."""
        self.con.execute("DELETE FROM staged_events WHERE source_table = ?", [table])
        self.con.execute("DELETE FROM staged_quarantine WHERE source_table = ?", [table])
        self.con.execute("DELETE FROM staged_notes WHERE source_table = ?", [table])
        self.tables.pop(table, None)

    def finish_table(self, table: str) -> TableResult:
        """Account for every staged row of ``table`` and move its events into the staging area.

        Expects TEMP tables ``v_<table>(_line, _quarantine, _drop, ...)`` with one row per raw row, and
        ``e_<table>(_line, subject_id, time, code, numeric_value, text_value, unit, encounter_id)``.
        Rows with a ``_quarantine`` reason are quarantined (raw row kept as JSON); rows that produced no
        event (nor note) must carry a ``_drop`` reason. Raises ``ReconciliationError`` otherwise.

        Optional: ``v_<table>`` columns ``_source_file``/``_source_row`` name the file and row a quarantined row
        came from (multi-file inputs; default: the table's file and ``_line``), and a TEMP view
        ``n_<table>(_line, subject_id, time, note_id, note_type, encounter_id, text)`` stages free-text notes; a
        row that produced a note counts as loaded.
        """
        table = _ident(table)
        res = self.tables[table]
        con = self.con
        v_cols = {r[0] for r in con.execute(f"DESCRIBE v_{table}").fetchall()}
        file_expr = "coalesce(v._source_file, ?)" if "_source_file" in v_cols else "?"
        row_expr = "v._source_row" if "_source_row" in v_cols else "v._line"
        has_notes = bool(con.execute(
            "SELECT 1 FROM duckdb_views() WHERE view_name = ? AND temporary", [f"n_{table}"]
        ).fetchall())
        n_optout, keep = self._optout_lines(table, v_cols, has_notes)
        con.execute(
            f"""
            INSERT INTO staged_quarantine
            SELECT ?, ?, {file_expr}, {row_expr}, v._quarantine, to_json(r), ?
            FROM v_{table} v JOIN raw_{table} r USING (_line)
            WHERE v._quarantine IS NOT NULL {keep("v")};
            """,
            [self.run_id, self.source, res.file, table],
        )
        # every line that produced something: events, or (for note tables) notes
        produced = (f"(SELECT _line FROM e_{table} x WHERE true {keep('x')}"
                    + (f" UNION SELECT _line FROM n_{table} x WHERE true {keep('x')})" if has_notes else ")"))
        n_raw, n_q, dups = con.execute(
            f"SELECT count(*), count(v._quarantine) FILTER (WHERE true {keep('v')}), count(*) - count(DISTINCT _line) "
            f"FROM v_{table} v"
        ).fetchall()[0]
        staged = con.execute(f"SELECT count(*) FROM raw_{table}").fetchall()[0][0]
        if n_raw != staged or dups:
            raise ReconciliationError(f"{res.file}: validation produced {n_raw} rows for {staged} read")
        bad = con.execute(
            f"""SELECT count(*) FROM e_{table} e JOIN v_{table} v USING (_line)
                WHERE v._quarantine IS NOT NULL OR e.subject_id IS NULL OR e.code IS NULL"""
        ).fetchall()[0][0]
        if bad:
            raise ReconciliationError(f"{res.file}: {bad} events from quarantined rows or with NULL subject/code")
        drops = con.execute(
            f"""
            SELECT coalesce(v._drop, 'UNEXPLAINED'), count(*)
            FROM v_{table} v
            WHERE v._quarantine IS NULL AND NOT EXISTS (SELECT 1 FROM e_{table} e WHERE e._line = v._line)
              {f"AND NOT EXISTS (SELECT 1 FROM n_{table} n WHERE n._line = v._line)" if has_notes else ""}
              {keep("v")}
            GROUP BY ALL
            """
        ).fetchall()
        dropped = {reason: n for reason, n in drops}
        if n_optout:
            dropped[OPT_OUT_REASON] = dropped.get(OPT_OUT_REASON, 0) + n_optout
        if "UNEXPLAINED" in dropped:
            raise ReconciliationError(
                f"{res.file}: {dropped['UNEXPLAINED']} valid rows produced no event and have no drop reason"
            )
        loaded = con.execute(f"SELECT count(DISTINCT _line) FROM {produced}").fetchall()[0][0]
        if has_notes:
            bad_notes = con.execute(
                f"""SELECT count(*) FROM n_{table} n JOIN v_{table} v USING (_line)
                    WHERE v._quarantine IS NOT NULL OR n.subject_id IS NULL OR n.text IS NULL"""
            ).fetchall()[0][0]
            if bad_notes:
                raise ReconciliationError(
                    f"{res.file}: {bad_notes} notes from quarantined rows or without subject/text"
                )
            res.notes = con.execute(
                f"""
                INSERT INTO staged_notes
                SELECT subject_id, time, note_id, note_type, encounter_id, text, ?, ?, ? FROM n_{table} x
                WHERE true {keep("x")}
                """,
                [self.source, table, self.run_id],
            ).fetchall()[0][0]
        n_events = con.execute(
            f"""
            INSERT INTO staged_events
            SELECT subject_id, time, code, numeric_value, text_value, unit, encounter_id, ?, ?, ?
            FROM e_{table} x WHERE true {keep("x")}
            """,
            [self.source, table, self.run_id],
        ).fetchall()[0][0]
        res.rows_loaded = loaded
        res.rows_quarantined += n_q
        res.rows_dropped = sum(dropped.values())
        res.dropped_reasons = {f"{table}: {k}": v for k, v in dropped.items()}
        res.events = n_events
        if res.rows_read != res.rows_loaded + res.rows_quarantined + res.rows_dropped:
            raise ReconciliationError(
                f"{res.file}: read {res.rows_read} != loaded {res.rows_loaded} + quarantined "
                f"{res.rows_quarantined} + dropped {res.rows_dropped}"
            )
        return res

    def _optout_lines(self, table: str, v_cols: set[str], has_notes: bool) -> tuple[int, Any]:
        """Lines of ``table`` that belong to opted-out subjects (TEMP ``optout_lines``) and a SQL filter maker.

        A line is opted out when it produced an event or note of a listed subject, or when ``v_<table>`` has a
        ``subject_id`` column naming one (so their invalid rows are dropped rather than quarantined). Returns
        (line count, ``keep(alias)`` giving ``AND <alias>._line NOT IN optout_lines``, or "" with no list).
        """
        if not self.excluded_subjects:
            return 0, lambda alias: ""
        optout = "(SELECT subject_id FROM fs_optout)"
        parts = [f"SELECT _line FROM e_{table} WHERE subject_id IN {optout}"]
        if has_notes:
            parts.append(f"SELECT _line FROM n_{table} WHERE subject_id IN {optout}")
        if "subject_id" in v_cols:
            parts.append(f"SELECT _line FROM v_{table} WHERE TRY_CAST(subject_id AS BIGINT) IN {optout}")
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE optout_lines AS {' UNION '.join(parts)}")
        n = self.con.execute("SELECT count(*) FROM optout_lines").fetchall()[0][0]
        return int(n), lambda alias: f"AND {alias}._line NOT IN (SELECT _line FROM optout_lines)"

    def drop_staging(self, tables: Iterable[str]) -> None:
        """Free the TEMP tables of finished input tables (big loads would otherwise hold them in memory)."""
        for t in tables:
            t = _ident(t)
            self.con.execute(
                f"DROP VIEW IF EXISTS e_{t}; DROP VIEW IF EXISTS n_{t}; DROP TABLE IF EXISTS fs_stage.raw_{t}; "
                f"DROP TABLE IF EXISTS v_{t}"
            )

    def add_codes(
        self, sql: str, params: dict[str, Any] | None = None, *, priority: int = 0, only_needed: bool = False
    ) -> None:
        """Stage code metadata: ``sql`` selects (code, description, parent_codes). Higher priority wins.

        ``only_needed`` keeps just the codes staged so far and their possible ancestors (every prefix of a
        code's value), so a 100k-row dictionary costs a scan, not 100k staged rows. Use it once every table
        is staged.
        """
        where = ""
        if only_needed:
            self.con.execute(
                """
                CREATE OR REPLACE TEMP TABLE needed_codes AS
                WITH c AS (SELECT DISTINCT code FROM staged_events)
                SELECT code FROM c
                UNION
                SELECT prefix || left(value, n) FROM (
                    SELECT left(code, length(code) - length(split_part(code, '//', -1))) AS prefix,
                           split_part(code, '//', -1) AS value FROM c WHERE code LIKE '%//%'
                ) CROSS JOIN LATERAL (SELECT unnest(range(1, length(value))) AS n)
                """
            )
            where = "WHERE c.code IN (SELECT code FROM needed_codes)"
        self.con.execute(
            f"INSERT INTO staged_codes SELECT c.*, {int(priority)} "
            f"FROM ({sql}) c(code, description, parent_codes) {where}",
            params or {},
        )

    def stage_subject_map(self, sql: str, params: dict[str, Any] | None = None) -> None:
        """Stage ``subject_map`` rows: ``sql`` selects (source_id, subject_id) for this load's source.

        Written in publish's transaction (existing rows are kept). Raises ``SourceError`` if one subject id would
        stand for two different source ids, in this load or against the warehouse's map (a hash collision).
        """
        self.con.execute("DELETE FROM staged_subject_map WHERE source = $source", {"source": self.source})
        self.con.execute(
            f"INSERT INTO staged_subject_map SELECT DISTINCT $source, m.* FROM ({sql}) m(source_id, subject_id)",
            {**(params or {}), "source": self.source},
        )
        clash = self.con.execute(
            """
            SELECT subject_id, list(DISTINCT source_id ORDER BY source_id)[:3]
            FROM (SELECT source_id, subject_id FROM staged_subject_map
                  UNION ALL SELECT source_id, subject_id FROM subject_map
                  WHERE subject_id IN (SELECT subject_id FROM staged_subject_map))
            GROUP BY subject_id HAVING count(DISTINCT source_id) > 1 LIMIT 1
            """
        ).fetchall()
        if clash:
            raise SourceError(f"subject id {clash[0][0]} would stand for several patients {clash[0][1]} "
                              "(hash collision in subject_map); rename one patient id and re-load")

    def stage_splits(self, sql: str, params: dict[str, Any] | None = None) -> None:
        """Stage splits given by the input (``sql`` selects subject_id, split); publish writes them for subjects
        that have no split yet, before the stable-hash default covers the rest."""
        self.con.execute(
            f"INSERT INTO staged_splits SELECT * FROM ({sql}) s(subject_id, split)", params or {}
        )

    # -- publish --

    def publish(self, *, check: bool = True) -> LoadSummary:
        """Replace this source's rows with the staged ones in one transaction and record the run.

        ``check`` re-reads the committed run and raises ``ReconciliationError`` on any mismatch (the Prefect
        flow runs that check as its own task instead).
        """
        con = self.con
        totals = {
            k: sum(getattr(t, k) for t in self.tables.values())
            for k in ("rows_read", "rows_loaded", "rows_quarantined", "rows_dropped", "events")
        }
        dropped_reasons: dict[str, int] = {}
        for t in self.tables.values():
            dropped_reasons.update(t.dropped_reasons)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM events WHERE source = ?", [self.source])
            con.execute("DELETE FROM quarantine WHERE source = ?", [self.source])
            con.execute("INSERT INTO events SELECT * FROM staged_events")
            con.execute("INSERT INTO quarantine SELECT * EXCLUDE (source_table) FROM staged_quarantine")
            con.execute("DELETE FROM notes WHERE source = ?", [self.source])
            con.execute("INSERT INTO notes SELECT * FROM staged_notes")
            con.execute("INSERT OR IGNORE INTO subject_map SELECT * FROM staged_subject_map "
                        "WHERE subject_id NOT IN (SELECT subject_id FROM fs_optout)")
            # an earlier load of this source may have mapped (and split) a subject who has since opted out
            con.execute("DELETE FROM subject_map WHERE source = ? AND subject_id IN (SELECT subject_id FROM fs_optout)",
                        [self.source])
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
                [self.source],
            )
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
            con.execute("DELETE FROM subject_splits WHERE subject_id IN (SELECT subject_id FROM fs_optout) "
                        "AND subject_id NOT IN (SELECT subject_id FROM events)")
            subjects = con.execute("SELECT count(DISTINCT subject_id) FROM staged_events").fetchall()[0][0]
            by_kind = dict(
                con.execute(
                    "SELECT fs_kind(code) AS k, count(*) FROM staged_events GROUP BY k ORDER BY k"
                ).fetchall()
            )
            seconds = time.perf_counter() - self._t0
            con.execute(
                "INSERT INTO etl_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    self.run_id,
                    self.source,
                    self.source_kind,
                    str(self.input_path),
                    json.dumps(self.checksums, sort_keys=True),
                    self.started_at,
                    datetime.now(),
                    totals["rows_read"],
                    totals["rows_loaded"],
                    totals["rows_quarantined"],
                    totals["rows_dropped"],
                    json.dumps(dropped_reasons, sort_keys=True),
                    totals["events"],
                    subjects,
                    json.dumps(self.missing_tables),
                    __version__,
                ],
            )
            con.executemany(
                "INSERT INTO etl_tables VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    [self.run_id, t.table, t.file, t.sha256, t.rows_read, t.rows_loaded,
                     t.rows_quarantined, t.rows_dropped, t.events]
                    for t in self.tables.values()
                ],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        opted_out = sum(t.dropped_reasons.get(f"{t.table}: {OPT_OUT_REASON}", 0) for t in self.tables.values())
        if self.excluded_subjects:
            self.warnings.append(f"{OPT_OUT_REASON}: {len(self.excluded_subjects)} subject(s) listed, "
                                 f"{opted_out} row(s) dropped")
        con.execute("DROP TABLE IF EXISTS fs_optout; DROP TABLE IF EXISTS optout_lines")
        con.execute("DROP TABLE staged_events; DROP TABLE staged_quarantine; DROP TABLE staged_codes; "
                    "DROP TABLE staged_notes; DROP TABLE staged_subject_map; DROP TABLE staged_splits")
        con.execute("SET search_path = 'main'")
        con.execute("DETACH fs_stage")
        if check:
            reconcile(con, self.run_id)
        return LoadSummary(
            run_id=self.run_id,
            source=self.source,
            source_kind=self.source_kind,
            db=str(con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()")
                   .fetchall()[0][0]),
            input_path=str(self.input_path),
            subjects=subjects,
            events=totals["events"],
            events_by_kind=by_kind,
            rows_read=totals["rows_read"],
            rows_loaded=totals["rows_loaded"],
            rows_quarantined=totals["rows_quarantined"],
            rows_dropped=totals["rows_dropped"],
            dropped_reasons=dropped_reasons,
            seconds=round(seconds, 3),
            tables=list(self.tables.values()),
            missing_tables=self.missing_tables,
            warnings=self.warnings,
            notes=sum(t.notes for t in self.tables.values()),
        )


def reconcile(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, int]:
    """Check a published run against the warehouse itself; raise ``ReconciliationError`` on any mismatch.

    Checks: read = loaded + quarantined + dropped (run and every table), the events and quarantine rows
    in the warehouse for this run equal the recorded counts, and every event subject has a split.
    """
    run = con.execute(
        "SELECT rows_read, rows_loaded, rows_quarantined, rows_dropped, events_loaded FROM etl_runs WHERE run_id = ?",
        [run_id],
    ).fetchall()
    if not run:
        raise ReconciliationError(f"no etl_runs row for {run_id}")
    read, loaded, quarantined, dropped, events = run[0]
    problems = []
    if read != loaded + quarantined + dropped:
        problems.append(f"run: read {read} != loaded {loaded} + quarantined {quarantined} + dropped {dropped}")
    for t, r, lo, q, d in con.execute(
        "SELECT source_table, rows_read, rows_loaded, rows_quarantined, rows_dropped FROM etl_tables WHERE run_id = ?",
        [run_id],
    ).fetchall():
        if r != lo + q + d:
            problems.append(f"{t}: read {r} != loaded {lo} + quarantined {q} + dropped {d}")
    n_events = con.execute("SELECT count(*) FROM events WHERE load_id = ?", [run_id]).fetchall()[0][0]
    if n_events != events:
        problems.append(f"events in warehouse {n_events} != recorded {events}")
    n_q = con.execute("SELECT count(*) FROM quarantine WHERE run_id = ?", [run_id]).fetchall()[0][0]
    if n_q != quarantined:
        problems.append(f"quarantine rows {n_q} != recorded {quarantined}")
    no_split = con.execute(
        "SELECT count(DISTINCT subject_id) FROM events WHERE load_id = ? AND subject_id NOT IN "
        "(SELECT subject_id FROM subject_splits)",
        [run_id],
    ).fetchall()[0][0]
    if no_split:
        problems.append(f"{no_split} subjects without a split")
    if problems:
        raise ReconciliationError(f"run {run_id}: " + "; ".join(problems))
    return {"rows_read": read, "rows_loaded": loaded, "rows_quarantined": quarantined,
            "rows_dropped": dropped, "events": events}


# --- gzip integrity ----------------------------------------------------------------------------------------


@dataclass
class _Truncation:
    recovered_file: Path
    lines_recovered: int  # complete lines (header included) written to recovered_file
    partial_line: str
    error: str


def _read_header(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        # Bytes first: a text-mode readline decodes a whole buffer, so a bad byte in a later ROW (which the scan
        # quarantines by line) would fail the header.
        with opener(path, "rb") as fh:
            line = fh.readline().decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot read the header line: {exc}") from exc
    if not line.strip():
        raise SourceError(f"{path}: empty file (no header line)")
    import csv

    return [c.strip() for c in next(csv.reader([line]))]


def _check_gzip(path: Path) -> _Truncation | None:
    """Stream-decompress a gzip file; if it is truncated or corrupt, save the readable complete lines.

    Returns None for a sound file. For a damaged one, the complete lines before the damage are written to a
    temporary CSV (the caller loads them) and the partial last line is returned for quarantine.
    """
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    tail = b""
    fd, tmp = tempfile.mkstemp(suffix=".csv", prefix="foresight-recovered-")
    lines = 0
    error = None
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
            while True:
                block = src.read(1 << 20)
                if not block:
                    if not d.eof:
                        error = "unexpected end of stream"
                    break
                try:
                    data = tail + d.decompress(block)
                except zlib.error as exc:
                    error = f"corrupt data: {exc}"
                    data = tail
                    cut = data.rfind(b"\n") + 1
                    out.write(data[:cut])
                    lines += data[:cut].count(b"\n")
                    tail = data[cut:]
                    break
                cut = data.rfind(b"\n") + 1
                out.write(data[:cut])
                lines += data[:cut].count(b"\n")
                tail = data[cut:]
                if d.eof:
                    # Concatenated gzip members are legal; decode the rest the same way.
                    rest = d.unused_data
                    if rest:
                        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                        data = tail + d.decompress(rest)
                        cut = data.rfind(b"\n") + 1
                        out.write(data[:cut])
                        lines += data[:cut].count(b"\n")
                        tail = data[cut:]
            if error is None:
                return None
    finally:
        if error is None:
            Path(tmp).unlink(missing_ok=True)
    return _Truncation(Path(tmp), lines, tail.decode("utf-8", errors="replace"), error)


# --- MEDS export -------------------------------------------------------------------------------------------


def export_meds(
    con: duckdb.DuckDBPyConnection,
    out: str | Path,
    *,
    dataset_name: str = "foresight",
    subjects_per_shard: int = 10_000,
) -> dict[str, Any]:
    """Write the warehouse as a MEDS v0.4 dataset.

    Layout: ``data/<i>.parquet`` (a subject lives in exactly one shard; rows sorted by subject_id, time with
    static events first), ``metadata/codes.parquet``, ``metadata/subject_splits.parquet`` and
    ``metadata/dataset.json``. Column types follow ``foresight.schema.MEDS_DATA_SCHEMA``.
    """
    import pyarrow.parquet as pq

    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    for old in (out / "data").glob("*.parquet"):
        old.unlink()
    n_subjects = con.execute("SELECT count(DISTINCT subject_id) FROM events").fetchall()[0][0]
    n_shards = max(1, -(-n_subjects // subjects_per_shard))
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE export_shards AS
        SELECT subject_id, (row_number() OVER (ORDER BY subject_id) - 1) // ? AS shard
        FROM (SELECT DISTINCT subject_id FROM events)
        """,
        [subjects_per_shard],
    )
    core = ", ".join(EVENT_COLUMNS[:5])
    data_schema = meds_data_schema()
    rows = 0
    for shard in range(n_shards):
        tbl = con.sql(
            f"""
            SELECT {core} FROM events JOIN export_shards s USING (subject_id)
            WHERE s.shard = ?
            ORDER BY subject_id, time NULLS FIRST, code
            """,
            params=[shard],
        ).to_arrow_table()
        tbl = tbl.cast(data_schema)
        pq.write_table(tbl, out / "data" / f"{shard}.parquet")
        rows += tbl.num_rows
    codes = con.sql(
        "SELECT code, description, parent_codes FROM codes WHERE code IN (SELECT DISTINCT code FROM events) "
        "ORDER BY code"
    ).to_arrow_table().cast(meds_codes_schema())
    pq.write_table(codes, out / "metadata" / "codes.parquet")
    splits = con.sql(
        "SELECT subject_id, split FROM subject_splits WHERE subject_id IN (SELECT subject_id FROM export_shards) "
        "ORDER BY subject_id"
    ).to_arrow_table().cast(meds_splits_schema())
    pq.write_table(splits, out / "metadata" / "subject_splits.parquet")
    con.execute("DROP TABLE export_shards")
    meta = {
        "dataset_name": dataset_name,
        "dataset_version": con.execute("SELECT coalesce(max(run_id), 'empty') FROM etl_runs").fetchall()[0][0],
        "etl_name": "foresight",
        "etl_version": __version__,
        "meds_version": MEDS_VERSION,
        "created_at": datetime.now().isoformat(timespec="seconds"),
    }
    (out / "metadata" / "dataset.json").write_text(json.dumps(meta, indent=2))
    return {"out": str(out), "shards": n_shards, "subjects": n_subjects, "events": rows, "codes": codes.num_rows}
