"""Fitting the vocabulary on the train split: the privacy floor, marker bands, value deciles, data fingerprint.

Every statistic is a DuckDB aggregate over a view of the train split (``train_events``), so fitting streams
through a cohort far larger than memory. A code is a token only if at least ``min_subjects`` distinct train
subjects have it (:func:`floor_map`); age, year and birth markers use the finest aligned band that reaches the
same floor (:func:`fit_markers`); numeric values get per-code deciles of which only the inner edges are kept.

**Subject chunks.** Every distinct-subject count is computed per chunk of train subjects (:func:`train_chunks`,
``FIT_CHUNK_SUBJECTS`` consecutive ids each) and the chunks' counts are summed (:func:`summed`). Chunks never
share a subject, so the sums are the exact distinct counts and the fit (vocabulary, markers, floor) is the same
for every chunk size; each aggregate holds one chunk's subjects, so memory does not grow with the cohort and the
fit runs under a small DuckDB budget. It is a map (per chunk) and a reduce (the sum): a sharded run can compute
the same per-shard counts elsewhere.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from foresight.schema import BIRTH_CODE, DEATH_CODE, SEP, code_kind
from foresight.tokens import scratch
from foresight.tokens.codec import marker_values
from foresight.tokens.from_warehouse import memory_limit_bytes, register_code_map, subject_chunks, subject_events
from foresight.tokens.vocab import (
    AGE_PREFIX,
    BIRTH_PREFIX,
    QUANTILE_PREFIX,
    RARE,
    SPECIAL_TOKENS,
    YEAR_PREFIX,
    TokenizerConfig,
    Vocabulary,
    month_marker_tokens,
    time_tokens,
)

QUANTILE_BATCH_VALUES = 8_000_000  # numeric values per exact-quantile query (~64 MB of doubles)
FIT_CHUNK_SUBJECTS = 100_000  # train subjects per chunk of the distinct-subject counts (see the module docstring)
# ... at most one per this many bytes of the DuckDB budget: the marker fit's DISTINCT (band, subject) over a chunk
# holds ~40 (value, subject) rows a subject, and at 100,000 subjects asked a 122 MiB budget for one 64 MiB block
BUDGET_PER_FIT_SUBJECT = 4096
MIN_FIT_CHUNK_SUBJECTS = 10_000

# A chunk of train subjects: the ids [lo, hi] of consecutive train subjects, or None for all of them.
Chunk = tuple[int, int] | None

# The train values behind each marker kind, per (subject, value, events) row. BIRTH is the birth code's year
# ($birth: the birth code). YEAR and AGE are what the encoder writes: the year and age at the TOKEN CLOCK of
# each timestamp group (``clock_markers``, filled by :func:`clock_marker_table` with the encoder's own steps),
# not at the events' true times: the clock may sit in the next year, timestamps under 5 minutes apart share
# one clock, repeats dropped by the dedup window and timed static facts write no marker. Counting true event
# times let a YEAR token into the vocabulary behind fewer subjects than the floor (YEAR//1935: 9 of 10).
MARKER_SOURCES = {
    "BIRTH": "SELECT subject_id, year(time) AS v, 1 AS n FROM train_events WHERE code = $birth",
    "YEAR": "SELECT subject_id, v, n FROM clock_markers WHERE kind = 'YEAR'",
    "AGE": "SELECT subject_id, v, n FROM clock_markers WHERE kind = 'AGE'",
}


class TokenizeError(Exception):
    """The warehouse cannot be tokenized (empty, no train subjects, ...); the message says why."""


def fit_vocabulary(con: Any, config: TokenizerConfig | None = None, *, chunk_subjects: int | None = None
                   ) -> Vocabulary:
    """Fit the vocabulary on the TRAIN split of the warehouse behind ``con`` (see :func:`floor_map`).

    Distinct-subject counts are summed over chunks of ``chunk_subjects`` train subjects (default
    ``FIT_CHUNK_SUBJECTS``; the result is the same for any size, see the module docstring). The steps are the
    pieces a sharded fit (:mod:`foresight.tokens.sharded`) runs apart: per-subject tables (:func:`create_train_views`,
    :func:`clock_marker_table`), then the fit on them (:func:`fit_codes`, :func:`finish_vocabulary`)."""
    config = config or TokenizerConfig()
    ids = _train_subject_ids(con)
    n_train = len(ids)
    chunks = train_chunks(ids, chunk_subjects) if chunk_subjects else budget_chunks(con, ids)
    del ids
    create_train_views(con, config, chunks)
    code_vocab, report = fit_codes(con, config, chunks, n_train, train_event_counts(con))
    vocab = finish_vocabulary(con, code_vocab, report, chunks)
    con.execute("DROP VIEW train_events; DROP TABLE code_pairs; DROP TABLE drop_kinds; "
                "DROP TABLE IF EXISTS clock_markers; DROP TABLE IF EXISTS vocab_map")
    return vocab


def fit_codes(con: Any, config: TokenizerConfig, chunks: Sequence[Chunk], n_train: int, n_events: dict[str, int]
              ) -> tuple[Vocabulary, dict[str, Any]]:
    """The code tokens: (a vocabulary of the code tokens and value deciles, no markers yet; the rule report so far).

    Reads ``code_pairs`` (:func:`create_train_views`), ``train_events`` (only its rows with a finite value), the
    ``codes`` table and the distinct codes of ``events``; ``n_events``: train events per code
    (:func:`train_event_counts`), ``n_train``: the train subjects with events."""
    k = config.min_subjects
    code_map = fit_code_map(con, k, chunks, n_events)
    report: dict[str, Any] = {"train_subjects": n_train, "min_subjects": k, **_code_map_report(code_map, n_events)}
    code_map = {c: t for c, t in code_map.items() if c in n_events or t == c}  # drop pure ancestors
    _map_unseen_codes(con, code_map)
    quantile_edges = _fit_quantile_edges(con, config, code_map)
    # sorted by code: the query engine's row order (thread scheduling) must not change vocab.json's bytes
    code_map = dict(sorted(code_map.items()))
    return Vocabulary(config, _token_list(config, {}, code_map), code_map, quantile_edges), report


def finish_vocabulary(con: Any, code_vocab: Vocabulary, report: dict[str, Any], chunks: Sequence[Chunk], *,
                      clock_ready: bool = False) -> Vocabulary:
    """The fitted vocabulary: ``code_vocab`` (:func:`fit_codes`) with its markers (:func:`fit_markers`;
    ``clock_ready``: the ``clock_markers`` table is already filled), token list, report and fingerprint."""
    config, code_map, quantile_edges = code_vocab.config, code_vocab.code_map, code_vocab.quantile_edges
    # markers are counted on what the encoder writes, which needs the code tokens (dedup, static facts)
    marker_map, report["markers"] = fit_markers(con, config, code_vocab, chunks, clock_ready=clock_ready)
    tokens = _token_list(config, marker_map, code_map)
    report["vocab_size"] = len(tokens)
    report["codes_with_value_tokens"] = len(quantile_edges)
    k = config.min_subjects
    if code_map.get(DEATH_CODE) != DEATH_CODE and DEATH_CODE in code_map:
        report["warning"] = f"fewer than {k} train subjects died: MEDS_DEATH is not its own token"
    return Vocabulary(config, tokens, code_map, quantile_edges, marker_map, report, data_fingerprint(con))


def _train_subject_ids(con: Any) -> np.ndarray:
    """The train subjects with events, sorted (an int64 array); a :class:`TokenizeError` when there are none."""
    ids = train_subject_ids(con)
    if len(ids) == 0:
        n_all = con.execute("SELECT count(*) FROM events").fetchall()[0][0]
        raise TokenizeError(
            "the warehouse has no events" if n_all == 0 else
            "no subject with events is in the train split: the vocabulary is fitted on train only")
    return ids


def fit_chunk_subjects(budget: int) -> int:
    """Train subjects per fit chunk under a DuckDB budget of ``budget`` bytes: ``FIT_CHUNK_SUBJECTS``, fewer when
    the budget is small (one per ``BUDGET_PER_FIT_SUBJECT`` bytes, at least ``MIN_FIT_CHUNK_SUBJECTS``). Any size
    gives the same fit; smaller chunks only cost more queries.

    >>> fit_chunk_subjects(128 << 20), fit_chunk_subjects(1 << 30)
    (32768, 100000)
    """
    return max(MIN_FIT_CHUNK_SUBJECTS, min(FIT_CHUNK_SUBJECTS, budget // BUDGET_PER_FIT_SUBJECT))


def budget_chunks(con: Any, ids: np.ndarray) -> list[Chunk]:
    """:func:`train_chunks` of the sorted ``ids`` at :func:`fit_chunk_subjects` for ``con``'s DuckDB budget."""
    return train_chunks(ids, fit_chunk_subjects(memory_limit_bytes(con)))


