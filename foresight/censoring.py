"""The end of a data extract is right-censoring: ``[END]`` read as "no event before the extract ends".

A timeline of a subject alive at the end of the extract stops with ``[END]`` after its last event. Taught as an
ordinary next token, ``[END]`` takes the probability mass of every gap that would have crossed the extract's end,
and a model that cannot tell how far the end is puts that mass on ``[END]`` everywhere: banned at sampling time it
leaves the gaps too short (too many admissions, 1.8x in the catchment study); read as "nothing before the end" it
stops futures that should go on (too few: 20 forecast vs 34 expected in the demo). Neither is the model's fault.

The survival-analysis answer: the position before ``[END]`` is a *censored* observation. All we know is that the
next event comes after the extract's end, ``r`` seconds later, so its likelihood is the probability the model gives
to every gap longer than ``r``::

    P(no event within r) = sum over gap tokens b of p_b * share_b(r)

with ``share_b(r)`` the part of bin ``b`` above ``r`` (log-uniform inside the bin, as the sampler draws gaps; 1 for
bins wholly above ``r``, 0 below; the one-year token counts whole, since "a year passes" is all a single step can
say about a wait longer than a year). :func:`censored_loss` is ``-log`` of that at every position whose label is
``[END]``; the model then never learns to emit ``[END]`` and its gap distribution stays that of the events.
:func:`share_above` is the same share the sampler uses for a wait already elapsed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from foresight.tokens import END, Vocabulary


@dataclass(frozen=True)
class GapBins:
    """Per vocabulary id: whether it is a gap token, its bin's lower and finite upper edge in seconds."""

    is_time: torch.Tensor  # (V,) bool
    lower_s: torch.Tensor  # (V,) float64; -1 for non-gap tokens; the 1Y token: exactly one year
    upper_s: torch.Tensor  # (V,) float64; -1 for non-gap tokens; the 1Y token: its lower edge (no upper edge)
    year_id: int
    end_id: int  # -1 when the vocabulary has no [END]

    @classmethod
    def from_vocab(cls, vocab: Vocabulary) -> GapBins:
        n = len(vocab.tokens)
        ids = torch.tensor(vocab.time_ids)
        lower = torch.full((n,), -1.0, dtype=torch.float64)
        lower[ids] = torch.tensor(vocab.time_lower_s, dtype=torch.float64)
        year_id = int(vocab.time_ids[-1])
        lower[year_id] = float(vocab.time_reps_s[-1])  # 1Y: exactly one year
        upper = torch.full((n,), -1.0, dtype=torch.float64)
        upper[ids] = torch.tensor([*vocab.time_lower_s[1:].tolist(), math.inf], dtype=torch.float64)
        upper = torch.where(torch.isinf(upper), lower, upper)
        return cls(torch.from_numpy(np.asarray(vocab.is_time, dtype=bool)), lower, upper, year_id,
                   vocab.index.get(END, -1))

    def to(self, device: torch.device | str) -> GapBins:
        """The same bins on ``device``."""
        return GapBins(self.is_time.to(device), self.lower_s.to(device), self.upper_s.to(device), self.year_id,
                       self.end_id)


def share_above(bins: GapBins, remaining_s: torch.Tensor) -> torch.Tensor:
    """(rows, V) float32: the share of each gap token's bin above ``remaining_s`` (rows,) seconds, log-uniform
    inside the bin; 1 for the one-year token, 0 for every other token."""
    lo, hi = bins.lower_s[None, :], bins.upper_s[None, :]
    rem = remaining_s.to(torch.float64)[:, None]
    share = (torch.log(hi) - torch.log(torch.maximum(lo, rem))) / (torch.log(hi) - torch.log(lo))
    share = torch.where(bins.is_time[None, :], share.clamp(0.0, 1.0), torch.zeros_like(share))
    share[:, bins.year_id] = 1.0
    return share.float()


def censored_loss(logits: torch.Tensor, labels: torch.Tensor, censor_s: torch.Tensor,
                  bins: GapBins) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood (nats) and its count, with ``[END]`` labels censored.

    ``labels`` (B, T), already shifted, -100 ignored; ``censor_s`` (B, T): seconds from each position whose
    label is ``[END]`` to the extract's end (negative where unknown: that position is left out). Positions with
    any other label get the ordinary cross-entropy; ``[END]`` positions get ``-log P(no event within r)``.
    """
    v = logits.shape[-1]
    flat_logits, flat_labels = logits.float().reshape(-1, v), labels.reshape(-1)
    is_end = flat_labels == bins.end_id
    plain = torch.where(is_end, torch.full_like(flat_labels, -100), flat_labels)
    ce = torch.nn.functional.cross_entropy(flat_logits, plain, ignore_index=-100, reduction="sum")
    n = (plain != -100).sum().float()
    rem = censor_s.reshape(-1)
    censored = is_end & (rem >= 0)
    if censored.any():
        logp = torch.log_softmax(flat_logits[censored], -1)
        share = share_above(bins.to(logp.device), rem[censored])
        ce = ce - torch.logsumexp(logp + share.clamp_min(1e-30).log(), -1).sum()
        n = n + censored.sum().float()
    return ce, n

