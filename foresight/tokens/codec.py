"""Encoding and decoding: timelines <-> token ids, the token clock, the layout of one subject's sequence.

Sequence layout of one subject (every token is one id of the vocabulary)::

    BOS  GENDER//F  RACE//WHITE  BIRTH//1950-1954  YEAR//2150  MONTH//03  AGE//63   static prefix + first markers
    ADMIT//EMERGENCY  LAB//MIMIC//50912 Q7 ...                                 events at the first timestamp
    TIME//6H-12H  LAB//MIMIC//50912 Q4 ...                                     a gap, then the next timestamp
    TIME//1Y TIME//1Y TIME//3M-6M  YEAR//2152  MONTH//07  AGE//65  ADMIT//ELECTIVE ...   long gaps repeat 1Y
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
  ``YEAR//y``, ``MONTH//mm`` and ``AGE//a`` tokens mark when the clock's calendar year, calendar month or the
  subject's age changes (in that order, after the group's interval tokens), so decoding reproduces them exactly
  and encode -> decode -> encode is the identity. MONTH markers (``month_tokens``, on for vocabularies fitted
  since it exists) let the model see the season: the year alone let it learn only the annual mean of a hazard
  with a winter peak.
- **Values**: a numeric value becomes ``Q1``..``Q10`` right after its code, from per-code deciles fitted on train
  (only the nine inner edges are stored: no minimum or maximum of anybody's value is kept).
- **Same timestamp**: events sharing a timestamp stay together in a canonical order (admission-type events
  first, discharge and death last, otherwise by code).

All heavy work is vectorised: numpy for the token layout here, DuckDB SQL for selecting and mapping events in
:mod:`foresight.tokens.from_warehouse`; subjects are processed in chunks so memory stays flat as the cohort grows.
"""


from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import numpy as np

from foresight.schema import BIRTH_CODE, DEATH_CODE
from foresight.tokens.vocab import BIRTH_PREFIX, BOS, END, MINUTE, UNK_AGE, YEAR_MINUTES, Vocabulary

NO_TIME = np.iinfo(np.int64).min
_EPOCH = datetime(1970, 1, 1)


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


def to_epoch(t: datetime) -> int:
    """Seconds since 1970 for a naive timestamp read as UTC (the warehouse stores naive wall-clock times)."""
    return int((t - _EPOCH).total_seconds())


def from_epoch(s: float) -> datetime:
    """The naive timestamp ``s`` seconds after 1970 (the inverse of :func:`to_epoch`)."""
    return _EPOCH + timedelta(seconds=float(s))


def years_of(seconds: np.ndarray) -> np.ndarray:
    """Calendar year of each epoch-seconds value."""
    return seconds.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970


def months_of(seconds: np.ndarray) -> np.ndarray:
    """Calendar month (1..12) of each epoch-seconds value.

    >>> months_of(np.array([to_epoch(datetime(2025, 1, 31, 23)), to_epoch(datetime(1969, 12, 1))]))
    array([ 1, 12])
    """
    return seconds.astype("datetime64[s]").astype("datetime64[M]").astype(np.int64) % 12 + 1


def ages(clock: np.ndarray, birth: np.ndarray) -> np.ndarray:
    """Whole years of age at ``clock`` for a birth at ``birth`` (both epoch seconds).

    >>> born = to_epoch(datetime(1950, 7, 1))
    >>> ages(np.array([to_epoch(datetime(2021, 6, 30)), to_epoch(datetime(2021, 7, 1))]), np.array([born, born]))
    array([70, 71])
    """
    c = clock.astype("datetime64[s]")
    b = birth.astype("datetime64[s]")
    cy, by = c.astype("datetime64[Y]"), b.astype("datetime64[Y]")
    # before this year's birthday if the time elapsed in the year is shorter than at birth
    before = (c - cy) < (b - by)
    return (cy.astype(np.int64) - by.astype(np.int64)) - before.astype(np.int64)


