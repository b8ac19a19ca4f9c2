"""proxy/streams.py: the stream log (seqs, cursors, backpressure, trimming), its readers, the
registry (producer tasks, detach timeout, retention, byte cap, Idempotency-Key) and the
resume rules, on real asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequestError, OverloadedError, UpstreamError
from proxy.streams import (
    IdempotencyKeyReusedError,
    StreamCancelledError,
    StreamLog,
    StreamNotFoundError,
    StreamReader,
    StreamRegistry,
    StreamState,
    StreamTrimmedError,
    UnaryAnswer,
    check_cursor,
    error_frame,
    new_stream_id,
    parse_last_event_id,
    parse_seq,
    valid_stream_id,
)
from tests.test_balancer import FakeClock

TIMEOUT_S = 2.0
DETACH_S = 0.05  # a detach timeout short enough to wait for with real asyncio
READER, OTHER, MIRROR = 1, 2, 3  # cursor keys for tests that drive a bare StreamLog
ERROR_FRAME = b'data: {"error": {}}\n\n'
SHA_ID = "gs_" + "0123456789abcdef01234567"


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


def waiter(log: StreamLog, after_seq: int) -> asyncio.Task[None]:
    return asyncio.create_task(log.wait(after_seq))


@contextlib.asynccontextmanager
async def background(coro: Coroutine[Any, Any, Any]) -> AsyncIterator[asyncio.Task[Any]]:
    """Run ``coro`` as a task for the block; cancelled and awaited on the way out."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def frame(n: int, size: int = 10) -> bytes:
    """Frame ``n``, of exactly ``size`` bytes (``size`` >= 4, ``n`` < 10 ** (size - 2))."""
    return f"{n:<{size - 2}}\n\n".encode()


def frames(first: int, last: int, size: int = 10) -> list[bytes]:
    """Frames ``first..last`` as ``produce`` appends them."""
    return [frame(n, size) for n in range(first, last + 1)]


def filled(count: int, size: int = 10, **kwargs: int) -> StreamLog:
    """A log holding frames 1..count (``frame(0)`` first)."""
    log = StreamLog("gs_test", "alice", **kwargs)
    for n in range(count):
        log.append(frame(n, size))
    return log


async def forever() -> None:
    await asyncio.Event().wait()


async def produce(log: StreamLog, count: int, size: int = 10) -> None:
    """A well-behaved producer: frames 1..count, each after ``writable()``; then finish."""
    for n in range(1, count + 1):
        await log.writable()
        log.append(frame(n, size))
        assert log.unsent_bytes <= log.buffer_bytes + size
    log.finish()


async def drain(reader: StreamReader, wait_s: float = TIMEOUT_S) -> list[bytes]:
    """Every frame ``reader`` hands out until the stream's end."""
    got: list[bytes] = []
    while (batch := await reader.next(wait_s)) is not None:
        got += batch
    return got


async def ended(task: asyncio.Task[Any] | None, within_s: float = TIMEOUT_S) -> None:
    """Wait for ``task`` to end, however it ends."""
    assert task is not None
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), within_s)


class SkewedClock(FakeClock):
    """``time.monotonic()`` plus an offset a test moves forward."""

    def __init__(self) -> None:
        super().__init__(0.0)

    def __call__(self) -> float:
        return time.monotonic() + self.now


class FakeRemote:
    """A ``RemoteStreams`` whose answers are scripted: ``answers`` in turn, then ``False``.
    An exception among them is raised; ``gate`` (when set) holds the first answer back."""

    def __init__(self, *answers: bool | Exception, gate: asyncio.Event | None = None) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []
        self.gate = gate
        self.waiting = asyncio.Event()

    async def has_remote_readers(self, stream_id: str) -> bool:
        self.asked.append(stream_id)
        if self.gate is not None and len(self.asked) == 1:
            self.waiting.set()
            await self.gate.wait()
        answer = self.answers.pop(0) if self.answers else False
        if isinstance(answer, Exception):
            raise answer
        return answer


RegistryFactory = Callable[..., StreamRegistry]


@pytest.fixture
async def make_registry() -> AsyncIterator[RegistryFactory]:
    """``make_registry(**kwargs)``: a ``StreamRegistry`` with ids ``gs_1, gs_2, …`` whose
    producers, timers and tasks are cancelled after the test."""
    made: list[StreamRegistry] = []

    def make(**kwargs: Any) -> StreamRegistry:
        counter = itertools.count(1)
        registry = StreamRegistry(lambda: f"gs_{next(counter)}", **kwargs)
        made.append(registry)
        return registry

    yield make
    for registry in made:
        await asyncio.gather(*registry.cancel_all(), return_exceptions=True)


def count_cancels(registry: StreamRegistry) -> list[str]:
    cancels: list[str] = []
    registry.on_detach_cancel = lambda: cancels.append("cancel")
    return cancels


def held_everywhere(registry: StreamRegistry) -> int:
    return sum(log.held_bytes for log in registry.logs())


# --- StreamLog: seqs, reads, waits ----------------------------------------------------------


def test_seqs_count_from_one() -> None:
    log = StreamLog("gs_test", "alice")
    assert log.last_seq == 0
    assert [log.append(f"data: {n}\n\n".encode()) for n in range(3)] == [1, 2, 3]
    assert log.last_seq == 3
    assert log.bytes_total == 3 * len(b"data: 0\n\n")


def test_read_by_cursor() -> None:
    log = StreamLog("gs_test", "alice")
    chunks = [b"one", b"two", b"three"]
    for chunk in chunks:
        log.append(chunk)
    assert log.read(0) == chunks
    assert log.read(1) == [b"two", b"three"]
    assert log.read(3) == []
    assert log.read(99) == []
    log.append(b"four")
    assert log.read(3) == [b"four"]


def test_new_stream_ids_are_unique_and_well_formed() -> None:
    ids = {new_stream_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"gs_[0-9a-f]{24}", i) for i in ids)
    assert all(valid_stream_id(i) for i in ids)


async def test_wait_returns_at_once_when_frames_exist() -> None:
    log = StreamLog("gs_test", "alice")
    log.append(b"x")
    await asyncio.wait_for(log.wait(0), TIMEOUT_S)


async def test_wait_wakes_on_append() -> None:
    log = StreamLog("gs_test", "alice")
    log.append(b"first")
    task = waiter(log, 1)
    await settle()
    assert not task.done()
    log.append(b"second")
    await asyncio.wait_for(task, TIMEOUT_S)
    assert log.read(1) == [b"second"]


async def test_wait_wakes_every_waiter() -> None:
    log = StreamLog("gs_test", "alice")
    tasks = [waiter(log, 0) for _ in range(3)]
    await settle()
    assert not any(t.done() for t in tasks)
    log.append(b"x")
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)


@pytest.mark.parametrize("close", ["finish", "fail"])
async def test_wait_wakes_on_close(close: str) -> None:
    log = StreamLog("gs_test", "alice")
    task = waiter(log, 0)
    await settle()
    assert not task.done()
    if close == "finish":
        log.finish()
    else:
        log.fail(UpstreamError("boom"), ERROR_FRAME)
    await asyncio.wait_for(task, TIMEOUT_S)
    assert log.closed
    assert log.read(0) == []


async def test_wait_on_closed_log_returns_at_once() -> None:
    log = StreamLog("gs_test", "alice")
    log.append(b"x")
    log.finish()
    await asyncio.wait_for(log.wait(1), TIMEOUT_S)


