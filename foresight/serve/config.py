"""The service's settings: where the model, keys, audit log and warehouse are, and the per-request limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from foresight.serve.security import SuppressionRule


@dataclass
class ServeConfig:
    """Everything the service needs; limits are per request."""

    model_dir: Path
    keys_file: Path
    audit_log: Path
    db: Path | None = None
    audit_key_file: Path | None = None  # the audit chain's HMAC key (default: <audit_log>.key, created if new)
    audit_new_segment: bool = False  # a log that fails verification is moved aside instead of refusing to start
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
    # cohort-rate cost = subjects x samples x horizon days ("future-days"), checked before any work: the default
    # request (200 x 20 x 28 days) fits; a year for 200 subjects x 20 samples (9 minutes on a CPU) does not
    max_cohort_cost: float = 224_000
    cohort_deadline_s: float = 120.0  # a cohort forecast still sampling after this is stopped (503)
    max_batch: int = 32  # next-event requests per forward pass (1 = unbatched)
    batch_wait_ms: float = 5.0
    suppression: SuppressionRule = field(default_factory=SuppressionRule)
    similar_index: Path | None = None  # folder written by `foresight embed`, for /v1/similar
    max_similar_k: int = 200  # neighbours per /v1/similar request
