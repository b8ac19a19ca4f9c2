"""The stream log: the one indirection between an upstream reader and its client writers.

One producer (the task reading the upstream) appends encoded SSE frames; each frame gets the
next sequence number, counting from 1. Readers (an SSE response, a resuming request, a
WebSocket) each hold their own cursor and pull "everything after seq n", waiting when there
is nothing new. Because readers never share a queue, a reader can leave and another can
start from any retained seq: that is what reconnection (DESIGN §4 "Reconnection") and
multiplexing build on.

The ``StreamRegistry`` owns the logs and their producer tasks: it starts producers, cancels
a stream nobody re-attached to within ``detach_timeout_s``, keeps finished logs for
``retention_s`` within ``max_total_bytes``, and answers the resume rules (204/400/404/409).

Only ``asyncio`` primitives are used here; no aiohttp object crosses this layer.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from proxy.errors import (
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    UpstreamError,
)
from proxy.sse import encode_event


class StreamState(enum.Enum):
    """Where a stream's generation stands."""

    RUNNING = "running"
    DONE = "done"  # ended normally; the last frame is the terminal one
    FAILED = "failed"  # ended by an error; the last frame (if any) is the error event


def error_frame(error: GatewayError) -> bytes:
    """The SSE event that ends a failed stream: ``data: {"error": {...}}`` (never ``[DONE]``:
    SDKs take a stream that ends with ``[DONE]`` as a success)."""
    return encode_event(orjson.dumps(error.to_body()))


def new_stream_id() -> str:
    """A fresh, unguessable stream id: ``gs_`` + 24 hex characters (96 random bits)."""
    return "gs_" + secrets.token_hex(12)


_STREAM_ID_RE = re.compile(r"gs_[0-9a-f]{24}")
_SEQ_RE = re.compile(r"0|[1-9][0-9]{0,17}")


def valid_stream_id(stream_id: str) -> bool:
    """Whether ``stream_id`` has the shape ``new_stream_id`` makes."""
    return _STREAM_ID_RE.fullmatch(stream_id) is not None


def parse_seq(text: str, what: str) -> int:
    """A cursor given by a client (``starting_after``, the seq of a ``Last-Event-ID``).

    Raises:
        InvalidRequestError: not a non-negative decimal integer (400).
    """
    if _SEQ_RE.fullmatch(text) is None:
        raise InvalidRequestError(f"{what} must be a non-negative integer, not {text[:40]!r}.",
                                  param=what, code="invalid_cursor")
    return int(text)


def parse_last_event_id(value: str) -> tuple[str, int]:
    """``Last-Event-ID: <stream_id>:<seq>`` → ``(stream_id, seq)`` (WHATWG HTML §9.2: the
    browser sends back the last ``id:`` it saw; ours are ``gs_…:<seq>``).

    Raises:
        InvalidRequestError: any other shape (400).
    """
    stream_id, _, seq = value.strip().partition(":")
    if not valid_stream_id(stream_id):
        raise InvalidRequestError("Last-Event-ID must look like gs_<24 hex>:<seq>.",
                                  param="Last-Event-ID", code="invalid_cursor")
    return stream_id, parse_seq(seq, "Last-Event-ID")


class StreamNotFoundError(NotFoundError):
    """The stream is unknown, expired or another key's: one answer for all three (404), so
    a stream id cannot be probed."""

    default_code = "stream_not_found"

    def __init__(self) -> None:
        super().__init__("No such stream (it is unknown, expired, or not yours).")


class StreamTrimmedError(GatewayError):
    """The cursor is older than the oldest event the log still holds (409). The body's
    ``error.earliest_seq`` names the oldest seq that can still be resumed after minus one."""

    status = 409
    error_type = "invalid_request_error"
    default_code = "stream_trimmed"

    def __init__(self, earliest_seq: int) -> None:
        super().__init__(f"Events before seq {earliest_seq} are no longer retained; resume "
                         f"with a seq of at least {earliest_seq - 1}.")
        self.earliest_seq = earliest_seq

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        body["error"]["earliest_seq"] = self.earliest_seq
        return body


