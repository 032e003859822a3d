"""Opening the warehouse (with the memory budget every stage honours), and the two helpers for the few names and
values pasted into SQL text.

**Memory budget.** Every DuckDB connection the project opens goes through :func:`connect`, which sets DuckDB's
``memory_limit`` to the budget (:func:`memory_budget`: the ``memory_limit`` argument, else ``$FORESIGHT_MEMORY``
(``foresight --memory``), else the older ``$FORESIGHT_DUCKDB_MEMORY``, else 1 GB per CPU core, at most half of
the RAM available when the connection opens and at least 256 MB) and its ``temp_directory``
(:func:`temp_directory`), where DuckDB spills what does not fit: loads and fits then run in a flat footprint
whatever the input size. The budget bounds DuckDB's buffer manager; outside a load, the process's peak RSS sits a
few hundred MB above it (Python, the allocator's caches, the arrays a tokenizer chunk holds). During a load it
bounds the process: the load's :class:`~foresight.warehouse.governor.MemoryGovernor` gives DuckDB the budget less
the memory outside its buffers. Two more settings follow the budget, because both are memory outside
the buffer manager that DuckDB's defaults size for a large machine (:func:`budget_settings`): the number of threads
(each holds its own partial hash tables and sort runs; DuckDB's guide asks for 1-4 GB a thread, so a small budget
gets fewer threads, never more than the cores) and the thresholds at which DuckDB's allocator hands freed memory
back to the system (by default 128 MiB after a task and 512 MiB after a bulk free, half of a 1 GB budget).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import duckdb
import psutil

from foresight import sql

MEMORY_ENV = "FORESIGHT_MEMORY"
LEGACY_MEMORY_ENV = "FORESIGHT_DUCKDB_MEMORY"
TEMP_ENV = "FORESIGHT_TEMP_DIR"
BUDGET_VARIABLE = "foresight_memory_budget"  # the connection's budget in bytes, as a DuckDB variable
MIN_DEFAULT, PER_CORE = 256 << 20, 1 << 30  # the default budget: 1 GB per core, <= half the available RAM
PER_THREAD = 256 << 20  # the least budget per DuckDB thread (below DuckDB's 1-4 GB advice; measured, RESULTS.md)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*|%)\s*$", re.IGNORECASE)


class MemoryBudgetError(ValueError):
    """A memory budget that is not a size; the message names where it came from and shows valid examples."""


def parse_memory(text: str, *, what: str = "memory budget") -> int:
    """Bytes of a memory size: ``1.5GB``, ``512MB``, ``2GiB``, ``800M``, a plain byte count, or ``50%`` (of the RAM
    available now). ``MemoryBudgetError`` naming ``what`` for anything else, or for less than 16 MB.

    >>> parse_memory("1.5GB"), parse_memory("512 MiB")
    (1500000000, 536870912)
    """
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or (unit != "%" and unit not in _UNITS):
        raise MemoryBudgetError(f"{what}: {text!r} is not a memory size (examples: 1.5GB, 512MB, 2GiB, 50%)")
    value = float(m.group(1))
    if unit == "%":
        if not 0 < value <= 100:
            raise MemoryBudgetError(f"{what}: {text!r} must be a percentage between 0 and 100")
        return int(psutil.virtual_memory().available * value / 100)
    n = int(value * _UNITS[unit])
    if n < 16 << 20:
        raise MemoryBudgetError(f"{what}: {text!r} is below 16MB, too little for DuckDB to run a load")
    return n


def memory_budget(memory_limit: str | None = None) -> int:
    """The memory budget in bytes: ``memory_limit``, else ``$FORESIGHT_MEMORY``, else ``$FORESIGHT_DUCKDB_MEMORY``,
    else 1 GB per CPU core (DuckDB's rule of thumb for joins and aggregates), at most half of the RAM available
    now, at least 256 MB. A malformed value is ``MemoryBudgetError``."""
    for value, what in ((memory_limit, "memory budget"), (os.environ.get(MEMORY_ENV), MEMORY_ENV),
                        (os.environ.get(LEGACY_MEMORY_ENV), LEGACY_MEMORY_ENV)):
        if value not in (None, ""):
            return parse_memory(value, what=what)
    cores = os.cpu_count() or 1
    return int(max(min(PER_CORE * cores, psutil.virtual_memory().available // 2), MIN_DEFAULT))


def temp_directory(path: Path) -> Path:
    """Where DuckDB spills for the warehouse ``path``: ``$FORESIGHT_TEMP_DIR``, else ``<warehouse>.tmp`` beside it
    (DuckDB's own default), else, when that folder is not writable (a read-only warehouse), a per-user folder in the
    system temp directory. DuckDB creates it only when it spills and removes its files on close."""
    if os.environ.get(TEMP_ENV):
        return Path(os.environ[TEMP_ENV])
    if os.access(path.parent, os.W_OK):
        return path.with_name(path.name + ".tmp")
    return Path(tempfile.gettempdir()) / f"foresight-duckdb-{os.getuid()}"


def budget_settings(budget: int, cores: int | None = None) -> dict[str, int]:
    """DuckDB settings that follow a memory budget of ``budget`` bytes: ``threads`` (one per
    :data:`PER_THREAD` of budget, at least 1, at most ``cores``), and the allocator's flush thresholds (an eighth
    and a quarter of the budget, never above DuckDB's defaults) so freed memory goes back to the system before
    the process grows far past the budget.

    >>> budget_settings(128 << 20, cores=2)["threads"], budget_settings(1 << 30, cores=2)["threads"]
    (1, 2)
    """
    cores = cores or os.cpu_count() or 1
    return {"threads": max(1, min(cores, budget // PER_THREAD)),
            "allocator_flush_threshold": min(128 << 20, budget // 8),
            "allocator_bulk_deallocation_flush_threshold": min(512 << 20, budget // 4)}


def set_memory_limit(con: duckdb.DuckDBPyConnection, nbytes: int) -> None:
    """Set DuckDB's ``memory_limit`` to ``nbytes`` (whole KiB: DuckDB reads a bare number with a unit)."""
    con.execute(f"SET memory_limit = '{nbytes // 1024}KiB'")


def configure(con: duckdb.DuckDBPyConnection, temp_dir: Path, memory_limit: str | None = None) -> int:
    """Apply the memory budget (``memory_limit`` or :func:`memory_budget`'s default), the settings that follow it
    (:func:`budget_settings`) and the spill folder to a DuckDB connection; returns the budget in bytes."""
    budget = memory_budget(memory_limit)
    set_memory_limit(con, budget)
    # the exact budget, for the load's memory governor (DuckDB prints its limit rounded, e.g. "1.8 GiB")
    con.execute(f"SET VARIABLE {BUDGET_VARIABLE} = {int(budget)}::BIGINT")
    for name, value in budget_settings(budget).items():
        con.execute(f"SET {name} = {value}" if name == "threads" else f"SET {name} = '{value // 1024}KiB'")
    con.execute(f"SET temp_directory = {sql_literal(str(temp_dir))}")
    return budget


def connect(path: str | Path, *, read_only: bool = False, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) a warehouse file and make sure every table and macro exists.

    ``memory_limit`` (e.g. ``"1.5GB"``) overrides the memory budget (see the module docstring); DuckDB spills to
    :func:`temp_directory` beyond it. A malformed budget is ``MemoryBudgetError`` before anything is opened. The
    connection is a context manager that closes on exit.
    """
    path = Path(path)
    memory_budget(memory_limit)  # a malformed budget fails before the file is created
    if read_only and not path.exists():
        raise FileNotFoundError(f"warehouse {path} does not exist")
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path), read_only=read_only)
    try:
        configure(con, temp_directory(path.resolve()), memory_limit)
        con.execute("SET preserve_insertion_order = true")  # row numbers of CSV scans follow the file
        con.execute("SET enable_progress_bar = false")  # our CLI shows its own progress on stderr
        if not read_only:
            con.execute(sql.load("common", "warehouse"))
        con.execute(sql.load("common", "macros"))
    except BaseException:
        con.close()
        raise
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
