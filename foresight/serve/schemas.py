"""Request and response models of the HTTP API (pydantic): what a request may hold, checked before any work.

Clear 4xx for wrong types, unknown fields (``extra="forbid"``), times out of order or out of range, too many
events; posted times are converted to the warehouse's UTC-naive convention here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from foresight.forecast.timeline import parse_time, utc_naive


def _iso_time(value: Any) -> Any:
    """Times must be ISO 8601 strings (a bare number is ambiguous: seconds? days? since when?); parsed by the one
    function the Python API uses too (:func:`foresight.forecast.timeline.parse_time`)."""
    return parse_time(value)


_naive = utc_naive  # UTC-naive (the warehouse's convention); out-of-range times are an error, not a crash later


def _printable(value: str) -> str:
    """Codes and patterns are printable text: no control characters, no lone UTF-16 surrogates."""
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValueError("must be printable text (no control characters)")
    return value


IsoTime = Annotated[datetime, BeforeValidator(_iso_time)]
Code = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_printable)]
Pattern = Annotated[str, Field(min_length=1, max_length=256, description="glob over codes, e.g. ADMIT//*"),
                    AfterValidator(_printable)]


class Event(BaseModel):
    """One MEDS-shaped event."""

    model_config = ConfigDict(extra="forbid")

    time: IsoTime | None = Field(None, description="When the event became known (ISO 8601; an offset is converted "
                                                   "to UTC). Null only for static facts such as GENDER//F.")
    code: Code = Field(description="KIND//VOCAB//VALUE code, e.g. DX//ICD10CM//E119, or MEDS_BIRTH / MEDS_DEATH")
    numeric_value: float | None = Field(None, allow_inf_nan=False, ge=-1e12, le=1e12)
    text_value: str | None = Field(None, max_length=1000, description="Accepted for MEDS compatibility; unused.")


class TimelineQuery(BaseModel):
    """A timeline: posted ``events`` (any role) or a warehouse ``subject_id`` (analyst role, server with --db)."""

    model_config = ConfigDict(extra="forbid")

    events: list[Event] | None = Field(None, max_length=100_000, description="In time order, static facts first.")
    subject_id: int | None = Field(None, ge=0, le=2**63 - 1)
    as_of: IsoTime | None = Field(None, description="Predict as of this time (default: the last event).")

    @model_validator(mode="after")
    def _check(self) -> TimelineQuery:
        if (self.events is None) == (self.subject_id is None):
            raise ValueError("give exactly one of `events` (a timeline) or `subject_id` (a warehouse lookup)")
        self.as_of = _naive(self.as_of, "as_of")
        if self.events is not None:
            prev: tuple[int, datetime] | None = None
            births = 0
            for i, e in enumerate(self.events):
                e.time = _naive(e.time, f"events[{i}].time")
                if e.code == "MEDS_BIRTH":
                    births += 1
                    if e.time is None:
                        raise ValueError(f"events[{i}]: MEDS_BIRTH needs a time")
                    continue
                if e.time is None:
                    if prev is not None:
                        raise ValueError(f"events[{i}]: events without a time (static facts) must come first")
                    continue
                if prev is not None and e.time < prev[1]:
                    raise ValueError(f"events[{i}].time {e.time.isoformat()} is before events[{prev[0]}].time "
                                     f"{prev[1].isoformat()}: post events in time order")
                prev = (i, e.time)
            if births > 1:
                raise ValueError("more than one MEDS_BIRTH event")
        return self


class NextEventsRequest(TimelineQuery):
    top_k: int = Field(10, ge=1, le=1000)
    kinds: list[Annotated[str, Field(min_length=1, max_length=32), AfterValidator(_printable)]] | None = Field(
        None, max_length=50, description="Only these kinds, e.g. [\"DX\", \"ADMIT\"].")
    new_only: bool = Field(False, description="Only codes not already in the timeline.")


class TaskModel(BaseModel):
    """A zero-shot task (see foresight.forecast.TaskSpec)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable)]
    codes: list[Pattern] = Field(min_length=1, max_length=50)
    window_days: float = Field(gt=0, le=3650, allow_inf_nan=False)
    stop_codes: list[Pattern] = Field(default_factory=list, max_length=50)
    value: Literal["binary", "time"] = "binary"
    description: str = Field("", max_length=500)


