"""Opening the warehouse, and the two helpers for the few names and values pasted into SQL text."""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb

from foresight import sql


def connect(path: str | Path, *, read_only: bool = False, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) a warehouse file and make sure every table and macro exists.

    ``memory_limit`` defaults to ``$FORESIGHT_DUCKDB_MEMORY`` or 2GB; DuckDB spills to a temp folder beyond it,
    so large loads stay within a predictable footprint. The connection is a context manager that closes on exit.
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
        con.execute(sql.load("common", "warehouse"))
    con.execute(sql.load("common", "macros"))
    return con


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def ident(name: str) -> str:
    """``name`` if it is a safe table name (lower-case letters, digits, ``_``), else ValueError.

    Table names are built from fixed source-table names, never from user data; checked anyway.
    """
    if not _NAME.match(name):
        raise ValueError(f"not a safe table name: {name!r}")
    return name


def sql_literal(value: str) -> str:
    """A SQL string literal, for the few places DuckDB accepts no bound parameter (table-function options).

    >>> sql_literal("it's")
    "'it''s'"
    """
    return "'" + value.replace("'", "''") + "'"
