"""The researcher query service: next events, risks and explanations over HTTP, behind keys, limits and an audit.

``foresight serve --model MODEL_DIR [--db FILE] [--port P]`` runs :func:`create_app` under uvicorn. Every
answer comes from the same Python API the CLI uses (:class:`foresight.forecast.Forecaster`).

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``)
------------------------------------------------------
=========================  =========  ===========================================================================
``GET  /healthz``          anyone     liveness (no model facts)
``GET  /v1/model``         any key    model card summary, limits, serving statistics
``POST /v1/next-events``   any key    top-k next events + time-to-next distribution for a posted timeline;
                                      ``subject_id`` instead of events needs ``analyst`` and ``--db``
``POST /v1/risk``          any key    a zero-shot task's risk (share of Monte Carlo futures) with a 95% interval
``POST /v1/explain``       any key    the past events that most changed the next-event prediction
``POST /v1/cohort-rate``   any key    expected weekly events for a warehouse cohort, small cells suppressed
=========================  =========  ===========================================================================

Safety
------
- **Keys** (:class:`KeyStore`): ``fsk_<key_id>_<secret>``; the keys file stores only ``sha256(key)`` (compared
  with :func:`hmac.compare_digest`). A fast hash is right here, unlike for passwords: the secret is 256 random
  bits, so guessing is hopeless at any hash speed, and a slow KDF would add ~100 ms to every request. The file
  is re-read when it changes, so ``foresight serve keygen`` / ``revoke`` take effect without a restart.
- **Roles**: ``researcher`` (timelines they post; suppressed aggregates) and ``analyst`` (also subject lookups in
  the attached warehouse). Missing or wrong key: 401; role too low: 403.
- **Key scope** (optional): a key with ``"splits": ["held_out"]`` in the keys file (``foresight serve keygen
  --splits held_out``) may look up only subjects of those ``subject_splits`` and run cohort rates only over
  them (403 otherwise). A key without ``splits`` is unrestricted, as keys were before scopes existed.
- **National data opt-out**: ``--exclude-subjects FILE`` (the same file as ``foresight tokenize
  --exclude-subjects``, read by :mod:`foresight.optout`) hides the listed subjects from every warehouse query
  the service makes: a lookup of one answers exactly what a lookup of an unknown id answers (404), so the
  response does not reveal who is on the list, and cohort rates never count them. The file is re-read when it
  changes, so a new opt-out applies without a restart (a file that becomes unreadable keeps the last list).
- **Rate limit**: an in-process token bucket per key (rate per minute, burst); 429 with ``Retry-After``.
- **Audit** (:class:`AuditLog`): one JSON line per request — key id, role, endpoint, status, time, request and
  response sizes, number of posted events, the subject id of an analyst lookup — never codes, times or values
  from a body. Opened for append only, fsynced per batch of records by a writer thread, and hash-chained
  (each record holds the SHA-256 of the previous line; :func:`verify_audit_log`), so deletions and edits show.
  If the log cannot be written the service refuses requests (503): no unaudited answers.
- **Small cells** (:func:`suppress_count`): every count in an aggregate output is shown as ``"<8"`` when it is
  1-7 and otherwise rounded to the nearest 5 (NHS / OpenSAFELY practice; both numbers configurable). A cohort
  smaller than the threshold gets no forecast at all.
- **Validation**: clear 4xx for wrong types, unknown fields, times out of order or out of range, reserved
  tokens posted as codes, too many events (422), bodies over the limit (413). Codes the vocabulary does not
  know are read as their kind's RARE token and reported in ``warnings`` (not an error).

Batching
--------
Next-event requests go through a :class:`MicroBatcher`: the first request waits up to ``batch_wait_ms`` for
others (or until ``max_batch`` are queued) and the whole group runs as ONE left-padded forward pass
(:meth:`Forecaster.event_distributions`). All model work runs on one worker thread, so the event loop keeps
accepting (and batching) requests while the model computes. ``bench/serve.py`` measures batched vs unbatched.

Explanations: leave-one-event-out, not gradients x input
--------------------------------------------------------
``/v1/explain`` removes each past event in turn (re-encoding the timeline, so gaps, ages and value tokens are
what they would have been had the event never been recorded) and reports how P(target) changes, all variants in
one batched pass. Why not gradients x input: (1) it answers the clinician's actual question, "would the
prediction differ without this event?", in the units of the prediction (a probability difference) rather than a
first-order sensitivity of a logit to an embedding; (2) an event is several tokens (code, value decile, a gap,
sometimes age/year markers) and removing the event removes exactly those, while token gradients would have to be
summed over pieces whose removal also shifts every later position's clock; (3) it is model-agnostic (works for
any ``AutoModelForCausalLM``, quantised or compiled, no backward pass, no gradient saturation); (4) its cost,
one forward per event, is paid as a single batch and capped by ``max_explain_events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

ROLES = {"researcher": 1, "analyst": 2}  # a role may do everything a lower one may
MIN_TIME, MAX_TIME = datetime(1800, 1, 1), datetime(2400, 1, 1)  # shifted MIMIC dates reach the 2200s
ZERO_HASH = "0" * 64


# --- small-cell suppression -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuppressionRule:
    """How aggregate counts are released: 1..threshold-1 -> "<threshold"; others rounded to ``rounding``."""

    threshold: int = 8
    rounding: int = 5

    def __post_init__(self) -> None:
        if self.threshold < 1 or self.rounding < 1:
            raise ValueError("the small-cell threshold and the rounding must be >= 1")


def suppress_count(value: float, rule: SuppressionRule = SuppressionRule()) -> int | str:
    """A count (or an expected count, rounded first) as it may be released.

    >>> [suppress_count(x) for x in (0, 1, 7, 7.4, 8, 12, 13, 101)]
    [0, '<8', '<8', '<8', 10, 10, 15, 100]
    >>> suppress_count(3, SuppressionRule(threshold=3, rounding=1))
    3
    """
    if not math.isfinite(value):
        raise ValueError(f"not a count: {value}")
    n = round(float(value))
    if n <= 0:
        return 0  # an empty cell discloses nobody
    if n < rule.threshold:
        return f"<{rule.threshold}"
    # never round a cell at or above the threshold down to zero
    return max(rule.rounding, rule.rounding * round(n / rule.rounding))


# --- API keys -------------------------------------------------------------------------------------------------

KEY_PREFIX = "fsk_"


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


def _check_splits(splits: Sequence[str] | None) -> tuple[str, ...] | None:
    """A key's split scope as stored: None (unrestricted) or a non-empty tuple of known split names."""
    from foresight.schema import SPLITS

    if splits is None:
        return None
    if isinstance(splits, str) or not all(isinstance(x, str) for x in splits):
        raise ValueError(f"splits must be a list of split names ({', '.join(SPLITS)}), got {splits!r}")
    scope = tuple(dict.fromkeys(splits))  # ordered, without repeats
    bad = [x for x in scope if x not in SPLITS]
    if bad or not scope:
        raise ValueError(f"splits must name at least one of {', '.join(SPLITS)}; got {list(splits)!r}")
    return scope


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class KeyStore:
    """The keys file (JSON ``{"keys": [ApiKey...]}``): lookup by key id, constant-time hash comparison.

    The file is re-read when its modification time or size changes, so new and revoked keys apply at once.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, ApiKey] = {}
        self._lock = threading.Lock()
        self._reload()

    def _reload(self) -> None:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        keys = load_keys(self.path)
        with self._lock:
            self._keys, self._stamp = {k.key_id: k for k in keys}, stamp

    def verify(self, presented: str) -> ApiKey | None:
        """The key record for a presented key, or None (unknown id and wrong secret look the same)."""
        with contextlib.suppress(OSError):  # a keys file being replaced: keep the last good copy
            self._reload()
        key_id = presented[len(KEY_PREFIX):].split("_", 1)[0] if presented.startswith(KEY_PREFIX) else ""
        record = self._keys.get(key_id)
        expected = record.sha256 if record else ZERO_HASH  # compare anyway: no timing hint about the id
        ok = hmac.compare_digest(_key_hash(presented), expected)
        return record if ok and record is not None else None

    def __len__(self) -> int:
        return len(self._keys)


def _file_stamp(path: Path) -> tuple[int, int]:
    """(mtime_ns, size): cheap change detection for files the service re-reads while running."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def load_keys(path: str | Path) -> list[ApiKey]:
    """Read a keys file; a malformed one is an error naming the file and the entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    out = []
    for i, entry in enumerate(data.get("keys", [])):
        try:
            key = ApiKey(**entry)
            key = replace(key, splits=_check_splits(key.splits))  # JSON gives a list; a typo must not widen
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: keys[{i}]: {exc}") from exc
        if key.role not in ROLES:
            raise ValueError(f"{path}: keys[{i}]: unknown role {key.role!r} (choose {', '.join(ROLES)})")
        if len(key.sha256) != 64:
            raise ValueError(f"{path}: keys[{i}]: sha256 must be 64 hex digits")
        out.append(key)
    return out


def _write_keys(path: Path, keys: Sequence[ApiKey]) -> None:
    """Atomically replace the keys file (owner read/write only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        # an unscoped key is written as before scopes existed, so older servers still read the file
        entries = [{f: v for f, v in asdict(k).items() if not (f == "splits" and v is None)} for k in keys]
        json.dump({"version": 1, "keys": entries}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def generate_key(path: str | Path, role: str, *, rate_per_minute: float = 60.0, burst: int = 20,
                 label: str = "", splits: Sequence[str] | None = None) -> tuple[str, ApiKey]:
    """Create a key, store only its hash in ``path`` (created if missing) and return (the key, its record).

    The key is shown to the caller once; it cannot be recovered from the file. ``splits`` restricts the
    subjects it may look up to those ``subject_splits`` (None: unrestricted).
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (choose {', '.join(ROLES)})")
    if rate_per_minute <= 0 or burst < 1:
        raise ValueError("rate_per_minute must be > 0 and burst >= 1")
    scope = _check_splits(splits)
    path = Path(path)
    keys = load_keys(path) if path.exists() else []
    taken = {k.key_id for k in keys}
    key_id = secrets.token_hex(6)
    while key_id in taken:
        key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKey(key_id, role, _key_hash(key), float(rate_per_minute), int(burst), label,
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


# --- audit log ------------------------------------------------------------------------------------------------


class AuditLog:
    """Append-only JSON-lines audit trail, written and fsynced in batches by one writer thread.

    Each record gets ``prev``: the SHA-256 of the previous line, so removing or editing a line breaks the chain
    (:func:`verify_audit_log`). ``write`` never blocks on the disk; ``flush`` waits until everything queued is
    durable. A hard crash can lose only records not yet fsynced (the last few milliseconds).
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
        self._prev = _last_line_hash(self.path)
        self._ensure_running()

    def _ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="foresight-audit", daemon=True)
                self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        self._ensure_running()
        self._queue.put(record)

    def flush(self) -> None:
        """Block until every queued record is on disk."""
        self._queue.join()

    def close(self) -> None:
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
            line = json.dumps({**r, "prev": prev}, separators=(",", ":"), sort_keys=True)
            prev = hashlib.sha256(line.encode()).hexdigest()
            lines.append(line + "\n")
        with open(self.path, "a", encoding="utf-8") as fh:  # O_APPEND: never rewrites what is there
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        self._prev = prev  # only once the lines are durable


def _last_line_hash(path: Path) -> str:
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
    return hashlib.sha256(last).hexdigest()


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
            prev = hashlib.sha256(line.encode()).hexdigest()
            n += 1
    return n


# --- micro-batching -------------------------------------------------------------------------------------------


class MicroBatcher:
    """Collect concurrent items (up to ``max_batch``) and process them together.

    ``process(items) -> results`` runs on ``executor`` (one call per batch); a result that is an exception is
    raised to that item's caller only. While a batch computes, new items queue up and form the next batch.
    When the worker picks up an item and others are already waiting, it also waits up to ``max_wait_s`` for
    more; a lone item goes at once. (bench/serve.py: a fixed 5 ms window cost a lone client ~20% of its
    throughput and bought no throughput at 8-32 clients over continuous batching.)
    """

    def __init__(self, process: Callable[[list[Any]], list[Any]], executor: Callable[[], ThreadPoolExecutor],
                 max_batch: int = 32, max_wait_s: float = 0.005) -> None:
        self.process = process
        self.executor = executor
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.batches = 0
        self.items = 0
        self.largest = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._worker())
        fut: asyncio.Future[Any] = loop.create_future()
        assert self._queue is not None
        await self._queue.put((item, fut))
        return await fut

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task
        self._task = None

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        q = self._queue
        assert q is not None
        while True:
            batch = [await q.get()]
            # a lone request goes at once (no added latency when quiet); when others are already queued there
            # is concurrency, and waiting a few ms for the rest of the burst makes the batch worth it
            deadline = loop.time() + (self.max_wait_s if not q.empty() else 0.0)
            while len(batch) < self.max_batch:
                try:
                    batch.append(q.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(q.get(), remaining))
                except TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]  # callers that went away are skipped
            if not live:
                continue
            self.batches += 1
            self.items += len(live)
            self.largest = max(self.largest, len(live))
            try:
                results = await loop.run_in_executor(self.executor(), self.process, [i for i, _ in live])
            except Exception as exc:  # the whole batch failed: every caller hears why
                results = [exc] * len(live)
            for (_, fut), res in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    def stats(self) -> dict[str, Any]:
        mean = round(self.items / self.batches, 3) if self.batches else None
        return {"max_batch": self.max_batch, "batch_wait_ms": self.max_wait_s * 1000, "batches": self.batches,
                "requests": self.items, "mean_batch_size": mean, "largest_batch": self.largest}


