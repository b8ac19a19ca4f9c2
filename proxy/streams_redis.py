"""Stream logs mirrored into Redis Streams, so any instance can serve a resume (DESIGN §5).

The producing instance's ``StreamLog`` stays the truth; Redis holds a copy that every other
instance reads. ``RedisStreamStore.mirror(log, on_cancel)`` starts a ``StreamMirror`` that
copies the log into Redis, and ``RedisStreamStore.reader(info, after_seq)`` gives a
``RemoteStreamReader`` (the duck type of ``proxy.streams.StreamReader``) that serves a
resume from Redis on whichever instance the client reconnected to.

Keys (``prefix`` is ``state.key_prefix``; the ``{…}`` hash tag keeps one stream's keys in one
Redis Cluster slot, so every script touches one slot)::

    <prefix>{gs_…}:events   Redis Stream: entry id "<seq>-0" (seq from 1, as in the log), one
                            field "f": the SSE frame without its ``id:`` line; exact MAXLEN
                            ``streams.redis_maxlen``
    <prefix>{gs_…}:meta     hash: owner (key name), instance, endpoint, headers (JSON), state
                            (running | done | failed), epoch, first_seq, last_seq,
                            heartbeat_ms (Redis's clock), cancel_requested, and error_status,
                            error_body (a stream that failed before its first frame),
                            interrupted_ms (a stream a reader ended)
    <prefix>{gs_…}:readers  sorted set: id of a reader on any instance → when its presence
                            expires (ms, Redis's clock)
    <prefix>{resp_…}:stream string: the stream id of a Responses API response

TTLs: every key has one. While a stream runs, ``events`` and ``meta`` live ``running_ttl_ms``
= max(3 * producer_timeout, detach_timeout) + ``RUNNING_TTL_MARGIN_S``, refreshed by every
append and heartbeat; once it ended (done, failed, or interrupted by a reader), ``retention``.
The alias has the same TTLs (refreshed every third of the running TTL). ``readers`` lives
``presence_ttl_s`` after its last touch.

Costs: the mirror sends one EVALSHA per batch, a batch being every frame the log gained while
the previous EVALSHA was in flight, or within ``batch_interval_s`` if set (at most
``MAX_BATCH_FRAMES`` / ``MAX_BATCH_BYTES``), plus a heartbeat (an empty batch) when it sent
nothing for ``heartbeat_interval_s``. The first batch also writes the meta; like any batch it
waits for a frame, the log's end, ``stop()`` or the heartbeat interval, so a stream whose
frames and end come at once costs one EVALSHA, and the meta exists at the latest
``heartbeat_interval_s`` after ``mirror()`` (with the error status and body of a stream that
failed before its first frame, if it closed by then). A Responses API stream adds a SET of its
alias with the first batch that knows the response id, every third of the running TTL while
it runs, and with the last batch (one SET when that is the same batch). A store sends its
EVALSHAs (every mirror's and reader's) and these SETs in pipelines, one at a time: what was
asked for while one was in flight shares the next round trip (a SET after its batch's
EVALSHA), so busy streams cost the producer a fraction of a round trip each. A remote reader
costs one pipelined XREAD BLOCK + HMGET (one round trip) per batch it receives
(a backlog comes ``READ_COUNT`` entries at a time). ``RedisStreamStats`` counts them.

Liveness: the producer's mirror beats at least every min(producer_timeout / 3, 1 s). A
reader whose blocking read finds nothing for ``poll_interval_s`` runs ``stream_interrupt.lua``
(at most once per ``poll_interval_s``), which ends a stream whose heartbeat is older than
producer_timeout - poll_interval with a ``stream_interrupted`` error event at last_seq + 1,
atomically, so every reader sees the same ending within ``producer_timeout`` of the
producer's death, and bumps the epoch: a producer that was only slow has its next append
refused ("fenced") and its mirror calls ``on_cancel``. ``cancel()`` on any instance sets a
flag in the meta that the producer's mirror reads from its next append or heartbeat reply.
Readers record their presence (``reader_touch.lua``) at least every second, so the producing
instance does not cancel a stream at its detach timeout while another instance reads it.

Failures: Redis unreachable or slow never raises into a caller except a remote reader's
``next`` (which raises ``StreamInterruptedError``, a ``GatewayError``, so the stream ends with
an error event, never silently). Each failure is counted (``stats.errors`` and the injected
``on_error``) and logged (logger ``proxy.error``, at most one line per kind per
``WARN_INTERVAL_S``, never the Redis URL). A mirror that fails stops mirroring that stream and
detaches its cursor (the local stream goes on, resumable on this instance only); its meta is
left to expire. Every script is idempotent or conditional, so a call that timed out but ran
later does no harm.

Scripts live in ``proxy/lua/*.lua`` (each file documents its KEYS, ARGV and reply); they are
read once with ``importlib.resources`` and run with EVALSHA (a script Redis answers NOSCRIPT
for is loaded again and its calls run again).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, NamedTuple, cast

import orjson
import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from proxy.streams import (
    StreamInterruptedError,
    StreamLog,
    StreamState,
    StreamTrimmedError,
    check_cursor,
    error_frame,
    valid_stream_id,
)

error_log = logging.getLogger("proxy.error")

#: The longest gap between two heartbeats of a producer's mirror, and between two liveness
#: checks of an idle remote reader (both also scale down with ``producer_timeout_s``).
HEARTBEAT_MAX_S = 1.0
POLL_MAX_S = 0.5
#: Added to a running stream's TTL: the keys outlive a dead producer long enough for every
#: reader to see the interrupt.
RUNNING_TTL_MARGIN_S = 10.0
#: The shortest TTL of a finished stream (``streams.retention: 0`` would delete it at once,
#: under the feet of readers still reading its last batch).
MIN_RETENTION_MS = 1000
#: The most frames, and bytes, one append EVALSHA carries (a backlog goes in several).
MAX_BATCH_FRAMES = 512
MAX_BATCH_BYTES = 1024 * 1024
#: Connections to Redis per process: remote readers hold one during each blocking read
#: (at most ``POLL_MAX_S``), the EVALSHA pipeline one, lookups one each.
MAX_CONNECTIONS = 512
#: The most entries one read of a remote reader returns.
READ_COUNT = 512
#: The field of a stream entry that holds the frame.
FRAME_FIELD = b"f"
#: At most one warning per kind of failure per this many seconds (each is still counted).
WARN_INTERVAL_S = 10.0

Redis = redis_asyncio.Redis
RedisFailure = (RedisError, OSError, TimeoutError)
Entry = tuple[bytes, dict[bytes, bytes]]
FailureKind = Literal["mirror", "read", "presence", "lookup"]

_WARNINGS: dict[FailureKind, str] = {
    "mirror": "mirroring a stream to Redis stopped; it stays resumable on this instance only",
    "read": "reading a stream from Redis failed; the reader ends it with stream_interrupted",
    "presence": "recording this instance's stream readers in Redis failed",
    "lookup": "a stream lookup in Redis failed; answering as if the stream were unknown",
}


@functools.cache
def _load_lua(name: str) -> str:
    """The text of ``proxy/lua/<name>.lua`` (package data, read once per process)."""
    return (resources.files("proxy") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The Redis keys of one stream (all in the slot of the hash tag ``{stream_id}``)."""

    events: str
    meta: str
    readers: str

    @classmethod
    def of(cls, prefix: str, stream_id: str) -> StreamKeys:
        tagged = f"{prefix}{{{stream_id}}}"
        return cls(tagged + ":events", tagged + ":meta", tagged + ":readers")


