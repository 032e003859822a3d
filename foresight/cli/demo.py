"""``foresight demo``: the whole chain on the built-in simulator (:mod:`foresight.demo`).

:mod:`foresight.demo` runs the Prefect flow (Prefect, torch): it is imported when the command runs, so that
``foresight --help`` and the other commands do not pay for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from foresight.cli.app import JsonOption, emit, err


def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its warehouse, model and reports.")] = Path(
        "work/demo"),
    subjects: Annotated[int, typer.Option(help="Simulated cohort size (foresight.demo.DEMO_SUBJECTS).")] = 10_000,
    seed: Annotated[int, typer.Option(help="Simulation seed.")] = 1,
    as_json: JsonOption = False,
) -> None:
    """The whole chain on the built-in simulator: simulate -> ETL -> tokenize -> train -> evaluate -> privacy
    gate -> release -> forecast, as the Prefect `pipeline` flow; prints where everything is and the headline
    numbers. A second run reuses the cached steps."""
    from foresight.demo import artifacts, headline, run_demo

    result = run_demo(workdir, subjects=subjects, seed=seed, console=err)
    if as_json:
        emit(result, True)
        return
    where = Table(title="Foresight demo: artifacts", show_header=False)
    for k, v in artifacts(result):
        where.add_row(k, v)
    err.print(where)
    numbers = Table(title="Headline numbers", show_header=False)
    for k, v in headline(result):
        numbers.add_row(k, v)
    err.print(numbers)
    t = result["timings"]
    err.print("seconds per stage: " + ", ".join(f"{k} {v}" for k, v in t.items() if v is not None))
