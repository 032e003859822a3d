"""The chain's stages as plain functions with content fingerprints, for the ``pipeline`` flow and ``foresight demo``.

Each stage is a function from documented inputs to outputs on disk plus a small JSON-able summary, and each has
a fingerprint of exactly what decides its output (input file checksums, the warehouse's load history, the
tokenized data, the model's checksum, the stage's parameters) and of whether its output is still on disk. The
Prefect flow uses the fingerprints as cache keys, so re-running with unchanged inputs skips the work, and a
deleted output is rebuilt.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from foresight import purposes, sources, tokens, warehouse
from foresight.evaluate import backtest_rates, evaluate_model
from foresight.forecast import Forecaster, forecast_cohort, load_task, plot_population, weekly_history
from foresight.hashing import sha256_file, sha256_json
from foresight.optout import hide_subjects, read_subjects_file
from foresight.simulate import Oracle, read_history
from foresight.train import TrainConfig, train
from privacy import signing
from privacy.audit import audit
from privacy.canaries import insert, load_manifest
from privacy.release import model_checksum, release


@dataclass
class PipelinePaths:
    """Where a pipeline run keeps its artifacts (all under one work folder)."""

    workdir: Path
    db: Path = field(init=False)
    data: Path = field(init=False)
    canary_data: Path = field(init=False)
    model: Path = field(init=False)
    evaluation: Path = field(init=False)
    privacy: Path = field(init=False)
    registry: Path = field(init=False)
    forecast: Path = field(init=False)
    signing_key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.db = self.workdir / "warehouse.duckdb"
        self.data = self.workdir / "tokens"
        self.canary_data = self.workdir / "tokens+canaries"  # train split + canaries: for training and the audit only
        self.model = self.workdir / "model"
        self.evaluation = self.workdir / "evaluation"
        self.privacy = self.workdir / "privacy"
        self.registry = self.workdir / "registry"
        self.forecast = self.workdir / "forecast"
        self.signing_key = self.workdir / "keys" / signing.PRIVATE_KEY  # the run's own, unless one is given


# --- fingerprints ---------------------------------------------------------------------------------------------


@functools.cache
def code_fingerprint() -> str:
    """sha256 over the source of the ``foresight`` and ``privacy`` packages (Python and SQL files).

    Part of every cache key: a stage's output depends on the code that made it as much as on its inputs, so
    after an upgrade (a tokenizer fix, say) a cached step is re-run instead of serving what the old code made.
    """
    root = Path(__file__).resolve().parent
    files = [f for pkg in (root, root.parent / "privacy")
             for f in sorted(p for p in pkg.rglob("*") if p.suffix in (".py", ".sql", ".toml") and p.is_file())]
    return sha256_json([[str(f.relative_to(root.parent)), sha256_file(f)] for f in files])


def digest(*parts: Any) -> str:
    """sha256 of JSON-able parts and of the code (:func:`code_fingerprint`): the cache key of a stage."""
    return sha256_json([code_fingerprint(), *parts])


def files_fingerprint(path: str | Path) -> str:
    """sha256 over every file under ``path`` (relative name and content): what an input folder holds."""
    path = Path(path)
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    return sha256_json([[str(p.relative_to(path) if path.is_dir() else p.name), sha256_file(p)] for p in files])


def warehouse_fingerprint(db: str | Path) -> str:
    """What the warehouse holds: each source's latest load (its input checksums), or 'missing'.

    Re-loading identical inputs gives the same fingerprint, so downstream steps stay cached."""
    if not Path(db).exists():
        return "missing"
    with warehouse.connect(db, read_only=True) as con:
        rows = con.execute(
            "SELECT source, arg_max(input_checksums::VARCHAR, started_at) FROM etl_runs GROUP BY source ORDER BY 1"
        ).fetchall()
    return digest(rows) if rows else "missing"


def warehouse_dates(db: str | Path, con: Any = None) -> tuple[datetime | None, datetime | None]:
    """The first and last event times in the warehouse ((None, None) when it holds no events); births do not count
    as the first (they date a life, not the records). ``con``: an open connection to it, else one is opened
    read-only."""
    if con is None:
        with warehouse.connect(db, read_only=True) as own:
            return warehouse_dates(db, own)
    first, last = con.execute("SELECT min(time) FILTER (WHERE code <> 'MEDS_BIRTH'), max(time) FROM events"
                              ).fetchall()[0]
    return first, last


def resolve_as_of(db: str | Path, as_of: datetime | str | None) -> datetime | None:
    """``as_of`` as a date: ``"latest"`` is midnight after the warehouse's last event day, so every loaded event
    is history. MIMIC-IV shifts each patient's dates into 2100-2200, where "today" finds nobody alive."""
    if as_of != "latest":
        return datetime.fromisoformat(as_of) if isinstance(as_of, str) else as_of
    _, last = warehouse_dates(db)
    if last is None:
        raise ValueError(f"as_of='latest': the warehouse {db} holds no events")
    return datetime.combine(last.date() + timedelta(days=1), datetime.min.time())


