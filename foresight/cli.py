"""The ``foresight`` command. Every subcommand has ``--help``; those with ``--json`` print exactly one JSON
object as the last line of stdout (progress and tables go to stderr).

Heavy libraries are imported inside the commands so that ``foresight --help`` and quick commands start fast.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    name="foresight",
    help="Foresight: EHR -> MEDS events -> a generative model of patient timelines -> forecasts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
etl_app = typer.Typer(help="Load a source into the DuckDB event warehouse (MEDS events).", no_args_is_help=True)
export_app = typer.Typer(help="Export the warehouse to other formats.", no_args_is_help=True)
app.add_typer(etl_app, name="etl")
app.add_typer(export_app, name="export")

# soft_wrap: never break a path or an error message across lines (users copy them).
err = Console(stderr=True, soft_wrap=True)

DbOption = Annotated[Path, typer.Option("--db", help="Warehouse file (DuckDB); created if missing.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line of stdout.")]


def _emit(payload: dict[str, Any], as_json: bool, human: str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
    elif human:
        err.print(human)


def _fail(message: str, code: int = 2) -> None:
    from rich.text import Text

    err.print(Text.assemble(("error: ", "bold red"), message))  # Text: no markup parsing of paths/values
    raise typer.Exit(code)


@etl_app.command("mimic-iv")
def etl_mimic_iv(
    input: Annotated[Path, typer.Option("--input", help="MIMIC-IV root folder (with hosp/ and icu/).")],
    db: DbOption,
    source: Annotated[str, typer.Option(help="Name of this load; re-running with it replaces its rows.")] = "mimic-iv",
    as_json: JsonOption = False,
) -> None:
    """Load MIMIC-IV (full or demo) into the warehouse: leak-free times, quarantine, lineage."""
    import duckdb

    from foresight import warehouse
    from foresight.sources import mimic_iv

    t0 = time.perf_counter()
    try:
        con = warehouse.connect(db)
    except Exception as exc:  # a locked or corrupt file: say which
        _fail(f"{db}: cannot open warehouse: {exc}")
    try:
        with err.status("loading MIMIC-IV") as status:
            summary = mimic_iv.load(
                con, input, source=source, on_group_done=lambda g: status.update(f"staged {g} tables")
            )
    except warehouse.SourceError as exc:
        _fail(str(exc))
    except warehouse.ReconciliationError as exc:
        _fail(f"reconciliation failed: {exc}", code=3)
    except duckdb.Error as exc:
        _fail(f"DuckDB error while loading {input} (the warehouse was left unchanged): {exc}", code=4)
    finally:
        con.close()
    payload = summary.to_json()
    payload["seconds"] = round(time.perf_counter() - t0, 3)
    _emit(payload, as_json)
    if not as_json:
        _print_load_summary(payload)


def _print_load_summary(payload: dict[str, Any]) -> None:
    from rich.table import Table

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
    from rich.text import Text

    for w in payload["warnings"]:
        err.print(Text.assemble(("warning: ", "yellow"), w))
    if payload["missing_tables"]:
        err.print(f"[yellow]absent optional tables:[/] {', '.join(payload['missing_tables'])}")


@export_app.command("meds")
def export_meds(
    db: DbOption,
    out: Annotated[Path, typer.Option("--out", help="Output folder for the MEDS dataset.")],
    subjects_per_shard: Annotated[int, typer.Option(help="Subjects per data/*.parquet shard.")] = 10_000,
    as_json: JsonOption = False,
) -> None:
    """Write the warehouse as a MEDS v0.4 dataset (data/*.parquet + metadata/)."""
    from foresight import warehouse

    if not db.exists():
        _fail(f"{db}: warehouse not found")
    con = warehouse.connect(db, read_only=True)
    try:
        result = warehouse.export_meds(con, out, subjects_per_shard=subjects_per_shard)
    finally:
        con.close()
    _emit(result, as_json, f"wrote {result['events']:,} events for {result['subjects']:,} subjects to {out}")


@app.command()
def tokenize(
    db: Annotated[Path, typer.Option("--db", help="Warehouse file (DuckDB) to read.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for vocab.json and the token shards.")],
    min_subjects: Annotated[int, typer.Option(help="Privacy floor: train subjects a token must cover.")] = 10,
    dedup_window_minutes: Annotated[
        float, typer.Option(help="Drop repeats of the same code within this many minutes (0 keeps all).")] = 0.0,
    config: Annotated[Path | None, typer.Option(help="JSON file with any TokenizerConfig fields.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Fit the vocabulary on the train split and write packed token shards for train/tuning/held_out."""
    from rich.progress import Progress

    from foresight import tokenizer

    fields: dict[str, Any] = json.loads(config.read_text()) if config else {}
    fields.setdefault("min_subjects", min_subjects)
    fields.setdefault("dedup_window_minutes", dedup_window_minutes)
    try:
        cfg = tokenizer.TokenizerConfig.from_dict(fields)
    except TypeError as exc:
        _fail(f"{config}: {exc}")
    try:
        with Progress(console=err, transient=True) as progress:
            tasks: dict[str, Any] = {}

            def report(split: str, done: int, total: int) -> None:
                if split not in tasks:
                    tasks[split] = progress.add_task(f"encoding {split}", total=total)
                progress.update(tasks[split], completed=done)

            summary = tokenizer.tokenize(db, out, cfg, progress=report)
    except tokenizer.TokenizeError as exc:
        _fail(str(exc))
    _emit(summary, as_json, f"vocabulary of {summary['vocab_size']:,} tokens; tokens per split {summary['tokens']}; "
                            f"rare-code rules {summary['rare_mapping']}; written to {out}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its warehouse, model and reports.")] = Path(
        "work/demo"
    ),
) -> None:
    """Run the whole chain on the built-in simulator (not yet: prints what it will do)."""
    err.print(
        "[bold]foresight demo[/] is not built yet (issue #8). When it lands it will: simulate a cohort, load it "
        "into a DuckDB warehouse, tokenize, train a small model with DeepSpeed, evaluate it against baselines "
        f"and the simulator's true risks, run the privacy gate and forecast hospitalisation rates, in {workdir}.\n"
        "What works today: [cyan]foresight etl mimic-iv --input DIR --db FILE[/] and "
        "[cyan]foresight export meds --db FILE --out DIR[/]."
    )


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
