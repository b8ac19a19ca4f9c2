"""aiohttp handlers for ``/v1/*``, ``/healthz``, ``/readyz``, ``/metrics``, and the middleware
that gives every response an ``x-request-id`` and turns every ``GatewayError`` into OpenAI's
``{"error": {...}}`` shape (DESIGN §4 HTTP endpoints and Wire rules).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.admission import Admission
from proxy.auth import KeyStore, Principal
from proxy.balancer import Balancer
from proxy.config import Settings, model_matches
from proxy.errors import (
    GatewayError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    RateLimitError,
    RequestTooLargeError,
)
from proxy.limits import (
    DemandBuilder,
    Lease,
    Limiter,
    completion_reserve,
    estimate_prompt_tokens,
    usage_counts,
)
from proxy.observability import (
    Metrics,
    RequestContext,
    access_log,
    error_log,
    new_request_id,
    request_context,
)
from proxy.relay import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    Dispatcher,
    Endpoint,
    InferenceRequest,
    Route,
    StreamJob,
    UnaryResult,
    open_passthrough,
    parse_inference,
    produce_stream,
    send_unary,
)
from proxy.sse import KEEP_ALIVE
from proxy.streams import StreamLog, StreamRegistry
from proxy.upstream import Headers, Upstream, response_headers

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Status logged for a request whose client went away before the answer ended (nginx's 499).
CLIENT_CLOSED = 499

_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass(slots=True)
class Gateway:
    """Everything the handlers share, stored on the app under ``GATEWAY``.

    Attributes:
        settings: the validated config.
        keys: virtual keys.
        balancer: model → deployment.
        upstreams: upstream name → its pooled client.
        limiter: per-key limits (memory or Redis).
        demands: builds each request's limit demand from config.
        admission: in-flight slots and wait queues per upstream.
        dispatcher: attempts, retries and failover.
        streams: live stream logs.
        metrics: Prometheus collectors.
        draining: set on shutdown; ``/readyz`` answers 503 from then on.
    """

    settings: Settings
    keys: KeyStore
    balancer: Balancer
    upstreams: dict[str, Upstream]
    limiter: Limiter
    demands: DemandBuilder
    admission: Admission
    dispatcher: Dispatcher
    streams: StreamRegistry = field(default_factory=StreamRegistry)
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False


    def busy(self) -> bool:
        """Whether any request holds an upstream slot or any stream is still running."""
        return any(self.admission.in_flight(name) for name in self.upstreams) or len(self.streams) > 0


GATEWAY = web.AppKey("gateway", Gateway)


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response encoded with orjson."""
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def error_response(error: GatewayError) -> web.Response:
    """The OpenAI-shaped answer for ``error``, with its retry headers."""
    return json_response(error.to_body(), error.http_status, error.headers())


def _too_large(request: web.Request) -> RequestTooLargeError:
    limit = request.app[GATEWAY].settings.server.max_body_bytes
    return RequestTooLargeError(f"The request body exceeds the limit of {limit} bytes.")


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _too_large(request)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowedError(f"Method {request.method} is not allowed for {request.path}.")
    if isinstance(exc, web.HTTPNotFound):
        return NotFoundError(f"Invalid URL ({request.method} {request.path})")
    return InvalidRequestError(exc.reason or "Bad request.", code=f"http_{exc.status}")


REQUEST_ID = web.RequestKey("request_id", str)


