"""``foresight demo``: the whole chain on the built-in simulator, in minutes, on a laptop CPU.

1. Simulate a cohort (default 10,000 lives to 2025-12-31; hospital admission hazards x3 so a small cohort has
   enough admissions to evaluate and forecast — the simulator's oracle knows the same hazards). The size and the
   training (one epoch of the train split: 1,600 steps of 2,048 tokens) come from the quality study
   (bench/quality.py, bench/RESULTS.md): at 3,000 lives and 400 steps the model was below the logistic
   regression on 30-day admission; at 10,000 lives and one epoch it ties it and beats the gradient-boosted one.
2. Run the ``pipeline`` Prefect flow: MEDS -> warehouse -> tokens (+ the pipeline's default canaries, 5 per
   repeat count 1, 2, 4, 16, in the copy training and the audit read) -> a tiny model trained with DeepSpeed ->
   evaluation (strict next-event accuracy; 30-day admission risk after each discharge vs baselines and the
   oracle) -> privacy audit and gate (the report signed with a key the demo creates in ``WORKDIR/keys``) ->
   release (into ``WORKDIR/registry``, which pins that key) -> a 12-week weekly admissions forecast from 2025-10-01 for
   a catchment the model never saw (a second simulated population of 10,000 lives, the same hazards, in its own
   warehouse: ~27 admissions a week), backtested against the weeks that followed and the oracle's expectation.
   The gate judges each slice at the error rate its size resolves, so a sane model of this size can PASS and be
   released; when it is not released, the demo forecasts with the candidate model and labels it as unreleased.
3. Print where every artifact is and a table of the headline numbers.

A second run reuses every cached step (same inputs, same parameters), so it takes seconds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from foresight.cli.model import calibration_change, paired_summary
from foresight.simulate import default_config, simulate
from privacy import signing

DEMO_SUBJECTS = 10_000
CATCHMENT_SUBJECTS = 10_000  # the population the demo forecasts: nobody in it reached the model
CATCHMENT_FIRST_ID = 10_000_001  # its subject ids, apart from the training cohort's
DEMO_AS_OF = datetime(2025, 10, 1)
DEMO_HORIZON_DAYS = 84
ADMISSION_SCALE = 3.0
# the simulated data's declaration (foresight.purposes): the demo runs for one of its purposes, as a real run must
DEMO_DECLARATION = {"provider": "Foresight simulator", "controller": "none: simulated lives, no real person",
                    "purposes": ["research", "planning", "education"]}
DEMO_PURPOSE = "planning"
TRAIN_OPTIONS = {"preset": "tiny", "seq_len": 256, "micro_batch": 8, "max_steps": 1600, "warmup_steps": 80,
                 "lr": 3e-3, "min_lr": 3e-4, "eval_every": 0, "checkpoint_every": 800, "log_every": 100}


def demo_config(scale: float = ADMISSION_SCALE) -> dict[str, Any]:
    """The simulator's default hazards with every admission process scaled by ``scale``."""
    cfg = default_config()
    for proc in cfg["processes"].values():
        if proc.get("kind") == "admission":
            proc["per_1000py"] = [r * scale for r in proc["per_1000py"]]
    return cfg


def simulate_cohort(out: Path, subjects: int, seed: int) -> dict[str, Any]:
    """Simulate once; a folder already holding the same cohort (subjects, seed, config) is reused."""
    stamp = out / "demo_cohort.json"
    want = {"subjects": subjects, "seed": seed, "admission_scale": ADMISSION_SCALE}
    if stamp.exists() and json.loads(stamp.read_text()) == want and (out / "data").exists():
        return {"reused": True, **want}
    summary = simulate(subjects, out, seed=seed, config=demo_config())
    stamp.write_text(json.dumps(want))
    return {"reused": False, **want, "events": summary.get("events")}


