"""When a Prefect task may retry: only after a transient I/O failure, never after bad data, a missing input or a bug."""

from __future__ import annotations

from typing import Any

import duckdb


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` for every flow: retry an OSError (a network share hiccup) or a DuckDB I/O error (a
    load holding the warehouse's lock), but not a missing file (retrying cannot make it appear) or anything else."""
    try:
        state.result()
    except FileNotFoundError:
        return False
    except (OSError, duckdb.IOException):
        return True
    except Exception:
        return False
    return False