def response_key(prefix: str, response_id: str) -> str:
    """The alias key of a Responses API response: its value is the stream id."""
    return f"{prefix}{{{response_id}}}:stream"


@dataclass(frozen=True, slots=True)
class RemoteStreamInfo:
    """A mirrored stream as its meta hash describes it.

    Attributes:
        stream_id: the public id (``gs_…``).
        owner: the name of the virtual key that may read it.
        instance_id: the gateway instance that produces (produced) it.
        state: running, done, or failed (also when a reader interrupted it).
        first_seq: the oldest seq Redis still holds (MAXLEN trims older ones).
        last_seq: the newest seq (0: no frame yet).
        headers: response headers every resumer replays (``x-ratelimit-*``).
        endpoint: the endpoint label (``chat.completions``).
        error_status, error_body: the HTTP status and OpenAI error body of a stream that
            failed before its first frame, else ``None``.
    """

    stream_id: str
    owner: str
    instance_id: str
    state: StreamState
    first_seq: int
    last_seq: int
    headers: dict[str, str]
    endpoint: str
    error_status: int | None
    error_body: dict[str, Any] | None


def _info_from_meta(stream_id: str, meta: dict[bytes, bytes]) -> RemoteStreamInfo | None:
    """Parse a meta hash; ``None`` when it is empty (unknown, expired) or malformed."""
    try:
        status, body = meta.get(b"error_status"), meta.get(b"error_body")
        headers = orjson.loads(meta[b"headers"])
        if not isinstance(headers, dict):
            return None
        return RemoteStreamInfo(
            stream_id, meta[b"owner"].decode(), meta[b"instance"].decode(),
            StreamState(meta[b"state"].decode()), int(meta[b"first_seq"]), int(meta[b"last_seq"]),
            {str(k): str(v) for k, v in headers.items()}, meta[b"endpoint"].decode(),
            int(status) if status else None, orjson.loads(body) if body else None)
    except (KeyError, ValueError):  # orjson.JSONDecodeError and UnicodeDecodeError included
        return None


@dataclass(slots=True)
class RedisStreamStats:
    """What one store has sent to Redis since it started (for metrics and the load test).

    ``append_calls + heartbeat_calls`` of ``evalsha_calls`` are the mirror's; divide by
    ``frames_mirrored`` for "Redis commands per streamed token" on the producing side.
    """

    evalsha_calls: int = 0  # every EVALSHA (all scripts)
    pipelines: int = 0  # the round trips that carried them
    commands: int = 0  # every Redis command (EVALSHA, XREAD, HMGET, GET, SET, ...) but SCRIPT LOAD
    append_calls: int = 0  # stream_append EVALSHAs that carried frames
    heartbeat_calls: int = 0  # stream_append EVALSHAs that carried none
    frames_mirrored: int = 0
    bytes_mirrored: int = 0
    interrupts: int = 0  # streams a reader here ended (their producer's heartbeat was stale)
    errors: int = 0  # failed or refused Redis operations (also reported to ``on_error``)


