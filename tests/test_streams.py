"""proxy/streams.py: the stream log (seqs, cursors, waits) and the registry, on real asyncio."""

from __future__ import annotations

import asyncio
import itertools
import random
import re

import orjson
import pytest

from proxy.errors import OverloadedError
from proxy.streams import (
    StreamGapError,
    StreamLog,
    StreamRegistry,
    StreamState,
    error_frame,
    new_stream_id,
)

TIMEOUT_S = 2.0


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


def waiter(log: StreamLog, after_seq: int) -> asyncio.Task[None]:
    return asyncio.create_task(log.wait(after_seq))


# --- StreamLog ------------------------------------------------------------------------------


def test_seqs_count_from_one() -> None:
    log = StreamLog("gs_test", "alice")
    assert log.last_seq == 0
    assert [log.append(f"data: {n}\n\n".encode()) for n in range(3)] == [1, 2, 3]
    assert log.last_seq == 3
    assert log.bytes_total == 3 * len(b"data: 0\n\n")


def test_read_by_cursor() -> None:
    log = StreamLog("gs_test", "alice")
    frames = [b"one", b"two", b"three"]
    for frame in frames:
        log.append(frame)
    assert log.read(0) == frames
    assert log.read(1) == [b"two", b"three"]
    assert log.read(3) == []
    assert log.read(99) == []
    log.append(b"four")
    assert log.read(3) == [b"four"]


def test_new_stream_ids_are_unique_and_well_formed() -> None:
    ids = {new_stream_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"gs_[0-9a-f]{24}", i) for i in ids)


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
        log.fail(RuntimeError("boom"), b"data: {\"error\": {}}\n\n")
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
            frames = log.read(cursor)
            if not frames and log.closed:
                return
            seen.extend(frames)
            cursor += len(frames)

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


def test_fail_before_first_frame_sets_error_and_appends_nothing() -> None:
    log = StreamLog("gs_test", "alice")
    error = ConnectionError("upstream refused")
    log.fail(error, b"data: {\"error\": {}}\n\n")
    assert log.error is error
    assert log.frames == []
    assert log.last_seq == 0
    assert log.state is StreamState.FAILED
    assert log.closed


def test_fail_after_frames_appends_the_error_frame() -> None:
    log = StreamLog("gs_test", "alice")
    log.append(b"data: 1\n\n")
    log.fail(ConnectionError("reset"), b"data: {\"error\": {}}\n\n")
    assert log.read(0) == [b"data: 1\n\n", b"data: {\"error\": {}}\n\n"]
    assert log.last_seq == 2
    assert log.error is None
    assert log.state is StreamState.FAILED


def test_closed_log_refuses_frames_and_ignores_a_second_close() -> None:
    log = StreamLog("gs_test", "alice")
    log.append(b"a")
    log.finish()
    with pytest.raises(RuntimeError, match="gs_test"):
        log.append(b"late")
    log.fail(RuntimeError("late"), b"err")
    assert log.state is StreamState.DONE
    assert log.read(0) == [b"a"]


def test_log_repr_shows_state() -> None:
    log = StreamLog("gs_abc", "alice")
    log.readers = 2
    log.append(b"12345")
    assert repr(log) == "<StreamLog gs_abc [running, 1 events, 5 bytes, 5 unsent | readers: 2]>"
    log.ack(1)
    log.fail(RuntimeError("x"), b"err")
    assert repr(log) == "<StreamLog gs_abc [failed, 2 events, 8 bytes, 3 unsent | readers: 2]>"


# --- ack, backpressure, trimming ----------------------------------------------------------------


def frame(n: int, size: int = 10) -> bytes:
    """A frame of exactly ``size`` bytes (``size`` >= 4)."""
    return f"{n:<{size - 2}}\n\n".encode()


def filled(count: int, size: int = 10, **kwargs: int) -> StreamLog:
    log = StreamLog("gs_test", "alice", **kwargs)
    for n in range(count):
        log.append(frame(n, size))
    return log


def test_ack_counts_sent_bytes() -> None:
    log = filled(3)
    assert (log.unsent_bytes, log.bytes_acked, log.acked_seq) == (30, 0, 0)
    log.ack(2)
    assert (log.unsent_bytes, log.bytes_acked, log.acked_seq) == (10, 20, 2)
    log.ack(1)  # an older ack changes nothing
    log.ack(2)
    assert (log.bytes_acked, log.acked_seq) == (20, 2)
    log.ack(99)  # clamped to the newest frame
    assert (log.unsent_bytes, log.bytes_acked, log.acked_seq) == (0, 30, 3)
    log.append(frame(3, 7))
    assert log.unsent_bytes == 7


