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
    python bench/sharded.py --meds 100000 --workers 2 --check   # the simulator's MEDS output of 100k lives

``--tokenize N`` benchmarks ``foresight tokenize`` instead, on N simulated lives (the warehouse
bench/tokenize_bench.py builds once under bench/out/): single node, then ``--workers`` 1 and 2 (N shards on a
LocalCluster). Per configuration: end-to-end wall, the JSON's ``seconds`` (inside the tokenize: for the sharded
path after the temporary Prefect server and the cluster are up), events/s on both, the peak RSS of the largest
process (``os.wait4``) and the peak of the whole process tree's summed RSS (sampled every 0.2 s: the workers
and the Prefect server included). ``--check`` compares each sharded folder with the single-node one (split files
byte for byte, vocabulary as parsed JSON).

    python bench/sharded.py --tokenize 100000 --workers 1 2 --check

``--profile K ...`` (with ``--tokenize N``) runs the sharded tokenize in this process, shards one after another
(no cluster), once per shard count K, and splits its time into the shard tasks (per step: fit map, marker map,
encode: the work N workers share) and the coordinator (the reduces and the merge of the split files: serial).
From those, the wall time on W workers is about coordinator + tasks / W (with K = W shards).

    python bench/sharded.py --tokenize 100000 --profile 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from etl import DEMO, OUT, replicate, run_once  # noqa: E402  (bench/etl.py, after the path lines above)

CLI = [str(Path(sys.executable).with_name("foresight"))]
COMPARED = ("events EXCLUDE (load_id)", "quarantine EXCLUDE (run_id)", "codes", "subject_splits")


def one_config(inp: Path, workers: int | None, runs: int, keep: Path | None = None, kind: str = "mimic-iv") -> dict:
    """Median wall and in-load seconds of ``runs`` loads of ``kind``; ``keep``: copy the last warehouse there."""
    walls, inner, events = [], [], 0
    for _ in range(runs):
        with tempfile.TemporaryDirectory(dir=OUT) as tmp:
            db = Path(tmp) / "w.duckdb"
            cmd = [*CLI, "etl", kind, "--input", str(inp), "--db", str(db), "--json"]
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


def run_tree(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """(wall s, peak RSS MiB of the largest process, peak summed RSS MiB of the process tree, stdout) of ``cmd``."""
    import psutil

    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, env=env)
        top, tree_peak = psutil.Process(proc.pid), 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            total = 0
            try:
                for p in [top, *top.children(recursive=True)]:
                    total += p.memory_info().rss
            except psutil.Error:
                pass
            tree_peak = max(tree_peak, total)
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        fout.seek(0)
        ferr.seek(0)
        out, errs = fout.read().decode(), ferr.read().decode()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{errs[-3000:]}")
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
    return wall, usage.ru_maxrss / 1024, tree_peak / 2**20, out


def same_tokens(a: Path, b: Path) -> bool:
    """Whether two token folders hold the same split files (bytes) and vocabulary (parsed)."""
    names = sorted(p.name for p in a.iterdir() if p.name.endswith((".bin", ".npy")))
    return (names == sorted(p.name for p in b.iterdir() if p.name.endswith((".bin", ".npy")))
            and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
            and json.loads((a / "vocab.json").read_text()) == json.loads((b / "vocab.json").read_text()))


def tokenize_config(db: Path, workers: int | None, keep: Path | None) -> dict:
    """One tokenize of ``db`` in a fresh process (sharded on ``workers`` when given); ``keep``: the folder there."""
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        out = Path(tmp) / "tok"
        cmd = [*CLI, "tokenize", "--db", str(db), "--out", str(out), "--json"]
        if workers:
            cmd += ["--workers", str(workers)]
        wall, rss, tree, stdout = run_tree(cmd, {**os.environ, "OMP_NUM_THREADS": "1"})
        payload = json.loads(stdout.strip().splitlines()[-1])
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            out.rename(keep)
    return {"workers": workers, "wall_s": wall, "inner_s": payload["seconds"], "rss_mib": rss, "tree_mib": tree,
            "keys": sorted(payload), "load": os.getloadavg()[0]}