def empty_cohort_message(db: str | Path, as_of: datetime, con: Any = None, split: str | None = None) -> str:
    """Why a forecast has nobody to forecast for: the as_of date against the dates the warehouse holds."""
    first, last = warehouse_dates(db, con)
    held = f"its events run from {first:%Y-%m-%d} to {last:%Y-%m-%d}" if last else "it holds no events"
    among = f" in split {split!r}" if split else ""
    return (f"no subject{among} alive with events in the 3 years up to as_of={as_of:%Y-%m-%d} in {db}: {held}. "
            "Pick an as_of inside that range, or as_of='latest' (the day after the last event; MIMIC-IV dates are "
            "shifted into 2100-2200)")


def data_fingerprint(data_dir: str | Path) -> str:
    """The tokenized data: its vocabulary, shard indexes and planted canaries (content), or 'missing'."""
    d = Path(data_dir)
    needed = [d / "vocab.json", *(d / f"{s}.index.npy" for s in ("train", "tuning", "held_out"))]
    if not all(p.exists() for p in [*needed, d / tokens.MARKER]):  # unfinished or pre-marker: tokenize again
        return "missing"
    return digest([sha256_file(p) for p in needed],
                   [(d / f"{s}.bin").stat().st_size for s in ("train", "tuning", "held_out")],
                   canary_fingerprint(d, references=False))


def canary_fingerprint(data_dir: str | Path, references: bool = True) -> str:
    """The canary manifest of a data directory ('' without one), less its creation date so that re-planting the
    same canaries is not new data. The planted secrets are what training reads; the never-planted references
    (``references=True``) are an input of the audit only, so changing their number re-runs the audit, not training.
    """
    manifest = load_manifest(data_dir)
    if manifest is None:
        return ""
    return digest({k: v for k, v in manifest.items() if k != "created" and (references or k != "references")})


def model_fingerprint(model_dir: str | Path) -> str:
    """The model's release checksum (weights, config, vocabulary, card), or 'missing'."""
    if not (Path(model_dir) / "config.json").exists():
        return "missing"
    return model_checksum(model_dir)[0]


# --- stages -----------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = fn()
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["finished_at"] = datetime.now().isoformat(timespec="seconds")  # a cached result keeps its first date
    return out


def load_stage(source: str, input_path: Path, db: Path, exclude_subjects: Path | None = None,
               declaration: Path | None = None) -> dict[str, Any]:
    """ETL: ``input_path`` (a ``source``: mimic-iv, synthea, fhir, meds, notes) into the warehouse ``db``, without
    the subjects of the opt-out list ``exclude_subjects``; ``declaration``: the data's declarations file (provider
    and allowed purposes, :mod:`foresight.purposes`; None: an undeclared load)."""

    def run() -> dict[str, Any]:
        excluded = read_subjects_file(exclude_subjects) if exclude_subjects else None
        decl = purposes.read_declaration(declaration) if declaration else None
        with warehouse.connect(db) as con:
            summary = sources.load(source, con, input_path, exclude_subjects=excluded, declaration=decl).to_json()
        return {k: summary[k] for k in ("run_id", "subjects", "events", "rows_read", "rows_loaded",
                                         "rows_quarantined", "rows_dropped")}

    return _timed(run)


