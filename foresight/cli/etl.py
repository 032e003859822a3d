"""``etl <kind>``: one command per source adapter of :data:`foresight.sources.SOURCES`, made by
:func:`etl_command` (typer reads each command's options from its signature, so every kind gets its own function;
``notes`` has options of its own).

No ``from __future__ import annotations`` here: the factory's option types close over its arguments, and typer
evaluates string annotations in the module's globals, where those names do not exist.
"""

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import duckdb
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from foresight import purposes, sources, warehouse
from foresight.cli.app import DbOption, ExcludeOption, JsonOption, emit, err, fail, opt_out_list
from foresight.cli.sharded import SchedulerOption, WorkersOption, run_sharded_etl
from foresight.sources import notes

# kind -> (help of --input, the command's help)
ETL_HELP: dict[str, tuple[str, str]] = {
    "mimic-iv": ("MIMIC-IV root folder (with hosp/ and icu/).",
                 "Load MIMIC-IV (full or demo) into the warehouse: leak-free times, quarantine, lineage."),
    "synthea": ("Synthea CSV export folder (csv/, or the export root).",
                "Load a Synthea CSV export (patients.csv required, other tables optional) into the warehouse."),
    "fhir": ("Folder of FHIR R4 Bundle files (*.json, *.json.gz).",
             "Load FHIR R4 bundles (one per patient) into the warehouse; DocumentReference text goes to `notes`."),
    "meds": ("MEDS dataset root (data/*.parquet, metadata/).",
             "Load an existing MEDS dataset into the warehouse, keeping its subject ids, codes and splits."),
    "notes": ("Notes: a CSV/parquet (subject_id, time, text), or a warehouse file whose `notes` table holds FHIR "
              "notes (usually the --db file itself, after `etl fhir`).",
              "Annotate free-text notes with MedCAT and load their concepts as NOTE//<VOCAB>//<CODE> events."),
}
SourceOption = Annotated[str, typer.Option(help="Name of this load; re-running with it replaces its rows.")]
DeclarationOption = Annotated[Path | None, typer.Option(
    "--declaration", help="Who provided the data and the purposes it may serve: a JSON or YAML file with provider, "
                          "purposes (list), optional controller and expires (ISO date). Without it the load is "
                          "usable only for purpose 'unspecified'.")]

ModelPackOption = Annotated[Path, typer.Option("--model-pack", help="MedCAT v2 model pack (folder or .zip), e.g. "
                                                                     "from `foresight concepts build`.")]
NProcessOption = Annotated[int, typer.Option(min=1, help="Annotation worker processes (1: in this process).")]
HistoryDaysOption = Annotated[float, typer.Option(min=0, help="'History of X' concepts are timed this many days "
                                                              "before the note (never before birth).")]
VocabOption = Annotated[str | None, typer.Option(help="Vocabulary of the pack's cuis in NOTE//<VOCAB>//<CUI> "
                                                      "(default: from the pack).")]


def etl_command(kind: str) -> Callable[..., None]:
    """The ``etl <kind>`` command: its options (``--input`` described for this kind, ``--source`` defaulting to it)
    and a body that calls :func:`run_etl`."""
    input_help, doc = ETL_HELP[kind]
    InputOption = Annotated[Path, typer.Option("--input", help=input_help)]

    if kind == "notes":
        def command(input: InputOption, db: DbOption, model_pack: ModelPackOption, source: SourceOption = kind,
                    n_process: NProcessOption = 1, history_days: HistoryDaysOption = 1.0, vocab: VocabOption = None,
                    exclude_subjects: ExcludeOption = None, declaration: DeclarationOption = None,
                    as_json: JsonOption = False) -> None:
            run_etl(kind, input, db, source, exclude_subjects, as_json, declaration=declaration,
                    model_pack=model_pack, n_process=n_process, history_days=history_days, vocab=vocab)
    else:
        def command(input: InputOption, db: DbOption, source: SourceOption = kind,
                    exclude_subjects: ExcludeOption = None, declaration: DeclarationOption = None,
                    workers: WorkersOption = None, scheduler: SchedulerOption = None,
                    as_json: JsonOption = False) -> None:
            run_etl(kind, input, db, source, exclude_subjects, as_json, declaration=declaration, workers=workers,
                    scheduler=scheduler)

    command.__doc__ = doc
    command.__name__ = command.__qualname__ = "etl_" + kind.replace("-", "_")
    return command


