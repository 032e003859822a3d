"""Ed25519 signatures over canonical JSON: what makes an audit report, a release record and a reviewer's approval
tamper-evident.

Keys
----
``foresight keys init --out DIR`` (:func:`init_keys`) writes ``DIR/signing.key`` (the private key, PKCS#8 PEM,
created with mode 0600, never overwritten) and ``DIR/signing.pub`` (the public key, PEM). The private key stays
with the operator; whoever verifies needs only the ``.pub`` file. A key is named by its **key id**: the sha256 of
its 32 raw public-key bytes. A private key file that others can read is refused (as ssh does), and the key is not
passphrase-protected: the file's permissions protect it, so keep it off shared folders.

Signatures
----------
A signature is a JSON file (an *envelope*)::

    {"format": "foresight-signature/1", "algorithm": "Ed25519", "key_id": "<sha256 of the public key>",
     "public_key": "<PEM, for reference only>", "payload": {...}, "signature": "<base64>"}

The signature is over the payload's canonical bytes (:func:`canonical`: JSON with sorted keys, the form whose
sha256 is :func:`foresight.hashing.sha256_json`), and the payload names its signer (``key_id``), so nothing in the
envelope is taken on trust: a verifier looks the key id up among the keys it already trusts
(:func:`verify`) and never uses the ``public_key`` shipped in the envelope.

An audit report ``report.json`` is signed beside it as ``report.sig.json`` (:func:`sign_report`); the payload
(:func:`audit_payload`) binds the report's whole content (``report_sha256``, of its canonical JSON), its decision,
and the model it is about: the model checksum and the sha256 of every file in it (weights, ``config.json``,
``foresight.json``, ...), so the signature of one model's audit cannot vouch for other weights.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from foresight.atomic import write_text
from foresight.hashing import sha256, sha256_json

ALGORITHM = "Ed25519"
FORMAT = "foresight-signature/1"
PRIVATE_KEY = "signing.key"
PUBLIC_KEY = "signing.pub"
AUDIT_KIND = "foresight-privacy-audit"


class SignatureError(ValueError):
    """A signature is missing, malformed, by an untrusted key, or does not verify; the message says which."""


class KeyFileError(ValueError):
    """A key file cannot be used (missing, not an Ed25519 key, readable by others, would be overwritten)."""


# --- keys -------------------------------------------------------------------------------------------------------


def key_id(public: Ed25519PublicKey) -> str:
    """The key's name: sha256 (hex) of its 32 raw public-key bytes."""
    return sha256(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def public_pem(public: Ed25519PublicKey) -> str:
    """The public key as PEM text (SubjectPublicKeyInfo)."""
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def public_from_pem(text: str, where: str = "public key") -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text; KeyFileError naming ``where`` when it is not one."""
    try:
        key = serialization.load_pem_public_key(text.encode())
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{where}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where}: not an Ed25519 public key ({type(key).__name__})")
    return key


def public_key_file(private_key: str | Path) -> Path:
    """Where :func:`init_keys` put the public half of ``private_key``: the same name with ``.pub``."""
    return Path(private_key).with_suffix(".pub")


def init_keys(out_dir: str | Path) -> dict[str, str]:
    """A new key pair in ``out_dir``: ``signing.key`` (mode 0600) and ``signing.pub``; KeyFileError if either
    exists (a key is never overwritten: what it signed would no longer verify)."""
    out = Path(out_dir)
    return create_key(out / PRIVATE_KEY)


def create_key(path: str | Path) -> dict[str, str]:
    """A new private key at ``path`` (mode 0600, created exclusively) and its public key beside it (``.pub``)."""
    path = Path(path)
    pub_path = public_key_file(path)
    for p in (path, pub_path):
        if p.exists() or p.is_symlink():
            raise KeyFileError(f"{p}: exists; refusing to overwrite a key (what it signed would no longer verify): "
                               "choose another folder or remove it yourself")
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # O_EXCL: never over another key
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # whatever the umask
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    write_text(pub_path, public_pem(private.public_key()), mode=0o644)
    return {"private_key": str(path), "public_key": str(pub_path), "key_id": key_id(private.public_key())}


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in ``path``; KeyFileError when missing, readable by others, or not such a key."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the signing key ({exc.strerror or exc}); create one with "
                           "`foresight keys init --out DIR`") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path}: the signing key is readable by others (mode {stat.S_IMODE(mode):04o}); "
                           f"run `chmod 600 {path}`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM private key without a passphrase ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key ({type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key in ``path`` (PEM, as ``signing.pub``); KeyFileError naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the public key ({exc})") from exc
    if "PRIVATE KEY" in text:
        raise KeyFileError(f"{path}: this is a private key; give its public half ({public_key_file(path).name})")
    return public_from_pem(text, str(path))


# --- signing and verifying --------------------------------------------------------------------------------------


def canonical(value: Any) -> bytes:
    """The bytes a signature covers: JSON with sorted keys (``sha256(canonical(v)) == sha256_json(v)``)."""
    return json.dumps(value, sort_keys=True, default=str).encode("utf-8", "surrogatepass")


def now() -> str:
    """The current UTC time, ISO 8601 to the second (what payloads record)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def sign(payload: Mapping[str, Any], private: Ed25519PrivateKey) -> dict[str, Any]:
    """An envelope (see the module docstring) signing ``payload`` plus the signer's key id."""
    public = private.public_key()
    body = {**payload, "key_id": key_id(public)}
    return {"format": FORMAT, "algorithm": ALGORITHM, "key_id": body["key_id"], "public_key": public_pem(public),
            "payload": body, "signature": base64.b64encode(private.sign(canonical(body))).decode()}


def verify(envelope: Any, trusted: Mapping[str, Ed25519PublicKey], what: str = "signature") -> dict[str, Any]:
    """The signed payload, if ``envelope`` is a valid signature by one of the ``trusted`` keys (key id -> key);
    SignatureError naming ``what`` and the reason otherwise."""
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise SignatureError(f"{what}: not a foresight signature (format {FORMAT!r} expected)")
    if envelope.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{what}: algorithm {envelope.get('algorithm')!r}, only {ALGORITHM} is accepted")
    payload, kid = envelope.get("payload"), envelope.get("key_id")
    if not isinstance(payload, dict) or not isinstance(kid, str) or payload.get("key_id") != kid:
        raise SignatureError(f"{what}: malformed (payload or key id missing, or they disagree)")
    if kid not in trusted:
        names = ", ".join(k[:16] for k in trusted) or "none"
        raise SignatureError(f"{what}: signed by key {kid[:16]}, which is not a trusted key (trusted: {names})")
    try:
        sig = base64.b64decode(str(envelope.get("signature")), validate=True)
        trusted[kid].verify(sig, canonical(payload))
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what}: the signature does not verify under key {kid[:16]}: the signed content was "
                             "edited after signing") from exc
    return payload


