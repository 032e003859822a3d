"""The release registry's index: ``<registry>/index.jsonl``, one JSON record a line, hash-chained and signed.

Records
-------
- ``{"kind": "trust", "key_id", "public_key", "added", "reason"}``: a public key the registry trusts for audit
  signatures, approvals and release records. The first release that names a key (``--public-key``, else the public
  half of its ``--signing-key``) pins it (trust on first use, with the key the operator named); more keys only
  through ``foresight registry trust`` (:func:`trust_key`), signed by a key already trusted, so each key a registry
  has ever trusted is a record in the chain.
- ``{"kind": "release", ...}``: a released model (:mod:`privacy.release` writes it). Records from before the
  chain existed have no ``kind`` and are releases.

Each record carries the chain fields of :mod:`foresight.chain` (``seq``, ``prev``, ``hash``), and a record
written with a signing key also ``signed_by`` (the key id) and ``signature`` (Ed25519 over the canonical JSON of
the record without ``hash`` and ``signature``, chain fields included: :func:`sign_record`). A plain hash chain can
be recomputed by whoever can write the folder; signed records cannot, and since they cover ``prev``, neither
can anything before them. The trust records are only as safe as the folder: verify against a public key you hold
elsewhere (``foresight registry verify --public-key FILE``) when the folder's writers are not all trusted.

The index is replaced whole on every write (temporary file, fsync, ``os.replace``) under an advisory lock
(``.lock``), so a reader sees the old index or the new one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from foresight import chain
from foresight.atomic import write_text
from privacy import signing

INDEX = "index.jsonl"
LOCK = ".lock"
TRUST, RELEASE = "trust", "release"


class RegistryError(ValueError):
    """The index cannot be read, or its chain is broken; the message names the record and the reason."""


def read_records(registry: str | Path) -> list[dict[str, Any]]:
    """Every record of the index (an empty list without one); RegistryError naming the line that is not one."""
    path = Path(registry) / INDEX
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise RegistryError(f"{path}:{n}: not a JSON record ({exc})") from exc
        if not isinstance(rec, dict):
            raise RegistryError(f"{path}:{n}: not a JSON record (an object expected)")
        records.append(rec)
    return records


def check_chain(registry: str | Path, records: list[dict[str, Any]]) -> None:
    """RegistryError naming the first record where the chain breaks (nothing may be added to a broken index)."""
    brk = chain.first_break(records)
    if brk is not None:
        raise RegistryError(f"{Path(registry) / INDEX}: record {brk[0]} (line {brk[0] + 1}): {brk[1]}; run "
                            "`foresight registry verify` and restore the index from a copy")


def kind(record: Mapping[str, Any]) -> str:
    """A record's kind (records from before kinds existed are releases)."""
    return str(record.get("kind", RELEASE))


def pinned_keys(records: list[dict[str, Any]]) -> dict[str, Ed25519PublicKey]:
    """The keys the registry trusts (key id -> key), from its trust records: the first is taken as it is (the key
    the first signed release named), each later one must be signed by a key trusted before it. RegistryError naming
    the record that breaks that rule or whose key does not match its key id."""
    out: dict[str, Ed25519PublicKey] = {}
    for i, rec in enumerate(records):
        if kind(rec) != TRUST:
            continue
        key = signing.public_from_pem(str(rec.get("public_key")), f"{INDEX} record {i}")
        if signing.key_id(key) != rec.get("key_id"):
            raise RegistryError(f"{INDEX} record {i}: the trusted key does not match its key id")
        if out:
            try:
                verify_record(rec, out)
            except signing.SignatureError as exc:
                raise RegistryError(f"{INDEX} record {i}: a trusted key added without the signature of a key "
                                    f"trusted before it ({exc})") from exc
        out[rec["key_id"]] = key
    return out


