"""Tamper-evident audits and releases (issue 21, part 2 and the REVIEW approval of part 3): Ed25519 keys, signed
audit reports, a release that checks the signature and the model's files, a hash-chained registry index with
``registry verify``, and a reviewer's signed approval of a REVIEW (never of a FAIL).

One tiny model (the hostile release tests' fixture: 120 subjects, 4 steps) audited three times, each report
signed: under relaxed limits (PASS), with canaries missing judged REVIEW (an honest REVIEW), and with a
vocabulary floor no token meets (an honest FAIL). Commands run in-process through the real typer app.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from foresight.cli import app
from foresight.pipeline import latest_release
from privacy import signing
from privacy.audit import audit
from privacy.release import INDEX, ReleaseRefused, ReviewApproval, model_checksum, release
from privacy.verify import verify_registry

from .hostile.test_release import LENIENT, _model, built  # noqa: F401  (built: the module's tiny model, audited)

pytestmark = pytest.mark.usefixtures("one_thread")
REVIEW_CFG = {**LENIENT, "canaries": {"missing": "REVIEW"}}  # no canaries planted: REVIEW, the default's rule


@pytest.fixture(scope="module")
def audited(built: dict) -> dict:  # noqa: F811
    """``built`` plus a signed REVIEW audit of the same model."""
    d = built["dir"]
    rep = audit(built["model"], built["tok"], d / "review", config=REVIEW_CFG, synthetic_samples=0,
                signing_key=built["key"])
    assert rep["decision"] == "REVIEW", rep["reasons"]
    assert rep["signed"] == [str(d / "review" / "report.sig.json"), str(built["model"] / "privacy" / "report.sig.json")]
    return {**built, "review": d / "review"}


def cli(*args: str):
    """``foresight ARGS`` in-process; (exit code, the last stdout line parsed as JSON or None, stderr)."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    lines = res.stdout.strip().splitlines()
    last = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return res.exit_code, last, res.stderr


def _nothing_released(registry: Path) -> bool:
    return not registry.exists() or not [p for p in registry.iterdir() if p.name != ".lock"]


def _flip_last_byte(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))


def _index(registry: Path) -> list[dict]:
    return [json.loads(x) for x in (registry / INDEX).read_text().splitlines()]


def _write_index(registry: Path, records: list[dict]) -> None:
    (registry / INDEX).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def test_keys_init_writes_an_owner_only_private_key_and_never_overwrites(tmp_path):
    code, made, _ = cli("keys", "init", "--out", tmp_path / "k", "--json")
    assert code == 0 and set(made) == {"private_key", "public_key", "key_id"}
    private, public = Path(made["private_key"]), Path(made["public_key"])
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and "PUBLIC KEY" in public.read_text()
    key = signing.load_private_key(private)
    assert signing.key_id(key.public_key()) == made["key_id"] == signing.key_id(signing.load_public_key(public))
    before = private.read_bytes()
    code, _, err = cli("keys", "init", "--out", tmp_path / "k")
    assert code == 2 and "refusing to overwrite" in err and "Traceback" not in err
    assert private.read_bytes() == before  # the key that signed things still verifies them
    os.chmod(private, 0o644)  # a private key others can read is refused, as ssh does
    with pytest.raises(signing.KeyFileError, match="readable by others"):
        signing.load_private_key(private)
    with pytest.raises(signing.KeyFileError, match="this is a private key"):
        signing.load_public_key(private)


def test_a_signed_pass_is_released_pinned_and_verified(audited, tmp_path):
    model, registry = _model(audited, tmp_path), tmp_path / "reg"
    code, entry, err = cli("release", "--model", model, "--registry", registry, "--public-key", audited["pub"],
                           "--signing-key", audited["key"], "--json")
    assert code == 0, err
    kid = signing.key_id(signing.load_public_key(audited["pub"]))
    assert entry["audit_signature"]["key_id"] == kid and entry["signed_by"] == kid and entry["decision"] == "PASS"
    trust, rec = _index(registry)  # the first signed release pins its key in the chain, then records itself
    assert trust["kind"] == "trust" and trust["key_id"] == kid and rec["prev"] == trust["hash"] and rec["seq"] == 2
    assert latest_release(registry) == Path(entry["path"])
    # later releases need no --public-key: the registry trusts its pinned key
    again = release(model, registry, name="again")
    assert "signed_by" not in again and again["audit_signature"]["key_id"] == kid
    code, res, err = cli("registry", "verify", "--registry", registry, "--json")
    assert code == 0 and res["ok"] and res["releases"] == 2 and res["trusted_keys"] == [kid], err
    assert res["warnings"] == [{"index": 2, "warning": "release record not signed (released without --signing-key)"}]
    # checked against a key held outside the registry: the same answer; another key: nothing verifies
    assert verify_registry(registry, public_key=audited["pub"])["ok"]
    other = signing.init_keys(tmp_path / "other")
    res = verify_registry(registry, public_key=other["public_key"])
    assert not res["ok"] and "not among the keys the registry pins" in res["broken"]["reason"]


