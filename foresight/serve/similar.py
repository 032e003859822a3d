"""``POST /v1/similar``: the aggregate profile of the indexed patients nearest to a timeline.

The query timeline (posted events, or an analyst's warehouse lookup) is embedded with the served model in the
index's pooling and searched in the index ``foresight embed`` built (``foresight serve --similar-index DIR``; the
index must come from the same model, checked by its weights' checksum at start). What comes back:

- **for every key**, the neighbours' profile (:func:`foresight.embed.released_profile`): outcome counts and the most
  common events after their as_of, each count through the service's small-cell rule
  (:func:`foresight.suppression.suppress_count`: 0-7 -> ``"<8"``, else rounded to 5), codes held by fewer than
  ``threshold`` neighbours not listed. ``k`` is at least the threshold.
- **for analyst keys only**, the neighbours' subject ids and distances, and only those of subjects in the key's
  split scope (the others are counted in a warning, never named). A researcher key never sees a subject id.

Differencing. Two queries whose neighbour sets differ by one patient would isolate that patient's future in the
difference of their profiles, so the neighbour set of every answer is checked against those already released
(:class:`foresight.serve.disclosure.ReleaseGuard`, the rule ``/v1/cohort-rate`` uses): a set within
1..threshold-1 subjects of a released one is refused (403). Opted-out subjects (``--exclude-subjects``, the list
as re-read now) are never neighbours, even in an index built before they opted out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from foresight.embed import SimilarIndex, model_checksum, released_profile
from foresight.serve.config import ServeConfig
from foresight.serve.disclosure import ReleaseGuard, release_of
from foresight.serve.schemas import SimilarRequest, SimilarResponse
from foresight.serve.security import ROLES, ApiKey


class SimilarRefused(Exception):
    """A similar request that cannot be answered: the runtime turns it into a 4xx with this message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class SimilarService:
    """The index behind ``/v1/similar`` (loaded at start) and the record of neighbour sets released."""

    def __init__(self, config: ServeConfig) -> None:
        assert config.similar_index is not None
        self.config = config
        self.index = SimilarIndex(config.similar_index)
        built_with = (self.index.meta.get("model") or {}).get("checksum")
        if built_with and built_with != model_checksum(config.model_dir):
            raise ValueError(f"{config.similar_index}: this index was built with another model (checksum "
                             f"{built_with[:12]}); rebuild it with `foresight embed --model {config.model_dir}`")
        self.guard = ReleaseGuard(config.suppression.threshold)

    def check_k(self, q: SimilarRequest) -> tuple[int, list[str]]:
        """The k to search for (capped by the server) and its warning; too small a k is refused."""
        threshold = self.config.suppression.threshold
        if q.k < threshold:
            raise SimilarRefused(422, f"k: {q.k} neighbours is fewer than the smallest group this server "
                                      f"describes ({threshold})")
        k = min(q.k, self.config.max_similar_k)
        return k, [] if k == q.k else [f"k capped at {k}"]

    def answer(self, fc: Any, tl: Any, q: SimilarRequest, key: ApiKey, opt_out: Iterable[int],
               warnings: list[str]) -> SimilarResponse:
        """Embed the query timeline, search, check the release against differencing, suppress (model thread)."""
        rule = self.config.suppression
        k, capped = self.check_k(q)
        vector = fc.embed([tl], pooling=self.index.meta.get("pooling", "last"))[0]
        exclude = set(opt_out) | ({int(q.subject_id)} if q.subject_id is not None else set())
        found = self.index.neighbours(vector, k, exclude=exclude)
        if len(found) < rule.threshold:
            raise SimilarRefused(422, f"the index holds fewer than {rule.threshold} subjects to compare with")
        release = release_of([[s for s, _ in found]], [])
        refusal = self.guard.refusal(release)
        if refusal is not None:
            raise SimilarRefused(403, f"this neighbour set differs from one already released by fewer than "
                                      f"{rule.threshold} subjects: comparing the two profiles would disclose those "
                                      "subjects, so it is not released (ask again with a k that differs by at least "
                                      f"{rule.threshold}, or repeat the earlier query)")
        self.guard.record(release)
        profile = released_profile(self.index.profile_of([s for s, _ in found]), rule, descriptions=fc.descriptions)
        neighbours = None
        notes = [*warnings, *capped]
        if ROLES[key.role] >= ROLES["analyst"]:
            neighbours = [{"subject_id": s, "distance": d} for s, d in found
                          if key.allows_split(self.index.split_of.get(s))]
            if len(neighbours) < len(found):
                notes.append(f"{len(found) - len(neighbours)} neighbour(s) outside this key's splits are not "
                             "listed (they are in the profile)")
        meta = self.index.meta
        return SimilarResponse(
            as_of=tl.as_of, k=k, profile=profile, neighbours=neighbours, suppression=asdict(rule),
            index={name: meta.get(name) for name in ("as_of", "pooling", "metric", "kind", "horizon_days")},
            warnings=notes)
