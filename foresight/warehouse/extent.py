"""How far a warehouse's records reach in time."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def extract_end(con: Any) -> datetime | None:
    """When the warehouse's records end: its last timed event (None when it holds none). Lives still going on
    there are censored at this date: tokenize records it, training treats ``[END]`` as censoring at it
    (:mod:`foresight.censoring`) and the sampler lets a future stop there."""
    return con.execute("SELECT max(time) FROM events WHERE code <> 'MEDS_BIRTH'").fetchall()[0][0]
