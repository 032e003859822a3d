"""Write simulated chunks as a MEDS dataset, as a Synthea-style CSV export, and as free-text notes.

MEDS (what ``foresight export meds`` writes, plus a ``unit`` column, which MEDS allows)::

    data/<chunk>.parquet            a subject in exactly one shard; sorted by subject_id, time (static rows first),
                                    code; subject_id, time, code, numeric_value, text_value, unit
    metadata/codes.parquet          code, description, parent_codes (ICD-10-CM and ATC ancestors, nearest first)
    metadata/subject_splits.parquet subject_id, split (foresight.schema.split_of)
    metadata/dataset.json           MEDS dataset metadata
    metadata/simulator.json         the configuration and seed: Oracle.from_dir() re-creates the oracle from it

Synthea (``csv/``): the column layout of a real Synthea CSV export (patients, encounters, conditions, medications,
observations, procedures, organizations, providers, payers; the other Synthea files with their header only), with
Synthea's vocabularies: SNOMED CT conditions and procedures, RxNorm medications, LOINC observations, UUID ids.
What Synthea has no place for is left out: discharge coding of known conditions, discharge destinations.

Notes (``notes.csv``): subject_id, time, text: one note per primary-care visit and per discharge, naming the
patient's conditions, with negated, hypothetical and family-history mentions that must NOT become diagnoses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from foresight.schema import MEDS_VERSION, meds_codes_schema, meds_splits_schema, split_of
from foresight.simulate import catalog as cat
from foresight.simulate.cohort import Chunk
from foresight.simulate.engine import (
    E_ACUTE,
    E_DIAGNOSIS,
    E_ELECTIVE,
    E_EMERGENCY,
    E_ROUTINE,
    F_DX_ACUTE,
    F_DX_CHRONIC,
    F_DX_PRINCIPAL,
    N_ACUTE,
    N_DIAGNOSIS,
    N_DISCHARGE,
)
from foresight.version import __version__

_US_PER_DAY = 86_400_000_000
_CODES = np.array(cat.VOCAB.codes, dtype=object)
_CODE_RANK = np.argsort(np.argsort(np.array(cat.VOCAB.codes)))  # sort codes as strings, like export_meds
_UNITS = np.array([None] * len(cat.VOCAB.codes), dtype=object)
for _m in cat.MEASURES:
    _UNITS[cat.CODE_ID[f"M_{_m.key}"]] = _m.unit


def _dicts() -> tuple[Any, Any]:
    import pyarrow as pa

    return pa.array(list(_CODES), pa.string()), pa.array(list(_UNITS), pa.string())


_CODE_DICT, _UNIT_DICT = _dicts()


def meds_data_schema_with_unit() -> Any:
    """The MEDS data schema plus the extra ``unit`` column (string, nullable)."""
    import pyarrow as pa

    from foresight.schema import meds_data_schema

    return meds_data_schema().append(pa.field("unit", pa.string()))


def _seconds(days: np.ndarray) -> np.ndarray:
    """Days since epoch -> whole seconds (the records' resolution)."""
    return np.round(days * 86_400.0).astype(np.int64)


# --- MEDS -------------------------------------------------------------------------------------------------


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
    sec = np.concatenate([np.full(3 * n, _STATIC_SEC), _seconds(s["birth"]), _seconds(e["time"])])
    code = np.concatenate([sex, race, eth, np.full(n, cat.CODE_ID["BIRTH"]), e["code"]]).astype(np.int32)
    value = np.concatenate([np.full(4 * n, np.nan, np.float32), e["value"].astype(np.float32)])
    order = np.lexsort((_CODE_RANK[code], sec, sid))
    return sid[order], sec[order], code[order], value[order]


_STATIC_SEC = np.iinfo(np.int64).min


def meds_table(sid: np.ndarray, sec: np.ndarray, code: np.ndarray, value: np.ndarray) -> Any:
    """Sorted MEDS columns (from :func:`meds_columns`, or a slice of them) as a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.compute as pc

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
    import pyarrow.parquet as pq

    sid, sec, code, value = meds_columns(chunk)
    (out / "data").mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(out / "data" / f"{chunk.index}.parquet", meds_data_schema_with_unit()) as writer:
        for i in range(0, max(sid.size, 1), row_group):
            sl = slice(i, i + row_group)
            writer.write_table(meds_table(sid[sl], sec[sl], code[sl], value[sl]))
    return int(sid.size)


def write_meds_metadata(out: Path, subject_ids: np.ndarray, meta: dict[str, Any]) -> None:
    """codes.parquet, subject_splits.parquet, dataset.json and simulator.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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


# --- Synthea ----------------------------------------------------------------------------------------------

def _cols(names: str) -> list[str]:
    return names.split()


SYNTHEA_HEADERS: dict[str, list[str]] = {
    "patients": _cols("Id BIRTHDATE DEATHDATE SSN DRIVERS PASSPORT PREFIX FIRST LAST SUFFIX MAIDEN MARITAL RACE "
                      "ETHNICITY GENDER BIRTHPLACE ADDRESS CITY STATE COUNTY ZIP LAT LON HEALTHCARE_EXPENSES "
                      "HEALTHCARE_COVERAGE"),
    "encounters": _cols("Id START STOP PATIENT ORGANIZATION PROVIDER PAYER ENCOUNTERCLASS CODE DESCRIPTION "
                        "BASE_ENCOUNTER_COST TOTAL_CLAIM_COST PAYER_COVERAGE REASONCODE REASONDESCRIPTION"),
    "conditions": _cols("START STOP PATIENT ENCOUNTER CODE DESCRIPTION"),
    "medications": _cols("START STOP PATIENT PAYER ENCOUNTER CODE DESCRIPTION BASE_COST PAYER_COVERAGE DISPENSES "
                         "TOTALCOST REASONCODE REASONDESCRIPTION"),
    "observations": _cols("DATE PATIENT ENCOUNTER CATEGORY CODE DESCRIPTION VALUE UNITS TYPE"),
    "procedures": _cols("START STOP PATIENT ENCOUNTER CODE DESCRIPTION BASE_COST REASONCODE REASONDESCRIPTION"),
    "organizations": _cols("Id NAME ADDRESS CITY STATE ZIP LAT LON PHONE REVENUE UTILIZATION"),
    "providers": _cols("Id ORGANIZATION NAME GENDER SPECIALITY ADDRESS CITY STATE ZIP LAT LON UTILIZATION"),
    "payers": _cols("Id NAME ADDRESS CITY STATE_HEADQUARTERED ZIP PHONE AMOUNT_COVERED AMOUNT_UNCOVERED REVENUE "
                    "COVERED_ENCOUNTERS UNCOVERED_ENCOUNTERS COVERED_MEDICATIONS UNCOVERED_MEDICATIONS "
                    "COVERED_PROCEDURES UNCOVERED_PROCEDURES COVERED_IMMUNIZATIONS UNCOVERED_IMMUNIZATIONS "
                    "UNIQUE_CUSTOMERS QOLS_AVG MEMBER_MONTHS"),
    # Synthea files the simulator has nothing for: written with their header so a reader finds them.
    "allergies": _cols("START STOP PATIENT ENCOUNTER CODE SYSTEM DESCRIPTION TYPE CATEGORY REACTION1 DESCRIPTION1 "
                       "SEVERITY1 REACTION2 DESCRIPTION2 SEVERITY2"),
    "careplans": _cols("Id START STOP PATIENT ENCOUNTER CODE DESCRIPTION REASONCODE REASONDESCRIPTION"),
    "claims": _cols("Id PATIENTID PROVIDERID PRIMARYPATIENTINSURANCEID SECONDARYPATIENTINSURANCEID DEPARTMENTID "
                    "PATIENTDEPARTMENTID DIAGNOSIS1 DIAGNOSIS2 DIAGNOSIS3 DIAGNOSIS4 DIAGNOSIS5 DIAGNOSIS6 "
                    "DIAGNOSIS7 DIAGNOSIS8 REFERRINGPROVIDERID APPOINTMENTID CURRENTILLNESSDATE SERVICEDATE "
                    "SUPERVISINGPROVIDERID STATUS1 STATUS2 STATUSP OUTSTANDING1 OUTSTANDING2 OUTSTANDINGP "
                    "LASTBILLEDDATE1 LASTBILLEDDATE2 LASTBILLEDDATEP HEALTHCARECLAIMTYPEID1 HEALTHCARECLAIMTYPEID2"),
    "devices": _cols("START STOP PATIENT ENCOUNTER CODE DESCRIPTION UDI"),
    "imaging_studies": _cols("Id DATE PATIENT ENCOUNTER SERIES_UID BODYSITE_CODE BODYSITE_DESCRIPTION MODALITY_CODE "
                             "MODALITY_DESCRIPTION INSTANCE_UID SOP_CODE SOP_DESCRIPTION PROCEDURE_CODE"),
    "immunizations": _cols("DATE PATIENT ENCOUNTER CODE DESCRIPTION BASE_COST"),
    "payer_transitions": _cols("PATIENT MEMBERID START_YEAR END_YEAR PAYER SECONDARY_PAYER OWNERSHIP OWNERNAME"),
    "supplies": _cols("DATE PATIENT ENCOUNTER CODE DESCRIPTION QUANTITY"),
}
SYNTHEA_DATA_FILES = ("patients", "encounters", "conditions", "medications", "observations", "procedures")

_ORG = "7c0d9b0e-5f2a-4d3b-9a61-2b6f1c0e8d11"
_PROVIDER = "3e1f6a2b-8c4d-4e5f-a617-9b8c7d6e5f40"
_PAYER = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
_FIRST_F = ("Mary", "Linda", "Susan", "Maria", "Aisha", "Mei", "Sofia", "Grace", "Fatima", "Emma", "Olivia", "Ana")
_FIRST_M = ("James", "John", "Robert", "Jose", "Wei", "Omar", "Liam", "Noah", "David", "Luis", "Kwame", "Ravi")
_LAST = ("Smith", "Johnson", "Garcia", "Nguyen", "Brown", "Lopez", "Kim", "Patel", "Williams", "Okafor", "Chen",
         "Martinez", "Jones", "Davis", "Rossi", "Cohen")
_CITY = (("Boston", "Suffolk County", "02118", 42.34, -71.07), ("Worcester", "Worcester County", "01608", 42.26,
         -71.80), ("Springfield", "Hampden County", "01103", 42.10, -72.59), ("Lowell", "Middlesex County", "01852",
         42.63, -71.32))


def write_synthea_static(csv_dir: Path) -> dict[str, int]:
    """The files that do not depend on the cohort: organisations, providers, payers, and header-only files."""
    csv_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in SYNTHEA_HEADERS:
        if name in SYNTHEA_DATA_FILES:
            continue
        with open(csv_dir / f"{name}.csv", "wb") as fh:
            fh.write((",".join(SYNTHEA_HEADERS[name]) + "\n").encode())
        rows[name] = 0
    static = {
        "organizations": {
            "Id": [_ORG], "NAME": ["FORESIGHT SIMULATED HOSPITAL"], "ADDRESS": ["1 MAIN ST"], "CITY": ["BOSTON"],
            "STATE": ["MA"], "ZIP": ["02118"], "LAT": ["42.34"], "LON": ["-71.07"], "PHONE": ["6175550100"],
            "REVENUE": ["0.0"], "UTILIZATION": ["0"]},
        "providers": {
            "Id": [_PROVIDER], "ORGANIZATION": [_ORG], "NAME": ["Alex Simulated"], "GENDER": ["F"],
            "SPECIALITY": ["GENERAL PRACTICE"], "ADDRESS": ["1 MAIN ST"], "CITY": ["BOSTON"], "STATE": ["MA"],
            "ZIP": ["02118"], "LAT": ["42.34"], "LON": ["-71.07"], "UTILIZATION": ["0"]},
        "payers": {**{k: ["0"] for k in SYNTHEA_HEADERS["payers"]},
                   "Id": [_PAYER], "NAME": ["Simulated Payer"], "ADDRESS": ["1 MAIN ST"], "CITY": ["Boston"],
                   "STATE_HEADQUARTERED": ["MA"], "ZIP": ["02118"], "PHONE": ["1-800-555-0100"], "QOLS_AVG": ["0.0"]},
    }
    for name, cols in static.items():
        with open(csv_dir / f"{name}.csv", "ab") as fh:
            rows[name] = _write_csv(fh, name, cols)
    return rows


def _write_csv(fh: Any, name: str, columns: dict[str, Any]) -> int:
    """Append rows to an open file; every column of the file's header may be given (missing ones are empty)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    header = SYNTHEA_HEADERS[name]
    n = max(len(v) for v in columns.values() if v is not None)
    arrays = []
    for col in header:
        v = columns.get(col)
        if v is None:
            arrays.append(pa.nulls(n, pa.string()))
        else:
            arr = v if isinstance(v, pa.Array | pa.ChunkedArray) else pa.array(v)
            arrays.append(arr.cast(pa.string()))
    table = pa.Table.from_arrays(arrays, names=header)
    # Synthea writes no quotes (its values hold no commas); 'none' raises if a value would need them.
    pcsv.write_csv(table, fh, pcsv.WriteOptions(include_header=False, quoting_style="none"))
    return n


def assemble_parts(parts: Path, out: Path, name: str, header: str, n_chunks: int) -> None:
    """Concatenate ``parts/<name>.<chunk>.csv`` in chunk order under ``header`` into ``out``."""
    import shutil

    with open(out, "wb") as dst:
        dst.write((header + "\n").encode())
        for i in range(n_chunks):
            part = parts / f"{name}.{i:06d}.csv"
            if part.exists():
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                part.unlink()


class SyntheaWriter:
    """Writes one chunk's rows of the Synthea data files to ``parts/<name>.<chunk>.csv`` (no header)."""

    def __init__(self, parts: Path, seed: int) -> None:
        self.parts = parts
        self.seed = seed
        parts.mkdir(parents=True, exist_ok=True)

    def write_chunk(self, chunk: Chunk) -> dict[str, int]:
        """Write one chunk's part files; returns rows per file."""
        files = {name: open(self.parts / f"{name}.{chunk.index:06d}.csv", "wb")  # noqa: SIM115
                 for name in SYNTHEA_DATA_FILES}
        try:
            return self._write_chunk(chunk, files)
        finally:
            for fh in files.values():
                fh.close()

    def _write_chunk(self, chunk: Chunk, files: dict[str, Any]) -> dict[str, int]:
        import pyarrow as pa
        import pyarrow.compute as pc

        s, e, enc, icu = chunk.subjects, chunk.events, chunk.encounters, chunk.icu
        # Rows by patient, then time, like a Synthea export.
        e = _sorted(e, "subject_id", "time")
        enc = _sorted(enc, "subject_id", "start")
        icu = _sorted(icu, "subject_id", "start")
        seed = self.seed
        end = chunk.data_end
        rows: dict[str, int] = {}

        def write(name: str, cols: dict[str, Any]) -> None:
            rows[name] = _write_csv(files[name], name, cols)

        # patients
        sid = s["subject_id"]
        n = sid.size
        pid = uuids(seed, 1, sid)
        h = _mix(sid.astype(np.uint64) ^ np.uint64(seed * 7919 + 17))
        male = s["male"]
        first = np.where(male, np.array(_FIRST_M)[h % len(_FIRST_M)], np.array(_FIRST_F)[h % len(_FIRST_F)])
        city = (h >> np.uint64(8)) % len(_CITY)
        age_end = (end - s["birth"]) / 365.25
        death = s["death"]
        write("patients", {
            "Id": pid, "BIRTHDATE": _date(s["birth"]), "DEATHDATE": _date(death),
            "SSN": [f"999-{a:02d}-{b:04d}" for a, b in zip(h % 100, (h >> np.uint64(16)) % 10000, strict=True)],
            "DRIVERS": np.where(age_end >= 16, np.char.add("S999", ((h >> np.uint64(24)) % 99999).astype(str)),
                                None).tolist(),
            "PREFIX": np.where(age_end >= 18, np.where(male, "Mr.", "Ms."), None).tolist(),
            "FIRST": np.char.add(first.astype(str), ((h >> np.uint64(32)) % 999).astype(str)),
            "LAST": np.char.add(np.array(_LAST)[(h >> np.uint64(40)) % len(_LAST)],
                                ((h >> np.uint64(48)) % 999).astype(str)),
            "RACE": np.array([r.lower() for r in cat.RACES])[s["race"].astype(np.int64)],
            "ETHNICITY": np.where(s["hisp"], "hispanic", "nonhispanic"), "GENDER": np.where(male, "M", "F"),
            "BIRTHPLACE": np.array([f"{c[0]}  Massachusetts  US" for c in _CITY])[city],
            "ADDRESS": np.char.add(((h >> np.uint64(12)) % 900 + 100).astype(str), " Simulation Way"),
            "CITY": np.array([c[0] for c in _CITY])[city], "STATE": np.full(n, "Massachusetts"),
            "COUNTY": np.array([c[1] for c in _CITY])[city], "ZIP": np.array([c[2] for c in _CITY])[city],
            "LAT": np.array([c[3] for c in _CITY])[city].astype(str), "LON": np.array([c[4] for c in _CITY])[city]
            .astype(str), "HEALTHCARE_EXPENSES": np.round(1000.0 + 800.0 * np.maximum(age_end, 0), 2).astype(str),
            "HEALTHCARE_COVERAGE": np.round(500.0 + 300.0 * np.maximum(age_end, 0), 2).astype(str)})
        pid_of = dict_lookup(sid, pid)
        # encounters
        klass = enc["klass"].astype(np.int64)
        cls = np.array([cat.SYNTHEA_ENCOUNTER[k] for k in ("routine", "acute", "diagnosis", "EMERGENCY",
                                                          "ELECTIVE")], dtype=object)
        reason_code, reason_desc = _reason_snomed(klass, enc["reason"].astype(np.int64))
        stop = np.where(np.isnan(enc["stop"]), np.nan, enc["stop"])
        cost = np.where(klass >= E_EMERGENCY, 9500.0, 120.0)
        enc_ids = uuids(seed, 2, enc["enc"])
        write("encounters", {
            "Id": enc_ids, "START": _iso(enc["start"]), "STOP": _iso(stop), "PATIENT": pid_of(enc["subject_id"]),
            "ORGANIZATION": np.full(enc["enc"].size, _ORG), "PROVIDER": np.full(enc["enc"].size, _PROVIDER),
            "PAYER": np.full(enc["enc"].size, _PAYER), "ENCOUNTERCLASS": [c[0] for c in cls[klass]],
            "CODE": [c[1] for c in cls[klass]], "DESCRIPTION": [c[2] for c in cls[klass]],
            "BASE_ENCOUNTER_COST": cost.astype(str), "TOTAL_CLAIM_COST": cost.astype(str),
            "PAYER_COVERAGE": np.round(cost * 0.8, 2).astype(str), "REASONCODE": reason_code,
            "REASONDESCRIPTION": reason_desc})
        enc_order = np.argsort(enc["enc"])
        enc_sorted = enc["enc"][enc_order]

        def enc_pos(ids: np.ndarray) -> np.ndarray:
            return enc_order[np.searchsorted(enc_sorted, ids)]

        # conditions: diagnoses made in primary care and the principal diagnosis of each stay
        code = e["code"].astype(np.int64)
        flag = e["flag"]
        rows_c = np.flatnonzero(np.isin(flag, (F_DX_CHRONIC, F_DX_ACUTE, F_DX_PRINCIPAL)) & (e["enc"] >= 0))
        pos = enc_pos(e["enc"][rows_c])
        fl = flag[rows_c]
        start = np.where(fl == F_DX_PRINCIPAL, enc["start"][pos], e["time"][rows_c])
        snomed, desc, resolves = _dx_snomed(fl, code[rows_c], klass[pos], enc["reason"][pos].astype(np.int64))
        cstop = np.where(fl == F_DX_PRINCIPAL, e["time"][rows_c],
                         np.where(fl == F_DX_ACUTE, e["time"][rows_c] + resolves, np.nan))
        cstop = np.where(cstop < end, cstop, np.nan)
        write("conditions", {
            "START": _date(start), "STOP": _date(cstop), "PATIENT": pid_of(e["subject_id"][rows_c]),
            "ENCOUNTER": enc_ids[pos], "CODE": snomed, "DESCRIPTION": desc})
        # medications
        rx_rows = np.flatnonzero(np.isin(code, _DRUG_CODE_IDS))
        drug = _DRUG_OF_CODE[code[rx_rows]]
        pos = enc_pos(e["enc"][rx_rows])
        course = np.array([d.course_days if not d.chronic else np.nan for d in cat.DRUGS])[drug]
        mstop = e["time"][rx_rows] + course
        mstop = np.where(mstop < end, mstop, np.nan)
        rcode, rdesc = _reason_snomed(klass[pos], enc["reason"][pos].astype(np.int64))
        write("medications", {
            "START": _iso(e["time"][rx_rows]), "STOP": _iso(mstop), "PATIENT": pid_of(e["subject_id"][rx_rows]),
            "PAYER": np.full(rx_rows.size, _PAYER), "ENCOUNTER": enc_ids[pos],
            "CODE": np.array([d.rxnorm for d in cat.DRUGS])[drug],
            "DESCRIPTION": np.array([d.rxnorm_desc for d in cat.DRUGS])[drug],
            "BASE_COST": np.full(rx_rows.size, "12.50"), "PAYER_COVERAGE": np.full(rx_rows.size, "10.00"),
            "DISPENSES": np.full(rx_rows.size, "1"), "TOTALCOST": np.full(rx_rows.size, "12.50"),
            "REASONCODE": rcode, "REASONDESCRIPTION": rdesc})
        # observations
        ob = np.flatnonzero(np.isin(code, _MEASURE_CODE_IDS))
        meas = _MEASURE_OF_CODE[code[ob]]
        write("observations", {
            "DATE": _iso(e["time"][ob]), "PATIENT": pid_of(e["subject_id"][ob]),
            "ENCOUNTER": enc_ids[enc_pos(e["enc"][ob])],
            "CATEGORY": np.array(["laboratory" if m.kind == "LAB" else "vital-signs" for m in cat.MEASURES])[meas],
            "CODE": np.array([m.loinc for m in cat.MEASURES])[meas],
            "DESCRIPTION": np.array([m.desc for m in cat.MEASURES])[meas],
            "VALUE": pc.cast(pa.array(e["value"][ob].astype(np.float32)), pa.string()),
            "UNITS": np.array([m.unit for m in cat.MEASURES])[meas], "TYPE": np.full(ob.size, "numeric")})
        # procedures: surgery of elective/emergency stays, ICU stays
        px = np.flatnonzero(np.isin(code, _PX_CODE_IDS))
        pos = enc_pos(e["enc"][px])
        cause = enc["reason"][pos].astype(np.int64)
        proc = [cat.CAUSES[c].procedure for c in cause]
        pstart = enc["start"][pos] + 3.0 / 24.0
        ipos = enc_pos(icu["enc"])
        icause = enc["reason"][ipos].astype(np.int64)
        write("procedures", {
            "START": _iso(np.concatenate([pstart, icu["start"]])),
            "STOP": _iso(np.concatenate([pstart + 1.5 / 24.0, icu["stop"]])),
            "PATIENT": pid_of(np.concatenate([e["subject_id"][px], icu["subject_id"]])),
            "ENCOUNTER": np.concatenate([enc_ids[pos], enc_ids[ipos]]),
            "CODE": [p.snomed for p in proc] + [cat.SYNTHEA_ICU[0]] * icu["enc"].size,
            "DESCRIPTION": [p.snomed_desc for p in proc] + [cat.SYNTHEA_ICU[1]] * icu["enc"].size,
            "BASE_COST": np.full(px.size + icu["enc"].size, "1500.00"),
            "REASONCODE": [cat.CAUSES[c].snomed for c in cause] + [cat.CAUSES[c].snomed for c in icause],
            "REASONDESCRIPTION": [cat.CAUSES[c].snomed_desc for c in cause]
            + [cat.CAUSES[c].snomed_desc for c in icause]})
        return rows


_DRUG_CODE_IDS = np.array([cat.CODE_ID[f"RX_{d.key}"] for d in cat.DRUGS])
_DRUG_OF_CODE = np.full(len(cat.VOCAB.codes), -1, np.int64)
_DRUG_OF_CODE[_DRUG_CODE_IDS] = np.arange(len(cat.DRUGS))
_MEASURE_CODE_IDS = np.array([cat.CODE_ID[f"M_{m.key}"] for m in cat.MEASURES])
_MEASURE_OF_CODE = np.full(len(cat.VOCAB.codes), -1, np.int64)
_MEASURE_OF_CODE[_MEASURE_CODE_IDS] = np.arange(len(cat.MEASURES))
_PX_CODE_IDS = np.array([cat.CODE_ID[f"PX_{c.name}"] for c in cat.CAUSES if c.procedure is not None])
_BIT_OF_CODE = {cat.CODE_ID[f"COND_{c.name}"]: i for i, c in enumerate(cat.CONDITIONS)}
_ACUTE_OF_CODE = {cat.CODE_ID[f"ACUTE_{a.name}"]: i for i, a in enumerate(cat.ACUTES)}


def _reason_snomed(klass: np.ndarray, reason: np.ndarray) -> tuple[list[str | None], list[str | None]]:
    """SNOMED code and description of each encounter's reason (None for routine visits)."""
    codes: list[str | None] = []
    descs: list[str | None] = []
    for k, r in zip(klass.tolist(), reason.tolist(), strict=True):
        if k in (E_EMERGENCY, E_ELECTIVE):
            c = cat.CAUSES[r]
            codes.append(c.snomed)
            descs.append(c.snomed_desc)
        elif k == E_ACUTE:
            a = cat.ACUTES[r]
            codes.append(a.snomed)
            descs.append(a.snomed_desc)
        elif k == E_DIAGNOSIS:
            c2 = cat.CONDITIONS[r]
            codes.append(c2.snomed)
            descs.append(c2.snomed_desc)
        else:
            assert k == E_ROUTINE
            codes.append(None)
            descs.append(None)
    return codes, descs


def _dx_snomed(flag: np.ndarray, code: np.ndarray, klass: np.ndarray, reason: np.ndarray
               ) -> tuple[list[str], list[str], np.ndarray]:
    """SNOMED code, description and resolution (days) of each diagnosis row."""
    snomed, desc, res = [], [], np.full(flag.size, np.nan)
    for i, (f, c, r) in enumerate(zip(flag.tolist(), code.tolist(), reason.tolist(), strict=True)):
        if f == F_DX_PRINCIPAL:
            cause = cat.CAUSES[r]
            snomed.append(cause.snomed)
            desc.append(cause.snomed_desc)
        elif f == F_DX_ACUTE:
            a = cat.ACUTES[_ACUTE_OF_CODE[c]]
            snomed.append(a.snomed)
            desc.append(a.snomed_desc)
            res[i] = a.resolves_days
        else:
            cond = cat.CONDITIONS[_BIT_OF_CODE[c]]
            snomed.append(cond.snomed)
            desc.append(cond.snomed_desc)
    return snomed, desc, res


def _sorted(cols: dict[str, np.ndarray], first: str, then: str) -> dict[str, np.ndarray]:
    order = np.lexsort((cols[then], cols[first]))
    return {k: v[order] for k, v in cols.items()}


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (vectorised): a fast, well-spread 64-bit hash."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def uuids(seed: int, salt: int, ids: np.ndarray) -> np.ndarray:
    """Deterministic version-4-shaped UUID strings for integer ids (unique per seed, salt and id)."""
    ids = np.asarray(ids).astype(np.uint64)
    with np.errstate(over="ignore"):
        base = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt) * np.uint64(0xD1B54A32D192ED03)
        a = _mix(ids ^ base)
        b = _mix(a ^ np.uint64(0xA24BAED4963EE407) ^ ids)
    raw = np.stack([a, b], axis=1).view(np.uint8).reshape(-1, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    hexed = np.empty((raw.shape[0], 32), np.uint8)
    hexed[:, 0::2] = _HEX[raw >> 4]
    hexed[:, 1::2] = _HEX[raw & 0x0F]
    out = np.full((raw.shape[0], 36), ord("-"), np.uint8)
    for dst, src in ((slice(0, 8), slice(0, 8)), (slice(9, 13), slice(8, 12)), (slice(14, 18), slice(12, 16)),
                     (slice(19, 23), slice(16, 20)), (slice(24, 36), slice(20, 32))):
        out[:, dst] = hexed[:, src]
    return out.view("S36").ravel().astype("U36")


def dict_lookup(keys: np.ndarray, values: np.ndarray) -> Any:
    """A vectorised map from ``keys`` (unique) to ``values``."""
    order = np.argsort(keys)
    ks, vs = keys[order], values[order]

    def get(q: np.ndarray) -> np.ndarray:
        return vs[np.searchsorted(ks, q)]

    return get


def _date(days: np.ndarray) -> list[str | None]:
    d = np.asarray(days, dtype=np.float64)
    ok = np.isfinite(d)
    s = np.datetime_as_string(np.floor(np.where(ok, d, 0)).astype(np.int64).astype("datetime64[D]"))
    return np.where(ok, s, None).tolist()


def _iso(days: np.ndarray) -> list[str | None]:
    d = np.asarray(days, dtype=np.float64)
    ok = np.isfinite(d)
    s = np.datetime_as_string(_seconds(np.where(ok, d, 0)).astype("datetime64[s]"))
    return np.where(ok, np.char.add(s.astype(str), "Z"), None).tolist()


# --- notes ------------------------------------------------------------------------------------------------

_NEGATABLE = ("pneumonia", "heart failure", "atrial fibrillation", "a stroke", "a pulmonary embolism",
              "deep vein thrombosis", "sepsis", "chest pain", "diabetes", "chronic kidney disease", "COPD",
              "a urinary tract infection", "dementia", "cellulitis")
_NEG_TEMPLATES = ("No evidence of {}.", "Denies {}.", "No history of {}.", "{} has been ruled out.",
                  "No signs of {}.")
_FAMILY = ("Mother had breast cancer.", "Father had a myocardial infarction at 58.",
           "Family history of type 2 diabetes mellitus.", "Sister has asthma.", "Father had colon cancer.",
           "Mother had a stroke in her seventies.", "No relevant family history.",
           "Family history of hypertension in both parents.")
_HYPOTHETICAL = ("Advised to return if symptoms of {} develop.", "Safety-netted for {}.",
                 "Will monitor for possible {}.")


class NotesWriter:
    """Writes one note per primary-care visit and per discharge of a chunk to ``parts/notes.<chunk>.csv``."""

    def __init__(self, parts: Path, seed: int, subject_key: str = "int") -> None:
        self.parts = parts
        self.seed = seed
        self.subject_key = subject_key  # 'int': MEDS subject ids; 'uuid': Synthea patient ids
        parts.mkdir(parents=True, exist_ok=True)

    def write_chunk(self, chunk: Chunk) -> int:
        """Write the chunk's notes; returns how many."""
        import pyarrow as pa
        import pyarrow.csv as pcsv

        nt = chunk.notes
        n = nt["subject_id"].size
        if n == 0:
            return 0
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, chunk.index, 99]))
        order = np.lexsort((nt["time"], nt["subject_id"]))
        nt = {k: v[order] for k, v in nt.items()}
        sid = nt["subject_id"]
        male = dict_lookup(chunk.subjects["subject_id"], chunk.subjects["male"])(sid)
        fam = _mix(sid.astype(np.uint64) ^ np.uint64(self.seed)) % len(_FAMILY)
        neg_pick = rng.integers(0, len(_NEGATABLE), (n, 2))
        neg_tpl = rng.integers(0, len(_NEG_TEMPLATES), (n, 2))
        n_neg = rng.integers(0, 3, n)
        hypo = rng.random(n) < 0.15
        hypo_pick = rng.integers(0, len(_NEGATABLE), n)
        hypo_tpl = rng.integers(0, len(_HYPOTHETICAL), n)
        with_family = rng.random(n) < 0.3
        texts = []
        for i in range(n):
            cond = int(nt["cond"][i])
            names = [c.note for b, c in enumerate(cat.CONDITIONS) if (cond >> b) & 1]
            age = int(nt["age"][i])
            noun = ("man" if male[i] else "woman") if age >= 18 else ("boy" if male[i] else "girl")
            who = f"{age}-year-old {noun}" if age >= 2 else ("infant boy" if male[i] else "infant girl")
            kind, reason = int(nt["kind"][i]), int(nt["reason"][i])
            known = _join(names)
            if kind == N_DISCHARGE:
                cause = cat.CAUSES[reason]
                why = "for" if cause.admit == "ELECTIVE" else "with"
                parts = [f"Discharge summary. {who.capitalize()} admitted {why} {cause.note}."]
                parts.append(f"Comorbidities: {known}." if names else "No significant comorbidities.")
                parts.append("The patient died during this admission." if nt["died"][i]
                             else "Discharged in a stable condition.")
            elif kind == N_DIAGNOSIS:
                new = cat.CONDITIONS[reason].note
                others = _join([x for x in names if x != new])
                parts = [f"{who.capitalize()} reviewed in clinic. New diagnosis of {new}."]
                if others:
                    parts.append(f"Also known to have {others}.")
            elif kind == N_ACUTE:
                parts = [f"{who.capitalize()} presenting with {cat.ACUTES[reason].note}."]
                parts.append(f"Background of {known}." if names else "Otherwise well.")
            else:
                parts = [f"Routine review: {who}."]
                parts.append(f"Known {known}; stable." if names else "No significant past medical history.")
            lowered = " ".join(parts).lower()
            for j in range(int(n_neg[i]) if age >= 18 else 0):
                term = _NEGATABLE[neg_pick[i, j]]
                if term.removeprefix("a ") not in lowered:
                    text = _NEG_TEMPLATES[neg_tpl[i, j]].format(term)
                    parts.append(text[0].upper() + text[1:])
            if hypo[i]:
                term = _NEGATABLE[hypo_pick[i]]
                if term.removeprefix("a ") not in lowered:
                    parts.append(_HYPOTHETICAL[hypo_tpl[i]].format(term))
            if with_family[i]:
                parts.append(_FAMILY[fam[i]])
            texts.append(" ".join(parts))
        subject = uuids(self.seed, 1, sid) if self.subject_key == "uuid" else sid
        table = pa.table({"subject_id": subject, "time": _iso(nt["time"]), "text": texts})
        with open(self.parts / f"notes.{chunk.index:06d}.csv", "wb") as fh:
            pcsv.write_csv(table, fh, pcsv.WriteOptions(include_header=False, quoting_style="needed"))
        return n


def _join(names: list[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]
