"""Monte Carlo futures with a KV cache: many timelines, many samples each, decoded together one token at a time.

:meth:`FutureSampler.sample_futures` runs the prompt once per timeline, repeats its KV cache for the samples,
and decodes all (timeline, sample) rows together (no Python loop over samples, no per-sample ``generate``). Rows
stop at the horizon (the token clock passes it), at death, or at ``max_new_tokens``; finished rows leave the
batch. The first gap is conditioned on the time already elapsed since the last recorded event (the future starts
at ``as_of``, and the model is only allowed gaps that end after it). ``[END]`` (the end of a data extract) is
never sampled. :meth:`FutureSampler.task_risks` walks the same paths Rao-Blackwellised: each path carries the
probability that a task fires instead of a 0/1 outcome.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import torch

from foresight.censoring import GapBins, share_above
from foresight.forecast.months import MonthClock
from foresight.forecast.tasks import TaskSpec
from foresight.forecast.timeline import DAY, Timeline
from foresight.schema import DEATH_CODE
from foresight.tokens import END, PAD, Vocabulary, decode

# integrate_exits: a path whose weight falls below this plays Russian roulette (it goes on with probability
# weight / floor, at the floor's weight, else stops): unbiased, and a path held inside the window no longer walks
# on for hundreds of steps carrying almost nothing
WEIGHT_FLOOR = 0.02


class SamplingCancelled(Exception):
    """Sampling stopped early because its ``should_stop`` callback said so (a deadline, a caller that left)."""


class SampledBatch(NamedTuple):
    """What :meth:`FutureSampler.sample_batch` returns, one entry per (prompt, sample) row."""

    tokens: list[list[int]]  # the sampled token ids
    survival: torch.Tensor  # (rows,) P(no task match along the path); ones without ``match``
    elapsed_s: list[np.ndarray]  # seconds after the prompt's clock at each sampled token
    # (rows, weeks, K) with ``tally``: the expected number of tally-k events per week after as_of, summed over
    # the path's steps (Rao-Blackwellised counts); None without
    expected: torch.Tensor | None = None


class _PathWeights:
    """What each (prompt, sample) row of :meth:`FutureSampler.sample_batch` carries for a task's risk: the survival
    ``S`` (sampled exits: ``S *= 1 - P(match)`` at every step, risk ``1 - S``), or with ``integrate`` the weight
    ``W`` of staying match-free inside the window and the hit ``H`` (``H += W P(match)``, ``W *= 1 - P(match)``,
    then ``W *= 1 - P(exit)``; risk ``H``). ``end_exits`` (rows,): ``[END]`` is an exit (the extract ends after
    the window)."""

    def __init__(self, rows: int, integrate: bool, end_exits: torch.Tensor) -> None:
        self.integrate, self.end_exits = integrate, end_exits
        self.s = torch.ones(rows, dtype=torch.float64)
        self.w = torch.ones(rows, dtype=torch.float64)
        self.h = torch.zeros(rows, dtype=torch.float64)

    def settle(self, sampler: FutureSampler, probs: torch.Tensor, match: torch.Tensor, active: torch.Tensor,
               remaining: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
        """Account for this step's P(match) (and, integrating, P(exit)); returns the (unnormalised) probabilities
        to draw the path's next token from: no match, and integrating, nothing that leaves the window."""
        p_match = (probs * match).sum(-1).double().cpu().clamp(0, 1)
        probs = probs.masked_fill(match, 0.0)
        if not self.integrate:
            self.s[active] *= 1.0 - p_match
            return probs
        self.h[active] += self.w[active] * p_match
        self.w[active] *= 1.0 - p_match
        share = sampler._exit_share(remaining, room, self.end_exits[active])
        pc = probs.double().cpu()
        total = pc.sum(-1)
        p_exit = torch.where(total > 0, (pc * share).sum(-1) / total.clamp_min(1e-300), 0.0)
        self.w[active] *= 1.0 - p_exit.clamp(0, 1)
        return probs * (1.0 - share).to(device=probs.device, dtype=probs.dtype)

    def roulette(self, active: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(len(active),) True where a path stops: below ``WEIGHT_FLOOR`` a path goes on with probability
        ``W / floor`` at the floor's weight (unbiased), else stops."""
        low = self.w[active] < WEIGHT_FLOOR
        stop = torch.zeros(len(active), dtype=torch.bool)
        if low.any():
            u = torch.rand(int(low.sum()), generator=gen, dtype=torch.float64)
            goes_on = u * WEIGHT_FLOOR < self.w[active[low]]
            self.w[active[low]] = torch.where(goes_on, WEIGHT_FLOOR, 0.0).double()
            stop[low.nonzero()[:, 0][~goes_on]] = True
        return stop

    def survival(self) -> torch.Tensor:
        """(rows,) 1 - the path's risk."""
        return 1.0 - self.h if self.integrate else self.s


class FutureSampler:
    """A causal model and its vocabulary, set up to roll futures out (the base of
    :class:`foresight.forecast.Forecaster`)."""

    # With a vocabulary that has MONTH markers: write them from the sampler's clock, never draw them from the
    # model (:class:`foresight.forecast.months.MonthClock`); False lets the model write its own (an A/B switch).
    force_months: bool = True
    # task_risks: integrate the probability of leaving the window instead of sampling it (see task_risks);
    # False is the estimator before 2026-12-05 (an A/B switch)
    integrate_exits: bool = True

    def __init__(self, model: Any, vocab: Vocabulary) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.device = next(model.parameters()).device
        n = len(vocab.tokens)
        # the one definition of the token classes: the vocabulary's masks
        self.is_time, self.is_marker, self.is_value = vocab.is_time, vocab.is_marker, vocab.is_value
        self.is_event = vocab.is_event
        # tokens never sampled in a future: padding, a new start, end-of-extract, static facts, birth band
        banned = ~(self.is_event | self.is_time | self.is_marker | self.is_value)
        self.banned = torch.tensor(banned, device=self.device)
        self.time_rep_s = torch.zeros(n, dtype=torch.float64)
        self.time_rep_s[torch.tensor(vocab.time_ids)] = torch.tensor(vocab.time_reps_s)
        upper = [*vocab.time_lower_s[1:].tolist(), math.inf]  # upper edge of each bin (the 1Y token: none)
        self.time_upper_s = torch.full((n,), -1.0, dtype=torch.float64)
        self.time_upper_s[torch.tensor(vocab.time_ids)] = torch.tensor(upper, dtype=torch.float64)
        self.gaps = GapBins.from_vocab(vocab)  # the bins' edges, shared with the censored training loss
        self.time_lower_s, self.time_upper_s_finite = self.gaps.lower_s, self.gaps.upper_s
        self.year_id = self.gaps.year_id
        self.death_id = vocab.index.get(DEATH_CODE, -1)
        self.end_id = vocab.index.get(END, -1)

    def cache_bytes_per_token(self) -> int:
        """Bytes of KV cache one token of one row holds (keys and values of every layer)."""
        cfg = self.model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * heads * head_dim * next(self.model.parameters()).element_size()

    @torch.no_grad()
    def sample_futures(
        self,
        timelines: Sequence[Timeline],
        n: int,
        horizon_days: float,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        max_new_tokens: int = 512,
        batch_rows: int = 512,
        should_stop: Callable[[], bool] | None = None,
        extract_end: datetime | None = None,
    ) -> list[list[list[dict[str, Any]]]]:
        """``n`` futures per timeline up to ``horizon_days`` after its ``as_of``: futures[i][j] = events.

        Each event is MEDS-shaped (time, code, numeric_value); times are never before ``as_of`` and never past
        the horizon. Reproducible for a given seed. ``should_stop()`` is asked before every decoding step (one
        token for every row of a batch); when it answers True, :class:`SamplingCancelled` is raised and no more
        model work is done. Without it (the default) nothing changes.

        ``extract_end``: when the records the model was trained on end (the warehouse's last event). ``[END]``
        in training is right-censoring there: it replaced every gap that would have crossed it, so a model asked
        for the next token near that date puts much of the "long gap" mass on ``[END]``. Banning ``[END]`` and
        renormalising (what happens without ``extract_end``) draws the gaps as if the next event had to come
        before the extract's end: too short, too many events (1.8x the admissions 7 months before the end, see
        tests/test_catchment.py). With ``extract_end``, a sampled ``[END]`` before it means "no event before
        ``extract_end``": the future stops when its horizon ends before ``extract_end``; otherwise the gap is
        redrawn among the gaps that end after ``extract_end`` (the model knows nothing past it).
        """
        if n < 1 or horizon_days <= 0:
            raise ValueError("need n >= 1 and horizon_days > 0")
        results: list[list[list[dict[str, Any]]]] = [[[] for _ in range(n)] for _ in timelines]
        live = [i for i, t in enumerate(timelines) if not t.dead]
        per_batch = max(1, batch_rows // n)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for b in range(0, len(live), per_batch):
            group = live[b:b + per_batch]
            batch = self.sample_batch([timelines[i] for i in group], n, horizon_days, temperature, top_p, gen,
                                      max_new_tokens, should_stop=should_stop, extract_end=extract_end)
            for gi, i in enumerate(group):
                tl = timelines[i]
                for j in range(n):
                    r = gi * n + j
                    results[i][j] = self._decode_future(tl, batch.tokens[r], batch.elapsed_s[r], horizon_days)
        return results

    @torch.no_grad()
    def weekly_tallies(self, timelines: Sequence[Timeline], n: int, horizon_days: float,
                       groups: Sequence[Sequence[str]], *, seed: int = 0, extract_end: datetime | None = None,
                       max_new_tokens: int = 512, batch_rows: int = 512,
                       should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Weekly event counts of ``n`` futures per timeline, without decoding them: ``(realized, expected)``,
        both (timelines, n, weeks, groups). ``groups``: lists of globs over event tokens (e.g. ``[["ADMIT//
        EMERGENCY"], ["ADMIT//ELECTIVE"]]``). ``realized``: events of that group in the sampled future, by
        week after ``as_of``; ``expected``: the same count Rao-Blackwellised (at every step the probability
        that the next token is such an event, added to the week the clock stands in; its mean over futures
        is the expected count, with far less Monte Carlo noise). Dead subjects: zeros. ``extract_end``: see
        :meth:`sample_futures`."""
        if n < 1 or horizon_days <= 0:
            raise ValueError("need n >= 1 and horizon_days > 0")
        member = np.array([[any(fnmatch.fnmatchcase(t, p) for p in g) for g in groups] for t in self.vocab.tokens])
        tally = torch.from_numpy(member.astype(np.float64))
        n_weeks = max(1, math.ceil(horizon_days / 7))
        realized = np.zeros((len(timelines), n, n_weeks, len(groups)), dtype=np.int32)
        expected = np.zeros((len(timelines), n, n_weeks, len(groups)), dtype=np.float32)
        live = [i for i, t in enumerate(timelines) if not t.dead]
        per_batch = max(1, batch_rows // n)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for b in range(0, len(live), per_batch):
            group = live[b:b + per_batch]
            tls = [timelines[i] for i in group]
            batch = self.sample_batch(tls, n, horizon_days, 1.0, 1.0, gen, max_new_tokens, should_stop=should_stop,
                                      extract_end=extract_end, tally=tally)
            exp = batch.expected.numpy().reshape(len(group), n, n_weeks, len(groups))
            expected[group] = exp
            for gi, i in enumerate(group):
                start = max(0.0, (tls[gi].as_of - tls[gi].clock).total_seconds())
                for j in range(n):
                    toks = np.asarray(batch.tokens[gi * n + j], dtype=np.int64)
                    hit = member[toks]
                    if hit.any():
                        week = np.clip((batch.elapsed_s[gi * n + j] - start) // (7 * DAY), 0, n_weeks - 1)
                        rows, cols = np.nonzero(hit)
                        np.add.at(realized[i, j], (week[rows].astype(np.int64), cols), 1)
        return realized, expected

    @torch.no_grad()
    def task_risks(self, timelines: Sequence[Timeline], task: TaskSpec, n: int = 10, *, seed: int = 0,
                   max_new_tokens: int = 512, batch_rows: int = 512, extract_end: datetime | None = None,
                   integrate_exits: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """P(``task`` fires) per timeline, with its Monte Carlo standard error: (risk, stderr) arrays.

        Rao-Blackwellised futures: at every step the probability that the next event matches the task is
        accumulated (survival ``S *= 1 - p_match``) and the path continues as if it did not match (matches are
        masked and the rest renormalised), until the window ends, a stop code, or death. ``1 - S`` of one path is
        an unbiased estimate of the risk with far less variance than counting hits, so a handful of paths
        separate a 3% from a 6% risk — what AUROC at low prevalence needs. Dead subjects get NaN.
        ``extract_end``: see :meth:`sample_futures`.

        ``integrate_exits`` (default :attr:`integrate_exits`): leaving the window is integrated too, not sampled.
        At every step the probability that the next token carries the path past the window's end (a gap longer
        than what is left of it, or ``[END]``) is taken off the path's weight and the path continues inside the
        window; the risk is the sum over steps of weight x P(match). Sampled exits made a path that drew one long
        gap first worth exactly 0: with 10 futures a quarter of the discharge points of a 30k cohort scored
        ~1e-6, below every other point (bench/RESULTS.md).
        """
        if task.value != "binary":
            raise ValueError(f"task {task.name} is not binary")
        match = torch.tensor([task.matches(t) for t in self.vocab.tokens])
        stop = torch.tensor([bool(task.stop_codes) and task.matches(t, task.stop_codes) for t in self.vocab.tokens])
        risk = np.full(len(timelines), np.nan)
        se = np.full(len(timelines), np.nan)
        live = [i for i, t in enumerate(timelines) if not t.dead]
        per_batch = max(1, batch_rows // n)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for b in range(0, len(live), per_batch):
            group = live[b:b + per_batch]
            batch = self.sample_batch([timelines[i] for i in group], n, task.window_days, 1.0, 1.0, gen,
                                      max_new_tokens, match=match, stop=stop, extract_end=extract_end,
                                      integrate_exits=self.integrate_exits if integrate_exits is None
                                      else integrate_exits)
            hit = (1.0 - batch.survival.numpy()).reshape(len(group), n)
            risk[group] = hit.mean(1)
            se[group] = hit.std(1, ddof=1) / np.sqrt(n) if n > 1 else np.nan
        return risk, se


    def sample_batch(self, tls: Sequence[Timeline], n: int, horizon_days: float, temperature: float,
                     top_p: float, gen: torch.Generator, max_new_tokens: int, *, match: torch.Tensor | None = None,
                     stop: torch.Tensor | None = None, should_stop: Callable[[], bool] | None = None,
                     extract_end: datetime | None = None, tally: torch.Tensor | None = None,
                     integrate_exits: bool = False) -> SampledBatch:
        """Decode ``n`` futures per prompt; with ``match`` also the survival of each path (see task_risks, and
        ``integrate_exits`` there).

        The first gap of a future is only known to be longer than the time already elapsed since the last
        recorded event (``as_of - clock``): a row that is still inside that wait may only draw a gap token, the
        bin that straddles the wait is weighted by its share above it, and the gap's length is drawn inside the
        bin, above the wait (log-uniform, the bins being log-spaced) — not the bin's representative length, which
        would put the first event of every quiet subject at a fixed offset after ``as_of``, most often inside the
        horizon (this made futures hold about twice the observed admissions: see tests/test_catchment.py). Later
        gaps advance by the representative length, the clock the model was trained on. ``[END]`` with
        ``extract_end``: see :meth:`sample_futures`. MONTH markers (``force_months``): see
        :mod:`foresight.forecast.months`.

        ``should_stop()``: asked before the prompt pass and before every decoding step; True raises
        :class:`SamplingCancelled` (see :meth:`sample_futures`).
        """
        if should_stop is not None and should_stop():
            raise SamplingCancelled("sampling stopped before the prompt pass")
        dev = self.device
        lens = [len(t.tokens) for t in tls]
        width = max(lens)
        pad = self.vocab.index[PAD]
        ids = torch.full((len(tls), width), pad, dtype=torch.long)
        mask = torch.zeros((len(tls), width), dtype=torch.long)
        for r, t in enumerate(tls):  # left padding: the last prompt token of every row is at the same column
            ids[r, width - lens[r]:] = torch.from_numpy(t.tokens)
            mask[r, width - lens[r]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True)
        cache = out.cache
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0).to(dev)
        next_pos = (pos[:, -1] + 1).repeat_interleave(n, 0).to(dev)
        rows = len(tls) * n
        # per-row state: seconds still to wait before the future may have an event, clock, horizon
        wait = torch.tensor([max(0.0, (t.as_of - t.clock).total_seconds()) for t in tls],
                            dtype=torch.float64).repeat_interleave(n)
        elapsed = torch.zeros(rows, dtype=torch.float64)  # clock advance since the prompt
        limit = wait + horizon_days * DAY
        # seconds from each prompt's clock to the extract's end: [END] (censoring) may be drawn before it only
        censor = torch.tensor([(extract_end - t.clock).total_seconds() if extract_end else -math.inf for t in tls],
                              dtype=torch.float64).repeat_interleave(n)
        active = torch.arange(rows)  # original row index of each batch row
        generated = torch.full((rows, max_new_tokens), -1, dtype=torch.long)
        length = torch.zeros(rows, dtype=torch.long)
        clock_at = torch.zeros((rows, max_new_tokens), dtype=torch.float64)  # elapsed seconds after each token
        start = wait.clone()  # as_of, in seconds after each prompt's clock
        n_weeks = max(1, math.ceil(horizon_days / 7))
        expected = torch.zeros((rows, n_weeks, tally.shape[1]), dtype=torch.float64) if tally is not None else None
        paths = _PathWeights(rows, integrate_exits and match is not None, censor >= limit)
        integrate = paths.integrate
        is_time = torch.tensor(self.is_time)
        match_d = match.to(dev) if match is not None else None
        months = MonthClock(self.vocab, tls, n) if self.force_months and self.vocab.config.month_tokens else None
        for step_no in range(max_new_tokens):
            if should_stop is not None and should_stop():
                raise SamplingCancelled(f"sampling stopped after {step_no} decoding steps")
            remaining = (wait[active] - elapsed[active]).clamp(min=0.0)
            probs = self._probabilities(logits, remaining, censor[active] - elapsed[active], temperature, top_p)
            if months is not None:
                probs = months.constrain(probs, active, elapsed[active])
            if expected is not None:  # P(the next token is a tally-k event), at the week the clock stands in
                week = ((elapsed[active] - start[active]).clamp(min=0) // (7 * DAY)).long().clamp(max=n_weeks - 1)
                expected[active, week] += (probs.cpu().double() @ tally.double())
            no_way = torch.zeros(len(active), dtype=torch.bool)
            if match_d is not None:  # accumulate P(match now), then continue down a non-matching path
                probs = paths.settle(self, probs, match_d, active, remaining, limit[active] - elapsed[active])
                no_way = probs.sum(-1).cpu() <= 0  # only matches were possible: the path is settled
                probs = torch.where(no_way.to(dev)[:, None], torch.ones_like(probs), probs)
            probs = probs.cpu()
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
            censored = nxt == self.end_id  # no event before the extract's end
            redraw = censored & (censor[active] < limit[active])  # ... but the horizon goes past it
            if redraw.any():
                wait[active[redraw]] = torch.maximum(wait[active[redraw]], censor[active[redraw]])
                remaining = (wait[active] - elapsed[active]).clamp(min=0.0)
                p = probs[redraw] * self._share_above(remaining[redraw], end=False)
                nxt[redraw] = torch.multinomial(p + (p.sum(-1, keepdim=True) <= 0) * self._year_only, 1,
                                                generator=gen)[:, 0]
                censored &= ~redraw
            if months is not None:
                months.update(active, nxt)
            step_s = self._gap_seconds(nxt, remaining, gen, limit[active] - elapsed[active] if integrate else None)
            new_elapsed = elapsed[active] + step_s
            # the next event would fall past the horizon, or not before the extract's end (itself past it)
            over = ((new_elapsed > limit[active]) & is_time[nxt]) | censored
            kept = active[~over]
            generated[kept, length[kept]] = nxt[~over]
            clock_at[kept, length[kept]] = new_elapsed[~over]
            length[kept] += 1
            elapsed[active] = new_elapsed
            done = over | (nxt == self.death_id) | no_way
            if integrate:
                done |= paths.roulette(active, gen)
            if stop is not None:
                done |= stop[nxt]
            if bool(done.all()):
                break
            keep = (~done).nonzero()[:, 0]
            if len(keep) < len(active):
                cache.batch_select_indices(keep.to(dev))
                mask, next_pos, nxt = mask[keep.to(dev)], next_pos[keep.to(dev)], nxt[keep]
                active = active[keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=dev)], 1)
            step = self.model(input_ids=nxt[:, None].to(dev), attention_mask=mask, position_ids=next_pos[:, None],
                              cache=cache, use_cache=True)
            cache = step.cache
            logits = step.logits[:, -1]
            next_pos = next_pos + 1
        return SampledBatch([generated[r, : length[r]].tolist() for r in range(rows)], paths.survival(),
                            [clock_at[r, : length[r]].numpy() for r in range(rows)], expected)

    def _probabilities(self, logits: torch.Tensor, remaining: torch.Tensor, to_end: torch.Tensor,
                       temperature: float, top_p: float) -> torch.Tensor:
        """Next-token probabilities of the active rows: banned tokens out; ``[END]`` only while the clock is
        before the extract's end (``to_end`` > 0 seconds); rows still inside the elapsed wait (``remaining`` > 0)
        only gaps that end after it (or ``[END]``)."""
        logit = logits.float() / max(temperature, 1e-6)
        end_logit = logit[:, self.end_id].clone() if self.end_id >= 0 else None
        logit = logit.masked_fill(self.banned, float("-inf"))
        if end_logit is not None:
            logit[:, self.end_id] = torch.where((to_end > 0).to(logit.device), end_logit, float("-inf"))
        waiting = remaining > 0
        if waiting.any():
            share = self._share_above(remaining[waiting])
            logit[waiting.to(logit.device)] = logit[waiting.to(logit.device)] + share.log().to(logit.device)
        probs = torch.softmax(logit, -1)
        return _top_p(probs, top_p) if top_p < 1.0 else probs

    @property
    def _year_only(self) -> torch.Tensor:
        """(V,) a one-hot on the 1-year gap token (the draw of last resort while a wait remains)."""
        out = torch.zeros(len(self.vocab.tokens))
        out[self.year_id] = 1.0
        return out

    def _share_above(self, remaining: torch.Tensor, *, end: bool = True) -> torch.Tensor:
        """(rows, V): for rows still inside the elapsed wait, the share of each gap bin above ``remaining``
        seconds (:func:`foresight.censoring.share_above`: log-uniform within the bin; 1 for the 1-year token, 0 for
        bins below and for every non-gap token: the wait must end before anything else happens). ``[END]`` (no
        event before the extract's end) is compatible with any wait: share 1 unless ``end`` is False."""
        share = share_above(self.gaps, remaining)
        if self.end_id >= 0:
            share[:, self.end_id] = 1.0 if end else 0.0
        return share

    def _exit_share(self, remaining: torch.Tensor, room: torch.Tensor, end_exits: torch.Tensor) -> torch.Tensor:
        """(rows, V) float64: the share of each token's draws that end the path outside the window, ``room``
        seconds away. A gap moves the clock by its representative length (0 or 1), except one that ends the
        elapsed wait (``remaining`` > 0; see :meth:`_gap_seconds`): the share of its log-uniform range above
        ``room``. ``[END]``: 1 for rows whose extract ends after the window (``end_exits``), else 0 (it is redrawn
        then); 0 for every other token."""
        is_t = torch.from_numpy(self.is_time)[None, :]
        share = (is_t & (self.time_rep_s[None, :] > room[:, None])).double()
        waiting = remaining > 0
        if waiting.any():
            lo = torch.maximum(self.time_lower_s[None, :], remaining[waiting, None])
            hi = torch.maximum(self.time_upper_s_finite[None, :], lo)
            r = room[waiting, None]
            span = torch.log(hi) - torch.log(lo)
            above = (torch.log(hi) - torch.log(torch.minimum(torch.maximum(r, lo), hi))) / span.clamp_min(1e-300)
            s = torch.where(span > 0, above, (lo > r).double())
            s[:, self.year_id] = (self.time_rep_s[self.year_id] > r[:, 0]).double()
            share[waiting] = torch.where(is_t, s, 0.0)
        if self.end_id >= 0:
            share[:, self.end_id] = end_exits.double()
        return share

    def _gap_seconds(self, nxt: torch.Tensor, remaining: torch.Tensor, gen: torch.Generator,
                     room: torch.Tensor | None = None) -> torch.Tensor:
        """Seconds each sampled token moves the clock: a gap's representative length, except for a gap that
        ends the elapsed wait (``remaining`` > 0): drawn log-uniformly in its bin above ``remaining`` (and, with
        ``room``, below it: a path held inside the window, see :meth:`_exit_share`)."""
        step = self.time_rep_s[nxt].clone()
        drawn = (remaining > 0) & torch.from_numpy(self.is_time)[nxt] & (nxt != self.year_id)
        if drawn.any():
            lo = torch.maximum(self.time_lower_s[nxt[drawn]], remaining[drawn])
            hi = torch.maximum(self.time_upper_s_finite[nxt[drawn]], lo)
            if room is not None:
                hi = torch.maximum(torch.minimum(hi, room[drawn]), lo)
            u = torch.rand(int(drawn.sum()), generator=gen, dtype=torch.float64)
            step[drawn] = torch.exp(torch.log(lo) + u * (torch.log(hi) - torch.log(lo)))
        return step

    def _decode_future(self, tl: Timeline, tokens: list[int], clock_at: np.ndarray,
                       horizon_days: float) -> list[dict[str, Any]]:
        """Events of one future, each at the clock its token was sampled at (``clock_at``: seconds after
        ``tl.clock``), kept when on or before the horizon."""
        events = decode(self.vocab, tokens, start_time=tl.clock)
        produces = ~(self.vocab.is_time | self.vocab.is_value | self.vocab.is_marker | self.vocab.is_special)
        at = [float(clock_at[k]) for k, t in enumerate(tokens) if produces[t]]
        end = tl.as_of + timedelta(days=horizon_days)
        out = []
        for e, s in zip(events, at, strict=True):
            if e["time"] is None:
                continue
            e["time"] = max(tl.clock + timedelta(seconds=s), tl.as_of)  # rounding only: the wait ends after as_of
            if e["time"] <= end:
                out.append(e)
        return out



def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches ``top_p``."""
    sorted_p, idx = torch.sort(probs, descending=True, dim=-1)
    cum = sorted_p.cumsum(-1)
    drop = cum - sorted_p > top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return out / out.sum(-1, keepdim=True)

