"""aiohttp handlers for ``/v1/*``, ``/v1/streams/*``, ``/healthz``, ``/readyz``, ``/metrics``,
and the middleware that gives every response an ``x-request-id`` and turns every
``GatewayError`` into OpenAI's ``{"error": {...}}`` shape (DESIGN §4 HTTP endpoints, Wire
rules, Reconnection). The handlers are thin adapters over ``proxy.pipeline``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import pipeline
from proxy.auth import Principal
from proxy.config import model_matches
from proxy.errors import (
    ExpectationFailedError,
    GatewayError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    RequestTimeoutError,
    RequestTooLargeError,
)
from proxy.observability import (
    CLIENT_CLOSED,
    RequestContext,
    error_log,
    log_access,
    new_request_id,
    request_context,
)
from proxy.pipeline import GATEWAY, Answer, Call, Gateway, StreamAnswer, StreamCursor
from proxy.relay import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    Endpoint,
    RequestHead,
    Route,
    UnaryResult,
    send_unary,
)
from proxy.sse import KEEP_ALIVE
from proxy.streams import (
    StreamNotFoundError,
    UnaryAnswer,
    error_frame,
    parse_last_event_id,
    parse_seq,
    valid_stream_id,
)
from proxy.upstream import Upstream, map_client_error, response_headers

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Status logged for a request whose client went away before the answer ended (nginx's 499).

_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}




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
        if isinstance(exc, RequestTimeoutError):
            response.force_close()  # the rest of the body is never read
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
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "-"
    log_access(gateway.metrics, gateway.settings.server.access_log, request.method, request.path,
               endpoint, status, ctx, time.perf_counter() - ctx.started_at)


async def read_body(request: web.Request) -> bytes:
    """The whole request body, refusing more than ``server.max_body_bytes``.

    Raises:
        RequestTooLargeError: declared or actual size over the limit (413), before any
            upstream is contacted.
        RequestTimeoutError: the body took longer than ``server.body_timeout`` (408); the
            connection is closed once the answer is written.
    """
    _check_declared_size(request)
    try:
        async with asyncio.timeout(request.app[GATEWAY].settings.server.body_timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(request) from None
    except TimeoutError:
        request.content.feed_eof()  # aiohttp skips its lingering read: it closes after the 408
        raise RequestTimeoutError("The request body did not arrive within server.body_timeout.") from None


def _check_declared_size(request: web.Request) -> None:
    """Raise ``RequestTooLargeError`` (413) if ``Content-Length`` is over
    ``server.max_body_bytes``."""
    limit = request.app[GATEWAY].settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request)


async def check_before_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` (RFC 9110 §10.1.1): check the key and the declared
    ``Content-Length`` before inviting the body, so a refused upload is never sent. Returns
    the error response (401, 413) that ends the request, or ``None`` after ``100 Continue``
    (the model and limits are checked once the body is read, before any upstream)."""
    try:
        request.app[GATEWAY].keys.authenticate(request.headers)
        _check_declared_size(request)
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise ExpectationFailedError("Only `Expect: 100-continue` is supported.")
    except GatewayError as exc:
        request[REQUEST_ID] = new_request_id()
        response = error_response(exc)
        response.force_close()  # the client may send the body anyway: do not read it
        return response
    if request.version >= aiohttp.HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim response is not part of the answer
    return None


def authenticate(request: web.Request) -> Principal:
    """The caller's principal, recorded in the request context. Raises ``AuthenticationError``."""
    principal = request.app[GATEWAY].keys.authenticate(request.headers)
    ctx = request_context.get()
    if ctx is not None:
        ctx.key_name = principal.name
    return principal


