"""httpx transports that keep Shepherd's streamed answers whole across connection drops.

For the gateway's users, not the gateway: this module imports nothing from ``proxy`` and
needs only ``httpx`` and the standard library, so it can be copied into a client project.

    from openai import OpenAI
    import httpx
    from proxy.client import ResumableTransport

    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=KEY,
                    http_client=httpx.Client(transport=ResumableTransport()))

(``AsyncOpenAI`` with ``httpx.AsyncClient(transport=AsyncResumableTransport())`` likewise.)

The rules come from DESIGN.md §4 "Reconnection" and the WHATWG HTML Living Standard, §9.2
"Server-sent events":

* A Shepherd stream is a ``200`` ``text/event-stream`` response with an ``X-Stream-Id``
  header; every event carries ``id: <stream_id>:<seq>``.
* It is whole when the body ends right after a terminal event: ``data: [DONE]``, an error
  event ``data: {"error": {...}}``, or a Responses event typed ``response.completed``,
  ``response.failed``, ``response.incomplete`` or ``error``.
* When the body breaks before that (a transport error, or a clean end without a terminal
  event), the transport re-sends the same request with ``Last-Event-ID`` set to the id of the
  last complete event and splices the answer (the events after it) into the same body. Bytes
  of an event cut in half are dropped, so the reader sees exactly the bytes of an
  uninterrupted stream (``: keep-alive`` comment lines aside).

Everything else passes through untouched: other statuses, other content types, responses
without ``X-Stream-Id`` or with a ``Content-Encoding`` (their bytes are not SSE lines), and
requests whose body cannot be replayed (a generator rather than bytes).

Note that ``httpx.Client(transport=...)`` ignores the client's own ``verify``, ``limits``,
``http2`` and proxy settings; give them to the inner transport instead:
``ResumableTransport(httpx.HTTPTransport(http2=True, retries=1))``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import random
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass

import httpx

__all__ = ["AsyncResumableTransport", "ResumableTransport", "ResumeStats"]

#: Event types (``event:`` field or the data's JSON ``type``) that end a Responses stream.
_TERMINAL_TYPES = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})

#: A terminal event's data contains one of these; other events skip the JSON parse.
_TERMINAL_MARKERS = (b"error", b"response.completed", b"response.failed", b"response.incomplete")

#: WHATWG SSE line endings: CRLF, LF or a lone CR.
_LINE_END = re.compile(rb"\r\n|\r|\n")

#: Why the gateway refuses a resume with each status (DESIGN §4); a 200 is refused only
#: when it is not the same event stream.
_REFUSALS = {
    200: "not the same event stream",
    400: "the Last-Event-ID was malformed or beyond the latest event",
    404: "the stream is unknown, expired or another key's",
    409: "the events after the Last-Event-ID are no longer retained",
}


@dataclass
class ResumeStats:
    """What one transport has done so far; its ``repr`` shows these.

    Attributes:
        streams: Shepherd streams wrapped (responses that would be resumed if they broke).
        breaks: times a body ended or failed before its terminal event, resumed attempts
            included.
        resumes: resume requests answered with the rest of the stream (200) or with 204.
        gave_up: breaks that ended in ``httpx.ReadError`` for the reader.

    Counters are plain ints: a sync transport shared by threads may under-count slightly.
    """

    streams: int = 0
    breaks: int = 0
    resumes: int = 0
    gave_up: int = 0


@dataclass(frozen=True, slots=True)
class _Policy:
    """Backoff limits per break; see ``ResumableTransport`` for their meaning."""

    max_attempts: int
    max_total_s: float
    base_delay_s: float
    max_delay_s: float

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 0, got {value!r}" for name, value in (
            ("max_attempts", self.max_attempts), ("max_total_s", self.max_total_s),
            ("base_delay_s", self.base_delay_s), ("max_delay_s", self.max_delay_s)) if value < 0]
        if problems:
            raise ValueError("; ".join(problems))

    def delay_s(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max_delay_s, base_delay_s * 2**attempt)]."""
        growth = 2.0 ** min(attempt, 64)  # past 2**64 the cap has long won; avoids overflow
        return random.uniform(0.0, min(self.max_delay_s, self.base_delay_s * growth))


