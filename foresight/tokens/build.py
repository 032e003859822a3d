"""The warehouse -> token shards stage: fit the vocabulary on train, then encode and write every split."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from foresight import optout, purposes, warehouse
from foresight.schema import SPLITS
from foresight.tokens.fit import TokenizeError, data_fingerprint, fit_vocabulary
from foresight.tokens.folder import TokenFolderError, building, refuse_foreign
from foresight.tokens.from_warehouse import register_code_map
from foresight.tokens.scratch import scratch_database
from foresight.tokens.shards import write_split
from foresight.tokens.vocab import TokenizerConfig, Vocabulary


def tokenize(
    db: str | Path,
    out_dir: str | Path,
    config: TokenizerConfig | None = None,
    *,
    progress: Any = None,
    exclude_subjects: Iterable[int] | None = None,
    purpose: str = purposes.UNSPECIFIED,
) -> dict[str, Any]:
    """Fit the vocabulary on train and write packed token shards for every split.

    Output (``out_dir``, replaced whole, see :mod:`foresight.tokens.folder`; a folder holding other files is
    refused): ``COMPLETE`` (the completion marker every reader checks), ``vocab.json`` (config, tokens, value
    deciles, marker bands, rule report, data fingerprint), ``code_descriptions.json`` (token -> description); per
    split ``<split>.bin`` (token ids, uint16/uint32), ``<split>.clock.bin`` (int32 minutes of the token clock
    since the subject's first event) and ``<split>.index.npy`` (one row per subject: id, offset, length, prefix
    length, head length, first-event time, birth time). ``progress(split, done, total)`` is called after each
    chunk of subjects.

    The returned summary (also written as ``tokenize_summary.json``) has tokens and subjects per split, the
    subjects with only static facts per split (``static_only_subjects``: no timed event, so ``BOS``, static
    prefix, birth band, ``END``), the rule report (``rare_mapping``), the train subjects and events whose
    age/year/birth markers the floor coarsened (``markers_coarsened``; kept out of ``vocab.json``, which ships
    with models) and ``messages`` saying the unusual parts in words.

    ``exclude_subjects`` (the national data opt-out, :mod:`foresight.optout`): these subjects are invisible to
    every step (vocabulary counts, code map, value deciles, shards), as if the warehouse did not hold them. Only
    their number and the list's sha256 are recorded (``vocab.report["opt_out"]``), and the list's digest is folded
    into the data fingerprint so a model trained before the opt-out cannot be resumed on data after it.

    ``purpose`` (:mod:`foresight.purposes`): what the tokens are for. Every load with events of a subject to be
    tokenized must cover it, else :class:`~foresight.purposes.PurposeError` names the first load that does not,
    before anything is written. The purpose and every load (provider, purposes, input checksums, opt-out list
    digest, date) are recorded in ``vocab.report["provenance"]`` (sealed with the folder, shipped with models)
    and in the summary's ``provenance``.
    """
    t_start = time.perf_counter()
    config = config or TokenizerConfig()
    out, db = Path(out_dir), Path(db)
    check_request(db, out, purpose)
    excluded = set(exclude_subjects or ())
    with warehouse.connect(db, read_only=True) as con, scratch_database(con):
        n_hidden, provenance = covered_provenance(con, excluded, purpose)
        vocab, markers_coarsened = _fit_without(con, config, excluded, n_hidden)
        describe_run(vocab, provenance, warehouse.extract_end(con))
    # The shards are written on a fresh connection: DuckDB holds on to memory its fit statements used outside its
    # buffer pool (35 MiB at 1M lives, 6 at 100k; freed only when the connection closes, bench/RESULTS.md), which
    # the encoder's peak would otherwise sit on top of. Built in a sibling folder and swapped in whole once sealed
    # (tokens/folder.py): a tokenize killed at any point leaves the previous folder, never an old vocabulary
    # beside new shards.
    with warehouse.connect(db, read_only=True) as con, building(out) as tmp:
        if excluded:
            optout.hide_subjects(con, excluded)
        if data_fingerprint(con, optout.digest(excluded) if excluded else None) != vocab.fingerprint:
            raise TokenizeError(f"{db}: the warehouse changed while it was being tokenized (a load was published "
                                "between the vocabulary fit and the shards); run tokenize again")
        summary = _write_folder(con, tmp, vocab, new_summary(vocab, provenance, markers_coarsened), progress)
        write_summary(tmp, summary, out, db, t_start)
    return summary


def check_request(db: Path, out: Path, purpose: str) -> None:
    """What is refused before the warehouse is opened (:class:`TokenizeError`, or a ``PurposeError`` for an unknown
    ``purpose``): no warehouse, a malformed memory budget, a target that is not a token folder."""
    purposes.check_purpose(purpose)
    if not db.exists():
        raise TokenizeError(f"{db}: warehouse not found")
    try:
        warehouse.memory_budget()  # a malformed $FORESIGHT_MEMORY: one clear error, before anything is opened
    except warehouse.MemoryBudgetError as exc:
        raise TokenizeError(str(exc)) from exc
    try:
        refuse_foreign(out)
    except TokenFolderError as exc:
        raise TokenizeError(str(exc)) from exc


def covered_provenance(con: Any, excluded: set[int], purpose: str) -> tuple[int, dict[str, Any]]:
    """Hide the opted-out ``excluded`` subjects on ``con``, refuse a ``purpose`` a load reaching the tokens does not
    cover (before the first file is written): (opted-out subjects that had events, the provenance record)."""
    n_hidden = optout.hide_subjects(con, excluded) if excluded else 0
    loads = purposes.loads_reaching(con)
    purposes.check_covered(loads, purpose)
    return n_hidden, purposes.provenance_record(loads, purpose)


def write_summary(tmp: Path, summary: dict[str, Any], out: Path, db: Path, t_start: float) -> None:
    """Complete the summary (target folder, seconds since ``t_start``, warehouse) and write it into ``tmp``."""
    summary["out"] = str(out)
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    summary["db"] = str(db.resolve())  # where the tokens came from: `foresight evaluate` finds the warehouse
    (tmp / "tokenize_summary.json").write_text(json.dumps(summary, indent=1))


def _write_folder(con: Any, tmp: Path, vocab: Vocabulary, summary: dict[str, Any], progress: Any) -> dict[str, Any]:
    """Write the fitted ``vocab``, the code descriptions and every split into ``tmp`` (opted-out subjects already
    hidden on ``con``); returns ``summary`` (:func:`new_summary`) with the splits recorded."""
    register_code_map(con, vocab)
    descriptions = code_descriptions(con, vocab)
    _write_splits(con, vocab, tmp, progress, summary)
    finish_folder(tmp, vocab, descriptions, summary)
    return summary


def describe_run(vocab: Vocabulary, provenance: dict[str, Any], end: Any) -> None:
    """Record in the vocabulary's report the ``provenance`` and the warehouse's extract end ``end`` (its last timed
    event, :func:`foresight.warehouse.extract_end`: lives still going on are censored there, foresight.censoring)."""
    vocab.report["provenance"] = provenance
    vocab.report["extract_end"] = end.isoformat() if end is not None else None


def new_summary(vocab: Vocabulary, provenance: dict[str, Any], markers_coarsened: dict[str, Any]) -> dict[str, Any]:
    """The summary of a tokenize before its splits are written (:func:`record_split` adds each)."""
    return {"vocab_size": len(vocab.tokens),
            "rare_mapping": {k: v for k, v in vocab.report.items() if k != "provenance"}, "provenance": provenance,
            "markers_coarsened": markers_coarsened, "tokens": {}, "subjects": {},
            "static_only_subjects": {}, "unseen_codes": {}}


def finish_folder(tmp: Path, vocab: Vocabulary, descriptions: dict[str, str], summary: dict[str, Any]) -> None:
    """Write ``vocab.json`` and ``code_descriptions.json`` into ``tmp`` and the summary's messages."""
    vocab.save(tmp / "vocab.json")
    (tmp / "code_descriptions.json").write_text(json.dumps(descriptions, indent=0, sort_keys=True))
    summary["messages"] = summary_messages(summary)


