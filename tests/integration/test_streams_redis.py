"""proxy/streams_redis.py: stream logs mirrored into Redis Streams and read from another
instance (DESIGN §4 "Reconnection", §5).

Every test runs a real ``redis-server``. "Instance A" and "instance B" are two
``RedisStreamStore`` objects with different instance ids on the same server (they share
nothing but Redis); the tests about a dead instance run it as a subprocess and SIGKILL it.
Timeouts are short (``producer_timeout`` of 0.2-2 s) so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import orjson
import pytest
import redis.asyncio as redis_asyncio

from proxy.errors import OverloadedError, UpstreamError
from proxy.sse import DONE, encode_event
from proxy.streams import (
    StreamInterruptedError,
    StreamLog,
    StreamState,
    StreamTrimmedError,
    error_frame,
    new_stream_id,
)
from proxy.streams_redis import RedisStreamStore, RemoteStreamReader, StreamMirror
from tests.integration.conftest import REPO_ROOT, RedisServer

PREFIX = "shepherd:"
OWNER = "tester"
HEADERS = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "599"}
DONE_FRAME = encode_event(DONE)


def frame(i: int) -> bytes:
    """The ``i``-th test frame (the child processes below make the same ones)."""
    return encode_event(b'{"i":%d}' % i)


class Errors:
    """An ``on_error`` callback that counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


MakeStore = Callable[..., RedisStreamStore]


@pytest.fixture
async def make_store(redis_server: RedisServer) -> AsyncIterator[MakeStore]:
    """``make_store(instance_id, **overrides)``: a store on the test's Redis with short
    timeouts (closed at teardown)."""
    stores: list[RedisStreamStore] = []

    def make(instance_id: str, **overrides: Any) -> RedisStreamStore:
        url = overrides.pop("url", redis_server.url)
        params: dict[str, Any] = {
            "timeout_s": 1.0, "producer_timeout_s": 2.0, "detach_timeout_s": 1.0,
            "retention_s": 60.0, "maxlen": 1000, "presence_ttl_s": 0.6,
            "instance_id": instance_id, **overrides}
        store = RedisStreamStore(url, PREFIX, **params)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


def new_log() -> StreamLog:
    log = StreamLog(new_stream_id(), OWNER)
    log.headers = dict(HEADERS)
    log.endpoint = "chat.completions"
    return log


def mirror_of(store: RedisStreamStore, log: StreamLog,
              on_cancel: Callable[[], None] = lambda: None) -> StreamMirror:
    mirror = store.mirror(log, on_cancel)
    assert mirror is not None
    return mirror


async def produce(log: StreamLog, count: int, *, start: int = 0, delay_s: float = 0.005,
                  finish: bool = True) -> None:
    """Append frames ``start..start+count-1``, ``delay_s`` apart, then ``[DONE]``."""
    for i in range(start, start + count):
        log.append(frame(i))
        await asyncio.sleep(delay_s)
    if finish:
        log.finish(DONE_FRAME)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> float:
    """Poll ``condition`` every 5 ms; returns the seconds it took to become true."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 -- the state of another task; it has no event
            await asyncio.sleep(0.005)
    return time.monotonic() - started


async def warm_up(store: RedisStreamStore) -> None:
    """Mirror one short stream, so that Redis has loaded ``stream_append.lua`` (a NOSCRIPT
    would add a round trip to what a test counts)."""
    log = new_log()
    mirror = mirror_of(store, log)
    log.finish(DONE_FRAME)
    await until(lambda: mirror.state == "finished")


async def read_to_end(reader: RemoteStreamReader, timeout_s: float = 10.0) -> list[bytes]:
    """Every frame ``reader`` hands out until ``None``."""
    frames: list[bytes] = []
    async with asyncio.timeout(timeout_s):
        while (batch := await reader.next(0.2)) is not None:
            frames += batch
    return frames


def error_code(frame_bytes: bytes) -> str:
    assert frame_bytes.startswith(b"data: ")
    return str(orjson.loads(frame_bytes[len(b"data: "):])["error"]["code"])


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def captured_warnings() -> Iterator[list[logging.LogRecord]]:
    """Records logged on ``proxy.error`` (a handler of its own: ``proxy`` may not propagate
    to the root logger once the gateway configured logging)."""
    handler = _Collect()
    logger = logging.getLogger("proxy.error")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


# --- a dead instance: a child process that is SIGKILLed --------------------------------------

CHILD_SCRIPT = r"""
import asyncio, sys
from proxy.sse import encode_event
from proxy.streams import StreamLog
from proxy.streams_redis import RedisStreamStore