async def test_cancelling_a_waiter_is_safe() -> None:
    log = StreamLog("gs_test", "alice")
    cancelled, survivor = waiter(log, 0), waiter(log, 0)
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not survivor.done()

    assert log.append(b"x") == 1
    await asyncio.wait_for(survivor, TIMEOUT_S)
    assert log.read(0) == [b"x"]

    # A new reader after the cancellation still waits and wakes normally.
    late = waiter(log, 1)
    await settle()
    assert not late.done()
    log.append(b"y")
    await asyncio.wait_for(late, TIMEOUT_S)
    assert log.read(0) == [b"x", b"y"]


async def test_reader_loop_sees_every_frame_once() -> None:
    log = StreamLog("gs_test", "alice")
    seen: list[bytes] = []

    async def reader() -> None:
        cursor = 0
        while True:
            await log.wait(cursor)
            got = log.read(cursor)
            if not got and log.closed:
                return
            seen.extend(got)
            cursor += len(got)

    task = asyncio.create_task(reader())
    for n in range(20):
        log.append(str(n).encode())
        if n % 3 == 0:
            await asyncio.sleep(0)
    log.finish(b"[DONE]")
    await asyncio.wait_for(task, TIMEOUT_S)
    assert seen == [str(n).encode() for n in range(20)] + [b"[DONE]"]


def test_finish_appends_the_terminal_frame() -> None:
    log = StreamLog("gs_test", "alice")
    log.append(b"a")
    log.finish(b"data: [DONE]\n\n")
    assert log.state is StreamState.DONE
    assert log.read(0) == [b"a", b"data: [DONE]\n\n"]
    assert log.error is None
    assert log.finished_at is not None


def test_fail_before_first_frame_sets_error_and_appends_nothing() -> None:
    log = StreamLog("gs_test", "alice")
    error = UpstreamError("upstream refused")
    log.fail(error, ERROR_FRAME)
    assert log.error is error
    assert log.frames == []
    assert log.last_seq == 0
    assert log.state is StreamState.FAILED
    assert log.closed


def test_fail_after_frames_appends_the_error_frame() -> None:
    log = StreamLog("gs_test", "alice")
    log.append(b"data: 1\n\n")
    log.fail(UpstreamError("reset"), ERROR_FRAME)
    assert log.read(0) == [b"data: 1\n\n", ERROR_FRAME]
    assert log.last_seq == 2
    assert log.error is None
    assert log.state is StreamState.FAILED


def test_closed_log_refuses_frames_and_ignores_a_second_close() -> None:
    log = StreamLog("gs_test", "alice")
    log.append(b"a")
    log.finish()
    with pytest.raises(RuntimeError, match="gs_test"):
        log.append(b"late")
    log.fail(UpstreamError("late"), b"err")
    assert log.state is StreamState.DONE
    assert log.read(0) == [b"a"]


def test_error_frame_is_an_sse_error_event() -> None:
    error = OverloadedError("The gateway is shutting down.", code="shutting_down")
    encoded = error_frame(error)
    assert encoded.startswith(b"data: ")
    assert encoded.endswith(b"\n\n")
    assert orjson.loads(encoded.removeprefix(b"data: ")) == error.to_body()
    assert b"[DONE]" not in encoded


def test_log_repr_shows_state() -> None:
    log = StreamLog("gs_abc", "alice")
    log.add_cursor(READER, 0)
    log.add_cursor(OTHER, 0)
    log.append(b"12345")
    assert repr(log) == "<StreamLog gs_abc [running, 1 events, 5 bytes, 5 unsent | readers: 2]>"
    log.ack(READER, 1)
    log.ack(OTHER, 1)
    log.fail(UpstreamError("x"), b"err")
    assert repr(log) == "<StreamLog gs_abc [failed, 2 events, 8 bytes, 3 unsent | readers: 2]>"


# --- StreamLog: ack, backpressure, trimming -------------------------------------------------


def test_ack_counts_sent_bytes() -> None:
    log = filled(3)
    log.add_cursor(READER, 0)
    assert (log.unsent_bytes, log.bytes_acked, log.acked_seq) == (30, 0, 0)
    log.ack(READER, 2)
    assert (log.unsent_bytes, log.bytes_acked, log.acked_seq) == (10, 20, 2)
    log.ack(READER, 1)  # an older ack changes nothing
    log.ack(READER, 2)
    assert (log.bytes_acked, log.acked_seq) == (20, 2)
    log.ack(READER, 99)  # clamped to the newest frame
    assert (log.unsent_bytes, log.bytes_acked, log.acked_seq) == (0, 30, 3)
    log.append(frame(3, 7))
    assert log.unsent_bytes == 7


def test_the_slowest_cursor_sets_what_is_sent() -> None:
    log = filled(4)
    log.add_cursor(READER, 0)
    log.add_cursor(OTHER, 0)
    log.ack(READER, 4)
    assert (log.acked_seq, log.unsent_bytes) == (0, 40)
    log.ack(OTHER, 1)
    assert (log.acked_seq, log.unsent_bytes) == (1, 30)
    log.ack(OTHER, 4)
    assert (log.acked_seq, log.unsent_bytes) == (4, 0)


def test_backlogged_past_buffer_with_or_without_a_reader() -> None:
    log = filled(10, buffer_bytes=100)
    assert log.readers == 0
    assert log.unsent_bytes == 100
    assert not log.backlogged  # at the limit is not past it
    log.append(b"x")
    assert log.backlogged  # nobody attached: the producer pauses all the same (bounded memory)
    log.add_cursor(READER, 0)
    assert log.backlogged
    log.ack(READER, 1)
    assert not log.backlogged


async def test_writable_returns_at_once_when_not_backlogged() -> None:
    log = filled(3, buffer_bytes=100)
    log.add_cursor(READER, 0)
    await asyncio.wait_for(log.writable(), TIMEOUT_S)


async def test_writable_waits_with_no_reader_attached() -> None:
    unread = filled(11, buffer_bytes=100)
    assert unread.readers == 0
    paused = asyncio.create_task(unread.writable())
    await settle()
    assert not paused.done()
    unread.add_cursor(READER, 0)  # a reader arrives and writes everything
    unread.ack(READER, 11)
    await asyncio.wait_for(paused, TIMEOUT_S)


async def test_writable_waits_until_the_slowest_reader_acks_below_half() -> None:
    log = filled(12, buffer_bytes=100)  # 120 unsent
    log.add_cursor(READER, 0)
    log.add_cursor(OTHER, 12)  # a fast reader does not release the producer
    assert log.backlogged
    producer = asyncio.create_task(log.writable())
    await settle()
    assert not producer.done()
    log.ack(OTHER, 12)
    log.ack(READER, 3)  # 90 unsent: no longer past the buffer, but not below half of it
    await settle()
    assert not producer.done()
    log.ack(READER, 7)  # 50 unsent: half
    await asyncio.wait_for(producer, TIMEOUT_S)
    assert log.unsent_bytes <= 50


@pytest.mark.parametrize("close", ["finish", "fail"])
async def test_writable_returns_when_the_log_closes(close: str) -> None:
    log = filled(12, buffer_bytes=100)
    log.add_cursor(READER, 0)
    producer = asyncio.create_task(log.writable())
    await settle()
    assert not producer.done()
    if close == "finish":
        log.finish()
    else:
        log.fail(UpstreamError("gone"), b"data: {}\n\n")
    await asyncio.wait_for(producer, TIMEOUT_S)


