"""A token folder is whole or refused: built aside, sealed with a ``COMPLETE`` marker, renamed into place.

``tokenize`` (and every other writer of a token folder: canary insertion, the audit's reference data) writes into
a fresh sibling folder ``.<name>.partial-<pid>-<random>`` and, only once every file is written, seals it and
swaps it in: the old folder is renamed aside, the new one renamed to the target, the old one deleted. A writer
killed at any point (kill -9, power loss) therefore leaves either the previous complete folder or none at the
target, never a vocabulary of one run beside the shards of another.

The seal is the file ``COMPLETE``, written last (write + fsync + rename): JSON with the sha256 of ``vocab.json``,
the data fingerprint it names and the byte size of every split file. :func:`check_complete` (run by
:class:`foresight.dataset.PackedSplit`, so by train, evaluate, the privacy audit and canary insertion) refuses a
folder without it, or whose files disagree with it, with a message naming the folder and saying to re-run
``foresight tokenize``. Token folders written before the seal existed are refused the same way: re-tokenizing
is cheap next to training on shards that may not match their vocabulary.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from foresight.atomic import fsync_dir, fsync_file, write_text
from foresight.hashing import sha256_file

MARKER = "COMPLETE"
MARKER_FORMAT = 1
SPLIT_SUFFIXES = (".bin", ".clock.bin", ".index.npy")
# what a token folder may hold besides split files: a folder holding anything else is never replaced or deleted
FOLDER_FILES = ("vocab.json", "code_descriptions.json", "tokenize_summary.json", "canaries.json", MARKER)
RETOKENIZE = "re-run `foresight tokenize` into it"


class IncompleteTokensError(FileNotFoundError):
    """A token folder that is missing, unfinished (no ``COMPLETE`` marker) or whose files disagree with the
    marker. A FileNotFoundError, so every command that reports a missing folder reports this one too."""


class TokenFolderError(ValueError):
    """A target that a token folder must not replace (a file, or a folder holding other files)."""


def is_split_file(name: str) -> bool:
    return any(name.endswith(s) and len(name) > len(s) for s in SPLIT_SUFFIXES)


def seal(folder: str | Path) -> dict[str, Any]:
    """Write ``folder/COMPLETE`` (last, atomically): what :func:`check_complete` later verifies."""
    folder = Path(folder)
    vocab = folder / "vocab.json"
    for p in folder.iterdir():  # the data reaches the disk before the marker that vouches for it
        if p.is_file():
            fsync_file(p)
    fingerprint = None
    if vocab.exists():
        fingerprint = json.loads(vocab.read_text()).get("fingerprint")
    marker = {
        "format": MARKER_FORMAT,
        "vocab_sha256": sha256_file(vocab) if vocab.exists() else None,
        "fingerprint": fingerprint,
        "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and is_split_file(p.name)},
    }
    write_text(folder / MARKER, json.dumps(marker, indent=1))
    return marker


def check_complete(folder: str | Path, split: str | None = None) -> dict[str, Any]:
    """The folder's marker when the folder is complete and unchanged since it was sealed (and holds ``split``
    when given); :class:`IncompleteTokensError` saying what is wrong and what to do otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IncompleteTokensError(f"{folder}: no such token folder (run `foresight tokenize` first)")
    path = folder / MARKER
    if not path.exists():
        raise IncompleteTokensError(
            f"{folder}: no {MARKER} marker: the folder is not a finished token folder (a tokenize that did not "
            f"finish, or one written by an older foresight version); {RETOKENIZE}")
    try:
        marker = json.loads(path.read_text())
        files, vocab_sha = dict(marker["files"]), marker["vocab_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IncompleteTokensError(f"{path}: unreadable completion marker ({exc}); {RETOKENIZE}") from exc
    vocab = folder / "vocab.json"
    if vocab_sha is not None and (not vocab.exists() or sha256_file(vocab) != vocab_sha):
        raise IncompleteTokensError(f"{vocab}: missing or changed since the folder was sealed: its shards may not "
                                    f"match this vocabulary; {RETOKENIZE}")
    for name, size in files.items():
        p = folder / name
        actual = p.stat().st_size if p.exists() else None
        if actual != size:
            raise IncompleteTokensError(f"{p}: {'missing' if actual is None else f'{actual:,} bytes'}, sealed at "
                                        f"{size:,} bytes: the folder changed after it was written; {RETOKENIZE}")
    if split is not None and f"{split}.bin" not in files:
        raise IncompleteTokensError(f"{folder / (split + '.bin')}: no such split in this token folder")
    return marker


@contextmanager
def building(out: str | Path) -> Iterator[Path]:
    """Build a token folder aside and put it in place whole: yields an empty sibling folder to write into;
    on success it is sealed and replaces ``out``, on failure it is deleted and ``out`` is left as it was."""
    out = Path(os.path.abspath(out))  # "." and ".." have no name to build a sibling of
    if out.is_symlink():  # a link to the token folder: replace the folder it points to, keep the link
        out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out)
    refuse_foreign(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        seal(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_foreign(out: Path) -> None:
    """A target that is not a token folder (a file, or a folder holding other files) is never replaced."""
    if out.exists() and not out.is_dir():
        raise TokenFolderError(f"{out}: exists and is not a folder; choose a new or empty folder for the tokens")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in FOLDER_FILES and not is_split_file(p.name))
        if foreign:
            raise TokenFolderError(
                f"{out}: holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which a token folder "
                "does not: it would be replaced as a whole, so choose a new or empty folder for the tokens")


def _swap_in(tmp: Path, out: Path) -> None:
    """Old folder aside, new one in, old one deleted (each rename is atomic on one file system)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recover(out: Path) -> None:
    """Clean up after a writer that was killed: delete its partial folders; if it died between the two renames
    (no ``out``, an aside copy of the old one), put the old folder back first."""
    for p in sorted(out.parent.glob(f".{out.name}.old-*")):
        if _alive(p.name):
            continue
        if not out.exists() and (p / MARKER).exists():
            os.rename(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}.partial-*"):
        if not _alive(p.name):
            shutil.rmtree(p, ignore_errors=True)


def _alive(name: str) -> bool:
    """Whether the process that named a partial/aside folder ``.<out>.<what>-<pid>-<random>`` still runs."""
    try:
        pid = int(name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
