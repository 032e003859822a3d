"""Built-in cohort simulator with known hazards: the project's embedded default data and its oracle.

Lives are simulated in continuous time from birth to death or the data cut-off: demographics, chronic conditions
whose onset hazards depend on age, sex and other conditions (obesity -> type 2 diabetes -> CKD, hypertension ->
heart failure, smoking -> COPD, ...), primary-care visits with vitals, labs that drift with disease and
medications started after diagnoses, and hospital stays (emergency by cause, or elective) whose hazard rises with
comorbidity, prior admissions and a recent discharge, with their length, ICU transfer, in-hospital death and
discharge coding. Admissions peak in winter. Codes are real: ICD-10-CM, ICD-10-PCS, ATC and LOINC in MEDS;
SNOMED CT, RxNorm and LOINC in the Synthea-style CSV.

Modules: :mod:`~foresight.simulate.catalog` (codes), :mod:`~foresight.simulate.model` (every hazard, one JSON
configuration), :mod:`~foresight.simulate.state` (a run's rows and output columns),
:mod:`~foresight.simulate.engine` (the vectorised simulation), :mod:`~foresight.simulate.cohort` (a chunk of the
cohort), :mod:`~foresight.simulate.writers` (MEDS, Synthea CSV, notes), :mod:`~foresight.simulate.history` (a
recorded history and the state rebuilt from it) and :mod:`~foresight.simulate.oracle` (true risks given a recorded
history), with :mod:`~foresight.simulate.stay_oracle` (the outcomes of a stay in progress, in closed form).

>>> from foresight.simulate import simulate, Oracle        # doctest: +SKIP
>>> simulate(2000, "work/sim", seed=1)                     # doctest: +SKIP
>>> Oracle.from_dir("work/sim").true_risk("work/sim", "2025-01-01", 30, "admission")  # doctest: +SKIP
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from foresight.simulate import catalog as cat
from foresight.simulate import writers
from foresight.simulate.cohort import simulate_chunk
from foresight.simulate.history import read_history
from foresight.simulate.model import DEFAULT_CONFIG, Model, default_config
from foresight.simulate.oracle import EVENTS, Oracle, Risk, WeeklyExpectation, true_risk
from foresight.simulate.stay_oracle import STAY_EVENTS

__all__ = ["DEFAULT_CONFIG", "EVENTS", "FORMATS", "STAY_EVENTS", "Model", "Oracle", "Risk", "WeeklyExpectation",
           "default_config", "read_history", "simulate", "true_risk"]

FORMATS = ("meds", "synthea")
DEFAULT_CHUNK = 10_000  # subjects per chunk = per MEDS shard (as `foresight export meds` shards)


def simulate(
    subjects: int,
    out: str | Path,
    *,
    seed: int = 0,
    formats: Sequence[str] = ("meds",),
    notes: bool = False,
    config: dict[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    workers: int = 1,
    first_subject_id: int = 1,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Simulate ``subjects`` people and write them to ``out`` in each of ``formats``.

    Deterministic given (seed, subjects, chunk_size, config): chunk ``i`` holds subjects
    ``first_subject_id + i * chunk_size`` onwards and is seeded by ``(seed, i)``, whatever ``workers`` is.
    Memory stays flat: each worker holds one chunk and writes it before the next. Returns a summary
    (subjects, events, per-format row counts, seconds, out).
    """
    t0 = time.perf_counter()
    if subjects < 1:
        raise ValueError("subjects must be at least 1")
    bad = set(formats) - set(FORMATS)
    if bad or not formats:
        raise ValueError(f"unknown format(s) {sorted(bad)}; choose from {', '.join(FORMATS)}")
    model = Model.from_config(config)  # validates the configuration before any work
    out = _clear_outputs(Path(out))
    n_chunks = -(-subjects // chunk_size)
    jobs = [(model.config, seed, i, min(chunk_size, subjects - i * chunk_size), first_subject_id + i * chunk_size,
             str(out), tuple(formats), notes) for i in range(n_chunks)]
    results = _run_chunks(jobs, workers, on_chunk)
    meta = {
        "config": model.config,
        "seed": seed,
        "subjects": subjects,
        "chunk_size": chunk_size,
        "first_subject_id": first_subject_id,
        "formats": list(formats),
        "notes": notes,
        "latent_state": "none: every hazard depends only on recorded events (see foresight.simulate.oracle)",
        "events": int(sum(r["events"] for r in results)),
        "simulated_lives": int(sum(r["simulated"] for r in results)),
        "deaths": int(sum(r["deaths"] for r in results)),
        "admissions": int(sum(r["admissions"] for r in results)),
    }
    rows = _finish_outputs(out, meta, results, n_chunks)
    return {
        "subjects": subjects,
        "events": meta["events"],
        "deaths": meta["deaths"],
        "admissions": meta["admissions"],
        "chunks": n_chunks,
        "formats": list(formats),
        "rows": rows,
        "seed": seed,
        "out": str(out),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _clear_outputs(out: Path) -> Path:
    """``out``, created, without the outputs of an earlier run (so a smaller rerun leaves no stale shards)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / "data", out / "csv", out / ".parts"):
        if stale.exists():
            shutil.rmtree(stale)
    (out / "notes.csv").unlink(missing_ok=True)
    return out


def _run_chunks(jobs: list[tuple], workers: int, on_chunk: Callable[[int, int], None] | None
                ) -> list[dict[str, Any]]:
    """Every chunk's summary, in chunk order (in worker processes when ``workers > 1``)."""
    results: list[dict[str, Any]] = []
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            results.append(_run_chunk(*job))
            if on_chunk:
                on_chunk(len(results), len(jobs))
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        for res in pool.map(_run_chunk_star, jobs):
            results.append(res)
            if on_chunk:
                on_chunk(len(results), len(jobs))
    return results


def _finish_outputs(out: Path, meta: dict[str, Any], results: list[dict[str, Any]], n_chunks: int
                    ) -> dict[str, dict[str, int]]:
    """Metadata, static files and the chunks' part files joined per format; returns rows per format and file."""
    rows: dict[str, dict[str, int]] = {}
    if "meds" in meta["formats"]:
        first = meta["first_subject_id"]
        ids = np.arange(first, first + meta["subjects"], dtype=np.int64)
        writers.write_meds_metadata(out, ids, meta)
        rows["meds"] = {"data": int(sum(r["meds_rows"] for r in results))}
    else:
        writers.write_simulator_json(out / "metadata", meta)
    parts = out / ".parts"
    if "synthea" in meta["formats"]:
        csv_dir = out / "csv"
        rows["synthea"] = writers.write_synthea_static(csv_dir)
        for name in writers.SYNTHEA_DATA_FILES:
            writers.assemble_parts(parts, csv_dir / f"{name}.csv", name, ",".join(writers.SYNTHEA_HEADERS[name]),
                                   n_chunks)
            rows["synthea"][name] = int(sum(r["synthea"].get(name, 0) for r in results))
    if meta["notes"]:
        writers.assemble_parts(parts, out / "notes.csv", "notes", "subject_id,time,text", n_chunks)
        rows["notes"] = {"notes": int(sum(r["notes"] for r in results))}
    if parts.exists():
        shutil.rmtree(parts)
    return rows


def _run_chunk_star(job: tuple) -> dict[str, Any]:
    return _run_chunk(*job)


def _run_chunk(config: dict[str, Any], seed: int, index: int, n: int, first_id: int, out: str,
               formats: tuple[str, ...], notes: bool) -> dict[str, Any]:
    """Simulate and write one chunk (runs in a worker process when ``workers > 1``)."""
    model = Model.from_config(config)
    chunk = simulate_chunk(model, seed, index, n, first_id)
    out_p = Path(out)
    code = chunk.events["code"]
    res: dict[str, Any] = {
        # events as in MEDS: the recorded events plus birth and three static facts per subject
        "events": int(code.size + 4 * n),
        "simulated": chunk.simulated,
        "deaths": int(np.isfinite(chunk.subjects["death"]).sum()),
        "admissions": int(np.isin(code, (cat.CODE_ID["ADMIT_EMERGENCY"], cat.CODE_ID["ADMIT_ELECTIVE"])).sum()),
        "meds_rows": 0, "synthea": {}, "notes": 0,
    }
    if "meds" in formats:
        res["meds_rows"] = writers.write_meds_chunk(chunk, out_p)
    if "synthea" in formats:
        res["synthea"] = writers.SyntheaWriter(out_p / ".parts", seed).write_chunk(chunk)
    if notes:
        key = "int" if "meds" in formats else "uuid"
        res["notes"] = writers.NotesWriter(out_p / ".parts", seed, key).write_chunk(chunk)
    return res
