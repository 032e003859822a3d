"""Model commands: ``train``, ``predict``, ``forecast`` and ``evaluate``.

:mod:`foresight.forecast`, :mod:`foresight.evaluate` and :mod:`foresight.model` import torch (about a second):
they are imported when one of these commands runs, so that ``foresight --help`` and the commands that never touch
a model do not pay for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from foresight import warehouse
from foresight.cli.app import JsonOption, emit, err, fail, parse_time

if TYPE_CHECKING:
    from foresight.train import TrainConfig


def train(
    data: Annotated[Path, typer.Option("--data", help="Token folder written by `foresight tokenize`.")],
    out: Annotated[Path, typer.Option("--out", help="Model folder (HF model, foresight.json, checkpoints/).")],
    preset: Annotated[str | None, typer.Option(help="Model size: tiny | small | base | large.")] = None,
    deepspeed_config: Annotated[Path | None, typer.Option(
        "--deepspeed-config", help="DeepSpeed JSON (deploy/deepspeed/*.json); default: fp32 stage 0 on CPU, "
                                   "bf16 stage 1 on GPU.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimiser steps (the cosine schedule ends here).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/latest if any.")] = False,
    config: Annotated[Path | None, typer.Option(help="JSON file with any TrainConfig fields.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per packed row.")] = None,
    micro_batch: Annotated[int | None, typer.Option(help="Rows per rank per micro-step.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-steps per optimiser step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between tuning evaluations (0: at the end).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between checkpoints (0: at the end).")] = None,
    time_head: Annotated[bool | None, typer.Option(
        "--time-head/--no-time-head", help="Train the time-to-next-event loss too.")] = None,
    end_censoring: Annotated[bool | None, typer.Option(
        "--end-censoring/--no-end-censoring", help="Score the position before [END] as censored at the extract's "
                                                   "end (default) or [END] as an ordinary token.")] = None,
    history_block: Annotated[int | None, typer.Option(
        help="Pieces that continue a cut timeline start with up to this many distinct codes of --history-kinds "
             "recorded before the cut (0: none).")] = None,
    history_kinds: Annotated[str | None, typer.Option(help="Code kinds of the history block, e.g. DX,PX.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of initialisation and data order.")] = None,
    stop_at_step: Annotated[int | None, typer.Option(
        help="Checkpoint at this step and stop (resume later with --resume).")] = None,
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", help="Fine-tune: start from this trained model's weights (same --preset; DATA must be in "
                            "its vocabulary).")] = None,
    local_rank: Annotated[int, typer.Option("--local_rank", "--local-rank", hidden=True,
                                            help="Set by the deepspeed launcher; read from LOCAL_RANK.")] = -1,
    as_json: JsonOption = False,
) -> None:
    """Train the Llama-style timeline model with DeepSpeed (CPU or GPUs, the same command); resumable."""
    from foresight import train as T

    given = {"preset": preset, "max_steps": max_steps, "seq_len": seq_len, "micro_batch": micro_batch,
             "grad_accum": grad_accum, "lr": lr, "eval_every": eval_every, "checkpoint_every": checkpoint_every,
             "time_head": time_head, "end_as_censoring": end_censoring, "seed": seed, "stop_at_step": stop_at_step,
             "init_from": str(init_from) if init_from is not None else None, "history_block": history_block,
             "history_kinds": history_kinds}
    cfg = train_config(config, given)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    T.logger.addHandler(handler)
    T.logger.setLevel(logging.INFO)
    try:
        # DeepSpeed prints banners to stdout; keep stdout for the one JSON line (its logger binds the stream
        # when deepspeed is imported, hence the import inside the redirect)
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401

            summary = T.train(data, out, cfg, deepspeed_config_path=deepspeed_config, resume=resume)
    except T.CheckpointError as exc:
        fail(f"checkpoint: {exc}", code=4)
    except T.DivergedError as exc:
        fail(f"training diverged: {exc}", code=3)
    except (T.TrainingError, FileNotFoundError) as exc:
        fail(str(exc))
    finally:
        T.logger.removeHandler(handler)
    if os.environ.get("RANK", "0") != "0":  # under a launcher only rank 0 speaks for the run
        return
    m = summary.get("metrics") or {}
    emit(summary, as_json, f"{summary['status']} at step {summary['step']}: "
         + (f"tuning loss {m['tuning_loss']:.4f} (unigram entropy {m['unigram_entropy_tuning']:.4f}), "
            f"{m['tokens_per_s'] or 0:,.0f} tokens/s; model in {out}" if m else
            f"checkpoint {summary.get('checkpoint')}"))


def train_config(config: Path | None, given: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of ``--config`` (a JSON file of its fields) with the options given on the command line over
    it; a bad file, field or preset fails with the reason."""
    from foresight.model import PRESETS
    from foresight.train import TrainConfig

    fields: dict[str, Any] = {}
    if config is not None:
        try:
            fields = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            fail(f"{config}: cannot read the training config: {exc}")
    fields.update({k: v for k, v in given.items() if v is not None})
    try:
        cfg = TrainConfig.from_dict(fields)
    except (ValueError, TypeError) as exc:
        fail(f"{config or 'options'}: {exc}")
    if cfg.preset not in PRESETS:
        fail(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    return cfg


def predict(
    model: Annotated[Path, typer.Option("--model", help="Trained model directory.")],
    db: Annotated[Path, typer.Option("--db", help="Warehouse with the subject's events.")],
    subject: Annotated[int, typer.Option("--subject", help="subject_id to predict for.")],
    top_k: Annotated[int, typer.Option(help="How many next events to list.")] = 10,
    as_of: Annotated[str | None, typer.Option(help="Cut the timeline at this time (default: its last event).")] = None,
    kinds: Annotated[str | None, typer.Option(help="Only these kinds, comma separated (e.g. DX,RX_START).")] = None,
    new_only: Annotated[bool, typer.Option(help="Only codes not already in the timeline.")] = False,
    task: Annotated[list[str] | None, typer.Option(help="Zero-shot task: a built-in name or a JSON/YAML spec "
                                                         "file; repeatable.")] = None,
    samples: Annotated[int, typer.Option(help="Monte Carlo futures for the tasks.")] = 50,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Next events (with probabilities and time to next) and zero-shot risks for one subject."""
    from foresight.forecast import Forecaster, load_task, risks_with_intervals

    when = parse_time(as_of, "--as-of")
    try:
        fc = Forecaster.from_pretrained(model)
        tasks = [load_task(t) for t in task or []]
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    with warehouse.connect(db, read_only=True) as con:
        try:
            timeline = fc.timeline_from_warehouse(con, subject, when)
        except KeyError as exc:
            fail(str(exc.args[0]))
    result: dict[str, Any] = {"subject_id": subject, "as_of": timeline.as_of.isoformat(),
                              "last_event": timeline.clock.isoformat(), "dead": timeline.dead}
    if not timeline.dead:
        nxt = fc.next_events(timeline, top_k=top_k, kinds=kinds.split(",") if kinds else None, new_only=new_only)
        result["next_events"] = nxt.to_dict()  # + "time_head" when the model was trained with it
        # the closed-form time-head risk next to the futures' estimate when the model has the head
        result["risks"] = [r.to_dict() for r in risks_with_intervals(fc, timeline, tasks, samples, seed=seed,
                                                                     time_head=fc.has_time_head)]
    emit(result, as_json)
    if not as_json:
        print_prediction(result, subject, timeline.clock)


def print_prediction(result: dict[str, Any], subject: int, clock: Any) -> None:
    """``predict``'s tables on stderr: next events, expected time to the next one, risks with their intervals."""
    if result["dead"]:
        err.print(f"subject {subject} died at or before {clock}: nothing to predict")
        return
    table = Table(title=f"Next events for subject {subject} after {clock:%Y-%m-%d %H:%M}")
    for col in ("probability", "event", "kind", "new"):
        table.add_column(col)
    for e in result["next_events"]["events"]:
        table.add_row(f"{e['probability']:.3f}", e["description"] or e["token"], e["kind"], "yes" if e["new"] else "")
    err.print(table)
    exp = result["next_events"]["expected_days_to_next"]
    if exp is not None:
        err.print(f"expected time to the next event: {exp:.1f} days (interval tokens)")
    head = result["next_events"].get("time_head")
    if head:
        label = {1: "1d", 7: "7d", 30: "30d", 365.25: "1y"}  # a few of the gap bins' upper edges
        shown = [w for w in head["within"] if w["days"] in label]
        err.print(f"expected time to the next event: {head['expected_days']:.1f} days (time head); P(within) "
                  + ", ".join(f"{label[w['days']]} {w['probability']:.3f}" for w in shown))
    for r in result.get("risks", []):
        th = f"; time head {r['time_head_risk']:.3f}" if r.get("time_head_risk") is not None else ""
        err.print(f"{r['task']}: {r['probability']:.3f} (95% CI {r['low']:.3f}-{r['high']:.3f}, "
                  f"{r['samples']} futures{th})")


def forecast(
    model: Annotated[Path, typer.Option("--model", help="Trained model directory.")],
    db: Annotated[Path, typer.Option("--db", help="Warehouse holding the cohort.")],
    as_of: Annotated[str, typer.Option("--as-of", help="Forecast date (ISO), e.g. 2025-06-30.")],
    horizon_days: Annotated[float, typer.Option("--horizon-days", help="How far ahead.")] = 28,
    samples: Annotated[int, typer.Option(help="Monte Carlo futures per subject.")] = 20,
    codes: Annotated[str, typer.Option(help="Events to count, comma-separated globs.")] = "ADMIT//*",
    split: Annotated[str | None, typer.Option(help="Restrict the cohort to a split (e.g. held_out).")] = None,
    max_subjects: Annotated[int | None, typer.Option(help="Random subset of the cohort (for speed).")] = None,
    history_weeks: Annotated[int, typer.Option(help="Observed weeks to show before as-of.")] = 52,
    plot: Annotated[Path | None, typer.Option(help="Write the PNG plot here.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the JSON forecast here.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    strata: Annotated[str, typer.Option(help="Also forecast by stratum: comma-separated type (admission type), "
                                             "age (band at as-of). Published with small cells suppressed.")] = "",
    method: Annotated[str, typer.Option(help="expected (Rao-Blackwellised counts) or monte_carlo (events "
                                             "counted in the sampled futures).")] = "expected",
    open_cohort: Annotated[bool, typer.Option("--open-cohort/--closed-cohort", help="Add the admissions of people "
                                              "not in the warehouse at as-of (estimated from last year's "
                                              "arrivals), or forecast the people there only.")] = True,
    weighted: Annotated[bool, typer.Option(help="With --max-subjects: a stratified subset weighted to stand for "
                                                "the whole cohort (the forecast is the cohort's).")] = False,
    unsuppressed: Annotated[bool, typer.Option(help="Print the strata unsuppressed (not for publication).")
                            ] = False,
    as_json: JsonOption = False,
) -> None:
    """Expected weekly admissions (or other events) for the cohort alive at --as-of, with 50%/90% predictive
    intervals (Monte Carlo and outcome noise), optionally by stratum."""
    from foresight.forecast import Forecaster, forecast_cohort, plot_population
    from foresight.forecast.counts import METHODS, STRATA, published

    when = parse_time(as_of, "--as-of")
    patterns = tuple(c.strip() for c in codes.split(",") if c.strip())
    kinds = tuple(k.strip() for k in strata.split(",") if k.strip())
    if bad := [k for k in kinds if k not in STRATA]:
        fail(f"--strata: unknown stratum {bad[0]!r} (choose from {', '.join(STRATA)})")
    if method not in METHODS:
        fail(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    try:
        fc = Forecaster.from_pretrained(model)
    except FileNotFoundError as exc:
        fail(str(exc))
    with warehouse.connect(db, read_only=True) as con:
        run = forecast_cohort(fc, con, when, horizon_days, samples=samples, codes=patterns, split=split,
                              max_subjects=max_subjects, history_weeks=history_weeks, seed=seed, status=err.status,
                              method=method, strata=kinds, open_cohort=open_cohort, weighted=weighted)
    if run.forecast is None:
        fail(f"no living subject with events before {when} in {db}")
    result = run.forecast
    payload = result.to_json()
    if not unsuppressed:  # anything printed may be published: the service's small-cell rule
        payload["strata"] = published(result.strata)
    payload["strata_suppressed"] = not unsuppressed
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1))
        payload["json"] = str(out)
    if plot:
        payload["plot"] = str(plot_population(result, plot))
    total = sum(w["mean"] for w in result.weeks)
    emit(payload, as_json, f"{result.cohort_size:,} subjects: {total:.1f} expected {codes} events over "
                           f"{horizon_days:g} days from {when.date()}" + (f"; plot {plot}" if plot else ""))


def evaluate(
    model: Annotated[Path, typer.Option("--model", help="Trained model directory.")],
    data: Annotated[Path, typer.Option("--data", help="Tokenized data directory (held_out split).")],
    db: Annotated[Path | None, typer.Option("--db", help="Warehouse, for the risk tasks and baselines (default: "
                                                         "the one DATA was tokenized from).")] = None,
    task: Annotated[list[str] | None, typer.Option(help="Risk task (built-in name or spec file); repeatable. "
                                                         "Admission tasks (in_hospital_mortality, "
                                                         "icu_during_stay, los_over_7d) are scored at "
                                                         "admissions, the others at discharges or --as-of. "
                                                         "Default: admission_30d, emergency_admission_30d, "
                                                         "mortality_30d and the admission tasks.")] = None,
    at: Annotated[list[str] | None, typer.Option(
        "--at", help="Prediction points: discharges, as_of, admissions; repeatable. Default: discharges (as_of "
                     "with --as-of) and admissions (when the warehouse has any).")] = None,
    as_of: Annotated[str | None, typer.Option(help="Predict for everyone alive at this date (instead of at "
                                                   "each discharge).")] = None,
    oracle: Annotated[Path | None, typer.Option(
        "--oracle", help="Simulator output folder (`foresight simulate`): adds the simulator's true risk where "
                         "its oracle answers the task.")] = None,
    samples: Annotated[int | None, typer.Option(
        help="Monte Carlo futures per prediction point (default: foresight.evaluate's RISK_SAMPLES, 5: exits from "
             "the window are integrated, so a few paths suffice).", min=1)] = None,
    max_points: Annotated[int, typer.Option(help="Held-out prediction points at most, per kind of point (a "
                                                 "seeded subsample).")] = 500,
    out: Annotated[Path | None, typer.Option(help="Report folder (default MODEL/evaluation).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling, subsampling and bootstrap seed.")] = 0,
    calibration: Annotated[str, typer.Option(
        help="Also report the model recalibrated by a map fitted on TUNING points: platt, isotonic or none.")
    ] = "platt",
    task_config: Annotated[Path | None, typer.Option(
        "--task-config", help="An ACES task config (e.g. tasks/readmission/30d.yaml): score the model zero-shot on "
                              "ACES's labels from the warehouse's MEDS export instead of the built-in tasks; "
                              "writes predictions.parquet (meds-evaluation schema).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Strict next-event accuracy vs baselines; risk tasks (AUROC, AUPRC, Brier, ECE, 95% CIs) vs baselines.

    Writes report.json and calibration.png; risk tasks it cannot score (no warehouse, no admissions) are listed
    with the reason.
    """
    from foresight.evaluate import evaluate_model, resolve_tasks, skipped_notes
    from foresight.evaluate.risks import RISK_SAMPLES
    from foresight.pipeline import simulator_oracle

    samples = samples or RISK_SAMPLES

    if task_config is not None:
        from foresight.evaluate.aces import aces_summary, evaluate_aces_task

        try:
            report = evaluate_aces_task(model, task_config, data_dir=data, db=db, samples=samples,
                                        max_points=max_points, out_dir=out, seed=seed,
                                        calibration=None if calibration == "none" else calibration)
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc))
        emit(report, as_json, aces_summary(report))
        return
    try:
        tasks, admission_tasks = resolve_tasks(task)
        true_risk = simulator_oracle(oracle) if oracle is not None else None
        report = evaluate_model(model, data, db=db, tasks=tasks, admission_tasks=admission_tasks, at=at,
                                as_of=parse_time(as_of, "--as-of"), samples=samples, max_points=max_points,
                                out_dir=out, oracle=true_risk, seed=seed,
                                calibration=None if calibration == "none" else calibration)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    notes = skipped_notes(report)
    if notes and as_json:  # the JSON on stdout lists them too; say it where a person looks
        for n in notes:
            err.print(f"warning: {n}", markup=False, highlight=False)
    plot = f"\ncalibration plot: {report['calibration_plot']}" if report["calibration_plot"] else ""
    emit(report, as_json, "\n".join([evaluation_summary(report), *notes]) + plot + f"\nreport: {report['report']}")


def evaluation_summary(report: dict[str, Any]) -> str:
    """``evaluate``'s human summary: next-event accuracy vs Markov, then each task's AUROC vs the baselines."""
    ne = report["next_event"]
    human = (f"next-event top-1/5/10 {ne['topk']['top1']:.3f}/{ne['topk']['top5']:.3f}/{ne['topk']['top10']:.3f} "
             f"(Markov {ne['baselines']['markov']['top10']:.3f} top-10) over {ne['positions']:,} positions")
    wh = report["warehouse"]
    human += f"\nwarehouse: {wh['path']} ({wh['found']})" if wh["path"] else ""

    def auc(res: dict[str, Any], name: str) -> str:
        if name not in res:
            return "n/a"
        lo_hi = res[name]["ci95"].get("auroc")
        return f"{res[name]['metrics']['auroc']:.3f}" + (f" (95% CI {lo_hi[0]:.3f}-{lo_hi[1]:.3f})" if lo_hi else "")

    for t in report["tasks"]:
        orc = auc(t, "oracle") if "oracle" in t else t.get("oracle_note", "n/a")
        human += (f"\n{t['task']} at {t['at']} ({t['points']} points): AUROC model {auc(t, 'model')} | logistic "
                  f"{auc(t, 'logistic_counts')} | GBM {auc(t, 'gbm_counts')} | oracle {orc}")
        if "model_calibrated" in t:
            human += (f"\n  calibrated on tuning ({t['calibrator']['method']}, {t['calibrator']['points']} points): "
                      + calibration_change(t))
        for who in ("model", "model_calibrated"):
            if any(k.startswith(f"{who}-") for k in t.get("paired", {})):
                human += "\n  " + paired_summary(t["paired"], who)
    return human


def calibration_change(task: dict[str, Any]) -> str:
    """What recalibration on tuning points did to one scored task: ``ECE 0.022 -> 0.015, Brier 0.0508 -> 0.0506``."""
    m, c = task["model"]["metrics"], task["model_calibrated"]["metrics"]
    return f"ECE {m['ece']:.3f} -> {c['ece']:.3f}, Brier {m['brier']:.4f} -> {c['brier']:.4f}"


def paired_summary(paired: dict[str, dict[str, Any]], model: str = "model") -> str:
    """One task's paired differences of ``model`` (``model`` or ``model_calibrated``) on one line: ``paired, model
    minus: logistic_counts AUROC +0.012 [-0.010, +0.034] Brier -0.0003 [-0.0010, +0.0004]; gbm_counts ...; oracle
    ...`` (AUROC up and Brier down favour the model)."""

    def diff(d: float, ci: list[float] | None, digits: int) -> str:
        if math.isnan(d):
            return "n/a (one class only)"
        return f"{d:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")

    label = "model" if model == "model" else "calibrated model"
    return f"paired, {label} minus: " + "; ".join(
        f"{name.removeprefix(model + '-')} AUROC {diff(d['auroc'], d['ci'], 3)} "
        f"Brier {diff(d['brier'], d['brier_ci'], 4)}"
        for name, d in paired.items() if name.startswith(model + "-"))

