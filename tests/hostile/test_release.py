"""Hostile cases for the release gate and the artifacts it reads and writes (issue 17, defects 1 and 11's
descriptions): an edited or fabricated audit report, another model's report, tampered probe figures, a release,
an audit report or a model save killed part-way.

One tiny model (120 subjects, 4 steps, seconds on one core) audited twice, both reports signed: under relaxed
limits (PASS) and with a vocabulary floor no token can meet (an honest FAIL). Each test copies the model and
plants the report it needs. A signed report that was edited is refused by its signature; the checks behind it
(the decisions re-derived from the report's own figures) are exercised on unsigned reports released with
``allow_unsigned``, the path a report without a signature takes (issue 21: tests/test_signing.py for the rest).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from foresight import tokens as T
from foresight import train as TR
from foresight import warehouse
from foresight.cli import app
from foresight.forecast import Forecaster
from foresight.hashing import sha256_file
from foresight.pipeline import latest_release
from foresight.train import card
from privacy import report as R
from privacy import signing
from privacy.audit import audit
from privacy.release import INDEX, ReleaseRefused, model_checksum, release

from ..conftest import tiny_warehouse

pytestmark = pytest.mark.usefixtures("one_thread")

# relaxed limits under which the tiny model PASSES (a small cohort, no canaries), and a quick audit
LENIENT = {"audit": {"bootstrap": 100, "max_subjects_per_side": 48},
           "mia": {"max_auc": 0.99, "unresolvable": "PASS", "min_slice_subjects": 3},
           "canaries": {"missing": "PASS"}, "vocab_floor": {"min_subjects": 5, "named_below_floor": "PASS"},
           "extraction": {"ks": [10], "eidetic": "PASS", "no_pairs": "PASS", "max_pairs": 20}}
STRICT = {**LENIENT, "vocab_floor": {"min_subjects": 1000}}  # every token is below this floor: FAIL
DESCRIPTION = "Emergency admission (hostile-test description)"


def _config(**kw) -> TR.TrainConfig:
    return TR.TrainConfig(preset="tiny", seq_len=128, micro_batch=8, eval_every=0, eval_rows=8, checkpoint_every=0,
                          log_every=1000, max_steps=4, warmup_steps=1, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict:
    d = tmp_path_factory.mktemp("release")
    db = tiny_warehouse(d / "w.duckdb", n_subjects=120)
    with warehouse.connect(db) as con:  # a readable name that must travel with the released model
        con.execute("UPDATE codes SET description = ? WHERE code = 'ADMIT//EMERGENCY'", [DESCRIPTION])
    T.tokenize(db, d / "tok", T.TokenizerConfig(min_subjects=5))
    TR.train(d / "tok", d / "model", _config())
    keys = signing.init_keys(d / "keys")
    passed = audit(d / "model", d / "tok", d / "pass", config=LENIENT, synthetic_samples=0,
                   signing_key=keys["private_key"])
    failed = audit(d / "model", d / "tok", d / "fail", config=STRICT, synthetic_samples=0,
                   signing_key=keys["private_key"])
    assert passed["decision"] == "PASS", passed["reasons"]
    assert failed["decision"] == "FAIL"
    return {"dir": d, "tok": d / "tok", "model": d / "model", "pass": d / "pass", "fail": d / "fail",
            "key": Path(keys["private_key"]), "pub": Path(keys["public_key"])}


def _model(built: dict, tmp_path: Path, report_from: str | None = "pass", name: str = "model") -> Path:
    """A copy of the model (no checkpoints) whose latest audit is the PASS or FAIL report."""
    m = tmp_path / name
    shutil.copytree(built["model"], m, ignore=shutil.ignore_patterns("checkpoints", "privacy"))
    if report_from:
        shutil.copytree(built[report_from], m / "privacy")
    return m


def _unsigned(model: Path) -> Path:
    """The model with its report's signature removed (what an unsigned audit leaves)."""
    (model / "privacy" / "report.sig.json").unlink()
    return model


