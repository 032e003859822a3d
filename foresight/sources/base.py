"""What every source adapter shares: the table-group record, the one load driver and common staging steps.

A source adapter is a module with ``SOURCE_KIND``, ``GROUPS`` (:class:`Group`, the unit a Prefect task retries),
``check_input(path) -> root``, ``stage_group(load, root, group, **options)`` and ``stage_codes(load, root)``.
It may add ``scan_group(load, root, group)``, a thread-safe scan of the group's files, with ``stage_group`` split
into ``validate_group(load, root, group, scans)`` and ``account_group(load, group)``: the driver then scans the next
group on a second thread while the current one is accounted for, and between the steps, with no scan in flight,
re-attaches the staging file (:meth:`foresight.warehouse.Load.reopen_staging`: DuckDB's bookkeeping of the tables
written so far grows with their rows).

The driver (:func:`run_load`) is the only place that sequences a load: check the input, open a
:class:`foresight.warehouse.Load` (with the opt-out list), stage every group in order, stage the code metadata,
publish in one transaction. The Prefect ``etl`` flow composes the same steps (``check_input``, :func:`new_load`,
:func:`stage_one`, :func:`finish_load`) as tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import duckdb

from foresight import sql
from foresight.hashing import sha256
from foresight.purposes import Declaration
from foresight.warehouse import Load, LoadSummary, MemoryGovernor


@dataclass(frozen=True)
class Group:
    """Input tables staged together by one SQL file (also the unit a Prefect task retries).

    ``tables`` holds table names, or the adapter's table specs (objects with a ``name``).
    """

    name: str
    tables: tuple[Any, ...]

    @property
    def table_names(self) -> list[str]:
        return [t if isinstance(t, str) else t.name for t in self.tables]


# --- the driver ------------------------------------------------------------------------------------------------


def open_load(module: ModuleType, con: duckdb.DuckDBPyConnection, input_path: str | Path, *,
              source: str | None = None, exclude_subjects: Iterable[int] | None = None,
              declaration: Declaration | None = None, shard: tuple[int, int] | None = None) -> tuple[Load, Path]:
    """Check the input (``SourceError`` naming the path) and open a load session; returns (session, root)."""
    root = module.check_input(Path(input_path))
    return new_load(module, con, root, source=source, exclude_subjects=exclude_subjects,
                    declaration=declaration, shard=shard), root


def new_load(module: ModuleType, con: duckdb.DuckDBPyConnection, root: Path, *, source: str | None = None,
             exclude_subjects: Iterable[int] | None = None, declaration: Declaration | None = None,
             shard: tuple[int, int] | None = None) -> Load:
    """A load session of the adapter ``module`` for an input already checked (``root`` from ``check_input``);
    ``declaration``: who provided the data and what for (:mod:`foresight.purposes`; None: undeclared);
    ``shard=(k, n)``: keep only shard k of n (:mod:`foresight.warehouse.shard_filter`; None: every subject)."""
    return Load(con, source=source or module.SOURCE_KIND, source_kind=module.SOURCE_KIND, input_path=root,
                exclude_subjects=exclude_subjects, declaration=declaration, shard=shard)


def find_group(module: ModuleType, name: str) -> Group:
    """The adapter's table group called ``name`` (a ValueError lists the groups there are)."""
    for group in module.GROUPS:
        if group.name == name:
            return group
    raise ValueError(f"{module.SOURCE_KIND} has no table group {name!r}: {[g.name for g in module.GROUPS]}")


def stage_one(module: ModuleType, load: Load, root: Path, group: str | Group, **options: Any) -> list[str]:
    """Stage one table group (by name or spec); safe to call again after a failure. Returns its table names."""
    spec = find_group(module, group) if isinstance(group, str) else group
    load.reopen_staging()  # earlier groups' bookkeeping (nothing else uses the staging file now)
    return module.stage_group(load, root, spec, **options)


