"""The history block: what a timeline cut to the context would otherwise forget.

A life longer than the model's context is cut (in training, into pieces; at inference, to its most recent tokens),
and everything before the cut is lost to the model. Counted on a 10,000-life simulated cohort at a 256-token
context, half of the diagnosis and procedure codes recorded before the cut (a chronic condition is coded once, at
its onset) appear nowhere in the last 256 tokens — while a logistic regression on counts sees every code ever
recorded. The block gives the model that summary back, in a few tokens:

    [BOS] statics BIRTH//...  <block: distinct DX/PX codes recorded before the cut>  YEAR// MONTH// AGE//  body...

- **Which codes:** the distinct event tokens of the chosen kinds (``DX`` and ``PX`` by default: the codes that
  stand for a lasting state) recorded before the cut, in order of first appearance; at most ``max_tokens`` (the
  earliest kept: later ones are the likelier to still be in the body).
- **Why no delimiter token:** in an uncut timeline the head is followed by the YEAR/MONTH/AGE markers, never by an
  event, so codes between the head and the markers are unambiguous without a new token, and the vocabulary (and
  every token folder) stays as it is. The block is a layout of training rows and prompts, not of token files.
- **No loss on the block:** its tokens are a summary, not events to predict; training masks their labels.
- **Same in training and inference:** :class:`foresight.dataset.PackedSplit` builds it for continuation pieces,
  :meth:`foresight.forecast.Forecaster.fit_context` for long prompts, both through :meth:`HistoryBlock.block`. A
  model records the setting in ``foresight.json`` (``training.history_block``); a model without it (every model
  trained before) has no block, so nothing changes for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from foresight.schema import code_kind
from foresight.tokens.vocab import Vocabulary

DEFAULT_HISTORY_KINDS = ("DX", "PX")


@dataclass(frozen=True)
class HistoryBlock:
    """The block's rule: at most ``max_tokens`` distinct event tokens of ``kinds`` from before the cut."""

    max_tokens: int
    kinds: tuple[str, ...] = DEFAULT_HISTORY_KINDS
    _masks: dict[int, tuple[Vocabulary, np.ndarray]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"history block of {self.max_tokens} tokens: use None for no block")
        if not self.kinds:
            raise ValueError("a history block needs at least one code kind (e.g. DX)")

    @classmethod
    def from_training(cls, training: Mapping[str, Any] | None) -> HistoryBlock | None:
        """The block a model was trained with (its ``foresight.json`` ``training`` dict, or a TrainConfig's
        fields); None when it had none."""
        n = int((training or {}).get("history_block") or 0)
        if n <= 0:
            return None
        return cls(n, tuple((training or {}).get("history_kinds") or DEFAULT_HISTORY_KINDS))

    def mask(self, vocab: Vocabulary) -> np.ndarray:
        """(V,) bool: the tokens a block may hold (event tokens of the block's kinds)."""
        cached = self._masks.get(id(vocab))
        if cached is None or cached[0] is not vocab:  # an id is only unique while its object lives
            kinds = np.array([code_kind(t) in self.kinds for t in vocab.tokens])
            cached = self._masks[id(vocab)] = (vocab, kinds & vocab.is_event)
        return cached[1]

    def block(self, before_cut: np.ndarray, vocab: Vocabulary) -> np.ndarray:
        """The block for a cut: distinct tokens of the block's kinds in ``before_cut`` (the body tokens recorded
        before the cut, head excluded), in order of first appearance, the first ``max_tokens`` of them."""
        toks = np.asarray(before_cut, dtype=np.int64)
        toks = toks[self.mask(vocab)[toks]]
        if not len(toks):
            return np.zeros(0, dtype=np.int64)
        uniq, first = np.unique(toks, return_index=True)
        return uniq[np.argsort(first, kind="stable")][: self.max_tokens]