role, url, prefix, stream_id, frames, producer_timeout_s = sys.argv[1:7]

def store(instance_id):
    return RedisStreamStore(url, prefix, timeout_s=1.0, producer_timeout_s=float(producer_timeout_s),
                            detach_timeout_s=1.0, retention_s=60.0, maxlen=1000,
                            instance_id=instance_id, presence_ttl_s=0.6)

async def produce():
    log = StreamLog(stream_id, "tester")
    mirror = store("doomed-producer").mirror(log, lambda: None)
    for i in range(int(frames)):
        log.append(encode_event(b'{"i":%d}' % i))
    while mirror.sent_seq < int(frames):
        await asyncio.sleep(0.005)
    print("ready", flush=True)
    await asyncio.Event().wait()

async def read():
    reader_store = store("doomed-reader")
    reader = reader_store.reader(await reader_store.info(stream_id), 0)
    while not await reader_store.has_remote_readers(stream_id):
        await asyncio.sleep(0.005)
    print("ready", flush=True)
    while True:
        await reader.next(0.5)

asyncio.run(produce() if role == "produce" else read())
"""


@asynccontextmanager
async def instance(role: str, redis: RedisServer, stream_id: str, frames: int = 0,
                   producer_timeout_s: float = 1.0) -> AsyncIterator[asyncio.subprocess.Process]:
    """A gateway instance reduced to its stream store, in a child process: ``produce``
    mirrors ``frames`` frames of a running stream, ``read`` attaches a remote reader. Yields
    once it is ready; killed (SIGKILL) at exit if still alive."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD_SCRIPT, role, redis.url, PREFIX, stream_id, str(frames),
        str(producer_timeout_s), env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(15):
            line = await proc.stdout.readline()
            if line != b"ready\n":
                pytest.fail(f"{role} instance failed: {(line + await proc.stdout.read()).decode()}")
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- reading what another instance produces ---------------------------------------------------


async def test_remote_readers_get_the_same_frames_in_order_from_any_seq(make_store: MakeStore) -> None:
    store_a, store_b = make_store("A"), make_store("B")
    log = new_log()
    mirror = mirror_of(store_a, log)
    producer = asyncio.create_task(produce(log, 30, delay_s=0.01))
    await until(lambda: mirror.sent_seq >= 5)
    info = await store_b.info(log.stream_id)
    assert info is not None
    assert (info.owner, info.instance_id, info.state, info.endpoint, info.headers) == (
        OWNER, "A", StreamState.RUNNING, "chat.completions", HEADERS)
    assert info.first_seq == 1
    assert info.last_seq >= 5
    from_start, from_middle = store_b.reader(info, 0), store_b.reader(info, 5)
    assert repr(from_middle) == f"<RemoteStreamReader {log.stream_id} after 5 [reading]>"

    got_start, got_middle = await asyncio.gather(read_to_end(from_start), read_to_end(from_middle))

    await producer
    assert got_start == log.frames
    assert len(got_start) == 31
    assert got_middle == log.frames[5:]
    assert await from_start.next(0.1) is None  # stays ended
    await until(lambda: mirror.state == "finished")
    done = await store_b.info(log.stream_id)
    assert done is not None
    assert (done.state, done.last_seq) == (StreamState.DONE, 31)
    assert repr(mirror) == (f"<StreamMirror {log.stream_id} [finished, sent 31 of 31, "
                            f"{mirror.batches} batches]>")
    assert store_a.stats.frames_mirrored == 31
    assert store_a.stats.errors == 0


async def test_cancelling_next_loses_no_frame(make_store: MakeStore) -> None:
    store_a, store_b = make_store("A"), make_store("B")
    log = new_log()
    mirror = mirror_of(store_a, log)
    log.append(frame(0))
    await until(lambda: mirror.sent_seq == 1)
    info = await store_b.info(log.stream_id)
    assert info is not None
    reader = store_b.reader(info, 0)
    assert await reader.next(1.0) == [frame(0)]

    waiting = asyncio.create_task(reader.next(5.0))  # blocked in XREAD BLOCK
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    await produce(log, 2, start=1, delay_s=0)
    assert await read_to_end(reader) == [frame(1), frame(2), DONE_FRAME]
    assert reader.after_seq == 4
    assert store_b.stats.errors == 0


