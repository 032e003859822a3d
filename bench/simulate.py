"""Benchmark the built-in simulator: subjects/s, events/s and peak RSS, and the oracle's throughput.

Each size runs ``foresight simulate --json`` in a fresh process ``--runs`` times (median reported; the largest
size once unless ``--runs-large`` says otherwise). Peak RSS is the sum over the process and its workers, sampled
every 50 ms with psutil (``ru_maxrss`` would report only the largest single process, and with ``--workers 2``
two processes each hold a chunk). The oracle rows time ``Oracle.true_risk`` for every subject alive at
2025-01-01 (30-day admission, 32 Rao-Blackwellised futures per subject) and ``expected_weekly_admissions``
(26 weeks, 16 futures of the whole cohort) on the smallest size's output.

    python bench/simulate.py                                   # 10k, 100k (3 runs) and 1M (1 run), 2 workers
    python bench/simulate.py --sizes 10000 --runs 5 --workers 1
    python bench/simulate.py --write-results                   # also append a dated section to RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

# bench/ holds tokenize.py, which shadows the standard library's tokenize (imported by inspect, which the
# oracle's imports need) when a script runs from here: drop the script's folder from the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from foresight.simulate import Oracle, read_history  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "simulate"


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of a process and all its descendants, bytes."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run_once(subjects: int, workers: int, formats: list[str], out: Path) -> dict:
    """One ``foresight simulate`` in a fresh process: its JSON summary plus wall time and peak tree RSS."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "foresight.cli", "simulate", "--subjects", str(subjects), "--out", str(out),
           "--workers", str(workers), "--seed", "1", "--json"]
    for f in formats:
        cmd += ["--format", f]
    peak = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    ps = psutil.Process(proc.pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            with contextlib.suppress(psutil.Error):
                peak = max(peak, tree_rss(ps))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"foresight simulate failed ({proc.returncode}): {' '.join(cmd)}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"wall": wall, "events": summary["events"], "peak_mib": peak / 2**20}


def bench_oracle(folder: Path) -> dict:
    """Time the oracle on a simulated folder (in this process)."""
    oracle = Oracle.from_dir(folder)
    t0 = time.perf_counter()
    history = read_history(folder, oracle.model)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    risk = oracle.true_risk(history, "2025-01-01", 30, "admission", samples=32)
    t_risk = time.perf_counter() - t0
    pairs = int((~np.isnan(risk.probability)).sum())
    t0 = time.perf_counter()
    weekly = oracle.expected_weekly_admissions(history, "2025-01-01", 26, samples=16)
    t_week = time.perf_counter() - t0
    return {"read_s": t_read, "pairs": pairs, "risk_s": t_risk, "weekly_s": t_week, "weekly_subjects": weekly.subjects,
            "mean_se": float(np.nanmean(risk.stderr))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--runs", type=int, default=3, help="runs per size (median reported)")
    ap.add_argument("--runs-large", type=int, default=1, help="runs for sizes of 1M and more")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--format", dest="formats", nargs="+", default=["meds"])
    ap.add_argument("--write-results", action="store_true", help="append a dated section to bench/RESULTS.md")
    args = ap.parse_args()

    rows = []
    for n in args.sizes:
        runs = [run_once(n, args.workers, args.formats, OUT / f"n{n}")
                for _ in range(args.runs_large if n >= 1_000_000 else args.runs)]
        wall = statistics.median(r["wall"] for r in runs)
        row = {"subjects": n, "events": runs[0]["events"], "wall": wall, "subjects_s": n / wall,
               "events_s": runs[0]["events"] / wall, "peak_mib": max(r["peak_mib"] for r in runs),
               "runs": [round(r["wall"], 1) for r in runs]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    oracle = bench_oracle(OUT / f"n{args.sizes[0]}")
    print(json.dumps(oracle), file=sys.stderr)

    fmt = "+".join(args.formats)
    lines = [
        "| subjects | events | wall s (median) | subjects/s | events/s | peak RSS MiB | runs (s) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['subjects']:,} | {r['events']:,} | {r['wall']:.1f} | {r['subjects_s']:,.0f} | "
                     f"{r['events_s']:,.0f} | {r['peak_mib']:,.0f} | {', '.join(map(str, r['runs']))} |")
    lines += [
        "",
        f"Oracle on the {args.sizes[0]:,}-subject output: read the history {oracle['read_s']:.1f} s; "
        f"`true_risk` (30-day admission, 32 futures) for {oracle['pairs']:,} subjects alive at 2025-01-01 in "
        f"{oracle['risk_s']:.1f} s ({oracle['pairs'] / oracle['risk_s']:,.0f} pairs/s, mean stated SE "
        f"{oracle['mean_se']:.5f}); `expected_weekly_admissions` (26 weeks, 16 futures of "
        f"{oracle['weekly_subjects']:,} subjects) in {oracle['weekly_s']:.1f} s.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write_results:
        cpu = platform.processor() or platform.machine()
        load = psutil.getloadavg()
        section = (
            f"\n## {date.today().isoformat()} — Simulator: subjects/s, events/s, peak RSS (issue 3)\n\n"
            f"Machine: {psutil.cpu_count()}-core VM ({psutil.virtual_memory().total / 2**30:.0f} GiB, {cpu}), "
            f"Python {platform.python_version()}. Load average when it finished: {load[0]:.1f} "
            f"(other helpers' work shared the cores).\n"
            f"Command: `python bench/simulate.py --sizes {' '.join(map(str, args.sizes))} --runs {args.runs} "
            f"--workers {args.workers} --format {' '.join(args.formats)}` ({fmt}; chunks of 10,000 subjects, one "
            f"MEDS shard each; peak RSS summed over the process tree).\n\n{table}\n"
        )
        results = REPO / "bench" / "RESULTS.md"
        text = results.read_text() if results.exists() else "# Benchmark results\n"  # re-read right before writing
        results.write_text(text.rstrip("\n") + "\n" + section)


if __name__ == "__main__":
    main()