def _fit_without(con: Any, config: TokenizerConfig, excluded: set[int], n_hidden: int
                 ) -> tuple[Vocabulary, dict[str, Any]]:
    """Fit the vocabulary on ``con`` (where the opted-out subjects are already hidden) and record the opt-out in
    it: (vocabulary, the per-kind counts of train subjects whose markers the floor coarsened)."""
    vocab = fit_vocabulary(con, config)
    return vocab, record_optout(con, vocab, excluded, n_hidden)


def record_optout(con: Any, vocab: Vocabulary, excluded: set[int], n_hidden: int) -> dict[str, Any]:
    """Record the opt-out (``excluded``, of whom ``n_hidden`` had events) in the fitted ``vocab``; returns the per-kind
    counts of train subjects whose markers the floor coarsened, taken out of its report."""
    # per-kind counts of train subjects whose markers the floor coarsened go to the summary, which stays with
    # the shards, and not into vocab.json, which ships with every model: small counts of people stay inside
    markers_coarsened = vocab.report.pop("markers", {})
    if excluded:
        list_digest = optout.digest(excluded)
        vocab.fingerprint = data_fingerprint(con, list_digest)
        vocab.report["opt_out"] = {"subjects_listed": len(excluded), "subjects_excluded": n_hidden,
                                   "list_sha256": list_digest}
    return markers_coarsened


