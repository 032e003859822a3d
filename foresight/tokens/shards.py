"""Token shards on disk: one split's subjects encoded chunk by chunk into ``<split>.bin``, ``<split>.clock.bin``
and ``<split>.index.npy`` (read back by :mod:`foresight.dataset`).

- ``<split>.bin``: token ids of all subjects, back to back (uint16, or uint32 for vocabularies of 65,536+).
- ``<split>.clock.bin``: int32 minutes of the token clock since the subject's first event, one per token.
- ``<split>.index.npy``: one :data:`INDEX_DTYPE` row per subject.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from foresight.tokens.codec import NO_TIME, EncodedChunk
from foresight.tokens.folder import seal
from foresight.tokens.from_warehouse import (
    MIN_CHUNK_EVENTS,
    encode_fetched,
    encode_subjects,
    events_per_chunk,
    subject_chunks,
    subject_events,
)
from foresight.tokens.vocab import MINUTE, Vocabulary

# One row per subject: where its tokens are, how long its static prefix is (with and without the markers of
# the first timestamp), when its first event was and when it was born (NO_TIME when unknown).
INDEX_DTYPE = np.dtype([("subject_id", "<i8"), ("offset", "<i8"), ("length", "<i8"), ("prefix_len", "<i4"),
                        ("head_len", "<i4"), ("t0", "<i8"), ("birth", "<i8")])


def write_split(
    con: Any, vocab: Vocabulary, split: str, ids: np.ndarray, out: Path, progress: Any
) -> tuple[int, np.ndarray, int]:
    """Encode and append one split's subjects chunk by chunk (:func:`~.from_warehouse.subject_chunks`: at most
    ``subjects_per_chunk`` subjects and a memory-budget's worth of events each): (tokens written, clock-error
    sample, subjects with only static facts). ``register_code_map`` must have run on ``con``;
    ``progress(split, done, total)`` is called after each chunk."""
    written, static_only, n_index, done = 0, 0, 0, 0
    errors = ClockErrorSample()
    index_tmp = out / f"{split}.index.part"  # index rows streamed to disk: memory stays flat with the cohort
    with (open(out / f"{split}.bin", "wb") as ftok, open(out / f"{split}.clock.bin", "wb") as fclk,
          open(index_tmp, "wb") as fidx):
        for chunk, n_subjects in encoded_chunks(con, vocab, split, ids):
            ftok.write(chunk.tokens.astype(vocab.dtype).tobytes())
            fclk.write(clock_minutes(chunk).tobytes())
            rows = index_rows(vocab, chunk, written)
            fidx.write(rows.tobytes())
            n_index += len(rows)
            errors.add(chunk.clock_error_s)
            # no timed event at all (static facts and/or a birth only): a valid but empty-looking record that
            # the summary names, so a cohort full of them (a broken extract) does not pass unnoticed
            static_only += int((chunk.t0_s == NO_TIME).sum())
            written += len(chunk.tokens)
            done += n_subjects
            if progress is not None:
                progress(split, done, len(ids))
    save_index(index_tmp, out / f"{split}.index.npy", n_index)
    return written, errors.values(), static_only


def encoded_chunks(con: Any, vocab: Vocabulary, split: str, ids: np.ndarray) -> Iterator[tuple[EncodedChunk, int]]:
    """The split's chunks encoded, in subject order, with the number of subjects in each.

    With DuckDB on more than one thread (the connection's ``threads``; the sharded path's workers use one), the
    chunks are encoded on a pool of that many threads while this one fetches the next chunk's events: DuckDB and
    numpy's sorts and gathers release the GIL, so the cores overlap. Each chunk then holds 1/threads of the events
    a chunk would hold alone, so the memory in flight stays about the same. Any chunking writes the same tokens.
    """
    per = vocab.config.subjects_per_chunk
    threads = int(con.execute("SELECT current_setting('threads')").fetchall()[0][0])
    if threads <= 1:
        for lo, hi, n in subject_chunks(con, ids, split, per):
            yield encode_subjects(con, vocab, lo, hi, split), n
        return
    plan = subject_chunks(con, ids, split, per, max(MIN_CHUNK_EVENTS, events_per_chunk(con) // threads))
    pending: deque[tuple[Future[EncodedChunk], int]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="encode") as pool:
        for lo, hi, n in plan:
            pending.append((pool.submit(encode_fetched, vocab, *subject_events(con, vocab, lo, hi, split)), n))
            if len(pending) >= threads:
                done, k = pending.popleft()
                yield done.result(), k
        while pending:
            done, k = pending.popleft()
            yield done.result(), k


class ClockErrorSample:
    """A uniform random sample (fixed seed: the same every run) of at most ``size`` of a split's clock errors, with
    their exact maximum always kept: what the summary's percentiles are taken from, in memory that stays the same
    whatever the cohort (a sample per chunk grew with the number of chunks: ~100 MB at a million lives)."""

    def __init__(self, size: int = 100_000, seed: int = 0) -> None:
        self.size, self.rng = size, np.random.default_rng(seed)
        self.keys, self.kept, self.max = np.zeros(0), np.zeros(0), None

    def add(self, errors: np.ndarray) -> None:
        """Offer one chunk's errors (seconds) to the sample."""
        if not len(errors):
            return
        top = float(errors.max())
        self.max = top if self.max is None else max(self.max, top)
        keys = np.concatenate([self.keys, self.rng.random(len(errors))])
        kept = np.concatenate([self.kept, np.asarray(errors, dtype=np.float64)])
        if len(keys) > self.size:  # the smallest random keys: a uniform sample of everything offered so far
            keep = np.argpartition(keys, self.size)[: self.size]
            keys, kept = keys[keep], kept[keep]
        self.keys, self.kept = keys, kept

    def values(self) -> np.ndarray:
        """The sample, its largest value replaced by the exact maximum of every error offered."""
        if self.max is None:
            return np.zeros(0)
        out = self.kept.copy()
        out[int(np.argmax(out))] = self.max
        return out


