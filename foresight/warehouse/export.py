"""Writing the warehouse as a MEDS v0.4 dataset (``foresight export meds``)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from foresight.schema import EVENT_COLUMNS, MEDS_VERSION, meds_codes_schema, meds_data_schema, meds_splits_schema
from foresight.version import __version__


def export_meds(
    con: duckdb.DuckDBPyConnection,
    out: str | Path,
    *,
    dataset_name: str = "foresight",
    subjects_per_shard: int = 10_000,
) -> dict[str, Any]:
    """Write the warehouse as a MEDS v0.4 dataset.

    Layout: ``data/<i>.parquet`` (a subject lives in exactly one shard; rows sorted by subject_id, time with
    static events first), ``metadata/codes.parquet``, ``metadata/subject_splits.parquet`` and
    ``metadata/dataset.json``. Column types follow ``foresight.schema.MEDS_DATA_SCHEMA``.
    """
    import pyarrow.parquet as pq

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
    core = ", ".join(EVENT_COLUMNS[:5])
    data_schema = meds_data_schema()
    rows = 0
    for shard in range(n_shards):
        tbl = con.sql(
            f"""
            SELECT {core} FROM events JOIN export_shards s USING (subject_id)
            WHERE s.shard = ?
            ORDER BY subject_id, time NULLS FIRST, code
            """,
            params=[shard],
        ).to_arrow_table()
        tbl = tbl.cast(data_schema)
        pq.write_table(tbl, out / "data" / f"{shard}.parquet")
        rows += tbl.num_rows
    codes = con.sql(
        "SELECT code, description, parent_codes FROM codes WHERE code IN (SELECT DISTINCT code FROM events) "
        "ORDER BY code"
    ).to_arrow_table().cast(meds_codes_schema())
    pq.write_table(codes, out / "metadata" / "codes.parquet")
    splits = con.sql(
        "SELECT subject_id, split FROM subject_splits WHERE subject_id IN (SELECT subject_id FROM export_shards) "
        "ORDER BY subject_id"
    ).to_arrow_table().cast(meds_splits_schema())
    pq.write_table(splits, out / "metadata" / "subject_splits.parquet")
    con.execute("DROP TABLE export_shards")
    meta = {
        "dataset_name": dataset_name,
        "dataset_version": con.execute("SELECT coalesce(max(run_id), 'empty') FROM etl_runs").fetchall()[0][0],
        "etl_name": "foresight",
        "etl_version": __version__,
        "meds_version": MEDS_VERSION,
        "created_at": datetime.now().isoformat(timespec="seconds"),
    }
    (out / "metadata" / "dataset.json").write_text(json.dumps(meta, indent=2))
    return {"out": str(out), "shards": n_shards, "subjects": n_subjects, "events": rows, "codes": codes.num_rows}