async def add_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streamed or not, carries ``x-request-id``."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["x-request-id"] = request_id


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, request-scoped log context, error shaping, access log and metrics."""
    ctx = RequestContext(new_request_id())
    request[REQUEST_ID] = ctx.request_id
    token = request_context.set(ctx)
    status = 500
    try:
        response = await _handle(request, handler)
        status = CLIENT_CLOSED if ctx.client_closed else response.status
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        _log_access(request, ctx, status)
        request_context.reset(token)


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        gateway_error = _from_http_exception(request, exc)
        response = error_response(gateway_error)
        if isinstance(exc, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    except asyncio.CancelledError:
        raise
    except Exception:
        error_log.exception("unhandled error")
        response = error_response(GatewayError("The gateway had an internal error."))
    return response


def _log_access(request: web.Request, ctx: RequestContext, status: int) -> None:
    gateway = request.app[GATEWAY]
    elapsed_s = time.perf_counter() - ctx.started_at
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "-"
    gateway.metrics.count_request(endpoint, ctx.key_name or "-", status, elapsed_s)
    if not gateway.settings.server.access_log:
        return
    fields: dict[str, object] = {
        "method": request.method, "path": request.path, "status": status,
        "latency_ms": round(elapsed_s * 1000, 2),
    }
    for name in ("model", "upstream", "stream_id"):
        if (value := getattr(ctx, name)) is not None:
            fields[name] = value
    if ctx.usage is not None:
        fields["prompt_tokens"] = ctx.usage.get("prompt_tokens", ctx.usage.get("input_tokens"))
        fields["completion_tokens"] = ctx.usage.get("completion_tokens",
                                                    ctx.usage.get("output_tokens"))
    access_log.info("request", extra={"fields": fields})


async def read_body(request: web.Request) -> bytes:
    """The whole request body, refusing more than ``server.max_body_bytes``.

    Raises:
        RequestTooLargeError: declared or actual size over the limit (413), before any
            upstream is contacted.
    """
    limit = request.app[GATEWAY].settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(request) from None


def authenticate(request: web.Request) -> Principal:
    """The caller's principal, recorded in the request context. Raises ``AuthenticationError``."""
    principal = request.app[GATEWAY].keys.authenticate(request.headers)
    ctx = request_context.get()
    if ctx is not None:
        ctx.key_name = principal.name
    return principal


def inference_handler(endpoint: Endpoint) -> Handler:
    """The handler for one inference endpoint (chat, completions, embeddings, responses):
    DESIGN §3 — authenticate, parse, route, admit against the key's limits, relay, settle."""

    async def handle(request: web.Request) -> web.StreamResponse:
        gateway = request.app[GATEWAY]
        principal = authenticate(request)
        raw = await read_body(request)
        parsed = parse_inference(endpoint, raw)
        gateway.balancer.require(parsed.model, principal.models)
        ctx = request_context.get()
        if ctx is not None:
            ctx.model = parsed.model
        charge = Charge(estimate_prompt_tokens(len(raw)), completion_reserve(
            parsed.payload, gateway.settings.limits.default_reserve_tokens, endpoint.streams))
        try:
            charge.lease = await gateway.limiter.acquire(gateway.demands.demand(
                principal.name, parsed.model, charge.prompt_estimate, charge.completion_reserve))
        except RateLimitError as exc:
            gateway.metrics.rate_limited.labels(principal.name, exc.code or "-").inc()
            raise
        route = Route(parsed.model, principal.models, principal.priority)
        try:
            if parsed.stream:
                job = StreamJob(parsed, route, request.headers, gateway.streams.create(principal.name))
                return await serve_stream(request, gateway, job, charge)
            return await serve_unary(gateway, route, parsed, request.headers, charge)
        except GatewayError as exc:
            exc.extra_headers.update(charge.headers)
            raise

    return handle


@dataclass(slots=True)
class Charge:
    """What a request reserved and how it is settled.

    Attributes:
        prompt_estimate: prompt tokens estimated from the body size.
        completion_reserve: completion tokens reserved (``max_tokens`` times ``n`` or the default).
        lease: the limiter's lease, or ``None`` for an unlimited key.
    """

    prompt_estimate: int
    completion_reserve: int
    lease: Lease | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers every response to a limited key carries."""
        return self.lease.headers if self.lease is not None else {}


async def settle(gateway: Gateway, charge: Charge, model: str, counts: tuple[int, int] | None) -> None:
    """Settle ``charge`` with ``(prompt, completion)`` tokens used; ``None`` charges the
    whole reservation (the request ended without the gateway learning what it used)."""
    lease = charge.lease
    if lease is None:
        return
    if counts is None:
        tokens, usd = lease.demand.tokens, lease.demand.usd
    else:
        tokens = counts[0] + counts[1]
        budget = lease.demand.budget
        usd = gateway.demands.cost_usd(model, *counts) if budget and budget.usd else 0.0
    await gateway.limiter.settle(lease, tokens, usd)


async def serve_unary(gateway: Gateway, route: Route, parsed: InferenceRequest, headers: Headers,
                      charge: Charge) -> web.StreamResponse:
    """Relay a whole answer (with failover); settle with the upstream's usage (nothing after
    an upstream error, the whole reservation if the client left mid-request)."""
    ctx = request_context.get()

    async def attempt(upstream: Upstream) -> UnaryResult:
        if ctx is not None:
            ctx.upstream = upstream.name
        body, _ = parsed.upstream_body(upstream.config.inject_stream_usage)
        return await send_unary(upstream, "POST", parsed.endpoint.path, body, headers)

    counts: tuple[int, int] | None = None
    try:
        result = await gateway.dispatcher.run(route, attempt)
        counts = usage_counts(result.usage)
    except GatewayError:
        counts = (0, 0)
        raise
    finally:
        await settle(gateway, charge, parsed.model, counts)
    if ctx is not None:
        ctx.usage = result.usage
    response = unary_response(result)
    response.headers.update(charge.headers)
    return response


def unary_response(result: UnaryResult) -> web.Response:
    """The client's copy of a whole upstream answer (body byte for byte)."""
    return web.Response(status=result.status, body=result.body,
                        headers=response_headers(result.headers))


