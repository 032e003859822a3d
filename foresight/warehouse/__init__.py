"""The DuckDB event warehouse: connections, transactional loads, lineage and quarantine.

A load is staged, then published. Every source adapter works the same way:

1. ``session = Load(con, source=..., source_kind=..., input_path=...)``
2. per input table: ``session.read_csv(table, path, columns)`` stages the raw rows (bad CSV rows and the
   unreadable tail of a truncated gzip go to quarantine with their line number), the adapter's SQL builds
   ``v_<table>`` (one row per raw row with ``_line``, a ``_quarantine`` reason or NULL and a ``_drop`` reason
   or NULL) and ``e_<table>`` (the events), and ``session.finish_table(table)`` accounts for every row:
   read = loaded + quarantined + dropped, or it raises.
3. ``session.publish()`` replaces this source's rows in ONE transaction (delete its old events and
   quarantine rows, insert the staged ones, add codes, splits and the ``etl_runs`` row) and commits.

Inputs that are not one CSV per table (FHIR bundles, MEDS parquet shards) stage ``fs_stage.raw_<table>``
themselves and account for it with ``register_scan(CsvScan(...))``; their ``v_<table>`` may carry
``_source_file`` and ``_source_row`` so a quarantined row names the exact bundle/shard and its position. A table
may also produce free-text notes (view ``n_<table>``), and a source may stage ``subject_map`` rows
(:meth:`Load.stage_subject_map`) and given splits (:meth:`Load.stage_splits`); all are written by ``publish``.

Staging lives outside any transaction, on disk: raw scans and staged rows in the load's staging database file
(``<warehouse>.staging``, attached as ``fs_stage`` and deleted after the commit; a crashed load's file is deleted
by the next load), and per-table validation (``v_<table>``) there too, with TEMP views over it. Memory therefore
stays within the budget (:func:`~foresight.warehouse.connection.memory_budget`) however big the input; a failing
table can be retried, and a crash at any point before the commit leaves the warehouse exactly as it was. A load
driver runs the whole load under a :class:`MemoryGovernor`, which gives DuckDB the budget less the process's memory
outside DuckDB's buffers, so the budget bounds the process.

**National data opt-out.** ``Load(..., exclude_subjects=ids)`` (``foresight.sources.load(..., exclude_subjects=ids)``
passes it down) drops every row of a listed subject in
``finish_table`` with the reason ``national data opt-out``, including rows that would have been quarantined (the
quarantine keeps raw rows, so it would keep their data); their notes and ``subject_map`` rows are not written.
Accounting still balances. See :mod:`foresight.optout`.

Modules: :mod:`~foresight.warehouse.connection` (``connect``, SQL name/literal helpers),
:mod:`~foresight.warehouse.load` (the ``Load`` session), :mod:`~foresight.warehouse.governor` (the load's memory
governor), :mod:`~foresight.warehouse.slices` (big statements written in slices of lines),
:mod:`~foresight.warehouse.csv_scan` (CSV and gzip reading), :mod:`~foresight.warehouse.accounting` and
:mod:`~foresight.warehouse.publish` (the steps of ``finish_table`` and ``publish``),
:mod:`~foresight.warehouse.reconciliation`, :mod:`~foresight.warehouse.export` (MEDS export) and
:mod:`~foresight.warehouse.results` (errors and summaries).
"""

from __future__ import annotations

from foresight.warehouse.connection import MemoryBudgetError, connect, ident, memory_budget, parse_memory, sql_literal
from foresight.warehouse.csv_scan import read_header
from foresight.warehouse.export import export_meds
from foresight.warehouse.extent import extract_end
from foresight.warehouse.governor import MemoryGovernor
from foresight.warehouse.inputs import find_file, list_files, probe, readable_dir, readable_file
from foresight.warehouse.load import Load
from foresight.warehouse.reconciliation import reconcile
from foresight.warehouse.results import CsvScan, LoadSummary, ReconciliationError, SourceError, TableResult

__all__ = [
    "CsvScan",
    "Load",
    "LoadSummary",
    "MemoryBudgetError",
    "MemoryGovernor",
    "ReconciliationError",
    "SourceError",
    "TableResult",
    "connect",
    "export_meds",
    "extract_end",
    "find_file",
    "ident",
    "list_files",
    "memory_budget",
    "parse_memory",
    "probe",
    "read_header",
    "readable_dir",
    "readable_file",
    "reconcile",
    "sql_literal",
]
