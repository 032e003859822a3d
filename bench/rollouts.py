"""Benchmark Monte Carlo futures: the batched KV-cache sampler vs a naive loop of HF ``generate``, same model.

Both sample ``--samples`` futures for each of ``--patients`` timelines, ``--new-tokens`` tokens each (no early stop,
so both do the same work): (a) ``Forecaster.sample_batch`` (prompt once per patient, cache repeated per sample,
all rows decoded together), (b) one ``model.generate(do_sample=True)`` call per patient and sample. Reports
generated tokens/s (median of ``--runs``) and their ratio, measured in the same process, plus next-event query
latency p50/p99 (``Forecaster.next_events`` one timeline at a time).

    python bench/rollouts.py --model work/demo/model --db work/demo/warehouse.duckdb
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from foresight import warehouse  # noqa: E402
from foresight.forecast import Forecaster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--patients", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    fc = Forecaster.from_pretrained(args.model)
    with warehouse.connect(args.db, read_only=True) as con:
        ids = [r[0] for r in con.execute(
            "SELECT subject_id FROM subject_splits WHERE split = 'held_out' ORDER BY subject_id").fetchall()]
        tls = [t for t in (fc.timeline_from_warehouse(con, s) for s in ids[: args.patients * 3]) if not t.dead]
    tls = tls[: args.patients]
    for t in tls:
        t.as_of = t.clock  # no waiting phase: both sides sample from the first token on
    total = len(tls) * args.samples * args.new_tokens
    horizon = 1e9  # never stop on time: both sides generate exactly new_tokens per future

    def batched() -> float:
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        per = max(1, 512 // args.samples)
        for b in range(0, len(tls), per):
            fc.sample_batch(tls[b:b + per], args.samples, horizon, 1.0, 1.0, gen, args.new_tokens)
        return total / (time.perf_counter() - t0)

    def naive() -> float:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        for t in tls:
            ids = torch.tensor(t.tokens[None, :])
            for _ in range(args.samples):
                fc.model.generate(ids, do_sample=True, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  pad_token_id=fc.vocab.index["[PAD]"], top_k=0)
        return total / (time.perf_counter() - t0)

    rows = {"batched": [], "naive": []}
    with torch.no_grad():
        for _ in range(args.runs):  # alternate, so both see the same machine
            rows["batched"].append(batched())
            rows["naive"].append(naive())
        lat = []
        for t in (tls * (args.queries // max(1, len(tls)) + 1))[: args.queries]:
            t0 = time.perf_counter()
            fc.next_events(t, top_k=10)
            lat.append((time.perf_counter() - t0) * 1000)
    med = {k: statistics.median(v) for k, v in rows.items()}
    prompt = np.median([len(t.tokens) for t in tls])
    print(f"\n### {date.today()} - futures: batched sampler vs HF generate loop, {platform.node()} "
          f"({os.cpu_count()} cores, {args.threads} torch threads)\n")
    print(f"Model {args.model} ({sum(p.numel() for p in fc.model.parameters()):,} parameters); {len(tls)} patients "
          f"x {args.samples} samples x {args.new_tokens} new tokens; median prompt {prompt:.0f} tokens.\n")
    print("| sampler | generated tokens/s per run | median |")
    print("|---|---|---:|")
    for k, v in rows.items():
        print(f"| {k} | {', '.join(f'{x:,.0f}' for x in v)} | {med[k]:,.0f} |")
    print(f"\nRatio batched / naive: **{med['batched'] / med['naive']:.1f}x**. Next-event query latency over "
          f"{len(lat)} queries: p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms.")


if __name__ == "__main__":
    main()
