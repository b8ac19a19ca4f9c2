"""What every JSON WebSocket endpoint shares (DESIGN §4 "WebSocket").

``ClientSocket.accept`` takes a handshake: the caller's key, when it came with the
handshake, is checked *before* the upgrade, and so is the key's socket cap
(``keys.<name>.max_websockets``), so a refusal is a real HTTP status with the OpenAI error
body, never an accept-then-close. The accepted socket then

* yields the client's JSON text frames as dicts (``messages``): a frame that is not a JSON
  object with a string ``type`` gets an ``error`` frame ``invalid_frame`` and the socket
  stays open; a binary frame closes it with 1003 (unsupported data); a frame over
  ``ws.max_frame`` closes it with 1009 (aiohttp); a socket silent for ``ws.idle_timeout``
  with nothing in flight is closed with 1001;
* pings every ``ws.heartbeat`` and drops a peer whose pong does not come back (aiohttp);
* sends JSON frames, each awaited: a client that does not read fills aiohttp's write
  buffer, the send waits for it to drain, and so the streams it carries stop being read
  from their logs, whose ``streams.buffer`` then pauses the upstream reads. What one slow
  socket costs is therefore bounded by ``streams.buffer`` per stream plus aiohttp's
  write-buffer high-water mark (64 KiB) per socket.

Close codes are RFC 6455 §7.4.1's and IANA's registry: 1001 going away, 1003 unsupported
data, 1008 policy violation (a bad key in a first frame, the only refusal that cannot be an
HTTP status), 1009 message too big, 1011 internal error, 1012 service restart (drain).
``stream_events`` turns a ``StreamAnswer``'s encoded SSE frames back into events for the
dialects to reframe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.auth import Principal
from proxy.errors import AuthenticationError, GatewayError, InvalidRequestError, RateLimitError
from proxy.observability import RequestContext, log_access, new_request_id, request_context
from proxy.pipeline import GATEWAY, Gateway, StreamCursor
from proxy.sockets import OpenSocket
from proxy.sse import DONE, decode_frame

JSONDict = dict[str, Any]

#: Close codes used here (RFC 6455 §7.4.1; 1012 from IANA's WebSocket close code registry).
GOING_AWAY, UNSUPPORTED_DATA, POLICY_VIOLATION, INTERNAL_ERROR = 1001, 1003, 1008, 1011

#: Bytes waiting in a socket's write buffer past which ``send_many`` waits for it to drain
#: (aiohttp's writer waits past 64 KiB too).
WRITE_BUFFER_HIGH_BYTES = 64 * 1024

#: How long a socket that must authenticate by its first frame may take to send it, in seconds.
AUTH_FRAME_TIMEOUT_S = 10.0

#: How long closing a socket waits for the client's close frame, in seconds (aiohttp's
#: default, 10 s, would hold a drain that long per silent client).
CLOSE_TIMEOUT_S = 1.0

#: Subprotocols that carry credentials in a browser handshake (OpenAI Realtime API): never
#: echoed to the client, never sent upstream (the upstream gets its own key, and the
#: organization/project only from config, as the HTTP path does).
CREDENTIAL_SUBPROTOCOLS = ("openai-insecure-api-key.", "openai-organization.", "openai-project.")


def handshake_principal(request: web.Request, required: bool = False) -> Principal | None:
    """The key that came with the handshake (``Authorization``, ``x-api-key`` or the
    subprotocol ``openai-insecure-api-key.<key>``), checked before the upgrade and noted in
    the request's log context; ``None`` when none came and it is not ``required`` (it must
    then come in a frame). With ``?model=<id>`` the key's access to the model is checked
    too, so a client learns at once that its socket would be useless.

    Raises:
        AuthenticationError: a key came and matches none, or none came and one is
            ``required`` (401, a real HTTP status).
        ModelNotFoundError: ``?model=`` names a model the key may not use or nobody serves (404).
    """
    gateway = request.app[GATEWAY]
    try:
        principal = gateway.keys.authenticate(request.headers)
    except AuthenticationError as exc:
        if exc.code == "missing_api_key" and not required:
            return None
        raise
    ctx = request_context.get()
    if ctx is not None:
        ctx.key_name = principal.name
    model = request.query.get("model")
    if model is not None:
        gateway.balancer.require(model, principal.models)
    return principal


class ClientSocket:
    """One accepted client WebSocket speaking JSON text frames.

    Attributes:
        ws: aiohttp's socket.
        gateway: the gateway it belongs to.
        principal: the authenticated key, or ``None`` until ``authenticate`` (first-frame auth).
        held: the socket's place in ``gateway.sockets`` (``None`` until authenticated);
            its ``in_flight`` counts the requests running on this socket.
    """

    __slots__ = ("ws", "gateway", "principal", "held", "path", "request")

    def __init__(self, ws: web.WebSocketResponse, gateway: Gateway, request: web.Request) -> None:
        self.ws = ws
        self.gateway = gateway
        self.request = request
        self.path = request.path
        self.principal: Principal | None = None
        self.held: OpenSocket | None = None

    def __repr__(self) -> str:
        key = self.principal.name if self.principal is not None else None
        return f"<ClientSocket {self.path} key={key!r} in_flight={self.in_flight}>"

    @classmethod
    async def accept(cls, request: web.Request, gateway: Gateway, principal: Principal | None,
                     protocols: tuple[str, ...] = ()) -> ClientSocket:
        """Upgrade ``request``. With ``principal`` (the key came with the handshake) the
        key's socket cap is taken first; ``protocols``: subprotocols the server may select
        (the first the client offers wins; RFC 6455 §4.2.2).

        Raises:
            TooManyWebSocketsError: the key holds ``max_websockets`` sockets (429), before
                the upgrade.
            OverloadedError: the gateway is draining (503), before the upgrade.
        """
        cfg = gateway.settings.ws
        ws = web.WebSocketResponse(heartbeat=cfg.heartbeat_s, max_msg_size=cfg.max_frame_bytes,
                                   protocols=protocols, compress=False, decode_text=False,
                                   timeout=CLOSE_TIMEOUT_S)
        socket = cls(ws, gateway, request)
        if principal is not None:
            socket.authenticate(principal)
        try:
            await ws.prepare(without_credentials(request))
        except BaseException:
            socket.release()
            raise
        return socket

    def authenticate(self, principal: Principal) -> None:
        """Record the socket's key and take its place under ``max_websockets``.

        Raises:
            TooManyWebSocketsError (429) or OverloadedError (503, draining).
        """
        self.held = self.gateway.sockets.open(principal, self.close, self.path)
        self.principal = principal

    def release(self) -> None:
        """Give the socket's place back (idempotent); call in ``finally``."""
        if self.held is not None:
            self.held.release()

    @property
    def in_flight(self) -> int:
        """Requests running on this socket now."""
        return self.held.in_flight if self.held is not None else 0

    @property
    def draining(self) -> bool:
        """Whether the gateway is shutting down (no new requests are taken)."""
        return self.gateway.sockets.draining

    async def close(self, code: int, reason: str = "") -> None:
        """Close with ``code`` and ``reason`` (a no-op on a socket already closed)."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=code, message=reason.encode())

    async def send(self, message: JSONDict) -> None:
        """Send one JSON text frame and wait until aiohttp's buffer takes it (backpressure).
        Raises ``ConnectionResetError`` when the socket is gone."""
        await self.send_raw(orjson.dumps(message))

    async def send_raw(self, text: bytes) -> None:
        """Send ``text`` (UTF-8 JSON) as one text frame; awaited like ``send``."""
        if self.ws.closed:
            raise ConnectionResetError("the WebSocket is closed")
        await self.ws.send_frame(text, aiohttp.WSMsgType.TEXT)

    async def send_many(self, texts: list[bytes]) -> None:
        """Send each of ``texts`` as its own text message, all in one write to the socket
        (a stream's chunks that were ready together cost one system call, as an SSE batch
        does), then wait while the socket's buffer is over ``WRITE_BUFFER_HIGH_BYTES``
        (backpressure, as ``send``). The frames are built here (``text_frame``) because
        aiohttp writes one frame per call; compression is off on these sockets, and every
        write is synchronous, so frames never interleave with aiohttp's own (pings, close).
        Raises ``ConnectionResetError`` when the socket is gone or closing."""
        if len(texts) == 1:
            await self.send_raw(texts[0])
            return
        transport = self.request.transport
        if self.ws.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("the WebSocket is closed")
        transport.write(b"".join(text_frame(text) for text in texts))
        if transport.get_write_buffer_size() > WRITE_BUFFER_HIGH_BYTES:
            await self.request.writer.drain()

    async def messages(self) -> AsyncIterator[JSONDict]:
        """The client's frames as JSON objects, until the socket closes (see the module
        docstring for what ends it). Cancelling is safe."""
        idle_s = self.gateway.settings.ws.idle_timeout_s
        while True:
            try:
                msg = await self.ws.receive(timeout=idle_s)
            except TimeoutError:
                if self.in_flight:
                    continue
                await self.close(GOING_AWAY, "idle timeout")
                return
            if msg.type is aiohttp.WSMsgType.TEXT:
                frame = _decode(msg.data)
                if frame is None:
                    await self.send_error(InvalidRequestError(
                        "Each frame must be a JSON object with a string `type`.",
                        code="invalid_frame"))
                    continue
                yield frame
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await self.close(UNSUPPORTED_DATA, "binary frames are not supported; send JSON text")
                return
            else:  # CLOSE, CLOSING, CLOSED, ERROR (aiohttp closed it, e.g. 1009)
                return

    async def send_error(self, error: GatewayError, **fields: object) -> None:
        """Send an ``error`` frame: ``{"type": "error", **fields, "error": {...}}`` with the
        OpenAI error object, plus ``retry_after_ms`` when the error has a retry hint. A
        socket already gone is ignored."""
        with contextlib.suppress(ConnectionError):
            await self.send(error_message(error, **fields))

    def headers(self) -> CIMultiDict[str]:
        """Headers for the upstream request of a WebSocket request: none of the handshake's
        (they carry the key, possibly in ``Sec-WebSocket-Protocol``, and hop-by-hop fields);
        the upstream gets its own ``Authorization`` and configured headers."""
        return CIMultiDict()

    @contextlib.contextmanager
    def request_scope(self, endpoint: str) -> Iterator[RequestScope]:
        """Count one request on this socket (``in_flight``), give it its own request id
        and log context, and write its access-log line (method ``WS``) and request metrics
        (endpoint label ``<path> <endpoint>``) when it ends. Use inside the request's own
        task. Raises ``RuntimeError`` before ``authenticate``."""
        if self.held is None or self.principal is None:
            raise RuntimeError("request_scope before authenticate")
        scope = RequestScope(RequestContext(new_request_id(), key_name=self.principal.name,
                                            transport="websocket"))
        token = request_context.set(scope.context)
        self.held.in_flight += 1
        try:
            yield scope
        except asyncio.CancelledError:
            scope.status = 499
            raise
        finally:
            self.held.in_flight -= 1
            elapsed_s = time.perf_counter() - scope.context.started_at
            log_access(self.gateway.metrics, self.gateway.settings.server.access_log,
                       "WS", self.path, f"{self.path} {endpoint}", scope.status,
                       scope.context, elapsed_s)
            request_context.reset(token)


@dataclass(slots=True)
class RequestScope:
    """One WebSocket request's log context and the status its access-log line shows
    (200, an error's HTTP status, 499 when the socket left)."""

    context: RequestContext
    status: int = 200


def error_message(error: GatewayError, **fields: object) -> JSONDict:
    """``{"type": "error", **fields, "error": <OpenAI error object>}``, with
    ``retry_after_ms`` for an error that has a retry hint (a rate limit, an overload)."""
    message: JSONDict = {"type": "error", **fields, **error.to_body()}
    if error.retry_after_s is not None:
        message["retry_after_ms"] = round(error.retry_after_s * 1000)
    if isinstance(error, RateLimitError):
        message["status"] = error.http_status
    return message


def offered_subprotocols(headers: Mapping[str, str]) -> list[str]:
    """The subprotocols a handshake offers (``Sec-WebSocket-Protocol``, RFC 6455 §4.1), in order."""
    raw = headers.get("Sec-WebSocket-Protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def relayable_subprotocols(offered: list[str]) -> tuple[str, ...]:
    """``offered`` without the credential subprotocols (``CREDENTIAL_SUBPROTOCOLS``)."""
    return tuple(p for p in offered if not p.startswith(CREDENTIAL_SUBPROTOCOLS))


def without_credentials(request: web.Request) -> web.Request:
    """``request`` as the client's upgrade is prepared from: the credential subprotocols
    removed from ``Sec-WebSocket-Protocol``, so the server selects only ``realtime`` and
    aiohttp never sees (nor logs) a key."""
    offered = offered_subprotocols(request.headers)
    kept = relayable_subprotocols(offered)
    if len(kept) == len(offered):
        return request
    headers = request.headers.copy()
    del headers["Sec-WebSocket-Protocol"]
    if kept:
        headers["Sec-WebSocket-Protocol"] = ", ".join(kept)
    return request.clone(headers=headers)


def _decode(data: bytes | str) -> JSONDict | None:
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return frame if isinstance(frame, dict) and isinstance(frame.get("type"), str) else None


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of a stream log: ``seq`` (from 1), the SSE ``event`` name or ``None``, and
    ``data`` (one JSON object, or ``[DONE]``). ``error``: whether ``data`` is an error
    object (``{"error": ...}``) ending the stream."""

    seq: int
    event: bytes | None
    data: bytes

    @property
    def done(self) -> bool:
        """Whether this is the ``[DONE]`` that ends a chat or completions stream."""
        return self.data == DONE

    @property
    def error(self) -> bool:
        """Whether this event is an error object (``{"error": ...}``): it ends the stream."""
        return self.data.startswith(b'{"error"')


async def stream_batches(reader: StreamCursor, keepalive_s: float) -> AsyncIterator[list[StreamEvent]]:
    """The events after ``reader``'s cursor, then the live tail, until the log ends, in the
    batches the log hands out (all that was ready; never empty); the reader waits at most
    ``keepalive_s`` at a time (silence is not an end). The caller closes the reader."""
    while (frames := await reader.next(keepalive_s)) is not None:
        if not frames:
            continue
        seq = reader.after_seq - len(frames)
        batch = []
        for frame in frames:
            seq += 1
            event, data = decode_frame(frame)
            batch.append(StreamEvent(seq, event, data))
        yield batch


async def stream_events(reader: StreamCursor, keepalive_s: float) -> AsyncIterator[StreamEvent]:
    """``stream_batches``, one event at a time."""
    async for batch in stream_batches(reader, keepalive_s):
        for event in batch:
            yield event


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame (RFC 6455 §5.2: FIN + opcode 1; a server never
    masks), as aiohttp's writer builds it without compression."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 1 << 16:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


def usage_of(event: StreamEvent) -> JSONDict | None:
    """The non-null ``usage`` object an event carries (chat's last chunk, Responses'
    ``response.completed``), else ``None``; decodes only events that mention usage."""
    if b'"usage"' not in event.data:
        return None
    try:
        obj = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if usage is None and isinstance(obj.get("response"), dict):
        usage = obj["response"].get("usage")
    return usage if isinstance(usage, dict) else None
