"""FHIR R4 Bundles (one JSON file per patient, ``.json`` or ``.json.gz``) -> MEDS events in the warehouse.

Input: a folder of Bundle files (or an export root with a ``fhir/`` folder); ``.ndjson`` files of bare resources
(FHIR bulk export) are read too. DuckDB's JSON reader streams the files and unnests ``Bundle.entry[].resource``
(``foresight/sql/fhir/bundles.sql``); each resource type is then one staged table, validated and turned into
events by SQL (``foresight/sql/fhir/*.sql``, macros shared with the Synthea CSV source in
``foresight/sql/common/ehr_macros.sql``). Python only lists files, sequences groups and does the accounting.

Coverage: Patient (gender, US Core race/ethnicity, birth, death), Encounter, Condition, MedicationRequest (with
``medicationReference`` resolved through the bundle's Medication resources), Procedure, Observation (valueQuantity,
valueCodeableConcept, valueString and components), Immunization, AllergyIntolerance, CarePlan, ImagingStudy,
DiagnosticReport, and DocumentReference, whose decoded text goes to the warehouse table ``notes`` (for the notes
source) rather than to events. Every other resource type (Claim, ExplanationOfBenefit, Provenance, Organization,
Practitioner, Device, ...) is counted and dropped with the reason "resource type not loaded".

Accounting: every Bundle entry is one row of exactly one table. A file that is not JSON (or not UTF-8, or empty,
or a Bundle larger than ``$FORESIGHT_FHIR_MAX_BUNDLE_MB``, default 64) cannot be split into entries: it is one
quarantined row of the table ``bundle_files``, named by its path, and the other files load normally. Files are
scanned ``FILES_PER_SCAN`` at a time; only a scan that fails is repeated file by file to find the bad one.

Times are UTC (offsets applied). Leak-free rules: a Condition, AllergyIntolerance or CarePlan recorded in an
encounter is known at the encounter's end (inpatient: discharge) or at its own recorded time if later; an
Observation or DiagnosticReport when issued; a Procedure when performed to its end; a note when its encounter
is over. Resource ids are matched case-insensitively; references may be ``urn:uuid:<id>``, ``Type/<id>`` or
absolute URLs (conditional references do not resolve: "unknown Patient").
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import duckdb

from foresight import sql
from foresight.sources.base import (
    Group,
    code_sections,
    combined_checksum,
    finish_group,
    install_ehr_macros,
)
from foresight.warehouse import CsvScan, Load, SourceError, list_files, probe, sql_literal

SOURCE_KIND = "fhir"

# resource type -> staged table (loaded resource types only; the rest go to `other_resources`)
RESOURCE_TABLES: dict[str, str] = {
    "Patient": "patient",
    "Encounter": "encounter",
    "Condition": "condition",
    "MedicationRequest": "medication_request",
    "Procedure": "procedure",
    "Immunization": "immunization",
    "AllergyIntolerance": "allergy_intolerance",
    "CarePlan": "care_plan",
    "ImagingStudy": "imaging_study",
    "DiagnosticReport": "diagnostic_report",
    "Observation": "observation",
    "DocumentReference": "document_reference",
}
TABLE_TYPES = {table: rtype for rtype, table in RESOURCE_TABLES.items()}
KEEP = [*RESOURCE_TABLES, "Medication"]  # resource types whose JSON is kept (Medication: looked up)
SUFFIXES = (".json", ".json.gz", ".ndjson", ".ndjson.gz")
FILES_PER_SCAN = 1000  # files per DuckDB scan: parallel within a scan, and a bad file only costs its chunk a rescan


GROUPS: tuple[Group, ...] = (
    Group("bundles", ("bundle_files", "other_resources")),
    Group("core", ("patient", "encounter")),
    Group("clinical", ("condition", "medication_request", "procedure", "immunization", "allergy_intolerance",
                       "care_plan", "imaging_study", "diagnostic_report")),
    Group("observations", ("observation",)),
    Group("notes", ("document_reference",)),
)


def bundle_files(root: Path) -> list[Path]:
    """The JSON files under ``root``, sorted (the order the load reads and numbers them); a bundle that is there
    but unreadable (a broken or looping link, a folder that cannot be listed) is ``SourceError`` naming it, never
    skipped: its patient's rows from an earlier load would be deleted."""
    return list_files(root, SUFFIXES)


def check_input(path: Path) -> Path:
    """The folder of bundles under ``path`` (``path`` itself, or ``path/fhir`` for an export root);
    ``SourceError`` naming the path when it holds no JSON files."""
    path = Path(path)
    if probe(path) != "dir":  # probe: a broken or looping link is SourceError naming it
        raise SourceError(f"{path}: not a folder (expected a folder of FHIR R4 Bundle files, *.json or *.json.gz)")
    root = path / "fhir" if probe(path / "fhir") == "dir" else path
    if not bundle_files(root):
        raise SourceError(f"{root}: no FHIR Bundle files (*.json, *.json.gz, *.ndjson) in this folder")
    return root