async def produce_and_settle(gateway: Gateway, job: StreamJob, charge: Charge) -> None:
    """Run the stream's producer (it holds and frees its upstream slot), then settle its
    charge: the upstream's usage, else the prompt estimate plus one token per event
    generated, else nothing if the stream failed before its first event."""
    try:
        await produce_stream(job, gateway.dispatcher)
    finally:
        counts = usage_counts(job.metering.usage)
        if counts is None:
            counts = (charge.prompt_estimate, job.metering.events) if job.log.last_seq else (0, 0)
        await settle(gateway, charge, job.request.model, counts)


async def serve_stream(request: web.Request, gateway: Gateway, job: StreamJob,
                       charge: Charge) -> web.StreamResponse:
    """Start the producer, wait for the first event, then copy the log to an SSE response.

    An upstream failure before the first event raises it (a real HTTP status); after it,
    the log's error event ends the stream. The reader detaches in every case, which today
    cancels generation if the client left.
    """
    log = job.log
    ctx = request_context.get()
    if ctx is not None:
        ctx.stream_id = log.stream_id
    log.producer = asyncio.get_running_loop().create_task(produce_and_settle(gateway, job, charge))
    gateway.metrics.streams_active.inc()
    try:
        await log.wait(0)
        if log.error is not None:
            raise log.error
        response = web.StreamResponse(headers={**_SSE_HEADERS, **charge.headers,
                                               "X-Stream-Id": log.stream_id})
        await response.prepare(request)
        try:
            await copy_log(response, log, gateway.settings.server.sse_keepalive_s)
        except ConnectionResetError:  # the client left between two writes
            gateway.metrics.client_disconnects.inc()
            if ctx is not None:
                ctx.client_closed = True
        return response
    except asyncio.CancelledError:  # the client left; handler cancellation is on
        gateway.metrics.client_disconnects.inc()
        raise
    finally:
        gateway.metrics.streams_active.dec()
        gateway.streams.detach(log)
        if ctx is not None:
            ctx.usage = job.metering.usage


async def copy_log(response: web.StreamResponse, log: StreamLog, keepalive_s: float,
                   after_seq: int = 0) -> None:
    """Write every frame after ``after_seq`` with its ``id: <stream_id>:<seq>`` line, then the
    live tail, until the log closes. During silence longer than ``keepalive_s`` the single
    line ``: keep-alive`` is written, always between complete events (DESIGN §4).

    Each write is awaited (drained) before the next read of the log.
    """
    prefix = b"id: " + log.stream_id.encode() + b":"
    cursor = after_seq
    while True:
        frames = log.read(cursor)
        if frames:
            out = bytearray()
            for frame in frames:
                cursor += 1
                out += prefix + str(cursor).encode() + b"\n" + frame
            await response.write(out)  # drains once aiohttp's transport buffer is full
            log.ack(cursor)
            continue
        if log.closed:
            break
        try:
            async with asyncio.timeout(keepalive_s):
                await log.wait(cursor)
        except TimeoutError:
            await response.write(KEEP_ALIVE)
    await response.write_eof()


