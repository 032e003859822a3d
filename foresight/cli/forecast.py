"""``foresight backtest``: the weekly forecast scored at rolling origins against time-series baselines and, on
simulated data, the simulator's oracle (:mod:`foresight.forecast.backtest`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from foresight import warehouse
from foresight.cli.app import JsonOption, emit, err, fail


def backtest(
    model: Annotated[Path, typer.Option("--model", help="Trained model directory.")],
    db: Annotated[Path, typer.Option("--db", help="Warehouse holding the catchment's history.")],
    origins: Annotated[int, typer.Option(help="Forecast origins, spread evenly over the warehouse's years "
                                              "(after two years of history).")] = 12,
    horizon_weeks: Annotated[int, typer.Option("--horizon-weeks", help="Weeks ahead at each origin.")] = 12,
    oracle: Annotated[Path | None, typer.Option(
        "--oracle", help="Simulator output folder (`foresight simulate`): adds the simulator's expected count "
                         "as the ceiling.")] = None,
    codes: Annotated[str, typer.Option(help="Events to count, comma-separated globs (the oracle knows "
                                            "ADMIT//* and ADMIT//EMERGENCY).")] = "ADMIT//EMERGENCY",
    split: Annotated[str, typer.Option(help="People to forecast (a model has seen its training subjects' "
                                            "futures: keep held_out); 'all' for everyone.")] = "held_out",
    samples: Annotated[int, typer.Option(help="Futures per subject at each origin.")] = 4,
    max_subjects: Annotated[int | None, typer.Option(help="Forecast a weighted stratified subset of this many "
                                                          "subjects standing for the cohort (for speed).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Write the JSON summary and per-week rows (CSV) here "
                                                  "(a folder).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Rolling-origin backtest: MAPE, MASE, 50/90% coverage and CRPS of the model and of seasonal naive, moving
    average, a quasi-Poisson GLM with season and trend, ETS and (with --oracle) the simulator's oracle."""
    import json

    from foresight.forecast import Forecaster
    from foresight.forecast.backtest import run_backtest, simulator_oracle

    patterns = tuple(c.strip() for c in codes.split(",") if c.strip())
    try:
        fc = Forecaster.from_pretrained(model)
        true = simulator_oracle(oracle, patterns) if oracle is not None else None
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    try:
        with warehouse.connect(db, read_only=True) as con, err.status("backtest") as spinner:
            result = run_backtest(fc, con, origins=origins, horizon_weeks=horizon_weeks, codes=patterns,
                                  split=None if split == "all" else split, samples=samples,
                                  max_subjects=max_subjects, seed=seed, oracle=true, status=spinner.update)
    except ValueError as exc:
        fail(f"{db}: {exc}")
    payload = result.to_json()
    if out is not None:
        import csv

        from foresight.atomic import write_text

        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "backtest.json", json.dumps(payload, indent=1))
        with open(out / "backtest_weeks.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(result.rows[0]) if result.rows else ["origin"])
            writer.writeheader()
            writer.writerows(result.rows)
        payload["out"] = str(out)
    lines = [f"{len(result.origins)} origins x {horizon_weeks} weeks of {', '.join(patterns)} "
             f"({result.seconds_per_forecast:.1f} CPU s per model forecast)"]
    for name, m in result.methods.items():
        lines.append(f"  {name:15s} MAPE {m['mape']:.3f}  MASE {m['mase']:.3f}  cov50 {m['coverage50']:.2f}  "
                     f"cov90 {m['coverage90']:.2f}  CRPS {m['crps']:.3f}")
    emit(payload, as_json, "\n".join(lines))
