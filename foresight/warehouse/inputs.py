"""The one place that decides whether an input path is present, absent, or present but unreadable.

A path that exists but cannot be read (a dangling or looping symbolic link, a folder that cannot be listed, a
directory where a file is expected, a FIFO or device, permission denied) is an error, never "table absent": an
absent optional table is loaded as empty, which replaces that table's rows from an earlier load, so mistaking
an unreadable file for an absent one would silently delete data. Every check here raises ``SourceError`` naming
the path and the reason, before anything is staged.

>>> probe(Path("/nonexistent/x.csv"))
'absent'
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from foresight.warehouse.results import SourceError

State = Literal["absent", "file", "dir"]


def _why(exc: OSError, path: Path) -> str:
    """A reason in words for an OSError on ``path`` (symbolic links get their target named)."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if path.is_symlink() and exc.errno == errno.ENOENT:
        return f"broken symbolic link (points to {os.readlink(path)}, which does not exist)"
    if exc.errno == errno.ENOTDIR:
        return "a parent of this path is a file, not a folder"
    return exc.strerror or str(exc)


def probe(path: Path) -> State:
    """``"absent"`` when nothing is at ``path``, ``"file"`` for a regular file, ``"dir"`` for a folder (links
    followed); anything else there (a broken link, a loop, a FIFO, ...) is ``SourceError`` naming the path."""
    path = Path(path)
    try:
        os.lstat(path)
    except FileNotFoundError:
        return "absent"
    except OSError as exc:  # a looping or non-folder parent, permission denied on a parent
        raise SourceError(f"{path}: cannot be read: {_why(exc, path)}") from exc
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read: {_why(exc, path)}") from exc
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    raise SourceError(f"{path}: cannot be read: not a regular file (a FIFO, socket or device)")


def readable_file(path: Path) -> bool:
    """True when ``path`` is a readable regular file, False when it is absent; ``SourceError`` naming the path
    when something is there that cannot be read as a file."""
    state = probe(path)
    if state == "absent":
        return False
    if state == "dir":
        raise SourceError(f"{path}: cannot be read: a directory where a file is expected")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read: {_why(exc, path)}") from exc
    return True


def readable_dir(path: Path) -> bool:
    """True when ``path`` is a folder that can be listed, False when it is absent; ``SourceError`` naming the
    path otherwise (a file where a folder is expected, a loop, a broken link, permission denied)."""
    state = probe(path)
    if state == "absent":
        return False
    if state == "file":
        raise SourceError(f"{path}: cannot be read: a file where a folder is expected")
    try:
        os.listdir(path)
    except OSError as exc:
        raise SourceError(f"{path}: cannot be listed: {_why(exc, path)}") from exc
    return True


def find_file(folder: Path, name: str, suffixes: Iterable[str], warnings: list[str] | None = None) -> Path | None:
    """``folder/<name><suffix>`` for the first suffix (in order of preference) that is there, or None when the
    folder or every candidate is absent. A candidate (or the folder) that is there but unreadable is
    ``SourceError``. When several candidates are there (``x.csv`` beside ``x.csv.gz``) the preferred one is read
    and a warning naming both is appended to ``warnings``."""
    folder = Path(folder)
    if not readable_dir(folder):
        return None
    found = [folder / f"{name}{s}" for s in suffixes if readable_file(folder / f"{name}{s}")]
    if len(found) > 1 and warnings is not None:
        others = ", ".join(str(p) for p in found[1:])
        note = f"{found[0]} and {others} are both present: read {found[0].name}, ignored {others}"
        if note not in warnings:
            warnings.append(note)
    return found[0] if found else None


def list_files(root: Path, suffixes: Iterable[str]) -> list[Path]:
    """Every file under ``root`` whose name ends with one of ``suffixes``, sorted ([] when ``root`` is absent); linked
    folders are followed
    (each real folder once). A broken or looping link, or a folder that cannot be listed, anywhere under
    ``root`` is ``SourceError``: a bundle or shard that cannot be read must not be skipped silently."""
    suffixes = tuple(suffixes)
    if not readable_dir(root):
        return []
    found: set[Path] = set()
    seen: set[str] = set()

    def fail(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else root
        raise SourceError(f"{where}: cannot be listed: {_why(exc, where)}") from exc

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=fail):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back to a folder already walked
            dirnames[:] = []
            continue
        seen.add(real)
        for name in filenames:  # os.walk lists broken and looping links among the files
            path = Path(dirpath) / name
            if name.endswith(suffixes):
                if readable_file(path):
                    found.add(path)
            elif path.is_symlink():
                probe(path)  # a broken or looping link that may have been a folder of inputs
    return sorted(found)
