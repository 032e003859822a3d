"""A/B: calendar-month markers (``MONTH//01``..``MONTH//12``) in the tokens vs none (issue 18's seasonality).

The demo's cohort (10,000 lives, admission hazards x3, seed 1; cached by bench/end_censoring.py under
bench/out/censoring) and the demo's training (tiny, context 256, 1,600 steps x 2,048 tokens, ``[END]`` censored).
B = bench/end_censoring.py's censored model (tokens without MONTH markers, read from its ``end_censoring.json``);
M = the same recipe on the same warehouse tokenized with ``month_tokens`` on (its own token folder and model).
For M, with the future's MONTH markers drawn by the model (``free``) and written from the sampler's clock
(``forced``, :mod:`foresight.forecast.months`), and for B again with ``--rerun-b`` (the timing):

- expected admissions (``ADMIT//*``) of the held-out cohort over 12 weeks from 2025-10-01, 2025-06-01 and
  2024-06-01 vs the simulator's oracle and what happened (bench/end_censoring.py's ``forecasts``);
- the month markers the model writes in its own futures: whether each sampled ``MONTH//mm`` is the month of the
  sampler's clock, and how many sampled codes follow a MONTH marker that the clock has left behind (``stale``);
- 30-day admission after discharge (``--points`` held-out points), skip with ``--no-evaluate``;
- tokens per life of both folders, and a check that tokenizing with ``month_tokens=False`` rebuilds B's folder
  byte for byte (``--check-old``).

    OMP_NUM_THREADS=1 python bench/month_marker.py            # ~20 min on 2 cores (training ~8 of them)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _censoring() -> Any:
    """bench/end_censoring.py as a module (cohort, training recipe, forecasts, evaluation), loaded by path."""
    from foresight.devtools.scripts import load_script

    return load_script(Path(__file__).with_name("end_censoring.py"))


def tokens_per_life(folder: Path) -> dict[str, float]:
    """Mean tokens per subject of the train split, and the share that are MONTH markers."""
    from foresight.tokens import Vocabulary

    vocab = Vocabulary.load(folder / "vocab.json")
    index = np.load(folder / "train.index.npy")
    toks = np.fromfile(folder / "train.bin", dtype=vocab.dtype)
    month = np.array([t.startswith("MONTH//") for t in vocab.tokens])
    return {"subjects": len(index), "tokens_per_life": round(float(index["length"].mean()), 1),
            "month_share": round(float(month[toks].mean()), 4)}


def tokenize(db: Path, out: Path, month: bool) -> float:
    """The warehouse -> tokens with the bench's floor (10), MONTH markers on or off; seconds (0 when done)."""
    from foresight import tokens as T

    if (out / "COMPLETE").exists():
        return 0.0
    t0 = time.perf_counter()
    T.tokenize(db, out, T.TokenizerConfig(min_subjects=10, month_tokens=month))
    return time.perf_counter() - t0


def same_folder(a: Path, b: Path) -> bool:
    """Every split file byte for byte, and vocab.json's tokens and config as read back (a vocabulary saved before
    ``month_tokens`` existed has no such key: it reads as False)."""
    from foresight.tokens import TokenizerConfig

    files = [f"{s}{x}" for s in ("train", "tuning", "held_out") for x in (".bin", ".clock.bin", ".index.npy")]
    va, vb = (json.loads((d / "vocab.json").read_text()) for d in (a, b))
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files) and va["tokens"] == vb["tokens"] and \
        TokenizerConfig.from_dict(va["config"]) == TokenizerConfig.from_dict(vb["config"])