def train_subject_ids(con: Any) -> np.ndarray:
    """The sorted ids of the train subjects that have events (int64; 8 bytes a subject, no Python objects)."""
    return con.execute(
        "SELECT e.subject_id FROM (SELECT DISTINCT subject_id FROM events) e JOIN subject_splits s USING (subject_id) "
        "WHERE s.split = 'train' ORDER BY 1").fetchnumpy()["subject_id"].astype(np.int64)


def train_chunks(ids: np.ndarray, per: int) -> list[Chunk]:
    """Chunks of ``per`` consecutive subjects of the sorted ``ids``, as (first id, last id); ``[None]`` (one chunk,
    no filter) when they all fit in one.

    >>> train_chunks(np.array([1, 4, 6, 9, 12]), 2)
    [(1, 4), (6, 9), (12, 12)]
    """
    if per < 1:
        raise ValueError(f"chunk size must be >= 1, not {per}")
    if len(ids) <= per:
        return [None]
    return [(int(ids[i]), int(ids[min(i + per, len(ids)) - 1])) for i in range(0, len(ids), per)]


def summed(con: Any, sql: str, params: dict[str, Any] | None, chunks: Sequence[Chunk]) -> Counter:
    """Run ``sql`` (a query of (key, count) rows whose text has ``{chunk}`` where a condition on ``subject_id``
    goes) once per chunk of subjects and sum the counts per key: the reduce of a chunked fit. Exact for counts
    of distinct subjects because chunks never share a subject."""
    total: Counter = Counter()
    for chunk in chunks:
        cond, bounds = ("subject_id BETWEEN $chunk_lo AND $chunk_hi", {"chunk_lo": chunk[0], "chunk_hi": chunk[1]}) \
            if chunk is not None else ("true", {})
        for key, n in con.execute(sql.format(chunk=cond), {**(params or {}), **bounds}).fetchall():
            total[key] += n
    return total