@dataclass(frozen=True, slots=True)
class _Frame:
    """A run of raw bytes to pass on: one whole event, or one line between events."""

    raw: bytes
    is_event: bool = False
    event_id: str | None = None
    terminal: bool = False


class _EventFramer:
    """Cuts SSE bytes into whole events at blank lines (WHATWG HTML §9.2.6).

    ``feed`` returns each event's raw bytes once its blank line has arrived, and comment or
    blank lines between events as soon as they end. Bytes of an unfinished line or event are
    held, and dropped with the framer when the connection breaks.
    """

    __slots__ = ("_pending", "_block", "_lines", "_skip_lf")

    def __init__(self) -> None:
        self._pending = bytearray()  # the unfinished line
        self._block = bytearray()  # raw lines of the unfinished event
        self._lines: list[bytes] = []  # the same lines without their endings
        self._skip_lf = False  # the last line ended in CR: an LF right after belongs to it

    def feed(self, chunk: bytes) -> list[_Frame]:
        """Consume ``chunk`` (split anywhere) and return the frames it completed, in order."""
        frames: list[_Frame] = []
        if not chunk:
            return frames
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
            frames += self._take_lf()
        self._skip_lf = False
        start, scan_from = 0, len(self._pending)
        self._pending += chunk
        for match in _LINE_END.finditer(self._pending, scan_from):
            frame = self._line(bytes(self._pending[start:match.start()]), match.group())
            frames += [frame] if frame is not None else []
            start = match.end()
        self._skip_lf = start == len(self._pending) and self._pending.endswith(b"\r")
        del self._pending[:start]
        return frames

    def _take_lf(self) -> list[_Frame]:
        """The LF of a CRLF split across chunks: part of the event, or passed on alone."""
        if self._block:
            self._block += b"\n"
            return []
        return [_Frame(b"\n")]

    def _line(self, line: bytes, ending: bytes) -> _Frame | None:
        if not self._block and (not line or line[:1] == b":"):
            return _Frame(line + ending)  # a comment or blank line between events
        self._block += line + ending
        if line:
            self._lines.append(line)
            return None
        frame = _event_frame(bytes(self._block), self._lines)
        self._block.clear()
        self._lines = []
        return frame


def _event_frame(raw: bytes, lines: list[bytes]) -> _Frame:
    """Read the ``id``, ``event`` and ``data`` fields of one event (WHATWG HTML §9.2.6)."""
    event_id: str | None = None
    event_type: str | None = None
    data: list[bytes] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        value = value[1:] if colon and value[:1] == b" " else value
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event_type = value.decode("utf-8", "replace")
        elif name == b"id" and b"\x00" not in value:
            event_id = value.decode("utf-8", "replace")
    terminal = bool(data) and _is_terminal(event_type, b"\n".join(data))
    return _Frame(raw, is_event=True, event_id=event_id, terminal=terminal)


def _is_terminal(event_type: str | None, data: bytes) -> bool:
    """Whether an event ends its stream: ``[DONE]``, an error, or a final Responses event."""
    if data == b"[DONE]" or event_type in _TERMINAL_TYPES:
        return True
    if not any(marker in data for marker in _TERMINAL_MARKERS):
        return False
    try:
        payload = json.loads(data)
    except ValueError:
        return False
    return isinstance(payload, dict) and (
        payload.get("error") is not None or payload.get("type") in _TERMINAL_TYPES)


class _Verdict(enum.Enum):
    """What to do with the answer to a resume request."""

    STREAM = "splice its body"
    END = "nothing is left: end the body"
    RETRY = "try again after a delay"
    REFUSED = "give up"


