"""proxy/limits_redis.py and proxy/lua/limits_*.lua: the limits script as files, its loading,
and its named operations with keyed replies, against a real ``redis-server``.

Redis forgets scripts (SCRIPT FLUSH, a restart, a failover to a replica that never saw
them): the store must load the script again on NOSCRIPT and answer the same call, blocks of
quota included.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from importlib import resources

import pytest
import redis.asyncio as redis_asyncio

from proxy import limits_redis
from proxy.limits import Budget, Demand, Scope, StoreUnavailable
from proxy.limits_redis import LUA, LUA_FILES, RedisLimitStore, acquire_op, grant_op
from tests.integration.conftest import RedisServer

DEMAND = Demand((Scope("k", rpm=600, burst=10, tpm=100_000, max_concurrent=5),), tokens=100,
                usd=0.5, budget=Budget("k", 10_000, 100.0, 86400.0))


def new_store(url: str) -> RedisLimitStore:
    return RedisLimitStore(url, key_prefix=f"t{uuid.uuid4().hex[:12]}:", timeout_s=5.0)


def test_every_script_file_is_package_data_with_its_contract() -> None:
    """Each file ships in the package and opens with its contract; every operation file
    names its argument, reply, keys and atomicity."""
    lua = resources.files("proxy") / "lua"
    for name in LUA_FILES:
        text = (lua / f"{name}.lua").read_text(encoding="utf-8")
        assert text.startswith(f"-- {name}.lua: "), name
        assert text in LUA
    operations = re.findall(r"^operations\.(\w+) = function", LUA, re.MULTILINE)
    assert sorted(operations) == ["acquire", "block_grant", "block_return", "cancel", "heartbeat",
                                  "refresh", "settle"]
    for name in operations:
        text = (lua / f"limits_{name}.lua").read_text(encoding="utf-8")
        for part in ("Argument", "Reply", "Keys", "Atomicity"):
            assert re.search(rf"^-- {part} ", text, re.MULTILINE), (name, part)


async def test_script_flush_then_a_request_still_works(redis_server: RedisServer) -> None:
    store = new_store(redis_server.url)
    r = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        assert (await store.acquire(DEMAND, "before")).allowed
        assert await r.script_exists(store.script.sha) == [True]
        await r.script_flush()
        assert await r.script_exists(store.script.sha) == [False]
        verdict = await store.acquire(DEMAND, "after")  # NOSCRIPT: loaded again, same call
        assert verdict.allowed
        assert verdict.reports[0].remaining_requests == 8
        assert await r.script_exists(store.script.sha) == [True]
        await store.settle(DEMAND, "after", verdict.budget_window, 50, 0.25)
        assert await r.zrange(f"{store.key_prefix}k:leases", 0, -1) == [b"before"]
    finally:
        await r.aclose()
        await store.close()


async def test_blocks_of_quota_survive_a_script_flush(redis_server: RedisServer) -> None:
    busy = Demand((Scope("busy", rpm=600_000, burst=100_000, tpm=60_000_000),), tokens=10)
    now_us = int(time.time()) * 1_000_000  # frozen: the bucket does not refill
    store = RedisLimitStore(redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:12]}:", timeout_s=5.0,
                            clock_us=lambda: now_us, block_ttl_s=0.05)
    r = redis_asyncio.Redis.from_url(redis_server.url)
    admitted = 0

    def count() -> None:
        nonlocal admitted
        admitted += 1

    store.on_block_admission = count
    try:
        for round_ in range(20):
            if round_ % 5 == 0:
                await r.script_flush()
            verdicts = await asyncio.gather(*(store.acquire(busy, f"ls_{round_}_{i}") for i in range(8)))
            assert all(v.allowed for v in verdicts)
            for i, v in enumerate(verdicts):
                await store.settle(busy, f"ls_{round_}_{i}", v.budget_window, 10, 0.0)
            await asyncio.sleep(0.01)
        assert admitted >= 50, admitted
        await asyncio.sleep(0.1)  # every block ended and was given back
        level = float(await r.hget(f"{store.key_prefix}busy:bucket", "level"))
        assert level == 60_000_000 - 20 * 8 * 10
    finally:
        await r.aclose()
        await store.close()


async def test_replies_are_keyed_objects(redis_server: RedisServer) -> None:
    """The wire, as the Lua files document it: named operations, keyed replies, no magic
    values (a field that does not apply is absent)."""
    now_us = int(time.time()) * 1_000_000
    store = RedisLimitStore(redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:12]}:",
                            timeout_s=5.0, clock_us=lambda: now_us)
    try:
        reply = await store._submit(acquire_op(DEMAND, "a"))
        window = now_us // 1000 // 86_400_000
        assert reply == {"allowed": True, "window": window, "scopes": [{
            "id": "k", "limit_requests": 600, "remaining_requests": 9, "reset_requests_ms": 100,
            "limit_tokens": 100_000, "remaining_tokens": 99_900, "reset_tokens_ms": 60}]}
        tight = Demand((Scope("c", max_concurrent=1),), tokens=1)
        assert (await store._submit(acquire_op(tight, "c1")))["allowed"]
        refused = await store._submit(acquire_op(tight, "c2"))
        assert refused == {"allowed": False, "reason": "concurrency", "scopes": [{"id": "c"}]}
        over = Demand((), tokens=20_000, budget=DEMAND.budget)
        assert await store._submit(acquire_op(over, "b")) == {
            "allowed": False, "reason": "budget", "window": window, "spent_tokens": 100,
            "spent_usd": "0.500000000000"}
        assert await store._submit(grant_op(tight, "blk", 8, 250_000)) == {"size": 0}
        assert await store._submit(limits_redis.cancel_op(acquire_op(tight, "c1"))) == {}
        assert await store._submit({"op": "heartbeat", "instance": "i", "ttl_ms": 1000}) == {"instances": 1}
    finally:
        await store.close()


async def test_an_unknown_operation_fails_the_batch_and_writes_nothing(redis_server: RedisServer) -> None:
    store = new_store(redis_server.url)
    r = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        good = store._submit(acquire_op(DEMAND, "a"))
        bad = store._submit({"op": "acquire_everything", "id": "x"})
        for future in (good, bad):
            with pytest.raises(StoreUnavailable, match="unknown operation acquire_everything"):
                await future
        assert [k async for k in r.scan_iter(match=f"{store.key_prefix}k:*")] == []
    finally:
        await r.aclose()
        await store.close()
