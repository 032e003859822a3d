"""An existing MEDS dataset (MEDS-Extract, MEDS-transforms, ACES, MEDS-DEV, ``foresight export meds``) -> the warehouse.

Input: the dataset root, with ``data/**/*.parquet`` (the events) and optionally ``metadata/codes.parquet``,
``metadata/subject_splits.parquet`` and ``metadata/dataset.json``. Events land in ``events`` as they are: subject
ids, times, codes and values are kept (codes are not renamed to Foresight's KIND//VOCAB//VALUE form), so a dataset
written by ``foresight export meds`` loads back identically. Splits come from ``subject_splits.parquet`` when it is
there (subjects it does not name, or names with a split other than train/tuning/held_out, get the stable hash
split); ``codes.parquet`` fills the ``codes`` table.

Schema: each shard's columns are checked against the ``meds`` package's own ``meds.DataSchema`` (its required
columns and types), accepting compatible types where its check finds a different one (integer ids of any width,
timestamps of any unit, float32/float64 or integer values, string or large_string text; a time zone is converted
to UTC). Extra columns are allowed, as MEDS allows them: a string ``unit`` column, which several MEDS ETLs add, is
kept in ``events.unit`` and a string ``encounter_id`` (``warehouse.export_meds(extra_columns=...)``) in
``events.encounter_id``; other extra columns are ignored (and reported). A folder that is not a MEDS dataset is
rejected naming the path.

Row checks (quarantined, with shard and row): missing subject_id or code, a numeric_value that is not finite or
does not fit float32, a time before the subject's MEDS_BIRTH. Times in the future are NOT checked: MEDS datasets
are often date-shifted (MIMIC-IV's times lie in the 22nd century).
"""

from __future__ import annotations

import json
from pathlib import Path

from foresight import sql
from foresight.schema import MEDS_VERSION, SPLITS
from foresight.sources.base import Group, combined_checksum
from foresight.warehouse import CsvScan, Load, SourceError, list_files, probe, readable_file

SOURCE_KIND = "meds"


GROUPS: tuple[Group, ...] = (Group("data", ("data",)),)

# Extra (non-MEDS) columns the warehouse keeps, besides the MEDS columns of meds.DataSchema.
KEPT_EXTRA_COLUMNS = ("unit", "encounter_id")


def shards(root: Path) -> list[Path]:
    """The data shards of a MEDS dataset, sorted; a shard that is there but unreadable (a broken or looping link, a
    folder that cannot be listed) is ``SourceError`` naming it, never skipped."""
    return list_files(root / "data", (".parquet",))


def check_input(path: Path) -> Path:
    """``path`` if it is a MEDS dataset root (``data/**/*.parquet``), else ``SourceError`` naming the path."""
    path = Path(path)
    if probe(path) != "dir":  # probe: a broken or looping link is SourceError naming it
        raise SourceError(f"{path}: not a folder (expected a MEDS dataset root with data/*.parquet)")
    if not shards(path):
        raise SourceError(f"{path}: not a MEDS dataset: no data/**/*.parquet files under {path / 'data'} "
                          "(a MEDS dataset has data/*.parquet and metadata/codes.parquet)")
    return path


def _kind(t: object) -> str:
    """A pyarrow type's family: int, uint, float, timestamp, string, null or other."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    for name, test in (("int", pa.types.is_signed_integer), ("uint", pa.types.is_unsigned_integer),
                       ("float", pa.types.is_floating), ("timestamp", pa.types.is_timestamp),
                       ("string", lambda x: pa.types.is_string(x) or pa.types.is_large_string(x)),
                       ("null", pa.types.is_null)):
        if test(t):
            return name
    return "other"


# The type families accepted where meds.DataSchema's check finds another type than its own (which the staging
# SQL then casts to); anything else is a schema error naming the file.
ACCEPTED = {
    "subject_id": {"int", "uint", "null"},
    "time": {"timestamp", "null"},
    "code": {"string", "null"},
    "numeric_value": {"float", "int", "uint", "null"},
    "text_value": {"string", "null"},
    "unit": {"string", "null"},  # not MEDS core, but written by MEDS ETLs (and the simulator): kept in events.unit
    "encounter_id": {"string", "int", "null"},  # not MEDS core: Foresight's export with extra_columns
}


def validate_schema(path: Path) -> tuple[list[str], bool]:
    """Check one shard's schema against ``meds.DataSchema``; return (extra columns ignored, whether its time
    carries a time zone)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from flexible_schema import SchemaValidationError
    from meds import DataSchema

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{path}: not a readable parquet file: {exc}") from exc
    mistyped: list[tuple[str, object, object]] = []
    try:
        DataSchema.validate(schema)
    except SchemaValidationError as exc:
        if exc.missing_req_cols:
            raise SourceError(f"{path}: not MEDS data: missing required column(s) {exc.missing_req_cols}; it has "
                              f"{schema.names}") from exc
        mistyped = list(exc.mistyped_cols or [])
    mistyped += [(c, "string", schema.field(c).type) for c in KEPT_EXTRA_COLUMNS if c in schema.names]
    for col, want, got in mistyped:
        if got == pa.uint64() or _kind(got) not in ACCEPTED[col]:
            raise SourceError(f"{path}: column {col} has type {got}, not compatible with MEDS ({want} in "
                              f"meds.DataSchema; accepted: {sorted(ACCEPTED[col] - {'null'})})")
    time_type = schema.field("time").type
    known = {*DataSchema.columns(), *KEPT_EXTRA_COLUMNS}
    return [c for c in schema.names if c not in known], bool(getattr(time_type, "tz", None))