async def test_cancelling_writable_is_safe() -> None:
    log = filled(12, buffer_bytes=100)
    log.add_cursor(READER, 0)
    cancelled, survivor = asyncio.create_task(log.writable()), asyncio.create_task(log.writable())
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not survivor.done()
    log.ack(READER, 12)
    await asyncio.wait_for(survivor, TIMEOUT_S)


def test_sent_frames_beyond_retain_are_dropped() -> None:
    log = filled(5, retain_bytes=25)
    log.add_cursor(READER, 0)
    log.ack(READER, 5)  # 50 sent bytes, 25 may stay: frames 1..3 go
    assert log.first_seq == 4
    assert log.last_seq == 5
    assert len(log.frames) == 2
    assert log.held_bytes == 20
    assert log.bytes_dropped == 30
    assert log.read(3) == [frame(3), frame(4)]
    with pytest.raises(StreamTrimmedError) as info:
        log.read(2)
    assert info.value.earliest_seq == 4
    assert "4" in str(info.value)
    assert info.value.status == 409
    assert info.value.to_body()["error"]["earliest_seq"] == 4
    with pytest.raises(StreamTrimmedError):
        log.read(0)


def test_unsent_frames_are_never_dropped() -> None:
    log = filled(6, retain_bytes=1)
    log.add_cursor(READER, 0)
    log.ack(READER, 2)
    assert log.first_seq == 3  # every sent frame is over the retain budget
    assert log.read(2) == [frame(n) for n in range(2, 6)]
    assert log.held_bytes == log.unsent_bytes == 40
    log.append(b"late")
    assert log.last_seq == 7
    assert log.read(6) == [b"late"]


def test_trimming_never_passes_the_slowest_cursor() -> None:
    log = filled(6, retain_bytes=0)
    log.add_cursor(READER, 0)
    log.add_cursor(OTHER, 0)
    log.ack(READER, 6)  # the fast reader wrote everything, the slow one nothing
    assert (log.first_seq, log.held_bytes) == (1, 60)
    log.ack(OTHER, 2)
    assert (log.first_seq, log.held_bytes) == (3, 40)
    assert log.read(2) == [frame(n) for n in range(2, 6)]
    log.ack(OTHER, 6)
    assert (log.first_seq, log.held_bytes) == (7, 0)


def test_a_follower_holds_back_trimming_and_the_producer_but_is_no_reader() -> None:
    log = filled(3, buffer_bytes=20, retain_bytes=0)
    log.add_cursor(READER, 0)
    log.add_cursor(MIRROR, 0, follower=True)
    assert log.readers == 1
    log.ack(READER, 3)
    assert (log.first_seq, log.unsent_bytes, log.backlogged) == (1, 30, True)
    log.ack(MIRROR, 3)
    assert (log.first_seq, log.unsent_bytes, log.backlogged) == (4, 0, False)
    log.remove_cursor(MIRROR)
    assert log.readers == 1
    log.remove_cursor(READER)
    assert log.readers == 0


def test_repr_counts_unsent_after_trim() -> None:
    log = filled(4, retain_bytes=10)
    log.add_cursor(READER, 0)
    log.ack(READER, 3)
    assert repr(log) == "<StreamLog gs_test [running, 4 events, 40 bytes, 10 unsent | readers: 1]>"


def test_held_bytes_stay_within_retain_plus_unsent() -> None:
    rng = random.Random(2024)
    log = StreamLog("gs_test", "alice", buffer_bytes=500, retain_bytes=300)
    log.add_cursor(READER, 0)
    appended: list[bytes] = []
    for _ in range(2000):
        if rng.random() < 0.6:
            data = bytes([97 + len(appended) % 26]) * rng.randint(1, 80)
            appended.append(data)
            assert log.append(data) == len(appended)
        else:
            log.ack(READER, rng.randint(log.acked_seq, log.last_seq))
        assert log.held_bytes <= log.retain_bytes + log.unsent_bytes
        assert log.held_bytes == sum(len(f) for f in log.frames)
        assert log.first_seq - 1 <= log.acked_seq <= log.last_seq
        assert log.unsent_bytes == sum(len(f) for f in appended[log.acked_seq:])
        # Whatever is held is exactly the tail of what was appended.
        assert log.read(log.first_seq - 1) == appended[log.first_seq - 1:]
    assert log.first_seq > 1


# --- StreamReader ----------------------------------------------------------------------------


async def test_next_hands_out_frames_in_order_then_none_at_the_end() -> None:
    registry = StreamRegistry()
    log = registry.create("alice")
    reader = registry.attach(log, 0)
    assert await reader.next(0.01) == []  # nothing yet: time for a keep-alive
    log.append(b"a")
    log.append(b"b")
    assert await reader.next(TIMEOUT_S) == [b"a", b"b"]
    assert reader.after_seq == 2
    log.append(b"c")
    log.finish(b"[DONE]")
    assert await reader.next(TIMEOUT_S) == [b"c", b"[DONE]"]
    assert await reader.next(TIMEOUT_S) is None
    assert await reader.next(TIMEOUT_S) is None
    assert log.acked_seq == 4  # the last batch counts as written once None is returned
    reader.close()


async def test_next_wakes_when_a_frame_arrives() -> None:
    registry = StreamRegistry()
    log = registry.create("alice")
    reader = registry.attach(log, 0)
    task = asyncio.create_task(reader.next(TIMEOUT_S))
    await settle()
    assert not task.done()
    log.append(b"a")
    assert await asyncio.wait_for(task, TIMEOUT_S) == [b"a"]
    log.finish()
    reader.close()


async def test_next_of_a_stream_failed_before_its_first_frame_is_none() -> None:
    registry = StreamRegistry()
    log = registry.create("alice")
    reader = registry.attach(log, 0)
    error = UpstreamError("refused")
    log.fail(error, error_frame(error))
    assert await reader.next(TIMEOUT_S) is None
    assert log.error is error  # what the reader answers with instead
    reader.close()


async def test_cancelling_next_loses_nothing(make_registry: RegistryFactory) -> None:
    registry = make_registry()
    log = registry.create("alice")
    reader = registry.attach(log, 0)

    waiting = asyncio.create_task(reader.next(TIMEOUT_S))
    await settle()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    woken = asyncio.create_task(reader.next(TIMEOUT_S))
    await settle()
    log.append(b"a")  # wakes it, but it is cancelled before it runs again
    woken.cancel()
    with pytest.raises(asyncio.CancelledError):
        await woken
    assert reader.after_seq == 0

    log.append(b"b")
    assert await reader.next(TIMEOUT_S) == [b"a", b"b"]
    assert await reader.next(0.01) == []
    assert reader.after_seq == 2


async def test_readers_have_their_own_cursors(make_registry: RegistryFactory) -> None:
    registry = make_registry()
    log = registry.create("alice")
    first = registry.attach(log, 0)
    for n in range(1, 4):
        log.append(frame(n))
    second = registry.attach(log, 2)  # a resumer that has frames 1..2 already
    assert log.readers == 2
    assert await second.next(TIMEOUT_S) == [frame(3)]
    assert await first.next(TIMEOUT_S) == frames(1, 3)
    log.append(frame(4))
    log.finish()
    assert await drain(first) == [frame(4)]
    assert await drain(second) == [frame(4)]


