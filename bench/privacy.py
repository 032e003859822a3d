"""Benchmark the privacy audit: its wall time per probe as the cohort grows, and the two control models' figures.

Scaling (``--sizes``): for each cohort size the built-in simulator writes a cohort, which is loaded (MEDS source),
tokenized (floor 10), given canaries (repeats 1, 2, 4, 16; 5 each; 5000 references) and used to train the tiny
preset for ``--steps`` steps; then ``privacy.audit.audit`` runs ``--runs`` times with the default gate config and
the median wall time per probe is reported. Members and non-members are capped at 2000 per side by the config,
extraction at 200 pairs per k, the synthetic check at 200 timelines: the rows show where the cost goes.

Controls (``--controls``): the positive (over-trained) and negative (one pass) models of tests/test_privacy_gate.py
on the same 240-subject cohort, audited with the default config; prints their headline figures.

    python bench/privacy.py --sizes 500 2000 8000 --runs 3
    python bench/privacy.py --controls
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Python puts this script's folder first on sys.path, where bench/tokenize.py would shadow the standard library's
# tokenize module (which torch imports); the repository root goes first instead (the controls reuse the tests' cohort)
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
OUT = REPO / "bench" / "out" / "privacy"
PROBES = ("vocabulary_floor", "membership_inference", "canaries", "extraction", "synthetic_cohort", "total")


def prepare(n: int, steps: int) -> tuple[Path, Path]:
    """Simulated cohort of ``n`` -> warehouse -> tokens -> canaries -> a tiny model; reused when present."""
    from foresight import sources, warehouse
    from foresight import tokens as T
    from foresight import train as TR
    from foresight.simulate import simulate
    from privacy import canaries

    d = OUT / f"n{n}"
    model, data = d / f"model_{steps}", d / "canaries"
    if (model / "config.json").exists():
        return model, data
    shutil.rmtree(d, ignore_errors=True)
    simulate(n, d / "sim", seed=0)
    with warehouse.connect(d / "w.duckdb") as con:
        sources.load("meds", con, d / "sim")
    T.tokenize(d / "w.duckdb", d / "tok", T.TokenizerConfig(min_subjects=10))
    canaries.insert(d / "tok", data, repeats=(1, 2, 4, 16), per_repeat=5, length=20, seed=0, n_references=5000)
    TR.train(data, model, TR.TrainConfig(preset="tiny", seq_len=128, micro_batch=8, max_steps=steps, lr=3e-3,
                                         min_lr=3e-4, warmup_steps=10, eval_every=0, eval_rows=8, checkpoint_every=0,
                                         log_every=10**6))
    return model, data


def scaling(sizes: list[int], runs: int, steps: int) -> list[dict[str, Any]]:
    from foresight.dataset import PackedSplit
    from privacy.audit import audit

    rows = []
    for n in sizes:
        model, data = prepare(n, steps)
        times: dict[str, list[float]] = {p: [] for p in PROBES}
        rep: dict[str, Any] = {}
        for r in range(runs):
            rep = audit(model, data, OUT / f"n{n}" / f"audit{r}")
            for p in PROBES:
                times[p].append(rep["runtime_seconds"][p])
        train, held = PackedSplit(data, "train"), PackedSplit(data, "held_out")
        row = {"subjects": n, "train_tokens": rep["data"]["tokens"]["train"], "held_out_subjects": len(held),
               "mia_per_side": rep["probes"]["membership_inference"]["members"],
               "canary_subjects": len(train) - rep["data"]["subjects"]["train"], "decision": rep["decision"],
               **{f"{p}_s": round(statistics.median(v), 2) for p, v in times.items()},
               "total_runs_s": [round(x, 2) for x in times["total"]]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def controls() -> dict[str, Any]:
    """The test suite's two controls, re-run here with the default gate config; returns their headline figures."""
    import torch

    from foresight import tokens as T
    from privacy import canaries
    from privacy.audit import audit
    from tests.test_privacy_gate import FORGOTTEN, _train, privacy_warehouse

    torch.set_num_threads(1)
    d = OUT / "controls"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    db = privacy_warehouse(d / "w.duckdb")
    T.tokenize(db, d / "tok", T.TokenizerConfig(min_subjects=10), exclude_subjects=FORGOTTEN)
    out = {}
    for name, reps, per, kw in (
        ("positive", (1, 2, 4, 16), 3, dict(max_steps=800, lr=1e-2, min_lr=1e-2, warmup_steps=5, weight_decay=0.0)),
        ("negative", (1,), 16, dict(max_steps=8, lr=5e-3, min_lr=5e-4, warmup_steps=2, weight_decay=0.1)),
    ):
        canaries.insert(d / "tok", d / f"can_{name}", repeats=reps, per_repeat=per, length=20,
                        seed=1 if name == "positive" else 2, n_references=2000)
        t0 = time.perf_counter()
        model = _train(d / f"can_{name}", d / f"m_{name}", **kw)
        train_s = time.perf_counter() - t0
        rep = audit(model, d / f"can_{name}", d / f"audit_{name}", train_reference=True,
                    db=db if name == "negative" else None, forgotten=FORGOTTEN if name == "negative" else None)
        out[name] = headline(rep) | {"train_s": round(train_s, 1)}
        print(json.dumps({name: out[name]}, indent=1), flush=True)
    return out


