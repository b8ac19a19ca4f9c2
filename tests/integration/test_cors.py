"""Browser apps on another origin (``server.cors_origins``; Fetch standard, CORS protocol):
the preflight is answered without a key, real responses carry the CORS headers a browser
needs to hand them (and their ``x-request-id``, ``x-ratelimit-*``…) to the app, and an
origin not listed gets nothing. Real sockets; the official SDK's headers as a browser app
would send them."""

from __future__ import annotations

import aiohttp

from tests.conftest import CLIENT_KEY, MockUpstream, StartGateway, base_config, merge

APP = "https://app.example.com"
PREFLIGHT = {"Origin": APP, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}


async def test_preflight_needs_no_key_and_responses_expose_their_headers(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(merge(base_config(mock_upstream.base_url),
                                        {"server": {"cors_origins": [APP]}}))
    async with aiohttp.ClientSession(base_url=gateway.url) as session:
        async with session.options("/v1/chat/completions", headers=PREFLIGHT) as pre:
            assert pre.status == 204
            assert pre.headers["Access-Control-Allow-Origin"] == APP
            assert "POST" in pre.headers["Access-Control-Allow-Methods"]
            assert pre.headers["Access-Control-Allow-Headers"] == PREFLIGHT["Access-Control-Request-Headers"]
        async with session.post("/v1/chat/completions", json=CHAT, headers={
                "Origin": APP, "Authorization": f"Bearer {CLIENT_KEY}"}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == APP
            assert "x-request-id" in resp.headers["Access-Control-Expose-Headers"]
            assert "Origin" in resp.headers.getall("Vary")
        async with session.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={
                "Origin": APP, "Authorization": f"Bearer {CLIENT_KEY}"}) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == APP  # streams too
            assert "X-Stream-Id" in resp.headers["Access-Control-Expose-Headers"]
            await resp.read()
        async with session.post("/v1/chat/completions", json=CHAT, headers={"Origin": APP}) as resp:
            assert resp.status == 401  # errors carry CORS headers, so the app can read them
            assert resp.headers["Access-Control-Allow-Origin"] == APP


async def test_an_origin_not_listed_gets_no_cors_headers(start_gateway: StartGateway,
                                                         mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(merge(base_config(mock_upstream.base_url),
                                        {"server": {"cors_origins": [APP]}}))
    async with aiohttp.ClientSession(base_url=gateway.url) as session:
        async with session.options("/v1/chat/completions",
                                   headers={**PREFLIGHT, "Origin": "https://evil.example"}) as pre:
            assert pre.status == 403
            assert "Access-Control-Allow-Origin" not in pre.headers
        async with session.post("/v1/chat/completions", json=CHAT, headers={
                "Origin": "https://evil.example", "Authorization": f"Bearer {CLIENT_KEY}"}) as resp:
            assert resp.status == 200
            assert "Access-Control-Allow-Origin" not in resp.headers


async def test_without_cors_origins_a_preflight_is_an_ordinary_unauthenticated_request(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway()
    async with aiohttp.ClientSession(base_url=gateway.url) as session, session.options(
            "/v1/chat/completions", headers=PREFLIGHT) as pre:
        assert pre.status == 401
        assert "Access-Control-Allow-Origin" not in pre.headers
