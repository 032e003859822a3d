"""The gate decision: PASS / REVIEW / FAIL per probe, each with its reasons; overall = the worst.

Thresholds live in ``gate_defaults.toml`` (:func:`load_config` merges a user file over it). The rule for a figure
with an interval and a limit (:func:`against_limit`): FAIL when the whole interval is above the limit (the leak
is demonstrated), REVIEW when only the point estimate is (it may be sampling noise), PASS otherwise. Probes that
were not run are SKIPPED and do not count. An audit whose canaries show it could not see memorisation is
*invalid*: it can be REVIEW at best, never PASS.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

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


def decide_mia(rows: list[dict[str, Any]], cfg: dict[str, Any], what: str = "membership inference"
               ) -> dict[str, Any]:
    """Every attack on every measured slice against ``max_auc`` and the TPR limits; one reason line per slice
    and limit, naming the attacks above it.

    A TPR limit at an FPR the slice cannot resolve (fewer than 1/FPR non-members) is never FAIL: the TPR measured
    at the smallest reachable FPR (1/n) is an optimistic stand-in for the attacker, and its bootstrap interval is
    unreliable at an extreme order statistic, so it demonstrates nothing; it gets ``unresolvable`` (REVIEW).
    """
    decisions, reasons, notes = [], [], []
    unresolved: dict[float, list[str]] = {}
    for row in rows:
        if not row.get("measured"):
            notes.append(f"slice {row['slice']} not measured ({row['members']} members, {row['nonmembers']} "
                         f"non-members)")
            continue
        where = f"{row['slice']} ({row['members']} members vs {row['nonmembers']} non-members)"
        checks = [("AUC", "auc", cfg["max_auc"], 1.0, "", None)]
        checks += [(f"TPR at FPR {lim['fpr']:.1%}", f"tpr@{lim['fpr']:g}", lim["max_tpr"], 100.0, "%", lim["fpr"])
                   for lim in cfg.get("tpr_limits", [])]
        for label, key, limit, scale, unit, fpr in checks:
            found = {a: (against_limit(f[key], limit), f[key]) for a, f in row["attacks"].items() if key in f}
            if not found:
                continue
            if fpr is not None and not row.get("fpr_resolvable", {}).get(f"{fpr:g}", True):
                unresolved.setdefault(fpr, []).append(f"{row['slice']}: {row['nonmembers']}")
                decisions.append(cfg.get("unresolvable", REVIEW))
                continue
            d = worst([x for x, _ in found.values()])
            decisions.append(d)
            if d != PASS:
                above = ", ".join(f"{a} {_fmt(e, scale, unit)}" for a, (x, e) in found.items() if x != PASS)
                reasons.append(f"{d}: {label} above {limit * scale:g}{unit} on {where}: {above}")
    for fpr, where in unresolved.items():
        d = cfg.get("unresolvable", REVIEW)
        line = (f"TPR at FPR {fpr:.1%} cannot be resolved with fewer than {round(1 / fpr)} non-members (non-members "
                f"per slice: {', '.join(where)})")
        (reasons if d != PASS else notes).append(f"{d}: {line}" if d != PASS else line)
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


def decide_extraction(res: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """The largest member - non-member exact-extraction gap over k and decoding, and k-eidetic extractions."""
    decisions, reasons, notes = [], [], []
    for row in res["by_k"]:
        if "greedy" not in row:
            notes.append(f"k={row['k']}: {row.get('why', 'not measured')}")
            continue
        for mode in ("greedy", "sampled"):
            r = row[mode]
            gap = r["exact_gap_points"]
            d = against_limit(gap, cfg["max_exact_gap_points"])
            decisions.append(d)
            line = (f"k={row['k']} {mode}: exact extraction members {_fmt(r['member']['exact'], 100, '%')} vs "
                    f"non-members {_fmt(r['nonmember']['exact'], 100, '%')}, gap {_fmt(gap, 1, ' points')} "
                    f"({row['pairs']} pairs)")
            if d != PASS:
                reasons.append(f"{d}: {line} > {cfg['max_exact_gap_points']} points")
            else:
                notes.append(line)
            if r["member"]["eidetic"]:
                d = cfg["eidetic"]
                decisions.append(d)
                if d != PASS:
                    reasons.append(f"{d}: k={row['k']} {mode}: {r['member']['eidetic']} member extraction(s) held by "
                                   f"fewer than {res['eidetic_k']} training subjects (k-eidetic)")
    if not decisions:
        return {"decision": cfg["no_pairs"], "reasons": [
            f"{cfg['no_pairs']}: no k had matched member / non-member pairs: extraction unmeasured"], "notes": notes}
    return {"decision": worst(decisions), "reasons": _dedup(reasons), "notes": notes}


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


def decide_synthetic(res: dict[str, Any] | None, cfg: dict[str, Any]) -> dict[str, Any]:
    """DCR share against its limit; copies of single training timelines per config."""
    if res is None:
        return {"decision": SKIPPED, "reasons": [], "notes": ["no synthetic cohort generated"]}
    share = res["dcr_share_closer_to_train"]
    d = against_limit(share, cfg["max_dcr_share"])
    decisions = [d]
    reasons, notes = [], []
    line = f"{_fmt(share, 100, '%')} of generated timelines are closer to a train subject than to a held-out one"
    (reasons if d != PASS else notes).append(f"{d}: {line} (limit {cfg['max_dcr_share']:.0%})" if d != PASS else line)
    if res["unique_copies_of_train"]:
        d = cfg["unique_copies"]
        decisions.append(d)
        reasons.append(f"{d}: {res['unique_copies_of_train']} generated timeline(s) copy a sequence fewer than "
                       f"{res['copy_k']} train subjects have (and no held-out subject)")
    notes.append(f"exact copies: {res['exact_copies_of_train']} of train, {res['exact_copies_of_holdout']} of "
                 "held-out timelines")
    return {"decision": worst(decisions), "reasons": reasons, "notes": notes}


def decide(results: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Per-probe decisions and the overall one. ``results`` holds each probe's figures (None = not run)."""
    probes = {
        "membership_inference": decide_mia(results["membership_inference"], {**cfg["mia"]}),
        "canaries": decide_canaries(results.get("canaries"), cfg["canaries"]),
        "extraction": decide_extraction(results["extraction"], cfg["extraction"]),
        "vocabulary_floor": decide_vocab(results["vocabulary_floor"], cfg["vocab_floor"]),
        "synthetic_cohort": decide_synthetic(results.get("synthetic_cohort"), cfg["synthetic"]),
    }
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
    return {"decision": overall, "valid": valid, "probes": probes, "reasons": reasons}


def _dedup(items: list[str]) -> list[str]:
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out