def trust_record(public: Ed25519PublicKey, reason: str) -> dict[str, Any]:
    """A trust record for ``public`` (not yet chained)."""
    return {"kind": TRUST, "key_id": signing.key_id(public), "public_key": signing.public_pem(public),
            "added": signing.now(), "reason": reason}


def sign_record(record: Mapping[str, Any], private: Ed25519PrivateKey) -> dict[str, Any]:
    """``record`` (chain fields set, ``hash`` not yet) with ``signed_by`` and ``signature`` added."""
    body = {k: v for k, v in record.items() if k not in ("hash", "signature")}
    body["signed_by"] = signing.key_id(private.public_key())
    return {**body, "signature": base64.b64encode(private.sign(signing.canonical(body))).decode()}


def verify_record(record: Mapping[str, Any], trusted: Mapping[str, Ed25519PublicKey]) -> str:
    """The key id that signed ``record``; SignatureError when it is unsigned, by an untrusted key, or edited."""
    kid = record.get("signed_by")
    if not isinstance(kid, str) or "signature" not in record:
        raise signing.SignatureError("the record is not signed")
    if kid not in trusted:
        raise signing.SignatureError(f"signed by key {kid[:16]}, which is not a trusted key")
    body = {k: v for k, v in record.items() if k not in ("hash", "signature")}
    try:
        trusted[kid].verify(base64.b64decode(str(record["signature"]), validate=True), signing.canonical(body))
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise signing.SignatureError(f"its signature does not verify under key {kid[:16]} (edited after signing)"
                                     ) from exc
    return kid


def append(registry: Path, records: list[dict[str, Any]], new: list[dict[str, Any]],
           signer: Ed25519PrivateKey | None) -> list[dict[str, Any]]:
    """Chain ``new`` after ``records`` (the index as read under the lock), sign each with ``signer`` if given,
    and replace the index whole. Returns the chained records."""
    out, prev = [], records[-1] if records else None
    for i, rec in enumerate(new, len(records) + 1):
        linked = chain.link(rec, prev, position=i)
        if signer is not None:
            linked = chain.link(sign_record(linked, signer), prev, position=i)  # the hash covers the signature
        out.append(linked)
        prev = linked
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in [*records, *out])
    write_text(registry / INDEX, text)  # fsyncs the folder too
    return out


@contextlib.contextmanager
def locked(registry: Path) -> Iterator[None]:
    """One writer at a time per registry (an advisory lock, released by the kernel if the process dies)."""
    registry.mkdir(parents=True, exist_ok=True)
    with open(registry / LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def trust_key(registry: str | Path, public_key: str | Path, signing_key: str | Path | None = None
              ) -> dict[str, Any]:
    """Pin the public key in ``public_key`` (a ``.pub`` file) in the registry's chain; a key already trusted is
    a no-op (``already_trusted``). A registry that trusts keys already adds another only when the record is signed
    with one of them (``signing_key``), so a key cannot be slipped in by whoever can write the folder without
    breaking a signature (see the module docstring for what a writer of the folder can still do)."""
    registry = Path(registry)
    public = signing.load_public_key(public_key)
    signer = signing.load_private_key(signing_key) if signing_key else None
    with locked(registry):
        records = read_records(registry)
        check_chain(registry, records)
        pinned = pinned_keys(records)
        kid = signing.key_id(public)
        if kid in pinned:
            return {"registry": str(registry), "key_id": kid, "already_trusted": True}
        if pinned and (signer is None or signing.key_id(signer.public_key()) not in pinned):
            raise signing.SignatureError(
                f"{registry} already trusts key(s) {', '.join(k[:16] for k in pinned)}: adding another needs "
                "--signing-key with one of them" + (f" ({signing_key} is not)" if signer is not None else ""))
        [rec] = append(registry, records, [trust_record(public, f"foresight registry trust ({public_key})")], signer)
    return {"registry": str(registry), "key_id": kid, "already_trusted": False, "seq": rec["seq"]}
