"""The sharded load (issue 19): shards of subjects loaded apart, by Dask workers through the Prefect flow, merged in
one transaction into exactly the warehouse the single-node load builds; a failed shard leaves the previous run,
a re-run duplicates nothing, and the rest of the chain (tokenize, train, evaluate) runs on the result."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from foresight import tokens as T
from foresight import warehouse
from foresight.optout import OPT_OUT_REASON
from foresight.schema import split_of
from foresight.warehouse import sharded
from foresight.warehouse.shard_filter import SHARD_MACRO, shard_of

from .conftest import load_into

# (table, columns left out of the comparison: the run id differs between any two runs)
COMPARED = [("events", "load_id"), ("quarantine", "run_id"), ("codes", None), ("subject_splits", None),
            ("subject_map", None), ("notes", "load_id")]


def tables_of(db: Path) -> dict[str, list[tuple]]:
    """Every compared table of a warehouse, sorted, plus each table's accounting and the run's totals."""
    out = {}
    with warehouse.connect(db, read_only=True) as con:
        for table, skip in COMPARED:
            cols = f"* EXCLUDE ({skip})" if skip else "*"
            out[table] = sorted(con.execute(f"SELECT {cols} FROM {table}").fetchall(), key=repr)
        out["etl_tables"] = sorted(con.execute(
            "SELECT source_table, file, sha256, rows_read, rows_loaded, rows_quarantined, rows_dropped, events "
            "FROM etl_tables").fetchall())
        out["etl_runs"] = con.execute(
            "SELECT source, rows_read, rows_loaded, rows_quarantined, rows_dropped, dropped_reasons, events_loaded, "
            "subjects, input_checksums, missing_tables FROM etl_runs").fetchall()
    return out


def load_sharded(kind: str, root: Path, db: Path, n: int, exclude_subjects=None) -> warehouse.LoadSummary:
    """The sharded load without a cluster: each shard in turn, then the merge (what the flow's tasks do)."""
    files = sharded.plan(n, sharded.shard_folder(db))
    summaries = [sharded.load_shard(kind, root, f, (k, n), exclude_subjects=exclude_subjects)
                 for k, f in enumerate(files)]
    summary = sharded.merge(db, files, source_kind=kind, input_path=root, exclude_subjects=exclude_subjects,
                            warnings=[w for s in summaries for w in s["warnings"]])
    sharded.remove_shards(files)
    return summary


def with_junk_line(root: Path) -> Path:
    """tiny_mimic plus a labevents line the CSV reader cannot parse (no subject: shard 0 quarantines it)."""
    lab = root / "hosp" / "labevents.csv.gz"
    text = gzip.decompress(lab.read_bytes()).decode()
    lab.write_bytes(gzip.compress((text + "<<<junk row written by a broken exporter>>>\r\n").encode()))
    return root


def test_shard_hash_matches_sql_and_is_not_the_split_hash():
    with warehouse.connect(":memory:") as con:
        con.execute(SHARD_MACRO)
        ids = list(range(10_000_000, 10_000_400))
        sql = con.execute("SELECT list(fs_shard(s, 4) ORDER BY s) FROM unnest(?::BIGINT[]) t(s)", [ids]).fetchall()
    assert sql[0][0] == [shard_of(s, 4) for s in ids]
    counts = [sum(shard_of(s, 4) == k for s in ids) for k in range(4)]
    assert min(counts) > 60  # every shard gets a fair part of 400 subjects
    # shards are independent of the split: each shard holds train and held-out subjects
    assert all({split_of(s) for s in ids if shard_of(s, 4) == k} >= {"train", "held_out"} for k in range(4))


def test_shards_add_up_to_the_single_node_load_with_quarantine(tiny_mimic, tmp_path):
    root = with_junk_line(tiny_mimic)
    single = load_into("mimic-iv", root, tmp_path / "single.duckdb", exclude_subjects={2})  # 2 opted out
    assert single.rows_quarantined >= 4  # the fixture's bad rows (but subject 2's) and the junk line
    assert any(r.endswith(OPT_OUT_REASON) for r in single.dropped_reasons)
    merged = load_sharded("mimic-iv", root, tmp_path / "sharded.duckdb", 3, exclude_subjects={2})
    a, b = tables_of(tmp_path / "single.duckdb"), tables_of(tmp_path / "sharded.duckdb")
    assert a == b
    assert sorted(single.to_json()) == sorted(merged.to_json())
    assert [(t.table, t.rows_read, t.rows_quarantined) for t in single.tables] == \
        [(t.table, t.rows_read, t.rows_quarantined) for t in merged.tables]
    assert not sharded.shard_folder(tmp_path / "sharded.duckdb").exists()


def test_failed_or_killed_shard_leaves_previous_run_and_rerun_duplicates_nothing(tiny_mimic, tmp_path):
    db = tmp_path / "w.duckdb"
    load_sharded("mimic-iv", tiny_mimic, db, 2)
    before = tables_of(db)
    files = sharded.plan(2, tmp_path / "shards")
    sharded.load_shard("mimic-iv", tiny_mimic, files[0], (0, 2))
    with pytest.raises(TypeError):  # shard 1 fails (a bad option): it leaves only its .part file
        sharded.load_shard("mimic-iv", tiny_mimic, files[1], (1, 2), no_such_option=1)
    assert files[1].with_name(files[1].name + ".part").exists() and not files[1].exists()
    with pytest.raises(warehouse.SourceError, match="not complete"):
        sharded.merge(db, files, source_kind="mimic-iv", input_path=tiny_mimic)
    assert tables_of(db) == before  # the previous run is untouched
    # the re-run redoes the killed shard from scratch and replaces the source's rows: nothing twice
    sharded.load_shard("mimic-iv", tiny_mimic, files[1], (1, 2))
    summary = sharded.merge(db, files, source_kind="mimic-iv", input_path=tiny_mimic)
    after, runs = tables_of(db), ("etl_runs", "etl_tables")  # two runs recorded, as two single-node loads would
    assert {k: v for k, v in after.items() if k not in runs} == {k: v for k, v in before.items() if k not in runs}
    assert after["etl_runs"] == before["etl_runs"] * 2
    with warehouse.connect(db, read_only=True) as con:
        assert con.execute("SELECT count(DISTINCT load_id) FROM events").fetchall() == [(1,)]
        assert con.execute("SELECT count(*) FROM events WHERE load_id = ?", [summary.run_id]).fetchall() == \
            [(summary.events,)]
    # a shard of another source is refused
    with pytest.raises(warehouse.SourceError, match="not one shard"):
        sharded.merge(db, files, source_kind="mimic-iv", source="other", input_path=tiny_mimic)


@pytest.mark.slow  # a temporary Prefect server, a 2-process LocalCluster and 2 flow runs: ~40 s idle, 2 min busy
@pytest.mark.shared_data
def test_sharded_flow_on_a_local_dask_cluster_equals_single_node(demo_db, mimic_demo, tmp_path, prefect_server):
    """The MIMIC-IV demo through prefect-dask's DaskTaskRunner on a LocalCluster of 2 single-threaded worker
    processes (an existing scheduler, as `--scheduler` uses): the same warehouse as the single-node load; then a
    run whose shards fail leaves it in place."""
    from distributed import LocalCluster

    from flows import sharded as flow

    db = tmp_path / "dask.duckdb"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        summary = flow.run("mimic-iv", mimic_demo, db, workers=2, scheduler=cluster.scheduler_address)
        assert summary["shards"] == 2 and summary["events"] > 200_000
        assert tables_of(db) == tables_of(demo_db)
        state = flow.run("mimic-iv", mimic_demo, db, workers=2, scheduler=cluster.scheduler_address,
                         options={"no_such_option": 1}, return_state=True)
    assert state.is_failed()
    assert tables_of(db) == tables_of(demo_db)
    with warehouse.connect(db, read_only=True) as con:
        assert warehouse.reconcile(con, summary["run_id"])["events"] == summary["events"]


def test_tokenize_train_evaluate_on_a_sharded_warehouse(tmp_path):
    """Simulated lives loaded as 2 shards: the same vocabulary and token shards as the single-node warehouse, and
    the chain's commands run on it."""
    from foresight.demo import demo_config
    from foresight.simulate import simulate

    simulate(300, tmp_path / "sim", seed=3, config=demo_config())
    load_into("meds", tmp_path / "sim", tmp_path / "single.duckdb")
    load_sharded("meds", tmp_path / "sim", tmp_path / "sharded.duckdb", 2)
    assert tables_of(tmp_path / "single.duckdb") == tables_of(tmp_path / "sharded.duckdb")
    T.tokenize(tmp_path / "single.duckdb", tmp_path / "tok1")
    T.tokenize(tmp_path / "sharded.duckdb", tmp_path / "tok2")
    files = sorted(p.relative_to(tmp_path / "tok1") for p in (tmp_path / "tok1").rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path / "tok2") for p in (tmp_path / "tok2").rglob("*")
                                     if p.is_file())
    for f in files:
        if f.suffix in (".npy", ".bin"):  # token shards, clocks and indexes: byte for byte
            assert (tmp_path / "tok1" / f).read_bytes() == (tmp_path / "tok2" / f).read_bytes(), f
    vocab1, vocab2 = (json.loads((tmp_path / t / "vocab.json").read_text()) for t in ("tok1", "tok2"))
    for v in (vocab1, vocab2):  # the loads' provenance names their run ids, which differ between any two runs
        v.pop("fingerprint")
        v["report"].pop("provenance")
    assert vocab1 == vocab2
    # the chain's commands on the sharded warehouse (in-process: the subprocess imports would cost more than this)
    from typer.testing import CliRunner

    from foresight.cli import app

    def run(*args: str) -> dict:
        res = CliRunner().invoke(app, [*args, "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout.strip().splitlines()[-1])

    model = tmp_path / "model"
    run("train", "--data", str(tmp_path / "tok2"), "--out", str(model), "--preset", "tiny", "--max-steps", "2",
        "--seq-len", "128")
    report = run("evaluate", "--model", str(model), "--data", str(tmp_path / "tok2"), "--db",
                 str(tmp_path / "sharded.duckdb"), "--out", str(tmp_path / "ev"), "--task", "admission_30d",
                 "--max-points", "20", "--samples", "2")
    assert [t["task"] for t in report["tasks"]] == ["admission_30d"] and not report["skipped"]