class StreamInterruptedError(UpstreamError):
    """The instance producing a stream stopped (died, or lost Redis) before the stream
    ended; readers get this error event, never ``[DONE]`` (502 ``stream_interrupted``)."""

    default_code = "stream_interrupted"


class StreamCancelledError(GatewayError):
    """The stream's generation was stopped: ``POST /v1/streams/{id}/cancel``, or nobody
    re-attached within ``streams.detach_timeout``. Readers get this error event (never
    ``[DONE]``: the answer is incomplete); before the first event it is a 409."""

    status = 409
    error_type = "invalid_request_error"
    default_code = "stream_cancelled"

    def __init__(self) -> None:
        super().__init__("The stream was cancelled before it ended (a cancel request, or "
                         "nobody re-attached within streams.detach_timeout).")


def check_cursor(after_seq: int, first_seq: int, last_seq: int) -> None:
    """The resume rules for a cursor over a log holding seqs ``first_seq..last_seq``
    (DESIGN §4): beyond the latest seq → 400; older than the oldest retained → 409.

    Raises:
        InvalidRequestError: ``after_seq > last_seq`` (400, code ``cursor_beyond_stream``).
        StreamTrimmedError: ``after_seq < first_seq - 1`` (409).
    """
    if after_seq > last_seq:
        raise InvalidRequestError(f"The stream has {last_seq} events; cannot resume after seq "
                                  f"{after_seq}.", code="cursor_beyond_stream")
    if after_seq < first_seq - 1:
        raise StreamTrimmedError(first_seq)


def nothing_left(after_seq: int, first_seq: int, last_seq: int, ended: bool) -> bool:
    """The resume rules of DESIGN §4 for a stream holding seqs ``first_seq..last_seq``:
    ``True`` when it ended and nothing follows ``after_seq`` (204).

    Raises:
        InvalidRequestError, StreamTrimmedError: as ``check_cursor`` (400, 409).
    """
    check_cursor(after_seq, first_seq, last_seq)
    return ended and after_seq == last_seq


#: Unsent bytes at which the producer pauses (it resumes below half of it), and sent bytes
#: kept for readers that start from an earlier seq. See ``StreamLog``.
DEFAULT_BUFFER_BYTES = 256 * 1024
DEFAULT_RETAIN_BYTES = 1024 * 1024


class ByteTally:
    """Bytes held by every log of one registry (``streams.max_total_bytes`` is checked
    against ``held_bytes``)."""

    __slots__ = ("held_bytes",)

    def __init__(self) -> None:
        self.held_bytes = 0


