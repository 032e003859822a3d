"""Benchmark the sharded load on Dask against the single-node load: wall time and speed-up.

Input: the MIMIC-IV demo replicated ``--copies`` times (default 10; ids offset per copy, written once under
bench/out/ by bench/etl.py's ``replicate``). Each configuration runs the real CLI in a fresh process:

- single node: ``foresight etl mimic-iv --input X --db W --json``
- sharded:     ``foresight etl mimic-iv --input X --db W --workers N --json`` (a LocalCluster of N single-threaded
  worker processes, N shards; the flow runs against a temporary local Prefect server)

Reported per configuration (median of ``--runs``): end-to-end wall seconds (process start to exit: includes the
temporary Prefect server and the Dask cluster starting), the seconds inside the load (the JSON's ``seconds``: for
the sharded path, shards + merge, after the cluster is up), events/s on that figure, and the speed-up over the
single node on both. The machine's load average is printed with each row: other jobs on the same cores make every
timing an upper bound. ``--check`` also compares the sharded warehouse with the single-node one (events, codes,
splits, quarantine).

    python bench/sharded.py                       # demo x10, single vs 1 vs 2 workers, 1 run each
    python bench/sharded.py --copies 1 --runs 3 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from etl import DEMO, OUT, replicate, run_once  # noqa: E402  (bench/etl.py, after the path lines above)

CLI = [str(Path(sys.executable).with_name("foresight"))]
COMPARED = ("events EXCLUDE (load_id)", "quarantine EXCLUDE (run_id)", "codes", "subject_splits")


def one_config(inp: Path, workers: int | None, runs: int, keep: Path | None = None) -> dict:
    """Median wall and in-load seconds of ``runs`` loads; ``keep``: copy the last warehouse there."""
    walls, inner, events = [], [], 0
    for _ in range(runs):
        with tempfile.TemporaryDirectory(dir=OUT) as tmp:
            db = Path(tmp) / "w.duckdb"
            cmd = [*CLI, "etl", "mimic-iv", "--input", str(inp), "--db", str(db), "--json"]
            if workers:
                cmd += ["--workers", str(workers)]
            wall, _, out = run_once(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
            payload = json.loads(out.strip().splitlines()[-1])
            walls.append(wall)
            inner.append(payload["seconds"])
            events = payload["events"]
            if keep is not None:
                keep.unlink(missing_ok=True)
                db.rename(keep)
    return {"workers": workers, "wall_s": statistics.median(walls), "load_s": statistics.median(inner),
            "events": events, "load": os.getloadavg()[0]}


def same_warehouse(a: Path, b: Path) -> bool:
    """Whether two warehouses hold the same events, quarantine rows, codes and splits (sorted)."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"ATTACH '{a}' AS a (READ_ONLY); ATTACH '{b}' AS b (READ_ONLY)")
    for t in COMPARED:
        table, _, rest = t.partition(" ")
        for x, y in (("a", "b"), ("b", "a")):
            n = con.execute(f"SELECT count(*) FROM (SELECT * {rest} FROM {x}.{table} "
                            f"EXCEPT ALL SELECT * {rest} FROM {y}.{table})").fetchall()[0][0]
            if n:
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="compare each sharded warehouse with the single-node one")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    inp = DEMO if args.copies == 1 else replicate(DEMO, OUT / f"mimic-x{args.copies}", args.copies)
    keep = OUT / "sharded-bench-single.duckdb" if args.check else None
    base = one_config(inp, None, args.runs, keep)
    rows = [base]
    print(json.dumps(base), flush=True)
    for n in args.workers:
        other = OUT / f"sharded-bench-{n}.duckdb" if args.check else None
        row = one_config(inp, n, args.runs, other)
        row["speedup_wall"] = round(base["wall_s"] / row["wall_s"], 2)
        row["speedup_load"] = round(base["load_s"] / row["load_s"], 2)
        if args.check:
            row["same_as_single"] = same_warehouse(keep, other)
            other.unlink()
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| path | workers | events | end-to-end wall s | load s | events/s (load) | speed-up wall | "
          "speed-up load | load avg |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'sharded' if r['workers'] else 'single node'} | {r['workers'] or '-'} | {r['events']:,} | "
              f"{r['wall_s']:.1f} | {r['load_s']:.1f} | {r['events'] / r['load_s']:,.0f} | "
              f"{r.get('speedup_wall', 1.0)} | {r.get('speedup_load', 1.0)} | {r['load']:.1f} |")
    if keep is not None:
        keep.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