def code_descriptions(con: Any, vocab: Vocabulary) -> dict[str, str]:
    """Readable names of the code tokens (predictions, the server, model cards), from the codes table."""
    return dict(con.execute(
        "SELECT code, description FROM codes WHERE description IS NOT NULL AND code IN "
        "(SELECT unnest(?::VARCHAR[]))", [vocab.tokens]).fetchall())


def _write_splits(con: Any, vocab: Vocabulary, out: Path, progress: Any, summary: dict[str, Any]) -> None:
    """Encode and write every split, recording its counts (and clock error) in ``summary``."""
    # The distinct codes of each split, from one aggregation (a few thousand rows): an anti-join of every
    # split's events against every train event ran DuckDB out of memory at 1M subjects (165M events).
    split_codes: dict[str, set[str]] = {}
    for split, code in con.execute("SELECT DISTINCT s.split, e.code FROM events e JOIN subject_splits s "
                                   "USING (subject_id)").fetchall():
        split_codes.setdefault(split, set()).add(code)
    for split in SPLITS:
        ids = split_subject_ids(con, split)
        n_tokens, errors, n_static_only = write_split(con, vocab, split, ids, out, progress)
        record_split(summary, split, (n_tokens, len(ids), n_static_only), errors,
                     len(split_codes.get(split, set()) - split_codes.get("train", set())))


def split_subject_ids(con: Any, split: str) -> np.ndarray:
    """The sorted ids of the subjects of ``split`` that have events: an int64 array (8 bytes a subject), not a list
    of Python ints."""
    return con.execute(
        "SELECT e.subject_id FROM (SELECT DISTINCT subject_id FROM events) e JOIN subject_splits s "
        "USING (subject_id) WHERE s.split = ? ORDER BY 1", [split]).fetchnumpy()["subject_id"].astype(np.int64)


def record_split(summary: dict[str, Any], split: str, counts: tuple[int, int, int], errors: np.ndarray,
                 n_unseen: int) -> None:
    """Record a written split in ``summary``: ``counts`` (tokens, subjects, subjects with only static facts), the
    clock-error sample ``errors`` (seconds) and the number of its codes never seen in train."""
    if len(errors):
        summary.setdefault("clock_error_hours", {})[split] = {
            "p50": round(float(np.percentile(errors, 50)) / 3600, 3),
            "p95": round(float(np.percentile(errors, 95)) / 3600, 3),
            "max": round(float(errors.max()) / 3600, 3)}
    summary["tokens"][split], summary["subjects"][split], summary["static_only_subjects"][split] = counts
    summary["unseen_codes"][split] = n_unseen


def summary_messages(summary: dict[str, Any]) -> list[str]:
    """Plain-language notes on what the tokenizer did to unusual records (the CLI prints them)."""
    messages = []
    static_only = summary["static_only_subjects"]
    if n := sum(static_only.values()):
        per = ", ".join(f"{s} {c:,}" for s, c in static_only.items() if c)
        messages.append(f"{n:,} subjects have only static facts (no timed event; {per}): encoded as BOS + static "
                        "prefix + birth band + END, with no events, age/year markers or clock")
    for kind, st in summary["markers_coarsened"].items():
        parts = []
        if st["subjects_coarsened"]:
            parts.append(f"{st['subjects_coarsened']:,} train subjects ({st['events_coarsened']:,} events) got a "
                         f"band wider than {st['finest_band_years']} year(s)")
        if st["subjects_to_rare"]:
            parts.append(f"{st['subjects_to_rare']:,} ({st['events_to_rare']:,} events) got {kind}//RARE")
        if parts:
            messages.append(f"{kind} markers under the privacy floor: {'; '.join(parts)}")
    return messages
