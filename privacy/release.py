"""Release: copy a model into a registry only if a signed audit of *exactly that model* passed (or a reviewer
approved its REVIEW).

A model's identity is its checksum (:func:`model_checksum`): sha256 over the sorted list of (file name, sha256) of
the files that define what it computes and how its tokens read — weights (``*.safetensors``, ``*.bin``),
``config.json``, ``generation_config.json``, ``vocab.json`` and ``foresight.json``. The audit records it; the
release recomputes it, so a model changed after its audit (retrained, fine-tuned, a file swapped) is refused.

What a release checks, in order (:func:`check_releasable`), refusing with the reason at the first that fails:

1. the model's save is complete, the report is readable, and its model checksum is this model's;
2. the audit did not decide FAIL (a FAIL can never be approved);
3. the report is signed (``report.sig.json``, :mod:`privacy.signing`) by a key the release trusts — the
   ``public_key`` given, or the keys pinned in the registry (:mod:`privacy.registry`) — and the signature covers
   exactly this report's content and this model's files. An unsigned report is refused unless
   ``allow_unsigned`` (``--allow-unsigned``), and such a release is recorded as unsigned;
4. the decisions the report records agree with its own probe figures under its own thresholds
   (:func:`rederive`: defence in depth, and the only check an unsigned report gets);
5. the decision is PASS, or REVIEW with a reviewer's approval (:class:`ReviewApproval`), which is signed with
   the release's signing key (a key the registry trusts), bound to this report and model, and recorded in the
   index entry, in ``privacy/approval.json`` and on the released model card (``privacy/report.html``).

Thresholds changed from the shipped defaults are named in the index entry (``gate_overrides``).

Writes are atomic and serialised by a lock on the registry: the files go to a temporary folder inside the
registry, are checked against the checksum again, and the folder is renamed into place (``os.rename`` within one
file system); then the index (hash-chained, :mod:`privacy.registry`) is replaced whole. The index is the commit
point: a model is released when its record is there. A release killed part-way leaves at most a ``.tmp-*`` folder
(removed by the next release) or a copied folder the index does not name (recorded by the next release of that
model). Checkpoints (optimiser state, RNG state) and training logs are never copied; ``code_descriptions.json``
(the codes' readable names; not part of the identity) is, with its sha256 in the index entry. Released:
``<registry>/<name>-<checksum[:12]>/`` with the model files and ``privacy/report.json``, ``report.sig.json``,
``report.html`` (+ ``approval.json``). :func:`privacy.verify.verify_registry` re-checks all of it later
(``foresight registry verify``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from foresight.atomic import fsync_dir, fsync_file
from foresight.hashing import sha256, sha256_chunks, sha256_file, sha256_json
from privacy import gate, registry, signing
from privacy.registry import INDEX, LOCK, RegistryError
from privacy.report import approval_html, html_describes, probe_results, render_html

REPORT_DIR = "privacy"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
REPORT_SIG = "report.sig.json"
APPROVAL = "approval.json"
APPROVAL_KIND = "foresight-review-approval"
COMPANIONS = ("code_descriptions.json",)  # released with the model, not part of what it computes
_NAMES = ("config.json", "generation_config.json", "vocab.json", "foresight.json")
_SUFFIXES = (".safetensors", ".bin")
__all__ = ["INDEX", "LOCK", "ReleaseRefused", "ReviewApproval", "model_checksum", "release"]


class ReleaseRefused(Exception):
    """The model may not be released; the message gives the reason."""


def model_files(model_dir: str | Path) -> list[Path]:
    """The files that make up a model (see the module docstring), sorted by name."""
    d = Path(model_dir)
    files = [p for p in d.iterdir() if p.is_file() and (p.name in _NAMES or p.suffix in _SUFFIXES)]
    return sorted(files, key=lambda p: p.name)


def model_checksum(model_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """(checksum, [{name, sha256, bytes}]) of a model directory; an empty or weightless one is an error."""
    files = model_files(model_dir)
    if not any(p.suffix in _SUFFIXES for p in files):
        raise FileNotFoundError(f"{model_dir}: no model weights (*.safetensors / *.bin)")
    listing = [{"name": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files]
    return sha256_chunks(f"{f['name']}\0{f['sha256']}\n" for f in listing), listing


def latest_report(model_dir: str | Path) -> Path:
    """Where the latest audit of a model is: ``MODEL_DIR/privacy/report.json``."""
    return Path(model_dir) / REPORT_DIR / REPORT_JSON


def read_report(path: Path) -> dict[str, Any]:
    """An audit report's JSON with its model checksum and decision; ReleaseRefused when it is not one."""
    if not path.exists():
        raise ReleaseRefused(f"no privacy audit ({path} not found); run `foresight privacy audit` first")
    try:
        report = json.loads(path.read_text())
        if not (isinstance(report["model"]["checksum"], str) and isinstance(report["decision"], str)):
            raise TypeError("model.checksum and decision must be strings")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:  # ValueError: bad JSON, bytes
        raise ReleaseRefused(f"{path}: not a readable audit report ({type(exc).__name__}: {exc})") from exc
    return report


