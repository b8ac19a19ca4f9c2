"""Resilience, seen from clients: upstream death and recovery, 5xx storms, 429 cooldown,
overload, disconnects while queued, slow stream readers (DESIGN §3, balancer, admission and
streams docstrings).

Real loopback sockets throughout. Upstreams that a test kills or restarts are
``scripts/mock_upstream.py`` processes; the others are in-process mocks. Every assertion is
about what a client sees (statuses, headers, bodies, latencies) or what an upstream saw
(``/mock/stats``), plus the gateway's own ``/readyz`` and ``/metrics`` answers.
SIGTERM and the drain are in ``test_shutdown.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from proxy.pipeline import GATEWAY
from scripts.mock_upstream import MockConfig
from tests.conftest import (
    CLIENT_KEY,
    MockUpstream,
    RunningGateway,
    StartGateway,
    base_config,
    in_process_mock,
    merge,
)
from tests.integration.conftest import GatewayProcess, StartGatewayProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
MOCK_SCRIPT = REPO_ROOT / "scripts" / "mock_upstream.py"
CHAT_PATH = "/v1/chat/completions"
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
QUEUE_FULL_MESSAGE = "queue is full"
DEADLINE_MESSAGE = "Timed out waiting"


# --------------------------------------------------------------------------- helpers


@dataclass
class MockProcess:
    """``scripts/mock_upstream.py`` as a child process on a fixed port (so it can be killed
    and restarted where the gateway expects it)."""

    port: int
    log_path: Path
    flags: tuple[str, ...] = ()
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    async def start(self, *flags: str, timeout_s: float = 10.0) -> None:
        """Start (or restart, with ``flags`` replacing the previous ones if given) and wait
        for the "listening" line."""
        assert self.proc is None or self.proc.returncode is not None, "already running"
        if flags:
            self.flags = flags
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(MOCK_SCRIPT), "--port", str(self.port), *self.flags,
                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while b"listening" not in self.log_path.read_bytes()[offset:]:
            if self.proc.returncode is not None:
                pytest.fail(f"mock exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mock not listening within {timeout_s}s: {self.log_text()[-2000:]}")
            await asyncio.sleep(0.02)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def kill(self) -> None:
        """SIGKILL: no shutdown, connections die with the process."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(self.url + "/mock/stats") as r:
            return await r.json()  # type: ignore[no-any-return]


StartMock = Callable[..., Awaitable[MockProcess]]
AnyGateway = RunningGateway | GatewayProcess


@pytest.fixture
async def mock_process(tmp_path: Path) -> AsyncIterator[StartMock]:
    started: list[MockProcess] = []

    async def start(*flags: str) -> MockProcess:
        mock = MockProcess(free_port(), tmp_path / f"mock-{len(started)}.log", flags)
        started.append(mock)
        await mock.start()
        return mock

    yield start
    for mock in started:
        await mock.kill()


def chat_count(stats: dict[str, Any]) -> int:
    return int(stats["by_path"].get(CHAT_PATH, 0))


def two_upstreams(url_a: str, url_b: str, **extra: Any) -> dict[str, Any]:
    """``base_config`` with upstreams ``a`` and ``b`` both serving every model; ``extra``
    is merged into both."""
    tree = base_config(url_a)
    template = tree["upstreams"].pop("mock")
    tree["upstreams"] = {name: merge(template, {"base_url": url, **extra})
                         for name, url in (("a", url_a), ("b", url_b))}
    return tree


async def readyz(session: aiohttp.ClientSession, gateway: AnyGateway) -> dict[str, Any]:
    async with session.get(gateway.url + "/readyz") as response:
        return await response.json()  # type: ignore[no-any-return]


async def state_of(session: aiohttp.ClientSession, gateway: AnyGateway, name: str) -> str:
    return str((await readyz(session, gateway))["upstreams"][name]["state"])


