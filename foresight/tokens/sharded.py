"""A sharded tokenize: the subjects split into shards by their stable shard hash, each shard's work a task that a
worker runs, the vocabulary fitted as a map (per shard) and a reduce (the single-node fit on the maps' outputs).

A shard task opens the warehouse read-only, DuckDB on one thread, and sees only its subjects: TEMP views
``events``, ``subject_splits`` and ``notes`` shadow the tables (as :func:`foresight.optout.hide_subjects` does for
the opt-out), so the single-node code runs on a shard unchanged. The shard of a subject is
:func:`foresight.warehouse.shard_filter.shard_of` (the split hash's neighbour, as the sharded load's). The steps:

1. :func:`fit_shard` (map): the shard's train subject ids, its distinct (code, train subject) pairs, train events
   per code, the train events that the value deciles and birth bands read (finite values, births), its distinct
   codes per split, its events and its last event, as files under ``work/fit-K``.
2. reduce (:func:`reduce_codes`, where the run is coordinated): shards never share a subject, so distinct-subject
   counts summed over them are exact; the privacy floor, rare pools and deciles are :func:`~.fit.fit_codes` on the
   union of the shards' files, with the single-node chunking of the train subjects.
3. :func:`clock_shard` (map, when YEAR or AGE markers are on): the marker values the encoder writes for the
   shard's train subjects (:func:`~.fit.clock_marker_table`, which needs step 2's code tokens).
4. reduce (:func:`reduce_markers`): the marker bands and the rest of the vocabulary (:func:`~.fit.finish_vocabulary`).
5. :func:`encode_shard` (map): each split of the shard's subjects as token files (:func:`~.shards.write_split`).
6. :func:`assemble_split`: each split's shard files merged in subject order, so every split file is byte for
   byte the single-node file (the summary's clock-error percentiles come from other samples of the same errors).

All or nothing: the whole run happens inside the token folder's partial sibling (:func:`~.folder.building`, on the
storage every worker reaches) and the folder is sealed and swapped in only after every shard is assembled; a failed
shard fails the run and leaves the previous folder. A shard task writes into ``<dir>.part`` (a killed task's
leftover is deleted first) and renames it when complete, so a retried task never adds to a partial output; a
re-run starts from scratch. The warehouse is held read-only for the whole run, as a single-node tokenize holds it.

Which worker runs which shard is the caller's ``mapper`` (:data:`Mapper`): :func:`serial` here, the Prefect flow
``flows/sharded.py`` on a Dask cluster.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from foresight import optout, purposes, warehouse
from foresight.schema import BIRTH_CODE, SPLITS
from foresight.tokens import build, fit
from foresight.tokens.folder import building
from foresight.tokens.from_warehouse import register_code_map
from foresight.tokens.shards import INDEX_DTYPE, save_index, write_split
from foresight.tokens.vocab import TokenizerConfig, Vocabulary
from foresight.warehouse.connection import sql_literal
from foresight.warehouse.shard_filter import SHARD_MACRO, check_shard

# Runs ``step(**call)`` for every call (one per shard), wherever it likes; returns the results in order.
Mapper = Callable[[Callable[..., Any], list[dict[str, Any]]], list[Any]]
SHADOWED = ("events", "subject_splits", "notes")  # the tables a shard's connection sees only its subjects of


def serial(step: Callable[..., Any], calls: list[dict[str, Any]]) -> list[Any]:
    """The mapper without a cluster: every shard in turn, in this process."""
    return [step(**call) for call in calls]


def tokenize_sharded(db: str | Path, out_dir: str | Path, config: TokenizerConfig | None = None, *, shards: int,
                     mapper: Mapper = serial, exclude_subjects: Iterable[int] | None = None,
                     purpose: str = purposes.UNSPECIFIED, memory_limit: str | None = None) -> dict[str, Any]:
    """:func:`foresight.tokens.tokenize` as ``shards`` shard tasks run by ``mapper``: the same token folder (the
    same split files byte for byte; the same vocabulary, whose ``vocab.json`` may list the code map's and the
    deciles' keys in another order) and a summary with the same keys. ``memory_limit``: each shard
    task's DuckDB budget (default: the machine's, see :func:`foresight.warehouse.memory_budget`)."""
    t_start = time.perf_counter()
    config = config or TokenizerConfig()
    out, db = Path(out_dir), Path(db)
    if shards < 1:
        raise fit.TokenizeError(f"a sharded tokenize needs at least one shard, not {shards}")
    build.check_request(db, out, purpose)
    excluded = set(exclude_subjects or ())
    # held read-only for the whole run (no load can change the warehouse between the steps)
    with warehouse.connect(db, read_only=True) as guard:
        n_hidden, provenance = build.covered_provenance(guard, excluded, purpose)
        with building(out) as tmp:
            run = {"db": db, "work": tmp / "work", "shards": shards, "excluded": sorted(excluded),
                   "memory_limit": memory_limit}
            summary = _sharded_folder(run, tmp, config, mapper, n_hidden, provenance)
            build.write_summary(tmp, summary, out, db, t_start)
    return summary


def _sharded_folder(run: dict[str, Any], tmp: Path, config: TokenizerConfig, mapper: Mapper, n_hidden: int,
                    provenance: dict[str, Any]) -> dict[str, Any]:
    """Steps 1-6 of the module docstring into ``tmp``: returns the summary so far (as ``build._write_folder``)."""
    db, work, n = run["db"], run["work"], run["shards"]

    def calls(**extra: Any) -> list[dict[str, Any]]:
        return [{"db": db, "work": work, "shard": (k, n), "excluded": run["excluded"],
                 "memory_limit": run["memory_limit"], **extra} for k in range(n)]

    maps = mapper(fit_shard, calls(config=config))
    code_vocab, report, chunks, split_codes = reduce_codes(db, work, n, config, maps)
    if config.year_tokens or config.age_tokens:
        mapper(clock_shard, calls(code_vocab=code_vocab))
    with warehouse.connect(db, read_only=True) as con:
        vocab = reduce_markers(con, work, n, code_vocab, report, chunks)
        markers_coarsened = build.record_optout(con, vocab, set(run["excluded"]), n_hidden)
        ends = [m["extract_end"] for m in maps if m["extract_end"] is not None]
        build.describe_run(vocab, provenance, max(ends) if ends else None)
        descriptions = build.code_descriptions(con, vocab)
    summary = build.new_summary(vocab, provenance, markers_coarsened)
    encoded = mapper(encode_shard, calls(vocab=vocab))
    parts = [work / f"enc-{k:04d}" for k in range(n)]
    for split in SPLITS:
        assemble_split(parts, split, tmp, vocab.dtype, max(1, config.subjects_per_chunk // n))
        counts = tuple(sum(e[split][key] for e in encoded) for key in ("tokens", "subjects", "static_only"))
        errors = np.concatenate([np.asarray(e[split]["errors"], dtype=np.float64) for e in encoded])
        build.record_split(summary, split, counts, errors,
                           len(split_codes.get(split, set()) - split_codes.get("train", set())))
    shutil.rmtree(work)
    build.finish_folder(tmp, vocab, descriptions, summary)
    return summary


# --- a shard's connection and outputs --------------------------------------------------------------------------


@contextmanager
def shard_connection(db: Path, shard: tuple[int, int], excluded: list[int], memory_limit: str | None
                     ) -> Iterator[Any]:
    """The warehouse read-only, DuckDB on one thread, showing only the subjects of ``shard`` = (k, n) that are
    not ``excluded`` (:func:`only_shard`). Every scan still reads the whole warehouse file and keeps the shard's
    rows (a copy of each shard's events in parquet, read instead, measured slower at 2 and 4 shards: its write
    cost more than the scans it saved)."""
    k, n = check_shard(shard)
    with warehouse.connect(db, read_only=True, memory_limit=memory_limit) as con:
        con.execute("SET threads = 1")
        if excluded:
            optout.hide_subjects(con, excluded)
        only_shard(con, k, n)
        yield con


def only_shard(con: Any, k: int, n: int) -> None:
    """Make ``con`` see only the subjects of shard k of n: TEMP ``fs_shard_subjects`` (the shard's subjects with
    events or a split, of what ``con`` sees now, so an opt-out stays hidden) and TEMP views shadowing
    :data:`SHADOWED`, each filtered to them."""
    db = con.execute("SELECT current_database()").fetchall()[0][0]
    con.execute(SHARD_MACRO)
    con.execute(f"CREATE OR REPLACE TEMP TABLE fs_shard_subjects AS SELECT subject_id FROM "
                f"(SELECT subject_id FROM events UNION SELECT subject_id FROM subject_splits) "
                f"WHERE fs_shard(subject_id, {int(n)}) = {int(k)}")
    for table in SHADOWED:
        exists = con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' "
                             "AND table_name = ?", [db, table]).fetchall()[0][0]
        if exists:
            con.execute(f'CREATE OR REPLACE TEMP VIEW {table} AS SELECT * FROM "{db}".main.{table} '
                        "WHERE subject_id IN (SELECT subject_id FROM fs_shard_subjects)")


@contextmanager
def staged(dest: Path) -> Iterator[Path]:
    """Write a shard's outputs into ``<dest>.part`` (emptied first: a killed task's leftover) and rename it to
    ``dest`` once complete; on failure the part is deleted. ``dest`` therefore only ever holds complete output."""
    part = dest.with_name(dest.name + ".part")
    for p in (part, dest):
        shutil.rmtree(p, ignore_errors=True)
    part.mkdir(parents=True)
    try:
        yield part
        os.replace(part, dest)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise


def copy_to(con: Any, sql: str, path: Path) -> None:
    """The rows of ``sql`` as the parquet file ``path``."""
    con.execute(f"COPY ({sql}) TO {sql_literal(str(path))} (FORMAT parquet)")


def parquet(files: Iterable[Path]) -> str:
    """``read_parquet`` of ``files`` (one table)."""
    return f"read_parquet([{', '.join(sql_literal(str(f)) for f in files)}])"


# --- the map steps (one task per shard, on a worker) -----------------------------------------------------------


def fit_shard(db: Path, work: Path, shard: tuple[int, int], excluded: list[int], memory_limit: str | None,
              config: TokenizerConfig) -> dict[str, Any]:
    """Step 1 for one shard -> ``work/fit-K``: ``train_ids.npy``, ``code_pairs``, ``counts`` (train events per
    code), ``train_events`` (subject, time, code, value of the train events with a finite value and of births),
    ``split_codes`` (distinct split, code) and ``codes`` (distinct codes of all its events). Returns its events and
    last event."""
    with staged(work / f"fit-{shard[0]:04d}") as part, shard_connection(db, shard, excluded, memory_limit) as con:
        ids = fit.train_subject_ids(con)
        np.save(part / "train_ids.npy", ids)
        fit.create_train_views(con, config, fit.budget_chunks(con, ids))
        copy_to(con, "SELECT node, subject_id FROM code_pairs", part / "code_pairs.parquet")
        copy_to(con, "SELECT code, count(*) AS n FROM train_events GROUP BY code", part / "counts.parquet")
        copy_to(con, "SELECT subject_id, time, code, numeric_value FROM train_events WHERE (numeric_value IS NOT NULL "
                     f"AND isfinite(numeric_value)) OR code = {sql_literal(BIRTH_CODE)}", part / "train_events.parquet")
        copy_to(con, "SELECT DISTINCT s.split, e.code FROM events e JOIN subject_splits s USING (subject_id)",
                part / "split_codes.parquet")
        copy_to(con, "SELECT DISTINCT code FROM events", part / "codes.parquet")
        n_events = int(con.execute("SELECT count(*) FROM events").fetchall()[0][0])
        return {"events": n_events, "train_subjects": len(ids), "extract_end": warehouse.extract_end(con)}


def clock_shard(db: Path, work: Path, shard: tuple[int, int], excluded: list[int], memory_limit: str | None,
                code_vocab: Vocabulary) -> None:
    """Step 3 for one shard -> ``work/clock-K/clock_markers.parquet``: the YEAR/AGE values the encoder writes for
    its train subjects with ``code_vocab``'s code tokens (:func:`~.fit.clock_marker_table`)."""
    with staged(work / f"clock-{shard[0]:04d}") as part, shard_connection(db, shard, excluded, memory_limit) as con:
        fit.clock_marker_table(con, code_vocab)
        copy_to(con, "SELECT kind, v, subject_id, n FROM clock_markers", part / "clock_markers.parquet")


