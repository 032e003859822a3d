"""The maths of the privacy audit, as pure functions of arrays (no model, no files).

Conventions: a membership score is *higher for a member* (e.g. the mean token log-probability); a canary score is
a *log-perplexity*, lower = the model finds the sequence more likely.

- :func:`auc`, :func:`tpr_at_fpr` — scikit-learn's ``roc_auc_score`` / ``roc_curve``. TPR at FPR ``alpha`` is the
  best TPR over thresholds whose FPR is at most ``alpha``; with ``n0`` non-members the smallest non-zero FPR is
  ``1 / n0``, so ``alpha < 1 / n0`` is only resolved as "TPR at FPR 0" (:func:`fpr_resolvable` says which).
- :func:`bootstrap_mia` — percentile confidence intervals of AUC and TPR@FPR by resampling members and non-members
  independently (stratified bootstrap). Vectorised: the AUC of a replicate is ``w1' C w0 / (n1 n0)`` with ``C``
  the pairwise win matrix and ``w`` the resampling counts; TPR@FPR of a replicate uses the exact order statistic
  that ``roc_curve`` would pick (:func:`tpr_at_fpr_fast`, checked against scikit-learn in the tests).
- :func:`min_k`, :func:`min_k_plus_plus` — Min-K% (Shi et al. 2024) and Min-K%++ (Zhang et al. 2024) from token
  statistics.
- :func:`exposure_rank`, :func:`skewnorm_tail` — Carlini et al. 2019 (the Secret Sharer): exposure
  ``log2 |R| - log2 rank`` against sampled reference sequences, and the skew-normal extrapolation of the
  probability that a random reference scores at least as well (its p-value; exposure ``-log2 p``).
- :func:`judged_fpr`, :func:`tpr_test`, :func:`tail_ratio_pvalue` — the gate's TPR rule: a slice is judged at the
  smallest configured FPR its non-members resolve, by an exact one-sided test of TPR against the limit (and
  against chance) rather than a point comparison.
- :func:`copies_vs_chance` — rare-sequence copies against the rate the random patient split explains.
- :func:`bonferroni_significant`, :func:`paired_bootstrap_diff`, :func:`binomial_ci`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# --- membership inference -------------------------------------------------------------------------------------


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC AUC of separating members (label 1) from non-members by score (scikit-learn).

    >>> auc(np.array([3.0, 2.0]), np.array([1.0, 0.0]))
    1.0
    >>> auc(np.array([1.0, 0.0]), np.array([1.0, 0.0]))
    0.5
    """
    from sklearn.metrics import roc_auc_score

    y, s = _labels(member_scores, nonmember_scores)
    return float(roc_auc_score(y, s))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, alpha: float) -> float:
    """The highest true-positive rate among ROC operating points with false-positive rate <= ``alpha``.

    >>> tpr_at_fpr(np.array([5.0, 4.0, 1.0, 0.5]), np.array([3.0, 2.0, 0.0, -1.0]), 0.25)
    0.5
    """
    from sklearn.metrics import roc_curve

    y, s = _labels(member_scores, nonmember_scores)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    ok = fpr <= alpha + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def tpr_at_fpr_fast(member_scores: np.ndarray, nonmember_scores: np.ndarray, alpha: float) -> float:
    """Same value as :func:`tpr_at_fpr` by order statistics: with ``m = floor(alpha n0)`` false positives
    allowed, the threshold sits just above the (m+1)-th highest non-member score."""
    s0 = np.sort(np.asarray(nonmember_scores, dtype=np.float64))[::-1]
    m = math.floor(alpha * len(s0) + 1e-9)
    if m >= len(s0):
        return 1.0
    return float(np.mean(np.asarray(member_scores) > s0[m]))


def fpr_resolvable(n_nonmembers: int, alpha: float, min_false_positives: int = 1) -> bool:
    """Whether ``n_nonmembers`` resolve a false-positive rate of ``alpha``: at least ``min_false_positives``
    non-members are expected above a threshold at that rate (``n * alpha >= k``; k = 1: one false positive)."""
    return n_nonmembers > 0 and n_nonmembers * alpha + 1e-9 >= min_false_positives


def judged_fpr(n_nonmembers: int, fprs: list[float], min_false_positives: int) -> float | None:
    """The smallest FPR of ``fprs`` that ``n_nonmembers`` resolve (:func:`fpr_resolvable`); None when none is.

    >>> judged_fpr(2000, [0.001, 0.01, 0.1], 2), judged_fpr(660, [0.001, 0.01, 0.1], 2)
    (0.001, 0.01)
    >>> judged_fpr(30, [0.001, 0.01], 2) is None
    True
    """
    ok = [a for a in fprs if fpr_resolvable(n_nonmembers, a, min_false_positives)]
    return min(ok) if ok else None