def create_train_views(con: Any, config: TokenizerConfig, chunks: Sequence[Chunk] = (None,)) -> None:
    """TEMP ``drop_kinds(kind)``, view ``train_events`` and table ``code_pairs(node, subject_id)`` of train (in the
    scratch database when one is attached, :mod:`foresight.tokens.scratch`; the
    distinct pairs, written chunk by chunk in subject order, so later per-chunk queries read only their chunk)."""
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE drop_kinds AS SELECT unnest(?::VARCHAR[]) AS kind
        """,
        [list(config.drop_kinds)],
    )
    # A view, not a copy: the train split of a national cohort is far larger than memory, and every statistic
    # below is one streaming aggregate over it.
    con.execute(
        """
        CREATE OR REPLACE TEMP VIEW train_events AS
        SELECT e.* FROM events e JOIN subject_splits s USING (subject_id)
        WHERE s.split = 'train' AND fs_kind(e.code) NOT IN (SELECT kind FROM drop_kinds)
        """
    )
    scratch.create_table(con, "code_pairs", "(node VARCHAR, subject_id BIGINT)")
    for chunk in chunks:
        cond, bounds = ("subject_id BETWEEN ? AND ?", list(chunk)) if chunk is not None else ("true", [])
        con.execute(f"INSERT INTO code_pairs SELECT DISTINCT code, subject_id FROM train_events "
                    f"WHERE code <> ? AND {cond}", [BIRTH_CODE, *bounds])


def train_event_counts(con: Any) -> dict[str, int]:
    """Train events per code (of ``train_events``, :func:`create_train_views`)."""
    return dict(con.execute("SELECT code, count(*) FROM train_events GROUP BY code").fetchall())


def fit_code_map(con: Any, k: int, chunks: Sequence[Chunk], n_events: dict[str, int]) -> dict[str, str]:
    """code -> token for the train codes of ``code_pairs`` (``n_events``: train events per code) and the
    ancestors that became tokens."""
    chains = {c: list(p) for c, p in con.execute(
        "SELECT code, coalesce(parent_codes, []::VARCHAR[]) FROM codes WHERE code IN (SELECT node FROM code_pairs)"
    ).fetchall()}
    code_map = floor_map(con, "code_pairs", chains, k, chunks)
    # What is left goes to KIND//RARE, or RARE when the kind's rare pool is itself below the floor.
    leftover = [c for c in n_events if c != BIRTH_CODE and c not in code_map]
    if leftover:
        kind_pools = summed(con, "SELECT fs_kind(node) AS kind, count(DISTINCT subject_id) FROM code_pairs "
                                 "WHERE node IN (SELECT unnest($left::VARCHAR[])) AND {chunk} GROUP BY kind",
                            {"left": leftover}, chunks)
        for c in leftover:
            kind = code_kind(c)
            code_map[c] = f"{kind}{SEP}RARE" if kind_pools.get(kind, 0) >= k else RARE
    return code_map


def _code_map_report(code_map: dict[str, str], n_events: dict[str, int]) -> dict[str, int]:
    """How many train codes (and their events) kept their own token, went to a parent or to a RARE token."""
    train_codes = [c for c in n_events if c != BIRTH_CODE]
    to_parent = [c for c in train_codes if code_map[c] != c and not code_map[c].endswith("RARE")]
    to_rare = [c for c in train_codes if code_map[c].endswith("RARE")]
    as_is = [c for c in train_codes if code_map[c] == c]
    return {
        "codes_kept": len(as_is), "events_kept": sum(n_events[c] for c in as_is),
        "codes_to_parent": len(to_parent), "events_to_parent": sum(n_events[c] for c in to_parent),
        "codes_to_rare": len(to_rare), "events_to_rare": sum(n_events[c] for c in to_rare),
    }


def _map_unseen_codes(con: Any, code_map: dict[str, str]) -> None:
    """Codes never seen in train (tuning/held-out only): nearest tokenised ancestor, else KIND//RARE / RARE."""
    token_set = set(code_map.values())
    for code, chain in con.execute(
        "SELECT DISTINCT e.code, coalesce(c.parent_codes, []::VARCHAR[]) FROM events e LEFT JOIN codes c "
        "USING (code) WHERE e.code <> ?", [BIRTH_CODE]
    ).fetchall():
        if code not in code_map:
            rare = f"{code_kind(code)}{SEP}RARE"
            code_map[code] = next((p for p in chain if p in token_set), rare if rare in token_set else RARE)