async def wait_state(session: aiohttp.ClientSession, gateway: AnyGateway, name: str,
                     predicate: Callable[[str], bool], timeout_s: float) -> float:
    """Poll ``/readyz`` until ``predicate(state of name)``; returns the seconds it took."""
    started = time.monotonic()
    state = "?"
    while time.monotonic() - started < timeout_s:
        state = await state_of(session, gateway, name)
        if predicate(state):
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    pytest.fail(f"upstream {name} still {state!r} after {timeout_s}s")


async def poll_until(read: Callable[[], Awaitable[Any]], check: Callable[[Any], bool],
                     timeout_s: float, message: str = "condition not met") -> Any:
    """Call ``read`` every 10 ms until ``check(value)``; fail with the last value after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await read()
        if check(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{message} after {timeout_s}s: {value!r}")
        await asyncio.sleep(0.01)


async def metric_value(session: aiohttp.ClientSession, gateway: AnyGateway, name: str,
                       labels: str = "") -> float | None:
    """One sample of ``GET /metrics``: ``name{labels}``; ``None`` if absent."""
    async with session.get(gateway.url + "/metrics") as response:
        text = await response.text()
    pattern = re.compile(rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''}"
                         r" ([0-9.e+-]+|NaN)$", re.MULTILINE)
    match = pattern.search(text)
    return float(match.group(1)) if match else None


@dataclass
class Outcome:
    """One client request as the client saw it."""

    status: int
    latency_s: float
    headers: CIMultiDict[str]
    body: bytes

    def error(self) -> dict[str, Any]:
        return json.loads(self.body)["error"]  # type: ignore[no-any-return]


async def post_chat(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None,
                    body: dict[str, Any] | None = None) -> Outcome:
    started = time.perf_counter()
    async with session.post(url + CHAT_PATH, json=body or CHAT, headers={**AUTH, **(headers or {})}
                            ) as response:
        data = await response.read()
    return Outcome(response.status, time.perf_counter() - started, CIMultiDict(response.headers), data)


@contextlib.asynccontextmanager
async def closed_loop_load(session: aiohttp.ClientSession, url: str, clients: int,
                           headers: dict[str, str] | None = None,
                           pause_after_error_s: float = 0.0) -> AsyncIterator[list[Outcome]]:
    """``clients`` concurrent clients each sending one chat request after another until the
    block exits; yields the (growing) list of outcomes."""
    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            outcome = await post_chat(session, url, headers)
            outcomes.append(outcome)
            if outcome.status != 200 and pause_after_error_s:
                await asyncio.sleep(pause_after_error_s)

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    try:
        yield outcomes
    finally:
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=10)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


def failures(outcomes: list[Outcome]) -> list[tuple[int, str | None, bytes]]:
    return [(o.status, o.headers.get("x-should-retry"), o.body[:300])
            for o in outcomes if o.status != 200]


def dechunk(data: bytes) -> bytes:
    """The payload of a complete chunked body."""
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


# --------------------------------------------------------------------------- 1. upstream death


async def test_killed_upstream_fails_over_is_marked_unhealthy_and_recovers(
        mock_process: StartMock, start_gateway: StartGateway) -> None:
    async with asyncio.timeout(20):
        a, b = await asyncio.gather(mock_process(), mock_process())
        interval_s, unhealthy_threshold = 0.2, 2
        config = two_upstreams(a.base_url, b.base_url, health_check={
            "enabled": True, "interval": "200ms", "timeout": "500ms",
            "unhealthy_threshold": unhealthy_threshold, "healthy_threshold": 2})
        gateway = await start_gateway(config)
        async with aiohttp.ClientSession() as session:
            async with closed_loop_load(session, gateway.url, clients=10,
                                        headers={"x-mock-ttft-ms": "20"}) as outcomes:
                await asyncio.sleep(1.0)
                assert chat_count(await a.stats()) > 0, "a took no traffic before the kill"
                served_before_kill = len(outcomes)
                await a.kill()
                # Probes: `unhealthy_threshold` consecutive failures, one per interval.
                took = await wait_state(session, gateway, "a", lambda s: s == "unhealthy", 3.0)
                assert took <= unhealthy_threshold * interval_s + 0.5, took
                await asyncio.sleep(0.3)
                assert await state_of(session, gateway, "a") == "unhealthy"
                await a.start()
                took = await wait_state(session, gateway, "a", lambda s: s == "healthy", 3.0)
                assert took <= 5 * interval_s + 0.5, took
                await asyncio.sleep(1.0)  # load goes on: the restarted a must take its share
                restarted_count = chat_count(await a.stats())
            assert len(outcomes) > served_before_kill + 50, "the load stalled after the kill"
            assert failures(outcomes) == [], f"{len(failures(outcomes))} of {len(outcomes)} failed"
            assert restarted_count > 0, "a is healthy again but takes no traffic"
            assert (await readyz(session, gateway))["status"] == "ready"


# --------------------------------------------------------------------------- 2. 5xx storm


async def test_5xx_storm_ejects_upstream_and_it_returns_after_the_storm(
        mock_process: StartMock, mock_upstream: MockUpstream, start_gateway: StartGateway) -> None:
    async with asyncio.timeout(20):
        a = await mock_process("--fail-status", "500")
        config = two_upstreams(a.base_url, mock_upstream.base_url, outlier_detection={
            "consecutive_failures": 3, "base_ejection": "500ms", "max_ejection": "1s"})
        gateway = await start_gateway(config)
        outcomes: list[Outcome] = []
        async with aiohttp.ClientSession() as session:
            # The storm: every request still succeeds (failover to b) until a is ejected.
            deadline = time.monotonic() + 5
            while await state_of(session, gateway, "a") != "ejected":
                assert time.monotonic() < deadline, "a never ejected"
                outcomes.append(await post_chat(session, gateway.url))
            storm_hits = chat_count(await a.stats())
            assert storm_hits >= 3
            ejections = await metric_value(session, gateway, "shepherd_upstream_ejections_total",
                                           'upstream="a"')
            assert ejections is not None
            assert ejections >= 1
            assert (await readyz(session, gateway))["status"] == "ready"
            # While ejected a gets nothing.
            outcomes += [await post_chat(session, gateway.url) for _ in range(10)]
            if await state_of(session, gateway, "a") == "ejected":
                assert chat_count(await a.stats()) == storm_hits
            # The storm ends: a comes back healthy on the same port.
            await a.kill()
            await a.start("--ttft-ms", "0")
            deadline = time.monotonic() + 8
            while chat_count(await a.stats()) == 0:
                assert time.monotonic() < deadline, "a takes no traffic after its ejection ended"
                outcomes.append(await post_chat(session, gateway.url))
                await asyncio.sleep(0.02)
            outcomes += [await post_chat(session, gateway.url) for _ in range(20)]
            assert chat_count(await a.stats()) >= 3, "a did not take its share again"
            assert await state_of(session, gateway, "a") == "healthy"
        assert failures(outcomes) == []


# --------------------------------------------------------------------------- 3. 429 cooldown


async def test_429_retry_after_cools_the_upstream_down_without_a_hot_loop(
        aiohttp_server: Callable[..., Awaitable[TestServer]], mock_upstream: MockUpstream,
        start_gateway: StartGateway) -> None:
    async with asyncio.timeout(20):
        limited = await in_process_mock(aiohttp_server, MockConfig(fail_status=429, retry_after="2"))
        gateway = await start_gateway(two_upstreams(limited.base_url, mock_upstream.base_url))
        async with aiohttp.ClientSession() as session:
            # Until a request has met the 429 (a's pick is random): each still gets 200 via b.
            primed: list[Outcome] = []
            while chat_count(await limited.stats()) == 0:
                assert len(primed) < 40, "the limited upstream never got a request"
                primed.append(await post_chat(session, gateway.url))
            assert failures(primed) == []
            assert chat_count(await limited.stats()) == 1
            assert await state_of(session, gateway, "a") == "cooldown"
            # 1 s of load inside the 2 s cooldown: a gets no attempt, b takes everything.
            b_before = chat_count(await mock_upstream.stats())
            async with closed_loop_load(session, gateway.url, clients=4) as outcomes:
                await asyncio.sleep(1.0)
            assert failures(outcomes) == []
            assert len(outcomes) > 20
            assert chat_count(await limited.stats()) == 1, "attempts on a cooling-down upstream"
            assert chat_count(await mock_upstream.stats()) - b_before == len(outcomes)


async def test_429_from_the_only_upstream_reaches_the_client_with_retry_after(
        aiohttp_server: Callable[..., Awaitable[TestServer]], start_gateway: StartGateway) -> None:
    async with asyncio.timeout(20):
        limited = await in_process_mock(aiohttp_server, MockConfig(fail_status=429, retry_after="2"))
        gateway = await start_gateway(base_config(limited.base_url))
        async with aiohttp.ClientSession() as session:
            first = await post_chat(session, gateway.url)
            assert first.status == 429, first.body
            assert first.headers.get("retry-after") == "2"
            assert first.headers.get("retry-after-ms") == "2000"
            assert first.error()["code"] == "rate_limit_exceeded"
            assert chat_count(await limited.stats()) == 1, "the 429 was retried on the same upstream"
            # Inside the cooldown nothing reaches the upstream.
            for _ in range(5):
                during = await post_chat(session, gateway.url)
                assert during.status in (429, 503), during.body
                assert 1 <= int(during.headers["retry-after"]) <= 2, during.headers
            assert chat_count(await limited.stats()) == 1, "attempts during the cooldown"


async def test_requests_during_a_429_cooldown_get_429_too(
        aiohttp_server: Callable[..., Awaitable[TestServer]], start_gateway: StartGateway) -> None:
    """The only upstream is rate-limited: a request arriving while it cools down is answered
    the way the one that met the 429 was (429 + retry-after), not as "no healthy upstream"."""
    async with asyncio.timeout(20):
        limited = await in_process_mock(aiohttp_server, MockConfig(fail_status=429, retry_after="2"))
        gateway = await start_gateway(base_config(limited.base_url))
        async with aiohttp.ClientSession() as session:
            first = await post_chat(session, gateway.url)
            assert first.status == 429, first.body
            second = await post_chat(session, gateway.url)
            assert chat_count(await limited.stats()) == 1, "an attempt during the cooldown"
            assert second.status == 429, (second.status, second.body)
            assert second.headers.get("retry-after") in ("1", "2"), second.headers


# --------------------------------------------------------------------------- 4. overload


async def test_overload_is_refused_fast_and_the_queue_stays_bounded(
        mock_process: StartMock, gateway_process: StartGatewayProcess) -> None:
    """Gateway and upstream run as processes so the clients' event loop does not delay
    the answers it measures."""
    ttft_s, queue_timeout_s, max_in_flight, max_queue, clients = 0.2, 0.3, 4, 8, 36
    async with asyncio.timeout(20):
        mock = await mock_process("--ttft-ms", str(int(ttft_s * 1000)))
        gateway = await gateway_process(merge(base_config(mock.base_url), {"upstreams": {"mock": {
            "max_in_flight": max_in_flight, "max_queue": max_queue, "queue_timeout": "300ms"}}}))
        samples: list[tuple[float, int, int]] = []  # metric depth, readyz in flight, readyz queued

        async def sample(session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
            while not stop.is_set():
                depth = await metric_value(session, gateway, "shepherd_queue_depth")
                ready = (await readyz(session, gateway))["upstreams"]["mock"]
                samples.append((depth if depth is not None else -1.0, ready["in_flight"], ready["queued"]))
                await asyncio.sleep(0.02)

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session, \
                aiohttp.ClientSession() as probe_session:
            # One keep-alive connection per client first: connecting is not the gateway's time.
            async def connect() -> None:
                async with session.get(gateway.url + "/healthz") as response:
                    await response.read()

            await asyncio.gather(*(connect() for _ in range(clients)))
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample(probe_session, stop))
            async with closed_loop_load(session, gateway.url, clients=clients,
                                        pause_after_error_s=0.05) as outcomes:
                await asyncio.sleep(3.0)
            stop.set()
            await sampler
        mock_stats = await mock.stats()

    ok = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    assert len(ok) + len(refused) == len(outcomes), failures(outcomes)[:5]
    assert ok, "nothing admitted"
    assert refused, "no overload at 3x capacity"
    for o in refused:
        error = o.error()
        assert error["code"] == "overloaded", error
        assert int(o.headers["retry-after"]) >= 1
        assert "retry-after-ms" in o.headers
    queue_full = [o.latency_s for o in refused if QUEUE_FULL_MESSAGE in o.error()["message"]]
    deadline = [o.latency_s for o in refused if DEADLINE_MESSAGE in o.error()["message"]]
    assert len(queue_full) + len(deadline) == len(refused), {o.error()["message"] for o in refused}
    assert queue_full, "no queue-full refusal"
    assert percentile(queue_full, 0.99) < 0.05, f"queue-full p99 {percentile(queue_full, 0.99):.3f}s"
    if deadline:
        assert min(deadline) >= queue_timeout_s * 0.9, min(deadline)
        assert percentile(deadline, 0.99) < queue_timeout_s + 0.15
    admitted = [o.latency_s for o in ok]
    assert min(admitted) >= ttft_s * 0.9
    assert percentile(admitted, 0.99) < ttft_s + queue_timeout_s + 0.15, percentile(admitted, 0.99)
    # Throughput is the upstream's capacity: max_in_flight / ttft per second, for 3 s.
    assert len(ok) >= 0.6 * max_in_flight / ttft_s * 3.0, len(ok)
    assert samples, "no samples"
    assert max(s[0] for s in samples) <= max_queue
    assert max(s[2] for s in samples) <= max_queue
    assert max(s[1] for s in samples) <= max_in_flight
    assert max(s[0] for s in samples) >= max_queue // 2, "the queue never filled"
    assert chat_count(mock_stats) == len(ok)


# --------------------------------------------------------------------------- 5. disconnect while queued


async def _open_request(url: str, body: dict[str, Any], headers: dict[str, str]
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    head = [f"POST {CHAT_PATH} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", *(f"{k}: {v}" for k, v in {**AUTH, **headers}.items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    await writer.drain()
    return reader, writer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_client_leaving_the_queue_never_reaches_the_upstream(
        mock_upstream: MockUpstream, start_gateway: StartGateway) -> None:
    gateway = await start_gateway(upstreams={"mock": {
        "max_in_flight": 1, "max_queue": 8, "queue_timeout": "10s"}})
    async with asyncio.timeout(20), aiohttp.ClientSession() as session:

        async def mock_slots() -> dict[str, Any]:
            return (await readyz(session, gateway))["upstreams"]["mock"]  # type: ignore[no-any-return]

        holder = asyncio.create_task(post_chat(session, gateway.url, {"x-mock-ttft-ms": "1500"}))
        await poll_until(mock_slots, lambda s: s["in_flight"] == 1, 2.0)
        queued = [await _open_request(gateway.url, CHAT, {}),
                  await _open_request(gateway.url, {**CHAT, "stream": True}, {})]
        await poll_until(mock_slots, lambda s: s["queued"] == len(queued), 1.0)
        assert not holder.done()
        for _, writer in queued:
            await _close(writer)
        await poll_until(mock_slots, lambda s: s["queued"] == 0, 0.5, "departed clients still queued")
        assert not holder.done(), "the queue emptied only because the slot was freed"
        outcome = await holder
        assert outcome.status == 200
        await asyncio.sleep(0.3)  # a slot handed to a departed waiter would be used now
        stats = await mock_upstream.stats()
        assert chat_count(stats) == 1, stats
        slots = await mock_slots()
        assert (slots["queued"], slots["in_flight"]) == (0, 0)
        # The slot is free for the next client.
        assert (await post_chat(session, gateway.url)).status == 200


# --------------------------------------------------------------------------- 6. slow SSE reader

#: Tokens of the long stream (~170 bytes per event: ~17 MB). Loopback sockets have a 64 KiB
#: MSS, so the kernel's autotuned send and receive buffers between mock, gateway and client
#: absorb several MB on their own (measured: ~2.7 MB with a 8 KiB client receive buffer); a
#: 20000-token stream (~3.4 MB) would end in kernel buffers however well the gateway paused.
TOKENS = 100_000


async def test_slow_sse_reader_keeps_the_stream_log_bounded_and_pauses_the_upstream(
        mock_upstream: MockUpstream, start_gateway: StartGateway) -> None:
    buffer_bytes = retain_bytes = 64 * 1024
    bound = retain_bytes + buffer_bytes + 64 * 1024  # StreamLog's documented memory bound
    gateway = await start_gateway(streams={"buffer": "64KiB", "retain": "64KiB"})
    registry = gateway.app[GATEWAY].streams
    loop = asyncio.get_running_loop()
    host, port = gateway.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    held: list[int] = []  # log.held_bytes at each checkpoint
    appended: list[int] = []  # log.bytes_total at each checkpoint
    try:
        async with asyncio.timeout(20):
            await loop.sock_connect(sock, (host, int(port)))
            payload = json.dumps({**CHAT, "stream": True}).encode()
            head = [f"POST {CHAT_PATH} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
                    "Content-Type: application/json", f"Content-Length: {len(payload)}",
                    f"Authorization: Bearer {CLIENT_KEY}", f"x-mock-tokens: {TOKENS}",
                    "x-mock-token-delay-ms: 0"]
            await loop.sock_sendall(sock, ("\r\n".join(head) + "\r\n\r\n").encode() + payload)
            received = bytearray()
            while b"\r\n\r\n" not in received:
                received += await loop.sock_recv(sock, 1024)
            head_text = bytes(received).split(b"\r\n\r\n")[0].decode("latin-1")
            assert head_text.startswith("HTTP/1.1 200"), head_text
            match = re.search(r"(?im)^x-stream-id: *(\S+)", head_text)
            assert match, head_text
            log = registry.get(match.group(1), "tester")
            assert log is not None
            for _ in range(6):
                chunk = await loop.sock_recv(sock, 4096)  # a few KB, then a pause
                assert chunk
                received += chunk
                await asyncio.sleep(0.25)
                held.append(log.held_bytes)
                appended.append(log.bytes_total)
                stats = await mock_upstream.stats()
                assert stats["streams_completed"] == 0, "the upstream was not paused"
                assert stats["open_streams"] == 1, stats
            assert not log.closed
            # The producer is paused: while the client reads a few KB, nothing more is appended.
            assert appended[-1] - appended[1] <= bound, appended
            # Now read fast: the rest arrives whole and ends with [DONE].
            while chunk := await loop.sock_recv(sock, 1 << 20):
                received += chunk
                held.append(log.held_bytes)
    finally:
        sock.close()
    raw = bytes(received)
    assert raw.endswith(b"0\r\n\r\n"), raw[-200:]
    body = dechunk(raw.split(b"\r\n\r\n", 1)[1])
    assert body.count(b'"delta":{"content":') == TOKENS
    assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    stats = await mock_upstream.stats()
    assert stats["streams_completed"] == 1, stats
    # StreamLog: at most retain + buffer + one upstream read (<= 64 KiB) held per stream.
    assert max(held) <= bound, f"held bytes peaked at {max(held)} > {bound}; checkpoints {held[:6]}"
