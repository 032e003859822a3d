"""Scaling study: does the model beat the baselines, and close in on the oracle, as data, model and context grow?

For every configuration ``lives x preset x context x train tokens x seed``:

1. **simulate** ``lives`` lives with the demo's hazards (:func:`foresight.demo.demo_config`: admissions x3) to
   2025-12-31, MEDS format (cohort seed ``--cohort-seed``);
2. **load** them into a DuckDB warehouse (``foresight.sources.load("meds", ...)``; its own train / tuning /
   held_out split of subjects);
3. **tokenize** (vocabulary from train);
4. **train** ``foresight.train.train`` for a fixed token budget: ``steps = ceil(tokens / (micro_batch x context x
   grad_accum))``; by default the micro-batch keeps ``--tokens-per-step`` (2,048) input positions per step
   whatever the context, so rows at two contexts see the same tokens in the same number of steps;
5. **evaluate** with :func:`foresight.evaluate.evaluate_model` and the simulator's oracle on held-out subjects:
   at discharges (``admission_30d``; ``--discharge-tasks``), at admissions (``in_hospital_mortality``,
   ``icu_during_stay``, ``los_over_7d``: the oracle knows the stay's outcome probabilities), and at one as-of date
   for everyone alive then (``admission_30d``, ``admission_90d``, ``mortality_1y``; ``--as-of-tasks``, date
   ``--as-of``). Each predictor (model, model_time_head when ``--time-head``, logistic_counts, gbm_counts,
   oracle) gets AUROC, AUPRC, Brier and ECE with patient-bootstrap 95% CIs, and the ``paired`` block holds model
   minus each baseline and minus the oracle (AUROC and Brier differences with paired CIs on the same points).

Steps 1-3 are cached per cohort (``OUT/cohorts/n{lives}-s{seed}/{sim,warehouse.duckdb,tokens}``, each skipped when
its completion marker is there); a finished row (``OUT/runs/{row}/row.json``) is skipped unless ``--force``, and a
trained model without a row is evaluated again without retraining. Every row writes ``row.json`` (configuration,
cohort statistics, training minutes, tuning loss, next-event accuracy and the per-task report) and
``evaluation/calibration.png``; the run writes ``OUT/quality.csv`` (one line per row x task), ``OUT/quality.md``
(the table for bench/RESULTS.md) and ``OUT/learning_curve.png`` (paired AUROC gap model - oracle, with its CI, vs
training tokens, one panel per task). ``--report-only`` rebuilds those three from every ``row.json`` under OUT.

Smoke test (~30 s on one core; proves every stage runs, numbers meaningless)::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/quality.py --lives 400 --contexts 256 \\
        --train-tokens 40960 --max-points 50 --samples 4 --out bench/out/quality-smoke

Issue 16's 30k-life row (the tiny preset trained one epoch, ~9.8M tokens, context 256 vs 1024, 3 seeds)::

    python bench/quality.py --lives 30000 --presets tiny --contexts 256 1024 --train-tokens 9830400 \\
        --seeds 0 1 2 --max-points 5000 --samples 10 --out bench/out/quality

A learning curve adds budgets: ``--train-tokens 1228800 2457600 4915200 9830400``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Python puts this script's folder first on sys.path, where bench/tokenize*.py could shadow the standard library's
# modules imported deep inside torch/transformers: replace it with the repository root.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(stderr=True, width=None if sys.stderr.isatty() else 180)  # wide tables in logs

PREDICTORS = ("model", "model_calibrated", "model_time_head", "logistic_counts", "gbm_counts", "oracle")
BASELINES = ("logistic_counts", "gbm_counts", "oracle")
# tasks the study adds at the as-of date (TaskSpec dicts), and the simulator event each one asks the oracle about
EXTRA_TASKS = {
    "admission_90d": {"name": "admission_90d", "codes": ["ADMIT//*"], "window_days": 90,
                      "description": "any hospital admission within 90 days"},
    "mortality_1y": {"name": "mortality_1y", "codes": ["MEDS_DEATH"], "window_days": 365,
                     "description": "death within 1 year"},
}
EXTRA_ORACLE_EVENTS = {"admission_90d": "admission", "mortality_1y": "death"}


# --- cached cohort: simulation -> warehouse -> tokens ------------------------------------------------------


def cohort(out: Path, lives: int, seed: int, workers: int, min_subjects: int) -> dict[str, Any]:
    """The cohort's folders, each stage run only when its marker is missing; returns paths and statistics."""
    from foresight import sources, warehouse
    from foresight import tokens as T
    from foresight.demo import ADMISSION_SCALE, demo_config
    from foresight.simulate import simulate

    root = out / "cohorts" / f"n{lives}-s{seed}"
    sim, db, tok = root / "sim", root / "warehouse.duckdb", root / "tokens"
    root.mkdir(parents=True, exist_ok=True)
    stats_path = root / "cohort.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    want = {"lives": lives, "seed": seed, "admission_scale": ADMISSION_SCALE}

    if stats.get("simulate", {}).get("config") != want or not (sim / "metadata" / "simulator.json").exists():
        with console.status(f"[{lives:,} lives] simulating"):
            t0 = time.perf_counter()
            s = simulate(lives, sim, seed=seed, config=demo_config(), workers=workers)
        stats = {"simulate": {"config": want, "events": s.get("events"), "seconds": round(time.perf_counter() - t0, 1)}}
        stats_path.write_text(json.dumps(stats, indent=1))
        console.log(f"[{lives:,} lives] simulated {s.get('events') or 0:,} events in {stats['simulate']['seconds']} s")
    if "load" not in stats or not db.exists():
        with console.status(f"[{lives:,} lives] loading MEDS into the warehouse"):
            db.unlink(missing_ok=True)
            t0 = time.perf_counter()
            with warehouse.connect(db) as con:
                summ = sources.load("meds", con, sim).to_json()
                splits = dict(con.execute("SELECT split, count(*) FROM subject_splits GROUP BY 1").fetchall())
        stats["load"] = {"events": summ["events"], "subjects": summ["subjects"], "splits": splits,
                         "seconds": round(time.perf_counter() - t0, 1)}
        stats.pop("tokenize", None)  # a new warehouse: tokens of the old one are stale
        stats_path.write_text(json.dumps(stats, indent=1))
        console.log(f"[{lives:,} lives] loaded {summ['events']:,} events ({splits}) in {stats['load']['seconds']} s")
    if "tokenize" not in stats or not (tok / "COMPLETE").exists():
        with console.status(f"[{lives:,} lives] tokenizing"):
            t0 = time.perf_counter()
            s = T.tokenize(db, tok, T.TokenizerConfig(min_subjects=min_subjects))
        stats["tokenize"] = {"vocab_size": s["vocab_size"], "tokens": s["tokens"], "subjects": s["subjects"],
                             "seconds": round(time.perf_counter() - t0, 1)}
        stats_path.write_text(json.dumps(stats, indent=1))
        console.log(f"[{lives:,} lives] tokenized: vocabulary {s['vocab_size']:,}, tokens {s['tokens']} "
                    f"in {stats['tokenize']['seconds']} s")
    index = np.load(tok / "train.index.npy")
    return {"root": root, "sim": sim, "db": db, "tokens": tok, "stats": stats, "train_lengths": index["length"],
            "train_tokens_total": int(index["length"].sum())}


