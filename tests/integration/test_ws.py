"""``/v1/ws`` (native) and ``/v1/ws/stream`` (relay dialect) as their users see them
(DESIGN §4 "WebSocket"): real sockets on loopback, the gateway in front of the in-process
mock upstream, aiohttp's and the ``websockets`` library's clients.

The mock's answers are deterministic (``expected_text(n)`` for ``n`` tokens); a slow
answer comes from a mock started with a per-token delay (``slow_mock``), since WebSocket
requests forward none of the client's headers (so no ``x-mock-*`` knobs).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import websockets
from aiohttp.test_utils import TestServer

from scripts.mock_upstream import MockConfig, expected_text
from tests.conftest import (
    CLIENT_KEY,
    OTHER_KEY,
    MockUpstream,
    RunningGateway,
    StartGateway,
    base_config,
    in_process_mock,
    merge,
)

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
MESSAGES = [{"role": "user", "content": "tell me a story"}]
CHAT_BODY = {"model": "mock-gpt", "messages": MESSAGES, "max_tokens": 8}
IO_TIMEOUT_S = 10.0

Frame = dict[str, Any]


@pytest.fixture
async def slow_mock(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> MockUpstream:
    """A mock whose answers take 20 ms per token (64 tokens unless capped)."""
    return await in_process_mock(aiohttp_server, MockConfig(tokens=64, token_delay_ms=20.0))


def ws_url(gateway: RunningGateway, path: str) -> str:
    return gateway.url.replace("http://", "ws://") + path


@asynccontextmanager
async def connect(gateway: RunningGateway, path: str = "/v1/ws", headers: dict[str, str] | None = None,
                  **kwargs: Any) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as session, session.ws_connect(
            ws_url(gateway, path), headers=AUTH if headers is None else headers, **kwargs) as ws:
        yield ws


async def receive(ws: aiohttp.ClientWebSocketResponse) -> Frame:
    msg = await ws.receive(timeout=IO_TIMEOUT_S)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    frame: Frame = json.loads(msg.data)
    return frame


async def until(ws: aiohttp.ClientWebSocketResponse, *kinds: str) -> list[Frame]:
    """Frames received until (and including) one whose type is in ``kinds``."""
    frames = []
    while True:
        frame = await receive(ws)
        frames.append(frame)
        if frame["type"] in kinds:
            return frames


def chunk_text(frames: list[Frame]) -> str:
    return "".join(choice["delta"].get("content") or ""
                   for f in frames if f["type"] == "chunk" for choice in f["data"]["choices"])


async def handshake_status(gateway: RunningGateway, path: str, headers: dict[str, str]) -> tuple[int, Frame]:
    """The HTTP status and JSON body of a refused handshake (the upgrade never happened)."""
    async with aiohttp.ClientSession() as session, session.get(
            gateway.url + path, headers={**headers, "Connection": "Upgrade", "Upgrade": "websocket",
                                         "Sec-WebSocket-Version": "13",
                                         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as response:
        body: Frame = await response.json()
        assert response.status != 101
        return response.status, body


# --------------------------------------------------------------------------- /v1/ws


async def test_native_stream_chunks_in_order_then_done_with_usage(gateway: RunningGateway) -> None:
    async with connect(gateway) as ws:
        await ws.send_json({"type": "request", "id": "r1", "endpoint": "chat.completions",
                            "body": CHAT_BODY})
        frames = await until(ws, "done", "error")
    chunks, done = frames[:-1], frames[-1]
    assert done["type"] == "done", done
    assert {f["type"] for f in chunks} == {"chunk"}
    assert [f["seq"] for f in chunks] == list(range(1, len(chunks) + 1))
    assert {f["id"] for f in frames} == {"r1"}
    assert len({f["stream_id"] for f in frames}) == 1
    assert chunk_text(chunks) == expected_text(8)
    assert done["usage"]["completion_tokens"] == 8
    assert done["usage"]["prompt_tokens"] == 4


async def test_native_non_streamed_request_and_embeddings_answer_with_one_response_frame(
        gateway: RunningGateway) -> None:
    async with connect(gateway) as ws:
        await ws.send_json({"type": "request", "id": "u", "body": {**CHAT_BODY, "stream": False}})
        answer = await receive(ws)
        await ws.send_json({"type": "request", "id": "e", "endpoint": "embeddings",
                            "body": {"model": "mock-embed", "input": "hello"}})
        embedding = await receive(ws)
    assert answer["type"] == "response"
    assert answer["id"] == "u"
    assert answer["data"]["choices"][0]["message"]["content"] == expected_text(8)
    assert embedding["type"] == "response"
    assert embedding["data"]["object"] == "list"


async def test_native_multiplexes_requests_on_one_socket(gateway: RunningGateway) -> None:
    async with connect(gateway) as ws:
        for request_id, tokens in (("a", 5), ("b", 7), ("c", 3)):
            await ws.send_json({"type": "request", "id": request_id,
                                "body": {**CHAT_BODY, "max_tokens": tokens}})
        frames: list[Frame] = []
        while sum(f["type"] == "done" for f in frames) < 3:
            frames.append(await receive(ws))
    for request_id, tokens in (("a", 5), ("b", 7), ("c", 3)):
        mine = [f for f in frames if f["id"] == request_id]
        assert chunk_text(mine) == expected_text(tokens)
        assert mine[-1]["type"] == "done"
    assert len({f["stream_id"] for f in frames}) == 3


async def test_native_first_frame_auth(gateway: RunningGateway) -> None:
    async with connect(gateway, headers={}) as ws:
        await ws.send_json({"type": "auth", "api_key": CLIENT_KEY})
        await ws.send_json({"type": "request", "id": "r", "body": CHAT_BODY})
        frames = await until(ws, "done", "error")
    assert frames[-1]["type"] == "done"
    assert chunk_text(frames) == expected_text(8)


async def test_native_bad_key_in_first_frame_gets_error_then_1008(gateway: RunningGateway) -> None:
    async with connect(gateway, headers={}) as ws:
        await ws.send_json({"type": "auth", "api_key": "sk-wrong"})
        error = await receive(ws)
        closing = await ws.receive(timeout=IO_TIMEOUT_S)
    assert error["type"] == "error"
    assert error["error"]["code"] == "invalid_api_key"
    assert "sk-wrong" not in json.dumps(error)
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1008


async def test_native_subprotocol_auth_selects_only_the_native_protocol(gateway: RunningGateway) -> None:
    uri = ws_url(gateway, "/v1/ws")
    async with websockets.connect(uri, subprotocols=[  # type: ignore[list-item]
            "shepherd.v1", f"openai-insecure-api-key.{CLIENT_KEY}"]) as ws:
        assert ws.subprotocol == "shepherd.v1"
        await ws.send(json.dumps({"type": "request", "id": "s", "body": CHAT_BODY}))
        frames = []
        async with asyncio.timeout(IO_TIMEOUT_S):
            while not frames or frames[-1]["type"] not in ("done", "error"):
                frames.append(json.loads(await ws.recv()))
    assert frames[-1]["type"] == "done"
    assert chunk_text(frames) == expected_text(8)


@pytest.mark.parametrize(("headers", "status", "code"), [
    ({"Authorization": "Bearer sk-wrong"}, 401, "invalid_api_key"),
    ({"Sec-WebSocket-Protocol": "shepherd.v1, openai-insecure-api-key.sk-wrong"}, 401, "invalid_api_key"),
])
async def test_refused_handshakes_are_http_errors(gateway: RunningGateway, headers: dict[str, str],
                                                  status: int, code: str) -> None:
    for path in ("/v1/ws", "/v1/ws/stream"):
        got, body = await handshake_status(gateway, path, headers)
        assert got == status
        assert body["error"]["code"] == code
        assert "sk-wrong" not in json.dumps(body)


async def test_model_in_the_handshake_query_is_checked_before_the_upgrade(gateway: RunningGateway) -> None:
    for path in ("/v1/ws?model=other-model", "/v1/ws/stream?model=other-model"):
        status, body = await handshake_status(gateway, path, {"Authorization": f"Bearer {OTHER_KEY}"})
        assert status == 404
        assert body["error"]["code"] == "model_not_found"
    async with connect(gateway, "/v1/ws?model=mock-gpt",
                       headers={"Authorization": f"Bearer {OTHER_KEY}"}) as ws:
        await ws.send_json({"type": "ping"})
        assert (await receive(ws))["type"] == "pong"


async def test_max_websockets_per_key_refuses_the_next_handshake_with_429(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(merge(base_config(mock_upstream.base_url),
                                        {"keys": {"tester": {"max_websockets": 2}}}))
    async with connect(gateway), connect(gateway):
        status, body = await handshake_status(gateway, "/v1/ws", AUTH)
        assert status == 429
        assert body["error"]["code"] == "too_many_websockets"
    async with connect(gateway) as ws:  # closing one frees its place
        await ws.send_json({"type": "ping"})
        assert (await receive(ws))["type"] == "pong"


async def test_bad_frames_get_error_frames_and_the_socket_stays_open(gateway: RunningGateway) -> None:
    async with connect(gateway) as ws:
        await ws.send_str("not json")
        assert (await receive(ws))["error"]["code"] == "invalid_frame"
        await ws.send_str('["a list"]')
        assert (await receive(ws))["error"]["code"] == "invalid_frame"
        await ws.send_json({"type": "teleport"})
        assert (await receive(ws))["error"]["code"] == "unknown_frame_type"
        await ws.send_json({"type": "request", "id": "x", "endpoint": "images", "body": {}})
        assert (await receive(ws))["error"]["code"] == "unknown_endpoint"
        await ws.send_json({"type": "request", "id": "y", "body": {"messages": []}})
        error = await receive(ws)
        assert error["id"] == "y"
        assert error["error"]["type"] == "invalid_request_error"
        await ws.send_json({"type": "ping"})
        assert (await receive(ws))["type"] == "pong"


async def test_binary_frame_closes_with_1003(gateway: RunningGateway) -> None:
    async with connect(gateway) as ws:
        await ws.send_bytes(b"\x00\x01")
        msg = await ws.receive(timeout=IO_TIMEOUT_S)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1003


async def test_frame_over_max_frame_closes_with_1009(start_gateway: StartGateway,
                                                     mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(merge(base_config(mock_upstream.base_url),
                                        {"ws": {"max_frame": "1KiB"}}))
    async with connect(gateway) as ws:
        await ws.send_str(json.dumps({"type": "ping", "pad": "x" * 4096}))
        msg = await ws.receive(timeout=IO_TIMEOUT_S)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1009


async def test_idle_socket_is_closed_with_1001_but_not_while_a_stream_runs(
        start_gateway: StartGateway, slow_mock: MockUpstream) -> None:
    gateway = await start_gateway(merge(base_config(slow_mock.base_url),
                                        {"ws": {"idle_timeout": "300ms"}}))
    async with connect(gateway) as ws:
        # 16 tokens 20 ms apart: the stream outlives the idle timeout while the client is silent
        await ws.send_json({"type": "request", "id": "r", "body": {**CHAT_BODY, "max_tokens": 16}})
        frames = await until(ws, "done", "error")
        closing = await ws.receive(timeout=IO_TIMEOUT_S)
    assert frames[-1]["type"] == "done"
    assert chunk_text(frames) == expected_text(16)
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1001


async def test_rate_limited_request_gets_error_with_retry_after_and_socket_stays_open(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(merge(base_config(mock_upstream.base_url),
                                        {"keys": {"tester": {"rpm": 1, "burst": 1}}}))
    async with connect(gateway) as ws:
        await ws.send_json({"type": "request", "id": "1", "body": CHAT_BODY})
        assert (await until(ws, "done", "error"))[-1]["type"] == "done"
        await ws.send_json({"type": "request", "id": "2", "body": CHAT_BODY})
        error = await receive(ws)
        await ws.send_json({"type": "ping"})
        assert (await receive(ws))["type"] == "pong"
    assert error["type"] == "error"
    assert error["id"] == "2"
    assert error["error"]["code"] == "rate_limit_exceeded"
    assert error["retry_after_ms"] > 0


async def test_max_in_flight_per_socket(start_gateway: StartGateway, slow_mock: MockUpstream) -> None:
    gateway = await start_gateway(merge(base_config(slow_mock.base_url),
                                        {"ws": {"max_in_flight": 1}}))
    async with connect(gateway) as ws:
        await ws.send_json({"type": "request", "id": "1", "body": {**CHAT_BODY, "max_tokens": 10}})
        first = await receive(ws)
        await ws.send_json({"type": "request", "id": "2", "body": CHAT_BODY})
        frames = await until(ws, "done")
    assert first["type"] == "chunk"
    refused = [f for f in frames if f["id"] == "2"]
    assert refused == [{"type": "error", "id": "2", "error": refused[0]["error"], "retry_after_ms": 100}]
    assert refused[0]["error"]["code"] == "too_many_requests_in_flight"
    assert chunk_text([first, *frames]) == expected_text(10)


async def test_cancel_stops_generation(start_gateway: StartGateway, slow_mock: MockUpstream) -> None:
    gateway = await start_gateway(base_config(slow_mock.base_url))
    async with connect(gateway) as ws:
        await ws.send_json({"type": "request", "id": "c", "body": {**CHAT_BODY, "max_tokens": 64}})
        await receive(ws)
        await ws.send_json({"type": "cancel", "id": "c"})
        frames = await until(ws, "done", "error")
    assert frames[-1]["type"] == "error"
    assert frames[-1]["error"]["code"] == "stream_cancelled"
    assert len(frames) < 64
    async with asyncio.timeout(IO_TIMEOUT_S):
        while (await slow_mock.stats())["open_streams"]:  # noqa: ASYNC110 (polling another server)
            await asyncio.sleep(0.05)


async def test_dropped_socket_then_resume_on_a_new_socket_is_seamless(
        start_gateway: StartGateway, slow_mock: MockUpstream) -> None:
    gateway = await start_gateway(base_config(slow_mock.base_url))
    async with connect(gateway) as ws:
        await ws.send_json({"type": "request", "id": "r", "body": {**CHAT_BODY, "max_tokens": 20}})
        before = [await receive(ws) for _ in range(4)]
    # the socket is gone: the stream detached and goes on generating
    stream_id, last_seq = before[-1]["stream_id"], before[-1]["seq"]
    await asyncio.sleep(0.1)
    async with connect(gateway) as ws:
        await ws.send_json({"type": "resume", "stream_id": stream_id, "last_seq": last_seq})
        after = await until(ws, "done", "error")
    assert after[-1]["type"] == "done"
    seqs = [f["seq"] for f in before + after[:-1]]
    assert seqs == list(range(1, len(seqs) + 1))
    assert {f["id"] for f in after} == {stream_id}
    assert chunk_text(before + after) == expected_text(20)


async def test_resume_errors(gateway: RunningGateway) -> None:
    async with connect(gateway) as ws:
        await ws.send_json({"type": "resume", "stream_id": "gs_" + "0" * 24, "last_seq": 0})
        missing = await receive(ws)
        await ws.send_json({"type": "resume", "stream_id": "gs_x", "last_seq": -1})
        malformed = await receive(ws)
    assert missing["error"]["code"] == "stream_not_found"
    assert malformed["error"]["code"] == "invalid_frame"


async def test_drain_finishes_streams_then_closes_with_1012(start_gateway: StartGateway,
                                                            slow_mock: MockUpstream) -> None:
    gateway = await start_gateway(base_config(slow_mock.base_url))
    async with connect(gateway) as ws:
        await ws.send_json({"type": "request", "id": "d", "body": {**CHAT_BODY, "max_tokens": 15}})
        first = await receive(ws)
        shutdown = asyncio.create_task(gateway.runner.cleanup())
        frames = await until(ws, "done", "error")
        closing = await ws.receive(timeout=IO_TIMEOUT_S)
        await shutdown
    assert frames[-1]["type"] == "done"
    assert chunk_text([first, *frames]) == expected_text(15)
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1012


# --------------------------------------------------------------------------- /v1/ws/stream


async def test_relay_session_keeps_the_conversation(gateway: RunningGateway,
                                                    mock_upstream: MockUpstream) -> None:
    async with connect(gateway, "/v1/ws/stream", headers={}) as ws:
        await ws.send_json({"type": "session.start", "model": "mock-gpt",
                            "auth": {"api_key": CLIENT_KEY},
                            "config": {"temperature": 0.3, "max_tokens": 4, "stream": True}})
        assert await receive(ws) == {"type": "session_established", "model": "mock-gpt"}
        answers = []
        for content in ("hello there", "and again"):
            await ws.send_json({"type": "chat.message", "role": "user", "content": content})
            answers.append(await until(ws, "message_done", "error"))
    for frames in answers:
        assert frames[0] == {"type": "content_block_start"}
        assert frames[-1]["type"] == "message_done"
        assert frames[-1]["usage"]["completion_tokens"] == 4
        assert "".join(f["delta"]["content"] for f in frames if f["type"] == "content_delta") \
            == expected_text(4)
    sent = [r for r in await mock_upstream.requests() if r["path"] == "/v1/chat/completions"][-2:]
    second = sent[1]["body"]
    assert second["messages"] == [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": expected_text(4)},
        {"role": "user", "content": "and again"},
    ]
    assert second["temperature"] == 0.3
    assert second["max_tokens"] == 4


async def test_relay_one_shot_completion_with_config(gateway: RunningGateway,
                                                     mock_upstream: MockUpstream) -> None:
    async with connect(gateway, "/v1/ws/stream") as ws:
        await ws.send_json({"type": "chat.completion", "model": "mock-gpt", "messages": MESSAGES,
                            "stream": True, "config": {"max_tokens": 6, "top_p": 0.5,
                                                       "presence_penalty": 0.1, "bogus": 1}})
        frames = await until(ws, "message_done", "error")
        await ws.send_json({"type": "chat.completion", "model": "mock-gpt", "messages": MESSAGES,
                            "stream": False, "config": {"max_tokens": 3}})
        unary = await until(ws, "message_done", "error")
    assert frames[0] == {"type": "content_block_start"}
    assert "".join(f["delta"]["content"] for f in frames if f["type"] == "content_delta") \
        == expected_text(6)
    assert [f["delta"]["content"] for f in unary if f["type"] == "content_delta"] == [expected_text(3)]
    assert unary[-1]["usage"]["completion_tokens"] == 3
    sent = [r for r in await mock_upstream.requests() if r["path"] == "/v1/chat/completions"][-2]
    assert sent["body"]["top_p"] == 0.5
    assert sent["body"]["presence_penalty"] == 0.1
    assert "bogus" not in sent["body"]


async def test_relay_errors_are_frames_and_the_socket_stays_open(gateway: RunningGateway) -> None:
    async with connect(gateway, "/v1/ws/stream") as ws:
        await ws.send_json({"type": "chat.message", "content": "no session yet"})
        no_session = await receive(ws)
        await ws.send_json({"type": "session.start"})
        no_model = await receive(ws)
        await ws.send_json({"type": "chat.completion", "model": "mock-gpt", "messages": "nope"})
        bad_messages = await receive(ws)
        await ws.send_json({"type": "ping"})
        assert (await receive(ws))["type"] == "pong"
    assert no_session == {"type": "error", "message": no_session["message"], "code": "no_session",
                          "status": 400}
    assert no_model["code"] == "invalid_frame"
    assert bad_messages["code"] == "invalid_frame"


async def test_relay_model_not_allowed_for_key(gateway: RunningGateway) -> None:
    async with connect(gateway, "/v1/ws/stream", headers={"Authorization": f"Bearer {OTHER_KEY}"}) as ws:
        await ws.send_json({"type": "session.start", "model": "other-model"})
        refused = await receive(ws)
    assert refused["code"] == "model_not_found"


async def test_relay_bad_key_in_session_start_closes_with_1008(gateway: RunningGateway) -> None:
    async with connect(gateway, "/v1/ws/stream", headers={}) as ws:
        await ws.send_json({"type": "session.start", "model": "mock-gpt", "auth": {"api_key": "sk-bad"}})
        error = await receive(ws)
        closing = await ws.receive(timeout=IO_TIMEOUT_S)
    assert error["type"] == "error"
    assert error["code"] == "invalid_api_key"
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1008


async def test_relay_with_the_websockets_library(gateway: RunningGateway) -> None:
    async with websockets.connect(ws_url(gateway, "/v1/ws/stream"),
                                  additional_headers=AUTH) as ws:
        await ws.send(json.dumps({"type": "session.start", "model": "mock-gpt",
                                  "config": {"max_tokens": 5}}))
        assert json.loads(await ws.recv())["type"] == "session_established"
        await ws.send(json.dumps({"type": "chat.message", "role": "user", "content": "hi"}))
        frames = []
        async with asyncio.timeout(IO_TIMEOUT_S):
            while not frames or frames[-1]["type"] not in ("message_done", "error"):
                frames.append(json.loads(await ws.recv()))
    assert "".join(f["delta"]["content"] for f in frames if f["type"] == "content_delta") \
        == expected_text(5)
