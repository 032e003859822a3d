"""An on-disk scratch database for the vocabulary fit's per-subject tables.

The fit builds tables with a row per train subject and code (``code_pairs``), marker value (``marker_pairs``) or
clock marker (``clock_markers``). As TEMP tables they cost memory outside DuckDB's budget in proportion to their
rows (the same effect moved the ETL's validation tables into the load's staging file; bench/RESULTS.md), so a
tokenizer's peak grew with the cohort. While :func:`scratch_database` is open they live in a DuckDB file in the
connection's spill folder (where DuckDB already writes what does not fit in memory), deleted when the block ends.
Without it (the sharded reduce, which builds its tables from the shards' parquet files) they are TEMP as before.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from foresight.warehouse.connection import sql_literal

SCRATCH = "fs_fit"


@contextmanager
def scratch_database(con: Any) -> Iterator[Path]:
    """Attach a fresh scratch database as ``fs_fit`` on ``con`` (read-write, also on a read-only warehouse) for the
    block; detach it and delete its folder after, whatever happens. Yields the database file."""
    spill = Path(con.execute("SELECT current_setting('temp_directory')").fetchall()[0][0] or tempfile.gettempdir())
    made_spill = not spill.exists()  # DuckDB creates it only when it spills: remove it after only if made here
    spill.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="foresight-fit-", dir=spill))
    path = folder / "fit.duckdb"
    con.execute(f"ATTACH {sql_literal(str(path))} AS {SCRATCH} (READ_WRITE)")
    # the fit reads and drops its tables by their plain names
    con.execute(f"SET search_path = 'main,{SCRATCH}.main'")
    try:
        yield path
    finally:
        try:
            con.execute("SET search_path = 'main'")
            con.execute(f"DETACH {SCRATCH}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            if made_spill:
                with suppress(OSError):  # not empty: DuckDB (this or another process) spills there now
                    spill.rmdir()


def create_table(con: Any, name: str, columns: str) -> None:
    """``CREATE OR REPLACE`` the fit table ``name`` (``columns``: its column list in SQL) in the scratch database
    when one is attached, else as a TEMP table. Either way the fit reaches it by its plain name."""
    attached = con.execute("SELECT 1 FROM duckdb_databases() WHERE database_name = ?", [SCRATCH]).fetchall()
    con.execute(f"CREATE OR REPLACE TABLE {SCRATCH}.main.{name} {columns}" if attached else
                f"CREATE OR REPLACE TEMP TABLE {name} {columns}")