async def test_the_slowest_reader_holds_back_the_producer_and_trimming(
        make_registry: RegistryFactory) -> None:
    registry = make_registry(buffer_bytes=50, retain_bytes=0)
    log = registry.create("alice")
    fast, slow = registry.attach(log, 0), registry.attach(log, 0)
    registry.start(log, produce(log, 20))
    async with background(drain(fast)) as fast_task:
        await settle()
        # The producer paused once 60 bytes were unsent: the fast reader has them, the slow none.
        assert (log.last_seq, log.backlogged, fast.after_seq, slow.after_seq) == (6, True, 6, 0)
        await asyncio.sleep(0.01)
        assert (log.last_seq, log.first_seq) == (6, 1)  # retain_bytes=0, yet nothing is dropped
        got: list[bytes] = []
        while (batch := await slow.next(TIMEOUT_S)) is not None:
            # Nothing the slow reader has not written yet has been dropped.
            assert log.read(slow.after_seq - len(batch))[:len(batch)] == batch
            assert log.first_seq - 1 <= slow.after_seq - len(batch)
            got += batch
            await asyncio.sleep(0)
        assert got == frames(1, 20)
        assert await asyncio.wait_for(fast_task, TIMEOUT_S) == frames(1, 20)
    assert log.state is StreamState.DONE


# Regression: StreamLog.remove_cursor() does not recompute the slowest cursor. When the slowest
# reader detaches while the producer is paused on it, unsent_bytes still counts from that
# reader's position, so the producer stays paused although every attached reader has
# written everything ("unsent: not yet written by the slowest *attached* reader"); nothing
# releases it until another reader happens to call next() again (a keep-alive later).
async def test_the_slowest_reader_leaving_releases_the_producer(make_registry: RegistryFactory) -> None:
    registry = make_registry(buffer_bytes=50)
    log = registry.create("alice")
    fast, slow = registry.attach(log, 0), registry.attach(log, 0)
    registry.start(log, produce(log, 20))
    async with background(drain(fast, wait_s=30.0)) as fast_task:
        await settle()
        assert (log.last_seq, fast.after_seq, log.backlogged) == (6, 6, True)
        slow.close()
        assert log.readers == 1
        assert not log.backlogged  # fails: unsent_bytes is still 60 (slow's frames)
        assert await asyncio.wait_for(fast_task, 0.5) == frames(1, 20)


async def test_next_raises_trimmed_when_the_log_was_evicted_under_a_lagging_reader(
        make_registry: RegistryFactory) -> None:
    registry = make_registry(max_total_bytes=30)
    log = registry.create("alice")
    lagging, done = registry.attach(log, 0), registry.attach(log, 0)
    registry.start(log, produce(log, 4))
    assert await drain(done) == frames(1, 4)
    await ended(log.producer)
    registry.create("alice")  # 40 bytes held >= 30: the finished log is evicted
    assert registry.get(log.stream_id, "alice") is None
    with pytest.raises(StreamTrimmedError):
        await lagging.next(TIMEOUT_S)
    assert await done.next(TIMEOUT_S) is None  # a reader that had everything just ends


async def test_reader_repr_and_close_is_idempotent(make_registry: RegistryFactory) -> None:
    registry = make_registry()
    log = registry.create("alice")
    reader = registry.attach(log, 0)
    assert repr(reader) == "<StreamReader gs_1 after 0>"
    assert reader.stream_id == "gs_1"
    log.append(b"a")
    log.append(b"b")
    await reader.next(TIMEOUT_S)
    assert repr(reader) == "<StreamReader gs_1 after 2>"
    other = registry.attach(log, 0)
    reader.close()
    reader.close()
    assert log.readers == 1
    other.close()
    assert log.readers == 0


# --- StreamRegistry: logs, owners, response ids ---------------------------------------------


def test_create_registers_a_running_log_with_no_reader() -> None:
    counter = itertools.count(1)
    registry = StreamRegistry(lambda: f"gs_{next(counter)}")
    log = registry.create("alice")
    assert (log.stream_id, log.owner, log.readers, log.state) == ("gs_1", "alice", 0, StreamState.RUNNING)
    assert log.producer is None
    assert registry.create("bob").stream_id == "gs_2"
    assert len(registry) == 2
    assert registry.running == 2
    assert registry.logs() == [log, registry.get("gs_2", "bob")]


def test_get_only_for_the_owner() -> None:
    registry = StreamRegistry()
    log = registry.create("alice")
    assert registry.get(log.stream_id, "alice") is log
    assert registry.get(log.stream_id, "bob") is None
    assert registry.get("gs_unknown", "alice") is None


def test_stream_not_found_is_one_answer_for_all() -> None:
    error = StreamNotFoundError()
    assert (error.status, error.code, error.type) == (404, "stream_not_found", "invalid_request_error")
    assert "not yours" in error.message


def test_response_ids_find_their_stream_for_the_owner_only() -> None:
    registry = StreamRegistry()
    log = registry.create("alice")
    assert registry.by_response_id("resp_1", "alice") is None
    registry.name_response(log, "resp_1")
    assert log.response_id == "resp_1"
    assert registry.by_response_id("resp_1", "alice") is log
    assert registry.by_response_id("resp_1", "bob") is None
    assert registry.by_response_id("resp_2", "alice") is None


async def test_readers_are_the_attached_stream_readers(make_registry: RegistryFactory) -> None:
    registry = make_registry()
    log = registry.create("alice")
    readers = [registry.attach(log, 0) for _ in range(3)]
    assert log.readers == 3
    readers[1].close()
    assert log.readers == 2
    for reader in readers:
        reader.close()
    assert log.readers == 0


# --- StreamRegistry: producers, detach timeout, cancel --------------------------------------


async def test_start_runs_the_producer_as_a_task_owned_by_the_registry(
        make_registry: RegistryFactory) -> None:
    registry = make_registry()
    log = registry.create("alice")
    reader = registry.attach(log, 0)
    registry.start(log, produce(log, 3))
    assert log.producer is not None
    assert await drain(reader) == frames(1, 3)
    await ended(log.producer)
    assert log.state is StreamState.DONE
    assert registry.running == 0
    assert registry.get(log.stream_id, "alice") is log  # kept for resumers