def read_envelope(path: str | Path) -> dict[str, Any]:
    """A signature file's JSON; SignatureError naming it when it cannot be read as JSON."""
    try:
        env = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise SignatureError(f"{path}: not a readable signature ({type(exc).__name__}: {exc})") from exc
    if not isinstance(env, dict):
        raise SignatureError(f"{path}: not a readable signature (a JSON object expected)")
    return env


# --- audit reports ----------------------------------------------------------------------------------------------


def signature_path(report_path: str | Path) -> Path:
    """Where a report's signature lives: ``report.json`` -> ``report.sig.json``."""
    p = Path(report_path)
    return p.with_name(p.stem + ".sig.json")


def audit_payload(report: Mapping[str, Any]) -> dict[str, Any]:
    """What signing an audit report vouches for: its whole content (digest), decision and model files."""
    model = report.get("model") if isinstance(report.get("model"), dict) else {}
    return {"kind": AUDIT_KIND, "report_sha256": sha256_json(report), "decision": report.get("decision"),
            "created": report.get("created"),
            "model": {"checksum": model.get("checksum"), "files": model.get("files")}, "signed_at": now()}


def sign_report(report_path: str | Path, private: Ed25519PrivateKey) -> Path:
    """Sign the report at ``report_path`` as written (read back, so what is signed is what a reader parses);
    the signature goes beside it (:func:`signature_path`), written atomically. Returns its path."""
    report = json.loads(Path(report_path).read_text())
    out = signature_path(report_path)
    write_text(out, json.dumps(sign(audit_payload(report), private), indent=1, sort_keys=True) + "\n")
    return out
