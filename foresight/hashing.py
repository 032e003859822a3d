"""The one place that computes sha256: files (read in chunks), streams of bytes, text and JSON-able values.

>>> sha256("abc") == sha256(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK = 1 << 20  # inputs can be many GB: never read a whole file at once


def sha256(data: bytes | str) -> str:
    """Hex sha256 of bytes, or of text encoded as UTF-8 (lone surrogates kept, so no input can raise)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def sha256_chunks(chunks: Iterable[bytes | str]) -> str:
    """Hex sha256 of the concatenation of ``chunks``, fed one at a time (never the whole input in memory).

    >>> sha256_chunks([b"a", "b", b"c"]) == sha256("abc")
    True
    """
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk.encode("utf-8", "surrogatepass") if isinstance(chunk, str) else chunk)
    return h.hexdigest()


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as fh:
        return sha256_chunks(iter(lambda: fh.read(chunk), b""))


def sha256_json(value: Any) -> str:
    """Hex sha256 of a JSON-able value in canonical form (sorted keys; non-JSON values by ``str``)."""
    return sha256(json.dumps(value, sort_keys=True, default=str))
