"""``GET /v1/realtime``: a passthrough to an upstream's Realtime API WebSocket (DESIGN §4
"WebSocket"; OpenAI API reference, "Realtime API", "WebSocket"), which is what
openai-python's ``client.realtime.connect(model=...)`` opens (``<base_url>/realtime?model=``,
``Authorization: Bearer <key>``) and what a browser opens with the subprotocols
``realtime, openai-insecure-api-key.<key>``.

Everything is checked **before** the client's upgrade, so a refusal is a real HTTP status
with the OpenAI error body, never an accept-then-close::

    key (Authorization | x-api-key | subprotocol openai-insecure-api-key.<key>) → 401
    a WebSocket upgrade, ``?model=``                                            → 400
    model access, as for HTTP (an unknown model and a forbidden one look alike)  → 404
    a deployment of the model with ``upstreams.<name>.realtime: true``            → 404 realtime_not_supported
    its health (routing)                                                        → 429 / 503
    ``keys.<name>.max_websockets``; the gateway draining                        → 429 / 503
    limits: one request (rpm), a concurrency lease (max_concurrent) held for the
        session's life, ``RESERVE_TOKENS`` against tpm and the budget          → 429 (x-ratelimit-*)
    an in-flight slot on the upstream (admission), held for the session's life  → 503 after queue_timeout
    the upstream's own handshake (its key; the client's never goes upstream)    → its status (401/403: 502);
                                                                                  unreachable 502, timeout 504

Then the client is upgraded, selecting only the ``realtime`` subprotocol (a credential
subprotocol is never echoed, nor shown to aiohttp, which would log it when nothing overlaps).

Relay: text and binary messages are copied both ways as they come, each send awaited, so a
peer that does not read stops the other side being read (bounded by aiohttp's write buffer
per direction plus one message of at most ``ws.max_frame``). Both sockets ping every
``ws.heartbeat``. A message larger than ``ws.max_frame`` from the client closes it with
1009 (aiohttp); from the upstream it ends the session with 1011 to the client.

Close codes (RFC 6455 §7.4): a close frame from either side is relayed to the other with
its code and reason. 1005 (no status), 1006 (abnormal) and 1015 (TLS) are never sent on the
wire (§7.4.1), nor are codes outside 1000-4999 or unassigned ones; those become 1011
(internal error). A side that vanishes without a close frame: the client gets 1011 if the
upstream vanished, the upstream 1001 (going away) if the client did. A session idle for
``ws.idle_timeout`` (no client message, no response running) is closed with 1001; on drain,
each session is closed with 1012 (service restart) once no response is running.

Metering: every upstream ``response.created`` counts a response in flight (``OpenSocket.in_flight``,
which the drain waits for) and every ``response.done`` ends one; the ``usage``
(``input_tokens``/``output_tokens``) of each ``response.done`` is charged against the key's
tpm and budget at once (``RealtimeMeter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import aiohttp
import orjson
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from proxy.auth import Principal
from proxy.errors import (
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    RateLimitError,
    UpstreamConnectionError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from proxy.limits import Demand, Lease, usage_counts
from proxy.observability import request_context
from proxy.pipeline import GATEWAY, Gateway
from proxy.sockets import OpenSocket
from proxy.upstream import Headers, Upstream, invalid_response, request_error, upstream_status_error
from proxy.websocket import offered_subprotocols, relayable_subprotocols, without_credentials

JSONDict = dict[str, Any]

#: The upstream's socket: messages' text kept as bytes (``decode_text=False``), relayed as is.
UpstreamSocket: TypeAlias = "aiohttp.ClientWebSocketResponse[Literal[False]]"

#: The subprotocol the gateway selects (OpenAI's browser clients offer it with the key).
REALTIME_SUBPROTOCOL = "realtime"

#: Handshake headers of the client's upgrade that aiohttp sets itself on the upstream one
#: (a client's ``Sec-WebSocket-Key`` would break the upstream's accept check), and the
#: browser's ``Origin``, which is the gateway's business, not the upstream's.
_HANDSHAKE_HEADERS = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Protocol",
                      "Sec-WebSocket-Extensions", "Origin")

#: Close codes (RFC 6455 §7.4.1; 1012 from IANA's registry).
NORMAL, GOING_AWAY, INTERNAL_ERROR, SERVICE_RESTART = 1000, 1001, 1011, 1012

#: Codes that only report a closure and must never be sent in a close frame (RFC 6455 §7.4.1).
UNSENDABLE_CLOSE_CODES = frozenset({1004, 1005, 1006, 1015})

#: A close frame's reason is at most 123 bytes of UTF-8 (125-byte control frame payload
#: minus the 2-byte code, RFC 6455 §5.5).
MAX_CLOSE_REASON_BYTES = 123

#: Tokens reserved against tpm and the budget when a session opens: the session is admitted
#: while the key has any tokens left; what each response used is charged as it ends.
RESERVE_TOKENS = 1

#: How often an open session looks whether the gateway is draining, in seconds (the drain
#: closes idle sessions with 1012 at once instead of waiting for ``server.drain_timeout``).
DRAIN_CHECK_S = 1.0

#: How long closing a socket may wait for the peer's close frame, in seconds.
CLOSE_TIMEOUT_S = 5.0

#: The same while the gateway shuts down: aiohttp then no longer reads from client
#: connections (``RequestHandler.close``), so the client's close frame never arrives and the
#: wait would only delay the shutdown; the gateway's close frame is on the wire by then.
DRAIN_CLOSE_WAIT_S = 0.2


def sendable_close_code(code: int | None) -> int:
    """``code`` if it may be sent in a close frame, else 1011 (internal error): 1004-1006
    and 1015 are reserved (RFC 6455 §7.4.1), 1016-2999 unassigned, and only 1000-4999 are
    codes at all (§7.4.2). ``None`` (no code known) is 1011 too."""
    if code is None or code in UNSENDABLE_CLOSE_CODES or not 1000 <= code <= 4999 or 1016 <= code < 3000:
        return INTERNAL_ERROR
    return code


def close_reason(reason: str) -> bytes:
    """``reason`` as a close frame carries it: UTF-8, cut to 123 bytes on a character boundary."""
    return reason.encode("utf-8")[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


@dataclass(frozen=True, slots=True)
class Ending:
    """How a session ends: the close code and reason still to send to each side (``None``:
    that side is closed already or needs nothing)."""

    client: tuple[int, str] | None
    upstream: tuple[int, str] | None


# --- metering --------------------------------------------------------------------------------


class RealtimeMeter:
    """One session's hold on the key's limits and the tokens it used.

    ``admit`` takes a lease as one request: rpm, a concurrency slot (kept for the session's
    life; the limiter refreshes it) and ``RESERVE_TOKENS`` against tpm and the budget.
    ``record`` charges each ``response.done``'s usage at once, as a separate zero-reservation
    charge settled with what was used (no rpm, no concurrency), so a long session counts
    into tpm and budgets as it goes. When that charge is refused (the key is already over
    its tpm or budget: it is in debt), the tokens are kept and settled with the session's
    lease by ``close``. Every token is charged exactly once.

    Attributes:
        input_tokens, output_tokens: tokens of every ``response.done`` so far.
        in_flight: responses started (``response.created``) and not yet done.
    """

    def __init__(self, gateway: Gateway, principal: Principal, model: str) -> None:
        self.gateway = gateway
        self.principal = principal
        self.model = model
        self.lease: Lease | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.in_flight = 0
        self._unsettled = (0, 0)

    def __repr__(self) -> str:
        return (f"<RealtimeMeter key={self.principal.name!r} model={self.model!r} "
                f"[tokens: {self.input_tokens} in, {self.output_tokens} out | in flight: {self.in_flight}]>")

    @property
    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers of the session's lease (none for an unlimited key)."""
        return self.lease.headers if self.lease is not None else {}

    async def admit(self) -> None:
        """Take the session's lease.

        Raises:
            RateLimitError: rpm, max_concurrent, tpm or the budget refuses (429, with
                ``retry-after`` and ``x-ratelimit-*``).
            OverloadedError: the limit store is down and ``on_redis_error: closed`` (503).
        """
        demand = self.gateway.demands.demand(self.principal.name, self.model, 0, RESERVE_TOKENS)
        try:
            self.lease = await self.gateway.limiter.acquire(demand)
        except RateLimitError as exc:
            self.gateway.metrics.rate_limited.labels(self.principal.name, exc.code or "-").inc()
            raise

    async def record(self, usage: object) -> None:
        """Charge one ``response.done``'s ``usage`` (``input_tokens``, ``output_tokens``);
        a missing or malformed usage charges nothing. Never raises a limit error."""
        counts = usage_counts(usage) if isinstance(usage, dict) else None
        if counts is None:
            return
        self.input_tokens += counts[0]
        self.output_tokens += counts[1]
        if not await self._charge_now(counts):
            self._unsettled = (self._unsettled[0] + counts[0], self._unsettled[1] + counts[1])

    async def _charge_now(self, counts: tuple[int, int]) -> bool:
        """Charge ``counts`` against tpm and the budget now; ``False`` if the store refused."""
        lease = self.lease
        if lease is None:
            return True  # an unlimited key: nothing to count against
        meter = meter_demand(lease.demand)
        if not meter.limited:
            return True
        try:
            charge = await self.gateway.limiter.acquire(meter)
        except (RateLimitError, OverloadedError):
            return False
        await self.gateway.limiter.settle(charge, counts[0] + counts[1], self._usd(counts))
        return True

    def _usd(self, counts: tuple[int, int]) -> float:
        budget = self.lease.demand.budget if self.lease is not None else None
        return self.gateway.demands.cost_usd(self.model, *counts) if budget and budget.usd else 0.0

    async def close(self) -> None:
        """Settle the session's lease (its reservation returned, the tokens not yet charged
        taken) and free its concurrency slot. Idempotent; never raises."""
        counts = self._unsettled
        self._unsettled = (0, 0)
        await self.gateway.limiter.settle(self.lease, counts[0] + counts[1], self._usd(counts))

    def usage(self) -> JSONDict:
        """The session's usage in the Realtime API's names (for the access log)."""
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "total_tokens": self.input_tokens + self.output_tokens}


