"""Patient embeddings: one fixed-length vector per timeline, read from the trained model's last hidden layer.

What a vector is. The timeline's tokens (the same prompt :class:`foresight.forecast.Forecaster` forecasts from)
run through the decoder once, in eval mode and without sampling, and the final layer's hidden states (after the
model's last norm, i.e. what the output head reads) are pooled:

- ``"last"``: the state at the last prompt token, the one the next-event distribution is computed from. It is
  "the model's summary of this history for predicting what comes next" and leans on recent events.
- ``"mean"``: the average over every prompt token (padding excluded): a smoother summary of the whole history.
- ``"both"``: the two concatenated, ``[last, mean]``, twice the model's width.

Every vector of one pooling has the same width (``hidden_size``, or twice it for ``"both"``) whatever the history
length. A history longer than the model's context is cut the way training cut it
(:meth:`foresight.forecast.Forecaster.fit_context`: the head tokens, the current YEAR, MONTH and AGE markers, then
the most recent tokens), so both poolings see that window only, never events before it. The prompt ends at the last
recorded event: the time elapsed between it and ``as_of`` is not part of the vector.

Batching. Timelines are sorted by length and run in right-padded batches of at most ``batch_tokens`` tokens
(rows x longest row); an attention mask keeps padding out of every real position, and positions count from 0 in
each row, so a timeline's vector does not depend on which others share its batch (up to float rounding, ~1e-6).
The same inputs give bit-identical vectors on the same machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

POOLINGS = ("last", "mean", "both")


def embedding_width(model: Any, pooling: str) -> int:
    """The length of one vector: the model's hidden size, twice it for ``"both"``."""
    check_pooling(pooling)
    width = int(model.config.hidden_size)
    return 2 * width if pooling == "both" else width


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


@torch.no_grad()
def embed_tokens(model: Any, prompts: Sequence[np.ndarray], pooling: str = "last", *, pad_id: int = 0,
                 batch_tokens: int = 16_384) -> np.ndarray:
    """(N, width) float32 vectors of ``prompts`` (token id arrays, each non-empty), in the input order."""
    check_pooling(pooling)
    width = embedding_width(model, pooling)
    out = np.zeros((len(prompts), width), dtype=np.float32)
    if not prompts:
        return out
    lens = np.array([len(p) for p in prompts])
    if lens.min() == 0:
        raise ValueError(f"prompt {int(np.argmin(lens))} has no tokens")
    model.eval()
    order = np.argsort(lens, kind="stable")
    start = 0
    while start < len(order):  # ascending length: a batch's last prompt is its longest
        stop = start + 1
        while stop < len(order) and (stop - start + 1) * lens[order[stop]] <= batch_tokens:
            stop += 1
        rows = order[start:stop]
        out[rows] = pool_batch(model, [prompts[i] for i in rows], pooling, pad_id)
        start = stop
    return out


def pool_batch(model: Any, prompts: Sequence[np.ndarray], pooling: str, pad_id: int) -> np.ndarray:
    """One right-padded forward pass over ``prompts``; their pooled final hidden states, (B, width)."""
    dev = next(model.parameters()).device
    lens = torch.tensor([len(p) for p in prompts])
    b, t = len(prompts), int(lens.max())
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.from_numpy(np.asarray(p, dtype=np.int64))
    mask = (torch.arange(t)[None, :] < lens[:, None]).long()  # (B, T): 1 on real tokens
    pos = torch.arange(t)[None, :].expand(b, t)
    hidden = model.get_decoder()(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                                 use_cache=False).last_hidden_state.float().cpu()  # (B, T, d), after the last norm
    last = hidden[torch.arange(b), lens - 1]  # (B, d)
    if pooling == "last":
        return last.numpy()
    m = mask[..., None].float()
    mean = (hidden * m).sum(1) / m.sum(1)  # (B, d): padding excluded
    return (mean if pooling == "mean" else torch.cat([last, mean], -1)).numpy()
