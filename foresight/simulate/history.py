"""A recorded history read for the oracle, and the simulator's state rebuilt from it at any as-of time.

Every hazard depends only on what the record shows, so :func:`snapshot` rebuilds the exact state of a
(subject, as_of) pair from the history's rows at or before ``as_of``: age, sex, race, ethnicity, the conditions
evidenced so far, prior admissions, the last discharge, and a stay in progress with its admission labs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foresight.schema import BIRTH_CODE, DEATH_CODE
from foresight.simulate import catalog as cat
from foresight.simulate.model import Model

US_PER_DAY = 86_400_000_000

# Row kinds of a history, for the rebuild.
K_OTHER, K_BIRTH, K_DEATH, K_ADMIT_EM, K_ADMIT_EL, K_DISCHARGE, K_ICU, K_MALE, K_FEMALE, K_HISP, K_LAB = range(11)
K_RACE0 = 16  # K_RACE0 + race index


@dataclass
class Snapshot:
    """The state of each (subject, as_of) pair, rebuilt from the history."""

    subject_id: np.ndarray
    t: np.ndarray  # as_of, days since epoch
    valid: np.ndarray  # born, alive and known at as_of
    birth: np.ndarray
    male: np.ndarray
    race: np.ndarray
    hisp: np.ndarray
    cond: np.ndarray
    n_adm: np.ndarray
    last_dis: np.ndarray
    in_stay: np.ndarray
    t_adm: np.ndarray
    adm_elective: np.ndarray
    icu_seen: np.ndarray
    lab_pair: np.ndarray  # admission-lab observations of the current stay: pair index, lab number, value
    lab_j: np.ndarray
    lab_value: np.ndarray



@dataclass
class History:
    """A MEDS event history as sorted columns: by subject, then time (static rows first)."""

    subject_id: np.ndarray
    time: np.ndarray  # days since epoch, NaN for static rows
    kind: np.ndarray  # K_* row kinds
    bits: np.ndarray  # condition bits the row's code evidences
    lab: np.ndarray  # admission-lab number (-1 if none)
    value: np.ndarray
    key: np.ndarray  # (subject rank << 34) | seconds since the earliest time: one sortable int64 per row
    subjects: np.ndarray  # unique subject ids (sorted)
    t0: float  # days of key second 0


def read_history(source: Any, model: Model) -> History:
    """Read events from a pyarrow Table, a pandas DataFrame, a dict of columns or a MEDS folder (data/*.parquet).

    Needs ``subject_id``, ``time``, ``code`` and ``numeric_value``, with the simulator's MEDS codes: its MEDS
    output, or the warehouse ``events`` after ``foresight etl meds`` of it (a Synthea-format copy uses other
    vocabularies and ids, so simulate with ``--format meds`` too when the oracle is needed).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(source, str | Path):
        import pyarrow.dataset as ds

        data = Path(source) / "data" if (Path(source) / "data").is_dir() else Path(source)
        table = ds.dataset(str(data), format="parquet").to_table(
            columns=["subject_id", "time", "code", "numeric_value"])
    elif isinstance(source, pa.Table):
        table = source
    elif isinstance(source, dict):
        table = pa.table({k: source[k] for k in ("subject_id", "time", "code", "numeric_value")})
    else:  # pandas or anything with the pyarrow interchange
        table = pa.Table.from_pandas(source[["subject_id", "time", "code", "numeric_value"]], preserve_index=False)
    missing = {"subject_id", "time", "code", "numeric_value"} - set(table.column_names)
    if missing:
        raise ValueError(f"history is missing column(s) {sorted(missing)}")
    sid = table["subject_id"].to_numpy().astype(np.int64)
    tcol = table["time"]
    if not pa.types.is_timestamp(tcol.type):
        tcol = pc.cast(tcol, pa.timestamp("us"))
    us = pc.cast(pc.cast(tcol, pa.timestamp("us")), pa.int64()).to_numpy(zero_copy_only=False)
    time = np.where(pc.is_null(tcol).to_numpy(zero_copy_only=False), np.nan, us.astype(np.float64) / US_PER_DAY)
    enc = pc.dictionary_encode(table["code"]).combine_chunks()
    idx = enc.indices.to_numpy(zero_copy_only=False)
    dictionary = enc.dictionary.to_pylist()
    value = pc.cast(table["numeric_value"], pa.float64()).to_numpy(zero_copy_only=False)
    value = np.where(np.isnan(value), np.nan, value)

    kinds, bits, labs = _code_tables(dictionary, model)
    kind, bit, lab = kinds[idx], bits[idx], labs[idx]
    subjects, rank = np.unique(sid, return_inverse=True)
    finite = np.isfinite(time)
    t0 = float(np.floor(time[finite].min())) - 1.0 if finite.any() else 0.0
    sec = np.where(finite, np.round((time - t0) * 86_400.0), 0).astype(np.int64)
    key = (rank.astype(np.int64) << 34) | sec
    order = np.argsort(key, kind="stable")
    return History(sid[order], time[order], kind[order], bit[order], lab[order], value[order], key[order],
                   subjects, t0)


def _code_tables(dictionary: list[str], model: Model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lab_of = {cat.VOCAB.codes[c]: j for j, c in enumerate(model.lab_ids)}
    special = {BIRTH_CODE: K_BIRTH, DEATH_CODE: K_DEATH, "ADMIT//EMERGENCY": K_ADMIT_EM,
               "ADMIT//ELECTIVE": K_ADMIT_EL, "ICU//ADMIT": K_ICU, "GENDER//M": K_MALE, "GENDER//F": K_FEMALE,
               "ETHNICITY//HISPANIC": K_HISP, **{f"RACE//{r}": K_RACE0 + i for i, r in enumerate(cat.RACES)}}
    kinds = np.zeros(len(dictionary), np.int8)
    bits = np.zeros(len(dictionary), np.int64)
    labs = np.full(len(dictionary), -1, np.int8)
    for i, code in enumerate(dictionary):
        if code is None:
            continue
        if code in special:
            kinds[i] = special[code]
        elif code.startswith("DISCHARGE//"):
            kinds[i] = K_DISCHARGE
        elif code in lab_of:
            kinds[i] = K_LAB
            labs[i] = lab_of[code]
        bits[i] = cat.BIT_EVIDENCE.get(code, 0)
    return kinds, bits, labs


def _key(h: History, subject_rank: np.ndarray, t: np.ndarray) -> np.ndarray:
    sec = np.round((t - h.t0) * 86_400.0).astype(np.int64)
    return (subject_rank.astype(np.int64) << 34) | np.maximum(sec, 0)


def _last_index(h: History, mask: np.ndarray) -> np.ndarray:
    """For each row, the index of the latest row at or before it with ``mask`` set (-1 if none)."""
    return np.maximum.accumulate(np.where(mask, np.arange(mask.size), -1))


def snapshot(h: History, model: Model, subject_ids: np.ndarray, as_of_days: np.ndarray) -> Snapshot:
    """Rebuild the state of each (subject, as_of) from the rows at or before ``as_of``."""
    rank = np.searchsorted(h.subjects, subject_ids)
    known = (rank < h.subjects.size) & (h.subjects[np.minimum(rank, h.subjects.size - 1)] == subject_ids)
    rank = np.where(known, rank, 0)
    n_subj = h.subjects.size
    row_rank = np.searchsorted(h.subjects, h.subject_id)
    lo = np.searchsorted(h.key, rank.astype(np.int64) << 34)
    hi = np.searchsorted(h.key, _key(h, rank, as_of_days), side="right")  # rows [lo, hi) are known at as_of

    # Static facts per subject (birth: the earliest MEDS_BIRTH; flags: any row saying so).
    birth_s = np.full(n_subj, np.inf)
    mask = h.kind == K_BIRTH
    np.minimum.at(birth_s, row_rank[mask], h.time[mask])
    birth = birth_s[rank]
    male = np.isin(rank, row_rank[h.kind == K_MALE])
    hisp = np.isin(rank, row_rank[h.kind == K_HISP])
    race_s = np.zeros(n_subj, np.int8)
    mask = h.kind >= K_RACE0
    race_s[row_rank[mask]] = h.kind[mask] - K_RACE0
    race = race_s[rank]

    # Conditions: a bit is on from the first row that evidences it.
    first = np.full((n_subj, cat.N_BITS), np.inf)
    r = np.flatnonzero(h.bits)
    for b in range(cat.N_BITS):
        rb = r[((h.bits[r] >> b) & 1).astype(bool)]
        np.minimum.at(first[:, b], row_rank[rb], h.time[rb])
    cond = ((first[rank] <= as_of_days[:, None]) << np.arange(cat.N_BITS)).sum(1).astype(np.int64)

    is_admit = (h.kind == K_ADMIT_EM) | (h.kind == K_ADMIT_EL)
    cum_admit = np.concatenate([[0], np.cumsum(is_admit)])
    n_adm = (cum_admit[hi] - cum_admit[lo]).astype(np.int32)
    last = hi - 1

    def latest(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        li = _last_index(h, mask)
        idx = np.where(last >= lo, li[np.maximum(last, 0)], -1)
        ok = idx >= lo
        return np.where(ok, idx, -1), ok

    adm_i, has_adm = latest(is_admit)
    dis_i, has_dis = latest(h.kind == K_DISCHARGE)
    _, has_dth = latest(h.kind == K_DEATH)
    icu_i, has_icu = latest(h.kind == K_ICU)
    t_adm = np.where(has_adm, h.time[adm_i], -np.inf)
    last_dis = np.where(has_dis, h.time[dis_i], -np.inf)
    in_stay = has_adm & (t_adm > last_dis)
    icu_seen = in_stay & has_icu & (np.where(has_icu, h.time[icu_i], -np.inf) >= t_adm)
    valid = known & np.isfinite(birth) & (birth <= as_of_days) & ~has_dth

    # Admission labs of the current stay: rows in [admission row, hi).
    sp = np.flatnonzero(in_stay & valid)
    start = adm_i[sp]
    cnt = hi[sp] - start
    pair = np.repeat(sp, cnt)
    rows = np.repeat(start - np.concatenate([[0], np.cumsum(cnt)[:-1]]), cnt) + np.arange(cnt.sum())
    is_lab = h.lab[rows] >= 0
    return Snapshot(
        subject_id=subject_ids, t=as_of_days, valid=valid, birth=birth, male=male, race=race, hisp=hisp,
        cond=cond, n_adm=n_adm, last_dis=last_dis, in_stay=in_stay & valid, t_adm=t_adm,
        adm_elective=has_adm & (h.kind[np.maximum(adm_i, 0)] == K_ADMIT_EL), icu_seen=icu_seen,
        lab_pair=pair[is_lab], lab_j=h.lab[rows[is_lab]].astype(np.int64), lab_value=h.value[rows[is_lab]],
    )

