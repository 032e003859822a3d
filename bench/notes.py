"""Benchmark the notes -> concepts chain: quality on Synthea's FHIR notes, throughput on MTSamples.

1. Context rules against human labels (``foresight.concepts.evaluate_context``): the MedCAT-trainer export of
   27 MTSamples documents whose 435 annotations carry a Status meta-annotation (Confirmed / Other).
2. Quality (``foresight.concepts.evaluate_synthea``): the Synthea export's FHIR bundles go into a warehouse, a
   MedCAT pack is built from the export's own condition dictionary (csv/conditions.csv, SNOMED) and trained
   unsupervised on the notes, every note is annotated, and the concepts are scored per encounter against the
   conditions coded in that encounter (precision, recall, F1; with and without the context filter). Then the
   notes source loads the same notes, and its events must equal the filtered concepts.
3. Throughput: an ICD-10-CM pack (the full 2021 order file, ~95k codes, trained unsupervised on the notes) annotates
   the MTSamples notes (pt_notes.csv, 1,088 dictated notes) ``--runs`` times with each ``--n-process``; the median
   wall time gives notes/s and chars/s (MedCAT + context rules + the worker pool's start-up).

    python bench/notes.py                       # both, writes bench/out/notes.json
    python bench/notes.py --skip-eval --runs 3 --n-process 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Python puts this script's folder first on sys.path, where bench/tokenize.py would shadow the standard library's
# `tokenize` (which pandas imports): drop it, and import foresight from the repository.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FORESIGHT_SHARED_DATA", REPO.parent / "shared" / "data"))
OUT = REPO / "bench" / "out"


def evaluate(args: argparse.Namespace) -> dict:
    from foresight import sources
    from foresight.concepts import evaluate_synthea

    t = time.perf_counter()
    res = evaluate_synthea(args.synthea, OUT / "notes_eval", n_process=args.eval_n_process,
                           load_notes=partial(sources.load, "notes"))
    res["total_s"] = round(time.perf_counter() - t, 1)
    return res


def context(args: argparse.Namespace) -> dict:
    from foresight.concepts import evaluate_context

    return evaluate_context(args.medcat_export)


def throughput(args: argparse.Namespace) -> dict:
    import duckdb

    from foresight import concepts

    rows = duckdb.connect().execute(
        "SELECT subject_id::VARCHAR || '-' || row_number() OVER (), text FROM read_csv($p, all_varchar = true) "
        "WHERE text IS NOT NULL", {"p": str(args.mtsamples)}).fetchall()
    if args.subset:
        rows = rows[:args.subset]
    chars = sum(len(t) for _, t in rows)
    pack = OUT / "icd10cm_mtsamples_pack"
    out: dict = {"notes": len(rows), "chars": chars, "by_n_process": {}}
    if not (args.reuse_pack and pack.is_dir()):
        t = time.perf_counter()
        build = concepts.build_pack([args.icd10], pack, train_texts=[t for _, t in rows])
        out["build_s"] = round(time.perf_counter() - t, 1)
        out["pack"] = {k: v for k, v in build.__dict__.items() if k != "dictionaries"}
    t = time.perf_counter()
    cat = concepts.load_pack(pack)
    out["load_pack_s"] = round(time.perf_counter() - t, 1)
    # Interleaved (n=1, n=2, n=1, ...): on a shared machine each setting then sees the same background load.
    runs: dict[int, list[tuple[float, float, list[float]]]] = {n: [] for n in args.n_process}
    statuses: dict[str, int] = {}
    for _ in range(args.runs):
        for n in args.n_process:
            t, c0 = time.perf_counter(), os.times()
            mentions = [m for _, ms in concepts.annotate(cat, rows, n_process=n, pack_path=pack) for m in ms]
            wall = time.perf_counter() - t
            c1 = os.times()
            # CPU seconds of this process and its (joined) workers: the work done, whatever else shares the cores
            cpu = (c1.user + c1.system + c1.children_user + c1.children_system
                   - (c0.user + c0.system + c0.children_user + c0.children_system))
            runs[n].append((wall, cpu, [round(x, 1) for x in os.getloadavg()]))
            statuses = {s: sum(1 for m in mentions if m.status == s) for s in
                        ("current", "historical", "negated", "hypothetical", "family")}
            print(f"n_process={n}: {wall:.1f}s wall, {cpu:.1f} CPU-s, load {os.getloadavg()}", file=sys.stderr)
    for n, rs in runs.items():
        med = statistics.median(r[0] for r in rs)
        out["by_n_process"][n] = {"runs_s": [round(r[0], 2) for r in rs], "median_s": round(med, 2),
                                  "notes_per_s": round(len(rows) / med, 1), "chars_per_s": round(chars / med),
                                  "cpu_s": [round(r[1], 1) for r in rs],
                                  "chars_per_cpu_s": round(chars / statistics.median(r[1] for r in rs)),
                                  "load_avg_after": [r[2] for r in rs]}
    out["mentions_by_status"] = statuses
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthea", type=Path, default=SHARED / "synthea-ca-59pt")
    p.add_argument("--mtsamples", type=Path, default=SHARED / "mtsamples-medcat-tutorials" / "pt_notes.csv")
    p.add_argument("--medcat-export", type=Path,
                   default=SHARED / "mtsamples-medcat-tutorials" / "MedCAT_Export.json")
    p.add_argument("--icd10", type=Path, default=SHARED / "code-maps-ethos" / "icd10cm-order-Jan-2021.csv.gz")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--n-process", type=int, nargs="+", default=[1, 2])
    p.add_argument("--eval-n-process", type=int, default=2)
    p.add_argument("--subset", type=int, default=None, help="Only the first N MTSamples notes.")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--reuse-pack", action="store_true", help="Reuse bench/out/icd10cm_mtsamples_pack if built.")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"date": date.today().isoformat(), "machine": f"{platform.node()} {os.cpu_count()} cores",
              "python": platform.python_version()}
    if not args.skip_eval:
        result["context_eval"] = context(args)
        print(json.dumps(result["context_eval"], indent=1), file=sys.stderr)
        result["synthea_eval"] = evaluate(args)
        print(json.dumps(result["synthea_eval"], indent=1), file=sys.stderr)
    if not args.skip_throughput:
        result["throughput"] = throughput(args)
    (OUT / "notes.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
