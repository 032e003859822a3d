"""The one place where Foresight's data contracts are defined.

Everything that reads or writes the warehouse imports its names from here: the MEDS core columns, the
code-naming rule, the warehouse table names and the MEDS split names. Their SQL twins live next to the other SQL:
the DDL of every warehouse table in ``foresight/sql/common/warehouse.sql`` and the macros sources use to build
codes and parse times in ``foresight/sql/common/macros.sql``. Nothing else in the project spells these out again.

MEDS (Medical Event Data Standard, v0.4; the types are the `meds` package's own schemas) core data columns::

    subject_id BIGINT      who the event is about
    time TIMESTAMP         when it became known (NULL only for static facts such as GENDER)
    code VARCHAR           what happened: KIND//VOCAB//VALUE (see `make_code`)
    numeric_value FLOAT    a measurement, NULL if none (float32 in MEDS parquet)
    text_value VARCHAR     a free-text or categorical value, NULL if none

Foresight keeps extra columns after the core ones (allowed by MEDS): ``unit``, ``encounter_id`` (the source's
admission/encounter id, as text), and lineage: ``source`` (which load owns the row), ``source_table`` (the
file it came from) and ``load_id`` (the ``etl_runs.run_id`` that wrote it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # pyarrow (and meds) cost ~50 MB of RSS at import; only the MEDS reader/writer needs them
    import pyarrow as pa

# --- MEDS core ---------------------------------------------------------------------------------------------

# The MEDS version Foresight writes and reads: that of the `meds` package, whose schemas (meds.DataSchema, ...)
# the MEDS export and the MEDS source validate against.
MEDS_VERSION: Final = importlib.metadata.version("meds")
CORE_COLUMNS: Final = ("subject_id", "time", "code", "numeric_value", "text_value")
EXTRA_COLUMNS: Final = ("unit", "encounter_id", "source", "source_table", "load_id")
EVENT_COLUMNS: Final = CORE_COLUMNS + EXTRA_COLUMNS

BIRTH_CODE: Final = "MEDS_BIRTH"
DEATH_CODE: Final = "MEDS_DEATH"

TRAIN: Final = "train"
TUNING: Final = "tuning"
HELD_OUT: Final = "held_out"
SPLITS: Final = (TRAIN, TUNING, HELD_OUT)
# Percent buckets of the stable subject hash: [0, 80) train, [80, 90) tuning, [90, 100) held_out.
SPLIT_BUCKETS: Final = {TRAIN: (0, 80), TUNING: (80, 90), HELD_OUT: (90, 100)}


def meds_data_schema() -> pa.Schema:
    """MEDS data parquet types, the ``meds`` package's own (``meds.DataSchema``): int64 subject, timestamp[us]
    time, string code, float32 value, large_string text. MEDS allows extra columns after these."""
    from meds import DataSchema

    return DataSchema.schema()


def meds_codes_schema() -> pa.Schema:
    """MEDS ``metadata/codes.parquet`` types (``meds.CodeMetadataSchema``)."""
    from meds import CodeMetadataSchema

    return CodeMetadataSchema.schema()


def meds_splits_schema() -> pa.Schema:
    """MEDS ``metadata/subject_splits.parquet`` types (``meds.SubjectSplitSchema``)."""
    from meds import SubjectSplitSchema

    return SubjectSplitSchema.schema()


# --- Codes -------------------------------------------------------------------------------------------------
# A code is KIND//VOCAB//VALUE (or KIND//VALUE where the kind needs no vocabulary, e.g. ADMIT//EMERGENCY),
# with an upper-case KIND. Parts never contain the separator "//"; whitespace inside a part becomes "_" so
# that codes are single tokens a reader can copy. MEDS_BIRTH and MEDS_DEATH are the MEDS special codes.

SEP: Final = "//"

# Kinds used across sources. A source may add a kind; it must be upper-case and listed here first, so
# the tokenizer, the forecast tasks and the privacy slices can rely on the set.
KINDS: Final = {
    "MEDS": "MEDS special codes (birth, death)",
    "GENDER": "administrative sex (static)",
    "RACE": "race/ethnicity as recorded",
    "ETHNICITY": "ethnicity as recorded (where separate from race)",
    "INSURANCE": "payer at admission",
    "LANGUAGE": "preferred language at admission",
    "MARITAL": "marital status at admission",
    "ED": "emergency department registration / departure",
    "ADMIT": "hospital admission, by class (EMERGENCY, URGENT, ELECTIVE, OBSERVATION, ...)",
    "DISCHARGE": "hospital discharge, by discharge location",
    "TRANSFER": "ward transfer (event type // care unit)",
    "SERVICE": "clinical service change",
    "ICU": "ICU stay admission / discharge",
    "ENCOUNTER": "non-hospital encounter (ambulatory, wellness, ...)",
    "DX": "diagnosis (ICD-9-CM, ICD-10-CM, SNOMED ...)",
    "PX": "procedure (ICD-9 procedure, ICD-10-PCS, HCPCS, SNOMED, ICU procedure items)",
    "PX_END": "end of a timed ICU procedure",
    "DRG": "diagnosis-related group assigned at discharge",
    "RX_START": "medication order start",
    "RX_STOP": "medication order stop",
    "RX_ADMIN": "medication administration",
    "RX": "medication (generic, e.g. simulator/ATC)",
    "LAB": "laboratory result (value in numeric_value / text_value)",
    "MICRO": "microbiology test, organism or susceptibility",
    "VITAL": "outpatient measurement (blood pressure, weight, BMI ...)",
    "INPUT_START": "ICU input (infusion / bolus) start, rate in numeric_value",
    "INPUT_END": "ICU input end, amount in numeric_value",
    "OUTPUT": "ICU fluid output, volume in numeric_value",
    "CHART": "ICU charted observation",
    "DATETIME": "ICU date-valued observation (recorded time; the date is in text_value)",
    "NOTE": "concept found in free text",
    "IMMUNIZATION": "vaccination",
    "ALLERGY": "allergy",
    "DX_END": "diagnosis resolved (Synthea condition STOP, FHIR Condition.abatement)",
    "CAREPLAN": "care plan started",
    "CAREPLAN_END": "care plan ended",
    "DEVICE": "device in use (start)",
    "DEVICE_END": "device removed / no longer in use",
    "IMAGING": "imaging series: IMAGING//<DICOM modality>//<SNOMED body site>",
    "REPORT": "diagnostic report issued (FHIR DiagnosticReport, e.g. a lab panel)",
}

_PART_WS = re.compile(r"\s+")
_SLASHES = re.compile(r"/{2,}")


def code_part(value: object) -> str:
    """Normalise one part of a code: trimmed, upper-cased, inner whitespace as ``_``, no ``//``.

    >>> code_part("  ew emer. ")
    'EW_EMER.'
    >>> code_part("BLACK/CAPE VERDEAN")
    'BLACK/CAPE_VERDEAN'
    """
    text = _SLASHES.sub("/", _PART_WS.sub("_", str(value).strip().upper()))
    return text or "UNK"


def make_code(kind: str, *parts: object) -> str:
    """Build a code from its kind and parts, following the naming rule.

    >>> make_code("DX", "ICD10CM", "E119")
    'DX//ICD10CM//E119'
    >>> make_code("admit", "emergency")
    'ADMIT//EMERGENCY'
    """
    kind_norm = code_part(kind)
    if kind_norm not in KINDS:
        raise ValueError(f"unknown code kind {kind!r}; add it to foresight.schema.KINDS first")
    return SEP.join([kind_norm, *(code_part(p) if p is not None else "UNK" for p in parts)])


def code_kind(code: str) -> str:
    """The KIND of a code (``MEDS`` for the MEDS special codes).

    >>> code_kind("DX//ICD10CM//E119"), code_kind("MEDS_DEATH")
    ('DX', 'MEDS')
    """
    if code.startswith("MEDS_"):
        return "MEDS"
    return code.split(SEP, 1)[0]


# The same rules in SQL (fs_part, fs_kind, fs_uuid_subject, fs_split, the row checks): foresight/sql/common/macros.sql,
# installed on every connection by foresight.warehouse.connect().


def split_of(subject_id: int) -> str:
    """The MEDS split of a subject: a stable hash, so it never changes when data is added.

    Same rule as the ``fs_split`` SQL macro (md5 of the decimal id, first 32 bits, mod 100).

    >>> split_of(10000032)
    'tuning'
    """
    bucket = int(hashlib.md5(str(subject_id).encode()).hexdigest()[:8], 16) % 100
    for split, (lo, hi) in SPLIT_BUCKETS.items():
        if lo <= bucket < hi:
            return split
    raise AssertionError("unreachable: buckets cover 0..99")


# Subject ids for sources whose patient ids are not integers (Synthea and FHIR use UUIDs). The id is a stable
# hash of the normalised (trimmed, lower-case) patient id, so it is the same in every warehouse, in every load
# order, and for the CSV and the FHIR copy of one Synthea export; ids live in [2**62, 2**63), above any integer id
# a source such as MIMIC-IV or a MEDS dataset uses, so the two never collide. With 62 bits a collision between two
# patients has probability ~n**2 / 2**63 (1e-5 for 10 million patients); loads check for one and refuse it.
UUID_SUBJECT_BASE: Final = 1 << 62


def uuid_subject_id(source_id: str) -> int:
    """The subject id of a UUID-keyed patient (same rule as the ``fs_uuid_subject`` SQL macro).

    >>> a = uuid_subject_id("593aaa05-d864-1df7-5b96-155fbdb19f28")
    >>> a == uuid_subject_id(" 593AAA05-D864-1DF7-5B96-155FBDB19F28")
    True
    >>> a >= UUID_SUBJECT_BASE
    True
    """
    digest = int(hashlib.md5(source_id.strip().lower().encode()).hexdigest()[:16], 16)
    return UUID_SUBJECT_BASE + digest % UUID_SUBJECT_BASE


# --- Warehouse tables --------------------------------------------------------------------------------------
# Their DDL is foresight/sql/common/warehouse.sql (run by foresight.warehouse.connect()).

WAREHOUSE_TABLES: Final = (
    "events",
    "codes",
    "subject_splits",
    "subject_map",
    "etl_runs",
    "etl_tables",
    "load_declarations",
    "quarantine",
    "notes",
)
