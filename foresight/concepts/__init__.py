"""Clinical concepts in free text with MedCAT: build a model pack from code dictionaries, annotate notes.

Three stages, each a function from documented inputs to documented outputs:

1. :func:`read_dictionary` turns a code dictionary into MedCAT's concept table (``cui, name, ontologies,
   name_status, type_ids, description``). It reads MedCAT's own concept CSV as is, and recognises by their
   header the dictionaries a Foresight user already has: the ICD-10-CM order file (``code,billable,short,long``),
   MIMIC-IV's ``d_icd_diagnoses`` / ``d_icd_procedures`` (``icd_code,icd_version,long_title``) and the tables
   of a Synthea CSV export (``CODE,DESCRIPTION``; the vocabulary from ``SYSTEM`` or the file name). Names are
   prepared for matching text (:func:`name_variants`): SNOMED semantic tags and ICD qualifiers ("unspecified",
   "NOS", "not elsewhere classified") are dropped and parenthesised asides removed, as extra synonyms that never
   take a name another concept owns.
2. :func:`build_pack` compiles the concepts into a MedCAT CDB (``CDBMaker.prepare_csvs``), makes a word-vector
   vocabulary from the user's own notes (:func:`build_vocab`: PPMI + truncated SVD, the classic count-based
   embedding, since no pretrained vectors can be downloaded here), runs MedCAT's unsupervised context training
   on those notes (``cat.trainer.train_unsupervised``, so ambiguous names learn to disambiguate), and saves a
   normal MedCAT v2 model pack. :func:`load_pack` loads any MedCAT v2 pack, so a licensed SNOMED/UMLS pack from
   a MedCAT deployment drops in unchanged.
3. :func:`annotate` runs MedCAT over notes in batches (``cat.get_entities_multi_texts``, multiprocessing with
   ``n_process``) and gives each mention its context (negated, hypothetical, family, historical): from the pack's
   MedCAT meta-annotation models when it has them (:func:`context_from_meta_anns`), otherwise from the ConText
   rules in :mod:`foresight.concepts.context`. Notes longer than ``CHUNK_CHARS`` are cut at line or sentence ends
   and the chunks annotated separately (MedCAT truncates documents at 1M characters).

Concept -> Foresight code: :func:`concept_code` gives ``NOTE//<VOCAB>//<CODE>`` (see its docstring for how the
vocabulary is found). :func:`evaluate_synthea` measures the whole chain against the coded conditions of a Synthea
export (bench/notes.py runs it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foresight.concepts.context import EXCLUDING, FAMILY, HISTORICAL, HYPOTHETICAL, NEGATED, ContextRules
from foresight.schema import code_part, make_code
from foresight.warehouse import sql_literal

if TYPE_CHECKING:  # medcat and pandas cost seconds at import; only the functions that use them import them
    import pandas as pd
    from medcat.cat import CAT
    from medcat.vocab import Vocab

log = logging.getLogger(__name__)

CHUNK_CHARS = 100_000  # MedCAT truncates a document at config.preprocessing.max_document_length (1M characters)
CONCEPT_COLUMNS = ("cui", "name", "ontologies", "name_status", "type_ids", "description")


class PackError(Exception):
    """A dictionary or model pack that cannot be used (unknown format, missing columns, unloadable pack)."""


def _medcat() -> None:
    """Offline, quiet MedCAT: no version check over the network on import, warnings only."""
    os.environ.setdefault("MEDCAT_DISABLE_VERSION_CHECK", "true")
    logging.getLogger("medcat").setLevel(logging.WARNING)


# --- vocabularies --------------------------------------------------------------------------------------------

# Ontology names as dictionaries and MedCAT packs spell them -> the VOCAB part of a Foresight code.
VOCAB_ALIASES = {
    "SNOMED": "SNOMED", "SNOMED-CT": "SNOMED", "SNOMEDCT": "SNOMED", "SNOMEDCT_US": "SNOMED", "SNOMED_CT": "SNOMED",
    "SNOMED CT": "SNOMED", "SCT": "SNOMED", "HTTP://SNOMED.INFO/SCT": "SNOMED",
    "ICD10CM": "ICD10CM", "ICD-10-CM": "ICD10CM", "ICD10": "ICD10CM", "ICD-10": "ICD10CM",
    "ICD9CM": "ICD9CM", "ICD-9-CM": "ICD9CM", "ICD9": "ICD9CM", "ICD10PCS": "ICD10PCS", "ICD9PROC": "ICD9PROC",
    "RXNORM": "RXNORM", "LOINC": "LOINC", "CVX": "CVX", "UMLS": "UMLS", "ATC": "ATC", "OPCS4": "OPCS4",
    "HTTP://WWW.NLM.NIH.GOV/RESEARCH/UMLS/RXNORM": "RXNORM", "HTTP://LOINC.ORG": "LOINC",
    "HTTP://HL7.ORG/FHIR/SID/CVX": "CVX", "HTTP://HL7.ORG/FHIR/SID/ICD-10-CM": "ICD10CM",
}
_UMLS_CUI = re.compile(r"^C\d{7}$")


def vocab_name(ontology: str) -> str:
    """The Foresight VOCAB for an ontology name (``SNOMED-CT`` -> ``SNOMED``); unknown names pass through
    normalised like any code part.

    >>> vocab_name("snomedct_us"), vocab_name("ICD-10-CM"), vocab_name("my terms")
    ('SNOMED', 'ICD10CM', 'MY_TERMS')
    """
    key = ontology.strip().upper()
    return VOCAB_ALIASES.get(key, code_part(key))


def concept_code(cat: CAT, cui: str, vocab_override: str | None = None) -> str:
    """The ``NOTE//<VOCAB>//<CODE>`` code of a MedCAT concept.

    The vocabulary, first rule that applies: ``vocab_override``; a cui written ``VOCAB:CODE`` (packs built here
    from dictionaries that mix vocabularies, where the same code could exist in two); ``UMLS`` for a UMLS-shaped
    cui (C0011849; no ICD or SNOMED code has that shape); the pack's single ``config.meta.ontology`` (set by
    :func:`build_pack`, and by most MedCAT packs); the concept's single ontology in the CDB; else ``CUI``.
    """
    if vocab_override:
        return make_code("NOTE", vocab_name(vocab_override), cui)
    info = cat.cdb.cui2info.get(cui)
    own = sorted(info.get("in_other_ontology") or ()) if info else []
    head, sep, tail = cui.partition(":")
    if sep and (head in VOCAB_ALIASES.values() or head in own):
        return make_code("NOTE", head, tail)
    if _UMLS_CUI.match(cui):
        return make_code("NOTE", "UMLS", cui)
    ontologies = [o for o in (cat.config.meta.ontology or []) if o]
    if len(ontologies) == 1:
        return make_code("NOTE", vocab_name(ontologies[0]), cui)
    if len(own) == 1:
        return make_code("NOTE", vocab_name(own[0]), cui)
    return make_code("NOTE", "CUI", cui)


# --- dictionaries --------------------------------------------------------------------------------------------

# Synthea CSV tables -> vocabulary of their CODE column (used when the table has no SYSTEM column).
SYNTHEA_VOCABS = {
    "conditions": "SNOMED", "procedures": "SNOMED", "allergies": "SNOMED", "careplans": "SNOMED",
    "devices": "SNOMED", "encounters": "SNOMED", "supplies": "SNOMED", "medications": "RXNORM",
    "immunizations": "CVX", "observations": "LOINC",
}
SNOMED_TAGS = (
    "disorder", "finding", "situation", "procedure", "person", "morphologic abnormality", "observable entity",
    "event", "regime/therapy", "qualifier value", "body structure", "substance", "product", "medicinal product",
    "clinical drug", "record artifact", "environment", "organism", "physical object", "social concept",
    "attribute", "assessment scale", "occupation", "specimen", "navigational concept", "life style",
)
_TAG = re.compile(r"\s*\((?:" + "|".join(re.escape(t) for t in SNOMED_TAGS) + r")\)?\s*$", re.IGNORECASE)
_QUALIFIERS = re.compile(
    r",?\s*\b(?:unspecified|not elsewhere classified|not otherwise specified|NEC|NOS)\b\s*(?=,|$)"
    r"|,\s*unspecified(?:\s+\w+){1,2}\s*$"  # "Pneumonia, unspecified organism", "..., unspecified site"
    r"|^\s*unspecified\s+", re.IGNORECASE)
_PARENS = re.compile(r"\s*\([^()]*\)")


def name_variants(name: str) -> list[str]:
    """A dictionary title and the synonyms derived from it, original first.

    >>> name_variants("Sinusitis (disorder)")
    ['Sinusitis (disorder)', 'Sinusitis']
    >>> name_variants("Essential (primary) hypertension")
    ['Essential (primary) hypertension', 'Essential hypertension']
    >>> name_variants("Cholera, unspecified")
    ['Cholera, unspecified', 'Cholera']
    >>> name_variants("Pneumonia, unspecified organism")[-1]
    'Pneumonia'
    >>> name_variants("Severe anxiety (panic) (finding")
    ['Severe anxiety (panic) (finding', 'Severe anxiety (panic)', 'Severe anxiety']
    """
    out = [" ".join(name.split())]
    current = out[0]
    for rule in (_TAG, _QUALIFIERS, _PARENS):
        current = " ".join(rule.sub("", current).split()).strip(" ,;-")
        if current and current not in out:
            out.append(current)
    return out


def _key(name: str) -> str:
    # Close to how MedCAT joins a name's tokens: case and punctuation do not distinguish two names.
    return " ".join(re.findall(r"[a-z0-9]+", name.lower()))


def _read_table(path: Path) -> tuple[list[str], list[tuple[Any, ...]]]:
    import duckdb

    try:
        con = duckdb.connect()
        rel = con.sql(
            "SELECT * FROM read_csv($p, all_varchar = true, header = true, auto_detect = true)", params={"p": str(path)}
        )
        return [c.lower() for c in rel.columns], rel.fetchall()
    except duckdb.Error as exc:
        raise PackError(f"{path}: cannot be read as a CSV dictionary: {exc}") from exc


def read_dictionary(path: str | Path) -> pd.DataFrame:
    """Read a code dictionary into MedCAT's concept table (one row per cui and name).

    Formats, recognised by the header: MedCAT concept CSV (``cui,name`` and optional ``ontologies,name_status,
    type_ids,description``; a cui may repeat, names may be ``|``-separated, used as given); ICD-10-CM order file
    (``code,billable,short,long``); MIMIC-IV ``d_icd_diagnoses``/``d_icd_procedures``; Synthea CSV tables
    (``CODE,DESCRIPTION``). For the code dictionaries the title becomes the primary name (status ``P``), other
    titles and :func:`name_variants` synonyms (status ``A``); ``ontologies`` holds the vocabulary.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise PackError(f"{path}: dictionary not found")
    cols, rows = _read_table(path)
    idx = {c: i for i, c in enumerate(cols)}
    if {"cui", "name"} <= idx.keys():
        # MedCAT's own format: keep it exactly as the user wrote it.
        data = {c: [("" if r[idx[c]] is None else r[idx[c]]) for r in rows] if c in idx else [""] * len(rows)
                for c in CONCEPT_COLUMNS}
        return pd.DataFrame(data, columns=list(CONCEPT_COLUMNS))

    titles: list[tuple[str, str, list[str]]] = []  # (vocab, code, [titles, primary first])
    stem = path.name.lower().split(".")[0]
    if {"code", "short", "long"} <= idx.keys():
        titles = [("ICD10CM", r[idx["code"]], [r[idx["long"]], r[idx["short"]]]) for r in rows]
    elif {"icd_code", "icd_version", "long_title"} <= idx.keys():
        proc = "procedure" in stem
        for r in rows:
            v9 = (r[idx["icd_version"]] or "").strip() == "9"
            vocab = ("ICD9PROC" if v9 else "ICD10PCS") if proc else ("ICD9CM" if v9 else "ICD10CM")
            titles.append((vocab, r[idx["icd_code"]], [r[idx["long_title"]]]))
    elif {"code", "description"} <= idx.keys():
        default = SYNTHEA_VOCABS.get(stem)
        for r in rows:
            system = r[idx["system"]] if "system" in idx else None
            vocab = vocab_name(system) if system else default
            if vocab is None:
                raise PackError(f"{path}: a CODE,DESCRIPTION table but no SYSTEM column and the file name is not a "
                                f"Synthea table ({', '.join(sorted(SYNTHEA_VOCABS))}); write a MedCAT concept CSV "
                                "(cui,name,ontologies) instead")
            titles.append((code_part(vocab), r[idx["code"]], [r[idx["description"]]]))
    else:
        raise PackError(f"{path}: unknown dictionary format (header {cols}); expected a MedCAT concept CSV (cui,name"
                        ",...), the ICD-10-CM order file (code,billable,short,long), MIMIC d_icd_* (icd_code,"
                        "icd_version,long_title) or a Synthea table (CODE,DESCRIPTION)")
    return _concept_table(titles)


