"""Small-cell suppression: how an aggregate count may be published (the service's rule, used by every output
that leaves the building: the query service, ``foresight forecast --strata``, the forecast flow's artifacts).

Every count is shown as ``"<8"`` when it is 0-7 (an empty cell included, so 0 and 1 look alike) and otherwise
rounded to the nearest 5 (NHS / OpenSAFELY practice; both numbers configurable). Differencing across requests is
the service's concern (:mod:`foresight.serve.disclosure`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SuppressionRule:
    """How aggregate counts are released: 0..threshold-1 -> "<threshold"; others rounded to ``rounding``.

    ``threshold`` is also the smallest cohort the service forecasts for, and the smallest difference (in
    subjects, or in events of one week) it allows between two released cohorts (:mod:`foresight.serve.disclosure`).
    """

    threshold: int = 8
    rounding: int = 5

    def __post_init__(self) -> None:
        if self.threshold < 1 or self.rounding < 1:
            raise ValueError("the small-cell threshold and the rounding must be >= 1")


def suppress_count(value: float, rule: SuppressionRule = SuppressionRule()) -> int | str:
    """A count (or an expected count, rounded first) as it may be released.

    Zero is suppressed like 1-7: were it shown, a cell of 0 beside the same cell of 1 one request later (a
    cohort with one subject added) would tell who that subject is and when their event was.

    >>> [suppress_count(x) for x in (0, 0.4, 1, 7, 7.4, 8, 12, 13, 101)]
    ['<8', '<8', '<8', '<8', '<8', 10, 10, 15, 100]
    >>> suppress_count(3, SuppressionRule(threshold=3, rounding=1))
    3
    """
    if not math.isfinite(value):
        raise ValueError(f"not a count: {value}")
    n = round(float(value))
    if n < rule.threshold:  # 0 included: an empty cell and a cell of one person look alike
        return f"<{rule.threshold}"
    # never round a cell at or above the threshold down to zero
    return max(rule.rounding, rule.rounding * round(n / rule.rounding))
