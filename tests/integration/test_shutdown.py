"""SIGTERM with live streams (``proxy/app.py`` ``_on_shutdown``): the listener closes at
once, running streams get ``server.drain_timeout`` to finish, streams still running then end
with an error event (never ``[DONE]``), and the process exits 0.

The gateway runs as ``python -m proxy serve`` (the ``gateway_process`` fixture); the mock
upstream is in-process and serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from scripts.mock_upstream import expected_text
from tests.conftest import CLIENT_KEY, MockUpstream, base_config, merge
from tests.integration.conftest import GatewayProcess, StartGatewayProcess

CHAT_PATH = "/v1/chat/completions"
STREAM_CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "stream": True}
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


@dataclass
class StreamRead:
    """One streamed response as the client read it."""

    status: int = 0
    raw: bytearray = field(default_factory=bytearray)
    truncated: str | None = None  # the client error if the body did not end cleanly
    events: asyncio.Event = field(default_factory=asyncio.Event)  # set after the first events

    def data(self) -> list[str]:
        return [line[len("data: "):] for line in self.raw.decode().split("\n")
                if line.startswith("data: ")]

    def text(self) -> str:
        out = []
        for item in self.data():
            if item != "[DONE]":
                chunk = json.loads(item)
                if chunk.get("choices"):
                    out.append(chunk["choices"][0]["delta"].get("content") or "")
        return "".join(out)


async def read_stream(session: aiohttp.ClientSession, url: str, tokens: int, into: StreamRead) -> None:
    headers = {**AUTH, "x-mock-token-delay-ms": "50", "x-mock-tokens": str(tokens)}
    async with session.post(url + CHAT_PATH, json=STREAM_CHAT, headers=headers) as response:
        into.status = response.status
        try:
            async for chunk in response.content.iter_any():
                into.raw += chunk
                if into.raw.count(b"\ndata: ") >= 3:
                    into.events.set()
        except aiohttp.ClientError as exc:
            into.truncated = repr(exc)
    into.events.set()


async def connect_refused(gateway: GatewayProcess) -> bool:
    """Whether a new TCP connection to the gateway's port fails now (refused, or reset while
    in the accept backlog of a listener that is closing)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass
    return False


async def start_streams(gateway: GatewayProcess, session: aiohttp.ClientSession, tokens: int
                        ) -> tuple[list[StreamRead], list[asyncio.Task[None]]]:
    reads = [StreamRead() for _ in range(3)]
    tasks = [asyncio.create_task(read_stream(session, gateway.url, tokens, r)) for r in reads]
    await asyncio.gather(*(r.events.wait() for r in reads))
    for r in reads:
        assert r.status == 200, r.raw[:300]
    return reads, tasks


async def sigterm_and_check_listener(gateway: GatewayProcess) -> float:
    """Send SIGTERM; assert new connections are refused soon after. Returns the signal time."""
    signalled = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    deadline = signalled + 1.0
    while not await connect_refused(gateway):
        assert time.monotonic() < deadline, "the gateway still accepts connections 1 s after SIGTERM"
        await asyncio.sleep(0.02)
    return signalled


async def test_sigterm_lets_live_streams_finish_then_exits_0(
        mock_upstream: MockUpstream, gateway_process: StartGatewayProcess) -> None:
    drain_timeout_s, tokens = 10.0, 40  # 40 tokens * 50 ms: ~2 s per stream
    config = merge(base_config(mock_upstream.base_url), {"server": {"drain_timeout": "10s"}})
    async with asyncio.timeout(20):
        gateway = await gateway_process(config)
        async with aiohttp.ClientSession() as session:
            reads, tasks = await start_streams(gateway, session, tokens)
            signalled = await sigterm_and_check_listener(gateway)
            await asyncio.sleep(0.5)
            assert await connect_refused(gateway), "accepting connections again during the drain"
            assert gateway.proc.returncode is None, "exited before its streams finished"
            await asyncio.gather(*tasks)
        code = await asyncio.wait_for(gateway.proc.wait(), drain_timeout_s)
        exited_after_s = time.monotonic() - signalled
    assert code == 0, gateway.log_text()[-3000:]
    assert exited_after_s < drain_timeout_s, exited_after_s
    for r in reads:
        assert r.truncated is None, r.truncated
        assert r.data()[-1] == "[DONE]", r.raw[-300:]
        assert r.text() == expected_text(tokens)
    stats = await mock_upstream.stats()
    assert stats["streams_completed"] == 3, stats


async def test_drain_timeout_ends_streams_with_an_error_event_then_exits_0(
        mock_upstream: MockUpstream, gateway_process: StartGatewayProcess) -> None:
    drain_timeout_s, tokens = 0.5, 200  # 200 tokens * 50 ms: ~10 s per stream
    config = merge(base_config(mock_upstream.base_url), {"server": {"drain_timeout": "500ms"}})
    async with asyncio.timeout(20):
        gateway = await gateway_process(config)
        async with aiohttp.ClientSession() as session:
            reads, tasks = await start_streams(gateway, session, tokens)
            signalled = await sigterm_and_check_listener(gateway)
            await asyncio.gather(*tasks)
            streams_ended_s = time.monotonic() - signalled
        code = await asyncio.wait_for(gateway.proc.wait(), 10)
        exited_after_s = time.monotonic() - signalled
    assert code == 0, gateway.log_text()[-3000:]
    assert drain_timeout_s * 0.8 <= streams_ended_s < drain_timeout_s + 2.0, streams_ended_s
    assert exited_after_s < drain_timeout_s + 5.0, exited_after_s
    for r in reads:
        assert r.truncated is None, r.truncated
        data = r.data()
        assert "[DONE]" not in data, r.raw[-300:]
        last: dict[str, Any] = json.loads(data[-1])
        assert set(last) == {"error"}, last
        assert last["error"]["code"] == "shutting_down", last
        assert len(r.text()) < len(expected_text(tokens))
    # Generation was cancelled upstream, not left running.
    deadline = time.monotonic() + 2
    while (stats := await mock_upstream.stats())["open_streams"]:
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.05)
    assert stats["streams_completed"] == 0, stats
