"""``foresight etl <source> --workers N [--scheduler ADDRESS]``: the sharded load on Dask (``flows/sharded.py``).

Called by :func:`foresight.cli.etl.run_etl` when ``--workers`` or ``--scheduler`` is given; prints the same
``--json`` keys as the single-node load (plus ``shards``), and fails with one line like it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import duckdb
import typer

from foresight import purposes, warehouse
from foresight.cli.app import emit, err, fail

WorkersOption = Annotated[int | None, typer.Option(
    "--workers", min=1, help="Run the sharded path: the subjects split into N shards by their stable hash, each "
                             "loaded by one of N single-threaded Dask workers (a LocalCluster here), then merged "
                             "into --db in one transaction. Without it (and --scheduler) the single-node path runs.")]
SchedulerOption = Annotated[str | None, typer.Option(
    "--scheduler", help="Address of an existing Dask scheduler (e.g. tcp://head:8786, from dask-jobqueue or "
                        "dask-kubernetes) to run the shards on instead of a LocalCluster; --workers then sets the "
                        "number of shards (default 2). Shard files go beside --db: storage every worker can reach.")]


def run_sharded_etl(kind: str, input: Path, db: Path, source: str, exclude_subjects: Path | None,
                    declaration: Path | None, decl: purposes.Declaration | None, as_json: bool, *,
                    workers: int | None, scheduler: str | None, report: Callable[[dict[str, Any]], None]) -> None:
    """Run :func:`flows.sharded.run` and report like the single-node load (``report`` prints the summary table).
    ``exclude_subjects`` and ``declaration`` are the files (the flow reads them; the caller has checked them and
    passes the declaration read, ``decl``, for the report).

    Exit codes as the single-node load: 2 bad input, 3 the accounting did not reconcile, 4 a DuckDB, I/O or
    cluster error (the warehouse keeps its previous run)."""
    # the scheduler's and workers' progress chatter would bury the summary (workers inherit the environment)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # without PREFECT_API_URL the flow runs against a temporary local Prefect server; a busy machine needs time
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows import sharded as flow

    input = Path(input)
    try:
        module_check(kind, input)
        err.print(f"loading {kind} as {workers or 2} shard(s) on "
                  f"{scheduler or f'a LocalCluster of {workers} worker(s)'} ...")
        payload = flow.run(kind, input, db, workers=workers or 2, scheduler=scheduler, name=source,
                           exclude_subjects=exclude_subjects, declaration=declaration)
    except warehouse.SourceError as exc:
        fail(str(exc))
    except warehouse.ReconciliationError as exc:
        fail(f"reconciliation failed: {exc}", code=3)
    except (duckdb.Error, OSError) as exc:
        fail(f"error while loading {input} (the warehouse keeps its previous run): {exc}", code=4)
    except Exception as exc:  # a worker lost, a scheduler unreachable: one line, not a traceback
        fail(f"sharded load of {input} failed (the warehouse keeps its previous run): "
             f"{type(exc).__name__}: {exc}", code=4)
    payload["declaration"] = (decl or purposes.UNDECLARED).to_json()
    emit(payload, as_json)
    if not as_json:
        report(payload)


def module_check(kind: str, input: Path) -> None:
    """The input check of the single-node path, before any cluster starts (``SourceError`` naming the path)."""
    from foresight import sources

    sources.get_source(kind).check_input(input)
