"""The similar-patient index: exact search for small cohorts, an HNSW graph (usearch) for large ones.

Both answer the same question, the ``k`` stored vectors nearest to a query under the cosine distance
``1 - cos(q - c, v - c)`` (0 = same direction, 2 = opposite), and return the stored subject ids with their
distances, nearest first. ``c`` is the cohort's mean vector (estimated on the first chunk added, up to
``CHUNK_SUBJECTS`` subjects, so an HNSW graph can be built in one pass): a transformer's hidden states share a
large common direction, and without centring every pair of patients is within a cosine distance of ~0.001, so
the ranking is decided by rounding-level differences.

- **exact** (scikit-learn ``NearestNeighbors``, brute force): every query is compared with every stored vector.
  Right by construction; its cost grows with the cohort (a query over 100k vectors is a 100k x width product).
- **usearch** (HNSW): a navigable small-world graph, searched greedily; sub-linear, approximate. Chosen above
  :data:`EXACT_MAX` vectors. ``bench/embed.py`` measures its recall@10 against exact search.

On disk (``DIR``): ``ids.npy`` (the subject id of each stored row), ``center.npy`` (``c``),
``vectors.npy`` (exact: the centred unit-length vectors) or ``index.usearch`` (its keys are row numbers), and
``index.json`` (:data:`INDEX_FILE`), written last: an index folder without it is incomplete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foresight.atomic import write_text

EXACT_MAX = 20_000  # stored vectors above which the index is an HNSW graph instead of exact search
METRIC = "cos"
INDEX_FILE = "index.json"
KINDS = ("exact", "usearch")
# HNSW settings: usearch's defaults, wider at search time. bench/embed.py, 100k vectors of width 64: recall@10
# 0.97 on real embeddings (0.66 on iid Gaussian noise, the structureless worst case); raise expansion_search
# for more recall at more latency
HNSW = {"connectivity": 16, "expansion_add": 128, "expansion_search": 128}


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32); a zero row stays zero."""
    v = np.asarray(vectors, dtype=np.float32)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


def choose_kind(count: int, kind: str = "auto", exact_max: int = EXACT_MAX) -> str:
    """``exact`` up to ``exact_max`` vectors, else ``usearch`` (``kind`` other than auto: that kind)."""
    if kind == "auto":
        return "exact" if count <= exact_max else "usearch"
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose auto, {', '.join(KINDS)}")
    return kind


class IndexBuilder:
    """Vectors added a chunk at a time (exact: kept until :meth:`finish`; usearch: added to the graph at once)."""

    def __init__(self, kind: str, width: int, threads: int = 0) -> None:
        self.kind, self.width, self.threads = kind, width, threads
        self.ids: list[np.ndarray] = []
        self.parts: list[np.ndarray] = []
        self.n = 0
        self.center: np.ndarray | None = None  # the first chunk's mean
        self.graph = new_graph(width) if kind == "usearch" else None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.width:
            raise ValueError(f"vectors of shape {vectors.shape} added to an index of width {self.width}")
        if self.center is None:
            self.center = vectors.mean(0) if len(vectors) else np.zeros(self.width, np.float32)
        v = unit(vectors - self.center)
        if self.graph is not None:
            self.graph.add(np.arange(self.n, self.n + len(v), dtype=np.uint64), v, threads=self.threads)
        else:
            self.parts.append(v)
        self.ids.append(np.asarray(ids, dtype=np.int64))
        self.n += len(v)

    def finish(self) -> NeighbourIndex:
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, dtype=np.int64)
        vectors = (np.concatenate(self.parts) if self.parts else np.zeros((0, self.width), np.float32)) \
            if self.graph is None else None
        center = self.center if self.center is not None else np.zeros(self.width, np.float32)
        return NeighbourIndex(self.kind, ids, center, vectors, self.graph)


def new_graph(width: int) -> Any:
    from usearch.index import Index

    return Index(ndim=width, metric=METRIC, dtype="f32", **HNSW)


@dataclass
class NeighbourIndex:
    """Stored subject ids and a way to find the nearest of them (exact vectors or an HNSW graph)."""

    kind: str
    ids: np.ndarray  # (N,) int64 subject ids, row order
    center: np.ndarray  # (d,) subtracted from every vector and query before the cosine
    vectors: np.ndarray | None = None  # (N, d) unit vectors (exact)
    graph: Any = None  # usearch.index.Index over row numbers (usearch)
    meta: dict[str, Any] | None = None
    searcher: Any = None  # the fitted sklearn NearestNeighbors (exact), made on first search

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, kind: str = "auto", exact_max: int = EXACT_MAX,
              threads: int = 0) -> NeighbourIndex:
        builder = IndexBuilder(choose_kind(len(ids), kind, exact_max), np.asarray(vectors).shape[1], threads)
        builder.add(ids, vectors)
        return builder.finish()

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, distances), each (Q, k') with k' = min(k, N), nearest first, for (Q, d) ``queries``."""
        q = unit(np.atleast_2d(queries).astype(np.float32) - self.center)
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
        if self.graph is not None:
            m = self.graph.search(q, k)
            rows, dist = np.asarray(m.keys).reshape(len(q), -1), np.asarray(m.distances).reshape(len(q), -1)
            counts = np.asarray(getattr(m, "counts", [len(m.keys)]))  # one query: a Matches, not a batch
            if (counts < k).any():  # only a broken graph comes back short: say so, never pad
                raise RuntimeError("the HNSW search returned fewer neighbours than asked for")
            return self.ids[rows.astype(np.int64)], dist.astype(np.float32)
        if self.searcher is None:
            from sklearn.neighbors import NearestNeighbors

            self.searcher = NearestNeighbors(metric="cosine", algorithm="brute").fit(self.vectors)
        dist, rows = self.searcher.kneighbors(q, k)
        return self.ids[rows], dist.astype(np.float32)

    def save(self, folder: str | Path, meta: dict[str, Any]) -> Path:
        """Write the index into ``folder``; ``index.json`` (``meta`` + kind, metric, count, width) goes last."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "ids.npy", self.ids)
        np.save(folder / "center.npy", self.center)
        if self.graph is not None:
            self.graph.save(str(folder / "index.usearch"))
            width = int(self.graph.ndim)
        else:
            assert self.vectors is not None
            np.save(folder / "vectors.npy", self.vectors)
            width = int(self.vectors.shape[1])
        info = {**meta, "kind": self.kind, "metric": METRIC, "count": len(self), "width": width}
        if self.kind == "usearch":
            info["hnsw"] = HNSW
        write_text(folder / INDEX_FILE, json.dumps(info, indent=1, default=str))
        self.meta = info
        return folder / INDEX_FILE

    @classmethod
    def load(cls, folder: str | Path) -> NeighbourIndex:
        """The index in ``folder`` (FileNotFoundError naming what is missing)."""
        folder = Path(folder)
        info_path = folder / INDEX_FILE
        if not info_path.exists():
            raise FileNotFoundError(f"{info_path}: no similar-patient index here (build one with `foresight embed`)")
        try:
            info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{info_path}: unreadable index metadata: {exc}") from exc
        ids, center = np.load(folder / "ids.npy"), np.load(folder / "center.npy")
        if info.get("kind") == "usearch":
            from usearch.index import Index

            graph = Index.restore(str(folder / "index.usearch"))
            return cls("usearch", ids, center, None, graph, info)
        return cls("exact", ids, center, np.load(folder / "vectors.npy"), None, info)
