"""The JSON WebSocket endpoints ``/v1/ws`` (native, multiplexed) and ``/v1/ws/stream``
(the relay dialect): thin adapters over the pipeline (DESIGN §4 "WebSocket").

Every request on a socket goes through ``pipeline.run`` exactly as an HTTP request does —
limits, admission, retries, stream logs, metering — so it is limited, queued, metered,
resumable and drained like an SSE one. What the socket shares (handshake checks, frames,
heartbeats, idle timeout, backpressure) is ``proxy.websocket``.

Both check before the upgrade, as real HTTP statuses with the OpenAI error body: a key that
came with the handshake (401), its socket cap ``keys.<name>.max_websockets`` (429) and,
with ``?model=<id>``, the key's access to that model (404). Rate limits apply per request:
a refused request gets an ``error`` frame with ``retry_after_ms`` and the socket stays open.

``/v1/ws`` (native). The key comes with the handshake (``Authorization: Bearer``, or the
subprotocol ``openai-insecure-api-key.<key>`` beside ``shepherd.v1``, which the server
selects) or in a first frame ``{"type": "auth", "api_key"}``. Client frames::

    {"type": "request", "id": "<client id>", "endpoint": "chat.completions", "body": {...}}
    {"type": "cancel", "id": "<client id>"}
    {"type": "resume", "stream_id": "gs_…", "last_seq": 12, "id": "<client id>"}
    {"type": "ping"}

``endpoint`` is ``chat.completions`` (default), ``completions``, ``responses`` or
``embeddings``; ``body`` is the HTTP body, streamed unless it says ``"stream": false``.
Server frames::

    {"type": "chunk", "id", "stream_id", "seq", "data": <the chunk or Responses event>}
    {"type": "done", "id", "stream_id", "usage"}         (the stream ended normally)
    {"type": "response", "id", "data": <the JSON answer>} (a request that does not stream)
    {"type": "error", "id", "error": {...}, "retry_after_ms"?}
    {"type": "pong"}

Up to ``ws.max_in_flight`` requests run at once per socket (past it: ``error``
``too_many_requests_in_flight``). ``cancel`` stops generation (the stream ends with the
``error`` ``stream_cancelled``). A socket that drops detaches its streams as an HTTP client
does; ``resume`` on any socket, on any instance sharing Redis, continues after ``last_seq``
with no chunk lost or repeated (nothing left: ``done`` at once).

``/v1/ws/stream`` (relay dialect). The key comes with the handshake or in ``session.start``
(``auth.api_key``) or a one-shot ``chat.completion`` (``auth.api_key``). Client frames::

    {"type": "session.start", "model", "auth": {"api_key"}, "config": {"temperature", "max_tokens", "stream"}}
    {"type": "chat.message", "role": "user", "content": "..."}
    {"type": "chat.completion", "model", "messages": [...], "stream": true,
     "config": {"temperature", "max_tokens", "top_p", "frequency_penalty", "presence_penalty"}}

A session keeps the conversation: each ``chat.message`` goes upstream with the earlier
turns and answers. Requests on one socket are answered in order. Server frames:
``{"type": "session_established", "model"}`` once ``session.start`` is accepted, then per
answer ``{"type": "content_block_start"}``, ``{"type": "content_delta", "delta":
{"content"}}``…, ``{"type": "message_done", "usage", "stream_id"}``, or ``{"type": "error",
"message", "code"}`` (plus ``retry_after_ms`` when retrying later helps).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from proxy import pipeline
from proxy.auth import Principal
from proxy.errors import AuthenticationError, GatewayError, InvalidRequestError, OverloadedError
from proxy.pipeline import GATEWAY, Call, StreamAnswer
from proxy.relay import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, Endpoint
from proxy.streams import StreamCancelledError, UnaryAnswer
from proxy.websocket import (
    AUTH_FRAME_TIMEOUT_S,
    POLICY_VIOLATION,
    ClientSocket,
    StreamEvent,
    handshake_principal,
    stream_batches,
    stream_events,
    usage_of,
)

JSONDict = dict[str, Any]

#: Endpoints a ``request`` frame may name.
ENDPOINTS: dict[str, Endpoint] = {e.name: e for e in (CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS)}

#: The subprotocol ``/v1/ws`` selects when the client offers it (a browser that offers the
#: key subprotocol must be answered with one of its offers; the key's is never echoed).
NATIVE_SUBPROTOCOL = "shepherd.v1"

#: ``config`` fields of the relay dialect that become chat-completion parameters.
RELAY_PARAMETERS = ("temperature", "max_tokens", "top_p", "frequency_penalty", "presence_penalty")


# --- handshake ------------------------------------------------------------------------------


async def frame_principal(socket: ClientSocket, api_key: object,
                          send_error: Callable[[GatewayError], Awaitable[None]]) -> Principal | None:
    """Authenticate ``socket`` by a key from a frame (``socket`` had none at its handshake);
    on a bad key or a full socket cap, send the ``error`` frame and close with 1008
    (policy violation): the only refusal that cannot be an HTTP status. ``send_error``
    writes the dialect's error frame. ``None``: refused."""
    principal = socket.gateway.keys.lookup(api_key) if isinstance(api_key, str) else None
    try:
        if principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        socket.authenticate(principal)
    except GatewayError as exc:
        await send_error(exc)
        await socket.close(POLICY_VIOLATION, exc.code or "refused")
        return None
    return principal