# --- configuration --------------------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    """Everything the service needs; limits are per request."""

    model_dir: Path
    keys_file: Path
    audit_log: Path
    db: Path | None = None
    exclude_subjects_file: Path | None = None  # national data opt-out list (foresight.optout format)
    max_events: int = 2000  # posted events per timeline
    max_body_bytes: int = 1_048_576  # request body
    max_prompt_tokens: int | None = None  # encoded timeline length (default: the model's position limit)
    max_top_k: int = 100
    max_samples: int = 200  # Monte Carlo futures per risk request
    max_horizon_days: float = 3 * 365.25
    max_explain_events: int = 128
    max_explain_tokens: int = 262_144  # explain: (events tried + 1) x timeline tokens, i.e. the forward's work
    max_rollout_cache_bytes: int = 2 * 2**30  # risk: samples x (prompt + new tokens) x KV-cache bytes per token
    max_cohort_subjects: int = 200  # cohort-rate runs subjects x samples futures: minutes on a CPU if large
    max_cohort_samples: int = 20
    max_batch: int = 32  # next-event requests per forward pass (1 = unbatched)
    batch_wait_ms: float = 5.0
    suppression: SuppressionRule = field(default_factory=SuppressionRule)


# --- request and response schemas -----------------------------------------------------------------------------


