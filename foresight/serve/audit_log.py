"""The audit trail: one JSON line per request, chained with a keyed MAC and anchored at its end.

A record holds the key id, role, endpoint, status, time, request and response sizes, number of posted events and
the subject id of an analyst lookup, never codes, times or values from a body (the service's middleware decides
what goes in, and writes the record before the answer leaves: see :mod:`foresight.serve.app`).

The chain
---------
Each line carries ``seq`` (its line number in the file) and ``prev``: HMAC-SHA256, under the server's audit key,
of the exact bytes of the line before it (:data:`ZERO_HASH` for the first line of a log). So

- an edited or removed line breaks the chain at the next line, and it cannot be recomputed without the key (a
  plain hash chain can: that is why the key is there);
- a removed last line is caught by the **head** file (``<log>.head``), replaced atomically after every write:
  the number of lines and the MAC of the last one, itself MACed. Lines beyond the head (a crash between the
  append and the head update) are accepted: they carry valid MACs, which only the key holder can produce.

The key (``<log>.key`` unless configured: 32 random bytes, hex, created with mode 0600 when the log is new) must be
readable by the service and by whoever verifies, and by nobody who should not be able to rewrite history: keep it
outside the log's folder for that (``foresight serve --audit-key``). What the chain cannot show: a rollback of the
log and its head together to an earlier consistent state, or deletion of log, head and key together; copy the head
elsewhere (or ship lines to a remote store) when that matters.

Logs written before the key existed (each line's ``prev`` a plain SHA-256 of the line before) verify as before and
are reported as *unkeyed*; a keyed server continues such a log, and its first keyed line MACs the last unkeyed one,
which anchors the older part from then on (an unkeyed prefix can no longer be rewritten or cut unnoticed).
"""

from __future__ import annotations

import hmac
import json
import os
import queue
import secrets
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from foresight.atomic import write_text
from foresight.chain import ZERO_HASH, mac
from foresight.hashing import sha256


class AuditChainError(ValueError):
    """The audit log fails verification; the message names the file and the first bad line."""


def default_key_file(log: str | Path) -> Path:
    """Where the audit key lives unless configured: ``<log>.key``."""
    log = Path(log)
    return log.with_name(log.name + ".key")


def head_file(log: str | Path) -> Path:
    """The anchor of the log's end: ``<log>.head``."""
    log = Path(log)
    return log.with_name(log.name + ".head")


def read_key(path: Path) -> bytes:
    """The audit key in ``path`` (64 hex digits); ValueError naming the file if it is not one."""
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise ValueError(f"{path}: not an audit key (64 hex digits expected)") from exc
    if len(key) != 32:
        raise ValueError(f"{path}: not an audit key (64 hex digits expected, got {len(text)} characters)")
    return key


