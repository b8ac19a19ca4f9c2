"""``loadtest.py --scenario websocket``: many WebSocket sessions (``/v1/ws``) held by one
gateway process, some of them streaming, against SSE under the same load; and its driver.

The scenario (``run_websocket``, called by ``loadtest.py``): the fast mock engine
(``scripts/mock_fast.py``; ``--tokens`` tokens, a token every ``--token-delay-ms``, 0 meaning
``DEFAULT_TOKEN_DELAY_MS``) as the only upstream, one gateway process with the default
``server:`` settings apart from host, port and ``max_connections`` (raised to the sessions
plus the SSE streams plus ``CONNECTION_MARGIN``: the default, 10,000, would refuse the SSE
phase on top of 10,000 sockets), one key without limits but ``max_websockets`` =
``2 * --sessions`` (the default, 64, would refuse the 65th socket). The gateway is pinned
alone on the first CPU as in the other scenarios; the mock and the drivers share the rest.
Timeline, in seconds from the start (``Plan``):

* ``0 .. ramp``: ``--sessions`` WebSocket sessions open at an even pace (``--ramp-s``),
  authenticated by their handshake's ``Authorization`` header, spread over driver processes
  of at most ``SESSIONS_PER_DRIVER`` each, driver i connecting from 127.0.0.<2 + i> (so
  neither descriptors nor ephemeral ports run short). Then they stay open to the end,
  answering the gateway's heartbeat pings (``ws.heartbeat``) with pongs.
* ``ramp .. ramp + hold``: nothing but the open sockets (``--hold-s``): the idle RSS.
* then ``--rounds`` rounds of two phases of ``--duration`` s each, WebSocket then SSE (odd
  rounds SSE first), ``gap_s`` apart (in-flight answers end in the gap, and the next
  phase's streams ramp in: stream i's first answer starts one answer's length before the
  phase plus i / active of it, so they run evenly out of step instead of in waves of
  simultaneous requests, and all are in flight when the phase starts): in a WebSocket
  phase ``--active-sessions`` of the open sessions stream: each sends ``request`` frames
  (``chat.completions``, ``max_tokens`` = ``--tokens``) one after the other, reading each
  answer's ``chunk`` frames to its ``done`` (closed loop); in an SSE phase as many
  keep-alive HTTP connections (opened just before the phase, closed after it) do the same
  with ``POST /v1/chat/completions`` and ``"stream": true``; the other sessions stay idle in
  both. The first ``--warmup`` s of each phase are not counted.
* then every socket is closed (1000) and the drivers exit.

Every answer is checked (``StreamCheck``): seqs 1, 2, ... (WebSocket ``seq``, SSE ``id:
<stream_id>:<seq>``) of one stream id, then ``done`` (WebSocket) or ``data: [DONE]`` (SSE),
and the text of the chunks is ``expected_text(--tokens)`` (the mock's answers are
deterministic). Time to first chunk (TTFC) is from writing the request (the frame, or the
POST on an open connection: no connect in either) to the first chunk; messages/s are chunk
frames (SSE: chunk events) received inside the phases' measured windows per second.

This script samples the gateway's ``VmRSS`` every ``SAMPLE_INTERVAL_S``: the baseline
(before the first socket), idle (the median over the second half of the hold, everything
open) -> KiB per idle socket, and with the streams (the median over the measured windows of
each kind of phase) -> KiB per active stream over the idle figure. ``/proc/net/sockstat``
gives the kernel's TCP memory too (machine-wide, both ends of every loopback socket).

Driver: ``loadtest_websocket.py '<json spec>'`` prints one JSON object (``run``). Each
driver raises its soft ``RLIMIT_NOFILE`` to its hard limit. Everything is bounded: each
handshake and each answer by ``timeout_s``, the driver by the plan's end plus ``timeout_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import uvloop

try:  # imported as scripts.loadtest_websocket (tests) or run as a script
    from scripts import loadtest as lt
    from scripts.mock_upstream import expected_text
except ImportError:  # pragma: no cover - script mode
    import loadtest as lt  # type: ignore[no-redef,import-not-found]
    from mock_upstream import expected_text  # type: ignore[no-redef,import-not-found]

DRIVER = Path(__file__).resolve()
MODEL = "mock-gpt"
SOURCE_BASE = 2  # driver i connects from 127.0.0.<2 + i>
SESSIONS_PER_DRIVER = 2_500
DEFAULT_TOKEN_DELAY_MS = 200.0  # 1,000 streams at 5 tokens/s: ~5,300 msg/s, below one process's capacity
CONNECTION_MARGIN = 1_000  # server.max_connections above sessions + SSE streams
SAMPLE_INTERVAL_S = 0.5
SSE_CONNECT_LEAD_S = 1.0  # SSE connections open this long before their phase
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA  # RFC 6455 §5.2 opcodes
NORMAL_CLOSURE = 1000
WS, SSE = "websocket", "sse"
INTACT = "intact"


# -- pure parts: frames, answers, summaries --------------------------------------------------


def accept_key(nonce: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` a server must answer ``Sec-WebSocket-Key: nonce`` with
    (RFC 6455 §4.2.2: base64 of the SHA-1 of the key and the GUID)."""
    return base64.b64encode(hashlib.sha1(nonce + WS_GUID).digest())


def handshake_request(host: str, port: int, path: str, api_key: str, nonce: bytes) -> bytes:
    """An RFC 6455 §4.1 opening handshake with the key in ``Authorization``."""
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {api_key}\r\n\r\n").encode()