def meter_demand(session: Demand) -> Demand:
    """The demand that charges used tokens of a session holding ``session``: its tpm scopes
    only (no rpm, no concurrency), nothing reserved, the same budget."""
    scopes = tuple(dataclasses.replace(s, rpm=None, burst=None, max_concurrent=None)
                   for s in session.scopes if s.tpm)
    return Demand(scopes, 0, 0.0, session.budget)


# --- handshake -------------------------------------------------------------------------------


def requested_model(request: web.Request) -> str:
    """``?model=`` of the handshake. Raises ``InvalidRequestError`` (400) when absent."""
    model = request.query.get("model", "").strip()
    if not model:
        raise InvalidRequestError("Pass the model as `?model=` on the Realtime WebSocket URL.",
                                  param="model", code="missing_required_parameter")
    return model


def realtime_candidates(gateway: Gateway, principal: Principal, model: str) -> list[str]:
    """The deployments that may take a realtime session for ``model`` now: those with
    ``realtime: true``, healthy ones of the best tier first.

    Raises:
        ModelNotFoundError: the key may not use ``model`` or nothing serves it (404).
        NotFoundError: no deployment of ``model`` has ``realtime: true`` (404
            ``realtime_not_supported``).
        RateLimitError, OverloadedError: as routing for HTTP (429 every deployment cools
            down after a 429; 503 none is healthy).
    """
    balancer = gateway.balancer
    balancer.require(model, principal.models)
    names = balancer.deployments_for(model)
    capable = [n for n in names if gateway.upstreams[n].config.realtime]
    if not capable:
        raise NotFoundError(f"The model `{model}` is not available over the Realtime API on this gateway.",
                            param="model", code="realtime_not_supported")
    others = frozenset(names).difference(capable)
    routable = [n for n in balancer.candidates(model, principal.models, others) if n in capable]
    routable = routable or [n for n in capable if balancer.status(n) == "healthy"]
    if not routable:
        raise OverloadedError(f"No healthy upstream is available for model `{model}` over the "
                              "Realtime API.", code="no_healthy_upstream", retry_after_s=5.0)
    return routable