def load_catchment(out: Path, subjects: int, seed: int) -> tuple[Path, dict[str, Any]]:
    """A second simulated population (same hazards, ids from CATCHMENT_FIRST_ID) in a warehouse of its own: what
    the demo forecasts. Reused when the same population is already there. Returns (warehouse, summary)."""
    from foresight import sources, warehouse

    stamp, db = out / "catchment.json", out / "catchment.duckdb"
    want = {"subjects": subjects, "seed": seed, "admission_scale": ADMISSION_SCALE, "first_id": CATCHMENT_FIRST_ID}
    if stamp.exists() and json.loads(stamp.read_text()) == want and db.exists():
        return db, {"reused": True, **want}
    stamp.unlink(missing_ok=True)
    db.unlink(missing_ok=True)
    simulate(subjects, out / "sim", seed=seed, config=demo_config(), first_subject_id=CATCHMENT_FIRST_ID)
    with warehouse.connect(db) as con:
        loaded = sources.load("meds", con, out / "sim")
    stamp.write_text(json.dumps(want))
    return db, {"reused": False, **want, "events": loaded.events}


def run_demo(workdir: Path, *, subjects: int = DEMO_SUBJECTS, seed: int = 1, console: Any = None) -> dict[str, Any]:
    """Simulate, run the pipeline flow, and return its summary with per-stage seconds."""
    console = console or Console(stderr=True)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    declaration = workdir / "declaration.json"  # the simulated data's provider and purposes, recorded by the ETL
    declaration.write_text(json.dumps(DEMO_DECLARATION, indent=1))
    key = workdir / "keys" / signing.PRIVATE_KEY  # the demo's signing key (mode 0600), made once per workdir
    if not key.exists():
        signing.create_key(key)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the demo shows its own progress
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with console.status("simulating the cohort") as status:
        sim = simulate_cohort(workdir / "sim", subjects, seed)
        timings["simulate"] = round(time.perf_counter() - t0, 2)
        status.update("simulating the catchment to forecast")
        t_c = time.perf_counter()
        catchment_db, catchment = load_catchment(workdir / "catchment", CATCHMENT_SUBJECTS, seed + 1)
        timings["catchment"] = round(time.perf_counter() - t_c, 2)
        status.update("running the pipeline flow (etl -> tokenize -> train -> evaluate -> privacy -> forecast)")
        handler = _StatusHandler(status)
        logging.getLogger("prefect").addHandler(handler)
        try:
            # imported here, not at the top: Prefect reads its settings (the defaults set above) when imported
            from flows.pipeline import pipeline

            t1 = time.perf_counter()
            result = pipeline(
                source="meds", input=workdir / "sim", workdir=workdir, as_of=DEMO_AS_OF, min_subjects=10,
                train_options=TRAIN_OPTIONS, tasks=["admission_30d"], eval_samples=3, eval_points=500,
                eval_at="discharges",
                horizon_days=DEMO_HORIZON_DAYS, forecast_samples=20, forecast_split=None,
                forecast_db=catchment_db, forecast_oracle_dir=workdir / "catchment" / "sim",
                oracle_dir=workdir / "sim", forecast_unreleased=True,  # synthetic data: show the forecast anyway
                signing_key=key,  # signs the audit report and the release record
                purpose=DEMO_PURPOSE, declaration=declaration,
            )
            timings["pipeline"] = round(time.perf_counter() - t1, 2)
        finally:
            logging.getLogger("prefect").removeHandler(handler)
    result["simulate"] = sim
    result["catchment"] = catchment
    started = datetime.fromtimestamp(time.time() - (time.perf_counter() - t0)).isoformat(timespec="seconds")
    result["timings"] = {**timings, **{
        k: (v["seconds"] if v.get("finished_at", started) >= started else "cached")
        for k, v in result.items() if isinstance(v, dict) and "seconds" in v}}
    result["timings"]["total"] = round(time.perf_counter() - t0, 2)
    (workdir / "demo_summary.json").write_text(json.dumps(result, indent=1, default=str))
    return result


