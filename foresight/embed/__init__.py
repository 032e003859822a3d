"""Patient embeddings and similar-patient search.

- :mod:`foresight.forecast.embed` (with :meth:`foresight.forecast.Forecaster.embed`) — one vector per timeline
  from the model's last hidden layer: last token, mean, or both.
- :mod:`~foresight.embed.index` — :class:`NeighbourIndex`: exact cosine search for small cohorts, a usearch HNSW
  graph above :data:`EXACT_MAX` vectors.
- :mod:`~foresight.embed.profile` — each indexed subject's observed future and the neighbours' aggregate profile,
  released only through a small-cell count rule.
- :mod:`~foresight.embed.build` — :func:`embed_warehouse` (``foresight embed``: chunks to parquet, the index, the
  futures; the opt-out honoured) and :class:`SimilarIndex` (the folder read back, for ``foresight similar`` and
  ``POST /v1/similar``).
"""

from foresight.embed.build import CHUNK_SUBJECTS, HORIZON_DAYS, SimilarIndex, embed_warehouse, model_checksum
from foresight.embed.index import EXACT_MAX, METRIC, NeighbourIndex, choose_kind
from foresight.embed.profile import OUTCOMES, NeighbourProfile, neighbour_profile, released_profile, subject_futures
from foresight.forecast.embed import POOLINGS, embed_tokens, embedding_width

__all__ = [
    "CHUNK_SUBJECTS", "EXACT_MAX", "HORIZON_DAYS", "METRIC", "OUTCOMES", "POOLINGS", "NeighbourIndex",
    "NeighbourProfile", "SimilarIndex", "choose_kind", "embed_tokens", "embed_warehouse", "embedding_width",
    "model_checksum", "neighbour_profile", "released_profile", "subject_futures",
]
