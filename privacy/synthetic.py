"""Synthetic-cohort check: do generated timelines sit closer to training subjects than to unseen ones?

For a cohort the model generates (here: whole timelines sampled at temperature 1 from the static prefix and first
markers of random held-out subjects, i.e. demographics only, up to ``max_tokens`` tokens or the end of the record),
each generated timeline is represented, like every real one, by the event-code tokens of its first ``max_tokens``
tokens:

- **DCR** (distance to closest record): Jaccard distance between the *sets* of codes, to the closest train
  subject and to the closest held-out subject, with the train side subsampled to the held-out size so both have
  the same chance of holding a close neighbour. The share of generated timelines strictly closer to train than to
  held-out (ties count one half) is about 0.5 for a model that learnt the population; near 1 it reproduces its
  training subjects.
- **exact copies**: a generated code sequence identical (same codes, same order) to a train subject's. A copy of a
  sequence that fewer than ``k`` train subjects share and no held-out subject has may be a copy of *a person* --
  or chance: a plausible short timeline that a few people happen to have. **Rare copies against chance**: the
  patient split is random, so the holders of a rare sequence (fewer than ``k`` subjects of train and held-out
  together) are train subjects with probability train / (train + held-out) if the model learnt the population;
  over the distinct rare sequences the model reproduced, significantly more train holders than that is copying.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from foresight.schema import DEATH_CODE
from foresight.tokens import BOS, END, PAD
from privacy import metrics


def code_sequence(tokens: np.ndarray, is_event: np.ndarray, max_tokens: int) -> tuple[int, ...]:
    """The event-code tokens among the first ``max_tokens`` tokens of a timeline."""
    t = np.asarray(tokens[:max_tokens], dtype=np.int64)
    return tuple(int(x) for x in t[is_event[t]])


def jaccard_to_closest(queries: Sequence[tuple[int, ...]], records: Sequence[tuple[int, ...]], vocab_size: int
                       ) -> np.ndarray:
    """For each query, the Jaccard distance between its code set and the closest record's code set.

    >>> jaccard_to_closest([(1, 2), (5,)], [(1, 2, 2), (3,)], 8).tolist()
    [0.0, 1.0]
    """
    from sklearn.metrics import pairwise_distances

    def bags(seqs: Sequence[tuple[int, ...]]) -> np.ndarray:
        m = np.zeros((len(seqs), vocab_size), dtype=bool)
        for i, s in enumerate(seqs):
            m[i, list(s)] = True
        return m

    if not queries or not records:
        return np.full(len(queries), np.nan)
    q, r = bags(queries), bags(records)
    empty_q, empty_r = ~q.any(1), ~r.any(1)
    out = np.empty(len(queries))
    for s in range(0, len(queries), 256):  # chunks bound the distance matrix
        d = pairwise_distances(q[s:s + 256], r, metric="jaccard")
        d[np.ix_(empty_q[s:s + 256], empty_r)] = 0.0  # two empty sets are the same set
        out[s:s + 256] = d.min(axis=1)
    return out


def sequence_counts(seqs: Iterable[tuple[int, ...]]) -> Counter:
    """How many timelines have each code sequence, keyed by the sequence's hash (a stream of any length in,
    one integer per distinct sequence kept)."""
    return Counter(hash(s) for s in seqs)


def dcr_share(d_train: np.ndarray, d_holdout: np.ndarray) -> float:
    """Share of generated timelines strictly closer to train than to held-out (ties count one half).

    >>> dcr_share(np.array([0.0, 0.5, 0.2]), np.array([0.1, 0.5, 0.1]))
    0.5
    """
    return float(np.mean((d_train < d_holdout) + 0.5 * (d_train == d_holdout)))


def sample_timelines(model: Any, vocab: Any, prompts: Sequence[np.ndarray], *, max_tokens: int, seed: int,
                     batch_rows: int = 64) -> list[np.ndarray]:
    """Whole timelines (prompt included) sampled at temperature 1 until ``[END]``/death or ``max_tokens``."""
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    banned = torch.zeros(len(vocab.tokens), dtype=torch.bool)
    banned[[vocab.index[PAD], vocab.index[BOS]]] = True
    stop = {vocab.index[END], vocab.index.get(DEATH_CODE, -1)}
    out: list[np.ndarray] = []
    model.eval()
    with torch.no_grad():
        for b in range(0, len(prompts), batch_rows):
            group = [np.asarray(p, dtype=np.int64) for p in prompts[b:b + batch_rows]]
            width = max(len(p) for p in group)
            ids = torch.full((len(group), width), vocab.index[PAD], dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for r, p in enumerate(group):
                ids[r, width - len(p):] = torch.from_numpy(p)
                mask[r, width - len(p):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            res = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        use_cache=True)
            cache, logits = res.cache, res.logits[:, -1]
            next_pos = pos[:, -1] + 1
            seqs = [list(p) for p in group]
            done = np.array([len(p) >= max_tokens for p in group])
            while not done.all():
                logit = logits.float().cpu().masked_fill(banned, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logit, -1), 1, generator=gen)[:, 0]
                for r in np.flatnonzero(~done):
                    t = int(nxt[r])
                    seqs[r].append(t)
                    if t in stop or len(seqs[r]) >= max_tokens:
                        done[r] = True
                if done.all():
                    break
                mask = torch.cat([mask, torch.ones((len(group), 1), dtype=mask.dtype)], 1)
                res = model(input_ids=nxt[:, None].to(device), attention_mask=mask.to(device),
                            position_ids=next_pos[:, None].to(device), cache=cache, use_cache=True)
                cache, logits = res.cache, res.logits[:, -1]
                next_pos = next_pos + 1
            out += [np.array(s, dtype=np.int64) for s in seqs]
    return out


def check(generated: Sequence[tuple[int, ...]], train: Sequence[tuple[int, ...]], holdout: Sequence[tuple[int, ...]],
          vocab_size: int, *, copy_k: int = 10, seed: int = 0, n_boot: int = 1000, level: float = 0.95,
          train_counts: Counter | None = None, holdout_seen: set[int] | None = None,
          holdout_counts: Counter | None = None) -> dict[str, Any]:
    """DCR share (with a bootstrap interval over generated timelines) and exact copies (see the module docstring).

    ``train`` and ``holdout`` are real code sequences for DCR (the larger side is subsampled to the smaller).
    Exact copies are looked up in ``train_counts`` (sequence hash -> train subjects with it) and ``holdout_seen``
    (hashes), which a caller builds over the whole splits (:func:`sequence_counts`); by default from the samples.
    ``holdout_counts`` (hash -> held-out subjects with it) adds ``rare_copies``: the distinct generated sequences
    that fewer than ``copy_k`` subjects of both splits hold, and whether their holders are train subjects more
    often than the random split explains (:func:`privacy.metrics.copies_vs_chance`).
    """
    rng = np.random.default_rng(seed)
    n = min(len(train), len(holdout))
    pick = lambda seqs: [seqs[i] for i in rng.choice(len(seqs), size=n, replace=False)] if n < len(seqs) else seqs  # noqa: E731
    d_train = jaccard_to_closest(generated, pick(train), vocab_size)
    d_hold = jaccard_to_closest(generated, pick(holdout), vocab_size)
    closer = (d_train < d_hold) + 0.5 * (d_train == d_hold)
    share = dcr_share(d_train, d_hold)
    if n_boot > 0 and len(closer):
        boot = closer[rng.integers(0, len(closer), size=(n_boot, len(closer)))].mean(axis=1)
        lo, hi = np.percentile(boot, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    else:
        lo = hi = float("nan")
    train_counts = train_counts if train_counts is not None else sequence_counts(train)
    if holdout_counts is None and holdout_seen is None:
        holdout_counts = sequence_counts(holdout)
    hold_set = holdout_seen if holdout_seen is not None else set(holdout_counts)
    copies = [hash(g) for g in generated if hash(g) in train_counts]
    unique_copies = [h for h in copies if train_counts[h] < copy_k and h not in hold_set]
    return {
        "generated": len(generated),
        "reference_subjects_per_side": n,
        "dcr_share_closer_to_train": metrics.Estimate(share, float(lo), float(hi)).to_json(),
        "median_distance_train": float(np.nanmedian(d_train)) if len(d_train) else None,
        "median_distance_holdout": float(np.nanmedian(d_hold)) if len(d_hold) else None,
        "exact_copies_of_train": len(copies),
        "exact_copies_of_holdout": sum(1 for g in generated if hash(g) in hold_set),
        "unique_copies_of_train": len(unique_copies),
        "copy_k": copy_k,
        "rare_copies": None if holdout_counts is None else rare_copies(generated, train_counts, holdout_counts, copy_k),
    }


def rare_copies(generated: Sequence[tuple[int, ...]], train_counts: Counter, holdout_counts: Counter, copy_k: int
                ) -> dict[str, Any]:
    """Generated timelines that reproduce a sequence fewer than ``copy_k`` real subjects (train + held-out) hold,
    with the train share of those sequences' holders tested against the split's (see the module docstring)."""
    hashes = [hash(g) for g in generated]
    rare = {h for h in hashes if 0 < train_counts.get(h, 0) + holdout_counts.get(h, 0) < copy_k}
    n_train, n_hold = sum(train_counts.values()), sum(holdout_counts.values())
    test = metrics.copies_vs_chance(sum(train_counts.get(h, 0) for h in rare),
                                    sum(holdout_counts.get(h, 0) for h in rare),
                                    n_train / max(1, n_train + n_hold))
    return {"timelines": sum(1 for h in hashes if h in rare), "sequences": len(rare), **test}
