"""The load session: one staged, all-or-nothing load of a source into the warehouse.

See :mod:`foresight.warehouse` for the contract every source adapter follows (stage, account, publish). The
per-table accounting steps are in :mod:`foresight.warehouse.accounting`, the transaction's steps in
:mod:`foresight.warehouse.publish`, the CSV reader in :mod:`foresight.warehouse.csv_scan`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from foresight import sql
from foresight.hashing import sha256_file
from foresight.optout import OPT_OUT_REASON
from foresight.optout import digest as optout_digest
from foresight.purposes import Declaration, record_load
from foresight.warehouse import accounting
from foresight.warehouse import publish as commit
from foresight.warehouse.connection import ident
from foresight.warehouse.csv_scan import physical_lines, scan_csv
from foresight.warehouse.reconciliation import reconcile
from foresight.warehouse.results import CsvScan, LoadSummary, SourceError, TableResult
from foresight.warehouse.shard_filter import check_shard, set_aside_other_shards
from foresight.warehouse.slices import line_ranges, run_script


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
        declaration: Declaration | None = None,
        shard: tuple[int, int] | None = None,
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
        self.csv_paths: dict[str, Path] = {}  # table -> CSV file read, for physical line numbers in quarantine
        self.missing_tables: list[str] = []
        self.warnings: list[str] = []
        # Raw scans and staged rows live in the load's staging database file (``fs_stage``, beside the warehouse;
        # see commit.attach_staging): on disk, so memory stays flat however big the load, and visible to every
        # cursor of this connection, so files can be scanned on a second thread. The per-table validation tables
        # (``v_<table>``) are there too: as TEMP tables they cost malloc'd memory in proportion to their rows outside
        # DuckDB's budget (300x the MIMIC demo at 1 GB: peak 1,351 -> 1,181 MiB on disk); the views over them stay TEMP.
        self.staging_file = commit.attach_staging(con)
        con.execute("SET search_path = 'main,fs_stage.main'")
        con.execute(sql.load("common", "staging"))
        # national data opt-out: subject ids whose rows are dropped (see the module docstring)
        self.excluded_subjects: frozenset[int] = frozenset(int(s) for s in exclude_subjects or ())
        # who provided the data and what for (foresight.purposes); None: recorded as undeclared
        self.declaration = declaration
        # one shard (k, n) of a sharded load: only rows of subjects whose shard hash is k (warehouse.shard_filter)
        self.shard = check_shard(shard) if shard is not None else None
        if self.excluded_subjects:
            con.execute("INSERT INTO fs_optout SELECT unnest(?::BIGINT[])", [sorted(self.excluded_subjects)])

    # -- inputs --

    def relpath(self, path: Path) -> str:
        """``path`` relative to the input (an input that is one file, a notes CSV, names itself, not ".")."""
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
        invalid UTF-8, an over-long line) and the unreadable tail of a damaged gzip are quarantined with their
        physical line number. ``_line`` is the row's record number (header = 1); :meth:`finish_table` gives
        quarantined rows their physical line (see :mod:`~foresight.warehouse.csv_scan`).
        """
        return scan_csv(self.con, table, path, self.relpath(path), columns, optional_columns=optional_columns,
                        ignored_columns=ignored_columns)

    def register_scan(self, scan: CsvScan) -> int:
        """Record a finished :meth:`scan_csv` in this load (checksum, quarantine, warnings)."""
        self.reset_table(scan.table)
        if scan.sha256:  # multi-file tables (FHIR, MEDS shards) record each file's checksum themselves
            self.checksums[scan.file] = scan.sha256
        if scan.path is not None:
            self.csv_paths[scan.table] = scan.path
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
        table = ident(table)
        self.reset_table(table)
        self.tables[table] = TableResult(table=table, file=file, sha256="")
        cols = ", ".join(f'NULL::VARCHAR AS "{c}"' for c in columns)
        self.con.execute(
            f"CREATE OR REPLACE TABLE fs_stage.raw_{table} AS SELECT NULL::BIGINT AS _line, {cols} LIMIT 0"
        )
        self.missing_tables.append(file)

    def reopen_staging(self) -> None:
        """Release DuckDB's in-memory bookkeeping of the staging file's tables (it grows with the rows staged) by
        detaching and re-attaching the file; call it between table groups, with no scan in flight
        (:func:`~foresight.warehouse.publish.reopen_staging`)."""
        commit.reopen_staging(self.con)

    def execute_script(self, text: str) -> None:
        """Run a source's staging SQL (several statements); validation statements marked ``-- sliced by line:
        raw_<table>`` are written in slices of lines, so no statement's bookkeeping grows with the input
        (:mod:`~foresight.warehouse.slices`)."""
        run_script(self.con, text)

    # -- per-table accounting --

    def reset_table(self, table: str) -> None:
        """Forget anything staged for ``table`` (used when a table is retried)."""
        self.con.execute("DELETE FROM staged_events WHERE source_table = ?", [table])
        self.con.execute("DELETE FROM staged_quarantine WHERE source_table = ?", [table])
        self.con.execute("DELETE FROM staged_notes WHERE source_table = ?", [table])
        self.tables.pop(table, None)
        self.csv_paths.pop(table, None)

    def finish_table(self, table: str) -> TableResult:
        """Account for every staged row of ``table`` and move its events into the staging area.

        Expects tables ``fs_stage.v_<table>(_line, _quarantine, _drop, ...)`` with one row per raw row, and TEMP
        views ``e_<table>(_line, subject_id, time, code, numeric_value, text_value, unit, encounter_id)``.
        Rows with a ``_quarantine`` reason are quarantined (raw row kept as JSON); rows that produced no
        event (nor note) must carry a ``_drop`` reason. Raises ``ReconciliationError`` otherwise.

        Optional: ``v_<table>`` columns ``_source_file``/``_source_row`` name the file and row a quarantined row
        came from (multi-file inputs; default: the table's file and ``_line``), ``_field_issue`` says why an
        optional field of a kept row was set to NULL (reported in ``warnings``; the row counts as loaded), and a
        TEMP view ``n_<table>(_line, subject_id, time, note_id, note_type, encounter_id, text)`` stages free-text
        notes; a row that produced a note counts as loaded. Rows of opted-out subjects are dropped (see the module
        docstring); the steps are in :mod:`foresight.warehouse.accounting`.
        """
        table = ident(table)
        res = self.tables[table]
        con, run = self.con, {"run_id": self.run_id, "source": self.source}
        v_cols, has_notes = accounting.table_shape(con, table)
        n_optout, keep = accounting.optout_lines(con, table, v_cols, has_notes, bool(self.excluded_subjects))
        if self.shard is not None:
            n_optout, keep = set_aside_other_shards(con, table, v_cols, has_notes, self.shard, res, n_optout, keep)
        lines = self.physical_lines(table, v_cols)
        accounting.stage_quarantine(con, table, v_cols, keep, file=res.file, lines=lines, **run)
        ranges = line_ranges(con, f"v_{table}")  # both groupings by line run a range of lines at a time
        n_q = accounting.check_validation(con, table, keep, res.file, ranges)
        self.warnings.extend(accounting.field_warnings(con, table, v_cols, keep, res.file))
        dropped, loaded = accounting.line_outcomes(con, table, keep, has_notes, n_optout, res.file, ranges)
        if has_notes:
            res.notes = accounting.stage_notes(con, table, keep, file=res.file, **run)
        events = accounting.stage_events(con, table, keep, **run)
        return accounting.settle(res, loaded=loaded, quarantined=n_q, dropped=dropped, events=events)

    def physical_lines(self, table: str, v_cols: set[str]) -> dict[int, int]:
        """{record number: physical line} for the quarantined rows of a table read from one CSV file (empty for
        other tables): one pass over the file up to its last quarantined row (see :mod:`~.csv_scan`)."""
        path = self.csv_paths.get(table)
        if path is None or "_source_row" in v_cols:
            return {}
        records = [r[0] for r in self.con.execute(
            f"SELECT DISTINCT _line FROM v_{table} WHERE _quarantine IS NOT NULL").fetchall()]
        of_record, _ = physical_lines(path, records=records)
        return {r: line for r, line in of_record.items() if r != line}

    def drop_staging(self, tables: Iterable[str]) -> None:
        """Free the staging tables and views of finished input tables (big loads would otherwise keep them)."""
        for t in tables:
            t = ident(t)
            self.con.execute(
                f"DROP VIEW IF EXISTS e_{t}; DROP VIEW IF EXISTS n_{t}; DROP TABLE IF EXISTS fs_stage.raw_{t}; "
                f"DROP TABLE IF EXISTS fs_stage.v_{t}"
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
        flow runs that check as its own task instead). The steps are in :mod:`foresight.warehouse.publish`.
        """
        con = self.con
        counts, dropped_reasons = commit.totals(self.tables.values())
        con.execute("BEGIN TRANSACTION")
        try:
            commit.replace_rows(con, self.source)
            commit.write_codes(con, self.source)
            commit.write_splits(con)
            subjects, by_kind = commit.staged_counts(con)
            seconds = time.perf_counter() - self._t0
            commit.record_run(con, {
                "run_id": self.run_id, "source": self.source, "source_kind": self.source_kind,
                "input_path": str(self.input_path), "checksums": self.checksums, "started_at": self.started_at,
                **counts, "dropped_reasons": dropped_reasons, "subjects": subjects,
                "missing_tables": self.missing_tables,
            }, self.tables.values())
            record_load(con, self.run_id, self.declaration,
                        optout_digest(self.excluded_subjects) if self.excluded_subjects else None)
            con.execute("COMMIT")
        except BaseException as exc:
            rollback(con, exc)
            raise
        self._warn_optout()
        commit.drop_staging_area(con)
        commit.checkpoint(con, self.warnings)
        if check:
            reconcile(con, self.run_id)
        return LoadSummary(
            run_id=self.run_id, source=self.source, source_kind=self.source_kind, db=commit.database_path(con),
            input_path=str(self.input_path), subjects=subjects, events=counts["events"], events_by_kind=by_kind,
            rows_read=counts["rows_read"], rows_loaded=counts["rows_loaded"],
            rows_quarantined=counts["rows_quarantined"], rows_dropped=counts["rows_dropped"],
            dropped_reasons=dropped_reasons, seconds=round(seconds, 3), tables=list(self.tables.values()),
            missing_tables=self.missing_tables, warnings=self.warnings,
            notes=sum(t.notes for t in self.tables.values()),
        )

    def _warn_optout(self) -> None:
        opted_out = sum(t.dropped_reasons.get(f"{t.table}: {OPT_OUT_REASON}", 0) for t in self.tables.values())
        if self.excluded_subjects:
            self.warnings.append(f"{OPT_OUT_REASON}: {len(self.excluded_subjects)} subject(s) listed, "
                                 f"{opted_out} row(s) dropped")


def rollback(con: duckdb.DuckDBPyConnection, cause: BaseException) -> None:
    """Roll back after ``cause`` without hiding it. DuckDB aborts a transaction itself on some errors (an I/O
    error such as "No space left on device" during the commit), and then ROLLBACK fails with "no transaction is
    active": that second error is added to the cause as a note, and the caller re-raises the cause."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error as exc:
        cause.add_note(f"(the rollback after it also failed: {exc})")
