"""proxy/streams.py: the stream log (seqs, cursors, waits) and the registry, on real asyncio."""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest

from proxy.streams import StreamLog, StreamRegistry, StreamState, new_stream_id

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