def _digest(load: Load, files: list[Path]) -> str:
    return combined_checksum((load.relpath(p), load.checksum(p)) for p in files)


def stage_group(load: Load, root: Path, group: Group) -> list[str]:
    """Validate every shard's schema, then stage, check and account for all events in one DuckDB scan."""
    files = shards(root)
    extras: set[str] = set()
    tz = set()
    for p in files:
        extra, has_tz = validate_schema(p)
        extras.update(extra)
        tz.add(has_tz)
    if len(tz) > 1:
        raise SourceError(f"{root / 'data'}: some shards have a time zone on `time` and some do not")
    if extras:
        load.warnings.append(f"data: ignored non-MEDS column(s) {sorted(extras)}")
    present = set()
    import pyarrow.parquet as pq

    for p in files:
        present.update(pq.read_schema(p).names)
    cols = {c: c if c in present else "NULL" for c in ("numeric_value", "text_value", *KEPT_EXTRA_COLUMNS)}
    time_expr = "timezone('UTC', time)" if tz == {True} else "time::TIMESTAMP"
    # The column expressions are fixed strings chosen above (never input text); the file list is bound.
    load.con.execute(
        f"""
        CREATE OR REPLACE TABLE fs_stage.raw_data AS
        SELECT row_number() OVER () AS _line, substr(filename, length($root) + 2) AS _source_file,
               file_row_number + 1 AS _source_row, subject_id::BIGINT AS subject_id, {time_expr} AS time,
               code::VARCHAR AS code, {cols['numeric_value']}::DOUBLE AS numeric_value,
               {cols['text_value']}::VARCHAR AS text_value, {cols['unit']}::VARCHAR AS unit,
               {cols['encounter_id']}::VARCHAR AS encounter_id
        FROM read_parquet($files, filename = true, file_row_number = true, union_by_name = true)
        """,
        {"files": [str(p) for p in files], "root": str(root)},
    )
    rows = load.con.execute("SELECT count(*) FROM fs_stage.raw_data").fetchall()[0][0]
    load.register_scan(CsvScan("data", "data/*.parquet", "", rows, [], []))
    load.tables["data"].sha256 = _digest(load, files)  # each shard's own checksum is in input_checksums
    load.execute_script(sql.load("meds", "data"))
    load.finish_table("data")
    others = load.con.execute(
        "SELECT count(DISTINCT subject_id) FROM events WHERE source <> $source AND subject_id IN "
        "(SELECT subject_id FROM v_data WHERE _quarantine IS NULL)", {"source": load.source}
    ).fetchall()[0][0]
    if others:
        load.warnings.append(f"{others} subject id(s) of this dataset already have events from another source")
    load.drop_staging(["data"])
    return ["data"]


def stage_codes(load: Load, root: Path) -> None:
    """``metadata/codes.parquet`` -> codes; ``metadata/subject_splits.parquet`` -> splits; check dataset.json."""
    import pyarrow.parquet as pq

    meta = root / "metadata"
    codes = meta / "codes.parquet"
    if readable_file(codes):
        load.checksum(codes)
        names = set(pq.read_schema(codes).names)
        if "code" not in names:
            raise SourceError(f"{codes}: not a MEDS codes table: no `code` column; it has {sorted(names)}")
        description = "description::VARCHAR" if "description" in names else "NULL::VARCHAR"
        parents = "coalesce(parent_codes::VARCHAR[], [])" if "parent_codes" in names else "[]::VARCHAR[]"
        load.add_codes(
            f"SELECT code::VARCHAR, {description}, {parents} FROM read_parquet($path) WHERE code IS NOT NULL",
            {"path": str(codes)}, priority=1,
        )
    else:
        load.warnings.append("metadata/codes.parquet missing: codes have no description")
    splits = meta / "subject_splits.parquet"
    if readable_file(splits):
        load.checksum(splits)
        names = set(pq.read_schema(splits).names)
        if not {"subject_id", "split"} <= names:
            raise SourceError(f"{splits}: not a MEDS splits table: needs subject_id and split; it has {sorted(names)}")
        other = load.con.execute(
            "SELECT split, count(*) FROM read_parquet($path) WHERE NOT coalesce(list_contains($splits, split), false) "
            "GROUP BY 1",
            {"path": str(splits), "splits": list(SPLITS)},
        ).fetchall()
        if other:
            load.warnings.append(f"subject_splits: split names other than {list(SPLITS)} ({dict(other)}): "
                                 "those subjects get the stable hash split")
        load.stage_splits(
            "SELECT subject_id::BIGINT, split FROM read_parquet($path) WHERE list_contains($splits, split)",
            {"path": str(splits), "splits": list(SPLITS)},
        )
        clash = load.con.execute(
            "SELECT count(*) FROM read_parquet($path) p JOIN subject_splits s ON s.subject_id = p.subject_id "
            "WHERE s.split <> p.split", {"path": str(splits)}
        ).fetchall()[0][0]
        if clash:
            load.warnings.append(f"subject_splits: {clash} subject(s) already have another split in the warehouse; "
                                 "kept (splits never change once assigned)")
    info = meta / "dataset.json"
    if readable_file(info):
        try:
            version = str(json.loads(info.read_text()).get("meds_version", ""))
        except (OSError, ValueError) as exc:
            load.warnings.append(f"metadata/dataset.json unreadable ({exc})")
        else:
            if version and version.split(".")[:2] != MEDS_VERSION.split(".")[:2]:
                load.warnings.append(f"dataset is MEDS {version}; Foresight reads MEDS {MEDS_VERSION}")
