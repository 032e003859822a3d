"""The Forecaster: a trained model and its vocabulary, loaded once, answering next-event questions.

- :meth:`Forecaster.next_events` — the distribution of the next event: P(the next event is code c) sums the
  paths "c at the current timestamp" and "a gap token, then c" (the 16 gap tokens follow the prompt in the same
  forward pass under a tree mask), so probabilities are over events, not over tokens, and sum to at most 1. The
  time until the next event is the distribution over the gap bins (plus "same timestamp"), labelled
  ``time_to_next_source = "interval_tokens"``. For a model trained with the time head (``foresight.json:
  time_head.enabled``; see :mod:`foresight.model`) it also carries ``time_head``: the rate ``Lambda`` of "some
  event happens" read from the same forward pass, ``expected_days = 1 / Lambda`` and ``P(next event within h) =
  1 - exp(-Lambda h)`` at the upper edge of every gap bin — a second, parametric view of the same question.
  :meth:`Forecaster.next_events_batch` / :meth:`Forecaster.event_distributions` answer many timelines with
  one packed forward pass (the server's micro-batcher uses them).
- :meth:`Forecaster.explain_next_events` — leave-one-event-out attribution: the timeline re-encoded without
  each past event, all variants in one batched pass; which events moved P(target) and by how much.
- :meth:`Forecaster.embed` — patient vectors (last token, mean, or both) for similar-patient search
  (:mod:`foresight.forecast.embed`).
- :meth:`Forecaster.time_head_risks` — the time head's closed-form task risk (:func:`foresight.forecast.tasks.
  time_head_risk`) from one forward pass.
- Futures and Rao-Blackwellised task risks come from its base, :class:`foresight.forecast.sampling.FutureSampler`.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foresight import model as M
from foresight.forecast.embed import embed_tokens
from foresight.forecast.sampling import FutureSampler
from foresight.forecast.tasks import TaskSpec, time_head_risk
from foresight.forecast.timeline import DAY, Timeline, event_time
from foresight.schema import code_kind
from foresight.tokens import (
    AGE_PREFIX,
    BIRTH_PREFIX,
    END,
    MONTH_PREFIX,
    NO_TIME,
    PAD,
    YEAR_PREFIX,
    Vocabulary,
    encode_arrays,
    encode_subjects,
    from_epoch,
    register_code_map,
    to_epoch,
)
from foresight.tokens.history import HistoryBlock
from foresight.train.card import check_complete


@dataclass
class NextEvents:
    """The next-event distribution of one timeline."""

    events: list[dict[str, Any]]  # token, kind, description, probability, new
    time_to_next: list[dict[str, Any]]  # bin, probability (incl. "same timestamp")
    probability_mass: float  # total probability of the listed filter (all events of the allowed kinds)
    expected_days_to_next: float | None
    time_to_next_source: str = "interval_tokens"  # where time_to_next / expected_days_to_next come from
    # Only for a model trained with the time head: source, rate_per_day, expected_days and ``within`` (bin,
    # days, probability = P(next event within days)), see :meth:`Forecaster.time_head_view`.
    time_head: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``time_head`` is left out for a model without the head (the pre-head shape)."""
        out = asdict(self)
        if out["time_head"] is None:
            del out["time_head"]
        return out


@dataclass
class EventDistribution:
    """One timeline's next-event distribution over the vocabulary (float64, CPU)."""

    p_event: torch.Tensor  # (V,) P(the next event is v): at this timestamp, or after one gap; 0 for non-events
    p_same_timestamp: float  # P(the next token is an event at the current timestamp)
    p_gap: torch.Tensor  # (G,) P(the next token is gap g), in vocab.time_ids order
    # (V,) float32 logits at the prompt's last position: the softmax drops their absolute level, which is
    # what the time head's rates are made of
    logits: torch.Tensor | None = None


@dataclass
class Explanation:
    """Leave-one-event-out attribution of a next-event prediction (see :meth:`Forecaster.explain_next_events`)."""

    method: str
    target: list[str]  # glob patterns over event tokens whose total probability is explained
    target_tokens: int  # how many vocabulary tokens the patterns match
    probability: float  # P(target) given the full timeline
    events_considered: int
    events: list[dict[str, Any]]  # index, time, code, token, probability_without, delta, total_variation


