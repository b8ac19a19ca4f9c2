"""Limit state in Redis, shared by every worker and machine (``state.backend: redis``).

The rules of ``proxy.limits`` run inside one Lua script, so a check and its charge are one
atomic step across all processes. The script reads the clock with ``TIME`` (one clock for
every gateway, whatever their skew), and sets a TTL on every key it writes, in the same
step. Its source is ``proxy/lua/limits_*.lua`` (package data): ``limits_state.lua`` (the
arguments, the keys and the write-back cache), one file per operation, each documenting its
argument object, its reply object and the keys it touches (``acquire``, ``settle``,
``cancel``, ``refresh``, ``block_grant``, ``block_return``, ``heartbeat``), and
``limits_batch.lua`` (runs the operations and writes back). The files are read once and
joined into one script (``LUA``), called with EVALSHA (redis-py's ``Script`` loads it again
when Redis answers NOSCRIPT: after a restart, a failover or SCRIPT FLUSH).

Calls are micro-batched: the operations issued during one event-loop iteration go to Redis
in one EVALSHA (a JSON array of ``{"op": "<name>", ...}`` objects; the reply is a JSON array
of reply objects, one per operation), each still applied atomically and in order, without
delaying a lone request (the batch is sent on the next loop iteration, not after a timer).
Inside the script a batch runs against a write-back cache: each key is read at most once and
written once, so Redis does a few commands per key per batch instead of some twenty per
request (lease releases and budget settles are applied lazily, unless a check near its limit
depends on them).

A call that times out may still run once Redis is free; its acquires and block grants are
then cancelled (leases released, budget reservations refunded) with the next batch that gets
through, and its final block returns are sent again (without the token buckets).

Keys (``state.key_prefix`` first, default ``shepherd:``; ``limits_state.lua`` gives their
data and TTLs): ``<scope>:tat`` (GCRA), ``<scope>:bucket`` (token bucket), ``<scope>:leases``
(sorted set of lease ids by expiry), ``<scope>:blocks`` (sorted set of ``<block id>*<leases
held>`` by expiry, for blocks of quota), ``budget:<key>:<window>`` (``tok``, ``usd`` and one
``r:<id>`` reservation per request or block in flight), ``instances`` (sorted set of live
gateway instance ids by the expiry of their heartbeat: ``proxy.limits`` shares every limit
among them while Redis is down). Standalone Redis or Sentinel; keys are not hash-tagged for
Cluster.

Data format 2: the token bucket was ``<scope>:tb`` with fields ``v``/``t`` and is now
``<scope>:bucket`` with ``level``/``updated_ms`` (the new key name is the version: gateways of
both formats never write one hash; during a rolling upgrade each side keeps its own token
buckets, so a TPM limit may admit up to twice its rate until the old gateways are gone, and
an old ``:tb`` key expires within a minute). Budget fields keep their names, so what a window
has spent survives an upgrade.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

from proxy.limits import (
    CONCURRENCY_RETRY_S,
    HEARTBEAT_INTERVAL_S,
    Budget,
    Demand,
    Scope,
    ScopeReport,
    StoreUnavailable,
    Verdict,
    emission_us,
)
from proxy.quota_blocks import MIN_BLOCK, Block, GiveBack, GrantRequest, QuotaBlocks

__all__ = ["BLOCK_SHARE", "LUA", "LUA_FILES", "MAX_BATCH", "MIN_BLOCK", "RedisLimitStore", "grant_op"]

#: The most operations sent in one EVALSHA.
MAX_BATCH = 256

#: Blocks of quota: the share of what a limit has left that one block may take at most (1/8).
#: (``MIN_BLOCK``, the fewest requests worth a block, is ``proxy.quota_blocks``'s.)
BLOCK_SHARE = 8

#: How long an instance counts as alive after its last heartbeat (three missed beats).
INSTANCE_TTL_S = 3 * HEARTBEAT_INTERVAL_S

#: The ticks a wait for Redis is cut into (``RedisLimitStore._reply``): how finely time the
#: event loop was late is told apart from time Redis was slow.
WAIT_TICKS = 5

#: The most timed-out acquires remembered for cancelling (the oldest are forgotten; their
#: leases then expire with ``limits.lease_ttl``).
MAX_ORPHANS = 10_000

#: The files of the limits script, in the order they are joined (``proxy/lua/<name>.lua``).
LUA_FILES = ("limits_state", "limits_acquire", "limits_settle", "limits_cancel", "limits_refresh",
             "limits_block_grant", "limits_block_return", "limits_heartbeat", "limits_batch")


def _load_lua(name: str) -> str:
    """The text of ``proxy/lua/<name>.lua`` (package data)."""
    return (resources.files("proxy") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


#: The limits script: the files of ``LUA_FILES`` joined, read once per process.
LUA = "\n".join(_load_lua(name) for name in LUA_FILES)


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a background op's outcome so a failure is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


# --- the wire: argument objects and replies ---------------------------------------------------

Shape = tuple[tuple[Scope, ...], Budget | None]


def _scopes_arg(demand: Demand) -> orjson.Fragment:
    """The ``scopes`` argument of an operation (see ``proxy/lua/limits_state.lua``): one
    object per scope, limits it does not have left out. Pre-encoded JSON, made once per
    tuple of scopes (a key's scopes are the same objects on every request)."""
    return _scopes_arg_of(demand.scopes)


@functools.lru_cache(maxsize=4096)
def _scopes_arg_of(scopes: tuple[Scope, ...]) -> orjson.Fragment:
    out: list[dict[str, Any]] = []
    for s in scopes:
        arg: dict[str, Any] = {"id": s.scope_id}
        if s.rpm:
            arg["rpm"] = s.rpm
            if s.burst:  # GCRA is on
                arg["emission_us"], arg["burst"] = emission_us(s.emission_s), s.burst
        if s.tpm:
            arg["tpm"] = s.tpm
        if s.max_concurrent:
            arg["max_concurrent"] = s.max_concurrent
        out.append(arg)
    return orjson.Fragment(orjson.dumps(out))


def _budget_arg(demand: Demand) -> orjson.Fragment | None:
    """The ``budget`` argument of an operation, or ``None`` (leave it out): no budget."""
    return _budget_arg_of(demand.budget)


@functools.lru_cache(maxsize=4096)
def _budget_arg_of(b: Budget | None) -> orjson.Fragment | None:
    if b is None:
        return None
    arg: dict[str, Any] = {"key": b.key_name, "period_ms": int(b.period_s * 1000)}
    if b.tokens is not None:
        arg["tokens"] = b.tokens
    if b.usd is not None:
        arg["usd"] = b.usd
    return orjson.Fragment(orjson.dumps(arg))


def _with_budget(op: dict[str, Any], budget: Budget | None, window: int | None = None) -> dict[str, Any]:
    """``op`` with its ``budget`` (and ``window``) when there is one."""
    if budget is not None:
        op["budget"] = _budget_arg_of(budget)
        if window is not None:
            op["window"] = window
    return op


def acquire_op(demand: Demand, lease_id: str) -> dict[str, Any]:
    """The ``acquire`` operation of ``demand`` under ``lease_id``."""
    return _with_budget({"op": "acquire", "id": lease_id, "scopes": _scopes_arg_of(demand.scopes),
                         "tokens": demand.tokens, "usd": demand.usd}, demand.budget)


def cancel_op(op: dict[str, Any]) -> dict[str, Any]:
    """The ``cancel`` undoing ``op`` (an acquire, a block grant or a cancel) whose reply was
    lost: the same object with its name changed."""
    return {**op, "op": "cancel"}


def grant_op(demand: Demand, block_id: str, size: int, block_us: int) -> dict[str, Any]:
    """The ``block_grant`` operation asking for a block of up to ``size`` requests of
    ``demand``, usable for ``block_us`` microseconds (see ``RedisLimitStore``)."""
    return _grant_op((demand.scopes, demand.budget), block_id, size, demand.tokens, demand.usd,
                     block_us)


def _grant_op(shape: Shape, block_id: str, size: int, tokens: int, usd: float,
              block_us: int) -> dict[str, Any]:
    return _with_budget({"op": "block_grant", "id": block_id, "scopes": _scopes_arg_of(shape[0]),
                         "size": size, "tokens": tokens, "usd": usd, "duration_us": block_us,
                         "min_size": MIN_BLOCK, "share": BLOCK_SHARE}, shape[1])


def _return_op(give: GiveBack[Shape, _Grant]) -> dict[str, Any]:
    """The ``block_return`` operation of ``give``."""
    block = give.block
    scopes, budget = block.shape
    return _with_budget({"op": "block_return", "id": block.block_id, "scopes": _scopes_arg_of(scopes),
                         "tokens": give.tokens, "usd": give.usd, "final": give.final,
                         "block_leases": block.slots if give.final else 0, "token_buckets": True},
                        budget, block.payload.window)


def _opt_int(value: float | None) -> int | None:
    return None if value is None else int(value)  # cjson writes 1e+14 and up as floats


def _opt_s(value_ms: float | None) -> float | None:
    return None if value_ms is None else value_ms / 1000.0


def _reports(reply: dict[str, Any]) -> list[ScopeReport]:
    """The ``scopes`` reports of an ``acquire`` or ``block_grant`` reply."""
    return [ScopeReport(r["id"], _opt_int(r.get("limit_requests")), _opt_int(r.get("remaining_requests")),
                        _opt_s(r.get("reset_requests_ms")), _opt_int(r.get("limit_tokens")),
                        _opt_int(r.get("remaining_tokens")), _opt_s(r.get("reset_tokens_ms")))
            for r in reply.get("scopes", ())]


def _verdict(reply: dict[str, Any]) -> Verdict:
    """A ``Verdict`` from an ``acquire`` reply (``proxy/lua/limits_acquire.lua``)."""
    allowed = reply["allowed"]
    verdict = Verdict(allowed, reply.get("reason"), None, _reports(reply), _opt_int(reply.get("window")))
    if "spent_tokens" in reply:
        verdict.budget_spent = (int(reply["spent_tokens"]), float(reply["spent_usd"]))
    if not allowed:
        retry_ms = reply.get("retry_after_ms")
        verdict.retry_after_s = (retry_ms / 1000.0 if retry_ms is not None else
                                 CONCURRENCY_RETRY_S if verdict.reason == "concurrency" else None)
    return verdict


@dataclass(frozen=True, slots=True)
class _Grant:
    """What the store keeps with a block (``Block.payload``): the budget window the grant
    charged and its limit reports, as they were after the grant."""

    window: int | None
    reports: list[ScopeReport]


class RedisLimitStore:
    """``LimitStore`` on Redis through redis-py's asyncio client.

    **Blocks of quota.** A shape of demand (one key and model) that arrives at least
    ``MIN_BLOCK`` times within ``block_ttl`` is no longer checked in Redis request by request:
    the store asks for a block of up to ``block_max_requests`` requests (starting at
    ``MIN_BLOCK``, then sized to last half a ``block_ttl`` at the rate the last one was used),
    each with the reservation of the request that asked for it, and admits from it here for
    ``block_ttl`` seconds. The next block is asked for when half of one is used and is used
    once this one is; a request that finds no block while one is on its way waits for it
    (one Redis round trip, as it would have waited for its own check). Redis grants a block
    only where it is no more than an RPM or TPM limit grants during ``block_ttl`` and takes
    at most ``1/BLOCK_SHARE`` of what every limit of the shape has left, so near a limit
    every request is checked in Redis again, and no limit is ever exceeded. When to ask for
    a block, which block admits a request, and when and what to give back are decided by
    ``self.blocks`` (``proxy.quota_blocks.QuotaBlocks``, on the event loop's clock); this
    class sends its requests (``block_grant``), give-backs (``block_return``) and expiry
    timers, and hands it Redis's answers. What a block means for each limit:

    * RPM: the block is booked in GCRA as its requests arriving one emission interval apart
      from ``max(TAT, now + block_ttl)``, and granted only if the last of them conforms when
      admitted at ``now``, so the bound ``burst + rpm * D / 60`` holds exactly; requests of a
      block that are not used are not refunded.
    * TPM and budgets: the block reserves ``k`` reservations; what its requests do not use,
      and what it did not admit, is given back when the block ends (a request that used more
      than it reserved is charged at once).
    * ``max_concurrent``: the block holds ``k`` leases in every such scope until the last
      request it admitted has ended.

    A response admitted from a block carries ``x-ratelimit-*`` values from the block's grant,
    less what this process has used of it since (at most ``block_ttl`` old).

    Args:
        url: ``state.redis_url``.
        key_prefix: ``state.key_prefix``.
        timeout_s: ``state.redis_timeout``: a batch not answered in time fails with
            ``StoreUnavailable`` (the limiter then falls back); time this process's event
            loop was late does not count (``_reply``), up to ``max_wait_s`` in all.
        lease_ttl_s: ``limits.lease_ttl``.
        clock_us: ``None`` (the default): every batch reads Redis's own clock (``TIME``), one
            clock for every gateway. A function returning Unix time in integer microseconds:
            a fake clock, for tests.
        block_ttl_s: ``limits.block_ttl``: how long a block of quota admits requests; 0
            turns blocks off (every limited request is checked in Redis).
        block_max_requests: ``limits.block_max_requests``: the largest block.
        on_block_admission: called once per request admitted from a block (a metric).

    ``heartbeat()`` adds this instance (``instance_id``, random per store) to
    ``<prefix>instances`` for ``INSTANCE_TTL_S``, in the next batch (no round trip of its
    own when requests are flowing), and sets ``instances`` to the live count it answers;
    ``close()`` takes the instance out.
    """

    name = "redis"

    def __init__(self, url: str, key_prefix: str = "shepherd:", timeout_s: float = 0.05,
                 lease_ttl_s: float = 60.0, clock_us: Callable[[], int] | None = None,
                 block_ttl_s: float = 0.0, block_max_requests: int = 256,
                 on_block_admission: Callable[[], None] | None = None) -> None:
        self.redis = redis_asyncio.Redis.from_url(
            url, socket_connect_timeout=max(timeout_s, 0.5), socket_timeout=max(timeout_s * 4, 1.0),
            health_check_interval=0, retry_on_timeout=False)
        self.script = self.redis.register_script(LUA)
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.max_wait_s = max(timeout_s * 4, 1.0)  # the socket timeout above
        self.loop_lag_s = 0.0  # waiting time not counted against Redis: the loop was late
        self.lease_ttl_ms = int(lease_ttl_s * 1000)
        self.clock_us = clock_us
        self.instance_id = f"gw_{random.getrandbits(64):016x}"
        self.instances = 1  # live instances sharing Redis, as last seen (at least 1)
        self._pending: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._orphans: list[dict[str, Any]] = []  # ops to undo or redo once Redis answers again
        self.block_ttl_s = block_ttl_s
        self.blocks: QuotaBlocks[Shape, _Grant] = QuotaBlocks(
            block_ttl_s, block_max_requests, clock=lambda: asyncio.get_running_loop().time())
        self.on_block_admission = on_block_admission or (lambda: None)
        self._grants: dict[Shape, asyncio.Future[None]] = {}  # set when a block request ends

    def __repr__(self) -> str:
        return (f"<RedisLimitStore [pending: {len(self._pending)}, batches in flight: "
                f"{len(self._inflight)} | instances: {self.instances}]>")

    async def heartbeat(self) -> None:
        """Mark this instance alive for ``INSTANCE_TTL_S`` and read how many are.

        Raises:
            StoreUnavailable: Redis did not answer; ``instances`` keeps its last value.
        """
        op = {"op": "heartbeat", "instance": self.instance_id, "ttl_ms": round(INSTANCE_TTL_S * 1000)}
        self.instances = max(1, int((await self._submit(op))["instances"]))

    async def acquire(self, demand: Demand, lease_id: str) -> Verdict:
        """Check ``demand`` and charge it under ``lease_id``: from a block of quota when
        this process holds one for its shape, else in Redis (in the next batch).

        Raises:
            StoreUnavailable: Redis did not answer in time (the acquire is cancelled in
                Redis with the next batch that gets through).
        """
        if self.block_ttl_s > 0 and (demand.scopes or demand.budget is not None):
            verdict = self._acquire_from_block(demand, lease_id)
            waiter = self._grants.get((demand.scopes, demand.budget))
            if verdict is None and waiter is not None:  # a block is on its way: wait for it
                await asyncio.shield(waiter)
                verdict = self._acquire_from_block(demand, lease_id)
            if verdict is not None:
                return verdict
        return _verdict(await self._submit(acquire_op(demand, lease_id)))

    async def settle(self, demand: Demand, lease_id: str, budget_window: int | None,
                     actual_tokens: int, actual_usd: float) -> None:
        """End the request ``lease_id``: it used ``actual_tokens``/``actual_usd`` of what
        ``demand`` reserved in ``budget_window`` (``None``: no budget charged).

        Raises:
            StoreUnavailable: Redis did not answer in time (the lease then expires with
                ``limits.lease_ttl``). A request admitted from a block never raises.
        """
        if self.blocks.settle(lease_id, demand.tokens, demand.usd, actual_tokens, actual_usd):
            if self.blocks.outbox:
                self._send_block_messages()
            return
        op = _with_budget({"op": "settle", "id": lease_id, "scopes": _scopes_arg_of(demand.scopes),
                           "tokens": demand.tokens, "usd": demand.usd,
                           "actual_tokens": actual_tokens, "actual_usd": actual_usd},
                          demand.budget, budget_window)
        await self._submit(op)

    async def refresh(self, leases: Iterable[tuple[Demand, str]]) -> None:
        """Extend the concurrency leases of requests still running (each lease once; a
        block's leases once for all its requests).

        Raises:
            StoreUnavailable: Redis did not answer in time.
        """
        ops: list[dict[str, Any]] = []
        blocks: dict[str, Block[Shape, _Grant]] = {}
        for demand, lease_id in leases:
            block = self.blocks.block_of(lease_id)
            if block is None:
                ops.append({"op": "refresh", "id": lease_id, "scopes": _scopes_arg_of(demand.scopes)})
            elif block.slots:
                blocks[block.block_id] = block
        ops.extend({"op": "refresh", "id": b.block_id, "scopes": _scopes_arg_of(b.shape[0]),
                    "block_leases": b.slots} for b in blocks.values())
        await asyncio.gather(*(self._submit(op) for op in ops))

    async def close(self) -> None:
        """Give every block back, take this instance out of ``instances``, wait for the
        batches in flight and close the connections."""
        self.blocks.close()
        self._send_block_messages()
        self._submit({"op": "heartbeat", "instance": self.instance_id, "ttl_ms": 0}
                     ).add_done_callback(_consume)
        await asyncio.sleep(0)  # let the give-backs and the goodbye be sent
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self.redis.aclose()

    # --- blocks of quota: QuotaBlocks decides, this moves its decisions over the wire --------

    def _acquire_from_block(self, demand: Demand, lease_id: str) -> Verdict | None:
        """Admit ``demand`` from its shape's block; ``None``: ask Redis (a block may have
        been asked for on the side)."""
        block = self.blocks.admit((demand.scopes, demand.budget), lease_id, demand.tokens, demand.usd)
        if self.blocks.outbox:
            self._send_block_messages()
        if block is None:
            return None
        self.on_block_admission()
        reports = [ScopeReport(
            r.scope_id, r.limit_requests,
            None if r.remaining_requests is None else r.remaining_requests + block.requests_left,
            r.reset_requests_s, r.limit_tokens,
            None if r.remaining_tokens is None else r.remaining_tokens + block.tokens_left,
            r.reset_tokens_s) for r in block.payload.reports]
        return Verdict(True, None, None, reports, block.payload.window)

    def _send_block_messages(self) -> None:
        """Send what ``self.blocks`` decided: block requests and give-backs."""
        for message in self.blocks.messages():
            if isinstance(message, GrantRequest):
                op = _grant_op(message.shape, message.block_id, message.size, message.tokens,
                               message.usd, round(self.block_ttl_s * 1e6))
                self._grants[message.shape] = asyncio.get_running_loop().create_future()
                self._submit(op).add_done_callback(functools.partial(self._on_grant, message))
            else:
                self._submit(_return_op(message)).add_done_callback(_consume)

    def _on_grant(self, request: GrantRequest[Shape], reply: asyncio.Future[Any]) -> None:
        """Redis answered the block request ``request`` (or failed to)."""
        waiter = self._grants.pop(request.shape, None)
        if waiter is not None:
            waiter.set_result(None)  # waiters resume after this callback: the block is in place
        if reply.cancelled() or reply.exception() is not None:
            self.blocks.failed(request)  # a grant that may have run is cancelled with the next batch
            return
        answer = reply.result()
        if answer["size"] == 0:
            self.blocks.refused(request)
            return
        scopes, budget = request.shape
        slots = int(answer["size"]) if any(s.max_concurrent for s in scopes) else 0
        refunds = budget is not None or any(s.tpm for s in scopes)
        block = self.blocks.granted(request, int(answer["size"]),
                                    _Grant(_opt_int(answer.get("window")), _reports(answer)), slots, refunds)
        if not block.closed:
            asyncio.get_running_loop().call_at(block.expires_at, self._expire_block, block)
        self._send_block_messages()

    def _expire_block(self, block: Block[Shape, _Grant]) -> None:
        """``block``'s time is up (a ``call_at`` timer)."""
        self.blocks.expire(block)
        self._send_block_messages()

    # --- batching ---------------------------------------------------------------------------

    def _submit(self, op: dict[str, Any]) -> asyncio.Future[Any]:
        """Queue ``op`` for the next batch; its future gets the op's reply object, or
        ``StoreUnavailable``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((op, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """Send the queued ops, ``MAX_BATCH`` per EVALSHA, orphaned undos first."""
        if self._orphans:  # cancels go first, so a slot they free serves this very batch
            loop = asyncio.get_running_loop()
            cancels = [(op, loop.create_future()) for op in self._orphans]
            self._orphans = []
            for _, future in cancels:
                future.add_done_callback(_consume)
            self._pending[:0] = cancels
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _run(self, batch: list[tuple[dict[str, Any], asyncio.Future[Any]]]) -> None:
        """EVALSHA one batch and resolve its futures; on failure, queue the undos."""
        try:
            args: list[Any] = [self.key_prefix, self.lease_ttl_ms,
                               orjson.dumps([op for op, _ in batch])]
            if self.clock_us is not None:
                args.append(self.clock_us())
            raw = await self._reply(self.script(args=args))
            results = orjson.loads(raw)
        except (RedisError, OSError, TimeoutError, orjson.JSONDecodeError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(f"{type(exc).__name__}: {exc}"))
            # The script may still run once Redis is free: undo its acquires and grants (and
            # retry undos that failed too) ahead of the next batch.
            for op, _ in batch:
                if op["op"] in ("acquire", "cancel", "block_grant"):
                    self._orphans.append(cancel_op(op))
                elif op["op"] == "block_return" and op["final"]:  # again, but the buckets once
                    self._orphans.append({**op, "token_buckets": False})
            del self._orphans[:-MAX_ORPHANS]
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _reply(self, call: Coroutine[Any, Any, Any]) -> Any:
        """Await Redis's reply to ``call``; ``TimeoutError`` if Redis, not this process, is slow.

        The rule: Redis gets ``timeout_s`` of this event loop's attention, not of wall time.
        The wait is cut into ticks of ``timeout_s / WAIT_TICKS``; a tick counts its length
        less how late the loop woke for it (never below 0): a loop busy with other callbacks,
        or a process the OS did not schedule, could not have read a reply sitting in the
        socket meanwhile, so that time does not count against Redis. The call fails once
        the counted time reaches ``timeout_s`` with no reply read by one more loop iteration
        (a reply read in the same iteration as the last tick wins), or once ``max_wait_s``
        of wall time has passed since sending (redis-py's own socket timeout), whichever
        comes first. On a loop that keeps time, that is ``timeout_s`` after sending.

        Cancelling is safe: the call is cancelled with it (as after a timeout, the script may
        still have run; ``_run`` then cancels its acquires).
        """
        loop = asyncio.get_running_loop()
        task = loop.create_task(call)
        tick_s = self.timeout_s / WAIT_TICKS
        sent = loop.time()
        counted_s = 0.0
        try:
            while True:
                due = loop.time() + tick_s
                await asyncio.wait((task,), timeout=tick_s)
                if task.done():
                    return task.result()
                now = loop.time()
                lag = max(0.0, now - due)
                counted_s += max(0.0, tick_s - lag)
                self.loop_lag_s += min(lag, tick_s)
                if counted_s >= self.timeout_s - 1e-9 or now - sent >= self.max_wait_s:
                    await asyncio.sleep(0)  # one more iteration: a reply read with the last tick
                    if task.done():
                        return task.result()
                    raise TimeoutError(f"no reply from Redis in {now - sent:.3f}s "
                                       f"({counted_s:.3f}s with the event loop on time)")
        finally:
            if not task.done():
                task.cancel()
