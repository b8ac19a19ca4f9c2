"""The stream log: the one indirection between an upstream reader and its client writers.

One producer (the task reading the upstream) appends encoded SSE frames; each frame gets the
next sequence number, counting from 1. Readers (an SSE response today; a WebSocket or a
resuming request later) pull by cursor: "give me everything after seq n", and wait when
there is nothing new. Because readers never share a queue, a reader can leave and another
can start from any retained seq, which is what reconnection and multiplexing build on.

Only ``asyncio`` primitives are used here; no aiohttp object crosses this layer.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
from collections.abc import Callable

import orjson

from proxy.errors import GatewayError
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


class StreamGapError(LookupError):
    """The requested frames were dropped from the log (older than it retains);
    ``earliest_seq`` is the oldest seq still held."""

    def __init__(self, earliest_seq: int) -> None:
        super().__init__(f"frames before seq {earliest_seq} are no longer retained")
        self.earliest_seq = earliest_seq


#: Unsent bytes at which the producer pauses (it resumes below half of it), and sent bytes
#: kept for readers that start from an earlier seq. See ``StreamLog``.
DEFAULT_BUFFER_BYTES = 256 * 1024
DEFAULT_RETAIN_BYTES = 1024 * 1024


class StreamLog:
    """Frames of one streamed response, numbered 1..n, with cursor reads and backpressure.

    Args:
        stream_id: the public id (``gs_…``).
        owner: the virtual key's name; only that key may read the stream.
        buffer_bytes: unsent bytes (appended but not yet acknowledged by the slowest
            attached reader) at which ``writable()`` makes the producer wait; it resumes
            below half of it.
        retain_bytes: bytes of already-sent frames kept for readers that start over from an
            earlier seq; older sent frames are dropped.

    Memory bound per stream: the log holds at most ``retain_bytes + buffer_bytes`` plus what
    the producer appends between two checks (one upstream read of at most 16 KiB,
    ``relay.READ_CHUNK_BYTES``); aiohttp's read buffer in front of it pauses the socket at
    128 KiB (plus one socket read). So a slow reader slows the upstream read instead of
    growing memory.

    Attributes:
        first_seq: seq of ``frames[0]`` (frames before it were dropped).
        error: the failure of a stream that ended before its first frame, else ``None``;
            the request handler turns it into an HTTP error status.
        readers: how many client writers are attached.
        producer: the task that fills this log, or ``None`` once it ended.
    """

    __slots__ = ("stream_id", "owner", "frames", "first_seq", "bytes_total", "acked_seq",
                 "bytes_acked", "bytes_dropped", "state", "error", "readers", "producer",
                 "buffer_bytes", "retain_bytes", "_changed", "_drained")

    def __init__(self, stream_id: str, owner: str, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 retain_bytes: int = DEFAULT_RETAIN_BYTES) -> None:
        self.stream_id = stream_id
        self.owner = owner
        self.frames: list[bytes] = []
        self.first_seq = 1
        self.bytes_total = 0
        self.acked_seq = 0
        self.bytes_acked = 0
        self.bytes_dropped = 0
        self.state = StreamState.RUNNING
        self.error: BaseException | None = None
        self.readers = 0
        self.producer: asyncio.Task[None] | None = None
        self.buffer_bytes = buffer_bytes
        self.retain_bytes = retain_bytes
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
    def unsent_bytes(self) -> int:
        """Bytes appended but not yet acknowledged by the reader."""
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
        self._wake()
        return self.last_seq

    def finish(self, final_frame: bytes | None = None) -> None:
        """End the stream normally, optionally appending the terminal frame first."""
        if final_frame is not None:
            self.append(final_frame)
        self._close(StreamState.DONE)

    def fail(self, error: BaseException, error_frame: bytes | None) -> None:
        """End the stream with ``error``.

        Before the first frame, ``error`` is kept in ``self.error`` for the handler to answer
        with an HTTP status and ``error_frame`` is not logged; after it, ``error_frame`` (an
        SSE error event) becomes the last frame, so every reader sees why the stream ended.
        Does nothing if the log is already closed.
        """
        if self.closed:
            return
        if self.last_seq and error_frame is not None:
            self.append(error_frame)
        elif not self.last_seq:
            self.error = error
        self._close(StreamState.FAILED)

    def read(self, after_seq: int) -> list[bytes]:
        """Frames with seq > ``after_seq``, oldest first (empty when none yet).

        Raises:
            StreamGapError: frame ``after_seq + 1`` was already dropped.
        """
        start = after_seq - (self.first_seq - 1)
        if start < 0:
            raise StreamGapError(self.first_seq)
        return self.frames[start:] if start < len(self.frames) else []

    async def wait(self, after_seq: int) -> None:
        """Return once a frame with seq > ``after_seq`` exists or the log is closed.

        Cancelling is safe: nothing is consumed by waiting.
        """
        while after_seq >= self.last_seq and not self.closed:
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)

    def ack(self, seq: int) -> None:
        """The reader has written every frame up to ``seq``: count them as sent, drop sent
        frames beyond ``retain_bytes``, and let a paused producer go on below half of
        ``buffer_bytes``."""
        seq = min(seq, self.last_seq)
        if seq <= self.acked_seq:
            return
        start = self.acked_seq - (self.first_seq - 1)
        self.bytes_acked += sum(len(f) for f in self.frames[max(0, start):seq - (self.first_seq - 1)])
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
            self.bytes_dropped += sum(len(f) for f in self.frames[:drop])
            del self.frames[:drop]
            self.first_seq += drop

    @property
    def backlogged(self) -> bool:
        """Whether the producer should wait (``writable()``) before reading more upstream."""
        return self.unsent_bytes > self.buffer_bytes and self.readers > 0

    async def writable(self) -> None:
        """Wait while the reader is more than ``buffer_bytes`` behind (returns at once when
        no reader is attached or the log is closed). Cancelling is safe."""
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
        self._wake()
        self._release_producer()


class StreamRegistry:
    """All live stream logs of this process, by stream id.

    Policy today: when the last reader detaches from a running stream, its producer is
    cancelled at once (the upstream request stops); a finished stream is dropped when its
    last reader leaves. Reconnection replaces this with a detach timeout and retention.

    Args:
        id_factory: makes stream ids (default ``new_stream_id``).
        buffer_bytes, retain_bytes: passed to every ``StreamLog``.
    """

    def __init__(self, id_factory: Callable[[], str] = new_stream_id,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 retain_bytes: int = DEFAULT_RETAIN_BYTES) -> None:
        self._logs: dict[str, StreamLog] = {}
        self._id_factory = id_factory
        self.buffer_bytes = buffer_bytes
        self.retain_bytes = retain_bytes

    def __repr__(self) -> str:
        running = sum(1 for log in self._logs.values() if not log.closed)
        return f"<StreamRegistry [{len(self._logs)} streams, {running} running]>"

    def __len__(self) -> int:
        return len(self._logs)

    def create(self, owner: str) -> StreamLog:
        """Register a new running log owned by the key named ``owner``, with one reader attached."""
        log = StreamLog(self._id_factory(), owner, self.buffer_bytes, self.retain_bytes)
        log.readers = 1
        self._logs[log.stream_id] = log
        return log

    def get(self, stream_id: str, owner: str) -> StreamLog | None:
        """The log ``stream_id`` if it exists and belongs to ``owner``, else ``None``."""
        log = self._logs.get(stream_id)
        return log if log is not None and log.owner == owner else None

    def detach(self, log: StreamLog) -> None:
        """A reader left. With no reader left, cancel a running producer and drop the log."""
        log.readers = max(0, log.readers - 1)
        if log.readers:
            return
        log._release_producer()
        if log.producer is not None and not log.producer.done():
            log.producer.cancel()
        self._logs.pop(log.stream_id, None)

    def fail_all(self, error: GatewayError) -> None:
        """End every running stream with ``error`` (its readers write the error event and
        finish) and cancel their producers (shutdown after the drain)."""
        for log in list(self._logs.values()):
            if not log.closed:
                log.fail(error, error_frame(error))
            if log.producer is not None and not log.producer.done():
                log.producer.cancel()

    def cancel_all(self) -> list[asyncio.Task[None]]:
        """Cancel every running producer (shutdown); returns the tasks to await."""
        tasks = [log.producer for log in self._logs.values()
                 if log.producer is not None and not log.producer.done()]
        for task in tasks:
            task.cancel()
        return tasks
