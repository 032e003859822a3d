"""Write simulated chunks as a MEDS dataset (what ``foresight export meds`` writes, plus a ``unit`` column)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from foresight.schema import MEDS_VERSION, meds_codes_schema, meds_data_schema, meds_splits_schema, split_of
from foresight.simulate import catalog as cat
from foresight.simulate.cohort import Chunk
from foresight.simulate.writers.common import seconds
from foresight.version import __version__

_CODES = np.array(cat.VOCAB.codes, dtype=object)
_CODE_RANK = np.argsort(np.argsort(np.array(cat.VOCAB.codes)))  # sort codes as strings, like export_meds
_UNITS = np.array([None] * len(cat.VOCAB.codes), dtype=object)
for _m in cat.MEASURES:
    _UNITS[cat.CODE_ID[f"M_{_m.key}"]] = _m.unit


def _dicts() -> tuple[Any, Any]:
    return pa.array(list(_CODES), pa.string()), pa.array(list(_UNITS), pa.string())


_CODE_DICT, _UNIT_DICT = _dicts()


def meds_data_schema_with_unit() -> Any:
    """The MEDS data schema plus the extra ``unit`` column (string, nullable)."""
    return meds_data_schema().append(pa.field("unit", pa.string()))



def meds_columns(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One chunk's MEDS rows as sorted numpy columns: subject_id, seconds (int64 min for static rows), code id,
    value. Static facts first, then by time, then by code (as ``foresight export meds`` sorts)."""
    s = chunk.subjects
    n = s["subject_id"].size
    sex = np.where(s["male"], cat.CODE_ID["GENDER_M"], cat.CODE_ID["GENDER_F"])
    race = np.array([cat.CODE_ID[f"RACE_{r}"] for r in cat.RACES])[s["race"].astype(np.int64)]
    eth = np.where(s["hisp"], cat.CODE_ID["ETH_HISPANIC"], cat.CODE_ID["ETH_NOT_HISPANIC"])
    e = chunk.events
    sid = np.concatenate([np.tile(s["subject_id"], 3), s["subject_id"], e["subject_id"]])
    sec = np.concatenate([np.full(3 * n, _STATIC_SEC), seconds(s["birth"]), seconds(e["time"])])
    code = np.concatenate([sex, race, eth, np.full(n, cat.CODE_ID["BIRTH"]), e["code"]]).astype(np.int32)
    value = np.concatenate([np.full(4 * n, np.nan, np.float32), e["value"].astype(np.float32)])
    order = np.lexsort((_CODE_RANK[code], sec, sid))
    return sid[order], sec[order], code[order], value[order]


_STATIC_SEC = np.iinfo(np.int64).min


def meds_table(sid: np.ndarray, sec: np.ndarray, code: np.ndarray, value: np.ndarray) -> Any:
    """Sorted MEDS columns (from :func:`meds_columns`, or a slice of them) as a pyarrow Table."""
    static = sec == _STATIC_SEC
    time = pa.array(np.where(static, 0, sec * 1_000_000), type=pa.int64()).cast(pa.timestamp("us"))
    time = pc.if_else(pa.array(static), pa.scalar(None, pa.timestamp("us")), time)
    codes = pa.DictionaryArray.from_arrays(pa.array(code), _CODE_DICT).cast(pa.string())
    units = pa.DictionaryArray.from_arrays(pa.array(code), _UNIT_DICT).cast(pa.string())
    return pa.Table.from_arrays(
        [pa.array(sid), time, codes, pa.array(value, from_pandas=True), pa.nulls(sid.size, pa.large_string()), units],
        schema=meds_data_schema_with_unit())


def write_meds_chunk(chunk: Chunk, out: Path, row_group: int = 1_000_000) -> int:
    """Write ``data/<chunk index>.parquet`` one row group at a time (only one group is ever held as Arrow
    strings); returns the number of rows."""
    sid, sec, code, value = meds_columns(chunk)
    (out / "data").mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(out / "data" / f"{chunk.index}.parquet", meds_data_schema_with_unit()) as writer:
        for i in range(0, max(sid.size, 1), row_group):
            sl = slice(i, i + row_group)
            writer.write_table(meds_table(sid[sl], sec[sl], code[sl], value[sl]))
    return int(sid.size)


def write_meds_metadata(out: Path, subject_ids: np.ndarray, meta: dict[str, Any]) -> None:
    """codes.parquet, subject_splits.parquet, dataset.json and simulator.json."""
    md = out / "metadata"
    md.mkdir(parents=True, exist_ok=True)
    rows = cat.VOCAB.metadata()
    codes = pa.table({"code": [r[0] for r in rows], "description": [r[1] for r in rows],
                      "parent_codes": [r[2] for r in rows]}).cast(meds_codes_schema())
    pq.write_table(codes, md / "codes.parquet")
    ids = np.sort(subject_ids)
    splits = pa.table({"subject_id": ids, "split": [split_of(int(i)) for i in ids]}).cast(meds_splits_schema())
    pq.write_table(splits, md / "subject_splits.parquet")
    dataset = {
        "dataset_name": "foresight-simulator",
        "dataset_version": f"seed{meta['seed']}-n{meta['subjects']}-v{meta['config']['simulator_version']}",
        "etl_name": "foresight.simulate",
        "etl_version": __version__,
        "meds_version": MEDS_VERSION,
    }
    (md / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    write_simulator_json(md, meta)


def write_simulator_json(folder: Path, meta: dict[str, Any]) -> None:
    """The configuration, seed and counts next to the data (what Oracle.from_dir reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    # Key order kept: the process order decides the random stream, so this config re-simulates the same data.
    (folder / "simulator.json").write_text(json.dumps(meta, indent=1) + "\n")