async def test_a_stream_that_failed_before_its_first_frame_carries_its_error(
        make_store: MakeStore) -> None:
    store_a, store_b = make_store("A"), make_store("B")
    log = new_log()
    mirror = mirror_of(store_a, log)
    error = OverloadedError("No upstream is available.", code="no_upstream", retry_after_s=1.0)
    log.fail(error, error_frame(error))
    await until(lambda: mirror.state == "finished")

    info = await store_b.info(log.stream_id)

    assert info is not None
    assert (info.state, info.last_seq, info.error_status, info.error_body) == (
        StreamState.FAILED, 0, 503, error.to_body())
    assert await store_b.reader(info, 0).next(1.0) is None


async def test_maxlen_trims_the_oldest_frames(make_store: MakeStore) -> None:
    store_a, store_b = make_store("A", maxlen=16), make_store("B", maxlen=16)
    log = new_log()
    mirror = mirror_of(store_a, log)
    await produce(log, 12, delay_s=0, finish=False)
    await until(lambda: mirror.sent_seq == 12)
    info = await store_b.info(log.stream_id)
    assert info is not None
    early = store_b.reader(info, 10)  # before the trim: seq 11 is still there

    await produce(log, 29, start=12, delay_s=0)  # 42 frames with [DONE]: seqs 27..42 remain
    await until(lambda: mirror.state == "finished")

    with pytest.raises(StreamTrimmedError) as trimmed:
        await early.next(1.0)
    assert trimmed.value.earliest_seq == 27
    info = await store_b.info(log.stream_id)
    assert info is not None
    assert (info.first_seq, info.last_seq) == (27, 42)
    with pytest.raises(StreamTrimmedError):
        store_b.reader(info, 25)  # the 409 rule: after 25 needs seq 26, dropped
    assert await read_to_end(store_b.reader(info, 26)) == log.frames[26:]


async def test_every_key_has_a_ttl(make_store: MakeStore) -> None:
    store_a, store_b = make_store("A"), make_store("B")  # producer_timeout 2 s, retention 60 s
    log = new_log()
    log.response_id = "resp_ttl"
    mirror = mirror_of(store_a, log)
    log.append(frame(0))
    await until(lambda: mirror.sent_seq == 1)
    info = await store_b.info(log.stream_id)
    assert info is not None
    reader = store_b.reader(info, 0)
    await asyncio.sleep(0.05)
    keys = store_a.keys(log.stream_id)
    alias = f"{PREFIX}{{resp_ttl}}:stream"
    assert keys.meta == f"{PREFIX}{{{log.stream_id}}}:meta"  # one hash tag: one Cluster slot

    running_ttl_ms = (max(3 * 2.0, 1.0) + 10.0) * 1000  # max(3 producer_timeout, detach) + margin
    for key in (keys.events, keys.meta, alias):
        assert running_ttl_ms - 1000 < await store_a.redis.pttl(key) <= running_ttl_ms
    assert 0 < await store_a.redis.pttl(keys.readers) <= 600  # presence_ttl_s

    log.finish(DONE_FRAME)
    await until(lambda: mirror.state == "finished")
    for key in (keys.events, keys.meta, alias):
        assert 59_000 < await store_a.redis.pttl(key) <= 60_000  # retention
    reader.close()


async def test_unknown_streams_are_none_and_false(make_store: MakeStore) -> None:
    store_b = make_store("B")
    stream_id = new_stream_id()

    assert await store_b.info(stream_id) is None
    assert await store_b.info("gs_not-a-stream-id") is None
    assert await store_b.find_response("resp_unknown") is None
    assert await store_b.cancel(stream_id) is False
    assert await store_b.has_remote_readers(stream_id) is False
    assert store_b.stats.errors == 0