def _concept_table(titles: Sequence[tuple[str, str, list[str]]]) -> pd.DataFrame:
    """Concept rows from (vocab, code, titles): every title and its variants, derived names only where no other
    concept has that name as a title (so "Cholera, unspecified" -> "Cholera" does not make the category A00's own
    title ambiguous)."""
    import pandas as pd

    owned: dict[str, set[str]] = defaultdict(set)  # name key -> cuis holding it as a dictionary title
    concepts: dict[str, tuple[str, list[str]]] = {}
    for vocab, code, names in titles:
        code = (code or "").strip()
        names = [n.strip() for n in names if n and n.strip()]
        if not code or not names:
            continue
        cui = f"{vocab}:{code}"
        prev = concepts.get(cui, (vocab, []))[1]
        concepts[cui] = (vocab, prev + [n for n in names if n not in prev])
        for n in names:
            owned[_key(n)].add(cui)
    rows = []
    for cui, (vocab, names) in concepts.items():
        seen: set[str] = set()
        for i, title in enumerate(names):
            for j, variant in enumerate(name_variants(title)):
                k = _key(variant)
                if not k or k in seen or (j > 0 and owned.get(k, {cui}) - {cui}):
                    continue
                seen.add(k)
                status = "P" if i == 0 and j == 0 else "A"
                rows.append((cui, variant, vocab, status, "", names[0]))
    return pd.DataFrame(rows, columns=list(CONCEPT_COLUMNS))


