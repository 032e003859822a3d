"""The "forecast hospitalisation rates" flow: cohort as of a date -> weekly expected admissions with intervals.

Writes the forecast JSON and PNG next to each other and publishes them as Prefect artifacts, so analysts see
every Monday's run in the UI without access to the files: a table of the weekly figures, a markdown summary with
the plot embedded in it (a ``data:image/png;base64`` URI: Prefect's image artifact only links to a URL, and the
server and the workers need not share a disk), and the forecast JSON itself. Since issue 18 also: the forecast by
stratum (admission type, age band; every cell through the service's small-cell rule), the open-cohort inflow
(people not yet in the warehouse), the simulator oracle's line on the plot for simulated data (``oracle_dir``),
and, with ``backtest_origins``, a rolling-origin backtest summary against the time-series baselines.
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
from foresight.forecast.backtest import run_backtest, simulator_oracle
from foresight.forecast.cohorts import cohort_as_of
from foresight.forecast.counts import published
from foresight.pipeline import empty_cohort_message, latest_release, resolve_as_of


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=transient, cache_policy=NO_CACHE)
def forecast_rates(model: Path, db: Path, as_of: datetime, horizon_days: float, samples: int,
                   codes: tuple[str, ...], split: str | None, max_subjects: int | None, history_weeks: int,
                   seed: int, strata: tuple[str, ...] = ("type", "age"), open_cohort: bool = True,
                   oracle_dir: Path | None = None, weighted: bool = False) -> dict[str, Any]:
    """The cohort alive at ``as_of``, its observed weekly history, and its weekly forecast (by stratum; with the
    simulator oracle's expectation for the same people when ``oracle_dir`` is given)."""
    fc = Forecaster.from_pretrained(model)
    with warehouse.connect(db, read_only=True) as con:
        run = forecast_cohort(fc, con, as_of, horizon_days, samples=samples, codes=codes, split=split,
                              max_subjects=max_subjects, history_weeks=history_weeks, seed=seed, strata=strata,
                              open_cohort=open_cohort, weighted=weighted)
        if run.forecast is None:
            raise ValueError(empty_cohort_message(db, as_of, con, split=split))
        # the oracle's people: those forecast (a weighted subset stands for the whole cohort: all of it)
        people = cohort_as_of(con, as_of, split=split) if run.forecast.subjects_sampled else run.subject_ids
    result = run.forecast.to_json()
    if oracle_dir is not None:
        weeks = len(result["weeks"])
        inflow = (result["open_cohort"] or {}).get("inflow_per_week", 0.0)  # the same open-cohort term as the model
        result["oracle_expected"] = (simulator_oracle(oracle_dir, codes)(people, as_of, weeks) + inflow).tolist()
    return result


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=transient, cache_policy=NO_CACHE)
def backtest_summary(model: Path, db: Path, origins: int, horizon_weeks: int, samples: int,
                     codes: tuple[str, ...], split: str | None, max_subjects: int | None,
                     oracle_dir: Path | None) -> dict[str, Any]:
    """Rolling-origin backtest of the same forecast against the time-series baselines (and the oracle)."""
    fc = Forecaster.from_pretrained(model)
    with warehouse.connect(db, read_only=True) as con:
        res = run_backtest(fc, con, origins=origins, horizon_weeks=horizon_weeks, codes=codes, split=split,
                           samples=samples, max_subjects=max_subjects,
                           oracle=simulator_oracle(oracle_dir, codes) if oracle_dir else None)
    return res.to_json()


@flow(name="forecast hospitalisation rates")
def forecast(db: Path, model: Path | None = None, registry: Path | None = None,
             as_of: datetime | Literal["latest"] | None = None,
             horizon_days: float = 28, out_dir: Path = Path("work/forecast"), samples: int = 20,
             codes: tuple[str, ...] = ("ADMIT//*",), split: str | None = None, max_subjects: int | None = None,
             history_weeks: int = 52, seed: int = 0, strata: tuple[str, ...] = ("type", "age"),
             open_cohort: bool = True, oracle_dir: Path | None = None, backtest_origins: int = 0,
             backtest_weeks: int = 4, backtest_split: str | None = "held_out",
             weighted: bool = False) -> dict[str, Any]:
    """Forecast weekly ``codes`` events (admissions by default) for the cohort alive at ``as_of`` (default: today;
    ``"latest"``: the day after the warehouse's last event, for data whose dates are shifted, such as MIMIC-IV).

    ``model``: a model directory, or ``registry``: use the last model the privacy gate released there (the
    scheduled Monday run forecasts only with released models). ``strata``: the published strata (small cells
    suppressed). ``open_cohort``: add the inflow of people not yet in the warehouse. ``oracle_dir``: simulator
    output (simulated data): its expected counts on the plot. ``backtest_origins`` > 0: also a rolling-origin
    backtest (``backtest_weeks`` ahead, people of ``backtest_split``) published as a table. ``weighted``: with
    ``max_subjects``, a stratified subset weighted to stand for the whole cohort.
    """
    if model is None:
        if registry is None:
            raise ValueError("give a model directory or a registry of released models")
        model = latest_release(Path(registry))
        if model is None:
            raise ValueError(f"{registry} holds no released model yet: nothing passed the privacy gate")
    as_of = resolve_as_of(db, as_of) or datetime.combine(datetime.now().date(), datetime.min.time())
    result = forecast_rates(model, db, as_of, horizon_days, samples, tuple(codes), split, max_subjects,
                            history_weeks, seed, tuple(strata), open_cohort, oracle_dir, weighted)
    result["strata"] = published(result["strata"])  # what leaves the flow is published: small cells suppressed
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"forecast-{as_of:%Y%m%d}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    oracle_line = result.pop("oracle_expected", None)
    png = plot_population(PopulationForecast(**result), out_dir / f"{stem}.png", oracle=oracle_line)
    if oracle_line is not None:
        result["oracle_expected"] = oracle_line
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
    if result["strata"]:
        create_table_artifact(
            key="forecast-strata", table=[{"stratification": kind, "stratum": r["stratum"], "mean": r["mean"],
                                           "p05": r["p05"], "p25": r["p25"], "p75": r["p75"], "p95": r["p95"]}
                                          for kind, rows in result["strata"].items() for r in rows],
            description=f"Expected {', '.join(codes)} over {horizon_days:g} days by stratum (counts under 8 "
                        "suppressed, others rounded to 5)")
    if backtest_origins > 0:
        bt = backtest_summary(model, db, backtest_origins, backtest_weeks, samples, tuple(codes), backtest_split,
                              max_subjects, oracle_dir)
        create_table_artifact(
            key="forecast-backtest", table=[{"method": k, **{m: round(v, 3) for m, v in vals.items()}}
                                            for k, vals in bt["methods"].items()],
            description=f"Rolling-origin backtest: {len(bt['origins'])} origins x {backtest_weeks} weeks "
                        f"({', '.join(bt['origins'])})")
        result["backtest"] = bt
    result["json"], result["plot"] = str(out_dir / f"{stem}.json"), str(png)
    return result