def warehouse_stage(db: Path) -> dict[str, Any]:
    """Start from an existing warehouse (the nightly ETL's) instead of loading: what it holds and its latest loads.

    Nothing is written; the tokenize step's cache key is the same load-history fingerprint, so a week without new
    loads reuses every step."""

    def run() -> dict[str, Any]:
        if not Path(db).exists():
            raise FileNotFoundError(f"source='warehouse': no warehouse at {db} (has the ETL run?)")
        fingerprint = warehouse_fingerprint(db)
        if fingerprint == "missing":
            raise ValueError(f"source='warehouse': {db} has no completed ETL run to start from")
        with warehouse.connect(db, read_only=True) as con:
            subjects, events = con.execute("SELECT count(DISTINCT subject_id), count(*) FROM events").fetchall()[0]
            loads = con.execute("SELECT source, max(started_at)::VARCHAR FROM etl_runs GROUP BY source ORDER BY 1"
                                ).fetchall()
        return {"source": "warehouse", "warehouse": str(db), "fingerprint": fingerprint, "subjects": subjects,
                "events": events, "latest_loads": dict(loads)}

    return _timed(run)


def purpose_stage(db: Path, purpose: str, exclude_subjects: Path | None = None) -> dict[str, Any]:
    """Check that every load whose rows would reach the tokens covers ``purpose`` (``PurposeError`` naming the
    first that does not); nothing is written. Returns the loads and a fingerprint of what decides the provenance
    (declarations, not run ids): cheap, so a flow runs it every time, even when later steps are cached, and an
    expired declaration stops a cached run too."""

    def run() -> dict[str, Any]:
        excluded = read_subjects_file(exclude_subjects) if exclude_subjects else None
        with warehouse.connect(db, read_only=True) as con:
            if excluded:
                hide_subjects(con, excluded)
            loads = purposes.loads_reaching(con)
        purposes.check_covered(loads, purpose)
        return {"purpose": purpose, "fingerprint": purposes.fingerprint(loads, purpose),
                "loads": [{k: lp.to_json()[k] for k in ("run_id", "source", "provider", "purposes", "expires")}
                          for lp in loads]}

    return _timed(run)


def tokenize_stage(db: Path, data: Path, min_subjects: int = 10, exclude_subjects: Path | None = None,
                   purpose: str = purposes.UNSPECIFIED) -> dict[str, Any]:
    """Vocabulary (train only) and packed shards for ``purpose`` (refused unless every load covers it);
    ``exclude_subjects`` (the opt-out list) is hidden here too, for a warehouse this run did not load itself."""

    def run() -> dict[str, Any]:
        excluded = read_subjects_file(exclude_subjects) if exclude_subjects else None
        s = tokens.tokenize(db, data, tokens.TokenizerConfig(min_subjects=min_subjects),
                               exclude_subjects=excluded, purpose=purpose)
        return {"vocab_size": s["vocab_size"], "tokens": s["tokens"], "subjects": s["subjects"], "purpose": purpose}

    return _timed(run)


CANARY_REPEATS = (1, 2, 4, 16)


def canary_stage(data: Path, out: Path, *, per_repeat: int, repeats: tuple[int, ...] = CANARY_REPEATS,
                 references: int = 5000, seed: int = 0) -> dict[str, Any]:
    """A copy of ``data`` with canary subjects in its train split (:func:`privacy.canaries.insert`), for training
    and the audit. Evaluation and forecasts keep using ``data`` and the warehouse, where no canary exists."""

    def run() -> dict[str, Any]:
        if out.exists():  # an earlier insertion (other data or parameters): never mix its files with this one's
            shutil.rmtree(out)
        m = insert(data, out, repeats=tuple(repeats), per_repeat=per_repeat, seed=seed, n_references=references)
        return {"data": str(out), "canaries": len(m["canaries"]), "canary_subjects": m["canary_subjects"],
                "canary_tokens": m["canary_tokens"], "repeats": m["repeats"], "per_repeat": m["per_repeat"],
                "references": len(m["references"]), "seed": seed}

    return _timed(run)