def test_backlogged_only_past_buffer_with_a_reader_attached() -> None:
    log = filled(10, buffer_bytes=100)
    log.readers = 1
    assert log.unsent_bytes == 100
    assert not log.backlogged  # at the limit is not past it
    log.append(b"x")
    assert log.backlogged
    log.readers = 0
    assert not log.backlogged  # nobody to wait for
    log.readers = 1
    log.ack(1)
    assert not log.backlogged


async def test_writable_returns_at_once_when_not_backlogged() -> None:
    log = filled(3, buffer_bytes=100)
    log.readers = 1
    await asyncio.wait_for(log.writable(), TIMEOUT_S)
    unread = filled(50, buffer_bytes=100)  # far behind, but no reader attached
    assert unread.readers == 0
    await asyncio.wait_for(unread.writable(), TIMEOUT_S)


async def test_writable_waits_until_the_reader_acks_below_half() -> None:
    log = filled(12, buffer_bytes=100)  # 120 unsent
    log.readers = 1
    assert log.backlogged
    producer = asyncio.create_task(log.writable())
    await settle()
    assert not producer.done()
    log.ack(3)  # 90 unsent: no longer past the buffer, but not below half of it
    await settle()
    assert not producer.done()
    log.ack(7)  # 50 unsent: half
    await asyncio.wait_for(producer, TIMEOUT_S)
    assert log.unsent_bytes <= 50


@pytest.mark.parametrize("close", ["finish", "fail"])
async def test_writable_returns_when_the_log_closes(close: str) -> None:
    log = filled(12, buffer_bytes=100)
    log.readers = 1
    producer = asyncio.create_task(log.writable())
    await settle()
    assert not producer.done()
    if close == "finish":
        log.finish()
    else:
        log.fail(RuntimeError("gone"), b"data: {}\n\n")
    await asyncio.wait_for(producer, TIMEOUT_S)


async def test_writable_returns_when_the_last_reader_detaches() -> None:
    registry = StreamRegistry(buffer_bytes=100)
    log = registry.create("alice")
    for n in range(12):
        log.append(frame(n))
    producer = asyncio.create_task(log.writable())
    await settle()
    assert not producer.done()
    registry.detach(log)
    await asyncio.wait_for(producer, TIMEOUT_S)


async def test_cancelling_writable_is_safe() -> None:
    log = filled(12, buffer_bytes=100)
    log.readers = 1
    cancelled, survivor = asyncio.create_task(log.writable()), asyncio.create_task(log.writable())
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not survivor.done()
    log.ack(12)
    await asyncio.wait_for(survivor, TIMEOUT_S)


def test_sent_frames_beyond_retain_are_dropped() -> None:
    log = filled(5, retain_bytes=25)
    log.ack(5)  # 50 sent bytes, 25 may stay: frames 1..3 go
    assert log.first_seq == 4
    assert log.last_seq == 5
    assert len(log.frames) == 2
    assert log.held_bytes == 20
    assert log.bytes_dropped == 30
    assert log.read(3) == [frame(3), frame(4)]
    with pytest.raises(StreamGapError) as info:
        log.read(2)
    assert info.value.earliest_seq == 4
    assert "4" in str(info.value)
    with pytest.raises(StreamGapError):
        log.read(0)


def test_unsent_frames_are_never_dropped() -> None:
    log = filled(6, retain_bytes=1)
    log.ack(2)
    assert log.first_seq == 3  # every sent frame is over the retain budget
    assert log.read(2) == [frame(n) for n in range(2, 6)]
    assert log.held_bytes == log.unsent_bytes == 40
    log.append(b"late")
    assert log.last_seq == 7
    assert log.read(6) == [b"late"]


def test_repr_counts_unsent_after_trim() -> None:
    log = filled(4, retain_bytes=10)
    log.readers = 1
    log.ack(3)
    assert repr(log) == "<StreamLog gs_test [running, 4 events, 40 bytes, 10 unsent | readers: 1]>"


def test_held_bytes_stay_within_retain_plus_unsent() -> None:
    rng = random.Random(2024)
    log = StreamLog("gs_test", "alice", buffer_bytes=500, retain_bytes=300)
    frames: list[bytes] = []
    for _ in range(2000):
        if rng.random() < 0.6:
            data = bytes([97 + len(frames) % 26]) * rng.randint(1, 80)
            frames.append(data)
            assert log.append(data) == len(frames)
        else:
            log.ack(rng.randint(log.acked_seq, log.last_seq))
        assert log.held_bytes <= log.retain_bytes + log.unsent_bytes
        assert log.held_bytes == sum(len(f) for f in log.frames)
        assert log.first_seq - 1 <= log.acked_seq <= log.last_seq
        assert log.unsent_bytes == sum(len(f) for f in frames[log.acked_seq:])
        # Whatever is held is exactly the tail of what was appended.
        assert log.read(log.first_seq - 1) == frames[log.first_seq - 1:]
    assert log.first_seq > 1


