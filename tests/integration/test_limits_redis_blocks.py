"""proxy/limits_redis.py: blocks of quota, taken from Redis and admitted from in one process.

A block must never let a limit be exceeded, whenever its requests are admitted within its
``block_ttl``; its reservations must come back exactly; its concurrency leases count for
every process until its last request ends; and a block whose answer was lost is undone.
Everything runs against a real ``redis-server``; the GCRA property uses the script's fixed
clock (``clock_us``) so the arrival times are the test's to choose.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis_asyncio
from hypothesis import HealthCheck, event, given, note, seed, settings
from hypothesis import strategies as st

from proxy.limits import Budget, Demand, Scope, emission_us
from proxy.limits_redis import MIN_BLOCK, RedisLimitStore, _budget_arg, _scopes_arg, grant_op
from tests.integration.conftest import RedisServer

LEASE_TTL_S = 60.0


@dataclass
class Clock:
    """The fixed clock the script reads (``clock_us``), moved by the test."""

    now_us: int

    def __call__(self) -> int:
        return self.now_us


@asynccontextmanager
async def fresh_store(url: str, clock: Clock | None = None, block_ttl_s: float = 0.0,
                      prefix: str | None = None) -> AsyncIterator[RedisLimitStore]:
    """A store on a fresh key prefix (or ``prefix``); its keys are deleted afterwards."""
    prefix = prefix or f"t{uuid.uuid4().hex[:12]}:"
    store = RedisLimitStore(url, key_prefix=prefix, timeout_s=5.0, lease_ttl_s=LEASE_TTL_S,
                            clock_us=clock, block_ttl_s=block_ttl_s)
    try:
        yield store
    finally:
        await store.close()
        r = redis_asyncio.Redis.from_url(url)
        keys = [k async for k in r.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await r.delete(*keys)
        await r.aclose()


def give_back_op(demand: Demand, block_id: str, window: int, tokens: int, slots: int,
                 token_buckets: bool = True) -> dict[str, Any]:
    """The final ``block_return`` ``RedisLimitStore`` sends when a block ends (``QuotaBlocks``
    decides it, ``_return_op`` writes it); ``token_buckets=False`` is its retry after a failure."""
    op = {"op": "block_return", "id": block_id, "scopes": _scopes_arg(demand), "tokens": tokens,
          "usd": 0.0, "final": True, "block_leases": slots, "token_buckets": token_buckets}
    budget = _budget_arg(demand)
    if budget is not None:
        op["budget"], op["window"] = budget, window
    return op


def gcra_bound_holds(times_us: list[int], emission: int, burst: int) -> bool:
    """Whether admissions at ``times_us`` keep the documented bound: in every span
    ``[t_i, t_j]`` at most ``burst + (t_j - t_i) / T`` of them. With the times sorted that is
    ``(j + 1) T - t_j - min_{i <= j} (i T - t_i) <= burst T`` for every j."""
    lowest: int | None = None
    for j, t in enumerate(sorted(times_us)):
        here = j * emission - t
        lowest = here if lowest is None else min(lowest, here)
        if (j + 1) * emission - t - lowest > burst * emission:
            return False
    return True


# --- GCRA: exact whatever the arrival times within a block ---------------------------------

USE_PATTERNS = ("at grant", "at expiry", "spread", "random")


@st.composite
def gcra_cases(draw: st.DrawFn) -> dict[str, Any]:
    rpm = draw(st.sampled_from([6_000, 60_000, 600_000]))
    block_ms = draw(st.sampled_from([50, 100, 250]))
    tolerance_s = draw(st.sampled_from([0.5, 1.0, 2.0, 5.0, 10.0]))
    events = draw(st.lists(st.tuples(
        st.integers(0, 300),                           # ms since the previous event
        st.sampled_from(["acquire", "grant"]),
        st.integers(1, 400),                           # acquires, or the block size asked
        st.sampled_from(USE_PATTERNS),
        st.randoms(use_true_random=False)), min_size=1, max_size=30))
    return {"rpm": rpm, "burst": max(1, int(rpm / 60 * tolerance_s)), "block_us": block_ms * 1000,
            "events": events}


def use_times(pattern: str, count: int, start_us: int, block_us: int, rnd: Any) -> list[int]:
    """When a process admits the ``count`` requests of a block granted at ``start_us``: any
    instants within ``[start, start + block_ttl]``."""
    if pattern == "at grant":
        return [start_us] * count
    if pattern == "at expiry":
        return [start_us + block_us] * count
    if pattern == "spread":
        return [start_us + block_us * i // max(1, count - 1) for i in range(count)]
    return [start_us + rnd.randint(0, block_us) for _ in range(count)]


def test_gcra_bound_holds_with_blocks_used_at_any_time(redis_server: RedisServer) -> None:
    """Blocks and single acquires on one key at chosen instants: every admission, from a
    block (at any instant within its lifetime) or single, keeps the documented GCRA bound."""
    seen = {"granted": 0, "cut": 0, "refused": 0, "acquire refused": 0}

    async def run(case: dict[str, Any]) -> None:
        clock = Clock(int(time.time()) * 1_000_000)
        scope = Scope("k", rpm=case["rpm"], burst=case["burst"])
        demand = Demand((scope,), tokens=1)
        emission = emission_us(scope.emission_s)
        admitted: list[int] = []
        async with fresh_store(redis_server.url, clock) as store:
            for n, (gap_ms, kind, count, pattern, rnd) in enumerate(case["events"]):
                clock.now_us += gap_ms * 1000
                if kind == "acquire":
                    verdicts = await asyncio.gather(*(store.acquire(demand, f"ls_{n}_{i}")
                                                      for i in range(count)))
                    admitted += [clock.now_us] * sum(v.allowed for v in verdicts)
                    seen["acquire refused"] += any(not v.allowed for v in verdicts)
                    continue
                raw = await store._submit(grant_op(demand, f"blk_{n}", count, case["block_us"]))
                granted = int(raw["size"])
                note(f"t={clock.now_us}: block of {count} asked, {granted} granted, used {pattern}")
                seen["granted" if granted == count else "cut" if granted else "refused"] += 1
                admitted += use_times(pattern, granted, clock.now_us, case["block_us"], rnd)
        assert gcra_bound_holds(admitted, emission, scope.burst or 0), sorted(admitted)

    with asyncio.Runner() as runner:
        @seed(7)
        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(case=gcra_cases())
        def check(case: dict[str, Any]) -> None:
            runner.run(run(case))
            event(f"rpm {case['rpm']}")

        check()
    # The cases reach the interesting states: blocks granted whole, cut to what is left,
    # refused near the limit, and single requests refused.
    assert min(seen.values()) >= 5, seen


def test_the_bound_check_catches_an_excess() -> None:
    """The property's own check: one admission too many in a span is caught."""
    emission, burst = 1000, 3
    assert gcra_bound_holds([0, 0, 0, 1000, 2000], emission, burst)
    assert not gcra_bound_holds([0, 0, 0, 0], emission, burst)
    assert not gcra_bound_holds([0, 0, 0, 999], emission, burst)
    assert gcra_bound_holds([0, 0, 0, 1000], emission, burst)