def tail_ratio_pvalue(members_above: int, n_members: int, nonmembers_above: int, n_nonmembers: int,
                      ratio: float) -> float:
    """One-sided p-value of H0 "the members' rate above a threshold is at most ``ratio`` times the non-members'".

    The exact conditional test for two rates (as for two Poisson counts): given the ``s`` subjects above the
    threshold, the members among them are Binomial(s, r n1 / (r n1 + n0)) at the boundary of H0 (scipy's
    ``binomtest``, alternative "greater"). ``ratio`` 1 tests for any membership signal at all; ``max_tpr / fpr``
    tests a TPR limit at that FPR.

    >>> round(tail_ratio_pvalue(3, 100, 3, 100, 1.0), 3)   # as many members as non-members above it: no signal
    0.656
    >>> tail_ratio_pvalue(90, 100, 1, 100, 5.0) < 0.001  # 90% vs 1%: far above a 5x limit
    True
    """
    from scipy.stats import binomtest

    s = int(members_above) + int(nonmembers_above)
    if s == 0 or n_members == 0 or n_nonmembers == 0:
        return 1.0
    p = ratio * n_members / (ratio * n_members + n_nonmembers)
    return float(binomtest(int(members_above), s, min(p, 1.0), alternative="greater").pvalue)


def tpr_test(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float, max_tpr: float
             ) -> dict[str, float | int]:
    """TPR at FPR ``fpr`` tested against the limit ``max_tpr`` and against chance.

    The threshold is the non-members' score with ``m = floor(fpr n0)`` non-members above it (the operating point of
    :func:`tpr_at_fpr_fast`). The non-member count used in the tests is ``m + 1``: the threshold's own non-member is
    counted, because the true FPR of a threshold read off the ``(m+1)``-th highest of ``n0`` scores is on average
    ``(m+1)/(n0+1)``, not ``m/n0`` (conservative). ``p_limit``: H0 TPR <= (max_tpr / fpr) x FPR (a leak above the
    limit, :func:`tail_ratio_pvalue`); ``p_chance``: H0 TPR <= FPR (any membership signal in the tail).
    """
    s1 = np.asarray(member_scores, dtype=np.float64)
    s0 = np.sort(np.asarray(nonmember_scores, dtype=np.float64))[::-1]
    n1, n0 = len(s1), len(s0)
    m = math.floor(fpr * n0 + 1e-9)
    if n1 == 0 or m >= n0:
        return {"fpr": fpr, "max_tpr": max_tpr, "members_above": 0, "nonmembers_above": 0, "tpr": 0.0,
                "fpr_observed": 0.0, "p_limit": 1.0, "p_chance": 1.0}  # nothing to test (JSON has no NaN)
    thr = s0[m]
    x1 = int(np.sum(s1 > thr))
    x0 = int(np.sum(s0 > thr)) + 1
    return {"fpr": fpr, "max_tpr": max_tpr, "members_above": x1, "nonmembers_above": x0 - 1,
            "tpr": round(x1 / n1, 6), "fpr_observed": round((x0 - 1) / n0, 6),
            "p_limit": tail_ratio_pvalue(x1, n1, x0, n0, max_tpr / fpr),
            "p_chance": tail_ratio_pvalue(x1, n1, x0, n0, 1.0)}


def copies_vs_chance(train_holders: int, heldout_holders: int, share_train: float) -> dict[str, float | int]:
    """Are rare sequences the model reproduced held by training subjects more often than the random split explains?

    The patient split is random, so the holders of any sequence fall in train with probability ``share_train``
    (train subjects / subjects of both splits) whatever the sequence. Over the distinct rare sequences a model
    reproduced, a model that learnt the population (H0) gives train holders ~ Binomial(holders, share_train); a
    model that copies its training records gives more. Returns the counts, the number expected by chance and the
    one-sided exact binomial p-value (scipy).

    >>> r = copies_vs_chance(4, 1, 0.8); (r["expected_train_holders"], r["p_value"] > 0.3)
    (4.0, True)
    >>> copies_vs_chance(40, 0, 0.5)["p_value"] < 1e-6
    True
    """
    from scipy.stats import binomtest

    n = int(train_holders) + int(heldout_holders)
    p = float(binomtest(int(train_holders), n, share_train, alternative="greater").pvalue) if n else 1.0
    return {"train_holders": int(train_holders), "heldout_holders": int(heldout_holders),
            "share_train": round(float(share_train), 6), "expected_train_holders": round(n * share_train, 3),
            "p_value": p}


