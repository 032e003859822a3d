"""The sharded ``etl`` flow: one load task per shard, mapped over a Dask cluster, then one merge.

Each shard task runs :func:`foresight.warehouse.sharded.load_shard` on a Dask worker (DuckDB inside the task, one
thread), writing its own warehouse file under the shard folder (storage every worker can reach); the flow waits for
every shard, then :func:`foresight.warehouse.sharded.merge` publishes them into the warehouse in one transaction on
the machine that runs the flow. A shard that fails after its retries fails the flow before the merge: the
warehouse keeps its previous run. Re-running redoes every shard from scratch and replaces the source's rows.

The Dask cluster is prefect-dask's :class:`~prefect_dask.DaskTaskRunner`: a ``LocalCluster`` of single-threaded
worker processes (``workers``), or an existing scheduler (``scheduler``, e.g. one started by dask-jobqueue on
Slurm or dask-kubernetes: see ``deploy/``).

The sharded ``tokenize`` flow (:func:`tokenize_sharded`) runs :func:`foresight.tokens.sharded.tokenize_sharded` with
its per-shard steps (fit map, marker map, encode) as tasks on the same runner: see that module for the steps and
the guarantees (the same token folder as single-node, published whole or not at all).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from flows.retry import transient
from foresight import purposes, sources
from foresight.optout import read_subjects_file
from foresight.purposes import read_declaration
from foresight.tokens import sharded as tokens_sharded
from foresight.tokens.vocab import TokenizerConfig
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


# --- the sharded tokenize --------------------------------------------------------------------------------------


@task(name="tokenize-shard", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient,
      cache_policy=NO_CACHE)
def tokenize_shard(step: Callable[..., Any], call: dict[str, Any]) -> Any:
    """One shard's step of the sharded tokenize (``fit_shard``, ``clock_shard`` or ``encode_shard`` of
    :mod:`foresight.tokens.sharded`): its output is written from scratch, so a retry never adds to a partial one."""
    result = step(**call)
    get_run_logger().info("%s: shard %d of %d done", step.__name__, *call["shard"])
    return result


def on_task_runner(step: Callable[..., Any], calls: list[dict[str, Any]]) -> list[Any]:
    """The :data:`foresight.tokens.sharded.Mapper` of the flow: one task per shard on the flow's task runner; every
    shard settles (no worker still writing) before one failure fails the step."""
    futures = tokenize_shard.map(unmapped(step), calls)
    wait(futures)
    return [f.result() for f in futures]


@flow(name="tokenize-sharded", log_prints=True)
def tokenize_sharded(db: Path, out: Path, shards: int, config: dict[str, Any] | None = None,
                     exclude_subjects: Path | None = None, purpose: str = purposes.UNSPECIFIED,
                     memory_limit: str | None = None) -> dict[str, Any]:
    """Tokenize ``db`` into ``out`` as ``shards`` shards on the flow's task runner; returns the summary (the
    single-node ``tokenize`` keys). ``config``: TokenizerConfig fields (as saved in vocab.json)."""
    excluded = read_subjects_file(exclude_subjects) if exclude_subjects else None
    return tokens_sharded.tokenize_sharded(
        db, out, TokenizerConfig.from_dict(config) if config else None, shards=shards, mapper=on_task_runner,
        exclude_subjects=excluded, purpose=purpose, memory_limit=memory_limit)


def run_tokenize(db: Path, out: Path, config: TokenizerConfig | None = None, *, workers: int,
                 scheduler: str | None = None, shards: int | None = None, exclude_subjects: Path | None = None,
                 purpose: str = purposes.UNSPECIFIED, memory_limit: str | None = None,
                 return_state: bool = False) -> Any:
    """Run :func:`tokenize_sharded` on Dask: ``shards`` (default ``workers``) shards over ``workers`` local
    single-threaded workers or the cluster behind ``scheduler``. On a LocalCluster each worker's DuckDB gets an
    equal part of the memory budget, as for the sharded load."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, not {workers}")
    if not scheduler and memory_limit is None:
        memory_limit = f"{connection.memory_budget() // workers // 2**20}MB"
    flow_fn = tokenize_sharded.with_options(task_runner=task_runner(workers, scheduler))
    return flow_fn(db=db, out=out, shards=shards or workers, config=asdict(config) if config else None,
                   exclude_subjects=exclude_subjects, purpose=purpose, memory_limit=memory_limit,
                   return_state=return_state)
