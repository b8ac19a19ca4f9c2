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


class StreamState(enum.Enum):
    """Where a stream's generation stands."""

    RUNNING = "running"
    DONE = "done"  # ended normally; the last frame is the terminal one
    FAILED = "failed"  # ended by an error; the last frame (if any) is the error event


def new_stream_id() -> str:
    """A fresh, unguessable stream id: ``gs_`` + 24 hex characters (96 random bits)."""
    return "gs_" + secrets.token_hex(12)


class StreamLog:
    """Frames of one streamed response, numbered 1..n, with cursor reads.

    Args:
        stream_id: the public id (``gs_…``).
        owner: the virtual key's name; only that key may read the stream.

    Attributes:
        error: the failure of a stream that ended before its first frame, else ``None``;
            the request handler turns it into an HTTP error status.
        readers: how many client writers are attached.
        producer: the task that fills this log, or ``None`` once it ended.
    """

    __slots__ = ("stream_id", "owner", "frames", "bytes_total", "state", "error",
                 "readers", "producer", "_changed")

    def __init__(self, stream_id: str, owner: str) -> None:
        self.stream_id = stream_id
        self.owner = owner
        self.frames: list[bytes] = []
        self.bytes_total = 0
        self.state = StreamState.RUNNING
        self.error: BaseException | None = None
        self.readers = 0
        self.producer: asyncio.Task[None] | None = None
        self._changed: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return (f"<StreamLog {self.stream_id} [{self.state.value}, {len(self.frames)} events, "
                f"{self.bytes_total} bytes | readers: {self.readers}]>")

    @property
    def last_seq(self) -> int:
        """The seq of the newest frame; 0 when there is none."""
        return len(self.frames)

    @property
    def closed(self) -> bool:
        """True once no more frames will be appended."""
        return self.state is not StreamState.RUNNING

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
        return len(self.frames)

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
        if self.frames and error_frame is not None:
            self.append(error_frame)
        elif not self.frames:
            self.error = error
        self._close(StreamState.FAILED)

    def read(self, after_seq: int) -> list[bytes]:
        """Frames with seq > ``after_seq``, oldest first (empty when none yet)."""
        return self.frames[after_seq:] if after_seq < len(self.frames) else []

    async def wait(self, after_seq: int) -> None:
        """Return once a frame with seq > ``after_seq`` exists or the log is closed.

        Cancelling is safe: nothing is consumed by waiting.
        """
        while after_seq >= len(self.frames) and not self.closed:
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)

    def _wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    def _close(self, state: StreamState) -> None:
        self.state = state
        self._wake()


class StreamRegistry:
    """All live stream logs of this process, by stream id.

    Policy today: when the last reader detaches from a running stream, its producer is
    cancelled at once (the upstream request stops); a finished stream is dropped when its
    last reader leaves. Reconnection replaces this with a detach timeout and retention.

    Args:
        id_factory: makes stream ids (default ``new_stream_id``).
    """

    def __init__(self, id_factory: Callable[[], str] = new_stream_id) -> None:
        self._logs: dict[str, StreamLog] = {}
        self._id_factory = id_factory

    def __repr__(self) -> str:
        running = sum(1 for log in self._logs.values() if not log.closed)
        return f"<StreamRegistry [{len(self._logs)} streams, {running} running]>"

    def __len__(self) -> int:
        return len(self._logs)

    def create(self, owner: str) -> StreamLog:
        """Register a new running log owned by the key named ``owner``, with one reader attached."""
        log = StreamLog(self._id_factory(), owner)
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
        if log.producer is not None and not log.producer.done():
            log.producer.cancel()
        self._logs.pop(log.stream_id, None)

    def cancel_all(self) -> list[asyncio.Task[None]]:
        """Cancel every running producer (shutdown); returns the tasks to await."""
        tasks = [log.producer for log in self._logs.values()
                 if log.producer is not None and not log.producer.done()]
        for task in tasks:
            task.cancel()
        return tasks
