"""Stage 2a: what MedCAT's unsupervised context training needs: a word-vector vocabulary and the training notes.

No pretrained word vectors can be downloaded here, so :func:`build_vocab` makes them from the user's own notes
(PPMI + truncated SVD, the classic count-based embedding). :func:`read_note_texts` reads those notes from a
warehouse, parquet, CSV or text file; :class:`TrainingTexts` feeds them to ``cat.trainer.train_unsupervised``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from foresight.concepts.base import PackError, offline_medcat

if TYPE_CHECKING:  # medcat costs seconds at import; only the functions that use it import it
    from medcat.vocab import Vocab


# --- the vocabulary (word vectors) ---------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+")  # MedCAT's regex tokenizer: word tokens are \b\w+\b, lower-cased for the vocab


def build_vocab(texts: Iterable[str], extra_words: Iterable[str] = (), *, dim: int = 100, window: int = 5,
                min_count: int = 2, max_words: int = 50_000, seed: int = 0) -> Vocab:
    """A MedCAT ``Vocab`` from the user's own notes: every word with its count, and a vector for the words seen
    at least ``min_count`` times (the ``max_words`` most frequent).

    Vectors are count-based embeddings (Levy & Goldberg 2015): co-occurrence counts within ``window`` words,
    positive PMI with context-distribution smoothing (0.75), truncated SVD to ``dim`` dimensions, rows scaled
    by sqrt of the singular values. MedCAT uses them to learn each concept's context (disambiguation); any
    pretrained vectors would do, but none can be fetched offline. ``extra_words`` (the dictionary's name tokens)
    enter the vocabulary without a vector so MedCAT's spell checker never "corrects" a concept's own words.
    """
    import numpy as np
    from scipy import sparse
    from sklearn.decomposition import TruncatedSVD

    offline_medcat()
    from medcat.vocab import Vocab

    counts: Counter[str] = Counter()
    docs: list[list[str]] = []
    for text in texts:
        toks = _TOKEN.findall(text.lower())
        counts.update(toks)
        docs.append(toks)
    keep = [w for w, c in counts.most_common(max_words) if c >= min_count and any(ch.isalpha() for ch in w)]
    index = {w: i for i, w in enumerate(keep)}
    vectors = None
    if len(keep) >= 3:
        rows, cols = [], []
        for toks in docs:
            ids = np.array([index.get(t, -1) for t in toks], dtype=np.int64)
            for k in range(1, window + 1):
                a, b = ids[:-k], ids[k:]
                ok = (a >= 0) & (b >= 0)
                rows += [a[ok], b[ok]]
                cols += [b[ok], a[ok]]
        n = len(keep)
        if rows:
            r, c = np.concatenate(rows), np.concatenate(cols)
            co = sparse.coo_matrix((np.ones(len(r), dtype=np.float64), (r, c)), shape=(n, n)).tocsr()
            co.sum_duplicates()
            ctx = np.asarray(co.sum(axis=0)).ravel() ** 0.75
            word = np.asarray(co.sum(axis=1)).ravel()
            total, ctx_total = co.sum(), ctx.sum()
            co = co.tocoo()
            pmi = np.log(co.data / total) - np.log(word[co.row] / total) - np.log(ctx[co.col] / ctx_total)
            mask = pmi > 0
            ppmi = sparse.csr_matrix((pmi[mask], (co.row[mask], co.col[mask])), shape=(n, n))
            k = max(1, min(dim, n - 1))
            svd = TruncatedSVD(n_components=k, random_state=seed, algorithm="randomized", n_iter=5)
            u = svd.fit_transform(ppmi)  # (n, k) = U * S
            vectors = u / np.sqrt(np.maximum(svd.singular_values_, 1e-12))  # U * sqrt(S)
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.where(norms == 0, 1, norms)
    if vectors is None:
        # Too little text for co-occurrence statistics (a test dictionary, no notes): seeded random unit vectors,
        # enough for MedCAT's negative sampling; such a pack links unambiguous names only, like any untrained pack.
        rng = np.random.default_rng(seed)
        vectors = rng.normal(size=(len(keep), dim))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vocab = Vocab()
    for w, i in index.items():
        vocab.add_word(w, counts[w], vectors[i].astype(np.float32))
    for w, c in counts.items():
        if w not in index:
            vocab.add_word(w, c)
    for w in extra_words:
        if w not in vocab:
            vocab.add_word(w, 1)
    if not vocab.vec_index2word:  # MedCAT's negative sampling needs at least one word with a vector
        vocab.add_word("<unk>", 1, np.ones(dim, dtype=np.float32) / np.sqrt(dim))
    vocab.init_cumsums()
    return vocab


# --- training notes ------------------------------------------------------------------------------------------


def is_duckdb_file(path: Path) -> bool:
    """True for a DuckDB database file (magic bytes ``DUCK`` at offset 8)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(12)[8:12] == b"DUCK"
    except OSError:
        return False


def read_note_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """The texts of a notes file, for training: a DuckDB warehouse (its ``notes`` table), a parquet or CSV file
    with a ``text`` column, or a ``.txt`` file (one document per line). Empty texts are skipped; CSV rows that
    cannot be parsed (e.g. not UTF-8) are skipped: training needs no accounting, the load does it."""
    path = Path(path)
    if not path.exists():
        raise PackError(f"{path}: training notes not found")
    lim = f" LIMIT {int(limit)}" if limit else ""
    if path.suffix == ".txt":
        with open(path, encoding="utf-8", errors="replace") as fh:
            texts = [line.strip() for line in fh if line.strip()]
        return texts[:limit] if limit else texts
    try:
        if is_duckdb_file(path):
            with duckdb.connect(str(path), read_only=True) as con:
                return [r[0] for r in con.execute(f"SELECT text FROM notes WHERE trim(text) <> '' ORDER BY "
                                                  f"subject_id, time, note_id{lim}").fetchall()]
        if path.suffix == ".parquet":
            rel = "read_parquet($p)"
        else:
            rel = "read_csv($p, all_varchar = true, header = true, ignore_errors = true)"
        with duckdb.connect() as con:
            return [r[0] for r in con.execute(f"SELECT text::VARCHAR FROM {rel} WHERE trim(text::VARCHAR) <> ''{lim}",
                                              {"p": str(path)}).fetchall()]
    except duckdb.Error as exc:
        raise PackError(f"{path}: cannot read notes for training (need a `text` column or a warehouse with a "
                        f"`notes` table): {exc}") from exc


class TrainingTexts:
    """The training notes for ``train_unsupervised``, reporting progress. Sized and re-iterable on purpose: MedCAT
    repeats the iterable once per epoch, and wraps anything without a length in a one-shot generator (so a
    generator would train one epoch only)."""

    def __init__(self, texts: Sequence[str], epochs: int, progress: Callable[[int, int], None] | None) -> None:
        self.texts, self.total, self.progress, self.done = texts, len(texts) * epochs, progress, 0

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            yield text
            self.done += 1
            if self.progress:
                self.progress(self.done, self.total)

