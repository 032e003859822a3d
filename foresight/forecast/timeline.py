"""The prompt every forecast starts from: a subject's timeline so far, as token ids, and where its clock stands."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

DAY = 86400.0  # seconds: token gaps are in seconds, windows and horizons in days
MIN_TIME, MAX_TIME = datetime(1800, 1, 1), datetime(2400, 1, 1)  # shifted MIMIC dates reach the 2200s


def parse_time(value: Any, what: str = "time") -> datetime | None:
    """A posted time as a datetime: None, a datetime, or an ISO 8601 string (``2024-03-01T08:30:00``, with or
    without an offset); anything else is a ValueError naming ``what``. Not yet converted: see :func:`utc_naive`."""
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str):  # a bare number is ambiguous: seconds? days? since when?
        raise ValueError(f"{what}: must be an ISO 8601 date-time string, e.g. 2024-03-01T08:30:00 "
                         f"(got {type(value).__name__})")
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ValueError(f"{what}: {value[:40]!r} is not an ISO 8601 date-time, e.g. 2024-03-01T08:30:00") from exc


def utc_naive(t: datetime | None, what: str = "time") -> datetime | None:
    """UTC-naive, the warehouse's convention (an offset is converted to UTC); out-of-range times are an error."""
    if t is None:
        return None
    if t.tzinfo is not None:
        t = t.astimezone(UTC).replace(tzinfo=None)
    if not MIN_TIME <= t < MAX_TIME:
        raise ValueError(f"{what} {t.isoformat()} is outside {MIN_TIME.year}-{MAX_TIME.year - 1}")
    return t


def event_time(value: Any, what: str = "time") -> datetime | None:
    """:func:`parse_time` then :func:`utc_naive`: how the service and the Python API read every posted time."""
    return utc_naive(parse_time(value, what), what)


@dataclass
class Timeline:
    """A prompt: token ids of a timeline so far, the time its token clock stands at, and what it is about."""

    tokens: np.ndarray
    clock: datetime  # true time of the last event: the future's token gaps count from here
    as_of: datetime  # when the forecast is made (>= clock); the future starts here
    birth: datetime | None = None
    subject_id: int | None = None
    dead: bool = False