def encode_shard(db: Path, work: Path, shard: tuple[int, int], excluded: list[int], memory_limit: str | None,
                 vocab: Vocabulary) -> dict[str, dict[str, Any]]:
    """Step 5 for one shard -> ``work/enc-K``: every split of its subjects as token files; per split its tokens,
    subjects, subjects with only static facts and clock-error sample."""
    out: dict[str, dict[str, Any]] = {}
    with staged(work / f"enc-{shard[0]:04d}") as part, shard_connection(db, shard, excluded, memory_limit) as con:
        register_code_map(con, vocab)
        for split in SPLITS:
            ids = build.split_subject_ids(con, split)
            n_tokens, errors, n_static_only = write_split(con, vocab, split, ids, part, None)
            out[split] = {"tokens": n_tokens, "subjects": len(ids), "static_only": n_static_only, "errors": errors}
    return out


# --- the reduce steps (where the run is coordinated) -----------------------------------------------------------


def reduce_codes(db: Path, work: Path, n: int, config: TokenizerConfig, maps: list[dict[str, Any]]
                 ) -> tuple[Vocabulary, dict[str, Any], list[fit.Chunk], dict[str, set[str]]]:
    """Step 2: (the code vocabulary, the rule report so far, the chunks of train subjects, split -> its codes)."""
    fits = [work / f"fit-{k:04d}" for k in range(n)]
    ids = np.sort(np.concatenate([np.load(f / "train_ids.npy") for f in fits]))
    if len(ids) == 0:
        raise fit.TokenizeError(
            "the warehouse has no events" if sum(m["events"] for m in maps) == 0 else
            "no subject with events is in the train split: the vocabulary is fitted on train only")
    with warehouse.connect(db, read_only=True) as con:
        chunks = fit.budget_chunks(con, ids)
        con.execute("CREATE OR REPLACE TEMP TABLE code_pairs AS SELECT node, subject_id FROM "
                    f"{parquet(f / 'code_pairs.parquet' for f in fits)} ORDER BY subject_id")
        con.execute(f"CREATE OR REPLACE TEMP VIEW train_events AS SELECT * FROM "
                    f"{parquet(f / 'train_events.parquet' for f in fits)}")
        # the distinct codes of every event (fit_codes maps the codes never seen in train)
        con.execute("CREATE OR REPLACE TEMP VIEW events AS SELECT code FROM "
                    f"{parquet(f / 'codes.parquet' for f in fits)}")
        n_events = {c: int(x) for c, x in con.execute(
            f"SELECT code, sum(n) FROM {parquet(f / 'counts.parquet' for f in fits)} GROUP BY code").fetchall()}
        code_vocab, report = fit.fit_codes(con, config, chunks, len(ids), n_events)
        split_codes: dict[str, set[str]] = {}
        for split, code in con.execute(
                f"SELECT DISTINCT split, code FROM {parquet(f / 'split_codes.parquet' for f in fits)}").fetchall():
            split_codes.setdefault(split, set()).add(code)
    return code_vocab, report, chunks, split_codes