class Forecaster(FutureSampler):
    """A trained model and its vocabulary, ready to answer forecasting questions (CLI, server, flows)."""

    # Memory bound of one chunk in :meth:`event_distributions` (attention scores, or the KV cache repeated per gap).
    max_cache_bytes: int = 512 * 2**20
    # Row length when :meth:`event_distributions` packs timelines (longer prompts get a row of their own).
    pack_tokens: int = 256

    def __init__(self, model: Any, vocab: Vocabulary, meta: dict[str, Any] | None = None,
                 descriptions: dict[str, str] | None = None) -> None:
        super().__init__(model, vocab)  # the model, token classes and sampling state
        self.meta = meta or {}
        self.descriptions = descriptions or {}
        self.token_kinds = np.array([code_kind(t) for t in vocab.tokens])
        # The rates are only meaningful when training fitted the absolute level of the logits (the time loss);
        # without it the same arithmetic would return numbers that look like rates and mean nothing.
        self.has_time_head = bool((self.meta.get("time_head") or {}).get("enabled"))
        self.event_bias = torch.from_numpy(M.event_log_bias(vocab)) if self.has_time_head else None
        # the history block the model was trained with (None for models trained without one)
        self.history = HistoryBlock.from_training(self.meta.get("training"))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | None = None) -> Forecaster:
        """Load ``model_dir`` (AutoModelForCausalLM + vocab.json + foresight.json)."""
        from transformers import AutoModelForCausalLM

        model_dir = Path(model_dir)
        check_complete(model_dir)  # a save that was killed part-way is not a model
        for name in ("vocab.json", "config.json"):
            if not (model_dir / name).exists():
                raise FileNotFoundError(f"{model_dir / name}: not a Foresight model directory")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if device:
            model = model.to(device)
        meta_path = model_dir / "foresight.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        desc_path = model_dir / "code_descriptions.json"
        desc = json.loads(desc_path.read_text()) if desc_path.exists() else {}
        return cls(model, Vocabulary.load(model_dir / "vocab.json"), meta, desc)

    # -- prompts --

    def timeline_from_warehouse(self, con: Any, subject_id: int, as_of: datetime | None = None) -> Timeline:
        """The subject's timeline from the warehouse, cut at ``as_of`` (default: after the last event)."""
        register_code_map(con, self.vocab)
        chunk = encode_subjects(con, self.vocab, subject_id, subject_id, as_of=as_of)
        if len(chunk.subject_ids) == 0:
            raise KeyError(f"subject {subject_id} has no events" + (f" up to {as_of}" if as_of else ""))
        return self._timeline(chunk, 0, as_of)

    def timelines_from_warehouse(self, con: Any, subject_ids: Sequence[int], as_of: datetime) -> list[Timeline]:
        """Timelines of many subjects cut at ``as_of`` (encoded in one vectorised pass)."""
        register_code_map(con, self.vocab)
        ids = np.array(sorted(set(int(s) for s in subject_ids)), dtype=np.int64)
        if len(ids) == 0:
            return []
        con.execute("CREATE OR REPLACE TEMP TABLE forecast_cohort AS SELECT unnest(?::BIGINT[]) AS subject_id",
                    [ids.tolist()])
        chunk = encode_subjects(con, self.vocab, int(ids[0]), int(ids[-1]), as_of=as_of,
                                cohort_table="forecast_cohort")
        return [self._timeline(chunk, i, as_of) for i in range(len(chunk.subject_ids))]

    def _timeline(self, chunk: Any, i: int, as_of: datetime | None) -> Timeline:
        toks = chunk.tokens[chunk.offsets[i]:chunk.offsets[i + 1]]
        dead = bool(len(toks)) and int(toks[-1]) == self.death_id
        if len(toks) and self.vocab.tokens[int(toks[-1])] == END:
            toks = toks[:-1]  # the extract ended, the life did not: the future continues from here
        # The future is anchored at the TRUE time of the last event, not at the token clock (which may be off it
        # by a share of a bin, weeks after a long gap): otherwise a prompt cut at an admission whose clock lags
        # the truth would have to "wait" weeks before its first future event and lose the stay's discharge.
        last_s = int(chunk.last_s[i]) if len(chunk.last_s) else NO_TIME
        if last_s == NO_TIME and len(toks) and chunk.t0_s[i] != NO_TIME:
            last_s = int(chunk.clock_s[chunk.offsets[i + 1] - 1])
        clock = from_epoch(last_s) if last_s != NO_TIME else (as_of or from_epoch(0))
        birth = from_epoch(chunk.birth_s[i]) if chunk.birth_s[i] != NO_TIME else None
        return Timeline(self.fit_context(np.asarray(toks, dtype=np.int64)), clock, max(as_of or clock, clock),
                        birth, int(chunk.subject_ids[i]), dead)

    @property
    def context(self) -> int:
        """Longest prompt the model was trained on (its training rows), else its position table."""
        trained = int(self.meta.get("training", {}).get("seq_len") or 0)
        return trained or int(getattr(self.model.config, "max_position_embeddings", 512))

    def fit_context(self, tokens: np.ndarray) -> np.ndarray:
        """Cut a long timeline the way training cut it: head (BOS, sex, race, birth band) + the history block of
        what was cut (when the model has one) + the current YEAR, MONTH and AGE markers + the most recent tokens,
        ``context`` tokens in all. Positions past the trained row length were never seen in training, so a longer
        prompt would only be out of distribution."""
        ctx = self.context
        if len(tokens) <= ctx:
            return tokens
        names = [self.vocab.tokens[int(t)] for t in tokens]
        head = 1
        while head < len(names) and (self.vocab.is_static[int(tokens[head])] or names[head].startswith(BIRTH_PREFIX)):
            head += 1
        markers = [next((int(tokens[j]) for j in range(len(names) - 1, -1, -1) if names[j].startswith(p)), None)
                   for p in (YEAR_PREFIX, MONTH_PREFIX, AGE_PREFIX)]
        markers = [m for m in markers if m is not None]
        start = len(tokens) - (ctx - head - len(markers))
        while True:
            while start < len(tokens) - 1 and self.is_value[int(tokens[start])]:
                start += 1  # never begin with a value token cut off from its code
            block = (self.history.block(tokens[head:start], self.vocab) if self.history is not None
                     else np.zeros(0, dtype=np.int64))
            # the block takes room from the body; cutting later can only grow it, so this settles
            fits = len(tokens) - (ctx - head - len(markers) - len(block))
            if start >= fits:
                break
            start = fits
        return np.concatenate([tokens[:head], block, np.array(markers, dtype=np.int64), tokens[start:]])

    def timeline_from_events(self, events: Sequence[dict[str, Any]], as_of: datetime | None = None) -> Timeline:
        """A timeline posted as MEDS-shaped events (``time``, ``code``, optional ``numeric_value``).

        Times (and ``as_of``) are datetimes or ISO 8601 strings, read as the HTTP service reads them (an offset
        is converted to UTC, then dropped: :func:`foresight.forecast.timeline.event_time`); anything else is a
        ValueError naming the event. Codes the vocabulary does not know map to their kind's RARE token (the
        caller can warn)."""
        events, as_of = read_events(events, as_of)
        births = [e["time"] for e in events if e["code"] == "MEDS_BIRTH" and e.get("time")]
        rows = [e for e in events if e["code"] != "MEDS_BIRTH" and (as_of is None or e.get("time") is None
                                                                      or e["time"] <= as_of)]
        if not rows:
            raise ValueError("the timeline has no events (besides a birth) up to as_of")
        vocab = self.vocab
        chunk = encode_arrays(
            vocab,
            np.zeros(len(rows), dtype=np.int64),
            np.array([to_epoch(e["time"]) if e.get("time") else NO_TIME for e in rows], dtype=np.int64),
            np.array([vocab.index[vocab.token_for(e["code"])] for e in rows], dtype=np.int64),
            np.array([np.nan if e.get("numeric_value") is None else float(e["numeric_value"]) for e in rows]),
            {0: to_epoch(births[0])} if births else {},
        )
        return self._timeline(chunk, 0, as_of)

    # -- next events --

    @torch.no_grad()
    def next_events(self, timeline: Timeline, top_k: int = 10, kinds: Sequence[str] | None = None,
                    new_only: bool = False) -> NextEvents:
        """Top-k next events with probabilities, and the distribution of the time until the next event."""
        return self.next_events_batch([timeline], top_k, kinds, new_only)[0]

    def next_events_batch(self, timelines: Sequence[Timeline], top_k: int = 10, kinds: Sequence[str] | None = None,
                          new_only: bool = False) -> list[NextEvents]:
        """:meth:`next_events` for many timelines with one batched forward pass (see :meth:`event_distributions`)."""
        dists = self.event_distributions(timelines)
        return [self.summarise_next(tl, d, top_k, kinds, new_only) for tl, d in zip(timelines, dists, strict=True)]

    @torch.no_grad()
    def event_distributions(self, timelines: Sequence[Timeline]) -> list[EventDistribution]:
        """The next-event distribution of every timeline, batched; the result is in the input order.

        With SDPA or eager attention (CPU, and GPUs without flash-attention) all timelines run in ONE forward
        pass, packed without padding: each prompt is followed by the 16 gap tokens, and a block-diagonal
        "tree" mask lets every prompt token see its own prompt causally and every gap see its prompt and itself
        only (all gaps sit at the position after the prompt). P(next token) and P(next token | gap g) come out
        of the same pass, and the output layer runs only at those 1 + 16 positions per timeline. Other
        attention kernels (no custom masks) run the left-padded prompts, then one step over the gaps with the
        KV cache repeated per gap. Chunks keep one pass's attention scores or cache under ``max_cache_bytes``.
        """
        out: list[EventDistribution | None] = [None] * len(timelines)
        order = sorted(range(len(timelines)), key=lambda i: len(timelines[i].tokens))
        n_gaps = len(self.vocab.time_ids)
        cfg = self.model.config
        packed = getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager")
        run = self._distributions_packed if packed else self._distributions_cached

        def cost(n: int, longest: int, total: int) -> int:
            if packed:  # attention scores (rows, heads, row, row) in float32 for rows of pack_tokens
                row = max(self.pack_tokens, longest + n_gaps)
                return math.ceil((total + n * n_gaps) / row) * cfg.num_attention_heads * row * row * 4
            return n * n_gaps * (longest + 1) * self.cache_bytes_per_token()

        chunk: list[int] = []
        total = 0
        for i in order:  # ascending length: the last timeline of a chunk is its longest
            length = len(timelines[i].tokens)
            if chunk and cost(len(chunk) + 1, length, total + length) > self.max_cache_bytes:
                for j, d in zip(chunk, run([timelines[j] for j in chunk]), strict=True):
                    out[j] = d
                chunk, total = [], 0
            chunk.append(i)
            total += length
        if chunk:
            for j, d in zip(chunk, run([timelines[j] for j in chunk]), strict=True):
                out[j] = d
        return out  # type: ignore[return-value]

    def _distributions_packed(self, tls: Sequence[Timeline]) -> list[EventDistribution]:
        dev = self.device
        lens = [len(t.tokens) for t in tls]
        if min(lens) == 0:
            raise ValueError("a timeline has no tokens")
        gaps = torch.tensor(self.vocab.time_ids)
        g = len(gaps)
        seg = [n + g for n in lens]  # a prompt and its gaps
        cap = max(self.pack_tokens, max(seg))
        rows: list[list[int]] = []  # first-fit decreasing: few rows, little padding
        fill: list[int] = []
        for i in sorted(range(len(tls)), key=lambda i: -seg[i]):
            r = next((r for r in range(len(rows)) if fill[r] + seg[i] <= cap), None)
            if r is None:
                rows.append([])
                fill.append(0)
                r = len(rows) - 1
            rows[r].append(i)
            fill[r] += seg[i]
        width = max(fill)
        ids = torch.full((len(rows), width), self.vocab.index[PAD], dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        keep = torch.zeros((len(rows), width, width), dtype=torch.bool)  # (row, query, key)
        at = torch.zeros((len(tls), 1 + g, 2), dtype=torch.long)  # (row, column) of each timeline's 1 + G outputs
        causal = torch.tril(torch.ones((max(lens), max(lens)), dtype=torch.bool))
        eye = torch.eye(g, dtype=torch.bool)
        for r, members in enumerate(rows):
            o = 0
            for i in members:
                n, q = lens[i], o + lens[i]  # prompt at [o, q), gaps at [q, q + g)
                ids[r, o:q] = torch.from_numpy(tls[i].tokens)
                ids[r, q:q + g] = gaps
                pos[r, o:q] = torch.arange(n)
                pos[r, q:q + g] = n  # every gap is "the next token"
                keep[r, o:q, o:q] = causal[:n, :n]
                keep[r, q:q + g, o:q] = True  # a gap sees the whole prompt ...
                keep[r, q:q + g, q:q + g] = eye  # ... and itself, never another gap
                at[i, :, 0] = r
                at[i, 0, 1] = q - 1
                at[i, 1:, 1] = torch.arange(q, q + g)
                o = q + g
            keep[r, torch.arange(o, width), torch.arange(o, width)] = True  # padding attends to itself
        mask = keep[:, None].to(dev)
        if self.model.config._attn_implementation == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, device=dev).masked_fill(~mask, torch.finfo(torch.float32).min)
        hidden = self.model.get_decoder()(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos.to(dev),
                                          use_cache=False).last_hidden_state  # (rows, width, d)
        picked = hidden[at[..., 0].to(dev), at[..., 1].to(dev)]  # (B, 1 + G, d)
        logits = self.model.get_output_embeddings()(picked)
        probs = torch.softmax(logits.double(), -1).cpu()  # (B, 1 + G, V): after the prompt, then after each gap
        return self._combine(probs[:, 0], probs[:, 1:], logits[:, 0].float().cpu())

    def _combine(self, p0: torch.Tensor, p1: torch.Tensor, logits0: torch.Tensor) -> list[EventDistribution]:
        """p0 (B, V): P(next token); p1 (B, G, V): P(token after gap g); logits0 (B, V): the logits behind p0
        -> each timeline's event distribution."""
        gaps = torch.tensor(self.vocab.time_ids)
        p_gap = p0[:, gaps]  # (B, G)
        event = torch.from_numpy(self.is_event)
        p_event = p0 * event + (p_gap[:, :, None] * p1 * event).sum(1)  # (B, V)
        same = (p0 * event).sum(-1)
        return [EventDistribution(p_event[r], float(same[r]), p_gap[r], logits0[r]) for r in range(len(p0))]

    def _distributions_cached(self, tls: Sequence[Timeline]) -> list[EventDistribution]:
        dev = self.device
        lens = [len(t.tokens) for t in tls]
        if min(lens) == 0:
            raise ValueError("a timeline has no tokens")
        width, b = max(lens), len(tls)
        ids = torch.full((b, width), self.vocab.index[PAD], dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, t in enumerate(tls):  # left padding: every row's last prompt token is in the last column
            ids[r, width - lens[r]:] = torch.from_numpy(t.tokens)
            mask[r, width - lens[r]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"attention_mask": mask.to(dev)} if b > 1 else {}
        # logits_to_keep=1: only the last position's logits (B x width x V of them would dwarf the model's work)
        out = self.model(input_ids=ids.to(dev), position_ids=pos.to(dev), use_cache=True, logits_to_keep=1, **kwargs)
        logits0 = out.logits[:, -1].float().cpu()
        p0 = torch.softmax(logits0.double(), -1)  # (B, V)
        # one batched step over every gap token, reusing the prompt's cache: rows (b0 g0, b0 g1, ..., b1 g0, ...)
        gaps = torch.tensor(self.vocab.time_ids)
        g = len(gaps)
        cache = out.cache
        cache.batch_repeat_interleave(g)
        step_ids = gaps.repeat(b)[:, None].to(dev)
        step_pos = (pos[:, -1] + 1).repeat_interleave(g)[:, None].to(dev)
        if b > 1:
            step_mask = torch.cat([mask.repeat_interleave(g, 0), torch.ones((b * g, 1), dtype=mask.dtype)], 1)
            kwargs = {"attention_mask": step_mask.to(dev)}
        step = self.model(input_ids=step_ids, cache=cache, position_ids=step_pos, use_cache=False, **kwargs)
        p1 = torch.softmax(step.logits[:, -1].double(), -1).cpu().view(b, g, -1)  # (B, G, V)
        return self._combine(p0, p1, logits0)

    def summarise_next(self, timeline: Timeline, dist: EventDistribution, top_k: int = 10,
                       kinds: Sequence[str] | None = None, new_only: bool = False) -> NextEvents:
        """Top-k events (optionally of some kinds, or not yet in the timeline) and the time-to-next bins."""
        allowed = self.is_event.copy()
        if kinds:
            allowed &= np.isin(self.token_kinds, [k.upper() for k in kinds])
        seen = np.zeros(len(allowed), dtype=bool)
        seen[np.unique(timeline.tokens)] = True
        if new_only:
            allowed &= ~seen
        allowed_t = torch.from_numpy(allowed)
        p_event = dist.p_event
        masked = torch.where(allowed_t, p_event, torch.zeros_like(p_event))
        n_allowed = int(allowed.sum())
        events = []
        if n_allowed and top_k > 0:
            top = torch.topk(masked, min(top_k, n_allowed))
            for prob, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                tok = self.vocab.tokens[i]
                events.append({"token": tok, "kind": code_kind(tok), "description": self.descriptions.get(tok),
                               "probability": prob, "new": not bool(seen[i])})
        # time to the next event: "same timestamp" or one of the gap bins, normalised over those outcomes
        gaps = self.vocab.time_ids
        p_gap = dist.p_gap
        same = dist.p_same_timestamp
        total = same + float(p_gap.sum())
        norm = total if total > 0 else 1.0
        times = [{"bin": "same timestamp", "probability": same / norm}]
        times += [{"bin": self.vocab.tokens[int(g)], "probability": float(p) / norm}
                  for g, p in zip(gaps, p_gap, strict=True)]
        reps = torch.tensor(self.vocab.time_reps_s)
        expected = float((p_gap * reps).sum() / DAY / total) if total > 0 else None
        return NextEvents(events, times, float(masked.sum()), expected,
                          time_head=self.time_head_view(dist) if self.has_time_head else None)

    def time_head_view(self, dist: EventDistribution) -> dict[str, Any]:
        """The time head's answer to "when is the next event": ``Lambda`` = sum of the event rates at the
        prompt's last position, ``expected_days = 1 / Lambda``, and for every gap bin the probability that the
        next event comes within its upper edge, ``1 - exp(-Lambda h)`` (the open-ended last bin: 1).

        The same bins as the interval-token distribution so the two can be read side by side; but these are
        cumulative (monotone in h) where ``time_to_next`` gives each bin's own share.
        """
        if self.event_bias is None or dist.logits is None:
            raise ValueError("the model was not trained with the time head (foresight.json: time_head.enabled)")
        rate = float(M.time_to_event(dist.logits, self.event_bias)["rate"])
        within = []
        for g in self.vocab.time_ids:
            upper_s = float(self.time_upper_s[int(g)])
            days = upper_s / DAY if math.isfinite(upper_s) else None
            p = 1.0 if days is None else -math.expm1(-rate * days)
            within.append({"bin": self.vocab.tokens[int(g)], "days": days, "probability": p})
        return {"source": "time_head", "rate_per_day": rate, "expected_days": 1.0 / rate, "within": within}

    # -- explanations --

    def explain_next_events(self, events: Sequence[dict[str, Any]], as_of: datetime | None = None,
                            target: Sequence[str] | None = None, max_events: int = 64) -> Explanation:
        """Which past events moved the next-event prediction: leave-one-event-out, in one batched pass.

        The timeline is re-encoded once per removed event (so gaps, ages and value tokens stay consistent, as if
        the event had never been recorded) and all variants run through :meth:`event_distributions` together.
        ``target`` is a list of glob patterns over event tokens (default: the top-1 predicted event); each
        event's ``delta`` is P(target | full timeline) - P(target | timeline without it), so a positive delta
        means the event made the target more likely. ``total_variation`` is how much the whole next-event
        distribution moved (half the L1 distance). Only the ``max_events`` most recent timed events are tried.
        """
        events, as_of = read_events(events, as_of)
        base = self.timeline_from_events(events, as_of)
        candidates = [i for i, e in enumerate(events) if e.get("time") is not None and e["code"] != "MEDS_BIRTH"
                      and (as_of is None or e["time"] <= as_of)]
        candidates = candidates[-max_events:] if max_events > 0 else []
        variants, kept = [], []
        for i in candidates:
            rest = [e for j, e in enumerate(events) if j != i]
            try:
                variants.append(self.timeline_from_events(rest, as_of))
            except ValueError:  # removing the only event leaves nothing to predict from: no counterfactual
                continue
            kept.append(i)
        dists = self.event_distributions([base, *variants])
        full = dists[0].p_event
        if target:
            tmask = np.array([self.is_event[i] and any(fnmatch.fnmatchcase(t, p) for p in target)
                              for i, t in enumerate(self.vocab.tokens)])
            patterns = list(target)
        else:
            masked = torch.where(torch.from_numpy(self.is_event), full, torch.zeros_like(full))
            top = int(torch.argmax(masked))
            tmask = np.zeros(len(self.vocab.tokens), dtype=bool)
            tmask[top] = True
            patterns = [self.vocab.tokens[top]]
        tm = torch.from_numpy(tmask)
        p_full = float(full[tm].sum())
        rows = []
        for i, d in zip(kept, dists[1:], strict=True):
            e = events[i]
            p_without = float(d.p_event[tm].sum())
            rows.append({"index": i, "time": e["time"], "code": e["code"], "token": self.vocab.token_for(e["code"]),
                         "probability_without": p_without, "delta": p_full - p_without,
                         "total_variation": 0.5 * float((full - d.p_event).abs().sum())})
        rows.sort(key=lambda r: abs(r["delta"]), reverse=True)
        return Explanation("leave-one-event-out", patterns, int(tmask.sum()), p_full, len(candidates), rows)

    # -- embeddings --

    def embed(self, timelines: Sequence[Timeline | Sequence[dict[str, Any]]], as_of: datetime | None = None,
              pooling: str = "last", batch_tokens: int = 16_384) -> np.ndarray:
        """(N, width) float32 patient vectors, deterministic (eval mode, no sampling), in the input order.

        Each item is a :class:`Timeline` (already cut at its as_of) or a list of MEDS-shaped events, cut at
        ``as_of`` and encoded as :meth:`timeline_from_events` does. ``pooling``: ``"last"`` (the last prompt
        token's final hidden state), ``"mean"`` (over the prompt) or ``"both"`` (concatenated); the width and what
        a history longer than the context contributes are in :mod:`foresight.forecast.embed`.
        """
        tls = [t if isinstance(t, Timeline) else self.timeline_from_events(t, as_of) for t in timelines]
        return embed_tokens(self.model, [t.tokens for t in tls], pooling, pad_id=self.vocab.index[PAD],
                            batch_tokens=batch_tokens)

    # -- the time head's risks --

    @torch.no_grad()
    def time_head_risks(self, timelines: Sequence[Timeline], task: TaskSpec) -> np.ndarray | None:
        """The time head's risk of ``task`` per timeline: ``1 - exp(-D * sum_{v in task} lambda_v)``
        (:func:`foresight.forecast.tasks.time_head_risk`), ``D = task.window_days``.

        One forward pass per timeline instead of many sampled paths; the rates are frozen at the prediction time,
        where the futures of :meth:`task_risks` follow the events in between. None when the model has no time
        head or the task does not qualify (:attr:`TaskSpec.time_head_applicable`); NaN for the dead, as in
        :meth:`task_risks`.
        """
        if not (self.has_time_head and task.time_head_applicable):
            return None
        assert self.event_bias is not None
        risk = np.full(len(timelines), np.nan)
        live = [i for i, t in enumerate(timelines) if not t.dead]
        if not live:
            return risk
        logits = torch.stack([d.logits for d in self.event_distributions([timelines[i] for i in live])])
        match = torch.tensor([task.matches(t) for t in self.vocab.tokens])
        risk[live] = time_head_risk(logits, self.event_bias, match, task.window_days)
        return risk


def read_events(events: Sequence[dict[str, Any]], as_of: Any = None) -> tuple[list[dict[str, Any]], datetime | None]:
    """Posted events with their times read by :func:`event_time` (ValueError naming ``events[i]`` otherwise)."""
    out = []
    for i, e in enumerate(events):
        if not isinstance(e, dict) or not isinstance(e.get("code"), str):
            raise ValueError(f"events[{i}]: must be a mapping with a string `code` (and `time`, `numeric_value`)")
        out.append({**e, "time": event_time(e.get("time"), f"events[{i}].time")})
    return out, event_time(as_of, "as_of")
