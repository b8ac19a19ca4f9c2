"""``GET /v1/realtime``: the passthrough to an upstream's Realtime WebSocket, end to end.

The real gateway on loopback in front of the mock upstream (``realtime: true``), driven by
openai-python's ``client.realtime.connect()``, the ``websockets`` library and aiohttp's client.
Faults are set with the mock's ``x-mock-*`` headers, which the gateway forwards upstream.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from proxy.app import start_server
from proxy.config import load_settings
from scripts.mock_upstream import expected_text
from tests.conftest import (
    CLIENT_KEY,
    OTHER_KEY,
    UPSTREAM_KEY,
    MockUpstream,
    RunningGateway,
    base_config,
    merge,
)

SMALL_KEY = "sk-test-small-tpm-key-77"
SINGLE_KEY = "sk-test-one-at-a-time-88"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
USER_ITEM = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello there"}]}

StartRealtime = Callable[..., Awaitable[RunningGateway]]


def realtime_config(upstream_url: str) -> dict[str, Any]:
    """``base_config`` with the mock as a realtime upstream serving ``mock-*``, a plain
    upstream serving ``plain-*``, and keys with small limits."""
    return merge(base_config(upstream_url), {
        "upstreams": {
            "mock": {"realtime": True, "models": ["mock-*"]},
            "plain": {"base_url": upstream_url, "models": ["plain-*"],
                      "health_check": {"enabled": False}},
        },
        "keys": {
            "small": {"key": SMALL_KEY, "models": ["*"], "tpm": 40},
            "single": {"key": SINGLE_KEY, "models": ["*"], "max_concurrent": 1, "max_websockets": 2},
        },
    })


async def launch(mock_upstream: MockUpstream, **overrides: Any) -> RunningGateway:
    """A gateway in front of the mock with ``realtime_config`` and ``overrides``."""
    settings = load_settings(merge(realtime_config(mock_upstream.base_url), overrides), env={})
    runner, port = await start_server(settings, "127.0.0.1", 0)
    return RunningGateway(runner, f"http://127.0.0.1:{port}", settings)


@pytest.fixture
async def start_realtime(mock_upstream: MockUpstream) -> AsyncIterator[StartRealtime]:
    runners: list[Any] = []

    async def start(**overrides: Any) -> RunningGateway:
        gateway = await launch(mock_upstream, **overrides)
        runners.append(gateway.runner)
        return gateway

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def gateway(start_realtime: StartRealtime) -> RunningGateway:
    return await start_realtime()


def ws_url(gateway: RunningGateway, model: str = "mock-gpt") -> str:
    return gateway.url.replace("http://", "ws://") + f"/v1/realtime?model={model}"


def _client(gateway: RunningGateway, key: str = CLIENT_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(5):
        event = orjson.loads(await ws.recv())
    assert isinstance(event, dict)
    return event


async def round_trip(ws: ClientConnection) -> dict[str, Any]:
    """One user item and one response over a raw socket; returns the ``response.done`` event."""
    await ws.send(orjson.dumps({"type": "conversation.item.create", "item": USER_ITEM}).decode())
    assert (await recv_json(ws))["type"] == "conversation.item.created"
    await ws.send('{"type": "response.create"}')
    while (event := await recv_json(ws))["type"] != "response.done":
        pass
    return event


async def handshake(gateway: RunningGateway, model: str | None = "mock-gpt",
                    headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """A raw upgrade request: the status, headers and (for a refusal) the JSON body."""
    query = f"?model={model}" if model is not None else ""
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}
    async with aiohttp.ClientSession() as session, session.get(
            gateway.url + "/v1/realtime" + query, headers={**upgrade, **(headers or {})}) as response:
        body = await response.json() if response.status != 101 else None
        return response.status, dict(response.headers), body


async def upstream_handshakes(mock_upstream: MockUpstream) -> list[dict[str, Any]]:
    return [r for r in await mock_upstream.requests() if r["path"] == "/v1/realtime"]


async def wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - the state polled is in another process's view
            await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- openai-python


async def test_openai_sdk_round_trip(gateway: RunningGateway) -> None:
    async with _client(gateway) as client, client.realtime.connect(model="mock-gpt") as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        await conn.session.update(session={"type": "realtime", "instructions": "be brief"})
        updated = await conn.recv()
        assert updated.type == "session.updated"
        await conn.conversation.item.create(item=USER_ITEM)  # type: ignore[arg-type]
        assert (await conn.recv()).type == "conversation.item.created"
        await conn.response.create()
        deltas: list[str] = []
        async with asyncio.timeout(10):
            async for event in conn:
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
                elif event.type == "response.output_text.done":
                    assert event.text == expected_text(8)
                elif event.type == "response.done":
                    break
    assert "".join(deltas) == expected_text(8)
    assert event.response.usage is not None
    assert (event.response.usage.input_tokens, event.response.usage.output_tokens) == (4, 8)


async def test_openai_sdk_refused_key_is_http_401(gateway: RunningGateway) -> None:
    async with _client(gateway, "sk-wrong") as client:
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            async with client.realtime.connect(model="mock-gpt"):
                pass
    assert info.value.response.status_code == 401
    assert orjson.loads(info.value.response.body)["error"]["code"] == "invalid_api_key"


# --------------------------------------------------------------------------- auth


async def test_upstream_gets_its_own_key_never_the_clients(gateway: RunningGateway,
                                                           mock_upstream: MockUpstream) -> None:
    async with ws_connect(ws_url(gateway), additional_headers=AUTH) as ws:
        assert (await recv_json(ws))["type"] == "session.created"
    async with ws_connect(ws_url(gateway), subprotocols=[  # type: ignore[list-item]
            "realtime", f"openai-insecure-api-key.{CLIENT_KEY}"]) as ws:
        assert (await recv_json(ws))["type"] == "session.created"
    seen = await upstream_handshakes(mock_upstream)
    assert len(seen) == 2
    for request in seen:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert CLIENT_KEY not in orjson.dumps(request["headers"]).decode()
    assert {k.lower(): v for k, v in seen[1]["headers"].items()}["sec-websocket-protocol"] == "realtime"


async def test_subprotocol_auth_selects_only_realtime(gateway: RunningGateway) -> None:
    offered = [f"openai-insecure-api-key.{CLIENT_KEY}", "realtime", "openai-beta.realtime-v1"]
    async with ws_connect(ws_url(gateway), subprotocols=offered) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "realtime"
        assert ws.response is not None
        assert ws.response.headers.get_all("Sec-WebSocket-Protocol") == ["realtime"]
        assert (await recv_json(ws))["type"] == "session.created"
    async with aiohttp.ClientSession() as session, session.ws_connect(
            ws_url(gateway), protocols=("realtime", f"openai-insecure-api-key.{CLIENT_KEY}")) as ws2:
        assert ws2.protocol == "realtime"
        assert (await ws2.receive_json())["type"] == "session.created"


async def test_key_only_subprotocol_is_accepted_and_never_logged(
        gateway: RunningGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with ws_connect(ws_url(gateway), subprotocols=[  # type: ignore[list-item]
            f"openai-insecure-api-key.{CLIENT_KEY}"]) as ws:
        assert ws.subprotocol is None  # nothing the client offered may be echoed
        assert (await recv_json(ws))["type"] == "session.created"
    server_lines = [r.getMessage() for r in caplog.records if not r.name.startswith("websockets")]
    assert not any(CLIENT_KEY in line for line in server_lines)


@pytest.mark.parametrize(("headers", "model", "status", "code"), [
    ({}, "mock-gpt", 401, "missing_api_key"),
    ({"Authorization": "Bearer sk-wrong"}, "mock-gpt", 401, "invalid_api_key"),
    ({"Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.sk-wrong"}, "mock-gpt", 401,
     "invalid_api_key"),
    ({"Authorization": f"Bearer {CLIENT_KEY}"}, None, 400, "missing_required_parameter"),
    ({"Authorization": f"Bearer {CLIENT_KEY}"}, "nope-model", 404, "model_not_found"),
    # A model the key may not use is answered as an unknown one (404), as on the HTTP path.
    ({"Authorization": f"Bearer {OTHER_KEY}"}, "mock-other", 404, "model_not_found"),
    ({"Authorization": f"Bearer {CLIENT_KEY}"}, "plain-1", 404, "realtime_not_supported"),
])
async def test_refused_handshake_is_a_real_http_status(
        gateway: RunningGateway, mock_upstream: MockUpstream, headers: dict[str, str],
        model: str | None, status: int, code: str) -> None:
    got, response_headers, body = await handshake(gateway, model, headers)
    assert (got, body["error"]["code"]) == (status, code)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "x-request-id" in {k.lower() for k in response_headers}
    assert await upstream_handshakes(mock_upstream) == []


async def test_plain_get_is_400(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session, session.get(
            ws_url(gateway).replace("ws://", "http://"),
            headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "websocket_upgrade_required"


# --------------------------------------------------------------------------- upstream failures


@pytest.mark.parametrize(("upstream_status", "status"), [("503", 503), ("404", 404), ("401", 502),
                                                          ("429", 429)])
async def test_upstream_handshake_error_is_http_error_before_upgrade(
        gateway: RunningGateway, upstream_status: str, status: int) -> None:
    got, headers, body = await handshake(gateway, headers={
        "Authorization": f"Bearer {CLIENT_KEY}", "x-mock-status": upstream_status})
    assert got == status
    assert body["error"]["message"]
    if status == 429:
        assert "retry-after" in {k.lower() for k in headers}


async def test_unreachable_upstream_is_502(start_realtime: StartRealtime) -> None:
    gateway = await start_realtime(upstreams={"mock": {"base_url": "http://127.0.0.1:9/v1"}})
    got, _, body = await handshake(gateway, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert got == 502
    assert body["error"]["code"] == "upstream_connection_error"


# --------------------------------------------------------------------------- close codes


@pytest.mark.parametrize(("code", "reason"), [(4001, "mock says bye"), (1011, "mock broke"),
                                              (1000, "")])
async def test_upstream_close_code_and_reason_reach_the_client(
        gateway: RunningGateway, code: int, reason: str) -> None:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "x-mock-close-code": str(code),
               "x-mock-close-reason": reason, "x-mock-close-after": "1"}
    async with ws_connect(ws_url(gateway), additional_headers=headers) as ws:
        assert (await recv_json(ws))["type"] == "session.created"
        with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
            await recv_json(ws)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (code, reason)


async def test_upstream_vanishing_is_1011(gateway: RunningGateway) -> None:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "x-mock-reset-after": "1"}
    async with ws_connect(ws_url(gateway), additional_headers=headers) as ws:
        assert (await recv_json(ws))["type"] == "session.created"
        with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
            await recv_json(ws)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1011  # 1006 cannot be sent on the wire


async def test_client_close_code_reaches_the_upstream(gateway: RunningGateway,
                                                      mock_upstream: MockUpstream) -> None:
    async with ws_connect(ws_url(gateway), additional_headers=AUTH) as ws:
        assert (await recv_json(ws))["type"] == "session.created"
        await ws.close(code=4002, reason="client bye")

    async def relayed() -> bool:
        stats = await mock_upstream.stats()
        return bool(stats["realtime_last_close"] == {"code": 4002, "reason": "client bye"}
                    and stats["realtime_open"] == 0)

    await wait_for(relayed)


async def test_binary_and_text_relayed_both_ways(gateway: RunningGateway) -> None:
    async with ws_connect(ws_url(gateway), additional_headers=AUTH) as ws:
        assert (await recv_json(ws))["type"] == "session.created"
        blob = os.urandom(70_000)
        await ws.send(blob)
        async with asyncio.timeout(5):
            assert await ws.recv() == blob
        await ws.send('{"type": "no.such.event", "event_id": "evt_1"}')
        error = await recv_json(ws)
        assert (error["type"], error["error"]["event_id"]) == ("error", "evt_1")


# --------------------------------------------------------------------------- limits and usage


async def test_usage_from_response_done_counts_into_tpm(gateway: RunningGateway) -> None:
    headers = {"Authorization": f"Bearer {SMALL_KEY}", "x-mock-tokens": "60"}
    async with ws_connect(ws_url(gateway), additional_headers=headers) as ws:
        assert (await recv_json(ws))["type"] == "session.created"
        done = await round_trip(ws)
        assert done["response"]["usage"]["output_tokens"] == 60
        # Charged when the response ended, not when the socket closes: the key (tpm 40) is
        # in debt now, so its next handshake is refused while this session is still open.
        got, response_headers, body = await handshake(
            gateway, headers={"Authorization": f"Bearer {SMALL_KEY}"})
        assert got == 429
        assert body["error"]["type"] == "tokens"
        assert {"retry-after", "x-ratelimit-limit-tokens"} <= {k.lower() for k in response_headers}


async def test_max_concurrent_holds_for_the_session(gateway: RunningGateway) -> None:
    headers = {"Authorization": f"Bearer {SINGLE_KEY}"}
    async with ws_connect(ws_url(gateway), additional_headers=headers) as ws:
        assert (await recv_json(ws))["type"] == "session.created"
        got, _, body = await handshake(gateway, headers=headers)
        assert (got, body["error"]["code"]) == (429, "concurrency_limit_exceeded")

    async def admitted_again() -> bool:
        status, _, _ = await handshake(gateway, headers=headers)
        return status == 101

    await wait_for(admitted_again)


async def test_metrics_count_the_session(gateway: RunningGateway) -> None:
    async with ws_connect(ws_url(gateway), additional_headers=AUTH) as ws:
        assert (await recv_json(ws))["type"] == "session.created"
    async with aiohttp.ClientSession() as session:

        async def counted() -> bool:
            async with session.get(gateway.url + "/metrics") as response:
                text = await response.text()
            # 101 when the handler ended first, 499 when the client's close reached it first
            return any(line.startswith('shepherd_requests_total{endpoint="/v1/realtime",key="tester"')
                       for line in text.splitlines())

        await wait_for(counted)


# --------------------------------------------------------------------------- drain


async def test_shutdown_closes_idle_sessions_with_1012(mock_upstream: MockUpstream) -> None:
    gateway = await launch(mock_upstream, server={"drain_timeout": "20s"})
    async with ws_connect(ws_url(gateway), additional_headers=AUTH) as ws:
        assert (await recv_json(ws))["type"] == "session.created"
        loop = asyncio.get_running_loop()
        started = loop.time()
        cleanup = asyncio.create_task(gateway.runner.cleanup())
        with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
            async with asyncio.timeout(10):
                await ws.recv()
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1012
        assert loop.time() - started < 5  # an idle session does not hold the drain for 20 s
        await cleanup
    assert (await mock_upstream.stats())["realtime_open"] == 0
