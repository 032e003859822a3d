"""The embedding probe: can a sensitive attribute be read from the model's patient embedding better for the people
it was trained on than for people it never saw? (the memorisation probe of Tonekaboni et al. 2025)

A model that generalises learns how conditions go together, so a linear probe reads "this person has a mental-health
diagnosis" from the embedding of their *other* events about as well for a held-out subject as for a train subject.
A model that memorised its training subjects holds more about each of them: the probe reads the attribute better
for members. The probe measures that difference, per sensitive attribute (the gate's ``slices.sensitive`` groups):

1. **Who has it.** A subject has the attribute when any token of their record matches one of the group's patterns
   (:func:`attribute_tokens`, the same rule as the membership-inference slices; :func:`subjects_with`).
2. **Who is probed.** Members are train subjects (canaries excluded), non-members held-out subjects: the audit
   passes membership inference's seeded sample (at most ``[audit] max_subjects_per_side`` each). Each side gets
   the same number of subjects with the attribute (``n_pos``: the smaller side's count, at most ``max_positives``)
   and the same number without it (``negatives_per_positive * n_pos`` at most), a seeded subsample
   (:func:`balanced_design`), so the two AUROCs are measured at the same sizes and class balance. Fewer than
   ``min_positives`` on either side, or fewer negatives than positives: "not measured", with the counts.
3. **What is embedded.** Each subject's whole timeline *with the attribute's tokens removed* (and the value tokens
   that follow a removed code, :func:`strip_tokens`), then cut to the model's context the way training cut it
   (:meth:`foresight.forecast.Forecaster.fit_context`), pooled by :func:`foresight.forecast.embed.embed_tokens`
   (``pooling``: ``mean`` by default, a summary of the whole window). The probe reads what the model absorbed
   about the person, never the code itself.
4. **The probe.** Per side, the subjects are cut into two stratified halves; a logistic regression on standardised
   embeddings (scikit-learn ``LogisticRegressionCV``: its regularisation chosen by ``cv_folds``-fold CV on the
   fitting half) is fitted on one half and scores the other, then the halves swap (cross-fitting), so every
   subject gets a score from a probe that never saw them (:func:`out_of_fold_scores`); this is repeated over
   ``repeats`` random cuts and each subject's scores averaged, which takes most of the probes' own fitting noise
   out of the figure. AUROC of those scores, on members and on non-members (:func:`compare`).
5. **The figure.** ``gap = AUROC(members) - AUROC(non-members)`` with a stratified-bootstrap 95% interval
   (positives and negatives resampled independently on each side, the fitted probes held fixed) and its lower
   bound at the family-wise level ``1 - (1 - level) / m``, ``m`` = measured attributes (Bonferroni, as the gate
   does for membership-inference slices). The gate's finding (:func:`privacy.gate.decide_embedding_probe`):
   REVIEW when that family-wise lower bound is above ``margin`` (the attribute is demonstrably easier to read
   for members by more than the margin), else informational.

The interval is conditional on the fitted probes (their fitting noise is not resampled), so it is somewhat too
narrow. On synthetic embeddings with no member-only signal (100 with / 200 without per side, 64 dimensions, 60
seeds) the gap's standard deviation across seeds was 0.075 with one cut, 0.066 with three (the default) and 0.065
with five, against a mean bootstrap standard error of 0.049; the margin (0.05 AUROC) absorbs the rest: a REVIEW
then needs a gap about 2.5 true standard deviations above 0. ``bench/embedding_probe.py --null N`` counts the
rule's false REVIEWs on such data.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from foresight.forecast.embed import check_pooling, embed_tokens
from foresight.tokens import PAD


def attribute_tokens(tokens: Sequence[str], patterns: Sequence[str]) -> np.ndarray:
    """(V,) bool: the vocabulary tokens matching any of the glob ``patterns`` (fnmatch, case-sensitive)."""
    return np.array([any(fnmatch.fnmatchcase(t, p) for p in patterns) for t in tokens], dtype=bool)


def subjects_with(split: Any, idx: np.ndarray, masks: np.ndarray, chunk_tokens: int = 1 << 22) -> np.ndarray:
    """(len(idx), G) bool: whether subject ``idx[j]`` of ``split`` holds a token of group ``g`` (``masks``: (G, V)
    bool). One pass over the subjects' tokens, in chunks of whole subjects so memory stays bounded."""
    masks = np.atleast_2d(np.asarray(masks, dtype=bool))
    out = np.zeros((len(idx), len(masks)), dtype=bool)
    rows = split.index[np.asarray(idx, dtype=np.int64)]
    start = 0
    while start < len(rows):
        cum = np.cumsum(rows["length"][start:])
        stop = start + max(1, int(np.searchsorted(cum, chunk_tokens)))
        part = rows[start:stop]
        toks = np.concatenate([np.asarray(split.tokens[r["offset"]:r["offset"] + r["length"]], dtype=np.int64)
                               for r in part]) if len(part) else np.zeros(0, np.int64)
        owner = np.repeat(np.arange(len(part)), part["length"])
        for g, mask in enumerate(masks):
            hit = owner[mask[toks]]
            out[start + np.unique(hit), g] = True
        start = stop
    return out