def test_an_edited_report_flipped_to_pass_is_refused_and_nothing_is_written(audited, tmp_path):
    model, registry = _model(audited, tmp_path, "fail"), tmp_path / "reg"
    path = model / "privacy" / "report.json"
    rep = json.loads(path.read_text())
    rep["decision"] = "PASS"  # the one-word edit, and every recorded decision with it
    rep["gate"]["decision"] = "PASS"
    for p in rep["gate"]["probes"].values():
        p["decision"] = "PASS"
    path.write_text(json.dumps(rep, indent=1))
    code, _, err = cli("release", "--model", model, "--registry", registry, "--public-key", audited["pub"])
    assert code == 3 and "edited after it was signed" in err and len(err.strip().splitlines()) == 1
    assert _nothing_released(registry)
    # re-signed by someone else's key: a signature, but not one the release trusts
    intruder = signing.init_keys(tmp_path / "intruder")
    signing.sign_report(path, signing.load_private_key(intruder["private_key"]))
    with pytest.raises(ReleaseRefused, match="not a trusted key"):
        release(model, registry, public_key=audited["pub"])
    assert _nothing_released(registry)


def test_a_report_for_other_weights_is_refused(audited, tmp_path):
    model, registry = _model(audited, tmp_path), tmp_path / "reg"
    _flip_last_byte(next(model.glob("*.safetensors")))  # one bit of the weights changed after the signed audit
    with pytest.raises(ReleaseRefused, match="changed after its audit"):
        release(model, registry, public_key=audited["pub"])
    # the report edited to name the new weights: its signature still names the audited ones
    path = model / "privacy" / "report.json"
    rep = json.loads(path.read_text())
    rep["model"]["checksum"], rep["model"]["files"] = model_checksum(model)
    path.write_text(json.dumps(rep))
    code, _, err = cli("release", "--model", model, "--registry", registry, "--public-key", audited["pub"])
    assert code == 3 and "edited after it was signed" in err
    # another model's honest, signed audit planted beside these weights
    shutil.rmtree(model / "privacy")
    shutil.copytree(audited["pass"], model / "privacy")
    with pytest.raises(ReleaseRefused, match="another model's report"):
        release(model, registry, public_key=audited["pub"])
    assert _nothing_released(registry)


def test_an_unsigned_report_is_refused_unless_explicitly_allowed(audited, tmp_path):
    model, registry = _model(audited, tmp_path), tmp_path / "reg"
    (model / "privacy" / "report.sig.json").unlink()
    code, _, err = cli("release", "--model", model, "--registry", registry, "--public-key", audited["pub"])
    assert code == 3 and "not signed" in err and "--signing-key" in err and "keys init" in err
    code, entry, _ = cli("release", "--model", model, "--registry", registry, "--allow-unsigned", "--json")
    assert code == 0 and entry["audit_signature"] is None
    res = verify_registry(registry)
    assert res["ok"] and {"index": 0, "warning": "released with an unsigned audit report (--allow-unsigned)"} in \
        res["warnings"]