def _releases(registry: Path) -> list[dict]:
    """The release records of the index (trust records left out)."""
    recs = [json.loads(x) for x in (registry / INDEX).read_text().splitlines()]
    return [r for r in recs if r.get("kind", "release") == "release"]


def _edit(model: Path, change) -> Path:
    path = model / "privacy" / "report.json"
    rep = json.loads(path.read_text())
    rep = change(rep) or rep
    path.write_text(json.dumps(rep))
    return path


def _nothing_released(registry: Path) -> bool:
    index = registry / INDEX
    return (not index.exists() or not index.read_text().strip()) and not [
        p for p in registry.glob("*") if p.name != ".lock"] if registry.exists() else True


def test_an_honest_pass_is_released_with_its_code_descriptions(built, tmp_path):
    model = _model(built, tmp_path)
    entry = release(model, tmp_path / "reg", name="tiny", public_key=built["pub"])
    target = Path(entry["path"])
    assert model_checksum(target)[0] == entry["checksum"] == model_checksum(model)[0]
    # defect 11: the descriptions travel with the model, recorded with their digest
    assert json.loads((target / "code_descriptions.json").read_text())["ADMIT//EMERGENCY"] == DESCRIPTION
    assert entry["companions"]["code_descriptions.json"] == sha256_file(model / "code_descriptions.json")
    assert Forecaster.from_pretrained(target).descriptions["ADMIT//EMERGENCY"] == DESCRIPTION
    # a PASS under relaxed limits says which limits were relaxed
    assert {"mia.max_auc", "vocab_floor.min_subjects", "canaries.missing"} <= set(entry["gate_overrides"])
    html = (target / "privacy" / "report.html").read_text()
    assert R.html_describes(html, (target / "privacy" / "report.json").read_text())
    assert not (target / "checkpoints").exists() and not (target / ".incomplete").exists()
    assert [r["checksum"] for r in _releases(tmp_path / "reg")] == [entry["checksum"]]
    assert (target / "privacy" / "report.sig.json").exists() and entry["audit_signature"]["key_id"]


def test_a_failed_audit_edited_to_pass_is_refused(built, tmp_path):
    model = _model(built, tmp_path, "fail")
    registry = tmp_path / "reg"
    _edit(model, lambda r: r.update(decision="PASS"))  # the one-word edit of the probe
    with pytest.raises(ReleaseRefused, match="edited after it was signed"):  # the signature no longer covers it
        release(model, registry, public_key=built["pub"])
    _unsigned(model)  # and with the signature removed, its own figures give it away
    with pytest.raises(ReleaseRefused, match="not signed"):
        release(model, registry, public_key=built["pub"])
    with pytest.raises(ReleaseRefused, match=r"disagree with its own probe results.*decision: recorded PASS, "
                                             r"derived FAIL"):
        release(model, registry, allow_unsigned=True)

    def thorough(r):  # every recorded decision and reason rewritten, the figures left as the audit found them
        r.update(decision="PASS", reasons=[])
        r["gate"].update(decision="PASS", reasons=[])
        for p in r["gate"]["probes"].values():
            p.update(decision="PASS", reasons=[])

    _edit(model, thorough)
    with pytest.raises(ReleaseRefused, match="vocabulary_floor: recorded PASS, derived FAIL"):
        release(model, registry, allow_unsigned=True)
    res = CliRunner().invoke(app, ["release", "--model", str(model), "--registry", str(registry),
                                   "--allow-unsigned"])
    assert res.exit_code == 3 and "release refused" in res.output and "Traceback" not in res.output
    assert _nothing_released(registry)


@pytest.mark.parametrize("case", ["bare", "no_mia", "rows_not_list", "no_config", "unknown_option", "not_json",
                                  "probe_is_a_string"])
