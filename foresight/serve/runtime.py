"""The model runtime: the loaded forecaster, the optional warehouse (with the opt-out honoured), and the work
each endpoint does. Everything here runs on the one model thread (:meth:`Runtime.run`); the app only routes.

National data opt-out: ``ServeConfig.exclude_subjects_file`` (the same file as ``foresight tokenize
--exclude-subjects``, read by :mod:`foresight.optout`) hides the listed subjects from every warehouse query the
service makes: a lookup of one answers exactly what a lookup of an unknown id answers (404), so the response does
not reveal who is on the list, and cohort rates never count them. The file is re-read when it changes, so a new
opt-out applies without a restart (a file that becomes unreadable keeps the last list).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import duckdb

from foresight import optout
from foresight.forecast import (
    BUILTIN_TASKS,
    CohortInputs,
    Forecaster,
    PopulationForecast,
    SamplingCancelled,
    load_task,
    population_rates,
    risk_with_interval,
    select_cohort,
    weekly_history_events,
)
from foresight.forecast.cohorts import EventKey
from foresight.serve.audit_log import AuditLog
from foresight.serve.batching import MicroBatcher
from foresight.serve.config import ServeConfig
from foresight.serve.disclosure import Release, ReleaseGuard, release_of
from foresight.serve.schemas import (
    CohortRateRequest,
    CohortRateResponse,
    Event,
    ExplainRequest,
    ExplainResponse,
    NextEventsRequest,
    NextEventsResponse,
    RiskRequest,
    RiskResponse,
    SimilarRequest,
    SimilarResponse,
    TaskModel,
    TimelineQuery,
)
from foresight.serve.security import ApiKey, KeyStore, RateLimiter, file_stamp, suppress_count
from foresight.serve.similar import SimilarRefused, SimilarService
from foresight.warehouse import connect

WAREHOUSE_RETRY_S = 5  # Retry-After while an ETL holds the warehouse
COHORT_RETRY_S = 10  # Retry-After while another cohort forecast is running
EXPLAIN_WHY = ("leave-one-event-out: each past event is removed and the timeline re-encoded, so the change in "
               "probability is what the prediction would have been had the event not been recorded; "
               "model-agnostic, no gradients, all variants in one batched forward pass")


class QueryError(Exception):
    """A request the model cannot answer as posted: becomes a 4xx with this message."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after  # seconds, for a 503 the client should simply retry


@dataclass
class CohortJob:
    """A cohort-rate request between its warehouse half (model thread) and its sampling half (cohort worker)."""

    query: CohortRateRequest
    as_of: datetime  # the Monday the request's as_of falls in (disclosure.py: a fixed calendar grid)
    samples: int
    inputs: CohortInputs
    cells: list[tuple[datetime, frozenset[EventKey]]]  # the observed history: the events of each week
    release: Release  # what answering discloses, checked against earlier answers
    base: dict[str, Any]  # the response fields known before sampling
    warnings: list[str]


def week_start(t: datetime) -> datetime:
    """Monday 00:00 of ``t``'s week."""
    return t.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=t.weekday())


@dataclass
class NextJob:
    """One next-events request as the batcher carries it (``top_k`` already capped by the server)."""

    query: NextEventsRequest
    top_k: int