def rederive(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """The gate's decision re-derived from the report's own probe results and thresholds; ReleaseRefused when they
    are missing or malformed, or when the decisions the report records disagree with them."""
    try:
        results = probe_results(report)
    except KeyError as exc:
        raise ReleaseRefused(f"{path}: not an audit's report: the probe results are missing ({exc.args[0]}), so "
                             "its decision cannot be checked; run `foresight privacy audit`") from exc
    except TypeError as exc:
        raise ReleaseRefused(f"{path}: malformed probe results ({exc}); run `foresight privacy audit`") from exc
    if not isinstance(report.get("config"), dict):
        raise ReleaseRefused(f"{path}: not an audit's report: no gate thresholds (config) recorded")
    try:
        cfg = gate.load_config(report["config"])
        derived = gate.decide(results, cfg)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError, RecursionError) as exc:
        raise ReleaseRefused(f"{path}: malformed probe results or thresholds ({type(exc).__name__}: {exc}); "
                             "run `foresight privacy audit`") from exc
    recorded = report.get("gate") if isinstance(report.get("gate"), dict) else {}
    rec_probes = recorded.get("probes") if isinstance(recorded.get("probes"), dict) else {}
    diffs = [f"decision: recorded {report['decision']}, derived {derived['decision']}"
             ] if report["decision"] != derived["decision"] else []
    diffs += [f"gate.decision: recorded {recorded.get('decision')}, derived {derived['decision']}"
              ] if recorded.get("decision") != derived["decision"] else []
    diffs += [f"valid: recorded {report.get('valid')}, derived {derived['valid']}"
              ] if report.get("valid") != derived["valid"] else []
    for name, p in derived["probes"].items():
        mine = rec_probes.get(name)
        got = mine.get("decision") if isinstance(mine, dict) else None
        if got != p["decision"]:
            diffs.append(f"{name}: recorded {got}, derived {p['decision']}")
    if diffs:
        raise ReleaseRefused(f"{path}: the decisions recorded in the report disagree with its own probe results "
                             f"under its own thresholds ({'; '.join(diffs)}): the report was edited or is not an "
                             "audit's output; audit the model again")
    return derived


@dataclass(frozen=True)
class ReviewApproval:
    """A human reviewer's approval of an audit that decided REVIEW: who and why (the findings come from the
    report). Signed at release with the release's signing key."""

    reviewer: str
    reason: str


@dataclass
class Verified:
    """What :func:`check_releasable` established: the report, the gate's decision re-derived from it, and its
    signature's payload (None for an unsigned report released with ``allow_unsigned``)."""

    report: dict[str, Any]
    decision: str
    signature: dict[str, Any] | None
    envelope: dict[str, Any] | None


def resolve_trust(pinned: dict[str, Ed25519PublicKey], public_key: str | Path | None,
                  signer: Ed25519PrivateKey | None) -> tuple[dict[str, Ed25519PublicKey], Ed25519PublicKey | None]:
    """(the keys this release trusts, the key to pin first or None). The registry's pinned keys when it has any (a
    ``public_key`` or signing key outside them is refused); else the ``public_key`` given, or the signing key's
    public half, which the release then pins."""
    offered = signing.load_public_key(public_key) if public_key else (signer.public_key() if signer else None)
    if pinned:
        for what, key in (("--public-key " + str(public_key), offered if public_key else None),
                          ("the signing key", signer.public_key() if signer else None)):
            if key is not None and signing.key_id(key) not in pinned:
                raise ReleaseRefused(f"{what} (key {signing.key_id(key)[:16]}) is not a key this registry trusts "
                                     f"({', '.join(k[:16] for k in pinned)}); add it with `foresight registry trust "
                                     "--public-key FILE --signing-key TRUSTED_KEY`")
        return pinned, None
    if offered is None:
        return {}, None
    if signer is not None and signing.key_id(signer.public_key()) != signing.key_id(offered):
        raise ReleaseRefused("the signing key is not the key --public-key names, and a new registry pins one key: "
                             "release once with one of them, then add the other with `foresight registry trust`")
    return {signing.key_id(offered): offered}, offered


