"""Timelines -> tokens: a vocabulary with a privacy floor, time/age/year/quantile tokens, encode and decode.

Sequence layout of one subject (every token is one id of the vocabulary)::

    BOS  GENDER//F  RACE//WHITE  BIRTH//1950-1954  YEAR//2150  AGE//63        static prefix + first markers
    ADMIT//EMERGENCY  LAB//MIMIC//50912 Q7 ...                                 events at the first timestamp
    TIME//6H-12H  LAB//MIMIC//50912 Q4 ...                                     a gap, then the next timestamp
    TIME//1Y TIME//1Y TIME//3M-6M  YEAR//2152  AGE//65  ADMIT//ELECTIVE ...   long gaps repeat the 1-year token
    ... MEDS_DEATH   (or END: the record ends with the subject alive)

- **Vocabulary** (fitted on the train split only): a code is a token only if at least ``min_subjects`` distinct
  train subjects have it. A rarer code maps to its nearest ancestor (``codes.parent_codes``) whose pooled
  subjects reach the floor, else to ``KIND//RARE`` (or ``RARE`` when even that is too rare). Static, age,
  year and birth-band tokens obey the same floor.
- **Time**: one interval token per gap between distinct timestamps (log-spaced bins from 5 minutes to 1 year;
  gaps of a year or more repeat ``TIME//1Y``). Gaps under 5 minutes get no token. The encoder keeps a *token
  clock*: each interval token advances it by the bin's representative length, and the next gap is the true
  gap plus the clock's lag behind the truth, that correction limited to half the true gap
  (``clock_correction``), so rounding never accumulates and no short gap is lost to it. (Unlimited feedback
  kept the clock closest to the truth but, when a gap of months left the clock weeks ahead, merged the next
  hospital stay into one timestamp: 20% of MIMIC-IV demo stays and 33% of simulated ones had length 0 in
  tokens; with the limit, 0.8% and 0%.)
  ``YEAR//y`` and ``AGE//a`` tokens mark when the clock's calendar year or the subject's age changes, so
  decoding reproduces them exactly and encode -> decode -> encode is the identity.
- **Values**: a numeric value becomes ``Q1``..``Q10`` right after its code, from per-code deciles fitted on train
  (only the nine inner edges are stored: no minimum or maximum of anybody's value is kept).
- **Same timestamp**: events sharing a timestamp stay together in a canonical order (admission-type events
  first, discharge and death last, otherwise by code).

All heavy work is vectorised: DuckDB SQL for selection/mapping, numpy for the token layout; subjects are
processed in chunks so memory stays flat as the cohort grows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from foresight.schema import BIRTH_CODE, DEATH_CODE, SEP, code_kind

# Special tokens with fixed ids: PAD is never trained on (packing needs no padding) but batching at inference does.
PAD, BOS, END, RARE, UNK_AGE = "[PAD]", "[BOS]", "[END]", "RARE", "AGE//UNK"
SPECIAL_TOKENS = (PAD, BOS, END, RARE, UNK_AGE)
QUANTILE_PREFIX = "Q"
TIME_PREFIX = "TIME//"
YEAR_PREFIX = "YEAR//"
AGE_PREFIX = "AGE//"
BIRTH_PREFIX = "BIRTH//"
MINUTE = 60
YEAR_MINUTES = 525_960.0  # 365.25 days


@dataclass
class TokenizerConfig:
    """Every option of the token layout, stored with the vocabulary (``vocab.json``)."""

    min_subjects: int = 10  # privacy floor: distinct train subjects a token must cover (NHS small-cell rule)
    # Upper edges of the interval bins in minutes; the last is one year (gaps >= 1y repeat TIME//1Y).
    time_bin_edges_minutes: tuple[float, ...] = (
        5, 15, 60, 180, 360, 720, 1440, 2880, 5760, 10080, 20160, 43200, 86400, 129600, 262800, YEAR_MINUTES)
    n_quantiles: int = 10
    min_values_for_quantiles: int = 20  # fewer train values for a code: no value tokens for it
    # Age, calendar-year and birth-year markers use the finest band whose train subjects reach the floor:
    # single years first, then these widths (a 5-year band "AGE//60-64", then 10, then 20), else ...//RARE.
    marker_bands: tuple[int, ...] = (1, 5, 10, 20)
    birth_min_band: int = 5  # birth years are never finer than this (they are quasi-identifiers)
    age_tokens: bool = True
    year_tokens: bool = True
    static_kinds: tuple[str, ...] = ("GENDER", "RACE", "ETHNICITY")  # taken out of the stream into the prefix
    drop_kinds: tuple[str, ...] = ()  # kinds left out entirely
    dedup_window_minutes: float = 0.0  # drop a repeat of the same token within this window (0 = keep all)
    subjects_per_chunk: int = 20_000
    # How far each gap may move the token clock back toward the true time, as a share of the gap itself. The
    # clock drifts from the truth by up to half a bin (weeks after a gap of months); correcting it in full at
    # the next gap (error feedback without a limit) would squash or stretch the short gaps that follow — a
    # clock weeks ahead merged a whole hospital stay into one timestamp. With a limit, short gaps keep their
    # own bin (within a factor 1 +- this share) and the long gaps, where weeks are a small share, absorb the
    # drift. Vocabularies saved before this option existed used no limit (read back as infinity).
    clock_correction: float = 0.5

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        d = dict(d)
        d.setdefault("clock_correction", float("inf"))  # the rule their tokens were made with
        for k in ("time_bin_edges_minutes", "static_kinds", "drop_kinds", "marker_bands"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


# Within one timestamp: these kinds come first (in this order), then everything else by code, then these last.
_FIRST_KINDS = ("ED", "ADMIT", "ENCOUNTER", "TRANSFER", "ICU", "SERVICE")
_LAST_KINDS = ("DISCHARGE", "MEDS")


def _kind_rank(code: str) -> int:
    kind = code_kind(code)
    if code == DEATH_CODE:
        return 1000
    if kind in _FIRST_KINDS:
        return _FIRST_KINDS.index(kind)
    if kind in _LAST_KINDS:
        return 900 + _LAST_KINDS.index(kind)
    return 100


def time_tokens(config: TokenizerConfig) -> list[tuple[str, float]]:
    """(token, representative minutes) for each interval bin, shortest first; the last is TIME//1Y.

    A bin's representative length is the geometric mean of its edges (the bins are log-spaced).
    """

    def label(m: float) -> str:
        for unit, size in (("Y", YEAR_MINUTES), ("MO", 43200), ("W", 10080), ("D", 1440), ("H", 60), ("M", 1)):
            if m / size >= 1 and abs(m / size - round(m / size)) < 0.1:
                return f"{round(m / size)}{unit}"
        return f"{round(m)}M"

    edges = list(config.time_bin_edges_minutes)
    out = [(f"{TIME_PREFIX}{label(lo)}-{label(hi)}", math.sqrt(lo * hi)) for lo, hi in itertools.pairwise(edges)]
    out.append((f"{TIME_PREFIX}1Y", YEAR_MINUTES))
    return out


@dataclass
class Vocabulary:
    """The fitted vocabulary: token strings, the code -> token map, value deciles and what each rule did."""

    config: TokenizerConfig
    tokens: list[str]
    code_map: dict[str, str]  # every code seen in the warehouse -> its token
    quantile_edges: dict[str, list[float]]  # code token -> inner decile edges (n_quantiles - 1)
    marker_map: dict[str, dict[str, str]] = field(default_factory=dict)  # AGE/YEAR/BIRTH: value -> token
    report: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self._time = time_tokens(self.config)
        self.time_ids = np.array([self.index[t] for t, _ in self._time], dtype=np.int64)
        self.time_reps_s = np.array([m * MINUTE for _, m in self._time], dtype=np.float64)
        self.time_lower_s = np.array(self.config.time_bin_edges_minutes, dtype=np.float64) * MINUTE
        self.q_ids = np.array([self.index[f"{QUANTILE_PREFIX}{k}"] for k in range(1, self.config.n_quantiles + 1)])
        n_edges = self.config.n_quantiles - 1
        self.edges = np.full((len(self.tokens), n_edges), np.nan)
        for tok, e in self.quantile_edges.items():
            self.edges[self.index[tok]] = e
        self.has_quantiles = ~np.isnan(self.edges[:, 0])
        self.kind_rank = np.array([_kind_rank(t) for t in self.tokens], dtype=np.int64)
        kinds = sorted({code_kind(t) for t in self.tokens})
        self.kind_id = np.array([kinds.index(code_kind(t)) for t in self.tokens], dtype=np.int64)
        self.is_static = np.array([code_kind(t) in self.config.static_kinds for t in self.tokens])
        # The ONE definition of token classes (model, forecast, evaluate and privacy read these masks):
        # time gaps, calendar/age markers, decile values, specials/birth band, static facts, and events (the rest).
        self.is_time = np.array([t.startswith(TIME_PREFIX) for t in self.tokens])
        self.is_marker = np.array([t.startswith((YEAR_PREFIX, AGE_PREFIX)) for t in self.tokens])
        self.is_value = np.array([t.startswith(QUANTILE_PREFIX) and t[len(QUANTILE_PREFIX):].isdigit()
                                  for t in self.tokens])
        self.is_special = np.array([t in (PAD, BOS, END) or t.startswith(BIRTH_PREFIX) for t in self.tokens])
        self.is_event = ~(self.is_time | self.is_marker | self.is_value | self.is_special | self.is_static)
        self._marker_tables = {}
        for kind, mapping in self.marker_map.items():
            rare = self.index[f"{kind}{SEP}RARE"]
            if mapping:
                vals = [int(v) for v in mapping]
                lo, hi = min(vals), max(vals)
                table = np.full(hi - lo + 1, rare, dtype=np.int64)
                for v, tok in mapping.items():
                    table[int(v) - lo] = self.index[tok]
                self._marker_tables[kind] = (lo, table, rare)
            else:
                self._marker_tables[kind] = (0, np.zeros(0, dtype=np.int64), rare)

    def marker_ids(self, kind: str, values: np.ndarray) -> np.ndarray:
        """Token ids of AGE/YEAR/BIRTH markers for integer values (vectorised; unknown values -> KIND//RARE)."""
        lo, table, rare = self._marker_tables[kind]
        pos = np.asarray(values, dtype=np.int64) - lo
        ok = (pos >= 0) & (pos < len(table))
        return np.where(ok, table[np.clip(pos, 0, max(len(table) - 1, 0))] if len(table) else rare, rare)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint16 if len(self.tokens) < 2**16 else np.uint32

    def token_for(self, code: str, parents: Sequence[str] | None = None) -> str:
        """The token of a code: itself, its nearest tokenised ancestor, or a RARE token.

        ``parents`` is the code's ancestor chain (``codes.parent_codes``, nearest first). When it is unknown
        (``None``, e.g. a timeline posted to the server), codes of prefix-hierarchical vocabularies (ICD, ATC)
        climb by truncation, which is the same chain. This reproduces the fitted mapping (a rare code maps to its
        first ancestor that is a token) without the vocabulary ever naming a code below the floor.
        """
        if code in self.code_map:
            return self.code_map[code]
        if code in self.index and not _is_marker(code):
            return code
        if parents is None:
            parents = _prefix_parents(code)
        for p in parents:
            if p in self.index and not _is_marker(p):
                return p
        rare = f"{code_kind(code)}{SEP}RARE"
        return rare if rare in self.index else RARE

    def save(self, path: Path) -> None:
        payload = {
            "config": asdict(self.config),
            "tokens": self.tokens,
            # only codes that are tokens themselves: naming a code below the floor (even as "maps to its parent")
            # would disclose that some train subject had it; token_for() re-derives every other mapping
            "code_map": {c: t for c, t in self.code_map.items() if c == t},
            "quantile_edges": self.quantile_edges,
            "marker_map": self.marker_map,
            "report": self.report,
            "fingerprint": self.fingerprint,
        }
        path.write_text(json.dumps(payload, indent=1, sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        d = json.loads(Path(path).read_text())
        return cls(
            config=TokenizerConfig.from_dict(d["config"]),
            tokens=d["tokens"],
            code_map=d["code_map"],
            quantile_edges=d["quantile_edges"],
            marker_map=d.get("marker_map", {}),
            report=d.get("report", {}),
            fingerprint=d.get("fingerprint", ""),
        )


PREFIX_HIERARCHIES = ("ICD9CM", "ICD10CM", "ICD9PROC", "ICD10PCS", "ATC")


def _prefix_parents(code: str) -> list[str]:
    """Ancestors by truncation for prefix-hierarchical vocabularies (DX//ICD10CM//E1165 -> E116, E11, ...)."""
    parts = code.split(SEP)
    if len(parts) != 3 or parts[1] not in PREFIX_HIERARCHIES:
        return []
    head, value = f"{parts[0]}{SEP}{parts[1]}{SEP}", parts[2]
    return [head + value[:n] for n in range(len(value) - 1, 0, -1)]


def _is_marker(token: str) -> bool:
    return token.startswith((TIME_PREFIX, YEAR_PREFIX, AGE_PREFIX, BIRTH_PREFIX)) or token in (PAD, BOS, END, UNK_AGE)


class TokenizeError(Exception):
    """The warehouse cannot be tokenized (empty, no train subjects, ...); the message says why."""


# --- fitting ----------------------------------------------------------------------------------------------


def floor_map(con: Any, pairs_table: str, chains: dict[str, list[str]], k: int) -> dict[str, str]:
    """Map every node of ``pairs_table(node, subject_id)`` to a token that covers >= ``k`` distinct subjects.

    A node with >= k subjects of its own is its own token. Rarer nodes climb their ancestor ``chains``
    (nearest first) level by level, deepest first: at each level the rare nodes sharing a parent pool their
    subjects with the parent's own; a pool reaching ``k`` makes the parent a token for all of them (and for
    the parent's own rows), otherwise they move up together. Counts are exact distinct-subject counts
    computed in DuckDB, so this scales to millions of subjects. Nodes still unmapped at the top are absent
    from the result (the caller sends them to a RARE token).
    """
    own = dict(con.execute(f"SELECT node, count(DISTINCT subject_id) FROM {pairs_table} GROUP BY node").fetchall())
    mapping = {n: n for n, c in own.items() if c >= k}
    parent: dict[str, str] = {}
    depth: dict[str, int] = {}
    for node, chain in chains.items():
        full = [node, *chain]
        for i, a in enumerate(full):
            depth[a] = max(depth.get(a, 0), len(full) - 1 - i)
            if i + 1 < len(full):
                parent.setdefault(a, full[i + 1])
    cur = {n: n for n in own if n not in mapping}  # pending node -> the node it currently pools under
    for level in range(max(depth.values(), default=0), 0, -1):
        moving = {n: parent[c] for n, c in cur.items() if depth.get(c, 0) == level and c in parent}
        if not moving:
            continue
        con.execute("CREATE OR REPLACE TEMP TABLE floor_moving (node VARCHAR, cand VARCHAR)")
        con.execute("INSERT INTO floor_moving SELECT unnest(?::VARCHAR[]), unnest(?::VARCHAR[])",
                    [list(moving), list(moving.values())])
        # pool(cand) = subjects of the nodes moving to it + the candidate's own subjects
        pools = dict(con.execute(
            f"""SELECT cand, count(DISTINCT subject_id) FROM (
                    SELECT m.cand, p.subject_id FROM {pairs_table} p JOIN floor_moving m USING (node)
                    UNION ALL
                    SELECT p.node, p.subject_id FROM {pairs_table} p
                    WHERE p.node IN (SELECT cand FROM floor_moving)
                ) GROUP BY cand""").fetchall())
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


def fit_vocabulary(con: Any, config: TokenizerConfig | None = None) -> Vocabulary:
    """Fit the vocabulary on the TRAIN split of the warehouse behind ``con`` (see :func:`floor_map`)."""
    config = config or TokenizerConfig()
    k = config.min_subjects
    n_train = con.execute(
        "SELECT count(DISTINCT e.subject_id) FROM events e JOIN subject_splits s USING (subject_id) "
        "WHERE s.split = 'train'"
    ).fetchall()[0][0]
    if n_train == 0:
        n_all = con.execute("SELECT count(*) FROM events").fetchall()[0][0]
        raise TokenizeError(
            "the warehouse has no events" if n_all == 0 else
            "no subject with events is in the train split: the vocabulary is fitted on train only")
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
    con.execute(
        "CREATE OR REPLACE TEMP TABLE code_pairs AS SELECT DISTINCT code AS node, subject_id FROM train_events "
        "WHERE code <> ?", [BIRTH_CODE])
    chains = {c: list(p) for c, p in con.execute(
        "SELECT code, coalesce(parent_codes, []::VARCHAR[]) FROM codes WHERE code IN (SELECT node FROM code_pairs)"
    ).fetchall()}
    code_map = floor_map(con, "code_pairs", chains, k)
    n_events = dict(con.execute("SELECT code, count(*) FROM train_events GROUP BY code").fetchall())
    train_codes = [c for c in n_events if c != BIRTH_CODE]
    # What is left goes to KIND//RARE, or RARE when the kind's rare pool is itself below the floor.
    leftover = [c for c in train_codes if c not in code_map]
    if leftover:
        kind_pools = dict(con.execute(
            "SELECT fs_kind(node) AS kind, count(DISTINCT subject_id) FROM code_pairs "
            "WHERE node IN (SELECT unnest(?::VARCHAR[])) GROUP BY kind", [leftover]).fetchall())
        for c in leftover:
            kind = code_kind(c)
            code_map[c] = f"{kind}{SEP}RARE" if kind_pools.get(kind, 0) >= k else RARE

    to_parent = [c for c in train_codes if code_map[c] != c and not code_map[c].endswith("RARE")]
    to_rare = [c for c in train_codes if code_map[c].endswith("RARE")]
    as_is = [c for c in train_codes if code_map[c] == c]
    report = {
        "train_subjects": n_train,
        "min_subjects": k,
        "codes_kept": len(as_is), "events_kept": sum(n_events[c] for c in as_is),
        "codes_to_parent": len(to_parent), "events_to_parent": sum(n_events[c] for c in to_parent),
        "codes_to_rare": len(to_rare), "events_to_rare": sum(n_events[c] for c in to_rare),
    }
    code_map = {c: t for c, t in code_map.items() if c in n_events or t == c}  # drop pure ancestors

    # Codes never seen in train (tuning/held-out only): nearest tokenised ancestor, else KIND//RARE / RARE.
    code_tokens = sorted(set(code_map.values()))
    token_set = set(code_tokens)
    for code, chain in con.execute(
        "SELECT DISTINCT e.code, coalesce(c.parent_codes, []::VARCHAR[]) FROM events e LEFT JOIN codes c "
        "USING (code) WHERE e.code <> ?", [BIRTH_CODE]
    ).fetchall():
        if code not in code_map:
            rare = f"{code_kind(code)}{SEP}RARE"
            code_map[code] = next((p for p in chain if p in token_set), rare if rare in token_set else RARE)

    # Value deciles per code token, from train values of codes that are their own token.
    n_edges = config.n_quantiles - 1
    probs = [i / config.n_quantiles for i in range(1, config.n_quantiles)]
    # Exact quantiles hold every value of a group in memory (DuckDB cannot spill them), so codes are taken in
    # batches of at most QUANTILE_BATCH_VALUES values: memory stays bounded as the cohort grows (one pass over
    # all codes at once ran out of a 512 MB limit at 1M subjects).
    counts = con.execute(
        """
        SELECT code, count(*) FROM train_events WHERE numeric_value IS NOT NULL AND isfinite(numeric_value)
        GROUP BY code HAVING count(*) >= ? ORDER BY code
        """,
        [config.min_values_for_quantiles],
    ).fetchall()
    batches: list[list[str]] = [[]]
    in_batch = 0
    for code, n in counts:
        if batches[-1] and in_batch + n > QUANTILE_BATCH_VALUES:
            batches.append([])
            in_batch = 0
        batches[-1].append(code)
        in_batch += n
    edges_rows = []
    for batch in batches:
        if batch:
            edges_rows += con.execute(
                """
                SELECT code, quantile_cont(numeric_value, ?::DOUBLE[]) FROM train_events
                WHERE numeric_value IS NOT NULL AND isfinite(numeric_value) AND code IN (SELECT unnest(?::VARCHAR[]))
                GROUP BY code
                """,
                [probs, batch],
            ).fetchall()
    quantile_edges = {c: [float(x) for x in e] for c, e in edges_rows if code_map.get(c) == c and len(e) == n_edges}

    marker_map, report["markers"] = _fit_markers(con, config)
    markers = sorted({t for m in marker_map.values() for t in m.values()})
    markers += [f"{p}RARE" for p in (BIRTH_PREFIX, YEAR_PREFIX, AGE_PREFIX)]

    tokens = list(SPECIAL_TOKENS)
    tokens += [t for t, _ in time_tokens(config)]
    tokens += [f"{QUANTILE_PREFIX}{i}" for i in range(1, config.n_quantiles + 1)]
    tokens += markers
    tokens += [t for t in sorted(set(code_map.values())) if t not in tokens]
    report["vocab_size"] = len(tokens)
    report["codes_with_value_tokens"] = len(quantile_edges)
    if code_map.get(DEATH_CODE) != DEATH_CODE and DEATH_CODE in code_map:
        report["warning"] = f"fewer than {k} train subjects died: MEDS_DEATH is not its own token"
    con.execute("DROP VIEW train_events; DROP TABLE code_pairs; DROP TABLE drop_kinds")
    return Vocabulary(config, tokens, code_map, quantile_edges, marker_map, report, data_fingerprint(con))


def data_fingerprint(con: Any, opt_out_sha256: str | None = None) -> str:
    """What the tokens were made from: md5 of the warehouse's ETL run history (``vocab.json: fingerprint``),
    folded with the sha256 of the opt-out list when one was honoured."""
    fp = con.execute(
        "SELECT coalesce(md5(string_agg(run_id || ':' || input_checksums::VARCHAR, ',' ORDER BY run_id)), 'none') "
        "FROM etl_runs").fetchall()[0][0]
    return hashlib.md5(f"{fp}:{opt_out_sha256}".encode()).hexdigest() if opt_out_sha256 else fp


def _band_name(prefix: str, lo: int, width: int) -> str:
    return f"{prefix}{lo}" if width == 1 else f"{prefix}{lo}-{lo + width - 1}"


def _partition(
    values: list[int], widths: list[int], counts: dict[int, dict[int, int]], k: int
) -> dict[int, tuple[int, int]]:
    """value -> (band start, band width): widest bands first, split while every non-empty child has >= k."""
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


QUANTILE_BATCH_VALUES = 8_000_000  # numeric values per exact-quantile query (~64 MB of doubles)

# The train values behind each marker kind ($birth: the birth code), per (subject, value) row.
MARKER_SOURCES = {
    "BIRTH": "SELECT subject_id, year(time) AS v FROM train_events WHERE code = $birth",
    "YEAR": "SELECT subject_id, year(time) AS v FROM train_events WHERE time IS NOT NULL AND code <> $birth",
    # whole years of age, the same rule as _ages (the encoder): calendar years minus one when the time
    # elapsed in the event's year is shorter than at birth (date_diff alone counts year boundaries)
    "AGE": "SELECT e.subject_id, date_diff('year', b.birth, e.time) - CASE WHEN epoch(e.time) - "
           "epoch(date_trunc('year', e.time)) < epoch(b.birth) - epoch(date_trunc('year', b.birth)) "
           "THEN 1 ELSE 0 END AS v FROM train_events e JOIN "
           "(SELECT subject_id, min(time) AS birth FROM train_events WHERE code = $birth GROUP BY 1) b "
           "USING (subject_id) WHERE e.time IS NOT NULL AND e.code <> $birth",
}


def _fit_markers(
    con: Any, config: TokenizerConfig
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
    """
    enabled = {"BIRTH": True, "YEAR": config.year_tokens, "AGE": config.age_tokens}
    k = config.min_subjects
    out: dict[str, dict[str, str]] = {}
    stats: dict[str, dict[str, int]] = {}
    for kind, sql in MARKER_SOURCES.items():
        out[kind] = {}
        if not enabled[kind]:
            continue
        widths = sorted((w for w in config.marker_bands if kind != "BIRTH" or w >= config.birth_min_band),
                        reverse=True) or [config.birth_min_band]
        if any(a % b for a, b in itertools.pairwise(widths)):
            raise ValueError(f"marker_bands {config.marker_bands} must divide each other (e.g. 20, 10, 5, 1)")
        # GROUP BY with a count costs what DISTINCT did (both are one hash aggregate) and keeps the events per
        # (value, subject), so the coarsening report below needs no second pass over train events
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE marker_pairs AS SELECT v, subject_id, count(*) AS n FROM ({sql}) "
            "WHERE v >= 0 GROUP BY v, subject_id",
            {"birth": BIRTH_CODE})
        values = sorted(int(v) for (v,) in con.execute("SELECT DISTINCT v FROM marker_pairs").fetchall())
        # DISTINCT as a grouping (which DuckDB can spill to disk) rather than count(DISTINCT ...) (which it
        # cannot): tens of millions of (value, subject) pairs at 1M subjects must fit any memory limit
        counts = {w: dict(con.execute(
            "SELECT band, count(*) FROM (SELECT DISTINCT v - v % $w AS band, subject_id FROM marker_pairs) "
            "GROUP BY band", {"w": w}).fetchall()) for w in widths}
        part = _partition(values, widths, counts, k)
        stats[kind] = {"finest_band_years": widths[-1]}
        for label, vals in (("coarsened", [v for v, (_, w) in part.items() if w > widths[-1]]),
                            ("to_rare", [v for v in values if v not in part])):
            n_subj, n_ev = con.execute(
                "SELECT count(*), coalesce(sum(n), 0) FROM (SELECT subject_id, sum(n) AS n FROM marker_pairs "
                "WHERE v IN (SELECT unnest(?::BIGINT[])) GROUP BY subject_id)", [vals]).fetchall()[0]
            stats[kind] |= {f"values_{label}": len(vals), f"subjects_{label}": int(n_subj),
                            f"events_{label}": int(n_ev)}
        con.execute("DROP TABLE marker_pairs")

        prefix = f"{kind}{SEP}"
        # every value of a band maps to it, seen in train or not: a value missing from the map would become
        # RARE and mark its holder as a non-member, and the map would list exactly the values train subjects had
        for lo, w in set(part.values()):
            for v in range(lo, lo + w):
                out[kind][str(v)] = _band_name(prefix, lo, w)
    return out, stats


# --- encoding ---------------------------------------------------------------------------------------------


@dataclass
class EncodedChunk:
    """Token ids of several subjects, flat, with per-subject offsets and the token clock per token."""

    subject_ids: np.ndarray  # (S,)
    offsets: np.ndarray  # (S + 1,) into tokens
    prefix_lens: np.ndarray  # (S,) static prefix length (BOS .. first AGE/YEAR marker)
    tokens: np.ndarray  # (N,) int64
    clock_s: np.ndarray  # (N,) token clock, seconds since the epoch (the first event's time for the prefix)
    t0_s: np.ndarray  # (S,) time of the first timed event (the decode anchor); INT64_MIN when none
    birth_s: np.ndarray  # (S,) birth time; INT64_MIN when unknown
    clock_error_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # |clock - true time| per timestamp
    # (S,) true time of the last timed event; INT64_MIN when none. The token clock may be off the truth by a
    # share of a bin, so a forecast anchors its future here (the truth), not at the clock.
    last_s: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


NO_TIME = np.iinfo(np.int64).min


def to_epoch(t: datetime) -> int:
    """Seconds since 1970 for a naive timestamp read as UTC (the warehouse stores naive wall-clock times)."""
    return int((t - _EPOCH).total_seconds())


def from_epoch(s: float) -> datetime:
    return _EPOCH + timedelta(seconds=float(s))


_EPOCH = datetime(1970, 1, 1)


def _years_of(seconds: np.ndarray) -> np.ndarray:
    return seconds.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970


def _ages(clock: np.ndarray, birth: np.ndarray) -> np.ndarray:
    """Whole years of age at ``clock`` for a birth at ``birth`` (both epoch seconds)."""
    c = clock.astype("datetime64[s]")
    b = birth.astype("datetime64[s]")
    cy, by = c.astype("datetime64[Y]"), b.astype("datetime64[Y]")
    # before this year's birthday if the time elapsed in the year is shorter than at birth
    before = (c - cy) < (b - by)
    return (cy.astype(np.int64) - by.astype(np.int64)) - before.astype(np.int64)


def encode_arrays(
    vocab: Vocabulary,
    subject: np.ndarray,
    time_s: np.ndarray,
    token: np.ndarray,
    value: np.ndarray,
    birth_by_subject: dict[int, int] | None = None,
) -> EncodedChunk:
    """The token layout for events already mapped to code tokens, vectorised over events.

    Inputs are parallel arrays for all events of a set of subjects, in any order: subject id, time in epoch
    seconds (``NO_TIME`` for static facts), code token id and numeric value (NaN for none). Birth times are
    passed separately (``birth_by_subject``); subjects appear in the output in increasing id order.
    """
    cfg = vocab.config
    birth_by_subject = birth_by_subject or {}
    subject = np.asarray(subject, dtype=np.int64)
    time_s = np.asarray(time_s, dtype=np.int64)
    token = np.asarray(token, dtype=np.int64)
    value = np.asarray(value, dtype=np.float64)
    static = (time_s == NO_TIME) | vocab.is_static[token]

    if cfg.dedup_window_minutes > 0 and len(subject):
        # Drop a timed repeat of the same (subject, token) within the window after its previous occurrence.
        o = np.lexsort((time_s, token, subject))
        rep = np.zeros(len(o), dtype=bool)
        rep[1:] = ((subject[o][1:] == subject[o][:-1]) & (token[o][1:] == token[o][:-1])
                   & ((time_s[o][1:] - time_s[o][:-1]) < cfg.dedup_window_minutes * MINUTE))
        keep = np.ones(len(o), dtype=bool)
        keep[o[rep & ~static[o]]] = False
        subject, time_s, token, value, static = subject[keep], time_s[keep], token[keep], value[keep], static[keep]

    subjects = np.unique(subject)
    n_subj = len(subjects)
    sidx = np.searchsorted(subjects, subject)
    birth = np.array([birth_by_subject.get(int(s), NO_TIME) for s in subjects], dtype=np.int64)

    # Static prefix: per subject and static kind, the most frequent code (ties: the lowest token id).
    st_sub, st_tok = sidx[static], token[static]
    if len(st_sub):
        pairs, cnt = np.unique(np.stack([st_sub, st_tok]), axis=1, return_counts=True)
        kind_of = vocab.kind_id[pairs[1]]
        o = np.lexsort((pairs[1], -cnt, kind_of, pairs[0]))
        first = np.ones(len(o), dtype=bool)
        first[1:] = (pairs[0][o][1:] != pairs[0][o][:-1]) | (kind_of[o][1:] != kind_of[o][:-1])
        st_sub, st_tok = pairs[0][o][first], pairs[1][o][first]
        o = np.lexsort((st_tok, st_sub))
        st_sub, st_tok = st_sub[o], st_tok[o]
    n_static = np.bincount(st_sub, minlength=n_subj).astype(np.int64)

    # Timed events, ordered by subject and time; the distinct (subject, time) pairs drive the token clock.
    ev = ~static
    e_sub, e_time, e_tok, e_val = sidx[ev], time_s[ev], token[ev], value[ev]
    o = np.lexsort((e_time, e_sub))
    e_sub, e_time, e_tok, e_val = e_sub[o], e_time[o], e_tok[o], e_val[o]
    new_ts = np.ones(len(e_sub), dtype=bool)
    new_ts[1:] = (e_sub[1:] != e_sub[:-1]) | (e_time[1:] != e_time[:-1])
    ts_pos = np.flatnonzero(new_ts)
    ts_sub, ts_true = e_sub[ts_pos], e_time[ts_pos].astype(np.float64)
    n_ts = len(ts_pos)
    first_ts = np.ones(n_ts, dtype=bool)
    first_ts[1:] = ts_sub[1:] != ts_sub[:-1]
    ts_start = np.flatnonzero(first_ts)
    ts_len = np.diff(np.append(ts_start, n_ts))

    # Token clock with bounded error feedback: each gap is the true gap plus the clock's lag behind the truth,
    # the lag clipped to +- clock_correction x the true gap (see TokenizerConfig), so the clock never drifts
    # far and a short gap is never swallowed by the drift of a long one. Sequential within a subject, so the
    # loop runs over the k-th timestamp of all subjects at once (vectorised over subjects), never over events.
    clock = np.empty(n_ts)
    n_years = np.zeros(n_ts, dtype=np.int64)
    bin_idx = np.full(n_ts, -1, dtype=np.int64)
    clock[ts_start] = ts_true[ts_start]
    year_s = YEAR_MINUTES * MINUTE
    lower, reps = vocab.time_lower_s, vocab.time_reps_s
    for k in range(1, int(ts_len.max()) if n_ts else 0):
        cur = ts_start[ts_len > k] + k
        true_gap = ts_true[cur] - ts_true[cur - 1]
        limit = cfg.clock_correction * true_gap
        gap = true_gap + np.clip(ts_true[cur - 1] - clock[cur - 1], -limit, limit)
        years = np.floor(np.maximum(gap, 0.0) / year_s).astype(np.int64)
        b = np.searchsorted(lower, gap - years * year_s, side="right") - 1  # -1: under 5 minutes, no token
        n_years[cur] = years
        bin_idx[cur] = b
        clock[cur] = clock[cur - 1] + years * year_s + np.where(b >= 0, reps[np.maximum(b, 0)], 0.0)

    # Timestamps whose clock did not move (under 5 minutes apart) merge into one group: the group is what the
    # tokens can express, so events are ordered canonically within it (this is what makes decoding exact).
    grp_new = first_ts | (n_years > 0) | (bin_idx >= 0)
    grp_of_ts = np.cumsum(grp_new) - 1
    g_first = np.flatnonzero(grp_new)  # the first timestamp of each group
    n_grp = len(g_first)
    g_sub = ts_sub[g_first]
    g_clock = np.round(clock[g_first]).astype(np.int64)
    g_years, g_bin = n_years[g_first], bin_idx[g_first]
    g_first_of_subj = first_ts[g_first]

    ev_grp = grp_of_ts[np.cumsum(new_ts) - 1]
    has_q = vocab.has_quantiles[e_tok] & ~np.isnan(e_val)
    q = np.zeros(len(e_tok), dtype=np.int64)
    if has_q.any():
        q[has_q] = (vocab.edges[e_tok[has_q]] < e_val[has_q, None]).sum(axis=1)
    o = np.lexsort((q, e_tok, vocab.kind_rank[e_tok], ev_grp))
    e_sub, e_tok, has_q, q, ev_grp = e_sub[o], e_tok[o], has_q[o], q[o], ev_grp[o]

    # Markers per group: YEAR when the clock's year token changes, AGE when the age token does (a band token
    # is repeated only when the band changes); the first group of a subject always carries both.
    year = _years_of(g_clock)
    g_birth = birth[g_sub]
    has_birth = g_birth != NO_TIME
    age = np.where(has_birth, _ages(g_clock, np.where(has_birth, g_birth, 0)), -1)
    year_tok = vocab.marker_ids("YEAR", year)
    age_tok = np.where(age < 0, vocab.index[UNK_AGE], vocab.marker_ids("AGE", age))
    year_change = g_first_of_subj.copy()
    year_change[1:] |= year_tok[1:] != year_tok[:-1]
    age_change = g_first_of_subj.copy()
    age_change[1:] |= age_tok[1:] != age_tok[:-1]
    year_change &= cfg.year_tokens
    age_change &= cfg.age_tokens

    # Lengths: per group [TIME//1Y]*years [TIME bin] [YEAR] [AGE]; per event code [+ value]; per subject
    # BOS + statics + birth band ... END (unless the subject died).
    g_ntime = g_years + (g_bin >= 0)
    g_pre = g_ntime + year_change + age_change
    ev_len = 1 + has_q.astype(np.int64)
    first_ev_of_grp = np.ones(len(e_sub), dtype=bool)
    first_ev_of_grp[1:] = ev_grp[1:] != ev_grp[:-1]
    ev_total = ev_len + np.where(first_ev_of_grp, g_pre[ev_grp], 0)
    head_len = 2 + n_static  # BOS, statics, birth band
    death_id = vocab.index.get(DEATH_CODE, -1)
    died = np.zeros(n_subj, dtype=bool)
    died[np.unique(e_sub[e_tok == death_id])] = True
    subj_len = head_len + np.bincount(e_sub, weights=ev_total, minlength=n_subj).astype(np.int64) + ~died
    offsets = np.zeros(n_subj + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(subj_len)
    out = np.full(offsets[-1], -1, dtype=np.int64)
    out_clock = np.zeros(offsets[-1], dtype=np.int64)

    t0 = np.full(n_subj, NO_TIME, dtype=np.int64)
    t0[g_sub[g_first_of_subj]] = g_clock[g_first_of_subj]
    last_clock = np.zeros(n_subj, dtype=np.int64)
    if n_grp:
        last_clock[g_sub] = g_clock  # later groups overwrite earlier ones: the last clock wins
    subj_clock0 = np.where(t0 == NO_TIME, 0, t0)

    # heads
    out[offsets[:-1]] = vocab.index[BOS]
    st_pos = offsets[st_sub] + 1 + _ranges(n_static)
    out[st_pos] = st_tok
    birth_year = _years_of(np.where(birth != NO_TIME, birth, 0))
    band_tok = np.where(birth != NO_TIME, vocab.marker_ids("BIRTH", birth_year), vocab.index[f"{BIRTH_PREFIX}RARE"])
    out[offsets[:-1] + head_len - 1] = band_tok
    head_pos = np.repeat(offsets[:-1], head_len) + _ranges(head_len)
    out_clock[head_pos] = np.repeat(subj_clock0, head_len)

    # event blocks
    ev_start = np.zeros(len(e_sub), dtype=np.int64)
    if len(e_sub):
        running = np.cumsum(ev_total) - ev_total
        subj_first = np.searchsorted(e_sub, e_sub)  # index of each subject's first event
        ev_start = offsets[e_sub] + head_len[e_sub] + running - running[subj_first]
    ev_clock = g_clock[ev_grp]
    gb = ev_start[first_ev_of_grp]  # block start of each group (groups are in event order)
    if n_grp:
        tpos = np.repeat(gb, g_ntime) + _ranges(g_ntime)
        last_of = _ranges(g_ntime) == np.repeat(g_ntime - 1, g_ntime)
        out[tpos] = np.where(last_of & np.repeat(g_bin >= 0, g_ntime),
                             vocab.time_ids[np.repeat(np.maximum(g_bin, 0), g_ntime)], vocab.time_ids[-1])
        out_clock[tpos] = np.repeat(g_clock, g_ntime)
        yp = gb + g_ntime
        out[yp[year_change]] = year_tok[year_change]
        out_clock[yp[year_change]] = g_clock[year_change]
        ap = yp + year_change
        out[ap[age_change]] = age_tok[age_change]
        out_clock[ap[age_change]] = g_clock[age_change]
    code_pos = ev_start + np.where(first_ev_of_grp, g_pre[ev_grp], 0)
    out[code_pos] = e_tok
    out_clock[code_pos] = ev_clock
    out[code_pos[has_q] + 1] = vocab.q_ids[q[has_q]]
    out_clock[code_pos[has_q] + 1] = ev_clock[has_q]
    end_pos = offsets[1:][~died] - 1
    out[end_pos] = vocab.index[END]
    out_clock[end_pos] = last_clock[~died]
    if (out < 0).any():  # every slot must have been written: a layout bug would otherwise be silent
        raise AssertionError("token layout left unfilled positions")

    prefix = head_len.copy()
    if n_grp:
        prefix[g_sub[g_first_of_subj]] += g_pre[g_first_of_subj]
    last = np.full(n_subj, NO_TIME, dtype=np.int64)
    if n_ts:
        last[ts_sub[ts_start]] = ts_true[ts_start + ts_len - 1].astype(np.int64)
    return EncodedChunk(subjects, offsets, prefix, out, out_clock, t0, birth, np.abs(clock - ts_true), last)


def _ranges(counts: np.ndarray) -> np.ndarray:
    """[0..c0-1, 0..c1-1, ...] for counts c (vectorised)."""
    if len(counts) == 0:
        return np.zeros(0, dtype=np.int64)
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


# --- decoding ---------------------------------------------------------------------------------------------


def decode(
    vocab: Vocabulary,
    tokens: Iterable[int],
    *,
    start_time: datetime,
    birth_time: datetime | None = None,
) -> list[dict[str, Any]]:
    """Tokens -> MEDS-shaped events (``subject_id`` omitted) with times to the bins' resolution.

    ``start_time`` anchors the token clock (the time of the first timed event); ``birth_time`` restores the
    MEDS_BIRTH event. Interval tokens advance the clock by their bin's representative length; YEAR/AGE markers
    carry no time of their own; value tokens give the decile bin's representative value.
    """
    events: list[dict[str, Any]] = []
    if birth_time is not None:
        events.append({"time": birth_time, "code": BIRTH_CODE, "numeric_value": None})
    clock = float(to_epoch(start_time))
    rep = dict(zip(vocab.time_ids.tolist(), vocab.time_reps_s.tolist(), strict=True))
    q_index = {int(t): i for i, t in enumerate(vocab.q_ids)}
    for tid in tokens:
        tid = int(tid)
        tok = vocab.tokens[tid]
        if tid in rep:
            clock += rep[tid]
        elif tid in q_index:
            if events and events[-1]["code"] in vocab.quantile_edges:
                events[-1]["numeric_value"] = _q_value(vocab.quantile_edges[events[-1]["code"]], q_index[tid])
        elif _is_marker(tok):
            continue
        elif vocab.is_static[tid]:
            events.append({"time": None, "code": tok, "numeric_value": None})
        else:
            events.append({"time": from_epoch(round(clock)), "code": tok, "numeric_value": None})
    return events


def _q_value(edges: list[float], q: int) -> float:
    """A representative value inside decile bin ``q`` (0-based), consistent with encoding's ``edges < v``."""
    n = len(edges)
    if q == 0:
        return edges[0]
    if q == n:
        return edges[-1] + max(abs(edges[-1]) * 0.01, 1e-6)
    return (edges[q - 1] + edges[q]) / 2


# --- the warehouse -> token shards stage ------------------------------------------------------------------

INDEX_DTYPE = np.dtype([("subject_id", "<i8"), ("offset", "<i8"), ("length", "<i8"), ("prefix_len", "<i4"),
                        ("head_len", "<i4"), ("t0", "<i8"), ("birth", "<i8")])


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
    cfg = vocab.config
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
    cond = " AND ".join(where)
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
    chunk = encode_arrays(vocab, data["subject_id"], data["t"], data["tok"], data["v"], dict(births))
    # subjects with a birth but no other event still get a (short) sequence
    present = set(chunk.subject_ids.tolist())
    extra = [sid for sid, _ in births if sid not in present]
    return _merge_static_only(vocab, chunk, extra, dict(births)) if extra else chunk


def _merge_static_only(
    vocab: Vocabulary, chunk: EncodedChunk, extra: list[int], births: dict[int, int]
) -> EncodedChunk:
    """Add subjects that have a birth but no other event: BOS, birth band, END."""
    parts = [chunk]
    for sid in extra:
        b = births[sid]
        band = int(vocab.marker_ids("BIRTH", _years_of(np.array([b])))[0])
        toks = np.array([vocab.index[BOS], band, vocab.index[END]], dtype=np.int64)
        parts.append(EncodedChunk(np.array([sid]), np.array([0, 3]), np.array([2]), toks, np.zeros(3, np.int64),
                                  np.array([NO_TIME]), np.array([b]), last_s=np.array([NO_TIME])))
    return concat_chunks(parts)


def concat_chunks(parts: list[EncodedChunk]) -> EncodedChunk:
    """Concatenate encoded chunks, ordered by subject id."""
    sids = np.concatenate([p.subject_ids for p in parts])
    order = np.argsort(sids, kind="stable")
    lengths = np.concatenate([np.diff(p.offsets) for p in parts])
    starts = np.concatenate([p.offsets[:-1] + sum(len(q.tokens) for q in parts[:i]) for i, p in enumerate(parts)])
    toks = np.concatenate([p.tokens for p in parts])
    clock = np.concatenate([p.clock_s for p in parts])
    idx = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in order]) if len(order) else \
        np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths[order])
    return EncodedChunk(sids[order], offsets, np.concatenate([p.prefix_lens for p in parts])[order], toks[idx],
                        clock[idx], np.concatenate([p.t0_s for p in parts])[order],
                        np.concatenate([p.birth_s for p in parts])[order],
                        np.concatenate([p.clock_error_s for p in parts]),
                        np.concatenate([p.last_s for p in parts])[order])


def tokenize(
    db: str | Path,
    out_dir: str | Path,
    config: TokenizerConfig | None = None,
    *,
    progress: Any = None,
    exclude_subjects: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Fit the vocabulary on train and write packed token shards for every split.

    Output (``out_dir``): ``vocab.json`` (config, tokens, value deciles, marker bands, rule report, data
    fingerprint), ``code_descriptions.json`` (token -> description); per split ``<split>.bin`` (token ids,
    uint16/uint32), ``<split>.clock.bin`` (int32 minutes of the token clock since the subject's first event) and
    ``<split>.index.npy`` (one row per subject: id, offset, length, prefix length, head length, first-event time,
    birth time). ``progress(split, done, total)``
    is called after each chunk of subjects.

    The returned summary (also written as ``tokenize_summary.json``) has tokens and subjects per split, the
    subjects with only static facts per split (``static_only_subjects``: no timed event, so ``BOS``, static
    prefix, birth band, ``END``), the rule report (``rare_mapping``), the train subjects and events whose
    age/year/birth markers the floor coarsened (``markers_coarsened``; kept out of ``vocab.json``, which ships
    with models) and ``messages`` saying the unusual parts in words.

    ``exclude_subjects`` (the national data opt-out, :mod:`foresight.optout`): these subjects are invisible to
    every step (vocabulary counts, code map, value deciles, shards), as if the warehouse did not hold them. Only
    their number and the list's sha256 are recorded (``vocab.report["opt_out"]``), and the list's digest is folded
    into the data fingerprint so a model trained before the opt-out cannot be resumed on data after it.
    """
    import time

    from foresight import optout, warehouse
    from foresight.schema import SPLITS

    t_start = time.perf_counter()
    config = config or TokenizerConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    db = Path(db)
    if not db.exists():
        raise TokenizeError(f"{db}: warehouse not found")
    con = warehouse.connect(db, read_only=True)
    try:
        excluded = set(exclude_subjects or ())
        n_hidden = optout.hide_subjects(con, excluded) if excluded else 0
        vocab = fit_vocabulary(con, config)
        # per-kind counts of train subjects whose markers the floor coarsened go to the summary, which stays with
        # the shards, and not into vocab.json, which ships with every model: small counts of people stay inside
        markers_coarsened = vocab.report.pop("markers", {})
        if excluded:
            list_digest = optout.digest(excluded)
            vocab.fingerprint = data_fingerprint(con, list_digest)
            vocab.report["opt_out"] = {"subjects_listed": len(excluded), "subjects_excluded": n_hidden,
                                       "list_sha256": list_digest}
        register_code_map(con, vocab)
        # readable names of the code tokens (predictions, the server, model cards), from the codes table
        descriptions = dict(con.execute(
            "SELECT code, description FROM codes WHERE description IS NOT NULL AND code IN "
            "(SELECT unnest(?::VARCHAR[]))", [vocab.tokens]).fetchall())
        summary: dict[str, Any] = {"out": str(out), "vocab_size": len(vocab.tokens), "rare_mapping": vocab.report,
                                   "markers_coarsened": markers_coarsened, "tokens": {}, "subjects": {},
                                   "static_only_subjects": {}, "unseen_codes": {}}
        # The distinct codes of each split, from one aggregation (a few thousand rows): an anti-join of every
        # split's events against every train event ran DuckDB out of memory at 1M subjects (165M events).
        split_codes: dict[str, set[str]] = {}
        for split, code in con.execute("SELECT DISTINCT s.split, e.code FROM events e JOIN subject_splits s "
                                       "USING (subject_id)").fetchall():
            split_codes.setdefault(split, set()).add(code)
        for split in SPLITS:
            ids = np.array([r[0] for r in con.execute(
                "SELECT DISTINCT e.subject_id FROM events e JOIN subject_splits s USING (subject_id) "
                "WHERE s.split = ? ORDER BY 1", [split]).fetchall()], dtype=np.int64)
            n_tokens, errors, n_static_only = _write_split(con, vocab, split, ids, out, progress)
            if len(errors):
                summary.setdefault("clock_error_hours", {})[split] = {
                    "p50": round(float(np.percentile(errors, 50)) / 3600, 3),
                    "p95": round(float(np.percentile(errors, 95)) / 3600, 3),
                    "max": round(float(errors.max()) / 3600, 3)}
            summary["tokens"][split] = n_tokens
            summary["subjects"][split] = len(ids)
            summary["static_only_subjects"][split] = n_static_only
            summary["unseen_codes"][split] = len(split_codes.get(split, set()) - split_codes.get("train", set()))
    finally:
        con.close()
    vocab.save(out / "vocab.json")
    (out / "code_descriptions.json").write_text(json.dumps(descriptions, indent=0, sort_keys=True))
    summary["messages"] = _summary_messages(summary)
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    summary["db"] = str(db.resolve())  # where the tokens came from: `foresight evaluate` finds the warehouse here
    (out / "tokenize_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _summary_messages(summary: dict[str, Any]) -> list[str]:
    """Plain-language notes on what the tokenizer did to unusual records (the CLI prints them)."""
    messages = []
    static_only = summary["static_only_subjects"]
    if n := sum(static_only.values()):
        per = ", ".join(f"{s} {c:,}" for s, c in static_only.items() if c)
        messages.append(f"{n:,} subjects have only static facts (no timed event; {per}): encoded as BOS + static "
                        "prefix + birth band + END, with no events, age/year markers or clock")
    for kind, st in summary["markers_coarsened"].items():
        parts = []
        if st["subjects_coarsened"]:
            parts.append(f"{st['subjects_coarsened']:,} train subjects ({st['events_coarsened']:,} events) got a "
                         f"band wider than {st['finest_band_years']} year(s)")
        if st["subjects_to_rare"]:
            parts.append(f"{st['subjects_to_rare']:,} ({st['events_to_rare']:,} events) got {kind}//RARE")
        if parts:
            messages.append(f"{kind} markers under the privacy floor: {'; '.join(parts)}")
    return messages


def _write_split(
    con: Any, vocab: Vocabulary, split: str, ids: np.ndarray, out: Path, progress: Any
) -> tuple[int, np.ndarray, int]:
    """Encode and append one split's subjects chunk by chunk: (tokens written, clock-error sample, subjects
    with only static facts)."""
    per = vocab.config.subjects_per_chunk
    index_parts, written, errors, static_only = [], 0, [], 0
    with open(out / f"{split}.bin", "wb") as ftok, open(out / f"{split}.clock.bin", "wb") as fclk:
        for i in range(0, len(ids), per):
            part = ids[i:i + per]
            chunk = encode_subjects(con, vocab, int(part[0]), int(part[-1]), split)
            ftok.write(chunk.tokens.astype(vocab.dtype).tobytes())
            t0 = np.repeat(np.where(chunk.t0_s == NO_TIME, 0, chunk.t0_s), np.diff(chunk.offsets))
            fclk.write(((chunk.clock_s - t0) // MINUTE).astype(np.int32).tobytes())
            idx = np.zeros(len(chunk.subject_ids), dtype=INDEX_DTYPE)
            idx["subject_id"] = chunk.subject_ids
            idx["offset"] = chunk.offsets[:-1] + written
            idx["length"] = np.diff(chunk.offsets)
            idx["prefix_len"] = chunk.prefix_lens
            idx["head_len"] = chunk.prefix_lens - _first_markers(vocab, chunk)
            idx["t0"] = chunk.t0_s
            idx["birth"] = chunk.birth_s
            index_parts.append(idx)
            errors.append(chunk.clock_error_s[::max(1, len(chunk.clock_error_s) // 10_000)])  # a sample
            # no timed event at all (static facts and/or a birth only): a valid but empty-looking record that
            # the summary names, so a cohort full of them (a broken extract) does not pass unnoticed
            static_only += int((chunk.t0_s == NO_TIME).sum())
            written += len(chunk.tokens)
            if progress is not None:
                progress(split, min(i + per, len(ids)), len(ids))
    np.save(out / f"{split}.index.npy", np.concatenate(index_parts) if index_parts else np.zeros(0, INDEX_DTYPE))
    return written, np.concatenate(errors) if errors else np.zeros(0), static_only


def _first_markers(vocab: Vocabulary, chunk: EncodedChunk) -> np.ndarray:
    """How many of each prefix's last tokens are interval/YEAR/AGE markers of the first timestamp."""
    marker_ids = np.array([i for i, t in enumerate(vocab.tokens)
                           if t.startswith((TIME_PREFIX, YEAR_PREFIX, AGE_PREFIX))], dtype=np.int64)
    is_marker = np.isin(chunk.tokens, marker_ids)
    n = np.zeros(len(chunk.subject_ids), dtype=np.int64)
    for k in range(1, 4):  # at most TIME-free YEAR + AGE (+ safety)
        pos = chunk.offsets[:-1] + chunk.prefix_lens - k
        ok = (chunk.prefix_lens - k >= 0) & (n == k - 1)
        hit = ok & is_marker[np.clip(pos, 0, max(len(chunk.tokens) - 1, 0))]
        n += hit
    return n
