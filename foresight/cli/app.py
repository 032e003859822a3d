"""The ``foresight`` typer app, its command groups, and what every command shares: the stderr console, the common
options, and the helpers that print the one JSON line (:func:`emit`) or fail with a clear message (:func:`fail`).

The command modules (etl, data, model, serve, privacy, concepts, demo) register their commands on these apps;
:mod:`foresight.cli` imports them all.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from foresight.optout import OptOutError, read_subjects_file

app = typer.Typer(
    name="foresight",
    help="Foresight: EHR -> MEDS events -> a generative model of patient timelines -> forecasts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# groups, in the order `foresight --help` lists them (after the plain commands)
etl_app = typer.Typer(help="Load a source into the DuckDB event warehouse (MEDS events).", no_args_is_help=True)
export_app = typer.Typer(help="Export the warehouse to other formats.", no_args_is_help=True)
serve_app = typer.Typer(
    help="The researcher query service (HTTP): run it, manage its API keys (keygen, revoke), check its audit "
         "log (verify-log).",
    invoke_without_command=True,
)
concepts_app = typer.Typer(help="MedCAT concept packs: build one from code dictionaries, try it on text.",
                           no_args_is_help=True)
privacy_app = typer.Typer(help="The privacy gate: audit a model for memorised records; plant canaries.",
                          no_args_is_help=True)
app.add_typer(etl_app, name="etl")
app.add_typer(export_app, name="export")
app.add_typer(serve_app, name="serve")
app.add_typer(concepts_app, name="concepts")
app.add_typer(privacy_app, name="privacy")

# soft_wrap: never break a path or an error message across lines (users copy them).
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def root_options(memory: Annotated[str | None, typer.Option(
        "--memory", help="Memory budget of every stage's DuckDB (e.g. 1.5GB, 512MB, 50%); beyond it DuckDB spills "
                         "to disk. Default: $FORESIGHT_MEMORY, else 1 GB per core, at most half the free RAM.")]
                 = None) -> None:
    """Options every command shares (given before the command: ``foresight --memory 1.5GB etl ...``)."""
    if memory is not None:
        from foresight.warehouse.connection import MEMORY_ENV, MemoryBudgetError, parse_memory

        try:
            parse_memory(memory, what="--memory")
        except MemoryBudgetError as exc:
            fail(str(exc))
        os.environ[MEMORY_ENV] = memory  # warehouse.connect reads it, here and in child processes

DbOption = Annotated[Path, typer.Option("--db", help="Warehouse file (DuckDB); created if missing.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line of stdout.")]
ExcludeOption = Annotated[Path | None, typer.Option(
    "--exclude-subjects", help="National data opt-out: a file of patient ids (one per line; integer subject ids "
                               "or Synthea/FHIR patient UUIDs) whose records are dropped.")]
KeysOption = Annotated[Path, typer.Option("--keys", help="API keys file (JSON; only hashes are stored).")]


def emit(payload: dict[str, Any], as_json: bool, human: str | None = None) -> None:
    """With ``--json``, ``payload`` as one JSON line on stdout; else the ``human`` summary (if any) on stderr."""
    if as_json:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
    elif human:
        err.print(human)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad input; commands document the others)."""
    err.print(Text.assemble(("error: ", "bold red"), message))  # Text: no markup parsing of paths/values
    raise typer.Exit(code)


def opt_out_list(path: Path | None) -> set[int] | None:
    """The subject ids of an ``--exclude-subjects`` file (None without one); a bad file is a clear error."""
    if path is None:
        return None
    try:
        return read_subjects_file(path)
    except OptOutError as exc:
        fail(str(exc))


def parse_time(value: str | None, what: str) -> Any:
    """An ISO date or date-time option (None stays None); anything else fails naming the option ``what``."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        fail(f"{what}: {value!r} is not an ISO date or date-time (e.g. 2025-06-30 or 2025-06-30T12:00)")
