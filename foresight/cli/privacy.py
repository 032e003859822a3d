"""The privacy gate: ``privacy audit``, ``privacy insert-canaries``, and ``release`` (only for a passed audit).

:mod:`privacy.audit` runs the model (torch): it is imported when ``privacy audit`` runs, so that
``foresight --help`` and the other commands do not pay for it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from foresight.cli.app import JsonOption, emit, err, fail, opt_out_list
from privacy.canaries import CanaryError, insert
from privacy.release import ReleaseRefused, ReviewApproval
from privacy.release import release as release_model
from privacy.signing import KeyFileError

SigningKeyOption = Annotated[Path | None, typer.Option(
    "--signing-key", help="Ed25519 private key file (`foresight keys init`).")]


def audit_summary(rep: dict[str, Any]) -> dict[str, Any]:
    """The headline of an audit report (the full report is in report.json): what ``privacy audit --json`` prints."""
    probes = rep["probes"]
    overall = next((r for r in probes["membership_inference"]["rows"] if r["slice"] == "all" and r.get("measured")),
                   None)
    extraction = [(row["k"], mode, row[mode]["exact_gap_points"]["value"]) for row in probes["extraction"]["by_k"]
                  for mode in ("greedy", "sampled") if mode in row]
    return {
        "decision": rep["decision"], "valid": rep["valid"], "reasons": rep["reasons"],
        "probes": {k: v["decision"] for k, v in rep["gate"]["probes"].items()},
        "model_checksum": rep["model"]["checksum"], "report": rep["written"], "signature": rep.get("signed") or None,
        "mia_auc": {a: f["auc"]["value"] for a, f in overall["attacks"].items()} if overall else None,
        "canaries": [{k: g[k] for k in ("repeats", "exposed", "canaries", "median_exposure_extrapolated")}
                     for g in probes["canaries"]["groups"]] if probes["canaries"] else None,
        "max_exact_extraction_gap_points": max((g for *_, g in extraction if g is not None), default=None),
        "seconds": rep["runtime_seconds"]["total"],
    }


def audit(
    model: Annotated[Path, typer.Option("--model", help="Trained model directory.")],
    data: Annotated[Path, typer.Option("--data", help="The tokenized data directory the model was trained on.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.json and report.html (also written to "
                                                    "MODEL/privacy/).")],
    config: Annotated[Path | None, typer.Option(help="TOML gate config merged over privacy/gate_defaults.toml.")]
    = None,
    reference: Annotated[Path | None, typer.Option(help="Reference model trained on disjoint subjects (reused).")]
    = None,
    train_reference: Annotated[bool, typer.Option("--train-reference", help="Train a reference model on the "
                                                  "tuning split with the target's settings.")] = False,
    db: Annotated[Path | None, typer.Option("--db", help="Warehouse still holding --forgotten subjects.")] = None,
    forgotten: Annotated[Path | None, typer.Option(help="Subjects file (opt-out list) to check as a forgotten set.")]
    = None,
    synthetic_samples: Annotated[int | None, typer.Option(help="Generated timelines for the DCR check (0: skip).")]
    = None,
    device: Annotated[str | None, typer.Option(help="Where the model runs, e.g. cuda (default: CPU).")] = None,
    signing_key: SigningKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Probe a model for memorised records (membership inference, canaries, extraction, vocabulary floor,
    synthetic-cohort distance) and decide PASS / REVIEW / FAIL per probe against the gate's thresholds.
    With --signing-key the report is signed (report.sig.json beside it), which `foresight release` requires."""
    from privacy.audit import AuditError
    from privacy.audit import audit as run_audit

    forgotten_ids = opt_out_list(forgotten)
    try:
        with err.status("auditing") as status, contextlib.redirect_stdout(sys.stderr):
            rep = run_audit(model, data, out, config=config, reference=reference, train_reference=train_reference,
                            db=db, forgotten=forgotten_ids, synthetic_samples=synthetic_samples,
                            progress=lambda m: status.update(m), device=device, signing_key=signing_key)
    except (AuditError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    summary = audit_summary(rep)
    human = f"[bold]{rep['decision']}[/] ({'valid' if rep['valid'] else 'validity: ' + str(rep['valid'])}) in " \
            f"{summary['seconds']:.1f}s; report {rep['written'][0]}"
    if not as_json:
        for reason in rep["reasons"]:
            err.print(Text(f"  {reason}"))
    emit(summary, as_json, human)


def insert_canaries(
    data: Annotated[Path, typer.Option("--data", help="Tokenized data directory (left untouched).")],
    out: Annotated[Path, typer.Option("--out", help="New data directory: a copy with canaries in its train split.")],
    repeats: Annotated[str, typer.Option(help="Repeat counts, comma separated.")] = "1,2,4,16",
    per_repeat: Annotated[int, typer.Option(min=1, help="Canaries per repeat count.")] = 5,
    length: Annotated[int, typer.Option(min=1, help="Random event codes per canary.")] = 20,
    references: Annotated[int, typer.Option(min=10, help="Never-inserted reference sequences.")] = 5000,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Write a copy of DATA whose train split holds canary subjects (Carlini's Secret Sharer), with canaries.json."""
    try:
        reps = tuple(int(r) for r in repeats.split(",") if r.strip())
        manifest = insert(data, out, repeats=reps, per_repeat=per_repeat, length=length, seed=seed,
                          n_references=references)
    except (CanaryError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    summary = {"out": str(out), "canaries": len(manifest["canaries"]), "canary_subjects": manifest["canary_subjects"],
               "repeats": manifest["repeats"], "references": len(manifest["references"])}
    emit(summary, as_json, f"{summary['canaries']} canaries ({summary['canary_subjects']} subjects, repeats "
                           f"{manifest['repeats']}) and {summary['references']} references -> {out}")


def release(
    model: Annotated[Path, typer.Option("--model", help="Model directory whose latest audit passed.")],
    registry: Annotated[Path, typer.Option("--registry", help="Release registry folder.")],
    name: Annotated[str | None, typer.Option(help="Release name (default: the model folder's name).")] = None,
    report: Annotated[Path | None, typer.Option(help="Audit report (default MODEL/privacy/report.json).")] = None,
    public_key: Annotated[Path | None, typer.Option(
        "--public-key", help="The public key the audit must be signed with (pinned in the registry by its first "
                             "signed release; default: the keys the registry pins).")] = None,
    signing_key: SigningKeyOption = None,
    allow_unsigned: Annotated[bool, typer.Option(
        "--allow-unsigned", help="Release on an unsigned audit report (recorded as unsigned; not for REVIEW).")]
    = False,
    approve_review: Annotated[bool, typer.Option(
        "--approve-review", help="Approve an audit that decided REVIEW (with --reviewer, --reason and "
                                 "--signing-key); a FAIL can never be approved.")] = False,
    reviewer: Annotated[str | None, typer.Option(help="Who approves the REVIEW (recorded and signed).")] = None,
    reason: Annotated[str | None, typer.Option(help="Why the REVIEW findings are acceptable.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Copy the model into the registry, atomically, only if its latest audit is for exactly this model, is signed
    by a trusted key and PASSED (or decided REVIEW and a reviewer approves it). Exit 3 when refused."""
    if (reviewer or reason) and not approve_review:
        fail("--reviewer and --reason go with --approve-review")
    if approve_review and not (reviewer and reason and signing_key):
        fail("--approve-review needs --reviewer NAME, --reason TEXT and --signing-key KEY (the approval is signed)")
    approval = ReviewApproval(reviewer or "", reason or "") if approve_review else None
    try:
        entry = release_model(model, registry, name=name, report_path=report, public_key=public_key,
                              signing_key=signing_key, allow_unsigned=allow_unsigned, approval=approval)
    except ReleaseRefused as exc:
        fail(f"release refused: {exc}", code=3)
    except (KeyFileError, OSError) as exc:  # a missing model file, a full disk: the registry is left as it was
        fail(f"release failed, nothing was released: {exc}")
    relaxed = entry.get("gate_overrides")
    approved = (entry.get("approval") or {}).get("payload")
    emit(entry, as_json, f"released {model} as {entry['path']}"
                         + (" (already released)" if entry.get("already_released") else "")
                         + (f"; REVIEW approved by {approved['reviewer']}" if approved else "")
                         + ("; UNSIGNED audit (--allow-unsigned)" if entry.get("audit_signature") is None else "")
                         + (f"; passed under thresholds changed from the defaults: {', '.join(relaxed)}"
                            if relaxed else ""))
