"""The "forecast hospitalisation rates" flow: cohort as of a date -> weekly expected admissions with intervals.

Writes the forecast JSON and PNG next to each other and publishes them as Prefect artifacts, so analysts see
every Monday's run in the UI without access to the files: a table of the weekly figures, a markdown summary with
the plot embedded in it (a ``data:image/png;base64`` URI: Prefect's image artifact only links to a URL, and the
server and the workers need not share a disk), and the forecast JSON itself.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.retry import transient
from foresight import warehouse
from foresight.forecast import Forecaster, PopulationForecast, forecast_cohort, plot_population
from foresight.pipeline import empty_cohort_message, latest_release, resolve_as_of


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=transient, cache_policy=NO_CACHE)
def forecast_rates(model: Path, db: Path, as_of: datetime, horizon_days: float, samples: int,
                   codes: tuple[str, ...], split: str | None, max_subjects: int | None, history_weeks: int,
                   seed: int) -> dict[str, Any]:
    """The cohort alive at ``as_of``, its observed weekly history, and its sampled weekly counts."""
    fc = Forecaster.from_pretrained(model)
    with warehouse.connect(db, read_only=True) as con:
        run = forecast_cohort(fc, con, as_of, horizon_days, samples=samples, codes=codes, split=split,
                              max_subjects=max_subjects, history_weeks=history_weeks, seed=seed)
        if run.forecast is None:
            raise ValueError(empty_cohort_message(db, as_of, con, split=split))
    return run.forecast.to_json()


@flow(name="forecast hospitalisation rates")
def forecast(db: Path, model: Path | None = None, registry: Path | None = None,
             as_of: datetime | Literal["latest"] | None = None,
             horizon_days: float = 28, out_dir: Path = Path("work/forecast"), samples: int = 20,
             codes: tuple[str, ...] = ("ADMIT//*",), split: str | None = None, max_subjects: int | None = None,
             history_weeks: int = 52, seed: int = 0) -> dict[str, Any]:
    """Forecast weekly ``codes`` events (admissions by default) for the cohort alive at ``as_of`` (default: today;
    ``"latest"``: the day after the warehouse's last event, for data whose dates are shifted, such as MIMIC-IV).

    ``model``: a model directory, or ``registry``: use the last model the privacy gate released there (the
    scheduled Monday run forecasts only with released models).
    """
    if model is None:
        if registry is None:
            raise ValueError("give a model directory or a registry of released models")
        model = latest_release(Path(registry))
        if model is None:
            raise ValueError(f"{registry} holds no released model yet: nothing passed the privacy gate")
    as_of = resolve_as_of(db, as_of) or datetime.combine(datetime.now().date(), datetime.min.time())
    result = forecast_rates(model, db, as_of, horizon_days, samples, tuple(codes), split, max_subjects,
                            history_weeks, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"forecast-{as_of:%Y%m%d}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    png = plot_population(PopulationForecast(**result), out_dir / f"{stem}.png")
    create_table_artifact(key="weekly-forecast", table=result["weeks"],
                          description=f"Expected {', '.join(codes)} per week from {as_of:%Y-%m-%d}")
    total = sum(w["mean"] for w in result["weeks"])
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    create_markdown_artifact(
        key="forecast-summary",
        markdown=f"**{total:.1f}** expected {', '.join(codes)} events for **{result['cohort_size']:,}** subjects "
                 f"over {horizon_days:g} days from {as_of:%Y-%m-%d}.\n\n"
                 f"![Weekly forecast with 50% and 90% intervals](data:image/png;base64,{image})\n\n"
                 f"JSON: `{out_dir / (stem + '.json')}`  \nPlot: `{png}`",
        description=f"Forecast from {as_of:%Y-%m-%d} with its plot",
    )
    create_markdown_artifact(key="forecast-json", markdown=f"```json\n{json.dumps(result, indent=1)}\n```",
                             description=f"The forecast JSON ({stem}.json)")
    result["json"], result["plot"] = str(out_dir / f"{stem}.json"), str(png)
    return result
