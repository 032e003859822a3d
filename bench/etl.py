"""Benchmark the loads into the warehouse: wall time, events/s and peak RSS.

Inputs: the MIMIC-IV demo and copies replicated 10x and 100x (subject/admission/stay ids offset per copy,
written once under bench/out/, which git ignores), so the growth of cost with size is visible. With
``--sources`` the other sources run too, on the same sizes: the Synthea CSV and the FHIR bundles of
../shared/data/synthea-ca-59pt (copies get every UUID rewritten per copy) and a MEDS dataset exported from the
MIMIC demo warehouse (copies offset the subject ids).

Each size runs ``foresight etl mimic-iv --json`` in a fresh process ``--runs`` times (median reported); peak
RSS is the child's own ``ru_maxrss`` from ``os.wait4`` (the largest of the runs). ``--memory 1GB`` runs
``foresight --memory 1GB etl ...`` (the DuckDB budget; default: the machine's, see ``foresight --help``), and
``--checkout DIR`` runs another source tree's CLI (DIR first on the path, e.g. a ``git archive`` of HEAD) for a
before/after comparison in the same session. With ``--baseline VENV`` the reference MIMIC-IV MEDS ETL (PyPI
mimic-iv-meds on MEDS-Extract, installed in that separate venv; never a project dependency) runs on
the demo in the same session, so the ratio compares like with like on this machine.

    python bench/etl.py                      # demo, 10x, 100x; 3 runs each
    python bench/etl.py --sizes 1 --runs 5 --baseline /tmp/refbench/venv
    python bench/etl.py --sources synthea fhir meds --sizes 1 10
    python bench/etl.py --sizes 100 --runs 1 --memory 1GB    # flat memory: peak RSS within the budget
    git archive HEAD | tar -x -C /tmp/head && python bench/etl.py --sizes 10 --checkout /tmp/head
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/etl.py` from anywhere

from foresight import sources, warehouse  # noqa: E402  (after the path line above)

SHARED = Path(os.environ.get("FORESIGHT_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO = SHARED / "mimic-iv-demo-2.2"
SYNTHEA = SHARED / "synthea-ca-59pt"
OUT = REPO / "bench" / "out"
# Columns that identify a subject or an encounter; offset per copy so copies never collide.
ID_COLUMNS = ("subject_id", "hadm_id", "stay_id", "pharmacy_id")
ID_OFFSET = 100_000_000


def loaded_tables() -> set[str]:
    """The MIMIC-IV tables the loader reads (foresight.sources.mimic_iv.GROUPS)."""
    from foresight.sources.mimic_iv import GROUPS

    return {t.name for g in GROUPS for t in g.tables}


def replicate(src: Path, dst: Path, copies: int, tables: Collection[str] | None = None) -> Path:
    """Write ``copies`` concatenated copies of every CSV in ``src`` with offset ids (DuckDB, vectorised).

    ``tables``: only these per-patient tables (by file stem) are written, plus the dictionaries (the 1,000x input
    skips the tables the loader never reads, e.g. emar_detail, poe). Each file is written to a temporary name and
    renamed, so an interrupted run resumes from the first missing file."""
    import duckdb

    marker = dst / ".complete"
    if marker.exists():
        return dst
    # Streamed, not sorted: a sort of the 1,000x labevents (107M rows) held 20 GB and was killed for memory
    con = duckdb.connect(config={"memory_limit": "2GB", "preserve_insertion_order": False})
    for f in sorted(src.glob("*/*.csv.gz")):
        out = dst / f.relative_to(src)
        stem = f.name.removesuffix(".csv.gz")
        is_dictionary = f.name.startswith("d_") or f.name in ("provider.csv.gz", "caregiver.csv.gz")
        if out.exists() or (tables is not None and not is_dictionary and stem not in tables):
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if is_dictionary:
            shutil.copy(f, out)  # dictionaries are not per patient
            continue
        cols = [r[0] for r in con.execute("DESCRIBE SELECT * FROM read_csv(?, all_varchar=true)", [str(f)]).fetchall()]
        select = ", ".join(
            f"(TRY_CAST(\"{c}\" AS BIGINT) + k * {ID_OFFSET})::VARCHAR AS \"{c}\"" if c in ID_COLUMNS else f'"{c}"'
            for c in cols
        )
        part = out.with_name(out.name + ".part.csv.gz")
        con.execute(
            f"COPY (SELECT {select} FROM read_csv(?, all_varchar=true), range(?) t(k)) "
            f"TO '{part}' (HEADER, COMPRESSION gzip)",
            [str(f), copies],
        )
        part.rename(out)
    marker.touch()
    return dst


def run_once(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, errs = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{errs[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out


def foresight_cmd(memory: str | None = None, checkout: Path | None = None) -> tuple[list[str], dict | None]:
    """The ``foresight`` command line (with ``--memory``) and its environment: this tree's console script, or
    the CLI of the source tree ``checkout`` (first on the path)."""
    env = None
    if checkout is not None:
        env = dict(os.environ)
        cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(checkout.resolve())!r}); "
                                     "from foresight.cli import main; main()"]
    else:
        cmd = [str(Path(sys.executable).with_name("foresight"))]
    if memory:
        if checkout is not None:  # an older tree may not know --memory: its env var
            env = {**env, "FORESIGHT_MEMORY": memory, "FORESIGHT_DUCKDB_MEMORY": memory}
        else:
            cmd += ["--memory", memory]
    return cmd, env


def bench_foresight(inp: Path, runs: int, kind: str = "mimic-iv", memory: str | None = None,
                    checkout: Path | None = None) -> dict:
    cmd, env = foresight_cmd(memory, checkout)
    walls, rss, events = [], [], 0
    for _ in range(runs):
        with tempfile.TemporaryDirectory(dir=OUT) as tmp:  # beside the inputs: the staging file is on that disk
            wall, peak, out = run_once([*cmd, "etl", kind, "--input", str(inp), "--db", f"{tmp}/w.duckdb", "--json"],
                                       env)
        events = json.loads(out.strip().splitlines()[-1])["events"]
        walls.append(wall)
        rss.append(peak)
    return {"wall_s": statistics.median(walls), "walls": walls, "rss_mib": max(rss), "events": events}


def reference_input() -> Path:
    """The reference ETL wants the raw tables and mimic-code's concept maps in one folder, and chartevents
    present: symlinks, the concept maps from ../shared/data, and a header-only chartevents."""
    import gzip

    raw = OUT / "reference-input"
    if (raw / ".complete").exists():
        return raw
    shutil.rmtree(raw, ignore_errors=True)
    for folder in ("hosp", "icu"):
        (raw / folder).mkdir(parents=True)
        for f in (DEMO / folder).iterdir():
            (raw / folder / f.name).symlink_to(f)
    for f in (DEMO.parent / "mimic-code-concept-maps").glob("*.csv"):
        (raw / f.name).symlink_to(f)
    with gzip.open(raw / "icu" / "chartevents.csv.gz", "wt") as fh:
        fh.write("subject_id,hadm_id,stay_id,caregiver_id,charttime,storetime,itemid,value,valuenum,valueuom,warning\n")
    (raw / ".complete").touch()
    return raw


def bench_reference(venv: Path, runs: int) -> dict:
    """The reference ETL: `meds-extract-run spec=MIMIC-IV` on the demo (its stages are child processes;
    wait4's ru_maxrss covers them)."""
    import pyarrow.parquet as pq

    raw = reference_input()
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    walls, rss, events = [], [], 0
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [str(venv / "bin" / "meds-extract-run"), "spec=MIMIC-IV", f"output_dir={tmp}/out",
                   "do_download=False", f"input_dir={raw}"]
            wall, peak, _ = run_once(cmd, env)
            events = sum(pq.read_metadata(p).num_rows for p in Path(tmp, "out", "data").rglob("*.parquet"))
        walls.append(wall)
        rss.append(peak)
    return {"wall_s": statistics.median(walls), "walls": walls, "rss_mib": statistics.median(rss), "events": events}


# --- inputs of the other sources ---------------------------------------------------------------------------

SYNTHEA_TABLES = ("patients", "encounters", "conditions", "medications", "procedures", "immunizations", "allergies",
                  "careplans", "devices", "imaging_studies", "observations")
SYNTHEA_IDS = ("Id", "PATIENT", "ENCOUNTER")  # id columns a copy makes unique


def synthea_input(copies: int) -> Path:
    """The Synthea CSV export, or ``copies`` of its loaded tables with every id suffixed per copy (DuckDB)."""
    if copies == 1:
        return SYNTHEA / "csv"
    import duckdb

    dst = OUT / f"synthea-x{copies}"
    if (dst / ".complete").exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    con = duckdb.connect()
    for name in SYNTHEA_TABLES:
        src = SYNTHEA / "csv" / f"{name}.csv"
        desc = con.execute("DESCRIBE SELECT * FROM read_csv(?, all_varchar=true)", [str(src)]).fetchall()
        cols = [r[0] for r in desc]
        select = ", ".join(f"CASE WHEN k = 0 THEN \"{c}\" ELSE \"{c}\" || '-c' || k END AS \"{c}\"" if c in SYNTHEA_IDS
                           else f'"{c}"' for c in cols)
        con.execute(f"COPY (SELECT {select} FROM read_csv(?, all_varchar=true), range(?) t(k) ORDER BY k) "
                    f"TO '{dst / (name + '.csv')}' (HEADER)", [str(src), copies])
    (dst / ".complete").touch()
    return dst


def fhir_input(copies: int) -> Path:
    """The FHIR bundles, or ``copies`` of them with every UUID rewritten per copy (references stay consistent)."""
    if copies == 1:
        return SYNTHEA / "fhir"
    import gzip
    import re
    import uuid

    dst = OUT / f"fhir-x{copies}"
    if (dst / ".complete").exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    uuid_re = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    for f in sorted((SYNTHEA / "fhir").glob("*.json.gz")):
        data = gzip.decompress(f.read_bytes())
        for k in range(copies):
            text = data if k == 0 else uuid_re.sub(
                lambda m, k=k: str(uuid.uuid5(uuid.NAMESPACE_URL, f"{k}:{m.group().decode()}")).encode(), data)
            (dst / f"{k}-{f.name}").write_bytes(gzip.compress(text, compresslevel=1))
    (dst / ".complete").touch()
    return dst


def meds_input(copies: int) -> Path:
    """A MEDS dataset exported from the MIMIC demo warehouse; copies offset the subject ids (one shard each)."""
    import duckdb

    base = OUT / "meds-mimic-demo"
    if not (base / ".complete").exists():
        shutil.rmtree(base, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp, warehouse.connect(Path(tmp) / "w.duckdb") as con:
            sources.load("mimic-iv", con, DEMO)
            warehouse.export_meds(con, base)
        (base / ".complete").touch()
    if copies == 1:
        return base
    dst = OUT / f"meds-mimic-demo-x{copies}"
    if (dst / ".complete").exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(base / "metadata", dst / "metadata")
    (dst / "data").mkdir(parents=True)
    (dst / "metadata" / "subject_splits.parquet").unlink()  # the copies' subjects get the stable hash split
    con = duckdb.connect()
    for k in range(copies):
        con.execute(f"COPY (SELECT * REPLACE (subject_id + {k * ID_OFFSET} AS subject_id) FROM read_parquet(?)) "
                    f"TO '{dst / 'data' / f'{k}.parquet'}'", [str(base / "data" / "0.parquet")])
    (dst / ".complete").touch()
    return dst


INPUTS = {"synthea": (synthea_input, "Synthea CSV, synthea-ca-59pt"), "fhir": (fhir_input, "FHIR bundles, "
          "synthea-ca-59pt (50 patients)"), "meds": (meds_input, "MEDS export of the MIMIC demo warehouse")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100], help="replication factors")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="venv with mimic-iv-meds installed (reference ETL)")
    ap.add_argument("--sources", nargs="+", default=["mimic-iv"], choices=["mimic-iv", *INPUTS],
                    help="which loads to time (default: mimic-iv only)")
    ap.add_argument("--memory", help="memory budget (foresight --memory), e.g. 1GB; default: the machine's")
    ap.add_argument("--checkout", type=Path, help="run this source tree's CLI instead (before/after comparisons)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    opts = {"memory": args.memory, "checkout": args.checkout}
    tag = "".join([f", memory {args.memory}" if args.memory else "", f", {args.checkout}" if args.checkout else ""])
    if not DEMO.exists():
        sys.exit(f"MIMIC-IV demo not found at {DEMO}")
    if set(args.sources) & {"synthea", "fhir"} and not SYNTHEA.exists():
        sys.exit(f"Synthea export not found at {SYNTHEA}")

    rows = []
    if args.baseline:
        ref = bench_reference(args.baseline, args.runs)
        rows.append(("reference mimic-iv-meds 0.2.0, demo", ref))
    for k in args.sizes if "mimic-iv" in args.sources else ():
        inp = DEMO if k == 1 else replicate(DEMO, OUT / f"mimic-x{k}", k, loaded_tables())
        r = bench_foresight(inp, args.runs, **opts)
        rows.append((f"foresight etl mimic-iv, demo x{k}{tag}", r))
        print(f"x{k}: {r}", file=sys.stderr)
    for kind in (s for s in args.sources if s in INPUTS):
        make, label = INPUTS[kind]
        for k in args.sizes:
            r = bench_foresight(make(k), args.runs, kind, **opts)
            rows.append((f"foresight etl {kind}, {label} x{k}{tag}", r))
            print(f"{kind} x{k}: {r}", file=sys.stderr)

    print(f"\n### {date.today()} - ETL, {platform.node()} ({os.cpu_count()} cores), median of {args.runs}\n")
    print("| input | events | wall s (median) | events/s | peak RSS MiB (max) | runs (s) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in rows:
        print(f"| {name} | {r['events']:,} | {r['wall_s']:.2f} | {r['events'] / r['wall_s']:,.0f} | "
              f"{r['rss_mib']:.0f} | {', '.join(f'{w:.2f}' for w in r['walls'])} |")
    if args.baseline and any(n.endswith("demo x1") for n, _ in rows):
        ours = next(r for n, r in rows if n.endswith("demo x1"))
        print(f"\nratio (reference / foresight) on the demo: wall {rows[0][1]['wall_s'] / ours['wall_s']:.1f}x, "
              f"peak RSS {rows[0][1]['rss_mib'] / ours['rss_mib']:.1f}x")


if __name__ == "__main__":
    main()
