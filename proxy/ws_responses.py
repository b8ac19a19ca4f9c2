"""``GET /v1/responses`` with a WebSocket upgrade: OpenAI's Responses WebSocket mode, what
``client.responses.connect()`` in openai-python speaks (DESIGN §4 "WebSocket").

Protocol (OpenAI API reference, "Responses" → WebSocket mode; openai-python
``types/responses/responses_client_event.py`` and ``responses_server_event.py``):

* Client → server: ``{"type": "response.create", ...}`` whose other fields are the body of
  ``POST /v1/responses`` without ``stream`` (implicit) and ``background`` (refused), plus an
  optional ``stream_id``, the socket *lane* the response runs on.
* Server → client: the same ``response.*`` events as the SSE stream, one JSON text frame
  each, every one with its ``sequence_number`` (the upstream's; ``seq - 1`` of the stream
  log when the upstream sends none) and, for a response created on a lane, that
  ``stream_id``. A refused or failed ``response.create`` gets
  ``{"type": "error", "status", "error": {"type", "code", "message", "param", "headers"},
  "retry_after_ms"?, "stream_id"?}`` (``ResponseWsError``) and the socket stays open.

Lanes: a socket runs one lane-less response at a time (a second ``response.create``
without ``stream_id`` while one runs gets the error ``response_already_in_flight``, 409);
creates naming a ``stream_id`` queue on that lane and run FIFO, lanes side by side. At most
``ws.max_in_flight`` creates are running or queued per socket (past it:
``too_many_requests_in_flight``, 503 with ``retry_after_ms``, as on ``/v1/ws``).

Each ``response.create`` becomes ``pipeline.run`` of a ``POST /v1/responses`` body with
``"stream": true`` — limits, admission, failover and the stream log exactly as over HTTP, on
any upstream (none needs WebSocket support). When the socket drops, its streams detach like
an HTTP client's: generation goes on for ``streams.detach_timeout`` and the rest is served
by ``GET /v1/responses/{id}?stream=true&starting_after=N`` (``http_api.retrieve_response``).

A ``GET /v1/responses`` that is not an upgrade passes through to the upstream as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy import pipeline
from proxy.auth import Principal
from proxy.errors import GatewayError, InvalidRequestError, OverloadedError
from proxy.observability import CLIENT_CLOSED, error_log
from proxy.pipeline import GATEWAY, Call, StreamAnswer
from proxy.relay import RESPONSES
from proxy.websocket import (
    ClientSocket,
    RequestScope,
    StreamEvent,
    error_message,
    handshake_principal,
    stream_events,
)

JSONDict = dict[str, Any]

#: The path this module serves (the same as the Responses API's HTTP create).
PATH = "/v1/responses"

#: Client event types (openai-python ``ResponsesClientEvent``); only ``response.create`` is
#: served: steering needs the upstream's own socket.
CREATE = "response.create"

#: Fields of a ``response.create`` that are not part of the ``POST /v1/responses`` body.
_ENVELOPE = ("type", "stream_id")


class ResponseInFlightError(InvalidRequestError):
    """A lane-less ``response.create`` while the socket's lane-less response still runs (409)."""

    status = 409
    default_code = "response_already_in_flight"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application, passthrough: Handler) -> None:
    """Register ``GET /v1/responses``: a WebSocket upgrade is served here, any other GET by
    ``passthrough`` (``http_api.passthrough``, handed over by the app so that the two
    adapters do not import each other). aiohttp resolves a plain path before the
    ``/v1/{tail:.*}`` catch-all whatever the order they were added in (its resource index
    is walked from the longest path prefix)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if not is_websocket_upgrade(request):
            return await passthrough(request)
        return await responses_socket(request)

    app.router.add_route("GET", PATH, handle)


def is_websocket_upgrade(request: web.Request) -> bool:
    """Whether ``request`` asks to upgrade to WebSocket (RFC 6455 §4.1: ``Upgrade:
    websocket``; a malformed handshake is then refused by aiohttp with 400)."""
    tokens = request.headers.get("Upgrade", "").lower().split(",")
    return "websocket" in (token.strip() for token in tokens)


async def responses_socket(request: web.Request) -> web.StreamResponse:
    """``GET /v1/responses`` with a WebSocket upgrade: Responses WebSocket mode until the
    socket closes.

    Raises (before the upgrade, so they are real HTTP statuses with the OpenAI error body):
        AuthenticationError: no or unknown key (401; the key comes as ``Authorization:
            Bearer``, ``x-api-key`` or the subprotocol ``openai-insecure-api-key.<key>``).
        ModelNotFoundError: ``?model=<id>`` names a model the key may not use or nobody
            serves (404), so a client learns at once that its socket would be useless.
        TooManyWebSocketsError: the key holds ``max_websockets`` sockets (429).
        OverloadedError: the gateway is draining (503).
    Cancelling (the client's connection went away) is safe: the socket's streams detach.
    """
    gateway = request.app[GATEWAY]
    principal = handshake_principal(request, required=True)
    assert principal is not None
    socket = await ClientSocket.accept(request, gateway, principal)
    try:
        await ResponsesSession(socket).serve()
    finally:
        socket.release()
    return socket.ws


class ResponsesSession:
    """The lanes of one Responses WebSocket: each lane is a FIFO of request bodies and one
    task that runs them in order (``None`` is the lane-less slot, at most one deep).

    Attributes:
        socket: the accepted socket.
    """

    __slots__ = ("socket", "_lanes", "_tasks")

    def __init__(self, socket: ClientSocket) -> None:
        self.socket = socket
        self._lanes: dict[str | None, deque[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<ResponsesSession lanes={len(self._lanes)} pending={self.pending}>"

    @property
    def pending(self) -> int:
        """Creates running or queued on this socket."""
        return sum(len(queue) for queue in self._lanes.values())

    async def serve(self) -> None:
        """Read client events until the socket closes, then stop the lanes (their streams
        detach; queued creates are dropped). Cancelling is safe in the same way."""
        try:
            async for event in self.socket.messages():
                await self.on_event(event)
        finally:
            await self._stop()

    async def on_event(self, event: JSONDict) -> None:
        """Take one client event: queue a ``response.create`` on its lane, or answer an
        ``error`` event (unknown type, bad envelope, draining, lane busy, too many)."""
        lane = event.get("stream_id")
        fields = {"stream_id": lane} if isinstance(lane, str) else {}
        try:
            self.take(event)
        except GatewayError as exc:
            await send_error(self.socket, exc, **fields)

    def take(self, event: JSONDict) -> None:
        """Queue ``event``'s request on its lane, starting the lane's task if it has none.
        Decides synchronously, so two creates read back to back are ordered as sent.

        Raises:
            InvalidRequestError: not a ``response.create``, a bad ``stream_id``, or
                ``background: true`` (400).
            OverloadedError: the gateway is draining (503 ``shutting_down``), or
                ``ws.max_in_flight`` creates are pending (503 ``too_many_requests_in_flight``,
                as on ``/v1/ws``).
            ResponseInFlightError: the lane-less slot is busy (409).
        """
        if event["type"] != CREATE:
            raise InvalidRequestError(f"Unsupported event type `{event['type']}`; this endpoint "
                                      f"takes `{CREATE}`.", param="type", code="unknown_event_type")
        lane = _lane_of(event)
        body = request_body(event)
        if self.socket.draining:
            raise _shutting_down()
        limit = self.socket.gateway.settings.ws.max_in_flight
        if self.pending >= limit:
            raise OverloadedError(f"This socket already has {limit} responses running or queued "
                                  "(ws.max_in_flight).", code="too_many_requests_in_flight",
                                  retry_after_s=0.1)
        queue = self._lanes.get(lane)
        if queue is not None and lane is None:
            raise ResponseInFlightError(
                "A response is already in flight on this socket; wait for its final event, "
                "or name a `stream_id` lane to run responses side by side.")
        if queue is None:
            queue = self._lanes[lane] = deque()
            task = asyncio.create_task(self._run_lane(lane, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        queue.append(body)

    async def _run_lane(self, lane: str | None, queue: deque[bytes]) -> None:
        """Run the lane's requests in order; the one running stays at the head of the queue.
        Requests still queued when the gateway starts draining are refused."""
        try:
            while queue:
                if self.socket.draining:
                    await send_error(self.socket, _shutting_down(), **_lane_fields(lane))
                else:
                    await _respond_logged(self.socket, queue[0], lane)
                queue.popleft()
        finally:
            if self._lanes.get(lane) is queue:
                del self._lanes[lane]

    async def _stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _respond_logged(socket: ClientSocket, body: bytes, lane: str | None) -> None:
    """``respond``, with a bug in it logged and answered as an internal error event instead
    of ending the lane's task silently."""
    try:
        await respond(socket, body, lane)
    except Exception:
        error_log.exception("responses websocket request failed")
        await send_error(socket, GatewayError("The gateway had an internal error."),
                         **_lane_fields(lane))


def _lane_of(event: JSONDict) -> str | None:
    lane = event.get("stream_id")
    if lane is None or (isinstance(lane, str) and lane):
        return lane
    raise InvalidRequestError("`stream_id` must be a non-empty string.", param="stream_id",
                              code="invalid_type")


def _lane_fields(lane: str | None) -> JSONDict:
    return {} if lane is None else {"stream_id": lane}


def _shutting_down() -> OverloadedError:
    return OverloadedError("The gateway is shutting down; reconnect elsewhere.",
                           code="shutting_down", retry_after_s=1.0)


def request_body(event: JSONDict) -> bytes:
    """The ``POST /v1/responses`` body for a ``response.create`` event: every field but the
    envelope (``type``, ``stream_id``), with ``"stream": true``.

    Raises:
        InvalidRequestError: ``background: true`` (not supported over WebSocket, as the
            OpenAI API reference says) (400).
    """
    if event.get("background"):
        raise InvalidRequestError("`background` is not supported over WebSocket.",
                                  param="background", code="unsupported_parameter")
    body = {name: value for name, value in event.items() if name not in _ENVELOPE}
    body["stream"] = True
    return orjson.dumps(body)


async def respond(socket: ClientSocket, body: bytes, lane: str | None) -> None:
    """Run one ``POST /v1/responses`` stream through the pipeline and write its events to
    ``socket``; a refusal or failure before the first event becomes one ``error`` event.
    Never raises ``GatewayError``. Cancelling (the socket is gone) detaches the stream,
    or cancels it if it had not begun (nobody learnt its id)."""
    with socket.request_scope(RESPONSES.name) as scope:
        try:
            answer = await pipeline.run(socket.gateway,
                                        Call(_principal(socket), RESPONSES, body, socket.headers()))
            if not isinstance(answer, StreamAnswer):  # "stream": true always streams
                raise GatewayError("The upstream answered a stream request without a stream.")
        except GatewayError as exc:
            scope.status = exc.http_status
            await send_error(socket, exc, **_lane_fields(lane))
            return
        await write_events(socket, answer, lane, scope)


def _principal(socket: ClientSocket) -> Principal:
    assert socket.principal is not None  # accepted with the handshake's key
    return socket.principal


async def write_events(socket: ClientSocket, answer: StreamAnswer, lane: str | None,
                       scope: RequestScope) -> None:
    """Copy the stream to the socket, one frame per event (``wire_event``), each send
    awaited, so a client that does not read pauses the upstream read. A socket that is gone
    detaches the reader (status 499); the stream goes on for ``streams.detach_timeout``."""
    gateway = socket.gateway
    gateway.metrics.streams_active.inc()
    try:
        async for event in stream_events(answer.reader, gateway.settings.server.sse_keepalive_s):
            await socket.send_raw(wire_event(event, lane))
    except asyncio.CancelledError:  # the socket is gone: the session stops its lanes
        _client_left(socket, scope)
        raise
    except ConnectionResetError:  # it closed between two sends
        _client_left(socket, scope)
    except GatewayError as exc:  # the log was lost under the reader (evicted, store down)
        scope.status = exc.http_status
        await send_error(socket, exc, **_lane_fields(lane))
    finally:
        gateway.metrics.streams_active.dec()
        answer.reader.close()
        if answer.metering is not None:
            scope.context.usage = answer.metering.usage


def _client_left(socket: ClientSocket, scope: RequestScope) -> None:
    socket.gateway.metrics.client_disconnects.inc()
    scope.status = CLIENT_CLOSED
    scope.context.client_closed = True


def wire_event(event: StreamEvent, lane: str | None) -> bytes:
    """One stream-log event as a Responses WebSocket server event (JSON text).

    * the gateway's error frame ``{"error": {...}}`` → ``{"type": "error", "error": {...}}``;
    * an upstream's flat Responses SSE error ``{"type": "error", "code", "message", "param",
      "sequence_number"}`` → the nested ``ResponseWsError`` shape;
    * any other event: unchanged, plus ``sequence_number`` (``seq - 1``) when it has none,
      plus ``stream_id`` for a lane. Fields are spliced in without re-encoding the event.
    """
    fields = _lane_fields(lane)
    if event.error:
        return _with_fields(event.data, {"type": "error", **fields})
    if b'"error"' in event.data:  # quotes inside generated text are escaped: \"error\"
        nested = _nested_error(event.data, fields)
        if nested is not None:
            return nested
    if b'"sequence_number"' not in event.data:
        fields = {"sequence_number": event.seq - 1, **fields}
    return _with_fields(event.data, fields)


def _nested_error(data: bytes, fields: JSONDict) -> bytes | None:
    obj = _loads(data)
    if not isinstance(obj, dict) or obj.get("type") != "error" or isinstance(obj.get("error"), dict):
        return None
    error = {"type": obj.get("error_type") or "upstream_error", "code": obj.get("code"),
             "message": str(obj.get("message") or "upstream error"), "param": obj.get("param")}
    out: JSONDict = {"type": "error", "error": error, **fields}
    if isinstance(obj.get("sequence_number"), int):
        out["sequence_number"] = obj["sequence_number"]
    return orjson.dumps(out)


def _with_fields(data: bytes, fields: JSONDict) -> bytes:
    """``data`` (a JSON object) with ``fields`` added at the front; not an object: as is."""
    if not fields:
        return data
    if data.startswith(b"{") and not data[1:].lstrip().startswith(b"}"):
        return b"{" + orjson.dumps(fields)[1:-1] + b"," + data[1:]
    obj = _loads(data)
    return orjson.dumps({**fields, **obj}) if isinstance(obj, dict) else data


def _loads(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def error_event(error: GatewayError, **fields: object) -> JSONDict:
    """The ``error`` event for ``error`` (openai-python ``ResponseWsError``): ``status``
    (the HTTP status it would have had), the OpenAI error object with the ``headers`` it
    would have carried (``retry-after``, ``x-ratelimit-*``; omitted when none), and
    ``retry_after_ms`` when it has a retry hint."""
    message = error_message(error, **fields)
    message["status"] = error.http_status
    headers = error.headers()
    if headers and isinstance(message.get("error"), dict):
        message["error"] = {**message["error"], "headers": headers}
    return message


async def send_error(socket: ClientSocket, error: GatewayError, **fields: object) -> None:
    """Send ``error_event(error, **fields)``; a socket already gone is ignored."""
    with contextlib.suppress(ConnectionError):
        await socket.send(error_event(error, **fields))