def strip_tokens(tokens: np.ndarray, drop: np.ndarray, is_value: np.ndarray) -> np.ndarray:
    """``tokens`` without the ones ``drop`` (a (V,) bool mask) marks, nor the value tokens (``Q1``..``Q10``) that
    follow a removed code: what is left is the rest of the record, in order."""
    tokens = np.asarray(tokens, dtype=np.int64)
    gone = drop[tokens].copy()
    val = is_value[tokens]
    while True:  # a value belongs to the code before it: drop it with that code (chains, if any, too)
        follow = np.zeros_like(gone)
        follow[1:] = gone[:-1] & val[1:] & ~gone[1:]
        if not follow.any():
            return tokens[~gone]
        gone |= follow


def probe_prompts(fc: Any, split: Any, idx: np.ndarray, drop: np.ndarray) -> list[np.ndarray]:
    """Each subject's timeline with the attribute's tokens removed, cut to the model's context as training did."""
    is_value = np.asarray(fc.vocab.is_value, dtype=bool)
    return [fc.fit_context(strip_tokens(split.subject_tokens(int(i)), drop, is_value)) for i in idx]


def balanced_design(pos_m: np.ndarray, neg_m: np.ndarray, pos_n: np.ndarray, neg_n: np.ndarray, *,
                    min_positives: int, max_positives: int, negatives_per_positive: float, seed: int
                    ) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """Seeded subsamples with equal sizes and class balance on both sides: ``({"pos_m", "neg_m", "pos_n",
    "neg_n"}, None)``, or ``(None, why)`` when there are too few subjects."""
    n_pos = min(len(pos_m), len(pos_n), max_positives)
    if n_pos < min_positives:
        return None, (f"fewer than {min_positives} subjects with the attribute on a side ({len(pos_m)} members, "
                      f"{len(pos_n)} non-members)")
    n_neg = min(len(neg_m), len(neg_n), max(n_pos, round(negatives_per_positive * n_pos)))
    if n_neg < n_pos:
        return None, (f"fewer subjects without the attribute than with it ({len(neg_m)} members, {len(neg_n)} "
                      "non-members)")
    rng = np.random.default_rng(seed)

    def pick(a: np.ndarray, n: int) -> np.ndarray:
        return np.sort(rng.choice(a, size=n, replace=False))

    return {"pos_m": pick(pos_m, n_pos), "neg_m": pick(neg_m, n_neg), "pos_n": pick(pos_n, n_pos),
            "neg_n": pick(neg_n, n_neg)}, None


