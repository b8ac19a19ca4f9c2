"""The listening side: connection limits, the header deadline and low-level HTTP errors.

aiohttp serves each connection with a ``RequestHandler`` (an ``asyncio.Protocol``,
``aiohttp/web_protocol.py``). ``GatewayProtocol`` subclasses it with three small hooks and
``GatewayRunner`` makes aiohttp's server build it; everything else stays aiohttp's own: the
HTTP parser and its limits (``max_line_size``/``max_field_size`` 8190 bytes,
``max_headers`` 128), the keep-alive timer (``server.keepalive_timeout``) and the listen
backlog (``server.backlog``, given to ``web.TCPSite``).

- **Connection limit.** ``ConnectionGuard`` counts open client connections. One past
  ``server.max_connections``, or past what ``RLIMIT_NOFILE`` leaves after the upstream pools
  and ``FD_HEADROOM`` (``client_connection_cap``), gets a fixed 503 ``overloaded`` at once
  and is closed: nothing of it is parsed and nothing reaches the app or an upstream. The
  close lingers (RFC 9112 §9.6): the write side is shut first and whatever the client sends
  is read and dropped for at most ``REFUSED_LINGER_S``, so the kernel does not answer its
  request bytes with a reset that could destroy the 503 before the client reads it.
- **Header deadline** (slowloris). A connection must complete its request line and headers
  within ``server.header_timeout`` of opening, and of the first byte of each later request
  that arrives while it is idle, or it is closed. Time spent serving a request does not
  count, nor idle time between requests (``server.keepalive_timeout`` bounds that).
  aiohttp's keep-alive timer is a backstop: it closes a connection still waiting for
  complete headers ``keepalive_timeout`` after it opened or after its last response, which
  also bounds a request whose first bytes were pipelined behind the one being served. The
  deadline covers headers only, not a slow request body.
- **Low-level errors.** What aiohttp's parser rejects (a malformed request line, a header
  line too long, too many headers, broken chunked framing) is answered in the OpenAI error
  shape with a fixed message: 431 for header fields too large (RFC 6585 §5), 400
  otherwise. The offending bytes are never echoed, in the body or in the log line (aiohttp's
  own answer and log repeat about 100 of them, which may be an ``Authorization`` header).

Refusals, header timeouts and malformed requests are counted in
``shepherd_connections_refused_total{reason}`` and logged, at most one line per reason every
``LOG_INTERVAL_S`` (with the number since the previous line), so a flood cannot flood the log.

This leans on a few private names of aiohttp 3.14's ``RequestHandler`` (``_waiter``: set while
it waits for a request; ``_request_count``; ``_messages``; ``_current_request``; ``_ErrInfo``)
and on ``web.Server._kwargs``; ``tests/adversarial/test_hostile_clients.py`` exercises each.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import time
from collections.abc import Callable
from typing import Any, cast

import orjson
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy.errors import GatewayError, InvalidRequestError, OverloadedError
from proxy.observability import Sample, error_log, log, new_request_id

#: File descriptors kept free for everything that is neither a client connection nor an
#: upstream pool: listening sockets, the event loop, log and ledger files, Redis, DNS.
FD_HEADROOM = 256
#: The fewest client connections ``client_connection_cap`` allows, however low the limit.
MIN_CLIENT_CONNECTIONS = 64
#: The soft ``RLIMIT_NOFILE`` asked for when the hard limit is unlimited.
NOFILE_CEILING = 1 << 20
#: How long a refused connection may stay open after its 503 (seconds).
REFUSED_LINGER_S = 1.0
#: At most one log line per reason this often (seconds).
LOG_INTERVAL_S = 5.0

#: ``shepherd_connections_refused_total{reason}`` values, and the log line of each.
REASONS = {
    "max_connections": "connection refused: server.max_connections connections are open",
    "file_descriptors": "connection refused: file descriptors are running short (RLIMIT_NOFILE)",
    "header_timeout": "connection closed: request headers not complete within server.header_timeout",
    "malformed_request": "malformed HTTP request answered and its connection closed",
}


def raise_nofile_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (``NOFILE_CEILING`` when that is
    unlimited) and log what was got; returns the soft limit now in force. Never raises:
    where the kernel refuses, the old soft limit stays and a warning says so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file descriptor limit", extra={
                "soft": soft, "hard": hard, "error": type(exc).__name__})
    log.info("file descriptor limit", extra={"soft": soft, "hard": hard})
    return NOFILE_CEILING if soft == resource.RLIM_INFINITY else soft


def client_connection_cap(nofile: int, reserved_fds: int) -> int:
    """Client connections that ``nofile`` file descriptors allow when ``reserved_fds`` are
    kept for the upstream pools and ``FD_HEADROOM`` for the rest; at least
    ``MIN_CLIENT_CONNECTIONS``."""
    return max(MIN_CLIENT_CONNECTIONS, nofile - reserved_fds - FD_HEADROOM)


class ConnectionGuard:
    """Open client connections against ``max_connections`` (``server.max_connections``) and
    ``fd_cap`` (``client_connection_cap``), and the tally of connections refused or closed
    early. Plain bookkeeping: ``admit`` decides and counts in one synchronous step.

    Args:
        on_refuse: called with the reason of each refusal or early close (a metric).
        clock: monotonic seconds, for throttling the log.
    """

    def __init__(self, max_connections: int, fd_cap: int, *,
                 on_refuse: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_connections = max_connections
        self.fd_cap = fd_cap
        self.open = 0
        self.lingering = 0  # refused connections still open (each holds a descriptor)
        self.refused = dict.fromkeys(REASONS, 0)
        self._on_refuse = on_refuse or (lambda _: None)
        self._clock = clock
        self._unlogged = dict.fromkeys(REASONS, 0)
        self._logged_at = dict.fromkeys(REASONS, -math.inf)

    def __repr__(self) -> str:
        refused = ", ".join(f"{reason}: {n}" for reason, n in self.refused.items() if n)
        return f"<ConnectionGuard [open: {self.open}/{self.limit} | refused: {refused or 0}]>"

    @property
    def limit(self) -> int:
        """Client connections served at once: the lower of the two caps."""
        return min(self.max_connections, self.fd_cap)

    def admit(self) -> str | None:
        """Count one more open connection and return ``None``, or return why it is refused
        (``max_connections`` or ``file_descriptors``; counted and logged, not opened)."""
        if self.open + self.lingering >= self.fd_cap:
            reason = "file_descriptors"  # refusals that linger hold descriptors too
        elif self.open >= self.max_connections:
            reason = "max_connections"
        else:
            self.open += 1
            return None
        self.note(reason)
        return reason

    def release(self) -> None:
        """An admitted connection closed."""
        self.open -= 1

    def note(self, reason: str, **fields: object) -> None:
        """Count a connection refused or closed early for ``reason`` (one of ``REASONS``)
        and log it, at most one line per reason every ``LOG_INTERVAL_S``. ``fields`` go into
        that line: never a header value or request bytes."""
        self.refused[reason] += 1
        self._on_refuse(reason)
        self._unlogged[reason] += 1
        now = self._clock()
        if now - self._logged_at[reason] < LOG_INTERVAL_S:
            return
        self._logged_at[reason] = now
        count, self._unlogged[reason] = self._unlogged[reason], 0
        level = logging.WARNING if reason in ("max_connections", "file_descriptors") else logging.INFO
        log.log(level, REASONS[reason], extra={
            "reason": reason, "count": count, "open_connections": self.open, "limit": self.limit,
            **fields})

    def samples(self) -> list[Sample]:
        """``shepherd_connections_open`` and ``shepherd_connections_limit``, read at scrape time."""
        return [("shepherd_connections_open", {}, float(self.open)),
                ("shepherd_connections_limit", {}, float(self.limit))]


class HeaderFieldsTooLargeError(InvalidRequestError):
    """The request line or header fields are too large (431, RFC 6585 §5)."""

    status = 431
    default_code = "request_header_fields_too_large"


def parse_error(exc: BaseException | None, *, max_field_size: int, max_headers: int) -> GatewayError:
    """The answer to a request aiohttp's parser rejected with ``exc``: a fixed message
    chosen by the kind of error, never the exception's text (it quotes the request)."""
    text = exc.message.lower() if isinstance(exc, http_exceptions.HttpProcessingError) else ""
    if isinstance(exc, http_exceptions.LineTooLong):
        return HeaderFieldsTooLargeError(
            f"The request line or a header field is longer than {max_field_size} bytes.")
    if text.startswith("too many headers"):
        return HeaderFieldsTooLargeError(f"The request has more than {max_headers} header fields.",
                                         code="too_many_headers")
    if isinstance(exc, http_exceptions.BadHttpMethod) and "https traffic" in text:
        return InvalidRequestError("Received HTTPS traffic on an HTTP port.", code="invalid_http_request")
    if isinstance(exc, http_exceptions.BadStatusLine | http_exceptions.InvalidURLError):
        return InvalidRequestError("The request line is malformed.", code="invalid_request_line")
    if isinstance(exc, http_exceptions.PayloadEncodingError) or "chunk" in text:
        return malformed_body()
    if isinstance(exc, http_exceptions.InvalidHeader) or "header" in text:
        return InvalidRequestError("A request header is malformed.", code="invalid_header")
    return InvalidRequestError("The request is not valid HTTP/1.1.", code="invalid_http_request")


