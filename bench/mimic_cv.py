"""Five-fold patient cross-validation on the real MIMIC-IV demo (100 patients): what a tiny model learns.

Each fold holds out a fifth of the patients (stable hash of the subject id), tokenizes the rest (vocabulary from
that fold's train split), trains a tiny model, and scores the held-out fifth: strict next-event accuracy (with
the frequency and Markov baselines) and the 30-day admission risk after each discharge (Rao-Blackwellised
futures) against prevalence and a logistic regression on count features fitted on the fold's train discharges.
Risk predictions are pooled over the folds; 95% CIs resample patients.

    python bench/mimic_cv.py [--steps 300] [--samples 16]

Learning curve of next-event accuracy (the same held-out fifth per fold; each fold's train patients cut to the
first N by a stable hash; risk tasks skipped): where would the model cross the Markov chain?

    python bench/mimic_cv.py --curve --train-patients 20 40 80 --steps 300 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import numpy as np  # noqa: E402

from foresight import sources, tokens, warehouse  # noqa: E402
from foresight.evaluate import (  # noqa: E402
    bootstrap_ci,
    evaluate_task,
    next_event_accuracy,
    prediction_points,
    risk_metrics,
)
from foresight.forecast import BUILTIN_TASKS, Forecaster  # noqa: E402
from foresight.hashing import sha256  # noqa: E402
from foresight.train import TrainConfig, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(os.environ.get("FORESIGHT_SHARED_DATA", REPO.parent / "shared" / "data")) / "mimic-iv-demo-2.2"


def fold_of(subject_id: int, k: int = 5) -> int:
    return int(sha256(f"cv:{subject_id}")[:8], 16) % k


def fold_model(base: Path, work: Path, k: int, folds: int, steps: int, min_subjects: int,
               train_patients: int | None = None) -> tuple[Path, Path, Forecaster]:
    """Fold ``k``'s warehouse (held-out fifth, a tuning slice, the rest train — cut to the first
    ``train_patients`` by a stable hash, the others' events removed), its tokens, and a tiny model trained on it."""
    tag = f"{k}-{train_patients or 'all'}-{steps}"
    db = work / f"fold{tag}.duckdb"
    shutil.copy(base, db)
    with warehouse.connect(db) as con:
        ids = [r[0] for r in con.execute("SELECT subject_id FROM subject_splits").fetchall()]
        splits = {sid: "held_out" if fold_of(sid, folds) == k else
                  ("tuning" if fold_of(sid, 10 * folds) % 10 == 0 else "train") for sid in ids}
        if train_patients is not None:
            train_ids = sorted((s for s, v in splits.items() if v == "train"), key=lambda s: sha256(f"lc:{s}"))
            for sid in train_ids[train_patients:]:
                del splits[sid]
                con.execute("DELETE FROM events WHERE subject_id = ?", [sid])
                con.execute("DELETE FROM subject_splits WHERE subject_id = ?", [sid])
        for sid, split in splits.items():
            con.execute("UPDATE subject_splits SET split = ? WHERE subject_id = ?", [split, sid])
    data = work / f"tok{tag}"
    tokens.tokenize(db, data, tokens.TokenizerConfig(min_subjects=min_subjects))
    model = work / f"model{tag}"
    train(data, model, TrainConfig(preset="tiny", seq_len=256, micro_batch=8, max_steps=steps,
                                   warmup_steps=30, lr=3e-3, min_lr=3e-4, eval_every=0, checkpoint_every=0))
    return db, data, Forecaster.from_pretrained(model)