def out_of_fold_scores(x: np.ndarray, y: np.ndarray, *, cv_folds: int = 3, repeats: int = 1, seed: int = 0
                       ) -> np.ndarray:
    """Probe scores for every row of ``x`` from logistic regressions that never saw that row: two stratified
    halves, each scored by the probe fitted on the other (its regularisation chosen by CV on its fitting half);
    with ``repeats`` > 1, the mean score over that many random cuts into halves (less noise from the fits)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y, dtype=int)
    out = np.zeros(len(y), dtype=np.float64)
    for r in range(repeats):
        for fit, score in StratifiedKFold(n_splits=2, shuffle=True, random_state=seed + r).split(x, y):
            inner = max(2, min(cv_folds, int(np.bincount(y[fit], minlength=2).min())))
            probe = make_pipeline(StandardScaler(), LogisticRegressionCV(
                Cs=np.logspace(-4, 2, 7), cv=StratifiedKFold(inner, shuffle=True, random_state=seed + r),
                scoring="roc_auc", max_iter=2000, l1_ratios=(0.0,), use_legacy_attributes=False))  # L2 (sklearn 1.9)
            probe.fit(x[fit], y[fit])
            out[score] += probe.decision_function(x[score]) / repeats
    return out


def auc_replicates(pos: np.ndarray, neg: np.ndarray, n_boot: int, rng: np.random.Generator
                   ) -> tuple[float, np.ndarray]:
    """AUROC of ``pos`` over ``neg`` scores and ``n_boot`` stratified-bootstrap replicates of it (positives and
    negatives resampled independently; ties count a half). Vectorised with resampling counts, no n x n matrix."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    order = np.sort(neg)
    lo = np.searchsorted(order, pos, side="left")
    hi = np.searchsorted(order, pos, side="right")
    value = float((lo + 0.5 * (hi - lo)).sum() / (len(pos) * len(neg)))
    if n_boot <= 0:
        return value, np.zeros(0)
    w1 = np.stack([np.bincount(rng.integers(0, len(pos), len(pos)), minlength=len(pos)) for _ in range(n_boot)])
    w0 = np.stack([np.bincount(rng.integers(0, len(neg), len(neg)), minlength=len(neg)) for _ in range(n_boot)])
    below = np.concatenate([np.zeros((n_boot, 1)), np.cumsum(w0[:, np.argsort(neg, kind="stable")], axis=1)], axis=1)
    wins = below[:, lo] + 0.5 * (below[:, hi] - below[:, lo])
    return value, (w1 * wins).sum(axis=1) / (len(pos) * len(neg))


def compare(scores_m: np.ndarray, y_m: np.ndarray, scores_n: np.ndarray, y_n: np.ndarray, *, n_boot: int,
            level: float, familywise_level: float, seed: int) -> dict[str, Any]:
    """AUROC on members, on non-members and their gap, each ``{value, ci_low, ci_high}`` (the gap also with
    ``ci_low_familywise``): stratified bootstrap, sides resampled independently."""
    rng = np.random.default_rng(seed)
    y_m, y_n = np.asarray(y_m, bool), np.asarray(y_n, bool)
    a_m, b_m = auc_replicates(scores_m[y_m], scores_m[~y_m], n_boot, rng)
    a_n, b_n = auc_replicates(scores_n[y_n], scores_n[~y_n], n_boot, rng)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def est(value: float, boot: np.ndarray, fw: bool = False) -> dict[str, float | None]:
        out: dict[str, float | None] = {"value": round(value, 6), "ci_low": None, "ci_high": None}
        if len(boot):
            lo, hi = np.percentile(boot, q)
            out.update(ci_low=round(float(lo), 6), ci_high=round(float(hi), 6))
            if fw:
                out["ci_low_familywise"] = round(float(np.percentile(boot, (1 - familywise_level) / 2 * 100)), 6)
        return out

    return {"auroc_members": est(a_m, b_m), "auroc_nonmembers": est(a_n, b_n),
            "gap": est(a_m - a_n, b_m - b_n if len(b_m) else b_m, fw=True)}


