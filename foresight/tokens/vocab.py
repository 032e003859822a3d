"""The vocabulary: special tokens, token prefixes, the tokenizer's options and the fitted :class:`Vocabulary`.

A code is a token only if at least ``min_subjects`` distinct train subjects have it (fitted in
:mod:`foresight.tokens.fit`). A rarer code maps to its nearest ancestor (``codes.parent_codes``) whose pooled
subjects reach the floor, else to ``KIND//RARE`` (or ``RARE`` when even that is too rare). Static, age, year and
birth-band tokens obey the same floor (the twelve ``MONTH//`` markers are fixed, like the interval bins).
:class:`Vocabulary` also holds the ONE definition of token classes
(``is_event``, ``is_time``, ``is_marker``, ``is_value``, ``is_special``, ``is_static``) that every reader uses.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from foresight.schema import DEATH_CODE, SEP, code_kind

# Special tokens with fixed ids: PAD is never trained on (packing needs no padding) but batching at inference does.
PAD, BOS, END, RARE, UNK_AGE = "[PAD]", "[BOS]", "[END]", "RARE", "AGE//UNK"
SPECIAL_TOKENS = (PAD, BOS, END, RARE, UNK_AGE)
QUANTILE_PREFIX = "Q"
TIME_PREFIX = "TIME//"
YEAR_PREFIX = "YEAR//"
MONTH_PREFIX = "MONTH//"
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
    # MONTH//01..MONTH//12: the calendar month of the token clock, written like YEAR (see the codec). Twelve fixed
    # tokens whatever the data (no floor: like the interval bins, they name no value of anybody's). Vocabularies
    # saved before this option existed have none (read back as False), so their tokens stay byte-identical.
    month_tokens: bool = True
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
    def from_options(cls, d: dict[str, Any]) -> TokenizerConfig:
        """A config from a user's options (a JSON file, CLI flags): fields left out take today's defaults — unlike
        :meth:`from_dict`, which reads a SAVED config with the rules its tokens were made with."""
        return cls.from_dict({"clock_correction": cls.clock_correction, "month_tokens": cls.month_tokens, **d})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        """The config saved in a ``vocab.json`` (lists back to tuples; options added since get their old rule)."""
        d = dict(d)
        d.setdefault("clock_correction", float("inf"))  # the rule their tokens were made with
        d.setdefault("month_tokens", False)  # no MONTH markers before the option existed
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

    >>> bins = time_tokens(TokenizerConfig())
    >>> [(t, round(m)) for t, m in bins[:2]], bins[-1][0]
    ([('TIME//5M-15M', 9), ('TIME//15M-1H', 30)], 'TIME//1Y')
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


def month_marker_tokens(config: TokenizerConfig) -> list[str]:
    """The calendar-month markers, January first (none when ``config.month_tokens`` is off).

    >>> month_marker_tokens(TokenizerConfig())[:2], len(month_marker_tokens(TokenizerConfig(month_tokens=False)))
    (['MONTH//01', 'MONTH//02'], 0)
    """
    return [f"{MONTH_PREFIX}{m:02d}" for m in range(1, 13)] if config.month_tokens else []


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
        self.is_marker = np.array([t.startswith((YEAR_PREFIX, MONTH_PREFIX, AGE_PREFIX)) for t in self.tokens])
        self.is_value = np.array([t.startswith(QUANTILE_PREFIX) and t[len(QUANTILE_PREFIX):].isdigit()
                                  for t in self.tokens])
        self.is_special = np.array([t in (PAD, BOS, END) or t.startswith(BIRTH_PREFIX) for t in self.tokens])
        self.is_event = ~(self.is_time | self.is_marker | self.is_value | self.is_special | self.is_static)
        self._marker_tables = {kind: self._marker_table(kind, mapping) for kind, mapping in self.marker_map.items()}
        if self.config.month_tokens:  # month m (1..12) -> MONTH//mm: a fixed table, never RARE
            self._marker_tables["MONTH"] = (1, np.array([self.index[t] for t in month_marker_tokens(self.config)]), -1)

    def _marker_table(self, kind: str, mapping: dict[str, str]) -> tuple[int, np.ndarray, int]:
        """(lowest value, token id per value from there on, id of KIND//RARE) for vectorised marker lookups."""
        rare = self.index[f"{kind}{SEP}RARE"]
        if not mapping:
            return 0, np.zeros(0, dtype=np.int64), rare
        vals = [int(v) for v in mapping]
        lo, hi = min(vals), max(vals)
        table = np.full(hi - lo + 1, rare, dtype=np.int64)
        for v, tok in mapping.items():
            table[int(v) - lo] = self.index[tok]
        return lo, table, rare

    def marker_ids(self, kind: str, values: np.ndarray) -> np.ndarray:
        """Token ids of AGE/YEAR/BIRTH/MONTH markers for integer values (vectorised; unknown values -> KIND//RARE;
        months are 1..12)."""
        lo, table, rare = self._marker_tables[kind]
        pos = np.asarray(values, dtype=np.int64) - lo
        ok = (pos >= 0) & (pos < len(table))
        return np.where(ok, table[np.clip(pos, 0, max(len(table) - 1, 0))] if len(table) else rare, rare)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """Token id type of the shard files: uint16 while the vocabulary fits, else uint32."""
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
    """Ancestors by truncation for prefix-hierarchical vocabularies, nearest first.

    >>> _prefix_parents("DX//ICD10CM//E1165")
    ['DX//ICD10CM//E116', 'DX//ICD10CM//E11', 'DX//ICD10CM//E1', 'DX//ICD10CM//E']
    >>> _prefix_parents("LAB//MIMIC//50912")  # not a prefix hierarchy
    []
    """
    parts = code.split(SEP)
    if len(parts) != 3 or parts[1] not in PREFIX_HIERARCHIES:
        return []
    head, value = f"{parts[0]}{SEP}{parts[1]}{SEP}", parts[2]
    return [head + value[:n] for n in range(len(value) - 1, 0, -1)]


def _is_marker(token: str) -> bool:
    """Not a code: a time/year/month/age/birth marker or a special token (a string test, for codes outside the
    vocabulary; for token ids use the Vocabulary masks)."""
    return (token.startswith((TIME_PREFIX, YEAR_PREFIX, MONTH_PREFIX, AGE_PREFIX, BIRTH_PREFIX))
            or token in (PAD, BOS, END, UNK_AGE))
