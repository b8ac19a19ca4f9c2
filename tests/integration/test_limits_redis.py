"""Shared limits in Redis, seen from clients of several gateway processes (DESIGN §5).

Every test runs real ``redis-server`` and real gateway processes (``python -m proxy serve``)
pointed at the in-process mock upstream, and asserts only what clients (raw HTTP or the
official SDK) and Redis itself show.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
import redis.asyncio as redis_asyncio

from tests.conftest import CLIENT_KEY, MockUpstream, base_config, merge
from tests.integration.conftest import (
    SPIN_LUA,
    GatewayProcess,
    RedisServer,
    StartGatewayProcess,
    free_port,
)

CHAT_PATH = "/v1/chat/completions"
MODEL = "mock-gpt"
PREFIX = "shepherd:"
RATELIMIT_REQUEST_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                             "x-ratelimit-reset-requests")
GO_DURATION = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+s)$")


# --- helpers ---------------------------------------------------------------------------------


def chat_body(content: str = "hi", **fields: Any) -> bytes:
    """A chat request body, as the exact bytes sent (the gateway's reservation counts them)."""
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], **fields},
                      separators=(",", ":")).encode()


def reservation(body: bytes, completion_reserve: int) -> int:
    """What the gateway reserves for ``body``: a quarter of its bytes plus the completion
    reserve (``proxy.limits.estimate_prompt_tokens`` + ``completion_reserve``)."""
    return max(1, len(body) // 4) + completion_reserve


def redis_config(mock: MockUpstream, redis: RedisServer, keys: dict[str, Any],
                 **overrides: Any) -> dict[str, Any]:
    """The base test config on the redis backend, with ``keys`` merged into ``keys``.

    ``redis_timeout`` is raised from its 50 ms default: two gateway processes, Redis, the
    mock and the test share this machine's few CPUs, and a scheduling stall must not turn
    into a fallback to per-process limits (which these tests would rightly count as a
    broken shared limit). Test 1 checks that no fallback happened.
    """
    tree = merge(base_config(mock.base_url), {
        "state": {"backend": "redis", "redis_url": redis.url, "redis_timeout": "1s"},
        "keys": keys,
        "server": {"access_log": False},
    })
    return merge(tree, overrides)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def code(self) -> str | None:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return error.get("code") if isinstance(error, dict) else None


@asynccontextmanager
async def client(api_key: str = CLIENT_KEY, fresh_connections: bool = False
                 ) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0, force_close=fresh_connections)
    async with aiohttp.ClientSession(connector=connector,
                                     headers={"Authorization": f"Bearer {api_key}"}) as session:
        yield session


async def post(session: aiohttp.ClientSession, base_url: str, body: bytes,
               headers: dict[str, str] | None = None) -> Reply:
    async with session.post(base_url + CHAT_PATH, data=body,
                            headers={"Content-Type": "application/json", **(headers or {})}) as r:
        raw = await r.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw
        return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, parsed)