async def _first_frame(frames: AsyncIterator[JSONDict]) -> JSONDict | None:
    try:
        async with asyncio.timeout(AUTH_FRAME_TIMEOUT_S):
            return await anext(frames, None)
    except TimeoutError:
        return None


# --- /v1/ws ---------------------------------------------------------------------------------


async def native(request: web.Request) -> web.StreamResponse:
    """``GET /v1/ws``: the native multiplexed protocol (module docstring)."""
    gateway = request.app[GATEWAY]
    socket = await ClientSocket.accept(request, gateway, handshake_principal(request),
                                       protocols=(NATIVE_SUBPROTOCOL,))
    frames = socket.messages()
    try:
        if socket.principal is None:
            first = await _first_frame(frames)
            if first is None or first.get("type") != "auth":
                await socket.send_error(AuthenticationError(
                    "Send the key with the handshake or as the first frame "
                    '{"type": "auth", "api_key": "..."}.', code="missing_api_key"))
                await socket.close(POLICY_VIOLATION, "missing_api_key")
                return socket.ws
            if await frame_principal(socket, first.get("api_key"), socket.send_error) is None:
                return socket.ws
        assert socket.principal is not None
        await NativeSession(socket, socket.principal).serve(frames)
    finally:
        socket.release()
    return socket.ws


