"""Load generator process for ``scripts/loadtest.py``: a raw HTTP/1.1 keep-alive client.

Run as ``loadtest_client.py '<json spec>'``; prints one JSON object of results on stdout.
The spec is built by ``loadtest.py`` (``client_spec`` there): target host/port/path,
extra headers, the JSON body, ``mode`` (``closed``: ``concurrency`` connections each sending
back to back; ``rate``: open loop at ``rate`` req/s), ``duration_s``, ``warmup_s``,
``timeout_s`` and ``start_at`` (a ``time.time()`` at which to begin, so several generator
processes start together).

Why not aiohttp's client: on this 2-core machine the generator shares a core with the mock
upstream, so it must cost far less per request than the server under test (measured here:
~26 us CPU per non-stream request, against ~95 us for an aiohttp ``ClientSession``). It is
an ``asyncio.Protocol`` on uvloop that writes one pre-built request per round trip and
parses only what it needs (status line, ``Content-Length`` or ``chunked``, ``Connection:
close``, and for streams the first ``data:`` and the final ``data: [DONE]``). No pipelining:
one request at a time per connection, like the OpenAI SDKs.

Figures: latency is from the moment a request is issued (in ``rate`` mode: when its
scheduled task starts, so a wait for a free connection counts; the generator's own timer
lateness does not, it is reported as ``max_lag_ms``) to the last body byte; TTFT is to the
first chunk containing ``data:``. Only successes inside the measurement window
``[start + warmup_s, start + duration_s]`` are counted in ``ok``/latencies: by completion
time in ``closed`` mode (so ``ok / window`` is the throughput), by issue time in ``rate``
mode (so slow answers at the end are not dropped). Errors are counted over the whole
phase, keyed by ``HTTP <status>``, ``stream without [DONE]`` or exception class name.

Optional spec fields (the scenarios of ``loadtest.py`` use them): ``classify``, a list of
``[substring, label]``: an error response whose body (first 512 bytes) contains
``substring`` is keyed ``HTTP <status> <label>``, any other one ``HTTP <status> <code>``
with the ``code`` of an OpenAI error body, if any. Then error latencies inside the window
are kept too (``error_latencies_ms``, by key). ``timeline_s``: also count every finished
request (``ok`` or its error key) in buckets of that many seconds by completion time from
the start (``timeline``: ``{bucket index: {key: count}}``).
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import uvloop

# status, first data: time, [DONE] seen, keep-alive, start of the body of a non-200 answer
Result = tuple[int, float | None, bool, bool, bytes]
ERROR_BODY_BYTES = 512


class IncompleteResponseError(ConnectionError):
    """The server closed the connection before the response was complete."""


class ProtocolViolationError(ValueError):
    """The response could not be parsed as HTTP/1.1."""


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[Result] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("busy" if self._waiter else "idle")
        return f"<Connection {state} buffered={len(self._buf)}>"

    def _reset(self) -> None:
        self._state = self._head
        self._status, self._need, self._keep_alive = 0, 0, True
        self._first_data: float | None = None
        self._tail = b""
        self._error_body = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's isn't a subclass

    def request(self, raw: bytes, timeout_s: float) -> asyncio.Future[Result]:
        """Send ``raw`` and return a future for the parsed response; not re-entrant."""
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._timer = loop.call_later(timeout_s, self._fail, TimeoutError())
        assert self.transport is not None
        self.transport.write(raw)
        return self._waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            while self._waiter is not None and self._state():
                pass
        except (ValueError, IndexError) as exc:
            self._fail(ProtocolViolationError(str(exc)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == self._until_close:
            self._finish()
        else:
            self._fail(IncompleteResponseError(str(exc or "connection closed")))

    def _fail(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self._waiter = None
        self.close()

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._waiter is not None and not self._waiter.done():
            done = b"data: [DONE]" in self._tail
            self._waiter.set_result((self._status, self._first_data, done, self._keep_alive,
                                     self._error_body))
        self._waiter = None
        self._reset()

    def _watch(self, start: int, stop: int) -> None:
        """Note the first ``data:`` in ``_buf[start:stop]`` and keep its last bytes, where
        ``[DONE]`` must be at the end. Events arrive whole (one write per event). Of an
        error answer, keep the start of the body."""
        if self._status != 200 and len(self._error_body) < ERROR_BODY_BYTES:
            room = ERROR_BODY_BYTES - len(self._error_body)
            self._error_body += bytes(self._buf[start : min(stop, start + room)])
        if self._first_data is None and self._buf.find(b"data:", start, stop) >= 0:
            self._first_data = time.perf_counter()
        if stop > start:
            self._tail = bytes(self._buf[max(start, stop - 24) : stop])

    def _head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self._buf[:end]).lower()
        del self._buf[: end + 4]
        self._status = int(head[9:12])
        self._keep_alive = b"\r\nconnection: close" not in head
        if b"\r\ntransfer-encoding: chunked" in head:
            self._state = self._chunks
        elif (pos := head.find(b"\r\ncontent-length:")) >= 0:
            self._need = int(head[pos + 17 :].split(b"\r\n", 1)[0])
            self._state = self._body
        else:
            self._keep_alive, self._state = False, self._until_close
        return True

    def _body(self) -> bool:
        if len(self._buf) < self._need:
            return False
        self._watch(0, self._need)
        del self._buf[: self._need]
        self._finish()
        return True

    def _until_close(self) -> bool:
        self._watch(0, len(self._buf))
        self._buf.clear()
        return False

    def _chunks(self) -> bool:
        """Consume every complete chunk in the buffer (RFC 9112 §7.1), then compact."""
        buf, pos = self._buf, 0
        while (end := buf.find(b"\r\n", pos)) >= 0:
            size = int(bytes(buf[pos:end]).split(b";", 1)[0], 16)
            if size == 0:
                del buf[:end + 2]
                self._state = self._trailers
                return True
            if len(buf) < end + size + 4:
                break
            self._watch(end + 2, end + 2 + size)
            pos = end + size + 4
        del buf[:pos]
        return False

    def _trailers(self) -> bool:
        end = self._buf.find(b"\r\n")
        if end < 0:
            return False
        del self._buf[: end + 2]
        if end == 0:
            self._finish()
        return True


@dataclass
class Stats:
    """What one generator process measured; ``*_s`` are ``perf_counter`` seconds."""

    window_start_s: float
    window_end_s: float
    stream: bool
    by_issue: bool  # window by issue time (open loop) instead of completion time
    latencies_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    issued: int = 0
    max_lag_ms: float = 0.0
    origin_s: float = 0.0  # the start of the phase (timeline buckets count from here)
    classify: list[tuple[bytes, str]] | None = None  # None: errors keyed by status only
    timeline_s: float | None = None
    error_latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    timeline: dict[int, Counter[str]] = field(default_factory=dict)

    def in_window(self, start: float, end: float) -> bool:
        return self.window_start_s <= (start if self.by_issue else end) <= self.window_end_s

    def record(self, start: float, result: Result) -> None:
        """Count one finished response issued at ``start``."""
        end = time.perf_counter()
        status, first_data, done, _, body = result
        if status != 200:
            self.error(self.error_key(status, body), start, end)
        elif self.stream and not done:
            self.error("stream without [DONE]", start, end)
        else:
            self.tick("ok", end)
            if self.in_window(start, end):
                self.latencies_ms.append((end - start) * 1000)
                if first_data is not None:
                    self.ttft_ms.append((first_data - start) * 1000)

    def error(self, key: str, start: float, end: float) -> None:
        """Count one failed request issued at ``start`` that ended at ``end``."""
        self.errors[key] += 1
        self.tick(key, end)
        if self.classify is not None and self.in_window(start, end):
            self.error_latencies_ms.setdefault(key, []).append((end - start) * 1000)

    def tick(self, key: str, end: float) -> None:
        if self.timeline_s:
            bucket = int((end - self.origin_s) / self.timeline_s)
            self.timeline.setdefault(bucket, Counter())[key] += 1

    def error_key(self, status: int, body: bytes) -> str:
        """``HTTP <status>``, refined by ``classify`` or the error body's ``code``."""
        if self.classify is None:
            return f"HTTP {status}"
        for needle, label in self.classify:
            if needle in body:
                return f"HTTP {status} {label}"
        try:
            code = orjson.loads(body)["error"]["code"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return f"HTTP {status}"
        return f"HTTP {status} {code}" if isinstance(code, str) and code else f"HTTP {status}"

    def to_json(self, cpu_s: float) -> dict[str, Any]:
        return {
            "ok": len(self.latencies_ms), "window_s": self.window_end_s - self.window_start_s,
            "latencies_ms": self.latencies_ms, "ttft_ms": self.ttft_ms,
            "errors": dict(self.errors), "issued": self.issued,
            "max_lag_ms": self.max_lag_ms, "cpu_s": cpu_s,
            "error_latencies_ms": self.error_latencies_ms,
            "timeline": {str(k): dict(v) for k, v in sorted(self.timeline.items())},
        }


@dataclass
class Generator:
    """The target, the request bytes and the pool of connections of one generator run."""

    host: str
    port: int
    raw: bytes
    end_s: float
    timeout_s: float
    stats: Stats
    idle: list[Connection] = field(default_factory=list)

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Connection, self.host, self.port)
        return conn

    async def exchange(self, conn: Connection | None,
                       start: float | None = None) -> Connection | None:
        """Send one request on ``conn`` (or a new connection); return it if reusable.
        Latency counts from ``start`` (``perf_counter`` seconds; None: now)."""
        start = time.perf_counter() if start is None else start
        self.stats.issued += 1
        try:
            if conn is None or conn.closed:
                conn = await self.connect()
            result = await conn.request(self.raw, self.timeout_s)
        except (OSError, TimeoutError, ValueError) as exc:
            self.stats.error(type(exc).__name__, start, time.perf_counter())
            if conn is not None:
                conn.close()
            await asyncio.sleep(0.01)  # no hot loop against a refusing server
            return None
        self.stats.record(start, result)
        return conn if result[3] and not conn.closed else None