async def test_a_responses_alias_written_after_the_first_frames_finds_the_stream(
        make_store: MakeStore) -> None:
    store_a, store_b = make_store("A"), make_store("B")
    log = new_log()
    mirror = mirror_of(store_a, log)
    await produce(log, 3, delay_s=0, finish=False)
    await until(lambda: mirror.sent_seq == 3)
    log.response_id = "resp_0123abc"  # the producer saw response.created
    log.append(frame(3))

    await until(lambda: mirror.sent_seq == 4)

    assert await store_b.find_response("resp_0123abc") == log.stream_id
    log.finish(DONE_FRAME)
    await until(lambda: mirror.state == "finished")
    ttl_ms = await store_a.redis.pttl(f"{PREFIX}{{resp_0123abc}}:stream")
    assert 50_000 < ttl_ms <= 60_000  # the retention once the stream finished


# --- cancel and presence across instances ----------------------------------------------------


async def test_a_cancel_on_b_reaches_the_producer_on_a_within_a_second(make_store: MakeStore) -> None:
    store_a, store_b = make_store("A", producer_timeout_s=3.0), make_store("B")  # A beats every 1 s
    log = new_log()
    cancelled = asyncio.Event()
    mirror = mirror_of(store_a, log, cancelled.set)
    log.append(frame(0))
    await until(lambda: mirror.sent_seq == 1)
    await asyncio.sleep(0.05)  # A's mirror is idle: it learns of the cancel from a heartbeat

    started = time.monotonic()
    assert await store_b.cancel(log.stream_id) is True
    async with asyncio.timeout(1.5):
        await cancelled.wait()

    assert time.monotonic() - started <= 1.2
    stopped = UpstreamError("The stream was cancelled.", code="stream_cancelled")
    log.fail(stopped, error_frame(stopped))  # what cancelling the producer leads to
    info = await store_b.info(log.stream_id)
    assert info is not None
    frames = await read_to_end(store_b.reader(info, 0))
    assert frames == [frame(0), error_frame(stopped)]
    assert await store_b.cancel(log.stream_id) is True  # idempotent, also once finished


async def test_a_remote_reader_counts_as_present_until_it_closes(make_store: MakeStore) -> None:
    store_a, store_b = make_store("A"), make_store("B")
    log = new_log()
    mirror = mirror_of(store_a, log)
    log.append(frame(0))
    await until(lambda: mirror.sent_seq == 1)
    info = await store_b.info(log.stream_id)
    assert info is not None
    reader = store_b.reader(info, 0)
    await asyncio.sleep(0.1)
    assert await store_a.has_remote_readers(log.stream_id)
    assert log.readers == 0  # the mirror is a follower, not a reader

    await asyncio.sleep(1.0)  # longer than presence_ttl_s: renewed while attached
    assert await store_a.has_remote_readers(log.stream_id)
    reader.close()
    await asyncio.sleep(0.1)
    assert not await store_a.has_remote_readers(log.stream_id)


async def test_a_dead_reader_instance_stops_counting_after_its_presence_expires(
        redis_server: RedisServer, make_store: MakeStore) -> None:
    store_a = make_store("A")
    log = new_log()
    mirror = mirror_of(store_a, log)
    log.append(frame(0))
    await until(lambda: mirror.sent_seq == 1)

    async with instance("read", redis_server, log.stream_id) as reader_instance:
        await asyncio.sleep(0.8)  # past presence_ttl_s (0.6 s): the child renews it
        assert await store_a.has_remote_readers(log.stream_id)
        reader_instance.kill()
        await reader_instance.wait()
        killed_at = time.monotonic()

    while await store_a.has_remote_readers(log.stream_id):  # noqa: ASYNC110 -- a poll of Redis
        await asyncio.sleep(0.05)
    assert time.monotonic() - killed_at <= 0.6 + 0.2


# --- a producer that died or stalls -----------------------------------------------------------


async def test_readers_end_with_stream_interrupted_within_producer_timeout_of_a_sigkill(
        redis_server: RedisServer, make_store: MakeStore) -> None:
    producer_timeout_s = 1.0
    store_b = make_store("B", producer_timeout_s=producer_timeout_s)
    store_c = make_store("C", producer_timeout_s=producer_timeout_s)
    stream_id = new_stream_id()
    async with instance("produce", redis_server, stream_id, frames=5,
                        producer_timeout_s=producer_timeout_s) as producer_instance:
        info = await store_b.info(stream_id)
        assert info is not None
        assert (info.state, info.last_seq) == (StreamState.RUNNING, 5)
        reader = store_b.reader(info, 0)
        assert await reader.next(1.0) == [frame(i) for i in range(5)]
        producer_instance.kill()
        await producer_instance.wait()
        killed_at = time.monotonic()

    ending = await read_to_end(reader, timeout_s=producer_timeout_s + 1.0)

    assert time.monotonic() - killed_at <= producer_timeout_s + 0.2
    assert len(ending) == 1
    assert error_code(ending[0]) == "stream_interrupted"
    assert store_b.stats.interrupts == 1
    info = await store_c.info(stream_id)
    assert info is not None
    assert (info.state, info.last_seq) == (StreamState.FAILED, 6)
    second = await read_to_end(store_c.reader(info, 0))
    assert second == [frame(i) for i in range(5)] + ending  # the same ending for everyone
    assert store_c.stats.interrupts == 0


