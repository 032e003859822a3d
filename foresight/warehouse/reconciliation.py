"""Checking a published load against the warehouse itself: nothing read may be silently lost."""

from __future__ import annotations

import duckdb

from foresight.warehouse.results import ReconciliationError


def reconcile(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, int]:
    """Check a published run against the warehouse itself; raise ``ReconciliationError`` on any mismatch.

    Checks: read = loaded + quarantined + dropped (run and every table), the events and quarantine rows
    in the warehouse for this run equal the recorded counts, and every event subject has a split.
    """
    run = con.execute(
        "SELECT rows_read, rows_loaded, rows_quarantined, rows_dropped, events_loaded FROM etl_runs WHERE run_id = ?",
        [run_id],
    ).fetchall()
    if not run:
        raise ReconciliationError(f"no etl_runs row for {run_id}")
    read, loaded, quarantined, dropped, events = run[0]
    problems = []
    if read != loaded + quarantined + dropped:
        problems.append(f"run: read {read} != loaded {loaded} + quarantined {quarantined} + dropped {dropped}")
    for t, r, lo, q, d in con.execute(
        "SELECT source_table, rows_read, rows_loaded, rows_quarantined, rows_dropped FROM etl_tables WHERE run_id = ?",
        [run_id],
    ).fetchall():
        if r != lo + q + d:
            problems.append(f"{t}: read {r} != loaded {lo} + quarantined {q} + dropped {d}")
    n_events = con.execute("SELECT count(*) FROM events WHERE load_id = ?", [run_id]).fetchall()[0][0]
    if n_events != events:
        problems.append(f"events in warehouse {n_events} != recorded {events}")
    n_q = con.execute("SELECT count(*) FROM quarantine WHERE run_id = ?", [run_id]).fetchall()[0][0]
    if n_q != quarantined:
        problems.append(f"quarantine rows {n_q} != recorded {quarantined}")
    no_split = con.execute(
        "SELECT count(DISTINCT subject_id) FROM events WHERE load_id = ? AND subject_id NOT IN "
        "(SELECT subject_id FROM subject_splits)",
        [run_id],
    ).fetchall()[0][0]
    if no_split:
        problems.append(f"{no_split} subjects without a split")
    if problems:
        raise ReconciliationError(f"run {run_id}: " + "; ".join(problems))
    return {"rows_read": read, "rows_loaded": loaded, "rows_quarantined": quarantined,
            "rows_dropped": dropped, "events": events}