def _iso_time(value: Any) -> Any:
    """Times must be ISO 8601 strings (a bare number is ambiguous: seconds? days? since when?)."""
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date-time string, e.g. 2024-03-01T08:30:00")
    return value


def _naive(t: datetime | None, what: str) -> datetime | None:
    """UTC-naive (the warehouse's convention); out-of-range times are an error, not a crash later."""
    if t is None:
        return None
    if t.tzinfo is not None:
        t = t.astimezone(UTC).replace(tzinfo=None)
    if not MIN_TIME <= t < MAX_TIME:
        raise ValueError(f"{what} {t.isoformat()} is outside {MIN_TIME.year}-{MAX_TIME.year - 1}")
    return t


def _printable(value: str) -> str:
    """Codes and patterns are printable text: no control characters, no lone UTF-16 surrogates."""
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValueError("must be printable text (no control characters)")
    return value


IsoTime = Annotated[datetime, BeforeValidator(_iso_time)]
Code = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_printable)]
Pattern = Annotated[str, Field(min_length=1, max_length=256, description="glob over codes, e.g. ADMIT//*"),
                    AfterValidator(_printable)]


class Event(BaseModel):
    """One MEDS-shaped event."""

    model_config = ConfigDict(extra="forbid")

    time: IsoTime | None = Field(None, description="When the event became known (ISO 8601; an offset is converted "
                                                   "to UTC). Null only for static facts such as GENDER//F.")
    code: Code = Field(description="KIND//VOCAB//VALUE code, e.g. DX//ICD10CM//E119, or MEDS_BIRTH / MEDS_DEATH")
    numeric_value: float | None = Field(None, allow_inf_nan=False, ge=-1e12, le=1e12)
    text_value: str | None = Field(None, max_length=1000, description="Accepted for MEDS compatibility; unused.")


class TimelineQuery(BaseModel):
    """A timeline: posted ``events`` (any role) or a warehouse ``subject_id`` (analyst role, server with --db)."""

    model_config = ConfigDict(extra="forbid")

    events: list[Event] | None = Field(None, max_length=100_000, description="In time order, static facts first.")
    subject_id: int | None = Field(None, ge=0, le=2**63 - 1)
    as_of: IsoTime | None = Field(None, description="Predict as of this time (default: the last event).")

    @model_validator(mode="after")
    def _check(self) -> TimelineQuery:
        if (self.events is None) == (self.subject_id is None):
            raise ValueError("give exactly one of `events` (a timeline) or `subject_id` (a warehouse lookup)")
        self.as_of = _naive(self.as_of, "as_of")
        if self.events is not None:
            prev: tuple[int, datetime] | None = None
            births = 0
            for i, e in enumerate(self.events):
                e.time = _naive(e.time, f"events[{i}].time")
                if e.code == "MEDS_BIRTH":
                    births += 1
                    if e.time is None:
                        raise ValueError(f"events[{i}]: MEDS_BIRTH needs a time")
                    continue
                if e.time is None:
                    if prev is not None:
                        raise ValueError(f"events[{i}]: events without a time (static facts) must come first")
                    continue
                if prev is not None and e.time < prev[1]:
                    raise ValueError(f"events[{i}].time {e.time.isoformat()} is before events[{prev[0]}].time "
                                     f"{prev[1].isoformat()}: post events in time order")
                prev = (i, e.time)
            if births > 1:
                raise ValueError("more than one MEDS_BIRTH event")
        return self


