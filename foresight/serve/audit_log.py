"""The audit trail: one JSON line per request, hash-chained so that deletions and edits show.

A record holds the key id, role, endpoint, status, time, request and response sizes, number of posted events and
the subject id of an analyst lookup, never codes, times or values from a body (the service's middleware decides
what goes in). Each line carries ``prev``, the SHA-256 of the line before it (:data:`ZERO_HASH` for the first),
and :func:`verify_audit_log` walks the chain. The digests are over the exact bytes of each line as written, so
logs written by any earlier version of the service still verify.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Any

from foresight.hashing import sha256

ZERO_HASH = "0" * 64  # the ``prev`` of the first record


class AuditLog:
    """Append-only JSON-lines audit trail, written and fsynced in batches by one writer thread.

    Each record gets ``prev``: the SHA-256 of the previous line, so removing or editing a line breaks the chain
    (:func:`verify_audit_log`). ``write`` never blocks on the disk; ``flush`` waits until everything queued is
    durable. A hard crash can lose only records not yet fsynced (the last few milliseconds). While the file
    cannot be written, ``healthy`` is False (the service then refuses requests) and the records wait in memory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.healthy = True
        self.error: str | None = None
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._pending: list[dict[str, Any]] = []  # records a failed write still owes the log
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._prev = last_line_hash(self.path)
        self._ensure_running()

    def _ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="foresight-audit", daemon=True)
                self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record (returns at once; the writer thread appends it)."""
        self._ensure_running()
        self._queue.put(record)

    def flush(self) -> None:
        """Block until every queued record is on disk."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued and stop the writer thread."""
        with self._lock:
            thread = self._thread
            self._thread = None
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
            records = self._pending + [r for r in batch if r is not None]
            try:
                if records:
                    self._append(records)
                self._pending, self.healthy, self.error = [], True, None
            except OSError as exc:  # keep the records and retry with the next batch; refuse requests meanwhile
                self._pending = records
                if self.healthy:
                    print(f"foresight serve: audit log failed, refusing requests: {self.path}: {exc}", file=sys.stderr)
                self.healthy, self.error = False, f"{self.path}: {exc}"
            finally:
                for _ in batch:
                    self._queue.task_done()
            if None in batch:
                return

    def _append(self, records: list[dict[str, Any]]) -> None:
        lines, prev = [], self._prev
        for r in records:
            line = json.dumps({**r, "prev": prev}, separators=(",", ":"), sort_keys=True)  # ASCII: ensure_ascii
            prev = sha256(line)
            lines.append(line + "\n")
        with open(self.path, "a", encoding="utf-8") as fh:  # O_APPEND: never rewrites what is there
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        self._prev = prev  # only once the lines are durable


def last_line_hash(path: Path) -> str:
    """The SHA-256 of the last line of an audit log (reading only its tail), or :data:`ZERO_HASH` if empty."""
    if not path.exists() or path.stat().st_size == 0:
        return ZERO_HASH
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        pos, tail = fh.tell(), b""
        while pos > 0 and tail.count(b"\n") < 2:
            step = min(4096, pos)
            pos -= step
            fh.seek(pos)
            tail = fh.read(step) + tail
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    return sha256(last)


def verify_audit_log(path: str | Path) -> int:
    """Check the hash chain of an audit log; the number of records, or ValueError naming the first bad line."""
    prev = ZERO_HASH
    n = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON record: {exc}") from exc
            if rec.get("prev") != prev:
                raise ValueError(f"{path}:{lineno}: hash chain broken (a record before it was removed or edited)")
            prev = sha256(line)  # strictly decoded UTF-8, so these are the line's bytes as written
            n += 1
    return n
