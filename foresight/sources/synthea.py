"""Synthea CSV export -> MEDS events in the warehouse.

Input: the CSV folder of a Synthea export (``csv/``, or the export root that contains it), files ``<table>.csv``
(or ``.csv.gz``). Only ``patients.csv`` is required; every other table is optional (a minimal export, e.g. the
project's simulator output, may lack it: the absence is reported in ``missing_tables``, not an error), and in each
table only the columns the SQL truly needs are required. All the work is DuckDB SQL (``foresight/sql/synthea``,
macros shared with the FHIR source in ``foresight/sql/common/ehr_macros.sql``); Python only sequences table
groups and does the accounting through :class:`foresight.warehouse.Load`.

Coverage: patients (gender, race, ethnicity as static codes; MEDS_BIRTH, MEDS_DEATH), encounters (ADMIT/DISCHARGE
for inpatient and emergency, ENCOUNTER//<class> otherwise), conditions (DX at diagnosis, DX_END at resolution),
medications (RX_START/RX_STOP, RxNorm), procedures (PX, SNOMED), observations (VITAL or LAB, LOINC; numeric or
categorical values), immunizations (CVX), allergies, careplans, devices, imaging_studies. Not loaded: claims,
claims_transactions, payers, payer_transitions, organizations, providers (billing and directory data, no clinical
events) and supplies (consumables); allergy STOP and reactions.

Subject ids: patient UUIDs map through ``subject_map`` to the stable hash :func:`foresight.schema.uuid_subject_id`
(existing map rows of this source win), so re-loads keep their ids and the FHIR copy of the same export gets the
same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from foresight import sql
from foresight.sources.base import Group, code_sections, finish_group, install_ehr_macros
from foresight.warehouse import Load, SourceError, find_file, probe, read_header

SOURCE_KIND = "synthea"
REQUIRED_TABLE = "patients"


@dataclass(frozen=True)
class Table:
    """One Synthea CSV table: the columns the SQL needs, those it reads if present, and those it ignores."""

    name: str
    columns: tuple[str, ...]
    optional: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()  # Synthea columns deliberately not used (others are reported as unknown)


def _t(name: str, columns: str, optional: str = "", ignored: str = "") -> Table:
    return Table(name, tuple(columns.split()), tuple(optional.split()), tuple(ignored.split()))


GROUPS: tuple[Group, ...] = (
    Group("core", (
        _t("patients", "Id BIRTHDATE", "DEATHDATE GENDER RACE ETHNICITY",
           "SSN DRIVERS PASSPORT PREFIX FIRST MIDDLE LAST SUFFIX MAIDEN MARITAL BIRTHPLACE ADDRESS CITY STATE "
           "COUNTY FIPS ZIP LAT LON HEALTHCARE_EXPENSES HEALTHCARE_COVERAGE INCOME"),
        _t("encounters", "Id START PATIENT ENCOUNTERCLASS", "STOP DESCRIPTION",
           "ORGANIZATION PROVIDER PAYER CODE BASE_ENCOUNTER_COST TOTAL_CLAIM_COST PAYER_COVERAGE REASONCODE "
           "REASONDESCRIPTION"),
    )),
    Group("clinical", (
        _t("conditions", "START PATIENT CODE", "STOP ENCOUNTER SYSTEM DESCRIPTION"),
        _t("medications", "START PATIENT CODE", "STOP ENCOUNTER DESCRIPTION",
           "PAYER BASE_COST PAYER_COVERAGE DISPENSES TOTALCOST REASONCODE REASONDESCRIPTION"),
        # START (Synthea >= 2.7) or DATE (older exports): one of them must be in the header
        _t("procedures", "PATIENT CODE", "START STOP DATE ENCOUNTER SYSTEM DESCRIPTION",
           "BASE_COST REASONCODE REASONDESCRIPTION"),
        _t("immunizations", "DATE PATIENT CODE", "ENCOUNTER DESCRIPTION", "BASE_COST"),
        _t("allergies", "START PATIENT CODE", "ENCOUNTER SYSTEM DESCRIPTION",
           "STOP TYPE CATEGORY REACTION1 DESCRIPTION1 SEVERITY1 REACTION2 DESCRIPTION2 SEVERITY2"),
        _t("careplans", "START PATIENT CODE", "STOP ENCOUNTER DESCRIPTION", "Id REASONCODE REASONDESCRIPTION"),
        _t("devices", "START PATIENT CODE", "STOP ENCOUNTER DESCRIPTION", "UDI"),
        _t("imaging_studies", "DATE PATIENT MODALITY_CODE BODYSITE_CODE",
           "Id SERIES_UID ENCOUNTER MODALITY_DESCRIPTION BODYSITE_DESCRIPTION",
           "INSTANCE_UID SOP_CODE SOP_DESCRIPTION PROCEDURE_CODE"),
    )),
    Group("observations", (
        _t("observations", "DATE PATIENT CODE", "ENCOUNTER CATEGORY DESCRIPTION VALUE UNITS TYPE"),
    )),
)

# Alternatives where Synthea versions differ: at least one column of each set must be in the header.
ONE_OF: dict[str, tuple[str, ...]] = {"procedures": ("START", "DATE")}


def find_table(root: Path, name: str, warnings: list[str] | None = None) -> Path | None:
    """``root/<name>.csv`` (or ``.csv.gz``), or None when the export lacks it; ``SourceError`` when it is there but
    unreadable. With both files there, ``.csv`` (what Synthea writes) is read and a warning naming both goes to
    ``warnings``."""
    return find_file(root, name, (".csv", ".csv.gz"), warnings)


def check_input(path: Path) -> Path:
    """The Synthea CSV folder under ``path`` (``path`` itself or ``path/csv``); ``SourceError`` naming the path
    when there is no ``patients.csv``."""
    path = Path(path)
    if probe(path) != "dir":  # probe: a broken or looping link is SourceError naming it
        raise SourceError(f"{path}: not a folder (expected a Synthea CSV export folder with patients.csv)")
    for root in (path, path / "csv"):
        if find_table(root, REQUIRED_TABLE) is not None:
            return root
    raise SourceError(f"{path / 'patients.csv'}: required file missing (expected a Synthea CSV export folder, "
                      "the csv/ folder of `run_synthea --exporter.csv.export true`)")


def stage_group(load: Load, root: Path, group: Group) -> list[str]:
    """Read, validate and account for one table group; safe to call again after a failure (Prefect retries)."""
    install_ehr_macros(load)
    for table in group.tables:
        path = find_table(root, table.name, load.warnings)
        if path is None:
            if table.name == REQUIRED_TABLE:
                raise SourceError(f"{root / (table.name + '.csv')}: required file missing")
            load.empty_table(table.name, f"{table.name}.csv", table.columns + table.optional)
            continue
        if table.name in ONE_OF and not set(ONE_OF[table.name]) & set(read_header(path, allow_empty=True)):
            raise SourceError(f"{path}: missing required column: one of {list(ONE_OF[table.name])}")
        load.read_csv(table.name, path, table.columns, optional_columns=table.optional, ignored_columns=table.ignored)
    load.execute_script(sql.load("synthea", group.name))
    if group.name == "core":
        load.stage_subject_map("SELECT pid, subject_id FROM synthea_subjects")
    finish_group(load, group.table_names, code_sections("synthea").get(group.name))
    # synthea_subjects / synthea_encounters (separate TEMP tables) carry what later groups need from core.
    load.drop_staging(group.table_names)
    return group.table_names


def stage_codes(load: Load, root: Path) -> None:
    """Synthea ships no code dictionary: descriptions come from the rows, staged with each group."""