# --- encoding ---------------------------------------------------------------------------------------------


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

    The steps: drop repeats (``dedup_window_minutes``), pick the static prefix, sort the timed events into
    timestamps, run the token clock over them, merge timestamps the clock cannot tell apart into groups, order
    each group's events canonically, decide the YEAR/MONTH/AGE markers, then lay every token out in one flat
    array.
    """
    subjects, birth, (st_sub, st_tok), timed, clock, groups = _clocked(
        vocab, subject, time_s, token, value, birth_by_subject or {})
    n_static = np.bincount(st_sub, minlength=len(subjects)).astype(np.int64)
    events = _canonical_order(vocab, timed, groups)
    marks = _marker_changes(vocab, groups, birth)
    lay = _layout(vocab, events, groups, marks, n_static)

    out = np.full(lay.offsets[-1], -1, dtype=np.int64)
    out_clock = np.zeros(lay.offsets[-1], dtype=np.int64)
    t0 = np.full(len(subjects), NO_TIME, dtype=np.int64)
    t0[groups.sub[groups.first_of_subject]] = groups.clock[groups.first_of_subject]
    _write_heads(vocab, out, out_clock, lay, st_sub, st_tok, birth, np.where(t0 == NO_TIME, 0, t0))
    _write_events(vocab, out, out_clock, lay, events, groups, marks)
    _write_ends(vocab, out, out_clock, lay, groups)
    if (out < 0).any():  # every slot must have been written: a layout bug would otherwise be silent
        raise AssertionError("token layout left unfilled positions")

    prefix = lay.head_len.copy()
    if len(groups.sub):
        prefix[groups.sub[groups.first_of_subject]] += lay.g_pre[groups.first_of_subject]
    last = np.full(len(subjects), NO_TIME, dtype=np.int64)
    if len(timed.ts_true):
        last[timed.ts_sub[timed.start]] = timed.ts_true[timed.start + timed.length - 1].astype(np.int64)
    return EncodedChunk(subjects, lay.offsets, prefix, out, out_clock, t0, birth, np.abs(clock - timed.ts_true), last)


def _clocked(
    vocab: Vocabulary, subject: np.ndarray, time_s: np.ndarray, token: np.ndarray, value: np.ndarray,
    birth_by_subject: dict[int, int],
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray], _Timed, np.ndarray, _Groups]:
    """The steps of :func:`encode_arrays` up to the clock groups: (subject ids, birth per subject, static prefix
    (subject index, token), timed events, token clock per timestamp, groups)."""
    subject = np.asarray(subject, dtype=np.int64)
    time_s = np.asarray(time_s, dtype=np.int64)
    token = np.asarray(token, dtype=np.int64)
    value = np.asarray(value, dtype=np.float64)
    static = (time_s == NO_TIME) | vocab.is_static[token]
    if vocab.config.dedup_window_minutes > 0 and len(subject):
        keep = _dedup_mask(subject, time_s, token, static, vocab.config.dedup_window_minutes * MINUTE)
        subject, time_s, token, value, static = subject[keep], time_s[keep], token[keep], value[keep], static[keep]
    subjects = np.unique(subject)
    sidx = np.searchsorted(subjects, subject)
    birth = np.array([birth_by_subject.get(int(s), NO_TIME) for s in subjects], dtype=np.int64)
    prefix = _static_prefix(vocab, sidx[static], token[static])
    timed = _timestamps(sidx[~static], time_s[~static], token[~static], value[~static])
    clock, n_years, bin_idx = token_clock(vocab, timed.ts_true, timed.start, timed.length)
    return subjects, birth, prefix, timed, clock, _clock_groups(timed, clock, n_years, bin_idx)


def marker_values(
    vocab: Vocabulary, subject: np.ndarray, time_s: np.ndarray, token: np.ndarray, value: np.ndarray,
    birth_by_subject: dict[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the YEAR and AGE markers of :func:`encode_arrays` are computed from, one row per timestamp group:
    (subject id, calendar year of the token clock, age at the token clock or -1 without a birth, events in the
    group). The set of YEAR (AGE) tokens a subject's sequence holds is exactly the set of band tokens of its
    groups' years (ages), since a marker is written whenever the band changes; the vocabulary fit counts the
    privacy floor on these (the clock, not the events' true times, which can fall in another year).
    ``vocab`` needs its code tokens and time bins only (markers may still be unfitted)."""
    subjects, birth, _, timed, _, groups = _clocked(vocab, subject, time_s, token, value, birth_by_subject or {})
    g_birth = birth[groups.sub]
    has_birth = g_birth != NO_TIME
    age = np.where(has_birth, ages(groups.clock, np.where(has_birth, g_birth, 0)), -1)
    n_events = np.bincount(groups.of_stamp[timed.stamp], minlength=len(groups.sub))
    return subjects[groups.sub], years_of(groups.clock), age, n_events