def mask_payload(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``mask`` (RFC 6455 §5.3)."""
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One final client frame, masked with ``mask`` (RFC 6455 §5.2: clients always mask)."""
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 65536:
        length = bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([0x80 | opcode]) + length + mask + mask_payload(payload, mask)


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A server frame (unmasked), as the gateway sends them; for the tests."""
    n = len(payload)
    length = bytes([n]) if n < 126 else (bytes([126]) + n.to_bytes(2, "big") if n < 65536
                                         else bytes([127]) + n.to_bytes(8, "big"))
    return bytes([(0x80 if fin else 0) | opcode]) + length + payload


def parse_frame(buf: bytes | bytearray, pos: int) -> tuple[int, bool, bytes, int] | None:
    """(opcode, fin, payload, end) of the server frame at ``buf[pos:]``; None until it is
    complete. Raises ``ValueError`` on a masked frame (a server never masks, §5.1)."""
    if len(buf) - pos < 2:
        return None
    first, second = buf[pos], buf[pos + 1]
    if second & 0x80:
        raise ValueError("masked frame from the server")
    n, head = second & 0x7F, 2
    if n >= 126:
        head = 4 if n == 126 else 10
        if len(buf) - pos < head:
            return None
        n = int.from_bytes(buf[pos + 2 : pos + head], "big")
    end = pos + head + n
    if len(buf) < end:
        return None
    return first & 0x0F, bool(first & 0x80), bytes(buf[pos + head : end]), end


def close_code(payload: bytes) -> int:
    """The status code of a close frame's payload (1005: none, RFC 6455 §7.1.5)."""
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005


def delta_text(chunk: dict[str, Any]) -> str:
    """The ``delta.content`` of every choice of a chat chunk."""
    return "".join((choice.get("delta") or {}).get("content") or ""
                   for choice in chunk.get("choices") or ())


@dataclass(slots=True)
class StreamCheck:
    """One streamed answer as it arrives. ``outcome`` is None while it runs, then
    ``intact`` or why not: ``broken: ...`` (order, text, end), ``error: <code>`` (an
    ``error`` frame or event, or an HTTP error), ``timeout``, ``lost: ...``.
    ``first_s``/``end_s``: ``perf_counter`` of the first chunk and of the end."""

    tokens: int
    started_s: float
    started_wall: float
    first_s: float | None = None
    end_s: float | None = None
    seq: int = 0
    stream_id: str | None = None
    parts: list[str] = field(default_factory=list)
    outcome: str | None = None

    @property
    def ttfc_ms(self) -> float | None:
        return None if self.first_s is None else (self.first_s - self.started_s) * 1000

    def chunk(self, stream_id: str | None, seq: int | None, chunk: dict[str, Any],
              now_s: float) -> None:
        """A chunk: it must carry the next seq of the same stream."""
        if self.outcome is not None:
            return
        if self.first_s is None:
            self.first_s = now_s
        if self.stream_id is None:
            self.stream_id = stream_id
        if stream_id != self.stream_id or seq != self.seq + 1:
            self.finish(now_s, f"broken: seq {seq} of {stream_id} after {self.seq} of "
                        f"{self.stream_id}")
            return
        self.seq = seq
        self.parts.append(delta_text(chunk))

    def done(self, now_s: float) -> None:
        """The answer ended normally: intact if its text is the mock's."""
        if self.seq == 0:
            self.finish(now_s, "broken: ended without a chunk")
        elif "".join(self.parts) != expected_text(self.tokens):
            self.finish(now_s, f"broken: text is not expected_text({self.tokens})")
        else:
            self.finish(now_s, INTACT)

    def finish(self, now_s: float, outcome: str) -> None:
        if self.outcome is None:
            self.outcome, self.end_s = outcome, now_s


def ws_frame_into(check: StreamCheck, request_id: str, frame: dict[str, Any],
                  now_s: float) -> bool:
    """Feed one ``/v1/ws`` server frame to ``check``; whether it was a chunk. Frames of
    other requests are the caller's to filter (``request_id``)."""
    kind = frame.get("type")
    if kind == "chunk":
        data = frame.get("data")
        check.chunk(frame.get("stream_id"), frame.get("seq"), data if isinstance(data, dict) else {},
                    now_s)
        return True
    if kind == "done":
        check.done(now_s)
    elif kind == "error":
        error = frame.get("error") or {}
        check.finish(now_s, f"error: {error.get('code') or error.get('type') or 'unknown'}")
    else:
        check.finish(now_s, f"broken: unexpected {kind!r} frame for {request_id}")
    return False


def sse_event_into(check: StreamCheck, event: bytes, now_s: float) -> bool:
    """Feed one SSE event (its lines, without the blank line) to ``check``; whether it was
    a chunk. ``id: <stream_id>:<seq>`` gives the seq; ``data: [DONE]`` ends it."""
    event_id, data = None, b""
    for line in event.split(b"\n"):
        name, _, value = line.partition(b":")
        if name == b"id":
            event_id = value.strip().decode(errors="replace")
        elif name == b"data":
            data = value.removeprefix(b" ")
    if not data:
        return False  # a comment block (keep-alive)
    if data == b"[DONE]":
        check.done(now_s)
        return False
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        check.finish(now_s, "broken: an event is not JSON")
        return False
    if isinstance(chunk, dict) and "error" in chunk:
        error = chunk["error"] or {}
        check.finish(now_s, f"error: {error.get('code') or error.get('type') or 'unknown'}")
        return False
    stream_id, _, seq = (event_id or "").rpartition(":")
    check.chunk(stream_id or None, int(seq) if seq.isdigit() else None,
                chunk if isinstance(chunk, dict) else {}, now_s)
    return True


def dechunk_into(raw: bytearray, out: bytearray) -> bool | None:
    """Move the complete chunks of a ``Transfer-Encoding: chunked`` body (RFC 9112 §7.1)
    from ``raw`` to ``out``; True once the last chunk came (its CRLF consumed), else None.
    Raises ``ValueError`` on a malformed chunk size."""
    while (eol := raw.find(b"\r\n")) >= 0:
        size = int(bytes(raw[:eol]).split(b";", 1)[0], 16)
        if size == 0:
            if len(raw) < eol + 4:
                return None
            del raw[: eol + 4]
            return True
        if len(raw) < eol + 2 + size + 2:
            return None
        out += raw[eol + 2 : eol + 2 + size]
        del raw[: eol + 2 + size + 2]
    return None


@dataclass(slots=True)
class PhaseStats:
    """What one driver saw in one phase. The measured window is ``[start + warmup_s,
    end)`` (``time.time()``): answers started in it give TTFC, chunks received in it
    messages/s; every answer of the phase counts in ``outcomes``."""

    name: str
    kind: str  # WS | SSE
    start: float
    end: float
    warmup_s: float
    ttfc_ms: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    chunks_in_window: int = 0
    completed_in_window: int = 0
    connects: int = 0

    def in_window(self, wall: float) -> bool:
        return self.start + self.warmup_s <= wall < self.end

    def note_chunks(self, n: int, wall: float) -> None:
        if self.in_window(wall):
            self.chunks_in_window += n

    def record(self, check: StreamCheck) -> None:
        assert check.outcome is not None
        self.outcomes[check.outcome] += 1
        if self.in_window(check.started_wall) and check.ttfc_ms is not None:
            self.ttfc_ms.append(round(check.ttfc_ms, 3))
        ended = check.started_wall + ((check.end_s or check.started_s) - check.started_s)
        if check.outcome == INTACT and self.in_window(ended):
            self.completed_in_window += 1

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "start": self.start, "end": self.end,
                "warmup_s": self.warmup_s, "ttfc_ms": self.ttfc_ms,
                "outcomes": dict(self.outcomes), "chunks_in_window": self.chunks_in_window,
                "completed_in_window": self.completed_in_window, "connects": self.connects}


