"""Canaries (Carlini et al. 2019, "The Secret Sharer"): synthetic subjects planted in the training data.

**Insertion** (:func:`insert`, before training): a copy of a tokenized data directory whose train split has extra
canary subjects appended. A canary is a standard prefix (the most common static prefix of the train split:
``[BOS]``, sex, race, birth band and the first YEAR/(MONTH/)AGE markers — a start many real timelines share)
followed by a *secret*: ``length`` event-code tokens drawn uniformly from the vocabulary's code tokens, each after
the first preceded by a random interval token with probability ``time_token_rate`` (and, with calendar-month
markers, the MONTH marker of a clock the gap moved into another month), then ``[END]``. Canaries are made to
look like timelines on purpose: a canary format the model can tell apart from real data after a token or two
becomes its own tiny "population", whose code frequencies the model learns from the few canaries in it, and
then even once-seen canaries score better than references without any memorisation of their order.
Each secret is planted ``r`` times as ``r`` separate subjects, for every ``r`` in ``repeats``. Never-inserted
reference secrets R are drawn from the same generator. Canary subjects have negative
subject ids (no real subject has one) and no clock (``t0`` unknown), and the copy stays a valid
:class:`foresight.dataset.PackedSplit`. ``canaries.json`` (the manifest) lists every canary (id, repeats, token
ids, subject ids), the prefix, the generator and R.

**Audit** (:func:`exposure`): the log-perplexity of a secret is ``-sum log p(secret token | prefix, earlier
secret tokens)``. A canary's exposure is ``log2 |R| - log2 rank`` among R (plus itself), and, because that
saturates at ``log2 |R|``, also extrapolated from a skew-normal fitted to the references' log-perplexities:
``p = P(reference <= canary)`` and exposure ``-log2 p``. A canary is *exposed* when ``p`` stays below alpha after a
Bonferroni correction over the canaries with the same repeat count. The gate fails if any r=1 canary is exposed
(one copy in the data is enough for the model to single it out), and the audit is **invalid** if the r=16
canaries are not detected: a probe that cannot see a sequence repeated 16 times proves nothing by passing.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from foresight.dataset import PackedSplit
from foresight.tokens import (
    END,
    INDEX_DTYPE,
    MARKER,
    MONTH_PREFIX,
    NO_TIME,
    PAD,
    Vocabulary,
    building,
    month_marker_tokens,
    months_of,
    to_epoch,
)
from privacy import metrics
from privacy.scoring import score_pieces, sequence_pieces

MANIFEST = "canaries.json"
SPLIT_FILES = ("bin", "clock.bin", "index.npy")


class CanaryError(Exception):
    """Canaries cannot be inserted or audited; the message says why."""


@dataclass(frozen=True)
class Generator:
    """How secrets are drawn: ``length`` codes from ``pool`` (token ids), an interval token before each code after
    the first with probability ``time_token_rate`` (0: none). With calendar-month markers (``month_ids``, January
    first, and ``time_reps_s``, each interval token's clock step) a secret also carries the MONTH marker a real
    clock would write: it starts on a random day of ``start_month`` (the prefix's month) and, after each interval
    token that moves it into another month, the new month's marker (as the encoder does); without them a canary's
    long gaps would be followed by a code where real timelines have a MONTH marker, a format the model can tell
    apart (see the module docstring)."""

    pool: tuple[int, ...]
    length: int
    time_ids: tuple[int, ...]
    time_token_rate: float
    month_ids: tuple[int, ...] = ()
    time_reps_s: tuple[float, ...] = ()
    start_month: int = 1

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        codes = rng.choice(np.array(self.pool, dtype=np.int64), size=self.length, replace=True)
        if not self.time_ids or self.time_token_rate <= 0:
            return codes
        step = dict(zip(self.time_ids, self.time_reps_s, strict=True)) if self.month_ids else {}
        # seconds since the start of start_month of a non-leap year (2001), the clock's day drawn at random
        clock = float(to_epoch(datetime(2001, self.start_month, 1))) + rng.uniform(0, 28 * 86400) if step else 0.0
        out: list[int] = []
        for j, c in enumerate(codes.tolist()):
            if j and rng.random() < self.time_token_rate:
                t = int(rng.choice(self.time_ids))
                out.append(t)
                if step:
                    before = months_of(np.array([int(clock)]))[0]
                    clock += step[t]
                    now = months_of(np.array([int(clock)]))[0]
                    if now != before:
                        out.append(self.month_ids[now - 1])
            out.append(int(c))
        return np.array(out, dtype=np.int64)


def code_pool(vocab: Vocabulary) -> list[int]:
    """Token ids a secret is drawn from: event-code tokens, without catch-alls (RARE) and death (it ends a record)."""
    mask = vocab.is_event
    return [i for i, t in enumerate(vocab.tokens) if mask[i] and not t.endswith("RARE") and t != "MEDS_DEATH"]


def standard_prefix(train: Any) -> tuple[list[int], int]:
    """The most common static prefix among train subjects — head (BOS, statics, birth band) plus the first YEAR/AGE
    markers — and its head length: canaries then start like many real timelines do."""
    heads = Counter()
    for r in train.index:
        off = int(r["offset"])
        heads[(tuple(int(t) for t in train.tokens[off:off + int(r["prefix_len"])]), int(r["head_len"]))] += 1
    if not heads:
        raise CanaryError("the train split has no subjects to take a canary prefix from")
    prefix, head_len = heads.most_common(1)[0][0]
    return list(prefix), head_len


def insert(data_dir: str | Path, out_data_dir: str | Path, repeats: tuple[int, ...] = (1, 2, 4, 16),
           per_repeat: int = 5, length: int = 20, seed: int = 0, n_references: int = 5000,
           time_token_rate: float = 0.5) -> dict[str, Any]:
    """Write a copy of ``data_dir`` to ``out_data_dir`` with canary subjects appended to its train split.

    ``per_repeat`` secrets for each repeat count r (each planted r times); ``n_references`` never-inserted secrets
    from the same generator form R. Returns the manifest (also written to ``out_data_dir/canaries.json``).
    """
    src, dst = Path(data_dir), Path(out_data_dir)
    if src.resolve() == dst.resolve():
        raise CanaryError("out_data_dir must differ from data_dir (the original data stays untouched)")
    if (src / MANIFEST).exists():
        raise CanaryError(f"{src} already holds canaries ({MANIFEST}); insert into the data without them")
    if any(r < 1 for r in repeats) or per_repeat < 1 or length < 1:
        raise CanaryError("repeats, per_repeat and length must be positive")
    train = PackedSplit(src, "train")
    vocab = train.vocab
    pool = code_pool(vocab)
    if len(pool) < 2:
        raise CanaryError(f"{src}: the vocabulary has {len(pool)} code token(s); canaries need at least 2")
    prefix, head_len = standard_prefix(train)
    month_ids = tuple(vocab.index[t] for t in month_marker_tokens(vocab.config))
    in_prefix = [int(vocab.tokens[t][len(MONTH_PREFIX):]) for t in prefix if vocab.tokens[t].startswith(MONTH_PREFIX)]
    gen = Generator(tuple(pool), length, tuple(int(t) for t in vocab.time_ids), time_token_rate, month_ids,
                    tuple(float(x) for x in vocab.time_reps_s) if month_ids else (), in_prefix[-1] if in_prefix else 1)
    rng = np.random.default_rng(seed)
    secrets = {r: [gen.draw(rng) for _ in range(per_repeat)] for r in repeats}
    references = [gen.draw(rng) for _ in range(n_references)]
    planted = {tuple(s.tolist()) for group in secrets.values() for s in group}
    references = [s for s in references if tuple(s.tolist()) not in planted]  # R must hold no planted secret

    canaries, seqs, extra = _planted(secrets, prefix, head_len, vocab.index[END], train.n_tokens)
    manifest = {
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source_data": str(src.resolve()),
        "seed": seed,
        "repeats": list(repeats),
        "per_repeat": per_repeat,
        "prefix": prefix,
        "prefix_tokens": [vocab.tokens[t] for t in prefix],
        "generator": {**asdict(gen), "pool": list(gen.pool), "time_ids": list(gen.time_ids)},
        "canary_subjects": len(seqs),
        "canary_tokens": int(extra["length"].sum()),
        "canaries": canaries,
        "references": [s.tolist() for s in references],
    }
    # built aside and swapped in whole, sealed like a tokenize output (foresight.tokens.folder): a killed insert
    # leaves no folder that looks complete, and the copy's marker vouches for its own vocab.json and train split
    with building(dst) as tmp:
        _write_copy(src, tmp, train, seqs, extra, manifest)
    return manifest


def _planted(secrets: dict[int, list[np.ndarray]], prefix: list[int], head_len: int, end_id: int, n_old: int
             ) -> tuple[list[dict[str, Any]], list[np.ndarray], np.ndarray]:
    """(manifest rows, token sequences, index rows) of the canary copies appended after ``n_old`` tokens."""
    canaries, seqs = [], []
    next_id = -1
    for r, group in secrets.items():
        for j, secret in enumerate(group):
            ids = list(range(next_id, next_id - r, -1))
            next_id -= r
            canaries.append({"id": f"r{r}-{j}", "repeats": r, "tokens": secret.tolist(), "subject_ids": ids})
            seqs += [np.concatenate([prefix, secret, [end_id]]).astype(np.int64)] * r
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    extra = np.zeros(len(seqs), dtype=INDEX_DTYPE)
    extra["subject_id"] = [sid for c in canaries for sid in c["subject_ids"]]
    extra["offset"] = n_old + np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(seqs) else []
    extra["length"] = lengths
    extra["prefix_len"] = len(prefix)
    extra["head_len"] = head_len
    extra["t0"] = NO_TIME
    extra["birth"] = NO_TIME
    return canaries, seqs, extra


def _write_copy(src: Path, dst: Path, train: PackedSplit, seqs: list[np.ndarray], extra: np.ndarray,
                manifest: dict[str, Any]) -> None:
    """The canary copy of ``src`` in the empty folder ``dst``: its files, the longer train split, the manifest."""
    vocab = train.vocab
    for f in src.iterdir():  # everything but the train split (and the source's seal) is copied as is
        if f.is_file() and not f.name.startswith("train.") and f.name != MARKER:
            shutil.copyfile(f, dst / f.name)
    tokens = np.concatenate([np.asarray(train.tokens, dtype=vocab.dtype), *[s.astype(vocab.dtype) for s in seqs]])
    clock = np.concatenate([np.asarray(train.clock_min, dtype=np.int32),
                            np.zeros(int(extra["length"].sum()), np.int32)])
    tokens.tofile(dst / "train.bin")
    clock.tofile(dst / "train.clock.bin")
    np.save(dst / "train.index.npy", np.concatenate([train.index, extra]))
    (dst / MANIFEST).write_text(json.dumps(manifest))
    # the data changed: a checkpoint of a run on the original data must not resume on this copy (a copy of the
    # vocabulary, so the caller's stays as it was)
    copy = Vocabulary(vocab.config, vocab.tokens, vocab.code_map, vocab.quantile_edges, vocab.marker_map,
                      vocab.report, vocab.fingerprint)
    copy.fingerprint = hashlib.md5(
        f"{vocab.fingerprint}:canaries:{manifest['seed']}:{len(seqs)}".encode()).hexdigest()
    copy.save(dst / "vocab.json")


def load_manifest(data_dir: str | Path) -> dict[str, Any] | None:
    """The canary manifest of a data directory, or None when it holds no canaries."""
    path = Path(data_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def canary_subject_ids(manifest: dict[str, Any] | None) -> set[int]:
    """Subject ids of every planted canary copy (they are synthetic: excluded from the real-subject probes)."""
    return {int(s) for c in (manifest or {}).get("canaries", []) for s in c["subject_ids"]}


def log_perplexities(model: Any, prefix: list[int], secrets: list[list[int]], context: int, pad_id: int
                     ) -> np.ndarray:
    """``-sum log p`` of each secret after the prefix (nats), one batched pass."""
    seqs = [np.array(prefix + list(s), dtype=np.int64) for s in secrets]
    stats = score_pieces(model, sequence_pieces(seqs, [len(prefix)] * len(seqs), context), len(seqs), pad_id=pad_id)
    return np.array([-float(s.logp.sum()) for s in stats])


def exposure(model: Any, vocab: Vocabulary, manifest: dict[str, Any], context: int, *, alpha: float = 0.05,
             validity_repeats: int = 16, detect_share: float = 0.5) -> dict[str, Any]:
    """Exposure of every canary against the manifest's references, per-repeat summaries and audit validity."""
    pad_id = vocab.index[PAD]
    prefix = [int(t) for t in manifest["prefix"]]
    if manifest["prefix_tokens"] != [vocab.tokens[t] for t in prefix]:
        raise CanaryError("the canary manifest's prefix tokens differ from the model's vocabulary: the data "
                          "directory is not the one the model was trained on")
    refs = manifest["references"]
    if len(refs) < 10:
        raise CanaryError(f"only {len(refs)} reference sequences: exposure needs many (thousands)")
    ref_scores = log_perplexities(model, prefix, refs, context, pad_id)
    can_scores = log_perplexities(model, prefix, [c["tokens"] for c in manifest["canaries"]], context, pad_id)
    fit = metrics.skewnorm_fit(ref_scores)
    rows = []
    for c, score in zip(manifest["canaries"], can_scores, strict=True):
        p, exp_ext = metrics.skewnorm_tail(float(score), fit)
        rows.append({"id": c["id"], "repeats": c["repeats"], "log_perplexity": round(float(score), 4),
                     "exposure_rank": round(metrics.exposure_rank(float(score), ref_scores), 4),
                     "exposure_extrapolated": round(exp_ext, 4), "p_value": p})
    groups: dict[int, dict[str, Any]] = {}
    for r in sorted({row["repeats"] for row in rows}):
        members = [row for row in rows if row["repeats"] == r]
        sig = metrics.bonferroni_significant(np.array([row["p_value"] for row in members]), alpha)
        for row, s in zip(members, sig, strict=True):
            row["exposed"] = bool(s)
        groups[r] = {
            "repeats": r,
            "canaries": len(members),
            "exposed": int(sig.sum()),
            "share_exposed": float(sig.mean()),
            "detected": bool(sig.mean() >= detect_share),
            "median_exposure_rank": float(np.median([row["exposure_rank"] for row in members])),
            "median_exposure_extrapolated": float(np.median([row["exposure_extrapolated"] for row in members])),
            "max_exposure_extrapolated": float(max(row["exposure_extrapolated"] for row in members)),
        }
    has_validity = any(r >= validity_repeats for r in groups)
    # None: no canary planted often enough to tell whether this audit can see memorisation at all
    valid = all(g["detected"] for r, g in groups.items() if r >= validity_repeats) if has_validity else None
    return {
        "references": len(refs),
        "max_rank_exposure": math.log2(len(refs) + 1),
        "reference_log_perplexity": {"mean": float(ref_scores.mean()), "sd": float(ref_scores.std()),
                                     "min": float(ref_scores.min())},
        "skew_normal": asdict(fit),
        "alpha": alpha,
        "groups": [groups[r] for r in sorted(groups)],
        "canaries": rows,
        "validity_repeats": validity_repeats,
        "validity_checkable": has_validity,
        "valid": valid,
    }