async def test_last_reader_leaving_stops_generation_after_the_detach_timeout(
        make_registry: RegistryFactory) -> None:
    registry = make_registry(detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    log = registry.create("alice")
    reader = registry.attach(log, 0)
    registry.start(log, forever())
    producer = log.producer
    assert producer is not None
    await asyncio.sleep(2 * DETACH_S)
    assert not producer.done()  # a reader is attached: no timeout runs

    loop = asyncio.get_running_loop()
    left_at = loop.time()
    reader.close()
    await settle()
    assert not producer.done()  # generation goes on for detach_timeout_s
    await ended(producer)
    assert loop.time() - left_at >= DETACH_S * 0.9
    assert producer.cancelled()
    assert cancels == ["cancel"]
    assert log.state is StreamState.FAILED
    assert isinstance(log.error, StreamCancelledError)
    assert registry.get(log.stream_id, "alice") is log  # still kept for retention_s
    await asyncio.sleep(2 * DETACH_S)
    assert cancels == ["cancel"]


async def test_reattaching_cancels_the_detach_timeout(make_registry: RegistryFactory) -> None:
    registry = make_registry(detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    log = registry.create("alice")
    registry.attach(log, 0).close()
    registry.start(log, forever())
    log.append(b"a")
    await asyncio.sleep(DETACH_S / 5)
    back = registry.attach(log, 1)  # the client reconnected in time
    await asyncio.sleep(3 * DETACH_S)
    assert log.producer is not None
    assert not log.producer.done()
    assert cancels == []
    back.close()
    await ended(log.producer)
    assert log.producer.cancelled()
    assert cancels == ["cancel"]


async def test_detach_with_readers_left_keeps_generating(make_registry: RegistryFactory) -> None:
    registry = make_registry(detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    log = registry.create("alice")
    first, second = registry.attach(log, 0), registry.attach(log, 0)
    registry.start(log, forever())
    first.close()
    await asyncio.sleep(3 * DETACH_S)
    assert log.producer is not None
    assert not log.producer.done()
    assert log.readers == 1
    second.close()
    await ended(log.producer)
    assert cancels == ["cancel"]


async def test_a_stream_started_without_a_reader_is_detached_from_the_start(
        make_registry: RegistryFactory) -> None:
    registry = make_registry(detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    log = registry.create("alice")
    registry.start(log, forever())
    await ended(log.producer)
    assert cancels == ["cancel"]
    assert log.state is StreamState.FAILED


async def test_a_follower_does_not_hold_off_the_detach_timeout(make_registry: RegistryFactory) -> None:
    registry = make_registry(detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    log = registry.create("alice")
    log.add_cursor(MIRROR, 0, follower=True)
    registry.start(log, forever())
    assert log.readers == 0
    await ended(log.producer)
    assert cancels == ["cancel"]


async def test_a_stream_that_ends_before_the_timeout_is_not_cancelled(make_registry: RegistryFactory) -> None:
    registry = make_registry(detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    log = registry.create("alice")
    registry.attach(log, 0).close()
    registry.start(log, produce(log, 2))
    await ended(log.producer)
    await asyncio.sleep(2 * DETACH_S)
    assert cancels == []
    assert log.state is StreamState.DONE
    assert registry.get(log.stream_id, "alice") is log
    assert log.read(0) == frames(1, 2)


async def test_detaching_from_a_finished_stream_keeps_it(make_registry: RegistryFactory) -> None:
    registry = make_registry(detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    log = registry.create("alice")
    reader = registry.attach(log, 0)
    registry.start(log, produce(log, 2))
    await ended(log.producer)
    reader.close()
    await asyncio.sleep(2 * DETACH_S)
    assert cancels == []
    assert log.producer is not None
    assert not log.producer.cancelled()
    assert registry.get(log.stream_id, "alice") is log


async def test_remote_readers_rearm_the_detach_timeout(make_registry: RegistryFactory) -> None:
    registry = make_registry(detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    remote = FakeRemote(True, True)  # read on another instance twice, then no longer
    registry.remote = remote
    log = registry.create("alice")
    registry.start(log, forever())
    await ended(log.producer)
    assert remote.asked == [log.stream_id] * 3
    assert cancels == ["cancel"]


async def test_a_local_reader_arriving_during_the_remote_check_keeps_the_stream(
        make_registry: RegistryFactory) -> None:
    registry = make_registry(detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    gate = asyncio.Event()
    remote = FakeRemote(False, gate=gate)
    registry.remote = remote
    log = registry.create("alice")
    registry.start(log, forever())
    await asyncio.wait_for(remote.waiting.wait(), TIMEOUT_S)
    reader = registry.attach(log, 0)
    gate.set()
    await asyncio.sleep(2 * DETACH_S)
    assert log.producer is not None
    assert not log.producer.done()
    assert cancels == []
    reader.close()
    await ended(log.producer)
    assert cancels == ["cancel"]


# Regression: StreamRegistry._detach_expired_remote() acts on a stale answer. If a reader attaches
# and leaves again while has_remote_readers() is in flight, detach() arms a fresh
# detach_timeout_s, but the old check's "no remote readers" then cancels the stream at once,
# well before the new period ends ("generation goes on for detach_timeout_s").
async def test_a_reader_coming_and_going_during_the_remote_check_gets_a_full_timeout(
        make_registry: RegistryFactory) -> None:
    registry = make_registry(detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    gate = asyncio.Event()
    remote = FakeRemote(False, gate=gate)
    registry.remote = remote
    log = registry.create("alice")
    registry.start(log, forever())
    await asyncio.wait_for(remote.waiting.wait(), TIMEOUT_S)
    registry.attach(log, 0).close()  # a client came and went: a new detach period begins
    gate.set()
    await settle()
    assert log.producer is not None
    assert not log.producer.done()  # fails: cancelled on the stale answer
    await ended(log.producer)
    assert cancels == ["cancel"]


# Regression: if RemoteStreams.has_remote_readers() raises (Redis unreachable), the check task
# dies ("Task exception was never retrieved"), the detach timer is neither re-armed nor acted
# on, and the detached stream keeps generating with nobody reading it until it ends by itself.
async def test_a_failed_remote_check_does_not_leave_a_detached_stream_running(
        make_registry: RegistryFactory) -> None:
    registry = make_registry(detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    registry.remote = FakeRemote(ConnectionError("redis is down"))  # then: no remote readers
    log = registry.create("alice")
    registry.start(log, forever())
    await ended(log.producer, within_s=10 * DETACH_S)  # fails: TimeoutError, still running
    assert cancels == ["cancel"]


async def test_cancel_is_idempotent(make_registry: RegistryFactory) -> None:
    registry = make_registry()
    log = registry.create("alice")
    registry.cancel(log)  # no producer yet: nothing to do
    registry.start(log, forever())
    await settle()
    registry.cancel(log)
    registry.cancel(log)
    await ended(log.producer)
    assert log.producer is not None
    assert log.producer.cancelled()
    registry.cancel(log)
    assert log.state is StreamState.FAILED

    finished = registry.create("alice")
    registry.start(finished, produce(finished, 1))
    await ended(finished.producer)
    registry.cancel(finished)
    assert finished.state is StreamState.DONE


async def test_a_producer_cancelled_before_its_first_step_still_closes_the_log(
        make_registry: RegistryFactory) -> None:
    registry = make_registry()
    log = registry.create("alice")
    reader = registry.attach(log, 0)
    ran: list[bool] = []

    async def producer() -> None:
        ran.append(True)
        log.append(b"never")

    registry.start(log, producer())
    registry.cancel(log)
    await ended(log.producer)
    assert ran == []
    assert log.state is StreamState.FAILED
    assert isinstance(log.error, StreamCancelledError)
    assert log.frames == []
    assert registry.running == 0
    assert await reader.next(TIMEOUT_S) is None  # its reader is not left waiting


async def test_a_detached_stream_pauses_its_producer_at_buffer_bytes(make_registry: RegistryFactory) -> None:
    registry = make_registry(buffer_bytes=50, retain_bytes=20, detach_timeout_s=60.0)
    log = registry.create("alice")
    registry.start(log, produce(log, 1000))
    await settle()
    assert (log.readers, log.last_seq, log.backlogged) == (0, 6, True)
    assert log.held_bytes <= 50 + 10

    reader = registry.attach(log, 0)  # a late reader lets it go on
    assert await reader.next(TIMEOUT_S) == frames(1, 6)
    got = await reader.next(TIMEOUT_S)  # acks frames 1..6
    assert got
    reader.close()  # it leaves with frames unwritten: the producer stops at the buffer again
    await settle()
    stop = log.last_seq
    await asyncio.sleep(0.01)
    assert log.last_seq == stop
    assert log.backlogged
    assert log.held_bytes <= log.retain_bytes + log.buffer_bytes + 10
    assert log.producer is not None
    assert not log.producer.done()


# --- StreamRegistry: retention and the byte cap ---------------------------------------------


async def test_finished_logs_are_kept_retention_s(make_registry: RegistryFactory) -> None:
    clock = SkewedClock()
    registry = make_registry(retention_s=60.0, clock=clock)
    log = registry.create("alice")
    registry.name_response(log, "resp_1")
    registry.start(log, produce(log, 2))
    await ended(log.producer)
    clock.advance(59)
    assert registry.get(log.stream_id, "alice") is log
    assert registry.by_response_id("resp_1", "alice") is log
    clock.advance(2)
    assert registry.get(log.stream_id, "alice") is None
    assert registry.by_response_id("resp_1", "alice") is None
    assert len(registry) == 0
    assert registry.tally.held_bytes == 0


async def test_running_logs_are_never_expired(make_registry: RegistryFactory) -> None:
    clock = SkewedClock()
    registry = make_registry(retention_s=60.0, clock=clock)
    log = registry.create("alice")
    registry.start(log, forever())
    clock.advance(3600)
    assert registry.get(log.stream_id, "alice") is log


# Regression: StreamLog._close() stamps finished_at with time.monotonic(), not the registry's
# injected clock, while StreamRegistry._expire() compares it with that clock. With any clock
# but time.monotonic itself, retention is wrong: logs live for ever or expire at once.
async def test_retention_follows_the_injected_clock(make_registry: RegistryFactory) -> None:
    clock = FakeClock(1_000_000.0)
    registry = make_registry(retention_s=60.0, clock=clock)
    log = registry.create("alice")
    registry.start(log, produce(log, 1))
    await ended(log.producer)
    assert log.finished_at == clock.now  # fails: it is time.monotonic()
    clock.advance(59)
    assert registry.get(log.stream_id, "alice") is log
    clock.advance(2)
    assert registry.get(log.stream_id, "alice") is None


async def test_running_counts_streams_whose_producer_has_not_ended(make_registry: RegistryFactory) -> None:
    registry = make_registry()
    first, second = registry.create("a"), registry.create("b")
    registry.start(first, forever())
    registry.start(second, produce(second, 1))
    assert registry.running == 2
    await ended(second.producer)
    assert registry.running == 1
    registry.cancel(first)
    await ended(first.producer)
    assert registry.running == 0
    assert len(registry) == 2


async def test_max_total_bytes_evicts_finished_logs_oldest_first(make_registry: RegistryFactory) -> None:
    registry = make_registry(max_total_bytes=100)
    oldest, newer = registry.create("a"), registry.create("a")
    for log in (oldest, newer):
        registry.start(log, produce(log, 4))  # 40 bytes each
        await ended(log.producer)
    running = registry.create("a")
    for n in range(1, 5):
        running.append(frame(n))
    assert registry.tally.held_bytes == 120 == held_everywhere(registry)

    fresh = registry.create("a")  # 120 >= 100: the oldest finished log makes room
    assert registry.get(oldest.stream_id, "a") is None
    assert oldest.held_bytes == 0
    assert registry.get(newer.stream_id, "a") is newer
    assert registry.get(running.stream_id, "a") is running
    assert registry.tally.held_bytes == 80 == held_everywhere(registry)

    for n in range(1, 7):
        fresh.append(frame(n))  # running logs alone now hold 100 bytes
    with pytest.raises(OverloadedError) as info:
        registry.create("a")
    assert (info.value.status, info.value.code, info.value.retry_after_s) == (503, "stream_capacity", 1.0)
    assert registry.get(newer.stream_id, "a") is None  # every finished log went first
    assert registry.logs() == [running, fresh]  # running logs are never evicted
    assert registry.tally.held_bytes == 100 == held_everywhere(registry)


async def test_tally_follows_trimming(make_registry: RegistryFactory) -> None:
    registry = make_registry(retain_bytes=10)
    log, other = registry.create("a"), registry.create("a")
    reader = registry.attach(log, 0)
    for n in range(1, 5):
        log.append(frame(n))
        other.append(frame(n))
    assert registry.tally.held_bytes == 80
    assert await reader.next(TIMEOUT_S) == frames(1, 4)
    await reader.next(0.01)  # acks 1..4: all but 10 sent bytes are dropped
    assert log.held_bytes == 10
    assert registry.tally.held_bytes == 50 == held_everywhere(registry)
    reader.close()


# --- resume rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(("after_seq", "first_seq", "last_seq"), [
    (0, 1, 0), (0, 1, 3), (2, 1, 3), (3, 1, 3), (3, 4, 5), (5, 4, 5), (5, 6, 5),
])
def test_check_cursor_accepts_a_retained_cursor(after_seq: int, first_seq: int, last_seq: int) -> None:
    check_cursor(after_seq, first_seq, last_seq)


@pytest.mark.parametrize(("after_seq", "first_seq", "last_seq"), [(1, 1, 0), (4, 1, 3), (6, 4, 5)])
def test_check_cursor_refuses_a_cursor_beyond_the_stream(after_seq: int, first_seq: int,
                                                         last_seq: int) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_cursor(after_seq, first_seq, last_seq)
    assert (info.value.status, info.value.code) == (400, "cursor_beyond_stream")


@pytest.mark.parametrize(("after_seq", "first_seq", "last_seq"), [(2, 4, 5), (0, 2, 5), (4, 6, 5)])
def test_check_cursor_refuses_a_trimmed_cursor(after_seq: int, first_seq: int, last_seq: int) -> None:
    with pytest.raises(StreamTrimmedError) as info:
        check_cursor(after_seq, first_seq, last_seq)
    error = info.value
    assert (error.status, error.code, error.earliest_seq) == (409, "stream_trimmed", first_seq)
    assert error.to_body()["error"]["earliest_seq"] == first_seq
    assert error.to_body()["error"]["type"] == "invalid_request_error"


async def test_attach_applies_the_resume_rules(make_registry: RegistryFactory) -> None:
    registry = make_registry(retain_bytes=0, detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    log = registry.create("alice")
    reader = registry.attach(log, 0)
    for n in range(1, 4):
        log.append(frame(n))
    with pytest.raises(InvalidRequestError) as beyond:
        registry.attach(log, 4)
    assert beyond.value.code == "cursor_beyond_stream"
    await reader.next(TIMEOUT_S)
    await reader.next(0.01)  # acks 1..3, which retain_bytes=0 drops
    registry.start(log, forever())
    reader.close()
    with pytest.raises(StreamTrimmedError) as trimmed:
        registry.attach(log, 1)
    assert trimmed.value.earliest_seq == 4
    assert log.readers == 0  # a refused attach attaches nothing, nor stops the detach timeout
    await ended(log.producer)
    assert cancels == ["cancel"]


def test_parse_last_event_id_accepts_stream_id_and_seq() -> None:
    assert parse_last_event_id(f"{SHA_ID}:0") == (SHA_ID, 0)
    assert parse_last_event_id(f" {SHA_ID}:17 ") == (SHA_ID, 17)
    stream_id = new_stream_id()
    assert parse_last_event_id(f"{stream_id}:123456789") == (stream_id, 123456789)


@pytest.mark.parametrize("value", [
    "", "17", ":17", f"{SHA_ID}", f"{SHA_ID}:", f"{SHA_ID}:-1", f"{SHA_ID}:1.5", f"{SHA_ID}:01",
    f"{SHA_ID}:1:2", f"{SHA_ID}: 1", f"{SHA_ID.upper()}:1", f"{SHA_ID}0:1", f"{SHA_ID[:-1]}:1",
    "gs_xyz:1", f"chatcmpl_{SHA_ID[3:]}:1", f"{SHA_ID}:1" + "0" * 18,
])
def test_parse_last_event_id_rejects_other_shapes(value: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_last_event_id(value)
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_cursor", "Last-Event-ID")


@pytest.mark.parametrize(("text", "seq"), [("0", 0), ("7", 7), ("9" * 18, int("9" * 18))])
def test_parse_seq_accepts_non_negative_integers(text: str, seq: int) -> None:
    assert parse_seq(text, "starting_after") == seq


@pytest.mark.parametrize("text", [
    "", "-1", "+1", "1.0", "1e3", "01", "00", "abc", " 1", "1 ", "1_000", "0x10", "\u0661",
    "1" + "0" * 18, "9" * 40,
])
def test_parse_seq_rejects_negatives_non_digits_and_huge(text: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_seq(text, "starting_after")
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_cursor", "starting_after")
    assert len(info.value.message) < 120  # the echo of a huge value is cut short


# Regression: _SEQ_RE and _STREAM_ID_RE end in ``$``, which also matches before a trailing
# newline, and are used with ``.match``: parse_seq("7\n") returns 7 and valid_stream_id()
# accepts an id ending in "\n" (use ``fullmatch`` or ``\Z``).
@pytest.mark.parametrize("check", ["parse_seq", "valid_stream_id"])
def test_a_trailing_newline_is_not_a_valid_cursor_or_id(check: str) -> None:
    if check == "valid_stream_id":
        assert not valid_stream_id(SHA_ID + "\n")  # fails: True
    else:
        with pytest.raises(InvalidRequestError):  # fails: returns 7
            parse_seq("7\n", "starting_after")


def test_valid_stream_id() -> None:
    assert valid_stream_id(SHA_ID)
    for bad in ("", "gs_", SHA_ID[:-1], SHA_ID + "0", SHA_ID.upper(), "xx" + SHA_ID[2:]):
        assert not valid_stream_id(bad)


# --- Idempotency-Key ------------------------------------------------------------------------


def answer_of(body: bytes) -> UnaryAnswer:
    return UnaryAnswer(200, {"content-type": "application/json"}, body)


def test_idempotent_stream_entries() -> None:
    registry = StreamRegistry()
    assert registry.idempotent("alice", "key-1", b"{}") is None
    log = registry.create("alice")
    registry.remember_stream("alice", "key-1", b"{}", log)
    entry = registry.idempotent("alice", "key-1", b"{}")
    assert entry is not None
    assert (entry.log, entry.answer, entry.key) == (log, None, ("alice", "key-1"))
    assert registry.idempotent("bob", "key-1", b"{}") is None  # keys are per virtual key
    assert registry.idempotent("alice", "key-2", b"{}") is None
    with pytest.raises(IdempotencyKeyReusedError) as info:
        registry.idempotent("alice", "key-1", b'{"other": 1}')
    error = info.value
    assert (error.status, error.code, error.param) == (422, "idempotency_key_reused", "Idempotency-Key")


async def test_an_idempotent_stream_is_forgotten_with_its_log(make_registry: RegistryFactory) -> None:
    clock = SkewedClock()
    registry = make_registry(retention_s=60.0, clock=clock)
    log = registry.create("alice")
    registry.remember_stream("alice", "key-1", b"{}", log)
    registry.start(log, produce(log, 1))
    await ended(log.producer)
    clock.advance(59)
    assert registry.idempotent("alice", "key-1", b"{}") is not None
    clock.advance(2)
    assert registry.idempotent("alice", "key-1", b"{}") is None


async def test_remember_answer_runs_once_and_is_kept_retention_s(make_registry: RegistryFactory) -> None:
    clock = FakeClock()
    registry = make_registry(retention_s=60.0, clock=clock)
    runs: list[str] = []
    release = asyncio.Event()

    async def answer() -> UnaryAnswer:
        runs.append("run")
        await release.wait()
        return answer_of(b'{"id": "x"}')

    task = registry.remember_answer("alice", "key-1", b"{}", answer())
    entry = registry.idempotent("alice", "key-1", b"{}")
    assert entry is not None
    assert (entry.answer, entry.log) == (task, None)
    await settle()
    assert registry.tally.held_bytes == 0  # counted once there is an answer
    release.set()
    first = await asyncio.wait_for(asyncio.shield(task), TIMEOUT_S)
    second = await asyncio.wait_for(asyncio.shield(task), TIMEOUT_S)
    assert first is second
    assert first.body == b'{"id": "x"}'
    assert runs == ["run"]
    assert registry.tally.held_bytes == len(b'{"id": "x"}')
    assert entry.size_bytes == len(b'{"id": "x"}')

    clock.advance(59)
    assert registry.idempotent("alice", "key-1", b"{}") is entry
    with pytest.raises(IdempotencyKeyReusedError):
        registry.idempotent("alice", "key-1", b"[]")
    clock.advance(2)
    assert registry.idempotent("alice", "key-1", b"{}") is None
    assert registry.tally.held_bytes == 0


async def test_a_failed_answer_is_forgotten(make_registry: RegistryFactory) -> None:
    registry = make_registry()

    async def answer() -> UnaryAnswer:
        raise UpstreamError("refused")

    task = registry.remember_answer("alice", "key-1", b"{}", answer())
    with pytest.raises(UpstreamError):
        await task
    assert registry.idempotent("alice", "key-1", b"{}") is None
    assert registry.idempotent("alice", "key-1", b"[]") is None  # the key may be used again
    assert registry.tally.held_bytes == 0


async def test_a_cancelled_answer_is_forgotten(make_registry: RegistryFactory) -> None:
    registry = make_registry()

    async def answer() -> UnaryAnswer:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    task = registry.remember_answer("alice", "key-1", b"{}", answer())
    await settle()
    task.cancel()
    await ended(task)
    assert registry.idempotent("alice", "key-1", b"{}") is None
    assert registry.tally.held_bytes == 0


async def test_stored_answers_count_against_max_total_bytes(make_registry: RegistryFactory) -> None:
    registry = make_registry(max_total_bytes=10)

    async def answer() -> UnaryAnswer:
        return answer_of(b"x" * 10)

    await registry.remember_answer("alice", "key-1", b"{}", answer())
    assert registry.tally.held_bytes == 10
    with pytest.raises(OverloadedError):
        registry.create("alice")


# --- shutdown -------------------------------------------------------------------------------


async def test_cancel_all_cancels_running_producers_timers_and_answers(
        make_registry: RegistryFactory) -> None:
    registry = make_registry(detach_timeout_s=DETACH_S)
    cancels = count_cancels(registry)
    running, finished = registry.create("a"), registry.create("b")
    registry.start(running, forever())
    registry.start(finished, produce(finished, 1))

    async def answer() -> UnaryAnswer:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    pending = registry.remember_answer("a", "key-1", b"{}", answer())
    await settle()
    tasks = registry.cancel_all()
    assert tasks == [running.producer, pending]
    await asyncio.gather(*tasks, return_exceptions=True)
    assert running.producer is not None
    assert running.producer.cancelled()
    assert running.state is StreamState.FAILED
    assert finished.state is StreamState.DONE
    await asyncio.sleep(2 * DETACH_S)
    assert cancels == []  # the detach timer was cancelled, not fired
    assert registry.idempotent("a", "key-1", b"{}") is None


async def test_registry_repr_shows_state(make_registry: RegistryFactory) -> None:
    registry = make_registry()
    assert repr(registry) == "<StreamRegistry [0 streams, 0 running, 0 detached, 0 bytes]>"
    read, _detached, finished = registry.create("a"), registry.create("a"), registry.create("a")
    reader = registry.attach(read, 0)
    registry.start(finished, produce(finished, 1))
    await ended(finished.producer)
    assert repr(registry) == "<StreamRegistry [3 streams, 2 running, 1 detached, 10 bytes]>"
    reader.close()
    assert repr(registry) == "<StreamRegistry [3 streams, 2 running, 2 detached, 10 bytes]>"


async def test_fail_all_ends_running_streams_with_an_error_frame(make_registry: RegistryFactory) -> None:
    registry = make_registry()
    mid_stream, not_started, finished = registry.create("a"), registry.create("b"), registry.create("c")
    mid_stream.append(b"data: 1\n\n")
    registry.start(mid_stream, forever())
    registry.start(not_started, forever())

    async def finish() -> None:
        finished.append(b"data: 1\n\n")
        finished.finish(b"data: [DONE]\n\n")

    registry.start(finished, finish())
    await settle()
    error = OverloadedError("The gateway is shutting down.", code="shutting_down")

    registry.fail_all(error)

    assert mid_stream.state is StreamState.FAILED
    assert mid_stream.read(1) == [error_frame(error)]
    assert orjson.loads(mid_stream.frames[-1].removeprefix(b"data: "))["error"]["code"] == "shutting_down"
    assert mid_stream.error is None
    assert not_started.state is StreamState.FAILED
    assert not_started.error is error  # the handler answers it with an HTTP status
    assert not_started.frames == []
    assert finished.state is StreamState.DONE
    assert finished.read(0) == [b"data: 1\n\n", b"data: [DONE]\n\n"]
    tasks = [mid_stream.producer, not_started.producer]
    await asyncio.gather(*tasks, return_exceptions=True)
    assert all(task is not None and task.cancelled() for task in tasks)
    assert registry.running == 0


async def test_fail_all_wakes_readers_and_a_paused_producer(make_registry: RegistryFactory) -> None:
    registry = make_registry(buffer_bytes=10)
    log = registry.create("a")
    slow = registry.attach(log, 0)  # writes nothing: keeps the producer paused
    reader = registry.attach(log, 0)
    log.append(b"data: 0123456789\n\n")
    assert await reader.next(TIMEOUT_S) == [b"data: 0123456789\n\n"]
    waiting = asyncio.create_task(reader.next(TIMEOUT_S))
    paused = asyncio.create_task(log.writable())
    await settle()
    assert not waiting.done()
    assert not paused.done()
    registry.fail_all(OverloadedError("shutting down"))
    await asyncio.wait_for(paused, TIMEOUT_S)
    batch = await asyncio.wait_for(waiting, TIMEOUT_S)
    assert batch is not None
    assert len(batch) == 1
    assert log.last_seq == 2
    assert await reader.next(TIMEOUT_S) is None
    assert await drain(slow) == [b"data: 0123456789\n\n", log.frames[-1]]


# --- property: any interleaving of producer and readers --------------------------------------

MAX_FRAME_BYTES = 40
ACTIONS = ["append"] * 4 + ["advance"] * 4 + ["interrupt", "detach", "attach"]
#: (action, arg): arg is the frame size of an append, else the reader (arg % readers).
STEPS = st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(1, MAX_FRAME_BYTES)),
                 min_size=40, max_size=120)


class Model:
    """What each reader of one log has seen, for the property test."""

    def __init__(self, registry: StreamRegistry, log: StreamLog, n_readers: int) -> None:
        self.registry = registry
        self.log = log
        self.appended: list[bytes] = []
        self.readers: list[StreamReader | None] = [registry.attach(log, 0) for _ in range(n_readers)]
        self.seen: list[list[bytes]] = [[] for _ in range(n_readers)]
        self.written = [0] * n_readers  # what each reader has written (acked on its next call)
        self.lost = [False] * n_readers

    def append(self, size: int) -> None:
        if not self.log.backlogged:  # the producer only reads upstream when writable()
            data = bytes([97 + len(self.appended) % 26]) * size
            self.appended.append(data)
            self.log.append(data)

    async def advance(self, i: int) -> None:
        reader = self.readers[i]
        if reader is not None:
            self.written[i] = len(self.seen[i])
            batch = await reader.next(0)
            assert batch is not None
            self.seen[i] += batch

    async def interrupt(self, i: int) -> None:
        """A ``next()`` cancelled at an arbitrary point: nothing it did not return is lost."""
        reader = self.readers[i]
        if reader is not None:
            self.written[i] = len(self.seen[i])
            task = asyncio.create_task(reader.next(1.0))
            await asyncio.sleep(0)
            task.cancel()
            (result,) = await asyncio.gather(task, return_exceptions=True)
            if isinstance(result, list):
                self.seen[i] += result
            assert reader.after_seq == len(self.seen[i])

    def detach(self, i: int) -> None:
        reader = self.readers[i]
        if reader is not None:
            reader.close()
            self.readers[i] = None

    def attach(self, i: int) -> None:
        if self.readers[i] is not None or self.lost[i]:
            return
        cursor = len(self.seen[i])
        if cursor >= self.log.first_seq - 1:
            self.readers[i] = self.registry.attach(self.log, cursor)
            self.written[i] = cursor
            return
        # The others moved on past retain_bytes while it was away: 409, never a gap.
        with pytest.raises(StreamTrimmedError) as info:
            self.registry.attach(self.log, cursor)
        assert info.value.earliest_seq == self.log.first_seq
        self.lost[i] = True

    def check(self) -> None:
        log = self.log
        assert log.held_bytes <= log.retain_bytes + log.buffer_bytes + MAX_FRAME_BYTES
        assert log.held_bytes == sum(len(f) for f in log.frames) == self.registry.tally.held_bytes
        assert log.frames == self.appended[log.first_seq - 1:]
        assert log.readers == sum(reader is not None for reader in self.readers)
        for i, reader in enumerate(self.readers):
            assert self.seen[i] == self.appended[:len(self.seen[i])]  # in order, once each
            if reader is not None:
                assert log.first_seq - 1 <= self.written[i]  # nothing it has not written is gone


@settings(max_examples=100, deadline=None, derandomize=True)
@given(n_readers=st.integers(2, 3), buffer_bytes=st.integers(20, 200), retain_bytes=st.integers(0, 100),
       steps=STEPS)
async def test_any_interleaving_delivers_every_frame_once_within_bounded_memory(
        n_readers: int, buffer_bytes: int, retain_bytes: int, steps: list[tuple[str, int]]) -> None:
    registry = StreamRegistry(buffer_bytes=buffer_bytes, retain_bytes=retain_bytes,
                              detach_timeout_s=3600.0)
    try:
        log = registry.create("alice")
        model = Model(registry, log, n_readers)
        for action, arg in steps:
            i = arg % n_readers
            if action == "append":
                model.append(arg)
            elif action == "advance":
                await model.advance(i)
            elif action == "interrupt":
                await model.interrupt(i)
            elif action == "detach":
                model.detach(i)
            else:
                model.attach(i)
            model.check()

        log.finish()
        for i in range(n_readers):
            model.attach(i)
            reader = model.readers[i]
            if reader is not None:
                model.seen[i] += await drain(reader, wait_s=0)
                assert model.seen[i] == model.appended
        assert not all(model.lost)
    finally:
        await asyncio.gather(*registry.cancel_all(), return_exceptions=True)
