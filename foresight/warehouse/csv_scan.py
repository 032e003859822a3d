"""Reading one CSV file (``.csv`` or ``.csv.gz``) into a staged raw table, every row accounted for.

Rows DuckDB's CSV reader cannot parse (too many/few fields, broken quotes, invalid UTF-8, a line over its
maximum size) are quarantined with their line number, and so is the partial last line of a truncated or corrupt
gzip stream (or the bytes after its end), whose complete lines before the damage are still loaded
(:func:`check_gzip`). A file the reader cannot read at all is ``SourceError`` naming it and the reason.

Line numbers. A staged row's ``_line`` is its RECORD number (header = 1, blank lines not counted, a quoted field's
line breaks not counted): cheap, and unique, which is all the accounting needs. What a person reads is the
PHYSICAL line in the file, which differs after a quoted field spanning lines or a blank line; DuckDB's own reject
numbers differ again (they count blank lines but not line breaks inside quotes). :func:`physical_lines` maps
both to physical lines with one pass of Python's csv reader over the file, run only for files that have
quarantined rows and only up to the last of them.
"""

from __future__ import annotations

import csv
import gzip
import os
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb

from foresight.hashing import sha256_file
from foresight.warehouse.connection import ident, sql_literal
from foresight.warehouse.inputs import readable_file
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
    ``ignored_columns`` are reported as unknown. ``_line`` is the row's record number (header = 1; see the module
    docstring); the quarantined lines returned carry physical line numbers.
    """
    table = ident(table)
    if not readable_file(path):
        raise SourceError(f"{path}: file missing")
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
    if rejects:  # DuckDB's reject numbers -> record numbers (to renumber the good rows) and physical lines
        _, at = physical_lines(path, duck_lines=[r[0] for r in rejects])
        renumber_rows(con, table, [at.get(line, (line, line))[0] for line, _, _ in rejects])
        quarantine = [(at.get(line, (line, line))[1], why, raw) for line, why, raw in quarantine]
    if truncation is not None:
        # The partial last line is one row read and quarantined; whatever followed it is unrecoverable
        # and the reason says so, so the loss is visible rather than silent.
        quarantine.append((truncation.lines_recovered + 1, truncation.reason(), truncation.partial_line))
    return CsvScan(table, file, sha, n_rows, quarantine, unknown, path)


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
            raise SourceError(f"{path}: cannot be read as CSV: {first_line(exc)}") from exc
    try:
        _scan_into_raw(cur, table, truncation.recovered_file, header, select)
    except duckdb.Error as exc2:
        raise SourceError(f"{path}: cannot be read as CSV: {first_line(exc2)}") from exc2
    finally:
        truncation.recovered_file.unlink(missing_ok=True)
    return truncation


def _take_rejects(cur: duckdb.DuckDBPyConnection, table: str) -> list[tuple[int, str, str]]:
    """The rejected lines of the last scan as (DuckDB's line number, reason, raw), in line order."""
    rej = f"rej_{table}"
    # DuckDB may report several errors for one line (one per missing column): one row each. A whole-line error
    # (LINE SIZE OVER MAXIMUM) has no column index: coalesce, or arg_min would skip it and give NULL.
    rejects = cur.execute(
        f"""SELECT line, arg_min(error_type || ' (' || error_message || ')', coalesce(column_idx, -1)),
                   any_value(csv_line)
            FROM {rej} GROUP BY line ORDER BY line"""
    ).fetchall()
    cur.execute(f"DROP TABLE {rej}; DROP TABLE rejscan_{table}")
    return rejects


def renumber_rows(con: duckdb.DuckDBPyConnection, table: str, rejected: list[int]) -> None:
    """Give the good rows of ``fs_stage.raw_<table>`` their record numbers, given the rejected records' numbers.

    Before, ``_line`` is the good row's rank + 1. Good row r sits after every rejected record R_i (i-th reject,
    0-based) for which R_i - 2 - i < r (the records before R_i, minus the header, minus the earlier rejects, are
    good rows), so its record number is r + 1 + the count of those.
    """
    if not rejected:
        return
    with con.cursor() as cur:
        cur.execute(
            f"""
            UPDATE fs_stage.raw_{table} SET _line = _line + (
                SELECT count(*) FROM (
                    SELECT r - 2 - (row_number() OVER (ORDER BY r) - 1) AS good_before
                    FROM (SELECT DISTINCT unnest($rejected::BIGINT[]) AS r)
                ) m WHERE m.good_before < fs_stage.raw_{table}._line - 1)
            """,
            {"rejected": sorted(set(rejected))},
        )


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (DuckDB's CSV errors go on with a page of reader options), with what
    usually causes the one DuckDB names only by its parser's state."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if "state machine reached an invalid state" in line:
        line += " (the file mixes line endings (LF, CRLF, CR-only) or has a quote in an unquoted field)"
    return line


def physical_lines(path: Path, *, records: Iterable[int] = (), duck_lines: Iterable[int] = ()
                   ) -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
    """Where records of a CSV file start: ``({record: physical line}, {duck line: (record, physical line)})`` for
    the wanted record numbers and DuckDB reject numbers (see the module docstring).

    One pass of Python's csv reader (the RFC 4180 rules DuckDB follows), stopping after the last number wanted or
    at damage (a truncated gzip): numbers not reached are left out, and callers keep them as they are.
    """
    want_r, want_d = set(records), set(duck_lines)
    of_record: dict[int, int] = {}
    of_duck: dict[int, tuple[int, int]] = {}
    if not want_r and not want_d:
        return of_record, of_duck
    last_r, last_d = max(want_r, default=0), max(want_d, default=0)
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # over-long fields: count them, don't fail
    opener = gzip.open if path.suffix == ".gz" else open
    record = embedded = end = 0
    try:
        with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh)
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row:  # a blank line: no record (DuckDB skips it too)
                    continue
                record += 1
                duck = start - embedded  # DuckDB counts blank lines, not line breaks inside quotes
                embedded += end - start
                if record in want_r:
                    of_record[record] = start
                if duck in want_d:
                    of_duck[duck] = (record, start)
                if record >= last_r and duck >= last_d:
                    break
    except (csv.Error, OSError, EOFError, zlib.error):
        pass  # damage: the numbers before it are mapped
    return of_record, of_duck


MAX_HEADER_BYTES = 1 << 20


def _head_bytes(path: Path, limit: int) -> bytes:
    """The first bytes of a file (decompressed for ``.gz``), up to the first line break or ``limit`` bytes.

    Bytes and a bounded read: a text-mode readline decodes a whole buffer, so a bad byte in a later ROW (which the
    scan quarantines by line) would fail the header; a CR-only file has no LF to stop at; and only the first gzip
    member is read, so damage further on (which the scan quarantines) cannot fail the header.
    """
    with open(path, "rb") as fh:
        if path.suffix != ".gz":
            return fh.read(limit)
        d, out = zlib.decompressobj(16 + zlib.MAX_WBITS), b""
        while len(out) < limit and not d.eof and not (b"\n" in out or b"\r" in out):
            block = d.unconsumed_tail or fh.read(1 << 16)
            if not block:
                break
            out += d.decompress(block, limit - len(out))
        return out


def read_header(path: Path, *, allow_empty: bool = False) -> list[str]:
    """The column names in the first line of a CSV file (``.gz`` decompressed); the line may end in LF, CRLF or a
    lone CR (old Mac exports). ``SourceError`` naming the file when it cannot be read, when the first line is not
    a CSV header, or when it has no header line unless ``allow_empty`` (then ``[]``)."""
    try:
        head = _head_bytes(path, MAX_HEADER_BYTES)
    except (OSError, zlib.error) as exc:
        raise SourceError(f"{path}: cannot read the header line: {exc}") from exc
    ends = [i for i in (head.find(b"\n"), head.find(b"\r")) if i >= 0]
    if not ends and len(head) == MAX_HEADER_BYTES:
        raise SourceError(f"{path}: no line break in the first {MAX_HEADER_BYTES:,} bytes: not a CSV file")
    try:
        line = head[:min(ends, default=len(head))].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: cannot read the header line: {exc}") from exc
    if not line.strip() and not allow_empty:
        raise SourceError(f"{path}: empty file (no header line)")
    try:
        return [c.strip() for c in next(csv.reader([line]), [])]
    except csv.Error as exc:
        raise SourceError(f"{path}: line 1 is not a CSV header: {exc}") from exc


# --- gzip integrity ----------------------------------------------------------------------------------------


@dataclass
class Truncation:
    """What :func:`check_gzip` saved of a damaged gzip file."""

    recovered_file: Path
    lines_recovered: int  # complete lines (header included) written to recovered_file
    partial_line: str
    error: str
    trailing: bool = False  # the stream was whole; bytes after its end are not gzip

    def reason(self) -> str:
        """The quarantine reason of the unreadable rest, for the line after the recovered ones."""
        line = self.lines_recovered + 1
        if self.trailing:
            return (f"bytes after the end of the gzip stream ({self.error}): every line before them was read; "
                    "they are not part of the data")
        return (f"truncated gzip stream ({self.error}): file ends inside line {line}; "
                "any rows after it are unrecoverable")


def check_gzip(path: Path) -> Truncation | None:
    """Stream-decompress a gzip file; if it is truncated or corrupt, save the readable complete lines.

    Returns None for a sound file. For a damaged one, the complete lines before the damage are written to a
    temporary CSV (the caller loads them) and the partial last line is returned for quarantine. Concatenated
    gzip members are read in turn; bytes after the last member that are not one (garbage, zero padding) end the
    stream like damage does, with ``trailing`` set.
    """
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    tail = b""
    fd, tmp = tempfile.mkstemp(suffix=".csv", prefix="foresight-recovered-")
    lines = 0
    error = None
    trailing, garbage = False, b""

    def write_lines(data: bytes) -> bytes:
        """Write the complete lines of ``data``; return the incomplete rest."""
        nonlocal lines
        cut = data.rfind(b"\n") + 1
        out.write(data[:cut])
        lines += data[:cut].count(b"\n")
        return data[cut:]

    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
            pending = b""  # compressed bytes not yet fed (the rest of a block after a member's end)
            while error is None:
                block = pending or src.read(1 << 20)
                pending = b""
                if not block:
                    if not d.eof:
                        error = "unexpected end of stream"
                    break
                if d.eof:  # a member ended: the next bytes must start another one
                    if not block.startswith(b"\x1f\x8b"):
                        error, trailing = f"{len(block) + len(src.read())} byte(s) that are not gzip", True
                        garbage = block[:200]
                        break
                    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                try:
                    tail = write_lines(tail + d.decompress(block))
                except zlib.error as exc:
                    error = f"corrupt data: {exc}"
                    break
                if d.eof:
                    pending = d.unused_data
            if error is None:
                return None
            if trailing:
                # The stream itself was whole: its last line is complete even without a final line break, and
                # the quarantined "row" is the start of the stray bytes.
                tail = write_lines(tail + b"\n") if tail else tail
                tail = garbage
    finally:
        if error is None:
            Path(tmp).unlink(missing_ok=True)
    return Truncation(Path(tmp), lines, tail.decode("utf-8", errors="replace"), error, trailing)