def _head(path: Path, n: int = 300) -> str:
    """The first characters of an unreadable file, for the quarantine's raw column."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            return fh.read(n).decode("utf-8", errors="replace")
    except (OSError, EOFError) as exc:
        return f"(unreadable: {exc})"


def _max_line(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute("SELECT coalesce(max(_line), 0) FROM fs_stage.fhir_entries").fetchall()[0][0]


def _read_bundles(load: Load, root: Path, files: list[Path]) -> list[tuple[str, str, str]]:
    """Stream every file into ``fs_stage.fhir_entries``; return (file, reason, head) for each one that is not
    readable JSON. A chunk of files is read in one scan; only a chunk that fails is re-read file by file."""
    con = load.con
    con.execute(
        """CREATE OR REPLACE TABLE fs_stage.fhir_entries (_line BIGINT, _source_file VARCHAR, _source_row BIGINT,
                                                          resource_type VARCHAR, marker VARCHAR, resource JSON,
                                                          full_url VARCHAR)"""
    )
    sections = {name: text.strip().rstrip(";") for name, text in sql.sections("fhir", "bundles").items()}
    max_bytes = int(float(os.environ.get("FORESIGHT_FHIR_MAX_BUNDLE_MB", "64")) * (1 << 20))
    bad: list[tuple[str, str, str]] = []
    for kind in ("bundles", "ndjson"):
        kind_files = [p for p in files if (".ndjson" in p.name) == (kind == "ndjson")]
        for start in range(0, len(kind_files), FILES_PER_SCAN):
            chunk = kind_files[start:start + FILES_PER_SCAN]
            try:
                con.execute(sections[kind], {"files": [str(p) for p in chunk], "root": str(root),
                                             "max_bytes": max_bytes, "offset": _max_line(con), "keep": KEEP})
            except duckdb.Error:
                for p in chunk:
                    try:
                        con.execute(sections[kind], {"files": [str(p)], "root": str(root), "max_bytes": max_bytes,
                                                     "offset": _max_line(con), "keep": KEEP})
                    except duckdb.Error as exc:
                        rel = load.relpath(p)
                        why = str(exc).replace(str(p), rel).strip().splitlines()[0]
                        if "maximum_object_size" in why:
                            why += " (raise FORESIGHT_FHIR_MAX_BUNDLE_MB)"
                        bad.append((rel, f"not a readable FHIR JSON file: {why}", _head(p)))
    # A file with no JSON value at all (empty, whitespace) reads as zero rows without an error: find it.
    read = {r[0] for r in con.execute("SELECT DISTINCT _source_file FROM fs_stage.fhir_entries").fetchall()}
    failed = {b[0] for b in bad}
    for p in files:
        rel = load.relpath(p)
        if rel not in read and rel not in failed:
            bad.append((rel, "empty file: no JSON value", _head(p)))
    return bad


def _digest(load: Load) -> str:
    """One checksum for tables read from all bundles: sha256 over the sorted per-file checksums."""
    return combined_checksum(sorted(load.checksums.items()))


def _register(load: Load, table: str, file: str) -> None:
    """Account for a staged resource table; its lineage checksum covers all bundles (each file's own checksum is
    in the run's input_checksums)."""
    rows = load.con.execute(f"SELECT count(*) FROM fs_stage.raw_{table}").fetchall()[0][0]
    load.register_scan(CsvScan(table, file, "", rows, [], []))
    load.tables[table].sha256 = _digest(load)


def _stage_bundles(load: Load, root: Path) -> None:
    """Read the files and split the entries into one raw table per resource type (+ other_resources)."""
    con = load.con
    files = bundle_files(root)
    for p in files:
        load.checksum(p)
    bad = _read_bundles(load, root, files)

    # One view per resource type over the entries (a copy per type would double the memory of a big load).
    # Resource types are fixed names from RESOURCE_TABLES, quoted as SQL literals (a view cannot bind parameters).
    for rtype, table in RESOURCE_TABLES.items():
        con.execute(
            f"""CREATE OR REPLACE VIEW fs_stage.raw_{table} AS
                SELECT _line, _source_file, _source_row, resource FROM fs_stage.fhir_entries
                WHERE marker IS NULL AND resource_type = {sql_literal(rtype)}"""
        )
    # Medication resources are only looked up (by MedicationRequest.medicationReference), by id and by fullUrl.
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE fhir_medications AS
        SELECT DISTINCT ON (mid) mid, c FROM (
            SELECT lower(trim(resource->>'id')) AS mid, fhir_best(resource->'code') AS c, _line
            FROM fs_stage.fhir_entries WHERE resource_type = 'Medication'
            UNION ALL
            SELECT fhir_ref_id(full_url), fhir_best(resource->'code'), _line FROM fs_stage.fhir_entries
            WHERE resource_type = 'Medication' AND full_url IS NOT NULL
        ) WHERE mid IS NOT NULL AND c IS NOT NULL ORDER BY mid, _line
        """
    )
    types = ", ".join(sql_literal(t) for t in RESOURCE_TABLES)
    con.execute(
        f"""
        CREATE OR REPLACE VIEW fs_stage.raw_other_resources AS
        SELECT _line, _source_file, _source_row, marker, resource_type, resource FROM fs_stage.fhir_entries
        WHERE marker IS NOT NULL OR resource_type IS NULL OR resource_type NOT IN ({types})
        """
    )
    con.execute("CREATE OR REPLACE TABLE fs_stage.raw_bundle_files (_line BIGINT, file VARCHAR, reason VARCHAR, "
                "head VARCHAR)")
    if bad:
        con.executemany("INSERT INTO fs_stage.raw_bundle_files VALUES (?, ?, ?, ?)",
                        [[i + 1, *b] for i, b in enumerate(bad)])

    _register(load, "bundle_files", "(files that are not readable JSON)")
    _register(load, "other_resources", "bundles/(resource types not loaded)")
    con.execute(
        """
        CREATE OR REPLACE TABLE fs_stage.v_bundle_files AS
        SELECT _line, file AS _source_file, NULL::BIGINT AS _source_row, reason AS _quarantine, NULL AS _drop
        FROM raw_bundle_files;
        CREATE OR REPLACE TEMP VIEW e_bundle_files AS
        SELECT _line, NULL::BIGINT AS subject_id, NULL::TIMESTAMP AS time, NULL::VARCHAR AS code,
               NULL::FLOAT AS numeric_value, NULL AS text_value, NULL AS unit, NULL AS encounter_id
        FROM v_bundle_files WHERE false;
        CREATE OR REPLACE TABLE fs_stage.v_other_resources AS
        SELECT _line, _source_file, _source_row,
               CASE WHEN marker = 'no-resource' THEN 'Bundle entry without a resource'
                    WHEN marker LIKE 'not-a-bundle: %'
                    THEN 'not a FHIR Bundle (' || substr(marker, 15) || '): .json files must hold Bundles'
                    WHEN marker IS NULL AND resource_type IS NULL THEN 'JSON object without resourceType' END
                   AS _quarantine,
               CASE WHEN marker = 'empty-bundle' THEN 'Bundle without entries'
                    WHEN resource_type = 'Medication'
                    THEN 'Medication: read through the MedicationRequests that reference it'
                    ELSE 'resource type not loaded: ' || resource_type END AS _drop
        FROM raw_other_resources;
        CREATE OR REPLACE TEMP VIEW e_other_resources AS SELECT * FROM e_bundle_files;
        """
    )
    for table in ("bundle_files", "other_resources"):
        load.finish_table(table)
    _drop_raw_views(load, ("other_resources",))
    load.drop_staging(["bundle_files", "other_resources"])
    if not load.con.execute("SELECT count(*) FROM fs_stage.raw_patient").fetchall()[0][0]:
        first = f"; first problem: {bad[0][0]}: {bad[0][1]}" if bad else ""
        raise SourceError(f"{root}: no Patient resource in {len(files)} file(s), {len(bad)} unreadable{first}")


def _drop_raw_views(load: Load, tables: tuple[str, ...]) -> None:
    """The per-type raw tables are views (see _stage_bundles); drop them before Load.drop_staging, which drops
    tables. After the last group the entries themselves go."""
    for table in tables:
        load.con.execute(f"DROP VIEW IF EXISTS fs_stage.raw_{table}")
    if tables == GROUPS[-1].tables:
        load.con.execute("DROP TABLE IF EXISTS fs_stage.fhir_entries")


def stage_group(load: Load, root: Path, group: Group) -> list[str]:
    """Stage one group; safe to call again after a failure (Prefect retries). ``bundles`` must run first: it
    reads the files and stages every resource table the later groups validate."""
    install_ehr_macros(load, sql.load("fhir", "macros"))
    if group.name == "bundles":
        _stage_bundles(load, root)
        return list(group.tables)
    for table in group.tables:
        _register(load, table, f"bundles/{TABLE_TYPES[table]}")
    load.execute_script(sql.load("fhir", group.name))
    if group.name == "core":
        load.stage_subject_map("SELECT pid, subject_id FROM fhir_subjects")
    finish_group(load, group.tables, code_sections("fhir").get(group.name))
    _drop_raw_views(load, group.tables)
    load.drop_staging(group.tables)
    return list(group.tables)


def stage_codes(load: Load, root: Path) -> None:
    """FHIR bundles carry no dictionary: descriptions (codings' display) are staged with each group."""
