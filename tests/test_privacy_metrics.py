"""The privacy audit's maths against hand-computed values, and its small pure parts (gate rules, scoring windows)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from privacy import extraction, gate, metrics, mia, synthetic
from privacy.scoring import Piece, TokenStats, score_pieces, subject_pieces

from .conftest import tiny_warehouse

# --- membership inference metrics -------------------------------------------------------------------------------


def test_auc_by_hand():
    # pairs (member > non-member): 0.9>0.7, 0.9>0.3, 0.8>0.7, 0.8>0.3, 0.4>0.3 win; 0.4<0.7 loses -> 5/6
    assert metrics.auc(np.array([0.9, 0.8, 0.4]), np.array([0.7, 0.3])) == pytest.approx(5 / 6)
    # ties count one half: (1,1) .5 + (1,0) 1 + (1,1) .5 + (1,0) 1 = 3 of 4
    assert metrics.auc(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(0.75)


def test_tpr_at_fpr_by_hand():
    members, non = np.array([5.0, 4.0, 1.0, 0.5]), np.array([3.0, 2.0, 0.0, -1.0])
    # FPR 0: the threshold must clear 3 -> members 5 and 4 -> TPR 0.5
    assert metrics.tpr_at_fpr(members, non, 0.0) == 0.5
    # FPR 25%: one false positive allowed (3) -> threshold clears 2 -> still 5, 4
    assert metrics.tpr_at_fpr(members, non, 0.25) == 0.5
    # FPR 50%: threshold clears 0 -> every member
    assert metrics.tpr_at_fpr(members, non, 0.5) == 1.0
    assert not metrics.fpr_resolvable(999, 0.001) and metrics.fpr_resolvable(1000, 0.001)


@pytest.mark.parametrize("seed", range(5))
def test_fast_tpr_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 12, size=int(rng.integers(5, 60))).astype(float)  # integer scores: many ties
    n = rng.integers(0, 10, size=int(rng.integers(5, 60))).astype(float)
    for a in (0.0, 0.001, 0.01, 0.05, 0.1, 0.3, 0.9):
        assert metrics.tpr_at_fpr_fast(m, n, a) == pytest.approx(metrics.tpr_at_fpr(m, n, a)), a


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    m, n = rng.normal(0.5, 1, 300), rng.normal(0.0, 1, 300)
    est = metrics.bootstrap_mia(m, n, (0.01,), n_boot=500, seed=1, familywise_level=0.999)
    auc = est["auc"]
    assert auc.value == pytest.approx(metrics.auc(m, n))
    assert auc.low < auc.value < auc.high and auc.high - auc.low < 0.15
    assert auc.familywise_low < auc.low  # a wider (family-wise) interval has a lower bound below the 95% one
    # the bootstrap AUC of a replicate equals scikit-learn on the same resample (the vectorised formula)
    sep = metrics.bootstrap_mia(np.array([3.0, 4.0]), np.array([1.0, 2.0]), (0.5,), n_boot=50)
    assert sep["auc"].to_json() == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}


def test_min_k_and_min_k_plus_plus_by_hand():
    lp = np.array([-1.0, -5.0, -0.1, -3.0, -0.2])
    assert metrics.min_k(lp, 0.4) == -4.0  # lowest 2 of 5: -5, -3
    assert metrics.min_k(lp, 0.2) == -5.0  # lowest 1
    assert metrics.min_k(lp, 0.01) == -5.0  # at least one token
    # (log p - mu) / sigma = [0, -2]; lowest half -> -2
    assert metrics.min_k_plus_plus(np.array([-1.0, -2.0]), np.array([-1.0, -1.0]), np.array([1.0, 0.5]), 0.5) == -2
    scores = mia.attack_scores(TokenStats(lp, np.full(5, -1.0), np.ones(5)), None, 0.4)
    assert scores["loss"] == pytest.approx(lp.mean()) and scores["min_k"] == -4.0
    assert scores["min_k_pp"] == pytest.approx(-3.0)  # z = lp + 1 -> lowest two: -4, -2


# --- canaries -----------------------------------------------------------------------------------------------------


def test_exposure_rank_by_hand():
    refs = np.array([1.0, 2.0, 3.0])
    assert metrics.exposure_rank(1.5, refs) == 1.0  # rank 2 of |R| = 4: log2 4 - log2 2
    assert metrics.exposure_rank(0.5, refs) == 2.0  # best of 4
    assert metrics.exposure_rank(3.0, refs) == 0.0  # a tie ranks the canary behind the reference: rank 4
    assert metrics.exposure_rank(9.0, refs) == 0.0


def test_skew_normal_extrapolation():
    rng = np.random.default_rng(0)
    refs = rng.normal(100.0, 5.0, 5000)
    fit = metrics.skewnorm_fit(refs)
    assert fit.ks_statistic < 0.03
    p, exp = metrics.skewnorm_tail(100.0, fit)
    assert p == pytest.approx(0.5, abs=0.03) and exp == pytest.approx(1.0, abs=0.1)
    p3, _ = metrics.skewnorm_tail(85.0, fit)  # three standard deviations below the mean
    assert p3 == pytest.approx(0.00135, rel=0.5)
    # far beyond every reference the rank saturates at log2 |R|, the fit keeps going
    _, far = metrics.skewnorm_tail(40.0, fit)
    assert metrics.exposure_rank(40.0, refs) == pytest.approx(math.log2(5001)) and far > 40


def test_bonferroni_and_binomial():
    assert metrics.bonferroni_significant(np.array([0.001, 0.02, 0.5])).tolist() == [True, False, False]
    assert metrics.bonferroni_significant(np.array([0.02])).tolist() == [True]
    est = metrics.binomial_ci(3, 10)
    assert est.value == 0.3 and est.low == pytest.approx(0.0667, abs=1e-3) and est.high == pytest.approx(0.6525,
                                                                                                          abs=1e-3)


def test_paired_difference():
    d = metrics.paired_bootstrap_diff(np.array([1, 1, 0, 1.0]), np.array([0, 0, 0, 1.0]), n_boot=200)
    assert d.value == 0.5 and 0.0 <= d.low <= 0.5 <= d.high <= 1.0


# --- extraction and synthetic pieces -----------------------------------------------------------------------------


def test_near_exact_and_eidetic_counts():
    truth = list(range(1, 11))
    assert extraction.near_exact(truth, truth)
    assert extraction.near_exact([*truth[:8], 0, 0], truth) and not extraction.near_exact([*truth[:7], 0, 0, 0], truth)
    seqs = [np.array([5, 1, 2, 3]), np.array([1, 2, 3]), np.array([1, 2, 9]), np.array([3, 1, 2])]
    # (1, 2, 3) is held by subjects 0 and 1; (2, 3, 1) only spans subjects 1 -> 2, which does not count
    assert extraction.eidetic_counts([(1, 2, 3), (2, 3, 1)], seqs) == {(1, 2, 3): 2, (2, 3, 1): 0}


def test_match_pairs_same_band_closest_length():
    members = {"index": np.array([10, 11, 12]), "n_events": np.array([20, 80, 40]), "age_band": np.array([5, 5, 8])}
    non = {"index": np.array([0, 1]), "n_events": np.array([75, 41]), "age_band": np.array([5, 8])}
    assert sorted(extraction.match_pairs(members, non, 10, seed=0)) == [(11, 0), (12, 1)]


def test_distance_to_closest_record():
    gen = [(1, 2), (5,), (7, 7)]
    train, hold = [(1, 2, 2), (3,)], [(5, 6), (7,)]
    d_train = synthetic.jaccard_to_closest(gen, train, 8)
    d_hold = synthetic.jaccard_to_closest(gen, hold, 8)
    assert d_train.tolist() == [0.0, 1.0, 1.0] and d_hold.tolist() == [1.0, 0.5, 0.0]
    assert synthetic.dcr_share(d_train, d_hold) == pytest.approx(1 / 3)
    res = synthetic.check([(1, 2), (5, 6)], [(1, 2), (4,)], [(5, 6), (4,)], 8, n_boot=0)
    assert res["exact_copies_of_train"] == 1 and res["exact_copies_of_holdout"] == 1
    assert res["unique_copies_of_train"] == 1  # (1, 2): one train subject, no held-out one


# --- gate rules -------------------------------------------------------------------------------------------------


def test_limit_rule_and_worst():
    assert gate.against_limit({"value": 0.55, "ci_low": 0.5}, 0.6) == gate.PASS
    assert gate.against_limit({"value": 0.65, "ci_low": 0.55}, 0.6) == gate.REVIEW
    assert gate.against_limit({"value": 0.9, "ci_low": 0.8}, 0.6) == gate.FAIL
    # the family-wise bound decides when present
    assert gate.against_limit({"value": 0.9, "ci_low": 0.8, "ci_low_familywise": 0.58}, 0.6) == gate.REVIEW
    assert gate.worst([gate.PASS, gate.SKIPPED, gate.REVIEW]) == gate.REVIEW
    assert gate.worst([gate.SKIPPED]) == gate.SKIPPED


def test_unresolvable_tpr_never_fails():
    # a slice that resolves no FPR of the ladder (judged_fpr None) is informational without a membership signal,
    # REVIEW with one (its AUC's family-wise lower bound above 0.5), never FAIL on its TPR
    row = {"slice": "all", "measured": True, "members": 50, "nonmembers": 50, "fpr_resolvable": {"0.001": False},
           "judged_fpr": None,
           "attacks": {"loss": {"auc": {"value": 0.5, "ci_low": 0.4}, "tpr@0.001": {"value": 0.5, "ci_low": 0.4}}}}
    cfg = gate.default_config()["mia"]
    out = gate.decide_mia([row], cfg)
    assert out["decision"] == gate.PASS and "unresolvable at n=50" in out["notes"][0]
    row["attacks"]["loss"]["auc"] = {"value": 0.58, "ci_low": 0.55, "ci_low_familywise": 0.52}
    out = gate.decide_mia([row], cfg)
    assert out["decision"] == gate.REVIEW and "unresolvable at n=50" in out["reasons"][0]


def test_config_merges_and_rejects_unknown_keys(tmp_path):
    cfg = gate.load_config({"mia": {"max_auc": 0.7}})
    assert cfg["mia"]["max_auc"] == 0.7 and cfg["canaries"]["alpha"] == 0.05
    f = tmp_path / "g.toml"
    f.write_text("[mia]\nmax_aucc = 0.7\n")
    with pytest.raises(ValueError, match=r"unknown gate option 'mia\.max_aucc'"):
        gate.load_config(f)
    missing = gate.decide_canaries(None, gate.default_config()["canaries"])
    assert missing["decision"] == gate.REVIEW and missing["valid"] is None


# --- scoring ----------------------------------------------------------------------------------------------------


def test_token_statistics_match_a_direct_computation():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)).eval()
    seqs = [np.array([1, 4, 5, 6, 2]), np.array([1, 7, 3])]
    stats = score_pieces(model, [Piece(seqs[0], 1, 0), Piece(seqs[1], 2, 1)], 2, pad_id=0)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor(seqs[0][None])).logits[0].double(), -1)
    want = logp[:-1].gather(-1, torch.tensor(seqs[0][1:])[:, None])[:, 0].numpy()
    np.testing.assert_allclose(stats[0].logp, want, atol=1e-5)
    p = logp.exp()
    mu = (p * logp).sum(-1)[:-1].numpy()
    sd = ((p * logp**2).sum(-1)[:-1].numpy() - mu**2) ** 0.5
    np.testing.assert_allclose(stats[0].mu, mu, atol=1e-5)
    np.testing.assert_allclose(stats[0].sigma, sd, atol=1e-5)
    assert len(stats[1].logp) == 1  # scored from position 2: only the last token (padding changed nothing)


def test_long_timelines_are_scored_once_per_token(tmp_path):
    from foresight import tokens as T
    from foresight.dataset import PackedSplit

    db = tiny_warehouse(tmp_path / "w.duckdb", n_subjects=40)
    T.tokenize(db, tmp_path / "tok", T.TokenizerConfig(min_subjects=3))
    split = PackedSplit(tmp_path / "tok", "train")
    q_ids = set(split._q_ids.tolist())
    cut = 0
    for i in range(len(split)):
        pieces = subject_pieces(split, i, context=16)
        body = sum(len(pc.tokens) - pc.first_scored for pc in pieces) + 1  # + the first token, never a label
        assert body == int(split.index[i]["length"])
        assert all(len(pc.tokens) <= 17 for pc in pieces)
        for pc in pieces[1:]:  # a piece never starts with a value token torn from its code
            assert int(pc.tokens[pc.first_scored]) not in q_ids
        cut += len(pieces) > 1
    assert cut > 10  # the context of 16 really cut timelines


def test_bootstrap_auc_replicates_equal_scikit_learn():
    """The O(n) replicate formula gives scikit-learn's AUC on the very same resamples (ties included)."""
    rng = np.random.default_rng(3)
    m, n = rng.integers(0, 6, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    est = metrics.bootstrap_mia(m, n, (), n_boot=64, seed=11, level=0.5)
    r = np.random.default_rng(11)
    i1, i0 = r.integers(0, 40, size=(64, 40)), r.integers(0, 30, size=(64, 30))
    want = np.array([metrics.auc(m[a], n[b]) for a, b in zip(i1, i0, strict=True)])
    assert est["auc"].low == pytest.approx(np.percentile(want, 25)) and est["auc"].high == pytest.approx(
        np.percentile(want, 75))