def reduce_markers(con: Any, work: Path, n: int, code_vocab: Vocabulary, report: dict[str, Any],
                   chunks: list[fit.Chunk]) -> Vocabulary:
    """Step 4 on the warehouse connection ``con`` (its ``etl_runs`` make the fingerprint): the fitted vocabulary."""
    con.execute("CREATE OR REPLACE TEMP VIEW train_events AS SELECT * FROM "
                f"{parquet(work / f'fit-{k:04d}' / 'train_events.parquet' for k in range(n))}")
    clocks = [work / f"clock-{k:04d}" / "clock_markers.parquet" for k in range(n)]
    if all(p.exists() for p in clocks):
        con.execute(f"CREATE OR REPLACE TEMP TABLE clock_markers AS SELECT * FROM {parquet(clocks)}")
    vocab = fit.finish_vocabulary(con, code_vocab, report, chunks, clock_ready=True)
    con.execute("DROP VIEW train_events; DROP TABLE IF EXISTS clock_markers")
    return vocab


# --- step 6: the split files in subject order ------------------------------------------------------------------


def assemble_split(parts: list[Path], split: str, out: Path, dtype: Any, block: int) -> None:
    """Merge the shards' files of ``split`` (each in subject order) into ``out/<split>.*`` in subject order:
    the files a single-node tokenize writes. ``block``: subjects taken from each shard at a time (memory)."""
    idx = [_index(p / f"{split}.index.npy") for p in parts]
    pos = [0] * len(parts)
    written, n_rows = 0, 0
    index_tmp = out / f"{split}.index.part"
    with (open(out / f"{split}.bin", "wb") as ftok, open(out / f"{split}.clock.bin", "wb") as fclk,
          open(index_tmp, "wb") as fidx):
        while any(p < len(ix) for p, ix in zip(pos, idx, strict=True)):
            # every subject up to the smallest of the shards' next-block ends: at least one shard's block
            cut = min(ix["subject_id"][min(p + block, len(ix)) - 1] for p, ix in zip(pos, idx, strict=True)
                      if p < len(ix))
            ends = [p + int(np.searchsorted(ix["subject_id"][p:], cut, side="right"))
                    for p, ix in zip(pos, idx, strict=True)]
            rows, toks, clock = _gather(parts, split, dtype, idx, pos, ends)
            rows["offset"] += written
            ftok.write(toks.tobytes())
            fclk.write(clock.tobytes())
            fidx.write(rows.tobytes())
            written += len(toks)
            n_rows += len(rows)
            pos = ends
    save_index(index_tmp, out / f"{split}.index.npy", n_rows)


