"""The ``pipeline`` flow: etl -> tokenize -> train -> evaluate -> privacy audit -> release -> forecast.

Every step is a task calling a stage of :mod:`foresight.pipeline`. Steps whose inputs decide their output are
cached on content fingerprints (input file checksums, the warehouse's load history, the tokenized data, the
model checksum, the step's parameters, and whether the output is still on disk), so a re-run with unchanged
inputs skips them. I/O steps retry on transient errors. When the privacy gate does not pass, the release is
skipped with the gate's reasons and the forecast uses the last released model (or is skipped if there is none).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from foresight import pipeline as P


def _key(*parts: Any) -> str:
    return P.digest(*parts)


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False


# Cache keys are what decides each step's output (input contents and parameters). A step whose output has
# gone missing is re-run with refresh_cache (see the flow), so a deleted folder is rebuilt.


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient, persist_result=True,
      cache_key_fn=lambda ctx, p: _key("etl", p["source"], P.files_fingerprint(p["input_path"]), str(p["db"]),
                                       P.files_fingerprint(p["exclude_subjects"]) if p["exclude_subjects"] else ""))
def etl_step(source: str, input_path: Path, db: Path, exclude_subjects: Path | None) -> dict[str, Any]:
    """Load the source into the warehouse (cached on the input files' contents)."""
    return P.load_stage(source, input_path, db, exclude_subjects)


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=_transient, persist_result=True,
      cache_key_fn=lambda ctx, p: _key("tokenize", P.warehouse_fingerprint(p["db"]), p["min_subjects"],
                                       str(p["data"])))
def tokenize_step(db: Path, data: Path, min_subjects: int) -> dict[str, Any]:
    """Vocabulary + shards (cached on what the warehouse holds)."""
    return P.tokenize_stage(db, data, min_subjects)


@task(persist_result=True,
      cache_key_fn=lambda ctx, p: _key("train", P.data_fingerprint(p["data"]), p["options"], str(p["model"])))
def train_step(data: Path, model: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Train the model (cached on the data and the training options)."""
    logger = get_run_logger()
    return P.train_stage(data, model, options, log=logger.info)


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
                                       str(p["out"])))
def audit_step(model: Path, data: Path, out: Path) -> dict[str, Any]:
    """Privacy audit and gate decision (cached on the model checksum)."""
    logger = get_run_logger()
    return P.audit_stage(model, data, out, progress=logger.info)


def _fresh(step: Any, output_missing: bool) -> Any:
    """The step, forced to run again (and refresh its cache) when its output is no longer on disk."""
    return step.with_options(refresh_cache=True) if output_missing else step


@task(cache_policy=NO_CACHE)
def release_step(model: Path, registry: Path) -> dict[str, Any]:
    """Copy the audited model into the registry (the library refuses unless the audit passed)."""
    return P.release_stage(model, registry)


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_transient, cache_policy=NO_CACHE)
def forecast_step(model: Path, db: Path, out: Path, as_of: datetime, horizon_days: float, samples: int,
                  split: str | None, max_subjects: int | None, oracle_dir: Path | None) -> dict[str, Any]:
    """Weekly admissions forecast with intervals (and a backtest when the outcome weeks are known)."""
    return P.forecast_stage(model, db, out, as_of=as_of, horizon_days=horizon_days, samples=samples, split=split,
                            max_subjects=max_subjects, oracle_dir=oracle_dir)


@flow(name="pipeline", log_prints=True)
def pipeline(
    source: str,
    input: Path,
    workdir: Path = Path("work/pipeline"),
    as_of: datetime | None = None,
    min_subjects: int = 10,
    train_options: dict[str, Any] | None = None,
    tasks: list[str] | None = None,
    eval_samples: int = 20,
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
) -> dict[str, Any]:
    """The whole chain for one source; returns every stage's summary (and its seconds).

    ``eval_at``: risk tasks are scored at each held-out discharge ("discharges", the readmission framing, where
    30-day risks are high enough to measure on a small cohort) or for everyone alive at ``as_of`` ("as_of").
    ``forecast_unreleased``: when no model has been released, forecast with the candidate model anyway and label
    the result as unreleased (for synthetic data such as the demo; never for real records in operation).
    """
    logger = get_run_logger()
    if eval_at not in ("discharges", "as_of"):
        raise ValueError(f"eval_at must be 'discharges' or 'as_of', not {eval_at!r}")
    paths = P.PipelinePaths(Path(workdir))
    registry = Path(registry) if registry else paths.registry
    out: dict[str, Any] = {"workdir": str(paths.workdir)}
    out["etl"] = _fresh(etl_step, not paths.db.exists())(source, Path(input), paths.db, exclude_subjects)
    out["tokenize"] = _fresh(tokenize_step, P.data_fingerprint(paths.data) == "missing")(
        paths.db, paths.data, min_subjects)
    out["train"] = _fresh(train_step, P.model_fingerprint(paths.model) == "missing")(
        paths.data, paths.model, train_options or {"preset": "tiny", "max_steps": 300})
    out["evaluate"] = _fresh(evaluate_step, not (paths.evaluation / "report.json").exists())(
        paths.model, paths.data, paths.db, paths.evaluation, tasks or ["admission_30d"],
        as_of if eval_at == "as_of" else None, eval_samples, eval_points, oracle_dir)
    out["privacy"] = _fresh(audit_step, not (paths.model / "privacy" / "report.json").exists())(
        paths.model, paths.data, paths.privacy)
    if out["privacy"]["decision"] == "PASS":
        out["release"] = release_step(paths.model, registry)
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
        out["forecast"] = forecast_step(model, paths.db, paths.forecast, as_of, horizon_days, forecast_samples,
                                        forecast_split, forecast_max_subjects, oracle_dir)
        out["forecast"]["model"] = str(model)
        out["forecast"]["model_released"] = released is not None
        if released is None:
            logger.warning("forecast made with the UNRELEASED candidate model (forecast_unreleased=True)")
    return out
