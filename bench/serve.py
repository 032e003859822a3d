"""Benchmark the query service: p50/p99 latency and requests/s of POST /v1/next-events, batched vs unbatched.

A real `foresight serve` (uvicorn, audit log, API keys) runs on loopback in a child process; an httpx async client
in this process keeps C requests in flight (C = 1, 8, 32) for ``--seconds`` after a warm-up. Each request posts a
different real timeline from a synthetic warehouse (MEDS-shaped events, 20-100 events each). The model is a
randomly initialised Llama of the ``small`` preset's shape (6 layers, d_model 256) unless told otherwise: its
weights do not matter for speed.

Modes: ``unbatched`` (``--max-batch 1``: one forward pass per request), ``batched`` (``--max-batch 32
--batch-wait-ms 5``: concurrent requests share one left-padded forward pass) and ``batched-nowait`` (``--max-batch
32 --batch-wait-ms 0``: only requests that queued while the model was busy are batched). Each (mode, clients)
cell is measured ``--runs`` times; the median of each figure is reported.

    python bench/serve.py                      # ~4 minutes on 2 cores
    python bench/serve.py --clients 1 8 --runs 3 --seconds 5 --modes batched unbatched
"""

from __future__ import annotations

import os
import sys

# bench/tokenize.py would shadow the standard library's tokenize (imported by asyncio via linecache) when this
# script runs as `python bench/serve.py`: take bench/ off the import path before anything else is imported.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "serve"
sys.path.insert(0, str(REPO))

MODES = {
    "unbatched": ["--max-batch", "1", "--batch-wait-ms", "0"],
    "batched": ["--max-batch", "32", "--batch-wait-ms", "5"],
    "batched-nowait": ["--max-batch", "32", "--batch-wait-ms", "0"],
}


def model_dir(hidden: int, layers: int, heads: int) -> tuple[Path, list[dict]]:
    """The model directory (built once) and request bodies: every alive subject's events as a posted timeline."""
    from tests.test_serve import build_model_dir

    root = OUT / f"model-h{hidden}-l{layers}"
    if not (root / "model" / "config.json").exists():
        build_model_dir(root, n_subjects=200, hidden=hidden, layers=layers, heads=heads)
    from foresight import warehouse

    with warehouse.connect(root / "warehouse.duckdb", read_only=True) as con:
        rows = con.execute("SELECT subject_id, time, code, numeric_value FROM events "
                           "ORDER BY subject_id, time NULLS FIRST, code").fetchall()
    by_subject: dict[int, list[dict]] = {}
    for sid, t, code, value in rows:
        by_subject.setdefault(sid, []).append(
            {"time": t.isoformat() if t else None, "code": code, **({"numeric_value": value} if value is not None
                                                                    else {})})
    bodies = [{"events": ev, "top_k": 10} for ev in by_subject.values() if ev[-1]["code"] != "MEDS_DEATH"]
    return root / "model", bodies


