"""ACES tasks on the MIMIC-IV demo and on the simulator: a tiny model trained briefly, scored zero-shot on the shipped
ACES task configs (``tasks/``) with ``foresight.evaluate.aces.evaluate_aces_task``.

For each dataset: load it into a warehouse (MIMIC-IV demo: ``foresight.sources.load("mimic-iv", ...)``; simulator:
``--lives`` lives with the demo's hazards through the MEDS source), tokenize, train the ``tiny`` preset for
``--steps`` steps, then for every config under ``tasks/`` (or ``--configs``): ACES's labels on the warehouse's MEDS
export, the model's risk at each held-out prediction time, AUROC / Brier / ECE with patient-bootstrap 95% CIs, and
the count baselines (logistic regression, gradient boosting) fitted on train points of the same config. The label
counts per split are printed too: the MIMIC-IV demo has 100 patients, so its held-out split (~10 patients) gives
few points and fewer positives; the table says how many.

Writes ``OUT/<dataset>/<task>/{report.json,predictions.parquet,labels.parquet}`` and ``OUT/aces.md`` (the rows).

Smoke test (numbers meaningless)::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/aces.py --lives 300 --steps 20 --max-points 40 --samples 2 \\
        --out bench/out/aces-smoke

The row in bench/RESULTS.md::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/aces.py --lives 3000 --steps 300 --max-points 300 \\
        --samples 8 --out bench/out/aces
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# bench/tokenize*.py could shadow the standard library deep inside torch: put the repository root first instead
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

MIMIC_DEMO = REPO.parent / "shared" / "data" / "mimic-iv-demo-2.2"


def prepare(dataset: str, d: Path, args: argparse.Namespace) -> Path:
    """The warehouse and token folder of ``dataset`` under ``d`` (cached), and a tiny model trained on them."""
    from foresight import sources, warehouse
    from foresight import tokens as T
    from foresight.demo import demo_config
    from foresight.simulate import simulate
    from foresight.train import TrainConfig, train

    d.mkdir(parents=True, exist_ok=True)
    db = d / "w.duckdb"
    if not db.exists():
        if dataset == "mimic":
            kind, root = "mimic-iv", args.mimic
        else:
            kind, root = "meds", d / "sim"
            simulate(args.lives, root, seed=args.seed, config=demo_config())
        with warehouse.connect(db) as con:
            sources.load(kind, con, root)
    if not (d / "tok" / "COMPLETE").exists():
        T.tokenize(db, d / "tok", T.TokenizerConfig(min_subjects=args.min_subjects))
    if not (d / "model" / "foresight.json").exists():
        t0 = time.time()
        train(d / "tok", d / "model", TrainConfig(preset="tiny", seq_len=256, micro_batch=8, max_steps=args.steps,
                                                  warmup_steps=max(1, args.steps // 10), lr=3e-3, min_lr=3e-4,
                                                  eval_every=0, checkpoint_every=0, seed=args.seed))
        print(f"[{dataset}] trained {args.steps} steps in {time.time() - t0:.0f} s", file=sys.stderr)
    return db


def row(dataset: str, report: dict[str, Any], seconds: float) -> str:
    """One markdown row: the labels per split, the model's and the baselines' AUROC with CIs, Brier, ECE."""
    lab = report["labels"]

    def auc(res: dict[str, Any], name: str) -> str:
        if name not in res or res[name]["metrics"]["auroc"] != res[name]["metrics"]["auroc"]:  # absent or NaN
            return "n/a"
        lo, hi = res[name]["ci95"].get("auroc", [float("nan")] * 2)
        return f"{res[name]['metrics']['auroc']:.3f} [{lo:.3f}, {hi:.3f}]"

    counts = (f"{lab['held_out']['points']} ({lab['held_out']['positives']}+) / {lab['train']['points']} "
              f"({lab['train']['positives']}+) / {lab['tuning']['points']} ({lab['tuning']['positives']}+)")
    if not report["tasks"]:
        return f"| {dataset} | {report['task']} | {counts} | 0 | n/a | n/a | n/a | n/a | n/a | {seconds:.0f} |"
    res = report["tasks"][0]
    m = res["model"]["metrics"]
    return (f"| {dataset} | {report['task']} | {counts} | {res['points']} | {auc(res, 'model')} | "
            f"{auc(res, 'logistic_counts')} | {auc(res, 'gbm_counts')} | {m['brier']:.4f} | {m['ece']:.3f} | "
            f"{seconds:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["mimic", "sim"], choices=["mimic", "sim"])
    ap.add_argument("--mimic", type=Path, default=MIMIC_DEMO, help="MIMIC-IV demo folder (hosp/, icu/)")
    ap.add_argument("--lives", type=int, default=3000, help="simulated lives")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the tiny model")
    ap.add_argument("--min-subjects", type=int, default=5, help="tokenizer: a code needs this many train subjects")
    ap.add_argument("--configs", nargs="+", type=Path, default=sorted((REPO / "tasks").rglob("*.yaml")))
    ap.add_argument("--max-points", type=int, default=300, help="held-out points at most per task (seeded)")
    ap.add_argument("--samples", type=int, default=8, help="Monte Carlo futures per point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "aces")
    args = ap.parse_args()

    from foresight.evaluate.aces import evaluate_aces_task

    lines = ["| dataset | ACES task | labels held-out / train / tuning (positives) | scored | AUROC model [95% CI] | "
             "AUROC logistic | AUROC GBM | Brier model | ECE model | seconds |", "|" + "---|" * 10]
    results = []
    for dataset in args.datasets:
        db = prepare(dataset, args.out / dataset, args)
        for config in args.configs:
            t0 = time.time()
            report = evaluate_aces_task(args.out / dataset / "model", config, db=db, samples=args.samples,
                                        max_points=args.max_points, seed=args.seed,
                                        out_dir=args.out / dataset / "eval" / config.with_suffix("").name)
            lines.append(row(dataset, report, time.time() - t0))
            results.append({"dataset": dataset, "labels": report["labels"], "task": report["task"],
                            "tasks": report["tasks"], "skipped": report["skipped"]})
            print(lines[-1], file=sys.stderr)
    (args.out / "aces.md").write_text("\n".join(lines) + "\n")
    (args.out / "aces.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
