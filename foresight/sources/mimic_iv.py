"""MIMIC-IV (v2.x, full or demo) -> MEDS events in the warehouse.

Input: the MIMIC-IV root folder (``hosp/`` and ``icu/``, files ``*.csv.gz`` or ``*.csv``). All the work is
DuckDB SQL over the files (``foresight/sql/mimic_iv/*.sql``); Python only sequences table groups and does the
accounting through :class:`foresight.warehouse.Load`.

Coverage: every table the reference MIMIC-IV MEDS ETL maps (patients, admissions, transfers, diagnoses_icd,
procedures_icd, drgcodes, hcpcsevents, pharmacy, emar via prescriptions, labevents, omr, icustays,
inputevents, outputevents, procedureevents, chartevents) plus services, microbiologyevents and
datetimeevents. Not loaded: poe/poe_detail (order entry, duplicated by prescriptions/emar), emar_detail and
ingredientevents (per-component rows of emar/inputevents), provider and caregiver (no patient content).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from foresight import sql
from foresight.sources.base import Group, code_sections, finish_group
from foresight.warehouse import CsvScan, Load, SourceError, find_file, probe, read_header

SOURCE_KIND = "mimic-iv"


@dataclass(frozen=True)
class Table:
    """One MIMIC-IV input table: where it lives and the columns the SQL reads."""

    name: str
    folder: str
    columns: tuple[str, ...]
    ignored: tuple[str, ...] = ()  # MIMIC columns deliberately not used (others are reported as unknown)


REQUIRED_TABLE = "patients"


def _t(name: str, folder: str, columns: str, ignored: str = "") -> Table:
    return Table(name, folder, tuple(columns.split()), tuple(ignored.split()))


GROUPS: tuple[Group, ...] = (
    Group("core", (
        _t("patients", "hosp", "subject_id gender anchor_age anchor_year dod", "anchor_year_group"),
        _t("admissions", "hosp",
           "subject_id hadm_id admittime dischtime deathtime admission_type admission_location discharge_location "
           "insurance language marital_status race edregtime edouttime",
           "admit_provider_id hospital_expire_flag"),
    )),
    Group("transfers", (
        _t("transfers", "hosp", "subject_id hadm_id eventtype careunit intime outtime", "transfer_id"),
        _t("services", "hosp", "subject_id hadm_id transfertime prev_service curr_service"),
    )),
    Group("coding", (
        _t("diagnoses_icd", "hosp", "subject_id hadm_id icd_code icd_version", "seq_num"),
        _t("procedures_icd", "hosp", "subject_id hadm_id chartdate icd_code icd_version", "seq_num"),
        _t("drgcodes", "hosp", "subject_id hadm_id drg_type drg_code description drg_severity", "drg_mortality"),
        _t("hcpcsevents", "hosp", "subject_id hadm_id chartdate hcpcs_cd short_description", "seq_num"),
    )),
    Group("medications", (
        _t("prescriptions", "hosp",
           "subject_id hadm_id pharmacy_id starttime stoptime drug dose_val_rx dose_unit_rx route",
           "poe_id poe_seq order_provider_id drug_type formulary_drug_cd gsn ndc prod_strength form_rx "
           "form_val_disp form_unit_disp doses_per_24_hrs"),
        _t("pharmacy", "hosp", "subject_id hadm_id pharmacy_id starttime stoptime medication route",
           "poe_id proc_type status entertime verifiedtime frequency disp_sched infusion_type sliding_scale "
           "lockout_interval basal_rate one_hr_max doses_per_24_hrs duration duration_interval expiration_value "
           "expiration_unit expirationdate dispensation fill_quantity"),
        _t("emar", "hosp", "subject_id hadm_id charttime medication event_txt",
           "emar_id emar_seq poe_id pharmacy_id enter_provider_id scheduletime storetime"),
    )),
    Group("labs", (
        _t("labevents", "hosp", "subject_id hadm_id itemid charttime storetime value valuenum valueuom",
           "labevent_id specimen_id order_provider_id ref_range_lower ref_range_upper flag priority comments"),
        _t("microbiologyevents", "hosp",
           "subject_id hadm_id chartdate charttime storedate storetime test_itemid test_name org_itemid org_name "
           "ab_itemid ab_name dilution_value interpretation comments",
           "microevent_id micro_specimen_id order_provider_id spec_itemid spec_type_desc test_seq isolate_num "
           "quantity dilution_text dilution_comparison"),
        _t("omr", "hosp", "subject_id chartdate result_name result_value", "seq_num"),
    )),
    Group("icu", (
        _t("icustays", "icu", "subject_id hadm_id stay_id first_careunit last_careunit intime outtime los"),
        _t("inputevents", "icu",
           "subject_id hadm_id stay_id starttime endtime itemid amount amountuom rate rateuom patientweight",
           "caregiver_id storetime orderid linkorderid ordercategoryname secondaryordercategoryname "
           "ordercomponenttypedescription ordercategorydescription totalamount totalamountuom isopenbag "
           "continueinnextdept statusdescription originalamount originalrate"),
        _t("outputevents", "icu", "subject_id hadm_id stay_id charttime itemid value valueuom",
           "caregiver_id storetime"),
        _t("procedureevents", "icu", "subject_id hadm_id stay_id starttime endtime itemid value valueuom",
           "caregiver_id storetime location locationcategory orderid linkorderid ordercategoryname "
           "ordercategorydescription patientweight isopenbag continueinnextdept statusdescription "
           "ORIGINALAMOUNT ORIGINALRATE"),
        _t("datetimeevents", "icu", "subject_id hadm_id stay_id charttime storetime itemid value",
           "caregiver_id valueuom warning"),
        _t("chartevents", "icu", "subject_id hadm_id stay_id charttime storetime itemid value valuenum valueuom",
           "caregiver_id warning"),
    )),
)

DICTIONARIES: dict[str, str] = {
    "d_icd_diagnoses": "hosp",
    "d_icd_procedures": "hosp",
    "d_labitems": "hosp",
    "d_hcpcs": "hosp",
    "d_items": "icu",
}


def find_table(root: Path, folder: str, name: str, warnings: list[str] | None = None) -> Path | None:
    """``root/<folder>/<name>.csv.gz`` (or ``.csv``), or None when the export lacks it; ``SourceError`` when it (or
    its folder) is there but unreadable. With both files there, ``.csv.gz`` (the PhysioNet file) is read and a
    warning naming both goes to ``warnings``."""
    return find_file(root / folder, name, (".csv.gz", ".csv"), warnings)


def check_input(root: Path) -> Path:
    """Fail early, naming the path, when ``root`` is not a MIMIC-IV folder."""
    root = Path(root)
    if probe(root) != "dir":  # probe: a broken or looping link is SourceError naming it
        raise SourceError(f"{root}: not a folder (expected the MIMIC-IV root with hosp/ and icu/)")
    if find_table(root, "hosp", REQUIRED_TABLE) is None:
        raise SourceError(
            f"{root / 'hosp' / (REQUIRED_TABLE + '.csv.gz')}: required file missing "
            "(expected the MIMIC-IV root folder with hosp/patients.csv.gz)"
        )
    return root


def scan_group(load: Load, root: Path, group: Group) -> list[CsvScan | Table]:
    """Scan the group's files (thread-safe); an absent table is returned as its spec."""
    scans: list[CsvScan | Table] = []
    for table in group.tables:
        path = find_table(root, table.folder, table.name, load.warnings)
        if path is None:
            if table.name == REQUIRED_TABLE:
                raise SourceError(f"{root / table.folder / (table.name + '.csv.gz')}: required file missing")
            scans.append(table)
        else:
            scans.append(load.scan_csv(table.name, path, table.columns, ignored_columns=table.ignored))
    return scans


