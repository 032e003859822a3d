"""Release: copy a model into a registry only if the latest audit of *exactly that model* passed.

A model's identity is its checksum (:func:`model_checksum`): sha256 over the sorted list of (file name, sha256) of
the files that define what it computes and how its tokens read — weights (``*.safetensors``, ``*.bin``),
``config.json``, ``generation_config.json``, ``vocab.json`` and ``foresight.json``. The audit records it; the
release recomputes it, so a model changed after its audit (retrained, fine-tuned, a file swapped) is refused.

The copy is atomic: the files go to a temporary folder inside the registry, are checked against the checksum
again, and the folder is renamed into place (``os.rename`` within one file system), so a registry never holds a
half-copied model; only then is a line appended to ``index.jsonl``. Checkpoints (optimiser state, RNG state) and
training logs are never copied. Released: ``<registry>/<name>-<checksum[:12]>/`` with the model files and
``privacy/report.json`` + ``privacy/report.html``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from foresight.hashing import sha256_chunks, sha256_file

REPORT_DIR = "privacy"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
INDEX = "index.jsonl"
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


def check_releasable(model_dir: str | Path, report_path: str | Path | None = None) -> dict[str, Any]:
    """The audit report, if it is for exactly this model and PASSED; else :class:`ReleaseRefused` saying why."""
    model_dir = Path(model_dir)
    path = Path(report_path) if report_path else latest_report(model_dir)
    if not path.exists():
        raise ReleaseRefused(f"{model_dir}: no privacy audit ({path} not found); run `foresight privacy audit` first")
    try:
        report = json.loads(path.read_text())
        audited = report["model"]["checksum"]
        decision = report["decision"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ReleaseRefused(f"{path}: not a readable audit report ({exc})") from exc
    checksum, _ = model_checksum(model_dir)
    if audited != checksum:
        raise ReleaseRefused(f"{model_dir}: the model changed after its audit (audited checksum {audited[:12]}, "
                             f"now {checksum[:12]}); audit this model again")
    if decision != "PASS":
        why = "; ".join(report.get("reasons", [])[:5])
        raise ReleaseRefused(f"{model_dir}: the latest audit ({report.get('created', '?')}) decided {decision}, not "
                             f"PASS: {why}")
    return report


def release(model_dir: str | Path, registry: str | Path, *, name: str | None = None,
            report_path: str | Path | None = None) -> dict[str, Any]:
    """Copy a model whose audit passed into ``registry`` atomically and record it in ``index.jsonl``.

    Releasing the same model (same checksum) again is a no-op that returns the existing entry.
    """
    model_dir, registry = Path(model_dir), Path(registry)
    report = check_releasable(model_dir, report_path)
    checksum = report["model"]["checksum"]
    name = name or model_dir.resolve().name
    if not name or "/" in name or name.startswith("."):
        raise ReleaseRefused(f"not a usable release name: {name!r}")
    registry.mkdir(parents=True, exist_ok=True)
    final = registry / f"{name}-{checksum[:12]}"
    entry = {"name": name, "checksum": checksum, "path": str(final), "source": str(model_dir.resolve()),
             "audit_created": report.get("created"), "decision": report["decision"]}
    if final.exists():
        existing, _ = model_checksum(final)
        if existing != checksum:
            raise ReleaseRefused(f"{final} exists with different contents ({existing[:12]}); remove it or rename")
        return {**entry, "already_released": True}
    tmp = registry / f".tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        for f in model_files(model_dir):
            shutil.copy2(f, tmp / f.name)
        (tmp / REPORT_DIR).mkdir()
        src_report = Path(report_path) if report_path else latest_report(model_dir)
        shutil.copy2(src_report, tmp / REPORT_DIR / REPORT_JSON)
        html = src_report.with_name(REPORT_HTML)
        if html.exists():
            shutil.copy2(html, tmp / REPORT_DIR / REPORT_HTML)
        copied, _ = model_checksum(tmp)
        if copied != checksum:  # the source changed while it was being copied
            raise ReleaseRefused(f"{model_dir}: files changed during the copy (checksum {copied[:12]}); try again")
        _fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(registry, files=False)
    entry["released"] = datetime.now(UTC).isoformat(timespec="seconds")
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(registry / INDEX, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one small O_APPEND write: concurrent releases never interleave lines
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def _fsync_dir(path: Path, files: bool = True) -> None:
    """Flush a directory's entries (and, with ``files``, its files' data) so a crash after rename finds them whole."""
    for p in path.rglob("*") if files else ():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
