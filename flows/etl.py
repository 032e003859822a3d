"""The ``etl`` flow: load one source into the warehouse, one task per table group, then reconcile.

Staging happens outside any transaction, so a table-group task that hits a transient I/O error is retried
on its own; nothing becomes visible until the ``publish`` task commits, and ``reconcile`` then re-checks
the committed run against the warehouse (read = loaded + quarantined + dropped, per table and in total).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from foresight import warehouse
from foresight.sources import get_source


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only I/O failures (a network share hiccup), never bad data or a bug."""
    try:
        state.result()
    except (OSError, duckdb.IOException):
        return True
    except Exception:
        return False
    return False


@task(retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=_transient, cache_policy=NO_CACHE)
def stage_table_group(load: warehouse.Load, source: str, root: Path, group: str) -> list[str]:
    """Scan, validate and account for one table group (retried on transient I/O errors)."""
    module = get_source(source)
    spec = next(g for g in module.GROUPS if g.name == group)
    tables = module.stage_group(load, root, spec)
    get_run_logger().info("staged %s: %s", group, ", ".join(tables))
    return tables


@task(cache_policy=NO_CACHE)
def publish(load: warehouse.Load, source: str, root: Path) -> dict[str, Any]:
    """Stage code metadata and commit the load in one transaction."""
    get_source(source).stage_codes(load, root)
    return load.publish(check=False).to_json()


@task(cache_policy=NO_CACHE)
def reconcile(db: Path, run_id: str) -> dict[str, int]:
    """Re-check the committed run against the warehouse; fails the flow on any mismatch."""
    con = warehouse.connect(db, read_only=True)
    try:
        return warehouse.reconcile(con, run_id)
    finally:
        con.close()


@flow(name="etl", log_prints=True)
def etl(source: str, input: Path, db: Path, name: str | None = None, exclude_subjects: Path | None = None
        ) -> dict[str, Any]:
    """Load ``input`` (a ``source`` such as ``mimic-iv``) into the warehouse ``db``; returns the load summary.

    ``exclude_subjects``: the national data opt-out list (one patient id per line); their rows are dropped.
    """
    from foresight.optout import read_subjects_file

    module = get_source(source)
    root = module.check_input(Path(input))
    excluded = read_subjects_file(exclude_subjects) if exclude_subjects else None
    con = warehouse.connect(db)
    try:
        load = warehouse.Load(con, source=name or source, source_kind=module.SOURCE_KIND, input_path=root,
                              exclude_subjects=excluded)
        for group in module.GROUPS:
            stage_table_group(load, source, root, group.name)
        summary = publish(load, source, root)
    finally:
        con.close()
    summary["reconciliation"] = reconcile(db, summary["run_id"])
    return summary