def save_index(raw: Path, dest: Path, n: int, block: int = 1 << 16) -> None:
    """Turn ``raw`` (``n`` :data:`INDEX_DTYPE` rows, back to back) into the ``.npy`` file ``dest``, ``block`` rows at
    a time, and delete it: the same file ``np.save`` writes, with neither the whole index in memory nor a memory map
    of it (a map's written pages count in the process's memory until it is closed: 42 MB at a million lives)."""
    header = {"descr": np.lib.format.dtype_to_descr(INDEX_DTYPE), "fortran_order": False, "shape": (n,)}
    with open(raw, "rb") as src, open(dest, "wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
        for start in range(0, n, block):
            out.write(src.read(min(block, n - start) * INDEX_DTYPE.itemsize))
    raw.unlink()


def write_shard(vocab: Vocabulary, chunk: EncodedChunk, out: Path, name: str) -> None:
    """One encoded chunk as a whole split ``out/<name>.*`` (same files and layout as :func:`write_split`); the
    folder is sealed again (:func:`foresight.tokens.folder.seal`) so readers accept it."""
    chunk.tokens.astype(vocab.dtype).tofile(out / f"{name}.bin")
    clock_minutes(chunk).tofile(out / f"{name}.clock.bin")
    np.save(out / f"{name}.index.npy", index_rows(vocab, chunk, 0))
    seal(out)


def clock_minutes(chunk: EncodedChunk) -> np.ndarray:
    """int32 minutes of each token's clock since its subject's first event (0 for subjects without one)."""
    t0 = np.repeat(np.where(chunk.t0_s == NO_TIME, 0, chunk.t0_s), np.diff(chunk.offsets))
    return ((chunk.clock_s - t0) // MINUTE).astype(np.int32)


def index_rows(vocab: Vocabulary, chunk: EncodedChunk, written: int) -> np.ndarray:
    """The index rows of a chunk whose tokens start at position ``written`` of the split's token file."""
    idx = np.zeros(len(chunk.subject_ids), dtype=INDEX_DTYPE)
    idx["subject_id"] = chunk.subject_ids
    idx["offset"] = chunk.offsets[:-1] + written
    idx["length"] = np.diff(chunk.offsets)
    idx["prefix_len"] = chunk.prefix_lens
    idx["head_len"] = chunk.prefix_lens - first_markers(vocab, chunk)
    idx["t0"] = chunk.t0_s
    idx["birth"] = chunk.birth_s
    return idx


def first_markers(vocab: Vocabulary, chunk: EncodedChunk) -> np.ndarray:
    """How many of each prefix's last tokens are interval/YEAR/MONTH/AGE markers of the first timestamp."""
    is_marker = (vocab.is_time | vocab.is_marker)[chunk.tokens]
    n = np.zeros(len(chunk.subject_ids), dtype=np.int64)
    for k in range(1, 5):  # at most TIME-free YEAR + MONTH + AGE (+ safety)
        pos = chunk.offsets[:-1] + chunk.prefix_lens - k
        ok = (chunk.prefix_lens - k >= 0) & (n == k - 1)
        hit = ok & is_marker[np.clip(pos, 0, max(len(chunk.tokens) - 1, 0))]
        n += hit
    return n