# --- reservations, leases and undo, op by op ------------------------------------------------


async def dump_key(r: redis_asyncio.Redis, key: str) -> Any:
    kind = (await r.type(key)).decode()
    if kind == "hash":
        return {k.decode(): v.decode() for k, v in (await r.hgetall(key)).items()}
    if kind == "zset":
        return [m.decode() for m in await r.zrange(key, 0, -1)]
    return None if kind == "none" else (await r.get(key)).decode()


async def test_a_block_holds_its_share_and_gives_back_exactly_once(redis_server: RedisServer) -> None:
    clock = Clock(int(time.time()) * 1_000_000)
    scope = Scope("k", tpm=6_000_000, max_concurrent=800)
    demand = Demand((scope,), tokens=100, budget=Budget("k", 1_000_000, None, 86400.0))
    r = redis_asyncio.Redis.from_url(redis_server.url)
    async with fresh_store(redis_server.url, clock) as store:
        p = store.key_prefix
        raw = await store._submit(grant_op(demand, "blk_a", 64, 250_000))
        assert raw["size"] == 64
        window = raw["window"]
        budget_key = f"{p}budget:k:{window}"
        assert await dump_key(r, f"{p}k:blocks") == ["blk_a*64"]
        assert await dump_key(r, budget_key) == {"tok": "6400", "r:blk_a": "6400 0.000000000000"}
        assert float((await dump_key(r, f"{p}k:bucket"))["level"]) == 6_000_000 - 6400

        # The block's 64 leases count for everyone: 736 single leases fit, the next does not.
        verdicts = await asyncio.gather(*(store.acquire(demand, f"ls_{i}") for i in range(737)))
        assert [v.reason for v in verdicts if not v.allowed] == ["concurrency"]
        await asyncio.gather(*(store.settle(demand, f"ls_{i}", window, 100, 0.0)
                               for i, v in enumerate(verdicts) if v.allowed))

        # 10 of the block's requests used 40 tokens each: 64 * 100 - 400 comes back.
        await store._submit(give_back_op(demand, "blk_a", window, 6400 - 400, 64))
        assert await dump_key(r, f"{p}k:blocks") in (None, [])
        assert await dump_key(r, budget_key) == {"tok": str(736 * 100 + 400)}
        assert float((await dump_key(r, f"{p}k:bucket"))["level"]) == 6_000_000 - 736 * 100 - 400
        # A retry of the give-back (after a lost answer) changes nothing.
        await store._submit(give_back_op(demand, "blk_a", window, 6400 - 400, 64, token_buckets=False))
        assert await dump_key(r, budget_key) == {"tok": str(736 * 100 + 400)}
        assert float((await dump_key(r, f"{p}k:bucket"))["level"]) == 6_000_000 - 736 * 100 - 400
        verdicts = await asyncio.gather(*(store.acquire(demand, f"again_{i}") for i in range(801)))
        assert [v.allowed for v in verdicts].count(True) == 800
    await r.aclose()


