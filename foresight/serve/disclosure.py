"""Disclosure control for ``/v1/cohort-rate``: an aggregate endpoint that cannot be differenced.

The attack (issue 17, defect 2). Suppressing small cells one response at a time does not protect anyone when the
caller shapes the cohort: ``cohort_codes: [I10]`` gives a history of zeros, ``[I10, Z9049]`` adds exactly one
person and the week of their diagnosis reads ``"<8"`` where it read ``0``. Subtracting two outputs that differ
by one subject isolates that subject, whatever each output shows on its own. Rounding alone does not stop it
either: 12 -> 10 and 13 -> 15, so at a rounding edge the extra person shows.

What practice says. OpenSAFELY redacts every count <= 7 and rounds all counts to the nearest 5, and names the
residual risk itself: secondary disclosure from "the same analysis run at different time points" and from
"different, but potentially overlapping population definitions"; it is met by two human output checkers who
compare each release with earlier ones. ONS / UK SDC guidance asks for minimum cell and minimum population
thresholds, rounding that covers zeros, and (ABS TableBuilder) perturbation that is *consistent*: the same cell
always gets the same answer, so repeating a query averages nothing away. A service that answers at once has no
output checker, so the comparison with earlier releases has to be made by the service itself.

What this service does (all four, each for a reason):

1. **Minimum cohort.** A cohort of fewer than ``threshold`` (8) subjects gets no forecast and no history, only
   ``cohort_size: "<8"``.
2. **Every cell suppressed or rounded, zero included.** 0-7 -> ``"<8"``, else the nearest 5
   (:func:`foresight.serve.security.suppress_count`): an empty cell and a cell of one look alike.
3. **A fixed calendar grid.** ``as_of`` is moved to the Monday (00:00) of its week, so every history cell is a
   fixed calendar week: shifting ``as_of`` by a day cannot produce two overlapping windows whose difference is
   one day's events; two requests see either the same week or disjoint weeks.
4. **No release close to an earlier one** (:class:`ReleaseGuard`). The service keeps, for the life of the
   process and across all keys (colluding keys, or one person with two, difference just as well), every
   released subject set (the cohort behind ``cohort_size``, the subjects behind the cells) and, per calendar
   week, the set of events behind each history cell. A request whose subject set differs from a released one
   by 1..threshold-1 subjects, or whose cell for some week differs from a released cell of that week by
   1..threshold-1 events, is refused (403) before any sampling. The same set again is fine (it discloses
   nothing new); so is a set that differs by >= threshold (the ordinary threshold protects the difference).
   This holds however the near-copy was made: another ``cohort_codes``, ``split``, ``max_subjects``, ``seed``,
   ``as_of``, or ``codes`` (which changes the events behind a cell, not the subjects). The forecast weeks are
   model output over the subject set, so the subject rule covers them.

Costs and limits. Refusals cost some utility: rolling a small cohort forward one week is refused when only a
few subjects entered or left it (exactly the "same analysis at different time points" risk). The record lives
in memory: a restart forgets it (put the service behind a key policy that does not hand out fresh restarts, or
keep it running). Membership of refused requests is not recorded, so a refusal tells the caller only that
their cohort is within ``threshold`` of *some* earlier release, never which one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from foresight.forecast.cohorts import EventKey


@dataclass(frozen=True)
class Release:
    """What one cohort-rate answer discloses: the subject sets behind its numbers and its history cells."""

    subject_sets: tuple[frozenset[int], ...]  # the whole cohort (cohort_size) and the subjects forecast for
    cells: tuple[tuple[str, frozenset[EventKey]], ...]  # (week start, the events counted in that week)


def _near(a: frozenset, b: frozenset, threshold: int) -> int:
    """|a symmetric-difference b| when it is 1..threshold-1 (a differencing risk), else 0."""
    if abs(len(a) - len(b)) >= threshold:
        return 0
    d = len(a ^ b)
    return d if 0 < d < threshold else 0


class ReleaseGuard:
    """The server-wide record of what cohort-rate has released, and the check against differencing."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._subject_sets: set[frozenset[int]] = set()
        self._cells: dict[str, set[frozenset[EventKey]]] = {}
        self._lock = threading.Lock()

    def refusal(self, release: Release) -> str | None:
        """Why ``release`` may not be published (it is close to an earlier one), or None."""
        t = self.threshold
        with self._lock:
            for new in release.subject_sets:
                if any(_near(new, old, t) for old in self._subject_sets):
                    return (f"this cohort differs from one already released by fewer than {t} subjects: "
                            "comparing the two would disclose those subjects, so it is not released (change the "
                            f"cohort by at least {t} subjects, or ask for the earlier one again)")
            for week, events in release.cells:
                if any(_near(events, old, t) for old in self._cells.get(week, ())):
                    return (f"the history week {week} of this request differs from an already released week by "
                            f"fewer than {t} events: comparing the two would disclose them, so it is not released "
                            "(widen the cohort or the codes, or leave out history with history_weeks: 0)")
        return None

    def record(self, release: Release) -> None:
        """Remember a published release."""
        with self._lock:
            self._subject_sets.update(s for s in release.subject_sets if len(s) >= self.threshold)
            for week, events in release.cells:
                self._cells.setdefault(week, set()).add(events)

    def __len__(self) -> int:
        return len(self._subject_sets)


def release_of(subject_sets: Iterable[Sequence[int]],
               cells: Iterable[tuple[str, frozenset[EventKey]]]) -> Release:
    """A :class:`Release` from subject id lists and per-week event sets."""
    return Release(tuple(frozenset(int(i) for i in s) for s in subject_sets), tuple(cells))
