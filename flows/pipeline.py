"""The ``pipeline`` flow: etl -> tokenize -> canaries -> train -> evaluate -> privacy audit -> release -> forecast.

Every step is a task calling a stage of :mod:`foresight.pipeline`. Steps whose inputs decide their output are
cached on content fingerprints (input file checksums, the warehouse's load history, the tokenized data, the
model checksum, the step's parameters, and whether the output is still on disk), so a re-run with unchanged
inputs skips them. I/O steps retry on transient errors. ``source="warehouse"`` starts from an existing warehouse
(the nightly ETL's) instead of loading one. Canary subjects are planted in a copy of the train split that only
training and the audit read, so the audit can show it would see memorisation. When the privacy gate does not
pass, the release is skipped with the gate's reasons and the forecast uses the last released model (or is
skipped if there is none).
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.retry import transient
from foresight import pipeline as P
from foresight.evaluate.risks import RISK_SAMPLES
from foresight.train import TrainConfig


def _key(*parts: Any) -> str:
    return P.digest(*parts)



# Cache keys are what decides each step's output (input contents and parameters). A step whose output has
# gone missing is re-run with refresh_cache (see the flow), so a deleted folder is rebuilt.


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=transient, persist_result=True,
      cache_key_fn=lambda ctx, p: _key("etl", p["source"], P.files_fingerprint(p["input_path"]), str(p["db"]),
                                       P.files_fingerprint(p["exclude_subjects"]) if p["exclude_subjects"] else "",
                                       P.files_fingerprint(p["declaration"]) if p.get("declaration") else ""))
def etl_step(source: str, input_path: Path, db: Path, exclude_subjects: Path | None,
             declaration: Path | None = None) -> dict[str, Any]:
    """Load the source into the warehouse (cached on the input files' contents and the declaration's)."""
    return P.load_stage(source, input_path, db, exclude_subjects, declaration)


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=transient, cache_policy=NO_CACHE)
def warehouse_step(db: Path) -> dict[str, Any]:
    """Start from an existing warehouse: check it holds a completed load and summarise it (nothing is written)."""
    return P.warehouse_stage(db)


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=transient, persist_result=True,
      cache_key_fn=lambda ctx, p: _key("tokenize", P.warehouse_fingerprint(p["db"]), p["min_subjects"],
                                       str(p["data"]),
                                       P.files_fingerprint(p["exclude_subjects"]) if p["exclude_subjects"] else "",
                                       p.get("purpose", "unspecified"), p.get("provenance", "")))
def tokenize_step(db: Path, data: Path, min_subjects: int, exclude_subjects: Path | None,
                  purpose: str = "unspecified", provenance: str = "") -> dict[str, Any]:
    """Vocabulary + shards (cached on what the warehouse holds, the opt-out list, the purpose and the loads'
    declarations: ``provenance``, the purpose step's fingerprint)."""
    return P.tokenize_stage(db, data, min_subjects, exclude_subjects, purpose)


@task(cache_policy=NO_CACHE)
def purpose_step(db: Path, purpose: str, exclude_subjects: Path | None) -> dict[str, Any]:
    """Refuse the run when a load whose rows would reach the tokens does not cover its purpose (never cached:
    a declaration that expired since the last run stops it even when every later step is cached)."""
    return P.purpose_stage(db, purpose, exclude_subjects)


@task(persist_result=True,
      cache_key_fn=lambda ctx, p: _key("canaries", P.data_fingerprint(p["data"]), p["per_repeat"], p["repeats"],
                                       p["references"], str(p["out"])))
def canary_step(data: Path, out: Path, per_repeat: int, repeats: list[int], references: int) -> dict[str, Any]:
    """Plant canaries in a copy of the train split (cached on the data and the canary parameters)."""
    return P.canary_stage(data, out, per_repeat=per_repeat, repeats=tuple(repeats), references=references)


@task(persist_result=True,
      cache_key_fn=lambda ctx, p: _key("train", P.data_fingerprint(p["data"]), asdict(p["cfg"]), str(p["model"])))
def train_step(data: Path, model: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Train the model (cached on the data and the training configuration)."""
    logger = get_run_logger()
    return P.train_stage(data, model, cfg, log=logger.info)


@task(persist_result=True,
      cache_key_fn=lambda ctx, p: _key("evaluate", P.model_fingerprint(p["model"]), P.data_fingerprint(p["data"]),
                                       p["tasks"], p["as_of"], p["samples"], p["max_points"], str(p["oracle_dir"]),
                                       str(p["out"])))
def evaluate_step(model: Path, data: Path, db: Path, out: Path, tasks: list[str], as_of: datetime | None,
                  samples: int, max_points: int, oracle_dir: Path | None) -> dict[str, Any]:
    """Evaluation report (cached on the model checksum)."""
    return P.evaluate_stage(model, data, db, out, tasks=tasks, as_of=as_of, samples=samples,
                            max_points=max_points, oracle_dir=oracle_dir)


@task(persist_result=True,
      cache_key_fn=lambda ctx, p: _key("audit", P.model_fingerprint(p["model"]), P.data_fingerprint(p["data"]),
                                       P.canary_fingerprint(p["data"]), str(p["out"]),
                                       P.files_fingerprint(p["config"]) if p["config"] else "",
                                       str(p.get("signing_key") or "")))
def audit_step(model: Path, data: Path, out: Path, config: Path | None,
               signing_key: Path | None = None) -> dict[str, Any]:
    """Privacy audit and gate decision, the report signed with ``signing_key`` (cached on the model checksum, the
    data with its canaries and their references, the gate config's contents and the key)."""
    logger = get_run_logger()
    return P.audit_stage(model, data, out, progress=logger.info, config=config, signing_key=signing_key)


def _fresh(step: Any, output_missing: bool) -> Any:
    """The step, forced to run again (and refresh its cache) when its output is no longer on disk."""
    return step.with_options(refresh_cache=True) if output_missing else step


@task(cache_policy=NO_CACHE)
def release_step(model: Path, registry: Path, signing_key: Path | None = None) -> dict[str, Any]:
    """Copy the audited model into the registry (the library refuses unless the signed audit passed)."""
    return P.release_stage(model, registry, signing_key)


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=transient, cache_policy=NO_CACHE)
def forecast_step(model: Path, db: Path, out: Path, as_of: datetime, horizon_days: float, samples: int,
                  split: str | None, max_subjects: int | None, oracle_dir: Path | None) -> dict[str, Any]:
    """Weekly admissions forecast with intervals (and a backtest when the outcome weeks are known)."""
    return P.forecast_stage(model, db, out, as_of=as_of, horizon_days=horizon_days, samples=samples, split=split,
                            max_subjects=max_subjects, oracle_dir=oracle_dir)


def _warehouse(source: str, input: Path, paths: P.PipelinePaths, exclude_subjects: Path | None,
               declaration: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The warehouse the run reads and its step's summary: ``input`` itself for ``source="warehouse"``, else the
    run's own, loaded from ``input`` (with its ``declaration``)."""
    if source == "warehouse":
        return input, warehouse_step(input)
    return paths.db, _fresh(etl_step, not paths.db.exists())(source, input, paths.db, exclude_subjects,
                                                             declaration)


def _plant_canaries(paths: P.PipelinePaths, canaries: int, repeats: list[int] | None, references: int
                    ) -> tuple[Path, dict[str, Any]]:
    """The data training and the audit read, and the canary step's summary. Canaries go only in a copy that
    training and the audit read: evaluation (whose baselines fit on the train split) and forecasts (from the
    warehouse) never see a synthetic subject."""
    if not canaries:
        return paths.data, {"skipped": True, "reason": "canaries=0: the audit cannot show it would see memorisation"}
    gone = P.data_fingerprint(paths.canary_data) == "missing" or not (paths.canary_data / "canaries.json").exists()
    summary = _fresh(canary_step, gone)(paths.data, paths.canary_data, canaries, list(repeats or P.CANARY_REPEATS),
                                        references)
    return paths.canary_data, summary


@flow(name="pipeline", log_prints=True)
def pipeline(
    source: str,
    input: Path,
    workdir: Path = Path("work/pipeline"),
    as_of: datetime | Literal["latest"] | None = None,
    min_subjects: int = 10,
    canaries: int = 5,
    canary_repeats: list[int] | None = None,
    canary_references: int = 5000,
    train_options: dict[str, Any] | None = None,
    tasks: list[str] | None = None,
    eval_samples: int = RISK_SAMPLES,
    eval_points: int = 300,
    eval_at: str = "discharges",
    horizon_days: float = 28,
    forecast_samples: int = 20,
    forecast_split: str | None = None,
    forecast_max_subjects: int | None = None,
    oracle_dir: Path | None = None,
    exclude_subjects: Path | None = None,
    registry: Path | None = None,
    forecast_unreleased: bool = False,
    privacy_config: Path | None = None,
    signing_key: Path | None = None,
    purpose: str = "unspecified",
    declaration: Path | None = None,
    forecast_db: Path | None = None,
    forecast_oracle_dir: Path | None = None,
) -> dict[str, Any]:
    """The whole chain for one source; returns every stage's summary (and its seconds).

    ``source``: a loader (mimic-iv, synthea, fhir, meds, notes) reading ``input`` into ``workdir``'s own
    warehouse, or ``"warehouse"``: ``input`` is an existing warehouse file (the nightly ETL's), used as it is
    (the ETL is skipped; later steps are cached on its latest loads' input checksums).
    ``as_of``: the forecast date (no forecast without one); ``"latest"`` is the day after the warehouse's last
    event. ``canaries``: canary subjects planted per repeat count in ``canary_repeats`` (default 1, 2, 4, 16) in a
    copy of the train split that only training and the privacy audit read, each audited against
    ``canary_references`` never-planted sequences; 0 plants none, and the gate then says REVIEW: it cannot show
    that it would see memorisation. ``privacy_config``: a gate TOML merged over ``privacy/gate_defaults.toml``.
    ``eval_at``: risk tasks are scored at each held-out discharge ("discharges", the readmission framing, where
    30-day risks are high enough to measure on a small cohort) or for everyone alive at ``as_of`` ("as_of").
    ``forecast_unreleased``: when no model has been released, forecast with the candidate model anyway and label
    the result as unreleased (for synthetic data such as the demo; never for real records in operation).
    ``signing_key``: the operator's Ed25519 key (``foresight keys init``) that signs the audit report and the
    release record; default: the run's own, ``<workdir>/keys/signing.key``, created on first use (the registry pins
    the key of its first signed release, so releases into a shared registry need the operator's key).
    ``purpose``: the run's data-use purpose (e.g. ``research``, ``planning``); every load reaching the tokens must
    list it in its declaration, else the run stops before tokenizing (``unspecified``, the default, is covered only
    by undeclared loads). ``declaration``: the declarations file (JSON/YAML: provider, purposes, optional
    controller and expires) recorded with this run's ETL load; see :mod:`foresight.purposes`.
    ``forecast_db``: the warehouse of the population to forecast (a catchment), default the run's own;
    ``forecast_oracle_dir``: the simulator folder of that population (default ``oracle_dir``).
    """
    logger = get_run_logger()
    if eval_at not in ("discharges", "as_of"):
        raise ValueError(f"eval_at must be 'discharges' or 'as_of', not {eval_at!r}")
    if canaries < 0:
        raise ValueError(f"canaries must be 0 (none) or more per repeat count, not {canaries}")
    paths = P.PipelinePaths(Path(workdir))
    registry = Path(registry) if registry else paths.registry
    out: dict[str, Any] = {"workdir": str(paths.workdir)}
    db, out["etl"] = _warehouse(source, Path(input), paths, exclude_subjects,
                                Path(declaration) if declaration else None)
    as_of = P.resolve_as_of(db, as_of)  # after the ETL: "latest" means what the warehouse holds now
    out["purpose"] = purpose_step(db, purpose, exclude_subjects)
    out["tokenize"] = _fresh(tokenize_step, P.data_fingerprint(paths.data) == "missing")(
        db, paths.data, min_subjects, exclude_subjects, purpose, out["purpose"]["fingerprint"])
    train_data, out["canaries"] = _plant_canaries(paths, canaries, canary_repeats, canary_references)
    train_cfg = TrainConfig.from_dict(train_options or {"preset": "tiny", "max_steps": 300})
    out["train"] = _fresh(train_step, P.model_fingerprint(paths.model) == "missing")(
        train_data, paths.model, train_cfg)
    out["evaluate"] = _fresh(evaluate_step, not (paths.evaluation / "report.json").exists())(
        paths.model, paths.data, db, paths.evaluation, tasks or ["admission_30d"],
        as_of if eval_at == "as_of" else None, eval_samples, eval_points, oracle_dir)
    key = P.run_signing_key(paths, Path(signing_key) if signing_key else None)
    out["privacy"] = _fresh(audit_step, not (paths.model / "privacy" / "report.sig.json").exists())(
        paths.model, train_data, paths.privacy, Path(privacy_config) if privacy_config else None, key)
    if out["privacy"]["decision"] == "PASS":
        out["release"] = release_step(paths.model, registry, key)
    else:
        out["release"] = {"skipped": True, "reason": f"privacy gate decided {out['privacy']['decision']}",
                          "reasons": out["privacy"]["reasons"]}
        logger.warning("release skipped: the privacy gate decided %s", out["privacy"]["decision"])
    released = P.latest_release(registry)
    if as_of is None:
        out["forecast"] = {"skipped": True, "reason": "no as_of date given"}
    elif released is None and not forecast_unreleased:
        out["forecast"] = {"skipped": True, "reason": f"no released model in {registry} yet"}
        logger.warning("forecast skipped: %s holds no released model", registry)
    else:
        model = released or paths.model
        if released is not None and out["privacy"]["decision"] != "PASS":
            logger.warning("forecast uses the last released model, %s, not this run's candidate", released)
        out["forecast"] = forecast_step(model, Path(forecast_db) if forecast_db else db, paths.forecast, as_of,
                                        horizon_days, forecast_samples, forecast_split, forecast_max_subjects,
                                        forecast_oracle_dir or oracle_dir)
        out["forecast"]["model"] = str(model)
        out["forecast"]["model_checksum"] = P.model_fingerprint(model)
        out["forecast"]["model_released"] = released is not None
        if released is None:
            logger.warning("forecast made with the UNRELEASED candidate model (forecast_unreleased=True)")
    return out