def train_stage(data: Path, model: Path, cfg: TrainConfig, log: Callable[[str], None] | None = None
                ) -> dict[str, Any]:
    """Train (resuming a previous run of the same configuration when its checkpoints are there)."""

    def run() -> dict[str, Any]:
        card = model / "foresight.json"
        if card.exists():  # a finished model of other data or options: start over rather than refuse
            shutil.rmtree(model)
        result = train(data, model, cfg, resume=True, log=log)
        return {"metrics": result.get("metrics", result), "model": str(model)}

    return _timed(run)


def evaluate_stage(model: Path, data: Path, db: Path, out: Path, *, tasks: list[str], as_of: datetime | None,
                   samples: int, max_points: int, oracle_dir: Path | None = None, max_rows: int | None = 200,
                   seed: int = 0) -> dict[str, Any]:
    """Evaluation report (next-event accuracy, risk tasks vs baselines and, on simulator data, the oracle)."""

    def run() -> dict[str, Any]:
        oracle = simulator_oracle(oracle_dir) if oracle_dir else None
        report = evaluate_model(model, data, db=db, tasks=[load_task(t) for t in tasks], as_of=as_of,
                                samples=samples, max_points=max_points, out_dir=out, oracle=oracle, seed=seed,
                                max_rows=max_rows)
        return {"report": report["report"], "next_event": report["next_event"], "tasks": report["tasks"],
                "calibration_plot": report.get("calibration_plot")}

    return _timed(run)


# the simulator's oracle events for the built-in tasks
ORACLE_EVENTS = {"admission_30d": "admission", "emergency_admission_30d": "emergency_admission",
                 "mortality_30d": "death", "icu_admission_30d": "icu_admission", "readmission_30d": "admission"}
# ... and for evaluate's admission tasks: outcomes of the stay in progress, within the task's window
ORACLE_STAY_EVENTS = {"in_hospital_mortality": "in_hospital_death", "icu_during_stay": "icu_during_stay",
                      "los_over_7d": "stay_over"}


def simulator_oracle(sim_dir: Path, extra_events: dict[str, str] | None = None) -> Callable[[Any, Any], Any]:
    """An ``oracle(task, points)`` for evaluate: the simulator's true risk for each (subject, time) pair.

    Admission tasks (in-hospital mortality, ICU during the stay, LOS > 7 days) get the exact probability of the
    stay's outcome (:meth:`Oracle.stay_risk`); a task the oracle cannot answer gets NaN (reported "no oracle").
    ``extra_events`` maps more task names to oracle events (e.g. a study's own as-of tasks).
    """
    orc = Oracle.from_dir(sim_dir)
    history = read_history(sim_dir, orc.model)  # parsed once, reused for every task
    events = {**ORACLE_EVENTS, **(extra_events or {})}

    def oracle(task: Any, points: Any) -> Any:
        event, stay_event = events.get(task.name), ORACLE_STAY_EVENTS.get(task.name)
        if (event is None and stay_event is None) or not len(points):
            return np.full(len(points), np.nan)
        times = np.array([np.datetime64(p.time, "us") for p in points])
        subjects = np.array([p.subject_id for p in points])
        if stay_event is not None:
            r = orc.stay_risk(history, times, stay_event, subjects=subjects, window_days=task.window_days)
        else:
            r = orc.true_risk(history, times, task.window_days, event, subjects=subjects)
        return np.asarray(r.probability, dtype=float)

    return oracle


def audit_stage(model: Path, data: Path, out: Path, progress: Callable[[str], None] | None = None,
                config: Path | None = None, signing_key: Path | None = None) -> dict[str, Any]:
    """The privacy audit and the gate's decision, with each canary repeat group's exposure when ``data`` (the data
    the model was trained on) holds canaries. ``config``: a gate TOML merged over ``privacy/gate_defaults.toml``.
    ``signing_key``: signs the report (``report.sig.json``), which the release requires."""

    def run() -> dict[str, Any]:
        report = audit(model, data, out, config=config, progress=progress, signing_key=signing_key)
        can = report["probes"]["canaries"]
        return {"decision": report["decision"], "valid": report["valid"], "reasons": report["reasons"],
                "report": report["written"], "signed": report.get("signed") or None,
                "canaries": None if can is None else [
                    {k: g[k] for k in ("repeats", "canaries", "exposed", "detected", "median_exposure_rank",
                                       "median_exposure_extrapolated")} for g in can["groups"]]}

    return _timed(run)


