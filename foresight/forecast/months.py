"""Calendar-month markers in sampled futures, written from the sampler's clock rather than drawn from the model.

With ``month_tokens`` the training sequences carry ``MONTH//mm`` after a timestamp's interval tokens (and YEAR)
whenever the token clock's month changed (:mod:`foresight.tokens.codec`). In a future, the sampler's clock is
known exactly, but the model only sees the gap BIN: left to itself it draws a month that the clock often does not
match (bench/month_marker.py, the demo's cohort: 20-31% of the markers it wrote named the clock's month and 58-80% of
its codes followed a stale one). :class:`MonthClock` makes the markers the clock's:

- no row ever draws a MONTH token itself (its mass is renormalised away: "the month did not change");
- a row whose clock has entered another month than its last marker says is *due*: it may still draw interval
  tokens (a gap that goes on) and YEAR markers (which come before MONTH), and all the rest of its probability goes
  to the clock's MONTH marker. The due step therefore holds no event, so Rao-Blackwellised counts and task
  survival (which read these probabilities) do not count the step twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from foresight.forecast.timeline import Timeline
from foresight.tokens import YEAR_PREFIX, Vocabulary, month_marker_tokens, months_of, to_epoch


class MonthClock:
    """Per-row month state of one :meth:`~foresight.forecast.sampling.FutureSampler.sample_batch`."""

    def __init__(self, vocab: Vocabulary, tls: Sequence[Timeline], n: int) -> None:
        self.ids = torch.tensor([vocab.index[t] for t in month_marker_tokens(vocab.config)], dtype=torch.long)
        self.is_month = torch.zeros(len(vocab.tokens), dtype=torch.bool)
        self.is_month[self.ids] = True
        self.month_of = torch.zeros(len(vocab.tokens), dtype=torch.long)
        self.month_of[self.ids] = torch.arange(1, 13)
        self.free = torch.tensor(vocab.is_time) | torch.tensor([t.startswith(YEAR_PREFIX) for t in vocab.tokens])
        self.base_s = np.repeat(np.array([to_epoch(t.clock) for t in tls], dtype=np.int64), n)
        # Each row starts in its clock's month, not its prompt's last marker's: that marker is the TOKEN clock's
        # month, which may sit a few days off the true time the future starts from (another month near a month's
        # end); a marker forced before any gap would break the layout the model was trained on.
        self.current = torch.from_numpy(months_of(self.base_s)).long()

    def constrain(self, probs: torch.Tensor, active: torch.Tensor, elapsed_s: torch.Tensor) -> torch.Tensor:
        """``probs`` of the ``active`` rows (clock ``elapsed_s`` seconds after each prompt's) with the month rule."""
        now = torch.from_numpy(months_of(self.base_s[active.numpy()] + elapsed_s.numpy().astype(np.int64)))
        due = (now != self.current[active]).to(probs.device)
        is_month = self.is_month.to(probs.device)
        kept = probs.masked_fill(is_month, 0.0)
        total = kept.sum(-1, keepdim=True)
        out = torch.where(total > 0, kept / total.clamp(min=1e-30), probs)
        if bool(due.any()):
            free = self.free.to(probs.device)
            d = probs[due] * free
            d[torch.arange(len(d)), self.ids.to(probs.device)[now[due.cpu()] - 1]] += (1.0 - d.sum(-1)).clamp(min=0)
            out[due] = d
        return out

    def update(self, active: torch.Tensor, nxt: torch.Tensor) -> None:
        """The rows that drew a MONTH marker now stand in its month."""
        hit = self.is_month[nxt]
        self.current[active[hit]] = self.month_of[nxt[hit]]
