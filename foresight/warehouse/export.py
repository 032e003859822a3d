"""Writing the warehouse as a MEDS dataset (``foresight export meds``), checked with the ``meds`` package's schemas.

Every table written is aligned to and validated by the ``meds`` package's own schema (``meds.DataSchema``,
``meds.CodeMetadataSchema``, ``meds.SubjectSplitSchema``, ``meds.DatasetMetadataSchema``), so what ACES, MEDS-DEV
or any MEDS reader opens is MEDS by MEDS's definition, not by a copy of it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from foresight.schema import CORE_COLUMNS, EXTRA_COLUMNS, MEDS_VERSION
from foresight.version import __version__

# Where each of Foresight's extra columns is declared in metadata/dataset.json (MEDS's extension lists).
EXTRA_COLUMN_ROLES = {
    "unit": "code_modifier_columns",
    "encounter_id": "raw_source_id_columns",
    "source": "other_extension_columns",
    "source_table": "other_extension_columns",
    "load_id": "other_extension_columns",
}


def export_meds(
    con: duckdb.DuckDBPyConnection,
    out: str | Path,
    *,
    dataset_name: str = "foresight",
    subjects_per_shard: int = 10_000,
    extra_columns: Sequence[str] = (),
) -> dict[str, Any]:
    """Write the warehouse as a MEDS dataset (the ``meds`` package's version, :data:`foresight.schema.MEDS_VERSION`).

    Layout: ``data/<i>.parquet`` (a subject lives in exactly one shard; rows sorted by subject_id, time with
    static events first), ``metadata/codes.parquet``, ``metadata/subject_splits.parquet`` and
    ``metadata/dataset.json``. ``extra_columns`` (any of :data:`foresight.schema.EXTRA_COLUMNS`, e.g. ``unit``,
    ``encounter_id``) are written after the MEDS columns as strings and declared in dataset.json.
    """
    import pyarrow.parquet as pq
    from meds import CodeMetadataSchema, DatasetMetadataSchema, SubjectSplitSchema

    extras = list(dict.fromkeys(extra_columns))
    unknown = [c for c in extras if c not in EXTRA_COLUMNS]
    if unknown:
        raise ValueError(f"unknown extra column(s) {unknown}: choose from {', '.join(EXTRA_COLUMNS)}")
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    for old in (out / "data").glob("*.parquet"):
        old.unlink()
    n_subjects = con.execute("SELECT count(DISTINCT subject_id) FROM events").fetchall()[0][0]
    n_shards = max(1, -(-n_subjects // subjects_per_shard))
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE export_shards AS
        SELECT subject_id, (row_number() OVER (ORDER BY subject_id) - 1) // ? AS shard
        FROM (SELECT DISTINCT subject_id FROM events)
        """,
        [subjects_per_shard],
    )
    rows = sum(_write_shard(con, out / "data" / f"{shard}.parquet", shard, extras) for shard in range(n_shards))
    codes = _meds_table(CodeMetadataSchema, con.sql(
        "SELECT code, description, parent_codes FROM codes WHERE code IN (SELECT DISTINCT code FROM events) "
        "ORDER BY code").to_arrow_table())
    pq.write_table(codes, out / "metadata" / "codes.parquet")
    splits = _meds_table(SubjectSplitSchema, con.sql(
        "SELECT subject_id, split FROM subject_splits WHERE subject_id IN (SELECT subject_id FROM export_shards) "
        "ORDER BY subject_id").to_arrow_table())
    pq.write_table(splits, out / "metadata" / "subject_splits.parquet")
    con.execute("DROP TABLE export_shards")
    meta: dict[str, Any] = {
        "dataset_name": dataset_name,
        "dataset_version": con.execute("SELECT coalesce(max(run_id), 'empty') FROM etl_runs").fetchall()[0][0],
        "etl_name": "foresight",
        "etl_version": __version__,
        "meds_version": MEDS_VERSION,
        "created_at": datetime.now().isoformat(timespec="seconds"),
    }
    for col in extras:
        meta.setdefault(EXTRA_COLUMN_ROLES[col], []).append(col)
    DatasetMetadataSchema.validate(meta)
    (out / "metadata" / "dataset.json").write_text(json.dumps(meta, indent=2))
    return {"out": str(out), "shards": n_shards, "subjects": n_subjects, "events": rows, "codes": codes.num_rows,
            "extra_columns": extras}


def _write_shard(con: duckdb.DuckDBPyConnection, path: Path, shard: int, extras: Sequence[str]) -> int:
    """One data shard, aligned to and validated by ``meds.DataSchema``; returns its row count."""
    import pyarrow.parquet as pq
    from meds import DataSchema

    cols = ", ".join([*CORE_COLUMNS, *(f"{c}::VARCHAR AS {c}" for c in extras)])  # names from EXTRA_COLUMNS only
    tbl = con.sql(
        f"""
        SELECT {cols} FROM events JOIN export_shards s USING (subject_id)
        WHERE s.shard = ?
        ORDER BY subject_id, time NULLS FIRST, code
        """,
        params=[shard],
    ).to_arrow_table()
    tbl = _meds_table(DataSchema, tbl)
    pq.write_table(tbl, path)
    return tbl.num_rows


def _meds_table(schema: Any, table: Any) -> Any:
    """``table`` cast to a ``meds`` schema's types and validated by it (types, required columns, nulls)."""
    table = schema.align(table)
    schema.validate(table)
    return table