def release_stage(model: Path, registry: Path, signing_key: Path | None = None) -> dict[str, Any]:
    """Copy the audited model into the registry (refused unless its latest audit is signed by a key the registry
    trusts and passed); ``signing_key`` signs the release record, and a new registry pins its public key."""
    return _timed(lambda: release(model, registry, signing_key=signing_key))


def run_signing_key(paths: PipelinePaths, signing_key: Path | None) -> Path:
    """The key a run signs its audit and release with: ``signing_key`` (the operator's), else the run's own
    (``<workdir>/keys/signing.key``, created with mode 0600 on first use, its public half beside it)."""
    if signing_key is not None:
        return Path(signing_key)
    if not paths.signing_key.exists():
        signing.create_key(paths.signing_key)
    return paths.signing_key


def latest_release(registry: Path) -> Path | None:
    """The most recently released model in ``registry`` (its index), or None."""
    index = Path(registry) / "index.jsonl"
    if not index.exists():
        return None
    lines = [json.loads(x) for x in index.read_text().splitlines() if x.strip()]
    for entry in reversed(lines):
        if entry.get("kind", "release") == "release" and Path(entry["path"]).exists():  # not a trusted-key record
            return Path(entry["path"])
    return None


def forecast_stage(model: Path, db: Path, out: Path, *, as_of: datetime, horizon_days: float, samples: int,
                   split: str | None, max_subjects: int | None, codes: tuple[str, ...] = ("ADMIT//*",),
                   oracle_dir: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Weekly forecast for the cohort alive at ``as_of`` (JSON + PNG); with observed weeks after ``as_of``
    when the warehouse has them (a backtest), and the simulator's expected counts when it is simulated."""

    def run() -> dict[str, Any]:
        fc = Forecaster.from_pretrained(model)
        weeks = int(-(-horizon_days // 7))
        with warehouse.connect(db, read_only=True) as con:
            cohort = forecast_cohort(fc, con, as_of, horizon_days, samples=samples, codes=codes, split=split,
                                     max_subjects=max_subjects, history_weeks=26, seed=seed)
            if cohort.forecast is None:
                raise ValueError(empty_cohort_message(db, as_of, con, split))
            ids, result = cohort.subject_ids, cohort.forecast
            observed = weekly_history(con, ids, as_of + timedelta(days=7 * weeks), weeks, codes)
            last = con.execute("SELECT max(time) FROM events").fetchall()[0][0]
        payload = result.to_json()
        if last is not None and last >= as_of + timedelta(days=7 * weeks):
            payload["observed_after"] = [{"week_start": d.date().isoformat(), "observed": n} for d, n in observed]
            payload["backtest"] = backtest_rates(result.weeks, [n for _, n in observed])
        if oracle_dir is not None:
            payload["oracle_expected"] = oracle_weekly(oracle_dir, as_of, weeks, ids)
        out.mkdir(parents=True, exist_ok=True)
        (out / "forecast.json").write_text(json.dumps(payload, indent=1, default=str))
        plot = plot_population(result, out / "forecast.png")
        return {"json": str(out / "forecast.json"), "plot": str(plot), "cohort": len(ids),
                "forecast_total": sum(w["mean"] for w in result.weeks),
                "backtest": payload.get("backtest"), "oracle_total": (sum(payload["oracle_expected"])
                                                                       if "oracle_expected" in payload else None)}

    return _timed(run)


def oracle_weekly(sim_dir: Path, as_of: datetime, weeks: int, ids: list[int]) -> list[float]:
    """The simulator's expected weekly admissions for exactly this cohort."""
    table = ds.dataset(Path(sim_dir) / "data", format="parquet").to_table()
    table = table.filter(pc.is_in(table["subject_id"], value_set=pa.array(ids)))
    exp = Oracle.from_dir(sim_dir).expected_weekly_admissions(table, as_of, weeks=weeks)
    return [float(x) for x in exp.expected]