def stage_group(load: Load, root: Path, group: Group) -> list[str]:
    """Scan, validate and account for one table group (the driver calls the two halves itself, see base.py).

    Safe to call again after a failure (each table's staging is reset first), which is what lets the
    Prefect flow retry a group on a transient I/O error.
    """
    validate_group(load, root, group)
    return account_group(load, group)


def validate_group(load: Load, root: Path, group: Group, scans: list[CsvScan | Table] | None = None) -> None:
    """The first half of :func:`stage_group`: register the group's scans and run its validation SQL."""
    for scan in scans if scans is not None else scan_group(load, root, group):
        if isinstance(scan, Table):
            load.empty_table(scan.name, f"{scan.folder}/{scan.name}.csv.gz", scan.columns)
        else:
            load.register_scan(scan)
            if scan.table == REQUIRED_TABLE:
                stage_patient_rejects(load, root, scan)
    load.execute_script(sql.load("mimic_iv", group.name))


def account_group(load: Load, group: Group) -> list[str]:
    """The second half of :func:`stage_group`: account for every table of the group and free its staging."""
    # codes.sql sections named after a group take the names that group's own rows carry
    finish_group(load, group.table_names, code_sections("mimic_iv").get(group.name))
    # The core group's validated tables are what later groups check subjects and stays against.
    load.drop_staging(group.table_names if group.name != "core" else [])
    return group.table_names


def stage_patient_rejects(load: Load, root: Path, scan: CsvScan) -> None:
    """Stage ``mimic_patient_rejects(subject_id, line, reason)``: the patients rows the CSV reader could not read
    (quarantined by the scan) whose subject_id can still be read from the raw line, so core.sql can tell their
    other rows "its patients row was quarantined" rather than "unknown subject_id"."""
    idx = read_header(root / scan.file).index("subject_id")
    rejects = []
    for line, reason, raw in scan.quarantine:
        fields = next(csv.reader([raw.strip("\r\n")]), [])
        sid = fields[idx].strip() if len(fields) > idx else ""
        if sid.isdigit():
            rejects.append((int(sid), line, reason))
    load.con.execute("CREATE OR REPLACE TEMP TABLE mimic_patient_rejects (subject_id BIGINT, line BIGINT, "
                     "reason VARCHAR)")
    if rejects:
        load.con.executemany("INSERT INTO mimic_patient_rejects VALUES (?, ?, ?)", rejects)


def stage_codes(load: Load, root: Path) -> None:
    """Stage code descriptions and ICD hierarchies from the d_* dictionaries."""
    dictionaries, params = [], {}
    for name, text in code_sections("mimic_iv").items():
        if name not in DICTIONARIES:  # a group's section (see stage_group)
            continue
        path = find_table(root, DICTIONARIES[name], name, load.warnings)
        if path is None:
            load.warnings.append(f"{DICTIONARIES[name]}/{name}.csv.gz missing: its codes have no description")
            continue
        load.checksum(path)
        dictionaries.append(text.replace("$path", f"$path_{name}"))
        params[f"path_{name}"] = str(path)
    if dictionaries:
        # One statement, so DuckDB decompresses the dictionary files in parallel.
        load.add_codes("\nUNION ALL\n".join(dictionaries), params, priority=1, only_needed=True)
