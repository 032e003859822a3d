"""Forecasts from a trained timeline model: next events, Monte Carlo futures, zero-shot risks, population rates.

- :meth:`Forecaster.next_events` — the distribution of the next event: P(the next event is code c) sums the
  paths "c at the current timestamp" and "a gap token, then c" (one batched forward over the 16 gap tokens
  with the prompt's KV cache), so probabilities are over events, not over tokens, and sum to at most 1. The
  time until the next event is the distribution over the gap bins (plus "same timestamp").
- :meth:`Forecaster.sample_futures` — futures for many timelines at once: the prompt is run once per timeline,
  its KV cache is repeated for the samples, and all (timeline, sample) rows are decoded together one token at a
  time (no Python loop over samples, no per-sample ``generate``). Rows stop at the horizon (the token clock
  passes it), at death, or at ``max_new_tokens``; finished rows leave the batch. The first gap is conditioned
  on the time already elapsed since the last recorded event (the future starts at ``as_of``, and the model is
  only allowed gaps that end after it). ``[END]`` (the end of a data extract) is never sampled.
- :class:`TaskSpec` — a zero-shot task as data: a code predicate (glob patterns) and a window after the
  prediction time, optionally stopped by another predicate (e.g. in-hospital = before ``DISCHARGE//*``).
  The risk is the share of futures in which the predicate fires, with a Wilson interval.
- :func:`population_rates` — expected events (e.g. admissions) per week for a cohort, with 50% and 90%
  intervals from the per-sample weekly counts.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foresight.schema import DEATH_CODE, code_kind
from foresight.tokenizer import (
    AGE_PREFIX,
    BIRTH_PREFIX,
    BOS,
    END,
    NO_TIME,
    PAD,
    QUANTILE_PREFIX,
    TIME_PREFIX,
    YEAR_PREFIX,
    Vocabulary,
    decode,
    from_epoch,
    to_epoch,
)

DAY = 86400.0


@dataclass
class Timeline:
    """A prompt: token ids of a timeline so far, the time its token clock stands at, and what it is about."""

    tokens: np.ndarray
    clock: datetime  # time of the last event (the token clock at the end of the prompt)
    as_of: datetime  # when the forecast is made (>= clock); the future starts here
    birth: datetime | None = None
    subject_id: int | None = None
    dead: bool = False


@dataclass
class NextEvents:
    """The next-event distribution of one timeline."""

    events: list[dict[str, Any]]  # token, kind, description, probability, new
    time_to_next: list[dict[str, Any]]  # bin, probability (incl. "same timestamp")
    probability_mass: float  # total probability of the listed filter (all events of the allowed kinds)
    expected_days_to_next: float | None


class Forecaster:
    """A trained model and its vocabulary, ready to answer forecasting questions (CLI, server, flows)."""

    def __init__(self, model: Any, vocab: Vocabulary, meta: dict[str, Any] | None = None,
                 descriptions: dict[str, str] | None = None) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.meta = meta or {}
        self.descriptions = descriptions or {}
        self.device = next(model.parameters()).device
        n = len(vocab.tokens)
        toks = vocab.tokens
        self.is_time = np.array([t.startswith(TIME_PREFIX) for t in toks])
        self.is_marker = np.array([t.startswith((YEAR_PREFIX, AGE_PREFIX)) for t in toks])
        self.is_value = np.array([t.startswith(QUANTILE_PREFIX) and t[1:].isdigit() for t in toks])
        special = {vocab.index[t] for t in (PAD, BOS, END) if t in vocab.index}
        self.is_event = ~(self.is_time | self.is_marker | self.is_value | vocab.is_static
                          | np.array([t.startswith(BIRTH_PREFIX) for t in toks]) | np.isin(np.arange(n), list(special)))
        # tokens never sampled in a future: padding, a new start, end-of-extract, static facts, birth band
        banned = ~(self.is_event | self.is_time | self.is_marker | self.is_value)
        self.banned = torch.tensor(banned, device=self.device)
        self.time_rep_s = torch.zeros(n, dtype=torch.float64)
        self.time_rep_s[torch.tensor(vocab.time_ids)] = torch.tensor(vocab.time_reps_s)
        upper = [*vocab.time_lower_s[1:].tolist(), math.inf]  # upper edge of each bin (the 1Y token: none)
        self.time_upper_s = torch.full((n,), -1.0, dtype=torch.float64)
        self.time_upper_s[torch.tensor(vocab.time_ids)] = torch.tensor(upper, dtype=torch.float64)
        self.year_id = int(vocab.time_ids[-1])
        self.death_id = vocab.index.get(DEATH_CODE, -1)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | None = None) -> Forecaster:
        """Load ``model_dir`` (AutoModelForCausalLM + vocab.json + foresight.json)."""
        from transformers import AutoModelForCausalLM

        model_dir = Path(model_dir)
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
        from foresight.tokenizer import encode_subjects, register_code_map

        register_code_map(con, self.vocab)
        chunk = encode_subjects(con, self.vocab, subject_id, subject_id, as_of=as_of)
        if len(chunk.subject_ids) == 0:
            raise KeyError(f"subject {subject_id} has no events" + (f" up to {as_of}" if as_of else ""))
        return self._timeline(chunk, 0, as_of)

    def timelines_from_warehouse(self, con: Any, subject_ids: Sequence[int], as_of: datetime) -> list[Timeline]:
        """Timelines of many subjects cut at ``as_of`` (encoded in one vectorised pass)."""
        from foresight.tokenizer import encode_subjects, register_code_map

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
        clock_s = int(chunk.clock_s[chunk.offsets[i + 1] - 1]) if len(toks) else 0
        clock = from_epoch(clock_s) if chunk.t0_s[i] != NO_TIME else (as_of or from_epoch(0))
        birth = from_epoch(chunk.birth_s[i]) if chunk.birth_s[i] != NO_TIME else None
        return Timeline(np.asarray(toks, dtype=np.int64), clock, max(as_of or clock, clock), birth,
                        int(chunk.subject_ids[i]), dead)

    def timeline_from_events(self, events: Sequence[dict[str, Any]], as_of: datetime | None = None) -> Timeline:
        """A timeline posted as MEDS-shaped events (``time``, ``code``, optional ``numeric_value``).

        Codes the vocabulary does not know map to their kind's RARE token (the caller can warn)."""
        from foresight.tokenizer import encode_arrays

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
        ids = torch.tensor(timeline.tokens[None, :], device=self.device)
        out = self.model(input_ids=ids, use_cache=True)
        p0 = torch.softmax(out.logits[0, -1].double(), -1).cpu()
        # one batched step over every gap token, reusing the prompt's cache
        gaps = torch.tensor(self.vocab.time_ids, device=self.device)
        cache = out.cache
        cache.batch_repeat_interleave(len(gaps))
        pos = torch.full((len(gaps), 1), ids.shape[1], device=self.device)
        step = self.model(input_ids=gaps[:, None], cache=cache, position_ids=pos, use_cache=False)
        p1 = torch.softmax(step.logits[:, -1].double(), -1).cpu()  # (G, V)
        p_gap = p0[gaps.cpu()]  # (G,)
        event = torch.tensor(self.is_event)
        p_event = p0 * event + (p_gap[:, None] * p1 * event).sum(0)
        allowed = event.clone()
        if kinds:
            wanted = {k.upper() for k in kinds}
            allowed &= torch.tensor([code_kind(t) in wanted for t in self.vocab.tokens])
        seen = set(timeline.tokens.tolist())
        if new_only:
            allowed &= torch.tensor([i not in seen for i in range(len(self.vocab.tokens))])
        masked = torch.where(allowed, p_event, torch.zeros_like(p_event))
        top = torch.topk(masked, min(top_k, int(allowed.sum()))) if int(allowed.sum()) else None
        events = []
        if top is not None:
            for prob, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                tok = self.vocab.tokens[i]
                events.append({"token": tok, "kind": code_kind(tok), "description": self.descriptions.get(tok),
                               "probability": prob, "new": i not in seen})
        # time to the next event: "same timestamp" or one of the gap bins, normalised over those outcomes
        same = float((p0 * event).sum())
        total = same + float(p_gap.sum())
        norm = total if total > 0 else 1.0
        times = [{"bin": "same timestamp", "probability": same / norm}]
        times += [{"bin": self.vocab.tokens[int(g)], "probability": float(p) / norm}
                  for g, p in zip(gaps, p_gap, strict=True)]
        reps = torch.tensor(self.vocab.time_reps_s)
        expected = float((p_gap * reps).sum() / DAY / total) if total > 0 else None
        return NextEvents(events, times, float(masked.sum()), expected)

    # -- futures --

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
    ) -> list[list[list[dict[str, Any]]]]:
        """``n`` futures per timeline up to ``horizon_days`` after its ``as_of``: futures[i][j] = events.

        Each event is MEDS-shaped (time, code, numeric_value); times are never before ``as_of`` and never past
        the horizon. Reproducible for a given seed.
        """
        if n < 1 or horizon_days <= 0:
            raise ValueError("need n >= 1 and horizon_days > 0")
        results: list[list[list[dict[str, Any]]]] = [[[] for _ in range(n)] for _ in timelines]
        live = [i for i, t in enumerate(timelines) if not t.dead]
        per_batch = max(1, batch_rows // n)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for b in range(0, len(live), per_batch):
            group = live[b:b + per_batch]
            toks = self._sample_batch([timelines[i] for i in group], n, horizon_days, temperature, top_p, gen,
                                      max_new_tokens)
            for gi, i in enumerate(group):
                tl = timelines[i]
                for j in range(n):
                    results[i][j] = self._decode_future(tl, toks[gi * n + j], horizon_days)
        return results

    def _sample_batch(self, tls: Sequence[Timeline], n: int, horizon_days: float, temperature: float,
                      top_p: float, gen: torch.Generator, max_new_tokens: int) -> list[list[int]]:
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
        active = torch.arange(rows)  # original row index of each batch row
        generated = torch.full((rows, max_new_tokens), -1, dtype=torch.long)
        length = torch.zeros(rows, dtype=torch.long)
        is_time = torch.tensor(self.is_time)
        for _ in range(max_new_tokens):
            logit = logits.float() / max(temperature, 1e-6)
            logit = logit.masked_fill(self.banned, float("-inf"))
            # rows still inside the elapsed gap: only gaps that end after as_of (a 1-year step if > 1y remains)
            waiting = wait[active] - elapsed[active] > 0
            if waiting.any():
                remaining = (wait[active] - elapsed[active])[waiting]
                ok = (self.time_upper_s[None, :] > remaining[:, None]) & is_time[None, :]
                ok[:, self.year_id] = True
                block = ~ok.to(dev)
                logit[waiting.to(dev)] = logit[waiting.to(dev)].masked_fill(block, float("-inf"))
            probs = torch.softmax(logit, -1)
            if top_p < 1.0:
                probs = _top_p(probs, top_p)
            nxt = torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0]
            step_s = self.time_rep_s[nxt]
            new_elapsed = elapsed[active] + step_s
            over = (new_elapsed > limit[active]) & is_time[nxt]  # the next event would fall past the horizon
            kept = active[~over]
            generated[kept, length[kept]] = nxt[~over]
            length[kept] += 1
            elapsed[active] = new_elapsed
            done = over | (nxt == self.death_id)
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
        return [generated[r, : length[r]].tolist() for r in range(rows)]

    def _decode_future(self, tl: Timeline, tokens: list[int], horizon_days: float) -> list[dict[str, Any]]:
        events = decode(self.vocab, tokens, start_time=tl.clock)
        end = tl.as_of + timedelta(days=horizon_days)
        out = []
        for e in events:
            if e["time"] is None:
                continue
            e["time"] = max(e["time"], tl.as_of)  # the first gap is only known to end after as_of
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


