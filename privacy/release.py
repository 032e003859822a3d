"""Release: copy a model into a registry only if the latest audit of *exactly that model* passed.

A model's identity is its checksum (:func:`model_checksum`): sha256 over the sorted list of (file name, sha256) of
the files that define what it computes and how its tokens read — weights (``*.safetensors``, ``*.bin``),
``config.json``, ``generation_config.json``, ``vocab.json`` and ``foresight.json``. The audit records it; the
release recomputes it, so a model changed after its audit (retrained, fine-tuned, a file swapped) is refused.

The report is a file anyone with write access can edit, so its word is not taken (signing comes with governance):
the release re-derives the decision from the probe results stored in the report with :func:`privacy.gate.decide`
under the thresholds stored beside them, and refuses a report whose recorded decisions disagree with its own
figures (an edited ``FAIL`` -> ``PASS``), one without probe results (a fabricated ``{"decision": "PASS", ...}``)
and one whose figures do not decide PASS. Thresholds changed from the shipped defaults are named in the index
entry (``gate_overrides``).

Writes are atomic and serialised by a lock on the registry (``.lock``): the files go to a temporary folder inside
the registry, are checked against the checksum again, and the folder is renamed into place (``os.rename`` within
one file system); then ``index.jsonl`` is replaced whole (temporary file, fsync, ``os.replace``). The index is the
commit point: a model is released when its line is there. A release killed part-way leaves at most a ``.tmp-*``
folder (removed by the next release) or a copied folder the index does not name (recorded by the next release of
that model). Checkpoints (optimiser state, RNG state) and training logs are never copied; ``code_descriptions.json``
(the codes' readable names; not part of the identity) is, with its sha256 in the index entry. Released:
``<registry>/<name>-<checksum[:12]>/`` with the model files and ``privacy/report.json`` + ``privacy/report.html``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from foresight.atomic import fsync_dir, fsync_file, write_text
from foresight.hashing import sha256, sha256_chunks, sha256_file
from foresight.train.card import check_complete
from privacy import gate
from privacy.report import html_describes, probe_results, render_html

REPORT_DIR = "privacy"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
INDEX = "index.jsonl"
LOCK = ".lock"
COMPANIONS = ("code_descriptions.json",)  # released with the model, not part of what it computes
_NAMES = ("config.json", "generation_config.json", "vocab.json", "foresight.json")
_SUFFIXES = (".safetensors", ".bin")


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


def check_releasable(model_dir: str | Path, report_path: str | Path | None = None) -> dict[str, Any]:
    """The audit report, if it is for exactly this model and PASSED; else :class:`ReleaseRefused` saying why."""
    model_dir = Path(model_dir)
    path = Path(report_path) if report_path else latest_report(model_dir)
    try:
        check_complete(model_dir)
    except FileNotFoundError as exc:
        raise ReleaseRefused(str(exc)) from exc
    report = read_report(path)
    audited = report["model"]["checksum"]
    checksum, _ = model_checksum(model_dir)
    if audited != checksum:
        raise ReleaseRefused(f"{model_dir}: the model changed after its audit, or {path} is another model's report "
                             f"(audited checksum {audited[:12]}, this model {checksum[:12]}); audit this model again")
    if report["decision"] != gate.PASS:
        reasons = report.get("reasons")
        why = "; ".join(str(r) for r in reasons[:5]) if isinstance(reasons, list) else ""
        raise ReleaseRefused(f"{model_dir}: the latest audit ({report.get('created', '?')}) decided "
                             f"{report['decision']}, not PASS: {why}")
    rederive(report, path)
    return report


def release(model_dir: str | Path, registry: str | Path, *, name: str | None = None,
            report_path: str | Path | None = None) -> dict[str, Any]:
    """Copy a model whose audit passed into ``registry`` atomically and record it in ``index.jsonl``.

    Releasing the same model (same checksum) again is a no-op that returns the existing entry.
    """
    model_dir, registry = Path(model_dir), Path(registry)
    src_report = Path(report_path) if report_path else latest_report(model_dir)
    report = check_releasable(model_dir, src_report)
    checksum = report["model"]["checksum"]
    name = name or model_dir.resolve().name
    if not name or "/" in name or name.startswith("."):
        raise ReleaseRefused(f"not a usable release name: {name!r}")
    registry.mkdir(parents=True, exist_ok=True)
    final = registry / f"{name}-{checksum[:12]}"
    entry = {"name": name, "checksum": checksum, "path": str(final), "source": str(model_dir.resolve()),
             "audit_created": report.get("created"), "decision": report["decision"],
             "gate_overrides": gate.overrides(gate.load_config(report["config"]))}
    with _registry_lock(registry):
        for stale in [*registry.glob(".tmp-*"), *registry.glob(f".{INDEX}.*.tmp")]:  # left by a killed release
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        index = (registry / INDEX).read_text() if (registry / INDEX).exists() else ""
        if final.exists():
            existing, _ = model_checksum(final)
            if existing != checksum:
                raise ReleaseRefused(f"{final} exists with different contents ({existing[:12]}); remove it or rename")
            if _indexed(index, final, checksum):
                return {**entry, "already_released": True}
            # else a release killed after the rename, before the index named it: finish it now
        else:
            _copy_model(model_dir, src_report, report, registry, final)
        entry["companions"] = {n: sha256_file(final / n) for n in COMPANIONS if (final / n).exists()}
        entry["released"] = datetime.now(UTC).isoformat(timespec="seconds")
        if index and not index.endswith("\n"):
            index += "\n"
        write_text(registry / INDEX, index + json.dumps(entry, sort_keys=True) + "\n")  # fsyncs the folder too
    return entry


def _copy_model(model_dir: Path, src_report: Path, report: dict[str, Any], registry: Path, final: Path) -> None:
    """The model, its companions and its report into a temporary folder, checked, then renamed to ``final``."""
    checksum = report["model"]["checksum"]
    tmp = registry / f".tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        companions = {n: sha256_file(model_dir / n) for n in COMPANIONS if (model_dir / n).exists()}
        for f in [*model_files(model_dir), *(model_dir / n for n in companions)]:
            shutil.copy2(f, tmp / f.name)
        (tmp / REPORT_DIR).mkdir()
        shutil.copy2(src_report, tmp / REPORT_DIR / REPORT_JSON)
        report_text = (tmp / REPORT_DIR / REPORT_JSON).read_text()
        html = src_report.with_name(REPORT_HTML)
        text = html.read_text(errors="replace") if html.exists() else ""
        if not html_describes(text, report_text):  # no card, or another audit's (a run killed between the two)
            text = render_html(report, report_sha256=sha256(report_text))
        (tmp / REPORT_DIR / REPORT_HTML).write_text(text)
        copied, _ = model_checksum(tmp)
        changed = [n for n, h in companions.items() if sha256_file(tmp / n) != h]
        if copied != checksum or changed:  # the source changed while it was being copied
            raise ReleaseRefused(f"{model_dir}: files changed during the copy (checksum {copied[:12]}"
                                 f"{', ' + ', '.join(changed) if changed else ''}); try again")
        if json.dumps(json.loads(report_text), sort_keys=True) != json.dumps(report, sort_keys=True):
            raise ReleaseRefused(f"{src_report}: the report changed during the copy; try again")
        _fsync_tree(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _indexed(index: str, final: Path, checksum: str) -> bool:
    """Whether ``index.jsonl``'s text names this release (lines that do not parse are kept, never matched)."""
    for line in index.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            e = json.loads(line)
            if isinstance(e, dict) and e.get("path") == str(final) and e.get("checksum") == checksum:
                return True
    return False


@contextlib.contextmanager
def _registry_lock(registry: Path) -> Iterator[None]:
    """One release at a time per registry (an advisory lock, released by the kernel if the process dies)."""
    with open(registry / LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the folder's entries, so a crash after the rename finds them whole."""
    for p in path.rglob("*"):
        if p.is_file():
            fsync_file(p)
    fsync_dir(path)