def check_signature(report: dict[str, Any], path: Path, checksum: str, listing: list[dict[str, Any]],
                    trusted: dict[str, Ed25519PublicKey], allow_unsigned: bool
                    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(payload, envelope) of the report's valid signature, or (None, None) for an unsigned report when
    ``allow_unsigned``; ReleaseRefused otherwise, saying what to do."""
    sig_path = signing.signature_path(path)
    if not sig_path.exists():
        if allow_unsigned:
            return None, None
        raise ReleaseRefused(f"{path}: the audit report is not signed ({sig_path.name} not found): audit with "
                             "`foresight privacy audit ... --signing-key KEY` (create a key with `foresight keys "
                             "init --out DIR`), or release with --allow-unsigned (recorded as unsigned)")
    if not trusted:
        raise ReleaseRefused(f"{sig_path}: no trusted public key to check it with: pass --public-key FILE (the "
                             "first signed release pins it in the registry)")
    try:
        envelope = signing.read_envelope(sig_path)
        payload = signing.verify(envelope, trusted, str(sig_path))
    except signing.SignatureError as exc:
        raise ReleaseRefused(str(exc)) from exc
    if payload.get("kind") != signing.AUDIT_KIND:
        raise ReleaseRefused(f"{sig_path}: signs a {payload.get('kind')!r}, not an audit report")
    if payload.get("report_sha256") != sha256_json(report):
        raise ReleaseRefused(f"{path}: the report was edited after it was signed (its content no longer matches "
                             f"{sig_path.name}); audit the model again")
    model = payload.get("model") if isinstance(payload.get("model"), dict) else {}
    if model.get("checksum") != checksum:
        signed = {f.get("name"): f.get("sha256") for f in model.get("files") or [] if isinstance(f, dict)}
        now = {f["name"]: f["sha256"] for f in listing}
        differ = sorted(n for n in set(signed) | set(now) if signed.get(n) != now.get(n))
        raise ReleaseRefused(f"{sig_path}: the signed audit is for other model files (signed checksum "
                             f"{str(model.get('checksum'))[:12]}, this model {checksum[:12]}; differing: "
                             f"{', '.join(differ) or '?'}); audit this model again")
    return payload, envelope


def check_releasable(model_dir: str | Path, report_path: str | Path | None = None, *,
                     trusted: dict[str, Ed25519PublicKey] | None = None, allow_unsigned: bool = False,
                     approve: bool = False) -> Verified:
    """What makes a model releasable (the module docstring's steps 1-5), or :class:`ReleaseRefused` saying why.

    ``approve``: a reviewer approves a REVIEW (then the report must be signed and decide REVIEW)."""
    # imported here: foresight.train pulls in torch and DeepSpeed, and every CLI command imports this module (through
    # `foresight keys`), so a top-level import cost each `foresight etl` or `--help` a second of start-up
    from foresight.train.card import check_complete

    model_dir = Path(model_dir)
    path = Path(report_path) if report_path else latest_report(model_dir)
    try:
        check_complete(model_dir)
    except FileNotFoundError as exc:
        raise ReleaseRefused(str(exc)) from exc
    report = read_report(path)
    audited = report["model"]["checksum"]
    checksum, listing = model_checksum(model_dir)
    if audited != checksum:
        raise ReleaseRefused(f"{model_dir}: the model changed after its audit, or {path} is another model's report "
                             f"(audited checksum {audited[:12]}, this model {checksum[:12]}); audit this model again")
    if report["decision"] not in (gate.PASS, gate.REVIEW) or (report["decision"] == gate.REVIEW and not approve):
        reasons = report.get("reasons")
        why = "; ".join(str(r) for r in reasons[:5]) if isinstance(reasons, list) else ""
        hint = ("; a FAIL can never be approved" if approve else
                "; a reviewer may approve it: --approve-review --reviewer NAME --reason TEXT --signing-key KEY"
                if report["decision"] == gate.REVIEW else "")
        raise ReleaseRefused(f"{model_dir}: the latest audit ({report.get('created', '?')}) decided "
                             f"{report['decision']}, not PASS{hint}: {why}")
    payload, envelope = check_signature(report, path, checksum, listing, trusted or {},
                                        allow_unsigned and not approve)
    derived = rederive(report, path)["decision"]
    if approve and derived != gate.REVIEW:
        raise ReleaseRefused(f"{model_dir}: --approve-review is for an audit that decided REVIEW; this one decided "
                             f"{derived}" + ("" if derived == gate.PASS else " (a FAIL can never be approved)"))
    return Verified(report, derived, payload, envelope)


def approval_payload(verified: Verified, approval: ReviewApproval, checksum: str) -> dict[str, Any]:
    """What a reviewer's approval vouches for: who, why, the findings they saw, this report and this model."""
    if not approval.reviewer.strip() or not approval.reason.strip():
        raise ReleaseRefused("an approval needs a reviewer's name (--reviewer) and a reason (--reason)")
    probes = (verified.report.get("gate") or {}).get("probes") or {}
    findings = [f for f in gate.findings({k: p for k, p in probes.items() if isinstance(p, dict)})
                if f["severity"] == gate.REVIEW]  # each with its id: what the reviewer saw and accepts
    return {"kind": APPROVAL_KIND, "reviewer": approval.reviewer.strip(), "reason": approval.reason.strip(),
            "decision": verified.decision, "findings": findings, "report_sha256": sha256_json(verified.report),
            "model_checksum": checksum, "approved_at": signing.now()}


def release(model_dir: str | Path, registry_dir: str | Path, *, name: str | None = None,
            report_path: str | Path | None = None, public_key: str | Path | None = None,
            signing_key: str | Path | None = None, allow_unsigned: bool = False,
            approval: ReviewApproval | None = None) -> dict[str, Any]:
    """Copy a model whose signed audit passed (or whose REVIEW ``approval`` approves) into the registry
    atomically and record it in the hash-chained index (signed when ``signing_key`` is given).

    ``public_key``: the trusted key (pinned in the registry on its first signed release); without it, the keys
    the registry pins. ``approval`` needs ``signing_key``. Releasing the same model (same checksum) again is a
    no-op that returns the existing entry.
    """
    model_dir, reg = Path(model_dir), Path(registry_dir)
    src_report = Path(report_path) if report_path else latest_report(model_dir)
    if approval is not None and signing_key is None:
        raise ReleaseRefused("an approval is signed: give --signing-key (a key the registry trusts)")
    signer = _load_signer(signing_key)
    records = _records(reg)
    trusted, to_pin = resolve_trust(_pinned(reg, records), public_key, signer)
    verified = check_releasable(model_dir, src_report, trusted=trusted, allow_unsigned=allow_unsigned,
                                approve=approval is not None)
    checksum = verified.report["model"]["checksum"]
    name = name or model_dir.resolve().name
    if not name or "/" in name or name.startswith("."):
        raise ReleaseRefused(f"not a usable release name: {name!r}")
    approved = None
    if approval is not None and signer is not None:
        approved = signing.sign(approval_payload(verified, approval, checksum), signer)
    final = reg / f"{name}-{checksum[:12]}"
    entry = {"kind": registry.RELEASE, "name": name, "checksum": checksum, "path": str(final),
             "source": str(model_dir.resolve()), "audit_created": verified.report.get("created"),
             "decision": verified.decision,
             "gate_overrides": gate.overrides(gate.load_config(verified.report["config"])),
             "audit_signature": None if verified.signature is None else {
                 "key_id": verified.signature["key_id"], "report_sha256": verified.signature["report_sha256"]},
             "approval": approved}
    with registry.locked(reg):
        current = _records(reg)
        if _pinned(reg, current).keys() != _pinned(reg, records).keys():
            raise ReleaseRefused(f"{reg}: the registry's trusted keys changed during the release; try again")
        for stale in [*reg.glob(".tmp-*"), *reg.glob(f".{INDEX}.*.tmp")]:  # left by a killed release
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        if final.exists():
            existing, _ = model_checksum(final)
            if existing != checksum:
                raise ReleaseRefused(f"{final} exists with different contents ({existing[:12]}); remove it or rename")
            found = next((r for r in current if registry.kind(r) == registry.RELEASE
                          and r.get("path") == str(final) and r.get("checksum") == checksum), None)
            if found is not None:
                return {**found, "already_released": True}
            # else a release killed after the rename, before the index named it: finish it now
        else:
            _copy_model(model_dir, src_report, verified, approved, reg, final)
        entry["companions"] = {n: sha256_file(final / n) for n in COMPANIONS if (final / n).exists()}
        entry["released"] = datetime.now(UTC).isoformat(timespec="seconds")
        pin = [registry.trust_record(to_pin, "pinned by the first signed release")] if to_pin is not None else []
        written = registry.append(reg, current, [*pin, entry], signer)
    return written[-1]


def _load_signer(signing_key: str | Path | None) -> Ed25519PrivateKey | None:
    try:
        return signing.load_private_key(signing_key) if signing_key else None
    except signing.KeyFileError as exc:
        raise ReleaseRefused(str(exc)) from exc


def _records(reg: Path) -> list[dict[str, Any]]:
    """The registry's index with its chain checked (nothing is added to a broken index)."""
    try:
        records = registry.read_records(reg)
        registry.check_chain(reg, records)
    except RegistryError as exc:
        raise ReleaseRefused(str(exc)) from exc
    return records


def _pinned(reg: Path, records: list[dict[str, Any]]) -> dict[str, Ed25519PublicKey]:
    try:
        return registry.pinned_keys(records)
    except (RegistryError, signing.KeyFileError) as exc:
        raise ReleaseRefused(f"{reg}: {exc}") from exc


def _copy_model(model_dir: Path, src_report: Path, verified: Verified, approved: dict[str, Any] | None,
                reg: Path, final: Path) -> None:
    """The model, its companions, its report, signature and approval into a temporary folder, checked, then
    renamed to ``final``."""
    report = verified.report
    checksum = report["model"]["checksum"]
    tmp = reg / f".tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        companions = {n: sha256_file(model_dir / n) for n in COMPANIONS if (model_dir / n).exists()}
        for f in [*model_files(model_dir), *(model_dir / n for n in companions)]:
            shutil.copy2(f, tmp / f.name)
        (tmp / REPORT_DIR).mkdir()
        shutil.copy2(src_report, tmp / REPORT_DIR / REPORT_JSON)
        report_text = (tmp / REPORT_DIR / REPORT_JSON).read_text()
        if verified.envelope is not None:  # the signature that was verified, not whatever the file holds now
            (tmp / REPORT_DIR / REPORT_SIG).write_text(json.dumps(verified.envelope, indent=1, sort_keys=True))
        html = src_report.with_name(REPORT_HTML)
        text = html.read_text(errors="replace") if html.exists() else ""
        if not html_describes(text, report_text):  # no card, or another audit's (a run killed between the two)
            text = render_html(report, report_sha256=sha256(report_text))
        if approved is not None:
            (tmp / REPORT_DIR / APPROVAL).write_text(json.dumps(approved, indent=1, sort_keys=True))
            text = text.replace("</body>", approval_html(approved["payload"]) + "</body>", 1)
        (tmp / REPORT_DIR / REPORT_HTML).write_text(text)
        copied, _ = model_checksum(tmp)
        changed = [n for n, h in companions.items() if sha256_file(tmp / n) != h]
        if copied != checksum or changed:  # the source changed while it was being copied
            raise ReleaseRefused(f"{model_dir}: files changed during the copy (checksum {copied[:12]}"
                                 f"{', ' + ', '.join(changed) if changed else ''}); try again")
        if sha256_json(json.loads(report_text)) != sha256_json(report):
            raise ReleaseRefused(f"{src_report}: the report changed during the copy; try again")
        _fsync_tree(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the folder's entries, so a crash after the rename finds them whole."""
    for p in path.rglob("*"):
        if p.is_file():
            fsync_file(p)
    fsync_dir(path)