async def metric(base_url: str, name: str) -> float:
    """The sum of every sample of ``name`` on the gateway's ``/metrics``."""
    async with aiohttp.ClientSession() as session, session.get(base_url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


def check_rate_limit_429(reply: Reply, code: str = "rate_limit_exceeded") -> None:
    """A 429 as DESIGN §4 promises it: retry hints, x-ratelimit-* and the error code."""
    assert reply.status == 429, reply
    assert reply.code == code, reply
    retry_ms = int(reply.headers["retry-after-ms"])
    assert retry_ms >= 1, reply.headers
    assert int(reply.headers["retry-after"]) == math.ceil(retry_ms / 1000), reply.headers
    for name in RATELIMIT_REQUEST_HEADERS:
        assert name in reply.headers, (name, reply.headers)
    assert GO_DURATION.match(reply.headers["x-ratelimit-reset-requests"]), reply.headers


async def start_pair(gateway_process: StartGatewayProcess, config: dict[str, Any]
                     ) -> tuple[GatewayProcess, GatewayProcess]:
    a, b = await asyncio.gather(gateway_process(config), gateway_process(config))
    return a, b


async def burst_across(urls: list[str], count: int, body: bytes, api_key: str = CLIENT_KEY,
                       headers: dict[str, str] | None = None) -> list[Reply]:
    """``count`` requests at once, spread round-robin over ``urls``, each on its own connection."""
    async with client(api_key, fresh_connections=True) as session:
        return await asyncio.gather(*(post(session, urls[i % len(urls)], body, headers)
                                      for i in range(count)))


async def hammer(urls: list[str], clients_per_url: int, duration_s: float
                 ) -> tuple[list[Reply], float]:
    """``clients_per_url`` clients per URL, each sending ``chat_body()`` back to back for
    ``duration_s``; returns every reply and the seconds from the first send to the last answer."""
    loop = asyncio.get_running_loop()
    body = chat_body()
    replies: list[Reply] = []
    started = loop.time()

    async def one_client(url: str) -> None:
        async with client() as session:
            while loop.time() < started + duration_s:
                replies.append(await post(session, url, body))

    await asyncio.gather(*(one_client(url) for url in urls * clients_per_url))
    return replies, loop.time() - started


# --- 1. GCRA rpm shared by two processes ---------------------------------------------------


async def test_rpm_burst_is_shared_by_two_processes(
        redis_server: RedisServer, mock_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    rpm, burst, duration_s = 120, 10, 5.0
    emission_s = 60 / rpm
    a, b = await start_pair(gateway_process, redis_config(
        mock_upstream, redis_server, {"tester": {"rpm": rpm, "burst": burst}}))
    async with asyncio.timeout(15):
        replies, elapsed = await hammer([a.url, b.url], 4, duration_s)

    statuses = Counter(r.status for r in replies)
    accepted = statuses[200]
    assert set(statuses) <= {200, 429}, statuses
    # GCRA admits at most burst + floor(D / T) requests in any span of D seconds of its one
    # clock (Redis TIME, whole milliseconds: +1 ms). Every admission happened between the
    # first send and the last answer, so D <= elapsed; with the 5 s loop this is 10 + 10.
    bound = burst + math.floor((elapsed + 0.001) / emission_s)
    assert accepted <= bound, (statuses, elapsed)
    if elapsed + 0.001 < 5.5:
        assert accepted <= burst + rpm * duration_s / 60, (statuses, elapsed)
    assert accepted >= burst, (statuses, elapsed)
    assert statuses[429] > 0
    for reply in replies:
        if reply.status == 429:
            check_rate_limit_429(reply)
    # The premise: both processes checked Redis every time (no per-process fallback).
    assert await metric(a.url, "shepherd_limit_store_fallbacks_total") == 0
    assert await metric(b.url, "shepherd_limit_store_fallbacks_total") == 0
    assert (await mock_upstream.stats())["requests"] == accepted


# --- 1b. a busy key is admitted from blocks of quota, within the same bound ----------------


async def test_busy_key_admitted_from_blocks_keeps_every_limit(
        redis_server: RedisServer, mock_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    # 100 requests/s with 5 s of tolerance: far enough from the limit at first for blocks of
    # quota (limits.block_ttl, 250 ms: up to 25 requests each), then driven past it.
    rpm, burst, duration_s = 6000, 500, 4.0
    emission_s = 60 / rpm
    a, b = await start_pair(gateway_process, redis_config(
        mock_upstream, redis_server,
        {"tester": {"rpm": rpm, "burst": burst, "tpm": 60_000_000, "max_concurrent": 1000,
                    "budget": {"tokens": 10**9, "period": "1d"}}},
        limits={"default_reserve_tokens": 20}))
    async with asyncio.timeout(20):
        replies, elapsed = await hammer([a.url, b.url], 8, duration_s)

    statuses = Counter(r.status for r in replies)
    accepted = statuses[200]
    assert set(statuses) <= {200, 429}, statuses
    assert burst <= accepted <= burst + math.floor((elapsed + 0.001) / emission_s), (statuses, elapsed)
    assert statuses[429] > 0, statuses
    for reply in replies:
        if reply.status == 429:
            check_rate_limit_429(reply)
        else:
            assert int(reply.headers["x-ratelimit-remaining-requests"]) >= 0, reply.headers
    for gateway in (a, b):
        assert await metric(gateway.url, "shepherd_limit_block_admissions_total") > 0
        assert await metric(gateway.url, "shepherd_limit_store_fallbacks_total") == 0
    assert (await mock_upstream.stats())["requests"] == accepted

    # Once the blocks have ended, every reservation has been given back and every lease
    # released: the budget holds exactly what the upstream reported.
    await asyncio.sleep(0.6)
    used = sum(r.body["usage"]["total_tokens"] for r in replies if r.status == 200)
    rds = redis_asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        budget_keys = [k async for k in rds.scan_iter(f"{PREFIX}budget:tester:*")]
        assert len(budget_keys) == 1, budget_keys
        assert await rds.hgetall(budget_keys[0]) == {"tok": str(used)}
        assert await rds.zcard(f"{PREFIX}tester:leases") == 0
        assert await rds.zcard(f"{PREFIX}tester:blocks") == 0
    finally:
        await rds.aclose()


# --- 2. max_concurrent shared by two processes ---------------------------------------------


async def test_max_concurrent_is_shared_by_two_processes(
        redis_server: RedisServer, mock_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    a, b = await start_pair(gateway_process, redis_config(
        mock_upstream, redis_server, {"tester": {"max_concurrent": 2}}))
    async with asyncio.timeout(15):
        replies = await burst_across([a.url, b.url], 6, chat_body(), headers={"x-mock-ttft-ms": "800"})
    statuses = Counter(r.status for r in replies)
    assert statuses == {200: 2, 429: 4}, [(r.status, r.body) for r in replies]
    for reply in replies:
        if reply.status == 429:
            assert reply.code == "concurrency_limit_exceeded", reply
            assert "retry-after" in reply.headers, reply.headers
            assert "retry-after-ms" in reply.headers, reply.headers

    # Every lease was released when its request ended: the slots are free again.
    r = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        assert await r.zcard(f"{PREFIX}tester:leases") == 0
    finally:
        await r.aclose()
    async with asyncio.timeout(10):
        again = await burst_across([a.url, b.url], 2, chat_body(), headers={"x-mock-ttft-ms": "300"})
    assert [r.status for r in again] == [200, 200], [r.body for r in again]


# --- 3. TPM: reserve, then reconcile with the upstream's usage -------------------------------


async def test_tpm_reconciles_to_actual_usage_across_processes(
        redis_server: RedisServer, mock_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    tpm = 6000
    rate_per_s = tpm / 60
    a, b = await start_pair(gateway_process, redis_config(
        mock_upstream, redis_server, {"tester": {"tpm": tpm}}))
    big = chat_body(max_tokens=4000)          # reserves ~4000 tokens ...
    small = chat_body(max_tokens=10)
    r1, r2 = reservation(big, 4000), reservation(small, 10)
    async with client() as session, asyncio.timeout(10):
        started = time.monotonic()
        first = await post(session, a.url, big, {"x-mock-tokens": "1000"})  # ... uses ~1000
        second = await post(session, b.url, small, {"x-mock-tokens": "5"})
        elapsed = time.monotonic() - started
    assert first.status == 200, first
    assert second.status == 200, second
    usage = first.body["usage"]
    actual = usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == 1000
    assert actual < r1 - 2000

    assert first.headers["x-ratelimit-limit-tokens"] == str(tpm)
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == tpm - r1  # a full bucket minus r1
    assert GO_DURATION.match(first.headers["x-ratelimit-reset-tokens"]), first.headers

    # After the first request settled, the bucket holds tpm - actual (plus what refilled since
    # the first admission, at most elapsed seconds' worth, capped at tpm); the second request
    # reserves r2 from that. The lower bound allows 1 for the float floor of an exact integer.
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    low = tpm - actual - r2
    high = min(tpm, tpm - actual + rate_per_s * (elapsed + 0.002)) - r2
    assert low - 1 <= remaining <= high, (remaining, low, high, elapsed)
    # Without the reconcile it would show the first reservation still held.
    assert remaining > tpm - r1 - r2 + 1000


# --- 4. budgets: check-and-charge is atomic across processes ------------------------------


async def test_budget_is_not_overspent_by_concurrent_requests(
        redis_server: RedisServer, mock_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    reserve, mock_tokens, presend = 20, 60, 5
    body = chat_body()                      # no max_tokens: reserves default_reserve_tokens
    r = reservation(body, reserve)
    actual = 1 + mock_tokens                # the mock: prompt "hi" is 1 token, answers 60
    assert actual > r                       # every request overshoots its reservation ...
    # ... and after the pre-spend exactly one more reservation fits (remaining in [r, 2r)).
    budget = presend * actual + r + r // 2
    a, b = await start_pair(gateway_process, redis_config(
        mock_upstream, redis_server, {"tester": {"budget": {"tokens": budget, "period": "1d"}}},
        limits={"default_reserve_tokens": reserve}))
    headers = {"x-mock-tokens": str(mock_tokens)}
    rds = redis_asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with client() as session, asyncio.timeout(10):
            for i in range(presend):
                reply = await post(session, (a.url, b.url)[i % 2], body, headers)
                assert reply.status == 200, reply
                got = reply.body["usage"]
                assert got["prompt_tokens"] + got["completion_tokens"] == actual, got
        budget_keys = [k async for k in rds.scan_iter(f"{PREFIX}budget:tester:*")]
        assert len(budget_keys) == 1, budget_keys
        assert int(await rds.hget(budget_keys[0], "tok")) == presend * actual

        async with asyncio.timeout(10):
            replies = await burst_across([a.url, b.url], 20, body, headers=headers)
        statuses = Counter(reply.status for reply in replies)
        assert statuses == {200: 1, 429: 19}, statuses
        for reply in replies:
            if reply.status == 429:
                assert reply.code == "insufficient_quota", reply
                assert reply.body["error"]["type"] == "insufficient_quota", reply
                assert reply.headers.get("x-should-retry") == "false", reply.headers
                message = reply.body["error"]["message"]
                assert f"of {budget:,} tokens used" in message, message  # what is left ...
                assert "left" in message, message
                assert "resets in" in message, message  # ... and when it resets
                assert 0 < int(reply.headers["retry-after"]) <= 86400, reply.headers
        charged = int(await rds.hget(budget_keys[0], "tok"))
        used = sum(reply.body["usage"]["total_tokens"] for reply in replies if reply.status == 200)
        assert charged == presend * actual + used          # reconciled to the actual usage
        assert charged <= budget + (actual - r), (charged, budget, actual, r)
    finally:
        await rds.aclose()


# --- 5. Redis outage: fail open, count it, recover -----------------------------------------


async def test_redis_outage_fails_open_then_recovers(
        redis_server: RedisServer, mock_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    key_a, key_b, key_shared = "sk-probe-a-0123456789", "sk-probe-b-0123456789", "sk-shared-0123456789"
    a, b = await start_pair(gateway_process, redis_config(mock_upstream, redis_server, {
        "tester": {"rpm": 600, "burst": 5},
        "probe_a": {"key": key_a, "rpm": 6000, "burst": 100},
        "probe_b": {"key": key_b, "rpm": 6000, "burst": 100},
        "shared": {"key": key_shared, "rpm": 60, "burst": 3},
    }))
    body = chat_body()
    rds = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        async with client() as session, asyncio.timeout(5):
            assert (await post(session, a.url, body)).status == 200
        assert await rds.exists(f"{PREFIX}tester:tat") == 1

        await asyncio.to_thread(redis_server.stop)
        replies: list[Reply] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.5

        async def hammer(url: str) -> None:
            async with client() as session:
                while loop.time() < deadline:
                    replies.append(await post(session, url, body))
                    await asyncio.sleep(0.01)

        async with asyncio.timeout(10):
            await asyncio.gather(*(hammer(url) for url in [a.url, b.url] * 2))
        statuses = Counter(r.status for r in replies)
        unexpected = [(r.status, r.body) for r in replies if r.status not in (200, 429)]
        assert not unexpected, (statuses, unexpected[:5])
        assert statuses[200] > 0, statuses
        for reply in replies:
            if reply.status == 429:
                check_rate_limit_429(reply)
        assert await metric(a.url, "shepherd_limit_store_fallbacks_total") > 0
        assert await metric(b.url, "shepherd_limit_store_fallbacks_total") > 0

        await asyncio.to_thread(redis_server.start)
        await rds.aclose()  # its pooled connection died with the old server
        rds = redis_asyncio.Redis.from_url(redis_server.url)
        assert await rds.exists(f"{PREFIX}tester:tat") == 0  # a fresh, empty Redis
        # Each process writes to Redis again within a few seconds (probe keys are each used
        # through one process only, so each key appearing proves that process recovered).
        async with client(key_a) as probe_a, client(key_b) as probe_b, asyncio.timeout(8):
            while not (await rds.exists(f"{PREFIX}probe_a:tat") and await rds.exists(f"{PREFIX}probe_b:tat")):
                ra, rb = await asyncio.gather(post(probe_a, a.url, body), post(probe_b, b.url, body))
                assert ra.status == 200, ra
                assert rb.status == 200, rb
                await asyncio.sleep(0.2)

        # The shared limit holds across both processes again: burst 3 in total, not 3 each.
        started = loop.time()
        async with asyncio.timeout(10):
            shared = await burst_across([a.url, b.url], 12, body, api_key=key_shared)
        elapsed = loop.time() - started
        accepted = sum(r.status == 200 for r in shared)
        assert accepted <= 3 + math.floor(elapsed + 0.001), (accepted, elapsed)
        assert accepted >= 3, [(r.status, r.body) for r in shared]
        assert all(r.status in (200, 429) for r in shared)
    finally:
        await rds.aclose()


# --- 6. openai-python waits for the gateway's retry hint -----------------------------------


async def test_openai_sdk_honours_retry_after(
        redis_server: RedisServer, mock_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    gateway = await gateway_process(redis_config(
        mock_upstream, redis_server, {"tester": {"rpm": 60, "burst": 1}}))
    seen: list[httpx.Response] = []

    async def record(response: httpx.Response) -> None:
        seen.append(response)

    http_client = httpx.AsyncClient(event_hooks={"response": [record]})
    sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=2,
                             http_client=http_client)
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    try:
        async with asyncio.timeout(15):
            await sdk.chat.completions.create(model=MODEL, messages=messages)
            started = time.monotonic()
            second = await sdk.chat.completions.create(model=MODEL, messages=messages)
            elapsed = time.monotonic() - started
    finally:
        await sdk.close()
        await http_client.aclose()
    assert second.choices[0].message.content
    assert [r.status_code for r in seen] == [200, 429, 200]
    refused = seen[1]
    retry_ms = int(refused.headers["retry-after-ms"])
    assert 800 <= retry_ms <= 1000, refused.headers
    assert elapsed >= 0.8
    assert elapsed >= retry_ms / 1000 - 0.01, (elapsed, retry_ms)
    assert (await mock_upstream.stats())["requests"] == 2


# --- 8. a slow Redis must not leave leases behind -----------------------------------------

#: A script that keeps Redis busy (single-threaded: every other client waits) for ARGV[1] ms.
async def test_slow_redis_does_not_leak_concurrency_leases(
        redis_server: RedisServer, mock_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    """A limit check that times out (``redis_timeout``) falls back to per-process limits;
    when Redis then runs the late check, the lease it grants belongs to nobody and must not
    hold the key's slot: once nothing is in flight, a request must be admitted."""
    config = redis_config(mock_upstream, redis_server, {"tester": {"max_concurrent": 1}})
    config["state"]["redis_timeout"] = "50ms"   # the default
    gateway = await gateway_process(config)
    blocker = redis_asyncio.Redis.from_url(redis_server.url)
    rds = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        async with client() as session, asyncio.timeout(15):
            assert (await post(session, gateway.url, chat_body())).status == 200  # Redis in use
            spin = asyncio.create_task(blocker.eval(SPIN_LUA, 0, 600))
            await asyncio.sleep(0.1)
            during = await post(session, gateway.url, chat_body())
            assert during.status == 200, during       # answered from per-process limits
            await spin
            assert await metric(gateway.url, "shepherd_limit_store_fallbacks_total") > 0
            await asyncio.sleep(1.2)                  # the limiter retries Redis after 1 s
            after = await post(session, gateway.url, chat_body())
            leases = await rds.zrange(f"{PREFIX}tester:leases", 0, -1, withscores=True)
        assert after.status == 200, (after.status, after.code, "leases held in Redis:", leases)
        assert leases == []
    finally:
        await blocker.aclose()
        await rds.aclose()


# --- 7. --workers: SO_REUSEPORT workers share the Redis limits -----------------------------


def _listening_pids(log_text: str) -> set[int]:
    pids = set()
    for line in log_text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("msg") == "listening":
            pids.add(int(record["pid"]))
    return pids


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def _scraped_chat_counts(url: str, fetches: int) -> set[tuple[int, int]]:
    """``(200s, 429s)`` of chat requests as ``/metrics`` counts them, scraped ``fetches``
    times on fresh connections (the kernel spreads them over the workers; every worker's
    scrape shows the whole server's counters)."""
    pattern = re.compile(r'^shepherd_requests_total\{[^}]*endpoint="/v1/chat/completions"'
                         r'[^}]*status="(\d+)"[^}]*\} (\S+)$', re.MULTILINE)
    seen = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(fetches):
            async with session.get(url + "/metrics") as r:
                counts = {int(s): int(float(v)) for s, v in pattern.findall(await r.text())}
            seen.add((counts.get(200, 0), counts.get(429, 0)))
    return seen


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads worker pids from /proc")
async def test_workers_share_redis_limits_and_stop_on_sigterm(
        redis_server: RedisServer, mock_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    config = redis_config(mock_upstream, redis_server, {"tester": {"rpm": 60, "burst": 3}})
    gateway = await gateway_process(config, port=free_port(), workers=2)

    async with asyncio.timeout(8):
        while len(workers := _listening_pids(gateway.log_text())) < 2:
            assert gateway.proc.returncode is None, gateway.log_text()
            await asyncio.sleep(0.1)
    assert len(workers) == 2, workers
    assert gateway.pid not in workers, workers
    assert all(_parent_pid(pid) == gateway.pid for pid in workers), workers

    started = time.monotonic()
    async with asyncio.timeout(10):
        replies = await burst_across([gateway.url], 12, chat_body())
    elapsed = time.monotonic() - started
    accepted = sum(r.status == 200 for r in replies)
    assert accepted <= 3 + math.floor(elapsed + 0.001), (accepted, elapsed)
    assert accepted >= 3, [(r.status, r.body) for r in replies]
    assert all(r.status in (200, 429) for r in replies)
    # Whichever worker answers the scrape, it shows the whole server: the two workers'
    # answers add up to the burst, admitted within one shared limit.
    async with asyncio.timeout(10):
        scraped = await _scraped_chat_counts(gateway.url, 24)
    assert scraped == {(accepted, 12 - accepted)}, scraped

    gateway.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        code = await gateway.proc.wait()
    assert code == 0, gateway.log_text()
    # The workers are gone too (they were stopped, not orphaned).
    for _ in range(100):
        if not any(_alive(pid) for pid in workers):
            break
        await asyncio.sleep(0.05)
    assert not any(_alive(pid) for pid in workers), workers


async def test_workers_with_memory_backend_are_refused(
        mock_upstream: MockUpstream, gateway_process: StartGatewayProcess) -> None:
    config = base_config(mock_upstream.base_url)  # state.backend defaults to memory
    gateway = await gateway_process(config, port=free_port(), workers=2, wait=False)
    async with asyncio.timeout(15):
        code = await gateway.proc.wait()
    assert code == 2, gateway.log_text()
    assert "redis" in gateway.log_text().lower()


def _cpus_allowed(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


@pytest.mark.skipif(not os.path.isdir("/proc") or len(os.sched_getaffinity(0)) < 2,
                    reason="reads worker CPUs from /proc; needs two CPUs")
async def test_cpu_affinity_pins_each_worker_to_its_own_cpu(
        redis_server: RedisServer, mock_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    config = redis_config(mock_upstream, redis_server, {"tester": {}})
    config["server"] = {**config.get("server", {}), "cpu_affinity": True}
    gateway = await gateway_process(config, port=free_port(), workers=2)
    async with asyncio.timeout(8):
        while len(workers := _listening_pids(gateway.log_text())) < 2:
            assert gateway.proc.returncode is None, gateway.log_text()
            await asyncio.sleep(0.1)
    first_two = [str(cpu) for cpu in sorted(os.sched_getaffinity(0))[:2]]
    assert sorted(_cpus_allowed(pid) for pid in workers) == sorted(first_two), workers
    async with client() as session, asyncio.timeout(10):
        assert (await post(session, gateway.url, chat_body())).status == 200
