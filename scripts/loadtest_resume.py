"""Cut-and-resume driver of ``loadtest.py --scenario resume``, and the checks it applies.

Run as ``loadtest_resume.py '<json spec>'`` (by ``loadtest.py``, like ``loadtest_client.py``);
prints one JSON object on stdout. ``spec["mode"]``:

* ``cut``: first one uncut reference stream on ``ports[0]``; then ``streams`` streamed chat
  completions, at most ``concurrency`` at once, stream i started on ``ports[i % 2]``. Each
  is cut once: the client reads its body up to a byte position drawn from
  ``random.Random(seed)`` (uniform over the reference body's length, at least 1), drops the
  connection (``transport.abort()``: nothing more is read), and resumes with
  ``GET /v1/streams/{id}`` and ``Last-Event-ID: <id of the last complete event it holds>``
  (no header when it holds none: from the start), on the instance it started on when
  ``i // 2`` is even and on the other one when odd (``ports`` may name one instance twice).
  After the resumed response ended it fetches the full replay (``GET /v1/streams/{id}``
  without a cursor) from the instance that produced the stream and checks the stream with
  ``verify_stream``.
* ``detach``: ``streams`` streams on ``ports[0]``, at most ``concurrency`` being opened at
  once, each dropped after its first complete event; returns their ids.
* ``cancel``: ``POST /v1/streams/{id}/cancel`` on ``ports[0]`` for every id of ``stream_ids``.

Resume latency is ``perf_counter`` time from just before the resume's connect to the first
body byte of its response: the first replayed event, or, when the client already held
everything produced so far, the next live one.

The checks rely on the gateway's framing (``proxy/sse.py``): LF line ends, one ``id:`` and
``data:`` line per event, a blank line after each; ``: keep-alive`` comment lines may come
between events and are ignored. Everything is bounded: each request by ``timeout_s``, the
whole run by ``deadline_s`` (streams not done by then are reported as timed out).
"""

from __future__ import annotations

import asyncio
import random
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import uvloop

try:  # imported as scripts.loadtest_resume (tests) or run as a script (scripts/ on sys.path)
    from scripts.mock_upstream import expected_text
except ImportError:  # pragma: no cover - script mode
    from mock_upstream import expected_text  # type: ignore[no-redef,import-not-found]

DONE = b"[DONE]"
HEAD_LIMIT_BYTES = 64 * 1024
T = TypeVar("T")


