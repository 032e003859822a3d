"""A/B: ``[END]`` as an ordinary token vs as censoring in the training loss (issue 18's training-side fix).

The demo's cohort (10,000 lives, admission hazards x3, seed 1) and the demo's training (tiny, context 256, 1,600
steps x 2,048 tokens), trained twice from the same seed: A = ``end_as_censoring=False`` (before), B = True (now,
:mod:`foresight.censoring`). Then, for each model:

- expected admissions (``ADMIT//*``) of the held-out cohort over 12 weeks from several as-of dates (the demo's
  2025-10-01, three months before the extract's end, and earlier ones), Rao-Blackwellised expected counts with
  ``--samples`` futures, vs the simulator's oracle and what happened;
- the mean probability the model gives to ``[END]`` as the next token at those prompts (what used to stop futures);
- 30-day admission after discharge (``--points`` held-out points, 10 futures, Platt on tuning): AUROC of the
  model and the oracle's, the paired difference to the logistic baseline (skip with ``--no-evaluate``).

    python bench/end_censoring.py                    # ~15 min on 2 cores
    python bench/end_censoring.py --no-evaluate      # forecasts only, ~5 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
OUT = REPO / "bench" / "out" / "censoring"
AS_OF = ("2025-10-01", "2025-06-01", "2024-06-01")


def _catchment() -> Any:
    """bench/catchment.py as a module (its cohort builder and log line), loaded by path: bench/ is not a package."""
    from foresight.devtools.scripts import load_script

    return load_script(Path(__file__).with_name("catchment.py"))


def log(message: str) -> None:
    _catchment().log(message)


def cohort(root: Path, lives: int, seed: int) -> dict[str, Path]:
    """The demo's cohort (admission hazards x3) -> warehouse -> tokens; each step reused when done."""
    from foresight.demo import demo_config

    return _catchment().cohort(root, lives, seed, config=demo_config())


def train_model(tokens: Path, out: Path, censoring: bool) -> float:
    """The demo's training recipe; returns training seconds (0 when the model was already there)."""
    from foresight.demo import TRAIN_OPTIONS
    from foresight.train import TrainConfig, train

    if (out / "foresight.json").exists():
        return 0.0
    opts = {**TRAIN_OPTIONS, "checkpoint_every": 0, "log_every": 400}
    t0 = time.perf_counter()
    train(tokens, out, TrainConfig(**opts, end_as_censoring=censoring), log=lambda m: None)
    return time.perf_counter() - t0


def forecasts(model: Path, paths: dict[str, Path], samples: int) -> list[dict[str, Any]]:
    """Expected ADMIT//* of the held-out cohort over 12 weeks from each as-of, with the oracle, the observed
    count and the mean next-token P([END]) at the prompts."""
    import torch

    from foresight import warehouse
    from foresight.forecast import Forecaster
    from foresight.forecast.backtest import simulator_oracle
    from foresight.forecast.population import forecast_cohort
    from foresight.tokens import END

    fc = Forecaster.from_pretrained(model)
    oracle = simulator_oracle(paths["sim"], ("ADMIT//*",))
    rows = []
    with warehouse.connect(paths["db"], read_only=True) as con:
        for day in AS_OF:
            as_of = datetime.fromisoformat(day)
            run = forecast_cohort(fc, con, as_of, 84, samples=samples, codes=("ADMIT//*",), split="held_out",
                                  history_weeks=0, method="expected")
            ids = list(run.subject_ids)
            con.execute("CREATE OR REPLACE TEMP TABLE ab_people AS SELECT unnest(?::BIGINT[]) AS subject_id", [ids])
            observed = con.execute("SELECT count(*) FROM events JOIN ab_people USING (subject_id) WHERE code LIKE "
                                   "'ADMIT//%' AND time >= ? AND time < ? + INTERVAL 84 DAY", [as_of, as_of]
                                   ).fetchall()[0][0]
            with torch.no_grad():
                dists = fc.event_distributions(fc.timelines_from_warehouse(con, ids[:300], as_of))
            p_end = [float(torch.softmax(d.logits.double(), -1)[fc.vocab.index[END]]) for d in dists]
            rows.append({"as_of": day, "people": len(ids), "forecast": round(run.forecast.total["mean"], 1),
                         "se": round(run.forecast.total["se"], 2),
                         "oracle": round(float(oracle(ids, as_of, 12).sum()), 1), "observed": int(observed),
                         "p_end": round(sum(p_end) / max(1, len(p_end)), 4)})
            log(f"{model.name} {day}: {rows[-1]}")
    return rows


def evaluate(model: Path, paths: dict[str, Path], points: int) -> dict[str, Any]:
    from foresight.evaluate import evaluate_model
    from foresight.forecast.tasks import load_task
    from foresight.pipeline import simulator_oracle

    rep = evaluate_model(model, paths["tokens"], db=paths["db"], tasks=[load_task("admission_30d")],
                         admission_tasks=[], samples=10, max_points=points, oracle=simulator_oracle(paths["sim"]),
                         max_rows=200)
    task = rep["tasks"][0]
    pick = {k: task[k]["metrics"]["auroc"] for k in ("model", "model_calibrated", "logistic_counts", "oracle")
            if k in task}
    paired = task.get("paired", {}).get("model-logistic_counts", {})
    return {"auroc": {k: round(v["value"] if isinstance(v, dict) else v, 3) for k, v in pick.items()},
            "model-logistic": paired, "positives": task.get("positives"), "points": task.get("points")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lives", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--points", type=int, default=500)
    p.add_argument("--no-evaluate", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    root = OUT / f"n{args.lives}-s{args.seed}"
    paths = cohort(root, args.lives, args.seed)
    out: dict[str, Any] = {"date": datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                           "rows": []}
    for name, censoring in (("A: [END] as a token", False), ("B: [END] as censoring", True)):
        model = root / ("model_censoring" if censoring else "model_end_token")
        log(f"training {name}")
        secs = train_model(paths["tokens"], model, censoring)
        row = {"variant": name, "train_s": round(secs, 1), "forecasts": forecasts(model, paths, args.samples)}
        if not args.no_evaluate:
            log(f"evaluating {name}")
            row["admission_30d"] = evaluate(model, paths, args.points)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    (root / "end_censoring.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
