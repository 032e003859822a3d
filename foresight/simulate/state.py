"""What a simulation run reads and writes: the :class:`State` of its rows, the :class:`Sink` that collects a
generation run's output, and what the oracle asks of a run (:class:`Task`, a :class:`Pending` stay).

The flag, encounter-class and note-kind codes below are the output columns' vocabulary; the writers read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from foresight.simulate import catalog as cat

# Sink flags: what a diagnosis row is, so the Synthea writer can tell conditions from discharge coding.
F_OTHER, F_DX_SECONDARY, F_DX_CHRONIC, F_DX_ACUTE, F_DX_PRINCIPAL, F_DX_EXTRA = range(6)
# Encounter classes; an encounter's ``reason`` is a cause (stays), a condition bit (diagnosis visits) or an acute
# problem (acute visits) index, -1 for routine visits.
E_ROUTINE, E_ACUTE, E_DIAGNOSIS, E_EMERGENCY, E_ELECTIVE = range(5)
# Note kinds.
N_ROUTINE, N_ACUTE, N_DIAGNOSIS, N_DISCHARGE = range(4)


@dataclass
class State:
    """Per-row state of a batch of lives; times are days since 1970-01-01."""

    birth: np.ndarray
    male: np.ndarray
    race: np.ndarray  # index into catalog.RACES
    hisp: np.ndarray
    cond: np.ndarray  # int64 bitmask of catalog.CONDITIONS
    n_adm: np.ndarray
    last_dis: np.ndarray  # -inf if never discharged
    t: np.ndarray
    t_end: np.ndarray
    alive: np.ndarray
    death_t: np.ndarray  # inf while alive
    onset: np.ndarray | None = None  # (n, N_BITS) onset time of each bit (NaN if absent); generation only
    rx: np.ndarray | None = None  # int64 bitmask of chronic drugs started; generation only

    @property
    def n(self) -> int:
        return self.birth.shape[0]

    @classmethod
    def new(cls, birth: np.ndarray, male: np.ndarray, race: np.ndarray, hisp: np.ndarray, t_end: np.ndarray | float,
            *, track_outputs: bool) -> State:
        """Fresh lives at birth."""
        n = birth.shape[0]
        return cls(
            birth=birth.astype(np.float64), male=male.astype(bool), race=race.astype(np.int8),
            hisp=hisp.astype(bool), cond=np.zeros(n, np.int64), n_adm=np.zeros(n, np.int32),
            last_dis=np.full(n, -np.inf), t=birth.astype(np.float64).copy(),
            t_end=np.broadcast_to(np.asarray(t_end, np.float64), (n,)).copy(), alive=np.ones(n, bool),
            death_t=np.full(n, np.inf),
            onset=np.full((n, cat.N_BITS), np.nan) if track_outputs else None,
            rx=np.zeros(n, np.int64) if track_outputs else None,
        )

    def take(self, idx: np.ndarray) -> State:
        """Rows ``idx`` as a new state (copies)."""
        return State(**{k: (v[idx].copy() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()})


def _col(v: np.ndarray | float, n: int, dtype: type) -> np.ndarray:
    """``v`` as an (n,) column of ``dtype``: arrays pass through (cast if needed), scalars are repeated."""
    if isinstance(v, np.ndarray) and v.ndim == 1:
        return v.astype(dtype, copy=False)
    return np.full(n, v, dtype=dtype)


@dataclass
class Sink:
    """Columns of everything a generation run emits (rows are State row numbers)."""

    ev: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in
                                                                     ("row", "time", "code", "value", "enc", "flag")})
    enc: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in
                                                                      ("row", "enc", "start", "stop", "klass",
                                                                       "reason")})
    icu: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in ("row", "enc", "start", "stop")})
    notes: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in
                                                                        ("row", "time", "kind", "reason", "cond",
                                                                         "age", "died")})
    n_enc: int = 0

    def new_enc(self, n: int) -> np.ndarray:
        ids = np.arange(self.n_enc, self.n_enc + n, dtype=np.int64)
        self.n_enc += n
        return ids

    def emit(self, rows: np.ndarray, times: np.ndarray, code: np.ndarray | int, enc: np.ndarray | int = -1,
             value: np.ndarray | float = np.nan, flag: int = F_OTHER) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        # Compact columns (a chunk holds millions of events): rows and encounters within a chunk fit int32.
        self.ev["row"].append(rows.astype(np.int32))
        self.ev["time"].append(_col(times, n, np.float64))
        self.ev["code"].append(_col(code, n, np.int16))
        self.ev["value"].append(_col(value, n, np.float32))
        self.ev["enc"].append(_col(enc, n, np.int32))
        self.ev["flag"].append(np.full(n, flag, np.int8))

    def encounter(self, rows: np.ndarray, enc: np.ndarray, start: np.ndarray, stop: np.ndarray,
                  klass: np.ndarray | int, reason: np.ndarray | int) -> None:
        n = rows.shape[0]
        for k, v, dt in (("row", rows, np.int64), ("enc", enc, np.int64), ("start", start, np.float64),
                         ("stop", stop, np.float64), ("klass", klass, np.int8), ("reason", reason, np.int32)):
            self.enc[k].append(_col(v, n, dt))

    def note(self, rows: np.ndarray, time: np.ndarray, kind: int, reason: np.ndarray | int, cond: np.ndarray,
             age: np.ndarray, died: np.ndarray | bool = False) -> None:
        n = rows.shape[0]
        for k, v, dt in (("row", rows, np.int64), ("time", time, np.float64), ("kind", kind, np.int8),
                         ("reason", reason, np.int32), ("cond", cond, np.int64), ("age", age, np.float64),
                         ("died", died, bool)):
            self.notes[k].append(_col(v, n, dt))

    @staticmethod
    def _cat(cols: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        out = {}
        for k in list(cols):
            parts = cols.pop(k)  # drop the pieces as each column is joined: never both in memory at once
            out[k] = np.concatenate(parts) if parts else np.empty(0)
            del parts
        return out

    def finish(self) -> dict[str, dict[str, np.ndarray]]:
        """Concatenated columns: {'events', 'encounters', 'icu', 'notes'} -> {column: array}."""
        return {"events": self._cat(self.ev), "encounters": self._cat(self.enc), "icu": self._cat(self.icu),
                "notes": self._cat(self.notes)}


@dataclass
class Task:
    """What the oracle asks: the part of each engine process that is the target event.

    ``frac[k]`` of process k's hazard is the target; it is removed from the simulated path and integrated.
    ``icu``: admissions on the path never go to ICU (their ICU part is in ``frac``). ``death``: every stay on the
    path survives and its in-hospital death probability (if the discharge falls before ``t_end``) is integrated.
    A stay in progress at the start carries its own integrated part in ``Pending.acc0``.
    """

    frac: np.ndarray
    icu: bool = False
    death: bool = False


@dataclass
class Pending:
    """A hospital stay in progress when the run starts (oracle: as_of falls inside a stay)."""

    rows: np.ndarray
    t_adm: np.ndarray
    cause: np.ndarray
    los: np.ndarray
    icu: np.ndarray  # goes to ICU on this path
    p_die: np.ndarray  # probability of dying at the end of the stay
    die: np.ndarray  # drawn with p_die
    acc0: np.ndarray | None = None  # target hazard already integrated over the stay's hidden course