def serving(url: str, key: str) -> dict:
    """The server's batching counters (GET /v1/model)."""
    import httpx

    card = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {key}"}, timeout=60).json()
    return card["serving"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, mode: str, workdir: Path, threads: int, body: dict) -> tuple[subprocess.Popen, str, str]:
    from foresight.serve import generate_key

    keys = workdir / f"keys-{mode}.json"
    keys.unlink(missing_ok=True)
    key, _ = generate_key(keys, "researcher", rate_per_minute=1e9, burst=10**9)
    port = free_port()
    cmd = [sys.executable, "-m", "foresight.cli", "serve", "--model", str(model), "--keys", str(keys),
           "--audit-log", str(workdir / f"audit-{mode}.jsonl"), "--port", str(port), *MODES[mode]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                for _ in range(20):  # warm the model thread (first forward passes allocate and tune)
                    httpx.post(f"{url}/v1/next-events", json=body, headers={"Authorization": f"Bearer {key}"},
                               timeout=120)
                return proc, url, key
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


async def load(url: str, key: str, bodies: list[dict], clients: int, seconds: float, warmup: float,
               server_pid: int) -> dict:
    """``clients`` workers each send requests back to back; latencies of those that finish after the warm-up.

    Also the server's CPU time per request (all threads, user + system, over the whole phase): on a shared
    machine wall-clock figures move with the neighbours' load, CPU per request much less.
    """
    import httpx
    import psutil

    server = psutil.Process(server_pid)
    cpu0 = sum(server.cpu_times()[:2])
    latencies: list[float] = []
    errors = 0
    done = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=120) as client:

        async def worker(w: int) -> None:
            nonlocal errors, done
            i = w
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                r = await client.post("/v1/next-events", json=bodies[i % len(bodies)])
                t1 = time.perf_counter()
                i += clients
                done += 1
                if r.status_code != 200:
                    errors += 1
                elif t0 >= measure_from and t1 <= stop_at:
                    latencies.append(t1 - t0)

        await asyncio.gather(*[worker(w) for w in range(clients)])
    cpu_ms = (sum(server.cpu_times()[:2]) - cpu0) * 1000 / max(done, 1)
    if len(latencies) < 2:
        raise RuntimeError(f"only {len(latencies)} requests completed inside the window ({errors} errors): "
                           "measure for longer (--seconds)")
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"requests": len(latencies), "errors": errors, "req_per_s": len(latencies) / seconds,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "server_cpu_ms_per_req": cpu_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the server (1 leaves the second core of a 2-core VM to the client)")
    args = ap.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    model, bodies = model_dir(args.hidden, args.layers, args.heads)
    lengths = sorted(len(b["events"]) for b in bodies)
    print(f"{len(bodies)} request bodies, events per timeline: median {lengths[len(lengths) // 2]}, "
          f"max {lengths[-1]}", file=sys.stderr)
    results: dict[str, dict[int, list[dict]]] = {m: {c: [] for c in args.clients} for m in args.modes}
    for run in range(args.runs):
        for mode in args.modes:  # interleaved: drift on the shared machine hits every mode alike
            proc, url, key = start_server(model, mode, OUT, args.threads, bodies[0])
            try:
                for c in args.clients:
                    before = serving(url, key)
                    r = asyncio.run(load(url, key, bodies, c, args.seconds, args.warmup, proc.pid))
                    after = serving(url, key)
                    batches = after["batches"] - before["batches"]
                    r["mean_batch"] = (after["requests"] - before["requests"]) / batches if batches else None
                    results[mode][c].append(r)
                    print(f"run {run + 1} {mode:15s} clients {c:3d}: {r['req_per_s']:7.1f} req/s  "
                          f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                          f"server CPU {r['server_cpu_ms_per_req']:5.1f} ms/req  mean batch {r['mean_batch']:.1f}  "
                          f"errors {r['errors']}",
                          file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(timeout=60)

    table = []
    for mode in args.modes:
        for c in args.clients:
            rs = results[mode][c]
            table.append({"mode": mode, "clients": c,
                          **{k: statistics.median(r[k] for r in rs)
                             for k in ("req_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_req", "mean_batch")},
                          "runs_req_per_s": [round(r["req_per_s"], 1) for r in rs],
                          "errors": sum(r["errors"] for r in rs)})
    base = {row["clients"]: row["req_per_s"] for row in table if row["mode"] == "unbatched"}
    cpu_base = {row["clients"]: row["server_cpu_ms_per_req"] for row in table if row["mode"] == "unbatched"}
    print("\n| mode | clients | req/s | p50 ms | p99 ms | req/s vs unbatched | server CPU ms/req | CPU vs unbatched "
          "| mean batch | runs req/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in table:
        c = row["clients"]
        ratio = f"{row['req_per_s'] / base[c]:.2f}x" if base.get(c) else "-"
        cpu_ratio = f"{cpu_base[c] / row['server_cpu_ms_per_req']:.2f}x" if cpu_base.get(c) else "-"
        print(f"| {row['mode']} | {c} | {row['req_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {ratio} "
              f"| {row['server_cpu_ms_per_req']:.1f} | {cpu_ratio} | {row['mean_batch']:.1f} "
              f"| {', '.join(map(str, row['runs_req_per_s']))} |")
    summary = {"date": date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
               "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads},
               "server_torch_threads": args.threads,
               "seconds": args.seconds, "runs": args.runs, "table": table}
    (OUT / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({"table": table}))


if __name__ == "__main__":
    main()
