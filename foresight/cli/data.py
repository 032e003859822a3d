"""Data commands: ``export meds``, ``tokenize`` and ``simulate``.

:mod:`foresight.simulate` loads pandas and scipy (half a second): it is imported when ``simulate`` runs, so that
``foresight --help`` and the other commands do not pay for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import duckdb
import typer
from rich.progress import Progress

from foresight import purposes, tokens, warehouse
from foresight.cli.app import DbOption, ExcludeOption, JsonOption, emit, err, fail, opt_out_list
from foresight.cli.sharded import TokenizeSchedulerOption, TokenizeWorkersOption, run_sharded_tokenize
from foresight.warehouse.csv_scan import first_line


def export_meds(
    db: DbOption,
    out: Annotated[Path, typer.Option("--out", help="Output folder for the MEDS dataset.")],
    subjects_per_shard: Annotated[int, typer.Option(help="Subjects per data/*.parquet shard.")] = 10_000,
    as_json: JsonOption = False,
) -> None:
    """Write the warehouse as a MEDS v0.4 dataset (data/*.parquet + metadata/)."""
    if not db.exists():
        fail(f"{db}: warehouse not found")
    with warehouse.connect(db, read_only=True) as con:
        result = warehouse.export_meds(con, out, subjects_per_shard=subjects_per_shard)
    emit(result, as_json, f"wrote {result['events']:,} events for {result['subjects']:,} subjects to {out}")


def tokenize(
    db: Annotated[Path, typer.Option("--db", help="Warehouse file (DuckDB) to read.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for vocab.json and the token shards.")],
    min_subjects: Annotated[int, typer.Option(help="Privacy floor: train subjects a token must cover.")] = 10,
    dedup_window_minutes: Annotated[
        float, typer.Option(help="Drop repeats of the same code within this many minutes (0 keeps all).")] = 0.0,
    config: Annotated[Path | None, typer.Option(help="JSON file with any TokenizerConfig fields.")] = None,
    exclude_subjects: ExcludeOption = None,
    purpose: Annotated[str, typer.Option(
        help="What the tokens are for (e.g. research, planning, covid-19-research). Every load reaching the tokens "
             "must list it in its declaration (`etl --declaration`), else nothing is written; the default "
             "'unspecified' is covered only by loads made without a declaration.")] = purposes.UNSPECIFIED,
    workers: TokenizeWorkersOption = None,
    scheduler: TokenizeSchedulerOption = None,
    vocabulary_from: Annotated[Path | None, typer.Option(
        "--vocabulary-from", help="Encode in this trained model's vocabulary instead of fitting one (data of "
                                  "another source, to fine-tune with `train --init-from`): codes it lacks become "
                                  "their nearest known ancestor, else RARE.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Fit the vocabulary on the train split and write packed token shards for train/tuning/held_out.

    Refused (exit 2, one line naming the load, its provider and its allowed purposes) when a load whose rows
    would reach the tokens does not cover --purpose; the purpose and every load are recorded in vocab.json."""
    fields: dict[str, Any] = json.loads(config.read_text()) if config else {}
    fields.setdefault("min_subjects", min_subjects)
    fields.setdefault("dedup_window_minutes", dedup_window_minutes)
    try:
        cfg = tokens.TokenizerConfig.from_options(fields)
    except TypeError as exc:
        fail(f"{config}: {exc}")
    if vocabulary_from is not None:
        if workers or scheduler:
            fail("--vocabulary-from encodes on one machine: leave out --workers/--scheduler")
        summary = _encode_in_model_vocabulary(db, out, vocabulary_from, exclude_subjects, purpose)
        emit(summary, as_json, f"encoded in the vocabulary of {vocabulary_from} ({summary['vocab_size']:,} tokens); "
                               f"tokens per split {summary['tokens']}; written to {out}")
        return
    if workers or scheduler:  # the sharded path (foresight/cli/sharded.py): same folder, same --json keys
        opt_out_list(exclude_subjects)  # a bad list fails here, before a cluster starts
        summary = run_sharded_tokenize(db, out, cfg, workers=workers, scheduler=scheduler,
                                       exclude_subjects=exclude_subjects, purpose=purpose)
    else:
        summary = _tokenize_here(db, out, cfg, exclude_subjects, purpose)
    loads = summary["provenance"]["loads"]
    emit(summary, as_json, "\n".join([
        f"vocabulary of {summary['vocab_size']:,} tokens; tokens per split {summary['tokens']}; "
        f"rare-code rules {summary['rare_mapping']}; written to {out}", *summary["messages"],
        f"purpose {purpose!r}, covered by {len(loads)} load(s): "
        + "; ".join(f"{lp['source']} from {lp['provider']} ({', '.join(lp['purposes'])})" for lp in loads)]))


def _tokenize_here(db: Path, out: Path, cfg: tokens.TokenizerConfig, exclude_subjects: Path | None,
                   purpose: str) -> dict[str, Any]:
    """The single-node tokenize with a progress bar per split on stderr: its summary (or one error line)."""
    try:
        with Progress(console=err, transient=True) as progress:
            bars: dict[str, Any] = {}

            def report(split: str, done: int, total: int) -> None:
                if split not in bars:
                    bars[split] = progress.add_task(f"encoding {split}", total=total)
                progress.update(bars[split], completed=done)

            return tokens.tokenize(db, out, cfg, progress=report, exclude_subjects=opt_out_list(exclude_subjects),
                                   purpose=purpose)
    except (tokens.TokenizeError, purposes.PurposeError) as exc:
        fail(str(exc))
    except duckdb.OutOfMemoryException as exc:
        fail(f"DuckDB ran out of the memory budget while tokenizing {db} ({first_line(exc)}); {out} was left as it "
             "was. Give it more with `foresight --memory SIZE tokenize ...` (or FORESIGHT_MEMORY)", code=4)
    except duckdb.Error as exc:
        fail(f"DuckDB error while tokenizing {db} ({out} was left as it was): {first_line(exc)}", code=4)


def _encode_in_model_vocabulary(db: Path, out: Path, model: Path, exclude_subjects: Path | None,
                                purpose: str) -> dict[str, Any]:
    """:func:`foresight.evaluate.crosssource.encode_in_vocabulary`, its errors as one line."""
    from foresight.evaluate.crosssource import encode_in_vocabulary

    if not db.exists():
        fail(f"{db}: warehouse not found")
    if not (model / "vocab.json").exists():
        fail(f"{model}: no vocab.json: not a trained model directory")
    try:
        return encode_in_vocabulary(db, model, out, purpose=purpose, exclude_subjects=opt_out_list(exclude_subjects))
    except (purposes.PurposeError, tokens.TokenFolderError, ValueError) as exc:
        fail(str(exc))


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
    from foresight import simulate as sim

    formats = [f.strip().lower() for item in format for f in item.split(",") if f.strip()]
    bad = sorted(set(formats) - set(sim.FORMATS))
    if bad or not formats:
        fail(f"unknown --format {', '.join(bad) or '(none)'}; choose from {', '.join(sim.FORMATS)}")
    cfg = None
    if config is not None:
        try:
            cfg = json.loads(config.read_text())
            cfg = cfg.get("config", cfg)  # a simulator.json written by an earlier run works too
        except (OSError, ValueError) as exc:
            fail(f"{config}: cannot read the configuration: {exc}")
    try:
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task(f"simulating {subjects:,} subjects", total=None)
            result = sim.simulate(
                subjects, out, seed=seed, formats=formats, notes=notes, config=cfg, chunk_size=chunk_size,
                workers=workers, on_chunk=lambda done, total: progress.update(task, completed=done, total=total))
    except (ValueError, KeyError) as exc:
        fail(f"invalid simulator configuration: {exc}")
    except OSError as exc:
        fail(f"{out}: cannot write: {exc}")
    emit(result, as_json, f"{result['subjects']:,} subjects, {result['events']:,} events "
         f"({', '.join(result['formats'])}{', notes' if notes else ''}) in {result['seconds']:.1f}s -> {out}")
