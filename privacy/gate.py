"""The gate decision: PASS / REVIEW / FAIL per probe, each with its reasons; overall = the worst.

Thresholds live in ``gate_defaults.toml`` (:func:`load_config` merges a user file over it). The rule for a figure
with an interval and a limit (:func:`against_limit`): FAIL when the whole interval is above the limit (the leak
is demonstrated), REVIEW when only the point estimate is (it may be sampling noise), PASS otherwise. Membership
inference and rare copies ask for evidence beyond chance before REVIEW, because at realistic sizes many small
slices and a few rare sequences make point estimates above a limit a certainty for any model:

- AUC per slice and attack: FAIL when the family-wise lower bound is above ``max_auc``; REVIEW when the point
  estimate is above it and the family-wise lower bound is above 0.5 (a membership signal); else a note.
- TPR: each slice is judged at the smallest FPR of the ``tpr_limits`` ladder its ``n`` non-members resolve
  (``n * fpr >= min_false_positives``) by exact one-sided tests (:func:`privacy.metrics.tpr_test`) at the
  family-wise level: FAIL when significantly above ``max_tpr``; REVIEW when above ``max_tpr`` and significantly
  above chance. A slice that resolves no FPR of the ladder is "unresolvable at n=..": ``unresolvable`` when its
  AUC shows a membership signal, a note otherwise.
- k-eidetic extractions and generated copies of rare sequences: a finding only when significantly above the
  rate chance explains (matched non-members; the random patient split).
- Embedding probe (:func:`decide_embedding_probe`): REVIEW when a sensitive attribute is read from members'
  embeddings better than from non-members' by more than ``margin`` AUROC (family-wise lower bound of the gap).

Probes that were not run are SKIPPED and do not count. An audit whose canaries show it could not see
memorisation is *invalid*: it can be REVIEW at best, never PASS. :func:`findings` lists every reason and note
with its severity (FAIL, REVIEW, INFO).
"""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path
from typing import Any

from foresight.hashing import sha256

PASS, REVIEW, FAIL, SKIPPED = "PASS", "REVIEW", "FAIL", "SKIPPED"
_RANK = {SKIPPED: -1, PASS: 0, REVIEW: 1, FAIL: 2}


def default_config() -> dict[str, Any]:
    """The shipped defaults (``privacy/gate_defaults.toml``)."""
    return tomllib.loads(Path(__file__).with_name("gate_defaults.toml").read_text())


