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

Modules: ``base`` (PackError, offline MedCAT setup), ``dictionary`` (stage 1 and concept codes), ``vectors`` (word
vectors and training notes), ``pack`` (stage 2), ``annotation`` (stage 3), ``context`` (the ConText rules),
``evaluate`` (scores). medcat is imported only inside the functions that need it: importing this package is cheap.
"""


from foresight.concepts.annotation import (
    CHUNK_CHARS,
    Mention,
    annotate,
    annotate_note,
    context_from_meta_anns,
    context_status,
    split_long,
)
from foresight.concepts.base import PackError, offline_medcat
from foresight.concepts.dictionary import (
    CONCEPT_COLUMNS,
    SNOMED_TAGS,
    SYNTHEA_VOCABS,
    VOCAB_ALIASES,
    concept_code,
    finalise_cuis,
    name_variants,
    read_dictionary,
    vocab_name,
)
from foresight.concepts.evaluate import evaluate_context, evaluate_synthea, prf
from foresight.concepts.pack import BuildSummary, build_pack, load_pack, pack_fingerprint, save_pack
from foresight.concepts.vectors import TrainingTexts, build_vocab, is_duckdb_file, read_note_texts

__all__ = [
    "CHUNK_CHARS",
    "CONCEPT_COLUMNS",
    "SNOMED_TAGS",
    "SYNTHEA_VOCABS",
    "VOCAB_ALIASES",
    "BuildSummary",
    "Mention",
    "PackError",
    "TrainingTexts",
    "annotate",
    "annotate_note",
    "build_pack",
    "build_vocab",
    "concept_code",
    "context_from_meta_anns",
    "context_status",
    "evaluate_context",
    "evaluate_synthea",
    "finalise_cuis",
    "is_duckdb_file",
    "load_pack",
    "name_variants",
    "offline_medcat",
    "pack_fingerprint",
    "prf",
    "read_dictionary",
    "read_note_texts",
    "save_pack",
    "split_long",
    "vocab_name",
]
