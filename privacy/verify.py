"""``foresight registry verify``: re-check a release registry from its files alone.

For the index (:mod:`privacy.registry`): every line is a JSON record and the hash chain holds
(:func:`foresight.chain.first_break`); each later trusted key is signed by a key trusted before it. For each
release record: its signature (when it has one) verifies under a trusted key; the released folder's model files
still have the checksum the record names; the audit report there is signed by a trusted key, the signature covers
exactly that report and those files; the decision is PASS, or REVIEW with a reviewer's approval whose signature
verifies and which names this report and this model. Releases made with ``--allow-unsigned``, and records
written without a signing key, are listed as warnings.

Trusted keys are the registry's pinned keys, or only the ``public_key`` given (a copy held outside the
registry: the anchor that a writer of the folder cannot replace).

The answer names the first record that does not hold (``broken``: index from 0, line, reason) and lists every
problem; ``ok`` is False when there is any.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from foresight import chain
from foresight.hashing import sha256_json
from privacy import gate, registry, signing
from privacy.release import APPROVAL_KIND, REPORT_DIR, REPORT_JSON, REPORT_SIG, model_checksum


def verify_registry(reg: str | Path, public_key: str | Path | None = None) -> dict[str, Any]:
    """What :mod:`this module <privacy.verify>` checks, as ``{registry, ok, records, releases, trusted_keys,
    head, broken, problems, warnings}``; RegistryError only when there is no index at all."""
    reg = Path(reg)
    index = reg / registry.INDEX
    if not index.exists():
        raise registry.RegistryError(f"{index}: not found: {reg} is not a release registry (no index)")
    records, problems = _parse(index)
    brk = chain.first_break(records)
    if brk is not None:
        problems.append({"index": brk[0], "reason": f"hash chain broken: {brk[1]}"})
    warnings: list[dict[str, Any]] = []
    trusted, pin_problems = _trusted(records, public_key)
    problems += pin_problems
    releases = 0
    for i, rec in enumerate(records):
        if registry.kind(rec) == registry.RELEASE:
            releases += 1
            problems += [{"index": i, "reason": r} for r in _check_release(reg, rec, trusted, warnings, i)]
        elif registry.kind(rec) != registry.TRUST:
            problems.append({"index": i, "reason": f"unknown record kind {rec.get('kind')!r}"})
    problems.sort(key=lambda p: p["index"])
    first = problems[0] if problems else None
    return {"registry": str(reg), "ok": not problems, "records": len(records), "releases": releases,
            "trusted_keys": sorted(trusted), "head": chain.record_hash(records[-1]) if records else chain.ZERO_HASH,
            "broken": None if first is None else {**first, "line": first["index"] + 1},
            "problems": problems, "warnings": warnings}


def _parse(index: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The records up to the first line that is not one (the chain cannot be followed past it)."""
    records: list[dict[str, Any]] = []
    for n, line in enumerate(index.read_text(errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as exc:
            return records, [{"index": len(records), "reason": f"line {n + 1} is not a JSON record ({exc})"}]
        if not isinstance(rec, dict):
            return records, [{"index": len(records), "reason": f"line {n + 1} is not a JSON object"}]
        records.append(rec)
    return records, []


def _trusted(records: list[dict[str, Any]], public_key: str | Path | None
             ) -> tuple[dict[str, Ed25519PublicKey], list[dict[str, Any]]]:
    """The keys to verify with, and any problem with the registry's trust records."""
    problems = []
    try:
        pinned = registry.pinned_keys(records)
    except (registry.RegistryError, signing.KeyFileError) as exc:
        pinned = {}
        idx = next((i for i, r in enumerate(records) if registry.kind(r) == registry.TRUST), 0)
        problems.append({"index": idx, "reason": str(exc)})
    if public_key is None:
        return pinned, problems
    key = signing.load_public_key(public_key)
    kid = signing.key_id(key)
    if pinned and kid not in pinned:
        problems.append({"index": 0, "reason": f"{public_key} (key {kid[:16]}) is not among the keys the registry "
                                               f"pins ({', '.join(k[:16] for k in pinned)})"})
    return {kid: key}, problems


def _check_release(reg: Path, rec: dict[str, Any], trusted: dict[str, Ed25519PublicKey],
                   warnings: list[dict[str, Any]], i: int) -> list[str]:
    """The problems of one release record (warnings appended to ``warnings``)."""
    out = []
    if "signature" in rec:
        try:
            registry.verify_record(rec, trusted)
        except signing.SignatureError as exc:
            out.append(f"release record: {exc}")
    else:
        warnings.append({"index": i, "warning": "release record not signed (released without --signing-key)"})
    folder = Path(str(rec.get("path")))
    if not folder.is_dir() and (reg / folder.name).is_dir():  # the registry was moved: its folders moved with it
        folder = reg / folder.name
    try:
        checksum, _ = model_checksum(folder)
    except (OSError, ValueError) as exc:
        return [*out, f"released folder {folder}: {exc}"]
    if checksum != rec.get("checksum"):
        out.append(f"released files in {folder} changed (checksum {checksum[:12]}, recorded "
                   f"{str(rec.get('checksum'))[:12]})")
    try:
        report = json.loads((folder / REPORT_DIR / REPORT_JSON).read_text())
    except (OSError, ValueError) as exc:
        return [*out, f"released report unreadable: {exc}"]
    digest = sha256_json(report)
    out += _check_audit_signature(folder, rec, report, digest, checksum, trusted, warnings, i)
    out += _check_decision(rec, report, digest, checksum, trusted)
    return out


def _check_audit_signature(folder: Path, rec: dict[str, Any], report: dict[str, Any], digest: str, checksum: str,
                           trusted: dict[str, Ed25519PublicKey], warnings: list[dict[str, Any]], i: int) -> list[str]:
    sig = folder / REPORT_DIR / REPORT_SIG
    if rec.get("audit_signature") is None and not sig.exists():
        warnings.append({"index": i, "warning": "released with an unsigned audit report (--allow-unsigned)"})
        return []
    try:
        payload = signing.verify(signing.read_envelope(sig), trusted, "audit signature")
    except signing.SignatureError as exc:
        return [str(exc)]
    out = []
    if payload.get("report_sha256") != digest:
        out.append("the released audit report was edited after it was signed")
    if (payload.get("model") or {}).get("checksum") != checksum:
        out.append("the audit signature is for other model files than the released ones")
    recorded = rec.get("audit_signature") or {}
    if recorded.get("report_sha256") != payload.get("report_sha256"):
        out.append("the record names another audit signature than the one released")
    return out


def _check_decision(rec: dict[str, Any], report: dict[str, Any], digest: str, checksum: str,
                    trusted: dict[str, Ed25519PublicKey]) -> list[str]:
    decision = report.get("decision")
    if decision == gate.PASS and rec.get("approval") is None:
        return []
    if decision != gate.REVIEW:
        return [f"the released audit decided {decision}" + (" (a FAIL can never be approved)"
                                                           if decision == gate.FAIL else "")]
    if rec.get("approval") is None:
        return ["the released audit decided REVIEW and no reviewer's approval is recorded"]
    try:
        payload = signing.verify(rec["approval"], trusted, "reviewer's approval")
    except signing.SignatureError as exc:
        return [str(exc)]
    if payload.get("kind") != APPROVAL_KIND or payload.get("report_sha256") != digest or \
            payload.get("model_checksum") != checksum:
        return ["the reviewer's approval is for another report or model"]
    return []
