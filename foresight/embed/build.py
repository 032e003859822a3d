"""``foresight embed``: a warehouse cohort's vectors written in chunks, with the search index and the neighbours'
observed futures; and :class:`SimilarIndex`, the folder read back for ``foresight similar`` and ``/v1/similar``.

The cohort is every subject alive at ``as_of`` with an event on or before it (of ``split`` when given), minus the
opt-out list: :func:`foresight.optout.hide_subjects` hides the listed subjects from every query on the connection
first (the rule ``tokenize`` and the service use), and their ids are dropped again before anything is written, so
an opted-out subject is never embedded, indexed or profiled. ``as_of`` defaults to ``horizon_days`` before the
warehouse's last event, so every indexed subject has an observed future window for the neighbour profile.

The folder (``DIR``):

=====================  ========================================================================================
``embeddings.parquet`` ``subject_id``, ``as_of``, ``split``, ``vector`` (list of float32), one row group per chunk
``futures.parquet``    ``subject_id``, ``codes`` after as_of within the horizon, one bool column per outcome
``ids.npy`` + index    the search index (:mod:`foresight.embed.index`)
``index.json``         model checksum, pooling, metric, count, as_of, horizon, split, opt-out digest; written last
=====================  ========================================================================================

Memory: one chunk of timelines and vectors at a time, plus the index being built (exact search keeps the unit
vectors, N x width float32; the HNSW graph holds its own copy).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from foresight import optout
from foresight.embed.index import EXACT_MAX, IndexBuilder, NeighbourIndex, choose_kind
from foresight.embed.profile import OUTCOMES, neighbour_profile, subject_futures
from foresight.forecast import Forecaster, cohort_as_of
from foresight.forecast.embed import embedding_width
from foresight.hashing import sha256_file, sha256_json

CHUNK_SUBJECTS = 1024
HORIZON_DAYS = 365.0


def model_checksum(model_dir: str | Path) -> str:
    """sha256 over the model directory's weight files (and config), so an index names the model it came from."""
    folder = Path(model_dir)
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin"), folder / "config.json",
                    folder / "vocab.json"])
    return sha256_json({f.name: sha256_file(f) for f in files if f.exists()})


def default_as_of(con: Any, horizon_days: float) -> datetime:
    last = con.execute("SELECT max(time) FROM events WHERE code <> 'MEDS_BIRTH'").fetchall()[0][0]
    if last is None:
        raise ValueError("the warehouse has no timed events: nothing to embed")
    return (last - timedelta(days=horizon_days)).replace(microsecond=0)