async def closed_worker(gen: Generator) -> None:
    """Send back to back on one connection until the phase ends."""
    conn: Connection | None = None
    while time.perf_counter() < gen.end_s:
        conn = await gen.exchange(conn)
    if conn is not None:
        conn.close()


async def open_request(gen: Generator, pool: asyncio.Semaphore) -> None:
    """One open-loop request: wait for a free connection slot (counted in its latency,
    since an open loop must not hide a slow server), then send."""
    start = time.perf_counter()
    async with pool:
        conn = gen.idle.pop() if gen.idle else None
        conn = await gen.exchange(conn, start)
        if conn is not None:
            gen.idle.append(conn)


async def open_loop(gen: Generator, rate: float, start_s: float, max_conns: int) -> None:
    """Issue requests at ``rate`` per second from ``start_s`` regardless of answers."""
    pool, tasks = asyncio.Semaphore(max_conns), set()
    count = int(rate * (gen.end_s - start_s))
    for i in range(count):
        due = start_s + i / rate
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        gen.stats.max_lag_ms = max(gen.stats.max_lag_ms, (time.perf_counter() - due) * 1000)
        task = asyncio.create_task(open_request(gen, pool))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=gen.timeout_s + 1)


def build_request(spec: dict[str, Any]) -> bytes:
    """The exact bytes of the one request this process repeats."""
    body = orjson.dumps(spec["body"])
    lines = [f"POST {spec['path']} HTTP/1.1", f"Host: {spec['host']}:{spec['port']}",
             "Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in spec["headers"].items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one phase as the spec says; return the figures (see module docstring)."""
    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    start = time.perf_counter()
    classify = spec.get("classify")
    stats = Stats(start + spec["warmup_s"], start + spec["duration_s"],
                  spec["body"]["stream"], by_issue=spec["mode"] == "rate", origin_s=start,
                  classify=None if classify is None else
                  [(needle.encode(), label) for needle, label in classify],
                  timeline_s=spec.get("timeline_s"))
    gen = Generator(spec["host"], spec["port"], build_request(spec), stats.window_end_s,
                    spec["timeout_s"], stats)
    cpu0 = cpu_seconds()
    if spec["mode"] == "rate":
        await open_loop(gen, spec["rate"], start, spec["max_connections"])
    else:
        workers = [asyncio.create_task(closed_worker(gen)) for _ in range(spec["concurrency"])]
        _, late = await asyncio.wait(workers, timeout=spec["duration_s"] + spec["timeout_s"])
        for task in late:
            task.cancel()
    for conn in gen.idle:
        conn.close()
    return stats.to_json(cpu_seconds() - cpu0)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    spec = orjson.loads(sys.argv[1])
    result = uvloop.run(run(spec))
    sys.stdout.buffer.write(orjson.dumps(result))


if __name__ == "__main__":
    main()
