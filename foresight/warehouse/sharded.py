"""A sharded load: the same load run as ``n`` shards, each into its own DuckDB file, then merged in one transaction.

Subjects are partitioned by their stable shard hash (:mod:`foresight.warehouse.shard_filter`, the split hash's
neighbour). :func:`load_shard` is one worker's task: the ordinary load (:func:`foresight.sources.load` with
``shard=(k, n)``) into a fresh warehouse file of its own, DuckDB inside the task on one thread. :func:`merge` then
publishes every shard's events, quarantine rows, notes, codes, subject map and splits into the target warehouse in
ONE transaction, recorded as ONE run (``etl_runs``/``etl_tables`` summed over the shards, so the run reconciles
like a single-node load and reads the same to every command).

Guarantees, as for a single-node load: a shard's accounting adds up (read = loaded + quarantined + dropped, per
table) and the shards add up to the whole; nothing is visible until the merge commits, so a failed shard leaves
the previous run in place; a shard is always loaded from scratch into ``<file>.part`` and renamed when complete,
so a file left by a killed worker is redone, never merged, and a re-run replaces the source's rows (the same
source name), never adds to them. The orchestration (which worker runs which shard) is the Prefect flow
``flows/sharded.py`` on Dask; this module knows nothing of it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from foresight import sources
from foresight.optout import OPT_OUT_REASON
from foresight.optout import digest as optout_digest
from foresight.purposes import Declaration, record_load
from foresight.warehouse.connection import connect, sql_literal
from foresight.warehouse.governor import MemoryGovernor
from foresight.warehouse.load import rollback
from foresight.warehouse.publish import checkpoint, database_path
from foresight.warehouse.reconciliation import reconcile
from foresight.warehouse.results import LoadSummary, SourceError, TableResult
from foresight.warehouse.shard_filter import check_shard

# the warehouse tables a shard contributes, with the column that names its run
RUN_COLUMN = {"events": "load_id", "quarantine": "run_id", "notes": "load_id"}


def shard_folder(db: str | Path) -> Path:
    """Where a sharded load of ``db`` keeps its shard files by default: ``<db>.shards`` beside the warehouse (on a
    cluster, pass a folder every worker can write to)."""
    return Path(str(db) + ".shards")


def plan(n: int, folder: str | Path) -> list[Path]:
    """The shard files of an ``n``-shard load in ``folder``: ``shard-K-of-N.duckdb``, K = 0..n-1."""
    if n < 1:
        raise ValueError(f"a sharded load needs at least one shard, not {n}")
    return [Path(folder) / f"shard-{k:04d}-of-{n:04d}.duckdb" for k in range(n)]


def remove_database(path: Path) -> None:
    """Delete a DuckDB file with its write-ahead log and its load's staging file (all absent: nothing)."""
    for p in (path, path.with_name(path.name + ".wal"), path.with_name(path.name + ".staging"),
              path.with_name(path.name + ".staging.wal")):
        p.unlink(missing_ok=True)


