"""Input adapters: each turns one input format into MEDS events in the warehouse.

A source module exposes ``SOURCE_KIND``, ``GROUPS`` (table groups, the unit of retry), ``check_input(path)``,
``stage_group(load, root, group)``, ``stage_codes(load, root)`` and ``load(con, path, ...)``; see
:mod:`foresight.warehouse` for the staging/publish contract they share.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# source kind -> module; imported lazily so one source's dependencies never slow another's CLI.
SOURCES: dict[str, str] = {
    "mimic-iv": "foresight.sources.mimic_iv",
    "synthea": "foresight.sources.synthea",
    "fhir": "foresight.sources.fhir",
    "meds": "foresight.sources.meds",
    "notes": "foresight.sources.notes",  # needs a MedCAT model pack: --model-pack or $FORESIGHT_MODEL_PACK
}


def get_source(kind: str) -> ModuleType:
    """The adapter module for a source kind, or a ValueError listing the kinds there are."""
    try:
        return importlib.import_module(SOURCES[kind])
    except KeyError:
        raise ValueError(f"unknown source {kind!r}; known sources: {', '.join(sorted(SOURCES))}") from None