class NextEventsRequest(TimelineQuery):
    top_k: int = Field(10, ge=1, le=1000)
    kinds: list[Annotated[str, Field(min_length=1, max_length=32), AfterValidator(_printable)]] | None = Field(
        None, max_length=50, description="Only these kinds, e.g. [\"DX\", \"ADMIT\"].")
    new_only: bool = Field(False, description="Only codes not already in the timeline.")


class TaskModel(BaseModel):
    """A zero-shot task (see foresight.forecast.TaskSpec)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable)]
    codes: list[Pattern] = Field(min_length=1, max_length=50)
    window_days: float = Field(gt=0, le=3650, allow_inf_nan=False)
    stop_codes: list[Pattern] = Field(default_factory=list, max_length=50)
    value: Literal["binary", "time"] = "binary"
    description: str = Field("", max_length=500)


class RiskRequest(TimelineQuery):
    task: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable)] | TaskModel = Field(
        description="A built-in task name (see GET /v1/model) or a task spec.")
    horizon_days: float | None = Field(None, gt=0, le=3650, allow_inf_nan=False,
                                       description="Override the task's window.")
    samples: int = Field(50, ge=1, le=10_000, description="Monte Carlo futures (the server caps it).")
    seed: int = Field(0, ge=0, le=2**32 - 1)


class ExplainRequest(TimelineQuery):
    target: list[Pattern] | None = Field(None, max_length=50, description="Globs over event tokens whose "
                                                                           "probability to explain (default: the "
                                                                           "top-1 next event).")
    max_events: int = Field(32, ge=1, le=10_000, description="Most recent events to try removing (server caps it).")


class CohortRateRequest(BaseModel):
    """Expected weekly events for the warehouse cohort alive at ``as_of`` (optionally with some past codes)."""

    model_config = ConfigDict(extra="forbid")

    as_of: IsoTime
    horizon_days: float = Field(28, gt=0, le=365, allow_inf_nan=False)
    codes: list[Pattern] = Field(default_factory=lambda: ["ADMIT//*"], min_length=1, max_length=50)
    cohort_codes: list[Pattern] | None = Field(None, max_length=50, description="Only subjects with one of these "
                                                                               "codes on or before as_of.")
    split: Literal["train", "tuning", "held_out"] | None = None
    max_subjects: int = Field(200, ge=1, le=100_000)
    samples: int = Field(20, ge=1, le=10_000)
    history_weeks: int = Field(12, ge=0, le=104)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _check(self) -> CohortRateRequest:
        self.as_of = _naive(self.as_of, "as_of")  # type: ignore[assignment]
        return self


class EventProbability(BaseModel):
    token: str
    kind: str
    description: str | None
    probability: float
    new: bool


class TimeBin(BaseModel):
    bin: str
    probability: float


class NextEventsResponse(BaseModel):
    as_of: datetime
    last_event: datetime | None = Field(description="Time of the last timed event (null: only static facts).")
    events: list[EventProbability]
    time_to_next: list[TimeBin]
    probability_mass: float = Field(description="Total probability of events of the allowed kinds.")
    expected_days_to_next: float | None
    warnings: list[str]


class RiskResponse(BaseModel):
    task: str
    horizon_days: float
    as_of: datetime
    probability: float
    low: float
    high: float
    interval: str = Field(description="How low-high was computed.")
    samples: int
    mean_value: float | None = Field(None, description="Time tasks: mean days among futures where it happened.")
    warnings: list[str]


class AttributedEvent(BaseModel):
    index: int = Field(description="Position in the posted (or looked-up) events.")
    time: datetime
    code: str
    token: str
    probability_without: float
    delta: float = Field(description="P(target | timeline) - P(target | timeline without this event).")
    total_variation: float = Field(description="How far the whole next-event distribution moved (0-1).")


class ExplainResponse(BaseModel):
    method: str
    why: str
    target: list[str]
    probability: float
    events_considered: int
    events: list[AttributedEvent]
    warnings: list[str]


Cell = int | str


class CohortWeek(BaseModel):
    week_start: str
    mean: Cell
    p05: Cell
    p25: Cell
    p50: Cell
    p75: Cell
    p95: Cell


class HistoryWeek(BaseModel):
    week_start: str
    observed: Cell


class CohortRateResponse(BaseModel):
    as_of: str
    horizon_days: float
    codes: list[str]
    cohort_size: Cell
    subjects_forecast: Cell
    samples: int
    suppression: dict[str, Any]
    weeks: list[CohortWeek]
    history: list[HistoryWeek]
    warnings: list[str]


RB_INTERVAL = "95% Monte Carlo interval (mean +- 1.96 SE over Rao-Blackwellised futures)"
WILSON_INTERVAL = "95% Wilson interval over the share of sampled futures where the task fired"
EXPLAIN_WHY = ("leave-one-event-out: each past event is removed and the timeline re-encoded, so the change in "
               "probability is what the prediction would have been had the event not been recorded; "
               "model-agnostic, no gradients, all variants in one batched forward pass")


# --- the service ----------------------------------------------------------------------------------------------


class QueryError(Exception):
    """A request the model cannot answer as posted: becomes a 4xx with this message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _NextJob:
    query: NextEventsRequest
    top_k: int