def _fit_quantile_edges(con: Any, config: TokenizerConfig, code_map: dict[str, str]) -> dict[str, list[float]]:
    """Value deciles per code token, from train values of codes that are their own token."""
    n_edges = config.n_quantiles - 1
    probs = [i / config.n_quantiles for i in range(1, config.n_quantiles)]
    counts = con.execute(
        """
        SELECT code, count(*) FROM train_events WHERE numeric_value IS NOT NULL AND isfinite(numeric_value)
        GROUP BY code HAVING count(*) >= ? ORDER BY code
        """,
        [config.min_values_for_quantiles],
    ).fetchall()
    limit = quantile_batch_values(con)
    edges_rows = [(code, streamed_quantiles(con, code, n, probs)) for code, n in counts if n > limit]
    for batch in _quantile_batches([(code, n) for code, n in counts if n <= limit], limit):
        edges_rows += con.execute(
            """
            SELECT code, quantile_cont(numeric_value, ?::DOUBLE[]) FROM train_events
            WHERE numeric_value IS NOT NULL AND isfinite(numeric_value) AND code IN (SELECT unnest(?::VARCHAR[]))
            GROUP BY code
            """,
            [probs, batch],
        ).fetchall()
    return {c: [float(x) for x in e] for c, e in sorted(edges_rows) if code_map.get(c) == c and len(e) == n_edges}


