"""The privacy gate's decision for a sane model as the cohort grows, and for the over-trained control (issue 21).

Sane model (``--lives N ...``): the built-in simulator writes N lives -> MEDS source -> warehouse -> tokenize
(floor 10) -> canaries planted as the pipeline plants them (repeats 1, 2, 4, 16; ``--per-repeat`` each; 5000
references) -> the tiny preset trained ``--epochs`` passes over the train split (or ``--steps``; seq 128,
micro-batch 8, lr 3e-3 -> 3e-4, weight decay 0.1) -> ``privacy.audit.audit`` with the shipped gate config
(three attacks: no reference model, as a new user runs it; ``--reference`` trains one on the tuning split).

Over-trained control (``--control``): the cohort of tests/test_privacy_gate.py (240 subjects), canaries 1, 2, 4, 16
(3 each), 800 steps (~100 epochs) at a constant lr 1e-2 without weight decay; it must FAIL.

Each run prints one JSON row (decision, each probe's decision, every FAIL/REVIEW finding with its reason, the
headline figures) and, with ``--md FILE``, appends a markdown row + the reasons to FILE.

    python bench/gate.py --lives 3000 --epochs 1 --control --md /tmp/coord/S-gate-results.md
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# bench/tokenize.py would shadow the standard library's tokenize module: the repository root goes first instead
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
OUT = REPO / "bench" / "out" / "gate"
SEQ, MICRO = 128, 8


def prepare(n: int, epochs: float, steps: int | None, per_repeat: int) -> tuple[Path, Path, dict[str, Any]]:
    """Simulated lives -> tokens with canaries -> a tiny model; each stage reused when already there."""
    from foresight import sources, warehouse
    from foresight import tokens as T
    from foresight import train as TR
    from foresight.dataset import PackedSplit
    from foresight.simulate import simulate
    from privacy import canaries

    d = OUT / f"n{n}"
    data = d / "canaries"
    t0 = time.perf_counter()
    if not (data / "canaries.json").exists():
        shutil.rmtree(d, ignore_errors=True)
        simulate(n, d / "sim", seed=0)
        with warehouse.connect(d / "w.duckdb") as con:
            sources.load("meds", con, d / "sim")
        T.tokenize(d / "w.duckdb", d / "tok", T.TokenizerConfig(min_subjects=10))
        canaries.insert(d / "tok", data, repeats=(1, 2, 4, 16), per_repeat=per_repeat, length=20, seed=0,
                        n_references=5000)
    prep_s = time.perf_counter() - t0
    train_tokens = PackedSplit(data, "train").n_tokens
    steps = steps or max(20, math.ceil(epochs * train_tokens / (SEQ * MICRO)))
    model = d / f"model_{steps}"
    t0 = time.perf_counter()
    if not (model / "config.json").exists():
        TR.train(data, model, TR.TrainConfig(preset="tiny", seq_len=SEQ, micro_batch=MICRO, max_steps=steps, lr=3e-3,
                                             min_lr=3e-4, warmup_steps=min(50, steps // 10), weight_decay=0.1,
                                             eval_every=0, eval_rows=8, checkpoint_every=0, log_every=10**6))
    info = {"train_tokens": train_tokens, "steps": steps, "epochs": round(steps * SEQ * MICRO / train_tokens, 2),
            "prepare_s": round(prep_s, 1), "train_s": round(time.perf_counter() - t0, 1)}
    return model, data, info


def control() -> tuple[Path, Path, dict[str, Any]]:
    """The over-trained control of tests/test_privacy_gate.py."""
    from foresight import tokens as T
    from privacy import canaries
    from tests.test_privacy_gate import _train, privacy_warehouse

    d = OUT / "control"
    model, data = d / "model", d / "canaries"
    t0 = time.perf_counter()
    if not (model / "config.json").exists():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        db = privacy_warehouse(d / "w.duckdb")
        T.tokenize(db, d / "tok", T.TokenizerConfig(min_subjects=10))
        canaries.insert(d / "tok", data, repeats=(1, 2, 4, 16), per_repeat=3, length=20, seed=1, n_references=2000)
        _train(data, model, max_steps=800, lr=1e-2, min_lr=1e-2, warmup_steps=5, weight_decay=0.0)
    return model, data, {"steps": 800, "epochs": "~100", "train_s": round(time.perf_counter() - t0, 1)}


def null_calibration(audits: int, n_boot: int) -> dict[str, Any]:
    """The membership-inference rule on scores with no signal at the issue's 30k slice sizes (2000 per side; mental
    health 660, substance use 416, infectious 314 non-members; four correlated attacks): how often it finds
    anything. Bootstrap replicates are cut to ``n_boot`` for speed (the TPR tests do not use them)."""
    import numpy as np

    from privacy import gate, mia

    cfg = gate.default_config()["mia"]
    sizes = {"mental_health": (700, 660), "substance_use": (400, 416), "infectious": (330, 314)}
    counts = {gate.PASS: 0, gate.REVIEW: 0, gate.FAIL: 0}
    for seed in range(audits):
        rng = np.random.default_rng(seed)
        b1, b0 = rng.normal(size=2000), rng.normal(size=2000)
        attacks = ("loss", "min_k", "min_k_pp", "reference")
        s1 = {a: b1 + 0.5 * rng.normal(size=2000) for a in attacks}
        s0 = {a: b0 + 0.5 * rng.normal(size=2000) for a in attacks}
        m1 = {k: rng.permutation(2000) < a for k, (a, _) in sizes.items()}
        m0 = {k: rng.permutation(2000) < b for k, (_, b) in sizes.items()}
        rows = mia.evaluate(s1, s0, m1, m0, alphas=tuple(cfg["report_fprs"]), n_boot=n_boot, seed=seed,
                            min_slice=cfg["min_slice_subjects"], tpr_limits=cfg["tpr_limits"],
                            min_false_positives=cfg["min_false_positives"])
        counts[gate.decide_mia(rows, cfg)["decision"]] += 1
    return {"run": f"null calibration, {audits} audits of random scores", "decisions": counts}


def summarise(name: str, rep: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The row: decision, probes, findings and the figures a reviewer reads first."""
    mi = rep["probes"]["membership_inference"]
    rows = [r for r in mi["rows"] if r.get("measured")]
    overall = next(r for r in rows if r["slice"] == "all")
    ex = rep["probes"]["extraction"]
    gaps = [row[m]["exact_gap_points"]["value"] for row in ex["by_k"] for m in ("greedy", "sampled") if m in row]
    syn = rep["probes"]["synthetic_cohort"] or {}
    return {
        "run": name, **info, "subjects": rep["data"]["subjects"], "decision": rep["decision"], "valid": rep["valid"],
        "probes": {k: v["decision"] for k, v in rep["gate"]["probes"].items()},
        "mia_per_side": mi["members"],
        "auc_all": {a: f["auc"]["value"] for a, f in overall["attacks"].items()},
        "max_auc_any_slice": max(f["auc"]["value"] for r in rows for f in r["attacks"].values()),
        "slices": {r["slice"]: {"nonmembers": r["nonmembers"], "judged_fpr": r.get("judged_fpr")} for r in rows},
        "max_extraction_gap_points": max(gaps) if gaps else None,
        "rare_copies": syn.get("rare_copies"),
        "findings": [f"{f['severity']} {f['probe']}: {f['reason']}" for f in rep["gate"]["findings"]
                     if f["severity"] != "INFO"],
        "audit_s": rep["runtime_seconds"]["total"],
    }


