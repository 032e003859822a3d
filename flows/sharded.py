"""The sharded ``etl`` flow: one load task per shard, mapped over a Dask cluster, then one merge.

Each shard task runs :func:`foresight.warehouse.sharded.load_shard` on a Dask worker (DuckDB inside the task, one
thread), writing its own warehouse file under the shard folder (storage every worker can reach); the flow waits for
every shard, then :func:`foresight.warehouse.sharded.merge` publishes them into the warehouse in one transaction on
the machine that runs the flow. A shard that fails after its retries fails the flow before the merge: the
warehouse keeps its previous run. Re-running redoes every shard from scratch and replaces the source's rows.

The Dask cluster is prefect-dask's :class:`~prefect_dask.DaskTaskRunner`: a ``LocalCluster`` of single-threaded
worker processes (``workers``), or an existing scheduler (``scheduler``, e.g. one started by dask-jobqueue on
Slurm or dask-kubernetes: see ``deploy/``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from flows.retry import transient
from foresight import sources
from foresight.optout import read_subjects_file
from foresight.purposes import read_declaration
from foresight.warehouse import connection, sharded


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient, cache_policy=NO_CACHE)
def load_shard(kind: str, root: Path, path: Path, k: int, n: int, source: str | None,
               excluded: list[int] | None, memory_limit: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """Load shard k of n into its own file (from scratch, so a retry or a re-run never double counts)."""
    summary = sharded.load_shard(kind, root, path, (k, n), source=source, exclude_subjects=excluded,
                                 memory_limit=memory_limit, **options)
    get_run_logger().info("shard %d of %d: %d events of %d subjects", k, n, summary["events"], summary["subjects"])
    return summary


@flow(name="etl-sharded", log_prints=True)
def etl_sharded(source: str, input: Path, db: Path, shards: int, name: str | None = None,
                exclude_subjects: Path | None = None, declaration: Path | None = None,
                shard_dir: Path | None = None, memory_limit: str | None = None,
                options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load ``input`` (a ``source`` such as ``mimic-iv``) into ``db`` as ``shards`` shards on the flow's task
    runner, then merge them in one transaction; returns the load summary (the single-node flow's keys).
    ``options`` go to the adapter's ``stage_group`` in every shard."""
    t0 = time.perf_counter()
    module = sources.get_source(source)
    root = module.check_input(Path(input))  # before any worker starts: a bad input creates no file
    excluded = sorted(read_subjects_file(exclude_subjects)) if exclude_subjects else None
    decl = read_declaration(declaration) if declaration else None
    files = sharded.plan(shards, shard_dir or sharded.shard_folder(db))
    futures = load_shard.map(source, root, files, range(shards), unmapped(shards), unmapped(name),
                             unmapped(excluded), unmapped(memory_limit),
                             unmapped(options or {}))
    wait(futures)  # every shard settles (no worker still writing) before one failure fails the flow
    summaries = [f.result() for f in futures]
    summary = sharded.merge(db, files, source_kind=source, input_path=root, source=name, exclude_subjects=excluded,
                            declaration=decl, warnings=[w for s in summaries for w in s["warnings"]])
    sharded.remove_shards(files)
    payload = summary.to_json()
    payload["seconds"] = round(time.perf_counter() - t0, 3)
    payload["shards"] = shards
    return payload


def task_runner(workers: int, scheduler: str | None = None) -> Any:
    """prefect-dask's runner: an existing scheduler at ``scheduler``, else a LocalCluster of ``workers``
    single-threaded worker processes."""
    from prefect_dask import DaskTaskRunner

    if scheduler:
        return DaskTaskRunner(address=scheduler)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def run(source: str, input: Path, db: Path, *, workers: int, scheduler: str | None = None,
        shards: int | None = None, **options: Any) -> dict[str, Any]:
    """Run :func:`etl_sharded` on Dask: ``shards`` (default ``workers``) shard tasks over ``workers`` local
    workers or the cluster behind ``scheduler``. On a LocalCluster each worker's DuckDB gets an equal part of the
    memory budget (:func:`foresight.warehouse.connection.memory_budget`)."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, not {workers}")
    if not scheduler and options.get("memory_limit") is None:
        options["memory_limit"] = f"{connection.memory_budget() // workers // 2**20}MB"
    flow_fn = etl_sharded.with_options(task_runner=task_runner(workers, scheduler))
    return flow_fn(source=source, input=input, db=db, shards=shards or workers, **options)
