"""Strict next-event accuracy, with the frequency and first-order Markov baselines on the same positions.

At every position of a split whose true next token is an event code: is that code among the model's top-k over
the WHOLE vocabulary (time, value and marker tokens compete too)? Reported overall, for new vs recurrent codes
(first occurrence in the subject's timeline or not) and by kind. Baselines: the k most frequent train codes,
and a Markov chain on codes (next code given the previous code, fitted on train).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foresight.dataset import IGNORE_INDEX, PackedSplit
from foresight.forecast import Forecaster
from foresight.schema import code_kind


@dataclass
class NextEventReport:
    positions: int
    topk: dict[str, float]  # "top1", "top5", "top10"
    new: dict[str, float]
    recurrent: dict[str, float]
    by_kind: dict[str, dict[str, float]]
    baselines: dict[str, dict[str, float]]

    def to_json(self) -> dict[str, Any]:
        return self.__dict__


@torch.no_grad()
def next_event_accuracy(forecaster: Forecaster, data_dir: str | Path, split: str = "held_out",
                        ks: Sequence[int] = (1, 5, 10), seq_len: int | None = None, batch_size: int = 8,
                        max_rows: int | None = None) -> NextEventReport:
    """Strict top-k next-event accuracy on ``split``, with the frequency and Markov baselines."""
    vocab = forecaster.vocab
    model = forecaster.model
    ps = PackedSplit(data_dir, split, vocab, history=forecaster.history)
    train = PackedSplit(data_dir, "train", vocab)
    is_event = vocab.is_event
    seq_len = seq_len or int(forecaster.meta.get("training", {}).get("seq_len", 0) or 256)
    seq_len = min(seq_len, int(getattr(model.config, "max_position_embeddings", seq_len)))
    freq, markov = _fit_baselines(train, is_event, max(ks))

    plan = ps.plan(seq_len, seed=0, epoch=0)
    n_rows = plan.n_rows if max_rows is None else min(plan.n_rows, max_rows)
    hits = {k: [] for k in ks}
    base_hits: dict[str, dict[int, list[bool]]] = {"frequency": {k: [] for k in ks}, "markov": {k: [] for k in ks}}
    new_flags, kinds = [], []
    first_seen = _first_occurrences(ps)
    for r0 in range(0, n_rows, batch_size):
        rows = [ps.row(plan, r) for r in range(r0, min(r0 + batch_size, n_rows))]
        ids = torch.tensor(np.stack([x["input_ids"] for x in rows]))
        pos = torch.tensor(np.stack([x["position_ids"] for x in rows]))
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        for b, x in enumerate(rows):
            labels = x["labels"]
            ok = (labels != IGNORE_INDEX) & is_event[np.maximum(labels, 0)]
            where = np.flatnonzero(ok)
            if not len(where):
                continue
            target = labels[where]
            lg = logits[b, where]
            rank = (lg > lg[torch.arange(len(where)), torch.tensor(target)][:, None]).sum(-1).numpy()
            for k in ks:
                hits[k].extend((rank < k).tolist())
            prev = _previous_event(x["input_ids"], where, is_event)
            for k in ks:
                base_hits["frequency"][k].extend(np.isin(target, freq[:k]).tolist())
                base_hits["markov"][k].extend([int(t) in markov.get(int(pv), freq)[:k] for t, pv in zip(target, prev,
                                                                                                  strict=True)])
            subj, absolute = _absolute_positions(plan, ps, r0 + b, x)
            # the label at input position w is the token at w + 1: new if that is its first occurrence
            new_flags.extend([first_seen.get((int(subj[w + 1]), int(t)), -1) == absolute[w + 1]
                              for w, t in zip(where, target, strict=True)])
            kinds.extend(code_kind(vocab.tokens[int(t)]) for t in target)
    new = np.array(new_flags, dtype=bool)
    kinds_a = np.array(kinds)

    def acc(mask: np.ndarray | None = None, source: dict[int, list[bool]] | None = None) -> dict[str, float]:
        src = source or hits
        out = {}
        for k in ks:
            h = np.array(src[k], dtype=bool)
            out[f"top{k}"] = float(h[mask].mean()) if (mask is None or mask.any()) and len(h) else math.nan
        return out

    return NextEventReport(
        positions=len(new),
        topk=acc(),
        new=acc(new),
        recurrent=acc(~new),
        by_kind={k: {**acc(kinds_a == k), "n": int((kinds_a == k).sum())} for k in sorted(set(kinds))},
        baselines={name: acc(source=src) for name, src in base_hits.items()},
    )


def _fit_baselines(train: PackedSplit, is_event: np.ndarray, k: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Most frequent train event codes, and for each code the k most frequent next codes (Markov)."""
    toks = np.asarray(train.tokens, dtype=np.int64)
    ev = is_event[toks]
    counts = np.bincount(toks[ev], minlength=len(is_event))
    freq = np.argsort(-counts, kind="stable")[:k]
    # consecutive event codes within a subject
    subj = np.repeat(np.arange(len(train.index)), train.index["length"])
    e_pos = np.flatnonzero(ev)
    a, b = e_pos[:-1], e_pos[1:]
    same = subj[a] == subj[b]
    pairs = Counter(zip(toks[a][same].tolist(), toks[b][same].tolist(), strict=True))
    nxt: dict[int, Counter] = {}
    for (x, y), c in pairs.items():
        nxt.setdefault(x, Counter())[y] = c
    markov = {x: np.array([y for y, _ in c.most_common(k)]) for x, c in nxt.items()}
    return freq, markov


def _previous_event(ids: np.ndarray, where: np.ndarray, is_event: np.ndarray) -> np.ndarray:
    """For each label position w (predicting token w+1), the last event token at or before w (or -1)."""
    ev = is_event[ids]
    last = np.where(ev, np.arange(len(ids)), -1)
    last = np.maximum.accumulate(last)
    prev = np.where(last[where] >= 0, ids[np.maximum(last[where], 0)], -1)
    return prev


def _first_occurrences(ps: PackedSplit) -> dict[tuple[int, int], int]:
    """(subject index, token) -> absolute position of its first occurrence in the subject's timeline."""
    out: dict[tuple[int, int], int] = {}
    for i in range(len(ps)):
        toks = ps.subject_tokens(i)
        uniq, first = np.unique(toks, return_index=True)
        off = int(ps.index[i]["offset"])
        for t, f in zip(uniq.tolist(), first.tolist(), strict=True):
            out[(i, t)] = off + f
    return out


def _absolute_positions(plan: Any, ps: PackedSplit, r: int, row: dict[str, np.ndarray]) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """For each input position of row r: (subject index, absolute token position) of the token it holds."""
    lo, hi = np.searchsorted(plan.row, [r, r + 1])
    subj = np.full(len(row["input_ids"]) + 1, -1, dtype=np.int64)
    absolute = np.full(len(row["input_ids"]) + 1, -1, dtype=np.int64)
    n = 0
    for p in range(lo, hi):
        i, s, ln = int(plan.subject[p]), int(plan.start[p]), int(plan.length[p])
        pre = len(ps.continuation_prefix(i, s)) if plan.continuation[p] else s - int(ps.index[i]["offset"])
        width = pre + ln
        seg = slice(n, min(n + width, len(subj)))
        subj[seg] = i
        body = np.arange(s - pre, s + ln) if not plan.continuation[p] else \
            np.concatenate([np.full(pre, -1), np.arange(s, s + ln)])
        absolute[seg] = body[: seg.stop - seg.start]
        n += width
    return subj, absolute

