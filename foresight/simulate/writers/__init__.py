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

Modules: :mod:`~foresight.simulate.writers.meds`, :mod:`~foresight.simulate.writers.synthea`,
:mod:`~foresight.simulate.writers.notes`, and :mod:`~foresight.simulate.writers.common` (what they share).
"""

from __future__ import annotations

from foresight.simulate.writers.common import assemble_parts, dict_lookup, uuids
from foresight.simulate.writers.meds import (
    meds_columns,
    meds_data_schema_with_unit,
    meds_table,
    write_meds_chunk,
    write_meds_metadata,
    write_simulator_json,
)
from foresight.simulate.writers.notes import NotesWriter
from foresight.simulate.writers.synthea import (
    SYNTHEA_DATA_FILES,
    SYNTHEA_HEADERS,
    SyntheaWriter,
    write_synthea_static,
)

__all__ = ["SYNTHEA_DATA_FILES", "SYNTHEA_HEADERS", "NotesWriter", "SyntheaWriter", "assemble_parts", "dict_lookup",
           "meds_columns", "meds_data_schema_with_unit", "meds_table", "uuids", "write_meds_chunk",
           "write_meds_metadata", "write_simulator_json", "write_synthea_static"]