def create_key(path: Path) -> bytes:
    """A new random audit key written to ``path`` with mode 0600 (fails if the file exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key


def _head_mac(key: bytes, lines: int, last: str) -> str:
    return mac(key, f"foresight-audit-head:{lines}:{last}")


@dataclass
class AuditState:
    """What verification found: record counts, where the chain stands, and whether the end is anchored."""

    path: Path
    records: int  # lines in the log
    keyed: int  # lines chained with the key
    unkeyed: int  # lines of an older, unkeyed log (a plain SHA-256 chain)
    head_lines: int | None  # lines the head vouches for (None: no head file)
    prev_line: bytes | None  # the last line's bytes (None: empty log)
    warnings: list[str]

    def summary(self) -> dict[str, Any]:
        return {"audit_log": str(self.path), "ok": True, "records": self.records, "keyed": self.keyed,
                "unkeyed": self.unkeyed, "head_lines": self.head_lines, "warnings": self.warnings}


def check_audit_log(path: str | Path, key: bytes | None) -> AuditState:
    """Verify a log's chain and its head; AuditChainError naming the first bad line (or the head) if broken.

    ``key`` None checks only an unkeyed log (keyed lines then are an error: they cannot be checked).
    """
    path = Path(path)
    head = _read_head(path, key)
    prev_sha, prev_line, keyed, unkeyed, n = ZERO_HASH, None, 0, 0, 0
    last_macs: dict[int, str] = {}
    if path.exists():
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                line = raw.rstrip(b"\n")
                rec = _record(path, n, line)
                if "seq" in rec:
                    if key is None:
                        raise AuditChainError(f"{path}:{n}: keyed record, but no audit key to check it with")
                    want = mac(key, prev_line) if prev_line is not None else ZERO_HASH
                    if not hmac.compare_digest(str(rec.get("prev")), want):
                        raise AuditChainError(f"{path}:{n}: chain broken (the record before it was removed or "
                                              "edited; or the log was written under another key)")
                    if rec.get("seq") != n:
                        raise AuditChainError(f"{path}:{n}: sequence number {rec.get('seq')!r}, expected {n} "
                                              "(records before it were removed or inserted)")
                    keyed += 1
                else:
                    if keyed:
                        raise AuditChainError(f"{path}:{n}: unkeyed record after keyed ones (inserted or edited)")
                    if rec.get("prev") != prev_sha:
                        raise AuditChainError(f"{path}:{n}: hash chain broken (a record before it was removed or "
                                              "edited)")
                    unkeyed += 1
                prev_sha, prev_line = sha256(line), line
                if head is not None and n == head[0]:
                    last_macs[n] = mac(key, line) if key is not None else ""
    warnings: list[str] = []
    if head is not None:
        lines, last = head
        if n < lines:
            raise AuditChainError(f"{path}: the log ends at line {n} but its head vouches for {lines} lines: the "
                                  "last records were removed")
        if lines and not hmac.compare_digest(last_macs.get(lines, ""), last):
            raise AuditChainError(f"{path}:{lines}: the record the head vouches for was edited")
        if n > lines:
            warnings.append(f"{n - lines} record(s) after the head (the service stopped between writing them and "
                            "updating the head); their chain is intact")
    elif keyed:
        raise AuditChainError(f"{head_file(path)}: missing: the end of the keyed log cannot be checked (it was "
                              "deleted, or the log's last records with it)")
    if unkeyed:
        warnings.append(f"{unkeyed} record(s) from an older, unkeyed log (a plain hash chain"
                        + ("; anchored by the keyed records after them)" if keyed or head else
                           "; its end is not protected)"))
    return AuditState(path, n, keyed, unkeyed, None if head is None else head[0], prev_line, warnings)


def _record(path: Path, n: int, line: bytes) -> dict[str, Any]:
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditChainError(f"{path}:{n}: not a JSON record: {exc}") from exc
    if not isinstance(rec, dict):
        raise AuditChainError(f"{path}:{n}: not a JSON record")
    return rec


def _read_head(path: Path, key: bytes | None) -> tuple[int, str] | None:
    hf = head_file(path)
    if not hf.exists():
        return None
    if key is None:
        raise AuditChainError(f"{hf}: a keyed log's head, but no audit key to check it with")
    try:
        h = json.loads(hf.read_text())
        lines, last, tag = int(h["lines"]), str(h["last"]), str(h["mac"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuditChainError(f"{hf}: unreadable head: {exc}") from exc
    if not hmac.compare_digest(tag, _head_mac(key, lines, last)):
        raise AuditChainError(f"{hf}: the head was edited (its MAC does not match)")
    return lines, last


def verify_audit_log(path: str | Path, key_file: str | Path | None = None) -> int:
    """Check an audit log (chain and head); the number of records, or AuditChainError naming the first bad line.

    ``key_file`` defaults to ``<log>.key``; without a key only an unkeyed (older) log can be checked.
    """
    return check_audit_log(path, load_key(path, key_file)).records


def load_key(log: str | Path, key_file: str | Path | None) -> bytes | None:
    """The audit key from ``key_file`` (default ``<log>.key``), or None if that default does not exist."""
    kf = Path(key_file) if key_file is not None else default_key_file(log)
    if key_file is None and not kf.exists():
        return None
    return read_key(kf)


class AuditLog:
    """Append-only JSON-lines audit trail, written and fsynced in batches by one writer thread.

    ``write`` never blocks on the disk and returns a future that completes once the record is durable (or fails
    with the OSError that kept it off the disk): the service awaits it before it answers. ``flush`` waits until
    everything queued is written. While the file cannot be written, ``healthy`` is False (the service then
    refuses requests) and the records wait in memory. After ``close``, a late record (a request that was still
    in flight) is written at once by the caller, never dropped.

    Opening verifies the existing log: a broken chain raises AuditChainError, unless ``new_segment``, which
    moves the broken log (and its head) aside to ``<log>.broken-<time>`` and starts a new one whose first record
    names it.
    """

    def __init__(self, path: str | Path, key_file: str | Path | None = None, new_segment: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.key_file = Path(key_file) if key_file is not None else default_key_file(self.path)
        self.healthy = True
        self.error: str | None = None
        self._queue: queue.Queue[tuple[dict[str, Any], Future[None]] | None] = queue.Queue()
        self._pending: list[tuple[dict[str, Any], Future[None]]] = []  # records a failed write still owes the log
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.key = self._open_key()
        try:
            state = check_audit_log(self.path, self.key)
        except AuditChainError as exc:
            if not new_segment:
                raise
            moved = self._move_aside()
            state = check_audit_log(self.path, self.key)
            self._segment_note = {"time": _now(), "event": "new segment", "previous_log": moved.name,
                                  "reason": str(exc)}
        else:
            self._segment_note = None
        self.state = state
        self._lines, self._prev_line = state.records, state.prev_line
        if state.unkeyed and state.head_lines is None:  # an older log: anchor its end now
            self._write_head()
        if self._segment_note is not None:
            self.write(self._segment_note)
        self._ensure_running()

    def _open_key(self) -> bytes:
        if self.key_file.exists():
            return read_key(self.key_file)
        if head_file(self.path).exists() or _has_keyed_line(self.path):
            raise AuditChainError(f"{self.key_file}: the audit key is missing, so the keyed log {self.path} cannot "
                                  "be continued or checked (point --audit-key at it)")
        return create_key(self.key_file)

    def _move_aside(self) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        moved = self.path.with_name(f"{self.path.name}.broken-{stamp}")
        if self.path.exists():
            os.replace(self.path, moved)
        if head_file(self.path).exists():
            os.replace(head_file(self.path), head_file(moved))
        print(f"foresight serve: the audit log failed verification; moved it to {moved} and started a new one",
              file=sys.stderr)
        return moved

    def _ensure_running(self) -> None:
        with self._lock:
            if not self._closed and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="foresight-audit", daemon=True)
                self._thread.start()

    def write(self, record: dict[str, Any]) -> Future[None]:
        """Queue one record; the future completes when it is durable (after close: written before returning)."""
        done: Future[None] = Future()
        with self._lock:
            closed = self._closed
        if closed:  # a request still in flight at shutdown: write it here and now
            self._commit([(record, done)])
            return done
        self._ensure_running()
        self._queue.put((record, done))
        return done

    def flush(self) -> None:
        """Block until every queued record is on disk."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued and stop the writer thread; later records are written by their callers."""
        with self._lock:
            thread, self._thread, self._closed = self._thread, None, True
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while True:  # group commit: everything queued meanwhile shares one fsync
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._commit([b for b in batch if b is not None])
            finally:
                for _ in batch:
                    self._queue.task_done()
            if None in batch:
                return

    def _commit(self, batch: list[tuple[dict[str, Any], Future[None]]]) -> None:
        """Append the owed and the new records; resolve their futures (an OSError keeps them owed)."""
        with self._lock:
            owed = self._pending + batch
            try:
                if owed:
                    self._append([r for r, _ in owed])
            except OSError as exc:  # keep the records and retry with the next batch; refuse requests meanwhile
                self._pending = owed
                if self.healthy:
                    print(f"foresight serve: audit log failed, refusing requests: {self.path}: {exc}",
                          file=sys.stderr)
                self.healthy, self.error = False, f"{self.path}: {exc}"
                for _, fut in batch:
                    fut.set_exception(exc)
                return
            self._pending, self.healthy, self.error = [], True, None
            for _, fut in owed:
                if not fut.done():
                    fut.set_result(None)

    def _append(self, records: list[dict[str, Any]]) -> None:
        lines, prev_line, n = [], self._prev_line, self._lines
        for r in records:
            n += 1
            prev = mac(self.key, prev_line) if prev_line is not None else ZERO_HASH
            line = json.dumps({**r, "seq": n, "prev": prev}, separators=(",", ":"), sort_keys=True)  # ASCII
            prev_line = line.encode()
            lines.append(line + "\n")
        with open(self.path, "a", encoding="utf-8") as fh:  # O_APPEND: never rewrites what is there
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        self._lines, self._prev_line = n, prev_line  # only once the lines are durable
        try:
            self._write_head()
        except OSError as exc:  # the lines are durable and chained; only the end's anchor lags behind
            print(f"foresight serve: audit head not updated: {head_file(self.path)}: {exc}", file=sys.stderr)

    def _write_head(self) -> None:
        """Replace ``<log>.head`` atomically with the line count and the last line's MAC."""
        last = mac(self.key, self._prev_line) if self._prev_line is not None else ZERO_HASH
        write_text(head_file(self.path),
                   json.dumps({"lines": self._lines, "last": last, "mac": _head_mac(self.key, self._lines, last)}))


def _has_keyed_line(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path, "rb") as fh:
        return any(b'"seq":' in line for line in fh)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