def quantile_batch_values(con: Any) -> int:
    """How many values one exact-quantile query may hold on ``con``: QUANTILE_BATCH_VALUES, or fewer under a small
    memory budget (a 32nd of it in doubles), so the fit's memory does not grow with the commonest code."""
    return max(1 << 16, min(QUANTILE_BATCH_VALUES, memory_limit_bytes(con) // 32))


def streamed_quantiles(con: Any, code: str, n: int, probs: Sequence[float]) -> list[float]:
    """The exact ``quantile_cont`` of one code with more values than a batch holds, in bounded memory: DuckDB sorts
    the values (spilling beyond its budget) and the two values around each quantile's position are read from the
    sorted stream; DuckDB interpolates between them itself, so the edges are bit for bit what ``quantile_cont``
    over all ``n`` values gives (checked in tests)."""
    spots = [(n - 1) * p for p in probs]
    wanted = {i for h in spots for i in (math.floor(h), math.ceil(h))}
    at: dict[int, float] = {}
    values_of = ("FROM train_events WHERE code = $code AND numeric_value IS NOT NULL AND isfinite(numeric_value)")
    kind = con.execute(f"SELECT typeof(numeric_value) {values_of} LIMIT 1", {"code": code}).fetchall()[0][0]
    start = 0
    ordered = con.sql(f"SELECT numeric_value {values_of} ORDER BY 1", params={"code": code})
    for batch in ordered.to_arrow_reader(1 << 20):
        values = batch.column(0).to_numpy()
        at |= {i: float(values[i - start]) for i in wanted if start <= i < start + len(values)}
        start += len(values)
    # in the column's own type (FLOAT values interpolate in FLOAT), as quantile_cont over the column does
    return [float(con.execute(f"SELECT quantile_cont(v, ?) FROM (SELECT unnest([?, ?]::{kind}[]) AS v)",
                              [h - math.floor(h), at[math.floor(h)], at[math.ceil(h)]]).fetchall()[0][0])
            for h in spots]


def _quantile_batches(counts: list[tuple[str, int]], limit: int = QUANTILE_BATCH_VALUES) -> list[list[str]]:
    """Codes in batches of at most ``limit`` values (a code with more is a batch of its own).

    Exact quantiles hold every value of a group in memory (DuckDB cannot spill them), so batching keeps memory
    bounded as the cohort grows (one pass over all codes at once ran out of a 512 MB limit at 1M subjects).
    """
    batches: list[list[str]] = [[]]
    in_batch = 0
    for code, n in counts:
        if batches[-1] and in_batch + n > limit:
            batches.append([])
            in_batch = 0
        batches[-1].append(code)
        in_batch += n
    return [b for b in batches if b]


def _token_list(config: TokenizerConfig, marker_map: dict[str, dict[str, str]], code_map: dict[str, str]) -> list[str]:
    """The vocabulary in id order: specials, interval bins, deciles, markers (bands, then RARE, then the twelve
    months when ``month_tokens``: after the others, so a vocabulary without them keeps every id), code tokens."""
    markers = sorted({t for m in marker_map.values() for t in m.values()})
    markers += [f"{p}RARE" for p in (BIRTH_PREFIX, YEAR_PREFIX, AGE_PREFIX)]
    markers += month_marker_tokens(config)
    tokens = list(SPECIAL_TOKENS)
    tokens += [t for t, _ in time_tokens(config)]
    tokens += [f"{QUANTILE_PREFIX}{i}" for i in range(1, config.n_quantiles + 1)]
    tokens += markers
    tokens += [t for t in sorted(set(code_map.values())) if t not in tokens]
    return tokens


def floor_map(con: Any, pairs_table: str, chains: dict[str, list[str]], k: int,
              chunks: Sequence[Chunk] = (None,)) -> dict[str, str]:
    """Map every node of ``pairs_table(node, subject_id)`` to a token that covers >= ``k`` distinct subjects.

    A node with >= k subjects of its own is its own token. Rarer nodes climb their ancestor ``chains``
    (nearest first) level by level, deepest first: at each level the rare nodes sharing a parent pool their
    subjects with the parent's own; a pool reaching ``k`` makes the parent a token for all of them (and for
    the parent's own rows), otherwise they move up together. Counts are exact distinct-subject counts
    computed in DuckDB per chunk of subjects (``chunks``, see :func:`summed`), so this scales to millions of
    subjects. Nodes still unmapped at the top are absent from the result (the caller sends them to a RARE token).
    """
    own = summed(con, f"SELECT node, count(DISTINCT subject_id) FROM {pairs_table} WHERE {{chunk}} GROUP BY node",
                 None, chunks)
    mapping = {n: n for n, c in own.items() if c >= k}
    parent, depth = _ancestry(chains)
    cur = {n: n for n in own if n not in mapping}  # pending node -> the node it currently pools under
    for level in range(max(depth.values(), default=0), 0, -1):
        moving = {n: parent[c] for n, c in cur.items() if depth.get(c, 0) == level and c in parent}
        if not moving:
            continue
        pools = _pool_sizes(con, pairs_table, moving, chunks)
        for n, cand in moving.items():
            target = mapping.get(cand)
            if target is None and pools.get(cand, 0) >= k:
                target = cand
            if target is not None:
                mapping[n] = target
                del cur[n]
            else:
                cur[n] = cand
        for cand, pool in pools.items():  # a parent that became a token also takes its own rows
            if pool >= k and cand in cur:
                mapping[cand] = mapping.get(cand, cand)
                del cur[cand]
    return mapping


def _ancestry(chains: dict[str, list[str]]) -> tuple[dict[str, str], dict[str, int]]:
    """(node -> its parent, node -> its height above the deepest node below it) from the ancestor chains."""
    parent: dict[str, str] = {}
    depth: dict[str, int] = {}
    for node, chain in chains.items():
        full = [node, *chain]
        for i, a in enumerate(full):
            depth[a] = max(depth.get(a, 0), len(full) - 1 - i)
            if i + 1 < len(full):
                parent.setdefault(a, full[i + 1])
    return parent, depth


def _pool_sizes(con: Any, pairs_table: str, moving: dict[str, str], chunks: Sequence[Chunk] = (None,)
                ) -> dict[str, int]:
    """Distinct subjects of each candidate: the nodes moving to it (``moving``: node -> candidate) + its own."""
    con.execute("CREATE OR REPLACE TEMP TABLE floor_moving (node VARCHAR, cand VARCHAR)")
    con.execute("INSERT INTO floor_moving SELECT unnest(?::VARCHAR[]), unnest(?::VARCHAR[])",
                [list(moving), list(moving.values())])
    return summed(con, f"""
        SELECT cand, count(DISTINCT subject_id) FROM (
            SELECT m.cand, p.subject_id FROM {pairs_table} p JOIN floor_moving m USING (node) WHERE {{chunk}}
            UNION ALL
            SELECT p.node, p.subject_id FROM {pairs_table} p
            WHERE p.node IN (SELECT cand FROM floor_moving) AND {{chunk}}
        ) GROUP BY cand""", None, chunks)


def data_fingerprint(con: Any, opt_out_sha256: str | None = None) -> str:
    """What the tokens were made from: md5 of the warehouse's ETL run history (``vocab.json: fingerprint``),
    folded with the sha256 of the opt-out list when one was honoured."""
    fp = con.execute(
        "SELECT coalesce(md5(string_agg(run_id || ':' || input_checksums::VARCHAR, ',' ORDER BY run_id)), 'none') "
        "FROM etl_runs").fetchall()[0][0]
    # md5, not sha256: stored fingerprints (vocab.json, model directories) must keep matching
    return hashlib.md5(f"{fp}:{opt_out_sha256}".encode()).hexdigest() if opt_out_sha256 else fp


# --- age, year and birth markers ---------------------------------------------------------------------------


def fit_markers(
    con: Any, config: TokenizerConfig, code_vocab: Vocabulary, chunks: Sequence[Chunk] = (None,), *,
    clock_ready: bool = False
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, int]]]:
    """AGE/YEAR/BIRTH value -> token: an ordered partition of the values into aligned bands.

    Top-down: start from the widest bands (e.g. 20 years) that reach the floor, and split a band into its
    narrower aligned children (10, 5, then single years) only when every non-empty child reaches the floor
    too. Tokens therefore never overlap and follow the order of the values (ages and years never appear to go
    backwards), and each covers >= ``min_subjects`` distinct train subjects. Values in a too-rare widest band
    map to KIND//RARE.

    Also returns, per kind, what the floor cost in resolution on train: how many train subjects and events
    had a value that landed in a band wider than the finest allowed one (``*_coarsened``) or in KIND//RARE
    (``*_to_rare``). An event counts once per marker kind (its calendar year, its age); a birth is one event.
    YEAR and AGE values are those the encoder writes (:func:`clock_marker_table`, with ``code_vocab``: the fitted
    code tokens, markers not yet), so every marker token is written for >= ``min_subjects`` train subjects.
    Subject counts are summed over ``chunks`` of train subjects (:func:`summed`). ``clock_ready``: the
    ``clock_markers`` table is already filled (a sharded fit builds it per shard), so it is not computed here.
    """
    enabled = {"BIRTH": True, "YEAR": config.year_tokens, "AGE": config.age_tokens}
    if (config.year_tokens or config.age_tokens) and not clock_ready:
        clock_marker_table(con, code_vocab)
    out: dict[str, dict[str, str]] = {}
    stats: dict[str, dict[str, int]] = {}
    for kind, sql in MARKER_SOURCES.items():
        out[kind] = {}
        if enabled[kind]:
            out[kind], stats[kind] = _fit_marker_kind(con, config, kind, sql, chunks)
    return out, stats


