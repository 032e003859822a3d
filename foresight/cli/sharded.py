"""``foresight etl <source> --workers N [--scheduler ADDRESS]``: the sharded load on Dask (``flows/sharded.py``).

Called by :func:`foresight.cli.etl.run_etl` when ``--workers`` or ``--scheduler`` is given; prints the same
``--json`` keys as the single-node load (plus ``shards``), and fails with one line like it.

``foresight tokenize --workers N [--scheduler ADDRESS]`` likewise runs the sharded tokenize
(:func:`run_sharded_tokenize`): the same token folder and the same ``--json`` keys as the single-node tokenize.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import duckdb
import typer

from foresight import purposes, tokens, warehouse
from foresight.cli.app import emit, err, fail
from foresight.tokens.build import check_request

WorkersOption = Annotated[int | None, typer.Option(
    "--workers", min=1, help="Run the sharded path: the subjects split into N shards by their stable hash, each "
                             "loaded by one of N single-threaded Dask workers (a LocalCluster here), then merged "
                             "into --db in one transaction. Without it (and --scheduler) the single-node path runs.")]
SchedulerOption = Annotated[str | None, typer.Option(
    "--scheduler", help="Address of an existing Dask scheduler (e.g. tcp://head:8786, from dask-jobqueue or "
                        "dask-kubernetes) to run the shards on instead of a LocalCluster; --workers then sets the "
                        "number of shards (default 2). Shard files go beside --db: storage every worker can reach.")]


TokenizeWorkersOption = Annotated[int | None, typer.Option(
    "--workers", min=1, help="Run the sharded path: the subjects split into N shards by their stable hash, each "
                             "shard's vocabulary counts and token shards computed by one of N single-threaded Dask "
                             "workers (a LocalCluster here), merged into --out: the same folder as without it. "
                             "Without it (and --scheduler) the single-node path runs.")]
TokenizeSchedulerOption = Annotated[str | None, typer.Option(
    "--scheduler", help="Address of an existing Dask scheduler (e.g. tcp://head:8786, from dask-jobqueue or "
                        "dask-kubernetes) to run the shards on instead of a LocalCluster; --workers then sets the "
                        "number of shards (default 2). Workers read --db and write beside --out: storage every "
                        "worker can reach.")]


def environment() -> None:
    """Quiet the cluster's and Prefect's chatter (workers inherit the environment) and give a temporary local
    Prefect server (without PREFECT_API_URL) time to start on a busy machine."""
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # its telemetry fails offline, loudly


def run_sharded_tokenize(db: Path, out: Path, config: tokens.TokenizerConfig, *, workers: int | None,
                         scheduler: str | None, exclude_subjects: Path | None, purpose: str) -> dict[str, Any]:
    """Run :func:`flows.sharded.run_tokenize`; its summary (the single-node keys). ``exclude_subjects``: the file
    (checked by the caller; the flow reads it). Fails like the single-node tokenize (exit 2 with one line), and
    with exit 4 when the cluster fails (the token folder keeps its previous contents)."""
    environment()
    from flows import sharded as flow

    try:
        check_request(db, out, purpose)  # what the single-node path refuses, refused before a cluster starts
        err.print(f"tokenizing as {workers or 2} shard(s) on "
                  f"{scheduler or f'a LocalCluster of {workers} worker(s)'} ...")
        return flow.run_tokenize(db, out, config, workers=workers or 2, scheduler=scheduler,
                                 exclude_subjects=exclude_subjects, purpose=purpose)
    except (tokens.TokenizeError, purposes.PurposeError) as exc:
        fail(str(exc))
    except Exception as exc:  # a worker lost, a scheduler unreachable: one line, not a traceback
        fail(f"sharded tokenize of {db} failed ({out} keeps its previous contents): {type(exc).__name__}: {exc}",
             code=4)


def run_sharded_etl(kind: str, input: Path, db: Path, source: str, exclude_subjects: Path | None,
                    declaration: Path | None, decl: purposes.Declaration | None, as_json: bool, *,
                    workers: int | None, scheduler: str | None, report: Callable[[dict[str, Any]], None]) -> None:
    """Run :func:`flows.sharded.run` and report like the single-node load (``report`` prints the summary table).
    ``exclude_subjects`` and ``declaration`` are the files (the flow reads them; the caller has checked them and
    passes the declaration read, ``decl``, for the report).

    Exit codes as the single-node load: 2 bad input, 3 the accounting did not reconcile, 4 a DuckDB, I/O or
    cluster error (the warehouse keeps its previous run)."""
    environment()
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