class _Resumption:
    """Where one wrapped stream is and how its current break is going; no I/O here.

    ``last_event_id`` follows the WHATWG "last event ID buffer": it keeps the newest ``id``
    field seen in a complete event. ``whole`` is true while the last event was terminal.
    """

    __slots__ = ("request", "stream_id", "last_event_id", "whole", "_policy", "_stats",
                 "_attempts", "_break_started_s", "_reason")

    def __init__(self, request: httpx.Request, stream_id: str, policy: _Policy,
                 stats: ResumeStats) -> None:
        self.request = request
        self.stream_id = stream_id
        self.last_event_id: str | None = None
        self.whole = False
        self._policy = policy
        self._stats = stats
        self._attempts = 0
        self._break_started_s: float | None = None
        self._reason = ""
        stats.streams += 1

    def accept(self, frames: list[_Frame]) -> bytes:
        """Note the events in ``frames`` (an event ends the current break) and join them."""
        for frame in frames:
            if frame.is_event:
                self.whole = frame.terminal
                self.last_event_id = frame.event_id or self.last_event_id
                self._attempts, self._break_started_s = 0, None
        return b"".join(frame.raw for frame in frames)

    def broke(self, reason: str) -> None:
        """The body ended or failed before its terminal event, because of ``reason``."""
        self._stats.breaks += 1
        self._reason = reason

    def next_delay_s(self, now_s: float) -> float:
        """Seconds to wait before the next resume request (``now_s`` is monotonic).

        Raises:
            httpx.ReadError: ``max_attempts`` or ``max_total_s`` of this break are spent.
        """
        self._break_started_s = now_s if self._break_started_s is None else self._break_started_s
        elapsed_s = now_s - self._break_started_s
        if self._attempts >= self._policy.max_attempts:
            raise self.give_up(f"all {self._attempts} resume attempts failed in {elapsed_s:.1f} s")
        left_s = self._policy.max_total_s - elapsed_s
        if left_s <= 0:
            raise self.give_up(f"no event for {elapsed_s:.1f} s of resume attempts")
        delay_s = self._policy.delay_s(self._attempts)
        self._attempts += 1
        return min(delay_s, left_s)

    def resume_request(self) -> httpx.Request:
        """The original request again (same method, URL, headers and body) with the
        ``Last-Event-ID`` header (WHATWG HTML §9.2.4): the last complete event's id, or
        ``<stream_id>:0`` when none arrived yet."""
        headers = self.request.headers.copy()
        headers["Last-Event-ID"] = self.last_event_id or f"{self.stream_id}:0"
        return httpx.Request(self.request.method, self.request.url, headers=headers,
                             content=self.request.content, extensions=self.request.extensions)

    def judge(self, response: httpx.Response) -> _Verdict:
        """Classify the answer to a resume request, remembering why when it is not 200."""
        status = response.status_code
        if status == 200 and _stream_id(response) == self.stream_id:
            self._stats.resumes += 1
            return _Verdict.STREAM
        if status == 204:
            self._stats.resumes += 1
            return _Verdict.END
        self._reason = f"the resume request was answered {status} {response.reason_phrase}"
        if status in (408, 429) or status >= 500:
            return _Verdict.RETRY
        if status in _REFUSALS:
            self._reason += ": " + _REFUSALS[status]
        return _Verdict.REFUSED

    def failed(self, exc: httpx.TransportError) -> None:
        """A resume request failed before any answer."""
        self._reason = f"the resume request failed: {_describe(exc)}"

    def give_up(self, why: str = "") -> httpx.ReadError:
        """The error the reader of the body gets when this break cannot be mended."""
        self._stats.gave_up += 1
        after = self.last_event_id or "no complete event"
        detail = f"{why}; last: {self._reason}" if why else self._reason
        return httpx.ReadError(f"Shepherd stream {self.stream_id} broke after {after} and could "
                               f"not be resumed: {detail}", request=self.request)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _stream_id(response: httpx.Response) -> str | None:
    """The ``X-Stream-Id`` of a Shepherd SSE response, or ``None`` for anything else."""
    headers = response.headers
    if response.status_code != 200 or headers.get("content-encoding", "identity").lower() != "identity":
        return None
    if not headers.get("content-type", "").lower().startswith("text/event-stream"):
        return None
    return headers.get("x-stream-id") or None


def _replayable(request: httpx.Request) -> bool:
    """Whether the request body can be sent again (it was given as bytes, JSON, a form...)."""
    try:
        return isinstance(request.content, bytes)
    except httpx.RequestNotRead:
        return False


def _spliced(first: httpx.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream,
             ) -> httpx.Response:
    """A response like ``first`` whose body is ``stream``."""
    return httpx.Response(first.status_code, headers=first.headers, stream=stream,
                          extensions=first.extensions)