# --- StreamRegistry -------------------------------------------------------------------------


def counting_ids() -> StreamRegistry:
    counter = itertools.count(1)
    return StreamRegistry(lambda: f"gs_{next(counter)}")


async def forever() -> None:
    await asyncio.Event().wait()


def test_create_registers_a_running_log_with_one_reader() -> None:
    registry = counting_ids()
    log = registry.create("alice")
    assert (log.stream_id, log.owner, log.readers, log.state) == ("gs_1", "alice", 1, StreamState.RUNNING)
    assert registry.create("bob").stream_id == "gs_2"
    assert len(registry) == 2


def test_get_only_for_the_owner() -> None:
    registry = StreamRegistry()
    log = registry.create("alice")
    assert registry.get(log.stream_id, "alice") is log
    assert registry.get(log.stream_id, "bob") is None
    assert registry.get("gs_unknown", "alice") is None


async def test_detach_of_last_reader_cancels_producer_and_drops_log() -> None:
    registry = StreamRegistry()
    log = registry.create("alice")
    log.producer = asyncio.create_task(forever())
    await settle()

    registry.detach(log)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(log.producer, TIMEOUT_S)
    assert log.producer.cancelled()
    assert registry.get(log.stream_id, "alice") is None
    assert len(registry) == 0


async def test_detach_with_readers_left_keeps_generating() -> None:
    registry = StreamRegistry()
    log = registry.create("alice")
    log.readers = 2
    producer = log.producer = asyncio.create_task(forever())
    registry.detach(log)
    await settle()
    assert not producer.done()
    assert registry.get(log.stream_id, "alice") is log
    assert log.readers == 1
    registry.detach(log)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(producer, TIMEOUT_S)
    assert len(registry) == 0


async def test_detach_of_finished_stream_drops_it() -> None:
    registry = StreamRegistry()
    log = registry.create("alice")

    async def produce() -> None:
        log.append(b"a")
        log.finish(b"[DONE]")

    log.producer = asyncio.create_task(produce())
    await asyncio.wait_for(log.producer, TIMEOUT_S)
    registry.detach(log)
    assert not log.producer.cancelled()
    assert registry.get(log.stream_id, "alice") is None
    assert log.read(0) == [b"a", b"[DONE]"]


async def test_cancel_all_cancels_running_producers() -> None:
    registry = counting_ids()
    running, finished = registry.create("a"), registry.create("b")
    running.producer = asyncio.create_task(forever())
    finished.producer = asyncio.create_task(asyncio.sleep(0))
    await settle()
    tasks = registry.cancel_all()
    assert tasks == [running.producer]
    await asyncio.gather(*tasks, return_exceptions=True)
    assert running.producer.cancelled()


def test_registry_repr_shows_state() -> None:
    registry = StreamRegistry()
    assert repr(registry) == "<StreamRegistry [0 streams, 0 running]>"
    registry.create("a")
    registry.create("a").finish()
    assert repr(registry) == "<StreamRegistry [2 streams, 1 running]>"


async def test_fail_all_ends_running_streams_with_an_error_frame() -> None:
    registry = counting_ids()
    mid_stream, not_started, finished = registry.create("a"), registry.create("b"), registry.create("c")
    mid_stream.append(b"data: 1\n\n")
    finished.append(b"data: 1\n\n")
    finished.finish(b"data: [DONE]\n\n")
    mid_stream.producer = asyncio.create_task(forever())
    not_started.producer = asyncio.create_task(forever())
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
    assert all(task.cancelled() for task in tasks)


async def test_fail_all_wakes_readers_and_a_paused_producer() -> None:
    registry = StreamRegistry(buffer_bytes=10)
    log = registry.create("a")
    log.append(b"data: 0123456789\n\n")
    reader = asyncio.create_task(log.wait(1))
    paused = asyncio.create_task(log.writable())
    await settle()
    assert not reader.done()
    assert not paused.done()
    registry.fail_all(OverloadedError("shutting down"))
    await asyncio.wait_for(asyncio.gather(reader, paused), TIMEOUT_S)
    assert log.last_seq == 2