async def take_slot(gateway: Gateway, candidates: list[str], priority: int) -> str:
    """An in-flight slot on one of ``candidates`` (the balancer picks), queued like an HTTP
    request. Raises ``OverloadedError`` (503) past the queue bound or ``queue_timeout``.
    Cancelling is safe (a queued wait leaves the queue)."""
    admission, balancer = gateway.admission, gateway.balancer
    name = admission.try_acquire(candidates, balancer.choose)
    if name is None:
        name = await admission.acquire(candidates, balancer.choose, priority)
    return name


def upstream_headers(upstream: Upstream, client_headers: Headers) -> CIMultiDict[str]:
    """Headers for the upstream handshake: the client's, cleaned as for HTTP
    (``Upstream.request_headers``: no client key, no hop-by-hop, the upstream's own
    ``Authorization``), without the client's WebSocket handshake fields."""
    headers = upstream.request_headers(client_headers)
    for name in _HANDSHAKE_HEADERS:
        headers.popall(name, None)
    return headers


async def connect_upstream(gateway: Gateway, upstream: Upstream, request: web.Request
                           ) -> UpstreamSocket:
    """Open the upstream's Realtime socket on its pooled session: ``<base_url>/realtime``
    with the client's query string kept byte for byte, the client's non-credential
    subprotocols offered, within ``timeouts.first_byte``.

    Raises:
        GatewayError: the upstream refused the handshake (its status and a generic body;
            401/403 → 502, its key is wrong), could not be reached (502), timed out (504),
            or answered 101 without a valid handshake (502).
    Cancelling is safe (aiohttp closes the half-open connection).
    """
    cfg = gateway.settings.ws
    protocols = relayable_subprotocols(offered_subprotocols(request.headers))
    try:
        async with asyncio.timeout(upstream.config.timeouts.first_byte_s):
            ws = await upstream.session.ws_connect(
                upstream.url("/realtime", request.query_string), protocols=protocols,
                headers=upstream_headers(upstream, request.headers), heartbeat=cfg.heartbeat_s,
                max_msg_size=cfg.max_frame_bytes, decode_text=False,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_S))
    except aiohttp.WSServerHandshakeError as exc:
        error = _handshake_error(upstream, exc)
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = request_error(upstream, exc)
    else:
        gateway.balancer.record_success(upstream.name)
        return ws
    _record_failure(gateway, upstream.name, error)
    raise error


