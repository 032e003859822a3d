"""The sharded load on a Slurm cluster through dask-jobqueue (an example; not run by the tests).

dask-jobqueue submits Slurm jobs that each start Dask workers; the Prefect flow ``flows/sharded.py`` maps one
load task per shard over them (DaskTaskRunner pointed at this cluster's scheduler) and merges the shards into the
warehouse on this machine in one transaction. The shard files go beside the warehouse: put ``--db`` on storage
every worker node mounts (Lustre, GPFS, NFS). ``pip install dask-jobqueue`` on the login node and the workers'
environment (the same venv as foresight).

    python deploy/dask-slurm.py --input /data/mimic-iv-3.1 --db /shared/foresight/warehouse.duckdb --shards 64

Equivalent with the CLI, once a scheduler runs (e.g. started by this script with --keep, or `dask scheduler`):
    foresight etl mimic-iv --input /data/mimic-iv-3.1 --db /shared/w.duckdb --workers 64 --scheduler tcp://head:8786
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dask_jobqueue import SLURMCluster  # pip install dask-jobqueue

from flows import sharded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--db", type=Path, required=True, help="warehouse on storage every worker mounts")
    ap.add_argument("--source", default="mimic-iv")
    ap.add_argument("--shards", type=int, default=16, help="shards = Dask workers (one Slurm job each)")
    ap.add_argument("--partition", default="cpu")
    ap.add_argument("--memory", default="8GB", help="per worker job (Slurm --mem)")
    ap.add_argument("--duckdb-memory", default="6GB", help="DuckDB's budget inside each shard task (< --memory)")
    args = ap.parse_args()
    # one single-threaded worker process per job: DuckDB inside the task uses one thread (threads=1 in load_shard)
    cluster = SLURMCluster(queue=args.partition, cores=1, processes=1, memory=args.memory, walltime="04:00:00",
                           job_extra_directives=["--exclusive=user"],
                           job_script_prologue=["source /shared/foresight/.venv/bin/activate",
                                                "export OMP_NUM_THREADS=1"])
    cluster.scale(jobs=args.shards)
    try:
        summary = sharded.run(args.source, args.input, args.db, workers=args.shards,
                              scheduler=cluster.scheduler_address,
                              memory_limit=args.duckdb_memory)
        print(summary["run_id"], summary["events"], "events,", summary["subjects"], "subjects")
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
