"""Warehouse events -> encoded chunks: the SQL side of encoding (code map, event selection) for whole subjects.

``register_code_map`` puts every warehouse code's token id into a TEMP table once per connection; then
``encode_subjects`` selects a range of subjects' events (optionally of one split, of a cohort table, up to a
point in time) and hands them to :func:`foresight.tokens.codec.encode_arrays`. :func:`subject_chunks` cuts a
sorted list of subjects into the ranges encoded at a time, bounded in subjects and in events, so the encoder's
arrays take about the same memory whatever the cohort (and whatever the length of its records).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np

from foresight.schema import BIRTH_CODE
from foresight.tokens.codec import NO_TIME, EncodedChunk, encode_arrays, merge_static_only
from foresight.tokens.vocab import Vocabulary
from foresight.warehouse import MemoryBudgetError, parse_memory

# The encoder's arrays peak at roughly 300 bytes an event; a chunk of (budget / BYTES_PER_EVENT) events then holds
# about a third of the memory budget on top of DuckDB's share. Never fewer than MIN_CHUNK_EVENTS.
BYTES_PER_EVENT = 1024
MIN_CHUNK_EVENTS = 100_000


def memory_limit_bytes(con: Any) -> int:
    """The DuckDB memory budget of this connection in bytes (1 GiB when DuckDB words it otherwise, e.g. unlimited)."""
    setting = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    try:
        return parse_memory(str(setting).replace(" ", ""))
    except MemoryBudgetError:  # DuckDB's own wording of an unlimited budget, say
        return 1 << 30


def events_per_chunk(con: Any) -> int:
    """The most events a chunk of subjects should hold on this connection, from its DuckDB memory budget."""
    return max(MIN_CHUNK_EVENTS, memory_limit_bytes(con) // BYTES_PER_EVENT)


def subject_chunks(con: Any, ids: np.ndarray, split: str | None, per: int, max_events: int | None = None
                   ) -> list[tuple[int, int, int]]:
    """Cut the sorted subject ids ``ids`` (of ``split``) into chunks of consecutive subjects, each at most ``per``
    subjects and ``max_events`` events (default :func:`events_per_chunk`; a subject with more is a chunk of its
    own): ``(first id, last id, subjects)`` per chunk. Chunks only bound memory: encoding is per subject, so any
    chunking writes the same tokens."""
    if len(ids) == 0:
        return []
    max_events = max_events or events_per_chunk(con)
    cond = "subject_id IN (SELECT subject_id FROM subject_splits WHERE split = ?)" if split is not None else "true"
    counts = con.execute(f"SELECT subject_id, count(*) AS n FROM events WHERE {cond} GROUP BY 1 ORDER BY 1",
                         [split] if split is not None else []).fetchnumpy()
    known, n = counts.pop("subject_id"), counts.pop("n")
    pos = np.clip(np.searchsorted(known, ids), 0, max(len(known) - 1, 0))
    per_subject = np.where((len(known) > 0) & (known[pos] == ids), n[pos], 0) if len(known) else np.zeros(len(ids))
    chunks, start, in_chunk = [], 0, 0
    for block in range(0, len(ids), 1 << 16):  # Python ints a block at a time: no list as long as the cohort
        for i, k in enumerate(per_subject[block:block + (1 << 16)].tolist(), start=block):
            if i > start and (i - start >= per or in_chunk + k > max_events):
                chunks.append((int(ids[start]), int(ids[i - 1]), i - start))
                start, in_chunk = i, 0
            in_chunk += k
    chunks.append((int(ids[start]), int(ids[-1]), len(ids) - start))
    return chunks


def map_codes(con: Any, vocab: Vocabulary) -> dict[str, str]:
    """Every code in the warehouse -> its token (through ``codes.parent_codes``; see Vocabulary.token_for)."""
    rows = con.execute(
        "SELECT DISTINCT e.code, c.parent_codes FROM events e LEFT JOIN codes c USING (code) WHERE e.code <> ?",
        [BIRTH_CODE]).fetchall()
    return {code: vocab.token_for(code, list(parents) if parents is not None else None) for code, parents in rows}


def register_code_map(con: Any, vocab: Vocabulary) -> None:
    """TEMP table ``vocab_map(code, tok)``: every warehouse code -> token id, for the SQL side of encoding."""
    mapping = map_codes(con, vocab)
    con.execute("CREATE OR REPLACE TEMP TABLE vocab_map (code VARCHAR, tok INTEGER)")
    con.execute("INSERT INTO vocab_map SELECT unnest(?::VARCHAR[]), unnest(?::INTEGER[])",
                [list(mapping), [vocab.index[t] for t in mapping.values()]])


def encode_subjects(con: Any, vocab: Vocabulary, lo: int, hi: int, split: str | None = None,
                    as_of: datetime | None = None, cohort_table: str | None = None) -> EncodedChunk:
    """Encode the subjects with ids in [lo, hi] (of ``split`` / in ``cohort_table(subject_id)`` when given),
    from their events up to ``as_of``. ``register_code_map`` must have run on ``con``."""
    return encode_fetched(vocab, *subject_events(con, vocab, lo, hi, split, as_of, cohort_table))


def encode_fetched(vocab: Vocabulary, data: dict[str, np.ndarray], births: list[tuple[int, int]]) -> EncodedChunk:
    """Encode what :func:`subject_events` fetched (numpy only, no connection: safe on a worker thread)."""
    chunk = encode_arrays(vocab, data["subject_id"], data["t"], data["tok"], data["v"], dict(births))
    # subjects with a birth but no other event still get a (short) sequence
    present = set(chunk.subject_ids.tolist())
    extra = [sid for sid, _ in births if sid not in present]
    return merge_static_only(vocab, chunk, extra, dict(births)) if extra else chunk


def subject_events(con: Any, vocab: Vocabulary, lo: int, hi: int, split: str | None = None,
                   as_of: datetime | None = None, cohort_table: str | None = None
                   ) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
    """The events :func:`encode_subjects` encodes, as arrays (``subject_id``, ``t`` epoch seconds or NO_TIME,
    ``tok`` token id, ``v`` value or NaN), and the subjects' (id, birth time) pairs."""
    cfg = vocab.config
    cond, params = _subject_filter(lo, hi, split, as_of, cohort_table)
    data = con.execute(
        f"""
        SELECT e.subject_id, coalesce(epoch(e.time)::BIGINT, {NO_TIME}) AS t, m.tok,
               coalesce(e.numeric_value::DOUBLE, 'NaN'::DOUBLE) AS v
        FROM events e JOIN vocab_map m USING (code)
        WHERE {cond} AND e.code <> ? AND fs_kind(e.code) NOT IN (SELECT unnest(?::VARCHAR[]))
        """,
        [*params, BIRTH_CODE, list(cfg.drop_kinds)],
    ).fetchnumpy()
    births = con.execute(
        f"SELECT e.subject_id, epoch(min(e.time))::BIGINT FROM events e WHERE {cond} AND e.code = ? GROUP BY 1",
        [*params, BIRTH_CODE],
    ).fetchall()
    return data, births


def _subject_filter(lo: int, hi: int, split: str | None, as_of: datetime | None,
                    cohort_table: str | None) -> tuple[str, list[Any]]:
    """The WHERE condition on ``events e`` (and its bound values) of :func:`encode_subjects`."""
    where = ["e.subject_id BETWEEN ? AND ?"]
    params: list[Any] = [lo, hi]
    if split is not None:
        where.append("e.subject_id IN (SELECT subject_id FROM subject_splits WHERE split = ?)")
        params.append(split)
    if cohort_table is not None:
        if not cohort_table.isidentifier():
            raise ValueError(f"not a table name: {cohort_table!r}")
        where.append(f"e.subject_id IN (SELECT subject_id FROM {cohort_table})")
    if as_of is not None:
        where.append("(e.time IS NULL OR e.time <= ?)")
        params.append(as_of)
    return " AND ".join(where), params