def _index(path: Path) -> np.ndarray:
    """A shard's index rows (:data:`~.shards.INDEX_DTYPE`), mapped from disk (48 bytes a subject stay there)."""
    arr = np.load(path, mmap_mode="r")
    if arr.dtype != INDEX_DTYPE:
        raise fit.TokenizeError(f"{path}: not a token index ({arr.dtype})")
    return arr


def _gather(parts: list[Path], split: str, dtype: Any, idx: list[np.ndarray], starts: list[int], ends: list[int]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The index rows ``starts[k]:ends[k]`` of every shard ``k`` in subject order (offsets from 0) and their
    tokens and clock minutes: each shard's rows are a contiguous range of its files, read once."""
    rows, tok_parts, clk_parts, src = [], [], [], []
    base = 0
    for k, (ix, a, b) in enumerate(zip(idx, starts, ends, strict=True)):
        if b == a:
            continue
        sel = ix[a:b].copy()
        lo, hi = int(sel["offset"][0]), int(sel["offset"][-1] + sel["length"][-1])
        tok_parts.append(_read(parts[k] / f"{split}.bin", dtype, lo, hi))
        clk_parts.append(_read(parts[k] / f"{split}.clock.bin", np.int32, lo, hi))
        src.append(sel["offset"] - lo + base)
        rows.append(sel)
        base += hi - lo
    sel = np.concatenate(rows)
    start = np.concatenate(src)
    order = np.argsort(sel["subject_id"], kind="stable")
    sel, start = sel[order], start[order]
    lengths = sel["length"]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    gather = np.repeat(start - offsets, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
    sel["offset"] = offsets
    return sel, np.concatenate(tok_parts)[gather], np.concatenate(clk_parts)[gather]


def _read(path: Path, dtype: Any, lo: int, hi: int) -> np.ndarray:
    """Items ``lo:hi`` of the flat file ``path`` of ``dtype``."""
    dtype = np.dtype(dtype)
    return np.fromfile(path, dtype=dtype, count=hi - lo, offset=lo * dtype.itemsize)
