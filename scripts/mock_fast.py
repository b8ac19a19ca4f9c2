"""The mock upstream's load-test engine: ``scripts/mock_upstream.py``'s answers, at a fraction
of the CPU.

    python scripts/mock_fast.py --port 9001 [--host 127.0.0.1] [--ttft-ms 0]
        [--token-delay-ms 0] [--tokens 8]

prints ``mock upstream (fast engine) listening on http://host:port`` when ready. From a test::

    from scripts.mock_fast import start_server
    server = await start_server(MockConfig(tokens=5), "127.0.0.1", 0)

Why: on a 2-core machine a gateway with two workers needs both CPUs, so the mock must cost
little per request or it eats the second core. ``mock_upstream.py`` (an aiohttp app) costs
about 100 us CPU per non-stream request; this engine is a raw HTTP/1.1 keep-alive server
(an ``asyncio.Protocol``, uvloop when installed) that answers from caches of serialized
answers: a request already seen, byte for byte, costs a dict lookup and a ``join``.

Measured on the 2-core reference VM (CPU ticks from ``/proc/<pid>/stat``; the mock pinned
to one CPU, ``wrk -t1 -c32`` on the other; 16-token chat completions): non-stream 9-10 us
CPU per request at ~36k req/s (``mock_upstream.py``: ~96 us at ~8k req/s), stream without
token delay ~12 us. Behind a gateway, at a few thousand req/s, it is 15-20 us: then every
request pays its own wake-up (``epoll_wait``, ``recv``, ``send`` on loopback), which is
most of the cost; the Python work per request is about 1.5 us.

What it serves (the answers are ``mock_upstream.py``'s, built with its helpers, so its
module docstring describes them):

* ``POST /v1/chat/completions``: JSON, or SSE with ``"stream": true`` (chunked transfer
  encoding, one chunk per event), ``stream_options.include_usage``, ``n``,
  ``max_tokens`` / ``max_completion_tokens`` cutting the answer with finish_reason
  ``"length"``, ``--tokens`` tokens otherwise. Ids are ``chatcmpl-mock-`` + a zero-padded
  serial number (ten digits, so that a cached answer keeps its length).
* ``GET /v1/models``: ``MODEL_IDS`` (the gateway's health checks use it).
* anything else: 404 with an OpenAI error body. A request with any ``x-mock-*`` header: 400
  (the knobs are ``mock_upstream.py``'s; only ``--ttft-ms``/``--token-delay-ms``/``--tokens``
  exist here, per process).

Timing is ``mock_upstream.py``'s: every answer (errors included, but not the 400/404 of this
engine) waits ``--ttft-ms``; a non-stream answer then waits ``tokens * --token-delay-ms``,
a stream waits ``--token-delay-ms`` before each token. Delays are ``loop.call_later``
timers, no task per request.

HTTP/1.1 (RFC 9112): keep-alive, pipelined requests answered in order, requests split over
any number of reads, ``Content-Length`` bodies. Refused, then the connection closed: a
``Transfer-Encoding`` request body (411), a head over ``MAX_HEAD_BYTES`` (431), a body over
``MAX_BODY_BYTES`` (413), a malformed request line or Content-Length (400). ``Connection:
close`` (and HTTP/1.0 without ``keep-alive``) closes the connection after the answer.
Bounded memory: reading pauses while an answer waits and ``PAUSE_READING_BYTES`` are
buffered, and while the transport's write buffer is full; at most ``CACHE_ENTRIES`` answers
are cached (bodies up to ``CACHE_BODY_BYTES``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import orjson
from aiohttp import web

try:  # imported as scripts.mock_fast (tests) or run as a script (scripts/ on sys.path)
    from scripts import mock_upstream as upstream
except ImportError:  # pragma: no cover - script mode
    import mock_upstream as upstream  # type: ignore[no-redef,import-not-found]

MAX_HEAD_BYTES = 1024 * 1024
MAX_BODY_BYTES = 1024 * 1024
PAUSE_READING_BYTES = 64 * 1024
CACHE_ENTRIES = 256
CACHE_BODY_BYTES = 64 * 1024
ID_DIGITS = 10
# Stand-ins of exactly the final width, so a template's lengths are the answer's: the
# serial number (ten digits) and ``created`` (a JSON string of ten bytes, quotes included,
# where ten digits go; Unix time has ten digits until 2286).
ID_MARK = "~" * ID_DIGITS
CREATED_MARK = "~" * 8
KNOB_PREFIX = b"\r\nx-mock-"
NOT_SUPPORTED = "x-mock-* headers are not supported by the fast engine, use scripts/mock_upstream.py"


class HttpError(Exception):
    """A request this engine refuses; answered with ``status``, then the connection closes
    (like h11's ``ProtocolError(msg, error_status_hint)``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)  # not frozen: a frozen dataclass is twice as slow to build
class Request:
    """What the engine needs of one request; ``knob``: it has an ``x-mock-*`` header."""

    method: bytes
    path: bytes
    body: bytes
    close: bool
    knob: bool


# --------------------------------------------------------------------------- parsing


def _header(fields: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` in lower-cased ``fields`` (each line preceded by CRLF)."""
    start = fields.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    end = fields.find(b"\r\n", start)
    return fields[start : end if end >= 0 else len(fields)].strip()


def _content_length(fields: bytes) -> int:
    """The body length (RFC 9112 §6.3); 0 without the header. Raises HttpError."""
    raw = _header(fields, b"content-length")
    if raw is None:
        return 0
    if not raw.isdigit():
        raise HttpError(400, f"bad Content-Length: {raw.decode(errors='replace')!r}")
    length = int(raw)
    if length > MAX_BODY_BYTES:
        raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
    return length


def _wants_close(version: bytes, fields: bytes) -> bool:
    """RFC 9112 §9.3: HTTP/1.1 persists unless ``close``; HTTP/1.0 only with ``keep-alive``."""
    if b"\r\nconnection:" not in fields:
        return version == b"HTTP/1.0"
    option = _header(fields, b"connection") or b""
    return b"close" in option or (version == b"HTTP/1.0" and b"keep-alive" not in option)


def split_request(buf: bytes | bytearray) -> tuple[Request, int] | None:
    """The first complete request in ``buf`` and how many bytes it took; None until it is
    complete. Raises HttpError for a request this engine refuses.

    The hot path of the engine (about 2 us): a few scans of the head, no per-header work."""
    end = buf.find(b"\r\n\r\n")
    if end < 0 or end > MAX_HEAD_BYTES:
        if len(buf) > MAX_HEAD_BYTES:
            raise HttpError(431, f"request head over {MAX_HEAD_BYTES} bytes")
        return None
    eol = buf.find(b"\r\n")
    parts = bytes(buf[:eol]).split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise HttpError(400, "malformed request line")
    fields = bytes(buf[eol:end]).lower()  # every header line starts with CRLF
    if b"\r\ntransfer-encoding:" in fields:
        raise HttpError(411, "Transfer-Encoding request bodies are not supported; send Content-Length")
    total = end + 4 + _content_length(fields)
    if len(buf) < total:
        return None
    method, target, version = parts
    request = Request(method, target.partition(b"?")[0], bytes(buf[end + 4 : total]),
                      _wants_close(version, fields), KNOB_PREFIX in fields)
    return request, total


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True, slots=True)
class Answer:
    """A serialized answer, waiting only for its id and ``created``.

    ``bursts`` are written one after the other: the first after ``first_delay_s`` (with the
    head), each next one ``gap_s`` later. A burst is kept as the pieces between the
    ``<serial><mid><created>`` stretches of the answer (one per completion object or chunk),
    so rendering it is one ``join``."""

    head: bytes  # status line and headers, without the blank line
    bursts: tuple[tuple[bytes, ...], ...]
    first_delay_s: float = 0.0
    gap_s: float = 0.0
    mid: bytes = b""  # what lies between the id's serial and ``created``

    def render(self, index: int, stamp: bytes, close: bool) -> bytes:
        """Burst ``index`` as bytes (the head too for burst 0). ``stamp``: see ``stamp``."""
        body = stamp.join(self.bursts[index])
        if index:
            return body
        return b"".join((self.head, b"Connection: close\r\n\r\n" if close else b"\r\n", body))

    def stamp(self, serial: int, created: int) -> bytes:
        return b"%0*d%s%d" % (ID_DIGITS, serial, self.mid, created)


def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()


def _json_answer(status: int, body: bytes, delay_s: float, mid: bytes = b"") -> Answer:
    head = _status_line(status) + b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return Answer(head, (_pieces(body, mid),), delay_s, 0.0, mid)


def _from_response(response: web.Response, delay_s: float = 0.0) -> Answer:
    """An answer from one of mock_upstream's ``web.Response`` (an OpenAI error)."""
    return _json_answer(response.status, cast("bytes", response.body), delay_s)


def error_answer(status: int, message: str) -> Answer:
    """An OpenAI-shaped error, answered at once."""
    return _from_response(upstream.error_response(status, message))


def _pieces(data: bytes, mid: bytes) -> tuple[bytes, ...]:
    """``data`` split around its id/created stretches (the marks with ``mid`` between)."""
    if not mid:
        return (data,)
    return tuple(data.split(ID_MARK.encode() + mid + orjson.dumps(CREATED_MARK)))


def _meta(model: Any, kind: str) -> dict[str, Any]:
    """mock_upstream's ``_meta`` with stand-ins for the serial number and ``created``."""
    return {"id": "chatcmpl-mock-" + ID_MARK, "object": kind, "created": CREATED_MARK,
            "model": model or upstream.MODEL_IDS[0]}


def _mid(kind: str) -> bytes:
    return b'","object":"' + kind.encode() + b'","created":'


def _chunk(frame: bytes) -> bytes:
    """One SSE event as one chunk (RFC 9112 §7.1)."""
    return b"%x\r\n%s\r\n" % (len(frame), frame)


def _bursts(frames: Iterator[bytes]) -> list[bytes]:
    """Chunked frames grouped into the writes between token delays (``upstream.GAP``)."""
    bursts = [b""]
    for frame in frames:
        if frame == upstream.GAP:
            bursts.append(b"")
        else:
            bursts[-1] += _chunk(frame)
    bursts[-1] += b"0\r\n\r\n"
    return bursts


def _stream_answer(frames: Iterator[bytes], config: upstream.MockConfig) -> Answer:
    mid = _mid("chat.completion.chunk")
    bursts = _bursts(frames)
    if not config.token_delay_ms:
        bursts = [b"".join(bursts)]
    head = _status_line(200) + b"".join(
        f"{name}: {value}\r\n".encode() for name, value in upstream.SSE_HEADERS.items())
    return Answer(head + b"Transfer-Encoding: chunked\r\n", tuple(_pieces(b, mid) for b in bursts),
                  config.ttft_ms / 1000, config.token_delay_ms / 1000, mid)


def chat_answer(raw: bytes, config: upstream.MockConfig) -> Answer:
    """``POST /v1/chat/completions`` with body ``raw``: mock_upstream's ``chat_completions``."""
    ttft_s = config.ttft_ms / 1000
    try:
        body = upstream._json_body(raw)
        n = upstream._int_field(body, "n", 1, 1, upstream.MAX_N)
        limit = upstream._int_field(body, "max_completion_tokens", None, 0, 2**31)
        limit = upstream._int_field(body, "max_tokens", None, 0, 2**31) if limit is None else limit
    except upstream.MockReply as reply:
        return _from_response(cast("web.Response", reply.response), ttft_s)
    n_tokens, cut = upstream._answer_length(config, limit)
    finish = "length" if cut else "stop"
    usage = upstream._usage(body.get("messages"), n * n_tokens)
    if body.get("stream"):
        meta = _meta(body.get("model"), "chat.completion.chunk")
        wanted = usage if upstream._wants_usage(body) else None
        return _stream_answer(upstream._chat_frames(meta, n, n_tokens, finish, wanted), config)
    text = upstream.expected_text(n_tokens)
    payload = _meta(body.get("model"), "chat.completion")
    payload["choices"] = [upstream._chat_choice(i, text, finish) for i in range(n)]
    payload["usage"] = usage
    delay_s = ttft_s + config.token_delay_ms * n_tokens / 1000
    return _json_answer(200, orjson.dumps(payload), delay_s, _mid("chat.completion"))


def models_answer(config: upstream.MockConfig) -> Answer:
    """``GET /v1/models``."""
    data = [upstream._model_object(m) for m in upstream.MODEL_IDS]
    return _json_answer(200, orjson.dumps({"object": "list", "data": data}), config.ttft_ms / 1000)


def _bounded_put(cache: dict[bytes, Any], key: bytes, value: Any) -> None:
    """Keep ``value`` unless ``key`` is too big; past ``CACHE_ENTRIES`` drop the oldest."""
    if len(key) > CACHE_BODY_BYTES:
        return
    if len(cache) >= CACHE_ENTRIES:
        del cache[next(iter(cache))]
    cache[key] = value


class FastMock:
    """The engine's state: per-process knobs, the caches, the id serial numbers.

    Two caches: chat answers by request body, and (answer, close) by the exact bytes of a
    whole request that arrived alone in one read, so that a load generator repeating one
    request costs a dict lookup instead of a parse."""

    def __init__(self, config: upstream.MockConfig) -> None:
        self.config = config
        self.requests = 0
        self.connections = 0
        self._by_body: dict[bytes, Answer] = {}
        self._by_request: dict[bytes, tuple[Answer, bool]] = {}
        self._models = models_answer(config)
        self._serial = itertools.count(1)

    def __repr__(self) -> str:
        return (f"<FastMock [requests {self.requests} | connections {self.connections} | "
                f"cached {len(self._by_body)} bodies, {len(self._by_request)} requests]>")

    def seen(self, raw: bytes) -> tuple[Answer, bool] | None:
        """(answer, close) for a whole request ``raw`` already answered, else None."""
        hit = self._by_request.get(raw)
        if hit is not None:
            self.requests += 1
        return hit

    def remember(self, raw: bytes, answer: Answer, close: bool) -> None:
        """Note that the whole request ``raw`` is answered with ``answer``."""
        _bounded_put(self._by_request, raw, (answer, close))

    def answer(self, request: Request) -> Answer:
        """The answer to ``request``."""
        self.requests += 1
        if request.knob:
            return error_answer(400, NOT_SUPPORTED)
        if request.path == b"/v1/chat/completions" and request.method == b"POST":
            return self._chat(request.body)
        if request.path == b"/v1/models" and request.method == b"GET":
            return self._models
        return error_answer(404, f"{request.method.decode(errors='replace')} "
                                 f"{request.path.decode(errors='replace')} is not served by the "
                                 "fast engine (chat completions and models only)")

    def _chat(self, raw: bytes) -> Answer:
        answer = self._by_body.get(raw)
        if answer is None:
            answer = chat_answer(raw, self.config)
            _bounded_put(self._by_body, raw, answer)
        return answer

    def stamp(self, answer: Answer) -> bytes:
        """The next id serial number and the current time, in ``answer``'s layout."""
        return answer.stamp(next(self._serial), int(time.time()))


# --------------------------------------------------------------------------- connections


class FastConnection(asyncio.Protocol):
    """One client connection: parse requests as they arrive, answer them in order.

    An answer with a delay holds the connection (``_timer``) until its last burst is
    written; requests arriving meanwhile wait in ``_buf`` (reading pauses above
    ``PAUSE_READING_BYTES``). Write backpressure (``pause_writing``) also holds it."""

    def __init__(self, mock: FastMock) -> None:
        self._mock = mock
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._writes_paused = self._reads_paused = self._closing = self._eof = False
        # the answer being sent: (answer, stamp, close), and the next burst's index
        self._sending: tuple[Answer, bytes, bool] | None = None
        self._next_burst = 0

    def __repr__(self) -> str:
        state = "closing" if self._closing else ("sending" if self._sending else "idle")
        return f"<FastConnection {state} buffered={len(self._buf)}>"

    @property
    def _held(self) -> bool:
        return self._sending is not None or self._writes_paused or self._closing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)  # uvloop's isn't a subclass
        self._mock.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._mock.connections -= 1
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()

    def eof_received(self) -> bool:
        """The client is done sending: close now, or after the answer being sent."""
        self._eof = True
        return self._sending is not None

    def pause_writing(self) -> None:
        self._writes_paused = True

    def resume_writing(self) -> None:
        self._writes_paused = False
        self._process()

    def data_received(self, data: bytes) -> None:
        if not self._buf and not self._held:
            seen = self._mock.seen(data)  # the fast path: a request seen before, whole
            if seen is not None:
                out: list[bytes] = []
                self._start(*seen, out)
                self._flush(out)
                return
        self._buf += data
        if not self._held:
            self._process()
        elif len(self._buf) > PAUSE_READING_BYTES and not self._reads_paused:
            assert self._transport is not None
            self._transport.pause_reading()
            self._reads_paused = True

    def _process(self) -> None:
        """Answer every complete request in the buffer until one has to wait."""
        out: list[bytes] = []
        while not self._held:
            try:
                got = split_request(self._buf)
            except HttpError as exc:
                out.append(error_answer(exc.status, str(exc)).render(0, b"", close=True))
                self._closing = True
                break
            if got is None:
                break
            request, used = got
            answer = self._mock.answer(request)
            if used == len(self._buf):
                self._mock.remember(bytes(self._buf), answer, request.close)
            del self._buf[:used]
            self._start(answer, request.close, out)
        self._flush(out)

    def _start(self, answer: Answer, close: bool, out: list[bytes]) -> None:
        """Append ``answer`` to ``out`` if it is due now, else send it from a timer."""
        stamp = self._mock.stamp(answer)
        if answer.first_delay_s or len(answer.bursts) > 1:
            loop = asyncio.get_running_loop()
            self._sending, self._next_burst = (answer, stamp, close), 0
            self._timer = loop.call_later(answer.first_delay_s, self._send_burst)
            return
        out.append(answer.render(0, stamp, close))
        self._closing = close

    def _flush(self, out: list[bytes]) -> None:
        """Write ``out``; then close, or resume reading if it was paused and may go on."""
        assert self._transport is not None
        if out:
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])
        if self._closing or (self._eof and self._sending is None):
            self._transport.close()
        elif self._reads_paused and not self._held:
            self._reads_paused = False
            self._transport.resume_reading()

    def _send_burst(self) -> None:
        """Timer callback: write the next burst; then schedule the one after, or finish."""
        assert self._transport is not None
        assert self._sending is not None
        answer, stamp, close = self._sending
        self._transport.write(answer.render(self._next_burst, stamp, close))
        self._next_burst += 1
        if self._next_burst < len(answer.bursts):
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(answer.gap_s, self._send_burst)
            return
        self._timer, self._sending, self._closing = None, None, close
        self._process()


# --------------------------------------------------------------------------- serving


async def start_server(config: upstream.MockConfig, host: str, port: int) -> asyncio.Server:
    """Listen on ``host``:``port`` (0: a free port, see ``server.sockets``) on the running
    loop. Closing the returned server (``close()`` then ``await wait_closed()``) stops it."""
    mock = FastMock(config)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: FastConnection(mock), host, port, backlog=2048)


async def serve(config: upstream.MockConfig, host: str, port: int) -> None:
    """Serve until cancelled; prints the listening line (with the real port) when ready."""
    server = await start_server(config, host, port)
    async with server:
        bound_port = server.sockets[0].getsockname()[1]
        print(f"mock upstream (fast engine) listening on http://{host}:{bound_port}", flush=True)
        await server.serve_forever()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="the mock upstream's fast engine for load tests (see the module docstring)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument("--ttft-ms", type=upstream._non_negative_float, default=0.0,
                        help="delay before the first byte of every answer, ms")
    parser.add_argument("--token-delay-ms", type=upstream._non_negative_float, default=0.0,
                        help="delay per token, ms")
    parser.add_argument("--tokens", type=upstream._non_negative_int,
                        default=upstream.DEFAULT_TOKENS, help="tokens per answer")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = upstream.MockConfig(ttft_ms=args.ttft_ms, token_delay_ms=args.token_delay_ms,
                                 tokens=args.tokens)
    try:
        with asyncio.Runner(loop_factory=upstream._loop_factory()) as runner:
            runner.run(serve(config, args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
