"""Data-use purposes (foresight.purposes): declarations recorded per load, enforced by tokenize and train, listed
on the model card."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import jinja2
import pytest

from foresight import optout, purposes, warehouse
from foresight import tokens as T
from foresight import train as TR
from foresight.demo import demo_config
from foresight.hashing import sha256_file
from foresight.pipeline import purpose_stage
from foresight.simulate import simulate
from privacy.report import TEMPLATE

from .conftest import cli_json, load_into, rows, run_cli, tiny_warehouse

pytestmark = pytest.mark.usefixtures("one_thread")

DECLARATION_YAML = """\
provider: Example NHS Trust
controller: Example NHS Trust
purposes: [research, planning, research]
expires: 2999-12-31
"""


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 simulated lives as a MEDS dataset (loaded by each test into its own warehouse)."""
    d = tmp_path_factory.mktemp("sim")
    simulate(60, d, seed=0, config=demo_config())
    return d


@pytest.fixture(scope="module")
def declared(sim: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A warehouse loaded by `foresight etl meds --declaration FILE.yaml`, with the load's JSON summary."""
    d = tmp_path_factory.mktemp("declared")
    (d / "decl.yaml").write_text(DECLARATION_YAML)
    payload = cli_json("etl", "meds", "--input", str(sim), "--db", str(d / "w.duckdb"),
                       "--declaration", str(d / "decl.yaml"))
    return {"dir": d, "db": d / "w.duckdb", "load": payload}


# --- the declarations file --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "field"), [
    ('{"purposes": ["research"]}', "'provider'"),
    ('{"provider": "A"}', "'purposes'"),
    ('{"provider": "A", "purposes": "research"}', "'purposes'"),
    ('{"provider": "A", "purposes": []}', "'purposes'"),
    ('{"provider": "A", "purposes": ["Research"]}', "'purposes'"),
    ('{"provider": "A", "purposes": ["unspecified"]}', "'purposes'"),
    ('{"provider": "A", "purposes": ["research"], "expires": "next year"}', "'expires'"),
    ('{"provider": "A", "purpose": ["research"]}', "'purpose'"),  # a typo is an unknown field, not ignored
    ('{"provider": "A", "purposes": ["research"], "controller": 3}', "'controller'"),
    ('{"provider": "A", "purposes": ["research"]', "not valid JSON"),
])
def test_malformed_declaration_names_file_and_field(tmp_path, text, field):
    path = tmp_path / "decl.json"
    path.write_text(text)
    with pytest.raises(purposes.DeclarationError) as err:
        purposes.read_declaration(path)
    assert str(path) in str(err.value) and field in str(err.value) and "\n" not in str(err.value)


def test_yaml_declaration_reads_dates_and_deduplicates(tmp_path):
    path = tmp_path / "decl.yml"
    path.write_text(DECLARATION_YAML)
    d = purposes.read_declaration(path)
    assert (d.provider, d.controller) == ("Example NHS Trust", "Example NHS Trust")
    assert d.purposes == ("research", "planning")
    assert d.expires == date(2999, 12, 31) and d.sha256 == sha256_file(path) and d.file == str(path)


def test_coverage_is_exact_and_ends_at_expiry():
    lp = purposes.LoadProvenance("r1", "mimic-iv", 10, provider="A", purposes=("research",),
                                 expires=date(2030, 1, 31))
    assert lp.covers("research", date(2030, 1, 31)) and not lp.covers("research", date(2030, 2, 1))
    assert not lp.covers("covid-19-research", date(2030, 1, 1))  # no hierarchy: a narrower purpose is not implied
    assert not lp.covers("unspecified", date(2030, 1, 1))
    undeclared = purposes.LoadProvenance("r2", "x", 1)
    assert undeclared.covers("unspecified") and not undeclared.covers("research")
    with pytest.raises(purposes.PurposeError, match="invalid purpose"):
        purposes.check_covered([lp], "Research!")


