"""Who may ask what, how often, and what an aggregate may show: API keys, roles, split scopes, rate limits and
small-cell suppression.

- **Keys** (:class:`KeyStore`): ``fsk_<key_id>_<secret>``; the keys file stores only ``sha256(key)`` (compared
  with :func:`hmac.compare_digest`). A fast hash is right here, unlike for passwords: the secret is 256 random
  bits, so guessing is hopeless at any hash speed, and a slow KDF would add ~100 ms to every request. The file
  is re-read when it changes, so ``foresight serve keygen`` / ``revoke`` take effect without a restart.
- **Roles** (:data:`ROLES`): ``researcher`` (timelines they post; suppressed aggregates) and ``analyst`` (also
  subject lookups in the attached warehouse).
- **Key scope** (optional): a key with ``"splits": ["held_out"]`` may look up only subjects of those
  ``subject_splits`` (:meth:`ApiKey.allows_split`). A key without ``splits`` is unrestricted.
- **Rate limit** (:class:`RateLimiter`): an in-process token bucket per key (rate per minute, burst).
- **Small cells** (:func:`suppress_count`): every count in an aggregate output is shown as ``"<8"`` when it is
  0-7 (an empty cell included, so 0 and 1 look alike) and otherwise rounded to the nearest 5 (NHS / OpenSAFELY
  practice; both numbers configurable). Differencing across requests is stopped by
  :mod:`foresight.serve.disclosure`, which says why this rule alone is not enough.
"""

from __future__ import annotations

import hmac
import json
import math
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from foresight.atomic import write_text
from foresight.hashing import sha256
from foresight.schema import SPLITS
from foresight.suppression import SuppressionRule, suppress_count  # noqa: F401  (re-exported)

ROLES = {"researcher": 1, "analyst": 2}  # a role may do everything a lower one may
KEY_PREFIX = "fsk_"
NO_KEY_HASH = "0" * 64  # compared against when the key id is unknown, so timing says nothing about ids


# --- small-cell suppression -----------------------------------------------------------------------------------


# The rule itself is core (foresight.suppression): the CLI's published strata and the flows use it too.


# --- API keys -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKey:
    """One key as stored in the keys file (the secret itself is never stored)."""

    key_id: str
    role: str
    sha256: str
    rate_per_minute: float = 60.0
    burst: int = 20
    label: str = ""
    created: str = ""
    splits: tuple[str, ...] | None = None  # subject_splits this key may look up; None: all (keys before scopes)

    def allows_split(self, split: str | None) -> bool:
        """Whether this key may see subjects of ``split`` (None: a subject or cohort with no split)."""
        return self.splits is None or split in self.splits


def check_splits(splits: Sequence[str] | None) -> tuple[str, ...] | None:
    """A key's split scope as stored: None (unrestricted) or a non-empty tuple of known split names."""
    if splits is None:
        return None
    if isinstance(splits, str) or not all(isinstance(x, str) for x in splits):
        raise ValueError(f"splits must be a list of split names ({', '.join(SPLITS)}), got {splits!r}")
    scope = tuple(dict.fromkeys(splits))  # ordered, without repeats
    bad = [x for x in scope if x not in SPLITS]
    if bad or not scope:
        raise ValueError(f"splits must name at least one of {', '.join(SPLITS)}; got {list(splits)!r}")
    return scope


def check_rate(rate_per_minute: object, burst: object) -> None:
    """A rate limit must limit: a finite rate > 0 per minute and a whole burst >= 1 (NaN and inf would not)."""
    if isinstance(rate_per_minute, bool) or not isinstance(rate_per_minute, int | float) \
            or not math.isfinite(rate_per_minute) or rate_per_minute <= 0:
        raise ValueError(f"rate_per_minute must be a finite number > 0, got {rate_per_minute!r}")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"burst must be a whole number >= 1, got {burst!r}")


