"""Reading one CSV file (``.csv`` or ``.csv.gz``) into a staged raw table, every row accounted for.

Rows DuckDB's CSV reader cannot parse (too many/few fields, broken quotes, invalid UTF-8) are quarantined with
their line number, and so is the partial last line of a truncated or corrupt gzip stream, whose complete lines
before the damage are still loaded (:func:`check_gzip`).
"""

from __future__ import annotations

import csv
import gzip
import os
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb

from foresight.hashing import sha256_file
from foresight.warehouse.connection import ident, sql_literal
from foresight.warehouse.results import CsvScan, SourceError


def scan_csv(
    con: duckdb.DuckDBPyConnection,
    table: str,
    path: Path,
    file: str,
    columns: Sequence[str],
    *,
    optional_columns: Sequence[str] = (),
    ignored_columns: Sequence[str] = (),
) -> CsvScan:
    """Read ``path`` into ``fs_stage.raw_<table>(_line, <columns>)``, every column VARCHAR; ``file`` names it.

    Thread-safe: it works on its own cursor of ``con``. ``columns`` must be in the header (else ``SourceError``
    naming the file and the column); ``optional_columns`` are NULL when absent; header columns in neither list nor
    ``ignored_columns`` are reported as unknown. ``_line`` is the row's line in the file (header = line 1).
    """
    table = ident(table)
    sha = sha256_file(path)
    header = read_header(path)
    missing = [c for c in columns if c not in header]
    if missing:
        raise SourceError(f"{path}: missing required column(s) {missing}; header has {header}")
    known = set(columns) | set(optional_columns) | set(ignored_columns)
    unknown = [c for c in header if c not in known]
    wanted = [c for c in (*columns, *optional_columns) if c in header]
    absent = [c for c in optional_columns if c not in header]
    select = ", ".join(f'"{c}"' for c in wanted) + "".join(f', NULL::VARCHAR AS "{c}"' for c in absent)
    cur = con.cursor()
    try:
        truncation = _scan_with_recovery(cur, table, path, header, select)
        rejects = _take_rejects(cur, table)
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


def _scan_into_raw(cur: duckdb.DuckDBPyConnection, table: str, read_path: Path, header: list[str], select: str
                   ) -> None:
    """One DuckDB scan of ``read_path`` into ``fs_stage.raw_<table>``; unparseable rows go to ``rej_<table>``."""
    col_types = "{" + ", ".join(f"{sql_literal(c)}: 'VARCHAR'" for c in header) + "}"
    cur.execute(
        f"""
        CREATE OR REPLACE TABLE fs_stage.raw_{table} AS
        SELECT row_number() OVER () + 1 AS _line, {select}
        FROM read_csv({sql_literal(str(read_path))}, columns = {col_types}, header = true,
                      auto_detect = false, delim = ',', quote = '"', escape = '"',
                      store_rejects = true, rejects_table = 'rej_{table}', rejects_scan = 'rejscan_{table}',
                      rejects_limit = 0)
        """
    )


def _scan_with_recovery(cur: duckdb.DuckDBPyConnection, table: str, path: Path, header: list[str], select: str
                        ) -> Truncation | None:
    """Scan the file; if that fails on a damaged gzip stream, scan the complete lines before the damage instead.

    Only a failed scan decompresses the file here (sound files cost nothing). Returns the truncation, or None.
    """
    try:
        _scan_into_raw(cur, table, path, header, select)
        return None
    except duckdb.Error as exc:
        truncation = check_gzip(path) if path.suffix == ".gz" else None
        if truncation is None:
            raise SourceError(f"{path}: cannot be read as CSV: {exc}") from exc
    try:
        _scan_into_raw(cur, table, truncation.recovered_file, header, select)
    except duckdb.Error as exc2:
        raise SourceError(f"{path}: cannot be read as CSV: {exc2}") from exc2
    finally:
        truncation.recovered_file.unlink(missing_ok=True)
    return truncation


def _take_rejects(cur: duckdb.DuckDBPyConnection, table: str) -> list[tuple[int, str, str]]:
    """The rejected lines of the last scan as (line, reason, raw); renumber the good rows to their file lines."""
    rej = f"rej_{table}"
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
    cur.execute(f"DROP TABLE {rej}; DROP TABLE rejscan_{table}")
    return rejects


def read_header(path: Path, *, allow_empty: bool = False) -> list[str]:
    """The column names in the first line of a CSV file (``.gz`` decompressed); ``SourceError`` naming the file
    when it cannot be read, or when it has no header line unless ``allow_empty`` (then ``[]``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        # Bytes first: a text-mode readline decodes a whole buffer, so a bad byte in a later ROW (which the scan
        # quarantines by line) would fail the header.
        with opener(path, "rb") as fh:
            line = fh.readline().decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot read the header line: {exc}") from exc
    if not line.strip() and not allow_empty:
        raise SourceError(f"{path}: empty file (no header line)")
    return [c.strip() for c in next(csv.reader([line]), [])]


# --- gzip integrity ----------------------------------------------------------------------------------------


@dataclass
class Truncation:
    """What :func:`check_gzip` saved of a damaged gzip file."""

    recovered_file: Path
    lines_recovered: int  # complete lines (header included) written to recovered_file
    partial_line: str
    error: str


def check_gzip(path: Path) -> Truncation | None:
    """Stream-decompress a gzip file; if it is truncated or corrupt, save the readable complete lines.

    Returns None for a sound file. For a damaged one, the complete lines before the damage are written to a
    temporary CSV (the caller loads them) and the partial last line is returned for quarantine.
    """
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    tail = b""
    fd, tmp = tempfile.mkstemp(suffix=".csv", prefix="foresight-recovered-")
    lines = 0
    error = None

    def write_lines(data: bytes) -> bytes:
        """Write the complete lines of ``data``; return the incomplete rest."""
        nonlocal lines
        cut = data.rfind(b"\n") + 1
        out.write(data[:cut])
        lines += data[:cut].count(b"\n")
        return data[cut:]

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
                    tail = write_lines(tail)
                    break
                tail = write_lines(data)
                if d.eof and d.unused_data:
                    # Concatenated gzip members are legal; decode the rest the same way.
                    rest = d.unused_data
                    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    tail = write_lines(tail + d.decompress(rest))
            if error is None:
                return None
    finally:
        if error is None:
            Path(tmp).unlink(missing_ok=True)
    return Truncation(Path(tmp), lines, tail.decode("utf-8", errors="replace"), error)