def test_a_fabricated_or_malformed_report_is_refused(built, tmp_path, case):
    model = _unsigned(_model(built, tmp_path))  # unsigned, so the checks behind the signature are what refuses
    path = model / "privacy" / "report.json"
    honest = json.loads(path.read_text())
    checksum = model_checksum(model)[0]
    rep = copy.deepcopy(honest)
    want = {"bare": "probe results are missing", "no_mia": r"probe results are missing \(membership_inference\)",
            "rows_not_list": "malformed probe results", "no_config": "no gate thresholds",
            "unknown_option": "unknown gate option", "not_json": "not a readable audit report",
            "probe_is_a_string": "malformed probe results"}[case]
    if case == "bare":  # the fabricated report: a decision and the right checksum, nothing else
        rep = {"decision": "PASS", "model": {"checksum": checksum}}
    elif case == "no_mia":
        del rep["probes"]["membership_inference"]
    elif case == "rows_not_list":
        rep["probes"]["membership_inference"]["rows"] = {"all": "fine"}
    elif case == "no_config":
        del rep["config"]
    elif case == "unknown_option":
        rep["config"]["mia"]["trust_me"] = True
    elif case == "probe_is_a_string":
        rep["probes"]["extraction"] = "PASS"
    path.write_text("{not json" if case == "not_json" else json.dumps(rep))
    with pytest.raises(ReleaseRefused, match=want):
        release(model, tmp_path / "reg", allow_unsigned=True)
    assert _nothing_released(tmp_path / "reg")


def test_the_report_of_another_model_is_refused(built, tmp_path):
    other = tmp_path / "other"
    TR.train(built["tok"], other, _config(seed=7))  # same data and settings, another seed: another model
    assert model_checksum(other)[0] != model_checksum(built["model"])[0]
    with pytest.raises(ReleaseRefused, match="another model's report"):
        release(other, tmp_path / "reg", report_path=built["pass"] / "report.json")
    shutil.copytree(built["pass"], other / "privacy")  # or planted as its latest audit
    with pytest.raises(ReleaseRefused, match="another model's report"):
        release(other, tmp_path / "reg")
    assert _nothing_released(tmp_path / "reg")


@pytest.mark.parametrize("tamper", ["token_below_floor", "mia_auc", "opted_out_in_training"])
def test_probe_figures_that_disagree_with_the_decision_are_refused(built, tmp_path, tamper):
    model = _unsigned(_model(built, tmp_path))

    def change(r):
        p = r["probes"]
        if tamper == "token_below_floor":
            p["vocabulary_floor"]["tokens_below_floor"] = ["DX//ICD10CM//B20"]
        elif tamper == "mia_auc":  # an attack that is near-perfect, its whole interval above the limit
            row = next(x for x in p["membership_inference"]["rows"] if x.get("measured"))
            for a in row["attacks"].values():
                a["auc"] = {"value": 0.999, "ci_low": 0.995, "ci_high": 1.0}
        else:
            p["forgotten"] = {"subjects": 3, "in_training_data": 3, "rows": []}

    _edit(model, change)
    probe = {"token_below_floor": "vocabulary_floor", "mia_auc": "membership_inference",
             "opted_out_in_training": "forgotten_subjects"}[tamper]
    with pytest.raises(ReleaseRefused, match=rf"{probe}: recorded \w+, derived FAIL"):
        release(model, tmp_path / "reg", allow_unsigned=True)
    assert _nothing_released(tmp_path / "reg")


def test_a_release_killed_while_copying_leaves_nothing_released(built, tmp_path, monkeypatch):
    model, registry = _model(built, tmp_path), tmp_path / "reg"
    real, calls = shutil.copy2, []

    def copy_then_die(src, dst, **kw):
        calls.append(src)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, **kw)

    monkeypatch.setattr(shutil, "copy2", copy_then_die)
    with pytest.raises(OSError, match="No space left"):
        release(model, registry, name="tiny", public_key=built["pub"])
    monkeypatch.undo()
    assert _nothing_released(registry) and latest_release(registry) is None
    # a kill -9 leaves its temporary folder behind: never indexed, removed by the next release
    stale = registry / ".tmp-killed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    entry = release(model, registry, name="tiny", public_key=built["pub"])
    assert not stale.exists() and latest_release(registry) == Path(entry["path"])
    assert len(_releases(registry)) == 1


