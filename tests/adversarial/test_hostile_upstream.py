"""A hostile upstream cannot take the gateway down or fool a client (issue: hardening, 1).

The hostile upstream is a small aiohttp app on a real loopback socket; the gateway runs as
in ``tests/conftest.py``. A compression bomb is cut at ``max_response_bytes`` without the
gateway inflating it; a 2xx that is not JSON (or, streamed, not ``text/event-stream``) is a
502 ``upstream_invalid_response`` — retried on a healthy deployment before the first byte;
a stream that is not UTF-8 or too long ends with an error event, never ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import CLIENT_KEY, MockUpstream, StartGateway, base_config, merge

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
CHUNK = (b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,'
         b'"delta":{"content":"tok "},"finish_reason":null}]}\n\n')
BOMB_INFLATED_BYTES = 2**30  # 1 GiB of zeros: about 1 MB on the wire
CALLS = web.AppKey("calls", list[str])


@functools.cache
def gzip_bomb(inflated_bytes: int) -> bytes:
    """A gzip body of zeros that inflates to ``inflated_bytes`` (about 1/1000 on the wire)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(2**20)
    return b"".join([*(packer.compress(zeros) for _ in range(inflated_bytes // len(zeros))),
                     packer.flush()])


def hostile_app(bomb: bytes) -> web.Application:
    """``x-hostile`` picks the misbehaviour of ``POST /v1/chat/completions``."""

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        kind = request.headers.get("x-hostile", "")
        request.app[CALLS].append(kind)
        if kind == "bomb":
            return web.Response(body=bomb, headers={"Content-Encoding": "gzip",
                                                    "Content-Type": "application/json"})
        if kind == "html":
            return web.Response(text="<html><body>502 Bad Gateway</body></html>",
                                content_type="text/html")
        if kind == "not-json":
            return web.Response(body=b"{not json", content_type="application/json")
        return await _stream(request, kind)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app[CALLS] = []
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


async def _stream(request: web.Request, kind: str) -> web.StreamResponse:
    content_type = "text/html" if kind == "stream-html" else "text/event-stream"
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    await response.write(CHUNK * 3)
    await asyncio.sleep(0.05)  # the first events reach the client before things turn bad
    if kind == "bad-utf8":
        await response.write(b'data: {"choices":[{"delta":{"content":"\xff\xfe"}}]}\n\n')
    elif kind == "endless":
        for _ in range(2000):  # ~190 KB, past the 64 KiB cap of the test
            await response.write(CHUNK)
    await response.write(b"data: [DONE]\n\n")
    return response


@pytest.fixture
async def hostile(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(hostile_app(gzip_bomb(BOMB_INFLATED_BYTES)))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def peak_rss_during(work: Awaitable[object]) -> tuple[object, int]:
    """Run ``work`` while sampling this process's RSS every 5 ms; returns its result and
    the largest RSS growth seen."""
    start, peak = rss_bytes(), 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_bytes() - start)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        return await work, peak
    finally:
        sampler.cancel()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=AUTH) as session:
        yield session


async def start_with(start_gateway: StartGateway, hostile: TestServer, *,
                     healthy: MockUpstream | None = None, max_response: str = "64KiB") -> str:
    """A gateway whose first (preferred) deployment is ``hostile``; with ``healthy``, the
    mock serves as a second tier to fail over to."""
    upstreams = {"hostile": {"base_url": str(hostile.make_url("/v1")), "api_key": "sk-up",
                             "max_response_bytes": max_response,
                             "health_check": {"enabled": False}}}
    if healthy is not None:
        upstreams["mock"] = {"priority": 1}
    tree = base_config(healthy.base_url if healthy else str(hostile.make_url("/v1")))
    if healthy is None:
        tree["upstreams"] = {}
    tree = merge(tree, {"upstreams": upstreams})
    gateway = await start_gateway(tree)
    return gateway.url


async def test_a_gzip_bomb_is_cut_at_max_response_bytes_without_inflating_it(
        start_gateway: StartGateway, hostile: TestServer, session: aiohttp.ClientSession) -> None:
    """1 MB on the wire that inflates to 1 GiB, against the default max_response_bytes
    (64 MiB): a 502, and the gateway's RSS grows by well under 100 MiB."""
    url = await start_with(start_gateway, hostile, max_response="64MiB")

    async def ask() -> tuple[int, dict[str, object]]:
        async with session.post(url + "/v1/chat/completions", json=CHAT,
                                headers={"x-hostile": "bomb"}) as resp:
            return resp.status, await resp.json()

    (status, body), growth = await peak_rss_during(ask())  # type: ignore[misc]
    assert status == 502
    assert body["error"]["code"] == "upstream_response_too_large"  # type: ignore[index]
    assert growth < 100 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB for a 1 GiB bomb"


@pytest.mark.parametrize("kind", ["html", "not-json"])
async def test_a_2xx_that_is_not_json_is_a_502_not_a_200(
        start_gateway: StartGateway, hostile: TestServer, session: aiohttp.ClientSession,
        kind: str) -> None:
    url = await start_with(start_gateway, hostile)
    async with session.post(url + "/v1/chat/completions", json=CHAT,
                            headers={"x-hostile": kind}) as resp:
        assert resp.status == 502
        assert resp.content_type == "application/json"
        assert (await resp.json())["error"]["code"] == "upstream_invalid_response"
    assert len(hostile.app[CALLS]) == 3  # an upstream failure: retried (routing.retry.attempts)


@pytest.mark.parametrize(("kind", "stream"), [("html", False), ("stream-html", True)])
async def test_an_invalid_answer_fails_over_to_a_healthy_deployment(
        start_gateway: StartGateway, hostile: TestServer, mock_upstream: MockUpstream,
        session: aiohttp.ClientSession, kind: str, stream: bool) -> None:
    url = await start_with(start_gateway, hostile, healthy=mock_upstream)
    async with session.post(url + "/v1/chat/completions", json={**CHAT, "stream": stream},
                            headers={"x-hostile": kind}) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n") if stream else b'"chat.completion"' in body
    assert len(hostile.app[CALLS]) == 1
    assert (await mock_upstream.stats())["requests"] == 1


@pytest.mark.parametrize(("kind", "code"), [("bad-utf8", "upstream_invalid_response"),
                                            ("endless", "upstream_response_too_large")])
async def test_a_stream_that_turns_bad_ends_with_an_error_event(
        start_gateway: StartGateway, hostile: TestServer, session: aiohttp.ClientSession,
        kind: str, code: str) -> None:
    url = await start_with(start_gateway, hostile)
    async with session.post(url + "/v1/chat/completions", json={**CHAT, "stream": True},
                            headers={"x-hostile": kind}) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert b"[DONE]" not in body
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert f'"code":"{code}"'.encode() in last, last