class _Queued(NamedTuple):
    """A command waiting in the store's queue for the next pipeline."""

    command: tuple[str | int | bytes, ...]  # e.g. ("EVALSHA", sha, 2, key, key, arg, ...)
    script: AsyncScript | None  # an EVALSHA's script: loaded again after NOSCRIPT
    reply: asyncio.Future[Any]


def _settle(future: asyncio.Future[Any], reply: Any) -> None:
    """Hand ``reply`` (an exception: raise it) to the caller waiting on ``future``, if it
    still waits."""
    if future.done():
        return
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)


class _Progress(NamedTuple):
    """A stream's state and newest seq as a reader last saw them (state ``None``: no meta)."""

    state: StreamState | None
    last_seq: int


def _progress(state: bytes | str | None, last_seq: bytes | int | None) -> _Progress:
    if not state:
        return _Progress(None, 0)
    text = state.decode() if isinstance(state, bytes) else state
    return _Progress(StreamState(text), int(last_seq or 0))


def _seq_of(entry_id: bytes) -> int:
    """``b"12-0"`` → 12."""
    return int(entry_id.partition(b"-")[0])


class RedisStreamStore:
    """Stream logs in Redis Streams: mirrors for the logs produced here, readers for the
    streams produced anywhere. Implements ``proxy.streams.RemoteStreams``.

    Args:
        redis_url: ``state.redis_url`` (never logged).
        key_prefix: ``state.key_prefix``.
        timeout_s: the longest one Redis call may take (a blocking read: its block time plus
            this); a call that takes longer counts as a failure. Keep it well under
            ``producer_timeout_s`` (a stalled mirror is taken for a dead producer).
        producer_timeout_s: ``streams.producer_timeout``: readers end a stream whose
            producer has been silent this long with ``stream_interrupted``.
        detach_timeout_s: ``streams.detach_timeout`` (a running stream's keys outlive it).
        retention_s: ``streams.retention``: how long a finished stream stays in Redis.
        maxlen: ``streams.redis_maxlen``: entries kept per stream.
        on_error: called once per failed or refused Redis operation (a metric).
        instance_id: names this instance in the meta and in reader ids (default: host, pid
            and a random suffix).
        presence_ttl_s: how long a reader's presence counts without being renewed; it is
            renewed every min(1 s, presence_ttl_s / 3).
        batch_interval_s: the least time between the end of one append EVALSHA of a mirror
            and the start of the next while its log runs (0: none). Readers on other
            instances see frames up to this much later (readers here read the log itself);
            in exchange a batch takes every frame of the interval, so a stream of r frames
            per second costs about max(1, r * batch_interval_s) times fewer EVALSHAs.

    Attributes:
        stats: counters of what was sent (``RedisStreamStats``).
        heartbeat_interval_s: the longest a mirror goes without an EVALSHA.
        poll_interval_s: how often an idle reader checks the producer's heartbeat.
    """

    def __init__(self, redis_url: str, key_prefix: str = "shepherd:", *, timeout_s: float,
                 producer_timeout_s: float, detach_timeout_s: float, retention_s: float,
                 maxlen: int, on_error: Callable[[], None] = lambda: None,
                 instance_id: str | None = None, presence_ttl_s: float = 3.0,
                 batch_interval_s: float = 0.0) -> None:
        # A blocking pool: past MAX_CONNECTIONS a call waits (within its own timeout) for a
        # connection instead of failing (redis-py's default pool raises MaxConnectionsError
        # at 100, which ended mirrors and remote readers under a burst of streams).
        pool = redis_asyncio.BlockingConnectionPool.from_url(
            redis_url, max_connections=MAX_CONNECTIONS, timeout=None,
            socket_connect_timeout=max(timeout_s, 0.5),
            socket_timeout=POLL_MAX_S + max(timeout_s * 4, 1.0), health_check_interval=0,
            retry=Retry(NoBackoff(), 0))  # our own timeouts decide; every script is idempotent
        self.redis: Redis = redis_asyncio.Redis.from_pool(pool)  # closes the pool on aclose()
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.maxlen = maxlen
        self.batch_interval_s = batch_interval_s
        self.instance_id = instance_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.heartbeat_interval_s = min(producer_timeout_s / 3, HEARTBEAT_MAX_S)
        self.poll_interval_s = min(producer_timeout_s / 4, POLL_MAX_S)
        self.stale_after_ms = round((producer_timeout_s - self.poll_interval_s) * 1000)
        self.running_ttl_ms = round((max(3 * producer_timeout_s, detach_timeout_s)
                                     + RUNNING_TTL_MARGIN_S) * 1000)
        self.retention_ms = max(MIN_RETENTION_MS, round(retention_s * 1000))
        self.presence_ttl_ms = round(presence_ttl_s * 1000)
        self.presence_interval_s = min(HEARTBEAT_MAX_S, presence_ttl_s / 3)
        self.stats = RedisStreamStats()
        self._on_error = on_error
        self._scripts = {name: self.redis.register_script(_load_lua(name)) for name in (
            "stream_append", "stream_interrupt", "stream_cancel", "reader_touch", "reader_count")}
        self._mirrors: set[StreamMirror] = set()
        self._readers: dict[str, RemoteStreamReader] = {}
        self._reader_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._presence_task: asyncio.Task[None] | None = None
        self._queued: list[_Queued] = []
        self._sender: asyncio.Task[None] | None = None
        self._quiet_until: dict[FailureKind, float] = {}
        self._unlogged: dict[FailureKind, int] = {}
        self._closed = False

    def __repr__(self) -> str:
        s = self.stats
        return (f"<RedisStreamStore {self.instance_id} [mirrors: {len(self._mirrors)}, readers: "
                f"{len(self._readers)} | evalsha: {s.evalsha_calls}, frames mirrored: "
                f"{s.frames_mirrored}, errors: {s.errors}]{' closed' if self._closed else ''}>")

    def keys(self, stream_id: str) -> StreamKeys:
        """The Redis keys of ``stream_id``."""
        return StreamKeys.of(self.key_prefix, stream_id)

    # --- producing side ------------------------------------------------------------------

    def mirror(self, log: StreamLog, on_cancel: Callable[[], None]) -> StreamMirror | None:
        """Start copying ``log`` into Redis, in a task this store owns (``close`` ends it).

        Call it right after the log is created (before frames can be trimmed), with
        ``log.headers`` and ``log.endpoint`` set. The mirror attaches to the log as a
        follower cursor and sends one batch per EVALSHA: the first also writes the meta
        (owner, endpoint, ``log.headers``), as soon as the log has a frame or ended, or
        within ``heartbeat_interval_s``; the last writes the final state (with
        ``log.error``'s status and body, and the ``log.response_id`` alias).
        ``on_cancel`` is called (once, from the mirror's task) when a cancel was requested
        on any instance, or when a reader ended the stream as interrupted; it should cancel
        the producer. Returns ``None`` (and mirrors nothing) once the store is closed or
        when the log already dropped frames. Never raises.
        """
        if self._closed:
            return None
        if log.first_seq > 1:
            self._report("mirror", log.stream_id, "log_already_trimmed")
            return None
        mirror = StreamMirror(self, log, on_cancel)
        self._mirrors.add(mirror)
        mirror.task = self._spawn(mirror.run())
        mirror.task.add_done_callback(lambda _task: self._mirrors.discard(mirror))
        return mirror

    async def has_remote_readers(self, stream_id: str) -> bool:
        """Whether a reader on any instance is attached to ``stream_id`` now (its presence
        was renewed within ``presence_ttl_s``). ``False`` when Redis fails (counted): the
        stream is then treated as on a single instance. Cancelling is safe."""
        try:
            count = await self._eval("reader_count", [self.keys(stream_id).readers], [])
        except RedisFailure as exc:
            self._report("lookup", stream_id, type(exc).__name__)
            return False
        return int(count) > 0

    async def cancel(self, stream_id: str) -> bool:
        """Ask the producer of ``stream_id``, on whichever instance, to stop (idempotent; a
        finished stream is left as it is). Its mirror learns it within
        ``heartbeat_interval_s``. ``False`` if the stream is unknown or expired, or Redis
        failed (counted). Cancelling is safe."""
        if not valid_stream_id(stream_id):
            return False
        try:
            known = await self._eval("stream_cancel", [self.keys(stream_id).meta], [])
        except RedisFailure as exc:
            self._report("lookup", stream_id, type(exc).__name__)
            return False
        return bool(known)

    # --- reading side --------------------------------------------------------------------

    async def info(self, stream_id: str) -> RemoteStreamInfo | None:
        """The mirrored stream ``stream_id``; ``None`` when it is unknown, expired, not a
        stream id, or Redis failed (counted). Cancelling is safe."""
        if not valid_stream_id(stream_id):
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                self.stats.commands += 1
                meta = cast(dict[bytes, bytes], await self.redis.hgetall(self.keys(stream_id).meta))
        except RedisFailure as exc:
            self._report("lookup", stream_id, type(exc).__name__)
            return None
        return _info_from_meta(stream_id, meta) if meta else None

    async def find_response(self, response_id: str) -> str | None:
        """The stream id of the Responses API response ``response_id``; ``None`` when no
        instance streams (or streamed, within retention) it, or Redis failed (counted).
        Cancelling is safe."""
        try:
            async with asyncio.timeout(self.timeout_s):
                self.stats.commands += 1
                stream_id = cast(bytes | None,
                                 await self.redis.get(response_key(self.key_prefix, response_id)))
        except RedisFailure as exc:
            self._report("lookup", response_id, type(exc).__name__)
            return None
        return stream_id.decode() if stream_id else None

    def reader(self, info: RemoteStreamInfo, after_seq: int) -> RemoteStreamReader:
        """A reader of the mirrored stream ``info`` from ``after_seq`` (0: from the start).
        Its presence is recorded in Redis until ``close()``.

        Raises:
            InvalidRequestError: ``after_seq`` beyond ``info.last_seq`` (400).
            StreamTrimmedError: ``after_seq`` older than Redis retains (409).
        """
        check_cursor(after_seq, info.first_seq, info.last_seq)
        reader = RemoteStreamReader(self, info.stream_id, after_seq,
                                    f"{self.instance_id}:{next(self._reader_ids)}")
        self._readers[reader.reader_id] = reader
        self._spawn(self._touch(reader.stream_id, [reader.reader_id]))
        if self._presence_task is None or self._presence_task.done():
            self._presence_task = self._spawn(self._keep_presence())
        return reader

    def _forget_reader(self, reader: RemoteStreamReader) -> None:
        if self._readers.pop(reader.reader_id, None) is not None:
            self._spawn(self._remove_presence(reader))

    async def _keep_presence(self) -> None:
        """Renew the presence of every open reader every ``presence_interval_s`` (one
        EVALSHA per stream), until none is left."""
        while self._readers:
            await asyncio.sleep(self.presence_interval_s)
            by_stream: dict[str, list[str]] = {}
            for reader in self._readers.values():
                by_stream.setdefault(reader.stream_id, []).append(reader.reader_id)
            await asyncio.gather(*(self._touch(s, ids) for s, ids in by_stream.items()))

    async def _touch(self, stream_id: str, reader_ids: list[str]) -> None:
        try:
            await self._eval("reader_touch", [self.keys(stream_id).readers],
                             [self.presence_ttl_ms, *reader_ids])
        except RedisFailure as exc:
            self._report("presence", stream_id, type(exc).__name__)

    async def _remove_presence(self, reader: RemoteStreamReader) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                self.stats.commands += 1
                await self.redis.zrem(self.keys(reader.stream_id).readers, reader.reader_id)
        except RedisFailure as exc:  # it expires within presence_ttl_s
            self._report("presence", reader.stream_id, type(exc).__name__)

    async def _interrupt_if_stale(self, stream_id: str) -> _Progress:
        """Run ``stream_interrupt.lua``: end ``stream_id`` with ``stream_interrupted`` if its
        producer's heartbeat is stale. Returns the state after the call.

        Raises:
            RedisError, OSError, TimeoutError: Redis failed.
        """
        keys = self.keys(stream_id)
        frame = error_frame(StreamInterruptedError(
            "The gateway instance producing this stream stopped before the stream ended."))
        outcome, state, last_seq = await self._eval(
            "stream_interrupt", [keys.events, keys.meta],
            [self.stale_after_ms, self.maxlen, self.retention_ms, frame])
        if outcome == b"interrupted":
            self.stats.interrupts += 1
            error_log.warning("stream interrupted: its producer's heartbeat is stale",
                              extra={"stream_id": stream_id, "last_seq": int(last_seq)})
        return _progress(state, last_seq)

    # --- plumbing ------------------------------------------------------------------------

    async def _eval(self, script: str, keys: Sequence[str], args: Sequence[str | int | bytes]) -> Any:
        """EVALSHA the script ``proxy/lua/<script>.lua``: its reply within ``timeout_s``.

        Raises:
            RedisError, OSError, TimeoutError: Redis failed or did not answer in time.
        Cancelling is safe; the script may still run (each is idempotent or conditional).
        """
        [reply] = await self._replies(self._eval_soon(script, keys, args))
        return reply

    def _eval_soon(self, script: str, keys: Sequence[str],
                   args: Sequence[str | int | bytes]) -> asyncio.Future[Any]:
        """Queue an EVALSHA of ``proxy/lua/<script>.lua`` (see ``_soon``)."""
        self.stats.evalsha_calls += 1
        lua = self._scripts[script]
        return self._soon(("EVALSHA", lua.sha, len(keys), *keys, *args), lua)

    def _soon(self, command: tuple[str | int | bytes, ...],
              script: AsyncScript | None = None) -> asyncio.Future[Any]:
        """Queue ``command`` for the store's sender (``_send_queued``); the future gets its
        reply, or raises its error. Every command queued while the previous pipeline was in
        flight goes in the next one, in order: one round trip (redis-py spends much of its
        CPU per round trip: pool, socket, timeouts). Await it with ``_replies``."""
        self.stats.commands += 1
        reply = asyncio.get_running_loop().create_future()
        self._queued.append(_Queued(command, script, reply))
        if self._sender is None or self._sender.done():
            self._sender = self._spawn(self._send_queued())
        return reply

    async def _replies(self, *futures: asyncio.Future[Any]) -> list[Any]:
        """The replies of queued commands, within ``timeout_s``.

        Raises:
            RedisError, OSError, TimeoutError: Redis failed or did not answer in time (the
                error of the first that failed; the others' are retrieved too).
        Cancelling is safe: commands not sent yet are dropped, the others may still run.
        """
        async with asyncio.timeout(self.timeout_s):
            if len(futures) == 1:  # most calls: without gather's bookkeeping
                return [await futures[0]]
            return await asyncio.gather(*futures)

    async def _send_queued(self) -> None:
        """Send the queued commands, one pipeline at a time, until the queue is empty (then
        this task ends; the next ``_soon`` starts another). Never raises: each command's
        future gets its reply or the error."""
        while self._queued:
            queued = [q for q in self._queued if not q.reply.done()]  # not timed out meanwhile
            self._queued = []
            if queued:
                await self._send(queued)

    async def _send(self, queued: list[_Queued]) -> None:
        """Run ``queued`` in one pipeline within ``timeout_s`` and settle their futures."""
        try:
            async with asyncio.timeout(self.timeout_s):
                replies = await self._pipeline(queued)
        except RedisFailure as exc:
            replies = [exc] * len(queued)
        except asyncio.CancelledError:  # close() cancelled the sender: nobody waits in vain
            for q in queued:
                _settle(q.reply, RedisConnectionError("the stream store closed"))
            raise
        for q, reply in zip(queued, replies, strict=True):
            _settle(q.reply, reply)

    async def _pipeline(self, queued: list[_Queued], reload: bool = True) -> list[Any]:
        """The reply of each command (a ``ResponseError`` for one that failed) from one
        pipeline; scripts Redis lost (NOSCRIPT: a restart, a failover, SCRIPT FLUSH) are
        loaded again and their EVALSHAs run again, once.

        Raises:
            RedisError, OSError: Redis failed.
        """
        self.stats.pipelines += 1
        pipe = self.redis.pipeline(transaction=False)
        for q in queued:
            pipe.execute_command(*q.command)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost and reload:
            for script in {queued[i].script for i in lost}:
                if script is not None:
                    await self.redis.script_load(script.script)
            again = await self._pipeline([queued[i] for i in lost], reload=False)
            for i, reply in zip(lost, again, strict=True):
                replies[i] = reply
        return replies

    def _report(self, kind: FailureKind, stream_id: str, reason: str) -> None:
        """Count a failed or refused Redis operation and log it (at most once per kind per
        ``WARN_INTERVAL_S``; the line says how many went unlogged since)."""
        self.stats.errors += 1
        self._on_error()
        now = time.monotonic()
        if now < self._quiet_until.get(kind, 0.0):
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            return
        self._quiet_until[kind] = now + WARN_INTERVAL_S
        error_log.warning(_WARNINGS[kind], extra={
            "stream_id": stream_id, "error": reason, "unlogged": self._unlogged.pop(kind, 0)})

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error_log.error("redis stream task failed", exc_info=task.exception())

    async def close(self) -> None:
        """Stop every mirror (each sends what its log still holds, and the final state of a
        log that closed), forget every reader's presence, then close the Redis client.
        Waits at most max(1 s, 4 * timeout_s) for that; what is still running then is
        cancelled. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for mirror in list(self._mirrors):
            mirror.stop()
        for reader in list(self._readers.values()):
            reader.close()
        flushing = [task for task in self._tasks if task is not self._presence_task]
        if flushing:
            await asyncio.wait(flushing, timeout=max(1.0, 4 * self.timeout_s))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()


MirrorState = Literal["opening", "mirroring", "finished", "stopped", "fenced", "failed"]
#: The meta fields of ``stream_append.lua`` once the meta exists (Redis ignores them).
_NO_META_FIELDS = ("", "", "", "")


class StreamMirror:
    """Copies one local ``StreamLog`` into Redis (made by ``RedisStreamStore.mirror``).

    The mirror is a *follower* cursor of the log: frames are acked (and may be trimmed
    locally) only once Redis has them, and a slow Redis holds the producer back like a slow
    reader, but the mirror does not count as a reader for the detach timeout.

    Attributes:
        log: the log mirrored.
        task: the task running ``run()`` (owned by the store).
        sent_seq: the seq of the newest frame Redis has.
        batches: append EVALSHAs that carried frames.
        state: opening (no meta in Redis yet), mirroring, then finished (the final state is
            in Redis), stopped (``stop()`` before the log closed), fenced (a reader ended the
            stream as interrupted) or failed (Redis failed, or the stream was there already;
            the meta is left to expire).
    """

    __slots__ = ("log", "task", "sent_seq", "batches", "state", "_store", "_keys", "_on_cancel",
                 "_epoch", "_cancelled", "_stopping", "_idle_timeout", "_last_call_at",
                 "_alias_at")

    def __init__(self, store: RedisStreamStore, log: StreamLog, on_cancel: Callable[[], None]) -> None:
        self.log = log
        self.task: asyncio.Task[None] | None = None
        self.sent_seq = log.first_seq - 1
        self.batches = 0
        self.state: MirrorState = "opening"
        self._store = store
        self._keys = store.keys(log.stream_id)
        self._on_cancel = on_cancel
        self._epoch = 0
        self._cancelled = False
        self._stopping = False
        self._idle_timeout: asyncio.Timeout | None = None
        self._last_call_at = asyncio.get_running_loop().time()  # the first beat is due from now
        self._alias_at: float | None = None
        log.add_cursor(id(self), self.sent_seq, follower=True)

    def __repr__(self) -> str:
        return (f"<StreamMirror {self.log.stream_id} [{self.state}, sent {self.sent_seq} of "
                f"{self.log.last_seq}, {self.batches} batches]>")

    def stop(self) -> None:
        """Send what the log holds now (with the meta if not sent yet, and the final state
        if the log closed), then end (``close`` of the store calls it)."""
        self._stopping = True
        timeout = self._idle_timeout
        if timeout is not None and not timeout.expired():
            timeout.reschedule(asyncio.get_running_loop().time())

    async def run(self) -> None:
        """Write batches (the first with the meta) until the final state is written, the
        stream was fenced or ``stop()`` was called. Never raises (Redis failures are counted
        and end the mirror); on any exit, cancellation included, the cursor is detached."""
        try:
            while await self._step():
                pass
        except RedisFailure as exc:
            self._fail(type(exc).__name__)
        except StreamTrimmedError:  # the registry evicted the log under a stalled mirror
            self._fail("log_trimmed")
        finally:
            self.log.remove_cursor(id(self))

    async def _step(self) -> bool:
        """Send one batch (empty: a heartbeat; the first also writes the meta, even when
        ``stop()`` was called); ``False`` once the mirror is done."""
        await self._idle()
        await self._linger()
        frames = self._batch()
        final = self.log.closed and self.sent_seq + len(frames) == self.log.last_seq
        if self._stopping and not frames and not final and self.state != "opening":
            self.state = "stopped"
            return False
        if not await self._append(frames, final):
            return False
        if final:
            self.state = "finished"
        return not final

    async def _idle(self) -> None:
        """Wait for a new frame, the log's end, ``stop()``, or the next heartbeat."""
        log = self.log
        if log.last_seq > self.sent_seq or log.closed or self._stopping:
            return
        due_at = self._last_call_at + self._store.heartbeat_interval_s
        try:
            async with asyncio.timeout_at(due_at) as self._idle_timeout:
                await log.wait(self.sent_seq)
        except TimeoutError:
            pass
        finally:
            self._idle_timeout = None

    async def _linger(self) -> None:
        """Let ``batch_interval_s`` pass since the last call while the log runs, so that
        the batch takes every frame appended meanwhile."""
        wait_s = self._last_call_at + self._store.batch_interval_s - asyncio.get_running_loop().time()
        if wait_s > 0 and not self.log.closed and not self._stopping:
            await asyncio.sleep(wait_s)

    def _batch(self) -> list[bytes]:
        """The frames after ``sent_seq``, at most ``MAX_BATCH_FRAMES`` and (beyond the
        first) ``MAX_BATCH_BYTES``."""
        frames = self.log.read(self.sent_seq)
        size_bytes = 0
        for count, frame in enumerate(frames):
            size_bytes += len(frame)
            if count == MAX_BATCH_FRAMES or (count and size_bytes > MAX_BATCH_BYTES):
                return frames[:count]
        return frames

    async def _append(self, frames: list[bytes], final: bool) -> bool:
        """EVALSHA ``stream_append.lua``, and SET the Responses API alias when it is due,
        after it in the same pipeline (so the alias names a stream Redis holds, a NOSCRIPT
        retry aside; if Redis refuses the batch the alias names a stream that is unknown or
        ended, as any alias may); ``False`` when Redis refused the batch."""
        store, data = self._store, b"".join(frames)
        appended = store._eval_soon("stream_append", [self._keys.events, self._keys.meta],
                                    self._append_args(frames, data, final))
        alias = self._alias_soon(final)
        reply, *_ = await store._replies(appended, *([] if alias is None else [alias]))
        self._last_call_at = asyncio.get_running_loop().time()
        status, cancel_requested, _last_seq, epoch = reply
        if status != b"ok":
            self._refused(status.decode())
            return False
        self._epoch = int(epoch)
        self.state = "mirroring"
        self._count(len(frames), len(data))
        self.sent_seq += len(frames)
        self.log.ack(id(self), self.sent_seq)
        if cancel_requested:
            self._cancel()
        return True

    def _append_args(self, frames: list[bytes], data: bytes, final: bool) -> list[str | int | bytes]:
        """ARGV of ``stream_append.lua`` for ``frames`` (``data``: them concatenated)."""
        log, store = self.log, self._store
        error = log.error if final else None
        return [self._epoch, self.sent_seq + 1, store.maxlen,
                store.retention_ms if final else store.running_ttl_ms,
                log.state.value if final else StreamState.RUNNING.value,
                "" if error is None else error.http_status,
                b"" if error is None else orjson.dumps(error.to_body()),
                *self._meta_fields(), b" ".join(b"%d" % len(frame) for frame in frames), data]

    def _meta_fields(self) -> tuple[str | bytes, ...]:
        """ARGV[8..11] of ``stream_append.lua``: owner, instance, endpoint and headers for
        the call that writes the meta (epoch 0), blanks after it."""
        if self._epoch:
            return _NO_META_FIELDS
        log = self.log
        return log.owner, self._store.instance_id, log.endpoint, orjson.dumps(log.headers)

    def _count(self, frames: int, size_bytes: int) -> None:
        stats = self._store.stats
        if frames:
            self.batches += 1
            stats.append_calls += 1
            stats.frames_mirrored += frames
            stats.bytes_mirrored += size_bytes
        else:
            stats.heartbeat_calls += 1

    def _refused(self, status: str) -> None:
        """The stream was ended elsewhere ("fenced": stop the producer), or its meta is
        gone or inconsistent, or was there before the first call (a failure: the local
        stream goes on unmirrored)."""
        if status == "fenced":
            self.state = "fenced"
            error_log.warning("stream ended elsewhere (interrupted); stopping its producer",
                              extra={"stream_id": self.log.stream_id})
            self._cancel()
        else:
            self._fail(status)

    def _cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._on_cancel()

    def _fail(self, reason: str) -> None:
        self.state = "failed"
        self._store._report("mirror", self.log.stream_id, reason)

    def _alias_soon(self, final: bool) -> asyncio.Future[Any] | None:
        """Queue the SET of the Responses API alias if it is due: once the response id is
        known, then every third of the running TTL, and with the final batch (``None``: not
        due, or no response id)."""
        response_id, store = self.log.response_id, self._store
        if response_id is None:
            return None
        now = asyncio.get_running_loop().time()
        if not final and self._alias_at is not None and now - self._alias_at < store.running_ttl_ms / 3000:
            return None
        self._alias_at = now
        return store._soon(("SET", response_key(store.key_prefix, response_id), self.log.stream_id,
                            "PX", store.retention_ms if final else store.running_ttl_ms))


