"""The researcher query service: next events, risks and explanations over HTTP, behind keys, limits and an audit.

``foresight serve --model MODEL_DIR [--db FILE] [--port P]`` runs :func:`create_app` under uvicorn. Every
answer comes from the same Python API the CLI uses (:class:`foresight.forecast.Forecaster`). The endpoints are
listed in :mod:`foresight.serve.app` (and served as OpenAPI at ``/docs`` and ``/openapi.json``).

What lives where
----------------
===============  ==============================================================================================
``security``     API keys (hashes only) and the keys file, roles, split scopes, token-bucket rate limits,
                 small-cell suppression
``audit_log``    the keyed (HMAC) audit chain, its head anchor and its verification
``batching``     micro-batching of concurrent next-event requests into one forward pass
``config``       :class:`ServeConfig`: paths and per-request limits
``schemas``      request and response models (validation happens here, before any work)
``runtime``      the model runtime: forecaster, warehouse lookups with the opt-out honoured, each endpoint's work
``app``          the FastAPI app: middleware (body limit, audit record), authentication, thin routes
===============  ==============================================================================================

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
  from a body. Opened for append only, fsynced per batch of records by a writer thread before the answer leaves,
  chained with HMAC-SHA256 under a server key and anchored by a head file (:mod:`foresight.serve.audit_log`;
  :func:`verify_audit_log`, ``foresight serve verify-log``), so edits, deletions and a cut tail show.
  If the log cannot be written the service refuses requests (503): no unaudited answers.
- **Small cells** (:func:`suppress_count`): every count in an aggregate output is shown as ``"<8"`` when it is
  0-7 and otherwise rounded to the nearest 5 (NHS / OpenSAFELY practice; both numbers configurable). A cohort
  smaller than the threshold gets no forecast at all; weeks are fixed calendar weeks; a cohort (or a history
  week) within 8 subjects (events) of one already released is refused (:mod:`foresight.serve.disclosure`).
- **Bounded cohort forecasts**: subjects x samples x horizon days is checked against ``max_cohort_cost`` before
  any work (422 with the cost and the limit); sampling runs on its own worker, one at a time (503 +
  ``Retry-After`` for a second), so next-events, risk and explain keep answering; it stops at its next step when
  ``cohort_deadline_s`` passes (503) or the client disconnects.
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

from typing import Any

from foresight.serve.audit_log import AuditChainError, AuditLog, check_audit_log, verify_audit_log
from foresight.serve.audit_log import head_file as audit_head_file
from foresight.serve.audit_log import load_key as load_audit_key
from foresight.serve.batching import MicroBatcher
from foresight.serve.config import ServeConfig
from foresight.serve.security import (
    ROLES,
    ApiKey,
    KeyStore,
    RateLimiter,
    SuppressionRule,
    generate_key,
    load_keys,
    revoke_key,
    suppress_count,
)

__all__ = [
    "ROLES", "ApiKey", "AuditChainError", "AuditLog", "KeyStore", "MicroBatcher", "RateLimiter", "Runtime",
    "ServeConfig", "SuppressionRule", "audit_head_file", "check_audit_log", "create_app", "generate_key",
    "load_audit_key", "load_keys", "revoke_key", "serve", "suppress_count", "verify_audit_log",
]

_APP_NAMES = ("Runtime", "create_app", "serve")


def __getattr__(name: str) -> Any:
    # The app and its runtime load the forecaster (torch): imported on first use, so `foresight serve keygen`,
    # `revoke` and `import foresight.serve` stay quick, as `import foresight` does for Forecaster.
    if name in _APP_NAMES:
        from foresight.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'foresight.serve' has no attribute {name!r}")