def load_shard(kind: str, input_path: str | Path, path: str | Path, shard: tuple[int, int], *,
               source: str | None = None, exclude_subjects: Iterable[int] | None = None, threads: int = 1,
               memory_limit: str | None = None, **options: Any) -> dict[str, Any]:
    """Load shard ``shard=(k, n)`` of ``input_path`` into the fresh warehouse file ``path``; its summary JSON.

    The load runs into ``<path>.part`` (a leftover of a killed worker is deleted first) and is renamed to ``path``
    only once it has committed and reconciled: a file at ``path`` is always a complete shard.
    """
    k, n = check_shard(shard)
    path = Path(path)
    part = path.with_name(path.name + ".part")
    remove_database(part)
    remove_database(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with connect(part, memory_limit=memory_limit) as con:
        con.execute(f"SET threads = {int(threads)}")
        summary = sources.load(kind, con, input_path, source=source, exclude_subjects=exclude_subjects,
                               shard=(k, n), **options)
    os.replace(part, path)
    return summary.to_json()


def merge(db: str | Path, shard_files: Sequence[str | Path], *, source_kind: str, input_path: str | Path,
          source: str | None = None, exclude_subjects: Iterable[int] | None = None,
          declaration: Declaration | None = None, warnings: Iterable[str] = ()) -> LoadSummary:
    """Publish the complete shard files into the warehouse ``db`` in one transaction, as one run.

    Replaces the rows of ``source`` (default ``source_kind``) like a single-node load. ``SourceError`` when a
    shard file is missing (its load failed or never ran: nothing is written), or when the shards are not the
    shards of one load of ``source``. ``warnings``: the shards' warnings, reported once each.
    """
    t0, started = time.perf_counter(), datetime.now()
    source = source or source_kind
    files = [Path(f) for f in shard_files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SourceError(f"shard(s) not complete, nothing merged: {', '.join(missing)}")
    excluded = sorted({int(s) for s in exclude_subjects or ()})
    run_id = f"{source_kind}-{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    all_warnings: list[str] = list(warnings)  # the shards', and the checkpoint's if it fails
    with connect(db) as con, MemoryGovernor(con):  # the budget bounds the process (warehouse.governor)
        names = attach_shards(con, files)
        try:
            runs = shard_runs(con, names, source)
            con.execute("BEGIN TRANSACTION")
            try:
                publish_shards(con, names, source, run_id, excluded)
                tables = merge_accounting(con, names, runs, run_id=run_id, source=source,
                                          source_kind=source_kind, input_path=str(input_path), started=started)
                record_load(con, run_id, declaration, optout_digest(excluded) if excluded else None)
                con.execute("COMMIT")
            except BaseException as exc:
                rollback(con, exc)
                raise
        finally:
            for name in names:
                con.execute(f"DETACH {name}")
        checkpoint(con, all_warnings)
        reconcile(con, run_id)
        return summarize(con, run_id, tables, seconds=time.perf_counter() - t0, warnings=all_warnings,
                         n_excluded=len(excluded))


def attach_shards(con: duckdb.DuckDBPyConnection, files: Sequence[Path]) -> list[str]:
    """Attach each shard file read-only as ``fs_shard_<k>``; returns the names."""
    names = []
    for k, f in enumerate(files):
        name = f"fs_shard_{k}"
        con.execute(f"ATTACH {sql_literal(str(f))} AS {name} (READ_ONLY)")
        names.append(name)
    return names


def shard_runs(con: duckdb.DuckDBPyConnection, names: Sequence[str], source: str) -> list[dict[str, Any]]:
    """Each shard's one ``etl_runs`` row (a dict); ``SourceError`` unless each shard holds exactly one run of
    ``source``."""
    runs = []
    for name in names:
        cur = con.execute(f"SELECT * FROM {name}.etl_runs")
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
        if len(rows) != 1 or rows[0]["source"] != source:
            raise SourceError(f"{name}: not one shard of a load of {source!r} "
                              f"(runs: {[(r['run_id'], r['source']) for r in rows]})")
        runs.append(rows[0])
    return runs


def union(names: Sequence[str], select: str) -> str:
    """``select`` (with ``{s}`` for the shard's name) over every shard, as one UNION ALL."""
    return " UNION ALL ".join(select.format(s=name) for name in names)


def publish_shards(con: duckdb.DuckDBPyConnection, names: Sequence[str], source: str, run_id: str,
                   excluded: Sequence[int]) -> None:
    """Inside the merge's transaction: replace the source's events, quarantine rows and notes by the shards'
    (named by the merged run), add their codes, subject map rows and splits (splits never change)."""
    for table, col in RUN_COLUMN.items():
        con.execute(f"DELETE FROM {table} WHERE source = ?", [source])
        for name in names:
            con.execute(f"INSERT INTO {table} SELECT * REPLACE (?::VARCHAR AS {col}) FROM {name}.{table}", [run_id])
    con.execute(f"INSERT OR REPLACE INTO codes SELECT DISTINCT ON (code) * FROM "
                f"({union(names, 'SELECT * FROM {s}.codes')}) ORDER BY code")
    con.execute(f"INSERT OR IGNORE INTO subject_map SELECT DISTINCT ON (source, source_id) * FROM "
                f"({union(names, 'SELECT * FROM {s}.subject_map')}) ORDER BY source, source_id")
    con.execute(f"INSERT INTO subject_splits SELECT DISTINCT ON (subject_id) * FROM "
                f"({union(names, 'SELECT * FROM {s}.subject_splits')}) "
                "WHERE subject_id NOT IN (SELECT subject_id FROM subject_splits) ORDER BY subject_id")
    if excluded:  # as a single-node load: opted-out subjects lose their map rows, and splits once without events
        con.execute("DELETE FROM subject_map WHERE source = ? AND list_contains(?::BIGINT[], subject_id)",
                    [source, list(excluded)])
        con.execute("DELETE FROM subject_splits WHERE list_contains(?::BIGINT[], subject_id) AND subject_id NOT IN "
                    "(SELECT subject_id FROM events WHERE list_contains(?::BIGINT[], subject_id))",
                    [list(excluded), list(excluded)])  # the subquery only of opted-out ids: see publish.write_splits


def merge_accounting(con: duckdb.DuckDBPyConnection, names: Sequence[str], runs: Sequence[dict[str, Any]], *,
                     run_id: str, source: str, source_kind: str, input_path: str, started: datetime
                     ) -> list[TableResult]:
    """Write the merged run's ``etl_runs`` row and ``etl_tables`` rows: the shards' counts summed (per table, and
    per drop reason); returns the tables' accounting."""
    tables: dict[str, TableResult] = {}
    for name in names:
        for t, file, sha, read, loaded, quarantined, dropped, events in con.execute(
            f"SELECT source_table, file, sha256, rows_read, rows_loaded, rows_quarantined, rows_dropped, events "
            f"FROM {name}.etl_tables"
        ).fetchall():
            res = tables.setdefault(t, TableResult(table=t, file=file, sha256=sha))
            res.rows_read += read
            res.rows_loaded += loaded
            res.rows_quarantined += quarantined
            res.rows_dropped += dropped
            res.events += events
    reasons: dict[str, int] = {}
    checksums: dict[str, str] = {}
    for run in runs:
        for reason, n in json.loads(run["dropped_reasons"]).items():
            reasons[reason] = reasons.get(reason, 0) + n
        checksums.update(json.loads(run["input_checksums"]))
    for res in tables.values():
        res.dropped_reasons = {r: n for r, n in sorted(reasons.items()) if r.startswith(f"{res.table}: ")}
    notes = dict(con.execute("SELECT source_table, count(*) FROM notes WHERE load_id = ? GROUP BY ALL",
                             [run_id]).fetchall())
    for res in tables.values():
        res.notes = int(notes.get(res.table, 0))
    totals = {k: sum(r[k] for r in runs) for k in ("rows_read", "rows_loaded", "rows_quarantined", "rows_dropped",
                                                     "events_loaded")}
    subjects = con.execute("SELECT count(DISTINCT subject_id) FROM events WHERE load_id = ?", [run_id]).fetchall()[0][0]
    con.execute(
        "INSERT INTO etl_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [run_id, source, source_kind, input_path, json.dumps(checksums, sort_keys=True), started, datetime.now(),
         totals["rows_read"], totals["rows_loaded"], totals["rows_quarantined"], totals["rows_dropped"],
         json.dumps(reasons, sort_keys=True), totals["events_loaded"], subjects, runs[0]["missing_tables"],
         runs[0]["foresight_version"]],
    )
    con.executemany(
        "INSERT INTO etl_tables VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [[run_id, t.table, t.file, t.sha256, t.rows_read, t.rows_loaded, t.rows_quarantined, t.rows_dropped,
          t.events] for t in tables.values()],
    )
    return list(tables.values())