async def test_a_live_but_silent_producer_is_not_interrupted(make_store: MakeStore) -> None:
    store_a = make_store("A", producer_timeout_s=0.5)  # heartbeats every 1/6 s
    store_b = make_store("B", producer_timeout_s=0.5)  # interrupts after 3/8 s of silence
    log = new_log()
    mirror_of(store_a, log)
    log.append(frame(0))
    await asyncio.sleep(0.05)
    info = await store_b.info(log.stream_id)
    assert info is not None
    reader = store_b.reader(info, 0)
    assert await reader.next(1.0) == [frame(0)]

    assert await reader.next(1.5) == []  # no frame for 3 * producer_timeout, yet alive

    log.finish(DONE_FRAME)
    assert await read_to_end(reader) == [DONE_FRAME]
    assert store_b.stats.interrupts == 0


async def test_a_fenced_producer_has_its_appends_refused_and_is_cancelled(make_store: MakeStore) -> None:
    store_a = make_store("A", producer_timeout_s=2.0)  # beats every 2/3 s
    store_b = make_store("B", producer_timeout_s=0.2)  # takes 0.15 s of silence for death
    log = new_log()
    cancelled = asyncio.Event()
    mirror = mirror_of(store_a, log, cancelled.set)
    await produce(log, 3, delay_s=0, finish=False)
    await until(lambda: mirror.sent_seq == 3)
    info = await store_b.info(log.stream_id)
    assert info is not None
    reader = store_b.reader(info, 0)
    assert await reader.next(1.0) == [frame(i) for i in range(3)]

    ending = await read_to_end(reader, timeout_s=2.0)  # B interrupts the "slow" producer
    async with asyncio.timeout(1.5):
        await cancelled.wait()  # A's next heartbeat was refused

    assert len(ending) == 1
    assert error_code(ending[0]) == "stream_interrupted"
    assert mirror.state == "fenced"
    assert mirror.task is not None
    assert mirror.task.done()
    log.append(frame(3))  # the producer goes on locally until cancelled: not mirrored
    await asyncio.sleep(0.1)
    info = await store_b.info(log.stream_id)
    assert info is not None
    assert (info.state, info.last_seq) == (StreamState.FAILED, 4)
    assert store_a.stats.errors == 0  # being fenced is not a Redis failure


# --- Redis down ------------------------------------------------------------------------------


async def test_with_redis_down_streams_go_on_locally_and_failures_are_counted(
        redis_server: RedisServer, make_store: MakeStore) -> None:
    errors = Errors()
    store_a = make_store("A", timeout_s=0.3, on_error=errors)
    store_b = make_store("B", timeout_s=0.3)
    log = new_log()
    mirror = mirror_of(store_a, log)
    log.append(frame(0))
    await until(lambda: mirror.sent_seq == 1)
    info = await store_b.info(log.stream_id)
    assert info is not None
    reader = store_b.reader(info, 0)
    assert await reader.next(1.0) == [frame(0)]

    with captured_warnings() as warnings:
        redis_server.stop()
        await produce(log, 50, start=1, delay_s=0.001)  # never raises, never waits on Redis
        await until(lambda: mirror.state == "failed")
        with pytest.raises(StreamInterruptedError):
            await reader.next(1.0)
        assert await store_a.info(log.stream_id) is None
        assert await store_a.has_remote_readers(log.stream_id) is False
        assert await store_a.cancel(log.stream_id) is False

    assert log.state is StreamState.DONE
    assert log.frames == [frame(i) for i in range(51)] + [DONE_FRAME]
    assert mirror.task is not None
    assert mirror.task.done()
    log.add_cursor(1, log.last_seq)
    log.ack(1, log.last_seq)  # the failed mirror's cursor no longer holds anything back
    assert log.acked_seq == log.last_seq
    assert errors.count == store_a.stats.errors >= 4  # mirror, info, readers, cancel
    assert store_b.stats.errors >= 1
    assert any(r.getMessage().startswith("mirroring a stream to Redis stopped") for r in warnings)


