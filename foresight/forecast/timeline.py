"""The prompt every forecast starts from: a subject's timeline so far, as token ids, and where its clock stands."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np

DAY = 86400.0  # seconds: token gaps are in seconds, windows and horizons in days


@dataclass
class Timeline:
    """A prompt: token ids of a timeline so far, the time its token clock stands at, and what it is about."""

    tokens: np.ndarray
    clock: datetime  # true time of the last event: the future's token gaps count from here
    as_of: datetime  # when the forecast is made (>= clock); the future starts here
    birth: datetime | None = None
    subject_id: int | None = None
    dead: bool = False
