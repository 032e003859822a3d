"""What a load reports: its errors, the accounting of each input table and the summary of the whole load."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class SourceError(Exception):
    """An input that cannot be loaded at all (missing required file, missing column, not a CSV)."""


class ReconciliationError(Exception):
    """Rows read did not equal rows loaded + quarantined + dropped: something would be silently lost."""


@dataclass
class TableResult:
    """Accounting for one input table of a load."""

    table: str
    file: str
    sha256: str
    rows_read: int = 0
    rows_loaded: int = 0
    rows_quarantined: int = 0
    rows_dropped: int = 0
    events: int = 0
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    notes: int = 0


@dataclass(frozen=True)
class CsvScan:
    """What :meth:`Load.scan_csv` read: row count, quarantined lines (line, reason, raw), unknown columns."""

    table: str
    file: str
    sha256: str
    rows: int
    quarantine: list[tuple[int, str, str]]
    unknown_columns: list[str]
    path: Path | None = None  # the CSV file read, to map its record numbers to physical lines at quarantine time


@dataclass
class LoadSummary:
    """What a load did; ``to_json()`` is the ``--json`` contract shared by every source."""

    run_id: str
    source: str
    source_kind: str
    db: str
    input_path: str
    subjects: int
    events: int
    events_by_kind: dict[str, int]
    rows_read: int
    rows_loaded: int
    rows_quarantined: int
    rows_dropped: int
    dropped_reasons: dict[str, int]
    seconds: float
    tables: list[TableResult]
    missing_tables: list[str]
    warnings: list[str]
    notes: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tables"] = {t.table: {k: v for k, v in asdict(t).items() if k != "table"} for t in self.tables}
        return d
