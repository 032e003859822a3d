"""A load's memory governor: the budget bounds the process, not only DuckDB's buffer pool.

DuckDB's ``memory_limit`` (the budget, :mod:`foresight.warehouse.connection`) bounds its buffer pool. A load's
process also holds memory outside it: the interpreter and its libraries, and DuckDB's own bookkeeping of what the
session has written (row groups, column segments and their statistics, and an uncommitted append's), which grows
with the rows. At a 1 GB budget (953.6 MiB) a load of 100x the MIMIC-IV demo peaked at 1,112 MiB and one of
1,000x at 1,334 MiB (RESULTS.md, issue 19): the peak grew with the input though DuckDB stayed in its budget.

:class:`MemoryGovernor` measures that outside memory a few times a second (the process's RSS less the memory
DuckDB's buffer manager reports in use, ``duckdb_memory()``) and sets DuckDB's limit to the budget less it: never
under a floor (half the budget, and at least 256 MiB, so an operator always has room to work and spill; a budget
that small is not lowered at all) and never over the budget. Lowering the limit makes DuckDB evict cached blocks
(free: they are on disk) or spill; it never changes a result.
A lower limit DuckDB cannot reach yet (pinned blocks) is retried at the next tick. It runs on its own thread with
its own cursor: DuckDB answers the two small queries while the load's statement runs.
"""

from __future__ import annotations

import threading
from types import TracebackType

import duckdb
import psutil

from foresight.warehouse.connection import BUDGET_VARIABLE, parse_memory, set_memory_limit

INTERVAL = 0.2  # seconds between measurements: the bookkeeping grows over seconds, not milliseconds
STEP = 8 << 20  # a limit closer than this to the current one is left as it is
FLOOR = 0.5  # the least share of the budget DuckDB keeps ...
MIN_LIMIT = 256 << 20  # ... and never less than this: about the least a MIMIC-IV load runs in (its CSV buffers)


def budget_of(con: duckdb.DuckDBPyConnection) -> int:
    """The budget :func:`~foresight.warehouse.connection.connect` gave ``con``, in bytes; for a connection opened
    otherwise, DuckDB's ``memory_limit`` as DuckDB prints it (``953.6 MiB``, ``1.8 GiB``: to a tenth of a unit)."""
    exact, shown = con.execute(
        f"SELECT getvariable('{BUDGET_VARIABLE}'), current_setting('memory_limit')").fetchall()[0]
    return int(exact) if exact is not None else parse_memory(shown, what="DuckDB memory_limit")


def buffer_memory(con: duckdb.DuckDBPyConnection) -> int:
    """Bytes DuckDB's buffer manager holds now, over every tag (tables, hash tables, sorts, ...)."""
    return int(con.execute("SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory()").fetchall()[0][0])


class MemoryGovernor:
    """Keep the process's RSS near ``budget`` bytes (default: the connection's budget, :func:`budget_of`) while a
    load runs.

    Use it as a context manager around the load; on exit DuckDB's limit is the budget again. :meth:`adjust` is one
    measurement and correction (the thread calls it every :data:`INTERVAL` seconds)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, *, budget: int | None = None, floor: float = FLOOR,
                 interval: float | None = None) -> None:
        self.con = con
        self.budget = budget if budget is not None else budget_of(con)
        self.floor = min(self.budget, max(int(self.budget * floor), MIN_LIMIT))
        self.interval = interval if interval is not None else INTERVAL
        self.limit = self.budget
        self.lowest = self.budget  # the lowest limit set, for reports and tests
        self._process = psutil.Process()
        self._cursor: duckdb.DuckDBPyConnection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def target(self, rss: int, in_buffers: int) -> int:
        """The limit that puts the process at the budget: the budget less the memory outside DuckDB's buffers,
        between the floor and the budget."""
        outside = max(0, rss - in_buffers)
        return min(self.budget, max(self.floor, self.budget - outside))

    def adjust(self) -> int:
        """Measure once and set DuckDB's limit to :meth:`target` when it differs by :data:`STEP` or more; returns
        the limit in force. A limit DuckDB cannot free enough memory for yet raises ``duckdb.OutOfMemoryException``
        (the thread retries at the next tick)."""
        cur = self._cursor or self.con  # the governor's own cursor once entered
        want = self.target(self._process.memory_info().rss, buffer_memory(cur))
        if abs(want - self.limit) >= STEP:
            set_memory_limit(cur, want)
            self.limit = want
            self.lowest = min(self.lowest, want)
        return self.limit

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.adjust()
            except duckdb.Error:  # pinned memory above the new limit, or the connection closing: next tick
                continue

    def __enter__(self) -> MemoryGovernor:
        self._cursor = self.con.cursor()
        self._thread = threading.Thread(target=self._run, name="foresight-memory-governor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._cursor is None:
            return
        try:  # on the governor's own cursor: the load's connection may hold an aborted transaction
            set_memory_limit(self._cursor, self.budget)
            self.limit = self.budget
        except duckdb.Error:  # the connection was closed under the load: nothing to restore
            pass
        finally:
            self._cursor.close()
