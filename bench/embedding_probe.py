"""The embedding probe of the privacy audit (issue 20) on the gate benchmark's cached models, and its null rate.

Models (``--models``): folders under ``bench/out/gate`` that ``bench/gate.py`` trained (``n3000``, ``n30000``, the
over-trained ``control``); each one's newest ``model*`` directory is probed against its ``canaries`` token folder with
the shipped gate config (``privacy.embedding_probe.run`` exactly as the audit calls it, on the same sample of members
and non-members). Nothing is written into the
model folders. ``--pooling`` overrides the config's pooling (e.g. to compare ``mean`` and ``last``).

``--big-control N`` trains the over-trained control of tests/test_privacy_gate.py (~100 epochs, constant lr 1e-2,
no weight decay) on N subjects of its cohort (the 240-subject one leaves 27-46 subjects with each attribute per side:
too few to resolve a gap) and probes it.

Null calibration (``--null N``): N audits of synthetic embeddings where the attribute is equally readable for members
and non-members (64 dimensions, one carries the label with the given effect, 3 attributes family-wise): how often the
rule REVIEWs a model that does not memorise. ``--planted`` adds the same with a member-only extra signal (power).

    python bench/embedding_probe.py --models n3000 n30000 control --null 100 --md /tmp/coord/S-probe-results.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# bench/tokenize.py would shadow the standard library's tokenize module: the repository root goes first instead
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
GATE = REPO / "bench" / "out" / "gate"


def big_control(n: int, epochs: int) -> Path:
    """The over-trained control of tests/test_privacy_gate.py (constant lr 1e-2, no weight decay, seq 128, batch 8)
    on ``n`` subjects of its cohort instead of 240, trained ``epochs`` passes; under ``bench/out/probe/control_<n>``
    (reused when there). Returns the folder (``model``, ``canaries``: the token folder, no canaries planted)."""
    import math

    from foresight import tokens as T
    from foresight.dataset import PackedSplit
    from tests.test_privacy_gate import _train, privacy_warehouse

    d = REPO / "bench" / "out" / "probe" / f"control_{n}"
    if not (d / "model" / "config.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "canaries" / "vocab.json").exists():
            (d / "w.duckdb").unlink(missing_ok=True)
            T.tokenize(privacy_warehouse(d / "w.duckdb", n=n), d / "canaries", T.TokenizerConfig(min_subjects=10))
        steps = math.ceil(epochs * PackedSplit(d / "canaries", "train").n_tokens / (128 * 8))
        print(f"training the {n}-subject control: {steps} steps", file=sys.stderr, flush=True)
        _train(d / "canaries", d / "model", max_steps=steps, lr=1e-2, min_lr=1e-2, warmup_steps=5, weight_decay=0.0)
    return d


def probe_model(name: str, pooling: str | None) -> dict[str, Any]:
    """The probe on one cached model of the gate benchmark (a folder under bench/out/gate, or a path), as the audit
    runs it."""
    import numpy as np

    from privacy import embedding_probe, gate, mia
    from privacy.audit import load_inputs

    d = GATE / name if (GATE / name).is_dir() else Path(name)
    model = max((p for p in d.glob("model*") if (p / "config.json").exists()), key=lambda p: p.stat().st_mtime)
    cfg = gate.default_config()
    if pooling:
        cfg["embedding_probe"]["pooling"] = pooling
    inp = load_inputs(model, d / "canaries", None)
    t0 = time.perf_counter()
    mem_idx, non_idx = mia.balanced_sample(inp.real_train, np.arange(len(inp.held)),  # the audit's sample
                                           cfg["audit"]["max_subjects_per_side"], cfg["audit"]["seed"])
    res = embedding_probe.run(inp.fc, inp.train, inp.held, mem_idx, non_idx,
                              cfg["embedding_probe"], cfg["slices"]["sensitive"], seed=cfg["audit"]["seed"],
                              n_boot=cfg["audit"]["bootstrap"], level=cfg["audit"]["ci_level"],
                              progress=lambda m: print(m, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t0
    decision = gate.decide_embedding_probe(res, cfg["embedding_probe"])
    return {"run": f"{d.name}/{model.name}", "subjects": {"train": len(inp.real_train), "held_out": len(inp.held)},
            "pooling": res["pooling"], "decision": decision["decision"], "reasons": decision["reasons"],
            "notes": decision["notes"], "attributes": res["attributes"], "seconds": round(seconds, 1)}


def synthetic_side(rng: Any, n_pos: int, n_neg: int, effect: float, dims: int = 64) -> tuple[Any, Any]:
    """Embeddings where dimension 0 carries the label with ``effect`` (standard deviations) and the rest is noise."""
    import numpy as np

    y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    x = rng.normal(size=(len(y), dims))
    x[:, 0] += effect * y
    return x, y


def null_rate(audits: int, effect: float, member_extra: float, n_pos: int = 100, attributes: int = 3
              ) -> dict[str, Any]:
    """REVIEWs among ``audits`` synthetic probe comparisons (Bonferroni over ``attributes``, one simulated)."""
    import numpy as np

    from privacy import embedding_probe as ep
    from privacy import gate

    cfg = gate.default_config()
    margin = cfg["embedding_probe"]["margin"]
    fw = 1 - (1 - cfg["audit"]["ci_level"]) / attributes
    reviews, gaps = 0, []
    for seed in range(audits):
        rng = np.random.default_rng(seed)
        xm, ym = synthetic_side(rng, n_pos, 2 * n_pos, effect + member_extra)
        xn, yn = synthetic_side(rng, n_pos, 2 * n_pos, effect)
        fit = {"cv_folds": cfg["embedding_probe"]["cv_folds"], "repeats": cfg["embedding_probe"]["repeats"],
               "seed": seed}
        row = ep.compare(ep.out_of_fold_scores(xm, ym, **fit), ym, ep.out_of_fold_scores(xn, yn, **fit), yn,
                         n_boot=cfg["audit"]["bootstrap"], level=cfg["audit"]["ci_level"], familywise_level=fw,
                         seed=seed)
        reviews += ep.gap_is_significant(row, margin)
        gaps.append(row["gap"]["value"])
    return {"run": f"synthetic, effect {effect:g} sd, member-only extra {member_extra:g} sd, {n_pos} with / "
                   f"{2 * n_pos} without per side, {audits} audits", "reviews": reviews,
            "mean_gap": round(float(np.mean(gaps)), 4), "sd_gap": round(float(np.std(gaps)), 4)}


def markdown(row: dict[str, Any]) -> str:
    if "attributes" not in row:
        return f"| {row['run']} | {row['reviews']} REVIEW | gap mean {row['mean_gap']} (sd {row['sd_gap']}) |"

    def est(e: dict[str, Any]) -> str:
        return f"{e['value']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"

    lines = [f"**{row['run']}** ({row['subjects']['train']:,} train / {row['subjects']['held_out']:,} held-out, "
             f"{row['pooling']} pooling): **{row['decision']}**, {row['seconds']} s", "",
             "| attribute | with / without per side | AUROC members | AUROC non-members | gap [95% CI] | "
             "gap family-wise low |", "|---|---|---|---|---|---|"]
    for a in row["attributes"]:
        if not a["measured"]:
            lines.append(f"| {a['attribute']} | not measured: {a['why']} | | | | |")
            continue
        lines.append(f"| {a['attribute']} | {a['positives']} / {a['negatives']} | {est(a['auroc_members'])} | "
                     f"{est(a['auroc_nonmembers'])} | {est(a['gap'])} | {a['gap']['ci_low_familywise']:.3f} |")
    return "\n".join([*lines, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=[], help="folders under bench/out/gate (n3000, n30000, control)")
    ap.add_argument("--big-control", type=int, default=0, help="also train and probe the control on this many "
                    "subjects (bench/out/probe/control_N)")
    ap.add_argument("--epochs", type=int, default=100, help="passes over the train split for --big-control")
    ap.add_argument("--pooling", default=None, help="override the config's pooling (mean, last, both)")
    ap.add_argument("--null", type=int, default=0, help="synthetic no-signal audits (false-REVIEW rate)")
    ap.add_argument("--planted", type=int, default=0, help="synthetic audits with a member-only signal (power)")
    ap.add_argument("--positives", type=int, default=100, help="subjects with the attribute per side (synthetic)")
    ap.add_argument("--md", type=Path, default=None, help="append markdown to this file")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    models = list(args.models) + ([str(big_control(args.big_control, args.epochs))] if args.big_control else [])
    rows = [probe_model(m, args.pooling) for m in models]
    if args.null:
        rows.append(null_rate(args.null, effect=0.5, member_extra=0.0, n_pos=args.positives))
    if args.planted:
        rows.append(null_rate(args.planted, effect=0.5, member_extra=0.5, n_pos=args.positives))
    for row in rows:
        print(json.dumps(row), flush=True)
        if args.md:
            with open(args.md, "a") as fh:
                fh.write(markdown(row) + "\n")


if __name__ == "__main__":
    main()
