"""Evaluating a model on tokens of another source: its token ids re-read in the model's vocabulary, and the share
of target events that lost their exact code on the way.

A token folder from another source (another warehouse, tokenized with its own vocabulary) numbers its tokens
differently and names codes the model may never have seen. Each of its tokens is re-read in the model's vocabulary
by name, with the tokenizer's own rule for what is missing (:meth:`foresight.tokens.Vocabulary.token_for`):

- an event or static code the model knows keeps its meaning; one it lacks becomes its nearest ancestor the model
  knows (ICD / ATC climb by truncation), else its kind's RARE token. Those events *lost their exact code*;
- a marker (``AGE//``, ``YEAR//``, ``BIRTH//`` band) is re-read by its value in the model's bands (out of range: the
  kind's RARE marker); ``MONTH//`` markers keep their name, and a target that has them is refused for a model
  without them (re-encode it in the model's vocabulary); time-gap, value-decile and special tokens must exist
  under the same name (the two tokenizers then share their settings), else the folder is refused naming the
  token. Value deciles keep their rank, not their edges: a ``Q7`` of the target was fitted on the target's own
  train split.

To *train* on another source (fine-tuning, ``foresight train --init-from``) the target warehouse is encoded in the
model's vocabulary by :func:`encode_in_vocabulary`: every code through the same rule, and values through the
model's decile edges, exactly as the forecaster reads a warehouse at prediction time (so a lab recorded in other
units lands in the deciles the model will see when it predicts, not in the target's own ranks).

``lost_code_share`` is the share of the target split's event tokens (codes, not markers or gaps) whose exact code
the model's vocabulary lacks. A code the target's own tokenizer already folded into an ancestor or RARE (below
its privacy floor) is counted as it arrives: its exact code is unknown here, so ``already_rare_in_target`` reports
how many of the target's events were RARE before the model saw them.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from foresight import optout, purposes, warehouse
from foresight.schema import SPLITS
from foresight.tokens import BIRTH_PREFIX, MONTH_PREFIX, Vocabulary, data_fingerprint, register_code_map, write_split
from foresight.tokens.build import covered_provenance, describe_run, split_subject_ids
from foresight.tokens.folder import building, check_complete


def same_vocabulary(model_vocab: Vocabulary, data_vocab: Vocabulary) -> bool:
    return list(model_vocab.tokens) == list(data_vocab.tokens)


def token_map(model_vocab: Vocabulary, data_vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """(model token id of every data token id, whether that data token is a code the model lacks)."""
    ids = np.zeros(len(data_vocab.tokens), dtype=np.int64)
    lost = np.zeros(len(data_vocab.tokens), dtype=bool)
    for i, name in enumerate(data_vocab.tokens):
        if name in model_vocab.index:  # the same token (same code, gap bin, decile, special)
            ids[i] = model_vocab.index[name]
        elif data_vocab.is_event[i] or data_vocab.is_static[i]:
            ids[i] = model_vocab.index[model_vocab.token_for(name)]
            lost[i] = True
        elif name.startswith(MONTH_PREFIX):  # a token per position cannot be dropped here (clock, index)
            raise ValueError("the target was tokenized with calendar-month markers (MONTH//) and the model's "
                             "vocabulary has none: encode the target in the model's vocabulary instead "
                             "(foresight tokenize --vocabulary-from MODEL)")
        elif data_vocab.is_marker[i] or name.startswith(BIRTH_PREFIX):
            ids[i] = marker_id(model_vocab, name)
        else:
            raise ValueError(f"token {name!r} of the target's vocabulary has no counterpart in the model's: the two "
                             "were tokenized with different settings (time bins, value deciles, special tokens); "
                             "tokenize the target with the model's tokenizer settings")
    return ids, lost


def marker_id(vocab: Vocabulary, name: str) -> int:
    """A marker token (``AGE//63``, ``YEAR//2031``, ``BIRTH//1940-1949``) re-read by its (first) value in
    ``vocab``'s bands; a value outside them, or none (``AGE//RARE``), is the kind's RARE marker."""
    kind, _, value = name.partition("//")
    if kind in vocab.marker_map:
        number = re.match(r"-?\d+", value)
        return int(vocab.marker_ids(kind, np.array([int(number.group()) if number else -(10**9)]))[0])
    return vocab.index.get(f"{kind}//RARE", vocab.index["RARE"])


def lost_codes(data_dir: str | Path, model_vocab: Vocabulary, split: str = "held_out") -> dict[str, Any]:
    """How many of ``split``'s event tokens keep their exact code in the model's vocabulary (see the module)."""
    data_dir = Path(data_dir)
    data_vocab = Vocabulary.load(data_dir / "vocab.json")
    _, lost = token_map(model_vocab, data_vocab)
    tokens = np.fromfile(data_dir / f"{split}.bin", dtype=data_vocab.dtype)
    counts = np.bincount(tokens, minlength=len(data_vocab.tokens))
    event = data_vocab.is_event
    rare = np.array([t == "RARE" or t.endswith("//RARE") for t in data_vocab.tokens])
    events = int(counts[event].sum())
    n_lost = int(counts[event & lost].sum())
    return {
        "split": split,
        "events": events,
        "lost": n_lost,
        "lost_code_share": n_lost / events if events else 0.0,
        "codes_lost": int((event & lost & (counts > 0)).sum()),  # distinct target codes the model lacks
        "already_rare_in_target": int(counts[event & rare].sum()),
        "rule": "tokenizer rule: nearest ancestor the model knows, else the kind's RARE token",
    }


def remap_folder(data_dir: str | Path, model_vocab: Vocabulary, model_vocab_path: str | Path,
                 out: str | Path) -> Path:
    """A sealed token folder at ``out``: the splits of ``data_dir`` re-read in the model's vocabulary."""
    data_dir = Path(data_dir)
    check_complete(data_dir)
    data_vocab = Vocabulary.load(data_dir / "vocab.json")
    ids, _ = token_map(model_vocab, data_vocab)
    with building(out) as tmp:
        shutil.copyfile(model_vocab_path, tmp / "vocab.json")
        for split in SPLITS:
            src = data_dir / f"{split}.bin"
            if not src.exists():
                continue
            tokens = np.fromfile(src, dtype=data_vocab.dtype)
            ids[tokens].astype(model_vocab.dtype).tofile(tmp / f"{split}.bin")
            for suffix in (".clock.bin", ".index.npy"):
                shutil.copyfile(data_dir / f"{split}{suffix}", tmp / f"{split}{suffix}")
        (tmp / "tokenize_summary.json").write_text(json.dumps({"remapped_from": str(data_dir)}))
    return Path(out)


def tokens_for_model(data_dir: str | Path, model_vocab: Vocabulary, model_vocab_path: str | Path,
                     out_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The token folder to evaluate on (``data_dir`` itself, or its remapped copy ``out_dir/tokens-in-model-vocab``
    when it was tokenized with another vocabulary) and the report's ``cross_source`` block."""
    data_dir = Path(data_dir)
    data_vocab = Vocabulary.load(data_dir / "vocab.json")
    if same_vocabulary(model_vocab, data_vocab):
        return data_dir, {"same_vocabulary": True, "lost_code_share": 0.0}
    info = {"same_vocabulary": False, **lost_codes(data_dir, model_vocab)}
    remapped = remap_folder(data_dir, model_vocab, model_vocab_path, Path(out_dir) / "tokens-in-model-vocab")
    return remapped, {**info, "tokens": str(remapped)}


def encode_in_vocabulary(db: str | Path, model_dir: str | Path, out: str | Path, *,
                         purpose: str = purposes.UNSPECIFIED,
                         exclude_subjects: Iterable[int] | None = None) -> dict[str, Any]:
    """A sealed token folder at ``out``: every split of warehouse ``db`` encoded in the vocabulary of the model in
    ``model_dir`` (codes it lacks -> nearest known ancestor, else RARE; values through its decile edges), ready for
    ``foresight train --init-from model_dir``. Its ``vocab.json`` is the model's, with this warehouse's data
    fingerprint and provenance (the loads must cover ``purpose``, as for ``foresight tokenize``; the opted-out
    ``exclude_subjects`` are invisible, as there, and the list's digest is folded into the fingerprint); returns the
    summary (also ``tokenize_summary.json``, which records ``db`` for ``foresight evaluate``)."""
    model_dir, db = Path(model_dir), Path(db)
    vocab = Vocabulary.load(model_dir / "vocab.json")
    summary: dict[str, Any] = {"vocabulary_from": str(model_dir.resolve()), "db": str(db.resolve()),
                               "vocab_size": len(vocab.tokens), "tokens": {}, "subjects": {}}
    excluded = set(exclude_subjects or ())
    with warehouse.connect(db, read_only=True) as con, building(out) as tmp:
        _, provenance = covered_provenance(con, excluded, purpose)  # opt-outs hidden, the purpose checked
        vocab.fingerprint = data_fingerprint(con, optout.digest(excluded) if excluded else None)
        # this warehouse's provenance and extract end (training censors [END] at it), not the source model's
        describe_run(vocab, provenance, warehouse.extract_end(con))
        register_code_map(con, vocab)
        for split in SPLITS:
            ids = split_subject_ids(con, split)
            summary["tokens"][split], _, _ = write_split(con, vocab, split, ids, tmp, None)
            summary["subjects"][split] = len(ids)
        vocab.save(tmp / "vocab.json")
        if (model_dir / "code_descriptions.json").exists():
            shutil.copyfile(model_dir / "code_descriptions.json", tmp / "code_descriptions.json")
        (tmp / "tokenize_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
