"""Load must not multiply the limits (DESIGN §5): two gateway processes share one Redis.

* A CPU hog beside the gateways makes their event loops and Redis's replies late; a late
  loop must not be taken for a slow Redis (``RedisLimitStore``: the deadline moves by the
  loop's own lag), so no process falls back to per-process limits and the shared GCRA bound
  ``burst + rpm * D / 60`` holds.
* With Redis really down (SIGSTOP: connections stay open, nothing answers), each process
  falls back to its share of every limit, ``1/N`` of it with N the live instances counted
  from heartbeats in Redis before the outage, so the two together still stay within the
  bound (``proxy.limits.share_scopes``).

Every loop here is bounded in time; everything runs on loopback.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as redis_asyncio

from proxy.limits import HEARTBEAT_INTERVAL_S
from tests.conftest import MockUpstream
from tests.integration import conftest as integration
from tests.integration.conftest import RedisServer, StartGatewayProcess
from tests.integration.test_limits_redis import (
    PREFIX,
    Reply,
    check_rate_limit_429,
    hammer,
    metric,
    redis_config,
)

gateway_process = integration.gateway_process
redis_server = integration.redis_server

RPM, BURST, DURATION_S = 120, 10, 5.0
FALLBACKS = "shepherd_limit_store_fallbacks_total"
#: The gateways run at the lowest priority beside one CPU hog per CPU at normal priority:
#: the OS makes them wait for a CPU, so their event loops run late, often by 50 to 200 ms,
#: while Redis (waking from sleep, at normal priority) answers at once. Before the loop's
#: lag was told apart from Redis's (``RedisLimitStore._reply``), both processes fell back
#: again and again and admitted 38 to 45 requests where the bound was 20.
GATEWAY_NICE = 19
#: A busy loop that ends by itself (bounded even if the test dies before it is stopped).
HOG = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"


def config(mock: MockUpstream, redis: RedisServer) -> dict[str, Any]:
    """Two-process limits with the real ``state.redis_timeout`` (50 ms, the default), not
    the 1 s the other Redis tests use to stay clear of scheduling stalls."""
    tree = redis_config(mock, redis, {"tester": {"rpm": RPM, "burst": BURST}})
    tree["state"].pop("redis_timeout")
    return tree


@contextmanager
def cpu_hogs(count: int, seconds: float) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` processes spinning on a CPU each for at most ``seconds``."""
    hogs = [subprocess.Popen([sys.executable, "-c", HOG.format(s=seconds)]) for _ in range(count)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(timeout=5)


def gcra_bound(elapsed_s: float) -> int:
    """GCRA admits at most ``burst + floor(D / T)`` in any span of D seconds (+1 ms: Redis
    TIME is read in whole microseconds but TTL math rounds to milliseconds)."""
    return BURST + math.floor((elapsed_s + 0.001) * RPM / 60)


def check_replies(replies: list[Reply]) -> Counter[int]:
    statuses = Counter(r.status for r in replies)
    assert set(statuses) <= {200, 429}, statuses
    for reply in replies:
        if reply.status == 429:
            check_rate_limit_429(reply)
    return statuses


async def test_a_cpu_hog_does_not_make_the_gateways_fall_back(
        redis_server: RedisServer, mock_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    a, b = await asyncio.gather(gateway_process(config(mock_upstream, redis_server)),
                                gateway_process(config(mock_upstream, redis_server)))
    for gateway in (a, b):  # the busy machine, made repeatable: the hogs come first
        os.setpriority(os.PRIO_PROCESS, gateway.pid, GATEWAY_NICE)
    with cpu_hogs(len(os.sched_getaffinity(0)), DURATION_S + 5):
        async with asyncio.timeout(20):
            replies, elapsed = await hammer([a.url, b.url], 4, DURATION_S)
    statuses = check_replies(replies)
    fallbacks = [await metric(g.url, FALLBACKS) for g in (a, b)]
    print(f"cpu hog: admitted {statuses[200]} of {len(replies)} in {elapsed:.2f}s, "
          f"bound {gcra_bound(elapsed)}, fallbacks {fallbacks}")
    outages = [line for g in (a, b) for line in g.log_text().splitlines() if "limit store" in line]
    assert fallbacks == [0, 0], ("a busy machine was taken for a Redis outage", outages[:4])
    assert BURST <= statuses[200] <= gcra_bound(elapsed), (statuses, elapsed)
    assert (await mock_upstream.stats())["requests"] == statuses[200]


async def test_two_gateways_share_each_limit_while_redis_is_stopped(
        redis_server: RedisServer, mock_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    a, b = await asyncio.gather(gateway_process(config(mock_upstream, redis_server)),
                                gateway_process(config(mock_upstream, redis_server)))
    rds = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        for _ in range(100):  # both heartbeats are in Redis ...
            if await rds.zcard(f"{PREFIX}instances") == 2:
                break
            await asyncio.sleep(0.05)
        assert await rds.zcard(f"{PREFIX}instances") == 2
        await asyncio.sleep(HEARTBEAT_INTERVAL_S * 1.5)  # ... and each has read N = 2 since
    finally:
        await rds.aclose()
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(20):
            replies, elapsed = await hammer([a.url, b.url], 4, DURATION_S)
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    statuses = check_replies(replies)
    fallbacks = [await metric(g.url, FALLBACKS) for g in (a, b)]
    print(f"redis stopped: admitted {statuses[200]} of {len(replies)} in {elapsed:.2f}s, "
          f"bound {gcra_bound(elapsed)}, fallbacks {fallbacks}")
    assert all(f > 0 for f in fallbacks), fallbacks  # the premise: both ran on their share
    # Each admits burst // 2 + (rpm // 2) * D / 60: together at most the shared bound.
    assert BURST <= statuses[200] <= gcra_bound(elapsed), (statuses, elapsed)
    assert (await mock_upstream.stats())["requests"] == statuses[200]