def context_coverage(lengths: np.ndarray, context: int) -> dict[str, float]:
    """Share of train lives longer than the context, and of train tokens before each life's last ``context``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = max(int(lengths.sum()), 1)
    return {"lives_longer_than_context": round(float((lengths > context).mean()), 4) if len(lengths) else math.nan,
            "tokens_before_last_context": round(float(np.clip(lengths - context, 0, None).sum() / total), 4),
            "median_tokens_per_life": float(np.median(lengths)) if len(lengths) else math.nan,
            "p90_tokens_per_life": float(np.percentile(lengths, 90)) if len(lengths) else math.nan}


# --- the oracle: the pipeline's, plus the study's extra as-of tasks -----------------------------------------


def study_oracle(sim_dir: Path) -> Callable[[Any, Any], np.ndarray]:
    """:func:`foresight.pipeline.simulator_oracle`'s answers, extended to :data:`EXTRA_ORACLE_EVENTS`."""
    from foresight.pipeline import simulator_oracle

    return simulator_oracle(sim_dir, EXTRA_ORACLE_EVENTS)


# --- one row -------------------------------------------------------------------------------------------------


def row_id(lives: int, preset: str, context: int, tokens: int, seed: int, history_block: int = 0) -> str:
    return f"n{lives}-{preset}-ctx{context}" + (f"-hist{history_block}" if history_block else "") + \
        f"-tok{tokens}-seed{seed}"