def load_config(path: str | Path | dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, with a TOML file (or a dict) merged over them key by key; unknown keys are an error."""
    cfg = default_config()
    if path is None:
        return cfg
    user = path if isinstance(path, dict) else tomllib.loads(Path(path).read_text())
    _merge(cfg, user, where=str(path) if not isinstance(path, dict) else "config")
    return cfg


def _merge(base: dict[str, Any], over: dict[str, Any], where: str, prefix: str = "") -> None:
    for key, value in over.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ValueError(f"{where}: unknown gate option {name!r}")
        if isinstance(base[key], dict) and isinstance(value, dict) and not name.endswith("sensitive"):
            _merge(base[key], value, where, name + ".")
        else:
            base[key] = copy.deepcopy(value)


def overrides(cfg: dict[str, Any], base: dict[str, Any] | None = None, prefix: str = "") -> list[str]:
    """The dotted names of the options where ``cfg`` differs from the shipped defaults (what a reviewer of a
    release should look at: a PASS under relaxed limits is a different claim)."""
    base = default_config() if base is None else base
    out = []
    for key in sorted(set(cfg) | set(base)):
        mine, theirs = cfg.get(key), base.get(key)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            out += overrides(mine, theirs, f"{prefix}{key}.")
        elif mine != theirs:
            out.append(f"{prefix}{key}")
    return out


def worst(decisions: list[str]) -> str:
    """The most severe decision (SKIPPED never wins over a real one; all skipped is SKIPPED)."""
    return max(decisions, key=lambda d: _RANK[d], default=SKIPPED)


def against_limit(est: dict[str, Any], limit: float) -> str:
    """PASS / REVIEW / FAIL of an estimate ``{value, ci_low, ci_high}`` against an upper limit.

    The lower bound used is the family-wise one (``ci_low_familywise``) when the estimate has it: the figure is
    one of many tested at once.
    """
    value = est.get("value")
    low = est.get("ci_low_familywise", est.get("ci_low"))
    if value is None or value <= limit:
        return PASS
    return FAIL if low is not None and low > limit else REVIEW


def _fmt(est: dict[str, Any], scale: float = 1.0, unit: str = "") -> str:
    v, lo, hi = (est.get(k) for k in ("value", "ci_low", "ci_high"))
    if v is None:
        return "n/a"
    ci = f" [{lo * scale:.3g}, {hi * scale:.3g}]" if lo is not None and hi is not None else ""
    fw = est.get("ci_low_familywise")
    ci += f" (family-wise low {fw * scale:.3g})" if fw is not None else ""
    return f"{v * scale:.3g}{unit}{ci}"


def _fw_alpha(row: dict[str, Any]) -> float:
    """The one-sided family-wise significance level of a slice's tests (what its CIs' family-wise bounds use)."""
    return (1 - float(row.get("familywise_level") or 0.95)) / 2


def _judge_auc(row: dict[str, Any], where: str, max_auc: float) -> tuple[list[str], list[str], list[str]]:
    """AUC of every attack on one slice: FAIL when demonstrated above ``max_auc`` (family-wise lower bound above
    it); REVIEW when the point estimate is above it and a membership signal is demonstrated (family-wise lower
    bound above 0.5); a point estimate above it without a signal is noise at this size (a note)."""
    found = {a: f["auc"] for a, f in row["attacks"].items() if "auc" in f}
    fail = {a: e for a, e in found.items() if against_limit(e, max_auc) == FAIL}
    high = {a: e for a, e in found.items() if a not in fail and (e.get("value") or 0) > max_auc}
    review = {a: e for a, e in high.items() if (e.get("ci_low_familywise", e.get("ci_low")) or 0) > 0.5}
    noise = {a: e for a, e in high.items() if a not in review}
    decisions, reasons, notes = [PASS], [], []
    if fail:
        decisions.append(FAIL)
        reasons.append(f"FAIL: AUC demonstrably above {max_auc:g} (family-wise lower bound above it) on {where}: "
                       + ", ".join(f"{a} {_fmt(e)}" for a, e in fail.items()))
    if review:
        decisions.append(REVIEW)
        reasons.append(f"REVIEW: AUC above {max_auc:g} on {where} with a membership signal (family-wise lower bound "
                       "above 0.5), though not demonstrably above the limit: "
                       + ", ".join(f"{a} {_fmt(e)}" for a, e in review.items()))
    if noise:
        notes.append(f"AUC point estimate above {max_auc:g} on {where} but no membership signal (family-wise lower "
                     "bound <= 0.5: sampling noise at this size): " + ", ".join(f"{a} {_fmt(e)}"
                                                                            for a, e in noise.items()))
    return decisions, reasons, notes


def _tpr_line(a: str, t: dict[str, Any]) -> str:
    return (f"{a} {100 * t['tpr']:.3g}% ({t['members_above']} members vs {t['nonmembers_above']} non-members above "
            f"the threshold; p = {t['p_limit']:.2g} vs the limit, {t['p_chance']:.2g} vs chance)")


def _judge_tpr(row: dict[str, Any], where: str, cfg: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """TPR at the slice's judged FPR (the smallest configured FPR its non-members resolve): FAIL when an attack is
    significantly above the limit, REVIEW when its TPR is above the limit and significantly above chance (the
    family-wise level of the slice's tests). A slice that resolves no configured FPR is unresolvable: REVIEW
    (``unresolvable``) only when its AUC shows a membership signal, else a note."""
    alpha, k = _fw_alpha(row), cfg.get("min_false_positives", 1)
    fpr = row.get("judged_fpr")
    if fpr is None:
        largest = max(float(x["fpr"]) for x in cfg["tpr_limits"])
        line = (f"TPR unresolvable at n={row['nonmembers']} non-members on {row['slice']}: no configured FPR has >= "
                f"{k:g} expected false positives (the largest, {largest:.1%}, needs "
                f"{math.ceil(k / largest - 1e-9)} non-members)")
        signal = {a: f["auc"] for a, f in row["attacks"].items()
                  if (f["auc"].get("ci_low_familywise", f["auc"].get("ci_low")) or 0) > 0.5}
        d = cfg.get("unresolvable", REVIEW)
        if signal and d != PASS:
            return [d], [f"{d}: {line}, and its AUC shows a membership signal (family-wise lower bound above 0.5): "
                         + ", ".join(f"{a} {_fmt(e)}" for a, e in signal.items())], []
        return [PASS], [], [f"{line}; no membership signal in its AUC: informational"]
    tests = {a: f["tpr_test"] for a, f in row["attacks"].items() if "tpr_test" in f}
    if not tests:
        return [PASS], [], []
    limit = next(t["max_tpr"] for t in tests.values())
    label = f"TPR at FPR {fpr:.1%} (the smallest configured FPR {row['nonmembers']} non-members resolve)"
    fail = {a: t for a, t in tests.items() if t["p_limit"] < alpha}
    review = {a: t for a, t in tests.items() if a not in fail and t["tpr"] > limit and t["p_chance"] < alpha}
    decisions, reasons, notes = [PASS], [], []
    if fail:
        decisions.append(FAIL)
        reasons.append(f"FAIL: {label} significantly above {100 * limit:g}% on {where} (family-wise p < "
                       f"{alpha:.2g}): " + ", ".join(_tpr_line(a, t) for a, t in fail.items()))
    if review:
        decisions.append(REVIEW)
        reasons.append(f"REVIEW: {label} above {100 * limit:g}% and significantly above chance on {where}, though "
                       f"not significantly above the limit (family-wise p < {alpha:.2g} needed): "
                       + ", ".join(_tpr_line(a, t) for a, t in review.items()))
    if not fail and not review:
        worst_a = max(tests, key=lambda a: tests[a]["tpr"])
        notes.append(f"{label} on {where}: highest {_tpr_line(worst_a, tests[worst_a])}; limit {100 * limit:g}%, "
                     "no attack significantly above it")
    return decisions, reasons, notes


def decide_mia(rows: list[dict[str, Any]], cfg: dict[str, Any], what: str = "membership inference"
               ) -> dict[str, Any]:
    """Every attack on every measured slice: AUC against ``max_auc`` (:func:`_judge_auc`) and, when TPR limits are
    configured, TPR at the FPR the slice resolves against its limit (:func:`_judge_tpr`); reasons name the
    attacks, figures and p-values."""
    decisions, reasons, notes = [], [], []
    for row in rows:
        if not row.get("measured"):
            notes.append(f"slice {row['slice']} not measured ({row['members']} members, {row['nonmembers']} "
                         f"non-members)")
            continue
        where = f"{row['slice']} ({row['members']} members vs {row['nonmembers']} non-members)"
        parts = [_judge_auc(row, where, cfg["max_auc"])]
        if cfg.get("tpr_limits"):
            parts.append(_judge_tpr(row, where, cfg))
        for d, r, n in parts:
            decisions += d
            reasons += r
            notes += n
    if not decisions:
        return {"decision": REVIEW, "reasons": [f"REVIEW: {what} measured nothing (too few subjects)"],
                "notes": notes}
    return {"decision": worst(decisions), "reasons": _dedup(reasons), "notes": notes}


def decide_canaries(res: dict[str, Any] | None, cfg: dict[str, Any]) -> dict[str, Any]:
    """Exposed canaries of the failing repeat counts, and the audit's validity."""
    if res is None:
        return {"decision": cfg["missing"], "valid": None, "reasons": [
            f"{cfg['missing']}: the training data holds no canaries, so the audit cannot show that it would see "
            "memorisation; insert them before training (`foresight privacy insert-canaries`)"], "notes": []}
    decisions, reasons, notes = [PASS], [], []
    for g in res["groups"]:
        line = (f"r={g['repeats']}: {g['exposed']}/{g['canaries']} exposed (p < {res['alpha']} Bonferroni), median "
                f"exposure {g['median_exposure_extrapolated']:.1f} bits")
        if g["repeats"] in cfg["fail_if_exposed"] and g["exposed"]:
            decisions.append(FAIL)
            reasons.append(f"FAIL: {line}")
        else:
            notes.append(line)
    if not res["validity_checkable"]:
        d = cfg.get("unverified", REVIEW)
        decisions.append(d)
        line = (f"no canary planted {res['validity_repeats']} times, so the audit's power to detect memorisation is "
                "unverified")
        (reasons if d != PASS else notes).append(f"{d}: {line}" if d != PASS else line)
    elif not res["valid"]:
        decisions.append(REVIEW)
        reasons.append(f"REVIEW: audit invalid: canaries planted {res['validity_repeats']} times were not detected, "
                       "so this audit could not see memorisation and a pass would mean nothing")
    return {"decision": worst(decisions), "valid": res["valid"], "reasons": reasons, "notes": notes}


def decide_extraction(res: dict[str, Any], cfg: dict[str, Any], level: float = 0.95) -> dict[str, Any]:
    """The member - non-member exact-extraction gap per k and decoding: FAIL when its interval is above
    ``max_exact_gap_points``; REVIEW when its point estimate is and members' exact extractions significantly
    outnumber their matched non-members' (exact McNemar test); k-eidetic extractions: a finding (``eidetic``) only
    when members' significantly outnumber their matched non-members' of equal rarity. Tests one-sided, Bonferroni
    over the k x decoding rows at ``1 - level``."""
    decisions, reasons, notes = [], [], []
    n_tests = max(1, sum(1 for row in res["by_k"] for m in ("greedy", "sampled") if m in row))
    alpha = (1 - level) / 2 / n_tests
    for row in res["by_k"]:
        if "greedy" not in row:
            notes.append(f"k={row['k']}: {row.get('why', 'not measured')}")
            continue
        for mode in ("greedy", "sampled"):
            r = row[mode]
            gap = r["exact_gap_points"]
            d = against_limit(gap, cfg["max_exact_gap_points"])
            line = (f"k={row['k']} {mode}: exact extraction members {_fmt(r['member']['exact'], 100, '%')} vs "
                    f"non-members {_fmt(r['nonmember']['exact'], 100, '%')}, gap {_fmt(gap, 1, ' points')} "
                    f"({row['pairs']} pairs)")
            t = r.get("exact_test")  # absent from reports written before the test: the point rule
            if d == REVIEW and t is not None and t["p_value"] >= alpha:
                d = PASS
                line += (f" above {cfg['max_exact_gap_points']} points but not above chance (pairs where only the "
                         f"member's is exact: {t['member_only']}, only the non-member's: {t['nonmember_only']}; "
                         f"one-sided p = {t['p_value']:.2g})")
            decisions.append(d)
            if d == REVIEW and t is not None:
                line += (f"; members' exact extractions above chance (only the member's: {t['member_only']}, only the "
                         f"non-member's: {t['nonmember_only']}; one-sided p = {t['p_value']:.2g})")
            if d != PASS:
                reasons.append(f"{d}: {line} > {cfg['max_exact_gap_points']} points")
            else:
                notes.append(line)
            if r["member"]["eidetic"]:
                d, line = _eidetic(r, res["eidetic_k"], alpha, cfg["eidetic"])
                decisions.append(d)
                (reasons if d != PASS else notes).append(f"{d}: k={row['k']} {mode}: {line}" if d != PASS
                                                         else f"k={row['k']} {mode}: {line}")
    if not decisions:
        return {"decision": cfg["no_pairs"], "reasons": [
            f"{cfg['no_pairs']}: no k had matched member / non-member pairs: extraction unmeasured"], "notes": notes}
    return {"decision": worst(decisions), "reasons": _dedup(reasons), "notes": notes}


def _eidetic(r: dict[str, Any], eidetic_k: int, alpha: float, severity: str) -> tuple[str, str]:
    """(decision, reason) for members' k-eidetic extractions against their matched non-members' (a report
    without the paired test, from before it existed, takes the old rule: any is a finding)."""
    line = f"{r['member']['eidetic']} member extraction(s) held by fewer than {eidetic_k} training subjects (k-eidetic)"
    t = r.get("eidetic_test")
    if t is None:
        return severity, line
    line += (f" vs {r['nonmember']['eidetic']} of matched non-members (pairs where only the member's is: "
             f"{t['member_only']}, only the non-member's: {t['nonmember_only']}; one-sided p = {t['p_value']:.2g})")
    if t["p_value"] < alpha:
        return severity, f"{line}: significantly more than chance (p < {alpha:.2g})"
    return PASS, f"{line}: not above chance"


def decide_vocab(res: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Tokens below the floor fail; a tokenizer floor below the gate's fails; named below-floor codes per config."""
    decisions, reasons, notes = [PASS], [], []
    if res["tokens_below_floor"]:
        decisions.append(FAIL)
        reasons.append(f"FAIL: {len(res['tokens_below_floor'])} token(s) cover fewer than {res['floor']} train "
                       "subjects")
    if res["tokenizer_min_subjects"] < res["floor"]:
        decisions.append(FAIL)
        reasons.append(f"FAIL: the vocabulary was built with a floor of {res['tokenizer_min_subjects']} subjects, "
                       f"the gate requires {res['floor']}")
    if res["below_floor_codes_named_in_vocab"]:
        d = cfg["named_below_floor"]
        decisions.append(d)
        line = (f"vocab.json names {res['below_floor_codes_named_in_vocab']} raw code(s) that fell below the floor "
                "(in its code map): shipping them discloses that someone in the data had them")
        (reasons if d != PASS else notes).append(f"{d}: {line}" if d != PASS else line)
    for name, g in res["sensitive_groups"].items():
        if g["tokens"]:
            notes.append(f"sensitive group {name}: {len(g['tokens'])} token(s) in the vocabulary")
    return {"decision": worst(decisions), "reasons": reasons, "notes": notes}


def decide_synthetic(res: dict[str, Any] | None, cfg: dict[str, Any], level: float = 0.95) -> dict[str, Any]:
    """DCR share against its limit; copies of rare real sequences: a finding (``unique_copies``) only when their
    holders are train subjects significantly more often than the random split explains (one-sided exact binomial
    test at ``(1 - level) / 2``)."""
    if res is None:
        return {"decision": SKIPPED, "reasons": [], "notes": ["no synthetic cohort generated"]}
    share = res["dcr_share_closer_to_train"]
    d = against_limit(share, cfg["max_dcr_share"])
    decisions = [d]
    reasons, notes = [], []
    line = f"{_fmt(share, 100, '%')} of generated timelines are closer to a train subject than to a held-out one"
    (reasons if d != PASS else notes).append(f"{d}: {line} (limit {cfg['max_dcr_share']:.0%})" if d != PASS else line)
    rare = res.get("rare_copies")
    if rare is not None and rare["timelines"]:
        alpha = (1 - level) / 2
        line = (f"{rare['timelines']} generated timeline(s) reproduce {rare['sequences']} sequence(s) that fewer than "
                f"{res['copy_k']} real subjects hold; their holders: {rare['train_holders']} train vs "
                f"{rare['expected_train_holders']:g} expected by chance ({rare['heldout_holders']} held-out; "
                f"one-sided p = {rare['p_value']:.2g})")
        d = cfg["unique_copies"] if rare["p_value"] < alpha else PASS
        decisions.append(d)
        (reasons if d != PASS else notes).append(f"{d}: {line}: significantly above chance (p < {alpha:.2g})"
                                                 if d != PASS else f"{line}: not above chance")
    elif rare is None and res["unique_copies_of_train"]:  # a report from before the chance test
        d = cfg["unique_copies"]
        decisions.append(d)
        reasons.append(f"{d}: {res['unique_copies_of_train']} generated timeline(s) copy a sequence fewer than "
                       f"{res['copy_k']} train subjects have (and no held-out subject)")
    notes.append(f"exact copies: {res['exact_copies_of_train']} of train, {res['exact_copies_of_holdout']} of "
                 "held-out timelines")
    return {"decision": worst(decisions), "reasons": reasons, "notes": notes}


def decide_embedding_probe(res: dict[str, Any] | None, cfg: dict[str, Any]) -> dict[str, Any]:
    """Per sensitive attribute, how much better a linear probe reads it from members' embeddings than from
    non-members' (:mod:`privacy.embedding_probe`): ``severity`` (REVIEW) when the AUROC gap's family-wise lower
    bound is above ``margin``; otherwise, and for attributes too rare to measure, a note."""
    if res is None:
        return {"decision": SKIPPED, "reasons": [], "notes": ["embedding probe switched off ([embedding_probe] "
                                                              "enabled = false)"]}
    decisions, reasons, notes = [PASS], [], []
    margin = float(cfg["margin"])
    for row in res["attributes"]:
        if not row.get("measured"):
            notes.append(f"{row['attribute']}: not measured: {row.get('why', 'too few subjects')}")
            continue
        line = (f"{row['attribute']} ({row['positives']} with / {row['negatives']} without per side, "
                f"{res.get('pooling', '?')} pooling): probe AUROC members {_fmt(row['auroc_members'])} vs "
                f"non-members {_fmt(row['auroc_nonmembers'])}, gap {_fmt(row['gap'])}")
        low = row["gap"].get("ci_low_familywise")
        if low is not None and low > margin:
            d = cfg.get("severity", REVIEW)
            decisions.append(d)
            reasons.append(f"{d}: {line}: the attribute is read from members' embeddings demonstrably better than "
                           f"from non-members' (family-wise lower bound above the {margin:g} margin)")
        else:
            notes.append(f"{line}: not demonstrably above the {margin:g} margin")
    return {"decision": worst(decisions), "reasons": reasons, "notes": notes}


def decide(results: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Per-probe decisions and the overall one. ``results`` holds each probe's figures (None = not run).

    Every probe's reasons (FAIL / REVIEW lines) and notes (informational) are also listed as ``findings``
    (:func:`findings`). The overall decision: any FAIL -> FAIL, else any REVIEW -> REVIEW, else PASS (an audit
    its canaries show blind is REVIEW at best).
    """
    level = float(cfg["audit"]["ci_level"])
    probes = {
        "membership_inference": decide_mia(results["membership_inference"], {**cfg["mia"]}),
        "canaries": decide_canaries(results.get("canaries"), cfg["canaries"]),
        "extraction": decide_extraction(results["extraction"], cfg["extraction"], level),
        "vocabulary_floor": decide_vocab(results["vocabulary_floor"], cfg["vocab_floor"]),
        "synthetic_cohort": decide_synthetic(results.get("synthetic_cohort"), cfg["synthetic"], level),
    }
    if "embedding_probe" in results:  # reports written before the probe existed have no such key: no row
        probes["embedding_probe"] = decide_embedding_probe(results["embedding_probe"], cfg["embedding_probe"])
    forgotten = results.get("forgotten")
    if forgotten is not None:
        p = decide_mia(forgotten["rows"], {"max_auc": cfg["forgotten"]["max_auc"], "tpr_limits": []},
                       "the forgotten-subjects check")
        if forgotten.get("in_training_data"):
            p["decision"] = FAIL
            p["reasons"].insert(0, f"FAIL: {forgotten['in_training_data']} opted-out subject(s) are in the training "
                                   "data")
        probes["forgotten_subjects"] = p
    else:
        probes["forgotten_subjects"] = {"decision": SKIPPED, "reasons": [], "notes": ["no forgotten set given"]}
    valid = probes["canaries"].get("valid")  # None: no canaries, validity unknown
    overall = worst([p["decision"] for p in probes.values()])
    if overall == PASS and valid is False:  # an audit shown blind can never pass (decide_canaries says why)
        overall = REVIEW
    reasons = [r for name, p in probes.items() for r in (f"{name}: {x}" for x in p["reasons"])]
    return {"decision": overall, "valid": valid, "probes": probes, "reasons": reasons, "findings": findings(probes)}


def findings(probes: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """Every probe's reasons and notes as ``{id, probe, severity, reason}``, severity FAIL, REVIEW or INFO, worst
    first. ``id`` (12 hex digits of the sha256 of probe and reason) names a finding, e.g. in a reviewer's approval."""
    out = []
    for name, p in probes.items():
        for text in p.get("reasons", []):
            sev, _, why = text.partition(": ")
            sev, why = (sev, why) if sev in (FAIL, REVIEW) else (REVIEW, text)
            out.append({"probe": name, "severity": sev, "reason": why})
        out += [{"probe": name, "severity": "INFO", "reason": n} for n in p.get("notes", [])]
    for f in out:
        f["id"] = sha256(f"{f['probe']}\0{f['reason']}")[:12]
    order = {FAIL: 0, REVIEW: 1, "INFO": 2}
    return sorted(out, key=lambda f: order[f["severity"]])


def _dedup(items: list[str]) -> list[str]:
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out
