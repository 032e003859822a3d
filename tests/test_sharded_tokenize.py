"""The sharded tokenize (issue 19): shards of subjects fitted (map + reduce) and encoded by Dask workers write the
same token folder as the single-node tokenize; a failed shard publishes nothing and a re-run duplicates nothing."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from foresight import tokens as T
from foresight.tokens import sharded

from .conftest import simulated_warehouse

SPLIT_FILES = [f"{s}{suffix}" for s in ("train", "tuning", "held_out")
               for suffix in (".bin", ".clock.bin", ".index.npy")]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 simulated lives in ``w.duckdb``, tokenized single-node into ``tok``."""
    d = tmp_path_factory.mktemp("tokshard")
    simulated_warehouse(d, 300, seed=5)
    return d


def assert_same_folder(single: Path, other: Path) -> None:
    """The same token folder: split files, code descriptions and the vocabulary byte for byte, a summary with the
    same keys and counts."""
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in single.iterdir())
    for name in [*SPLIT_FILES, "code_descriptions.json", "vocab.json"]:
        assert (single / name).read_bytes() == (other / name).read_bytes(), name
    s1, s2 = (json.loads((d / "tokenize_summary.json").read_text()) for d in (single, other))
    assert list(s1) == list(s2)
    for key in ("vocab_size", "rare_mapping", "markers_coarsened", "tokens", "subjects", "static_only_subjects",
                "unseen_codes", "provenance", "messages"):
        assert s1[key] == s2[key], key
    T.check_complete(other)


def test_sharded_tokenize_on_a_local_dask_cluster_equals_single_node_and_a_failed_shard_publishes_nothing(
        sim: Path, tmp_path: Path) -> None:
    """2 single-threaded Dask worker processes run the shard steps: the single-node folder, byte for byte. A run
    whose shard 1 dies mid-write leaves the previous folder; the re-run (after a killed run's leftovers) equals
    the single-node folder with nothing left beside it."""
    from distributed import Client, LocalCluster

    out = tmp_path / "tok"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        def on_cluster(step, calls):
            return client.gather([client.submit(functools.partial(step, **c), pure=False) for c in calls])

        def shard_1_dies(step, calls):
            if step is not sharded.encode_shard:
                return on_cluster(step, calls)
            on_cluster(step, calls[:1])
            part = calls[1]["work"] / "enc-0001.part"  # what a worker killed while writing leaves
            part.mkdir()
            (part / "train.bin").write_bytes(b"\1" * 64)
            raise RuntimeError("worker lost while encoding shard 1")

        summary = sharded.tokenize_sharded(sim / "w.duckdb", out, shards=2, mapper=on_cluster)
        assert summary["subjects"] == json.loads((sim / "tok" / "tokenize_summary.json").read_text())["subjects"]
        assert_same_folder(sim / "tok", out)

        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(RuntimeError, match="worker lost"):  # another floor: it would change the vocabulary
            sharded.tokenize_sharded(sim / "w.duckdb", out, T.TokenizerConfig(min_subjects=5), shards=2,
                                     mapper=shard_1_dies)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert [p.name for p in tmp_path.iterdir()] == ["tok"]

        killed = tmp_path / ".tok.partial-999999999-dead"  # a coordinator killed mid-run (no such process)
        (killed / "work" / "enc-0000.part").mkdir(parents=True)
        sharded.tokenize_sharded(sim / "w.duckdb", out, shards=2, mapper=on_cluster)
    assert_same_folder(sim / "tok", out)
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]


def test_sharded_tokenize_honours_the_opt_out_with_any_number_of_shards(sim: Path, tmp_path: Path) -> None:
    """Opted-out subjects are invisible to every shard (counts, deciles, shards) as to the single node; 3 shards
    in turn in this process (the serial mapper)."""
    ids = np.load(sim / "tok" / "train.index.npy")["subject_id"][:40].tolist()
    T.tokenize(sim / "w.duckdb", tmp_path / "single", exclude_subjects=ids)
    summary = sharded.tokenize_sharded(sim / "w.duckdb", tmp_path / "sharded", shards=3, exclude_subjects=ids)
    assert_same_folder(tmp_path / "single", tmp_path / "sharded")
    assert summary["rare_mapping"]["opt_out"]["subjects_excluded"] == 40
    assert summary["subjects"]["train"] == json.loads(
        (sim / "tok" / "tokenize_summary.json").read_text())["subjects"]["train"] - 40


def test_tokenize_workers_option_is_checked_before_a_cluster_starts(sim: Path, tmp_path: Path) -> None:
    """``--workers 0``, a missing warehouse, an unknown purpose: one line on stderr, exit 2, no cluster started,
    nothing written (in-process: a subprocess per case would cost more than the checks)."""
    from typer.testing import CliRunner

    from foresight.cli import app

    for args, says in ((["--db", str(sim / "w.duckdb"), "--workers", "0"], "--workers"),
                       (["--db", str(tmp_path / "none.duckdb"), "--workers", "2"], "warehouse not found"),
                       (["--db", str(sim / "w.duckdb"), "--workers", "2", "--purpose", "no such"], "purpose")):
        res = CliRunner().invoke(app, ["tokenize", "--out", str(tmp_path / "t"), *args, "--json"])
        assert res.exit_code == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / "t").exists()
