"""Writes that are all-or-nothing: a reader (or a crash) sees the old file or the new one, never a torn one.

Every artifact the project produces goes through here: token folders' seals, checkpoints' manifests, model
cards, audit reports, the release index, the query service's keys file and audit-log anchor. The recipe is the
POSIX one: write a temporary file in the same folder, fsync it, ``os.replace`` it over the target (atomic on one
file system), then fsync the folder so the rename itself survives a power cut.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_text(d / "a.json", "{}")
>>> (d / "a.json").read_text(), sorted(p.name for p in d.iterdir())
('{}', ['a.json'])
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text(path: str | Path, text: str, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; ``mode`` sets the file's permissions (e.g. 0o600 for
    secrets) before any byte is written. The temporary file is removed if anything fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_file(path: str | Path) -> None:
    """Flush a file's bytes to disk (before it is renamed into place)."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
