"""The gate's statistics on synthetic scores: slices judged at the FPR they resolve, TPR tested (not compared) against
its limit and against chance, unresolvable slices informational unless they carry evidence, and rare copies /
k-eidetic extractions judged against the rate chance explains. No model: scores are drawn, so every case is exact
and fast."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from privacy import gate, metrics, mia, synthetic

LADDER = gate.default_config()["mia"]["tpr_limits"]


def _rows(members: dict[str, np.ndarray], nonmembers: dict[str, np.ndarray], slices: dict[str, tuple[int, int]],
          **kw) -> list[dict]:
    """mia.evaluate over the first (members, non-members) subjects of each named slice, with the default ladder."""
    n1 = len(next(iter(members.values())))
    n0 = len(next(iter(nonmembers.values())))
    m1 = {s: np.arange(n1) < a for s, (a, _) in slices.items()}
    m0 = {s: np.arange(n0) < b for s, (_, b) in slices.items()}
    cfg = gate.default_config()["mia"]
    kw = {"min_slice": cfg["min_slice_subjects"], **kw}
    return mia.evaluate(members, nonmembers, m1, m0, alphas=tuple(cfg["report_fprs"]), n_boot=200, seed=0,
                        tpr_limits=cfg["tpr_limits"], min_false_positives=cfg["min_false_positives"], **kw)


def _decide(rows: list[dict]) -> dict:
    return gate.decide_mia(rows, gate.default_config()["mia"])


def test_judged_fpr_is_the_smallest_the_slice_resolves():
    fprs = [x["fpr"] for x in LADDER]
    assert metrics.judged_fpr(2000, fprs, 2) == 0.001  # 2 expected false positives at 0.1%
    assert metrics.judged_fpr(1999, fprs, 2) == 0.01
    assert [metrics.judged_fpr(n, fprs, 2) for n in (660, 416, 314)] == [0.01] * 3  # the 30k slices
    assert metrics.judged_fpr(150, fprs, 2) == 0.1 and metrics.judged_fpr(19, fprs, 2) is None
    assert metrics.judged_fpr(999, [0.001], 1) is None and metrics.judged_fpr(1000, [0.001], 1) == 0.001


def test_tpr_test_is_calibrated_under_no_signal():
    # members and non-members from one distribution: the chance test rejects at about its nominal rate (exact
    # conditional test, conservative by counting the threshold's own non-member), never more
    rng = np.random.default_rng(0)
    p = np.array([metrics.tpr_test(rng.normal(size=300), rng.normal(size=300), 0.1, 0.2)["p_chance"]
                  for _ in range(400)])
    assert (p < 0.05).mean() <= 0.06 and (p < 0.5).mean() > 0.2
    # the test counts members above the non-members' threshold: 4 of 8 members clear the 2nd highest non-member
    t = metrics.tpr_test(np.array([9.0, 8, 7, 6, 0, 0, 0, 0]), np.arange(8.0), 0.25, 0.5)
    assert (t["members_above"], t["nonmembers_above"], t["tpr"]) == (4, 2, 0.5)


def test_sane_scores_at_realistic_slice_sizes_pass():
    # the 30k case: 2000 per side overall, mental health 660, substance use 416, infectious 314 non-members;
    # four attacks with no signal; the old rule said REVIEW (TPR at 0.1% needs 1000 non-members per slice)
    rng = np.random.default_rng(1)
    base1, base0 = rng.normal(size=2000), rng.normal(size=2000)
    attacks = ("loss", "min_k", "min_k_pp", "reference")
    s1 = {a: base1 + 0.5 * rng.normal(size=2000) for a in attacks}
    s0 = {a: base0 + 0.5 * rng.normal(size=2000) for a in attacks}
    rows = _rows(s1, s0, {"mental_health": (700, 660), "substance_use": (400, 416), "infectious": (330, 314)})
    assert [r["judged_fpr"] for r in rows] == [0.001, 0.01, 0.01, 0.01]
    out = _decide(rows)
    assert out["decision"] == gate.PASS, out["reasons"]
    assert any("TPR at FPR 1.0%" in n and "infectious" in n for n in out["notes"])


def test_a_slice_of_300_with_random_scores_is_no_finding_and_a_shifted_one_is():
    rng = np.random.default_rng(2)
    s0 = {"loss": rng.normal(size=300)}
    out = _decide(_rows({"loss": rng.normal(size=300)}, s0, {}))
    assert out["decision"] == gate.PASS and not out["reasons"]
    # every member shifted: far above every limit -> FAIL on AUC and on TPR at the judged FPR (1% at n=300)
    out = _decide(_rows({"loss": rng.normal(size=300) + 3.0}, s0, {}))
    assert out["decision"] == gate.FAIL
    assert any(r.startswith("FAIL: TPR at FPR 1.0%") and "significantly above 5%" in r for r in out["reasons"])
    # a memorised tenth of the members: AUC stays under 0.6 but the tail is above chance and the limit's point
    # estimate, without being significantly above the limit -> REVIEW, with the counts and p-values
    s1 = rng.normal(size=300)
    s1[:30] += 6.0
    rows = _rows({"loss": s1}, s0, {})
    t = rows[0]["attacks"]["loss"]["tpr_test"]
    assert rows[0]["attacks"]["loss"]["auc"]["value"] < 0.6 and t["tpr"] > 0.05
    out = _decide(rows)
    assert out["decision"] == gate.REVIEW and "significantly above chance" in out["reasons"][0]
    assert f"{t['members_above']} members vs {t['nonmembers_above']} non-members" in out["reasons"][0]


def test_unresolvable_slice_is_a_finding_only_with_evidence():
    rng = np.random.default_rng(3)
    s0 = rng.normal(size=300)
    # a 15-subject slice: measured (min_slice 10 here) but resolves no FPR of the ladder (needs 20 non-members)
    slices = {"hiv": (15, 15)}
    out = _decide(_rows({"loss": rng.normal(size=300)}, {"loss": s0}, slices, min_slice=10))
    hiv = [n for n in out["notes"] if "unresolvable at n=15" in n]
    assert out["decision"] == gate.PASS and hiv and "informational" in hiv[0]
    # the same slice whose members are clearly apart: REVIEW on the TPR (never FAIL), FAIL only via a demonstrated AUC
    s1 = rng.normal(size=300)
    s1[:15] += 4.0
    out = _decide(_rows({"loss": s1}, {"loss": s0}, slices, min_slice=10))
    assert any(r.startswith("REVIEW: TPR unresolvable at n=15") for r in out["reasons"]), out["reasons"]


def test_overtrained_scores_still_fail_on_small_cohorts():
    # the over-trained control's sizes (91 per side): the TPR is judged at 10%, and demonstrated above 20%
    rng = np.random.default_rng(4)
    rows = _rows({"loss": rng.normal(size=91) + 4.0}, {"loss": rng.normal(size=91)}, {})
    assert rows[0]["judged_fpr"] == 0.1
    out = _decide(rows)
    assert out["decision"] == gate.FAIL and sum(r.startswith("FAIL") for r in out["reasons"]) == 2


def test_rare_copies_against_chance():
    cfg = gate.default_config()["synthetic"]
    train = Counter({hash((i,)): 1 for i in range(800)})  # 800 train and 100 held-out singleton sequences
    hold = Counter({hash((1000 + i,)): 1 for i in range(100)})
    # at chance: generated copies hit train and held-out singletons in proportion to the split (8:1)
    gen = [(i,) for i in range(16)] + [(1000,), (1001,)] + [(5000,)] * 10
    r = synthetic.rare_copies(gen, train, hold, 10)
    assert (r["timelines"], r["sequences"], r["train_holders"], r["heldout_holders"]) == (18, 18, 16, 2)
    assert r["expected_train_holders"] == pytest.approx(16.0) and r["p_value"] > 0.3
    res = {"dcr_share_closer_to_train": {"value": 0.5, "ci_low": 0.45, "ci_high": 0.55}, "unique_copies_of_train": 16,
           "exact_copies_of_train": 16, "exact_copies_of_holdout": 2, "copy_k": 10, "rare_copies": r}
    out = gate.decide_synthetic(res, cfg)
    assert out["decision"] == gate.PASS and any("not above chance" in n for n in out["notes"])
    # far above chance: 60 train singletons reproduced, no held-out one (expected 60 x 1/9 ~ 6.7 held-out)
    r = synthetic.rare_copies([(i,) for i in range(60)], train, hold, 10)
    assert r["p_value"] < 1e-3
    out = gate.decide_synthetic({**res, "rare_copies": r}, cfg)
    assert out["decision"] == gate.REVIEW and "significantly above chance" in out["reasons"][0]
    # a sequence that 10 or more subjects hold is common, not a copy of a person
    assert synthetic.rare_copies([(7,)], Counter({hash((7,)): 12}), Counter(), 10)["timelines"] == 0


def test_eidetic_extractions_against_matched_non_members():
    def ex(member: int, nonmember: int, only_m: int, only_n: int) -> dict:
        p = metrics.tail_ratio_pvalue(only_m, 1, only_n, 1, 1.0)
        mode = {"member": {"exact": {"value": 0.1}, "eidetic": member}, "nonmember": {"exact": {"value": 0.1},
                "eidetic": nonmember}, "exact_gap_points": {"value": 0.0, "ci_low": -1.0, "ci_high": 1.0},
                "eidetic_test": {"member_only": only_m, "nonmember_only": only_n, "p_value": p}}
        return {"eidetic_k": 10, "by_k": [{"k": 10, "pairs": 200, "greedy": mode, "sampled": mode}]}

    cfg = gate.default_config()["extraction"]
    out = gate.decide_extraction(ex(3, 2, 2, 1), cfg)
    assert out["decision"] == gate.PASS and any("not above chance" in n for n in out["notes"])
    out = gate.decide_extraction(ex(25, 0, 25, 0), cfg)
    assert out["decision"] == gate.REVIEW and "significantly more than chance" in out["reasons"][0]


def test_extraction_gap_above_the_limit_needs_evidence_beyond_chance():
    from privacy.extraction import paired_excess

    def ex(member: int, nonmember: int, ci: tuple[float, float]) -> dict:
        m, n = np.zeros(200, bool), np.zeros(200, bool)
        m[:member], n[100:100 + nonmember] = True, True
        gap = {"value": (member - nonmember) / 2, "ci_low": ci[0], "ci_high": ci[1]}
        mode = {"member": {"exact": {"value": member / 200}, "eidetic": 0}, "exact_gap_points": gap,
                "nonmember": {"exact": {"value": nonmember / 200}, "eidetic": 0}, "exact_test": paired_excess(m, n)}
        return {"eidetic_k": 10, "by_k": [{"k": 10, "pairs": 200, "greedy": mode, "sampled": mode}]}

    cfg = gate.default_config()["extraction"]
    # 2 of 200 members vs none: a gap of 1 point, above the 0.5-point limit, is two pairs: chance
    out = gate.decide_extraction(ex(2, 0, (0.0, 2.5)), cfg)
    assert out["decision"] == gate.PASS and "not above chance" in out["notes"][0]
    # 14 vs 0, interval still reaching below the limit: REVIEW; an interval above the limit: FAIL
    out = gate.decide_extraction(ex(14, 0, (0.3, 11.0)), cfg)
    assert out["decision"] == gate.REVIEW and "above chance" in out["reasons"][0]
    assert gate.decide_extraction(ex(40, 0, (12.0, 28.0)), cfg)["decision"] == gate.FAIL


def test_findings_carry_severity_and_the_decision_rule():
    probes = {"a": {"decision": gate.FAIL, "reasons": ["FAIL: x"], "notes": ["y"]},
              "b": {"decision": gate.REVIEW, "reasons": ["REVIEW: z"], "notes": []}}
    f = gate.findings(probes)
    assert [(x["probe"], x["severity"], x["reason"]) for x in f] == [("a", "FAIL", "x"), ("b", "REVIEW", "z"),
                                                                      ("a", "INFO", "y")]
    assert len({x["id"] for x in f}) == 3 and all(len(x["id"]) == 12 for x in f)
    assert gate.worst([gate.PASS, gate.REVIEW, gate.FAIL]) == gate.FAIL
    assert gate.worst([gate.PASS, gate.REVIEW, gate.SKIPPED]) == gate.REVIEW