def inference_handler(endpoint: Endpoint) -> Handler:
    """The handler for one inference endpoint (chat, completions, embeddings, responses):
    authenticate, read the body, run the pipeline (DESIGN §3), write its answer. A POST with
    ``Last-Event-ID: <stream_id>:<seq>`` resumes that stream instead (DESIGN §4)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        gateway = request.app[GATEWAY]
        principal = authenticate(request)
        last_event_id = request.headers.get("Last-Event-ID")
        if last_event_id is not None and endpoint.streams:
            stream_id, after_seq = parse_last_event_id(last_event_id)
            return await write_resumed(request, await pipeline.resume(gateway, principal, stream_id,
                                                                      after_seq))
        call = Call(principal, endpoint, await read_body(request), request.headers,
                    request.headers.get("Idempotency-Key"))
        return await write_answer(request, await pipeline.run(gateway, call))

    return handle


async def write_answer(request: web.Request, answer: Answer) -> web.StreamResponse:
    """Write what the pipeline answered: a whole response, or the stream by cursor."""
    if isinstance(answer, UnaryAnswer):
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)
    return await write_stream(request, answer)


async def write_resumed(request: web.Request, answer: StreamAnswer | None) -> web.StreamResponse:
    """A resumed stream, or ``204 No Content`` when nothing was left after the cursor."""
    if answer is None:
        return web.Response(status=204)
    return await write_stream(request, answer)


async def write_stream(request: web.Request, answer: StreamAnswer) -> web.StreamResponse:
    """Copy the stream to an SSE response: every frame after the reader's cursor with its
    ``id: <stream_id>:<seq>`` line, then the live tail, until the stream ends. During
    silence longer than ``server.sse_keepalive`` the single line ``: keep-alive`` is
    written, always between complete events (DESIGN §4 Wire rules).

    Each write is awaited (drained) before the next read, so a slow client slows the
    upstream read. A client that leaves (noticed at once: aiohttp cancels this handler when
    the connection closes) detaches: the stream goes on for ``streams.detach_timeout``.
    """
    gateway = request.app[GATEWAY]
    reader, ctx = answer.reader, request_context.get()
    gateway.metrics.streams_active.inc()
    response = web.StreamResponse(headers={**_SSE_HEADERS, **answer.headers})
    try:
        await response.prepare(request)
        await _copy_frames(response, reader, gateway.settings.server.sse_keepalive_s)
    except asyncio.CancelledError:  # the connection closed: aiohttp cancels the handler
        _client_left(gateway, ctx)
        raise
    except ConnectionResetError:  # it closed between two writes
        _client_left(gateway, ctx)
    except GatewayError as exc:  # the log was lost under the reader (evicted, store down)
        await response.write(error_frame(exc))
        await response.write_eof()
    finally:
        gateway.metrics.streams_active.dec()
        reader.close()
        if ctx is not None and answer.metering is not None:
            ctx.usage = answer.metering.usage
    return response


def _client_left(gateway: Gateway, ctx: RequestContext | None) -> None:
    gateway.metrics.client_disconnects.inc()
    if ctx is not None:
        ctx.client_closed = True


async def _copy_frames(response: web.StreamResponse, reader: StreamCursor, keepalive_s: float) -> None:
    prefix = b"id: " + reader.stream_id.encode() + b":"
    while (frames := await reader.next(keepalive_s)) is not None:
        if not frames:
            await response.write(KEEP_ALIVE)
            continue
        seq = reader.after_seq - len(frames)
        out = bytearray()
        for frame in frames:
            seq += 1
            out += prefix + str(seq).encode() + b"\n" + frame
        await response.write(out)  # drains once aiohttp's transport buffer is full
    await response.write_eof()


async def stream_resume(request: web.Request) -> web.StreamResponse:
    """``GET /v1/streams/{stream_id}`` with ``Last-Event-ID: <stream_id>:<seq>`` or
    ``?starting_after=<seq>`` (neither: from the start). Works from a browser
    ``EventSource``, which reconnects with ``Last-Event-ID`` by itself (WHATWG HTML §9.2).
    200 replay then live tail; 204 nothing left; 400 malformed or beyond the latest seq;
    404 unknown, expired or another key's; 409 trimmed (``error.earliest_seq``)."""
    gateway = request.app[GATEWAY]
    principal = authenticate(request)
    stream_id = _stream_id(request)
    after_seq = _cursor(request, stream_id)
    return await write_resumed(request, await pipeline.resume(gateway, principal, stream_id, after_seq))