class Runtime:
    """The loaded model, the optional warehouse and the serving machinery shared by the endpoints."""

    def __init__(self, config: ServeConfig, forecaster: Any = None) -> None:
        from foresight.forecast import Forecaster

        self.config = config
        self.fc = forecaster if forecaster is not None else Forecaster.from_pretrained(config.model_dir)
        self.keys = KeyStore(config.keys_file)
        self.limiter = RateLimiter()
        self.audit = AuditLog(config.audit_log)
        limit = int(getattr(self.fc.model.config, "max_position_embeddings", 0) or 0) or None
        caps = [c for c in (config.max_prompt_tokens, limit) if c]
        self.max_tokens = min(caps) if caps else None
        self._executor: ThreadPoolExecutor | None = None
        self._con: Any = None
        # the opt-out list: read now so a bad file stops the server at start, re-read when the file changes
        self.opt_out: frozenset[int] = frozenset()
        self._opt_out_stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._opt_out_hidden: tuple[int, int] | None = None  # the stamp whose list the connection hides
        self._opt_out_error: str | None = None  # why the file could not be re-read, if it could not
        if config.exclude_subjects_file is not None:
            from foresight.optout import read_subjects_file

            self._opt_out_stamp = _file_stamp(config.exclude_subjects_file)
            self.opt_out = frozenset(read_subjects_file(config.exclude_subjects_file))
        self.batcher = MicroBatcher(self._run_next_batch, self.executor, config.max_batch,
                                    config.batch_wait_ms / 1000.0)
        self.started = time.time()
        vocab = self.fc.vocab
        is_static = vocab.is_static
        self.allowed_code = self.fc.is_event | is_static  # posted codes may not be markers, gaps or specials
        self.static_kinds = set(vocab.config.static_kinds)

    def executor(self) -> ThreadPoolExecutor:
        """The one model thread: forward passes and warehouse reads never overlap (DuckDB connections and torch
        on a few cores both prefer one user)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foresight-model")
        return self._executor

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor(), fn, *args)

    async def shutdown(self) -> None:
        await self.batcher.stop()
        if self._executor is not None:
            if self._con is not None:
                await self.run(self._close_warehouse)
            self._executor.shutdown(wait=True)
            self._executor = None
        self.audit.close()

    # -- warehouse (model thread only) --

    def warehouse(self) -> Any:
        if self.config.db is None:
            raise QueryError(400, "this server has no warehouse attached (start it with --db FILE)")
        if self._con is None:
            from foresight import warehouse

            self._con = warehouse.connect(self.config.db, read_only=True)
            self._opt_out_hidden = None
        self._honour_opt_out()
        return self._con

    def _honour_opt_out(self) -> None:
        """Hide the opted-out subjects from every query on the connection (re-reading a changed list first).

        TEMP views shadow ``events``/``subject_splits``/``notes`` (:func:`foresight.optout.hide_subjects`), so
        lookups, cohorts and histories cannot see the listed subjects: an opted-out id is indistinguishable from
        an id the warehouse never held. A list that cannot be read keeps the previous one in force.
        """
        path = self.config.exclude_subjects_file
        if path is None:
            return
        from foresight import optout

        try:
            stamp = _file_stamp(path)
            if stamp != self._opt_out_stamp:
                self.opt_out = frozenset(optout.read_subjects_file(path))
                self._opt_out_stamp = stamp
        except (OSError, optout.OptOutError) as exc:
            if str(exc) != self._opt_out_error:  # once per problem, not once per request
                print(f"foresight serve: keeping the last opt-out list ({len(self.opt_out)} subjects): {exc}",
                      file=sys.stderr)
            self._opt_out_error = str(exc)
        else:
            self._opt_out_error = None
        if self._opt_out_hidden != self._opt_out_stamp:
            optout.hide_subjects(self._con, self.opt_out)
            self._opt_out_hidden = self._opt_out_stamp

    def check_split_scope(self, key: ApiKey, subject_id: int, as_of: datetime | None) -> None:
        """A scoped key may look up only subjects of its splits: 403 otherwise.

        A subject the warehouse does not show (unknown, or hidden by the opt-out) answers the 404 an unknown id
        gets on the lookup itself, so a scoped key learns nothing more about the opt-out list than any key.
        """
        rows = self.warehouse().execute("SELECT split FROM subject_splits WHERE subject_id = ?",
                                        [subject_id]).fetchall()
        if not rows:
            raise QueryError(404, f"subject {subject_id} has no events" + (f" up to {as_of}" if as_of else ""))
        if not key.allows_split(rows[0][0]):
            raise QueryError(403, f"this key may look up subjects of the {', '.join(key.splits or ())} split(s) "
                                  "only")

    def _close_warehouse(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    # -- timelines (model thread) --

    def check_codes(self, events: Sequence[Event]) -> list[str]:
        """Reject reserved token names posted as codes; warn about codes the vocabulary reads as broader tokens."""
        vocab = self.fc.vocab
        unknown: dict[str, str] = {}
        for i, e in enumerate(events):
            if e.code == "MEDS_BIRTH":
                continue
            own = vocab.index.get(e.code)
            token = vocab.token_for(e.code)
            if (own is not None and not self.allowed_code[own]) or not self.allowed_code[vocab.index[token]]:
                raise QueryError(422, f"events[{i}].code {e.code!r} is a reserved token of the model (a time gap, "
                                      "value decile, age/year marker or special token), not an event code")
            kind = e.code.split("//", 1)[0]
            if e.time is None and kind not in self.static_kinds:
                raise QueryError(422, f"events[{i}]: only static facts ({', '.join(sorted(self.static_kinds))}) "
                                      f"may have no time; {e.code!r} needs one")
            if token != e.code and e.code not in vocab.code_map:
                unknown[e.code] = token
        if not unknown:
            return []
        pairs = [f"{c} -> {t}" for c, t in list(unknown.items())[:5]]
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        return [f"{len(unknown)} code(s) not in the model's vocabulary were read as a broader token (an ancestor, "
                f"else their kind's RARE token): {', '.join(pairs)}{more}"]

    def timeline(self, q: TimelineQuery) -> tuple[Any, list[str]]:
        """The query's Timeline (posted events or a warehouse lookup) and its warnings."""
        warnings: list[str] = []
        if q.events is not None:
            if len(q.events) > self.config.max_events:
                raise QueryError(422, f"events: {len(q.events)} events; this server takes at most "
                                      f"{self.config.max_events} per timeline")
            warnings = self.check_codes(q.events)
            try:
                tl = self.fc.timeline_from_events([e.model_dump() for e in q.events], q.as_of)
            except ValueError as exc:
                raise QueryError(422, str(exc)) from exc
        else:
            try:
                tl = self.fc.timeline_from_warehouse(self.warehouse(), int(q.subject_id or 0), q.as_of)
            except KeyError as exc:
                raise QueryError(404, str(exc.args[0])) from exc
        if self.max_tokens is not None and len(tl.tokens) > self.max_tokens:
            raise QueryError(422, f"the timeline encodes to {len(tl.tokens)} tokens; the model takes at most "
                                  f"{self.max_tokens} (post fewer or more recent events)")
        if tl.dead:
            raise QueryError(422, "the timeline ends with MEDS_DEATH: there is no next event to predict")
        return tl, warnings

    def subject_events(self, subject_id: int, as_of: datetime | None) -> list[dict[str, Any]]:
        rows = self.warehouse().execute(
            "SELECT time, code, numeric_value FROM events WHERE subject_id = $s AND ($as_of IS NULL OR time IS NULL "
            "OR time <= $as_of OR code = 'MEDS_BIRTH') ORDER BY time NULLS FIRST, code",
            {"s": subject_id, "as_of": as_of}).fetchall()
        if not rows:
            raise QueryError(404, f"subject {subject_id} has no events" + (f" up to {as_of}" if as_of else ""))
        return [{"time": t, "code": c, "numeric_value": v} for t, c, v in rows]

    # -- work units (model thread) --

    def _run_next_batch(self, jobs: list[_NextJob]) -> list[Any]:
        prepared: list[Any] = []
        for job in jobs:
            try:
                prepared.append(self.timeline(job.query))
            except QueryError as exc:
                prepared.append(exc)
        ok = [i for i, p in enumerate(prepared) if not isinstance(p, Exception)]
        dists = self.fc.event_distributions([prepared[i][0] for i in ok]) if ok else []
        results: list[Any] = list(prepared)
        for i, dist in zip(ok, dists, strict=True):
            tl, warnings = prepared[i]
            q = jobs[i].query
            nxt = self.fc.summarise_next(tl, dist, jobs[i].top_k, q.kinds, q.new_only)
            if jobs[i].top_k < q.top_k:
                warnings = [*warnings, f"top_k capped at {jobs[i].top_k}"]
            last = tl.clock if bool(self.fc.is_event[tl.tokens].any()) else None
            results[i] = NextEventsResponse(as_of=tl.as_of, last_event=last, events=nxt.events,
                                            time_to_next=nxt.time_to_next, probability_mass=nxt.probability_mass,
                                            expected_days_to_next=nxt.expected_days_to_next, warnings=warnings)
        return results

    def risk(self, q: RiskRequest) -> RiskResponse:
        from foresight.forecast import load_task, risk_from_futures

        try:
            task = load_task(q.task.model_dump() if isinstance(q.task, TaskModel) else _builtin_task(q.task))
        except (ValueError, TypeError) as exc:
            raise QueryError(422, str(exc)) from exc
        if q.horizon_days is not None:
            task = replace(task, window_days=float(q.horizon_days))
        if task.window_days > self.config.max_horizon_days:
            raise QueryError(422, f"horizon {task.window_days:g} days; this server allows at most "
                                  f"{self.config.max_horizon_days:g}")
        tl, w = self.timeline(q)
        max_new = 512  # sample_futures' default cap of new tokens per future
        per_sample = (len(tl.tokens) + max_new) * self.fc._cache_bytes_per_token()
        samples = max(1, min(q.samples, self.config.max_samples, self.config.max_rollout_cache_bytes // per_sample))
        warnings = [] if samples == q.samples else [f"samples capped at {samples} (server limit for this timeline)"]
        if task.value == "binary":
            # Rao-Blackwellised futures (the estimator `foresight evaluate` scores): each path carries the
            # probability that the task fires, so the mean has a small Monte Carlo error and a normal interval
            risk, se = self.fc.task_risks([tl], task, samples, seed=q.seed)
            p, err = float(risk[0]), float(se[0])
            low, high = (0.0, 1.0) if not math.isfinite(err) else (max(0.0, p - 1.96 * err), min(1.0, p + 1.96 * err))
            if not math.isfinite(err):
                warnings.append("one future gives no interval: ask for more samples")
            return RiskResponse(task=task.name, horizon_days=task.window_days, as_of=tl.as_of, probability=p,
                                low=low, high=high, interval=RB_INTERVAL, samples=samples, warnings=w + warnings)
        futures = self.fc.sample_futures([tl], samples, task.window_days, seed=q.seed)[0]
        r = risk_from_futures(task, futures, tl.as_of)
        return RiskResponse(task=r.task, horizon_days=task.window_days, as_of=tl.as_of, probability=r.probability,
                            low=r.low, high=r.high, interval=WILSON_INTERVAL, samples=r.samples,
                            mean_value=r.mean_value, warnings=w + warnings)

    def explain(self, q: ExplainRequest) -> ExplainResponse:
        tl, w = self.timeline(q)  # validates (length, tokens, death) and warns before the variants run
        by_tokens = self.config.max_explain_tokens // max(1, len(tl.tokens)) - 1
        n = max(1, min(q.max_events, self.config.max_explain_events, by_tokens))
        warnings = [] if n == q.max_events else [f"max_events capped at {n} (server limit for this timeline)"]
        if q.events is not None:
            events = [e.model_dump() for e in q.events]
        else:
            events = self.subject_events(int(q.subject_id or 0), q.as_of)
        try:
            ex = self.fc.explain_next_events(events, q.as_of, target=q.target, max_events=n)
        except ValueError as exc:
            raise QueryError(422, str(exc)) from exc
        if q.target and ex.target_tokens == 0:
            w = [*w, "no event token of the model matches `target`: every probability is 0"]
        return ExplainResponse(method=ex.method, why=EXPLAIN_WHY, target=ex.target, probability=ex.probability,
                               events_considered=ex.events_considered, events=ex.events, warnings=w + warnings)

    def cohort_rate(self, q: CohortRateRequest, key: ApiKey | None = None) -> CohortRateResponse:
        from foresight.forecast import _like_patterns, cohort_as_of, population_rates, weekly_history

        if key is not None and not key.allows_split(q.split):  # a scoped key sees only its splits' subjects
            raise QueryError(403, f"this key may query the {', '.join(key.splits or ())} split(s) only: set "
                                  "`split` to one of them")
        cfg, rule = self.config, self.config.suppression
        con = self.warehouse()
        ids = cohort_as_of(con, q.as_of, split=q.split)
        if q.cohort_codes:
            con.execute("CREATE OR REPLACE TEMP TABLE serve_cohort AS SELECT unnest(?::BIGINT[]) AS subject_id",
                        [ids])
            ids = [r[0] for r in con.execute(
                "SELECT DISTINCT e.subject_id FROM events e JOIN serve_cohort USING (subject_id) "
                "WHERE e.time <= $as_of AND EXISTS (SELECT 1 FROM unnest($p::VARCHAR[]) p(pat) "
                "WHERE e.code LIKE p.pat ESCAPE '\\') ORDER BY 1",
                {"as_of": q.as_of, "p": _like_patterns(q.cohort_codes)}).fetchall()]
        warnings: list[str] = []
        size = len(ids)
        base = {"as_of": q.as_of.date().isoformat(), "horizon_days": q.horizon_days, "codes": q.codes,
                "cohort_size": suppress_count(size, rule), "suppression": asdict(rule)}
        if size < rule.threshold:
            return CohortRateResponse(**base, subjects_forecast=suppress_count(0, rule), samples=0, weeks=[],
                                      history=[], warnings=[f"the cohort has fewer than {rule.threshold} subjects: "
                                                            "no forecast is released"])
        limit = min(q.max_subjects, cfg.max_cohort_subjects)
        samples = min(q.samples, cfg.max_cohort_samples)
        if samples < q.samples:
            warnings.append(f"samples capped at {samples}")
        if size > limit:
            import numpy as np

            rng = np.random.default_rng(q.seed)
            ids = sorted(rng.choice(ids, size=limit, replace=False).tolist())
            warnings.append("the forecast is for a random subset of the cohort (max_subjects)")
        timelines = [t for t in self.fc.timelines_from_warehouse(con, ids, q.as_of) if not t.dead]
        if not timelines:
            return CohortRateResponse(**base, subjects_forecast=0, samples=0, weeks=[], history=[],
                                      warnings=[*warnings, "nobody in the cohort is alive at as_of"])
        history = weekly_history(con, ids, q.as_of, q.history_weeks, q.codes) if q.history_weeks else []
        result = population_rates(self.fc, timelines, q.as_of, q.horizon_days, samples=samples, codes=q.codes,
                                  seed=q.seed, history=history)
        weeks = [{"week_start": w["week_start"], **{k: suppress_count(w[k], rule) for k in
                                                    ("mean", "p05", "p25", "p50", "p75", "p95")}}
                 for w in result.weeks]
        hist = [{"week_start": h["week_start"], "observed": suppress_count(h["observed"], rule)}
                for h in result.history]
        return CohortRateResponse(**base, subjects_forecast=suppress_count(len(timelines), rule), samples=samples,
                                  weeks=weeks, history=hist, warnings=warnings)

    def model_card(self) -> dict[str, Any]:
        from foresight.forecast import BUILTIN_TASKS
        from foresight.optout import digest

        fc, meta, cfg = self.fc, self.fc.meta, self.fc.model.config
        privacy = self.config.model_dir / "privacy" / "report.json"
        audit: dict[str, Any] = {"report": "absent"}
        if privacy.exists():
            with contextlib.suppress(OSError, ValueError):
                rep = json.loads(privacy.read_text())
                audit = {"report": "present", "passed": rep.get("passed", rep.get("decision"))}
        stats = self.batcher.stats()
        uptime = max(time.time() - self.started, 1e-9)
        stats["requests_per_s_since_start"] = round(self.batcher.items / uptime, 3)
        return {
            "model": self.config.model_dir.name,
            "architecture": type(fc.model).__name__,
            "parameters": sum(p.numel() for p in fc.model.parameters()),
            "layers": getattr(cfg, "num_hidden_layers", None),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "max_prompt_tokens": self.max_tokens,
            "vocab_size": len(fc.vocab.tokens),
            "vocab_min_subjects": fc.vocab.config.min_subjects,
            "data_fingerprint": (meta.get("data") or {}).get("fingerprint") or fc.vocab.fingerprint or None,
            "created": meta.get("created"),
            "preset": meta.get("preset"),
            "metrics": meta.get("metrics"),
            "time_head": (meta.get("time_head") or {}).get("enabled"),
            "privacy_audit": audit,
            "tasks": {name: t.description for name, t in BUILTIN_TASKS.items()},
            "explain_method": EXPLAIN_WHY,
            "suppression": asdict(self.config.suppression),
            "limits": {k: getattr(self.config, k) for k in (
                "max_events", "max_body_bytes", "max_top_k", "max_samples", "max_horizon_days",
                "max_explain_events", "max_explain_tokens", "max_cohort_subjects", "max_cohort_samples")},
            "warehouse_attached": self.config.db is not None,
            # that an opt-out is honoured and which list (the digest of the one last read), never who is on it
            "opt_out": {"honoured": self.config.exclude_subjects_file is not None,
                        "list_sha256": digest(self.opt_out) if self.config.exclude_subjects_file else None},
            "serving": stats,
        }


def _builtin_task(name: str) -> str:
    from foresight.forecast import BUILTIN_TASKS

    if name not in BUILTIN_TASKS:  # never treat a posted string as a path on the server
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)} (or post a task spec)")
    return name