def test_etl_with_malformed_declaration_loads_nothing(sim, tmp_path):
    bad = tmp_path / "decl.json"
    bad.write_text('{"provider": "A", "purposes": "research"}')
    proc = run_cli("etl", "meds", "--input", str(sim), "--db", str(tmp_path / "w.duckdb"), "--declaration", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "'purposes'" in proc.stderr
    assert not (tmp_path / "w.duckdb").exists()  # read before the warehouse is opened: not even a file


# --- enforcement --------------------------------------------------------------------------------------------------


def test_etl_records_the_declaration_with_the_load(declared):
    load = declared["load"]
    assert load["declaration"]["provider"] == "Example NHS Trust"
    got = rows(declared["db"], "SELECT run_id, provider, controller, purposes, expires, declaration_sha256, "
                               "opt_out_sha256 FROM load_declarations")
    assert got == [(load["run_id"], "Example NHS Trust", "Example NHS Trust", ["research", "planning"],
                    date(2999, 12, 31), sha256_file(declared["dir"] / "decl.yaml"), None)]


def test_uncovered_purpose_refuses_and_writes_nothing(declared):
    out = declared["dir"] / "tok-covid"
    run_id = declared["load"]["run_id"]
    proc = run_cli("tokenize", "--db", str(declared["db"]), "--out", str(out), "--purpose", "covid-19-research")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr  # one line, no traceback
    line = lines[0]
    assert "purpose" in line and run_id in line and "source meds" in line
    assert "Example NHS Trust" in line and "research, planning" in line
    assert not out.exists() and not list(declared["dir"].glob(".tok-covid.*"))  # no partial folder either
    # no purpose at all (unspecified): declared data serve only a stated purpose
    with pytest.raises(purposes.PurposeError, match=f"{run_id}.*research, planning"):
        T.tokenize(declared["db"], out)
    assert not out.exists()


def test_covered_purpose_tokenizes_and_records_provenance(declared):
    out = declared["dir"] / "tok-research"
    summary = cli_json("tokenize", "--db", str(declared["db"]), "--out", str(out), "--purpose", "research")
    record = T.Vocabulary.load(out / "vocab.json").report["provenance"]  # sealed with the folder, ships with models
    assert record == summary["provenance"] and record["purpose"] == "research"
    [lp] = record["loads"]
    load = declared["load"]
    checksums = json.loads(rows(declared["db"], "SELECT input_checksums FROM etl_runs WHERE run_id = ?",
                                [load["run_id"]])[0][0])
    assert (lp["run_id"], lp["source"], lp["provider"], lp["purposes"]) == (
        load["run_id"], "meds", "Example NHS Trust", ["research", "planning"])
    assert lp["input_checksums"] == checksums and lp["expires"] == "2999-12-31" and lp["loaded_at"]
    assert lp["events"] == load["events"]
    T.check_complete(out)


def test_undeclared_load_is_usable_only_for_unspecified(sim, tmp_path):
    db = tmp_path / "w.duckdb"
    load = load_into("meds", sim, db, exclude_subjects={1, 2})
    assert rows(db, "SELECT provider, purposes, opt_out_sha256 FROM load_declarations") == [
        ("undeclared", ["unspecified"], optout.digest({1, 2}))]
    with pytest.raises(purposes.PurposeError, match="no declaration") as err:
        T.tokenize(db, tmp_path / "tok", purpose="research")
    assert load.run_id in str(err.value) and "'undeclared'" in str(err.value)
    with pytest.raises(purposes.PurposeError, match=load.run_id):
        purpose_stage(db, "research")  # the pipeline flow's uncached check
    assert not (tmp_path / "tok").exists()
    summary = T.tokenize(db, tmp_path / "tok")
    assert summary["provenance"]["purpose"] == "unspecified"
    assert summary["provenance"]["loads"][0]["opt_out_sha256"] == optout.digest({1, 2})


def test_expired_declaration_refuses(sim, tmp_path):
    db = tmp_path / "w.duckdb"
    expired = purposes.parse_declaration({"provider": "Trust B", "purposes": ["research"],
                                          "expires": (date.today() - timedelta(days=1)).isoformat()})
    load = load_into("meds", sim, db, declaration=expired)
    with pytest.raises(purposes.PurposeError, match="expired on") as err:
        T.tokenize(db, tmp_path / "tok", purpose="research")
    assert load.run_id in str(err.value) and "Trust B" in str(err.value)
    assert not (tmp_path / "tok").exists()


def test_model_card_lists_provenance_and_train_rechecks_it(declared, tmp_path):
    data = declared["dir"] / "tok-train"
    T.tokenize(declared["db"], data, purpose="planning")
    cfg = TR.TrainConfig(preset="tiny", seq_len=64, micro_batch=4, max_steps=2, warmup_steps=1, eval_every=0,
                         eval_rows=4, checkpoint_every=0, log_every=1)
    TR.train(data, tmp_path / "model", cfg)
    card = json.loads((tmp_path / "model" / "foresight.json").read_text())["provenance"]
    assert card["purpose"] == "planning"
    [lp] = card["loads"]
    assert lp["provider"] == "Example NHS Trust" and lp["purposes"] == ["research", "planning"]
    assert lp["input_checksums"] and "opt_out_sha256" in lp and lp["loaded_at"]
    # a declaration that has expired since tokenize stops training on those tokens
    later = date(3000, 1, 1)
    with pytest.raises(purposes.PurposeError, match="expired on 2999-12-31"):
        purposes.check_recorded(T.Vocabulary.load(data / "vocab.json").report["provenance"], str(data), today=later)
    # tokens without a provenance record (an older foresight) are refused before training starts
    vocab = T.Vocabulary.load(data / "vocab.json")
    del vocab.report["provenance"]
    vocab.save(data / "vocab.json")
    T.seal(data)
    with pytest.raises(TR.TrainingError, match="purpose"):
        TR.train(data, tmp_path / "model2", cfg)
    assert not (tmp_path / "model2").exists()


def test_html_card_lists_provenance():
    section = TEMPLATE[TEMPLATE.index("<h2>Provenance</h2>"):]
    section = section[:section.index("<h2>", 5)]
    record = {"purpose": "research", "checked_on": "2026-12-04", "rule": "exact purpose, not expired",
              "loads": [{"run_id": "meds-1", "source": "meds", "provider": "Trust <A>", "purposes": ["research"],
                         "events": 12, "expires": None, "loaded_at": "2026-12-01T10:00:00",
                         "input_checksums": {"data/0.parquet": "ab" * 32}, "opt_out_sha256": "cd" * 32,
                         "declaration_sha256": "ef" * 32, "controller": None}]}
    html = jinja2.Environment(autoescape=True).from_string(section).render(r={"data": {"provenance": record}})
    for text in ("research", "meds-1", "Trust &lt;A&gt;", "data/0.parquet", "ab" * 8, "cd" * 8, "ef" * 8,
                 "2026-12-01"):
        assert text in html


def test_old_warehouse_without_the_table_tokenizes_for_unspecified(tmp_path):
    db = tiny_warehouse(tmp_path / "old.duckdb")
    with warehouse.connect(db) as con:  # a warehouse from before load_declarations existed
        con.execute("DROP TABLE load_declarations")
    with pytest.raises(purposes.PurposeError, match="provider 'undeclared'"):
        T.tokenize(db, tmp_path / "tok", purpose="research")
    summary = T.tokenize(db, tmp_path / "tok")  # opened read-only: the table is not created, loads read undeclared
    assert [lp["provider"] for lp in summary["provenance"]["loads"]] == ["undeclared"]
    assert rows(db, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'load_declarations'") == [(0,)]
    with warehouse.connect(db) as con:  # a writable open (the next load) creates it
        assert con.execute("SELECT count(*) FROM load_declarations").fetchall() == [(0,)]