def month_drift(model: Path, db: Path, day: str, people: int, samples: int) -> dict[str, Any]:
    """Do the model's own futures keep MONTH markers in step with the sampler's clock? Over ``samples`` futures of
    ``people`` held-out prompts (12 weeks from ``day``): sampled MONTH markers, the share naming the clock's month,
    and the sampled code tokens whose latest MONTH marker (prompt or future) is not the clock's month."""
    import torch

    from foresight import warehouse
    from foresight.forecast import Forecaster
    from foresight.tokens import months_of, to_epoch

    fc = Forecaster.from_pretrained(model)
    vocab = fc.vocab
    month_of_tok = {i: int(t[len("MONTH//"):]) for i, t in enumerate(vocab.tokens) if t.startswith("MONTH//")}
    as_of = datetime.fromisoformat(day)
    with warehouse.connect(db, read_only=True) as con:
        ids = [int(r[0]) for r in con.execute(
            "SELECT subject_id FROM subject_splits WHERE split = 'held_out' ORDER BY subject_id").fetchall()]
        tls = [t for t in fc.timelines_from_warehouse(con, ids, as_of) if not t.dead][:people]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        batch = fc.sample_batch(tls, samples, 84, 1.0, 1.0, gen, 512)
    markers = right = codes = stale = 0
    for r, toks in enumerate(batch.tokens):
        tl = tls[r // samples]
        last = next((month_of_tok[int(t)] for t in tl.tokens[::-1] if int(t) in month_of_tok), None)
        clock = to_epoch(tl.clock) + np.asarray(batch.elapsed_s[r])
        for k, t in enumerate(toks):
            t = int(t)
            now = int(months_of(np.array([int(clock[k])]))[0])
            if t in month_of_tok:
                markers += 1
                right += month_of_tok[t] == now
                last = month_of_tok[t]
            elif vocab.is_event[t]:
                codes += 1
                stale += last != now
    return {"as_of": day, "rows": len(batch.tokens), "month_markers": markers,
            "markers_right": round(right / max(markers, 1), 3), "codes": codes,
            "codes_after_stale_month": round(stale / max(codes, 1), 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lives", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--points", type=int, default=500)
    p.add_argument("--no-evaluate", action="store_true")
    p.add_argument("--rerun-b", action="store_true", help="forecast with B's model again (its timing)")
    p.add_argument("--check-old", action="store_true", help="re-tokenize without MONTH: B's folder byte for byte?")
    p.add_argument("--drift-people", type=int, default=150)
    p.add_argument("--variants", nargs="+", choices=("free", "forced"), default=["free", "forced"],
                   help="MONTH markers of a future: drawn by the model (free) or written from the sampler's clock")
    p.add_argument("--as-of", nargs="+", default=None, help="forecast dates (default: bench/end_censoring.py's)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cens = _censoring()
    if args.as_of:
        cens.AS_OF = tuple(args.as_of)
    root = cens.OUT / f"n{args.lives}-s{args.seed}"
    paths = cens.cohort(root, args.lives, args.seed)
    out: dict[str, Any] = {"date": datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    month_tokens = root / "tokens_month"
    out["tokenize_month_s"] = round(tokenize(paths["db"], month_tokens, True), 1)
    out["tokens"] = {"B": tokens_per_life(paths["tokens"]), "M": tokens_per_life(month_tokens)}
    cens.log(f"tokens: {out['tokens']}")
    if args.check_old:
        old = root / "tokens_nomonth_check"
        tokenize(paths["db"], old, False)
        out["old_layout_identical"] = same_folder(old, paths["tokens"])
        cens.log(f"month_tokens=False rebuilds B's folder byte for byte: {out['old_layout_identical']}")
    model = root / "model_month"
    cens.log("training M (month markers, [END] censored)")
    out["train_s"] = round(cens.train_model(month_tokens, model, True), 1)
    mpaths = {**paths, "tokens": month_tokens}
    rows: dict[str, Any] = {}
    if args.rerun_b:
        t0 = time.perf_counter()
        rows["B"] = {"forecasts": cens.forecasts(root / "model_censoring", paths, args.samples)}
        rows["B"]["forecast_s"] = round(time.perf_counter() - t0, 1)
    from foresight.forecast.sampling import FutureSampler

    for variant in args.variants:  # who writes the MONTH markers of a future: the model, or the sampler's clock
        FutureSampler.force_months = variant == "forced"
        name = f"M {variant}"
        t0 = time.perf_counter()
        rows[name] = {"forecasts": cens.forecasts(model, mpaths, args.samples)}
        rows[name]["forecast_s"] = round(time.perf_counter() - t0, 1)
        rows[name]["drift"] = [month_drift(model, paths["db"], day, args.drift_people, args.samples)
                               for day in cens.AS_OF[:2]]
        cens.log(f"{name} drift: {rows[name]['drift']}")
        if not args.no_evaluate:
            cens.log(f"evaluating {name}")
            rows[name]["admission_30d"] = cens.evaluate(model, mpaths, args.points)
        print(json.dumps({name: rows[name]}), flush=True)
    out["rows"] = rows
    print(json.dumps(out), flush=True)
    name = f"month_marker-{'-'.join(args.variants)}{'-dates' if args.as_of else ''}.json"
    (root / name).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