def _stream_id(request: web.Request) -> str:
    stream_id = request.match_info["stream_id"]
    if not valid_stream_id(stream_id):
        raise InvalidRequestError("Stream ids look like gs_<24 hex>.", param="stream_id",
                                  code="invalid_stream_id")
    return stream_id


def _cursor(request: web.Request, stream_id: str) -> int:
    """The seq to resume after: ``Last-Event-ID`` (must name this stream) wins over
    ``starting_after``; 0 when neither is given."""
    last_event_id = request.headers.get("Last-Event-ID")
    if last_event_id is not None:
        named, seq = parse_last_event_id(last_event_id)
        if named != stream_id:
            raise InvalidRequestError("Last-Event-ID names another stream.",
                                      param="Last-Event-ID", code="invalid_cursor")
        return seq
    starting_after = request.query.get("starting_after")
    return 0 if starting_after is None else parse_seq(starting_after, "starting_after")


async def stream_cancel(request: web.Request) -> web.StreamResponse:
    """``POST /v1/streams/{stream_id}/cancel``: stop generation (idempotent; a finished
    stream is left as it is). 404 as for resume."""
    gateway = request.app[GATEWAY]
    principal = authenticate(request)
    stream_id = _stream_id(request)
    await pipeline.cancel_stream(gateway, principal, stream_id)
    return json_response({"id": stream_id, "object": "stream", "cancelled": True})


async def retrieve_response(request: web.Request) -> web.StreamResponse:
    """``GET /v1/responses/{response_id}``: with ``stream=true``, a Responses stream the
    gateway holds is served from its log after ``starting_after`` (the events'
    ``sequence_number``), so ``client.responses.retrieve(id, stream=True,
    starting_after=N)`` resumes on any upstream; anything else passes through to the
    upstream (OpenAI's own stored and background responses)."""
    gateway = request.app[GATEWAY]
    principal = authenticate(request)
    if request.query.get("stream") == "true":
        starting_after = request.query.get("starting_after")
        after = -1 if starting_after is None else parse_seq(starting_after, "starting_after")
        try:
            answer = await pipeline.resume_response(gateway, principal, request.match_info["response_id"],
                                                    after)
        except StreamNotFoundError:
            pass
        else:
            return await write_resumed(request, answer)
    return await passthrough(request)


async def list_models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: the union of every upstream's list, filtered to what the key may
    use, plus models named literally in config. Each upstream is asked through admission
    like any request (a slot, the queue, health); upstreams that fail are left out."""
    gateway = request.app[GATEWAY]
    principal = authenticate(request)

    async def models_of(upstream: Upstream) -> UnaryResult:
        route = Route("", principal.models, principal.priority, upstream=upstream.name)
        return await gateway.dispatcher.run(route, functools.partial(
            send_unary, method="GET", path="/models", body=None, headers=request.headers),
            committed=_no_retry)

    results = await asyncio.gather(*(models_of(u) for u in gateway.upstreams.values()),
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


def _no_retry() -> bool:
    """``committed`` for requests that are not retried (listing, passthrough)."""
    return True


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
    """``GET /v1/models/{id}``; ids may contain ``/`` (sent as ``%2F`` by new SDKs). Routed,
    admitted and failed over like an inference request for that model."""
    gateway = request.app[GATEWAY]
    principal = authenticate(request)
    model_id = request.match_info["model"]
    path = "/models/" + quote(model_id, safe="/@:")
    route = Route(model_id, principal.models, principal.priority)
    try:
        result = await gateway.dispatcher.run(route, functools.partial(
            send_unary, method="GET", path=path, body=None, headers=request.headers))
    except GatewayError as exc:
        if exc.http_status == 404:
            raise ModelNotFoundError(model_id) from None
        raise
    return web.Response(status=result.status, body=result.body,
                        headers=response_headers(result.headers))


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Any other ``/v1/*`` path: sent byte for byte (multipart keeps its boundary) to the
    deployment of the body's ``model`` if it is JSON naming one, else the key's first
    deployment, through admission like any request (not retried: it may not be
    idempotent); the answer is streamed back unchanged, still encoded."""
    gateway = request.app[GATEWAY]
    principal = authenticate(request)
    body = await read_body(request)
    route = _passthrough_route(gateway, principal, _json_model(request, body))
    path = request.rel_url.raw_path[len("/v1"):]

    async def attempt(upstream: Upstream, deadline: float) -> web.StreamResponse:
        try:
            async with asyncio.timeout_at(deadline):
                upstream_response = await upstream.send(
                    request.method, path, body or None, request.headers,
                    query_string=request.rel_url.raw_query_string, passthrough=True)
        except TimeoutError as exc:
            raise map_client_error(upstream, exc) from None
        async with upstream_response:
            return await _relay_passthrough(request, upstream, upstream_response)

    return await gateway.dispatcher.run(route, attempt, committed=_no_retry)


