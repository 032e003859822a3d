"""Stage 3: annotate notes: MedCAT's mentions, each with its context, in batches over worker processes.

:func:`annotate` runs MedCAT over notes in batches (multiprocessing with ``n_process``) and gives each mention its
context (negated, hypothetical, family, historical): from the pack's MedCAT meta-annotation models when it has
them (:func:`context_from_meta_anns`), otherwise from the ConText rules in :mod:`foresight.concepts.context`.
Notes longer than ``CHUNK_CHARS`` are cut at line or sentence ends and the chunks annotated separately (MedCAT
truncates documents at 1M characters).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foresight.concepts.base import offline_medcat
from foresight.concepts.context import EXCLUDING, FAMILY, HISTORICAL, HYPOTHETICAL, NEGATED, ContextRules
from foresight.concepts.dictionary import concept_code
from foresight.concepts.pack import load_pack

if TYPE_CHECKING:  # medcat costs seconds at import; only the functions that use it import it
    from medcat.cat import CAT

CHUNK_CHARS = 100_000  # MedCAT truncates a document at config.preprocessing.max_document_length (1M characters)


def context_status(context: frozenset[str] | set[str]) -> str:
    """``negated``, ``family``, ``hypothetical`` (no event), ``historical`` (event before the note) or
    ``current`` (event at the note's time): the first of a mention's context categories that applies.

    >>> context_status(frozenset({HISTORICAL, NEGATED})), context_status(frozenset())
    ('negated', 'current')
    """
    for cat in (NEGATED, FAMILY, HYPOTHETICAL, HISTORICAL):
        if cat in context:
            return cat
    return "current"


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
        ``current`` (event at the note's time); the first that applies (:func:`context_status`)."""
        return context_status(self.context)

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
    offline_medcat()
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