async def list_models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: the union of every upstream's list, filtered to what the key may
    use, plus models named literally in config. Upstreams that fail are left out."""
    gateway = request.app[GATEWAY]
    principal = authenticate(request)
    headers = request.headers
    results = await asyncio.gather(
        *(send_unary(u, "GET", "/models", None, headers) for u in gateway.upstreams.values()),
        return_exceptions=True)
    models: dict[str, Any] = {}
    for upstream, result in zip(gateway.upstreams.values(), results, strict=True):
        for model in _model_entries(upstream, result):
            models.setdefault(model["id"], model)
    for model_id in gateway.balancer.explicit_models():
        models.setdefault(model_id, {"id": model_id, "object": "model", "created": 0,
                                     "owned_by": "shepherd"})
    data = [m for m_id, m in models.items() if principal.may_use(m_id)]
    return json_response({"object": "list", "data": data})


def _model_entries(upstream: Upstream, result: UnaryResult | BaseException) -> list[dict[str, Any]]:
    if isinstance(result, BaseException):
        error_log.warning("model list failed", extra={"upstream": upstream.name,
                                                      "error": type(result).__name__})
        return []
    try:
        data = orjson.loads(result.body).get("data")
    except (orjson.JSONDecodeError, AttributeError):
        return []
    if not isinstance(data, list):
        return []
    patterns = upstream.config.models
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)
            and model_matches(patterns, m["id"])]


async def retrieve_model(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models/{id}``; ids may contain ``/`` (sent as ``%2F`` by new SDKs)."""
    gateway = request.app[GATEWAY]
    principal = authenticate(request)
    model_id = request.match_info["model"]
    name = gateway.balancer.choose(gateway.balancer.candidates(model_id, principal.models))
    path = "/models/" + quote(model_id, safe="/@:")
    try:
        result = await send_unary(gateway.upstreams[name], "GET", path, None, request.headers)
    except GatewayError as exc:
        if exc.http_status == 404:
            raise ModelNotFoundError(model_id) from None
        raise
    return unary_response(result)


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Any other ``/v1/*`` path: sent byte for byte (multipart keeps its boundary) to the
    deployment of the body's ``model`` if it is JSON naming one, else the key's first
    deployment; the answer is streamed back unchanged, still encoded."""
    gateway = request.app[GATEWAY]
    principal = authenticate(request)
    body = await read_body(request)
    model = _json_model(request, body)
    name = (gateway.balancer.choose(gateway.balancer.candidates(model, principal.models))
            if model is not None else gateway.balancer.default_for(principal.models))
    upstream = gateway.upstreams[name]
    path = request.rel_url.raw_path[len("/v1"):]
    async with open_passthrough(upstream, request.method, path, request.rel_url.raw_query_string,
                                request.headers, body or None) as upstream_response:
        response = web.StreamResponse(
            status=upstream_response.status,
            headers=response_headers(upstream_response.headers, keep_encoding=True))
        await response.prepare(request)
        ctx = request_context.get()
        try:
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            if ctx is not None:
                ctx.client_closed = True
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are sent; the only honest signal left is a cut connection.
            error_log.warning("passthrough body failed", extra={"upstream": name,
                                                                "error": type(exc).__name__})
            if request.transport is not None:
                request.transport.abort()
    return response


def _json_model(request: web.Request, body: bytes) -> str | None:
    if not body or request.content_type != "application/json":
        return None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = payload.get("model") if isinstance(payload, dict) else None
    return model if isinstance(model, str) and model else None


async def healthz(request: web.Request) -> web.StreamResponse:
    """``GET /healthz``: 200 while the process serves requests."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    """``GET /readyz``: 200 when some upstream is healthy, 503 when none is or while draining
    for shutdown; the body lists each upstream's state, requests in flight and queued, and
    its keep-alive pool (connections in use and idle)."""
    gateway = request.app[GATEWAY]
    upstreams = {
        name: {"state": gateway.balancer.status(name),
               "in_flight": gateway.admission.in_flight(name),
               "queued": gateway.admission.queued_for(name),
               "pool": u.pool_stats()}
        for name, u in gateway.upstreams.items()
    }
    if gateway.draining:
        status = "draining"
    else:
        status = "ready" if gateway.balancer.any_healthy() else "no_healthy_upstream"
    return json_response({"status": status, "upstreams": upstreams},
                         status=200 if status == "ready" else 503)


async def metrics(request: web.Request) -> web.StreamResponse:
    """``GET /metrics``: Prometheus text exposition."""
    registry = request.app[GATEWAY].metrics.registry
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    """Register every route of DESIGN §4 "HTTP endpoints"."""
    for endpoint in (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES):
        app.router.add_post("/v1" + endpoint.path, inference_handler(endpoint))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/v1/{tail:.*}", passthrough)
