"""ChaosRelay: a TCP relay on loopback that cuts connections after a chosen number of bytes.

Put it between a client and a server to drop a connection at an exact byte of the answer::

    async with ChaosRelay(server_port, cut_after_bytes=[300, None]) as relay:
        client = httpx.AsyncClient(base_url=relay.url)   # 1st connection cut after 300
        ...                                               # bytes, later ones never
        assert (relay.connections, relay.cuts) == (2, 1)

Counting covers every byte the server sends on the connection, HTTP status line and headers
included; ``relay.history[i].head`` keeps the first bytes so a test can find where the
headers end. Only the server→client direction is cut; client→server bytes are forwarded as
they come.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

#: When to cut connection ``i`` (counting from 0): ``None`` never, an int after that many
#: server→client bytes. A sequence gives one entry per connection (``None`` past its end);
#: a callable is asked with ``i``.
CutRule = int | None | Sequence[int | None] | Callable[[int], int | None]

CutMode = Literal["reset", "close"]

_READ_BYTES = 64 * 1024


@dataclass
class RelayedConnection:
    """What happened on one accepted connection.

    Attributes:
        index: the connection's number, from 0 in accept order.
        cut_after_bytes: the limit it was given (``None``: never cut).
        target_port: the server port it was relayed to.
        up_bytes: client→server bytes forwarded.
        down_bytes: server→client bytes forwarded (never more than the limit).
        cut: whether the relay cut it.
        head: the first ``head_bytes`` server→client bytes forwarded.
    """

    index: int
    cut_after_bytes: int | None
    target_port: int = 0
    up_bytes: int = 0
    down_bytes: int = 0
    cut: bool = False
    head: bytearray = field(default_factory=bytearray)


class ChaosRelay:
    """An asyncio TCP relay on 127.0.0.1 (a free port) in front of ``target_host:target_port``.

    Args:
        target_port: the server's port. Reassign it at any time to send connections
            accepted afterwards elsewhere (a server down, another instance); ``later_port``
            does that from the second connection on.
        target_host: the server's host (default ``127.0.0.1``).
        cut_after_bytes: a ``CutRule``; the attribute of the same name may be reassigned
            at any time and applies to connections accepted afterwards.
        cut_mode: ``"reset"`` (default) aborts the client side with an RST (``SO_LINGER``
            0), which clients see as ``ECONNRESET``; ``"close"`` sends a clean FIN after the
            allowed bytes, which HTTP clients see as a body that ended early. Either way the
            server side is closed too, so the server sees its client leave.
        head_bytes: how many first server→client bytes each ``RelayedConnection`` keeps
            (default 4096).

    Use it as an async context manager (or ``start()``/``close()``); closing stops
    listening and aborts every live connection, which its clients see as a reset.
    ``history`` holds a ``RelayedConnection`` per accepted connection; ``connections`` and
    ``cuts`` count the connections accepted and cut. ``url`` is ``http://127.0.0.1:<port>``.

    The allowed bytes are flushed to the kernel before a cut. On loopback they reach the
    client before the cut does, so a client has read exactly ``cut_after_bytes`` bytes
    when it sees the error (an RST can in principle overtake data still in flight).
    A limit of 0 cuts when the server's first bytes arrive, after the request went through.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *,
                 cut_after_bytes: CutRule = None, cut_mode: CutMode = "reset",
                 head_bytes: int = 4096, later_port: int | None = None) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.later_port = later_port
        self.cut_after_bytes = cut_after_bytes
        self.cut_mode: CutMode = cut_mode
        self.head_bytes = head_bytes
        self.history: list[RelayedConnection] = []
        self._server: asyncio.Server | None = None
        self._tasks: dict[asyncio.Task[None], asyncio.StreamWriter] = {}  # → client side

    @property
    def port(self) -> int:
        """The listening port (only once started)."""
        if self._server is None:
            raise RuntimeError("ChaosRelay is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """How many connections the relay has accepted."""
        return len(self.history)

    @property
    def cuts(self) -> int:
        """How many connections the relay has cut."""
        return sum(conn.cut for conn in self.history)

    def __repr__(self) -> str:
        state = "listening" if self._server is not None else "closed"
        return (f"<ChaosRelay [{state}] -> {self.target_host}:{self.target_port} "
                f"[connections: {self.connections}, cuts: {self.cuts}]>")

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        """Stop listening and abort every live connection (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> ChaosRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _limit_for(self, index: int) -> int | None:
        rule = self.cut_after_bytes
        if rule is None or isinstance(rule, int):
            return rule
        if callable(rule):
            return rule(index)
        return rule[index] if index < len(rule) else None

    def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # Our own task (not the one asyncio would wrap a coroutine in), so that close() can
        # cancel it without asyncio logging the cancellation as an error.
        if self._server is None:  # accepted while closing
            client_w.transport.abort()
            return
        index = self.connections
        port = self.later_port if index > 0 and self.later_port is not None else self.target_port
        conn = RelayedConnection(index, self._limit_for(index), port)
        self.history.append(conn)
        task = asyncio.create_task(self._serve(conn, client_r, client_w))
        self._tasks[task] = client_w
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        client_w = self._tasks.pop(task)
        if not client_w.transport.is_closing():  # cancelled before it ran
            client_w.transport.abort()

    async def _serve(self, conn: RelayedConnection, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        try:
            await self._relay(conn, client_r, client_w)
        except OSError:
            pass  # a side went away; the other is closed below
        finally:
            if not client_w.transport.is_closing():
                client_w.transport.abort()  # an RST when cut in "reset" mode (SO_LINGER 0)

    async def _relay(self, conn: RelayedConnection, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        client_w.transport.set_write_buffer_limits(high=0)  # drain() means "all in the kernel"
        server_r, server_w = await asyncio.open_connection(self.target_host, conn.target_port)
        up = asyncio.create_task(self._pump_up(conn, client_r, server_w))
        try:
            await self._pump_down(conn, server_r, client_w)
        finally:
            server_w.transport.abort()
            if conn.cut and self.cut_mode == "close":
                client_w.close()  # a FIN once the allowed bytes are out
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)

    async def _pump_up(self, conn: RelayedConnection, client_r: asyncio.StreamReader,
                       server_w: asyncio.StreamWriter) -> None:
        try:
            while data := await client_r.read(_READ_BYTES):
                conn.up_bytes += len(data)
                server_w.write(data)
                await server_w.drain()
            server_w.write_eof()
        except OSError:
            server_w.transport.abort()

    async def _pump_down(self, conn: RelayedConnection, server_r: asyncio.StreamReader,
                         client_w: asyncio.StreamWriter) -> None:
        while data := await server_r.read(_READ_BYTES):
            limit = conn.cut_after_bytes
            allowed = data if limit is None else data[:limit - conn.down_bytes]
            conn.down_bytes += len(allowed)
            conn.head += allowed[:max(0, self.head_bytes - len(conn.head))]
            client_w.write(allowed)
            await client_w.drain()
            if limit is not None and conn.down_bytes >= limit:
                self._cut(conn, client_w)
                return
        client_w.write_eof()

    def _cut(self, conn: RelayedConnection, client_w: asyncio.StreamWriter) -> None:
        conn.cut = True
        if self.cut_mode == "reset":
            sock = client_w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