def _labels(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if len(m) == 0 or len(n) == 0:
        raise ValueError("need at least one member and one non-member score")
    return np.r_[np.ones(len(m)), np.zeros(len(n))], np.r_[m, n]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval (``low``/``high`` are NaN when no CI could be computed).

    ``familywise_low`` is the lower bound at a family-wise (Bonferroni-corrected) level, for a decision taken on
    many estimates at once (every attack on every slice): see :func:`privacy.gate.against_limit`.
    """

    value: float
    low: float
    high: float
    familywise_low: float = math.nan

    def to_json(self) -> dict[str, float | None]:
        def clean(x: float) -> float | None:
            return None if x is None or not math.isfinite(x) else round(float(x), 6)

        out = {"value": clean(self.value), "ci_low": clean(self.low), "ci_high": clean(self.high)}
        if math.isfinite(self.familywise_low):
            out["ci_low_familywise"] = clean(self.familywise_low)
        return out


def bootstrap_mia(member_scores: np.ndarray, nonmember_scores: np.ndarray, alphas: tuple[float, ...],
                  n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                  familywise_level: float | None = None) -> dict[str, Estimate]:
    """AUC and TPR at each FPR in ``alphas`` with stratified-bootstrap percentile intervals.

    Returns ``{"auc": Estimate, "tpr@<alpha>": Estimate, ...}``; point estimates come from scikit-learn.
    ``familywise_level`` adds the lower bound at that (higher) one-sided level.
    """
    s1 = np.asarray(member_scores, dtype=np.float64)
    s0 = np.asarray(nonmember_scores, dtype=np.float64)
    n1, n0 = len(s1), len(s0)
    out = {"auc": auc(s1, s0)}
    out.update({f"tpr@{a:g}": tpr_at_fpr(s1, s0, a) for a in alphas})
    if n_boot <= 0:
        return {k: Estimate(v, math.nan, math.nan) for k, v in out.items()}
    rng = np.random.default_rng(seed)
    i1 = rng.integers(0, n1, size=(n_boot, n1))
    i0 = rng.integers(0, n0, size=(n_boot, n0))
    # AUC of each replicate from resampling counts w: sum_i w1_i (w0 below s1_i + half the w0 tied with it), read
    # off the running sum of w0 over the sorted non-member scores -- O(n_boot (n1 + n0)), no n1 x n0 matrix
    order = np.argsort(s0, kind="stable")
    lo = np.searchsorted(s0[order], s1, side="left")
    hi = np.searchsorted(s0[order], s1, side="right")
    w1 = np.zeros((n_boot, n1))
    w0 = np.zeros((n_boot, n0))
    np.add.at(w1, (np.arange(n_boot)[:, None], i1), 1.0)
    np.add.at(w0, (np.arange(n_boot)[:, None], i0), 1.0)
    below = np.concatenate([np.zeros((n_boot, 1)), np.cumsum(w0[:, order], axis=1)], axis=1)  # (B, n0 + 1)
    wins = below[:, lo] + 0.5 * (below[:, hi] - below[:, lo])  # (B, n1)
    boot = {"auc": (w1 * wins).sum(axis=1) / (n1 * n0)}
    b1 = s1[i1]
    b0 = np.sort(s0[i0], axis=1)[:, ::-1]  # each replicate's non-member scores, highest first
    for a in alphas:
        m = math.floor(a * n0 + 1e-9)
        if m >= n0:
            boot[f"tpr@{a:g}"] = np.ones(n_boot)
        else:
            boot[f"tpr@{a:g}"] = (b1 > b0[:, m:m + 1]).mean(axis=1)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    fw = (1 - familywise_level) / 2 * 100 if familywise_level is not None else None
    return {k: Estimate(out[k], *np.percentile(boot[k], q),
                        familywise_low=float(np.percentile(boot[k], fw)) if fw is not None else math.nan)
            for k in out}


def min_k(token_logp: np.ndarray, k: float = 0.2) -> float:
    """Min-K%: the mean of the lowest ``k`` share of token log-probabilities (at least one token).

    >>> min_k(np.array([-1.0, -5.0, -0.1, -3.0, -0.2]), 0.4)
    -4.0
    """
    x = np.sort(np.asarray(token_logp, dtype=np.float64))
    if len(x) == 0:
        return math.nan
    n = max(1, math.ceil(k * len(x) - 1e-9))
    return float(x[:n].mean())


def min_k_plus_plus(token_logp: np.ndarray, mu: np.ndarray, sigma: np.ndarray, k: float = 0.2) -> float:
    """Min-K%++: Min-K% over token scores ``(log p(x_t) - mu_t) / sigma_t``, where ``mu_t`` and ``sigma_t`` are
    the mean and standard deviation of ``log p(v)`` under the model's own next-token distribution at ``t``.

    >>> min_k_plus_plus(np.array([-1.0, -2.0]), np.array([-1.0, -1.0]), np.array([1.0, 0.5]), 0.5)
    -2.0
    """
    z = (np.asarray(token_logp, dtype=np.float64) - mu) / np.maximum(np.asarray(sigma, dtype=np.float64), 1e-6)
    return min_k(z, k)


# --- canaries -------------------------------------------------------------------------------------------------


def exposure_rank(canary_score: float, reference_scores: np.ndarray) -> float:
    """Exposure by rank: ``log2 |R| - log2 rank``, where R is the references plus the canary itself and rank 1 is
    the lowest log-perplexity. A reference tied with the canary ranks ahead of it, so ties never overstate
    exposure.

    >>> exposure_rank(1.5, np.array([1.0, 2.0, 3.0]))   # rank 2 of |R| = 4
    1.0
    >>> exposure_rank(0.5, np.array([1.0, 2.0, 3.0]))   # best of 4: log2 4
    2.0
    """
    ref = np.asarray(reference_scores, dtype=np.float64)
    rank = 1 + int(np.sum(ref <= canary_score))
    return math.log2(len(ref) + 1) - math.log2(rank)


@dataclass(frozen=True)
class SkewNormalFit:
    """A skew-normal fitted to reference log-perplexities (scipy.stats.skewnorm parameters) and its fit quality."""

    a: float
    loc: float
    scale: float
    ks_statistic: float

    def log2_tail(self, score: float) -> float:
        """log2 P(a reference scores <= ``score``) under the fit (the p-value of a canary, in bits)."""
        from scipy.stats import skewnorm

        return float(skewnorm.logcdf(score, self.a, self.loc, self.scale)) / math.log(2)


def skewnorm_fit(reference_scores: np.ndarray) -> SkewNormalFit:
    """Fit a skew-normal to reference log-perplexities (maximum likelihood, scipy) and report its KS statistic."""
    from scipy.stats import kstest, skewnorm

    ref = np.asarray(reference_scores, dtype=np.float64)
    a, loc, scale = skewnorm.fit(ref)
    ks = kstest(ref, skewnorm(a, loc, scale).cdf).statistic
    return SkewNormalFit(float(a), float(loc), float(scale), float(ks))


def skewnorm_tail(canary_score: float, fit: SkewNormalFit) -> tuple[float, float]:
    """(p-value, extrapolated exposure) of a canary: p = P(reference <= canary score), exposure = -log2 p."""
    bits = fit.log2_tail(canary_score)
    return 2.0 ** bits, -bits


def bonferroni_significant(p_values: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Which p-values stay below ``alpha`` after a Bonferroni correction for their number.

    >>> bonferroni_significant(np.array([0.001, 0.02, 0.5]), 0.05).tolist()
    [True, False, False]
    """
    p = np.asarray(p_values, dtype=np.float64)
    return p * max(len(p), 1) < alpha


# --- rates --------------------------------------------------------------------------------------------------


def binomial_ci(k: int, n: int, level: float = 0.95) -> Estimate:
    """A proportion with its exact (Clopper-Pearson) interval, scipy's ``binomtest``."""
    from scipy.stats import binomtest

    if n == 0:
        return Estimate(math.nan, math.nan, math.nan)
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return Estimate(k / n, float(ci.low), float(ci.high))


def paired_bootstrap_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                          seed: int = 0) -> Estimate:
    """mean(a) - mean(b) over matched pairs (a[i], b[i]) with a percentile interval from resampling pairs.

    >>> paired_bootstrap_diff(np.array([1.0, 1.0, 0.0, 1.0]), np.array([0.0, 0.0, 0.0, 1.0]), n_boot=0).value
    0.5
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    if len(a) == 0:
        return Estimate(math.nan, math.nan, math.nan)
    d = a - b
    value = float(d.mean())
    if n_boot <= 0:
        return Estimate(value, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boot = d[idx].mean(axis=1)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = np.percentile(boot, q)
    return Estimate(value, float(lo), float(hi))