async def test_a_mirror_that_failed_no_longer_holds_the_producer_back(
        redis_server: RedisServer, make_store: MakeStore) -> None:
    store_a = make_store("A", timeout_s=0.3)
    log = StreamLog(new_stream_id(), OWNER, buffer_bytes=64, retain_bytes=0)
    mirror = mirror_of(store_a, log)
    redis_server.stop()
    for i in range(10):  # the mirror's cursor is behind: the log is backlogged
        log.append(frame(i))
    assert log.unsent_bytes > log.buffer_bytes  # backlogged: the producer would wait

    await until(lambda: mirror.state == "failed")
    log.add_cursor(1, 10)
    log.ack(1, 10)  # a client reader caught up; no mirror cursor holds the bytes back

    assert log.unsent_bytes == 0
    assert log.acked_seq == 10


async def test_the_redis_password_is_never_logged(redis_server: RedisServer,
                                                  make_store: MakeStore) -> None:
    async with redis_asyncio.Redis.from_url(redis_server.url) as admin:
        await admin.config_set("requirepass", "the-right-one")
    url = f"redis://:hunter2-secret@127.0.0.1:{redis_server.port}/0"  # a wrong password
    errors = Errors()
    store = make_store("A", url=url, on_error=errors)
    log = new_log()

    with captured_warnings() as warnings:
        mirror = mirror_of(store, log)
        await until(lambda: mirror.state == "failed")

    assert errors.count == 1
    assert warnings
    assert "hunter2" not in repr(store)
    for record in warnings:
        assert "hunter2" not in record.getMessage() + repr(record.__dict__)


# --- cost and lifecycle ----------------------------------------------------------------------


BURST_FRAMES = 400


@pytest.mark.parametrize(("events_per_read", "batch_interval_s", "most_evalshas"), [
    # The relay appends every event of one upstream read at once: a batch takes them all.
    (8, 0.0, BURST_FRAMES / 4),
    # One frame per event-loop iteration (the fastest a producer can go one by one): a
    # batch takes what came while the previous EVALSHA was in flight, a few frames.
    (1, 0.0, BURST_FRAMES / 2),
    # The same with batch_interval_s: a batch takes every frame of the interval.
    (1, 0.005, BURST_FRAMES / 20),
])
async def test_a_burst_of_frames_takes_far_fewer_evalshas_than_frames(
        make_store: MakeStore, events_per_read: int, batch_interval_s: float,
        most_evalshas: float) -> None:
    store_a, store_b = make_store("A", batch_interval_s=batch_interval_s), make_store("B")
    log = new_log()
    mirror = mirror_of(store_a, log)

    for start in range(0, BURST_FRAMES, events_per_read):
        for i in range(start, start + events_per_read):
            log.append(frame(i))
        await asyncio.sleep(0)  # the next upstream read
    log.finish(DONE_FRAME)
    await until(lambda: mirror.state == "finished")

    stats = store_a.stats
    assert stats.frames_mirrored == BURST_FRAMES + 1
    assert stats.append_calls <= most_evalshas, stats
    assert stats.evalsha_calls == stats.append_calls + stats.heartbeat_calls  # the first writes the meta
    info = await store_b.info(log.stream_id)
    assert info is not None
    assert await read_to_end(store_b.reader(info, 0)) == log.frames


async def test_a_stream_whose_frames_and_end_come_at_once_costs_one_evalsha(
        make_store: MakeStore) -> None:
    store_a, store_b = make_store("A"), make_store("B")
    log = new_log()
    mirror = mirror_of(store_a, log)
    for i in range(16):  # a short stream: every event came in one upstream read
        log.append(frame(i))
    log.finish(DONE_FRAME)

    await until(lambda: mirror.state == "finished")

    assert store_a.stats.evalsha_calls == store_a.stats.commands == 1  # meta, frames, end
    assert (store_a.stats.append_calls, store_a.stats.heartbeat_calls) == (1, 0)
    info = await store_b.info(log.stream_id)
    assert info is not None
    assert (info.owner, info.instance_id, info.state, info.endpoint, info.headers) == (
        OWNER, "A", StreamState.DONE, "chat.completions", HEADERS)
    assert await read_to_end(store_b.reader(info, 0)) == log.frames