def merge_phases(outputs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The drivers' ``PhaseStats`` of each phase, merged: TTFC percentiles (ms), outcomes,
    messages/s and streams/s over the measured window."""
    merged = []
    for index, first in enumerate(outputs[0]["phases"] if outputs else []):
        parts = [o["phases"][index] for o in outputs]
        window_s = first["end"] - first["start"] - first["warmup_s"]
        outcomes: Counter[str] = Counter()
        for part in parts:
            outcomes.update(part["outcomes"])
        chunks = sum(p["chunks_in_window"] for p in parts)
        merged.append({"name": first["name"], "kind": first["kind"], "window_s": window_s,
                       "ttfc_ms": lt.percentiles([v for p in parts for v in p["ttfc_ms"]]),
                       "ttfc_samples": sum(len(p["ttfc_ms"]) for p in parts),
                       "outcomes": dict(outcomes), "messages_per_s": chunks / window_s,
                       "streams_per_s": sum(p["completed_in_window"] for p in parts) / window_s,
                       "connects": sum(p["connects"] for p in parts)})
    return merged


def kind_summary(outputs: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    """All phases of one ``kind`` together: TTFC over every measured sample, messages/s
    and streams/s as the mean of the phases, outcomes summed, intact %."""
    phases = [p for p in merge_phases(outputs) if p["kind"] == kind]
    samples = [v for o in outputs for p in o["phases"] if p["kind"] == kind for v in p["ttfc_ms"]]
    outcomes: Counter[str] = Counter()
    for phase in phases:
        outcomes.update(phase["outcomes"])
    total = sum(outcomes.values())
    return {"phases": len(phases), "ttfc_ms": lt.percentiles(samples), "ttfc_samples": len(samples),
            "messages_per_s": statistics.fmean(p["messages_per_s"] for p in phases) if phases else None,
            "streams_per_s": statistics.fmean(p["streams_per_s"] for p in phases) if phases else None,
            "answers": total, "intact": outcomes[INTACT],
            "intact_pct": 100 * outcomes[INTACT] / total if total else None,
            "errors": {k: n for k, n in outcomes.items() if k != INTACT}}


def median_in(samples: Sequence[dict[str, Any]], key: str,
              windows: Sequence[tuple[float, float]]) -> float | None:
    """The median of ``key`` over the samples (``{"t": s, key: value}``) inside any of
    ``windows`` (``[from, to)`` in the samples' seconds); None if there is none."""
    values = [s[key] for s in samples if s.get(key) is not None
              and any(a <= s["t"] < b for a, b in windows)]
    return statistics.median(values) if values else None


def per_unit_kib(more_kib: float | None, less_kib: float | None, units: int) -> float | None:
    """(more - less) / units, in KiB; None when a figure is missing or ``units`` is 0."""
    if more_kib is None or less_kib is None or units <= 0:
        return None
    return (more_kib - less_kib) / units


def ttfc_ratio(ws: dict[str, Any], sse: dict[str, Any], pct: str) -> float | None:
    """WebSocket TTFC over SSE TTFC at percentile ``pct`` (None: a side has no samples)."""
    a, b = ws.get("ttfc_ms"), sse.get("ttfc_ms")
    if not a or not b or b[pct] <= 0:
        return None
    return float(a[pct] / b[pct])


def cpu_per_message_us(cpu_pct: float | None, messages_per_s: float | None) -> float | None:
    """Microseconds of gateway CPU per message delivered (None: a figure is missing)."""
    if cpu_pct is None or not messages_per_s:
        return None
    return cpu_pct / 100 / messages_per_s * 1e6


def tcp_mem_pages(sockstat: str) -> int | None:
    """The ``mem`` field (pages) of the ``TCP:`` line of ``/proc/net/sockstat``."""
    for line in sockstat.splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            if "mem" in fields:
                return int(fields[fields.index("mem") + 1])
    return None


def session_summary(outputs: Sequence[dict[str, Any]], sessions: int) -> dict[str, Any]:
    """Handshakes by outcome, sockets the gateway closed or dropped (by close code or
    ``lost``), heartbeat pings answered, frames of no request in flight."""
    opened: Counter[str] = Counter()
    closed: Counter[str] = Counter()
    for output in outputs:
        opened.update(output["handshakes"])
        closed.update(output["closed_by_gateway"])
    return {"asked": sessions, "handshakes": dict(opened), "open": opened["open"],
            "peak_open": sum(o["peak_open"] for o in outputs),
            "closed_by_gateway": dict(closed),
            "pings_answered": sum(o["pings"] for o in outputs),
            "stray_frames": sum(o["stray_frames"] for o in outputs),
            "handshake_ms": lt.percentiles([v for o in outputs for v in o["handshake_ms"]])}


# -- the driver: a raw WebSocket client and a raw SSE client (asyncio protocols) ------------


class WSConn(asyncio.Protocol):
    """One ``/v1/ws`` session: the handshake, then one streamed answer at a time.

    ``opened`` resolves to None once the server switched protocols, or to why not.
    ``closed`` holds why the socket ended (None: open): ``close <code>`` (a close frame
    from the server) or ``lost`` (the connection dropped without one)."""

    def __init__(self, handshake: bytes, nonce: bytes, driver: Driver) -> None:
        self.handshake, self.accept, self.driver = handshake, accept_key(nonce), driver
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.closed: str | None = None
        self.opened: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.mask = os.urandom(4)
        self.check: StreamCheck | None = None
        self.request_id = ""
        self.stats: PhaseStats | None = None
        self.waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        state = self.closed or ("open" if self.upgraded else "handshake")
        return f"<WSConn {state} request={self.request_id or None} buffered={len(self.buf)}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's isn't a subclass
        self.transport.write(self.handshake)

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and self.closed is None:
            self.transport.write(client_frame(opcode, payload, self.mask))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            if not self.upgraded and not self._head():
                return
            self._frames()
        except (ValueError, orjson.JSONDecodeError) as exc:
            self._end(f"lost: bad frame ({exc})")

    def _head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buf[:end]).lower()
        del self.buf[: end + 4]
        status = head[9:12].decode(errors="replace")
        if status != "101" or b"sec-websocket-accept: " + self.accept.lower() not in head:
            code = self.buf.partition(b'"code":"')[2].partition(b'"')[0].decode(errors="replace")
            self._end(f"handshake: HTTP {status}{' ' + code if code else ''}")
            return False
        self.upgraded = True
        if not self.opened.done():
            self.opened.set_result(None)
        return True

    def _frames(self) -> None:
        pos, now_s, wall, chunks = 0, time.perf_counter(), time.time(), 0
        while (frame := parse_frame(self.buf, pos)) is not None:
            opcode, _, payload, pos = frame
            if opcode == TEXT:
                chunks += self._text(payload, now_s)
            elif opcode == PING:
                self.driver.pings += 1
                self.send(PONG, payload)
            elif opcode == CLOSE:
                self.send(CLOSE, payload[:2])
                self._end(f"close {close_code(payload)}")
                return
        del self.buf[:pos]
        if chunks and self.stats is not None:
            self.stats.note_chunks(chunks, wall)

    def _text(self, payload: bytes, now_s: float) -> int:
        frame = orjson.loads(payload)
        check = self.check
        if check is None or frame.get("id") != self.request_id:
            self.driver.stray_frames += 1
            return 0
        chunk = ws_frame_into(check, self.request_id, frame, now_s)
        if check.outcome is not None:
            self._settle()
        return int(chunk)

    def request(self, request_id: str, body: bytes, tokens: int, stats: PhaseStats,
                timeout_s: float) -> asyncio.Future[None]:
        """Send a ``request`` frame; the future resolves when its answer ended (its
        ``StreamCheck`` is ``self.check``), failed, or ``timeout_s`` passed."""
        loop = asyncio.get_running_loop()
        self.request_id, self.stats = request_id, stats
        self.check = StreamCheck(tokens, time.perf_counter(), time.time())
        self.waiter = loop.create_future()
        timer = loop.call_later(timeout_s, self._timeout)
        self.waiter.add_done_callback(lambda _: timer.cancel())
        self.send(TEXT, b'{"type":"request","id":"' + request_id.encode()
                  + b'","endpoint":"chat.completions","body":' + body + b"}")
        return self.waiter

    def _timeout(self) -> None:
        if self.check is not None:
            self.check.finish(time.perf_counter(), "timeout")
        self._settle()

    def _settle(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _end(self, why: str) -> None:
        if self.closed is None:
            self.closed = why
            if self.upgraded:
                self.driver.closed_by_gateway[why] += 1
        if not self.opened.done():
            self.opened.set_result(why)
        if self.check is not None:
            self.check.finish(time.perf_counter(), f"lost: socket {why}")
        self._settle()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end("lost")

    def close(self) -> None:
        """Close the session as a client does (1000), leaving the counters alone."""
        self.send(CLOSE, NORMAL_CLOSURE.to_bytes(2, "big"))
        self.closed = self.closed or "closed by client"
        if self.transport is not None:
            self.transport.close()


class SSEConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one streamed chat completion at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.raw, self.body = bytearray(), bytearray()
        self.status: int | None = None
        self.chunked = True
        self.lost = False
        self.check: StreamCheck | None = None
        self.stats: PhaseStats | None = None
        self.waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<SSEConn {'lost' if self.lost else 'open'} status={self.status}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        self.connected.set_result(None)

    def request(self, raw: bytes, tokens: int, stats: PhaseStats,
                timeout_s: float) -> asyncio.Future[None]:
        """Send ``raw`` (the POST); the future resolves when the answer ended or failed."""
        loop = asyncio.get_running_loop()
        self.status, self.stats = None, stats
        self.raw.clear()
        self.body.clear()
        self.check = StreamCheck(tokens, time.perf_counter(), time.time())
        self.waiter = loop.create_future()
        timer = loop.call_later(timeout_s, self._fail, "timeout")
        self.waiter.add_done_callback(lambda _: timer.cancel())
        assert self.transport is not None
        self.transport.write(raw)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.raw += data
        try:
            if self.status is None and not self._head():
                return
            self._body()
        except (ValueError, IndexError) as exc:
            self._fail(f"broken: bad framing ({exc})")

    def _head(self) -> bool:
        end = self.raw.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.raw[:end]).lower()
        del self.raw[: end + 4]
        self.status = int(head[9:12])
        self.chunked = b"\r\ntransfer-encoding: chunked" in head
        return True

    def _body(self) -> None:
        if self.status != 200 or not self.chunked:
            code = self.raw.partition(b'"code":"')[2].partition(b'"')[0].decode(errors="replace")
            self._fail(f"error: HTTP {self.status}{' ' + code if code else ''}", close=True)
            return
        ended = dechunk_into(self.raw, self.body)
        now_s, wall, chunks = time.perf_counter(), time.time(), 0
        assert self.check is not None
        while (end := self.body.find(b"\n\n")) >= 0:
            event = bytes(self.body[:end])
            del self.body[: end + 2]
            chunks += sse_event_into(self.check, event, now_s)
        if chunks and self.stats is not None:
            self.stats.note_chunks(chunks, wall)
        if ended:
            if self.check.outcome is None:
                self.check.finish(now_s, "broken: the body ended without data: [DONE]")
            self._settle()
        elif self.check.outcome is not None and self.check.outcome != INTACT:
            self._fail(self.check.outcome, close=True)

    def _fail(self, why: str, close: bool = True) -> None:
        if self.check is not None:
            self.check.finish(time.perf_counter(), why)
        self._settle()
        if close and self.transport is not None:
            self.lost = True
            self.transport.close()

    def _settle(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.connected.done():
            self.connected.set_result(None)
        self._fail("lost: connection dropped", close=False)


@dataclass(eq=False)
class Driver:
    """One driver process: its spec, its sessions and what they saw."""

    spec: dict[str, Any]
    sessions: list[WSConn] = field(default_factory=list)
    handshakes: Counter[str] = field(default_factory=Counter)
    handshake_ms: list[float] = field(default_factory=list)
    closed_by_gateway: Counter[str] = field(default_factory=Counter)
    pings: int = 0
    stray_frames: int = 0

    def __repr__(self) -> str:
        alive = sum(s.closed is None for s in self.sessions)
        return f"<Driver [sessions: {alive} open of {len(self.sessions)} | pings: {self.pings}]>"

    @property
    def body(self) -> bytes:
        return orjson.dumps({"model": MODEL, "stream": True, "max_tokens": self.spec["tokens"],
                             "messages": [{"role": "user", "content": "Say hello."}]})

    async def open_session(self, at: float) -> None:
        """Open one session at ``at`` (``time.time()``); counted in ``handshakes``."""
        await sleep_until(at)
        spec, loop = self.spec, asyncio.get_running_loop()
        nonce = base64.b64encode(os.urandom(16))
        raw = handshake_request(spec["host"], spec["port"], "/v1/ws", spec["api_key"], nonce)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(spec["timeout_s"]):
                _, conn = await loop.create_connection(lambda: WSConn(raw, nonce, self), spec["host"],
                                                       spec["port"], local_addr=(spec["source"], 0))
                why = await conn.opened
        except TimeoutError:
            self.handshakes["handshake: timeout"] += 1
            return
        except OSError as exc:
            self.handshakes[f"connect: {type(exc).__name__}"] += 1
            return
        self.handshakes[why or "open"] += 1
        if why is None:
            self.handshake_ms.append(round((time.perf_counter() - t0) * 1000, 3))
            self.sessions.append(conn)

    async def ws_loop(self, conn: WSConn, stats: PhaseStats, index: int) -> None:
        """Stream answers one after the other on ``conn`` until the phase's end. The first
        starts ``ramp_s`` (one answer's length) before the phase plus ``index``'s share of
        it, so that the streams are evenly out of step, and all in flight, when it starts."""
        spec, body = self.spec, self.body
        await sleep_until(stats.start - spec["stream_ramp_s"]
                          + stagger_s(index, spec["active"], spec["stream_ramp_s"]))
        n = 0
        while time.time() < stats.end and conn.closed is None:
            n += 1
            await conn.request(f"{stats.name}-{n}", body, spec["tokens"], stats, spec["timeout_s"])
            assert conn.check is not None
            stats.record(conn.check)
            conn.check = None

    async def sse_loop(self, stats: PhaseStats, index: int) -> None:
        """The same over SSE: a keep-alive connection opened before the phase (again after
        one is lost), closed at its end."""
        spec = self.spec
        raw = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {spec['host']}:{spec['port']}\r\n"
               f"Authorization: Bearer {spec['api_key']}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(self.body)}\r\n\r\n").encode() + self.body
        first = stats.start - spec["stream_ramp_s"]
        await sleep_until(first - SSE_CONNECT_LEAD_S
                          + stagger_s(index, spec["active"], SSE_CONNECT_LEAD_S / 2))
        conn = await self.sse_connect(stats)
        await sleep_until(first + stagger_s(index, spec["active"], spec["stream_ramp_s"]))
        while time.time() < stats.end:
            if conn is None or conn.lost:
                conn = await self.sse_connect(stats)
                if conn is None:
                    await asyncio.sleep(0.1)
                    continue
            await conn.request(raw, spec["tokens"], stats, spec["timeout_s"])
            assert conn.check is not None
            stats.record(conn.check)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    async def sse_connect(self, stats: PhaseStats) -> SSEConn | None:
        spec, loop = self.spec, asyncio.get_running_loop()
        stats.connects += 1
        try:
            async with asyncio.timeout(spec["timeout_s"]):
                _, conn = await loop.create_connection(SSEConn, spec["host"], spec["port"],
                                                       local_addr=(spec["source"], 0))
        except (OSError, TimeoutError) as exc:
            stats.outcomes[f"connect: {type(exc).__name__}"] += 1
            return None
        return conn

    async def phase(self, stats: PhaseStats) -> None:
        active = self.spec["active"]
        if stats.kind == WS:
            streaming = self.sessions[:active]
            await asyncio.gather(*(self.ws_loop(c, stats, i) for i, c in enumerate(streaming)))
        else:
            await asyncio.gather(*(self.sse_loop(stats, i) for i in range(active)))


def stagger_s(index: int, count: int, over_s: float) -> float:
    """Where the ``index``-th of ``count`` starts in ``[0, over_s)``."""
    return over_s * index / max(1, count)


async def sleep_until(at: float) -> None:
    """Sleep until ``time.time()`` is ``at``."""
    await asyncio.sleep(max(0.0, at - time.time()))


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to the hard limit; (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Open the sessions over the ramp, run the phases, close everything at ``close_at``."""
    nofile = raise_nofile()
    driver = Driver(spec)
    step = spec["ramp_s"] / max(1, spec["count"])
    await asyncio.gather(*(driver.open_session(spec["start_at"] + i * step)
                           for i in range(spec["count"])))
    peak_open = sum(c.closed is None for c in driver.sessions)
    phases = [PhaseStats(p["name"], p["kind"], p["start"], p["end"], spec["warmup_s"])
              for p in spec["phases"]]
    for stats in phases:
        await driver.phase(stats)
    await sleep_until(spec["close_at"])
    still_open = sum(c.closed is None for c in driver.sessions)
    for conn in driver.sessions:
        conn.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"handshakes": dict(driver.handshakes), "handshake_ms": driver.handshake_ms,
            "peak_open": peak_open, "open_at_end": still_open,
            "closed_by_gateway": dict(driver.closed_by_gateway), "pings": driver.pings,
            "stray_frames": driver.stray_frames, "phases": [p.to_json() for p in phases],
            "cpu_s": usage.ru_utime + usage.ru_stime, "nofile": nofile,
            "max_rss_kib": usage.ru_maxrss}


def main() -> None:
    spec = orjson.loads(sys.argv[1])
    sys.stdout.buffer.write(orjson.dumps(uvloop.run(run(spec))))


# -- the scenario (run by loadtest.py) --------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The run's shape, in seconds from the start of the session ramp."""

    sessions: int
    active: int
    ramp_s: float
    hold_s: float
    duration_s: float
    warmup_s: float
    rounds: int
    tokens: int
    token_delay_ms: float

    @property
    def stream_s(self) -> float:
        """How long one answer takes at the mock (its token delays)."""
        return self.tokens * self.token_delay_ms / 1000

    @property
    def gap_s(self) -> float:
        """Between two phases: in-flight answers end (one answer's length), the next
        phase's streams ramp in (another) after its SSE connections opened."""
        return 1.0 + 2 * self.stream_s + SSE_CONNECT_LEAD_S

    @property
    def drivers(self) -> int:
        return max(1, math.ceil(self.sessions / SESSIONS_PER_DRIVER))

    def phases(self) -> list[dict[str, Any]]:
        """``{"name", "kind", "start", "end"}`` of every phase (seconds from the start):
        round r is WebSocket then SSE, or SSE first when r is odd."""
        out, t = [], self.ramp_s + self.hold_s
        for r in range(self.rounds):
            for kind in ((WS, SSE) if r % 2 == 0 else (SSE, WS)):
                out.append({"name": f"{'ws' if kind == WS else 'sse'}{r + 1}", "kind": kind,
                            "start": t, "end": t + self.duration_s})
                t += self.duration_s + self.gap_s
        return out

    @property
    def end_s(self) -> float:
        """When every socket is closed."""
        phases = self.phases()
        return phases[-1]["end"] + self.gap_s if phases else self.ramp_s + self.hold_s

    @classmethod
    def of(cls, args: argparse.Namespace) -> Plan:
        return cls(args.sessions, args.active_sessions, args.ramp_s, args.hold_s, args.duration,
                   args.warmup, args.rounds, args.tokens,
                   args.token_delay_ms or DEFAULT_TOKEN_DELAY_MS)


def gateway_config(plan: Plan, mock_port: int) -> dict[str, Any]:
    """Default ``server:`` apart from host, port and ``max_connections``; the mock; one key
    without limits that may hold ``2 * sessions`` sockets."""
    return {"server": {"host": "127.0.0.1", "port": 8080,
                       "max_connections": plan.sessions + plan.active + CONNECTION_MARGIN},
            "state": {"backend": "memory"},
            "upstreams": {"mock": lt.mock_upstream(mock_port, max_connections=2 * plan.active + 64)},
            "keys": {"load": {"key": lt.GATEWAY_KEY, "models": ["*"],
                              "max_websockets": 2 * plan.sessions}}}


def start_servers(plan: Plan, fleet: lt.Fleet) -> dict[str, Any]:
    """The mock and the gateway, ready; their processes, ports and the config."""
    mock_port, port = lt.free_port(), lt.free_port()
    mock = fleet.spawn("mock", [lt.PYTHON, str(lt.MOCK_SCRIPTS["fast"]), "--port", str(mock_port),
                                "--tokens", str(plan.tokens),
                                "--token-delay-ms", f"{plan.token_delay_ms:g}"], None)
    config = gateway_config(plan, mock_port)
    path = fleet.log_dir / "websocket.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    gateway = fleet.spawn("gateway", [lt.PYTHON, "-m", "proxy", "serve", "--config", str(path),
                                      "--host", "127.0.0.1", "--port", str(port)], None)
    lt.wait_ready("mock", mock, mock_port, "/v1/models", fleet.log_dir)
    lt.wait_ready("gateway", gateway, port, "/healthz", fleet.log_dir)
    return {"gateway": gateway, "port": port, "mock": mock, "config": config}