def run(fc: Any, train: Any, held: Any, members: np.ndarray, nonmembers: np.ndarray, cfg: Mapping[str, Any],
        sensitive: Mapping[str, Sequence[str]], *, seed: int = 0, n_boot: int = 2000, level: float = 0.95,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The probe on every sensitive attribute: ``{"pooling", "margin", "familywise_level", "attributes": [row]}``.

    ``members`` / ``nonmembers``: the candidate subjects (indices into ``train`` / ``held``). Each row: the
    attribute, ``measured`` (with ``why`` when not), the subjects per side and class, ``auroc_members``,
    ``auroc_nonmembers`` and ``gap`` (see :func:`compare`). ``cfg``: the gate's ``[embedding_probe]`` section.
    """
    check_pooling(cfg["pooling"])
    say = progress or (lambda _m: None)
    members, nonmembers = np.asarray(members, dtype=np.int64), np.asarray(nonmembers, dtype=np.int64)
    names = list(sensitive)
    masks = np.stack([attribute_tokens(fc.vocab.tokens, sensitive[g]) for g in names]) if names else \
        np.zeros((0, len(fc.vocab.tokens)), bool)
    has_m = subjects_with(train, members, masks) if names else np.zeros((len(members), 0), bool)
    has_n = subjects_with(held, nonmembers, masks) if names else np.zeros((len(nonmembers), 0), bool)
    rows, designs = [], {}
    for g, name in enumerate(names):
        design, why = balanced_design(
            members[has_m[:, g]], members[~has_m[:, g]], nonmembers[has_n[:, g]], nonmembers[~has_n[:, g]],
            min_positives=int(cfg["min_positives"]), max_positives=int(cfg["max_positives"]),
            negatives_per_positive=float(cfg["negatives_per_positive"]), seed=seed + g)
        row: dict[str, Any] = {"attribute": name, "tokens": int(masks[g].sum()),
                               "with_attribute": {"members": int(has_m[:, g].sum()),
                                                  "nonmembers": int(has_n[:, g].sum())}}
        if design is None:
            row.update(measured=False, why=why if masks[g].any() else "no token of the vocabulary is in this group")
        else:
            designs[name] = design
            row.update(measured=True, positives=len(design["pos_m"]), negatives=len(design["neg_m"]))
        rows.append(row)
    m = max(1, len(designs))
    familywise = 1 - (1 - level) / m
    for g, row in enumerate(rows):
        if not row["measured"]:
            continue
        d = designs[row["attribute"]]
        say(f"embedding probe: {row['attribute']} ({row['positives']} with, {row['negatives']} without, per side)")
        scores, labels = [], []
        for split, pos, neg in ((train, d["pos_m"], d["neg_m"]), (held, d["pos_n"], d["neg_n"])):
            idx = np.r_[pos, neg]
            y = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
            x = embed_tokens(fc.model, probe_prompts(fc, split, idx, masks[g]), cfg["pooling"],
                             pad_id=fc.vocab.index[PAD])
            scores.append(out_of_fold_scores(x, y, cv_folds=int(cfg["cv_folds"]), repeats=int(cfg["repeats"]),
                                             seed=seed))
            labels.append(y)
        row.update(compare(scores[0], labels[0], scores[1], labels[1], n_boot=n_boot, level=level,
                           familywise_level=familywise, seed=seed + g))
        row["familywise_level"] = round(familywise, 6)
    return {"pooling": cfg["pooling"], "margin": float(cfg["margin"]), "familywise_level": round(familywise, 6),
            "attributes": rows}


def gap_is_significant(row: Mapping[str, Any], margin: float) -> bool:
    """Whether an attribute's member - non-member AUROC gap is demonstrably above ``margin`` (its family-wise
    lower bound is)."""
    low = (row.get("gap") or {}).get("ci_low_familywise")
    return low is not None and math.isfinite(low) and low > margin