# --- middleware: body limit + audit ---------------------------------------------------------------------------


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit:,} bytes")


class GuardMiddleware:
    """Outermost ASGI layer: refuses bodies over the limit (413) and writes one audit record per request."""

    def __init__(self, app: Any, runtime: Runtime) -> None:
        self.app = app
        self.rt = runtime

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rt, limit = self.rt, self.rt.config.max_body_bytes
        state = scope.setdefault("state", {})
        t0 = time.perf_counter()
        sizes = {"in": 0, "out": 0}
        status = {"code": 500}

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body":
                sizes["out"] += len(message.get("body", b""))
            await send(message)

        async def receive_limited() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                sizes["in"] += len(message.get("body", b""))
                if sizes["in"] > limit:
                    raise _BodyTooLarge(limit)
            return message

        declared = _content_length(scope)
        try:
            if not rt.audit.healthy:
                await _plain(send_counted, 503, "the audit log cannot be written: requests are refused")
            elif declared is not None and declared > limit:
                await _plain(send_counted, 413, f"request body over {limit:,} bytes")
            else:
                await self.app(scope, receive_limited, send_counted)
        finally:
            route = scope.get("route")
            rt.audit.write({
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "key_id": state.get("key_id"),
                "role": state.get("role"),
                "method": scope.get("method"),
                "endpoint": getattr(route, "path", None) or "(no such endpoint)",
                "status": status["code"],
                "request_bytes": max(sizes["in"], declared or 0),
                "response_bytes": sizes["out"],
                "events": state.get("n_events"),
                "subject_id": state.get("subject_id"),
                "ms": round((time.perf_counter() - t0) * 1000, 2),
            })