def driver_specs(plan: Plan, port: int, start_at: float, timeout_s: float) -> list[dict[str, Any]]:
    """One spec per driver: its share of the sessions and of the active ones, its source
    address, the phases in ``time.time()``."""
    phases = [p | {"start": start_at + p["start"], "end": start_at + p["end"]}
              for p in plan.phases()]
    return [{"host": "127.0.0.1", "port": port, "api_key": lt.GATEWAY_KEY,
             "source": f"127.0.0.{SOURCE_BASE + i}", "count": lt.split(plan.sessions, plan.drivers, i),
             "active": lt.split(plan.active, plan.drivers, i), "ramp_s": plan.ramp_s,
             "start_at": start_at, "phases": phases, "warmup_s": plan.warmup_s,
             "stream_ramp_s": plan.stream_s, "tokens": plan.tokens,
             "timeout_s": timeout_s, "close_at": start_at + plan.end_s}
            for i in range(plan.drivers)]


def sockstat_tcp_pages() -> int | None:
    try:
        return tcp_mem_pages(Path("/proc/net/sockstat").read_text())
    except OSError:
        return None


def run_wait_s(pid: int) -> float | None:
    """Seconds ``pid``'s main thread has waited on a run queue for a CPU (runnable but not
    running: another process had its CPU), from ``/proc/<pid>/schedstat``; None if unknown."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def watch(clients: dict[Path, subprocess.Popen[bytes]], gateway: int, start_at: float,
          deadline: float, plan: Plan, shown: lt.Progress) -> list[dict[str, Any]]:
    """Sample the gateway's RSS, descriptors and CPU (% of one CPU since the previous
    sample) and the kernel's TCP memory every ``SAMPLE_INTERVAL_S`` until every driver
    exited or ``deadline`` (``time.time()``) passed."""
    samples: list[dict[str, Any]] = []
    cpu0, wait0 = lt.cpu_seconds(gateway), run_wait_s(gateway)
    while any(c.poll() is None for c in clients.values()) and time.time() < deadline:
        t, cpu, wait = time.time() - start_at, lt.cpu_seconds(gateway), run_wait_s(gateway)
        span = t - samples[-1]["t"] if samples else None
        samples.append({"t": round(t, 2), "rss_kib": lt.rss_kib(gateway),
                        "cpu_pct": 100 * (cpu - cpu0) / span if span else None,
                        "wait_pct": 100 * (wait - wait0) / span
                        if span and wait is not None and wait0 is not None else None,
                        "fds": len(os.listdir(f"/proc/{gateway}/fd")),
                        "tcp_mem_pages": sockstat_tcp_pages()})
        cpu0, wait0 = cpu, wait
        shown.draw("websocket", max(0.0, t), plan.end_s)
        time.sleep(max(0.0, SAMPLE_INTERVAL_S - (time.time() - start_at - t)))
    return samples


def collect(clients: dict[Path, subprocess.Popen[bytes]], fleet: lt.Fleet) -> list[dict[str, Any]]:
    """Each driver's output (one still running is killed; one that failed raises)."""
    outputs = []
    for path, client in clients.items():
        if client.poll() is None:
            client.kill()
        if client.wait() != 0:
            tail = (fleet.log_dir / "loadgen.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"websocket driver exited with {client.returncode}:\n{tail}")
        outputs.append(orjson.loads(path.read_bytes()))
    return outputs


def run_websocket(args: argparse.Namespace, fleet: lt.Fleet) -> dict[str, Any]:
    """Open the sessions, hold them, alternate WebSocket and SSE phases (module docstring)."""
    plan = Plan.of(args)
    servers = start_servers(plan, fleet)
    gateway, port = servers["gateway"], servers["port"]
    load_side = lt.place(lt.scenario_placement(args), gateway.pid, [servers["mock"].pid])
    time.sleep(1.0)
    baseline = {"rss_kib": lt.rss_kib(gateway.pid), "tcp_mem_pages": sockstat_tcp_pages()}
    start_at = time.time() + 1.0
    specs = driver_specs(plan, port, start_at, args.timeout)
    clients = lt.spawn_clients(fleet, specs, load_side, DRIVER)
    pids = {"gateway": gateway.pid, "mock": servers["mock"].pid}
    before = lt.CpuSample.take(pids)
    shown = lt.Progress(1)
    samples = watch(clients, gateway.pid, start_at, start_at + plan.end_s + args.timeout + 10,
                    plan, shown)
    after = lt.CpuSample.take(pids)
    outputs = collect(clients, fleet)
    shown.clear()
    cpu = lt.phase_cpu_pct(before, after, sum(o["cpu_s"] for o in outputs))
    return summarize(plan, servers, outputs, samples, baseline, cpu, fleet)


def first_wave(samples: Sequence[dict[str, Any]], phase: dict[str, Any],
               ramp_s: float) -> tuple[float | None, float | None]:
    """(RSS of the last sample before ``phase``'s streams began ramping in, ``ramp_s``
    before its start; the largest RSS within a sample interval of its start): the cost of
    its streams when all are in flight and none has ended yet (no finished answer's log
    retained). None: no sample."""
    before = [s["rss_kib"] for s in samples if s["t"] < phase["start"] - ramp_s]
    wave = [s["rss_kib"] for s in samples
            if phase["start"] - SAMPLE_INTERVAL_S <= s["t"] < phase["start"] + SAMPLE_INTERVAL_S / 2]
    return (before[-1] if before else None), (max(wave) if wave else None)


def memory_summary(plan: Plan, samples: list[dict[str, Any]], baseline: dict[str, Any],
                   answers: int) -> dict[str, Any]:
    """Gateway RSS: baseline; idle (median over the second half of the hold) and per idle
    socket; per active stream from each kind's first phase (``first_wave``: all in flight,
    none ended); the medians over the measured windows (finished answers' stream logs,
    kept ``streams.retention``, included); after the phases (sockets still open) and per
    finished answer; kernel TCP memory per idle session; gateway CPU by kind of phase."""
    idle_window = [(plan.ramp_s + plan.hold_s / 2, plan.ramp_s + plan.hold_s)]
    phases = plan.phases()
    windows = {kind: [(p["start"] + plan.warmup_s, p["end"]) for p in phases
                      if p["kind"] == kind] for kind in (WS, SSE)}
    idle = median_in(samples, "rss_kib", idle_window)
    waves = {kind: first_wave(samples, next(p for p in phases if p["kind"] == kind),
                              plan.stream_s) for kind in (WS, SSE)}
    after_window = [(phases[-1]["end"] + plan.gap_s / 2, plan.end_s)]
    after = median_in(samples, "rss_kib", after_window)
    pages = [median_in(samples, "tcp_mem_pages", idle_window), baseline["tcp_mem_pages"]]
    page_kib = os.sysconf("SC_PAGE_SIZE") / 1024
    return {"baseline_kib": baseline["rss_kib"], "idle_kib": idle,
            "per_idle_socket_kib": per_unit_kib(idle, baseline["rss_kib"], plan.sessions),
            "first_wave_kib": {k: {"before": b, "peak": w} for k, (b, w) in waves.items()},
            "per_ws_stream_kib": per_unit_kib(waves[WS][1], waves[WS][0], plan.active),
            "per_sse_stream_kib": per_unit_kib(waves[SSE][1], waves[SSE][0], plan.active),
            "ws_active_kib": median_in(samples, "rss_kib", windows[WS]),
            "sse_active_kib": median_in(samples, "rss_kib", windows[SSE]),
            "after_phases_kib": after, "answers": answers,
            "per_finished_answer_kib": per_unit_kib(after, idle, answers),
            "peak_kib": max((s["rss_kib"] for s in samples), default=None),
            "kernel_tcp_per_socket_kib": None if None in pages else
            per_unit_kib(cast("float", pages[0]) * page_kib, cast("int", pages[1]) * page_kib,
                         plan.sessions),
            "fds_peak": max((s["fds"] for s in samples), default=None),
            "cpu_pct": {kind: median_in(samples, "cpu_pct", windows[kind]) for kind in (WS, SSE)},
            "wait_pct": {kind: median_in(samples, "wait_pct", windows[kind]) for kind in (WS, SSE)}}


def slow_gcs_ms(log_dir: Path) -> list[float]:
    """``gc_ms`` of every ``slow full garbage collection`` line of the gateway's log."""
    out = []
    for line in (log_dir / "gateway.log").read_text(errors="replace").splitlines():
        if "slow full garbage collection" in line:
            try:
                out.append(float(orjson.loads(line)["gc_ms"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return out


def summarize(plan: Plan, servers: dict[str, Any], outputs: list[dict[str, Any]],
              samples: list[dict[str, Any]], baseline: dict[str, Any],
              cpu_pct: dict[str, float], fleet: lt.Fleet) -> dict[str, Any]:
    ws, sse = kind_summary(outputs, WS), kind_summary(outputs, SSE)
    return {
        "scenario": "websocket",
        "plan": vars(plan) | {"stream_s": plan.stream_s, "gap_s": plan.gap_s,
                              "end_s": plan.end_s, "drivers": plan.drivers,
                              "phases": plan.phases()},
        "sessions": session_summary(outputs, plan.sessions)
        | {"open_at_end": sum(o["open_at_end"] for o in outputs)},
        "memory": memory_summary(plan, samples, baseline, ws["answers"] + sse["answers"]),
        "websocket": ws, "sse": sse, "phases": merge_phases(outputs),
        "ttfc_ratio": {p: ttfc_ratio(ws, sse, p) for p in ("p50", "p99")},
        "cpu_pct": cpu_pct,
        "drivers": [{"cpu_s": o["cpu_s"], "nofile": o["nofile"], "max_rss_kib": o["max_rss_kib"]}
                    for o in outputs],
        "nofile": {"asked": fleet.nofile, "started_with": fleet.nofile_got},
        "gateway_logs": lt.log_problems(fleet.log_dir, ["gateway"]),
        "slow_gc_ms": slow_gcs_ms(fleet.log_dir),
        "gateway_config": servers["config"],
        "samples": samples,
    }


# -- the report

GIB_KIB = 1024 * 1024


def mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.0f} MiB"


def kib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} KiB"


def ms(stats: dict[str, float] | None) -> str:
    return "-" if not stats else f"{stats['p50']:.1f} / {stats['p99']:.1f} / {stats['max']:.1f}"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def compare_rows(doc: dict[str, Any]) -> list[tuple[str, list[str]]]:
    ws, sse, mem = doc["websocket"], doc["sse"], doc["memory"]

    def both(fmt: Callable[[dict[str, Any]], str]) -> list[str]:
        return [fmt(ws), fmt(sse)]

    return [
        ("TTFC p50 / p99 / max ms", both(lambda k: ms(k["ttfc_ms"]))),
        ("  samples (measured windows)", both(lambda k: f"{k['ttfc_samples']:,}")),
        ("messages/s (chunks delivered)", both(lambda k: rate(k["messages_per_s"]))),
        ("streams/s completed", both(lambda k: rate(k["streams_per_s"]))),
        ("answers intact", both(lambda k: f"{k['intact']:,}/{k['answers']:,} "
                                          f"({pct(k['intact_pct'])})")),
        ("gateway CPU % (median of 0.5 s)", [rate(mem["cpu_pct"][WS]), rate(mem["cpu_pct"][SSE])]),
        ("gateway waiting for its CPU %", [rate(mem["wait_pct"][WS]), rate(mem["wait_pct"][SSE])]),
        ("gateway CPU us per message", [rate(cpu_per_message_us(mem["cpu_pct"][WS], ws["messages_per_s"])),
                                        rate(cpu_per_message_us(mem["cpu_pct"][SSE],
                                                                sse["messages_per_s"]))]),
        ("RSS per active stream (1st phase)", [kib(mem["per_ws_stream_kib"]),
                                               kib(mem["per_sse_stream_kib"])]),
        ("gateway RSS (median, measured)", [mib(mem["ws_active_kib"]), mib(mem["sse_active_kib"])]),
    ]


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


def phase_lines(doc: dict[str, Any]) -> list[str]:
    return [f"  {p['name']:<5} TTFC p50/p99/max {ms(p['ttfc_ms'])} ms, {rate(p['messages_per_s'])} "
            f"msg/s, {rate(p['streams_per_s'])} streams/s, outcomes {p['outcomes']}"
            + (f", {p['connects']:,} connects" if p["kind"] == SSE else "")
            for p in doc["phases"]]


def memory_lines(doc: dict[str, Any]) -> list[str]:
    mem, s, plan = doc["memory"], doc["sessions"], doc["plan"]
    wave = mem["first_wave_kib"][WS]
    return [
        f"gateway RSS: baseline {mib(mem['baseline_kib'])}; with {s['peak_open']:,} idle sockets "
        f"{mib(mem['idle_kib'])} -> {kib(mem['per_idle_socket_kib'])} per idle socket; with "
        f"{plan['active']:,} WebSocket streams on top (first phase, all in flight, none ended) "
        f"{mib(wave['peak'])} -> {kib(mem['per_ws_stream_kib'])} per active stream (SSE: "
        f"{kib(mem['per_sse_stream_kib'])})",
        f"  later, finished answers' stream logs are kept (streams.retention 5 min, within "
        f"streams.max_total_bytes 256 MiB): after the phases {mib(mem['after_phases_kib'])} "
        f"with {mem['answers']:,} answers finished -> {kib(mem['per_finished_answer_kib'])} per "
        f"answer over idle; peak {mib(mem['peak_kib'])}; peak descriptors {mem['fds_peak']:,}",
        f"kernel TCP memory (/proc/net/sockstat, machine-wide, both ends of each loopback "
        f"socket): {kib(mem['kernel_tcp_per_socket_kib'])} per idle session",
    ]


def session_lines(doc: dict[str, Any]) -> list[str]:
    s = doc["sessions"]
    lines = [f"sessions: {s['open']:,}/{s['asked']:,} opened (handshake p50/p99/max "
             f"{ms(s['handshake_ms'])} ms), {s['peak_open']:,} open after the ramp, "
             f"{s['open_at_end']:,} still open at the end; {s['pings_answered']:,} heartbeat "
             f"pings answered"]
    if failed := {k: n for k, n in s["handshakes"].items() if k != "open"}:
        lines.append(f"  handshakes failed: {failed}")
    if s["closed_by_gateway"]:
        lines.append(f"  sockets the gateway closed or dropped: {s['closed_by_gateway']}")
    if s["stray_frames"]:
        lines.append(f"  frames for no request in flight: {s['stray_frames']:,}")
    return lines


def errors_by_kind(doc: dict[str, Any]) -> dict[str, int]:
    """Every error of the run: failed handshakes, sockets lost, non-intact answers."""
    s = doc["sessions"]
    out: Counter[str] = Counter({f"handshake {k}": n for k, n in s["handshakes"].items() if k != "open"})
    out.update({f"socket {k}": n for k, n in s["closed_by_gateway"].items()})
    for kind in (WS, SSE):
        out.update({f"{kind} {k}": n for k, n in doc[kind]["errors"].items()})
    return dict(out)


def load_notes(doc: dict[str, Any]) -> list[str]:
    """Whether the gateway was CPU-bound in a kind of phase (then TTFC includes queueing
    and messages/s is its capacity), and whether other processes shared the machine."""
    plan, notes = doc["plan"], []
    offered = plan["active"] * (plan["tokens"] + 1) / plan["stream_s"] if plan["stream_s"] else None
    for kind in (WS, SSE):
        busy = doc["memory"]["cpu_pct"][kind]
        if busy is not None and busy >= lt.SATURATED_PCT:
            notes.append(f"note: the gateway was CPU-bound in the {kind} phases ({busy:.0f} % of its "
                         f"CPU): TTFC includes queueing, messages/s is its capacity (offered: "
                         f"{rate(offered)}/s)")
    for kind in (WS, SSE):
        wait = doc["memory"]["wait_pct"][kind]
        if wait is not None and wait > lt.NOISY_PCT:
            notes.append(f"WARNING: in the {kind} phases the gateway waited for its CPU {wait:.0f} % "
                         "of the time (another process ran there): their figures are skewed")
    if (other := doc["cpu_pct"].get("other_processes", 0.0)) > lt.NOISY_PCT:
        notes.append(f"WARNING: other processes used {other:.0f} % of a CPU during the run; "
                     "latencies and rates are noisy")
    return notes


def verdicts(doc: dict[str, Any]) -> list[str]:
    """PASS/FAIL against the issue's targets."""
    s, mem, ws, sse = doc["sessions"], doc["memory"], doc["websocket"], doc["sse"]
    peak = mem["peak_kib"] or 0
    held = s["open"] == s["asked"] and not s["closed_by_gateway"]
    intact = ws["answers"] > 0 and ws["intact"] == ws["answers"] and sse["intact"] == sse["answers"]
    ratio = doc["ttfc_ratio"]
    ttfc_ok = ratio["p50"] is not None and ratio["p99"] is not None \
        and ratio["p50"] <= 1.0 and ratio["p99"] <= 1.0
    ratio_text = ", ".join(f"{p} {r:.2f}x" for p, r in ratio.items() if r is not None) or "-"
    return [*load_notes(doc),
        f"{'PASS' if held and peak < GIB_KIB else 'FAIL'}: {s['open']:,}/{s['asked']:,} sessions "
        f"held by one process, peak RSS {mib(peak)} (target: all, under 1 GiB)",
        f"{'PASS' if intact else 'FAIL'}: WebSocket answers intact {ws['intact']:,}/"
        f"{ws['answers']:,}, SSE {sse['intact']:,}/{sse['answers']:,} (target: all)",
        f"{'PASS' if ttfc_ok else 'FAIL'}: TTFC WebSocket / SSE {ratio_text} "
        "(target: WebSocket no worse than SSE, <= 1.00x)",
    ]


def websocket_report(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    plan, cfg = doc["plan"], doc["gateway_config"]
    print(f"Shepherd websocket - 127.0.0.1, Python {platform.python_version()}, "
          f"{len(lt.ALL_CPUS)} CPUs; {lt.where_scenario(args)}")
    print(f"gateway: one process, server.* defaults but max_connections "
          f"{cfg['server']['max_connections']:,}; key max_websockets "
          f"{cfg['keys']['load']['max_websockets']:,}; ws.* defaults (heartbeat 30 s); "
          f"RLIMIT_NOFILE {doc['nofile']['asked']}; upstream: fast mock, {plan['tokens']} tokens x "
          f"{plan['token_delay_ms']:g} ms = {plan['stream_s']:g} s per answer")
    print(f"load: {plan['sessions']:,} /v1/ws sessions (Authorization header) over "
          f"{plan['ramp_s']:g} s from {plan['drivers']} driver processes (127.0.0.2..), held "
          f"{plan['hold_s']:g} s idle; then {plan['rounds']} round(s) of a WebSocket and an SSE "
          f"phase of {plan['duration_s']:g} s ({plan['warmup_s']:g} s warm-up not counted), "
          f"{plan['active']:,} closed-loop streams each, the other sessions idle\n")
    print(lt.render(["WebSocket", "SSE"], compare_rows(doc)), end="\n\n")
    for line in [*phase_lines(doc), *memory_lines(doc), *session_lines(doc)]:
        print(line)
    print(f"errors by kind: {errors_by_kind(doc) or 0}")
    print("CPU% " + ", ".join(f"{k} {v:.0f}" for k, v in doc["cpu_pct"].items()))
    for name, seen in doc["gateway_logs"].items():
        if seen:
            print(f"{name} log warnings/errors: "
                  + ", ".join(f"{m} x{n}" for m, n in sorted(seen.items())))
    if doc["slow_gc_ms"]:
        print(f"gateway full garbage collections over {len(doc['slow_gc_ms'])} slow threshold: "
              + ", ".join(f"{v:,.0f} ms" for v in doc["slow_gc_ms"]))
    for line in verdicts(doc):
        print(line)
    lt.scenario_json(args, doc)


if __name__ == "__main__":
    main()