def _repr(transport: object, policy: _Policy, stats: ResumeStats) -> str:
    return (f"<{type(transport).__name__} [streams: {stats.streams}, breaks: {stats.breaks}, "
            f"resumes: {stats.resumes}, gave up: {stats.gave_up}] "
            f"max_attempts={policy.max_attempts} max_total_s={policy.max_total_s}>")


class _SyncSplice(httpx.SyncByteStream):
    """The body of a wrapped response: the first response, then its resumptions."""

    def __init__(self, first: httpx.Response, state: _Resumption, inner: httpx.BaseTransport) -> None:
        self._response: httpx.Response | None = first
        self._state = state
        self._inner = inner
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        while self._response is not None:
            yield from self._relay(self._response)
            self._response = None if self._state.whole or self._closed else self._reconnect()

    def _relay(self, response: httpx.Response) -> Iterator[bytes]:
        framer = _EventFramer()
        try:
            for chunk in response.iter_raw():
                if out := self._state.accept(framer.feed(chunk)):
                    yield out
            reason = "the body ended before its terminal event"
        except httpx.TransportError as exc:
            reason = _describe(exc)
        finally:
            response.close()
        if not self._state.whole:
            self._state.broke(reason)

    def _reconnect(self) -> httpx.Response | None:
        while True:
            time.sleep(self._state.next_delay_s(time.monotonic()))
            try:
                response = self._inner.handle_request(self._state.resume_request())
            except httpx.TransportError as exc:
                self._state.failed(exc)
                continue
            verdict = self._state.judge(response)
            if verdict is _Verdict.STREAM:
                return response
            response.close()
            if verdict is _Verdict.END:
                return None
            if verdict is _Verdict.REFUSED:
                raise self._state.give_up()

    def close(self) -> None:
        self._closed = True
        if self._response is not None:
            self._response.close()


class _AsyncSplice(httpx.AsyncByteStream):
    """The async twin of ``_SyncSplice``."""

    def __init__(self, first: httpx.Response, state: _Resumption,
                 inner: httpx.AsyncBaseTransport) -> None:
        self._response: httpx.Response | None = first
        self._state = state
        self._inner = inner
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self._response is not None:
            async with contextlib.aclosing(self._relay(self._response)) as relayed:
                async for out in relayed:
                    yield out
            self._response = None if self._state.whole or self._closed else await self._reconnect()

    async def _relay(self, response: httpx.Response) -> AsyncGenerator[bytes, None]:
        framer = _EventFramer()
        try:
            async for chunk in response.aiter_raw():
                if out := self._state.accept(framer.feed(chunk)):
                    yield out
            reason = "the body ended before its terminal event"
        except httpx.TransportError as exc:
            reason = _describe(exc)
        finally:
            await response.aclose()
        if not self._state.whole:
            self._state.broke(reason)

    async def _reconnect(self) -> httpx.Response | None:
        while True:
            await asyncio.sleep(self._state.next_delay_s(time.monotonic()))
            try:
                response = await self._inner.handle_async_request(self._state.resume_request())
            except httpx.TransportError as exc:
                self._state.failed(exc)
                continue
            verdict = self._state.judge(response)
            if verdict is _Verdict.STREAM:
                return response
            await response.aclose()
            if verdict is _Verdict.END:
                return None
            if verdict is _Verdict.REFUSED:
                raise self._state.give_up()

    async def aclose(self) -> None:
        self._closed = True
        if self._response is not None:
            await self._response.aclose()