def _content_length(scope: dict[str, Any]) -> int | None:
    for k, v in scope.get("headers", []):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


async def _plain(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# --- the app --------------------------------------------------------------------------------------------------


class SafeJSONResponse(JSONResponse):
    """JSON escaped to ASCII: any text echoed back (a posted code in a warning, an error message) renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


bearer = HTTPBearer(auto_error=False, description="API key from `foresight serve keygen`: "
                                                  "`Authorization: Bearer fsk_...`")


def _authenticate(min_role: str) -> Callable[..., Awaitable[ApiKey]]:
    async def dependency(request: Request,
                         creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> ApiKey:
        rt: Runtime = request.app.state.runtime
        if creds is None:
            raise HTTPException(401, "missing API key: send `Authorization: Bearer <key>`",
                                headers={"WWW-Authenticate": "Bearer"})
        key = rt.keys.verify(creds.credentials)
        if key is None:
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        request.state.key_id, request.state.role = key.key_id, key.role
        wait = rt.limiter.take(key)  # before the role check: refused calls count too
        if wait > 0:
            raise HTTPException(429, f"rate limit of {key.rate_per_minute:g} requests/minute exceeded",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if ROLES[key.role] < ROLES[min_role]:
            raise HTTPException(403, f"this endpoint needs the {min_role} role; this key is {key.role}")
        return key

    return dependency


Researcher = Annotated[ApiKey, Depends(_authenticate("researcher"))]


async def _note(request: Request, key: ApiKey, q: TimelineQuery) -> None:
    """Audit sizes (never content) and enforce: subject lookups are for analysts, within the key's splits."""
    if q.events is not None:
        request.state.n_events = len(q.events)
    else:
        request.state.subject_id = q.subject_id  # who looked at which record: the access trail analysts leave
        if ROLES[key.role] < ROLES["analyst"]:
            raise HTTPException(403, "subject lookups need the analyst role; post the timeline as `events`")
        if key.splits is not None:  # unscoped keys skip the extra warehouse read
            rt: Runtime = request.app.state.runtime
            await _answer(rt.run(rt.check_split_scope, key, int(q.subject_id or 0), q.as_of))


async def _answer(fn: Awaitable[Any]) -> Any:
    try:
        return await fn
    except QueryError as exc:
        raise HTTPException(exc.status, exc.message) from exc


def create_app(config: ServeConfig, forecaster: Any = None) -> FastAPI:
    """The FastAPI app (``forecaster``: an already loaded :class:`Forecaster`, else ``config.model_dir``)."""
    runtime = Runtime(config, forecaster)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await runtime.shutdown()

    app = FastAPI(title="Foresight query service", version="1", lifespan=lifespan,
                  description=(__doc__ or "").split("Safety")[0].strip(), default_response_class=SafeJSONResponse)
    app.state.runtime = runtime
    app.add_middleware(GuardMiddleware, runtime=runtime)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        # where and why only: the posted input is not echoed (it can be a whole timeline)
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": e.get("type")}
                  for e in exc.errors()]
        return SafeJSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and the router's 404/405
    async def http_error(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_card(key: Researcher) -> dict[str, Any]:
        return runtime.model_card()

    @app.post("/v1/next-events", response_model=NextEventsResponse)
    async def next_events(q: NextEventsRequest, request: Request, key: Researcher) -> Any:
        await _note(request, key, q)
        top_k = min(q.top_k, config.max_top_k)
        return await _answer(runtime.batcher.submit(_NextJob(q, top_k)))

    @app.post("/v1/risk", response_model=RiskResponse)
    async def risk(q: RiskRequest, request: Request, key: Researcher) -> Any:
        await _note(request, key, q)
        return await _answer(runtime.run(runtime.risk, q))

    @app.post("/v1/explain", response_model=ExplainResponse)
    async def explain(q: ExplainRequest, request: Request, key: Researcher) -> Any:
        await _note(request, key, q)
        return await _answer(runtime.run(runtime.explain, q))

    @app.post("/v1/cohort-rate", response_model=CohortRateResponse)
    async def cohort_rate(q: CohortRateRequest, key: Researcher) -> Any:
        return await _answer(runtime.run(runtime.cohort_rate, q, key))

    return app


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the service under uvicorn until interrupted (put TLS in front of it: a reverse proxy)."""
    import uvicorn

    app = create_app(config)
    # uvicorn's access log is off: the audit log is the record of requests, and it holds no query strings
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


__all__ = [
    "ApiKey", "AuditLog", "KeyStore", "MicroBatcher", "RateLimiter", "ServeConfig", "SuppressionRule",
    "create_app", "generate_key", "revoke_key", "serve", "suppress_count", "verify_audit_log",
]
