"""The one sha256 helper: files (read in chunks), bytes, text and JSON-able values all hash the same way here.

>>> sha256("abc") == sha256(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
True
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHUNK = 1 << 20  # inputs can be many GB: never read a whole file at once


def sha256(data: bytes | str) -> str:
    """Hex sha256 of bytes, or of text encoded as UTF-8 (lone surrogates kept, so no input can raise)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(value: Any) -> str:
    """Hex sha256 of a JSON-able value in canonical form (sorted keys; non-JSON values by ``str``)."""
    return sha256(json.dumps(value, sort_keys=True, default=str))
