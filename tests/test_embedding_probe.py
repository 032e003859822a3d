"""The embedding probe of the privacy audit (privacy/embedding_probe.py): prompts lose the attribute's codes, a
member-only trace of an attribute is found, an attribute with no such trace is not, and the gate's findings.

One real cohort (tests/test_privacy_gate.py's, 240 subjects) tokenized once, with a trace planted in the members'
records only: every train subject with F329 (depression) also has Z999. An untrained tiny Llama's mean-pooled
embedding carries which tokens a record holds, so a probe reads depression from members' embeddings (through Z999)
far better than from non-members' (which lack it); for HIV nothing was planted.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest

from foresight import tokens as T
from foresight import warehouse
from foresight.dataset import PackedSplit
from foresight.forecast import Forecaster
from privacy import embedding_probe as ep
from privacy import gate

from .conftest import tiny_llama
from .test_privacy_gate import privacy_warehouse

pytestmark = pytest.mark.usefixtures("one_thread")
SENSITIVE = {"depression": ["*//ICD10CM//F329"], "hiv": ["*//ICD10CM//B20"]}
CFG = {**gate.default_config()["embedding_probe"], "repeats": 1, "cv_folds": 3}  # one cut: a quick test


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("probe")
    db = privacy_warehouse(d / "w.duckdb")
    with warehouse.connect(db) as con:  # the member-only trace, after every other event (inside any prompt window)
        con.execute("INSERT INTO events SELECT DISTINCT e.subject_id, ?::TIMESTAMP, 'DX//ICD10CM//Z999', NULL, NULL, "
                    "NULL, NULL, 'test', 'test', 'test' FROM events e JOIN subject_splits s USING (subject_id) "
                    "WHERE s.split = 'train' AND e.code = 'DX//ICD10CM//F329'", [datetime(2028, 1, 1)])
        con.execute("INSERT INTO codes SELECT 'DX//ICD10CM//Z999', NULL, fs_kind('DX//ICD10CM//Z999'), [], 'test'")
    T.tokenize(db, d / "tok", T.TokenizerConfig(min_subjects=10))
    vocab = T.Vocabulary.load(d / "tok" / "vocab.json")
    fc = Forecaster(tiny_llama(vocab), vocab, {"training": {"seq_len": 64}})
    train, held = PackedSplit(d / "tok", "train", vocab=vocab), PackedSplit(d / "tok", "held_out", vocab=vocab)
    return {"fc": fc, "train": train, "held": held}


def test_prompts_lose_the_attributes_codes_and_nothing_else(planted):
    fc, train = planted["fc"], planted["train"]
    drop = ep.attribute_tokens(fc.vocab.tokens, SENSITIVE["depression"])
    assert drop.sum() == 1
    idx = np.arange(len(train))
    has = ep.subjects_with(train, idx, drop[None])[:, 0]
    assert has.sum() >= 20
    prompts = ep.probe_prompts(fc, train, idx[has], drop)
    for i, p in zip(idx[has], prompts, strict=True):
        full = train.subject_tokens(int(i))
        assert drop[full].any() and not drop[p].any()  # the code was there; the prompt never shows it
        kept = full[~drop[full]]
        assert len(p) <= fc.context
        if len(kept) <= fc.context:
            np.testing.assert_array_equal(p, kept)  # every other token, in order
    # a value token belongs to the code before it: both go, the next code's value stays
    is_value = np.array([False, False, True, False, True])
    np.testing.assert_array_equal(ep.strip_tokens(np.array([0, 1, 2, 3, 4, 0]), np.array([0, 1, 0, 0, 0], bool),
                                                  is_value), [0, 3, 4, 0])


def test_a_member_only_trace_is_found_and_no_trace_is_not(planted):
    fc, train, held = planted["fc"], planted["train"], planted["held"]
    res = ep.run(fc, train, held, np.arange(len(train)), np.arange(len(held)), CFG, SENSITIVE, n_boot=500)
    rows = {r["attribute"]: r for r in res["attributes"]}
    dep, hiv = rows["depression"], rows["hiv"]
    assert dep["measured"] and hiv["measured"], rows
    assert dep["positives"] >= 20 and dep["negatives"] == 2 * dep["positives"]  # same sizes both sides
    assert dep["auroc_members"]["value"] > 0.9 > dep["auroc_nonmembers"]["value"] + 0.2
    assert ep.gap_is_significant(dep, CFG["margin"]) and not ep.gap_is_significant(hiv, CFG["margin"])
    out = gate.decide_embedding_probe(res, CFG)
    assert out["decision"] == gate.REVIEW
    assert len(out["reasons"]) == 1 and "depression" in out["reasons"][0]
    assert any(n.startswith("hiv (") for n in out["notes"])


def test_too_few_subjects_is_not_measured_and_switched_off_is_skipped():
    design, why = ep.balanced_design(np.arange(5), np.arange(5, 50), np.arange(3), np.arange(3, 60),
                                     min_positives=20, max_positives=500, negatives_per_positive=2, seed=0)
    assert design is None and "3 non-members" in why
    design, _ = ep.balanced_design(np.arange(40), np.arange(40, 200), np.arange(30), np.arange(30, 90),
                                   min_positives=20, max_positives=500, negatives_per_positive=2, seed=0)
    assert {k: len(v) for k, v in design.items()} == {"pos_m": 30, "neg_m": 60, "pos_n": 30, "neg_n": 60}
    res = {"pooling": "mean", "margin": 0.05, "attributes": [
        {"attribute": "hiv", "measured": False, "why": why, "with_attribute": {"members": 5, "nonmembers": 3}}]}
    out = gate.decide_embedding_probe(res, CFG)
    assert out["decision"] == gate.PASS and "hiv: not measured" in out["notes"][0]
    assert gate.decide_embedding_probe(None, CFG)["decision"] == gate.SKIPPED
