"""Membership inference per subject: can an attacker with the model tell a training subject from a held-out one?

Members are train-split subjects (canaries excluded), non-members held-out subjects; the patient split is random
(a stable hash), so without memorisation the two score alike. Both sides are subsampled (seeded) to the same size.
Per subject, from the token statistics of its whole timeline (:mod:`privacy.scoring`), four attack scores,
each *higher for a likely member*:

- ``loss``: mean token log-probability (Yeom et al. 2018);
- ``min_k``: Min-K% with k = 20% — the mean of the least likely 20% of tokens (Shi et al. 2024);
- ``min_k_pp``: Min-K%++ — the same over tokens normalised by the model's own expectation (Zhang et al. 2024);
- ``reference``: the target's mean log-probability minus a reference model's, the reference trained on disjoint
  subjects (the tuning split), which removes how *easy* a timeline is for any model (Carlini et al. 2022).

Each is reported as AUC and TPR at FPR 0.1%, 1% and 10% with stratified-bootstrap intervals, overall and on risk
slices: subjects with rare codes (a token of theirs covers few train subjects, or is a RARE catch-all),
sensitive code groups (mental health, substance use, HIV, infectious disease: glob patterns in the gate
config), and subjects aged 85 or more. A slice too small to measure is reported as such. Each slice is also
judged at the smallest FPR of the gate's ladder that its non-members resolve, by exact tests of the TPR there
against the limit and against chance (:func:`evaluate`, :func:`privacy.metrics.tpr_test`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import numpy as np

from foresight.tokens import MINUTE, NO_TIME
from privacy import metrics
from privacy.scoring import TokenStats
from privacy.vocab_floor import is_exempt

ATTACKS = ("loss", "min_k", "min_k_pp", "reference")
YEAR_S = 365.25 * 86400


def attack_scores(stats: TokenStats, ref: TokenStats | None = None, k: float = 0.2) -> dict[str, float]:
    """The attack scores of one subject (``reference`` only when a reference model's statistics are given)."""
    out = {
        "loss": float(stats.logp.mean()) if len(stats.logp) else float("nan"),
        "min_k": metrics.min_k(stats.logp, k),
        "min_k_pp": metrics.min_k_plus_plus(stats.logp, stats.mu, stats.sigma, k),
    }
    if ref is not None:
        out["reference"] = out["loss"] - (float(ref.logp.mean()) if len(ref.logp) else float("nan"))
    return out


def balanced_sample(members: np.ndarray, nonmembers: np.ndarray, max_per_side: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Equal-size, seeded subsamples of two index arrays (the larger side is cut to the smaller, both to the cap)."""
    rng = np.random.default_rng(seed)
    n = min(len(members), len(nonmembers), max_per_side)
    pick = lambda a: np.sort(rng.choice(a, size=n, replace=False)) if len(a) > n else np.sort(a)  # noqa: E731
    return pick(np.asarray(members)), pick(np.asarray(nonmembers))


def token_subject_counts(split: Any, skip_subject_ids: set[int] = frozenset(), chunk_tokens: int = 1 << 24
                         ) -> np.ndarray:
    """Distinct subjects of ``split`` per token id, straight from the shards (``skip_subject_ids`` left out).

    Vectorised over (token, subject) pairs in chunks of whole subjects, so memory stays bounded.
    """
    idx = split.index
    keep = np.flatnonzero(~np.isin(idx["subject_id"], np.array(sorted(skip_subject_ids), dtype=np.int64)))
    counts = np.zeros(len(split.vocab.tokens), dtype=np.int64)
    start = 0
    while start < len(keep):
        # whole subjects up to ~chunk_tokens tokens
        lengths = idx["length"][keep[start:]]
        stop = start + max(1, int(np.searchsorted(np.cumsum(lengths), chunk_tokens)))
        rows = idx[keep[start:stop]]
        toks = np.concatenate([np.asarray(split.tokens[r["offset"]:r["offset"] + r["length"]], dtype=np.int64)
                               for r in rows]) if len(rows) else np.zeros(0, np.int64)
        owner = np.repeat(np.arange(len(rows)), rows["length"])
        pairs = np.unique(toks * (len(rows) + 1) + owner)  # distinct (token, subject) pairs
        counts += np.bincount(pairs // (len(rows) + 1), minlength=len(counts))
        start = stop
    return counts


def slice_membership(split: Any, indices: Sequence[int], token_counts: np.ndarray, cfg: dict[str, Any]
                     ) -> dict[str, np.ndarray]:
    """Boolean masks over ``indices`` for every risk slice: ``rare_codes``, each sensitive group, ``age_85_plus``."""
    vocab = split.vocab
    tokens = vocab.tokens
    rare_limit = int(cfg.get("rare_token_subjects", 20))
    rare_tok = np.array([t.endswith("RARE") and t not in ("BIRTH//RARE", "YEAR//RARE", "AGE//RARE") for t in tokens])
    exempt = np.array([_exempt(t) for t in tokens])
    rare_tok |= (token_counts < rare_limit) & (token_counts > 0) & ~exempt
    groups = {name: np.array([any(fnmatch.fnmatchcase(t, p) for p in pats) for t in tokens])
              for name, pats in (cfg.get("sensitive") or {}).items()}
    age_min = float(cfg.get("age_at_least", 85))
    out = {"rare_codes": np.zeros(len(indices), bool), **{g: np.zeros(len(indices), bool) for g in groups},
           f"age_{age_min:g}_plus": np.zeros(len(indices), bool)}
    toks = split.tokens
    for j, i in enumerate(indices):
        r = split.index[int(i)]
        seq = np.unique(np.asarray(toks[r["offset"]:r["offset"] + r["length"]], dtype=np.int64))
        out["rare_codes"][j] = bool(rare_tok[seq].any())
        for g, mask in groups.items():
            out[g][j] = bool(mask[seq].any())
        out[f"age_{age_min:g}_plus"][j] = subject_age(split, int(i)) >= age_min
    return out


def subject_age(split: Any, i: int) -> float:
    """Age in years at the subject's last recorded token (NaN when birth or time is unknown)."""
    r = split.index[i]
    if r["t0"] == NO_TIME or r["birth"] == NO_TIME or r["length"] == 0:
        return float("nan")
    last = int(r["t0"]) + int(split.clock_min[int(r["offset"] + r["length"] - 1)]) * MINUTE
    return (last - int(r["birth"])) / YEAR_S


def _exempt(token: str) -> bool:
    """Tokens the privacy floor does not apply to (markers, values, specials) — see the vocabulary-floor probe."""
    return is_exempt(token)


def evaluate(member_scores: dict[str, np.ndarray], nonmember_scores: dict[str, np.ndarray],
             member_slices: dict[str, np.ndarray] | None, nonmember_slices: dict[str, np.ndarray] | None,
             *, alphas: tuple[float, ...] = (0.01, 0.001), n_boot: int = 1000, level: float = 0.95, seed: int = 0,
             min_slice: int = 10, tpr_limits: Sequence[dict[str, float]] = (), min_false_positives: int = 1
             ) -> list[dict[str, Any]]:
    """AUC and TPR@FPR (with CIs) of every attack, overall and per slice, and the TPR test the gate judges.

    ``*_scores`` map attack -> per-subject scores; ``*_slices`` map slice -> boolean masks over the same subjects.
    A slice with fewer than ``min_slice`` members or non-members is listed with ``measured: false``.

    ``tpr_limits`` (``[{fpr, max_tpr}, ...]``, the gate's ladder): each slice is judged at the smallest of their
    FPRs that its non-members resolve (``n0 * fpr >= min_false_positives``, :func:`metrics.judged_fpr`; the row's
    ``judged_fpr``, None = unresolvable), where every attack gets ``tpr_test`` (:func:`metrics.tpr_test`: exact
    one-sided p-values against the limit and against chance).

    Every estimate also carries a lower bound at the family-wise level ``1 - (1 - level) / m`` (Bonferroni), m =
    measured slices x attacks x the figures judged per attack (AUC, and the TPR test when there are limits); the
    row's ``familywise_level`` is what the gate compares the TPR tests' p-values with, so that one of many noisy
    small slices cannot fail a model by chance.
    """
    n1 = len(next(iter(member_scores.values())))
    n0 = len(next(iter(nonmember_scores.values())))
    slices = [("all", np.ones(n1, bool), np.ones(n0, bool))]
    for name in (member_slices or {}):
        slices.append((name, member_slices[name], nonmember_slices[name]))
    measured = sum(1 for _, m1, m0 in slices if m1.sum() >= min_slice and m0.sum() >= min_slice)
    limits = {float(x["fpr"]): float(x["max_tpr"]) for x in tpr_limits}
    alphas = tuple(sorted(set(alphas) | set(limits)))
    tests = max(1, measured * len(member_scores) * (2 if limits else 1))
    familywise = 1 - (1 - level) / tests
    out = []
    for name, m1, m0 in slices:
        row: dict[str, Any] = {"slice": name, "members": int(m1.sum()), "nonmembers": int(m0.sum())}
        if m1.sum() < min_slice or m0.sum() < min_slice:
            row["measured"] = False
            row["why"] = f"fewer than {min_slice} members or non-members in the slice"
            out.append(row)
            continue
        row["measured"] = True
        row["familywise_level"] = round(familywise, 6)
        n0 = int(m0.sum())
        row["fpr_resolvable"] = {f"{a:g}": metrics.fpr_resolvable(n0, a, min_false_positives) for a in alphas}
        judged = metrics.judged_fpr(n0, sorted(limits), min_false_positives) if limits else None
        row["judged_fpr"] = judged
        row["attacks"] = {}
        for attack in member_scores:
            s1, s0 = member_scores[attack][m1], nonmember_scores[attack][m0]
            ok1, ok0 = np.isfinite(s1), np.isfinite(s0)
            est = metrics.bootstrap_mia(s1[ok1], s0[ok0], alphas, n_boot=n_boot, level=level, seed=seed,
                                        familywise_level=familywise)
            row["attacks"][attack] = {k: v.to_json() for k, v in est.items()}
            if judged is not None:
                row["attacks"][attack]["tpr_test"] = metrics.tpr_test(s1[ok1], s0[ok0], judged, limits[judged])
        out.append(row)
    return out


def roc_points(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve (scikit-learn), for the report's plot."""
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    fpr, tpr, _ = roc_curve(y, np.r_[member_scores, nonmember_scores])
    return fpr, tpr