def tokenize_bench(n: int, workers: list[int], check: bool) -> None:
    """Single node vs ``workers`` on ``n`` simulated lives: a JSON line per configuration, then a markdown table."""
    from tokenize_bench import events_in, simulated_warehouse

    db = simulated_warehouse(n)
    events = events_in(db)
    single = OUT / "tokshard-single" if check else None
    rows = [tokenize_config(db, None, single)]
    print(json.dumps(rows[-1]), flush=True)
    for w in workers:
        other = OUT / f"tokshard-{w}" if check else None
        rows.append(tokenize_config(db, w, other))
        rows[-1]["same_keys"] = rows[-1]["keys"] == rows[0]["keys"]
        if check:
            rows[-1]["same_as_single"] = same_tokens(single, other)
            shutil.rmtree(other)
        print(json.dumps(rows[-1]), flush=True)
    if single is not None:
        shutil.rmtree(single)
    print("\n| path | workers | events | end-to-end wall s | tokenize s | events/s (end-to-end) | events/s "
          "(tokenize) | peak RSS MiB, largest process | peak RSS MiB, process tree | same folder | load avg |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'sharded' if r['workers'] else 'single node'} | {r['workers'] or '-'} | {events:,} | "
              f"{r['wall_s']:.1f} | {r['inner_s']:.1f} | {events / r['wall_s']:,.0f} | {events / r['inner_s']:,.0f} | "
              f"{r['rss_mib']:.0f} | {r['tree_mib']:.0f} | {r.get('same_as_single', '-')} | {r['load']:.1f} |")


def profile(n: int, shard_counts: list[int]) -> None:
    """Seconds in the shard tasks (per step) and in the coordinator of a serial sharded tokenize of ``n`` lives."""
    from tokenize_bench import events_in, simulated_warehouse

    from foresight.tokens import sharded as tokshard

    db = simulated_warehouse(n)
    events = events_in(db)
    print("\n| shards | events | fit map s | marker map s | encode s | tasks s (sum) | coordinator s | total s | "
          "est. wall on K workers s | load avg |\n|---|---|---|---|---|---|---|---|---|---|")
    for k in shard_counts:
        steps: dict[str, float] = {}

        def timed(step, calls, steps=steps):
            t0 = time.perf_counter()
            out = tokshard.serial(step, calls)
            steps[step.__name__] = steps.get(step.__name__, 0.0) + time.perf_counter() - t0
            return out

        with tempfile.TemporaryDirectory(dir=OUT) as tmp:
            t0 = time.perf_counter()
            tokshard.tokenize_sharded(db, Path(tmp) / "tok", shards=k, mapper=timed)
            total = time.perf_counter() - t0
        tasks = sum(steps.values())
        print(f"| {k} | {events:,} | {steps.get('fit_shard', 0):.1f} | {steps.get('clock_shard', 0):.1f} | "
              f"{steps.get('encode_shard', 0):.1f} | {tasks:.1f} | {total - tasks:.1f} | {total:.1f} | "
              f"{total - tasks + tasks / k:.1f} | {os.getloadavg()[0]:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="compare each sharded warehouse with the single-node one")
    ap.add_argument("--tokenize", type=int, metavar="N", help="benchmark tokenize on N simulated lives instead")
    ap.add_argument("--profile", type=int, nargs="+", metavar="K", help="with --tokenize: serial runs of K shards")
    ap.add_argument("--meds", type=int, metavar="N",
                    help="load the simulator's MEDS output of N lives (bench/out/sim-N) instead of the MIMIC demo")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.tokenize and args.profile:
        profile(args.tokenize, args.profile)
        return
    if args.tokenize:
        tokenize_bench(args.tokenize, args.workers, args.check)
        return
    kind = "meds" if args.meds else "mimic-iv"
    if args.meds:
        from tokenize_bench import simulated_input

        inp = simulated_input(args.meds)
    else:
        inp = DEMO if args.copies == 1 else replicate(DEMO, OUT / f"mimic-x{args.copies}", args.copies)
    keep = OUT / "sharded-bench-single.duckdb" if args.check else None
    base = one_config(inp, None, args.runs, keep, kind)
    rows = [base]
    print(json.dumps(base), flush=True)
    for n in args.workers:
        other = OUT / f"sharded-bench-{n}.duckdb" if args.check else None
        row = one_config(inp, n, args.runs, other, kind)
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