def stage_groups(module: ModuleType, load: Load, root: Path, *,
                 on_group_done: Callable[[str], None] | None = None, **options: Any) -> None:
    """Stage every table group in order, calling ``on_group_done(group_name)`` after each."""
    scan = getattr(module, "scan_group", None)
    if scan is None:
        for group in module.GROUPS:
            stage_one(module, load, root, group, **options)
            if on_group_done is not None:
                on_group_done(group.name)
        return
    # Scan the next group's files on a second thread while this group is accounted for: gzip decompression is
    # single-threaded per file, so this keeps two cores busy. One group of look-ahead bounds the memory. The
    # staging file is re-attached only when no scan is in flight: before and after each validation.
    groups = module.GROUPS
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="foresight-scan") as pool:
        scans = scan(load, root, groups[0])
        for i, group in enumerate(groups):
            load.reopen_staging()
            module.validate_group(load, root, group, scans, **options)
            load.reopen_staging()
            upcoming = pool.submit(scan, load, root, groups[i + 1]) if i + 1 < len(groups) else None
            module.account_group(load, group)
            scans = upcoming.result() if upcoming is not None else None
            if on_group_done is not None:
                on_group_done(group.name)


def finish_load(module: ModuleType, load: Load, root: Path, *, check: bool = True) -> LoadSummary:
    """Stage the code metadata and publish the load in one transaction (see :meth:`Load.publish`)."""
    load.reopen_staging()
    module.stage_codes(load, root)
    return load.publish(check=check)


def run_load(module: ModuleType, con: duckdb.DuckDBPyConnection, input_path: str | Path, *,
             source: str | None = None, exclude_subjects: Iterable[int] | None = None,
             declaration: Declaration | None = None, on_group_done: Callable[[str], None] | None = None,
             shard: tuple[int, int] | None = None, **options: Any) -> LoadSummary:
    """Load ``input_path`` with the adapter ``module``, replacing any earlier load of the same ``source``
    (default: the adapter's kind).

    ``exclude_subjects``: national data opt-out, subject ids whose rows are dropped. ``declaration``: the data's
    provider and allowed purposes (:mod:`foresight.purposes`), recorded in the load's transaction; None records
    the load as undeclared. ``shard=(k, n)``: load only the subjects of shard k of n, accounted so that the n
    shards add up to the whole (:mod:`foresight.warehouse.sharded`). ``on_group_done(name)`` is called after each
    table group is staged (progress display; tests use it to inject a crash mid-load).
    ``options`` go to the adapter's ``stage_group`` (e.g. the notes source's ``model_pack``). Nothing is visible
    in the warehouse until every group is staged and the final transaction commits.
    """
    with MemoryGovernor(con):  # the budget bounds the process, not only DuckDB's buffers (warehouse.governor)
        load, root = open_load(module, con, input_path, source=source, exclude_subjects=exclude_subjects,
                               declaration=declaration, shard=shard)
        stage_groups(module, load, root, on_group_done=on_group_done, **options)
        return finish_load(module, load, root)


# --- staging steps several adapters share ---------------------------------------------------------------------


def code_sections(folder: str) -> dict[str, str]:
    """The ``-- section: NAME`` statements of ``foresight/sql/<folder>/codes.sql``, each ready to wrap in a
    SELECT (no trailing semicolon)."""
    return {name: body.strip().rstrip(";") for name, body in sql.sections(folder, "codes").items()}


def install_ehr_macros(load: Load, *extra: str) -> None:
    """Install the EHR macros (and ``extra`` SQL) and this load's name, which the SQL reads from ``fs_load``."""
    load.con.execute(sql.load("common", "ehr_macros"))
    for text in extra:
        load.con.execute(text)
    load.con.execute("CREATE OR REPLACE TEMP TABLE fs_load AS SELECT $source::VARCHAR AS source",
                     {"source": load.source})


def finish_group(load: Load, tables: Iterable[str], codes_sql: str | None = None) -> None:
    """Account for each staged table of a group (:meth:`Load.finish_table`), then stage the group's code
    descriptions (``codes_sql`` selects code, description, parent_codes)."""
    for table in tables:
        load.finish_table(table)
    if codes_sql:
        load.add_codes(codes_sql)


def combined_checksum(checksums: Iterable[tuple[str, str]]) -> str:
    """One lineage checksum for a table read from many files: sha256 over ``name<TAB>sha256`` lines in order."""
    return sha256("".join(f"{name}\t{sha}\n" for name, sha in checksums))