def embed_warehouse(fc: Forecaster, con: Any, out: str | Path, *, model_dir: str | Path | None = None,
                    as_of: datetime | None = None, split: str | None = None,
                    exclude_subjects: Iterable[int] | None = None, pooling: str = "last",
                    horizon_days: float = HORIZON_DAYS, chunk_subjects: int = CHUNK_SUBJECTS, kind: str = "auto",
                    exact_max: int = EXACT_MAX, progress: Callable[[int, int], None] | None = None
                    ) -> dict[str, Any]:
    """Embed the cohort into ``out`` (see the module docstring); returns the index metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    width = embedding_width(fc.model, pooling)
    hidden = set(int(s) for s in exclude_subjects or ())
    if exclude_subjects is not None:
        optout.hide_subjects(con, hidden)
    as_of = as_of or default_as_of(con, horizon_days)
    ids = [s for s in cohort_as_of(con, as_of, split=split, active_days=None) if s not in hidden]
    if not ids:
        raise ValueError(f"no subject{' of split ' + split if split else ''} is alive with events on or before "
                         f"{as_of.isoformat()}")
    splits = dict(con.execute("SELECT subject_id, split FROM subject_splits").fetchall())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    builder = IndexBuilder(choose_kind(len(ids), kind, exact_max), width)
    emb_schema = pa.schema([("subject_id", pa.int64()), ("as_of", pa.timestamp("us")), ("split", pa.string()),
                            ("vector", pa.list_(pa.float32(), width))])
    fut_schema = pa.schema([("subject_id", pa.int64()), ("codes", pa.list_(pa.string())),
                            *[(name, pa.bool_()) for name, _, _ in OUTCOMES]])
    done = 0
    with pq.ParquetWriter(out / "embeddings.parquet.part", emb_schema) as emb, \
            pq.ParquetWriter(out / "futures.parquet.part", fut_schema) as fut:
        for lo in range(0, len(ids), chunk_subjects):
            tls = fc.timelines_from_warehouse(con, ids[lo:lo + chunk_subjects], as_of)
            chunk_ids = np.array([int(t.subject_id) for t in tls], dtype=np.int64)
            vectors = fc.embed(tls, pooling=pooling)
            emb.write_table(pa.table({
                "subject_id": chunk_ids, "as_of": [as_of] * len(tls),
                "split": [splits.get(int(s)) for s in chunk_ids],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), width)},
                schema=emb_schema))
            fut.write_table(pa.table(subject_futures(con, chunk_ids.tolist(), as_of, horizon_days),
                                     schema=fut_schema))
            builder.add(chunk_ids, vectors)
            done += len(tls)
            if progress:
                progress(done, len(ids))
    index = builder.finish()
    for name in ("embeddings.parquet", "futures.parquet"):
        (out / f"{name}.part").replace(out / name)
    opt_out = {"honoured": exclude_subjects is not None,
               "list_sha256": optout.digest(hidden) if exclude_subjects is not None else None}
    index.save(out, index_meta(model_dir, pooling, as_of, horizon_days, split, opt_out))
    return index.meta or {}


def index_meta(model_dir: str | Path | None, pooling: str, as_of: datetime, horizon_days: float, split: str | None,
               opt_out: dict[str, Any]) -> dict[str, Any]:
    """What ``index.json`` records besides the index's own kind, metric, count and width."""
    return {
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"dir": str(model_dir) if model_dir else None,
                  "checksum": model_checksum(model_dir) if model_dir else None},
        "pooling": pooling,
        "as_of": as_of.isoformat(),
        "horizon_days": horizon_days,
        "split": split,
        "outcomes": [{"outcome": n, "codes": list(p), "days": d} for n, p, d in OUTCOMES],
        "opt_out": opt_out,
        "embeddings": "embeddings.parquet",
        "futures": "futures.parquet",
    }


class SimilarIndex:
    """An embed folder read back: the search index, each subject's split and stored vector, their futures."""

    def __init__(self, folder: str | Path) -> None:
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        self.index = NeighbourIndex.load(self.folder)
        self.meta: dict[str, Any] = self.index.meta or {}
        emb = pq.read_table(self.folder / "embeddings.parquet", columns=["subject_id", "split"])
        self.split_of = dict(zip(emb.column("subject_id").to_pylist(), emb.column("split").to_pylist(), strict=True))
        fut = pq.read_table(self.folder / "futures.parquet").to_pydict()
        self.row_of = {int(s): i for i, s in enumerate(fut["subject_id"])}
        self.futures = fut
        model_dir = (self.meta.get("model") or {}).get("dir")
        desc = Path(model_dir) / "code_descriptions.json" if model_dir else None
        self.descriptions: dict[str, str] = json.loads(desc.read_text()) if desc and desc.exists() else {}

    @property
    def horizon_days(self) -> float:
        return float(self.meta.get("horizon_days", HORIZON_DAYS))

    def vector_of(self, subject_id: int) -> np.ndarray:
        """The stored vector of an indexed subject (KeyError when it is not in the index)."""
        import pyarrow.parquet as pq

        t = pq.read_table(self.folder / "embeddings.parquet", columns=["vector"],
                          filters=[("subject_id", "=", int(subject_id))])
        if t.num_rows == 0:
            raise KeyError(f"subject {subject_id} is not in the index {self.folder}")
        return np.asarray(t.column("vector").to_pylist()[0], dtype=np.float32)

    def neighbours(self, vector: np.ndarray, k: int, exclude: Iterable[int] = ()) -> list[tuple[int, float]]:
        """The ``k`` nearest indexed subjects (id, cosine distance), nearest first, none of ``exclude``."""
        skip = set(int(s) for s in exclude)
        want = k + len(skip & self.row_of.keys())  # ask for enough to still have k after dropping
        ids, dist = self.index.search(vector[None, :], want)
        found = [(int(s), float(d)) for s, d in zip(ids[0], dist[0], strict=True) if int(s) not in skip]
        return found[:k]

    def profile_of(self, subject_ids: Iterable[int]) -> Any:
        """The raw :class:`NeighbourProfile` of indexed subjects."""
        rows = [self.row_of[int(s)] for s in subject_ids]
        sub = {name: [self.futures[name][r] for r in rows] for name in self.futures}
        return neighbour_profile(sub, self.horizon_days)
