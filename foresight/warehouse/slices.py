"""Running a source's staging SQL, with the validation of big tables written in slices of lines.

Why slices: while one statement writes a table, DuckDB keeps bookkeeping for the rows it has written in malloc'd
memory outside its memory budget, freed only when the statement ends. Measured on the labevents validation of
1,000x the MIMIC-IV demo (107.7M rows, 1 GB budget): glibc's memory in use rose by 134 MiB through the one
statement (peak RSS 1,276 MiB); written as 10 statements of 10.8M lines each, by 51 MiB (1,157 MiB), in the same
time (156 vs 154 s). So memory would otherwise grow with the biggest input table.

A statement opts in with a line ``-- sliced by line: raw_<table>`` in its leading comment. It must be a
``CREATE OR REPLACE TABLE <name> AS <query>`` that reads ``raw_<table>`` exactly once, and must be row-wise: each
row it writes comes from one raw row (lookups into other tables are fine; a window, an aggregate or a DISTINCT over
the raw table is not, since a slice would see only part of it). :func:`run_script` then writes the table with the
first slice and INSERTs the others, each statement (each transaction) over ``slice_lines`` consecutive ``_line``
values; DuckDB's zone maps on ``_line`` (raw tables are written in line order) keep each slice's scan to its rows.
Rows and their order of lines are the same as one statement's: the accounting does not change.
"""

from __future__ import annotations

import re

import duckdb

from foresight.warehouse.connection import ident

# 4M lines a statement: ~7 MiB of DuckDB's per-statement bookkeeping (measured rate above), and ~27 statements for
# the 107.7M labevents rows of 1,000x the MIMIC-IV demo; a table at or under it runs as one statement.
SLICE_LINES = 4_000_000

SLICE_MARK = re.compile(r"^--\s*sliced by line:\s*(\w+)\s*$", re.MULTILINE)
_CREATE = re.compile(r"\A\s*CREATE\s+OR\s+REPLACE\s+TABLE\s+([\w.]+)\s+AS\s+", re.IGNORECASE)


def run_script(con: duckdb.DuckDBPyConnection, text: str, *, slice_lines: int | None = None) -> None:
    """Execute every statement of ``text`` in order; those marked ``-- sliced by line: raw_<t>`` in slices of
    ``slice_lines`` (default :data:`SLICE_LINES`) lines (see the module docstring)."""
    slice_lines = SLICE_LINES if slice_lines is None else slice_lines
    if slice_lines < 1:
        raise ValueError(f"slice_lines must be at least 1, got {slice_lines}")
    for statement in con.extract_statements(text):
        query = statement.query
        mark = SLICE_MARK.search(query)
        if mark is None:
            con.execute(query)
        else:
            run_sliced(con, query, mark.group(1), slice_lines)


def run_sliced(con: duckdb.DuckDBPyConnection, statement: str, raw: str, slice_lines: int) -> int:
    """Run one marked ``CREATE OR REPLACE TABLE t AS <query over raw>`` in slices of ``slice_lines`` lines of
    ``raw``; returns the number of statements run (1 when the table fits one slice)."""
    target, query = split_create(statement, raw)
    ranges = line_ranges(con, raw, slice_lines)
    if len(ranges) == 1:
        con.execute(statement)
        return 1
    use = _uses(raw).search(query)  # the one reference (split_create checked)
    before, name, after = query[:use.start()], use.group(1), query[use.end():]
    for i, within in enumerate(ranges):
        head = f"CREATE OR REPLACE TABLE {target} AS " if i == 0 else f"INSERT INTO {target} "
        con.execute(f"{head}{before}(SELECT * FROM {name} WHERE {within}){after}")
    return len(ranges)


def line_ranges(con: duckdb.DuckDBPyConnection, table: str, step: int | None = None) -> list[str]:
    """SQL conditions on ``_line``, each a range of at most ``step`` (default :data:`SLICE_LINES`) lines, together
    covering every line of ``table`` (one condition, ``true``, for an empty table). Tables written in line order
    let DuckDB's zone maps keep each range's scan to its rows."""
    step = SLICE_LINES if step is None else step
    lo, hi = con.execute(f"SELECT min(_line), max(_line) FROM {ident(table)}").fetchall()[0]
    if lo is None:
        return ["true"]
    return [f"_line >= {start} AND _line < {start + step}" for start in range(lo, hi + 1, step)]


def _uses(raw: str) -> re.Pattern[str]:
    """References to the table ``raw`` in a query, qualified (``fs_stage.raw_x``) or not."""
    return re.compile(rf"(?<![\w.])((?:\w+\.)*{re.escape(raw)})(?!\w)")


def split_create(statement: str, raw: str) -> tuple[str, str]:
    """(target table, query) of a statement marked for slicing; ValueError naming the statement's target when it
    is not a ``CREATE OR REPLACE TABLE ... AS`` reading ``raw`` exactly once."""
    body = "\n".join(line for line in statement.splitlines() if not line.lstrip().startswith("--"))
    create = _CREATE.match(body)
    if create is None:
        raise ValueError(f"a statement marked '-- sliced by line: {raw}' must be CREATE OR REPLACE TABLE ... AS: "
                         f"{body.strip()[:80]!r}")
    target, query = create.group(1), body[create.end():].rstrip().rstrip(";")
    uses = len(_uses(raw).findall(query))
    if uses != 1:
        raise ValueError(f"{target}: marked '-- sliced by line: {raw}' but reads {raw} {uses} times (must be once)")
    return target, query
