"""Hash chains of JSON records: what makes an append-only log tamper-evident.

Two logs use them. The query service's audit log (:mod:`foresight.serve.audit_log`) links each line to the exact
bytes of the line before it, under a keyed MAC (:func:`mac`). The release registry's index
(:mod:`privacy.release`) links records, not bytes, so that it can be rewritten whole (it is replaced atomically on
every release) without changing a link:

- each record carries ``seq`` (its position, from 1), ``prev`` (the ``hash`` of the record before it,
  :data:`ZERO_HASH` for the first) and ``hash``: sha256 of the record's canonical JSON without its ``hash``
  (:func:`record_hash`; the canonical form is :func:`foresight.hashing.sha256_json`'s, sorted keys);
- so an edited record no longer matches its own ``hash``, a removed or reordered one breaks the next record's
  ``prev`` or its ``seq``, and :func:`first_break` names the first record that does not hold.

A plain hash can be recomputed by anyone who can write the file: the chain shows *that* something changed only
together with what anchors it (signatures over records that include ``prev``, or the last ``hash`` kept
elsewhere). Records written before the chain existed (no ``hash`` and no ``prev``) are accepted as a prefix; the
first chained record links to the last of them, which anchors them from then on.

>>> a = link({"x": 1}, None)
>>> b = link({"x": 2}, a)
>>> (a["seq"], a["prev"] == ZERO_HASH, b["prev"] == a["hash"], first_break([a, b]))
(1, True, True, None)
>>> first_break([b, a])[0]
0
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from foresight.hashing import sha256_json

ZERO_HASH = "0" * 64  # the ``prev`` of the first record
CHAIN_FIELDS = ("seq", "prev", "hash")


def mac(key: bytes, data: bytes | str) -> str:
    """HMAC-SHA256 of ``data`` under ``key``, hex."""
    return hmac.new(key, data.encode() if isinstance(data, str) else data, "sha256").hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 of a record's canonical JSON, its own ``hash`` left out (what the next record's ``prev`` names)."""
    return sha256_json({k: v for k, v in record.items() if k != "hash"})


def is_chained(record: Mapping[str, Any]) -> bool:
    """Whether a record carries its chain fields (records from before the chain do not)."""
    return "hash" in record or "prev" in record or "seq" in record


def link(record: Mapping[str, Any], previous: Mapping[str, Any] | None, position: int | None = None
         ) -> dict[str, Any]:
    """``record`` with its chain fields set, after ``previous`` (None: the first record). ``position`` (from 1)
    defaults to one after ``previous``'s ``seq``."""
    seq = position if position is not None else (int(previous.get("seq", 0)) + 1 if previous else 1)
    out = {k: v for k, v in record.items() if k not in CHAIN_FIELDS}
    out["seq"], out["prev"] = seq, record_hash(previous) if previous is not None else ZERO_HASH
    out["hash"] = record_hash(out)
    return out


def first_break(records: Sequence[Mapping[str, Any]]) -> tuple[int, str] | None:
    """(index, reason) of the first record where the chain does not hold, or None when it holds throughout.

    ``index`` counts from 0 in ``records``; records before the first chained one are the unchained prefix.
    """
    chained = False
    for i, rec in enumerate(records):
        if not is_chained(rec):
            if chained:
                return i, "an unchained record after chained ones (inserted, or its chain fields removed)"
            continue
        chained = True
        if rec.get("hash") != record_hash(rec):
            return i, "its hash does not match its contents (the record was edited)"
        want_prev = record_hash(records[i - 1]) if i else ZERO_HASH
        if rec.get("prev") != want_prev:
            return i, ("its prev does not name the record before it (a record before it was removed, reordered, "
                       "inserted or edited)")
        if rec.get("seq") != i + 1:
            return i, f"sequence number {rec.get('seq')!r}, expected {i + 1} (records removed, inserted or reordered)"
    return None