async def test_a_short_responses_stream_sets_its_alias_once_in_the_round_trip_of_its_batch(
        make_store: MakeStore) -> None:
    store_a = make_store("A")
    await warm_up(store_a)
    before = dataclasses.replace(store_a.stats)
    log = new_log()
    log.response_id = "resp_short"
    mirror = mirror_of(store_a, log)
    for i in range(4):
        log.append(frame(i))
    log.finish(DONE_FRAME)

    await until(lambda: mirror.state == "finished")

    stats = store_a.stats
    assert stats.evalsha_calls - before.evalsha_calls == 1
    assert stats.commands - before.commands == 2  # the EVALSHA and one SET of the alias
    assert stats.pipelines - before.pipelines == 1  # in one round trip
    assert await store_a.find_response("resp_short") == log.stream_id
    assert 59_000 < await store_a.redis.pttl(f"{PREFIX}{{resp_short}}:stream") <= 60_000


async def test_the_meta_of_a_stream_without_frames_exists_within_the_heartbeat_interval(
        make_store: MakeStore) -> None:
    store_a = make_store("A", producer_timeout_s=0.6)  # beats every 0.2 s
    store_b = make_store("B", producer_timeout_s=0.6)
    log = new_log()
    cancelled = asyncio.Event()
    started = time.monotonic()
    mirror = mirror_of(store_a, log, cancelled.set)
    await asyncio.sleep(0.05)
    assert await store_b.info(log.stream_id) is None  # it waits for a frame, like a batch
    assert (mirror.state, store_a.stats.evalsha_calls) == ("opening", 0)

    await until(lambda: mirror.state == "mirroring", timeout_s=1.0)

    assert time.monotonic() - started <= store_a.heartbeat_interval_s + 0.1
    info = await store_b.info(log.stream_id)
    assert info is not None
    assert (info.owner, info.instance_id, info.state, info.last_seq, info.headers) == (
        OWNER, "A", StreamState.RUNNING, 0, HEADERS)
    assert (store_a.stats.append_calls, store_a.stats.heartbeat_calls) == (0, 1)
    reader = store_b.reader(info, 0)
    assert await reader.next(0.9) == []  # alive: heartbeats, no interrupt, for > producer_timeout
    assert store_b.stats.interrupts == 0
    assert await store_b.cancel(log.stream_id) is True  # the cancel reaches the producer
    async with asyncio.timeout(1.0):
        await cancelled.wait()
    error = UpstreamError("The stream was cancelled.", code="stream_cancelled")
    log.fail(error, error_frame(error))  # before its first frame: an HTTP error, no frame
    await until(lambda: mirror.state == "finished")
    info = await store_b.info(log.stream_id)
    assert info is not None
    assert (info.state, info.last_seq, info.error_status, info.error_body) == (
        StreamState.FAILED, 0, error.http_status, error.to_body())
    assert await reader.next(1.0) is None


async def test_a_stream_mirrored_twice_fails_the_second_mirror(make_store: MakeStore) -> None:
    store_a, store_b = make_store("A"), make_store("B")
    log = new_log()
    first = mirror_of(store_a, log)
    log.append(frame(0))
    await until(lambda: first.sent_seq == 1)
    twin = StreamLog(log.stream_id, "someone-else")  # the same id: refused, nothing written
    errors_before = store_b.stats.errors
    second = mirror_of(store_b, twin)
    twin.append(frame(99))

    await until(lambda: second.state == "failed")

    assert store_b.stats.errors == errors_before + 1
    info = await store_a.info(log.stream_id)
    assert info is not None
    assert (info.owner, info.instance_id, info.last_seq) == (OWNER, "A", 1)
    log.finish(DONE_FRAME)
    await until(lambda: first.state == "finished")