def learning_curve(args: argparse.Namespace) -> None:
    """Next-event top-k of the model and the Markov chain (fitted on the same train patients) per train size."""
    work = Path(tempfile.mkdtemp(prefix="mimic-lc-"))
    base = work / "base.duckdb"
    with warehouse.connect(base) as con:
        sources.load("mimic-iv", con, DEMO)
    t0 = time.perf_counter()
    rows = []
    for n in args.train_patients:
        for steps in args.steps:
            accs = []
            for k in range(args.folds):
                _, data, fc = fold_model(base, work, k, args.folds, steps, args.min_subjects, train_patients=n)
                accs.append(next_event_accuracy(fc, data, "held_out", seq_len=256).to_json())
            row = {"train_patients": n, "steps": steps, **{
                f"{who}_{kk}": float(np.mean([a["topk"][kk] if who == "model" else a["baselines"][who][kk]
                                              for a in accs]))
                for who in ("model", "markov", "frequency") for kk in ("top1", "top10")},
                "per_fold_top10": [round(a["topk"]["top10"], 3) for a in accs],
                "per_fold_markov_top10": [round(a["baselines"]["markov"]["top10"], 3) for a in accs]}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(f"\n### {date.today()} - MIMIC-IV demo learning curve, {args.folds} folds, tiny model "
          f"({(time.perf_counter() - t0) / 60:.1f} min)\n")
    print("| train patients per fold | steps | model top-1 | Markov top-1 | model top-10 | Markov top-10 | "
          "frequency top-10 | per-fold model top-10 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['train_patients']} | {r['steps']} | {r['model_top1']:.3f} | {r['markov_top1']:.3f} | "
              f"{r['model_top10']:.3f} | {r['markov_top10']:.3f} | {r['frequency_top10']:.3f} | "
              f"{', '.join(map(str, r['per_fold_top10']))} |")
    (work / "curve.json").write_text(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[300], help="training steps (several with --curve)")
    ap.add_argument("--curve", action="store_true", help="learning curve of next-event accuracy only")
    ap.add_argument("--train-patients", type=int, nargs="+", default=[20, 40, 80],
                    help="with --curve: train patients per fold")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--min-subjects", type=int, default=10)
    args = ap.parse_args()
    if args.curve:
        learning_curve(args)
        return
    args.steps = args.steps[0]

    task = BUILTIN_TASKS["admission_30d"]
    work = Path(tempfile.mkdtemp(prefix="mimic-cv-"))
    base = work / "base.duckdb"
    with warehouse.connect(base) as con:
        sources.load("mimic-iv", con, DEMO)
    t0 = time.perf_counter()
    accs, pooled = [], {"y": [], "model": [], "logistic": [], "prevalence": [], "subject": []}
    for k in range(args.folds):
        db, data, fc = fold_model(base, work, k, args.folds, args.steps, args.min_subjects)
        acc = next_event_accuracy(fc, data, "held_out", seq_len=256)
        accs.append(acc.to_json())
        with warehouse.connect(db, read_only=True) as con:
            held = [r[0] for r in con.execute("SELECT subject_id FROM subject_splits WHERE split = 'held_out'")
                    .fetchall()]
            tr = [r[0] for r in con.execute("SELECT subject_id FROM subject_splits WHERE split = 'train'").fetchall()]
            pts = prediction_points(con, held, mode="events", min_follow_up_days=30, max_per_subject=50)
            tpts = prediction_points(con, tr, mode="events", min_follow_up_days=30, max_per_subject=50)
            res = evaluate_task(fc, con, task, pts, samples=args.samples, train_points=tpts, n_boot=50)
            n = len(res["_y"])
            pooled["y"] += res["_y"]
            pooled["model"] += res["_p"]["model"]
            pooled["prevalence"] += res["_p"].get("prevalence", [float("nan")] * n)
            pooled["logistic"] += res["_p"].get("logistic_counts", [float("nan")] * n)
            pooled["subject"] += res["_subjects"]
        print(f"fold {k}: top-10 {acc.topk['top10']:.3f} (Markov {acc.baselines['markov']['top10']:.3f}); "
              f"{len(res['_y'])} discharge points", file=sys.stderr)
    seconds = time.perf_counter() - t0
    y = np.array(pooled["y"])
    groups = np.array(pooled["subject"])
    print(f"\n### {date.today()} - MIMIC-IV demo, {args.folds}-fold patient cross-validation (tiny model, "
          f"{args.steps} steps per fold)\n")
    print("| metric | model | Markov | frequency |")
    print("|---|---:|---:|---:|")
    for kk in ("top1", "top5", "top10"):
        m = np.mean([a["topk"][kk] for a in accs])
        mk = np.mean([a["baselines"]["markov"][kk] for a in accs])
        fr = np.mean([a["baselines"]["frequency"][kk] for a in accs])
        print(f"| next-event {kk} (strict, mean of folds) | {m:.3f} | {mk:.3f} | {fr:.3f} |")
    print(f"\n30-day admission after discharge, pooled over folds: {len(y)} points, {int(y.sum())} admissions "
          f"({y.mean():.1%}).\n")
    print("| predictor | AUROC [95% CI] | AUPRC | Brier |")
    print("|---|---|---:|---:|")
    for name in ("model", "logistic", "prevalence"):
        p = np.array(pooled[name], dtype=float)
        ok = ~np.isnan(p)
        met = risk_metrics(y[ok], p[ok])
        ci = bootstrap_ci(y[ok], p[ok], groups[ok], n_boot=500).get("auroc", (float("nan"),) * 2)
        print(f"| {name} | {met['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {met['auprc']:.3f} | {met['brier']:.4f} |")
    print(f"\nWall time {seconds / 60:.1f} min for {args.folds} folds (tokenize, train, evaluate).")
    (work / "cv.json").write_text(json.dumps({"accuracy": accs, "pooled": pooled}, default=float))


if __name__ == "__main__":
    main()
