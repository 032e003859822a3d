"""Catchment-size weekly admission forecasts (issue 18): a rerunnable study.

1. **simulate** ``--lives`` lives with the simulator's DEFAULT hazards (no x3), load them into a warehouse,
   tokenize (cached under ``--out/cohort-n<lives>-s<seed>``);
2. **train** a tiny model ``--epochs`` epochs (default one) at a 1024-token context (cached);
3. **estimators**: at one as-of date, the model's expected admissions of the held-out cohort over 12 weeks by
   (a) Monte Carlo futures (events counted), (b) Rao-Blackwellised expected counts with 1-4 futures, (c) (b) on
   a weighted stratified subset of the people — each with its standard error and CPU seconds, so accuracy per
   CPU-second can be compared (efficiency = 1 / (se^2 x CPU s)); the simulator's oracle and what happened beside;
4. **backtest** at ``--origins`` rolling origins for each horizon in ``--horizons`` (weeks): MAPE, MASE,
   50/90% coverage and CRPS of emergency admissions per week for the model (open and closed cohort), seasonal
   naive, moving average, a quasi-Poisson GLM, ETS and the oracle; CPU seconds per model forecast.

Writes ``catchment.json`` and ``catchment.md`` (the rows for bench/RESULTS.md) under ``--out``::

    python bench/catchment.py --lives 10000 --out bench/out/catchment
    python bench/catchment.py --lives 100000 --out bench/out/catchment --max-subjects 3000   # the full study
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# this script's folder first on sys.path could shadow standard modules (bench/tokenize*.py): use the repo root
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def cohort(root: Path, lives: int, seed: int, config: dict[str, Any] | None = None) -> dict[str, Path]:
    """Simulated lives (the simulator's ``config``, default hazards when None) -> warehouse -> tokens, each step
    skipped when already done."""
    from foresight import sources, warehouse
    from foresight import tokens as T
    from foresight.simulate import default_config, simulate

    sim, db, tok = root / "sim", root / "warehouse.duckdb", root / "tokens"
    root.mkdir(parents=True, exist_ok=True)
    if not (sim / "metadata" / "simulator.json").exists():
        log(f"simulating {lives:,} lives ({'default hazards' if config is None else 'given hazards'})")
        simulate(lives, sim, seed=seed, config=config or default_config())
    if not db.exists():
        log("loading the warehouse")
        with warehouse.connect(db) as con:
            sources.load("meds", con, sim)
    if not (tok / "COMPLETE").exists():
        log("tokenizing")
        T.tokenize(db, tok, T.TokenizerConfig(min_subjects=10))
    return {"sim": sim, "db": db, "tokens": tok}


def train_tiny(tokens: Path, model: Path, context: int = 1024, micro_batch: int = 2,
               epochs: int = 1) -> dict[str, Any]:
    """``epochs`` epochs of the tiny preset (skipped when the model folder already holds that many steps).

    A model folder trained for fewer epochs continues from its last checkpoint with the longer cosine schedule
    (the learning rate climbs back to where the longer schedule is at that step: a warm restart)."""
    import numpy as np

    from foresight.train import TrainConfig, train

    total = int(np.load(tokens / "train.index.npy")["length"].sum())
    epoch_steps = max(1, math.ceil(total / (micro_batch * context)))
    steps = epochs * epoch_steps
    card = model / "foresight.json"
    if card.exists():
        metrics = json.loads(card.read_text()).get("metrics", {})
        if metrics.get("steps", 0) >= steps:
            return metrics
    # the warm-up belongs to the first epoch's schedule, so a longer run resumed from it keeps the same one
    cfg = TrainConfig(preset="tiny", seq_len=context, micro_batch=micro_batch, max_steps=steps,
                      warmup_steps=max(1, epoch_steps // 20), lr=3e-3, min_lr=3e-4, eval_every=0,
                      checkpoint_every=0, log_every=max(1, steps // 10))
    log(f"training tiny, context {context}: {steps:,} steps ({epochs} epoch(s) of {total:,} tokens)")
    # a run stopped part-way (its checkpoint saved on the signal), or a shorter run, continues from its checkpoint
    resume = (model / "checkpoints" / "latest").exists()
    return train(tokens, model, cfg, log=lambda m: None, resume=resume).get("metrics", {})


def estimators(fc: Any, db: Path, sim: Path, as_of: datetime, weeks: int, split: str,
               people_limit: int | None = None) -> list[dict[str, Any]]:
    """(a) Monte Carlo, (b) expected counts, (c) weighted subsets: the same cohort (``people_limit``: a seeded
    random part of it, the same for every estimator), total over ``weeks``."""
    from foresight import warehouse
    from foresight.forecast.backtest import simulator_oracle
    from foresight.forecast.cohorts import cohort_as_of, subsample
    from foresight.forecast.population import forecast_cohort

    codes = ("ADMIT//EMERGENCY",)
    with warehouse.connect(db, read_only=True) as con:
        people = subsample(cohort_as_of(con, as_of, split=split), people_limit, seed=0)
        con.execute("CREATE OR REPLACE TEMP TABLE study_people AS SELECT unnest(?::BIGINT[]) AS subject_id", [people])
        observed = int(con.execute(
            "SELECT count(*) FROM events JOIN study_people USING (subject_id) WHERE code = 'ADMIT//EMERGENCY' "
            "AND time >= ? AND time < ? + to_days(?)", [as_of, as_of, 7 * weeks]).fetchall()[0][0])
        oracle = float(simulator_oracle(sim, codes)(people, as_of, weeks).sum())
        options = [("a: monte_carlo", "monte_carlo", 8, None), ("b: expected", "expected", 1, None),
                   ("b: expected", "expected", 4, None), ("c: expected, weighted subset", "expected", 2,
                                                          max(50, len(people) // 4))]
        rows = []
        for label, method, samples, subset in options:
            log(f"estimator {label}, {samples} futures, {subset or len(people)} people")
            t0 = time.process_time()
            run = forecast_cohort(fc, con, as_of, 7 * weeks, samples=samples, codes=codes, split=split,
                                  history_weeks=0, method=method, max_subjects=subset, weighted=subset is not None,
                                  open_cohort=False, among=people)
            cpu = time.process_time() - t0
            f = run.forecast
            # Monte Carlo (and subsampling) standard error of the 12-week total; one future has no spread
            se = f.total["se"] if samples > 1 else float("nan")
            eff = round(1 / (se ** 2 * cpu), 4) if se > 0 else float("nan")
            rows.append({"estimator": label, "samples": samples, "people": len(run.subject_ids),
                         "cohort": run.cohort_size, "total": round(f.total["mean"], 2), "se": round(se, 3),
                         "cpu_s": round(cpu, 1), "efficiency": eff,
                         "oracle": round(oracle, 2), "observed": observed})
    return rows


def backtests(fc: Any, db: Path, sim: Path, origins: int, horizons: list[int], samples: int,
              max_subjects: int | None, split: str) -> list[dict[str, Any]]:
    from foresight import warehouse
    from foresight.forecast.backtest import run_backtest, simulator_oracle

    rows = []
    with warehouse.connect(db, read_only=True) as con:
        for h in horizons:
            log(f"backtest: {origins} origins x {h} weeks")
            res = run_backtest(fc, con, origins=origins, horizon_weeks=h, codes=("ADMIT//EMERGENCY",), split=split,
                               samples=samples, max_subjects=max_subjects,
                               oracle=simulator_oracle(sim, ("ADMIT//EMERGENCY",)), status=log)
            bias = mean_bias(res.rows)
            for name, m in res.methods.items():
                rows.append({"horizon_weeks": h, "method": name, **{k: round(v, 3) for k, v in m.items()},
                             "bias": bias.get(name), "bias_high": bias.get(f"{name}@high"),
                             "cpu_s_per_forecast": round(res.seconds_per_forecast, 1) if name == "model" else None})
            rows.append({"horizon_weeks": h, "method": "_origins", "origins": res.origins})
    return rows


def mean_bias(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per method, the mean of (forecast - observed) over every origin and week of a backtest's ``rows``: the sign
    MAPE and MASE hide (a forecast whose peaks are too low has a lower MAPE and a negative bias), and the same
    mean over the weeks whose observed count is above the method's median week (``<method>@high``)."""
    import numpy as np

    out: dict[str, float] = {}
    for name in sorted({r["method"] for r in rows}):
        obs = np.array([r["observed"] for r in rows if r["method"] == name], dtype=float)
        err = np.array([r["mean"] for r in rows if r["method"] == name], dtype=float) - obs
        high = obs > np.median(obs)
        out[name] = round(float(err.mean()), 3)
        out[f"{name}@high"] = round(float(err[high].mean()), 3) if high.any() else float("nan")
    return out


def markdown(study: dict[str, Any]) -> str:
    a = study["args"]
    lines = [f"### Catchment forecasts: {a['lives']:,} simulated lives (default hazards), tiny model, "
             f"{a.get('epochs', 1)} epoch(s), context 1024 — {study['date']}, 2-core CPU shared with other jobs "
             "(timings are upper bounds)",
             "", f"Command: `{study['command']}`", "",
             f"Estimators of the expected emergency admissions of the {a['split']} cohort over "
             f"{a['weeks']} weeks from {a['as_of']}:", "",
             "| estimator | futures | people | total | se | CPU s | efficiency 1/(se²·s) | oracle | observed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in study["estimators"]:
        lines.append(f"| {r['estimator']} | {r['samples']} | {r['people']:,} of {r['cohort']:,} | {r['total']} | "
                     f"{r['se']} | {r['cpu_s']} | {r['efficiency']} | {r['oracle']} | {r['observed']} |")
    lines += ["", "Rolling-origin backtest, emergency admissions per week:", "",
              "| horizon | method | MAPE | MASE | cov50 | cov90 | CRPS | bias all / busy weeks | CPU s / forecast |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in study["backtest"]:
        if r["method"] == "_origins":
            lines.append(f"| {r['horizon_weeks']} w | origins | {', '.join(r['origins'])} | | | | | | |")
            continue
        lines.append(f"| {r['horizon_weeks']} w | {r['method']} | {r['mape']} | {r['mase']} | {r['coverage50']} | "
                     f"{r['coverage90']} | {r['crps']} | {r.get('bias', '')} / {r.get('bias_high', '')} | "
                     f"{r['cpu_s_per_forecast'] or ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lives", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "catchment")
    p.add_argument("--origins", type=int, default=12)
    p.add_argument("--horizons", default="4,12", help="weeks, comma-separated")
    p.add_argument("--samples", type=int, default=2, help="futures per subject in the backtest")
    p.add_argument("--max-subjects", type=int, default=None, help="weighted stratified subset per origin")
    p.add_argument("--split", default="held_out")
    p.add_argument("--as-of", default="2024-06-01", help="the estimators' comparison date")
    p.add_argument("--weeks", type=int, default=12, help="the estimators' horizon")
    p.add_argument("--epochs", type=int, default=1, help="training epochs of the tiny model (a shorter run resumes)")
    p.add_argument("--skip-estimators", action="store_true")
    p.add_argument("--estimator-people", type=int, default=None, help="a random part of the cohort (speed)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from foresight.forecast import Forecaster

    root = args.out / f"cohort-n{args.lives}-s{args.seed}"
    paths = cohort(root, args.lives, args.seed)
    train_tiny(paths["tokens"], root / "model", epochs=args.epochs)
    fc = Forecaster.from_pretrained(root / "model")
    study: dict[str, Any] = {"date": datetime.now().date().isoformat(), "command": " ".join(["python",
                             "bench/catchment.py", *(argv if argv is not None else sys.argv[1:])]),
                             "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if not args.skip_estimators:
        study["estimators"] = estimators(fc, paths["db"], paths["sim"], datetime.fromisoformat(args.as_of),
                                         args.weeks, args.split, args.estimator_people)
        (args.out / "catchment.json").write_text(json.dumps(study, indent=1))
    study["backtest"] = backtests(fc, paths["db"], paths["sim"], args.origins,
                                  [int(h) for h in args.horizons.split(",")], args.samples, args.max_subjects,
                                  args.split)
    study.setdefault("estimators", [])
    (args.out / "catchment.json").write_text(json.dumps(study, indent=1))
    (args.out / "catchment.md").write_text(markdown(study))
    print(markdown(study))
    return study


if __name__ == "__main__":
    main()