def test_a_release_killed_before_its_index_line_is_finished_by_the_next(built, tmp_path, monkeypatch):
    model, registry = _model(built, tmp_path), tmp_path / "reg"
    first = release(model, registry, name="tiny", public_key=built["pub"])
    (registry / INDEX).unlink()  # the state a kill between the folder's rename and the index write leaves
    assert latest_release(registry) is None  # a folder the index does not name is not released
    again = release(model, registry, name="tiny", public_key=built["pub"])
    assert not again.get("already_released") and again["path"] == first["path"]
    assert [r["path"] for r in _releases(registry)] == [first["path"]]
    assert release(model, registry, name="tiny")["already_released"]  # the registry pins the key now
    # the index itself is replaced whole: a write that fails leaves the previous index, byte for byte
    before = (registry / INDEX).read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError):
        release(model, registry, name="tiny-2")
    monkeypatch.undo()
    assert (registry / INDEX).read_bytes() == before and not list(registry.glob(f".{INDEX}.*"))


def test_an_audit_report_write_that_fails_leaves_no_torn_or_temporary_file(built, tmp_path, monkeypatch):
    out = tmp_path / "audit"
    shutil.copytree(built["fail"], out)
    before = (out / "report.json").read_text()
    rep = json.loads((built["pass"] / "report.json").read_text())
    real = os.replace

    def full_disk(src, dst):
        if Path(dst).name == "report.html":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        R.write(rep, [out])
    monkeypatch.undo()
    # no temporary file left (report.sig.json is the FAIL audit's, which does not cover the new JSON)
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.sig.json"]
    assert (out / "report.json").read_text() != before  # the JSON is the new one, whole; the card is the old one
    json.loads((out / "report.json").read_text())
    # a release from that folder does not ship the stale card: it renders the card of the report it verified
    model = _model(built, tmp_path, None)
    signing.sign_report(out / "report.json", signing.load_private_key(built["key"]))  # signed as written
    entry = release(model, tmp_path / "reg", report_path=out / "report.json", public_key=built["pub"])
    html = (Path(entry["path"]) / "privacy" / "report.html").read_text()
    assert R.html_describes(html, (out / "report.json").read_text()) and 'class="badge PASS"' in html


@pytest.mark.parametrize("crash", ["before_the_card", "between_files"])
def test_a_model_save_killed_part_way_is_refused_and_resumes(built, tmp_path, monkeypatch, crash):
    out = tmp_path / "m"
    if crash == "before_the_card":  # the weights are written, foresight.json is not
        monkeypatch.setattr(card, "model_card", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    else:  # the first file is in place, the others are not
        real, n = os.replace, []

        def die_after_one(src, dst):
            n.append(dst)
            if len(n) > 1 and Path(dst).parent == out:
                raise KeyboardInterrupt
            return real(src, dst)

        monkeypatch.setattr(os, "replace", die_after_one)
    with pytest.raises(KeyboardInterrupt):
        TR.train(built["tok"], out, _config())
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="save was interrupted"):
        Forecaster.from_pretrained(out)
    assert not list(out.glob(".saving-*"))
    shutil.copytree(built["pass"], out / "privacy")  # even next to a passing audit of the same weights
    with pytest.raises(ReleaseRefused, match="save was interrupted"):
        release(out, tmp_path / "reg", public_key=built["pub"])
    (out / ".saving-killed").mkdir()  # what a kill -9 during the staging leaves
    (out / ".saving-killed" / "model.safetensors").write_bytes(b"half")
    TR.train(built["tok"], out, _config(), resume=True)  # training again resumes and finishes the save
    fc = Forecaster.from_pretrained(out)
    assert fc.meta["training"]["max_steps"] == 4 and not (out / ".incomplete").exists()
    assert not list(out.glob(".saving-*")) and (out / "loss_curve.png").exists()
