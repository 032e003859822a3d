"""Input adapters: each turns one input format into MEDS events in the warehouse.

A source module exposes ``SOURCE_KIND``, ``GROUPS`` (table groups, the unit of retry), ``check_input(path)``,
``stage_group(load, root, group)``, ``stage_codes(load, root)`` and ``load(con, path, ...)``; see
:mod:`foresight.warehouse` for the staging/publish contract they share.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

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


def load_sequentially(module_name: str, con: Any, input_path: str | Path, *, source: str,
                      on_group_done: Callable[[str], None] | None = None) -> Any:
    """The load of an adapter that needs no scheduling of its own: check the input, stage every table group in
    order, stage the code metadata, publish in one transaction. Returns the LoadSummary."""
    from foresight.warehouse import Load

    module = sys.modules[module_name]
    root = module.check_input(Path(input_path))
    session = Load(con, source=source, source_kind=module.SOURCE_KIND, input_path=root)
    for group in module.GROUPS:
        module.stage_group(session, root, group)
        if on_group_done is not None:
            on_group_done(group.name)
    module.stage_codes(session, root)
    return session.publish()
