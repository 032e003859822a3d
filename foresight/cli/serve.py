"""``serve`` (the HTTP query service), its key management (``serve keygen``, ``serve revoke``) and the audit
log's check (``serve verify-log``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from foresight import serve as service
from foresight.cli.app import ExcludeOption, JsonOption, KeysOption, emit, err, fail, opt_out_list


def serve(
    ctx: typer.Context,
    model: Annotated[Path | None, typer.Option("--model", help="Trained model directory.")] = None,
    db: Annotated[Path | None, typer.Option("--db", help="Warehouse for subject lookups and cohort rates.")] = None,
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    host: Annotated[str, typer.Option(help="Interface to bind (put a TLS proxy in front for remote users).")]
    = "127.0.0.1",
    keys: KeysOption = Path("foresight-keys.json"),
    audit_log: Annotated[Path, typer.Option(help="Append-only JSON-lines audit log.")] = Path("foresight-audit.jsonl"),
    audit_key: Annotated[Path | None, typer.Option(
        help="HMAC key of the audit chain (default: <audit-log>.key, created with mode 0600 for a new log). Keep "
             "it where those who can write the log cannot read it.")] = None,
    audit_new_segment: Annotated[bool, typer.Option(
        "--audit-new-segment", help="If the audit log fails verification, move it aside (<log>.broken-<time>) "
                                    "and start a new one, instead of refusing to start.")] = False,
    max_batch: Annotated[int, typer.Option(min=1, help="Next-event requests per forward pass (1: unbatched).")] = 32,
    batch_wait_ms: Annotated[float, typer.Option(min=0, help="When others are queued, how long to wait for the rest "
                                                         "of a burst (0 measured best on CPU-only hosts).")] = 5.0,
    max_events: Annotated[int, typer.Option(min=1, help="Posted events per timeline.")] = 2000,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Request body limit.")] = 1_048_576,
    small_cell_threshold: Annotated[int, typer.Option(min=1, help="Aggregate counts below this show as '<N'.")] = 8,
    rounding: Annotated[int, typer.Option(min=1, help="Other aggregate counts are rounded to this.")] = 5,
    exclude_subjects: ExcludeOption = None,
    similar_index: Annotated[Path | None, typer.Option(
        "--similar-index", help="Folder from `foresight embed` (same model): enables POST /v1/similar.")] = None,
) -> None:
    """Serve next events, risks, explanations and suppressed cohort rates over HTTP (API keys, audit log).

    With --exclude-subjects, listed subjects are never served: a lookup answers as for an unknown id (404) and
    cohort rates leave them out. The file is re-read when it changes.
    """
    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        fail("--model is required (or use a subcommand: keygen, revoke)")
    if not keys.exists():
        fail(f"{keys}: no keys file; create a key with `foresight serve keygen --keys {keys} --role researcher`")
    if db is not None and not db.exists():
        fail(f"{db}: warehouse not found")
    opt_out_list(exclude_subjects)  # a bad list stops the server here, with the file and line named
    try:
        cfg = service.ServeConfig(model_dir=model, keys_file=keys, audit_log=audit_log, db=db,
                                  audit_key_file=audit_key, audit_new_segment=audit_new_segment,
                                  exclude_subjects_file=exclude_subjects, max_events=max_events,
                                  max_body_bytes=max_body_bytes, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                                  suppression=service.SuppressionRule(small_cell_threshold, rounding),
                                  similar_index=similar_index)
        err.print(f"serving {model} on http://{host}:{port} (docs at /docs); audit log {audit_log}")
        service.serve(cfg, host=host, port=port)
    except service.AuditChainError as exc:
        fail(f"the audit log fails verification, not starting: {exc}\n(keep the evidence; to start a new log "
             "and move this one aside, add --audit-new-segment)")
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))


def verify_log(
    audit_log: Annotated[Path, typer.Option("--audit-log", help="The audit log to check.")],
    key_file: Annotated[Path | None, typer.Option("--key-file", help="Its HMAC key (default: <audit-log>.key).")]
    = None,
    as_json: JsonOption = False,
) -> None:
    """Check an audit log: its keyed chain (edits, deletions, insertions) and its head (removed last lines).

    Exit 0: intact; 1: broken (the first bad line is named); 2: the log or key cannot be read.
    """
    if not audit_log.exists() and not service.audit_head_file(audit_log).exists():
        fail(f"{audit_log}: no such audit log")
    try:
        state = service.check_audit_log(audit_log, service.load_audit_key(audit_log, key_file))
    except service.AuditChainError as exc:
        emit({"audit_log": str(audit_log), "ok": False, "error": str(exc)}, as_json)
        if not as_json:
            err.print(f"BROKEN: {exc}", markup=False)
        raise typer.Exit(1) from None
    except (OSError, ValueError) as exc:
        fail(str(exc))
    summary = state.summary()
    human = (f"OK: {state.records} records ({state.keyed} keyed, {state.unkeyed} unkeyed), head vouches for "
             f"{state.head_lines if state.head_lines is not None else 'nothing (no head)'}")
    emit(summary, as_json, "\n".join([human, *(f"warning: {w}" for w in state.warnings)]))


def keygen(
    keys: KeysOption,
    role: Annotated[str, typer.Option(help="researcher (posted timelines, aggregates) or analyst (also subject "
                                           "lookups).")] = "researcher",
    rate_per_minute: Annotated[float, typer.Option(help="Sustained requests per minute.")] = 60.0,
    burst: Annotated[int, typer.Option(help="Requests allowed at once.")] = 20,
    label: Annotated[str, typer.Option(help="Who or what the key is for.")] = "",
    splits: Annotated[str | None, typer.Option(
        help="Comma-separated subject splits the key may look up (e.g. held_out); default: all.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Create an API key: printed ONCE here; the keys file keeps only its SHA-256."""
    scope = None if splits is None else [x.strip() for x in splits.split(",") if x.strip()]
    try:
        key, record = service.generate_key(keys, role, rate_per_minute=rate_per_minute, burst=burst, label=label,
                                           splits=scope)
    except ValueError as exc:
        fail(str(exc))
    payload = {"key": key, "key_id": record.key_id, "role": record.role, "rate_per_minute": record.rate_per_minute,
               "burst": record.burst, "splits": list(record.splits) if record.splits else None, "keys_file": str(keys)}
    if as_json:
        emit(payload, True)
    else:
        sys.stdout.write(key + "\n")
        scoped = f", splits {','.join(record.splits)} only" if record.splits else ""
        err.print(f"key {record.key_id} ({record.role}{scoped}) added to {keys}; store the key now, it is not kept")


def revoke(
    keys: KeysOption,
    key_id: Annotated[str, typer.Option("--key-id", help="The key id (the part after fsk_).")],
    as_json: JsonOption = False,
) -> None:
    """Remove a key from the keys file (a running server stops accepting it at once)."""
    try:
        removed = service.revoke_key(keys, key_id)
    except (OSError, ValueError) as exc:
        fail(f"{keys}: {exc}")
    if not removed:
        fail(f"{keys}: no key with id {key_id}")
    emit({"revoked": key_id, "keys_file": str(keys)}, as_json, f"revoked {key_id}")