# --- zero-shot tasks ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """A zero-shot task: does an event matching ``codes`` happen within ``window_days`` of the prediction time?

    ``codes`` are glob patterns over Foresight codes/tokens (``ADMIT//*``, ``ICU//ADMIT``, ``MEDS_DEATH``).
    ``stop_codes`` end the window early (``DISCHARGE//*`` for in-hospital outcomes). ``value`` = "time" makes a
    numeric task: days until the first match (e.g. length of stay with ``codes=DISCHARGE//*``).
    """

    name: str
    codes: tuple[str, ...]
    window_days: float
    stop_codes: tuple[str, ...] = ()
    value: str = "binary"  # or "time"
    description: str = ""

    def matches(self, code: str, patterns: Sequence[str] | None = None) -> bool:
        return any(fnmatch.fnmatchcase(code, p) for p in (patterns or self.codes))

    def label(self, future: Sequence[dict[str, Any]], start: datetime) -> float | None:
        """1.0/0.0 (binary) or days to the first match (time; None when none) for one future."""
        end = start + timedelta(days=self.window_days)
        for e in future:
            t = e.get("time")
            if t is None or t < start:
                continue
            if t > end:
                break
            if self.matches(e["code"]):
                return (t - start).total_seconds() / DAY if self.value == "time" else 1.0
            if self.stop_codes and self.matches(e["code"], self.stop_codes):
                break
        return None if self.value == "time" else 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        d = dict(d)
        d["codes"] = tuple(d["codes"] if isinstance(d["codes"], list | tuple) else [d["codes"]])
        d["stop_codes"] = tuple(d.get("stop_codes", ()))
        return cls(**d)


BUILTIN_TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("admission_30d", ("ADMIT//*",), 30, description="any hospital admission within 30 days"),
    TaskSpec("emergency_admission_30d", ("ADMIT//EMERGENCY",), 30,
             description="emergency admission within 30 days"),
    TaskSpec("readmission_30d", ("ADMIT//*",), 30,
             description="readmission within 30 days (predict at discharge)"),
    TaskSpec("mortality_30d", ("MEDS_DEATH",), 30, description="death within 30 days"),
    TaskSpec("in_hospital_mortality", ("MEDS_DEATH",), 365, stop_codes=("DISCHARGE//*",),
             description="death before discharge (predict at admission)"),
    TaskSpec("icu_admission_30d", ("ICU//ADMIT",), 30, description="ICU admission within 30 days"),
    TaskSpec("length_of_stay", ("DISCHARGE//*",), 365, value="time",
             description="days until discharge (predict at admission)"),
)}


def load_task(spec: str | Path | dict[str, Any]) -> TaskSpec:
    """A task by built-in name, from a JSON/YAML file, or from a dict."""
    if isinstance(spec, dict):
        return TaskSpec.from_dict(spec)
    if isinstance(spec, str) and spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec]
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"unknown task {spec!r}: not a built-in ({', '.join(BUILTIN_TASKS)}) nor a file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return TaskSpec.from_dict(yaml.safe_load(text))
    return TaskSpec.from_dict(json.loads(text))


@dataclass
class Risk:
    task: str
    probability: float
    low: float  # 95% Wilson interval over the Monte Carlo samples
    high: float
    samples: int
    mean_value: float | None = None  # time tasks: mean days among futures where it happened


def wilson(k: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (scipy's binomtest)."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    ci = binomtest(round(k), n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def risk_from_futures(task: TaskSpec, futures: Sequence[Sequence[dict[str, Any]]], start: datetime) -> Risk:
    """The risk of ``task`` from one timeline's futures (share of futures where it fires)."""
    labels = [task.label(f, start) for f in futures]
    if task.value == "time":
        hits = [x for x in labels if x is not None]
        k = len(hits)
        lo, hi = wilson(k, len(labels))
        return Risk(task.name, k / len(labels), lo, hi, len(labels), float(np.mean(hits)) if hits else None)
    k = float(sum(labels))
    lo, hi = wilson(k, len(labels))
    return Risk(task.name, k / len(labels), lo, hi, len(labels))


# --- population rates -----------------------------------------------------------------------------------------


@dataclass
class PopulationForecast:
    """Weekly expected counts for a cohort, with intervals over Monte Carlo samples."""

    as_of: str
    horizon_days: float
    codes: tuple[str, ...]
    cohort_size: int
    samples: int
    weeks: list[dict[str, Any]]  # week_start, mean, p05, p25, p50, p75, p95
    history: list[dict[str, Any]] = field(default_factory=list)  # week_start, observed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def weekly_counts(futures: Sequence[Sequence[Sequence[dict[str, Any]]]], as_of: datetime, horizon_days: float,
                  codes: Sequence[str]) -> np.ndarray:
    """(samples, weeks) matching-event counts summed over the cohort."""
    n_weeks = math.ceil(horizon_days / 7)
    n = len(futures[0]) if futures else 0
    counts = np.zeros((n, n_weeks), dtype=np.int64)
    for subject in futures:
        for j, fut in enumerate(subject):
            for e in fut:
                if any(fnmatch.fnmatchcase(e["code"], p) for p in codes):
                    w = int((e["time"] - as_of).total_seconds() // (7 * DAY))
                    if 0 <= w < n_weeks:
                        counts[j, w] += 1
    return counts


def population_rates(forecaster: Forecaster, timelines: Sequence[Timeline], as_of: datetime, horizon_days: float,
                     *, samples: int = 20, codes: Sequence[str] = ("ADMIT//*",), seed: int = 0,
                     history: Sequence[tuple[datetime, int]] = ()) -> PopulationForecast:
    """Expected weekly counts of ``codes`` events in the cohort over the horizon, with 50%/90% intervals."""
    futures = forecaster.sample_futures(timelines, samples, horizon_days, seed=seed)
    counts = weekly_counts(futures, as_of, horizon_days, codes)
    weeks = []
    for w in range(counts.shape[1]):
        c = counts[:, w]
        q = np.percentile(c, [5, 25, 50, 75, 95]) if len(c) else [0] * 5
        weeks.append({"week_start": (as_of + timedelta(days=7 * w)).date().isoformat(), "mean": float(c.mean()),
                      "p05": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]),
                      "p95": float(q[4])})
    return PopulationForecast(as_of.date().isoformat(), horizon_days, tuple(codes), len(timelines), samples, weeks,
                              [{"week_start": d.date().isoformat(), "observed": int(n)} for d, n in history])


def plot_population(forecast: PopulationForecast, path: str | Path, title: str | None = None) -> Path:
    """PNG: observed weekly history, forecast mean, 50% and 90% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    if forecast.history:
        hx = [datetime.fromisoformat(h["week_start"]) for h in forecast.history]
        ax.plot(hx, [h["observed"] for h in forecast.history], color="black", lw=1.2, label="observed")
    fx = [datetime.fromisoformat(w["week_start"]) for w in forecast.weeks]
    ax.fill_between(fx, [w["p05"] for w in forecast.weeks], [w["p95"] for w in forecast.weeks], alpha=0.2,
                    color="tab:blue", label="90% interval")
    ax.fill_between(fx, [w["p25"] for w in forecast.weeks], [w["p75"] for w in forecast.weeks], alpha=0.35,
                    color="tab:blue", label="50% interval")
    ax.plot(fx, [w["mean"] for w in forecast.weeks], color="tab:blue", lw=1.5, label="forecast (mean)")
    ax.axvline(datetime.fromisoformat(forecast.as_of), color="grey", ls="--", lw=1)
    ax.set_ylabel(f"{', '.join(forecast.codes)} per week")
    ax.set_title(title or f"Weekly forecast for {forecast.cohort_size:,} subjects as of {forecast.as_of}")
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- cohorts and history from the warehouse -------------------------------------------------------------------


def _like_patterns(codes: Sequence[str]) -> list[str]:
    return [p.replace("%", r"\%").replace("_", r"\_").replace("*", "%").replace("?", "_") for p in codes]


def cohort_as_of(con: Any, as_of: datetime, *, split: str | None = None, active_days: float | None = 3 * 365,
                 limit: int | None = None, seed: int = 0) -> list[int]:
    """Subjects alive at ``as_of`` with an event on or before it (and, by default, one in the last 3 years)."""
    where, params = ["e.time <= $as_of"], {"as_of": as_of}
    if split:
        where.append("e.subject_id IN (SELECT subject_id FROM subject_splits WHERE split = $split)")
        params["split"] = split
    rows = con.execute(
        f"""
        SELECT e.subject_id FROM events e
        WHERE {' AND '.join(where)}
        GROUP BY e.subject_id
        HAVING count(*) FILTER (WHERE e.code = 'MEDS_DEATH') = 0
           AND ($active IS NULL OR max(e.time) FILTER (WHERE e.code <> 'MEDS_BIRTH') >= $as_of - to_days($active))
        ORDER BY e.subject_id
        """,
        {**params, "active": None if active_days is None else int(active_days)},
    ).fetchall()
    ids = [r[0] for r in rows]
    if limit is not None and len(ids) > limit:
        rng = np.random.default_rng(seed)
        ids = sorted(rng.choice(ids, size=limit, replace=False).tolist())
    return ids


def weekly_history(con: Any, subject_ids: Sequence[int], as_of: datetime, weeks: int,
                   codes: Sequence[str] = ("ADMIT//*",)) -> list[tuple[datetime, int]]:
    """Observed weekly counts of ``codes`` events among ``subject_ids`` in the ``weeks`` before ``as_of``."""
    start = as_of - timedelta(days=7 * weeks)
    con.execute("CREATE OR REPLACE TEMP TABLE history_cohort AS SELECT unnest(?::BIGINT[]) AS subject_id",
                [list(subject_ids)])
    counts = dict(con.execute(
        """
        SELECT floor(date_diff('second', $start, e.time) / (7 * 86400))::INTEGER AS w, count(*)
        FROM events e JOIN history_cohort USING (subject_id)
        WHERE e.time >= $start AND e.time < $as_of
          AND EXISTS (SELECT 1 FROM unnest($patterns::VARCHAR[]) p(pat) WHERE e.code LIKE p.pat ESCAPE '\\')
        GROUP BY w
        """,
        {"start": start, "as_of": as_of, "patterns": _like_patterns(codes)},
    ).fetchall())
    return [(start + timedelta(days=7 * w), int(counts.get(w, 0))) for w in range(weeks)]