async def test_mirroring_survives_a_script_flush(redis_server: RedisServer, make_store: MakeStore) -> None:
    store_a, store_b = make_store("A"), make_store("B")
    logs = [new_log() for _ in range(3)]
    mirrors = [mirror_of(store_a, log) for log in logs]
    for log in logs:
        log.append(frame(0))
    await until(lambda: all(m.sent_seq == 1 for m in mirrors))

    async with redis_asyncio.Redis.from_url(redis_server.url) as admin:
        await admin.script_flush()  # a restart or failover empties the script cache
    before = dataclasses.replace(store_a.stats)
    for log in logs:  # three batches in one pipeline: three NOSCRIPTs
        for i in range(1, 4):
            log.append(frame(i))
        log.finish(DONE_FRAME)
    await until(lambda: all(m.state == "finished" for m in mirrors))

    assert store_a.stats.pipelines - before.pipelines == 2  # the script loaded, the three again
    for log in logs:
        info = await store_b.info(log.stream_id)
        assert info is not None
        assert info.last_seq == 5
    assert store_a.stats.errors == 0


async def test_evalshas_asked_for_together_share_one_round_trip(make_store: MakeStore) -> None:
    store_a, store_b = make_store("A"), make_store("B")
    await warm_up(store_a)
    before = dataclasses.replace(store_a.stats)
    logs = [new_log() for _ in range(20)]
    mirrors = [mirror_of(store_a, log) for log in logs]
    for log in logs:  # 20 short streams end in the same event-loop iteration
        for i in range(3):
            log.append(frame(i))
        log.finish(DONE_FRAME)

    await until(lambda: all(m.state == "finished" for m in mirrors))

    assert store_a.stats.evalsha_calls - before.evalsha_calls == 20
    assert store_a.stats.pipelines - before.pipelines == 1
    for log in logs:
        info = await store_b.info(log.stream_id)
        assert info is not None
        assert (info.state, info.last_seq) == (StreamState.DONE, 4)
    assert store_a.stats.errors == 0


async def test_a_stalled_redis_fails_the_calls_in_time_and_later_ones_go_through(
        redis_server: RedisServer, make_store: MakeStore) -> None:
    errors = Errors()
    store_a, store_b = make_store("A", timeout_s=0.3, on_error=errors), make_store("B")
    stalled = new_log()
    mirror = mirror_of(store_a, stalled)
    stalled.append(frame(0))
    await until(lambda: mirror.sent_seq == 1)
    async with redis_asyncio.Redis.from_url(redis_server.url) as admin:
        await admin.execute_command("CLIENT", "PAUSE", 800)  # every command waits 0.8 s

    started = time.monotonic()
    stalled.append(frame(1))
    assert await store_a.has_remote_readers(stalled.stream_id) is False  # timed out: counted
    await until(lambda: mirror.state == "failed")

    assert time.monotonic() - started <= 0.3 + 0.15  # timeout_s
    assert errors.count == 2
    await asyncio.sleep(0.6)  # the pause is over
    log = new_log()
    later = mirror_of(store_a, log)
    await produce(log, 2, delay_s=0)
    await until(lambda: later.state == "finished")
    info = await store_b.info(log.stream_id)
    assert info is not None
    assert (info.state, info.last_seq) == (StreamState.DONE, 3)
    assert errors.count == 2


async def test_close_flushes_finished_logs_and_leaves_running_ones_to_be_interrupted(
        make_store: MakeStore) -> None:
    store_a, store_b = make_store("A"), make_store("B")
    finished, running, silent = new_log(), new_log(), new_log()
    mirrors = [mirror_of(store_a, log) for log in (finished, running, silent)]
    for log in (finished, running):
        await produce(log, 3, delay_s=0, finish=log is finished)

    await store_a.close()

    assert [m.state for m in mirrors] == ["finished", "stopped", "stopped"]
    assert store_a.mirror(new_log(), lambda: None) is None  # closed: mirrors nothing
    done, live = await store_b.info(finished.stream_id), await store_b.info(running.stream_id)
    assert done is not None
    assert (done.state, done.last_seq) == (StreamState.DONE, 4)
    assert live is not None
    assert (live.state, live.last_seq) == (StreamState.RUNNING, 3)
    no_frame = await store_b.info(silent.stream_id)  # stop() writes the meta it owed
    assert no_frame is not None
    assert (no_frame.state, no_frame.last_seq) == (StreamState.RUNNING, 0)
    assert running.readers == 0
    assert finished.readers == 0
    assert repr(store_a) == ("<RedisStreamStore A [mirrors: 0, readers: 0 | evalsha: "
                             f"{store_a.stats.evalsha_calls}, frames mirrored: 7, errors: 0] closed>")
