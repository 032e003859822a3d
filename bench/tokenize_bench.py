"""Benchmark `foresight tokenize`: events/s and peak RSS.

Inputs: the MIMIC-IV demo warehouse (built once under bench/out/) and, with ``--simulate N ...``, simulated
cohorts of N subjects (``foresight simulate`` then ``foresight etl meds``, built once under bench/out/).
Each input is tokenized ``--runs`` times in a fresh process; the median wall time is reported with the
child's own peak RSS (``os.wait4``, the largest of the runs), so flat memory as the cohort grows is visible.
``--memory 512MB`` runs ``foresight --memory 512MB tokenize`` (the DuckDB budget); ``--checkout DIR`` runs another
source tree's CLI (e.g. a ``git archive`` of HEAD) for a before/after comparison in the same session.

    python bench/tokenize_bench.py                         # demo only
    python bench/tokenize_bench.py --simulate 10000 100000 1000000
    python bench/tokenize_bench.py --no-demo --simulate 100000 300000 --runs 1 --memory 512MB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(os.environ.get("FORESIGHT_SHARED_DATA", REPO.parent / "shared" / "data")) / "mimic-iv-demo-2.2"
OUT = REPO / "bench" / "out"
FORESIGHT = str(Path(sys.executable).with_name("foresight"))


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, errs = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{errs[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out


def demo_warehouse() -> Path:
    db = OUT / "tokenize-demo.duckdb"
    if not db.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        run_measured([FORESIGHT, "etl", "mimic-iv", "--input", str(DEMO), "--db", str(db)])
    return db


def simulated_input(n: int) -> Path:
    """The simulator's MEDS output of ``n`` subjects (seed 1), written once under bench/out/sim-N."""
    sim = OUT / f"sim-{n}"
    if not (sim / "metadata" / "dataset.json").exists():
        run_measured([FORESIGHT, "simulate", "--subjects", str(n), "--out", str(sim), "--seed", "1",
                      "--workers", "2"])
    return sim


def simulated_warehouse(n: int) -> Path:
    """A warehouse of ``n`` simulated subjects, built once, in a process of its own: a child forked from a parent
    that built it in-process would report the parent's RSS at the fork as its own peak (Linux keeps ``ru_maxrss``
    across exec), e.g. 2,191 MiB for a 128 MB tokenize at 100k lives."""
    db = OUT / f"tokenize-sim-{n}.duckdb"
    if not db.exists():
        subprocess.run([sys.executable, __file__, "--build-warehouse", str(n)], check=True)
    return db


def build_simulated_warehouse(n: int) -> Path:
    """Build :func:`simulated_warehouse`'s file in this process.

    The events are inserted straight from the simulator's MEDS parquet (what `foresight etl meds` loads, without
    its staging and row checks): this benchmark measures tokenization, and a 1M-subject ETL is its own benchmark.
    """
    import duckdb

    from foresight import warehouse

    db = OUT / f"tokenize-sim-{n}.duckdb"
    if db.exists():
        return db
    sim = simulated_input(n)
    con = warehouse.connect(db)
    try:
        con.execute(f"""
            INSERT INTO events
            SELECT subject_id, time, code, numeric_value, text_value, NULL, NULL, 'sim', 'meds', 'bench'
            FROM read_parquet('{sim}/data/*.parquet') ORDER BY subject_id, time;
            INSERT INTO subject_splits
            SELECT subject_id, split FROM read_parquet('{sim}/metadata/subject_splits.parquet');
            INSERT INTO codes SELECT code, description, fs_kind(code), coalesce(parent_codes, []), 'sim'
            FROM read_parquet('{sim}/metadata/codes.parquet');
            INSERT INTO etl_runs VALUES ('bench', 'sim', 'meds', '{sim}', '{{}}', now(), now(), 0, 0, 0, 0,
                                         '{{}}', 0, 0, '[]', 'bench');
        """)
    except duckdb.Error:
        con.close()
        db.unlink(missing_ok=True)
        raise
    con.close()
    return db


def events_in(db: Path) -> int:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT count(*) FROM events").fetchall()[0][0]


def bench(db: Path, runs: int, memory: str | None = None, checkout: Path | None = None) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    from etl import foresight_cmd  # the same command line (budget, other source tree) as the ETL benchmark

    cmd, env = foresight_cmd(memory, checkout)
    walls, rss, tokens = [], [], 0
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            wall, peak, out = run_measured([*cmd, "tokenize", "--db", str(db), "--out", tmp, "--json"], env)
        tokens = sum(json.loads(out.strip().splitlines()[-1])["tokens"].values())
        walls.append(wall)
        rss.append(peak)
    return {"wall_s": statistics.median(walls), "walls": walls, "rss_mib": max(rss), "tokens": tokens,
            "events": events_in(db)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulate", type=int, nargs="*", default=[], help="simulated cohort sizes")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--memory", help="memory budget (foresight --memory), e.g. 512MB; default: the machine's")
    ap.add_argument("--checkout", type=Path, help="run this source tree's CLI instead (before/after comparisons)")
    ap.add_argument("--build-warehouse", type=int, metavar="N", help=argparse.SUPPRESS)  # simulated_warehouse's child
    args = ap.parse_args()
    if args.build_warehouse:
        build_simulated_warehouse(args.build_warehouse)
        return
    opts = {"memory": args.memory, "checkout": args.checkout}
    tag = "".join([f", memory {args.memory}" if args.memory else "", f", {args.checkout}" if args.checkout else ""])
    rows = []
    if not args.no_demo:
        rows.append((f"MIMIC-IV demo warehouse{tag}", bench(demo_warehouse(), args.runs, **opts)))
    for n in args.simulate:
        rows.append((f"simulated, {n:,} subjects{tag}", bench(simulated_warehouse(n), args.runs, **opts)))
        print(rows[-1], file=sys.stderr)
    print(f"\n### {date.today()} - tokenize, {platform.node()} ({os.cpu_count()} cores), median of {args.runs}\n")
    print("| input | events | tokens | wall s (median) | events/s | peak RSS MiB (max) | runs (s) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in rows:
        print(f"| {name} | {r['events']:,} | {r['tokens']:,} | {r['wall_s']:.2f} | {r['events'] / r['wall_s']:,.0f} | "
              f"{r['rss_mib']:.0f} | {', '.join(f'{w:.2f}' for w in r['walls'])} |")


if __name__ == "__main__":
    main()