def test_registry_verify_reports_an_edited_deleted_or_reordered_record(audited, tmp_path):
    registry = tmp_path / "reg"
    for name in ("a", "b", "c"):  # three signed releases of the model: trust + 3 release records
        release(_model(audited, tmp_path / name), registry, name=name, signing_key=audited["key"])
    honest = _index(registry)
    assert [r["kind"] for r in honest] == ["trust", "release", "release", "release"]
    assert verify_registry(registry)["ok"]

    def broken(records: list[dict]) -> dict:
        _write_index(registry, records)
        code, res, err = cli("registry", "verify", "--registry", registry, "--json")
        assert code == 1 and not res["ok"] and "is broken" in err, err
        return res["broken"]

    edited = [dict(r) for r in honest]
    edited[2]["name"] = "renamed"
    assert broken(edited) == {"index": 2, "line": 3, "reason": "hash chain broken: its hash does not match its "
                                                                 "contents (the record was edited)"}
    assert broken([honest[0], honest[1], honest[3]])["index"] == 2  # a record deleted: the next one's prev breaks
    assert broken([honest[0], honest[2], honest[1], honest[3]])["index"] == 1  # reordered
    # an edit whose hashes are all recomputed (anyone can: the chain has no secret) breaks the record's signature
    from foresight import chain

    rechained, prev = [], None
    for i, r in enumerate(edited, 1):
        prev = chain.link(r, prev, position=i)
        rechained.append(prev)
    b = broken(rechained)
    assert b["index"] == 2 and "signature does not verify" in b["reason"]
    # the released files are re-checked too
    _write_index(registry, honest)
    _flip_last_byte(next(Path(honest[3]["path"]).glob("*.safetensors")))
    assert "released files" in broken(honest)["reason"]
    # and nothing is added to a broken index
    _write_index(registry, edited)
    with pytest.raises(ReleaseRefused, match="record 2"):
        release(_model(audited, tmp_path / "d"), registry, name="d")


def test_a_review_is_released_only_with_a_signed_approval_and_a_fail_never(audited, tmp_path):
    registry = tmp_path / "reg"
    review = _model(audited, tmp_path, "review")
    code, _, err = cli("release", "--model", review, "--registry", registry, "--public-key", audited["pub"])
    assert code == 3 and "decided REVIEW" in err and "--approve-review" in err
    code, _, err = cli("release", "--model", review, "--registry", registry, "--approve-review", "--reviewer", "Dr A")
    assert code == 2 and "--reason" in err and _nothing_released(registry)
    code, entry, err = cli("release", "--model", review, "--registry", registry, "--approve-review",
                           "--reviewer", "Dr A. Reviewer", "--reason", "no canaries planted in this pilot; "
                           "signed off by the IG board", "--signing-key", audited["key"], "--json")
    assert code == 0, err
    approval = entry["approval"]["payload"]
    assert approval["reviewer"] == "Dr A. Reviewer" and approval["decision"] == "REVIEW"
    assert approval["model_checksum"] == entry["checksum"] and approval["findings"]
    assert all(f["severity"] == "REVIEW" and f["id"] for f in approval["findings"])
    released = Path(entry["path"]) / "privacy"
    assert json.loads((released / "approval.json").read_text()) == entry["approval"]
    card = (released / "report.html").read_text()
    assert "Reviewer's approval" in card and "Dr A. Reviewer" in card and "IG board" in card
    assert verify_registry(registry)["ok"]
    # an approval edited in the index no longer verifies
    recs = _index(registry)
    recs[-1]["approval"]["payload"]["reviewer"] = "someone else"
    from foresight import chain

    recs[-1] = chain.link(recs[-1], recs[-2], position=len(recs))
    _write_index(registry, recs)
    res = verify_registry(registry)
    assert not res["ok"] and any("reviewer's approval" in p["reason"] for p in res["problems"])

    fail = _model(audited, tmp_path / "f", "fail")
    with pytest.raises(ReleaseRefused, match="a FAIL can never be approved"):
        release(fail, tmp_path / "reg2", public_key=audited["pub"], signing_key=audited["key"],
                approval=ReviewApproval("Dr A", "looks fine"))
    passed = _model(audited, tmp_path / "p", "pass")
    with pytest.raises(ReleaseRefused, match="for an audit that decided REVIEW; this one decided PASS"):
        release(passed, tmp_path / "reg2", public_key=audited["pub"], signing_key=audited["key"],
                approval=ReviewApproval("Dr A", "looks fine"))
    assert _nothing_released(tmp_path / "reg2")


def test_only_a_trusted_key_adds_another(audited, tmp_path):
    registry = tmp_path / "reg"
    release(_model(audited, tmp_path), registry, public_key=audited["pub"])
    new = signing.init_keys(tmp_path / "new")
    code, _, err = cli("registry", "trust", "--registry", registry, "--public-key", new["public_key"])
    assert code == 2 and "needs --signing-key" in err
    code, res, err = cli("registry", "trust", "--registry", registry, "--public-key", new["public_key"],
                         "--signing-key", audited["key"], "--json")
    assert code == 0 and not res["already_trusted"], err
    assert new["key_id"] in verify_registry(registry)["trusted_keys"]
