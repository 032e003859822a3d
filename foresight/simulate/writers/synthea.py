"""Write simulated chunks as a Synthea-style CSV export (``csv/``).

The column layout of a real Synthea CSV export (patients, encounters, conditions, medications, observations,
procedures, organizations, providers, payers; the other Synthea files with their header only), with Synthea's
vocabularies: SNOMED CT conditions and procedures, RxNorm medications, LOINC observations, UUID ids. What Synthea
has no place for is left out: discharge coding of known conditions, discharge destinations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from foresight.simulate import catalog as cat
from foresight.simulate.cohort import Chunk
from foresight.simulate.state import (
    E_ACUTE,
    E_DIAGNOSIS,
    E_ELECTIVE,
    E_EMERGENCY,
    E_ROUTINE,
    F_DX_ACUTE,
    F_DX_CHRONIC,
    F_DX_PRINCIPAL,
)
from foresight.simulate.writers.common import dates, dict_lookup, iso_times, mix64, sorted_by, uuids


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
            return _ChunkExport(chunk, self.seed, files).write()
        finally:
            for fh in files.values():
                fh.close()


class _ChunkExport:
    """One chunk as the Synthea data files: one method per file, all reading the same sorted tables and ids."""

    def __init__(self, chunk: Chunk, seed: int, files: dict[str, Any]) -> None:
        self.seed, self.end, self.files = seed, chunk.data_end, files
        self.s = chunk.subjects
        # Rows by patient, then time, like a Synthea export.
        self.e = sorted_by(chunk.events, "subject_id", "time")
        self.enc = sorted_by(chunk.encounters, "subject_id", "start")
        self.icu = sorted_by(chunk.icu, "subject_id", "start")
        self.code = self.e["code"].astype(np.int64)
        self.pid = uuids(seed, 1, self.s["subject_id"])
        self.pid_of = dict_lookup(self.s["subject_id"], self.pid)
        self.klass = self.enc["klass"].astype(np.int64)
        self.enc_ids = uuids(seed, 2, self.enc["enc"])
        self.enc_order = np.argsort(self.enc["enc"])
        self.enc_sorted = self.enc["enc"][self.enc_order]
        self.rows: dict[str, int] = {}

    def write(self) -> dict[str, int]:
        """Write every data file; returns rows per file."""
        for name, write in (("patients", self.patients), ("encounters", self.encounters),
                            ("conditions", self.conditions), ("medications", self.medications),
                            ("observations", self.observations), ("procedures", self.procedures)):
            self.rows[name] = _write_csv(self.files[name], name, write())
        return self.rows

    def enc_pos(self, ids: np.ndarray) -> np.ndarray:
        """Row of each encounter id in the (sorted) encounters table."""
        return self.enc_order[np.searchsorted(self.enc_sorted, ids)]

    def patients(self) -> dict[str, Any]:
        s = self.s
        sid = s["subject_id"]
        n = sid.size
        h = mix64(sid.astype(np.uint64) ^ np.uint64(self.seed * 7919 + 17))
        male = s["male"]
        first = np.where(male, np.array(_FIRST_M)[h % len(_FIRST_M)], np.array(_FIRST_F)[h % len(_FIRST_F)])
        city = (h >> np.uint64(8)) % len(_CITY)
        age_end = (self.end - s["birth"]) / 365.25
        return {
            "Id": self.pid, "BIRTHDATE": dates(s["birth"]), "DEATHDATE": dates(s["death"]),
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
            "HEALTHCARE_COVERAGE": np.round(500.0 + 300.0 * np.maximum(age_end, 0), 2).astype(str)}

    def encounters(self) -> dict[str, Any]:
        enc, klass = self.enc, self.klass
        cls = np.array([cat.SYNTHEA_ENCOUNTER[k] for k in ("routine", "acute", "diagnosis", "EMERGENCY",
                                                          "ELECTIVE")], dtype=object)
        reason_code, reason_desc = _reason_snomed(klass, enc["reason"].astype(np.int64))
        stop = np.where(np.isnan(enc["stop"]), np.nan, enc["stop"])
        cost = np.where(klass >= E_EMERGENCY, 9500.0, 120.0)
        n = enc["enc"].size
        return {
            "Id": self.enc_ids, "START": iso_times(enc["start"]), "STOP": iso_times(stop),
            "PATIENT": self.pid_of(enc["subject_id"]), "ORGANIZATION": np.full(n, _ORG),
            "PROVIDER": np.full(n, _PROVIDER), "PAYER": np.full(n, _PAYER),
            "ENCOUNTERCLASS": [c[0] for c in cls[klass]], "CODE": [c[1] for c in cls[klass]],
            "DESCRIPTION": [c[2] for c in cls[klass]], "BASE_ENCOUNTER_COST": cost.astype(str),
            "TOTAL_CLAIM_COST": cost.astype(str), "PAYER_COVERAGE": np.round(cost * 0.8, 2).astype(str),
            "REASONCODE": reason_code, "REASONDESCRIPTION": reason_desc}

    def conditions(self) -> dict[str, Any]:
        """Diagnoses made in primary care and the principal diagnosis of each stay."""
        e, enc = self.e, self.enc
        flag = e["flag"]
        rows_c = np.flatnonzero(np.isin(flag, (F_DX_CHRONIC, F_DX_ACUTE, F_DX_PRINCIPAL)) & (e["enc"] >= 0))
        pos = self.enc_pos(e["enc"][rows_c])
        fl = flag[rows_c]
        start = np.where(fl == F_DX_PRINCIPAL, enc["start"][pos], e["time"][rows_c])
        snomed, desc, resolves = _dx_snomed(fl, self.code[rows_c], self.klass[pos],
                                            enc["reason"][pos].astype(np.int64))
        cstop = np.where(fl == F_DX_PRINCIPAL, e["time"][rows_c],
                         np.where(fl == F_DX_ACUTE, e["time"][rows_c] + resolves, np.nan))
        cstop = np.where(cstop < self.end, cstop, np.nan)
        return {"START": dates(start), "STOP": dates(cstop), "PATIENT": self.pid_of(e["subject_id"][rows_c]),
                "ENCOUNTER": self.enc_ids[pos], "CODE": snomed, "DESCRIPTION": desc}

    def medications(self) -> dict[str, Any]:
        e = self.e
        rx_rows = np.flatnonzero(np.isin(self.code, _DRUG_CODE_IDS))
        drug = _DRUG_OF_CODE[self.code[rx_rows]]
        pos = self.enc_pos(e["enc"][rx_rows])
        course = np.array([d.course_days if not d.chronic else np.nan for d in cat.DRUGS])[drug]
        mstop = e["time"][rx_rows] + course
        mstop = np.where(mstop < self.end, mstop, np.nan)
        rcode, rdesc = _reason_snomed(self.klass[pos], self.enc["reason"][pos].astype(np.int64))
        n = rx_rows.size
        return {
            "START": iso_times(e["time"][rx_rows]), "STOP": iso_times(mstop),
            "PATIENT": self.pid_of(e["subject_id"][rx_rows]), "PAYER": np.full(n, _PAYER),
            "ENCOUNTER": self.enc_ids[pos], "CODE": np.array([d.rxnorm for d in cat.DRUGS])[drug],
            "DESCRIPTION": np.array([d.rxnorm_desc for d in cat.DRUGS])[drug],
            "BASE_COST": np.full(n, "12.50"), "PAYER_COVERAGE": np.full(n, "10.00"),
            "DISPENSES": np.full(n, "1"), "TOTALCOST": np.full(n, "12.50"),
            "REASONCODE": rcode, "REASONDESCRIPTION": rdesc}

    def observations(self) -> dict[str, Any]:
        e = self.e
        ob = np.flatnonzero(np.isin(self.code, _MEASURE_CODE_IDS))
        meas = _MEASURE_OF_CODE[self.code[ob]]
        return {
            "DATE": iso_times(e["time"][ob]), "PATIENT": self.pid_of(e["subject_id"][ob]),
            "ENCOUNTER": self.enc_ids[self.enc_pos(e["enc"][ob])],
            "CATEGORY": np.array(["laboratory" if m.kind == "LAB" else "vital-signs" for m in cat.MEASURES])[meas],
            "CODE": np.array([m.loinc for m in cat.MEASURES])[meas],
            "DESCRIPTION": np.array([m.desc for m in cat.MEASURES])[meas],
            "VALUE": pc.cast(pa.array(e["value"][ob].astype(np.float32)), pa.string()),
            "UNITS": np.array([m.unit for m in cat.MEASURES])[meas], "TYPE": np.full(ob.size, "numeric")}

    def procedures(self) -> dict[str, Any]:
        """Surgery of elective/emergency stays, and ICU stays."""
        e, enc, icu, enc_ids = self.e, self.enc, self.icu, self.enc_ids
        px = np.flatnonzero(np.isin(self.code, _PX_CODE_IDS))
        pos = self.enc_pos(e["enc"][px])
        cause = enc["reason"][pos].astype(np.int64)
        proc = [cat.CAUSES[c].procedure for c in cause]
        pstart = enc["start"][pos] + 3.0 / 24.0
        ipos = self.enc_pos(icu["enc"])
        icause = enc["reason"][ipos].astype(np.int64)
        return {
            "START": iso_times(np.concatenate([pstart, icu["start"]])),
            "STOP": iso_times(np.concatenate([pstart + 1.5 / 24.0, icu["stop"]])),
            "PATIENT": self.pid_of(np.concatenate([e["subject_id"][px], icu["subject_id"]])),
            "ENCOUNTER": np.concatenate([enc_ids[pos], enc_ids[ipos]]),
            "CODE": [p.snomed for p in proc] + [cat.SYNTHEA_ICU[0]] * icu["enc"].size,
            "DESCRIPTION": [p.snomed_desc for p in proc] + [cat.SYNTHEA_ICU[1]] * icu["enc"].size,
            "BASE_COST": np.full(px.size + icu["enc"].size, "1500.00"),
            "REASONCODE": [cat.CAUSES[c].snomed for c in cause] + [cat.CAUSES[c].snomed for c in icause],
            "REASONDESCRIPTION": [cat.CAUSES[c].snomed_desc for c in cause]
            + [cat.CAUSES[c].snomed_desc for c in icause]}


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