def _fit_marker_kind(con: Any, config: TokenizerConfig, kind: str, sql: str, chunks: Sequence[Chunk] = (None,)
                     ) -> tuple[dict[str, str], dict[str, int]]:
    """One marker kind of :func:`fit_markers`: (value -> band token, what the floor cost on train)."""
    widths = sorted((w for w in config.marker_bands if kind != "BIRTH" or w >= config.birth_min_band),
                    reverse=True) or [config.birth_min_band]
    if any(a % b for a, b in itertools.pairwise(widths)):
        raise ValueError(f"marker_bands {config.marker_bands} must divide each other (e.g. 20, 10, 5, 1)")
    # GROUP BY with a count costs what DISTINCT did (both are one hash aggregate) and keeps the events per
    # (value, subject), so the coarsening report below needs no second pass over train events. One chunk of
    # subjects at a time: each grouping holds one chunk, and the table is written in subject order.
    scratch.create_table(con, "marker_pairs", "(v BIGINT, subject_id BIGINT, n HUGEINT)")
    for chunk in chunks:
        cond, bounds = ("subject_id BETWEEN $lo AND $hi", {"lo": chunk[0], "hi": chunk[1]}) if chunk else ("true", {})
        con.execute(f"INSERT INTO marker_pairs SELECT v, subject_id, sum(n) FROM ({sql}) WHERE v >= 0 AND {cond} "
                    "GROUP BY v, subject_id", {"birth": BIRTH_CODE, **bounds} if "$birth" in sql else bounds or None)
    values = sorted(int(v) for (v,) in con.execute("SELECT DISTINCT v FROM marker_pairs").fetchall())
    # distinct (band, subject) pairs per chunk, as a grouping (which DuckDB can spill), summed over the chunks
    counts = {w: dict(summed(
        con, "SELECT band, count(*) FROM (SELECT DISTINCT v - v % $w AS band, subject_id FROM marker_pairs "
             "WHERE {chunk}) GROUP BY band", {"w": w}, chunks)) for w in widths}
    part = _partition(values, widths, counts, config.min_subjects)
    stats = {"finest_band_years": widths[-1]}
    for label, vals in (("coarsened", [v for v, (_, w) in part.items() if w > widths[-1]]),
                        ("to_rare", [v for v in values if v not in part])):
        got = summed(con, "SELECT unnest(['subjects', 'events']), unnest([count(*), coalesce(sum(n), 0)]) FROM "
                          "(SELECT subject_id, sum(n) AS n FROM marker_pairs WHERE {chunk} "
                          "AND v IN (SELECT unnest($vals::BIGINT[])) GROUP BY subject_id)", {"vals": vals}, chunks)
        stats |= {f"values_{label}": len(vals), f"subjects_{label}": int(got["subjects"]),
                  f"events_{label}": int(got["events"])}
    con.execute("DROP TABLE marker_pairs")

    prefix = f"{kind}{SEP}"
    mapping: dict[str, str] = {}
    # every value of a band maps to it, seen in train or not: a value missing from the map would become
    # RARE and mark its holder as a non-member, and the map would list exactly the values train subjects had
    for lo, w in set(part.values()):
        for v in range(lo, lo + w):
            mapping[str(v)] = _band_name(prefix, lo, w)
    return mapping, stats