async def test_a_grant_whose_answer_was_lost_is_undone(redis_server: RedisServer) -> None:
    clock = Clock(int(time.time()) * 1_000_000)
    scope = Scope("k", max_concurrent=800)
    demand = Demand((scope,), tokens=100, budget=Budget("k", 1_000_000, None, 86400.0))
    r = redis_asyncio.Redis.from_url(redis_server.url)
    async with fresh_store(redis_server.url, clock) as store:
        p = store.key_prefix
        op = grant_op(demand, "blk_lost", 256, 250_000)
        raw = await store._submit(op)
        assert raw["size"] == 100  # cut to 1/8 of the 800 leases
        # What RedisLimitStore queues when the grant's call timed out: the op as a cancel.
        await store._submit({**op, "op": "cancel"})
        assert await dump_key(r, f"{p}k:blocks") in (None, [])
        assert await dump_key(r, f"{p}budget:k:{raw['window']}") in (None, {"tok": "0"})
        verdicts = await asyncio.gather(*(store.acquire(demand, f"ls_{i}") for i in range(801)))
        assert [v.allowed for v in verdicts].count(True) == 800
    await r.aclose()


async def test_no_block_near_a_limit(redis_server: RedisServer) -> None:
    """A block is refused where it would take more than 1/8 of what is left, or more than
    the rate grants during its lifetime."""
    clock = Clock(int(time.time()) * 1_000_000)
    async with fresh_store(redis_server.url, clock) as store:
        slow = Demand((Scope("slow", rpm=600, burst=1000),), tokens=1)   # 10 per s: 2.5 per 250 ms
        assert (await store._submit(grant_op(slow, "blk_1", 4, 250_000)))["size"] == 0
        tight = Demand((Scope("tight", max_concurrent=31),), tokens=1)   # 31 / 8 < 4
        assert (await store._submit(grant_op(tight, "blk_2", 4, 250_000)))["size"] == 0
        budget = Demand((), tokens=100, budget=Budget("b", 3199, None, 86400.0))  # 3199 / 8 / 100 < 4
        assert (await store._submit(grant_op(budget, "blk_3", 4, 250_000)))["size"] == 0
        fast = Demand((Scope("fast", rpm=600_000, burst=100_000),), tokens=1)
        assert (await store._submit(grant_op(fast, "blk_4", 256, 250_000)))["size"] == 256


# --- the store: busy keys are admitted from blocks, and everything comes back ---------------