def summarize(con: duckdb.DuckDBPyConnection, run_id: str, tables: list[TableResult], *, seconds: float,
              warnings: Iterable[str], n_excluded: int) -> LoadSummary:
    """The merged run's :class:`LoadSummary` (the same keys as a single-node load's), read back from the
    warehouse."""
    cur = con.execute("SELECT * FROM etl_runs WHERE run_id = ?", [run_id])
    run = dict(zip([d[0] for d in cur.description], cur.fetchall()[0], strict=True))
    by_kind = dict(con.execute("SELECT fs_kind(code) AS k, count(*) FROM events WHERE load_id = ? "
                               "GROUP BY k ORDER BY k", [run_id]).fetchall())
    kept_warnings = list(dict.fromkeys(w for w in warnings if not w.startswith(f"{OPT_OUT_REASON}:")))
    if n_excluded:
        opted_out = sum(n for r, n in json.loads(run["dropped_reasons"]).items() if r.endswith(OPT_OUT_REASON))
        kept_warnings.append(f"{OPT_OUT_REASON}: {n_excluded} subject(s) listed, {opted_out} row(s) dropped")
    return LoadSummary(
        run_id=run_id, source=run["source"], source_kind=run["source_kind"], db=database_path(con),
        input_path=run["input_path"], subjects=run["subjects"], events=run["events_loaded"], events_by_kind=by_kind,
        rows_read=run["rows_read"], rows_loaded=run["rows_loaded"], rows_quarantined=run["rows_quarantined"],
        rows_dropped=run["rows_dropped"], dropped_reasons=json.loads(run["dropped_reasons"]),
        seconds=round(seconds, 3), tables=tables, missing_tables=json.loads(run["missing_tables"]),
        warnings=kept_warnings, notes=sum(t.notes for t in tables),
    )


def remove_shards(files: Iterable[str | Path]) -> None:
    """Delete shard files after a merge (and their folder once empty)."""
    folders = set()
    for f in files:
        remove_database(Path(f))
        remove_database(Path(f).with_name(Path(f).name + ".part"))
        folders.add(Path(f).parent)
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