def markdown(row: dict[str, Any]) -> str:
    auc = ", ".join(f"{a} {v:.3f}" for a, v in row["auc_all"].items())
    slices = ", ".join(f"{s} {v['nonmembers']} @ {v['judged_fpr'] if v['judged_fpr'] is not None else 'unresolvable'}"
                       for s, v in row["slices"].items())
    rc = row["rare_copies"]
    copies = (f"{rc['timelines']} timelines / {rc['train_holders']} train holders vs {rc['expected_train_holders']:g} "
              f"expected (p {rc['p_value']:.2g})" if rc else "n/a")
    lines = [f"| {row['run']} | {row['subjects']['train']:,} / {row['subjects']['held_out']:,} | {row['steps']} "
             f"({row['epochs']} epochs) | **{row['decision']}** (valid {row['valid']}) | {auc} | "
             f"{row['max_auc_any_slice']:.3f} | {slices} | {row['max_extraction_gap_points']} | {copies} | "
             f"{row['audit_s']:.0f} |"]
    lines += [f"    - {f}" for f in row["findings"]] or ["    - (no FAIL/REVIEW finding)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lives", type=int, nargs="*", default=[])
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over the train split (sane model)")
    ap.add_argument("--steps", type=int, default=None, help="fixed training steps instead of --epochs")
    ap.add_argument("--per-repeat", type=int, default=5, help="canaries per repeat count")
    ap.add_argument("--reference", action="store_true", help="also train a reference model (the fourth attack)")
    ap.add_argument("--control", action="store_true", help="the over-trained control (must FAIL)")
    ap.add_argument("--null", type=int, default=0, help="audits of no-signal scores (the rule's false findings)")
    ap.add_argument("--md", type=Path, default=None, help="append markdown rows to this file")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    from privacy.audit import audit

    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.null:
        row = null_calibration(args.null, n_boot=200)
        print(json.dumps(row), flush=True)
        if args.md:
            with open(args.md, "a") as fh:
                fh.write(f"| {row['run']} | {row['decisions']} |\n")
    runs = [(f"sane, {n:,} lives", lambda n=n: prepare(n, args.epochs, args.steps, args.per_repeat))
            for n in args.lives]
    if args.control:
        runs.append(("over-trained control, 240 subjects", control))
    for name, make in runs:
        model, data, info = make()
        rep = audit(model, data, model.parent / f"audit_{model.name}", train_reference=args.reference)
        row = summarise(name, rep, info)
        print(json.dumps(row), flush=True)
        with open(OUT / "results.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if args.md:
            with open(args.md, "a") as fh:
                fh.write(markdown(row) + "\n")


if __name__ == "__main__":
    main()
