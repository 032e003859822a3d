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
ExcludeOption = Annotated[Path | None, typer.Option(
    "--exclude-subjects", help="National data opt-out: a file of patient ids (one per line; integer subject ids "
                               "or Synthea/FHIR patient UUIDs) whose records are dropped.")]


def _emit(payload: dict[str, Any], as_json: bool, human: str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
    elif human:
        err.print(human)


def _fail(message: str, code: int = 2) -> None:
    from rich.text import Text

    err.print(Text.assemble(("error: ", "bold red"), message))  # Text: no markup parsing of paths/values
    raise typer.Exit(code)


def _opt_out_list(path: Path | None) -> set[int] | None:
    """The subject ids of an ``--exclude-subjects`` file (None without one); a bad file is a clear error."""
    if path is None:
        return None
    from foresight.optout import OptOutError, read_subjects_file

    try:
        return read_subjects_file(path)
    except OptOutError as exc:
        _fail(str(exc))
    return None  # unreachable: _fail exits


@etl_app.command("mimic-iv")
def etl_mimic_iv(
    input: Annotated[Path, typer.Option("--input", help="MIMIC-IV root folder (with hosp/ and icu/).")],
    db: DbOption,
    source: Annotated[str, typer.Option(help="Name of this load; re-running with it replaces its rows.")] = "mimic-iv",
    exclude_subjects: ExcludeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Load MIMIC-IV (full or demo) into the warehouse: leak-free times, quarantine, lineage."""
    _run_etl("mimic-iv", input, db, source, as_json, exclude_subjects)


def _run_etl(kind: str, input: Path, db: Path, source: str, as_json: bool, exclude_subjects: Path | None = None
             ) -> None:
    """Load ``input`` with the source adapter ``kind`` (see foresight.sources.SOURCES); shared by the etl commands."""
    import duckdb

    from foresight import warehouse
    from foresight.sources import get_source

    module = get_source(kind)
    excluded = _opt_out_list(exclude_subjects)
    t0 = time.perf_counter()
    try:
        con = warehouse.connect(db)
    except Exception as exc:  # a locked or corrupt file: say which
        _fail(f"{db}: cannot open warehouse: {exc}")
    try:
        with err.status(f"loading {kind}") as status, warehouse.excluding_subjects(excluded):
            summary = module.load(
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


@etl_app.command("synthea")
def etl_synthea(
    input: Annotated[Path, typer.Option("--input", help="Synthea CSV export folder (csv/, or the export root).")],
    db: DbOption,
    source: Annotated[str, typer.Option(help="Name of this load; re-running with it replaces its rows.")] = "synthea",
    exclude_subjects: ExcludeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Load a Synthea CSV export (patients.csv required, other tables optional) into the warehouse."""
    _run_etl("synthea", input, db, source, as_json, exclude_subjects)


@etl_app.command("fhir")
def etl_fhir(
    input: Annotated[Path, typer.Option("--input", help="Folder of FHIR R4 Bundle files (*.json, *.json.gz).")],
    db: DbOption,
    source: Annotated[str, typer.Option(help="Name of this load; re-running with it replaces its rows.")] = "fhir",
    exclude_subjects: ExcludeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Load FHIR R4 bundles (one per patient) into the warehouse; DocumentReference text goes to `notes`."""
    _run_etl("fhir", input, db, source, as_json, exclude_subjects)


@etl_app.command("meds")
def etl_meds(
    input: Annotated[Path, typer.Option("--input", help="MEDS dataset root (data/*.parquet, metadata/).")],
    db: DbOption,
    source: Annotated[str, typer.Option(help="Name of this load; re-running with it replaces its rows.")] = "meds",
    exclude_subjects: ExcludeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Load an existing MEDS dataset into the warehouse, keeping its subject ids, codes and splits."""
    _run_etl("meds", input, db, source, as_json, exclude_subjects)


@etl_app.command("notes")
def etl_notes(
    input: Annotated[Path, typer.Option("--input", help="Notes: a CSV/parquet (subject_id, time, text), or a "
                                                        "warehouse file whose `notes` table holds FHIR notes "
                                                        "(usually the --db file itself, after `etl fhir`).")],
    db: DbOption,
    model_pack: Annotated[Path, typer.Option("--model-pack", help="MedCAT v2 model pack (folder or .zip), e.g. "
                                                                  "from `foresight concepts build`.")],
    source: Annotated[str, typer.Option(help="Name of this load; re-running with it replaces its rows.")] = "notes",
    n_process: Annotated[int, typer.Option(min=1, help="Annotation worker processes (1: in this process).")] = 1,
    history_days: Annotated[float, typer.Option(min=0, help="'History of X' concepts are timed this many days "
                                                            "before the note (never before birth).")] = 1.0,
    vocab: Annotated[str | None, typer.Option(help="Vocabulary of the pack's cuis in NOTE//<VOCAB>//<CUI> "
                                                   "(default: from the pack).")] = None,
    exclude_subjects: ExcludeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Annotate free-text notes with MedCAT and load their concepts as NOTE//<VOCAB>//<CODE> events."""
    import duckdb
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from foresight import warehouse
    from foresight.sources import notes

    excluded = _opt_out_list(exclude_subjects)
    t0 = time.perf_counter()
    try:
        con = warehouse.connect(db)
    except Exception as exc:  # a locked or corrupt file: say which
        _fail(f"{db}: cannot open warehouse: {exc}")
    try:
        with Progress(TextColumn("annotating notes"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, transient=True) as progress, warehouse.excluding_subjects(excluded):
            task = progress.add_task("notes", total=None)
            summary = notes.load(con, input, source=source, model_pack=model_pack, n_process=n_process,
                                 history_days=history_days, vocab=vocab,
                                 progress=lambda done, total: progress.update(task, completed=done, total=total))
        mentions = notes.mention_counts(con)
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
    payload["mentions_by_status"] = mentions
    _emit(payload, as_json)
    if not as_json:
        _print_load_summary(payload)
        err.print("concept mentions by context: " + ", ".join(f"{k} {v:,}" for k, v in mentions.items()))


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
    if payload.get("notes"):
        err.print(f"{payload['notes']:,} notes (free text) in the warehouse table `notes`")
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
    exclude_subjects: ExcludeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fit the vocabulary on the train split and write packed token shards for train/tuning/held_out."""
    from rich.progress import Progress

    from foresight import tokens

    fields: dict[str, Any] = json.loads(config.read_text()) if config else {}
    fields.setdefault("min_subjects", min_subjects)
    fields.setdefault("dedup_window_minutes", dedup_window_minutes)
    try:
        cfg = tokens.TokenizerConfig.from_dict(fields)
    except TypeError as exc:
        _fail(f"{config}: {exc}")
    try:
        with Progress(console=err, transient=True) as progress:
            tasks: dict[str, Any] = {}

            def report(split: str, done: int, total: int) -> None:
                if split not in tasks:
                    tasks[split] = progress.add_task(f"encoding {split}", total=total)
                progress.update(tasks[split], completed=done)

            summary = tokens.tokenize(db, out, cfg, progress=report,
                                         exclude_subjects=_opt_out_list(exclude_subjects))
    except tokens.TokenizeError as exc:
        _fail(str(exc))
    _emit(summary, as_json, "\n".join([
        f"vocabulary of {summary['vocab_size']:,} tokens; tokens per split {summary['tokens']}; "
        f"rare-code rules {summary['rare_mapping']}; written to {out}", *summary["messages"]]))


def _parse_time(value: str | None, what: str) -> Any:
    from datetime import datetime

    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        _fail(f"{what}: {value!r} is not an ISO date or date-time (e.g. 2025-06-30 or 2025-06-30T12:00)")


@app.command()
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
    from dataclasses import asdict

    from foresight import warehouse
    from foresight.forecast import Forecaster, load_task, risk_from_futures

    when = _parse_time(as_of, "--as-of")
    try:
        fc = Forecaster.from_pretrained(model)
        tasks = [load_task(t) for t in task or []]
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    con = warehouse.connect(db, read_only=True)
    try:
        timeline = fc.timeline_from_warehouse(con, subject, when)
    except KeyError as exc:
        _fail(str(exc.args[0]))
    finally:
        con.close()
    result: dict[str, Any] = {"subject_id": subject, "as_of": timeline.as_of.isoformat(),
                              "last_event": timeline.clock.isoformat(), "dead": timeline.dead}
    if not timeline.dead:
        nxt = fc.next_events(timeline, top_k=top_k, kinds=kinds.split(",") if kinds else None, new_only=new_only)
        result["next_events"] = nxt.to_dict()  # + "time_head" when the model was trained with it
        result["risks"] = []
        timed = [t for t in tasks if t.value != "binary"]
        futures = fc.sample_futures([timeline], samples, max(t.window_days for t in timed), seed=seed)[0] \
            if timed else []
        for t in tasks:
            if t.value == "binary":  # the same low-variance estimator `foresight evaluate` scores
                p, se = fc.task_risks([timeline], t, samples, seed=seed)
                result["risks"].append({"task": t.name, "probability": float(p[0]),
                                        "low": max(0.0, float(p[0] - 1.96 * se[0])),
                                        "high": min(1.0, float(p[0] + 1.96 * se[0])), "samples": samples})
            else:
                result["risks"].append(asdict(risk_from_futures(t, futures, timeline.as_of)))
            if fc.has_time_head:  # the closed form next to the futures' estimate; None where it does not apply
                th = fc.time_head_risks([timeline], t)
                result["risks"][-1]["time_head_risk"] = None if th is None else float(th[0])
    _emit(result, as_json)
    if not as_json:
        from rich.table import Table

        if timeline.dead:
            err.print(f"subject {subject} died at or before {timeline.clock}: nothing to predict")
            return
        table = Table(title=f"Next events for subject {subject} after {timeline.clock:%Y-%m-%d %H:%M}")
        for col in ("probability", "event", "kind", "new"):
            table.add_column(col)
        for e in result["next_events"]["events"]:
            table.add_row(f"{e['probability']:.3f}", e["description"] or e["token"], e["kind"],
                          "yes" if e["new"] else "")
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


@app.command()
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
    as_json: JsonOption = False,
) -> None:
    """Expected weekly admissions (or other events) for the cohort alive at --as-of, with 50%/90% intervals."""
    from foresight import warehouse
    from foresight.forecast import Forecaster, cohort_as_of, plot_population, population_rates, weekly_history

    when = _parse_time(as_of, "--as-of")
    patterns = tuple(c.strip() for c in codes.split(",") if c.strip())
    try:
        fc = Forecaster.from_pretrained(model)
    except FileNotFoundError as exc:
        _fail(str(exc))
    con = warehouse.connect(db, read_only=True)
    try:
        ids = cohort_as_of(con, when, split=split, limit=max_subjects, seed=seed)
        if not ids:
            _fail(f"no living subject with events before {when} in {db}")
        history = weekly_history(con, ids, when, history_weeks, patterns)
        with err.status(f"encoding {len(ids):,} timelines"):
            timelines = fc.timelines_from_warehouse(con, ids, when)
    finally:
        con.close()
    with err.status(f"sampling {samples} futures for {len(timelines):,} subjects"):
        result = population_rates(fc, timelines, when, horizon_days, samples=samples, codes=patterns, seed=seed,
                                  history=history)
    payload = result.to_json()
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1))
        payload["json"] = str(out)
    if plot:
        payload["plot"] = str(plot_population(result, plot))
    total = sum(w["mean"] for w in result.weeks)
    _emit(payload, as_json, f"{len(timelines):,} subjects: {total:.1f} expected {codes} events over "
                            f"{horizon_days:g} days from {when.date()}" + (f"; plot {plot}" if plot else ""))


@app.command()
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
    samples: Annotated[int, typer.Option(help="Monte Carlo futures per prediction point.")] = 20,
    max_points: Annotated[int, typer.Option(help="Held-out prediction points at most, per kind of point (a "
                                                 "seeded subsample).")] = 500,
    out: Annotated[Path | None, typer.Option(help="Report folder (default MODEL/evaluation).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling, subsampling and bootstrap seed.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Strict next-event accuracy vs baselines; risk tasks (AUROC, AUPRC, Brier, ECE, 95% CIs) vs baselines.

    Writes report.json and calibration.png; risk tasks it cannot score (no warehouse, no admissions) are listed
    with the reason.
    """
    from foresight.evaluate import ADMISSION_ALIASES, ADMISSION_TASKS, DEFAULT_DISCHARGE_TASKS, evaluate_model
    from foresight.forecast import load_task

    try:
        tasks, admission_tasks = [], None if task is None else []
        for name in task or DEFAULT_DISCHARGE_TASKS:
            adm = ADMISSION_TASKS.get(ADMISSION_ALIASES.get(name, name))
            if adm is not None:
                admission_tasks.append(adm)
            else:
                tasks.append(load_task(name))
        true_risk = None
        if oracle is not None:
            from foresight.pipeline import simulator_oracle

            true_risk = simulator_oracle(oracle)
        report = evaluate_model(model, data, db=db, tasks=tasks, admission_tasks=admission_tasks,
                                at=[a.replace("-", "_") for a in at] if at else None,
                                as_of=_parse_time(as_of, "--as-of"), samples=samples, max_points=max_points,
                                out_dir=out, oracle=true_risk, seed=seed)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
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
                  f"{auc(t, 'logistic_counts')} | oracle {orc}")
    by_reason: dict[str, dict[str, list[str]]] = {}  # one line per reason, not one per task
    for s in report["skipped"]:
        by_reason.setdefault(s["reason"], {}).setdefault(s["at"], []).append(s["task"])
    notes = ["skipped " + "; ".join(f"{', '.join(names)} at {kind}" for kind, names in kinds.items())
             + f": {reason}" for reason, kinds in by_reason.items()]
    if notes and as_json:  # the JSON on stdout lists them too; say it where a person looks
        for n in notes:
            err.print(f"warning: {n}", markup=False, highlight=False)
    plot = f"\ncalibration plot: {report['calibration_plot']}" if report["calibration_plot"] else ""
    _emit(report, as_json, "\n".join([human, *notes]) + plot + f"\nreport: {report['report']}")


@app.command()
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
    seed: Annotated[int | None, typer.Option(help="Seed of initialisation and data order.")] = None,
    stop_at_step: Annotated[int | None, typer.Option(
        help="Checkpoint at this step and stop (resume later with --resume).")] = None,
    local_rank: Annotated[int, typer.Option("--local_rank", "--local-rank", hidden=True,
                                            help="Set by the deepspeed launcher; read from LOCAL_RANK.")] = -1,
    as_json: JsonOption = False,
) -> None:
    """Train the Llama-style timeline model with DeepSpeed (CPU or GPUs, the same command); resumable."""
    import contextlib
    import logging
    import os

    from foresight import train as T

    fields: dict[str, Any] = {}
    if config is not None:
        try:
            fields = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            _fail(f"{config}: cannot read the training config: {exc}")
    given = {"preset": preset, "max_steps": max_steps, "seq_len": seq_len, "micro_batch": micro_batch,
             "grad_accum": grad_accum, "lr": lr, "eval_every": eval_every, "checkpoint_every": checkpoint_every,
             "time_head": time_head, "seed": seed, "stop_at_step": stop_at_step}
    fields.update({k: v for k, v in given.items() if v is not None})
    try:
        cfg = T.TrainConfig.from_dict(fields)
    except (ValueError, TypeError) as exc:
        _fail(f"{config or 'options'}: {exc}")
    from foresight.model import PRESETS

    if cfg.preset not in PRESETS:
        _fail(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
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
        _fail(f"checkpoint: {exc}", code=4)
    except T.DivergedError as exc:
        _fail(f"training diverged: {exc}", code=3)
    except (T.TrainingError, FileNotFoundError) as exc:
        _fail(str(exc))
    finally:
        T.logger.removeHandler(handler)
    if os.environ.get("RANK", "0") != "0":  # under a launcher only rank 0 speaks for the run
        return
    m = summary.get("metrics") or {}
    _emit(summary, as_json, f"{summary['status']} at step {summary['step']}: "
          + (f"tuning loss {m['tuning_loss']:.4f} (unigram entropy {m['unigram_entropy_tuning']:.4f}), "
             f"{m['tokens_per_s'] or 0:,.0f} tokens/s; model in {out}" if m else
             f"checkpoint {summary.get('checkpoint')}"))


@app.command()
def simulate(
    subjects: Annotated[int, typer.Option("--subjects", min=1, help="Number of people in the cohort.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (its data/, csv/, notes.csv are replaced).")],
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives byte-identical output.")] = 0,
    format: Annotated[list[str], typer.Option(
        "--format", help="meds (data/*.parquet + metadata/) and/or synthea (csv/); repeat for both.")] = ["meds"],  # noqa: B006
    notes: Annotated[bool, typer.Option("--notes/--no-notes", help="Also write notes.csv (subject_id,time,text).")]
    = False,
    workers: Annotated[int, typer.Option(min=1, help="Processes simulating chunks in parallel.")] = 1,
    chunk_size: Annotated[int, typer.Option(min=1, help="Subjects per chunk (= per MEDS shard).")] = 10_000,
    config: Annotated[Path | None, typer.Option(
        help="JSON hazard configuration (default: the built-in one; see metadata/simulator.json).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Simulate a cohort with known hazards (MEDS and/or Synthea CSV, optional notes) plus its oracle config."""
    from rich.progress import Progress

    from foresight import simulate as sim

    formats = [f.strip().lower() for item in format for f in item.split(",") if f.strip()]
    bad = sorted(set(formats) - set(sim.FORMATS))
    if bad or not formats:
        _fail(f"unknown --format {', '.join(bad) or '(none)'}; choose from {', '.join(sim.FORMATS)}")
    cfg = None
    if config is not None:
        try:
            cfg = json.loads(config.read_text())
            cfg = cfg.get("config", cfg)  # a simulator.json written by an earlier run works too
        except (OSError, ValueError) as exc:
            _fail(f"{config}: cannot read the configuration: {exc}")
    try:
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task(f"simulating {subjects:,} subjects", total=None)
            result = sim.simulate(
                subjects, out, seed=seed, formats=formats, notes=notes, config=cfg, chunk_size=chunk_size,
                workers=workers, on_chunk=lambda done, total: progress.update(task, completed=done, total=total))
    except (ValueError, KeyError) as exc:
        _fail(f"invalid simulator configuration: {exc}")
    except OSError as exc:
        _fail(f"{out}: cannot write: {exc}")
    _emit(result, as_json, f"{result['subjects']:,} subjects, {result['events']:,} events "
          f"({', '.join(result['formats'])}{', notes' if notes else ''}) in {result['seconds']:.1f}s -> {out}")


serve_app = typer.Typer(
    help="The researcher query service (HTTP): run it, or manage its API keys (keygen, revoke).",
    invoke_without_command=True,
)
app.add_typer(serve_app, name="serve")
KeysOption = Annotated[Path, typer.Option("--keys", help="API keys file (JSON; only hashes are stored).")]


@serve_app.callback()
def serve(
    ctx: typer.Context,
    model: Annotated[Path | None, typer.Option("--model", help="Trained model directory.")] = None,
    db: Annotated[Path | None, typer.Option("--db", help="Warehouse for subject lookups and cohort rates.")] = None,
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    host: Annotated[str, typer.Option(help="Interface to bind (put a TLS proxy in front for remote users).")]
    = "127.0.0.1",
    keys: KeysOption = Path("foresight-keys.json"),
    audit_log: Annotated[Path, typer.Option(help="Append-only JSON-lines audit log.")] = Path("foresight-audit.jsonl"),
    max_batch: Annotated[int, typer.Option(min=1, help="Next-event requests per forward pass (1: unbatched).")] = 32,
    batch_wait_ms: Annotated[float, typer.Option(min=0, help="When others are queued, how long to wait for the rest "
                                                         "of a burst (0 measured best on CPU-only hosts).")] = 5.0,
    max_events: Annotated[int, typer.Option(min=1, help="Posted events per timeline.")] = 2000,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Request body limit.")] = 1_048_576,
    small_cell_threshold: Annotated[int, typer.Option(min=1, help="Aggregate counts below this show as '<N'.")] = 8,
    rounding: Annotated[int, typer.Option(min=1, help="Other aggregate counts are rounded to this.")] = 5,
    exclude_subjects: ExcludeOption = None,
) -> None:
    """Serve next events, risks, explanations and suppressed cohort rates over HTTP (API keys, audit log).

    With --exclude-subjects, listed subjects are never served: a lookup answers as for an unknown id (404) and
    cohort rates leave them out. The file is re-read when it changes.
    """
    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        _fail("--model is required (or use a subcommand: keygen, revoke)")
    if not keys.exists():
        _fail(f"{keys}: no keys file; create a key with `foresight serve keygen --keys {keys} --role researcher`")
    if db is not None and not db.exists():
        _fail(f"{db}: warehouse not found")
    _opt_out_list(exclude_subjects)  # a bad list stops the server here, with the file and line named
    from foresight import serve as S

    try:
        cfg = S.ServeConfig(model_dir=model, keys_file=keys, audit_log=audit_log, db=db,
                            exclude_subjects_file=exclude_subjects, max_events=max_events,
                            max_body_bytes=max_body_bytes, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                            suppression=S.SuppressionRule(small_cell_threshold, rounding))
        err.print(f"serving {model} on http://{host}:{port} (docs at /docs); audit log {audit_log}")
        S.serve(cfg, host=host, port=port)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@serve_app.command("keygen")
def serve_keygen(
    keys: KeysOption,
    role: Annotated[str, typer.Option(help="researcher (posted timelines, aggregates) or analyst (also subject "
                                           "lookups).")] = "researcher",
    rate_per_minute: Annotated[float, typer.Option(help="Sustained requests per minute.")] = 60.0,
    burst: Annotated[int, typer.Option(help="Requests allowed at once.")] = 20,
    label: Annotated[str, typer.Option(help="Who or what the key is for.")] = "",
    splits: Annotated[str | None, typer.Option(
        help="Comma-separated subject splits the key may look up (e.g. held_out); default: all.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Create an API key: printed ONCE here; the keys file keeps only its SHA-256."""
    from foresight.serve import generate_key

    scope = None if splits is None else [x.strip() for x in splits.split(",") if x.strip()]
    try:
        key, record = generate_key(keys, role, rate_per_minute=rate_per_minute, burst=burst, label=label,
                                   splits=scope)
    except ValueError as exc:
        _fail(str(exc))
    payload = {"key": key, "key_id": record.key_id, "role": record.role, "rate_per_minute": record.rate_per_minute,
               "burst": record.burst, "splits": list(record.splits) if record.splits else None, "keys_file": str(keys)}
    if as_json:
        _emit(payload, True)
    else:
        sys.stdout.write(key + "\n")
        scoped = f", splits {','.join(record.splits)} only" if record.splits else ""
        err.print(f"key {record.key_id} ({record.role}{scoped}) added to {keys}; store the key now, it is not kept")


@serve_app.command("revoke")
def serve_revoke(
    keys: KeysOption,
    key_id: Annotated[str, typer.Option("--key-id", help="The key id (the part after fsk_).")],
    as_json: JsonOption = False,
) -> None:
    """Remove a key from the keys file (a running server stops accepting it at once)."""
    from foresight.serve import revoke_key

    try:
        removed = revoke_key(keys, key_id)
    except (OSError, ValueError) as exc:
        _fail(f"{keys}: {exc}")
    if not removed:
        _fail(f"{keys}: no key with id {key_id}")
    _emit({"revoked": key_id, "keys_file": str(keys)}, as_json, f"revoked {key_id}")


concepts_app = typer.Typer(help="MedCAT concept packs: build one from code dictionaries, try it on text.",
                           no_args_is_help=True)
app.add_typer(concepts_app, name="concepts")


@concepts_app.command("build")
def concepts_build(
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from foresight.concepts import PackError, build_pack

    try:
        with Progress(TextColumn("building the concept database; then training on notes"), BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True) as progress:
            task = progress.add_task("build", total=None)
            summary = build_pack(dictionary, out, train_on=train_on, epochs=epochs, max_train_notes=max_train_notes,
                                 progress=lambda done, total: progress.update(task, completed=done, total=total))
    except PackError as exc:
        _fail(str(exc))
    from dataclasses import asdict

    _emit(asdict(summary), as_json,
          f"{summary.concepts:,} concepts, {summary.names:,} names ({', '.join(summary.ontologies) or 'mixed'}); "
          f"trained on {summary.training_notes:,} notes ({summary.trained_concepts:,} concepts seen); "
          f"pack written to {summary.pack} in {summary.seconds:.1f}s")


@concepts_app.command("annotate")
def concepts_annotate(
    model_pack: Annotated[Path, typer.Option("--model-pack", help="MedCAT v2 model pack (folder or .zip).")],
    text: Annotated[str, typer.Option("--text", help="Text to annotate.")],
    vocab: Annotated[str | None, typer.Option(help="Vocabulary for the codes (default: from the pack).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show the concepts MedCAT finds in a text, their codes and their context (negated, historical, ...)."""
    from dataclasses import asdict

    from foresight.concepts import PackError, annotate_note, load_pack

    try:
        cat = load_pack(model_pack)
    except PackError as exc:
        _fail(str(exc))
    mentions = annotate_note(cat, "text", text, vocab=vocab)
    rows = [{**{k: v for k, v in asdict(m).items() if k not in ("note_id", "context")},
             "context": sorted(m.context), "status": m.status, "event": m.affirmed} for m in mentions]
    _emit({"mentions": rows}, as_json)
    if not as_json:
        from rich.table import Table

        table = Table(title=f"{len(rows)} concept mention(s)")
        for col in ("text", "code", "name", "status", "event"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["text"], r["code"], r["name"], r["status"], "yes" if r["event"] else "no")
        err.print(table)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its warehouse, model and reports.")] = Path(
        "work/demo"),
    subjects: Annotated[int, typer.Option(help="Simulated cohort size.")] = 3000,
    seed: Annotated[int, typer.Option(help="Simulation seed.")] = 1,
    as_json: JsonOption = False,
) -> None:
    """The whole chain on the built-in simulator: simulate -> ETL -> tokenize -> train -> evaluate -> privacy
    gate -> release -> forecast, as the Prefect `pipeline` flow; prints where everything is and the headline
    numbers. A second run reuses the cached steps."""
    from rich.table import Table

    from foresight.demo import artifacts, headline, run_demo

    result = run_demo(workdir, subjects=subjects, seed=seed, console=err)
    if as_json:
        _emit(result, True)
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


# --- privacy: the release gate (issue 7) -------------------------------------------------------------------

privacy_app = typer.Typer(help="The privacy gate: audit a model for memorised records; plant canaries.",
                          no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")


def _audit_summary(rep: dict[str, Any]) -> dict[str, Any]:
    """The headline of an audit report (the full report is in report.json)."""
    probes = rep["probes"]
    overall = next((r for r in probes["membership_inference"]["rows"] if r["slice"] == "all" and r.get("measured")),
                   None)
    extraction = [(row["k"], mode, row[mode]["exact_gap_points"]["value"]) for row in probes["extraction"]["by_k"]
                  for mode in ("greedy", "sampled") if mode in row]
    return {
        "decision": rep["decision"], "valid": rep["valid"], "reasons": rep["reasons"],
        "probes": {k: v["decision"] for k, v in rep["gate"]["probes"].items()},
        "model_checksum": rep["model"]["checksum"], "report": rep["written"],
        "mia_auc": {a: f["auc"]["value"] for a, f in overall["attacks"].items()} if overall else None,
        "canaries": [{k: g[k] for k in ("repeats", "exposed", "canaries", "median_exposure_extrapolated")}
                     for g in probes["canaries"]["groups"]] if probes["canaries"] else None,
        "max_exact_extraction_gap_points": max((g for *_, g in extraction if g is not None), default=None),
        "seconds": rep["runtime_seconds"]["total"],
    }


@privacy_app.command("audit")
def privacy_audit(
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
    as_json: JsonOption = False,
) -> None:
    """Probe a model for memorised records (membership inference, canaries, extraction, vocabulary floor,
    synthetic-cohort distance) and decide PASS / REVIEW / FAIL per probe against the gate's thresholds."""
    import contextlib

    from privacy.audit import AuditError, audit

    forgotten_ids = _opt_out_list(forgotten)
    try:
        with err.status("auditing") as status, contextlib.redirect_stdout(sys.stderr):
            rep = audit(model, data, out, config=config, reference=reference, train_reference=train_reference,
                        db=db, forgotten=forgotten_ids, synthetic_samples=synthetic_samples,
                        progress=lambda m: status.update(m), device=device)
    except (AuditError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    summary = _audit_summary(rep)
    human = f"[bold]{rep['decision']}[/] ({'valid' if rep['valid'] else 'validity: ' + str(rep['valid'])}) in " \
            f"{summary['seconds']:.1f}s; report {rep['written'][0]}"
    if not as_json:
        from rich.text import Text

        for reason in rep["reasons"]:
            err.print(Text(f"  {reason}"))
    _emit(summary, as_json, human)


@privacy_app.command("insert-canaries")
def privacy_insert_canaries(
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
    from privacy.canaries import CanaryError, insert

    try:
        reps = tuple(int(r) for r in repeats.split(",") if r.strip())
        manifest = insert(data, out, repeats=reps, per_repeat=per_repeat, length=length, seed=seed,
                          n_references=references)
    except (CanaryError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    summary = {"out": str(out), "canaries": len(manifest["canaries"]), "canary_subjects": manifest["canary_subjects"],
               "repeats": manifest["repeats"], "references": len(manifest["references"])}
    _emit(summary, as_json, f"{summary['canaries']} canaries ({summary['canary_subjects']} subjects, repeats "
                            f"{manifest['repeats']}) and {summary['references']} references -> {out}")


@app.command()
def release(
    model: Annotated[Path, typer.Option("--model", help="Model directory whose latest audit passed.")],
    registry: Annotated[Path, typer.Option("--registry", help="Release registry folder.")],
    name: Annotated[str | None, typer.Option(help="Release name (default: the model folder's name).")] = None,
    report: Annotated[Path | None, typer.Option(help="Audit report (default MODEL/privacy/report.json).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Copy the model into the registry, atomically, only if its latest audit is for exactly this model and PASSED."""
    from privacy.release import ReleaseRefused
    from privacy.release import release as do_release

    try:
        entry = do_release(model, registry, name=name, report_path=report)
    except ReleaseRefused as exc:
        _fail(f"release refused: {exc}", code=3)
    except FileNotFoundError as exc:
        _fail(str(exc))
    _emit(entry, as_json, f"released {model} as {entry['path']}" + (" (already released)"
                                                                     if entry.get("already_released") else ""))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
