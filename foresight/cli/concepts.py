"""``concepts build`` and ``concepts annotate``: MedCAT concept packs, built offline and tried on text."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from foresight.cli.app import JsonOption, emit, err, fail
from foresight.concepts import PackError, annotate_note, build_pack, load_pack


def build(
    dictionary: Annotated[list[Path], typer.Option("--dictionary", help="Concept dictionary, repeatable: MedCAT "
                                                   "concept CSV (cui,name[,ontologies,name_status,type_ids,"
                                                   "description]), ICD-10-CM order CSV, MIMIC d_icd_*, or a "
                                                   "Synthea table (conditions.csv, ...).")],
    out: Annotated[Path, typer.Option("--out", help="Model pack to write (a folder, or a .zip); what "
                                                    "`etl notes --model-pack` takes.")],
    train_on: Annotated[Path | None, typer.Option("--train-on", help="Notes for unsupervised context training: "
                                                  "CSV/parquet with a text column, a warehouse with notes, or "
                                                  ".txt (one document per line).")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training notes.")] = 1,
    max_train_notes: Annotated[int | None, typer.Option(min=1, help="Train on at most this many notes.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Build a MedCAT v2 model pack offline from code dictionaries (and train it on your own notes)."""
    try:
        with Progress(TextColumn("building the concept database; then training on notes"), BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True) as progress:
            task = progress.add_task("build", total=None)
            summary = build_pack(dictionary, out, train_on=train_on, epochs=epochs, max_train_notes=max_train_notes,
                                 progress=lambda done, total: progress.update(task, completed=done, total=total))
    except PackError as exc:
        fail(str(exc))
    emit(asdict(summary), as_json,
         f"{summary.concepts:,} concepts, {summary.names:,} names ({', '.join(summary.ontologies) or 'mixed'}); "
         f"trained on {summary.training_notes:,} notes ({summary.trained_concepts:,} concepts seen); "
         f"pack written to {summary.pack} in {summary.seconds:.1f}s")


def annotate(
    model_pack: Annotated[Path, typer.Option("--model-pack", help="MedCAT v2 model pack (folder or .zip).")],
    text: Annotated[str, typer.Option("--text", help="Text to annotate.")],
    vocab: Annotated[str | None, typer.Option(help="Vocabulary for the codes (default: from the pack).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show the concepts MedCAT finds in a text, their codes and their context (negated, historical, ...)."""
    try:
        cat = load_pack(model_pack)
    except PackError as exc:
        fail(str(exc))
    mentions = annotate_note(cat, "text", text, vocab=vocab)
    rows = [{**{k: v for k, v in asdict(m).items() if k not in ("note_id", "context")},
             "context": sorted(m.context), "status": m.status, "event": m.affirmed} for m in mentions]
    emit({"mentions": rows}, as_json)
    if not as_json:
        table = Table(title=f"{len(rows)} concept mention(s)")
        for col in ("text", "code", "name", "status", "event"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["text"], r["code"], r["name"], r["status"], "yes" if r["event"] else "no")
        err.print(table)