def file_stamp(path: Path) -> tuple[int, int]:
    """(mtime_ns, size): cheap change detection for files the service re-reads while running."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size


class KeyStore:
    """The keys file (JSON ``{"keys": [ApiKey...]}``): lookup by key id, constant-time hash comparison.

    The file is re-read when its modification time or size changes, so new and revoked keys apply at once.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, ApiKey] = {}
        self._lock = threading.Lock()
        self.error: str | None = None  # why the file could not be re-read (the last good copy is in use)
        self._reload()  # at start a missing or malformed file is an error: the server does not start

    def _reload(self) -> None:
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return
        keys = load_keys(self.path)
        with self._lock:
            self._keys, self._stamp = {k.key_id: k for k in keys}, stamp

    def verify(self, presented: str) -> ApiKey | None:
        """The key record for a presented key, or None (unknown id and wrong secret look the same)."""
        try:
            self._reload()
        except (OSError, ValueError) as exc:  # being replaced, or edited badly: keep the last good copy
            if str(exc) != self.error:  # once per problem, not once per request
                print(f"foresight serve: keeping the last good keys ({len(self._keys)} keys): {exc}",
                      file=sys.stderr)
            self.error = str(exc)
        else:
            self.error = None
        key_id = presented[len(KEY_PREFIX):].split("_", 1)[0] if presented.startswith(KEY_PREFIX) else ""
        record = self._keys.get(key_id)
        expected = record.sha256 if record else NO_KEY_HASH  # compare anyway: no timing hint about the id
        ok = hmac.compare_digest(sha256(presented), expected)
        return record if ok and record is not None else None

    def __len__(self) -> int:
        return len(self._keys)


def load_keys(path: str | Path) -> list[ApiKey]:
    """Read a keys file; a malformed one is an error naming the file and the entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise ValueError(f'{path}: not a keys file (expected {{"keys": [...]}})')
    out = []
    for i, entry in enumerate(data.get("keys", [])):
        try:
            if not isinstance(entry, dict):
                raise TypeError("not a key record (a JSON object)")
            key = ApiKey(**entry)
            key = replace(key, splits=check_splits(key.splits))  # JSON gives a list; a typo must not widen
            check_rate(key.rate_per_minute, key.burst)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: keys[{i}]: {exc}") from exc
        if not isinstance(key.role, str) or key.role not in ROLES:
            raise ValueError(f"{path}: keys[{i}]: unknown role {key.role!r} (choose {', '.join(ROLES)})")
        if not isinstance(key.sha256, str) or len(key.sha256) != 64:
            raise ValueError(f"{path}: keys[{i}]: sha256 must be 64 hex digits")
        out.append(key)
    return out


def _write_keys(path: Path, keys: Sequence[ApiKey]) -> None:
    """Atomically replace the keys file (owner read/write only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # an unscoped key is written as before scopes existed, so older servers still read the file
    entries = [{f: v for f, v in asdict(k).items() if not (f == "splits" and v is None)} for k in keys]
    write_text(path, json.dumps({"version": 1, "keys": entries}, indent=1), mode=0o600)


def generate_key(path: str | Path, role: str, *, rate_per_minute: float = 60.0, burst: int = 20,
                 label: str = "", splits: Sequence[str] | None = None) -> tuple[str, ApiKey]:
    """Create a key, store only its hash in ``path`` (created if missing) and return (the key, its record).

    The key is shown to the caller once; it cannot be recovered from the file. ``splits`` restricts the
    subjects it may look up to those ``subject_splits`` (None: unrestricted).
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (choose {', '.join(ROLES)})")
    check_rate(rate_per_minute, burst)
    scope = check_splits(splits)
    path = Path(path)
    keys = load_keys(path) if path.exists() else []
    taken = {k.key_id for k in keys}
    key_id = secrets.token_hex(6)
    while key_id in taken:
        key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKey(key_id, role, sha256(key), float(rate_per_minute), int(burst), label,
                    datetime.now(UTC).isoformat(timespec="seconds"), scope)
    _write_keys(path, [*keys, record])
    return key, record


def revoke_key(path: str | Path, key_id: str) -> bool:
    """Remove a key from the keys file; False if there was no such key."""
    path = Path(path)
    keys = load_keys(path)
    kept = [k for k in keys if k.key_id != key_id]
    if len(kept) == len(keys):
        return False
    _write_keys(path, kept)
    return True


# --- rate limiting --------------------------------------------------------------------------------------------


class RateLimiter:
    """Token buckets per key id: ``burst`` requests at once, refilled at ``rate_per_minute``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last refill time)
        self._lock = threading.Lock()

    def take(self, key: ApiKey) -> float:
        """Spend one token: 0.0 if allowed, else the seconds until one is available."""
        now = self._clock()
        rate = key.rate_per_minute / 60.0
        with self._lock:
            tokens, last = self._buckets.get(key.key_id, (float(key.burst), now))
            tokens = min(float(key.burst), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key.key_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key.key_id] = (tokens, now)
            return (1.0 - tokens) / rate