class RiskRequest(TimelineQuery):
    task: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable)] | TaskModel = Field(
        description="A built-in task name (see GET /v1/model) or a task spec.")
    horizon_days: float | None = Field(None, gt=0, le=3650, allow_inf_nan=False,
                                       description="Override the task's window.")
    samples: int = Field(50, ge=1, le=10_000, description="Monte Carlo futures (the server caps it).")
    seed: int = Field(0, ge=0, le=2**32 - 1)


class ExplainRequest(TimelineQuery):
    target: list[Pattern] | None = Field(None, max_length=50, description="Globs over event tokens whose "
                                                                           "probability to explain (default: the "
                                                                           "top-1 next event).")
    max_events: int = Field(32, ge=1, le=10_000, description="Most recent events to try removing (server caps it).")


class SimilarRequest(TimelineQuery):
    k: int = Field(50, ge=1, le=10_000, description="Neighbours to describe (at least the small-cell threshold; "
                                                     "the server caps it).")


class CohortRateRequest(BaseModel):
    """Expected weekly events for the warehouse cohort alive at ``as_of`` (optionally with some past codes)."""

    model_config = ConfigDict(extra="forbid")

    as_of: IsoTime
    horizon_days: float = Field(28, gt=0, le=365, allow_inf_nan=False)
    codes: list[Pattern] = Field(default_factory=lambda: ["ADMIT//*"], min_length=1, max_length=50)
    cohort_codes: list[Pattern] | None = Field(None, max_length=50, description="Only subjects with one of these "
                                                                               "codes on or before as_of.")
    split: Literal["train", "tuning", "held_out"] | None = None
    max_subjects: int = Field(200, ge=1, le=100_000)
    samples: int = Field(20, ge=1, le=10_000)
    history_weeks: int = Field(12, ge=0, le=104)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _check(self) -> CohortRateRequest:
        self.as_of = _naive(self.as_of, "as_of")  # type: ignore[assignment]
        return self


class EventProbability(BaseModel):
    token: str
    kind: str
    description: str | None
    probability: float
    new: bool


class TimeBin(BaseModel):
    bin: str
    probability: float


class NextEventsResponse(BaseModel):
    as_of: datetime
    last_event: datetime | None = Field(description="Time of the last timed event (null: only static facts).")
    events: list[EventProbability]
    time_to_next: list[TimeBin]
    probability_mass: float = Field(description="Total probability of events of the allowed kinds.")
    expected_days_to_next: float | None
    warnings: list[str]


class RiskResponse(BaseModel):
    task: str
    horizon_days: float
    as_of: datetime
    probability: float
    low: float
    high: float
    interval: str = Field(description="How low-high was computed.")
    samples: int
    mean_value: float | None = Field(None, description="Time tasks: mean days among futures where it happened.")
    warnings: list[str]


class AttributedEvent(BaseModel):
    index: int = Field(description="Position in the posted (or looked-up) events.")
    time: datetime
    code: str
    token: str
    probability_without: float
    delta: float = Field(description="P(target | timeline) - P(target | timeline without this event).")
    total_variation: float = Field(description="How far the whole next-event distribution moved (0-1).")


class ExplainResponse(BaseModel):
    method: str
    why: str
    target: list[str]
    probability: float
    events_considered: int
    events: list[AttributedEvent]
    warnings: list[str]


Cell = int | str


class CohortWeek(BaseModel):
    week_start: str
    mean: Cell
    p05: Cell
    p25: Cell
    p50: Cell
    p75: Cell
    p95: Cell


class HistoryWeek(BaseModel):
    week_start: str
    observed: Cell


class CohortRateResponse(BaseModel):
    as_of: str
    horizon_days: float
    codes: list[str]
    cohort_size: Cell
    subjects_forecast: Cell
    samples: int
    suppression: dict[str, Any]
    weeks: list[CohortWeek]
    history: list[HistoryWeek]
    warnings: list[str]


class SimilarNeighbour(BaseModel):
    subject_id: int
    distance: float = Field(description="Cosine distance between centred embeddings (0: same direction).")


class SimilarResponse(BaseModel):
    as_of: datetime
    k: int
    index: dict[str, Any] = Field(description="The index searched: its as_of, pooling, metric, kind, horizon_days.")
    profile: dict[str, Any] = Field(description="The neighbours' outcomes and most common events after their "
                                                "as_of, every count suppressed or rounded.")
    neighbours: list[SimilarNeighbour] | None = Field(
        None, description="Analyst keys only: the neighbours within the key's split scope. Null for researchers.")
    suppression: dict[str, Any]
    warnings: list[str]