def clock_marker_table(con: Any, code_vocab: Vocabulary) -> None:
    """Table ``clock_markers(kind, v, subject_id, n)`` (:func:`foresight.tokens.scratch.create_table`): per train
    subject, the YEAR and AGE values of its timestamp groups at the token clock and the events behind each, computed
    chunk by chunk (:func:`subject_chunks`) with the encoder's own steps (:func:`foresight.tokens.codec.marker_values`).
    Ages are -1 without a birth (the encoder writes AGE//UNK)."""
    register_code_map(con, code_vocab)
    scratch.create_table(con, "clock_markers", "(kind VARCHAR, v BIGINT, subject_id BIGINT, n BIGINT)")
    for lo, hi, _ in subject_chunks(con, train_subject_ids(con), "train", code_vocab.config.subjects_per_chunk):
        data, births = subject_events(con, code_vocab, lo, hi, "train")
        sub, year, age, n = marker_values(code_vocab, data["subject_id"], data["t"], data["tok"], data["v"],
                                          dict(births))
        for kind, v in (("YEAR", year), ("AGE", age)):
            # distinct (subject, value) pairs and the events behind each (one sort; np.unique(axis=1) is slower)
            o = np.lexsort((v, sub))
            new = np.ones(len(o), dtype=bool)
            new[1:] = (sub[o][1:] != sub[o][:-1]) | (v[o][1:] != v[o][:-1])
            starts = np.flatnonzero(new)
            events = np.add.reduceat(n[o], starts) if len(o) else np.zeros(0, dtype=np.int64)
            con.register("clock_chunk", pa.table({"v": v[o][starts], "subject_id": sub[o][starts], "n": events}))
            con.execute("INSERT INTO clock_markers SELECT ?, v, subject_id, n FROM clock_chunk", [kind])
            con.unregister("clock_chunk")