def _handshake_error(upstream: Upstream, exc: aiohttp.WSServerHandshakeError) -> GatewayError:
    if exc.status == 101:
        return invalid_response(upstream, "an invalid WebSocket handshake")
    retry_after = exc.headers.get("Retry-After") if exc.headers is not None else None
    return upstream_status_error(upstream, exc.status, b"(the WebSocket handshake was refused)", retry_after)


def _record_failure(gateway: Gateway, name: str, error: GatewayError) -> None:
    """Count a failed handshake against the upstream's health, as a failed HTTP attempt is."""
    if isinstance(error, UpstreamConnectionError):
        if not error.stale:
            gateway.balancer.record_failure(name, local=error.local)
    elif isinstance(error, UpstreamTimeoutError) or (
            isinstance(error, UpstreamStatusError) and error.upstream_status >= 500):
        gateway.balancer.record_failure(name)
    elif isinstance(error, UpstreamStatusError) and error.upstream_status == 429:
        gateway.balancer.record_rate_limited(name, error.retry_after_s or 1.0)


# --- the session -----------------------------------------------------------------------------


class RealtimeRelay:
    """Copies one session's messages both ways until either side ends it (module docstring).

    Args:
        client: the client's prepared socket.
        upstream: the upstream's socket.
        meter: the session's usage and responses in flight.
        held: the socket's place in ``gateway.sockets`` (its ``in_flight`` mirrors the meter's).
        gateway: for ``ws.idle_timeout`` and the drain.
    """

    def __init__(self, client: web.WebSocketResponse, upstream: UpstreamSocket,
                 meter: RealtimeMeter, held: OpenSocket, gateway: Gateway) -> None:
        self.client = client
        self.upstream = upstream
        self.meter = meter
        self.held = held
        self.gateway = gateway

    def __repr__(self) -> str:
        return (f"<RealtimeRelay {self.meter!r} client_closed={self.client.closed} "
                f"upstream_closed={self.upstream.closed}>")

    async def run(self) -> None:
        """Relay until one side ends the session, then close the other with the relayed code.
        Cancelled (the client's connection dropped: aiohttp cancels the handler), the ending
        a pump already reached is still sent, else the upstream gets 1001; the closing runs
        shielded, so it completes even then."""
        to_upstream = asyncio.create_task(self.client_to_upstream())
        to_client = asyncio.create_task(self.upstream_to_client())
        try:
            await asyncio.wait((to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ending = _first_ending(to_upstream, to_client)
            for task in (to_upstream, to_client):
                task.cancel()
            await asyncio.shield(self._finish_after(ending, to_upstream, to_client))

    async def _finish_after(self, ending: Ending, *pumps: asyncio.Task[Ending]) -> None:
        await asyncio.gather(*pumps, return_exceptions=True)
        await self.finish(ending)

    async def finish(self, ending: Ending) -> None:
        """Send each side its close code (a side already closed is left as it is)."""
        if ending.upstream is not None:
            code, reason = ending.upstream
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.upstream.close(code=code, message=close_reason(reason))
        if ending.client is not None:
            wait_s = DRAIN_CLOSE_WAIT_S if self.gateway.sockets.draining else CLOSE_TIMEOUT_S
            await close_client(self.client, *ending.client, wait_s=wait_s)

    async def client_to_upstream(self) -> Ending:
        """The client's messages to the upstream; also ends idle and draining sessions."""
        idle_s = self.gateway.settings.ws.idle_timeout_s
        loop = asyncio.get_running_loop()
        last_seen = loop.time()
        while True:
            try:
                msg = await self.client.receive(timeout=min(DRAIN_CHECK_S, idle_s))
            except TimeoutError:
                ending = self._when_quiet(loop.time() - last_seen >= idle_s)
                if ending is not None:
                    return ending
                continue
            last_seen = loop.time()
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                try:
                    await self.upstream.send_frame(msg.data, msg.type)
                except ConnectionError:
                    return Ending(client=(INTERNAL_ERROR, "upstream connection lost"), upstream=None)
            elif msg.type is WSMsgType.CLOSE:
                return Ending(client=None, upstream=(sendable_close_code(msg.data), msg.extra or ""))
            else:  # CLOSING (closed by the gateway), CLOSED (vanished), ERROR (1009, say)
                return Ending(client=None, upstream=(GOING_AWAY, "client went away"))

    def _when_quiet(self, idle: bool) -> Ending | None:
        """The ending of a session quiet for a moment: 1012 when draining, 1001 when idle
        past ``ws.idle_timeout``; ``None`` to go on (a response is running, or neither)."""
        if self.meter.in_flight:
            return None
        if self.gateway.sockets.draining:
            return Ending(client=(SERVICE_RESTART, "service restart"), upstream=(GOING_AWAY, "going away"))
        if idle:
            return Ending(client=(GOING_AWAY, "idle timeout"), upstream=(GOING_AWAY, "idle timeout"))
        return None

    async def upstream_to_client(self) -> Ending:
        """The upstream's messages to the client, metering ``response.*`` events."""
        while True:
            msg = await self.upstream.receive()
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                try:
                    await self.client.send_frame(msg.data, msg.type)
                except ConnectionError:
                    return Ending(client=None, upstream=(GOING_AWAY, "client went away"))
                if msg.type is WSMsgType.TEXT:
                    await self.observe(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                return Ending(client=(sendable_close_code(msg.data), msg.extra or ""), upstream=None)
            elif msg.type is WSMsgType.ERROR:
                return Ending(client=(INTERNAL_ERROR, "upstream error"), upstream=(INTERNAL_ERROR, ""))
            else:  # CLOSING, CLOSED: the connection ended without a close frame (1006)
                return Ending(client=(INTERNAL_ERROR, "upstream connection lost"), upstream=None)

    async def observe(self, data: bytes | str) -> None:
        """Count ``response.created`` as a response in flight; end one and charge its usage
        on ``response.done`` (OpenAI API reference, Realtime server events)."""
        raw = data.encode() if isinstance(data, str) else data
        if b'"response.created"' not in raw and b'"response.done"' not in raw:
            return
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "response.created":
            self.meter.in_flight += 1
        elif kind == "response.done":
            self.meter.in_flight = max(0, self.meter.in_flight - 1)
            response = event.get("response")
            await self.meter.record(response.get("usage") if isinstance(response, dict) else None)
        self.held.in_flight = self.meter.in_flight


def _first_ending(*pumps: asyncio.Task[Ending]) -> Ending:
    """The ending of the first pump that returned one; if none did (cancelled, or a pump
    failed), the client gets 1011 and the upstream 1001."""
    for pump in pumps:
        if pump.done() and not pump.cancelled() and pump.exception() is None:
            return pump.result()
    return Ending(client=(INTERNAL_ERROR, "relay ended"), upstream=(GOING_AWAY, "client went away"))


async def close_client(ws: web.WebSocketResponse, code: int, reason: str,
                       wait_s: float = CLOSE_TIMEOUT_S) -> None:
    """Close the client's socket with ``code`` and ``reason`` if it is open (a no-op before
    the upgrade or on a socket already closed), waiting at most ``wait_s`` for the client's
    close frame (then the connection is dropped). Errors of a socket already gone are
    swallowed."""
    if not ws.prepared or ws.closed:
        return
    with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
        async with asyncio.timeout(wait_s):
            await ws.close(code=sendable_close_code(code), message=close_reason(reason))


# --- the handler -----------------------------------------------------------------------------


async def realtime(request: web.Request) -> web.StreamResponse:
    """``GET /v1/realtime?model=``: check everything, connect upstream, upgrade, relay
    (module docstring).

    Raises:
        GatewayError: every refusal, before the upgrade (the middleware answers it as JSON
            with its HTTP status).
    """
    gateway = request.app[GATEWAY]
    principal = gateway.keys.authenticate(request.headers)
    ctx = request_context.get()
    if ctx is not None:
        ctx.key_name = principal.name
    cfg = gateway.settings.ws
    client = web.WebSocketResponse(protocols=(REALTIME_SUBPROTOCOL,), heartbeat=cfg.heartbeat_s,
                                   timeout=CLOSE_TIMEOUT_S,
                                   max_msg_size=cfg.max_frame_bytes, compress=False, decode_text=False)
    upgrade = without_credentials(request)
    if not client.can_prepare(upgrade).ok:
        raise InvalidRequestError("`/v1/realtime` is a WebSocket endpoint: send a WebSocket upgrade.",
                                  code="websocket_upgrade_required")
    model = requested_model(request)
    if ctx is not None:
        ctx.model = model
    candidates = realtime_candidates(gateway, principal, model)

    async def closer(code: int, reason: str) -> None:
        await close_client(client, code, reason, DRAIN_CLOSE_WAIT_S)

    held = gateway.sockets.open(principal, closer, request.path)
    meter = RealtimeMeter(gateway, principal, model)
    try:
        await serve(request, upgrade, gateway, principal, candidates, client, meter, held)
    finally:
        await meter.close()
        held.release()
        if ctx is not None:
            ctx.usage = meter.usage()
    return client


async def serve(request: web.Request, upgrade: web.Request, gateway: Gateway, principal: Principal,
                candidates: list[str], client: web.WebSocketResponse, meter: RealtimeMeter,
                held: OpenSocket) -> None:
    """Limits, a slot, the upstream's socket, the client's upgrade (prepared from
    ``upgrade``, the request without credential subprotocols), then the relay; the slot and
    the upstream socket are given back however it ends."""
    await meter.admit()
    try:
        name = await take_slot(gateway, candidates, principal.priority)
    except GatewayError as exc:
        exc.extra_headers.update(meter.headers)
        raise
    ctx = request_context.get()
    if ctx is not None:
        ctx.upstream = name
    try:
        upstream = await connect_upstream(gateway, gateway.upstreams[name], request)
    except GatewayError as exc:
        gateway.admission.release(name)
        exc.extra_headers.update(meter.headers)
        raise
    try:
        client.headers.update(meter.headers)
        await client.prepare(upgrade)
        await RealtimeRelay(client, upstream, meter, held, gateway).run()
    finally:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await upstream.close(code=GOING_AWAY, message=b"going away")
        gateway.admission.release(name)


def add_routes(app: web.Application) -> None:
    """Register ``GET /v1/realtime`` (before the ``/v1`` catch-all)."""
    app.router.add_get("/v1/realtime", realtime)