class _StatusHandler(logging.Handler):
    """Shows the latest task-run line of the flow in the demo's spinner."""

    def __init__(self, status: Any) -> None:
        super().__init__(logging.INFO)
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "Task run" in msg or "task" in record.name:
            self.status.update(f"pipeline: {msg[:100]}")


def headline(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The numbers the demo prints, as (label, value) rows."""
    rows: list[tuple[str, str]] = []
    ne = result["evaluate"]["next_event"]
    rows.append(("next-event top-10 accuracy (strict)",
                 f"{ne['topk']['top10']:.3f}   (Markov baseline {ne['baselines']['markov']['top10']:.3f}, "
                 f"frequency {ne['baselines']['frequency']['top10']:.3f})"))
    for t in result["evaluate"]["tasks"]:
        def auc(name: str, t: dict[str, Any] = t) -> str:
            if name not in t:
                return "n/a"
            m, ci = t[name]["metrics"], t[name]["ci95"].get("auroc")
            return f"{m['auroc']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

        # the evaluation also scores admission-time tasks (in-hospital mortality, ICU, length of stay)
        what = ("30-day admission AUROC after discharge" if t["task"] == "admission_30d" and t.get("at", "discharges")
                == "discharges" else f"{t['task']} AUROC at {t.get('at', 'discharges')}")
        rows.append((f"{what} ({t['points']} points)",
                     f"model {auc('model')} | oracle {auc('oracle')} | logistic {auc('logistic_counts')} | "
                     f"GBM {auc('gbm_counts')}"))
        if t.get("paired"):  # the same points and patient resamples for both sides of each difference
            rows.append(("  paired differences (95% CI)", paired_summary(t["paired"])))
        if "model_calibrated" in t:  # recalibrated on tuning points, scored on the same held-out points
            rows.append(("  calibrated on tuning", calibration_change(t)))
            if any(k.startswith("model_calibrated-") for k in t["paired"]):
                rows.append(("  paired differences, calibrated", paired_summary(t["paired"], "model_calibrated")))
    fc = result.get("forecast", {})
    if fc.get("skipped"):
        rows.append(("weekly admissions forecast", f"skipped: {fc['reason']}"))
    else:
        bt = fc.get("backtest") or {}
        oracle = fc.get("oracle_total")
        label = "" if fc.get("model_released", True) else " (candidate model: not released by the gate)"
        who = f"catchment of {fc['cohort']:,} unseen people"
        rows.append((f"admissions over {DEMO_HORIZON_DAYS // 7} weeks, {who}{label}",
                     f"forecast {fc['forecast_total']:.1f} | observed {bt.get('observed_total', float('nan')):.0f}"
                     + (f" | oracle {oracle:.1f}" if oracle is not None else "")
                     + (f" | 90% band covered {bt['coverage90']:.0%} of weeks" if bt else "")))
    pv = result["privacy"]
    rows.append(("privacy gate", f"{pv['decision']}" + (f" — {pv['reasons'][0]}" if pv["reasons"] else "")))
    rel = result["release"]
    rows.append(("release", "skipped: " + rel["reason"] if rel.get("skipped") else f"released to {rel['path']}"))
    return rows


def artifacts(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Where the demo's artifacts are, as (label, path) rows."""
    wd = Path(result["workdir"])
    fc = result.get("forecast", {})
    return [
        ("warehouse", str(wd / "warehouse.duckdb")),
        ("model", str(wd / "model")),
        ("evaluation report", result["evaluate"]["report"]),
        ("calibration plot", result["evaluate"].get("calibration_plot") or "-"),
        ("privacy report (HTML)", next((p for p in result["privacy"].get("report") or [] if p.endswith(".html")),
                                       str(wd / "privacy" / "report.html"))),
        ("signing key (public; verify with `foresight registry verify`)", str(wd / "keys" / "signing.pub")),
        ("forecast plot", fc.get("plot", "-")),
        ("summary", str(wd / "demo_summary.json")),
    ]
