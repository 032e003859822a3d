"""Per-token statistics of a model over token sequences: the one place the audit runs the model forward.

For every scored position the model's next-token distribution ``p`` gives three numbers:

- ``logp``: log p(actual next token), the membership signal of the loss, Min-K% and reference attacks;
- ``mu`` = E_v[log p(v)] and ``sigma`` = sd_v[log p(v)] under ``p`` itself: Min-K%++'s normalisation (Zhang et
  al. 2024), which asks how surprising the actual token is *relative to what the model expected there*.

A subject is scored exactly as training saw it (:mod:`foresight.dataset`): a timeline longer than the model's
context is cut into pieces of at most ``context + 1`` tokens; a continuation piece starts with the subject's
head and the YEAR/AGE markers that hold at the cut (``PackedSplit.continuation_prefix``) and only its body is
scored, and a cut never separates a value token from its code. Every token of the timeline after the first is
scored exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from foresight.tokens import PAD, QUANTILE_PREFIX


@dataclass
class TokenStats:
    """Statistics of the scored positions of one sequence (parallel arrays)."""

    logp: np.ndarray  # log p(actual token)
    mu: np.ndarray  # E[log p(v)] under the model's distribution at that position
    sigma: np.ndarray  # sd[log p(v)]

    @staticmethod
    def concat(parts: Sequence[TokenStats]) -> TokenStats:
        if not parts:
            return TokenStats(np.zeros(0), np.zeros(0), np.zeros(0))
        return TokenStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("logp", "mu", "sigma")))


@dataclass(frozen=True)
class Piece:
    """Tokens run through the model in one row; labels from position ``first_scored`` on are scored."""

    tokens: np.ndarray
    first_scored: int
    owner: int  # which sequence (subject) this piece belongs to


def context_length(meta: dict[str, Any], model: Any) -> int:
    """Tokens per row the model was trained on (``foresight.json`` training.seq_len), else its position limit."""
    seq_len = (meta.get("training") or {}).get("seq_len")
    return int(seq_len) if seq_len else int(min(getattr(model.config, "max_position_embeddings", 512), 512))


def subject_pieces(split: Any, i: int, context: int, owner: int | None = None) -> list[Piece]:
    """Pieces of subject ``i`` of a :class:`foresight.dataset.PackedSplit`, cut like training rows."""
    r = split.index[i]
    off, length = int(r["offset"]), int(r["length"])
    toks = np.asarray(split.tokens[off:off + length], dtype=np.int64)
    width = context + 1
    owner = i if owner is None else owner
    q_ids = set(int(t) for t in split._q_ids)
    pieces = [Piece(toks[:width], 1, owner)]
    pos = min(width, length)
    if pos < length and pos > 1 and int(toks[pos]) in q_ids:  # keep a value token with its code
        pos -= 1
        pieces[0] = Piece(toks[:pos], 1, owner)
    while pos < length:
        pre = split.continuation_prefix(i, off + pos)
        take = min(length - pos, width - len(pre))
        if take <= 0:
            raise ValueError(f"context {context} cannot hold a continuation prefix of {len(pre)} tokens")
        if pos + take < length and take > 1 and int(toks[pos + take]) in q_ids:
            take -= 1
        pieces.append(Piece(np.concatenate([pre, toks[pos:pos + take]]), len(pre), owner))
        pos += take
    return pieces


def sequence_pieces(seqs: Sequence[np.ndarray], first_scored: Sequence[int], context: int) -> list[Piece]:
    """Pieces of free-standing sequences (canaries, references) that fit the context; longer ones are an error."""
    out = []
    for j, (s, f) in enumerate(zip(seqs, first_scored, strict=True)):
        if len(s) > context + 1:
            raise ValueError(f"sequence {j} has {len(s)} tokens, more than the model's context {context} + 1")
        out.append(Piece(np.asarray(s, dtype=np.int64), int(f), j))
    return out


def score_pieces(model: Any, pieces: Sequence[Piece], n_owners: int, *, pad_id: int,
                 max_elements: int = 1 << 24) -> list[TokenStats]:
    """Run ``pieces`` through ``model`` (right-padded batches of similar length) and gather per-owner stats.

    ``max_elements`` bounds batch x length x vocabulary, i.e. the size of one logits tensor.
    """
    import torch

    device = next(model.parameters()).device
    vocab_size = int(model.config.vocab_size)
    order = sorted(range(len(pieces)), key=lambda j: len(pieces[j].tokens))
    results: list[list[tuple[int, TokenStats]]] = [[] for _ in range(n_owners)]
    model.eval()
    b = 0
    with torch.no_grad():
        while b < len(order):
            width = len(pieces[order[min(len(order) - 1, b)]].tokens)
            rows = max(1, max_elements // max(1, width * vocab_size))
            batch = order[b:b + rows]
            width = max(len(pieces[j].tokens) for j in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, j in enumerate(batch):
                t = torch.from_numpy(pieces[j].tokens)
                ids[r, :len(t)] = t
                mask[r, :len(t)] = 1
            logits = model(input_ids=ids[:, :-1].to(device), attention_mask=mask[:, :-1].to(device),
                           use_cache=False).logits.float()  # (B, T-1, V)
            logp_all = torch.log_softmax(logits, dim=-1)
            p = logp_all.exp()
            mu = (p * logp_all).sum(-1)
            var = (p * logp_all.square()).sum(-1) - mu.square()
            sigma = var.clamp(min=0.0).sqrt()
            labels = ids[:, 1:].to(device)
            lp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            lp, mu, sigma = lp.cpu().numpy(), mu.cpu().numpy(), sigma.cpu().numpy()
            for r, j in enumerate(batch):
                pc = pieces[j]
                sl = slice(pc.first_scored - 1, len(pc.tokens) - 1)  # input t predicts label t + 1
                results[pc.owner].append((j, TokenStats(lp[r, sl].astype(np.float64), mu[r, sl].astype(np.float64),
                                                        sigma[r, sl].astype(np.float64))))
            b += len(batch)
    return [TokenStats.concat([s for _, s in sorted(parts, key=lambda x: x[0])]) for parts in results]


def score_subjects(model: Any, split: Any, indices: Sequence[int], context: int) -> list[TokenStats]:
    """Token statistics of subjects ``indices`` of a PackedSplit (every token after the first, once)."""
    pieces = [pc for o, i in enumerate(indices) for pc in subject_pieces(split, int(i), context, owner=o)]
    return score_pieces(model, pieces, len(indices), pad_id=split.vocab.index[PAD])


def is_value_token(token: str) -> bool:
    """``Q1``..``Q10``: a decile value token (it belongs to the code before it)."""
    return token.startswith(QUANTILE_PREFIX) and token[len(QUANTILE_PREFIX):].isdigit()
