"""The researcher query service: next events, risks and explanations over HTTP, behind keys, limits and an audit.

``foresight serve --model MODEL_DIR [--db FILE] [--port P]`` runs :func:`create_app` under uvicorn. Every
answer comes from the same Python API the CLI uses (:class:`foresight.forecast.Forecaster`).

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``)
------------------------------------------------------
=========================  =========  ===========================================================================
``GET  /healthz``          anyone     liveness (no model facts)
``GET  /v1/model``         any key    model card summary, limits, serving statistics
``POST /v1/next-events``   any key    top-k next events + time-to-next distribution for a posted timeline;
                                      ``subject_id`` instead of events needs ``analyst`` and ``--db``
``POST /v1/risk``          any key    a zero-shot task's risk (share of Monte Carlo futures) with a 95% interval
``POST /v1/explain``       any key    the past events that most changed the next-event prediction
``POST /v1/cohort-rate``   any key    expected weekly events for a warehouse cohort, small cells suppressed
``POST /v1/similar``       any key    the nearest indexed patients' profile (outcomes, common next events), small
                                      cells suppressed; their ids only for analyst keys (``--similar-index``)
=========================  =========  ===========================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from foresight.serve.config import ServeConfig
from foresight.serve.runtime import NextJob, QueryError, Runtime
from foresight.serve.schemas import (
    CohortRateRequest,
    CohortRateResponse,
    ExplainRequest,
    ExplainResponse,
    NextEventsRequest,
    NextEventsResponse,
    RiskRequest,
    RiskResponse,
    SimilarRequest,
    SimilarResponse,
    TimelineQuery,
)
from foresight.serve.security import ROLES, ApiKey

# --- middleware: body limit + audit ---------------------------------------------------------------------------


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit:,} bytes")


class GuardMiddleware:
    """Outermost ASGI layer: refuses bodies over the limit (413) and writes one audit record per request."""

    def __init__(self, app: Any, runtime: Runtime) -> None:
        self.app = app
        self.rt = runtime

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rt, limit = self.rt, self.rt.config.max_body_bytes
        state = scope.setdefault("state", {})
        t0 = time.perf_counter()
        sizes = {"in": 0, "out": 0}
        status = {"code": 500}
        held: list[dict[str, Any]] = []  # the answer, held back until its audit record is durable
        logged = {"done": False}

        def record() -> dict[str, Any]:
            logged["done"] = True
            route = scope.get("route")
            return {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "key_id": state.get("key_id"),
                "role": state.get("role"),
                "method": scope.get("method"),
                "endpoint": getattr(route, "path", None) or "(no such endpoint)",
                "status": status["code"],
                "request_bytes": max(sizes["in"], declared or 0),
                "response_bytes": sizes["out"],
                "events": state.get("n_events"),
                "subject_id": state.get("subject_id"),
                "ms": round((time.perf_counter() - t0) * 1000, 2),
            }

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] not in ("http.response.start", "http.response.body"):
                await send(message)
                return
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            else:
                sizes["out"] += len(message.get("body", b""))
            held.append(message)
            if message["type"] == "http.response.start" or message.get("more_body", False):
                return
            # the whole answer is here: log it, wait until the record is on disk, and only then answer
            rec = record()
            try:
                await asyncio.wrap_future(rt.audit.write(rec))
            except OSError:  # no unaudited answers: the record (still owed to the log) says what was sent
                body = _refusal(AUDIT_DOWN)
                rec["status"], rec["response_bytes"] = 503, len(body)
                await _send_json(send, 503, body)
                return
            for m in held:
                await send(m)

        async def receive_limited() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                sizes["in"] += len(message.get("body", b""))
                if sizes["in"] > limit:
                    raise _BodyTooLarge(limit)
            return message

        declared = _content_length(scope)
        try:
            if not rt.audit.healthy:
                await _plain(send_counted, 503, AUDIT_DOWN)
            elif declared is not None and declared > limit:
                await _plain(send_counted, 413, f"request body over {limit:,} bytes")
            else:
                await self.app(scope, receive_limited, send_counted)
        finally:
            if not logged["done"]:  # no complete answer (the app failed, or the request was cancelled)
                rt.audit.write(record())


def _content_length(scope: dict[str, Any]) -> int | None:
    for k, v in scope.get("headers", []):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


AUDIT_DOWN = "the audit log cannot be written: requests are refused"


def _refusal(detail: str) -> bytes:
    return json.dumps({"detail": detail}).encode()


async def _plain(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, detail: str) -> None:
    await _send_json(send, status, _refusal(detail))


async def _send_json(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# --- the app --------------------------------------------------------------------------------------------------


class SafeJSONResponse(JSONResponse):
    """JSON escaped to ASCII: any text echoed back (a posted code in a warning, an error message) renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