class Runtime:
    """The loaded model, the optional warehouse and the serving machinery shared by the endpoints."""

    def __init__(self, config: ServeConfig, forecaster: Any = None) -> None:
        self.config = config
        # keys and the audit chain first: a bad keys file or a broken log stops the server before the model loads
        self.keys = KeyStore(config.keys_file)
        self.limiter = RateLimiter()
        self.audit = AuditLog(config.audit_log, config.audit_key_file, config.audit_new_segment)
        self.fc = forecaster if forecaster is not None else Forecaster.from_pretrained(config.model_dir)
        limit = int(getattr(self.fc.model.config, "max_position_embeddings", 0) or 0) or None
        caps = [c for c in (config.max_prompt_tokens, limit) if c]
        self.max_tokens = min(caps) if caps else None
        self._executor: ThreadPoolExecutor | None = None
        self._con: Any = None  # the warehouse connection of the current unit of work (see warehouse())
        self._warehouse_error: str | None = None  # why the warehouse could not be opened last time, if it could not
        # cohort rates: one at a time, sampled on their own worker; what was released, against differencing
        self._cohort_executor: ThreadPoolExecutor | None = None
        self._cohort_running: threading.Event | None = None  # the running job's cancel flag
        self.cohort_guard = ReleaseGuard(config.suppression.threshold)
        self.cohort_stopped = 0  # cohort forecasts stopped by their deadline or a client that left
        # the opt-out list: read now so a bad file stops the server at start, re-read when the file changes
        self.opt_out: frozenset[int] = frozenset()
        self._opt_out_stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._opt_out_hidden: tuple[int, int] | None = None  # the stamp whose list the connection hides
        self._opt_out_error: str | None = None  # why the file could not be re-read, if it could not
        if config.exclude_subjects_file is not None:
            self._opt_out_stamp = file_stamp(config.exclude_subjects_file)
            self.opt_out = frozenset(optout.read_subjects_file(config.exclude_subjects_file))
        # /v1/similar: the index from `foresight embed` (same model), loaded now so a bad one stops the start
        self.similar_service = SimilarService(config) if config.similar_index is not None else None
        self.batcher = MicroBatcher(self._next_batch_unit, self.executor, config.max_batch,
                                    config.batch_wait_ms / 1000.0)
        self.started = time.time()
        vocab = self.fc.vocab
        is_static = vocab.is_static
        self.allowed_code = self.fc.is_event | is_static  # posted codes may not be markers, gaps or specials
        self.static_kinds = set(vocab.config.static_kinds)

    def executor(self) -> ThreadPoolExecutor:
        """The one model thread: forward passes and warehouse reads never overlap (DuckDB connections and torch
        on a few cores both prefer one user)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foresight-model")
        return self._executor

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the model thread, awaited from the event loop (the warehouse is closed after it)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor(), self._unit, fn, *args)

    def _unit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One unit of work on the model thread: a warehouse connection it opened is closed when it ends."""
        try:
            return fn(*args)
        finally:
            self._close_warehouse()

    def _next_batch_unit(self, jobs: list[NextJob]) -> list[Any]:
        return self._unit(self._run_next_batch, jobs)

    def cohort_executor(self) -> ThreadPoolExecutor:
        """The cohort worker: a cohort forecast samples here, off the model thread, so next-events, risk and
        explain keep answering while it runs (torch releases the GIL in its kernels; the two interleave)."""
        if self._cohort_executor is None:
            self._cohort_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foresight-cohort")
        return self._cohort_executor

    async def shutdown(self) -> None:
        """Stop batching, close the warehouse on the model thread, then flush and close the audit log."""
        await self.batcher.stop()
        if self._cohort_running is not None:
            self._cohort_running.set()  # a cohort forecast still sampling stops at its next step
        if self._cohort_executor is not None:
            self._cohort_executor.shutdown(wait=True)
            self._cohort_executor = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # each unit of work closed its own warehouse connection
            self._executor = None
        self.audit.close()

    # -- warehouse (model thread only) --

    def warehouse(self) -> Any:
        """The read-only warehouse connection of this unit of work, with the current opt-out list hidden.

        Opened on first use in a unit (:meth:`run`) and closed when the unit ends, so the server holds no lock
        between requests and an ETL can write the warehouse while it runs. While a writer holds the file, the
        request gets 503 with Retry-After (DuckDB: one writing process, or any number of reading ones).
        """
        if self.config.db is None:
            raise QueryError(400, "this server has no warehouse attached (start it with --db FILE)")
        if self._con is None:
            try:
                self._con = connect(self.config.db, read_only=True)
            except (duckdb.Error, OSError) as exc:
                busy = "lock" in str(exc).lower()
                if str(exc) != self._warehouse_error:  # once per problem, not once per request
                    print(f"foresight serve: warehouse {self.config.db} not readable now: {exc}", file=sys.stderr)
                self._warehouse_error = str(exc)
                raise QueryError(503, "the warehouse is being written (an ETL is running): retry shortly" if busy
                                 else "the warehouse cannot be read right now: retry shortly",
                                 retry_after=WAREHOUSE_RETRY_S) from exc
            self._opt_out_hidden, self._warehouse_error = None, None
        self._honour_opt_out()
        return self._con

    def _honour_opt_out(self) -> None:
        """Hide the opted-out subjects from every query on the connection (re-reading a changed list first).

        TEMP views shadow ``events``/``subject_splits``/``notes`` (:func:`foresight.optout.hide_subjects`), so
        lookups, cohorts and histories cannot see the listed subjects: an opted-out id is indistinguishable from
        an id the warehouse never held. A list that cannot be read keeps the previous one in force.
        """
        self.current_opt_out()
        if self._con is not None and self._opt_out_hidden != self._opt_out_stamp:
            optout.hide_subjects(self._con, self.opt_out)
            self._opt_out_hidden = self._opt_out_stamp

    def current_opt_out(self) -> frozenset[int]:
        """The opt-out list, re-read first when its file changed (an unreadable file keeps the last list)."""
        path = self.config.exclude_subjects_file
        if path is None:
            return self.opt_out
        try:
            stamp = file_stamp(path)
            if stamp != self._opt_out_stamp:
                self.opt_out = frozenset(optout.read_subjects_file(path))
                self._opt_out_stamp = stamp
        except (OSError, optout.OptOutError) as exc:
            if str(exc) != self._opt_out_error:  # once per problem, not once per request
                print(f"foresight serve: keeping the last opt-out list ({len(self.opt_out)} subjects): {exc}",
                      file=sys.stderr)
            self._opt_out_error = str(exc)
        else:
            self._opt_out_error = None
        return self.opt_out

    def check_split_scope(self, key: ApiKey, subject_id: int, as_of: datetime | None) -> None:
        """A scoped key may look up only subjects of its splits: 403 otherwise.

        A subject the warehouse does not show (unknown, or hidden by the opt-out) answers the 404 an unknown id
        gets on the lookup itself, so a scoped key learns nothing more about the opt-out list than any key.
        """
        rows = self.warehouse().execute("SELECT split FROM subject_splits WHERE subject_id = ?",
                                        [subject_id]).fetchall()
        if not rows:
            raise QueryError(404, f"subject {subject_id} has no events" + (f" up to {as_of}" if as_of else ""))
        if not key.allows_split(rows[0][0]):
            raise QueryError(403, f"this key may look up subjects of the {', '.join(key.splits or ())} split(s) "
                                  "only")

    def _close_warehouse(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    # -- timelines (model thread) --

    def check_codes(self, events: Sequence[Event]) -> list[str]:
        """Reject reserved token names posted as codes; warn about codes the vocabulary reads as broader tokens."""
        vocab = self.fc.vocab
        unknown: dict[str, str] = {}
        for i, e in enumerate(events):
            if e.code == "MEDS_BIRTH":
                continue
            own = vocab.index.get(e.code)
            token = vocab.token_for(e.code)
            if (own is not None and not self.allowed_code[own]) or not self.allowed_code[vocab.index[token]]:
                raise QueryError(422, f"events[{i}].code {e.code!r} is a reserved token of the model (a time gap, "
                                      "value decile, age/year marker or special token), not an event code")
            kind = e.code.split("//", 1)[0]
            if e.time is None and kind not in self.static_kinds:
                raise QueryError(422, f"events[{i}]: only static facts ({', '.join(sorted(self.static_kinds))}) "
                                      f"may have no time; {e.code!r} needs one")
            if token != e.code and e.code not in vocab.code_map:
                unknown[e.code] = token
        if not unknown:
            return []
        pairs = [f"{c} -> {t}" for c, t in list(unknown.items())[:5]]
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        return [f"{len(unknown)} code(s) not in the model's vocabulary were read as a broader token (an ancestor, "
                f"else their kind's RARE token): {', '.join(pairs)}{more}"]

    def timeline(self, q: TimelineQuery) -> tuple[Any, list[str]]:
        """The query's Timeline (posted events or a warehouse lookup) and its warnings."""
        warnings: list[str] = []
        if q.events is not None:
            if len(q.events) > self.config.max_events:
                raise QueryError(422, f"events: {len(q.events)} events; this server takes at most "
                                      f"{self.config.max_events} per timeline")
            warnings = self.check_codes(q.events)
            try:
                tl = self.fc.timeline_from_events([e.model_dump() for e in q.events], q.as_of)
            except ValueError as exc:
                raise QueryError(422, str(exc)) from exc
        else:
            try:
                tl = self.fc.timeline_from_warehouse(self.warehouse(), int(q.subject_id or 0), q.as_of)
            except KeyError as exc:
                raise QueryError(404, str(exc.args[0])) from exc
        if self.max_tokens is not None and len(tl.tokens) > self.max_tokens:
            raise QueryError(422, f"the timeline encodes to {len(tl.tokens)} tokens; the model takes at most "
                                  f"{self.max_tokens} (post fewer or more recent events)")
        if tl.dead:
            raise QueryError(422, "the timeline ends with MEDS_DEATH: there is no next event to predict")
        return tl, warnings

    def subject_events(self, subject_id: int, as_of: datetime | None) -> list[dict[str, Any]]:
        rows = self.warehouse().execute(
            "SELECT time, code, numeric_value FROM events WHERE subject_id = $s AND ($as_of IS NULL OR time IS NULL "
            "OR time <= $as_of OR code = 'MEDS_BIRTH') ORDER BY time NULLS FIRST, code",
            {"s": subject_id, "as_of": as_of}).fetchall()
        if not rows:
            raise QueryError(404, f"subject {subject_id} has no events" + (f" up to {as_of}" if as_of else ""))
        return [{"time": t, "code": c, "numeric_value": v} for t, c, v in rows]

    # -- work units (model thread) --

    def _run_next_batch(self, jobs: list[NextJob]) -> list[Any]:
        prepared: list[Any] = []
        for job in jobs:
            try:
                prepared.append(self.timeline(job.query))
            except QueryError as exc:
                prepared.append(exc)
        ok = [i for i, p in enumerate(prepared) if not isinstance(p, Exception)]
        dists = self.fc.event_distributions([prepared[i][0] for i in ok]) if ok else []
        results: list[Any] = list(prepared)
        for i, dist in zip(ok, dists, strict=True):
            tl, warnings = prepared[i]
            q = jobs[i].query
            nxt = self.fc.summarise_next(tl, dist, jobs[i].top_k, q.kinds, q.new_only)
            if jobs[i].top_k < q.top_k:
                warnings = [*warnings, f"top_k capped at {jobs[i].top_k}"]
            last = tl.clock if bool(self.fc.is_event[tl.tokens].any()) else None
            results[i] = NextEventsResponse(as_of=tl.as_of, last_event=last, events=nxt.events,
                                            time_to_next=nxt.time_to_next, probability_mass=nxt.probability_mass,
                                            expected_days_to_next=nxt.expected_days_to_next, warnings=warnings)
        return results

    def risk(self, q: RiskRequest) -> RiskResponse:
        try:
            task = load_task(q.task.model_dump() if isinstance(q.task, TaskModel) else _builtin_task(q.task))
        except (ValueError, TypeError) as exc:
            raise QueryError(422, str(exc)) from exc
        if q.horizon_days is not None:
            task = replace(task, window_days=float(q.horizon_days))
        if task.window_days > self.config.max_horizon_days:
            raise QueryError(422, f"horizon {task.window_days:g} days; this server allows at most "
                                  f"{self.config.max_horizon_days:g}")
        tl, w = self.timeline(q)
        max_new = 512  # sample_futures' default cap of new tokens per future
        per_sample = (len(tl.tokens) + max_new) * self.fc.cache_bytes_per_token()
        samples = max(1, min(q.samples, self.config.max_samples, self.config.max_rollout_cache_bytes // per_sample))
        warnings = [] if samples == q.samples else [f"samples capped at {samples} (server limit for this timeline)"]
        r = risk_with_interval(self.fc, tl, task, samples, seed=q.seed)
        return RiskResponse(task=r.task, horizon_days=task.window_days, as_of=tl.as_of, probability=r.probability,
                            low=r.low, high=r.high, interval=r.interval, samples=r.samples, mean_value=r.mean_value,
                            warnings=w + warnings + r.warnings)

    def explain(self, q: ExplainRequest) -> ExplainResponse:
        tl, w = self.timeline(q)  # validates (length, tokens, death) and warns before the variants run
        by_tokens = self.config.max_explain_tokens // max(1, len(tl.tokens)) - 1
        n = max(1, min(q.max_events, self.config.max_explain_events, by_tokens))
        warnings = [] if n == q.max_events else [f"max_events capped at {n} (server limit for this timeline)"]
        if q.events is not None:
            events = [e.model_dump() for e in q.events]
        else:
            events = self.subject_events(int(q.subject_id or 0), q.as_of)
        try:
            ex = self.fc.explain_next_events(events, q.as_of, target=q.target, max_events=n)
        except ValueError as exc:
            raise QueryError(422, str(exc)) from exc
        if q.target and ex.target_tokens == 0:
            w = [*w, "no event token of the model matches `target`: every probability is 0"]
        return ExplainResponse(method=ex.method, why=EXPLAIN_WHY, target=ex.target, probability=ex.probability,
                               events_considered=ex.events_considered, events=ex.events, warnings=w + warnings)

    def similar(self, q: SimilarRequest, key: ApiKey) -> SimilarResponse:
        """The neighbours' suppressed profile (:mod:`foresight.serve.similar`); 400 without an index."""
        if self.similar_service is None:
            raise QueryError(400, "this server has no similar-patient index (start it with --similar-index DIR)")
        try:
            self.similar_service.check_k(q)  # before any work
            tl, warnings = self.timeline(q)
            return self.similar_service.answer(self.fc, tl, q, key, self.current_opt_out(), warnings)
        except SimilarRefused as exc:
            raise QueryError(exc.status, exc.message) from exc

    # -- cohort rates: the warehouse half on the model thread, sampling on the cohort worker --

    def cohort_cost(self, q: CohortRateRequest) -> tuple[int, int, float]:
        """(subjects, samples, cost): the cost in future-days (subjects x samples x horizon days), checked against
        the server's limit before any work. Worked out from the request and the caps only, never from the
        cohort's real size, so a refusal says nothing about who is in it."""
        cfg, threshold = self.config, self.config.suppression.threshold
        subjects = min(q.max_subjects, cfg.max_cohort_subjects)
        samples = min(q.samples, cfg.max_cohort_samples)
        cost = subjects * samples * q.horizon_days
        if subjects < threshold:
            raise QueryError(422, f"max_subjects: a forecast over {subjects} subjects is smaller than the minimum "
                                  f"cohort of {threshold}")
        if cost > cfg.max_cohort_cost:
            raise QueryError(422, f"this request costs {cost:,.0f} future-days ({subjects} subjects x {samples} "
                                  f"samples x {q.horizon_days:g} days); this server allows at most "
                                  f"{cfg.max_cohort_cost:,.0f} per request: ask for fewer subjects, samples or "
                                  "days")
        return subjects, samples, cost

    async def cohort_rate(self, q: CohortRateRequest, key: ApiKey | None = None,
                          cancel: threading.Event | None = None) -> CohortRateResponse:
        """Answer a cohort-rate request within its cost limit and deadline; ``cancel`` set (the client left)
        stops the sampling at its next step."""
        if key is not None and not key.allows_split(q.split):  # a scoped key sees only its splits' subjects
            raise QueryError(403, f"this key may query the {', '.join(key.splits or ())} split(s) only: set "
                                  "`split` to one of them")
        subjects, samples, cost = self.cohort_cost(q)
        if self._cohort_running is not None:
            raise QueryError(503, "a cohort forecast is already running on this server (one at a time): retry "
                                  "shortly", retry_after=COHORT_RETRY_S)
        flag = cancel if cancel is not None else threading.Event()
        self._cohort_running = flag
        deadline = time.monotonic() + self.config.cohort_deadline_s
        try:
            job = await self.run(self.cohort_select, q, subjects, samples)
            if isinstance(job, CohortRateResponse):
                return job

            def should_stop() -> bool:
                return flag.is_set() or time.monotonic() > deadline

            try:
                result = await asyncio.get_running_loop().run_in_executor(
                    self.cohort_executor(), self.cohort_sample, job, should_stop)
            except SamplingCancelled as exc:
                self.cohort_stopped += 1
                why = ("the request was cancelled" if flag.is_set()
                       else f"it ran past this server's deadline of {self.config.cohort_deadline_s:g} s")
                raise QueryError(503, f"the cohort forecast was stopped: {why} (cost {cost:,.0f} future-days); ask "
                                      "for fewer subjects, samples or days") from exc
            return self.cohort_publish(job, result)
        except asyncio.CancelledError:
            flag.set()  # the caller is gone: the worker stops at its next sampling step
            raise
        finally:
            self._cohort_running = None

    def cohort_select(self, q: CohortRateRequest, subjects: int, samples: int) -> CohortJob | CohortRateResponse:
        """Model thread: the cohort, its prompts and its history cells; refused when it is close to an earlier
        release; answered at once when nothing is to be sampled."""
        rule = self.config.suppression
        as_of = week_start(q.as_of)
        warnings = [] if as_of == q.as_of else [
            f"as_of moved to {as_of.date().isoformat()}, the Monday of its week: every week reported is a fixed "
            "calendar week (disclosure control)"]
        if samples < q.samples:
            warnings.append(f"samples capped at {samples}")
        con = self.warehouse()
        inputs = select_cohort(self.fc, con, as_of, codes=q.codes, split=q.split, cohort_codes=q.cohort_codes,
                               max_subjects=subjects, history_weeks=0, seed=q.seed, min_size=rule.threshold)
        base = {"as_of": as_of.date().isoformat(), "horizon_days": q.horizon_days, "codes": q.codes,
                "cohort_size": suppress_count(inputs.cohort_size, rule), "suppression": asdict(rule)}
        if inputs.cohort_size < rule.threshold:  # nothing was encoded or sampled
            return CohortRateResponse(**base, subjects_forecast=suppress_count(0, rule), samples=0, weeks=[],
                                      history=[], warnings=[*warnings, f"the cohort has fewer than {rule.threshold} "
                                                                       "subjects: no forecast is released"])
        cells = (weekly_history_events(con, inputs.subject_ids, as_of, q.history_weeks, q.codes)
                 if inputs.timelines and q.history_weeks else [])
        release = release_of([inputs.cohort_ids, inputs.subject_ids],
                             [(w.date().isoformat(), events) for w, events in cells])
        refusal = self.cohort_guard.refusal(release)
        if refusal is not None:
            raise QueryError(403, refusal)
        if len(inputs.subject_ids) < inputs.cohort_size:
            warnings.append("the forecast is for a random subset of the cohort (max_subjects)")
        if not inputs.timelines:
            self.cohort_guard.record(release)
            return CohortRateResponse(**base, subjects_forecast=suppress_count(0, rule), samples=0, weeks=[],
                                      history=[], warnings=[*warnings, "nobody in the cohort is alive at as_of"])
        return CohortJob(q, as_of, samples, inputs, cells, release, base, warnings)

    def cohort_sample(self, job: CohortJob, should_stop: Callable[[], bool]) -> PopulationForecast:
        """Cohort worker: the sampled futures' weekly rates (raises SamplingCancelled when ``should_stop``)."""
        q = job.query
        return population_rates(self.fc, job.inputs.timelines, job.as_of, q.horizon_days, samples=job.samples,
                                codes=q.codes, seed=q.seed, history=[(w, len(ev)) for w, ev in job.cells],
                                should_stop=should_stop, extract_end=job.inputs.extract_end)

    def cohort_publish(self, job: CohortJob, result: PopulationForecast) -> CohortRateResponse:
        """The answer, every count suppressed or rounded; the release is recorded against later differencing."""
        rule = self.config.suppression
        self.cohort_guard.record(job.release)
        weeks = [{"week_start": w["week_start"], **{k: suppress_count(w[k], rule) for k in
                                                    ("mean", "p05", "p25", "p50", "p75", "p95")}}
                 for w in result.weeks]
        hist = [{"week_start": h["week_start"], "observed": suppress_count(h["observed"], rule)}
                for h in result.history]
        return CohortRateResponse(**job.base, subjects_forecast=suppress_count(result.cohort_size, rule),
                                  samples=job.samples, weeks=weeks, history=hist, warnings=job.warnings)

    def model_card(self) -> dict[str, Any]:
        fc, meta, cfg = self.fc, self.fc.meta, self.fc.model.config
        privacy = self.config.model_dir / "privacy" / "report.json"
        audit: dict[str, Any] = {"report": "absent"}
        if privacy.exists():
            with contextlib.suppress(OSError, ValueError):
                rep = json.loads(privacy.read_text())
                audit = {"report": "present", "passed": rep.get("passed", rep.get("decision"))}
        stats = self.batcher.stats()
        uptime = max(time.time() - self.started, 1e-9)
        stats["requests_per_s_since_start"] = round(self.batcher.items / uptime, 3)
        return {
            "model": self.config.model_dir.name,
            "architecture": type(fc.model).__name__,
            "parameters": sum(p.numel() for p in fc.model.parameters()),
            "layers": getattr(cfg, "num_hidden_layers", None),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "max_prompt_tokens": self.max_tokens,
            "vocab_size": len(fc.vocab.tokens),
            "vocab_min_subjects": fc.vocab.config.min_subjects,
            "data_fingerprint": (meta.get("data") or {}).get("fingerprint") or fc.vocab.fingerprint or None,
            "created": meta.get("created"),
            "preset": meta.get("preset"),
            "metrics": meta.get("metrics"),
            "time_head": (meta.get("time_head") or {}).get("enabled"),
            "privacy_audit": audit,
            "tasks": {name: t.description for name, t in BUILTIN_TASKS.items()},
            "explain_method": EXPLAIN_WHY,
            "suppression": asdict(self.config.suppression),
            "limits": {k: getattr(self.config, k) for k in (
                "max_events", "max_body_bytes", "max_top_k", "max_samples", "max_horizon_days",
                "max_explain_events", "max_explain_tokens", "max_cohort_subjects", "max_cohort_samples",
                "max_cohort_cost", "cohort_deadline_s")},
            "warehouse_attached": self.config.db is not None,
            # that an opt-out is honoured and which list (the digest of the one last read), never who is on it
            "opt_out": {"honoured": self.config.exclude_subjects_file is not None,
                        "list_sha256": optout.digest(self.opt_out) if self.config.exclude_subjects_file else None},
            "serving": stats,
        }


def _builtin_task(name: str) -> str:
    if name not in BUILTIN_TASKS:  # never treat a posted string as a path on the server
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)} (or post a task spec)")
    return name
