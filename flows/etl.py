"""The ``etl`` flow: load one source into the warehouse, one task per table group, then reconcile.

The same steps as :func:`foresight.sources.load`, as tasks: staging happens outside any transaction, so a
table-group task that hits a transient I/O error is retried on its own; nothing becomes visible until the
``publish`` task commits, and ``reconcile`` then re-checks the committed run against the warehouse
(read = loaded + quarantined + dropped, per table and in total).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.retry import transient
from foresight import sources, warehouse
from foresight.optout import read_subjects_file
from foresight.purposes import read_declaration


@task(retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=transient, cache_policy=NO_CACHE)
def stage_table_group(module: ModuleType, load: warehouse.Load, root: Path, group: str) -> list[str]:
    """Scan, validate and account for one table group (retried on transient I/O errors)."""
    tables = sources.stage_one(module, load, root, group)
    get_run_logger().info("staged %s: %s", group, ", ".join(tables))
    return tables


@task(cache_policy=NO_CACHE)
def publish(module: ModuleType, load: warehouse.Load, root: Path) -> dict[str, Any]:
    """Stage code metadata and commit the load in one transaction."""
    return sources.finish_load(module, load, root, check=False).to_json()


@task(cache_policy=NO_CACHE)
def reconcile(db: Path, run_id: str) -> dict[str, int]:
    """Re-check the committed run against the warehouse; fails the flow on any mismatch."""
    with warehouse.connect(db, read_only=True) as con:
        return warehouse.reconcile(con, run_id)


@flow(name="etl", log_prints=True)
def etl(source: str, input: Path, db: Path, name: str | None = None, exclude_subjects: Path | None = None,
        declaration: Path | None = None) -> dict[str, Any]:
    """Load ``input`` (a ``source`` such as ``mimic-iv``) into the warehouse ``db``; returns the load summary.

    ``exclude_subjects``: the national data opt-out list (one patient id per line); their rows are dropped.
    ``declaration``: the data's declarations file (provider, allowed purposes; :mod:`foresight.purposes`), read
    before the warehouse is opened; without one the load is usable only for purpose ``unspecified``.
    """
    module = sources.get_source(source)
    root = module.check_input(Path(input))  # before the warehouse is opened: a bad input creates no file
    excluded = read_subjects_file(exclude_subjects) if exclude_subjects else None
    decl = read_declaration(declaration) if declaration else None
    with warehouse.connect(db) as con, warehouse.MemoryGovernor(con):
        load = sources.new_load(module, con, root, source=name, exclude_subjects=excluded, declaration=decl)
        for group in module.GROUPS:
            stage_table_group(module, load, root, group.name)
        summary = publish(module, load, root)
    summary["reconciliation"] = reconcile(db, summary["run_id"])
    return summary