class NativeSession:
    """The requests of one ``/v1/ws`` socket, each in its own task, by client id."""

    def __init__(self, socket: ClientSocket, principal: Principal) -> None:
        self.socket = socket
        self.principal = principal
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stream_ids: dict[str, str] = {}  # client id → stream id, once known

    async def serve(self, frames: AsyncIterator[JSONDict]) -> None:
        """Dispatch frames until the socket closes; then the streams still being written
        detach (their tasks are cancelled, not their streams)."""
        try:
            async for frame in frames:
                await self.dispatch(frame)
        finally:
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def dispatch(self, frame: JSONDict) -> None:
        """Handle one client frame; a malformed one gets an ``error`` frame."""
        kind = frame["type"]
        if kind == "ping":
            await self.socket.send({"type": "pong"})
        elif kind == "request":
            await self.request(frame)
        elif kind == "resume":
            await self.resume(frame)
        elif kind == "cancel":
            await self.cancel(frame)
        else:
            await self.socket.send_error(InvalidRequestError(
                f"Unknown frame type {kind!r}: expected request, cancel, resume or ping.",
                param="type", code="unknown_frame_type"))

    async def request(self, frame: JSONDict) -> None:
        """``request``: check the frame and the socket's room, then run it in a task."""
        request_id, body = frame.get("id"), frame.get("body")
        endpoint = ENDPOINTS.get(frame.get("endpoint", CHAT.name))
        if not isinstance(request_id, str) or not request_id:
            await self.socket.send_error(InvalidRequestError(
                "A request frame needs a string `id`.", param="id", code="invalid_frame"))
        elif endpoint is None:
            await self.socket.send_error(InvalidRequestError(
                f"Unknown endpoint; expected one of {', '.join(ENDPOINTS)}.", param="endpoint",
                code="unknown_endpoint"), id=request_id)
        elif not isinstance(body, dict):
            await self.socket.send_error(InvalidRequestError(
                "A request frame needs a JSON object `body`.", param="body", code="invalid_frame"),
                id=request_id)
        elif (refused := self._refused(request_id)) is not None:
            await self.socket.send_error(refused, id=request_id)
        else:
            if endpoint.streams and "stream" not in body:
                body = {**body, "stream": True}
            idempotency_key = frame.get("idempotency_key")
            call = Call(self.principal, endpoint, orjson.dumps(body), self.socket.headers(),
                        idempotency_key if isinstance(idempotency_key, str) else None)
            self._start(request_id, endpoint.name, self._run(request_id, call))

    def _refused(self, request_id: str) -> GatewayError | None:
        if self.socket.draining:
            return OverloadedError("The gateway is shutting down; reconnect elsewhere.",
                                   code="shutting_down", retry_after_s=1.0)
        if request_id in self.tasks:
            return InvalidRequestError(f"A request with id {request_id!r} is still in flight.",
                                       param="id", code="duplicate_id")
        limit = self.socket.gateway.settings.ws.max_in_flight
        if len(self.tasks) >= limit:
            return OverloadedError(f"This socket already has {limit} requests in flight "
                                   "(ws.max_in_flight).", code="too_many_requests_in_flight",
                                   retry_after_s=0.1)
        return None

    def _start(self, request_id: str, endpoint: str, work: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            try:
                with self.socket.request_scope(endpoint) as scope:
                    try:
                        await work
                    except GatewayError as exc:
                        scope.status = exc.http_status
                        await self.socket.send_error(exc, id=request_id)
            except ConnectionError:
                pass  # the socket is gone: its streams detach
            finally:
                self.tasks.pop(request_id, None)
                self.stream_ids.pop(request_id, None)

        self.tasks[request_id] = asyncio.get_running_loop().create_task(run())

    async def _run(self, request_id: str, call: Call) -> None:
        answer = await pipeline.run(self.socket.gateway, call)
        if isinstance(answer, UnaryAnswer):
            await self.socket.send_raw(b'{"type":"response","id":' + orjson.dumps(request_id)
                                       + b',"data":' + answer.body + b"}")
            return
        await self._write(request_id, answer)

    async def _write(self, request_id: str, answer: StreamAnswer) -> None:
        """Copy a stream as ``chunk`` frames, then ``done`` with the usage (or the stream's
        ``error``). Each send is awaited: a socket that does not read pauses the stream."""
        reader, socket = answer.reader, self.socket
        stream_id = reader.stream_id
        self.stream_ids[request_id] = stream_id
        head = (b'{"type":"chunk","id":' + orjson.dumps(request_id) + b',"stream_id":"'
                + stream_id.encode() + b'","seq":')
        usage: JSONDict | None = None
        keepalive_s = socket.gateway.settings.server.sse_keepalive_s
        try:
            async for batch in stream_batches(reader, keepalive_s):
                texts = []
                for event in batch:
                    if event.done:
                        continue
                    if event.error:
                        texts.append(b'{"type":"error","id":' + orjson.dumps(request_id) + b',"stream_id":"'
                                     + stream_id.encode() + b'","seq":' + str(event.seq).encode() + b","
                                     + event.data[1:])
                        await socket.send_many(texts)
                        return
                    usage = usage_of(event) or usage
                    texts.append(head + str(event.seq).encode() + b',"data":' + event.data + b"}")
                if texts:
                    await socket.send_many(texts)
        finally:
            reader.close()
        if answer.metering is not None and answer.metering.usage is not None:
            usage = answer.metering.usage
        await socket.send({"type": "done", "id": request_id, "stream_id": stream_id, "usage": usage})

    async def resume(self, frame: JSONDict) -> None:
        """``resume``: attach to ``stream_id`` after ``last_seq`` (here or, with Redis, on
        the instance producing it) and write the rest under the frame's ``id`` (default:
        the stream id)."""
        stream_id, last_seq = frame.get("stream_id"), frame.get("last_seq", 0)
        request_id = frame.get("id", stream_id)
        if not isinstance(stream_id, str) or not isinstance(request_id, str) \
                or not isinstance(last_seq, int) or isinstance(last_seq, bool) or last_seq < 0:
            await self.socket.send_error(InvalidRequestError(
                "A resume frame needs a string `stream_id` and an integer `last_seq` >= 0.",
                param="last_seq", code="invalid_frame"))
            return
        refused = self._refused(request_id)
        if refused is not None:
            await self.socket.send_error(refused, id=request_id)
            return
        self._start(request_id, "resume", self._resume(request_id, stream_id, last_seq))

    async def _resume(self, request_id: str, stream_id: str, last_seq: int) -> None:
        socket = self.socket
        answer = await pipeline.resume(socket.gateway, self.principal, stream_id, last_seq)
        if answer is None:  # it ended and nothing is left after last_seq
            await socket.send({"type": "done", "id": request_id, "stream_id": stream_id, "usage": None})
            return
        await self._write(request_id, answer)

    async def cancel(self, frame: JSONDict) -> None:
        """``cancel``: stop the generation of the request ``id`` (its stream ends with the
        ``error`` ``stream_cancelled``); one not yet streaming is abandoned at once."""
        request_id = frame.get("id")
        task = self.tasks.get(request_id) if isinstance(request_id, str) else None
        if task is None or not isinstance(request_id, str):
            await self.socket.send_error(InvalidRequestError(
                "No request with this `id` is in flight.", param="id", code="unknown_id"),
                id=request_id)
            return
        stream_id = self.stream_ids.get(request_id)
        if stream_id is not None:
            with contextlib.suppress(GatewayError):
                await pipeline.cancel_stream(self.socket.gateway, self.principal, stream_id)
            return
        task.cancel()  # before its first event: nobody learnt the stream id, so it is cancelled
        await asyncio.gather(task, return_exceptions=True)
        await self.socket.send_error(StreamCancelledError(), id=request_id)


# --- /v1/ws/stream --------------------------------------------------------------------------


@dataclass(slots=True)
class RelaySession:
    """A relay-dialect conversation: its model, request parameters and turns so far."""

    model: str
    parameters: JSONDict
    stream: bool = True
    messages: list[JSONDict] = field(default_factory=list)


async def relay(request: web.Request) -> web.StreamResponse:
    """``GET /v1/ws/stream``: the relay dialect (module docstring)."""
    gateway = request.app[GATEWAY]
    socket = await ClientSocket.accept(request, gateway, handshake_principal(request))
    try:
        await RelaySocket(socket).serve()
    finally:
        socket.release()
    return socket.ws


class RelaySocket:
    """One ``/v1/ws/stream`` socket: frames are answered in order by one worker task, so
    the receive loop keeps reading (and notices a close) while an answer streams."""

    def __init__(self, socket: ClientSocket) -> None:
        self.socket = socket
        self.session: RelaySession | None = None
        self.queue: asyncio.Queue[JSONDict] = asyncio.Queue(maxsize=socket.gateway.settings.ws.max_in_flight)

    async def serve(self) -> None:
        """Read frames into the queue until the socket closes, then stop the worker (a
        stream being written detaches, as an HTTP client's would)."""
        worker = asyncio.get_running_loop().create_task(self._work())
        try:
            async for frame in self.socket.messages():
                if frame["type"] == "ping":
                    await self.socket.send({"type": "pong"})
                elif self.queue.full():
                    await self.send_error(OverloadedError(
                        "Too many messages waiting on this socket (ws.max_in_flight).",
                        code="too_many_requests_in_flight", retry_after_s=0.1))
                else:
                    self.queue.put_nowait(frame)
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            frame = await self.queue.get()
            try:
                await self.handle(frame)
            except ConnectionError:
                return

    async def send_error(self, error: GatewayError) -> None:
        """The relay dialect's ``{"type": "error", "message", "code"}`` (plus
        ``retry_after_ms`` and ``status`` where they help)."""
        message: JSONDict = {"type": "error", "message": error.message, "code": error.code,
                             "status": error.http_status}
        if error.retry_after_s is not None:
            message["retry_after_ms"] = round(error.retry_after_s * 1000)
        with contextlib.suppress(ConnectionError):
            await self.socket.send(message)

    async def handle(self, frame: JSONDict) -> None:
        """Answer one frame; every refusal is an ``error`` frame and the socket stays open
        (but a bad key in a frame closes it with 1008)."""
        kind = frame["type"]
        try:
            if kind == "session.start":
                await self.start_session(frame)
            elif kind == "chat.message":
                await self.chat_message(frame)
            elif kind == "chat.completion":
                await self.one_shot(frame)
            else:
                raise InvalidRequestError(
                    f"Unknown message type {kind!r}: expected session.start, chat.message or "
                    "chat.completion.", param="type", code="unknown_frame_type")
        except GatewayError as exc:
            await self.send_error(exc)

    async def _authenticate(self, frame: JSONDict) -> bool:
        if self.socket.principal is not None:
            return True
        auth = frame.get("auth")
        api_key = auth.get("api_key") if isinstance(auth, dict) else None
        if api_key is None:
            await self.send_error(AuthenticationError(
                "Send the key with the handshake (Authorization) or as auth.api_key.",
                code="missing_api_key"))
            await self.socket.close(POLICY_VIOLATION, "missing_api_key")
            return False
        return await frame_principal(self.socket, api_key, self.send_error) is not None

    async def start_session(self, frame: JSONDict) -> None:
        """``session.start``: authenticate, check the model, keep the settings."""
        if not await self._authenticate(frame):
            return
        model = _model(frame)
        assert self.socket.principal is not None
        self.socket.gateway.balancer.require(model, self.socket.principal.models)
        config = _config(frame)
        stream = config.pop("stream", True)
        self.session = RelaySession(model, config, stream=stream is not False)
        await self.socket.send({"type": "session_established", "model": model})

    async def chat_message(self, frame: JSONDict) -> None:
        """``chat.message``: one turn of the session, answered with the earlier turns."""
        session = self.session
        if session is None:
            raise InvalidRequestError("Send session.start before chat.message.",
                                      code="no_session")
        role, content = frame.get("role", "user"), frame.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise InvalidRequestError("chat.message needs a string `content` (and `role`).",
                                      param="content", code="invalid_frame")
        turn = {"role": role, "content": content}
        body = {"model": session.model, "messages": [*session.messages, turn],
                **session.parameters, "stream": session.stream}
        answer_text = await self.answer(body)
        session.messages += [turn, {"role": "assistant", "content": answer_text}]

    async def one_shot(self, frame: JSONDict) -> None:
        """``chat.completion``: one request with its own messages; no session needed."""
        if not await self._authenticate(frame):
            return
        messages = frame.get("messages")
        if not isinstance(messages, list):
            raise InvalidRequestError("chat.completion needs a `messages` list.",
                                      param="messages", code="invalid_frame")
        config = _config(frame)
        stream = frame.get("stream", config.pop("stream", True))
        await self.answer({"model": _model(frame), "messages": messages, **config,
                           "stream": stream is not False})

    async def answer(self, body: JSONDict) -> str:
        """Run one chat completion and send it as ``content_block_start``,
        ``content_delta``… and ``message_done``; returns the answer's text."""
        socket = self.socket
        if socket.draining:
            raise OverloadedError("The gateway is shutting down; reconnect elsewhere.",
                                  code="shutting_down", retry_after_s=1.0)
        assert socket.principal is not None
        call = Call(socket.principal, CHAT, orjson.dumps(body), socket.headers())
        with socket.request_scope(CHAT.name) as scope:
            try:
                answer = await pipeline.run(socket.gateway, call)
            except GatewayError as exc:
                scope.status = exc.http_status
                raise
            await socket.send({"type": "content_block_start"})
            if isinstance(answer, UnaryAnswer):
                whole = orjson.loads(answer.body)
                text = _message_text(whole)
                await socket.send({"type": "content_delta", "delta": {"content": text}})
                await socket.send({"type": "message_done", "usage": whole.get("usage")})
                return text
            return await self._relay_stream(answer, scope)

    async def _relay_stream(self, answer: StreamAnswer, scope: Any) -> str:
        socket, reader = self.socket, answer.reader
        parts: list[str] = []
        usage: JSONDict | None = None
        try:
            async for event in stream_events(reader, socket.gateway.settings.server.sse_keepalive_s):
                if event.done:
                    continue
                if event.error:
                    error = orjson.loads(event.data).get("error", {})
                    scope.status = 502
                    await socket.send({"type": "error", "message": error.get("message"),
                                       "code": error.get("code"), "stream_id": reader.stream_id})
                    return "".join(parts)
                usage = usage_of(event) or usage
                delta = _delta_text(event)
                if delta:
                    parts.append(delta)
                    await socket.send({"type": "content_delta", "delta": {"content": delta}})
        finally:
            reader.close()
        if answer.metering is not None and answer.metering.usage is not None:
            usage = answer.metering.usage
        await socket.send({"type": "message_done", "usage": usage, "stream_id": reader.stream_id})
        return "".join(parts)


def _model(frame: JSONDict) -> str:
    model = frame.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("A `model` string is required.", param="model",
                                  code="invalid_frame")
    return model


def _config(frame: JSONDict) -> JSONDict:
    """The frame's ``config``: the known parameters only, plus ``stream``."""
    config = frame.get("config") or {}
    if not isinstance(config, dict):
        raise InvalidRequestError("`config` must be an object.", param="config",
                                  code="invalid_frame")
    return {name: config[name] for name in (*RELAY_PARAMETERS, "stream") if name in config}


def _delta_text(event: StreamEvent) -> str:
    try:
        chunk = orjson.loads(event.data)
        content = chunk["choices"][0]["delta"].get("content")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    return content if isinstance(content, str) else ""


def _message_text(whole: JSONDict) -> str:
    try:
        content = whole["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""
    return content if isinstance(content, str) else ""


def add_routes(app: web.Application) -> None:
    """Register ``GET /v1/ws`` and ``GET /v1/ws/stream`` (before the ``/v1`` catch-all)."""
    app.router.add_get("/v1/ws", native)
    app.router.add_get("/v1/ws/stream", relay)