bearer = HTTPBearer(auto_error=False, description="API key from `foresight serve keygen`: "
                                                  "`Authorization: Bearer fsk_...`")


def _authenticate(min_role: str) -> Callable[..., Awaitable[ApiKey]]:
    async def dependency(request: Request,
                         creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> ApiKey:
        rt: Runtime = request.app.state.runtime
        if creds is None:
            raise HTTPException(401, "missing API key: send `Authorization: Bearer <key>`",
                                headers={"WWW-Authenticate": "Bearer"})
        key = rt.keys.verify(creds.credentials)
        if key is None:
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        request.state.key_id, request.state.role = key.key_id, key.role
        wait = rt.limiter.take(key)  # before the role check: refused calls count too
        if wait > 0:
            raise HTTPException(429, f"rate limit of {key.rate_per_minute:g} requests/minute exceeded",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if ROLES[key.role] < ROLES[min_role]:
            raise HTTPException(403, f"this endpoint needs the {min_role} role; this key is {key.role}")
        return key

    return dependency


Researcher = Annotated[ApiKey, Depends(_authenticate("researcher"))]


async def _note(request: Request, key: ApiKey, q: TimelineQuery) -> None:
    """Audit sizes (never content) and enforce: subject lookups are for analysts, within the key's splits."""
    if q.events is not None:
        request.state.n_events = len(q.events)
    else:
        request.state.subject_id = q.subject_id  # who looked at which record: the access trail analysts leave
        if ROLES[key.role] < ROLES["analyst"]:
            raise HTTPException(403, "subject lookups need the analyst role; post the timeline as `events`")
        if key.splits is not None:  # unscoped keys skip the extra warehouse read
            rt: Runtime = request.app.state.runtime
            await _answer(rt.run(rt.check_split_scope, key, int(q.subject_id or 0), q.as_of))


async def _answer(fn: Awaitable[Any]) -> Any:
    try:
        return await fn
    except QueryError as exc:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        raise HTTPException(exc.status, exc.message, headers=headers) from exc


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client disconnects (the body is already read, so the next ASGI message is the
    disconnect; the watcher is cancelled when the answer is ready)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


def create_app(config: ServeConfig, forecaster: Any = None) -> FastAPI:
    """The FastAPI app (``forecaster``: an already loaded :class:`Forecaster`, else ``config.model_dir``)."""
    runtime = Runtime(config, forecaster)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await runtime.shutdown()

    app = FastAPI(title="Foresight query service", version="1", lifespan=lifespan,
                  description=(__doc__ or "").strip(), default_response_class=SafeJSONResponse)
    app.state.runtime = runtime
    app.add_middleware(GuardMiddleware, runtime=runtime)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        # where and why only: the posted input is not echoed (it can be a whole timeline)
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": e.get("type")}
                  for e in exc.errors()]
        return SafeJSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and the router's 404/405
    async def http_error(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_card(key: Researcher) -> dict[str, Any]:
        return runtime.model_card()

    @app.post("/v1/next-events", response_model=NextEventsResponse)
    async def next_events(q: NextEventsRequest, request: Request, key: Researcher) -> Any:
        await _note(request, key, q)
        top_k = min(q.top_k, config.max_top_k)
        return await _answer(runtime.batcher.submit(NextJob(q, top_k)))

    @app.post("/v1/risk", response_model=RiskResponse)
    async def risk(q: RiskRequest, request: Request, key: Researcher) -> Any:
        await _note(request, key, q)
        return await _answer(runtime.run(runtime.risk, q))

    @app.post("/v1/explain", response_model=ExplainResponse)
    async def explain(q: ExplainRequest, request: Request, key: Researcher) -> Any:
        await _note(request, key, q)
        return await _answer(runtime.run(runtime.explain, q))

    @app.post("/v1/similar", response_model=SimilarResponse)
    async def similar(q: SimilarRequest, request: Request, key: Researcher) -> Any:
        await _note(request, key, q)
        return await _answer(runtime.run(runtime.similar, q, key))

    @app.post("/v1/cohort-rate", response_model=CohortRateResponse)
    async def cohort_rate(q: CohortRateRequest, request: Request, key: Researcher) -> Any:
        # the heavy part samples on the cohort worker; a client that leaves stops it at the next sampling step
        cancel = threading.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(request, cancel))
        try:
            return await _answer(runtime.cohort_rate(q, key, cancel))
        finally:
            watcher.cancel()

    return app


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the service under uvicorn until interrupted (put TLS in front of it: a reverse proxy)."""
    import uvicorn

    app = create_app(config)
    # uvicorn's access log is off: the audit log is the record of requests, and it holds no query strings
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