def _band_name(prefix: str, lo: int, width: int) -> str:
    return f"{prefix}{lo}" if width == 1 else f"{prefix}{lo}-{lo + width - 1}"


def _partition(
    values: list[int], widths: list[int], counts: dict[int, dict[int, int]], k: int
) -> dict[int, tuple[int, int]]:
    """value -> (band start, band width): widest bands first, split while every non-empty child has >= k.

    ``counts[width][band start]``: distinct subjects in each band. With k = 2, the 5-year band 65-69 holds one
    subject, so 60-69 stays whole; 70-79 splits down to single years:

    >>> counts = {10: {60: 3, 70: 4}, 5: {60: 2, 65: 1, 70: 4}, 1: {61: 1, 62: 1, 67: 1, 71: 2, 72: 2}}
    >>> _partition([61, 62, 67, 71, 72], [10, 5, 1], counts, 2)
    {61: (60, 10), 62: (60, 10), 67: (60, 10), 71: (71, 1), 72: (72, 1)}
    """
    out: dict[int, tuple[int, int]] = {}

    def assign(lo: int, level: int, members: list[int]) -> None:
        if level + 1 < len(widths):
            cw = widths[level + 1]
            children = sorted({v - v % cw for v in members})
            if all(counts[cw].get(c, 0) >= k for c in children):
                for c in children:
                    assign(c, level + 1, [v for v in members if c <= v < c + cw])
                return
        for v in members:
            out[v] = (lo, widths[level])

    top = widths[0]
    for band in sorted({v - v % top for v in values}):
        if counts[top].get(band, 0) >= k:
            assign(band, 0, [v for v in values if band <= v < band + top])
    return out