# -- pure parts: events, the cut, the checks ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One complete SSE event: ``raw`` as sent (comment lines removed, ending in a blank
    line), its ``id`` field (None: none) and its ``data`` field."""

    raw: bytes
    event_id: str | None
    data: bytes


def split_events(body: bytes) -> tuple[list[Event], bytes]:
    """The complete events of ``body`` and what follows the last one (an incomplete event,
    comment lines removed; ``b""`` if nothing). A block of comment lines only is no event."""
    events, pos = [], 0
    while (end := body.find(b"\n\n", pos)) >= 0:
        lines = [line for line in body[pos:end].split(b"\n") if not line.startswith(b":")]
        pos = end + 2
        if lines:
            events.append(parse_event(lines))
    rest = [line for line in body[pos:].split(b"\n") if line and not line.startswith(b":")]
    return events, b"\n".join(rest)


def parse_event(lines: list[bytes]) -> Event:
    """An ``Event`` of its non-comment lines (WHATWG SSE: one space after the colon is not
    part of the value)."""
    event_id, data = None, []
    for line in lines:
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"id":
            event_id = value.decode(errors="replace")
        elif name == b"data":
            data.append(value)
    return Event(b"\n".join(lines) + b"\n\n", event_id, b"\n".join(data))


def seq_of(event: Event, stream_id: str) -> int | None:
    """The seq of ``id: <stream_id>:<seq>``; None if the id is missing or not of this form."""
    head, _, seq = (event.event_id or "").rpartition(":")
    return int(seq) if head == stream_id and seq.isdigit() else None


def cut_body(received: bytes, cut_at: int, ended: bool) -> bytes:
    """What the client holds after the cut: the first ``cut_at`` bytes of the body; of a
    body that ended before that, all but its last byte (so the final event is incomplete)."""
    if ended and len(received) <= cut_at:
        cut_at = len(received) - 1
    return received[:max(0, cut_at)]


def cursor(held: Sequence[Event]) -> str | None:
    """The ``Last-Event-ID`` to resume after the events held (None: from the start)."""
    return held[-1].event_id if held else None


def chat_text(events: Sequence[Event]) -> str:
    """The assistant text of a chat completion stream (the ``delta.content`` of every
    chunk); raises ``ValueError`` on a chunk that is not JSON."""
    chunks = [orjson.loads(event.data) for event in events if event.data != DONE]
    return "".join((choice.get("delta") or {}).get("content") or ""
                   for chunk in chunks for choice in chunk.get("choices", []))


def normalized(events: Sequence[Event]) -> list[Any]:
    """The data payloads without what differs between two runs of the same request
    (``id`` and ``created`` of each chunk); ``[DONE]`` stays a string."""
    out: list[Any] = []
    for event in events:
        if event.data == DONE:
            out.append("[DONE]")
            continue
        chunk = orjson.loads(event.data)
        out.append({k: v for k, v in chunk.items() if k not in ("id", "created")}
                   if isinstance(chunk, dict) else chunk)
    return out


def seq_problems(events: Sequence[Event], stream_id: str) -> list[str]:
    """Events whose ids are not ``<stream_id>:1``, ``:2``, ... in order: the first gap,
    repeat or foreign id."""
    for position, event in enumerate(events, 1):
        seq = seq_of(event, stream_id)
        if seq is None:
            return [f"event {position} has id {event.event_id!r}, not {stream_id}:<seq>"]
        if seq < position:
            return [f"event {position} repeats seq {seq}"]
        if seq > position:
            return [f"seqs {position}..{seq - 1} missing (event {position} has seq {seq})"]
    return []


def first_difference(a: bytes, b: bytes) -> int:
    """The offset of the first byte where ``a`` and ``b`` differ (the shorter's length if
    one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def verify_stream(stream_id: str, held: bytes, resumed: bytes, replay: bytes, tokens: int,
                  reference: list[Any] | None) -> list[str]:
    """What is wrong with one cut stream; empty if it is intact.

    ``held``: the body bytes the client had at the cut; ``resumed``: the body of the resume;
    ``replay``: the body of a full replay after the stream ended; ``reference``:
    ``normalized`` events of an uncut stream of the same request (None: not compared).
    Intact means: the complete events of ``held`` followed by those of ``resumed`` carry
    seqs 1..n without gap or repeat, end with ``data: [DONE]``, are byte for byte the full
    replay, say ``expected_text(tokens)``, and match ``reference``; nothing incomplete is
    left after the resumed events."""
    before, _ = split_events(held)
    after, rest = split_events(resumed)
    events = before + after
    problems = seq_problems(events, stream_id)
    if rest:
        problems.append(f"the resumed body ends in an incomplete event ({len(rest)} bytes)")
    if not events or events[-1].data != DONE:
        problems.append("the reassembled stream does not end with data: [DONE]")
    joined = b"".join(e.raw for e in events)
    full = b"".join(e.raw for e in split_events(replay)[0])
    if joined != full:
        problems.append(f"differs from the full replay from byte {first_difference(joined, full)} "
                        f"({len(joined)} vs {len(full)} bytes)")
    try:
        if chat_text(events) != expected_text(tokens):
            problems.append(f"text is not expected_text({tokens})")
        if reference is not None and normalized(events) != reference:
            problems.append("payloads differ from an uncut stream's")
    except ValueError as exc:  # orjson.JSONDecodeError included
        problems.append(f"an event's data is not JSON: {exc}")
    return problems


def plan_cuts(streams: int, seed: int, body_bytes: int) -> list[int]:
    """The byte position of each stream's cut: uniform in [1, body_bytes - 1]."""
    rng = random.Random(seed)
    return [rng.randint(1, max(1, body_bytes - 1)) for _ in range(streams)]


def route(index: int, ports: Sequence[int]) -> tuple[int, int, str]:
    """(origin port, resume port, ``same`` | ``other``) of stream ``index``: origins
    alternate between the two instances, and so (every other pair) do resumes. With one
    instance (both ports equal) every resume is ``same``."""
    origin = index % 2
    where = "same" if (index // 2) % 2 == 0 or ports[0] == ports[1] else "other"
    return ports[origin], ports[origin if where == "same" else 1 - origin], where


# -- HTTP/1.1 on asyncio streams -------------------------------------------------------


class HTTPError(Exception):
    """The response could not be read: a bad head, or the connection closed mid-body."""


@dataclass
class Response:
    """A response whose head was read; ``body`` pieces are read as they come."""

    status: int
    headers: dict[str, str]  # lower-case names
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    chunked: bool
    remaining: int | None  # Content-Length left to read; None: chunked or until close
    done: bool = False

    async def piece(self) -> bytes:
        """The next piece of the body; ``b""`` once it ended. Raises ``HTTPError`` or
        ``asyncio.IncompleteReadError`` if the connection ends early."""
        if self.done:
            return b""
        if self.chunked:
            return await self._chunk()
        if self.remaining is None:
            data = await self.reader.read(65536)
            self.done = not data
            return data
        data = await self.reader.read(min(self.remaining, 65536))
        if not data and self.remaining:
            raise HTTPError(f"connection closed with {self.remaining} body bytes missing")
        self.remaining -= len(data)
        self.done = self.remaining == 0
        return data

    async def _chunk(self) -> bytes:
        size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            await self.reader.readuntil(b"\r\n")  # no trailers from the gateway
            self.done = True
            return b""
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def read_all(self) -> bytes:
        out = bytearray()
        while piece := await self.piece():
            out += piece
        return bytes(out)

    def drop(self) -> None:
        """Drop the connection at once (no FIN handshake; unread data is discarded)."""
        self.writer.transport.abort()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.drop()


async def request(host: str, port: int, method: str, path: str, headers: dict[str, str],
                  body: bytes = b"") -> Response:
    """Send one request on a new connection (``Connection: close``) and read the head."""
    reader, writer = await asyncio.open_connection(host, port, limit=HEAD_LIMIT_BYTES)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.transport.abort()
        raise HTTPError(f"no response head: {exc!r}") from exc
    status_line, *fields = head.decode("latin-1").split("\r\n")
    names = dict(f.split(":", 1) for f in fields if ":" in f)
    fields_lower = {k.strip().lower(): v.strip() for k, v in names.items()}
    chunked = fields_lower.get("transfer-encoding", "").lower() == "chunked"
    length = None if chunked or "content-length" not in fields_lower \
        else int(fields_lower["content-length"])
    return Response(int(status_line[9:12]), fields_lower, reader, writer, chunked, length,
                    done=length == 0)


# -- the driver -------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """Where and what to send: host, the API key, the chat body and the mock knobs (each
    request is bounded by ``bounded``'s timeout)."""

    host: str
    api_key: str
    body: bytes
    headers: dict[str, str]  # extra request headers (``x-mock-*``)

    def auth(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", **extra}

    async def start(self, port: int) -> Response:
        """POST the streamed chat completion."""
        return await request(self.host, port, "POST", "/v1/chat/completions",
                             self.auth(**{"Content-Type": "application/json"}, **self.headers),
                             self.body)

    async def resume(self, port: int, stream_id: str, last_event_id: str | None) -> Response:
        """``GET /v1/streams/{id}`` after ``last_event_id`` (None: from the start)."""
        extra = {"Last-Event-ID": last_event_id} if last_event_id else {}
        return await request(self.host, port, "GET", f"/v1/streams/{stream_id}",
                             self.auth(**extra))


async def read_until(resp: Response, want_bytes: int) -> tuple[bytes, bool]:
    """Body bytes until at least ``want_bytes`` came or the body ended; (bytes, ended)."""
    out = bytearray()
    while len(out) < want_bytes:
        piece = await resp.piece()
        if not piece:
            return bytes(out), True
        out += piece
    return bytes(out), False


async def reference_stream(client: Client, port: int, tokens: int) -> dict[str, Any]:
    """One uncut stream: its id, body length, events, whether its text is
    ``expected_text(tokens)``, and its ``normalized`` events."""
    async with await client.start(port) as resp:
        body = await resp.read_all()
    if resp.status != 200:
        raise HTTPError(f"reference stream: HTTP {resp.status}: {body[:300]!r}")
    events, _ = split_events(body)
    return {"stream_id": resp.headers.get("x-stream-id"), "body_bytes": len(body),
            "events": len(events), "text_ok": chat_text(events) == expected_text(tokens),
            "normalized": normalized(events)}


async def timed_resume(client: Client, port: int, stream_id: str,
                       last_event_id: str | None) -> tuple[Response, bytes, float | None]:
    """Resume; returns the response, its body and the ms from before the connect to the
    first body byte (None: the body was empty)."""
    t0 = time.perf_counter()
    async with await client.resume(port, stream_id, last_event_id) as resp:
        first = await resp.piece()
        latency_ms = (time.perf_counter() - t0) * 1000 if first else None
        return resp, first + await resp.read_all(), latency_ms


async def start_and_cut(client: Client, port: int, cut_at: int) -> tuple[str, bytes]:
    """Start a stream on ``port``, drop the connection after ``cut_at`` body bytes (see
    ``cut_body``); returns (stream id, the bytes held). Raises ``HTTPError`` if it did not
    start (the status and the start of the body in the message)."""
    async with await client.start(port) as resp:
        stream_id = resp.headers.get("x-stream-id", "")
        if resp.status != 200 or not stream_id:
            body, _ = await read_until(resp, 300)
            raise HTTPError(f"POST: HTTP {resp.status}, X-Stream-Id {stream_id!r}: {body[:300]!r}")
        received, ended = await read_until(resp, cut_at)
    return stream_id, cut_body(received, cut_at, ended)


async def cut_and_resume(client: Client, index: int, ports: Sequence[int], cut_at: int,
                         tokens: int, reference: list[Any]) -> dict[str, Any]:
    """Stream ``index``: start, cut at byte ``cut_at``, resume, replay, check; a record of
    what happened (``problems`` empty: intact)."""
    origin, target, where = route(index, ports)
    record: dict[str, Any] = {"index": index, "where": where, "origin": origin,
                              "resume_port": target, "cut_at": cut_at, "problems": []}
    stream_id, held = await start_and_cut(client, origin, cut_at)
    held_events, _ = split_events(held)
    last_event_id = cursor(held_events)
    record |= {"stream_id": stream_id, "held_bytes": len(held), "held_events": len(held_events),
               "last_event_id": last_event_id}
    resumed, body, latency_ms = await timed_resume(client, target, stream_id, last_event_id)
    record |= {"resume_status": resumed.status, "resume_latency_ms": latency_ms}
    if resumed.status != 200:
        record["problems"].append(f"resume: HTTP {resumed.status}: "
                                  f"{body[:300].decode(errors='replace')}")
        return record
    async with await client.resume(origin, stream_id, None) as replay:
        replay_body = await replay.read_all()
    if replay.status != 200:
        record["problems"].append(f"full replay: HTTP {replay.status}")
    record["problems"] += verify_stream(stream_id, held, body, replay_body, tokens, reference)
    return record


async def open_and_drop(client: Client, port: int) -> str:
    """A stream dropped after its first complete event; returns its id. Raises
    ``HTTPError`` if it did not start or ended before its first event."""
    async with await client.start(port) as resp:
        stream_id = resp.headers.get("x-stream-id", "")
        if resp.status != 200 or not stream_id:
            raise HTTPError(f"POST: HTTP {resp.status}")
        received = b""
        while not split_events(received)[0]:
            piece = await resp.piece()
            if not piece:
                raise HTTPError("the stream ended before its first event")
            received += piece
    return stream_id


async def cancel(client: Client, port: int, stream_id: str) -> int:
    async with await request(client.host, port, "POST", f"/v1/streams/{stream_id}/cancel",
                             client.auth()) as resp:
        await resp.read_all()
    return resp.status


async def bounded(jobs: Sequence[Callable[[], Awaitable[T]]], concurrency: int,
                  timeout_s: float, deadline: float) -> list[T | str]:
    """Run ``jobs`` at most ``concurrency`` at once, each within ``timeout_s`` and all
    before ``deadline`` (``perf_counter``); a job that failed or timed out gives
    ``"<exception class>: <message>"`` instead of its result."""
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[T]]) -> T | str:
        async with gate:
            left = deadline - time.perf_counter()
            if left <= 0:
                return "not started before the deadline"
            try:
                async with asyncio.timeout(min(timeout_s, left)):
                    return await job()
            except (OSError, TimeoutError, HTTPError, ValueError,
                    asyncio.IncompleteReadError) as exc:
                return f"{type(exc).__name__}: {exc}"

    return list(await asyncio.gather(*(one(job) for job in jobs)))


async def run_cut(spec: dict[str, Any], client: Client, deadline: float) -> dict[str, Any]:
    ports, tokens = spec["ports"], spec["tokens"]
    ref = await asyncio.wait_for(reference_stream(client, ports[0], tokens), spec["timeout_s"])
    cuts = plan_cuts(spec["streams"], spec["seed"], ref["body_bytes"])
    jobs = [lambda i=i, at=at: cut_and_resume(client, i, ports, at, tokens, ref["normalized"])
            for i, at in enumerate(cuts)]
    results = await bounded(jobs, spec["concurrency"], spec["timeout_s"], deadline)
    records = [r if isinstance(r, dict) else
               {"index": i, "where": route(i, ports)[2], "cut_at": cuts[i], "problems": [r]}
               for i, r in enumerate(results)]
    return {"reference": {k: v for k, v in ref.items() if k != "normalized"},
            "records": records}


async def run_detach(spec: dict[str, Any], client: Client, deadline: float) -> dict[str, Any]:
    port = spec["ports"][0]
    jobs = [lambda: open_and_drop(client, port)] * spec["streams"]
    results = await bounded(jobs, spec["concurrency"], spec["timeout_s"], deadline)
    ids = [r for r in results if r.startswith("gs_")]
    failures = [r for r in results if not r.startswith("gs_")]
    return {"stream_ids": ids, "failed": len(failures), "failures": failures[:20]}


async def run_cancel(spec: dict[str, Any], client: Client, deadline: float) -> dict[str, Any]:
    port = spec["ports"][0]
    jobs = [lambda s=s: cancel(client, port, s) for s in spec["stream_ids"]]
    results = await bounded(jobs, spec["concurrency"], spec["timeout_s"], deadline)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r)] = statuses.get(str(r), 0) + 1
    return {"statuses": statuses}


MODES = {"cut": run_cut, "detach": run_detach, "cancel": run_cancel}


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec["mode"]`` from ``spec["start_at"]`` (``time.time()``) for at most
    ``spec["deadline_s"]`` seconds; adds ``elapsed_s`` (from the start) and ``cpu_s`` (this
    process's CPU seconds since it started, imports included) to the mode's output."""
    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    client = Client(spec["host"], spec["api_key"], orjson.dumps(spec["body"]), spec["headers"])
    started = time.perf_counter()
    out = await MODES[spec["mode"]](spec, client, started + spec["deadline_s"])
    return out | {"elapsed_s": time.perf_counter() - started, "cpu_s": cpu_seconds()}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    spec = orjson.loads(sys.argv[1])
    sys.stdout.buffer.write(orjson.dumps(uvloop.run(run(spec))))


if __name__ == "__main__":
    main()
