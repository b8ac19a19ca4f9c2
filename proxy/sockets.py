"""Open WebSockets of this process: the per-key cap and the drain (DESIGN §4 "WebSocket").

Sans-I/O: a socket is registered with a *closer*, an ``async (code, reason)`` callable the
transport provides, so this module never touches aiohttp. Every WebSocket endpoint calls
``SocketRegistry.open`` before its upgrade (a refusal is a real HTTP status, never an
accept-then-close), counts the requests it has running in ``OpenSocket.in_flight``, and
calls ``OpenSocket.release`` when the socket is gone. On shutdown ``close_all`` lets the
requests in flight finish, then closes every socket with 1012 (service restart, RFC 6455
§7.4.1 as registered by IANA), which clients take as a cue to reconnect elsewhere.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

from proxy.auth import Principal
from proxy.errors import OverloadedError, RateLimitError

#: ``async closer(code, reason)``: close the client's socket with this close code and reason.
Closer = Callable[[int, str], Awaitable[None]]

#: Close code for a socket closed because the gateway is shutting down (service restart).
SERVICE_RESTART = 1012

#: How often ``close_all`` looks whether the sockets' requests have finished, in seconds.
_DRAIN_POLL_S = 0.05


class TooManyWebSocketsError(RateLimitError):
    """The key already holds ``keys.<name>.max_websockets`` open sockets (429)."""

    default_code = "too_many_websockets"


class OpenSocket:
    """One open WebSocket, held from before its upgrade until it is gone.

    Attributes:
        key_name: the key that opened it.
        endpoint: its path (``/v1/ws``, ``/v1/realtime``…), a metrics label.
        in_flight: requests (or streams being written) running on it now; the transport
            raises and lowers it, and ``close_all`` waits for it to reach 0.
    """

    __slots__ = ("key_name", "endpoint", "in_flight", "_closer", "_registry")

    def __init__(self, registry: SocketRegistry, key_name: str, closer: Closer,
                 endpoint: str = "-") -> None:
        self.key_name = key_name
        self.endpoint = endpoint
        self.in_flight = 0
        self._closer = closer
        self._registry = registry

    def __repr__(self) -> str:
        return f"<OpenSocket key={self.key_name!r} in_flight={self.in_flight}>"

    async def close(self, code: int, reason: str) -> None:
        """Close the client's socket (through its closer); errors of a socket already gone
        are the transport's to swallow."""
        await self._closer(code, reason)

    def release(self) -> None:
        """Forget this socket (idempotent); call it in ``finally`` once the socket is gone."""
        self._registry._release(self)


class SocketRegistry:
    """The WebSockets open in this process, by key. ``draining`` is set by ``close_all``:
    from then on no socket opens (503 ``shutting_down``) and open ones take no new requests.
    ``on_refuse(key_name, reason)`` is called for each socket refused for its key's cap (a
    metric)."""

    def __init__(self) -> None:
        self._open: set[OpenSocket] = set()
        self._by_key: Counter[str] = Counter()
        self._by_endpoint: Counter[str] = Counter()
        self.draining = False
        self.on_refuse: Callable[[str, str], None] = lambda _key, _reason: None

    def __len__(self) -> int:
        return len(self._open)

    def __repr__(self) -> str:
        return f"<SocketRegistry open={len(self._open)} draining={self.draining}>"

    def count(self, key_name: str) -> int:
        """Sockets ``key_name`` holds open now."""
        return self._by_key[key_name]

    def by_endpoint(self) -> dict[str, int]:
        """Sockets open now per endpoint (``OpenSocket.endpoint``)."""
        return dict(self._by_endpoint)

    def open(self, principal: Principal, closer: Closer, endpoint: str = "-") -> OpenSocket:
        """Register a socket for ``principal`` before its upgrade (``endpoint``: its path).

        Raises:
            OverloadedError: the gateway is shutting down (503 ``shutting_down``).
            TooManyWebSocketsError: the key holds ``max_websockets`` sockets already (429,
                ``retry-after`` 1 s).
        """
        if self.draining:
            raise OverloadedError("The gateway is shutting down; reconnect elsewhere.",
                                  code="shutting_down", retry_after_s=1.0)
        if self._by_key[principal.name] >= principal.max_websockets:
            self.on_refuse(principal.name, "too_many_websockets")
            raise TooManyWebSocketsError(
                f"This key already holds {principal.max_websockets} open WebSockets "
                "(keys.<name>.max_websockets); close one first.", retry_after_s=1.0)
        socket = OpenSocket(self, principal.name, closer, endpoint)
        self._open.add(socket)
        self._by_key[principal.name] += 1
        self._by_endpoint[endpoint] += 1
        return socket

    def _release(self, socket: OpenSocket) -> None:
        if socket in self._open:
            self._open.discard(socket)
            self._by_key[socket.key_name] -= 1
            if self._by_key[socket.key_name] <= 0:
                del self._by_key[socket.key_name]
            self._by_endpoint[socket.endpoint] -= 1
            if self._by_endpoint[socket.endpoint] <= 0:
                del self._by_endpoint[socket.endpoint]

    async def close_all(self, deadline_s: float, code: int = SERVICE_RESTART,
                        reason: str = "service restart") -> None:
        """Drain: refuse new sockets and requests, wait until no socket has a request in
        flight or the loop time ``deadline_s`` passes, then close every socket with ``code``.
        Cancelling is safe (sockets not yet closed stay open until aiohttp closes them)."""
        self.draining = True
        loop = asyncio.get_running_loop()
        while any(s.in_flight for s in self._open) and loop.time() < deadline_s:  # noqa: ASYNC110
            await asyncio.sleep(_DRAIN_POLL_S)
        await asyncio.gather(*(s.close(code, reason) for s in list(self._open)),
                             return_exceptions=True)
