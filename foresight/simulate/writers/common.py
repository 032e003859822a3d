"""Helpers every writer shares: times as text, deterministic UUIDs, vectorised lookups, part-file assembly."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np


def seconds(days: np.ndarray) -> np.ndarray:
    """Days since epoch -> whole seconds (the records' resolution)."""
    return np.round(days * 86_400.0).astype(np.int64)



def sorted_by(cols: dict[str, np.ndarray], first: str, then: str) -> dict[str, np.ndarray]:
    """Every column reordered by ``first``, then ``then``."""
    order = np.lexsort((cols[then], cols[first]))
    return {k: v[order] for k, v in cols.items()}


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (vectorised): a fast, well-spread 64-bit hash."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def uuids(seed: int, salt: int, ids: np.ndarray) -> np.ndarray:
    """Deterministic version-4-shaped UUID strings for integer ids (unique per seed, salt and id)."""
    ids = np.asarray(ids).astype(np.uint64)
    with np.errstate(over="ignore"):
        base = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt) * np.uint64(0xD1B54A32D192ED03)
        a = mix64(ids ^ base)
        b = mix64(a ^ np.uint64(0xA24BAED4963EE407) ^ ids)
    raw = np.stack([a, b], axis=1).view(np.uint8).reshape(-1, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    hexed = np.empty((raw.shape[0], 32), np.uint8)
    hexed[:, 0::2] = _HEX[raw >> 4]
    hexed[:, 1::2] = _HEX[raw & 0x0F]
    out = np.full((raw.shape[0], 36), ord("-"), np.uint8)
    for dst, src in ((slice(0, 8), slice(0, 8)), (slice(9, 13), slice(8, 12)), (slice(14, 18), slice(12, 16)),
                     (slice(19, 23), slice(16, 20)), (slice(24, 36), slice(20, 32))):
        out[:, dst] = hexed[:, src]
    return out.view("S36").ravel().astype("U36")


def dict_lookup(keys: np.ndarray, values: np.ndarray) -> Any:
    """A vectorised map from ``keys`` (unique) to ``values``."""
    order = np.argsort(keys)
    ks, vs = keys[order], values[order]

    def get(q: np.ndarray) -> np.ndarray:
        return vs[np.searchsorted(ks, q)]

    return get


def dates(days: np.ndarray) -> list[str | None]:
    """Days since epoch -> ISO dates (None where not finite)."""
    d = np.asarray(days, dtype=np.float64)
    ok = np.isfinite(d)
    s = np.datetime_as_string(np.floor(np.where(ok, d, 0)).astype(np.int64).astype("datetime64[D]"))
    return np.where(ok, s, None).tolist()


def iso_times(days: np.ndarray) -> list[str | None]:
    """Days since epoch -> ISO date-times to the second with a ``Z`` (None where not finite)."""
    d = np.asarray(days, dtype=np.float64)
    ok = np.isfinite(d)
    s = np.datetime_as_string(seconds(np.where(ok, d, 0)).astype("datetime64[s]"))
    return np.where(ok, np.char.add(s.astype(str), "Z"), None).tolist()



def assemble_parts(parts: Path, out: Path, name: str, header: str, n_chunks: int) -> None:
    """Concatenate ``parts/<name>.<chunk>.csv`` in chunk order under ``header`` into ``out``."""
    with open(out, "wb") as dst:
        dst.write((header + "\n").encode())
        for i in range(n_chunks):
            part = parts / f"{name}.{i:06d}.csv"
            if part.exists():
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                part.unlink()