class RemoteStreamReader:
    """One reader's cursor over a stream mirrored in Redis: what an SSE response, a resumer
    or a WebSocket on any instance writes from (the duck type of
    ``proxy.streams.StreamReader``). Create with ``RedisStreamStore.reader``; ``close()``
    detaches.

    Attributes:
        stream_id: the stream's id.
        after_seq: the seq of the last frame handed out.
        reader_id: this reader's member in the stream's ``readers`` set.
    """

    __slots__ = ("stream_id", "after_seq", "reader_id", "_store", "_keys", "_ended", "_closed",
                 "_check_at")

    def __init__(self, store: RedisStreamStore, stream_id: str, after_seq: int, reader_id: str) -> None:
        self.stream_id = stream_id
        self.after_seq = after_seq
        self.reader_id = reader_id
        self._store = store
        self._keys = store.keys(stream_id)
        self._ended = False
        self._closed = False
        self._check_at = 0.0  # loop time of the next liveness check of the producer

    def __repr__(self) -> str:
        state = "closed" if self._closed else "ended" if self._ended else "reading"
        return f"<RemoteStreamReader {self.stream_id} after {self.after_seq} [{state}]>"

    async def next(self, timeout_s: float) -> list[bytes] | None:
        """The frames after the cursor, advancing it past them. Waits up to ``timeout_s``
        for one: ``[]`` when none came (time for a keep-alive), ``None`` when the stream
        has ended and every frame was handed out. A producer found dead meanwhile ends the
        stream with a ``stream_interrupted`` error frame (the last frame handed out).

        Raises:
            StreamTrimmedError: Redis dropped frames this reader needs (MAXLEN, expiry).
            StreamInterruptedError: Redis failed (counted and logged), or the stream
                vanished before it ended (Redis lost its data).
        Cancelling is safe: no frame is lost (the cursor moves only on return).
        """
        if self._ended:
            return None
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            return await self._next_until(deadline)
        except RedisFailure as exc:
            self._store._report("read", self.stream_id, type(exc).__name__)
            raise StreamInterruptedError("The gateway lost the shared state of this stream; "
                                         "resume it to continue.") from None

    async def _next_until(self, deadline: float) -> list[bytes] | None:
        loop = asyncio.get_running_loop()
        while True:
            remaining_s = deadline - loop.time()
            entries, progress = await self._read(min(remaining_s, self._store.poll_interval_s)
                                                 if remaining_s > 0 else None)
            if not entries and progress.state is not StreamState.RUNNING:
                if self.after_seq < progress.last_seq:  # they came after the blocking read
                    entries, progress = await self._read(None)
                if not entries:
                    self._end(progress)
                    return None
            if entries:
                return self._take(entries, progress)
            progress = await self._check_producer(progress)
            if progress.state is StreamState.RUNNING and loop.time() >= deadline:
                return []

    async def _read(self, block_s: float | None) -> tuple[list[Entry], _Progress]:
        """The entries after the cursor, waiting up to ``block_s`` for one (``None``: not
        at all), and the stream's state once they were read: XREAD [BLOCK] and HMGET in one
        pipeline (one round trip; Redis runs the HMGET when the XREAD returns)."""
        store = self._store
        pipe = store.redis.pipeline(transaction=False)
        pipe.xread({self._keys.events: f"{self.after_seq}-0"}, count=READ_COUNT,
                   block=None if block_s is None else max(1, round(block_s * 1000)))
        pipe.hmget(self._keys.meta, ["state", "last_seq"])
        store.stats.commands += 2
        async with asyncio.timeout(store.timeout_s + (block_s or 0.0)):
            reply, (state, last_seq) = await pipe.execute()
        return (list(reply[0][1]) if reply else []), _progress(state, last_seq)

    async def _check_producer(self, progress: _Progress) -> _Progress:
        """At most once per ``poll_interval_s``: end the stream if its producer is dead."""
        now = asyncio.get_running_loop().time()
        if now < self._check_at:
            return progress
        self._check_at = now + self._store.poll_interval_s
        return await self._store._interrupt_if_stale(self.stream_id)

    def _take(self, entries: list[Entry], progress: _Progress) -> list[bytes]:
        """Advance past ``entries`` (marking the reader ended if they end the stream)."""
        first_seq = _seq_of(entries[0][0])
        if first_seq != self.after_seq + 1:
            raise StreamTrimmedError(first_seq)
        self.after_seq = _seq_of(entries[-1][0])
        if progress.state is not StreamState.RUNNING and self.after_seq >= progress.last_seq:
            self._ended = True
        return [fields[FRAME_FIELD] for _, fields in entries]

    def _end(self, progress: _Progress) -> None:
        """The stream ended and Redis holds nothing after the cursor: mark the reader ended
        if the cursor is at the stream's end, else raise why the frames are missing."""
        if progress.state is None:
            raise StreamInterruptedError("The stream's shared state expired before it ended.")
        if self.after_seq < progress.last_seq:
            raise StreamTrimmedError(progress.last_seq + 1)
        self._ended = True

    def close(self) -> None:
        """Detach (idempotent): this reader's presence is removed from Redis."""
        if not self._closed:
            self._closed = True
            self._store._forget_reader(self)
