"""The national data opt-out: a listed subject reaches no event, no quarantine row, no token and no training data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from foresight import optout, sources, warehouse
from foresight import tokens as T
from foresight.schema import SPLITS, uuid_subject_id

from .conftest import tiny_warehouse


def _split_ids(data: Path) -> set[int]:
    return {int(s) for split in SPLITS for s in np.load(data / f"{split}.index.npy")["subject_id"]}


def test_subjects_file(tmp_path):
    f = tmp_path / "optout.txt"
    f.write_text("# national data opt-out\n10000032\n\n 593AAA05-D864-1DF7-5B96-155FBDB19F28  # a Synthea patient\n")
    assert optout.read_subjects_file(f) == {10000032, uuid_subject_id("593aaa05-d864-1df7-5b96-155fbdb19f28")}
    f.write_text("1\n2 3\n")
    with pytest.raises(optout.OptOutError, match="line 2"):
        optout.read_subjects_file(f)
    assert optout.digest([3, 1, 2]) == optout.digest({1, 2, 3}) != optout.digest({1, 2})


def test_etl_drops_every_row_of_an_opted_out_subject(tiny_mimic, tmp_path):
    db = tmp_path / "w.duckdb"
    with warehouse.connect(db) as con:
        full = sources.load("mimic-iv", con, tiny_mimic)  # subject 1 loaded first, as before their opt-out
        assert con.execute("SELECT count(*) FROM events WHERE subject_id = 1").fetchall()[0][0] > 0
        assert con.execute("SELECT count(*) FROM quarantine WHERE raw::VARCHAR LIKE '%\"subject_id\":\"1\"%'"
                           ).fetchall()[0][0] > 0  # subject 1's absurd lab value was quarantined, raw row kept
        out = sources.load("mimic-iv", con, tiny_mimic, exclude_subjects={1})
        assert con.execute("SELECT count(*) FROM events WHERE subject_id = 1").fetchall()[0][0] == 0
        assert con.execute("SELECT count(*) FROM quarantine WHERE raw::VARCHAR LIKE '%\"subject_id\":\"1\"%'"
                           ).fetchall()[0][0] == 0
        assert con.execute("SELECT count(*) FROM subject_splits WHERE subject_id = 1").fetchall()[0][0] == 0
        assert con.execute("SELECT count(*) FROM events WHERE subject_id IN (2, 3)").fetchall()[0][0] > 0
        warehouse.reconcile(con, out.run_id)  # read = loaded + quarantined + dropped still holds
    assert out.rows_read == full.rows_read
    assert out.rows_read == out.rows_loaded + out.rows_quarantined + out.rows_dropped
    opted = {k: v for k, v in out.dropped_reasons.items() if k.endswith(optout.OPT_OUT_REASON)}
    assert sum(opted.values()) > 0 and any(k.startswith("labevents") for k in opted)
    assert out.rows_quarantined < full.rows_quarantined
    assert any(optout.OPT_OUT_REASON in w for w in out.warnings)


def test_cli_etl_exclude_subjects(tiny_mimic, tmp_path):
    from typer.testing import CliRunner

    from foresight.cli import app

    ids = tmp_path / "optout.txt"
    ids.write_text("3\n")
    res = CliRunner().invoke(app, ["etl", "mimic-iv", "--input", str(tiny_mimic), "--db", str(tmp_path / "w.duckdb"),
                                   "--exclude-subjects", str(ids), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert any(k.endswith(optout.OPT_OUT_REASON) for k in summary["dropped_reasons"])
    with warehouse.connect(tmp_path / "w.duckdb", read_only=True) as con:
        assert con.execute("SELECT count(*) FROM events WHERE subject_id = 3").fetchall()[0][0] == 0
    bad = tmp_path / "bad.txt"
    bad.write_text("1, 2\n")
    res = CliRunner().invoke(app, ["etl", "mimic-iv", "--input", str(tiny_mimic), "--db", str(tmp_path / "x.duckdb"),
                                   "--exclude-subjects", str(bad)])
    assert res.exit_code == 2 and "line 1" in res.output


def test_tokenize_hides_opted_out_subjects_from_every_artifact(tmp_path):
    db = tiny_warehouse(tmp_path / "w.duckdb", n_subjects=60)
    # a code only subject 5 has, known to the vocabulary's code map while 5 is in the warehouse
    with warehouse.connect(db) as con:
        con.execute("INSERT INTO events VALUES (5, '2021-03-01', 'DX//ICD10CM//Q999', NULL, NULL, NULL, NULL, 't', "
                    "'t', 't')")
        gone = [5, *con.execute("SELECT subject_id FROM subject_splits WHERE split = 'train' ORDER BY subject_id "
                                "LIMIT 3").fetchall()[0]]
    T.tokenize(db, tmp_path / "all", T.TokenizerConfig(min_subjects=3))
    summary = T.tokenize(db, tmp_path / "out", T.TokenizerConfig(min_subjects=3), exclude_subjects=set(gone))
    assert set(gone) <= _split_ids(tmp_path / "all")
    assert not set(gone) & _split_ids(tmp_path / "out")
    before, after = (T.Vocabulary.load(tmp_path / d / "vocab.json") for d in ("all", "out"))
    # a code only one (opted-out) subject had is named in neither vocabulary: rare codes are never written out
    assert "Q999" not in (tmp_path / "all" / "vocab.json").read_text()
    assert "Q999" not in (tmp_path / "out" / "vocab.json").read_text()
    assert before.tokens != after.tokens or before.marker_map != after.marker_map or before.report != after.report
    assert after.fingerprint != before.fingerprint
    assert after.report["opt_out"] == {"subjects_listed": len(set(gone)), "subjects_excluded": len(set(gone)),
                                       "list_sha256": optout.digest(gone)}
    assert summary["subjects"]["train"] + summary["subjects"]["tuning"] + summary["subjects"]["held_out"] == \
        60 - len(set(gone))


def test_opted_out_mimic_demo_subject_is_nowhere(mimic_demo, demo_db, tmp_path):
    """The real demo: pick a train subject, opt them out at ETL, and follow them through tokens and training data."""
    with warehouse.connect(demo_db, read_only=True) as con:
        sid = con.execute("SELECT min(subject_id) FROM subject_splits WHERE split = 'train'").fetchall()[0][0]
        n_before = con.execute("SELECT count(*) FROM events WHERE subject_id = ?", [sid]).fetchall()[0][0]
    assert n_before > 0
    db = tmp_path / "w.duckdb"
    with warehouse.connect(db) as con:
        excluded = optout.read_subjects_file(_write(tmp_path / "ids.txt", f"{sid}\n"))
        out = sources.load("mimic-iv", con, mimic_demo, exclude_subjects=excluded)
        assert con.execute("SELECT count(*) FROM events WHERE subject_id = ?", [sid]).fetchall()[0][0] == 0
        assert con.execute("SELECT count(DISTINCT subject_id) FROM events").fetchall()[0][0] == 99
    assert sum(v for k, v in out.dropped_reasons.items() if k.endswith(optout.OPT_OUT_REASON)) > 0  # rows, not events
    T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=5))
    ids = _split_ids(tmp_path / "tok")
    assert sid not in ids and len(ids) == 99
    # the training data is the train split's shards: the subject has no row there to be packed from
    from foresight.dataset import PackedSplit

    train = PackedSplit(tmp_path / "tok", "train")
    plan = train.plan(128, seed=0, epoch=0)
    assert sid not in set(train.index["subject_id"][np.unique(plan.subject)].tolist())


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