def _passthrough_route(gateway: Gateway, principal: Principal, model: str | None) -> Route:
    if model is not None:
        gateway.balancer.require(model, principal.models)
        return Route(model, principal.models, principal.priority)
    return Route("", principal.models, principal.priority,
                 upstream=gateway.balancer.default_for(principal.models))


async def _relay_passthrough(request: web.Request, upstream: Upstream,
                             upstream_response: aiohttp.ClientResponse) -> web.StreamResponse:
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
        error_log.warning("passthrough body failed", extra={"upstream": upstream.name,
                                                            "error": type(exc).__name__})
        if request.transport is not None:
            request.transport.abort()
    return response


def _json_model(request: web.Request, body: bytes) -> str | None:
    """The ``model`` of a JSON body, read like an inference body's (``RequestHead``: the
    rest is skipped, never decoded); ``None`` when there is none."""
    if not body or request.content_type != "application/json":
        return None
    try:
        model = msgspec.json.decode(body, type=RequestHead).model
    except msgspec.MsgspecError:
        return None
    return model if isinstance(model, str) and model else None


async def healthz(request: web.Request) -> web.StreamResponse:
    """``GET /healthz``: 200 while the process serves requests."""
    return json_response({"status": "ok"})


#: What ``/metrics`` and ``/readyz`` run with ``observability.metrics_auth: admin``: the
#: admin authorization (``app.py`` passes ``admin_api.authorize``, a module of this layer
#: this one does not import). Raises ``AuthenticationError`` (401) or
#: ``PermissionDeniedError`` (403).
AdminCheck = Callable[[web.Request], object]
ADMIN_CHECK: web.AppKey[AdminCheck] = web.AppKey("admin_check")


def check_metrics_access(request: web.Request) -> None:
    """With ``observability.metrics_auth: admin``, require an admin key (``ADMIN_CHECK``);
    they show key and upstream names. Nothing to check with ``none`` (the default).

    Raises:
        AuthenticationError, PermissionDeniedError: no admin key (401/403).
    """
    if request.app[GATEWAY].settings.observability.metrics_auth != "admin":
        return
    check = request.app.get(ADMIN_CHECK)
    if check is None:
        raise PermissionDeniedError("This endpoint needs an admin key and no admin API is set up.",
                                    code="admin_disabled")
    check(request)


async def readyz(request: web.Request) -> web.StreamResponse:
    """``GET /readyz``: 200 when some upstream is healthy, 503 when none is or while draining
    for shutdown; the body lists each upstream's state, requests in flight and queued, and
    its keep-alive pool (connections in use and idle). Needs an admin key with
    ``observability.metrics_auth: admin``."""
    check_metrics_access(request)
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
    """``GET /metrics``: Prometheus text exposition (every worker's with ``--workers N``).
    Needs an admin key with ``observability.metrics_auth: admin``."""
    check_metrics_access(request)
    return web.Response(body=request.app[GATEWAY].metrics.exposition(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    """Register every route of DESIGN §4 "HTTP endpoints"."""
    for endpoint in (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES):
        app.router.add_post("/v1" + endpoint.path, inference_handler(endpoint),
                            expect_handler=check_before_continue)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_get("/v1/streams/{stream_id}", stream_resume)
    app.router.add_post("/v1/streams/{stream_id}/cancel", stream_cancel)
    app.router.add_get("/v1/responses/{response_id}", retrieve_response)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/v1/{tail:.*}", passthrough, expect_handler=check_before_continue)