def malformed_body() -> InvalidRequestError:
    """The error for a request body whose framing (chunked encoding) is broken."""
    return InvalidRequestError("The request body's chunked framing is malformed.", code="invalid_body")


def error_answer(error: GatewayError) -> web.Response:
    """``error`` as a response that closes its connection (the parser's state is lost)."""
    response = web.Response(body=orjson.dumps(error.to_body()), status=error.http_status,
                            content_type="application/json",
                            headers={**error.headers(), "x-request-id": new_request_id()})
    response.force_close()
    return response


def _refusal_parts() -> tuple[bytes, bytes]:
    error = OverloadedError("The gateway has too many open connections; retry shortly.",
                            retry_after_s=1.0)
    body = orjson.dumps(error.to_body())
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
               "Connection": "close", **error.headers()}
    head = "HTTP/1.1 503 Service Unavailable\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode(), body


_REFUSAL_HEAD, _REFUSAL_BODY = _refusal_parts()


def refusal_bytes() -> bytes:
    """The whole 503 ``overloaded`` answer sent to a refused connection, with its own
    ``x-request-id``."""
    return _REFUSAL_HEAD + f"x-request-id: {new_request_id()}\r\n\r\n".encode() + _REFUSAL_BODY


class GatewayProtocol(RequestHandler):
    """aiohttp's ``RequestHandler`` with the connection limit, the header deadline and
    OpenAI-shaped parser errors (see the module docstring).

    Args:
        guard: the listener's ``ConnectionGuard``.
        header_timeout_s: seconds a request's line and headers may take.
        kwargs: ``RequestHandler``'s own (``loop``, ``keepalive_timeout``, ...).
    """

    __slots__ = ("_guard", "_header_timeout_s", "_timer", "_counted", "_refused", "_lingering")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, header_timeout_s: float,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._header_timeout_s = header_timeout_s
        self._timer: asyncio.TimerHandle | None = None  # header deadline, or refused linger
        self._counted = False  # admitted: counted open in the guard until connection_lost
        self._refused = False
        self._lingering = False  # refused and counted in the guard's ``lingering``

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        reason = self._guard.admit()
        if reason is not None:
            self._refuse(cast(asyncio.Transport, transport), linger=reason != "file_descriptors")
            return
        self._counted = True
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        if self._refused:
            cast(GatewayServer, self._manager).refused.discard(self)
            self.transport = None
            if self._lingering:
                self._lingering = False
                self._guard.lingering -= 1
            return
        if self._counted:
            self._counted = False
            self._guard.release()
        super().connection_lost(exc)

    def close(self) -> None:
        """Stop taking requests once the current one is answered (aiohttp's ``pre_shutdown``
        calls this on every connection when the drain starts). An upgraded connection (a
        WebSocket) keeps reading: its pongs and close frames must still arrive while its
        streams finish, and the app's drain closes it with 1012 (``SocketRegistry.close_all``)."""
        if self._upgraded:
            return
        super().close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped while the refusal lingers
        waiting = self._waiter is not None and not self._waiter.done()
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:  # a request's headers are complete (or rejected)
            self._cancel_timer()
            if isinstance(self._messages[-1][0], _ErrInfo):
                self._fail_unfinished_bodies()
        elif waiting and data and self._timer is None:  # the first bytes of the next request
            self._arm_header_deadline()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        """The answer to a request the parser rejected (``status`` 400 from aiohttp) or
        that failed outside the app's middleware (500): JSON in the OpenAI shape, with a
        fixed message, logged without the request's bytes; the connection then closes."""
        if request.writer.output_size > 0:  # as aiohttp: a response is already under way
            raise ConnectionError("Response is sent already, cannot send another response "
                                  "with the error message")
        if status >= 500:
            error_log.error("request failed outside the gateway middleware", exc_info=exc)
            return error_answer(GatewayError("The gateway had an internal error."))
        error = parse_error(exc, max_field_size=self.max_field_size, max_headers=self.max_headers)
        self._guard.note("malformed_request", status=error.http_status, code=error.code,
                         error=type(exc).__name__)
        return error_answer(error)

    def _refuse(self, transport: asyncio.Transport, *, linger: bool) -> None:
        """Answer 503 at once, shut the write side, and with ``linger`` drop what arrives
        and close when the client does or after ``REFUSED_LINGER_S``; without it (short of
        descriptors: a lingering refusal would hold one) close as soon as the 503 is out."""
        self._refused = True
        self.transport = transport
        cast(GatewayServer, self._manager).refused.add(self)
        transport.write(refusal_bytes())
        if not linger:
            transport.close()
            return
        if transport.can_write_eof():
            transport.write_eof()
        self._lingering = True
        self._guard.lingering += 1
        self._timer = self._loop.call_later(REFUSED_LINGER_S, transport.abort)

    def abort(self) -> None:
        """Close at once (a refused connection, at shutdown)."""
        if self.transport is not None:
            self.transport.abort()

    def _arm_header_deadline(self) -> None:
        self._timer = self._loop.call_later(self._header_timeout_s, self._header_deadline_passed)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_deadline_passed(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return  # a request is being served: its headers did complete
        self._guard.note("header_timeout")
        self.force_close()

    def _fail_unfinished_bodies(self) -> None:
        """The parser failed inside a request body it had already handed out (broken
        chunked framing after the headers). aiohttp then drops that body without an error,
        so the handler reading it would wait until the client leaves; fail it instead (the
        handler answers 400 ``invalid_body``) and close the connection after that answer."""
        payloads = [payload for message, payload in self._messages if not isinstance(message, _ErrInfo)]
        if self._current_request is not None:
            payloads.append(self._current_request.content)
        unfinished = [p for p in payloads if not p.is_eof() and p.exception() is None]
        for payload in unfinished:
            payload.set_exception(malformed_body())
            payload.feed_eof()  # nothing more will come: aiohttp skips its lingering read
        if unfinished:
            self._guard.note("malformed_request", status=400, code="invalid_body")
            self.close()


class GatewayServer(web.Server):
    """aiohttp's low-level server, building ``GatewayProtocol`` connections.

    Built from the ``web.Server`` that ``web.AppRunner`` made (so every handler argument
    aiohttp assembles, e.g. ``keepalive_timeout``, is kept as it is). ``refused`` holds the
    refused connections still lingering; ``pre_shutdown`` closes them too.
    """

    def __init__(self, made: web.Server, guard: ConnectionGuard, header_timeout_s: float) -> None:
        super().__init__(made.request_handler, request_factory=made.request_factory,
                         handler_cancellation=made.handler_cancellation,
                         loop=asyncio.get_running_loop(), **made._kwargs)
        self.guard = guard
        self.header_timeout_s = header_timeout_s
        self.refused: set[GatewayProtocol] = set()

    def __call__(self) -> RequestHandler:
        return GatewayProtocol(self, guard=self.guard, header_timeout_s=self.header_timeout_s,
                               loop=self._loop, **self._kwargs)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for protocol in list(self.refused):
            protocol.abort()


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose server builds ``GatewayProtocol`` connections; ``guard`` is
    the listener's ``ConnectionGuard``. Other keyword arguments are ``web.AppRunner``'s."""

    __slots__ = ("guard", "header_timeout_s")

    def __init__(self, app: web.Application, guard: ConnectionGuard, header_timeout_s: float,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard
        self.header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        return GatewayServer(await super()._make_server(), self.guard, self.header_timeout_s)