def _ctx(f: dict[str, Any]) -> str:
    """The context column: its length, and the history block's when the row has one."""
    return f"{f['context']}" + (f" + history {f['history_block']}" if f.get("history_block") else "")


def train_row(c: dict[str, Any], rdir: Path, args: argparse.Namespace, preset: str, context: int, tokens: int,
              seed: int, history_block: int = 0) -> dict[str, Any]:
    """Train one row's model (skipped when ``train.json`` says it finished); returns the training record."""
    from foresight.train import TrainConfig, train

    tj = rdir / "train.json"
    model = rdir / "model"
    if tj.exists() and (model / "foresight.json").exists():
        return json.loads(tj.read_text())
    micro = args.micro_batch or max(1, args.tokens_per_step // (context * args.grad_accum))
    per_step = micro * context * args.grad_accum
    steps = max(1, math.ceil(tokens / per_step))
    warmup = max(1, round(args.warmup_frac * steps))
    cfg = TrainConfig(preset=preset, seq_len=context, micro_batch=micro, grad_accum=args.grad_accum,
                      max_steps=steps, warmup_steps=warmup, lr=args.lr, min_lr=args.min_lr, eval_every=0,
                      eval_rows=args.eval_rows, checkpoint_every=0, log_every=max(1, steps // 10), seed=seed,
                      time_head=args.time_head, history_block=history_block)
    if model.exists():
        shutil.rmtree(model)
    console.log(f"  training {preset}, context {context}, micro-batch {micro} x {args.grad_accum}: {steps:,} steps "
                f"x {per_step:,} tokens = {steps * per_step:,} tokens (warm-up {warmup})")
    t0 = time.perf_counter()
    with console.status("  training") as status:
        summary = train(c["tokens"], model, cfg, log=lambda m: status.update(f"  training: {m[:110]}"))
    minutes = (time.perf_counter() - t0) / 60
    m = summary.get("metrics", {})
    rec = {"config": {k: getattr(cfg, k) for k in ("preset", "seq_len", "micro_batch", "grad_accum", "max_steps",
                                                   "warmup_steps", "lr", "min_lr", "seed", "time_head",
                                                   "history_block")},
           "status": summary["status"], "parameters": summary["parameters"], "steps": steps,
           "tokens_per_step": per_step, "train_tokens": steps * per_step,
           "epochs": round(steps * per_step / max(c["train_tokens_total"], 1), 3),
           "training_minutes": round(minutes, 2), "tuning_loss": m.get("tuning_loss"),
           "train_loss": m.get("train_loss"), "unigram_entropy_tuning": m.get("unigram_entropy_tuning"),
           "tokens_per_s": m.get("tokens_per_s"), "padding_fraction": m.get("padding_fraction")}
    tj.write_text(json.dumps(rec, indent=1))
    console.log(f"  trained in {minutes:.1f} min: tuning loss {rec['tuning_loss']:.4f} "
                f"(unigram {rec['unigram_entropy_tuning']:.4f}), {rec['parameters']:,} parameters")
    return rec


def evaluate_row(c: dict[str, Any], rdir: Path, args: argparse.Namespace, oracle: Callable) -> dict[str, Any]:
    """evaluate_model at discharges and admissions, plus the as-of tasks; returns the merged report."""
    from foresight.evaluate import ADMISSION_TASKS, evaluate_model
    from foresight.evaluate.report import RiskScoring, plot_calibration, write_points
    from foresight.forecast import Forecaster, load_task

    model, out = rdir / "model", rdir / "evaluation"
    t0 = time.perf_counter()
    kinds = ["discharges"] if args.discharge_tasks else []
    adm = [ADMISSION_TASKS[t] for t in args.admission_tasks]
    if adm:
        kinds.append("admissions")
    with console.status("  evaluating at discharges and admissions (futures, baselines, oracle)"):
        report = evaluate_model(model, c["tokens"], db=c["db"], tasks=[load_task(t) for t in args.discharge_tasks],
                                admission_tasks=adm, at=kinds or ["discharges"], samples=args.samples,
                                max_points=args.max_points, out_dir=out, oracle=oracle, seed=args.eval_seed,
                                max_rows=args.next_event_rows)
    if args.as_of_tasks:
        with console.status(f"  evaluating at {args.as_of:%Y-%m-%d} for everyone alive then"):
            tasks = [load_task(EXTRA_TASKS.get(t, t)) for t in args.as_of_tasks]
            scoring = RiskScoring(Forecaster.from_pretrained(model), as_of=args.as_of, samples=args.samples,
                                  max_points=args.max_points, oracle=oracle, seed=args.eval_seed)
            scoring.run(c["db"], [("as_of", tasks)])
        report["tasks"] += [{k: v for k, v in r.items() if not k.startswith("_")} for r in scoring.results]
        for r, kept in zip(scoring.results, report["tasks"][-len(scoring.results):], strict=True):
            kept["positives"] = int(sum(r["_y"]))
        report["skipped"] += scoring.skipped
        report["eval_points"].update(scoring.points_used)
        report["calibration_plot"] = str(plot_calibration(report["tasks"], out / "calibration.png"))
        report["points_file_as_of"] = str(write_points(scoring.results, out / "points_as_of.parquet"))
    for t in report["tasks"]:
        t.setdefault("at", "discharges")
        if "positives" not in t:  # round(rate x points): the report holds the observed rate of the scored points
            rate = t.get("observed_rate", math.nan)
            t["positives"] = round(rate * t["points"]) if t["points"] and not math.isnan(rate) else 0
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def run_row(c: dict[str, Any], args: argparse.Namespace, oracle: Callable, lives: int, preset: str, context: int,
            tokens: int, seed: int, history_block: int = 0) -> dict[str, Any]:
    rid = row_id(lives, preset, context, tokens, seed, history_block)
    rdir = args.out / "runs" / rid
    if (rdir / "row.json").exists() and not args.force:
        console.log(f"[{rid}] done before: reusing {rdir / 'row.json'}")
        return json.loads((rdir / "row.json").read_text())
    if args.force and rdir.exists():
        shutil.rmtree(rdir)
    rdir.mkdir(parents=True, exist_ok=True)
    console.rule(rid)
    tr = train_row(c, rdir, args, preset, context, tokens, seed, history_block)
    rep = evaluate_row(c, rdir, args, oracle)
    ne = rep["next_event"]
    row = {"row": rid, "date": date.today().isoformat(), "machine": machine(), "command": " ".join(sys.argv),
           "lives": lives, "cohort_seed": args.cohort_seed, "preset": preset, "context": context, "seed": seed,
           "history_block": history_block,
           "requested_train_tokens": tokens, **{k: tr[k] for k in ("parameters", "steps", "tokens_per_step",
                                                                   "train_tokens", "epochs", "training_minutes",
                                                                   "tuning_loss", "unigram_entropy_tuning",
                                                                   "tokens_per_s")},
           "train_config": tr["config"], "cohort": {**{k: c["stats"][k] for k in ("simulate", "load", "tokenize")
                                                       if k in c["stats"]},
                                                    **context_coverage(c["train_lengths"], context)},
           "samples": args.samples, "integrate_exits": not args.sampled_exits, "max_points": args.max_points,
           "as_of": args.as_of.isoformat(),
           "evaluation_minutes": round(rep["seconds"] / 60, 2),
           "next_event": {"top1": ne["topk"].get("top1"), "top10": ne["topk"].get("top10"),
                          "markov_top1": ne["baselines"]["markov"].get("top1"),
                          "markov_top10": ne["baselines"]["markov"].get("top10")},
           "eval_points": rep["eval_points"], "skipped": rep["skipped"], "tasks": rep["tasks"],
           "calibration_plot": rep.get("calibration_plot"), "report": str(rdir / "evaluation" / "report.json")}
    (rdir / "row.json").write_text(json.dumps(row, indent=1, default=str))
    summary_table([row], title=f"{rid}: trained {tr['training_minutes']:.1f} min, evaluated "
                               f"{row['evaluation_minutes']:.1f} min")
    return row


def compare_rows(a: Path, b: Path, n_boot: int = 1000) -> list[dict[str, Any]]:
    """Row ``a``'s model minus row ``b``'s on the same held-out points (same cohort and ``--eval-seed``): paired
    AUROC and Brier differences with patient-bootstrap CIs, per task, from each row's points files."""
    import pandas as pd

    from foresight.evaluate.metrics import paired_difference

    def points(row: Path) -> pd.DataFrame:
        ev = row / "evaluation"
        return pd.concat([pd.read_parquet(f) for f in (ev / "points.parquet", ev / "points_as_of.parquet")
                          if f.exists()], ignore_index=True)

    pa_, pb = points(a), points(b)
    out = []
    for (task, at), ga in pa_.groupby(["task", "at"], sort=False):
        gb = pb[(pb["task"] == task) & (pb["at"] == at)]
        if len(ga) != len(gb) or not (ga["subject_id"].to_numpy() == gb["subject_id"].to_numpy()).all() or \
                not (ga["y"].to_numpy() == gb["y"].to_numpy()).all():
            raise SystemExit(f"{task} @ {at}: the two rows were not scored on the same points (cohort, "
                             "--max-points and --eval-seed must match)")
        y, g = ga["y"].to_numpy(), ga["subject_id"].to_numpy()
        rec = {"task": task, "at": at, "points": len(y), "positives": int(y.sum())}
        for who in ("model", "model_calibrated"):
            if who in ga and who in gb:
                rec[who] = paired_difference(y, ga[who].to_numpy(), gb[who].to_numpy(), g, n_boot=n_boot)
        out.append(rec)
    return out


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# --- tables and plot -----------------------------------------------------------------------------------------


def _m(task: dict[str, Any], who: str, metric: str) -> float:
    return task[who]["metrics"].get(metric, math.nan) if who in task else math.nan


def _ci(task: dict[str, Any], who: str, metric: str) -> tuple[float, float]:
    ci = task[who]["ci95"].get(metric) if who in task else None
    return (ci[0], ci[1]) if ci else (math.nan, math.nan)


def _pair(task: dict[str, Any], who: str, metric: str = "auroc") -> tuple[float, float, float]:
    p = task.get("paired", {}).get(f"model-{who}")
    if not p:
        return math.nan, math.nan, math.nan
    ci = p.get("ci" if metric == "auroc" else "brier_ci") or (math.nan, math.nan)
    return p[metric], ci[0], ci[1]


def flat_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat record per row x task (the CSV's lines)."""
    out = []
    for r in rows:
        for t in r["tasks"]:
            rec: dict[str, Any] = {k: r[k] for k in ("row", "lives", "preset", "parameters", "context", "seed",
                                                     "train_tokens", "steps", "epochs", "training_minutes",
                                                     "tuning_loss")}
            rec["history_block"] = r.get("history_block", 0)
            rec.update(task=t["task"], at=t["at"], points=t["points"], positives=t.get("positives"),
                       observed_rate=t.get("observed_rate"), oracle_points=_m(t, "oracle", "n"))
            for who in PREDICTORS:
                for metric in ("auroc", "auprc", "brier", "ece"):
                    rec[f"{who}_{metric}"] = _m(t, who, metric)
                    rec[f"{who}_{metric}_lo"], rec[f"{who}_{metric}_hi"] = _ci(t, who, metric)
            for who in BASELINES:
                for metric in ("auroc", "brier"):
                    d, lo, hi = _pair(t, who, metric)
                    rec[f"d_{metric}_model-{who}"], rec[f"d_{metric}_model-{who}_lo"] = d, lo
                    rec[f"d_{metric}_model-{who}_hi"] = hi
            out.append(rec)
    return out


def _f(x: float, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _with_ci(x: float, lo: float, hi: float, nd: int = 3) -> str:
    return _f(x, nd) + ("" if math.isnan(lo) else f" [{lo:.{nd}f}, {hi:.{nd}f}]")


def _signed(d: float, lo: float, hi: float, nd: int = 3) -> str:
    return "n/a" if math.isnan(d) else f"{d:+.{nd}f}" + ("" if math.isnan(lo) else f" [{lo:+.{nd}f}, {hi:+.{nd}f}]")


def _oracle_cell(f: dict[str, Any]) -> str:
    """The oracle's AUROC, with its own point count where it is known for fewer points than the task has (a stay
    before the cohort's start date: survivor-selected, so the simulator gives no probability): those metrics are
    of a subset, and only the paired model - oracle difference compares like with like."""
    n = f["oracle_points"]
    return _f(f["oracle_auroc"]) + (f" (on {int(n):,})" if not math.isnan(n) and n != f["points"] else "")


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table for bench/RESULTS.md: one line per row x task; a median-over-seeds table when seeds repeat."""
    lines = ["| lives | preset (params) | context | train tokens (epochs) | train min | tuning loss | task @ points | "
             "points (pos.) | model AUROC [95% CI] | logistic | GBM | oracle | model - logistic | model - GBM | "
             "model - oracle | Brier model / logistic / GBM / oracle | ECE model / logistic / GBM |",
             "|---:|---|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---|---|---|---|---|"]
    for f in flat_rows(rows):
        lines.append(
            f"| {f['lives']:,} | {f['preset']} ({f['parameters'] / 1e6:.2f}M) | {_ctx(f)} | "
            f"{f['train_tokens'] / 1e6:.2f}M ({f['epochs']:.2f}) | {f['training_minutes']:.1f} | "
            f"{_f(f['tuning_loss'], 4)} | {f['task']} @ {f['at']} | {f['points']:,} ({f['positives']}) | "
            f"{_with_ci(f['model_auroc'], f['model_auroc_lo'], f['model_auroc_hi'])} | "
            f"{_f(f['logistic_counts_auroc'])} | {_f(f['gbm_counts_auroc'])} | {_oracle_cell(f)} | "
            + " | ".join(_signed(f[f"d_auroc_model-{w}"], f[f"d_auroc_model-{w}_lo"], f[f"d_auroc_model-{w}_hi"])
                         for w in BASELINES)
            + " | " + " / ".join(_f(f[f"{w}_brier"], 4) for w in ("model", *BASELINES))
            + " | " + " / ".join(_f(f[f"{w}_ece"], 3) for w in ("model", "logistic_counts", "gbm_counts")) + " |")
    text = "\n".join(lines) + "\n"
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for f in flat_rows(rows):
        groups.setdefault((f["lives"], f["preset"], _ctx(f), f["train_tokens"], f["task"], f["at"]), []).append(f)
    if any(len(g) > 1 for g in groups.values()):
        text += ("\nMedian over seeds (paired AUROC differences; range over seeds in brackets):\n\n"
                 "| lives | preset | context | train tokens | task @ points | seeds | model AUROC | model - logistic | "
                 "model - GBM | model - oracle | Brier model | ECE model |\n"
                 "|---:|---|---:|---:|---|---:|---:|---|---|---|---:|---:|\n")
        for (lives, preset, ctx, tok, task, at), g in groups.items():
            def med(key: str, g: list[dict[str, Any]] = g) -> str:
                vals = [x[key] for x in g if not math.isnan(x[key])]
                return "n/a" if not vals else (f"{statistics.median(vals):+.3f} [{min(vals):+.3f}, {max(vals):+.3f}]"
                                               if key.startswith("d_") else f"{statistics.median(vals):.3f}")
            text += (f"| {lives:,} | {preset} | {ctx} | {tok / 1e6:.2f}M | {task} @ {at} | {len(g)} | "
                     f"{med('model_auroc')} | {med('d_auroc_model-logistic_counts')} | "
                     f"{med('d_auroc_model-gbm_counts')} | {med('d_auroc_model-oracle')} | {med('model_brier')} | "
                     f"{med('model_ece')} |\n")
    return text


def plot_learning_curve(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Paired AUROC gap model - oracle (95% CI) vs training tokens; one panel per task, a line per
    (lives, preset, context), the seeds of a budget side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    flat = flat_rows(rows)
    order = {"discharges": 0, "admissions": 1, "as_of": 2}
    panels = sorted({(f["task"], f["at"]) for f in flat}, key=lambda x: (order.get(x[1], 3), x[0]))
    n = max(1, len(panels))
    cols = min(n, 4)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    series = sorted({(f["lives"], f["preset"], _ctx(f)) for f in flat})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (task, at) in zip(axes.ravel(), panels, strict=False):
        ax.axhline(0.0, color="grey", lw=1, ls="--")
        for k, s in enumerate(series):
            pts = sorted((f["train_tokens"], f["seed"], f["d_auroc_model-oracle"], f["d_auroc_model-oracle_lo"],
                          f["d_auroc_model-oracle_hi"]) for f in flat
                         if (f["lives"], f["preset"], _ctx(f)) == s and (f["task"], f["at"]) == (task, at))
            pts = [p for p in pts if not math.isnan(p[2])]
            if not pts:
                continue
            color = colors[k % len(colors)]
            seeds = sorted({p[1] for p in pts})  # the seeds of one budget side by side, centred on it
            x = np.array([p[0] * (1 + 0.03 * (seeds.index(p[1]) - (len(seeds) - 1) / 2)) for p in pts])
            d = np.array([p[2] for p in pts])
            err = np.array([[p[2] - p[3] if not math.isnan(p[3]) else 0.0 for p in pts],
                            [p[4] - p[2] if not math.isnan(p[4]) else 0.0 for p in pts]])
            ax.errorbar(x, d, yerr=err, fmt="o", ms=3, color=color, alpha=0.6, capsize=2)
            budgets = sorted({p[0] for p in pts})
            ax.plot(budgets, [statistics.median(p[2] for p in pts if p[0] == b) for b in budgets], color=color,
                    label=f"{s[0]:,} lives, {s[1]}, ctx {s[2]}")
        budgets_all = [f["train_tokens"] for f in flat if (f["task"], f["at"]) == (task, at)]
        ax.set_xscale("log")
        ax.set_xlim(min(budgets_all) / 1.6, max(budgets_all) * 1.6)
        ax.set_xticks(sorted(set(budgets_all)))  # ticks at the budgets: a curve may span less than a decade
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / 1e6:.3g}M"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if not ax.get_legend_handles_labels()[0]:
            ax.text(0.5, 0.5, "undefined: one class only\nor no oracle", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
        ax.set_title(f"{task} @ {at}", fontsize=9)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("AUROC model - oracle (paired)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary_table(rows: Sequence[dict[str, Any]], title: str) -> None:
    table = Table(title=title, show_lines=False)
    for col in ("row", "task @ points", "pts (pos)", "model", "logistic", "GBM", "oracle", "model-logistic",
                "model-GBM", "model-oracle", "Brier m/l/g/o", "ECE m"):
        table.add_column(col, justify="right" if col not in ("row", "task @ points") else "left")
    for f in flat_rows(rows):
        table.add_row(f["row"], f"{f['task']} @ {f['at']}", f"{f['points']} ({f['positives']})",
                      _f(f["model_auroc"]), _f(f["logistic_counts_auroc"]), _f(f["gbm_counts_auroc"]),
                      _f(f["oracle_auroc"]),
                      *(_signed(f[f"d_auroc_model-{w}"], f[f"d_auroc_model-{w}_lo"], f[f"d_auroc_model-{w}_hi"])
                        for w in BASELINES),
                      "/".join(_f(f[f"{w}_brier"], 4) for w in ("model", *BASELINES)), _f(f["model_ece"]))
    console.print(table)


def write_outputs(rows: Sequence[dict[str, Any]], out: Path) -> dict[str, Path]:
    flat = flat_rows(rows)
    paths = {"csv": out / "quality.csv", "markdown": out / "quality.md", "plot": out / "learning_curve.png"}
    if flat:
        with paths["csv"].open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(flat[0]))
            w.writeheader()
            w.writerows(flat)
    head = (f"Machine: {rows[0]['machine']['platform']}, {rows[0]['machine']['cpus']} CPUs, torch "
            f"{rows[0]['machine']['torch']}" + (f", GPU {rows[0]['machine']['gpu']}" if rows[0]['machine']['gpu']
                                                else "") + f".\nCommand: `{rows[0]['command']}`\n\n") if rows else ""
    paths["markdown"].write_text(head + markdown(rows))
    plot_learning_curve(rows, paths["plot"])
    return paths


# --- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lives", type=int, nargs="+", default=[10_000], help="cohort sizes (default 10000)")
    ap.add_argument("--presets", "--preset", type=str, nargs="+", default=["tiny"], help="model presets")
    ap.add_argument("--contexts", "--context", type=int, nargs="+", default=[1024], help="training seq_len(s)")
    ap.add_argument("--train-tokens", type=int, nargs="+", default=[9_830_400],
                    help="token budgets per row (input positions seen in training); several make a learning curve")
    ap.add_argument("--history-blocks", "--history-block", type=int, nargs="+", default=[0],
                    help="history block sizes (foresight.tokens.history; 0 = none): an A/B in one run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (init and data order)")
    ap.add_argument("--cohort-seed", type=int, default=1, help="the simulator's seed (one cohort per size)")
    ap.add_argument("--tokens-per-step", type=int, default=2048,
                    help="micro-batch = this / (context x grad_accum) unless --micro-batch is given")
    ap.add_argument("--micro-batch", type=int, default=0)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=3e-4)
    ap.add_argument("--warmup-frac", type=float, default=0.05, help="warm-up steps as a share of the steps")
    ap.add_argument("--eval-rows", type=int, default=256, help="tuning rows for the final tuning loss")
    ap.add_argument("--time-head", action="store_true", help="train the time head (scored as model_time_head)")
    ap.add_argument("--samples", type=int, default=10, help="futures per prediction point")
    ap.add_argument("--sampled-exits", action="store_true",
                    help="sample the exits from a task's window instead of integrating them (the estimator before "
                         "2026-12-05; FutureSampler.integrate_exits): an A/B switch")
    ap.add_argument("--max-points", type=int, default=5000, help="held-out prediction points per kind")
    ap.add_argument("--next-event-rows", type=int, default=200, help="held-out rows for next-event accuracy")
    ap.add_argument("--discharge-tasks", nargs="*", default=["admission_30d"])
    ap.add_argument("--admission-tasks", nargs="*", default=["in_hospital_mortality", "icu_during_stay",
                                                             "los_over_7d"])
    ap.add_argument("--as-of-tasks", nargs="*", default=["admission_30d", "admission_90d", "mortality_1y"],
                    help=f"tasks at --as-of (built-ins or {', '.join(EXTRA_TASKS)}); none: skip")
    ap.add_argument("--as-of", type=datetime.fromisoformat, default=datetime(2024, 7, 1),
                    help="date for the as-of tasks (a year of follow-up before the 2025-12-31 cutoff)")
    ap.add_argument("--eval-seed", type=int, default=0, help="seed of point subsampling, futures and bootstraps")
    ap.add_argument("--min-subjects", type=int, default=10, help="tokenizer: codes seen in fewer train subjects")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="simulator processes")
    ap.add_argument("--force", action="store_true", help="redo rows that finished before (cohorts stay cached)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("ROW_A", "ROW_B"),
                    help="paired differences, row A's model minus row B's, on their common points (run folders)")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild quality.csv/.md and learning_curve.png from every row.json under --out")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "quality")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sampled_exits:
        from foresight.forecast.sampling import FutureSampler
        FutureSampler.integrate_exits = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    if args.compare:
        res = compare_rows(*args.compare)
        for r in res:
            line = f"{r['task']} @ {r['at']}: {r['points']:,} points ({r['positives']} positive)"
            for who in ("model", "model_calibrated"):
                if who in r:
                    d = r[who]
                    line += (f"; {who} A - B: AUROC {_signed(d['auroc'], *(d['ci'] or (math.nan, math.nan)))}, "
                             f"Brier {_signed(d['brier'], *(d['brier_ci'] or (math.nan, math.nan)), nd=4)}")
            console.print(line)
        (args.out / "compare.json").write_text(json.dumps({"a": str(args.compare[0]), "b": str(args.compare[1]),
                                                           "tasks": res}, indent=1))
        return []
    if args.report_only:
        rows = [json.loads(p.read_text()) for p in sorted((args.out / "runs").glob("*/row.json"))]
    else:
        rows = []
        for lives in args.lives:
            c = cohort(args.out, lives, args.cohort_seed, args.workers, args.min_subjects)
            with console.status(f"[{lives:,} lives] reading the simulator history for the oracle"):
                oracle = study_oracle(c["sim"])
            for preset in args.presets:
                for context in args.contexts:
                    cov = context_coverage(c["train_lengths"], context)
                    console.log(f"[{lives:,} lives] context {context}: {cov['lives_longer_than_context']:.0%} of "
                                f"train lives are longer, {cov['tokens_before_last_context']:.0%} of train tokens "
                                f"lie before each life's last {context}")
                    for tokens in args.train_tokens:
                        for seed in args.seeds:
                            for hb in args.history_blocks:
                                rows.append(run_row(c, args, oracle, lives, preset, context, tokens, seed, hb))
    paths = write_outputs(rows, args.out)
    summary_table(rows, title=f"quality study: {len(rows)} row(s), {(time.perf_counter() - t0) / 60:.1f} min")
    for name, p in paths.items():
        console.print(f"{name}: {p}")
    return rows


if __name__ == "__main__":
    main()