def headline(rep: dict[str, Any]) -> dict[str, Any]:
    """The figures a reader wants first, from a report."""
    def est(e: dict[str, Any], scale: float = 1.0) -> str:
        if e.get("value") is None:
            return "n/a"
        ci = f" [{e['ci_low'] * scale:.3g}, {e['ci_high'] * scale:.3g}]" if e.get("ci_low") is not None else ""
        return f"{e['value'] * scale:.3g}{ci}"

    overall = next(r for r in rep["probes"]["membership_inference"]["rows"] if r["slice"] == "all")
    ex = rep["probes"]["extraction"]
    return {
        "decision": rep["decision"], "valid": rep["valid"],
        "probes": {k: v["decision"] for k, v in rep["gate"]["probes"].items()},
        "mia_members_per_side": rep["probes"]["membership_inference"]["members"],
        "mia_auc": {a: est(f["auc"]) for a, f in overall["attacks"].items()},
        "mia_tpr_at_1pct": {a: est(f["tpr@0.01"], 100) for a, f in overall["attacks"].items()},
        "slices_auc_loss": {r["slice"]: est(r["attacks"]["loss"]["auc"]) for r in
                            rep["probes"]["membership_inference"]["rows"] if r.get("measured")},
        "canaries": {g["repeats"]: f"{g['exposed']}/{g['canaries']} exposed, median exposure "
                                   f"{g['median_exposure_extrapolated']:.1f} bits "
                                   f"(rank {g['median_exposure_rank']:.1f})"
                     for g in (rep["probes"]["canaries"] or {"groups": []})["groups"]},
        "extraction": {f"k={row['k']} {m}": f"members {est(row[m]['member']['exact'], 100)}%, non-members "
                                            f"{est(row[m]['nonmember']['exact'], 100)}%, gap "
                                            f"{est(row[m]['exact_gap_points'])} points, k-eidetic "
                                            f"{row[m]['member']['eidetic']}"
                       for row in ex["by_k"] for m in ("greedy", "sampled") if m in row},
        "dcr_share": est(rep["probes"]["synthetic_cohort"]["dcr_share_closer_to_train"])
        if rep["probes"]["synthetic_cohort"] else None,
        "forgotten_auc_loss": est(rep["probes"]["forgotten"]["rows"][0]["attacks"]["loss"]["auc"])
        if rep["probes"]["forgotten"] and rep["probes"]["forgotten"]["rows"][0].get("measured") else None,
        "audit_s": rep["runtime_seconds"]["total"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200, help="training steps of the scaling models")
    ap.add_argument("--controls", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for the tiny preset)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if args.sizes:
        results["scaling"] = scaling(args.sizes, args.runs, args.steps)
    if args.controls:
        results["controls"] = controls()
    (OUT / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
