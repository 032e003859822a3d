"""The ``tokenize`` flow: warehouse -> vocabulary (train only) + packed token shards per split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from foresight import tokens


@task(retries=2, retry_delay_seconds=[2, 10])
def tokenize_task(db: Path, out: Path, min_subjects: int = 10, dedup_window_minutes: float = 0.0) -> dict[str, Any]:
    """Fit the vocabulary and write the shards; returns the tokenize summary (vocab size, tokens per split...)."""
    cfg = tokens.TokenizerConfig(min_subjects=min_subjects, dedup_window_minutes=dedup_window_minutes)
    return tokens.tokenize(db, out, cfg)


@flow(name="tokenize")
def tokenize(db: Path, out: Path, min_subjects: int = 10, dedup_window_minutes: float = 0.0) -> dict[str, Any]:
    """Tokenize the warehouse ``db`` into ``out``."""
    return tokenize_task(db, out, min_subjects, dedup_window_minutes)
