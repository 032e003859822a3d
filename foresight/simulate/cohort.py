"""Simulate one chunk of a cohort: draw people, run their lives, keep the ones the cohort definition selects.

The cohort is everyone alive on or after ``calendar.alive_from`` whose birth falls in the ``birth_span_years``
before the end of the data (births uniform in time, so the age mix at the cut-off is the model's own life table).
Lives are recorded from birth. A chunk is seeded by ``(seed, chunk index)`` alone, so chunks can run in any order
or in parallel and the output is the same.

Because people who died before ``alive_from`` are not in the cohort, their earlier lives are *survivor-selected*:
checks of event rates against the hazards use person-time from ``alive_from`` on, where the selection no longer
conditions anything (it depends only on the past).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from foresight.simulate import catalog as cat
from foresight.simulate.engine import Engine
from foresight.simulate.model import Model
from foresight.simulate.state import Sink, State

# Bits of the global encounter id reserved for the within-chunk counter (a chunk has far fewer encounters).
ENC_BITS = 40


@dataclass
class Chunk:
    """The subjects of one chunk and everything recorded about them (times in days since 1970-01-01)."""

    index: int
    subjects: dict[str, np.ndarray]  # subject_id, birth, death (NaN if alive at the end), male, race, hisp
    events: dict[str, np.ndarray]  # subject_id, time, code, value, enc, flag
    encounters: dict[str, np.ndarray]  # subject_id, enc, start, stop (NaN if ongoing at the end), klass, reason
    icu: dict[str, np.ndarray]  # subject_id, enc, start, stop (NaN if ongoing)
    notes: dict[str, np.ndarray]  # subject_id, time, kind, reason, cond, age, died
    simulated: int  # lives simulated, including those the cohort definition rejected
    data_end: float  # every recorded time is before this (days since epoch)


def chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    """The generator of one chunk: independent of every other chunk and of the chunk size."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(chunk)]))


def new_people(model: Model, n: int, rng: np.random.Generator) -> State:
    """``n`` people at birth: births uniform over the span (at midnight), sex, race and ethnicity."""
    demo = model.config["demographics"]
    birth = np.floor(model.data_end - rng.random(n) * model.birth_span_days)
    male = rng.random(n) < demo["male"]
    probs = np.array([demo["race"][r] for r in cat.RACES], dtype=float)
    race = rng.choice(len(cat.RACES), size=n, p=probs / probs.sum())
    hisp = rng.random(n) < demo["hispanic"]
    return State.new(birth, male, race, hisp, model.data_end, track_outputs=True)


def simulate_chunk(model: Model, seed: int, chunk: int, n_subjects: int, first_subject_id: int) -> Chunk:
    """Simulate until ``n_subjects`` lives are in the cohort; subject ids are ``first_subject_id`` onwards."""
    rng = chunk_rng(seed, chunk)
    engine = Engine(model)
    batches: list[tuple[State, dict[str, dict[str, np.ndarray]], np.ndarray]] = []
    accepted_total = 0
    simulated = 0
    rate = 0.88  # first guess of the share of births alive on alive_from; refined after each batch
    enc_offset = 0
    while accepted_total < n_subjects:
        need = n_subjects - accepted_total
        size = math.ceil(need / rate * 1.03) + 16
        st = new_people(model, size, rng)
        sink = Sink()
        sink.n_enc = enc_offset
        engine.run(st, rng, sink=sink)
        enc_offset = sink.n_enc
        simulated += size
        ok = np.flatnonzero(st.death_t >= model.alive_from)[:need]
        rate = max(0.3, (np.count_nonzero(st.death_t >= model.alive_from)) / size)
        batches.append((st, sink.finish(), ok))
        accepted_total += ok.size
    return _assemble(model, chunk, batches, first_subject_id, simulated)


def _assemble(model: Model, chunk: int, batches: list, first_id: int, simulated: int) -> Chunk:
    """Keep the cohort's rows and events before the end of the data; map rows to subject ids.

    Column by column, dropping each batch's column once it is copied, so the chunk is never held twice.
    """
    end = model.data_end
    enc_base = np.int64(chunk) << ENC_BITS
    sids, next_id = [], first_id
    for st, _, ok in batches:
        sid = np.full(st.n, -1, dtype=np.int64)
        sid[ok] = np.arange(next_id, next_id + ok.size, dtype=np.int64)
        next_id += ok.size
        sids.append(sid)
    subj = {
        "subject_id": np.concatenate([sid[ok] for sid, (_, _, ok) in zip(sids, batches, strict=True)]),
        "birth": np.concatenate([st.birth[ok] for st, _, ok in batches]),
        "death": np.concatenate([np.where(st.death_t[ok] < end, st.death_t[ok], np.nan) for st, _, ok in batches]),
        "male": np.concatenate([st.male[ok] for st, _, ok in batches]),
        "race": np.concatenate([st.race[ok] for st, _, ok in batches]),
        "hisp": np.concatenate([st.hisp[ok] for st, _, ok in batches]),
    }

    def table(name: str, time_col: str, stop_cols: tuple[str, ...] = (), enc_cols: tuple[str, ...] = ()
              ) -> dict[str, np.ndarray]:
        cols = [k for k in batches[0][1][name] if k != "row"]
        keeps = []
        for sid, (_, out, _) in zip(sids, batches, strict=True):
            t = out[name]
            keeps.append((sid[t["row"]] >= 0) & (t[time_col] < end) if t["row"].size else np.zeros(0, bool))
        result = {"subject_id": np.concatenate(
            [sid[out[name]["row"][keep]] for sid, (_, out, _), keep in zip(sids, batches, keeps, strict=True)])}
        for k in cols:
            pieces = []
            for (_, out, _), keep in zip(batches, keeps, strict=True):
                v = out[name].pop(k)[keep] if keep.size else np.zeros(0)
                if k in stop_cols:
                    v = np.where(v < end, v, np.nan)  # still going at the end of the data: no stop yet
                if k in enc_cols:
                    v = v.astype(np.int64)
                    v = np.where(v >= 0, enc_base | v, -1)
                pieces.append(v)
            result[k] = np.concatenate(pieces)
            del pieces
        for _, out, _ in batches:
            out[name].pop("row", None)
        return result

    ev = table("events", "time", enc_cols=("enc",))
    enc = table("encounters", "start", stop_cols=("stop",), enc_cols=("enc",))
    icu = table("icu", "start", stop_cols=("stop",), enc_cols=("enc",))
    notes = table("notes", "time")
    return Chunk(chunk, subj, ev, enc, icu, notes, simulated, end)