def _finalise_cuis(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Code-dictionary rows carry ``VOCAB:CODE`` cuis; when the whole pack has one vocabulary the prefix goes
    (cuis are then the codes themselves, as in a SNOMED or ICD pack from elsewhere) and the vocabulary is the pack's
    ``meta.ontology``. MedCAT-format rows keep their cuis."""
    ontologies = sorted({o for cell in df["ontologies"] for o in str(cell).split("|") if o.strip()})
    if len(ontologies) == 1:
        prefix = ontologies[0] + ":"
        df = df.copy()
        df["cui"] = [c[len(prefix):] if c.startswith(prefix) else c for c in df["cui"]]
    return df, ontologies


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

    _medcat()
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
    import duckdb

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
            con = duckdb.connect(str(path), read_only=True)
            try:
                return [r[0] for r in con.execute(f"SELECT text FROM notes WHERE trim(text) <> '' ORDER BY "
                                                  f"subject_id, time, note_id{lim}").fetchall()]
            finally:
                con.close()
        con = duckdb.connect()
        if path.suffix == ".parquet":
            rel = f"read_parquet({sql_literal(str(path))})"
        else:
            rel = f"read_csv({sql_literal(str(path))}, all_varchar = true, header = true, ignore_errors = true)"
        return [r[0] for r in con.execute(f"SELECT text::VARCHAR FROM {rel} WHERE trim(text::VARCHAR) <> ''{lim}")
                .fetchall()]
    except duckdb.Error as exc:
        raise PackError(f"{path}: cannot read notes for training (need a `text` column or a warehouse with a "
                        f"`notes` table): {exc}") from exc



# --- building and loading packs ------------------------------------------------------------------------------


@dataclass
class BuildSummary:
    """What :func:`build_pack` made (the ``--json`` of ``foresight concepts build``)."""

    pack: str
    concepts: int
    names: int
    ontologies: list[str]
    dictionaries: dict[str, str]
    training_notes: int
    vocab_words: int
    vocab_vectors: int
    trained_concepts: int
    seconds: float


def build_pack(
    dictionaries: Sequence[str | Path],
    out: str | Path,
    *,
    train_on: str | Path | None = None,
    train_texts: Sequence[str] | None = None,
    epochs: int = 1,
    max_train_notes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BuildSummary:
    """Build a MedCAT v2 model pack from code dictionaries; train it unsupervised on notes if given.

    ``out`` is the pack folder (replaced if it is a pack already) or ``<name>.zip`` for a single archive; either
    is what :func:`load_pack` and ``foresight etl notes --model-pack`` take. Training notes come from
    ``train_on`` (see :func:`read_note_texts`) or ``train_texts``; ``progress(done, total)`` follows the training.
    """
    t0 = time.perf_counter()
    _medcat()
    import pandas as pd
    from medcat.cat import CAT
    from medcat.config import Config
    from medcat.model_creation.cdb_maker import CDBMaker

    if not dictionaries:
        raise PackError("no dictionary given")
    frames, checksums = [], {}
    for d in dictionaries:
        frames.append(read_dictionary(d))
        checksums[str(d)] = _sha256(Path(d))
    df = pd.concat(frames, ignore_index=True)
    if df.empty:
        raise PackError(f"{', '.join(map(str, dictionaries))}: no concepts (every row lacks a code or a name)")
    df, ontologies = _finalise_cuis(df)

    cfg = Config()
    cfg.general.nlp.provider = "regex"  # MedCAT's own tokenizer: no spaCy model to download
    cfg.general.log_level = logging.WARNING
    cfg.general.usage_monitor.enabled = False
    cfg.meta.ontology = ontologies if len(ontologies) == 1 else []
    texts = list(train_texts or [])
    if train_on is not None:
        texts += read_note_texts(train_on, limit=max_train_notes)
    cfg.meta.description = (
        f"Foresight dictionary pack from {', '.join(Path(d).name for d in dictionaries)}; "
        f"{df['cui'].nunique()} concepts; unsupervised training on {len(texts)} notes")
    cdb = CDBMaker(cfg).prepare_csvs([df], full_build=True)
    name_tokens = {t for n in cdb.name2info for t in n.split(cfg.general.separator)}
    vocab = build_vocab(texts, name_tokens)
    cat = CAT(cdb, vocab)
    if texts:
        cat.trainer.train_unsupervised(_TrainingTexts(texts, epochs, progress), nepochs=epochs,
                                       progress_print=10**9)
    path = save_pack(cat, out)
    return BuildSummary(
        pack=str(path), concepts=len(cdb.cui2info), names=len(cdb.name2info), ontologies=ontologies,
        dictionaries=checksums, training_notes=len(texts), vocab_words=len(vocab.vocab),
        vocab_vectors=len(vocab.vec_index2word),
        trained_concepts=sum(1 for i in cdb.cui2info.values() if i["count_train"] > 0),
        seconds=round(time.perf_counter() - t0, 3))


class _TrainingTexts:
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


def save_pack(cat: CAT, out: str | Path) -> Path:
    """Save ``cat`` as a MedCAT model pack at ``out`` (a folder, or a ``.zip``); an existing pack there is
    replaced, anything else is refused."""
    out = Path(out)
    archive = out.suffix == ".zip"
    folder = out.with_suffix("") if archive else out
    for p in (folder, out):
        if p.exists():
            if p.is_dir() and any(p.iterdir()) and not (p / "cdb").is_dir():
                raise PackError(f"{p}: exists and is not a MedCAT model pack; choose another --out")
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = cat.save_model_pack(str(folder.parent), pack_name=folder.name, add_hash_to_pack_name=False,
                               make_archive=archive, only_archive=archive)
    return Path(path)


def load_pack(path: str | Path) -> CAT:
    """Load a MedCAT v2 model pack (folder or ``.zip``), offline, as robustly as a pack from elsewhere needs:

    - a ``.zip`` in a read-only folder is unpacked into a temporary folder (MedCAT unpacks next to the zip);
    - a pack whose config asks for spaCy when spaCy is not installed runs on MedCAT's regex tokenizer (warning);
    - a pack whose meta-annotation addons need packages that are not installed (MetaCAT needs
      ``medcat[meta-cat]``, which pins transformers<5) loads without them (warning); the ConText rules stand in;
    - an early v2 pack without ``model_card.json`` is assembled from its ``cdb/`` and ``vocab/``.
    """
    import importlib.util
    import tempfile

    _medcat()
    from medcat.cat import CAT
    from medcat.cdb import CDB
    from medcat.pipeline import _ENABLED_ADDONS_PATH
    from medcat.utils.import_utils import MissingDependenciesError
    from medcat.vocab import Vocab

    path = Path(path)
    if not path.exists():
        raise PackError(f"{path}: model pack not found (build one with `foresight concepts build`)")
    if path.suffix == ".zip" and not path.with_suffix("").is_dir() and not os.access(path.parent, os.W_OK):
        target = Path(tempfile.mkdtemp(prefix="foresight-pack-")) / path.stem
        shutil.unpack_archive(path, target)
        path = target
    folder = path.with_suffix("") if path.suffix == ".zip" else path
    regex: dict[str, Any] = {"general": {"nlp": {"provider": "regex"}}}
    no_spacy = importlib.util.find_spec("spacy") is None
    try:
        try:
            cat = CAT.load_model_pack(str(path))
        except (ImportError, MissingDependenciesError) as exc:
            if "spacy" in str(exc).lower():
                log.warning("%s: spaCy is not installed; using MedCAT's regex tokenizer", path)
                cat = CAT.load_model_pack(str(path), config_dict=regex)
            else:
                log.warning("%s: loading without its addons (%s); context comes from the ConText rules", path, exc)
                cat = CAT.load_model_pack(str(path), addon_config_dict={_ENABLED_ADDONS_PATH: []})
        except FileNotFoundError:
            if not ((folder / "cdb").is_dir() and (folder / "vocab").is_dir()):
                raise
            cdb = CDB.load(str(folder / "cdb"))
            if no_spacy and cdb.config.general.nlp.provider == "spacy":
                log.warning("%s: spaCy is not installed; using MedCAT's regex tokenizer", path)
                cdb.config.general.nlp.provider = "regex"
            cat = CAT(cdb, Vocab.load(str(folder / "vocab")))
    except Exception as exc:
        raise PackError(f"{path}: cannot load the MedCAT model pack: {exc}") from exc
    cat.config.general.usage_monitor.enabled = False
    return cat


def pack_fingerprint(path: str | Path) -> str:
    """sha256 over a pack's files (names and contents): the lineage of the events it produced."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(path) if p != path else p.name}\t{_sha256(p)}\n".encode())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# --- annotation ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mention:
    """One concept mention in one note."""

    note_id: str
    cui: str
    code: str  # NOTE//<VOCAB>//<CODE>
    name: str  # the concept's preferred name (-> codes.description)
    start: int  # character offsets in the note
    end: int
    text: str
    similarity: float
    context: frozenset[str] = field(default_factory=frozenset)

    @property
    def status(self) -> str:
        """``negated``, ``family``, ``hypothetical`` (no event), ``historical`` (event before the note) or
        ``current`` (event at the note's time); the first that applies."""
        for cat in (NEGATED, FAMILY, HYPOTHETICAL, HISTORICAL):
            if cat in self.context:
                return cat
        return "current"

    @property
    def affirmed(self) -> bool:
        """A fact about the patient (current or historical)."""
        return not (self.context & EXCLUDING)


# Meta-annotation task names and values (CogStack's usual models: Presence, Experiencer, Temporality/Time,
# Subject, Status, Negation) -> ConText categories.
_META = (
    (("presence", "negation", "status", "certainty", "assertion", "existence"),
     {"false": NEGATED, "negated": NEGATED, "negative": NEGATED, "absent": NEGATED, "no": NEGATED,
      "hypothetical": HYPOTHETICAL, "hypothetical (n/a)": HYPOTHETICAL, "possible": HYPOTHETICAL,
      "uncertain": HYPOTHETICAL, "suspected": HYPOTHETICAL, "other": HYPOTHETICAL}),
    (("experiencer", "subject"), {"family": FAMILY, "other": FAMILY, "relative": FAMILY, "relatives": FAMILY}),
    (("temporality", "time", "tense"), {"past": HISTORICAL, "historical": HISTORICAL, "history": HISTORICAL,
                                        "future": HYPOTHETICAL}),
)


def context_from_meta_anns(meta_anns: dict[str, Any] | None) -> frozenset[str] | None:
    """Context categories from a MedCAT entity's ``meta_anns`` (``{task: {"value": ...}}``); None when the pack
    has no meta-annotation task this knows (then the ConText rules decide).

    >>> sorted(context_from_meta_anns({"Presence": {"value": "False"}, "Experiencer": {"value": "Patient"}}))
    ['negated']
    >>> sorted(context_from_meta_anns({"Temporality": {"value": "Past"}}))
    ['historical']
    >>> context_from_meta_anns({}) is None
    True
    """
    if not meta_anns:
        return None
    found, cats = False, set()
    for task, ann in meta_anns.items():
        value = str(ann.get("value", "") if isinstance(ann, dict) else ann).strip().lower()
        for names, values in _META:
            if task.strip().lower() in names:
                found = True
                if value in values:
                    cats.add(values[value])
    return frozenset(cats) if found else None


def split_long(text: str, size: int = CHUNK_CHARS) -> list[tuple[int, str]]:
    """Cut ``text`` into chunks of at most ``size`` characters at a line end, else a sentence end, else a space
    (a mention is never cut unless a chunk has no space at all); returns (offset, chunk).

    >>> split_long("ab. cd. ef", 5)
    [(0, 'ab. '), (4, 'cd. '), (8, 'ef')]
    """
    out, pos = [], 0
    while len(text) - pos > size:
        window = text[pos:pos + size]
        cut = max(window.rfind("\n"), window.rfind(". "), window.rfind("; "))
        if cut <= 0:
            cut = window.rfind(" ")
        cut = size if cut <= 0 else cut + 1
        if window[cut - 1:cut] == "." and window[cut:cut + 1] == " ":
            cut += 1
        out.append((pos, text[pos:pos + cut]))
        pos += cut
    out.append((pos, text[pos:]))
    return out


def annotate_note(cat: CAT, note_id: str, text: str, *, rules: ContextRules | None = None,
                  vocab: str | None = None, codes: dict[str, str] | None = None) -> list[Mention]:
    """The mentions in one note, each with its context (see :func:`annotate`)."""
    if not text or not text.strip():
        return []
    rules = rules or ContextRules()
    codes = {} if codes is None else codes
    ents: list[dict[str, Any]] = []
    for offset, part in split_long(text):
        result = cat.get_entities(part)
        for e in (result.get("entities", {}) if isinstance(result, dict) else {}).values():
            ents.append({**e, "start": offset + e["start"], "end": offset + e["end"]})
    ents = _longest_non_overlapping(ents)
    rule_ctx = rules.classify(text, [(e["start"], e["end"]) for e in ents])
    out = []
    for e, ctx in zip(ents, rule_ctx, strict=True):
        meta = context_from_meta_anns(e.get("meta_anns"))
        cui = str(e["cui"])
        if cui not in codes:
            codes[cui] = concept_code(cat, cui, vocab)
        out.append(Mention(note_id, cui, codes[cui], str(e.get("pretty_name") or cui), e["start"], e["end"],
                           str(e.get("source_value", "")), float(e.get("context_similarity") or 0.0),
                           meta if meta is not None else ctx))
    return out


def _longest_non_overlapping(ents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the longest of overlapping mentions ("cholera, unspecified" over "cholera" inside it), in text order.

    MedCAT's own filter (``show_nested_entities=False``) should do this, but with the regex tokenizer of MedCAT 2.9
    nested matches come through.
    """
    kept: list[dict[str, Any]] = []
    taken: list[tuple[int, int]] = []
    for e in sorted(ents, key=lambda e: (-(e["end"] - e["start"]), e["start"])):
        if not any(s < e["end"] and e["start"] < t for s, t in taken):
            kept.append(e)
            taken.append((e["start"], e["end"]))
    return sorted(kept, key=lambda e: (e["start"], e["end"]))


# Per worker process: the pack and rules, unpickled once by the pool's initializer (not once per batch).
_WORKER: dict[str, Any] = {}


def _init_worker(cat: CAT | str, rules: ContextRules, vocab: str | None) -> None:
    _medcat()
    # A pack path is loaded here (in parallel, nothing for the parent to pickle); else the pickled pack arrives.
    _WORKER.update(cat=load_pack(cat) if isinstance(cat, str) else cat, rules=rules, vocab=vocab, codes={})


def _annotate_batch(batch: list[tuple[str, str]], state: dict[str, Any] | None = None
                    ) -> list[tuple[str, list[Mention]]]:
    st = state if state is not None else _WORKER
    return [(nid, annotate_note(st["cat"], nid, text, rules=st["rules"], vocab=st["vocab"], codes=st["codes"]))
            for nid, text in batch]


def _batches(notes: Iterable[tuple[str, str]], batch_chars: int) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    size = 0
    for note_id, text in notes:
        n = len(text or "")
        if batch and size + n > batch_chars:
            yield batch
            batch, size = [], 0
        batch.append((str(note_id), text or ""))
        size += n
    if batch:
        yield batch


def annotate(
    cat: CAT,
    notes: Iterable[tuple[str, str]],
    *,
    n_process: int = 1,
    batch_chars: int = 50_000,
    rules: ContextRules | None = None,
    vocab: str | None = None,
    pack_path: str | Path | None = None,
) -> Iterator[tuple[str, list[Mention]]]:
    """Annotate ``(note_id, text)`` pairs; yields ``(note_id, mentions)`` for every note, empty ones included.

    Notes go in batches of about ``batch_chars`` characters. With ``n_process > 1``, ``n_process - 1`` spawned
    worker processes take batches while this process works on the rest whenever they are all busy (as MedCAT's
    own multiprocessing does). Each worker needs its own copy of the pack: it loads ``pack_path`` if given (the
    pack ``cat`` was loaded from), else ``cat`` is pickled to it, which for a large pack costs seconds of this
    process's time. Each note is annotated with ``cat.get_entities`` (in chunks if long, :func:`split_long`) and its
    mentions get their context on the whole note: meta-annotations where the pack gives them, else ``rules``
    (default :class:`foresight.concepts.context.ContextRules`). Notes of one batch come back in input order; batches may
    complete out of order.

    Why not MedCAT's own ``cat.get_entities_multi_texts``: in MedCAT 2.9 its worker imports the RelCAT addon, which
    fails with transformers 5 (``transformers.models.bert.tokenization_bert_fast`` is gone), and it pickles the
    whole pack for every batch; here each worker gets the pack once and also runs the context rules.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    rules = rules or ContextRules()
    batches = _batches(notes, batch_chars)
    state = {"cat": cat, "rules": rules, "vocab": vocab, "codes": {}}
    if n_process <= 1:
        for batch in batches:
            yield from _annotate_batch(batch, state)
        return
    workers = n_process - 1
    # spawn, not fork: the caller may hold DuckDB's threads and locks, which a forked child would inherit.
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                initargs=(str(pack_path) if pack_path else cat, rules, vocab)) as pool:
        running: set[cf.Future] = set()
        for batch in batches:
            if len(running) < 2 * workers:  # bounded look-ahead: memory stays flat on any corpus size
                running.add(pool.submit(_annotate_batch, batch))
                continue
            yield from _annotate_batch(batch, state)  # the workers are busy: this process takes the batch
            done = {f for f in running if f.done()}
            running -= done
            for fut in done:
                yield from fut.result()
        for fut in cf.as_completed(running):
            yield from fut.result()


# --- evaluation ----------------------------------------------------------------------------------------------


def prf(gold: dict[Any, set[str]], pred: dict[Any, set[str]]) -> dict[str, float | int]:
    """Micro precision, recall and F1 of predicted code sets against gold code sets per unit (encounter), with
    scikit-learn over the multilabel indicator matrices.

    >>> prf({"e1": {"a", "b"}, "e2": {"c"}}, {"e1": {"a"}, "e2": {"c", "d"}})["f1"]
    0.667
    """
    from sklearn.metrics import precision_recall_fscore_support
    from sklearn.preprocessing import MultiLabelBinarizer

    units = sorted(set(gold) | set(pred))
    mlb = MultiLabelBinarizer(sparse_output=True)
    mlb.fit([gold.get(u, set()) | pred.get(u, set()) for u in units] or [set()])
    y_true = mlb.transform([gold.get(u, set()) for u in units])
    y_pred = mlb.transform([pred.get(u, set()) for u in units])
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    tp = int(y_true.multiply(y_pred).sum())
    return {"precision": round(float(p), 3), "recall": round(float(r), 3), "f1": round(float(f), 3),
            "tp": tp, "fp": int(y_pred.sum()) - tp, "fn": int(y_true.sum()) - tp}


def evaluate_context(export_path: str | Path, rules: ContextRules | None = None) -> dict[str, Any]:
    """Score the context rules against human labels: a MedCAT-trainer export whose annotations carry the
    meta-annotation ``Status`` (``Confirmed`` / ``Other``, as in CogStack's MTSamples tutorial export).

    Each annotated span is classified by ``rules`` on its whole document. The labels judge assertion (is the
    concept affirmed?), and the export labels family-history mentions Confirmed, so the main score predicts
    "Other" for negated or hypothetical mentions (``assertion``); ``exclusion`` also counts family mentions as
    "Other", as the notes source does when it drops them. Historical mentions count as Confirmed (a past diagnosis
    is a confirmed fact). Returns accuracy and precision/recall/F1 of "Other" for both, the confusion by our
    category, and the first disagreements of the assertion score.
    """
    import json

    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    rules = rules or ContextRules()
    data = json.loads(Path(export_path).read_text())
    gold: list[bool] = []
    preds: dict[str, list[bool]] = {"assertion": [], "exclusion": []}
    by_status: Counter[tuple[str, str]] = Counter()
    errors = []
    for project in data["projects"]:
        for doc in project["documents"]:
            anns = [a for a in doc["annotations"] if not a.get("deleted") and a.get("correct", True)]
            status = [{m["name"]: m["value"] for m in (a.get("meta_anns") or [])}.get("Status") for a in anns]
            keep = [(a, s) for a, s in zip(anns, status, strict=True) if s in ("Confirmed", "Other")]
            cats = rules.classify(doc["text"], [(a["start"], a["end"]) for a, _ in keep])
            for (a, s), c in zip(keep, cats, strict=True):
                gold.append(s == "Other")
                preds["assertion"].append(bool(c & {NEGATED, HYPOTHETICAL}))
                preds["exclusion"].append(bool(c & EXCLUDING))
                ours = Mention("", "", "", "", 0, 0, "", 0.0, c).status
                by_status[(s, ours)] += 1
                if preds["assertion"][-1] != gold[-1] and len(errors) < 12:
                    errors.append({"gold": s, "ours": ours, "mention": a["value"],
                                   "context": doc["text"][max(0, a["start"] - 90):a["end"] + 40].replace("\n", " ")})
    out: dict[str, Any] = {"annotations": len(gold), "other": sum(gold)}
    for name, pred in preds.items():
        p, r, f, _ = precision_recall_fscore_support(gold, pred, average="binary", zero_division=0)
        out[name] = {"accuracy": round(float(accuracy_score(gold, pred)), 3), "other_precision": round(float(p), 3),
                     "other_recall": round(float(r), 3), "other_f1": round(float(f), 3)}
    out["confusion"] = {f"{g} -> {o}": n for (g, o), n in sorted(by_status.items())}
    out["errors"] = errors
    return out


def evaluate_synthea(
    export_root: str | Path,
    workdir: str | Path,
    *,
    n_process: int = 1,
    train: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Build a pack from a Synthea export's condition dictionary, annotate its FHIR notes and score the concepts
    against the conditions coded in the same encounter.

    Steps (all in ``workdir``): ``foresight etl fhir`` of ``<export>/fhir`` into a warehouse; a pack from
    ``<export>/csv/conditions.csv`` (SNOMED), trained unsupervised on the warehouse's notes if ``train``;
    every note annotated once; gold = the encounter's ``DX//SNOMED//<code>`` events. Scored per encounter
    (micro over (encounter, code) pairs) three ways: every mention (no context filter), the mentions that become
    events (context filter: negated, hypothetical and family mentions dropped) and only those timed at the note
    (also historical ones dropped, since "history of X" is not this encounter's diagnosis); and the share of
    historical (note, concept) pairs that name a condition coded in an earlier encounter. Finally the notes
    source loads the same notes into the warehouse, and the loaded events must equal the filtered mentions.
    """
    from foresight import warehouse
    from foresight.sources import fhir
    from foresight.sources import notes as notes_source

    export_root, workdir = Path(export_root), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "synthea_notes.duckdb"
    db.unlink(missing_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    con = warehouse.connect(db)
    try:
        fhir.load(con, export_root / "fhir")
        notes = con.execute("SELECT note_id, encounter_id, text FROM notes ORDER BY note_id").fetchall()
        gold_rows = con.execute(
            """SELECT encounter_id, list(DISTINCT split_part(code, '//', 3)) FROM events
               WHERE code LIKE 'DX//SNOMED//%' AND encounter_id IN (SELECT encounter_id FROM notes) GROUP BY 1"""
        ).fetchall()
        # per note: the conditions the patient had coded before the note (what a "history of X" should name)
        earlier_rows = con.execute(
            """SELECT n.note_id, list(DISTINCT split_part(e.code, '//', 3)) FROM notes n JOIN events e
               ON e.subject_id = n.subject_id AND e.code LIKE 'DX//SNOMED//%' AND e.time < n.time
               AND e.encounter_id IS DISTINCT FROM n.encounter_id GROUP BY 1"""
        ).fetchall()
    finally:
        con.close()
    timings["etl_fhir_s"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    build = build_pack([export_root / "csv" / "conditions.csv"], workdir / "synthea_conditions_pack",
                       train_texts=[n[2] for n in notes] if train else None)
    timings["build_pack_s"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    cat = load_pack(build.pack)
    encounter = {n[0]: n[1] for n in notes}
    mentions: dict[str, list[Mention]] = {}
    for i, (note_id, ms) in enumerate(annotate(cat, [(n[0], n[2]) for n in notes], n_process=n_process,
                                                   pack_path=build.pack), 1):
        mentions[note_id] = ms
        if progress:
            progress(i, len(notes))
    timings["annotate_s"] = round(time.perf_counter() - t, 2)

    def value(code: str) -> str:
        return code.split("//")[-1]

    gold = {enc: set(codes) for enc, codes in gold_rows}
    variants = {
        "all_mentions": lambda m: True,
        "context_filtered": lambda m: m.affirmed,
        "current_only": lambda m: m.status == "current",
    }
    scores, preds = {}, {}
    for name, keep in variants.items():
        pred: dict[str, set[str]] = defaultdict(set)
        for note_id, ms in mentions.items():
            pred[encounter[note_id]] |= {value(m.code) for m in ms if keep(m)}
        preds[name] = pred
        scores[name] = prf(gold, pred)
    statuses = Counter(m.status for ms in mentions.values() for m in ms)
    # The history rule: a historical (note, concept) should be a condition coded before the note.
    earlier = {nid: set(codes) for nid, codes in earlier_rows}
    hist = {(nid, value(m.code)) for nid, ms in mentions.items() for m in ms if m.status == "historical"}
    supported = sum(1 for nid, c in hist if c in earlier.get(nid, set()))

    # The real load path must produce exactly the context-filtered concepts.
    t = time.perf_counter()
    con = warehouse.connect(db)
    try:
        summary = notes_source.load(con, db, model_pack=build.pack, n_process=n_process)
        loaded = con.execute(
            "SELECT encounter_id, list(DISTINCT split_part(code, '//', 3)) FROM events WHERE source = 'notes' "
            "GROUP BY 1").fetchall()
    finally:
        con.close()
    timings["etl_notes_s"] = round(time.perf_counter() - t, 2)
    loaded_pred = {enc: set(c) for enc, c in loaded}
    filtered = {k: v for k, v in preds["context_filtered"].items() if v}

    def name(code: str) -> str:
        return cat.cdb.get_name(code) if code in cat.cdb.cui2info else ""

    fn_codes: Counter[str] = Counter()
    fp_codes: Counter[str] = Counter()
    for enc in set(gold) | set(preds["current_only"]):
        fn_codes.update(gold.get(enc, set()) - preds["current_only"].get(enc, set()))
        fp_codes.update(preds["current_only"].get(enc, set()) - gold.get(enc, set()))
    return {
        "notes": len(notes),
        "encounters_with_gold": len(gold),
        "gold_pairs": sum(len(v) for v in gold.values()),
        "pack": {k: v for k, v in build.__dict__.items() if k not in ("dictionaries",)},
        "mentions_by_status": dict(statuses),
        "historical_pairs": len(hist),
        "historical_coded_earlier": round(supported / len(hist), 3) if hist else None,
        "scores": scores,
        "load": {k: summary.to_json()[k] for k in ("rows_read", "rows_loaded", "rows_quarantined", "rows_dropped",
                                                   "dropped_reasons", "events", "subjects")},
        "load_matches_filtered": loaded_pred == filtered,
        "top_missed": [(c, name(c), n) for c, n in fn_codes.most_common(8)],
        "top_extra": [(c, name(c), n) for c, n in fp_codes.most_common(8)],
        "timings": timings,
    }