def run_etl(kind: str, input: Path, db: Path, source: str, exclude_subjects: Path | None, as_json: bool,
            declaration: Path | None = None, workers: int | None = None, scheduler: str | None = None,
            **options: Any) -> None:
    """Load ``input`` with the adapter ``kind`` into ``db`` (:func:`foresight.sources.load`) and report the load.

    ``declaration``: the data's declarations file (:mod:`foresight.purposes`), read before the warehouse is
    opened, so a malformed one loads nothing. ``workers``/``scheduler``: the sharded path on Dask instead
    (:mod:`foresight.cli.sharded`). Exit codes: 2 bad input (or declaration), 3 the load's accounting
    did not reconcile, 4 a DuckDB or I/O error such as a full disk (nothing was written)."""
    excluded = opt_out_list(exclude_subjects)
    decl = read_declaration(declaration)
    if workers is not None or scheduler is not None:  # the sharded path on Dask (foresight.cli.sharded)
        return run_sharded_etl(kind, input, db, source, exclude_subjects, declaration, decl, as_json,
                               workers=workers, scheduler=scheduler, report=print_load_summary)
    t0 = time.perf_counter()
    try:
        con = warehouse.connect(db)
    except Exception as exc:  # a locked or corrupt file: say which
        fail(f"{db}: cannot open warehouse: {exc}")
    with con:
        try:
            with load_progress(kind) as callbacks:
                summary = sources.load(kind, con, input, source=source, exclude_subjects=excluded,
                                       declaration=decl, **callbacks, **options)
            mentions = notes.mention_counts(con) if kind == "notes" else None
        except warehouse.SourceError as exc:
            fail(str(exc))
        except warehouse.ReconciliationError as exc:
            fail(f"reconciliation failed: {exc}", code=3)
        except duckdb.Error as exc:
            fail(f"DuckDB error while loading {input} (the warehouse was left unchanged): {exc}", code=4)
        except OSError as exc:  # e.g. no space left for a temporary file: the cause, not a traceback
            fail(f"I/O error while loading {input} (the warehouse was left unchanged): {exc}", code=4)
    payload = summary.to_json()
    payload["seconds"] = round(time.perf_counter() - t0, 3)
    if mentions is not None:
        payload["mentions_by_status"] = mentions
    payload["declaration"] = (decl or purposes.UNDECLARED).to_json()
    emit(payload, as_json)
    if not as_json:
        print_load_summary(payload)
        if mentions is not None:
            err.print("concept mentions by context: " + ", ".join(f"{k} {v:,}" for k, v in mentions.items()))


def read_declaration(path: Path | None) -> purposes.Declaration | None:
    """The ``--declaration`` file (None without one); a malformed file is one error line naming file and field.
    A declaration that has already expired is loaded with a warning: the load then serves no purpose."""
    if path is None:
        return None
    try:
        decl = purposes.read_declaration(path)
    except purposes.DeclarationError as exc:
        fail(str(exc))
    if decl.expires is not None and decl.expires < date.today():
        err.print(Text.assemble(("warning: ", "yellow"), f"{path}: the declaration expired on {decl.expires}: "
                                "this load will cover no purpose"))
    return decl


@contextlib.contextmanager
def load_progress(kind: str) -> Iterator[dict[str, Callable[..., None]]]:
    """Progress on stderr while a load runs; yields the callback :func:`foresight.sources.load` reports to (a bar
    over the notes being annotated, else a spinner naming the table group staged last)."""
    if kind == "notes":
        with Progress(TextColumn("annotating notes"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, transient=True) as progress:
            task = progress.add_task("notes", total=None)
            yield {"progress": lambda done, total: progress.update(task, completed=done, total=total)}
    else:
        with err.status(f"loading {kind}") as status:
            yield {"on_group_done": lambda g: status.update(f"staged {g} tables")}


def print_load_summary(payload: dict[str, Any]) -> None:
    """A load's table of rows read / loaded / quarantined / dropped per table, its totals and warnings (stderr)."""
    table = Table(title=f"{payload['source']} -> {payload['db']}")
    for col in ("table", "rows read", "loaded", "quarantined", "dropped", "events"):
        table.add_column(col, justify="right" if col != "table" else "left")
    for name, t in payload["tables"].items():
        table.add_row(name, *(f"{t[k]:,}" for k in
                              ("rows_read", "rows_loaded", "rows_quarantined", "rows_dropped", "events")))
    err.print(table)
    err.print(
        f"{payload['subjects']:,} subjects, {payload['events']:,} events in {payload['seconds']:.2f}s; "
        f"quarantined {payload['rows_quarantined']:,}, dropped {payload['rows_dropped']:,} (reasons in etl_runs)"
    )
    if payload.get("notes"):
        err.print(f"{payload['notes']:,} notes (free text) in the warehouse table `notes`")
    for w in payload["warnings"]:
        err.print(Text.assemble(("warning: ", "yellow"), w))
    if payload["missing_tables"]:
        err.print(f"[yellow]absent optional tables:[/] {', '.join(payload['missing_tables'])}")
