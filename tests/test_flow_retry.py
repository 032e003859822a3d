"""One retry rule for every flow: transient I/O errors retry; missing inputs, bad data and bugs do not."""

from __future__ import annotations

import duckdb
import pytest

from flows.retry import transient


class _Failed:
    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc

    def result(self) -> None:
        if self.exc is not None:
            raise self.exc


@pytest.mark.parametrize(("exc", "retry"), [
    (OSError("stale NFS handle"), True),
    (duckdb.IOException("could not set lock on file"), True),
    (FileNotFoundError("no model at /models/x"), False),  # retrying cannot make it appear
    (ValueError("empty cohort"), False),
    (KeyError("bug"), False),
    (None, False),
])
def test_only_transient_io_errors_are_retried(exc, retry):
    assert transient(None, None, _Failed(exc)) is retry