def _dedup_mask(
    subject: np.ndarray, time_s: np.ndarray, token: np.ndarray, static: np.ndarray, window_s: float
) -> np.ndarray:
    """Events to keep: a timed repeat of the same (subject, token) within the window after its previous
    occurrence is dropped."""
    o = np.lexsort((time_s, token, subject))
    rep = np.zeros(len(o), dtype=bool)
    rep[1:] = ((subject[o][1:] == subject[o][:-1]) & (token[o][1:] == token[o][:-1])
               & ((time_s[o][1:] - time_s[o][:-1]) < window_s))
    keep = np.ones(len(o), dtype=bool)
    keep[o[rep & ~static[o]]] = False
    return keep


def _static_prefix(vocab: Vocabulary, st_sub: np.ndarray, st_tok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(subject index, token) of the static prefix, sorted: per subject and static kind, the most frequent
    code (ties: the lowest token id)."""
    if not len(st_sub):
        return st_sub, st_tok
    pairs, cnt = np.unique(np.stack([st_sub, st_tok]), axis=1, return_counts=True)
    kind_of = vocab.kind_id[pairs[1]]
    o = np.lexsort((pairs[1], -cnt, kind_of, pairs[0]))
    first = np.ones(len(o), dtype=bool)
    first[1:] = (pairs[0][o][1:] != pairs[0][o][:-1]) | (kind_of[o][1:] != kind_of[o][:-1])
    st_sub, st_tok = pairs[0][o][first], pairs[1][o][first]
    o = np.lexsort((st_tok, st_sub))
    return st_sub[o], st_tok[o]


@dataclass
class _Timed:
    """Timed events ordered by subject and time, and their distinct (subject, time) pairs: the timestamps."""

    sub: np.ndarray  # (E,) subject index of each event
    tok: np.ndarray  # (E,) code token id
    val: np.ndarray  # (E,) numeric value, NaN for none
    stamp: np.ndarray  # (E,) index of the event's timestamp
    ts_sub: np.ndarray  # (T,) subject index of each timestamp
    ts_true: np.ndarray  # (T,) true time of each timestamp, epoch seconds (float)
    first: np.ndarray  # (T,) bool: the subject's first timestamp
    start: np.ndarray  # (S',) index of each subject's first timestamp (subjects with timed events)
    length: np.ndarray  # (S',) timestamps per subject


def _timestamps(sub: np.ndarray, time_s: np.ndarray, tok: np.ndarray, val: np.ndarray) -> _Timed:
    """Order the timed events by subject and time and find their timestamps (they drive the token clock)."""
    o = np.lexsort((time_s, sub))
    sub, time_s, tok, val = sub[o], time_s[o], tok[o], val[o]
    new_ts = np.ones(len(sub), dtype=bool)
    new_ts[1:] = (sub[1:] != sub[:-1]) | (time_s[1:] != time_s[:-1])
    ts_pos = np.flatnonzero(new_ts)
    ts_sub = sub[ts_pos]
    first = np.ones(len(ts_pos), dtype=bool)
    first[1:] = ts_sub[1:] != ts_sub[:-1]
    start = np.flatnonzero(first)
    return _Timed(sub, tok, val, np.cumsum(new_ts) - 1, ts_sub, time_s[ts_pos].astype(np.float64), first, start,
                  np.diff(np.append(start, len(ts_pos))))


def token_clock(
    vocab: Vocabulary, true_s: np.ndarray, start: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The token clock at each timestamp: (clock in epoch seconds, whole years of the gap before it, interval
    bin of the rest of that gap, -1 when under 5 minutes). ``true_s``: true times of all subjects' timestamps,
    each subject's run starting at ``start`` with ``length`` timestamps.

    Bounded error feedback: each gap is the true gap plus the clock's lag behind the truth, the lag clipped to
    +- clock_correction x the true gap (see TokenizerConfig), so the clock never drifts far and a short gap is
    never swallowed by the drift of a long one. Sequential within a subject, so the loop runs over the k-th
    timestamp of all subjects at once (vectorised over subjects), never over events.
    """
    n_ts = len(true_s)
    clock = np.empty(n_ts)
    n_years = np.zeros(n_ts, dtype=np.int64)
    bin_idx = np.full(n_ts, -1, dtype=np.int64)
    clock[start] = true_s[start]
    year_s = YEAR_MINUTES * MINUTE
    lower, reps = vocab.time_lower_s, vocab.time_reps_s
    for k in range(1, int(length.max()) if n_ts else 0):
        cur = start[length > k] + k
        true_gap = true_s[cur] - true_s[cur - 1]
        limit = vocab.config.clock_correction * true_gap
        gap = true_gap + np.clip(true_s[cur - 1] - clock[cur - 1], -limit, limit)
        years = np.floor(np.maximum(gap, 0.0) / year_s).astype(np.int64)
        b = np.searchsorted(lower, gap - years * year_s, side="right") - 1  # -1: under 5 minutes, no token
        n_years[cur] = years
        bin_idx[cur] = b
        clock[cur] = clock[cur - 1] + years * year_s + np.where(b >= 0, reps[np.maximum(b, 0)], 0.0)
    return clock, n_years, bin_idx


@dataclass
class _Groups:
    """Timestamps whose clock moved, each with the timestamps under 5 minutes after it merged in."""

    of_stamp: np.ndarray  # (T,) group index of each timestamp
    sub: np.ndarray  # (G,) subject index
    clock: np.ndarray  # (G,) token clock, whole epoch seconds
    years: np.ndarray  # (G,) TIME//1Y tokens before the group
    bin: np.ndarray  # (G,) interval bin before the group (-1: none)
    first_of_subject: np.ndarray  # (G,) bool


def _clock_groups(timed: _Timed, clock: np.ndarray, n_years: np.ndarray, bin_idx: np.ndarray) -> _Groups:
    """Timestamps whose clock did not move (under 5 minutes apart) merge into one group: the group is what the
    tokens can express, so events are ordered canonically within it (this is what makes decoding exact)."""
    grp_new = timed.first | (n_years > 0) | (bin_idx >= 0)
    g_first = np.flatnonzero(grp_new)  # the first timestamp of each group
    return _Groups(np.cumsum(grp_new) - 1, timed.ts_sub[g_first], np.round(clock[g_first]).astype(np.int64),
                   n_years[g_first], bin_idx[g_first], timed.first[g_first])


@dataclass
class _Events:
    """Timed events in token order: by group, then kind rank, code token and value decile."""

    sub: np.ndarray  # (E,) subject index
    tok: np.ndarray  # (E,) code token id
    has_q: np.ndarray  # (E,) bool: a value token follows the code
    q: np.ndarray  # (E,) decile bin (0-based) of the value
    grp: np.ndarray  # (E,) group index


def _canonical_order(vocab: Vocabulary, timed: _Timed, groups: _Groups) -> _Events:
    """Value deciles of the events and their canonical order within each group."""
    grp = groups.of_stamp[timed.stamp]
    has_q = vocab.has_quantiles[timed.tok] & ~np.isnan(timed.val)
    q = np.zeros(len(timed.tok), dtype=np.int64)
    if has_q.any():
        q[has_q] = (vocab.edges[timed.tok[has_q]] < timed.val[has_q, None]).sum(axis=1)
    o = np.lexsort((q, timed.tok, vocab.kind_rank[timed.tok], grp))
    return _Events(timed.sub[o], timed.tok[o], has_q[o], q[o], grp[o])


class _Markers(NamedTuple):
    """YEAR/MONTH/AGE marker token of each group and whether the group carries it."""

    year_tok: np.ndarray  # (G,)
    year_change: np.ndarray  # (G,) bool
    age_tok: np.ndarray  # (G,)
    age_change: np.ndarray  # (G,) bool
    month_tok: np.ndarray  # (G,)
    month_change: np.ndarray  # (G,) bool (all False without ``month_tokens``)


def _marker_changes(vocab: Vocabulary, groups: _Groups, birth: np.ndarray) -> _Markers:
    """YEAR when the clock's year token changes, MONTH when its calendar month does, AGE when the age token does
    (a band token is repeated only when the band changes); the first group of a subject always carries all."""
    cfg = vocab.config
    year = years_of(groups.clock)
    g_birth = birth[groups.sub]
    has_birth = g_birth != NO_TIME
    age = np.where(has_birth, ages(groups.clock, np.where(has_birth, g_birth, 0)), -1)
    year_tok = vocab.marker_ids("YEAR", year)
    age_tok = np.where(age < 0, vocab.index[UNK_AGE], vocab.marker_ids("AGE", age))
    month_tok = vocab.marker_ids("MONTH", months_of(groups.clock)) if cfg.month_tokens else \
        np.zeros(len(groups.sub), dtype=np.int64)

    def changes(tok: np.ndarray, on: bool) -> np.ndarray:
        change = groups.first_of_subject.copy()
        change[1:] |= tok[1:] != tok[:-1]
        return change & on

    return _Markers(year_tok, changes(year_tok, cfg.year_tokens), age_tok, changes(age_tok, cfg.age_tokens),
                    month_tok, changes(month_tok, cfg.month_tokens))


@dataclass
class _Layout:
    """Where every token goes in the flat output."""

    offsets: np.ndarray  # (S + 1,) start of each subject's sequence
    n_static: np.ndarray  # (S,) static tokens
    head_len: np.ndarray  # (S,) BOS + statics + birth band
    died: np.ndarray  # (S,) bool: the sequence ends with MEDS_DEATH, not END
    g_ntime: np.ndarray  # (G,) interval tokens before the group
    g_pre: np.ndarray  # (G,) tokens before the group's first code: intervals, YEAR, MONTH, AGE
    first_of_grp: np.ndarray  # (E,) bool: the event opens its group
    ev_total: np.ndarray  # (E,) tokens of the event: its code and value, plus its group's markers when first


def _layout(vocab: Vocabulary, ev: _Events, groups: _Groups, marks: _Markers, n_static: np.ndarray) -> _Layout:
    """Lengths: per group [TIME//1Y]*years [TIME bin] [YEAR] [MONTH] [AGE]; per event code [+ value]; per subject
    BOS + statics + birth band ... END (unless the subject died)."""
    n_subj = len(n_static)
    g_ntime = groups.years + (groups.bin >= 0)
    g_pre = g_ntime + marks.year_change + marks.month_change + marks.age_change
    ev_len = 1 + ev.has_q.astype(np.int64)
    first_of_grp = np.ones(len(ev.sub), dtype=bool)
    first_of_grp[1:] = ev.grp[1:] != ev.grp[:-1]
    ev_total = ev_len + np.where(first_of_grp, g_pre[ev.grp], 0)
    head_len = 2 + n_static  # BOS, statics, birth band
    death_id = vocab.index.get(DEATH_CODE, -1)
    died = np.zeros(n_subj, dtype=bool)
    died[np.unique(ev.sub[ev.tok == death_id])] = True
    subj_len = head_len + np.bincount(ev.sub, weights=ev_total, minlength=n_subj).astype(np.int64) + ~died
    offsets = np.zeros(n_subj + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(subj_len)
    return _Layout(offsets, n_static, head_len, died, g_ntime, g_pre, first_of_grp, ev_total)


def _write_heads(vocab: Vocabulary, out: np.ndarray, out_clock: np.ndarray, lay: _Layout, st_sub: np.ndarray,
                 st_tok: np.ndarray, birth: np.ndarray, subj_clock0: np.ndarray) -> None:
    """BOS, the static tokens and the birth band of every subject, at the clock of its first event."""
    offsets, head_len = lay.offsets, lay.head_len
    out[offsets[:-1]] = vocab.index[BOS]
    st_pos = offsets[st_sub] + 1 + _ranges(lay.n_static)
    out[st_pos] = st_tok
    birth_year = years_of(np.where(birth != NO_TIME, birth, 0))
    band_tok = np.where(birth != NO_TIME, vocab.marker_ids("BIRTH", birth_year), vocab.index[f"{BIRTH_PREFIX}RARE"])
    out[offsets[:-1] + head_len - 1] = band_tok
    head_pos = np.repeat(offsets[:-1], head_len) + _ranges(head_len)
    out_clock[head_pos] = np.repeat(subj_clock0, head_len)


def _write_events(vocab: Vocabulary, out: np.ndarray, out_clock: np.ndarray, lay: _Layout, ev: _Events,
                  groups: _Groups, marks: _Markers) -> None:
    """Each group's interval tokens and YEAR/MONTH/AGE markers, then its events' code (and value) tokens."""
    ev_start = np.zeros(len(ev.sub), dtype=np.int64)
    if len(ev.sub):
        running = np.cumsum(lay.ev_total) - lay.ev_total
        subj_first = np.searchsorted(ev.sub, ev.sub)  # index of each subject's first event
        ev_start = lay.offsets[ev.sub] + lay.head_len[ev.sub] + running - running[subj_first]
    ev_clock = groups.clock[ev.grp]
    gb = ev_start[lay.first_of_grp]  # block start of each group (groups are in event order)
    if len(groups.sub):
        g_ntime, year_change, age_change = lay.g_ntime, marks.year_change, marks.age_change
        tpos = np.repeat(gb, g_ntime) + _ranges(g_ntime)
        last_of = _ranges(g_ntime) == np.repeat(g_ntime - 1, g_ntime)
        out[tpos] = np.where(last_of & np.repeat(groups.bin >= 0, g_ntime),
                             vocab.time_ids[np.repeat(np.maximum(groups.bin, 0), g_ntime)], vocab.time_ids[-1])
        out_clock[tpos] = np.repeat(groups.clock, g_ntime)
        yp = gb + g_ntime
        out[yp[year_change]] = marks.year_tok[year_change]
        out_clock[yp[year_change]] = groups.clock[year_change]
        mp = yp + year_change
        month_change = marks.month_change
        out[mp[month_change]] = marks.month_tok[month_change]
        out_clock[mp[month_change]] = groups.clock[month_change]
        ap = mp + month_change
        out[ap[age_change]] = marks.age_tok[age_change]
        out_clock[ap[age_change]] = groups.clock[age_change]
    code_pos = ev_start + np.where(lay.first_of_grp, lay.g_pre[ev.grp], 0)
    out[code_pos] = ev.tok
    out_clock[code_pos] = ev_clock
    out[code_pos[ev.has_q] + 1] = vocab.q_ids[ev.q[ev.has_q]]
    out_clock[code_pos[ev.has_q] + 1] = ev_clock[ev.has_q]


def _write_ends(vocab: Vocabulary, out: np.ndarray, out_clock: np.ndarray, lay: _Layout, groups: _Groups) -> None:
    """END after the last event of every subject who did not die, at the clock of that event."""
    last_clock = np.zeros(len(lay.died), dtype=np.int64)
    if len(groups.sub):
        last_clock[groups.sub] = groups.clock  # later groups overwrite earlier ones: the last clock wins
    end_pos = lay.offsets[1:][~lay.died] - 1
    out[end_pos] = vocab.index[END]
    out_clock[end_pos] = last_clock[~lay.died]


def _ranges(counts: np.ndarray) -> np.ndarray:
    """[0..c0-1, 0..c1-1, ...] for counts c (vectorised).

    >>> _ranges(np.array([2, 0, 3]))
    array([0, 1, 0, 1, 2])
    """
    if len(counts) == 0:
        return np.zeros(0, dtype=np.int64)
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


def merge_static_only(
    vocab: Vocabulary, chunk: EncodedChunk, extra: list[int], births: dict[int, int]
) -> EncodedChunk:
    """Add subjects that have a birth but no other event: BOS, birth band, END."""
    parts = [chunk]
    for sid in extra:
        b = births[sid]
        band = int(vocab.marker_ids("BIRTH", years_of(np.array([b])))[0])
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
    MEDS_BIRTH event. Interval tokens advance the clock by their bin's representative length; YEAR/MONTH/AGE markers
    carry no time of their own; value tokens give the decile bin's representative value.
    """
    events: list[dict[str, Any]] = []
    if birth_time is not None:
        events.append({"time": birth_time, "code": BIRTH_CODE, "numeric_value": None})
    clock = float(to_epoch(start_time))
    rep = dict(zip(vocab.time_ids.tolist(), vocab.time_reps_s.tolist(), strict=True))
    q_index = {int(t): i for i, t in enumerate(vocab.q_ids)}
    no_event = vocab.is_time | vocab.is_marker | vocab.is_special  # markers and specials carry no event
    for tid in tokens:
        tid = int(tid)
        tok = vocab.tokens[tid]
        if tid in rep:
            clock += rep[tid]
        elif tid in q_index:
            if events and events[-1]["code"] in vocab.quantile_edges:
                events[-1]["numeric_value"] = _q_value(vocab.quantile_edges[events[-1]["code"]], q_index[tid])
        elif no_event[tid]:
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