async def test_busy_key_is_admitted_from_blocks_and_settles_exactly(redis_server: RedisServer) -> None:
    clock = Clock(int(time.time()) * 1_000_000)  # frozen: the bucket does not refill
    scope = Scope("k", rpm=600_000, burst=100_000, tpm=60_000_000, max_concurrent=10_000)
    demand = Demand((scope,), tokens=100, budget=Budget("k", 10**9, None, 86400.0))
    r = redis_asyncio.Redis.from_url(redis_server.url)
    admitted_from_blocks = 0

    def count() -> None:
        nonlocal admitted_from_blocks
        admitted_from_blocks += 1

    async with fresh_store(redis_server.url, clock, block_ttl_s=0.1) as store:
        store.on_block_admission = count
        p = store.key_prefix
        used = 0
        for round_ in range(40):
            verdicts = await asyncio.gather(*(store.acquire(demand, f"ls_{round_}_{i}") for i in range(10)))
            assert all(v.allowed for v in verdicts)
            for i, v in enumerate(verdicts):
                assert v.reports[0].limit_requests == 600_000
                await store.settle(demand, f"ls_{round_}_{i}", v.budget_window, 30 + i, 0.0)
                used += 30 + i
        assert admitted_from_blocks >= 300, admitted_from_blocks

        await asyncio.sleep(0.3)  # every block has ended and been given back
        budget_key = f"{p}budget:k:{verdicts[0].budget_window}"
        assert await dump_key(r, budget_key) == {"tok": str(used)}
        assert float((await dump_key(r, f"{p}k:bucket"))["level"]) == 60_000_000 - used
        assert await dump_key(r, f"{p}k:blocks") in (None, [])
        assert await dump_key(r, f"{p}k:leases") in (None, [])

        # A request that used more than it reserved is charged at once, block or not.
        verdicts = await asyncio.gather(*(store.acquire(demand, f"ls_d{i}") for i in range(10)))
        for i, v in enumerate(verdicts[:-1]):
            await store.settle(demand, f"ls_d{i}", v.budget_window, 100, 0.0)
        await asyncio.sleep(0.02)
        before = int((await dump_key(r, budget_key))["tok"])
        await store.settle(demand, "ls_d9", verdicts[-1].budget_window, 150, 0.0)
        await asyncio.sleep(0.02)
        assert int((await dump_key(r, budget_key))["tok"]) == before + 50
        used += 9 * 100 + 150

        await asyncio.sleep(0.3)
        assert await dump_key(r, budget_key) == {"tok": str(used)}
        assert float((await dump_key(r, f"{p}k:bucket"))["level"]) == 60_000_000 - used
    await r.aclose()


async def test_block_leases_count_for_other_processes_until_its_requests_end(
        redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    scope = Scope("k", max_concurrent=64)
    demand = Demand((scope,), tokens=1)
    async with fresh_store(redis_server.url, block_ttl_s=0.1, prefix=prefix) as a, \
            fresh_store(redis_server.url, prefix=prefix) as b:
        held = [await a.acquire(demand, f"a_{i}") for i in range(MIN_BLOCK + 2)]
        assert all(v.allowed for v in held)
        await asyncio.sleep(0.15)  # a's block has expired, but its requests are in flight
        others = await asyncio.gather(*(b.acquire(demand, f"b_{i}") for i in range(64)))
        admitted = [v.allowed for v in others].count(True)
        # a checked its first requests in Redis and admitted the rest from blocks, whose
        # leases all count until a's requests end: b gets what neither holds, no more.
        r = redis_asyncio.Redis.from_url(redis_server.url, decode_responses=True)
        single = await r.zcard(f"{prefix}k:leases") - admitted
        in_blocks = [int(m.split("*")[1]) for m in await r.zrange(f"{prefix}k:blocks", 0, -1)]
        await r.aclose()
        assert in_blocks, in_blocks
        assert single == MIN_BLOCK - 1, (single, in_blocks)
        assert admitted == 64 - single - sum(in_blocks), (admitted, single, in_blocks)
        for i, v in enumerate(held):
            await a.settle(demand, f"a_{i}", v.budget_window, 1, 0.0)
        await asyncio.gather(*(b.settle(demand, f"b_{i}", None, 1, 0.0)
                               for i, v in enumerate(others) if v.allowed))
        await asyncio.sleep(0.05)
        again = await asyncio.gather(*(b.acquire(demand, f"c_{i}") for i in range(65)))
        assert [v.allowed for v in again].count(True) == 64
