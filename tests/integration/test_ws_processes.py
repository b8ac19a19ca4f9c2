"""WebSocket streams across gateway processes and under a reader that does not read
(DESIGN §4 "WebSocket", §5): gateway subprocesses, a real ``redis-server``, the
in-process mock upstream, real sockets.

* A ``/v1/ws`` socket killed mid-stream on instance A is resumed with ``resume {stream_id,
  last_seq}`` on instance B: no chunk lost or repeated, the text byte-identical, one
  upstream generation.
* A socket that stops reading pauses the stream's upstream read instead of growing the
  gateway's memory: the mock's answer stays unfinished and the gateway's RSS stays bounded;
  once the client reads again, the whole answer arrives intact.

The slow answers come from upstream headers in the gateway's config (``x-mock-*`` knobs):
WebSocket requests forward none of the client's headers.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from scripts.mock_upstream import expected_text
from tests.conftest import CLIENT_KEY, MockUpstream, base_config, merge
from tests.integration.conftest import RedisServer, StartGatewayProcess

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
IO_TIMEOUT_S = 20.0


def knobbed(mock: MockUpstream, tokens: int, delay_ms: float, **overrides: Any) -> dict[str, Any]:
    """A config whose upstream answers ``tokens`` tokens, ``delay_ms`` apart."""
    return merge(base_config(mock.base_url), {
        "upstreams": {"mock": {"headers": {"x-mock-tokens": str(tokens),
                                           "x-mock-token-delay-ms": str(delay_ms)}}},
        "server": {"access_log": False}, **overrides})


def chunk_text(frames: list[dict[str, Any]]) -> str:
    return "".join(choice["delta"].get("content") or ""
                   for f in frames if f["type"] == "chunk" for choice in f["data"]["choices"])


async def frames_until_end(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(IO_TIMEOUT_S):
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await ws.receive_str()))
    return frames


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_socket_cut_on_one_instance_resumes_on_the_other(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess) -> None:
    config = knobbed(mock_upstream, 30, 20, state={"backend": "redis", "redis_url": redis_server.url,
                                                   "redis_timeout": "1s"})
    a, b = await asyncio.gather(gateway_process(config), gateway_process(config))
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(a.url + "/v1/ws", headers=AUTH) as ws:
            await ws.send_json({"type": "request", "id": "r", "body": {
                "model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}})
            head = [json.loads(await ws.receive_str(timeout=IO_TIMEOUT_S)) for _ in range(5)]
            ws._response.connection.transport.abort()  # type: ignore[union-attr]  # the network drops
        stream_id, last_seq = head[-1]["stream_id"], head[-1]["seq"]
        async with session.ws_connect(b.url + "/v1/ws", headers=AUTH) as ws:
            await ws.send_json({"type": "resume", "id": "r", "stream_id": stream_id, "last_seq": last_seq})
            tail = await frames_until_end(ws)
    assert tail[-1]["type"] == "done"
    seqs = [f["seq"] for f in head + tail[:-1]]
    assert seqs == list(range(1, len(seqs) + 1))  # none lost or repeated
    assert chunk_text(head + tail) == expected_text(30)
    assert (await mock_upstream.stats())["requests"] == 1  # one generation


async def test_a_socket_that_does_not_read_pauses_its_stream_not_the_gateway_memory(
        mock_upstream: MockUpstream, gateway_process: StartGatewayProcess) -> None:
    tokens = 150_000  # about 27 MB of chat chunks: far more than every buffer on the way
    gateway = await gateway_process(knobbed(mock_upstream, tokens, 0))
    rss_before_kib = rss_kib(gateway.pid)
    async with aiohttp.ClientSession() as session, session.ws_connect(
            gateway.url + "/v1/ws", headers=AUTH, max_msg_size=0) as ws:
        ws._response.connection.transport.pause_reading()  # type: ignore[union-attr]  # stop reading
        await ws.send_json({"type": "request", "id": "big",
                            "body": {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": tokens}})
        await asyncio.sleep(3.0)
        stats = await mock_upstream.stats()
        rss_paused_kib = rss_kib(gateway.pid)
        assert stats["open_streams"] == 1, stats  # the upstream answer is paused, not finished
        assert stats["streams_completed"] == 0, stats
        assert rss_paused_kib - rss_before_kib < 48 * 1024, (rss_before_kib, rss_paused_kib)
        ws._response.connection.transport.resume_reading()  # type: ignore[union-attr]
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(120):
            while not frames or frames[-1]["type"] not in ("done", "error"):
                frames.append(json.loads(await ws.receive_str()))
    assert frames[-1]["type"] == "done", (len(frames), frames[-1].get("error"))
    assert frames[-1]["usage"]["completion_tokens"] == tokens
    assert chunk_text(frames) == expected_text(tokens)
