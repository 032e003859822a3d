"""Input adapters: each turns one input format into MEDS events in the warehouse.

:func:`load` is the one entry point: ``load("mimic-iv", con, path, exclude_subjects=ids)``. It runs the one
driver (:func:`foresight.sources.base.run_load`) over the adapter module of that kind; see
:mod:`foresight.sources.base` for what an adapter module exposes and :mod:`foresight.warehouse` for the
staging/publish contract they share.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import duckdb

from foresight.sources.base import Group, finish_load, new_load, open_load, run_load, stage_one
from foresight.warehouse import LoadSummary

__all__ = ["SOURCES", "Group", "finish_load", "get_source", "load", "new_load", "open_load", "stage_one"]

# source kind -> module; imported lazily so one source's dependencies never slow another's CLI.
SOURCES: dict[str, str] = {
    "mimic-iv": "foresight.sources.mimic_iv",
    "synthea": "foresight.sources.synthea",
    "fhir": "foresight.sources.fhir",
    "meds": "foresight.sources.meds",
    "notes": "foresight.sources.notes",  # needs a MedCAT model pack: model_pack= or $FORESIGHT_MODEL_PACK
}


def get_source(kind: str) -> ModuleType:
    """The adapter module for a source kind, or a ValueError listing the kinds there are."""
    try:
        return importlib.import_module(SOURCES[kind])
    except KeyError:
        raise ValueError(f"unknown source {kind!r}; known sources: {', '.join(sorted(SOURCES))}") from None


def load(kind: str, con: duckdb.DuckDBPyConnection, path: str | Path, *, source: str | None = None,
         exclude_subjects: Iterable[int] | None = None, on_group_done: Callable[[str], None] | None = None,
         **options: Any) -> LoadSummary:
    """Load ``path`` with the adapter of ``kind`` into the warehouse behind ``con``; returns the LoadSummary.

    ``source``: the load's name (default ``kind``); a re-run with the same name replaces its rows.
    ``exclude_subjects``: national data opt-out, subject ids whose rows are dropped. ``on_group_done(name)``
    after each table group. ``options`` go to the adapter's ``stage_group`` (notes: ``model_pack``,
    ``n_process``, ``history_days``, ``vocab``, ``progress``). Raises ``ValueError`` for an unknown kind,
    ``SourceError`` for an input that cannot be loaded, ``ReconciliationError`` when accounting fails.
    """
    return run_load(get_source(kind), con, path, source=source, exclude_subjects=exclude_subjects,
                    on_group_done=on_group_done, **options)