class ResumableTransport(httpx.BaseTransport):
    """A sync httpx transport that resumes broken Shepherd streams (DESIGN §4, WHATWG SSE).

    Use it as ``httpx.Client(transport=ResumableTransport())``, e.g. as openai-python's
    ``http_client``: the SDK's iterator then sees one stream, byte-identical to an
    uninterrupted one (``: keep-alive`` comments aside), however often the connection drops.
    Non-Shepherd responses are returned exactly as the inner transport made them.

    Args:
        inner: the transport that does the I/O; ``None`` means ``httpx.HTTPTransport()``.
            Closing this transport closes it.
        max_attempts: resume requests allowed per break (default 5). The count is
            consecutive: a resumed connection that delivers at least one complete event
            starts it over. 0 turns resuming off.
        max_total_s: seconds one break may last, waits included, before giving up (default
            30). Like the attempts, it starts over when an event arrives.
        base_delay_s: backoff base in seconds (default 0.25).
        max_delay_s: backoff cap in seconds (default 4). Before attempt ``n`` (from 0) the
            transport waits a uniform random time in [0, min(max_delay_s,
            base_delay_s * 2**n)] ("full jitter"), here with ``time.sleep``.

    Raises:
        ValueError: a limit is negative (every such problem in one message).

    The body iterator of a wrapped response raises ``httpx.ReadError`` when a break cannot be
    mended: attempts or time spent, or the gateway refused the resume (400, 404, 409, another
    4xx, or a 200 that is not the same stream); the message names the status, the stream and
    the last event id. ``408``, ``429``, ``5xx`` and transport errors are retried; ``204``
    ends the body (the gateway holds nothing more). A break after the terminal event is no
    break: the body just ends. Errors while sending the original request are the inner
    transport's, untouched.

    Reading the body may block in ``time.sleep`` for at most ``max_total_s`` per break.
    Closing the response early closes the current connection and stops resuming.
    ``stats`` (a ``ResumeStats``) counts what the transport did; ``repr`` shows it.
    """

    def __init__(self, inner: httpx.BaseTransport | None = None, *, max_attempts: int = 5,
                 max_total_s: float = 30.0, base_delay_s: float = 0.25,
                 max_delay_s: float = 4.0) -> None:
        self._inner = inner if inner is not None else httpx.HTTPTransport()
        self._policy = _Policy(max_attempts, max_total_s, base_delay_s, max_delay_s)
        self.stats = ResumeStats()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the inner transport; wrap the body of a Shepherd stream."""
        replayable = _replayable(request)
        response = self._inner.handle_request(request)
        stream_id = _stream_id(response) if replayable else None
        if stream_id is None:
            return response
        state = _Resumption(request, stream_id, self._policy, self.stats)
        return _spliced(response, _SyncSplice(response, state, self._inner))

    def close(self) -> None:
        """Close the inner transport (its pooled connections)."""
        self._inner.close()

    def __repr__(self) -> str:
        return _repr(self, self._policy, self.stats)


class AsyncResumableTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of ``ResumableTransport``, for ``httpx.AsyncClient`` and ``AsyncOpenAI``.

    Args:
        inner: the transport that does the I/O; ``None`` means ``httpx.AsyncHTTPTransport()``.
            Closing this transport closes it.
        max_attempts: resume requests allowed per break (default 5), counted consecutively
            as in ``ResumableTransport``. 0 turns resuming off.
        max_total_s: seconds one break may last, waits included (default 30).
        base_delay_s: backoff base in seconds (default 0.25).
        max_delay_s: backoff cap in seconds (default 4). Waits are full jitter, uniform in
            [0, min(max_delay_s, base_delay_s * 2**n)] before attempt ``n``, with
            ``asyncio.sleep``.

    Raises:
        ValueError: a limit is negative (every such problem in one message).

    The body iterator raises ``httpx.ReadError`` when a break cannot be mended, exactly as
    ``ResumableTransport`` describes; other responses pass through untouched.

    Cancelling the task that reads the body is safe: the current connection is closed and
    nothing leaks, events already returned stay returned, and the body cannot be read
    further. ``stats`` (a ``ResumeStats``) counts what the transport did; ``repr`` shows it.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None, *, max_attempts: int = 5,
                 max_total_s: float = 30.0, base_delay_s: float = 0.25,
                 max_delay_s: float = 4.0) -> None:
        self._inner = inner if inner is not None else httpx.AsyncHTTPTransport()
        self._policy = _Policy(max_attempts, max_total_s, base_delay_s, max_delay_s)
        self.stats = ResumeStats()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the inner transport; wrap the body of a Shepherd stream."""
        replayable = _replayable(request)
        response = await self._inner.handle_async_request(request)
        stream_id = _stream_id(response) if replayable else None
        if stream_id is None:
            return response
        state = _Resumption(request, stream_id, self._policy, self.stats)
        return _spliced(response, _AsyncSplice(response, state, self._inner))

    async def aclose(self) -> None:
        """Close the inner transport (its pooled connections)."""
        await self._inner.aclose()

    def __repr__(self) -> str:
        return _repr(self, self._policy, self.stats)