class StreamLog:
    """Frames of one streamed response, numbered 1..n, with cursor reads and backpressure.

    Args:
        stream_id: the public id (``gs_…``).
        owner: the virtual key's name; only that key may read the stream.
        buffer_bytes: unsent bytes (appended but not yet written by the slowest attached
            reader, or by the last reader before it detached) at which ``writable()`` makes
            the producer wait; it resumes below half of it.
        retain_bytes: bytes of already-written frames kept for readers that resume from an
            earlier seq (a client that lost what the kernel had buffered); older ones are
            dropped.
        tally: the registry's byte count, kept up to date by this log (``None``: none).

    Memory bound per stream: the log holds at most ``retain_bytes + buffer_bytes`` plus what
    the producer appends between two checks (one upstream read of at most 16 KiB,
    ``relay.READ_CHUNK_BYTES``); this holds with no reader attached too (a detached stream's
    producer pauses at ``buffer_bytes``), so a slow or absent reader slows the upstream read
    instead of growing memory.

    Attributes:
        first_seq: seq of ``frames[0]`` (frames before it were dropped).
        error: the failure of a stream that ended before its first frame, else ``None``;
            a reader answers it with an HTTP error status.
        headers: response headers every reader sends (the ``x-ratelimit-*`` of the request
            that started it), set by the pipeline.
        endpoint: the endpoint label (``chat.completions``).
        model: the model the request asked for (set by the pipeline; ``""`` until then).
        created_at: ``time.monotonic()`` when the log was created.
        response_id: the Responses API ``id`` of a ``/v1/responses`` stream once its first
            event named it, else ``None``.
        producer: the task that fills this log, owned by the ``StreamRegistry``; ``None``
            until the registry starts it (it stays set once done).
        finished_at: ``time.monotonic()`` when the log closed, else ``None``.
        failure: the error the stream ended with (before or after its first frame), else
            ``None`` (the usage ledger's status and error code).
    """

    __slots__ = ("stream_id", "owner", "frames", "first_seq", "bytes_total", "acked_seq",
                 "bytes_acked", "bytes_dropped", "state", "error", "headers", "endpoint",
                 "response_id", "producer", "finished_at", "buffer_bytes", "retain_bytes", "failure",
                 "model", "created_at",
                 "_cursors", "_followers", "_tally", "_changed", "_drained")

    def __init__(self, stream_id: str, owner: str, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 retain_bytes: int = DEFAULT_RETAIN_BYTES, tally: ByteTally | None = None) -> None:
        self.stream_id = stream_id
        self.owner = owner
        self.frames: list[bytes] = []
        self.first_seq = 1
        self.bytes_total = 0
        self.acked_seq = 0
        self.bytes_acked = 0
        self.bytes_dropped = 0
        self.state = StreamState.RUNNING
        self.error: GatewayError | None = None
        self.failure: GatewayError | None = None
        self.headers: dict[str, str] = {}
        self.endpoint = ""
        self.model = ""
        self.created_at = time.monotonic()
        self.response_id: str | None = None
        self.producer: asyncio.Task[None] | None = None
        self.finished_at: float | None = None
        self.buffer_bytes = buffer_bytes
        self.retain_bytes = retain_bytes
        self._cursors: dict[int, int] = {}  # id(reader) → seq it has written up to
        self._followers: set[int] = set()  # cursors that are not client readers (a mirror)
        self._tally = tally
        self._changed: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return (f"<StreamLog {self.stream_id} [{self.state.value}, {self.last_seq} events, "
                f"{self.bytes_total} bytes, {self.unsent_bytes} unsent | readers: {self.readers}]>")

    @property
    def last_seq(self) -> int:
        """The seq of the newest frame; 0 when there is none."""
        return self.first_seq - 1 + len(self.frames)

    @property
    def closed(self) -> bool:
        """True once no more frames will be appended."""
        return self.state is not StreamState.RUNNING

    @property
    def readers(self) -> int:
        """How many client readers are attached now (followers such as a Redis mirror are
        not counted: they hold back trimming and the producer, but not the detach timeout)."""
        return len(self._cursors) - len(self._followers)

    @property
    def unsent_bytes(self) -> int:
        """Bytes appended but not yet written by the slowest reader."""
        return self.bytes_total - self.bytes_acked

    @property
    def held_bytes(self) -> int:
        """Bytes of frames held in memory now."""
        return self.bytes_total - self.bytes_dropped

    def append(self, frame: bytes) -> int:
        """Add one encoded SSE frame (without its ``id:`` line) and wake readers; returns its seq.

        Raises:
            RuntimeError: the log is already closed.
        """
        if self.closed:
            raise RuntimeError(f"{self.stream_id} is closed")
        self.frames.append(frame)
        self.bytes_total += len(frame)
        if self._tally is not None:
            self._tally.held_bytes += len(frame)
        self._wake()
        return self.last_seq

    def finish(self, final_frame: bytes | None = None) -> None:
        """End the stream normally, optionally appending the terminal frame first."""
        if final_frame is not None:
            self.append(final_frame)
        self._close(StreamState.DONE)

    def fail(self, error: GatewayError, error_frame: bytes | None) -> None:
        """End the stream with ``error``.

        Before the first frame, ``error`` is kept in ``self.error`` for readers to answer
        with an HTTP status and ``error_frame`` is not logged; after it, ``error_frame`` (an
        SSE error event) becomes the last frame, so every reader sees why the stream ended.
        Does nothing if the log is already closed.
        """
        if self.closed:
            return
        self.failure = error
        if self.last_seq and error_frame is not None:
            self.append(error_frame)
        elif not self.last_seq:
            self.error = error
        self._close(StreamState.FAILED)

    def read(self, after_seq: int) -> list[bytes]:
        """Frames with seq > ``after_seq``, oldest first (empty when none yet).

        Raises:
            StreamTrimmedError: frame ``after_seq + 1`` was already dropped.
        """
        start = after_seq - (self.first_seq - 1)
        if start < 0:
            raise StreamTrimmedError(self.first_seq)
        return self.frames[start:] if start < len(self.frames) else []

    async def wait(self, after_seq: int) -> None:
        """Return once a frame with seq > ``after_seq`` exists or the log is closed.

        Cancelling is safe: nothing is consumed by waiting.
        """
        while after_seq >= self.last_seq and not self.closed:
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)

    def add_cursor(self, key: int, after_seq: int, *, follower: bool = False) -> None:
        """Attach a reader (``key``: its identity) that has everything up to ``after_seq``.
        A ``follower`` (a mirror copying the log elsewhere) applies backpressure like a
        reader but does not count in ``readers``."""
        self._cursors[key] = after_seq
        if follower:
            self._followers.add(key)

    def remove_cursor(self, key: int) -> None:
        """Detach a reader; frames it had not written stay unsent (and bounded). If it was
        the slowest, the next slowest now sets the pace."""
        self._cursors.pop(key, None)
        self._followers.discard(key)
        self._advance_acked()

    def ack(self, key: int, seq: int) -> None:
        """Reader ``key`` has written every frame up to ``seq``. When the slowest reader
        advanced: count its frames as sent, drop sent frames beyond ``retain_bytes``, and let
        a paused producer go on below half of ``buffer_bytes``."""
        seq = min(seq, self.last_seq)
        if key in self._cursors:
            self._cursors[key] = seq
            self._advance_acked()
        elif seq > self.acked_seq:
            self._set_acked(seq)

    def _advance_acked(self) -> None:
        if self._cursors:
            slowest = min(self._cursors.values())
            if slowest > self.acked_seq:
                self._set_acked(slowest)

    def _set_acked(self, seq: int) -> None:
        offset = self.first_seq - 1
        self.bytes_acked += sum(len(f) for f in self.frames[max(0, self.acked_seq - offset):seq - offset])
        self.acked_seq = seq
        self._trim()
        if self._drained is not None and self.unsent_bytes <= self.buffer_bytes // 2:
            self._release_producer()

    def _trim(self) -> None:
        retained_sent = self.bytes_acked - self.bytes_dropped
        drop = 0
        while retained_sent > self.retain_bytes and self.first_seq + drop <= self.acked_seq:
            retained_sent -= len(self.frames[drop])
            drop += 1
        if drop:
            dropped = sum(len(f) for f in self.frames[:drop])
            self.bytes_dropped += dropped
            if self._tally is not None:
                self._tally.held_bytes -= dropped
            del self.frames[:drop]
            self.first_seq += drop

    def release_bytes(self) -> None:
        """Forget every frame (the registry evicts the log); readers still attached see a
        trimmed log."""
        if self._tally is not None:
            self._tally.held_bytes -= self.held_bytes
        self.bytes_dropped = self.bytes_total
        self.first_seq += len(self.frames)
        self.frames = []

    @property
    def backlogged(self) -> bool:
        """Whether the producer should wait (``writable()``) before reading more upstream."""
        return self.unsent_bytes > self.buffer_bytes

    async def writable(self) -> None:
        """Wait while the slowest reader (or, detached, the last one) is more than
        ``buffer_bytes`` behind; returns at once when the log is closed. Cancelling is safe."""
        while self.backlogged and not self.closed:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)

    def _release_producer(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    def _close(self, state: StreamState) -> None:
        self.state = state
        self.finished_at = time.monotonic()
        self._wake()
        self._release_producer()


class StreamReader:
    """One reader's cursor over a local ``StreamLog``; what an SSE response, a resumer or a
    WebSocket writes from. Create with ``StreamRegistry.attach``; ``close()`` detaches.

    Attributes:
        stream_id: the log's id.
        after_seq: the seq of the last frame handed out.
    """

    __slots__ = ("log", "after_seq", "_registry", "_closed")

    def __init__(self, registry: StreamRegistry, log: StreamLog, after_seq: int) -> None:
        self.log = log
        self.after_seq = after_seq
        self._registry = registry
        self._closed = False
        log.add_cursor(id(self), after_seq)

    def __repr__(self) -> str:
        return f"<StreamReader {self.log.stream_id} after {self.after_seq}>"

    @property
    def stream_id(self) -> str:
        return self.log.stream_id

    async def next(self, timeout_s: float) -> list[bytes] | None:
        """The frames after the cursor, advancing it past them (the previous batch counts
        as written). Waits up to ``timeout_s`` for one: ``[]`` when none came (time for a
        keep-alive), ``None`` when the stream has ended and every frame was handed out.

        Raises:
            StreamTrimmedError: the log dropped frames this reader had not read (it was
                evicted while the reader lagged).
        Cancelling is safe: no frame is lost (the cursor moves only on return).
        """
        log = self.log
        log.ack(id(self), self.after_seq)
        if self.after_seq >= log.last_seq and not log.closed:
            try:
                async with asyncio.timeout(timeout_s):
                    await log.wait(self.after_seq)
            except TimeoutError:
                return []
        frames = log.read(self.after_seq)
        if not frames:
            return None if log.closed else []
        self.after_seq += len(frames)
        return frames

    def close(self, *, cancel_if_last: bool = False) -> None:
        """Detach (idempotent): the stream goes on for ``detach_timeout_s`` if nobody else
        reads it, or, with ``cancel_if_last``, stops at once."""
        if not self._closed:
            self._closed = True
            self._registry.detach(self)
            if cancel_if_last and not self.log.readers:
                self._registry.cancel(self.log)


class RemoteStreams(Protocol):
    """What the registry asks of a cross-instance store (``streams_redis``) before it
    cancels a stream nobody here reads."""

    async def has_remote_readers(self, stream_id: str) -> bool: ...


@dataclass(slots=True)
class UnaryAnswer:
    """A whole non-stream answer as the client gets it: what the pipeline returns, and what
    is kept for ``Idempotency-Key`` replays.

    Attributes:
        status: the HTTP status.
        headers: response headers (the upstream's, cleaned, plus ``x-ratelimit-*``).
        body: the body, byte for byte.
    """

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class IdempotencyEntry:
    """What one ``(key name, Idempotency-Key)`` started: the body's SHA-256 and either its
    stream ``log`` or the ``answer`` task of a non-stream request (owned by the registry,
    so the first client leaving does not cancel it; later requests await the same task)."""

    key: tuple[str, str]
    body_sha256: bytes
    log: StreamLog | None = None
    answer: asyncio.Task[UnaryAnswer] | None = None
    expires_at: float | None = None  # None: while the log is held or the answer is running
    size_bytes: int = 0


class StreamRegistry:
    """All stream logs of this process, by stream id, and the producer tasks that fill them.

    Policy: a running stream whose last reader detaches keeps generating for
    ``detach_timeout_s`` and is cancelled then unless a reader re-attached (here, or on
    another instance per ``remote``); ``cancel()`` stops it at once. A closed log is kept
    ``retention_s`` for resumers, and within ``max_total_bytes`` (over all logs, oldest
    finished evicted first; running streams are never evicted, and ``create`` refuses new
    ones with 503 while the cap is still exceeded).

    Args:
        id_factory: makes stream ids (default ``new_stream_id``).
        buffer_bytes, retain_bytes: passed to every ``StreamLog``.
        detach_timeout_s: seconds a stream with no reader keeps generating (default 30).
        retention_s: seconds a finished log stays readable (default 300).
        max_total_bytes: bytes held by all logs and stored answers (default 256 MiB).
        clock: monotonic seconds (injected for tests).
    """

    def __init__(self, id_factory: Callable[[], str] = new_stream_id,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 retain_bytes: int = DEFAULT_RETAIN_BYTES, *, detach_timeout_s: float = 30.0,
                 retention_s: float = 300.0, max_total_bytes: int = 256 * 2**20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logs: dict[str, StreamLog] = {}
        self._finished: dict[str, StreamLog] = {}  # closed logs, oldest first
        self._responses: dict[str, str] = {}  # Responses API id → stream id
        self._idempotent: dict[tuple[str, str], IdempotencyEntry] = {}
        self._detach_timers: dict[str, asyncio.TimerHandle] = {}
        self._id_factory = id_factory
        self.buffer_bytes = buffer_bytes
        self.retain_bytes = retain_bytes
        self.detach_timeout_s = detach_timeout_s
        self.retention_s = retention_s
        self.max_total_bytes = max_total_bytes
        self.tally = ByteTally()
        self.remote: RemoteStreams | None = None
        self.on_detach_cancel: Callable[[], None] = lambda: None
        self._clock = clock
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        running = sum(1 for log in self._logs.values() if not log.closed)
        detached = sum(1 for log in self._logs.values() if not log.closed and not log.readers)
        return (f"<StreamRegistry [{len(self._logs)} streams, {running} running, {detached} "
                f"detached, {self.tally.held_bytes} bytes]>")

    def __len__(self) -> int:
        return len(self._logs)

    @property
    def running(self) -> int:
        """Streams whose producer has not ended."""
        return len(self._logs) - len(self._finished)

    def logs(self) -> list[StreamLog]:
        """Every log held now (running and finished)."""
        return list(self._logs.values())

    def create(self, owner: str) -> StreamLog:
        """Register a new running log owned by the key named ``owner`` (no reader yet).

        Raises:
            OverloadedError: the logs already hold ``max_total_bytes`` even after evicting
                every finished one (503; retry later).
        """
        self._expire()
        if self.tally.held_bytes >= self.max_total_bytes:
            self._evict_finished(self.tally.held_bytes - self.max_total_bytes + 1)
            if self.tally.held_bytes >= self.max_total_bytes:
                raise OverloadedError("The gateway holds as many stream bytes as it may "
                                      "(streams.max_total_bytes); retry shortly.",
                                      code="stream_capacity", retry_after_s=1.0)
        log = StreamLog(self._id_factory(), owner, self.buffer_bytes, self.retain_bytes, self.tally)
        self._logs[log.stream_id] = log
        return log

    def start(self, log: StreamLog, producer: Coroutine[Any, Any, None]) -> None:
        """Run ``producer`` (which fills ``log`` and closes it) as a task owned here; a
        stream nobody attached to is treated as detached from the start."""
        log.producer = asyncio.get_running_loop().create_task(producer)
        log.producer.add_done_callback(lambda _task: self._producer_ended(log))
        if not log.readers:
            self._arm_detach(log)

    def _producer_ended(self, log: StreamLog) -> None:
        if not log.closed:  # cancelled before its first step: it never ran to close the log
            error = StreamCancelledError()
            log.fail(error, error_frame(error))
        timer = self._detach_timers.pop(log.stream_id, None)
        if timer is not None:
            timer.cancel()
        if log.stream_id in self._logs:
            log.finished_at = self._clock()  # retention runs on the registry's clock
            self._finished[log.stream_id] = log

    def abandon(self, log: StreamLog, error: GatewayError, *, keep: bool) -> None:
        """End ``log`` before it got a producer (its request was refused, e.g. by a rate
        limit): its readers get ``error``. With ``keep`` (it has an ``Idempotency-Key``) the
        log is kept ``retention_s`` like any finished one, so duplicates get the same
        answer; otherwise it is dropped at once."""
        log.fail(error, error_frame(error))
        if keep:
            self._producer_ended(log)
        else:
            self._evict(log)

    def get(self, stream_id: str, owner: str) -> StreamLog | None:
        """The log ``stream_id`` if it is held and belongs to ``owner``, else ``None``."""
        self._expire()
        log = self._logs.get(stream_id)
        return log if log is not None and log.owner == owner else None

    def by_response_id(self, response_id: str, owner: str) -> StreamLog | None:
        """The log of the ``/v1/responses`` stream whose response is ``response_id``."""
        stream_id = self._responses.get(response_id)
        return self.get(stream_id, owner) if stream_id is not None else None

    def name_response(self, log: StreamLog, response_id: str) -> None:
        """Record that ``log`` streams the Responses API response ``response_id``."""
        log.response_id = response_id
        self._responses[response_id] = log.stream_id

    def attach(self, log: StreamLog, after_seq: int) -> StreamReader:
        """A new reader of ``log`` from ``after_seq`` (0: from the start). Cancels a pending
        detach timeout.

        Raises:
            InvalidRequestError: ``after_seq`` beyond the latest seq (400).
            StreamTrimmedError: ``after_seq`` older than the log retains (409).
        """
        check_cursor(after_seq, log.first_seq, log.last_seq)
        timer = self._detach_timers.pop(log.stream_id, None)
        if timer is not None:
            timer.cancel()
        return StreamReader(self, log, after_seq)

    def detach(self, reader: StreamReader) -> None:
        """A reader left (its connection closed). With no reader left on a running stream,
        generation goes on for ``detach_timeout_s``, then stops unless someone re-attached."""
        log = reader.log
        log.remove_cursor(id(reader))
        if not log.readers and not log.closed:
            self._arm_detach(log)

    def cancel(self, log: StreamLog) -> None:
        """Stop generation now (idempotent; a finished stream is left as it is)."""
        if log.producer is not None and not log.producer.done():
            log.producer.cancel()

    def _arm_detach(self, log: StreamLog) -> None:
        old = self._detach_timers.pop(log.stream_id, None)
        if old is not None:
            old.cancel()
        self._detach_timers[log.stream_id] = asyncio.get_running_loop().call_later(
            self.detach_timeout_s, self._detach_expired, log)

    def _detach_expired(self, log: StreamLog) -> None:
        self._detach_timers.pop(log.stream_id, None)
        if log.readers or log.closed:
            return
        if self.remote is None:
            self._cancel_detached(log)
            return
        self._spawn(self._detach_expired_remote(log))

    async def _detach_expired_remote(self, log: StreamLog) -> None:
        assert self.remote is not None
        try:
            elsewhere = await self.remote.has_remote_readers(log.stream_id)
        except Exception:  # the store failed: nobody can be shown to read it
            elsewhere = False
        if log.stream_id in self._detach_timers or log.readers or log.closed:
            return  # a reader came (and maybe went, arming a new timer) meanwhile
        if elsewhere:
            self._arm_detach(log)  # a reader on another instance: look again later
        else:
            self._cancel_detached(log)

    def _cancel_detached(self, log: StreamLog) -> None:
        self.on_detach_cancel()
        self.cancel(log)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- retention ------------------------------------------------------------------------

    def _expire(self) -> None:
        """Drop finished logs (and stored answers) older than ``retention_s``: O(expired)."""
        horizon = self._clock() - self.retention_s
        while self._finished:
            log = next(iter(self._finished.values()))
            if log.finished_at is not None and log.finished_at > horizon:
                break
            self._evict(log)
        if self._idempotent:
            now = self._clock()
            for key in [k for k, e in self._idempotent.items() if _entry_expired(e, now, self._logs)]:
                self._forget_idempotent(key)

    def _evict_finished(self, need_bytes: int) -> None:
        """Evict finished logs, oldest first, until ``need_bytes`` are freed or none is left."""
        while self._finished and need_bytes > 0:
            log = next(iter(self._finished.values()))
            need_bytes -= log.held_bytes
            self._evict(log)

    def _evict(self, log: StreamLog) -> None:
        self._logs.pop(log.stream_id, None)
        self._finished.pop(log.stream_id, None)
        if log.response_id is not None:
            self._responses.pop(log.response_id, None)
        log.release_bytes()

    # --- Idempotency-Key ------------------------------------------------------------------

    def idempotent(self, owner: str, key: str, body: bytes) -> IdempotencyEntry | None:
        """What ``key`` of ``owner`` already started within retention, or ``None``.

        Raises:
            IdempotencyKeyReusedError: same key, different body (422; IETF
                draft-ietf-httpapi-idempotency-key-header).
        """
        self._expire()
        entry = self._idempotent.get((owner, key))
        if entry is None:
            return None
        if entry.body_sha256 != hashlib.sha256(body).digest():
            raise IdempotencyKeyReusedError()
        return entry

    def remember_stream(self, owner: str, key: str, body: bytes, log: StreamLog) -> None:
        """Record that ``key`` of ``owner`` started the stream ``log`` (kept while it is)."""
        self._idempotent[(owner, key)] = IdempotencyEntry((owner, key), hashlib.sha256(body).digest(),
                                                          log=log)

    def remember_answer(self, owner: str, key: str, body: bytes,
                        answer: Coroutine[Any, Any, UnaryAnswer]) -> asyncio.Task[UnaryAnswer]:
        """Run the non-stream request ``answer`` as a task owned here and record it under
        ``key``; its answer is kept ``retention_s`` (counted in ``max_total_bytes``). A
        request that fails or is cancelled is forgotten, so the key can be used again."""
        task = asyncio.get_running_loop().create_task(answer)
        entry = IdempotencyEntry((owner, key), hashlib.sha256(body).digest(), answer=task)
        self._idempotent[entry.key] = entry
        self._tasks.add(task)
        task.add_done_callback(lambda _task: self._answer_done(entry))
        return task

    def _answer_done(self, entry: IdempotencyEntry) -> None:
        task = entry.answer
        assert task is not None
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is not None or self._idempotent.get(entry.key) is not entry:
            self._forget_idempotent(entry.key, entry)
            return
        entry.size_bytes = len(task.result().body)
        entry.expires_at = self._clock() + self.retention_s
        self.tally.held_bytes += entry.size_bytes

    def _forget_idempotent(self, key: tuple[str, str], entry: IdempotencyEntry | None = None) -> None:
        if entry is not None and self._idempotent.get(key) is not entry:
            return
        gone = self._idempotent.pop(key, None)
        if gone is not None:
            self.tally.held_bytes -= gone.size_bytes
            gone.size_bytes = 0

    # --- shutdown -------------------------------------------------------------------------

    def fail_all(self, error: GatewayError) -> None:
        """End every running stream with ``error`` (its readers write the error event and
        finish) and cancel their producers (shutdown after the drain)."""
        for log in list(self._logs.values()):
            if not log.closed:
                log.fail(error, error_frame(error))
            self.cancel(log)

    def cancel_all(self) -> list[asyncio.Task[Any]]:
        """Cancel every running producer and timer (shutdown); returns the tasks to await."""
        for timer in self._detach_timers.values():
            timer.cancel()
        self._detach_timers.clear()
        tasks: list[asyncio.Task[Any]] = [log.producer for log in self._logs.values()
                                          if log.producer is not None and not log.producer.done()]
        tasks += list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks


def _entry_expired(entry: IdempotencyEntry, now: float, logs: dict[str, StreamLog]) -> bool:
    if entry.log is not None:
        return entry.log.stream_id not in logs
    return entry.expires_at is not None and entry.expires_at <= now


class IdempotencyKeyReusedError(InvalidRequestError):
    """An ``Idempotency-Key`` was reused with a different body (422)."""

    status = 422
    default_code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__("This Idempotency-Key was already used with a different request body.",
                         param="Idempotency-Key")

