"""Stage 2b: MedCAT v2 model packs: build one from code dictionaries (trained on notes), save, load, fingerprint.

:func:`build_pack` compiles the concepts of :func:`foresight.concepts.dictionary.read_dictionary` into a MedCAT
CDB (``CDBMaker.prepare_csvs``), makes a word-vector vocabulary from the user's own notes
(:func:`foresight.concepts.vectors.build_vocab`), runs MedCAT's unsupervised context training on those notes
(``cat.trainer.train_unsupervised``, so ambiguous names learn to disambiguate), and saves a normal MedCAT v2 model
pack. :func:`load_pack` loads any MedCAT v2 pack, so a licensed SNOMED/UMLS pack from a MedCAT deployment drops
in unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foresight.concepts.base import PackError, offline_medcat
from foresight.concepts.dictionary import finalise_cuis, read_dictionary
from foresight.concepts.vectors import TrainingTexts, build_vocab, read_note_texts
from foresight.hashing import sha256, sha256_file

if TYPE_CHECKING:  # medcat costs seconds at import; only the functions that use it import it
    from medcat.cat import CAT

log = logging.getLogger(__name__)


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
    offline_medcat()
    import pandas as pd
    from medcat.cat import CAT
    from medcat.config import Config
    from medcat.model_creation.cdb_maker import CDBMaker

    if not dictionaries:
        raise PackError("no dictionary given")
    frames, checksums = [], {}
    for d in dictionaries:
        frames.append(read_dictionary(d))
        checksums[str(d)] = sha256_file(Path(d))
    df = pd.concat(frames, ignore_index=True)
    if df.empty:
        raise PackError(f"{', '.join(map(str, dictionaries))}: no concepts (every row lacks a code or a name)")
    df, ontologies = finalise_cuis(df)

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
        cat.trainer.train_unsupervised(TrainingTexts(texts, epochs, progress), nepochs=epochs,
                                       progress_print=10**9)
    path = save_pack(cat, out)
    return BuildSummary(
        pack=str(path), concepts=len(cdb.cui2info), names=len(cdb.name2info), ontologies=ontologies,
        dictionaries=checksums, training_notes=len(texts), vocab_words=len(vocab.vocab),
        vocab_vectors=len(vocab.vec_index2word),
        trained_concepts=sum(1 for i in cdb.cui2info.values() if i["count_train"] > 0),
        seconds=round(time.perf_counter() - t0, 3))



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

    offline_medcat()
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
    return sha256("".join(f"{p.relative_to(path) if p != path else p.name}\t{sha256_file(p)}\n" for p in files))
