"""``/v1/responses`` over WebSocket (OpenAI's Responses WebSocket mode) as its users see it
(DESIGN §4 "WebSocket"): openai-python's ``client.responses.connect()`` and aiohttp's
client on real loopback sockets, the gateway bridging each ``response.create`` to the mock
upstream's HTTP ``POST /v1/responses`` stream.

WebSocket requests forward none of the client's headers, so slow answers come from a mock
started with a per-token delay (``slow_mock``). Answers are deterministic: ``n`` tokens
read ``expected_text(n)``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from proxy import ws_responses
from proxy.pipeline import GATEWAY
from proxy.websocket import StreamEvent
from scripts.mock_upstream import MockConfig, expected_text
from tests.conftest import (
    CLIENT_KEY,
    MockUpstream,
    RunningGateway,
    StartGateway,
    base_config,
    in_process_mock,
    merge,
)

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
CREATE = {"type": "response.create", "model": "mock-gpt", "input": "tell me a story"}
IO_TIMEOUT_S = 10.0
TERMINAL = ("response.completed", "response.incomplete", "response.failed", "error")

Event = dict[str, Any]


@pytest.fixture
async def slow_mock(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> MockUpstream:
    """A mock whose answers take 20 ms per token, 16 tokens unless capped."""
    return await in_process_mock(aiohttp_server, MockConfig(tokens=16, token_delay_ms=20.0))


@pytest.fixture
async def slow_gateway(start_gateway: StartGateway, slow_mock: MockUpstream) -> RunningGateway:
    return await start_gateway(base_config(slow_mock.base_url))


def ws_url(gateway: RunningGateway) -> str:
    return gateway.url.replace("http://", "ws://") + "/v1/responses"


@asynccontextmanager
async def connect(gateway: RunningGateway, headers: dict[str, str] | None = None
                  ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as session, session.ws_connect(
            ws_url(gateway), headers=AUTH if headers is None else headers) as ws:
        yield ws


@asynccontextmanager
async def sdk_client(gateway: RunningGateway, api_key: str = CLIENT_KEY
                     ) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0)
    try:
        yield client
    finally:
        await client.close()


async def receive(ws: aiohttp.ClientWebSocketResponse) -> Event:
    msg = await ws.receive(timeout=IO_TIMEOUT_S)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    event: Event = json.loads(msg.data)
    return event


async def until_terminal(ws: aiohttp.ClientWebSocketResponse, count: int = 1) -> list[Event]:
    """Events until ``count`` terminal events (a response's last event or an error)."""
    events: list[Event] = []
    while count:
        events.append(await receive(ws))
        count -= events[-1]["type"] in TERMINAL
    return events


def text_of(events: list[Any]) -> str:
    return "".join(_get(e, "delta") for e in events if _get(e, "type") == "response.output_text.delta")


def _get(event: Any, name: str) -> Any:
    return event[name] if isinstance(event, dict) else getattr(event, name)


def shape(events: list[Any]) -> list[tuple[str, int, str | None]]:
    """What two runs of the same request share: each event's type, number and delta."""
    return [(_get(e, "type"), _get(e, "sequence_number"),
             _get(e, "delta") if _get(e, "type").endswith(".delta") else None) for e in events]


def of_lane(events: list[Event], lane: str) -> list[Event]:
    return [e for e in events if e.get("stream_id") == lane]


def assert_error_event(event: Event, status: int, code: str) -> None:
    """``ResponseWsError``: ``type: error``, the HTTP ``status``, the OpenAI error object."""
    assert event["type"] == "error", event
    assert event["status"] == status, event
    assert event["error"]["code"] == code, event
    assert {"type", "code", "message", "param"} <= set(event["error"]), event


async def upstream_bodies(mock: MockUpstream) -> list[Any]:
    return [r["body"] for r in await mock.requests() if r["path"] == "/v1/responses"]


# --------------------------------------------------------------------------- openai-python


async def test_sdk_round_trip_gives_the_same_events_as_the_http_stream(gateway: RunningGateway) -> None:
    async with sdk_client(gateway) as client:
        http_events = [e async for e in await client.responses.create(
            model="mock-gpt", input="tell me a story", stream=True)]
        async with client.responses.connect() as connection:
            await connection.response.create(model="mock-gpt", input="tell me a story")
            ws_events = []
            async with asyncio.timeout(IO_TIMEOUT_S):
                async for event in connection:
                    ws_events.append(event)
                    if event.type in TERMINAL:
                        break
    assert shape(ws_events) == shape(http_events)
    assert [e.sequence_number for e in ws_events] == list(range(len(ws_events)))
    assert ws_events[-1].type == "response.completed"
    assert ws_events[-1].response.output_text == text_of(ws_events) == expected_text(8)
    assert ws_events[-1].response.usage.output_tokens == 8


async def test_sdk_connection_runs_turns_one_after_another_with_previous_response_id(
        gateway: RunningGateway, mock_upstream: MockUpstream) -> None:
    async with sdk_client(gateway) as client, client.responses.connect() as connection:
        completed = []
        for turn in range(2):
            previous = {"previous_response_id": completed[-1].response.id} if completed else {}
            await connection.response.create(model="mock-gpt", input=f"turn {turn}", **previous)
            async with asyncio.timeout(IO_TIMEOUT_S):
                async for event in connection:
                    if event.type in TERMINAL:
                        completed.append(event)
                        break
    assert [e.type for e in completed] == ["response.completed"] * 2
    first, second = await upstream_bodies(mock_upstream)
    assert second["previous_response_id"] == completed[0].response.id
    assert "previous_response_id" not in first
    for body, turn in ((first, 0), (second, 1)):
        assert body["stream"] is True  # the bridge asks the upstream for its HTTP stream
        assert body["input"] == f"turn {turn}"
        assert "type" not in body
        assert "stream_id" not in body


async def test_sdk_error_event_for_an_unknown_model(start_gateway: StartGateway,
                                                    mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(merge(base_config(mock_upstream.base_url),
                                        {"keys": {"tester": {"models": ["mock-*"]}}}))
    async with sdk_client(gateway) as client, client.responses.connect() as connection:
        await connection.response.create(model="gpt-unknown", input="hi")
        event = await asyncio.wait_for(connection.recv(), IO_TIMEOUT_S)
    assert event.type == "error"
    assert event.status == 404
    assert event.error.code == "model_not_found"
    assert event.error.param == "model"


async def test_each_response_is_metered_and_logged_like_an_http_request(
        gateway: RunningGateway, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger("proxy"), "propagate", True)  # as configure_logging() does not
    caplog.set_level(logging.INFO, logger="proxy.access")
    async with connect(gateway) as ws:
        for _ in range(2):
            await ws.send_json(CREATE)
            await until_terminal(ws)
    lines = [r.fields for r in caplog.records
             if r.name == "proxy.access" and r.fields["method"] == "WS"]
    assert len(lines) == 2, lines
    for line in lines:
        assert line["path"] == "/v1/responses"
        assert line["status"] == 200
        assert line["model"] == "mock-gpt"
        assert line["stream_id"].startswith("gs_")
        assert (line.get("prompt_tokens"), line.get("completion_tokens")) == (4, 8), line


# --------------------------------------------------------------------------- lanes


async def test_second_create_without_a_lane_is_refused_while_one_is_in_flight(
        slow_gateway: RunningGateway, slow_mock: MockUpstream) -> None:
    async with connect(slow_gateway) as ws:
        await ws.send_json(CREATE)
        await ws.send_json({**CREATE, "input": "another story"})
        events = await until_terminal(ws, 2)
        refused = [e for e in events if e["type"] == "error"]
        # the socket stays open and takes the next create once the first has ended
        await ws.send_json({**CREATE, "max_output_tokens": 3})
        after = await until_terminal(ws)
    assert len(refused) == 1
    assert_error_event(refused[0], 409, "response_already_in_flight")
    answer = [e for e in events if e["type"] != "error"]
    assert answer[-1]["type"] == "response.completed"
    assert text_of(answer) == expected_text(16)
    assert after[-1]["type"] == "response.incomplete"
    assert text_of(after) == expected_text(3)
    assert len(await upstream_bodies(slow_mock)) == 2


async def test_two_lanes_run_side_by_side_and_each_is_fifo(slow_gateway: RunningGateway) -> None:
    async with connect(slow_gateway) as ws:
        await ws.send_json({**CREATE, "stream_id": "a"})
        await ws.send_json({**CREATE, "stream_id": "b", "max_output_tokens": 10})
        await ws.send_json({**CREATE, "stream_id": "a", "max_output_tokens": 2})
        events = await until_terminal(ws, 3)
    assert all("stream_id" in e for e in events)
    lane_a, lane_b = of_lane(events, "a"), of_lane(events, "b")
    assert len(lane_a) + len(lane_b) == len(events)
    # side by side: lane b began before lane a's first response ended
    first_a_end = next(i for i, e in enumerate(events) if e["type"] == "response.completed")
    first_b = next(i for i, e in enumerate(events) if e.get("stream_id") == "b")
    assert first_b < first_a_end
    # FIFO on lane a: its second response starts after its first one ended
    a_ends = [i for i, e in enumerate(lane_a) if e["type"] in TERMINAL]
    a_starts = [i for i, e in enumerate(lane_a) if e["type"] == "response.created"]
    assert a_starts[1] == a_ends[0] + 1
    first, second = lane_a[:a_ends[0] + 1], lane_a[a_ends[0] + 1:]
    assert text_of(first) == expected_text(16)
    assert text_of(second) == expected_text(2)
    assert text_of(lane_b) == expected_text(10)
    for response in (first, second, lane_b):
        assert [e["sequence_number"] for e in response] == list(range(len(response)))


async def test_max_in_flight_counts_queued_creates(start_gateway: StartGateway,
                                                   slow_mock: MockUpstream) -> None:
    gateway = await start_gateway(merge(base_config(slow_mock.base_url), {"ws": {"max_in_flight": 2}}))
    async with connect(gateway) as ws:
        for _ in range(3):
            await ws.send_json({**CREATE, "stream_id": "a", "max_output_tokens": 2})
        events = await until_terminal(ws, 3)
    refused = [e for e in events if e["type"] == "error"]
    assert len(refused) == 1
    assert_error_event(refused[0], 503, "too_many_requests_in_flight")
    assert refused[0]["stream_id"] == "a"
    assert refused[0]["retry_after_ms"] == 100
    assert [e["type"] for e in events if e["type"] in TERMINAL].count("response.incomplete") == 2


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("event", "status", "code"), [
    ({**CREATE, "model": "no-such-model"}, 404, "model_not_found"),
    ({"type": "response.create", "input": "hi"}, 400, "missing_required_parameter"),
    ({**CREATE, "background": True}, 400, "unsupported_parameter"),
    ({**CREATE, "stream_id": ""}, 400, "invalid_type"),
    ({"type": "response.steer", "input": "x", "previous_response_id": "resp_1"}, 400,
     "unknown_event_type"),
], ids=["unknown-model", "no-model", "background", "empty-lane", "unsupported-event"])
async def test_refused_create_is_an_error_event_and_the_socket_stays_open(
        start_gateway: StartGateway, mock_upstream: MockUpstream, event: Event, status: int,
        code: str) -> None:
    gateway = await start_gateway(merge(base_config(mock_upstream.base_url),
                                        {"keys": {"tester": {"models": ["mock-*"]}}}))
    async with connect(gateway) as ws:
        await ws.send_json(event)
        error = await receive(ws)
        await ws.send_json(CREATE)
        after = await until_terminal(ws)
    assert_error_event(error, status, code)
    assert after[-1]["type"] == "response.completed"
    assert text_of(after) == expected_text(8)


async def test_bad_frame_gets_an_error_event_and_the_socket_stays_open(gateway: RunningGateway) -> None:
    async with connect(gateway) as ws:
        await ws.send_str("not json")
        error = await receive(ws)
        await ws.send_json(CREATE)
        after = await until_terminal(ws)
    assert error["type"] == "error"
    assert error["error"]["code"] == "invalid_frame"
    assert after[-1]["type"] == "response.completed"


async def test_rate_limited_create_gets_retry_after_and_the_socket_stays_open(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(merge(base_config(mock_upstream.base_url),
                                        {"keys": {"tester": {"rpm": 1}}}))
    async with connect(gateway) as ws:
        await ws.send_json(CREATE)
        first = await until_terminal(ws)
        await ws.send_json({**CREATE, "stream_id": "x"})
        limited = await receive(ws)
        await ws.send_json({"type": "response.create"})  # still served: a 400, not a close
        still_open = await receive(ws)
    assert first[-1]["type"] == "response.completed"
    assert_error_event(limited, 429, "rate_limit_exceeded")
    assert limited["stream_id"] == "x"
    assert limited["retry_after_ms"] > 0
    assert int(limited["error"]["headers"]["retry-after-ms"]) > 0
    assert "x-ratelimit-limit-requests" in limited["error"]["headers"]
    assert_error_event(still_open, 400, "missing_required_parameter")


async def test_upstream_failure_before_the_first_event_is_an_error_event(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    config = merge(base_config(mock_upstream.base_url),
                   {"upstreams": {"mock": {"headers": {"x-mock-status": "400"}}}})
    gateway = await start_gateway(config)
    async with connect(gateway) as ws:
        await ws.send_json(CREATE)
        error = await receive(ws)
        await ws.send_json(CREATE)
        again = await receive(ws)
    assert_error_event(error, 400, error["error"]["code"])
    assert error["error"]["type"] == "invalid_request_error"
    assert again["type"] == "error"


async def test_upstream_cut_mid_stream_ends_with_an_error_event(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    config = merge(base_config(mock_upstream.base_url),
                   {"upstreams": {"mock": {"headers": {"x-mock-reset-after": "5"}}}})
    gateway = await start_gateway(config)
    async with connect(gateway) as ws:
        await ws.send_json(CREATE)
        events = await until_terminal(ws)
    assert [e["sequence_number"] for e in events[:-1]] == list(range(5))
    assert events[-1]["type"] == "error"
    assert {"type", "code", "message", "param"} <= set(events[-1]["error"])


@pytest.mark.parametrize(("data", "seq", "lane", "expected"), [
    (b'{"type":"response.created","sequence_number":0}', 1, None,
     {"type": "response.created", "sequence_number": 0}),
    (b'{"type":"response.output_text.delta","delta":"x"}', 3, "a",
     {"type": "response.output_text.delta", "delta": "x", "sequence_number": 2, "stream_id": "a"}),
    (b'{ }', 1, "a", {"sequence_number": 0, "stream_id": "a"}),
    (b'{"error":{"message":"m","type":"upstream_error","param":null,"code":"c"}}', 9, "a",
     {"type": "error", "stream_id": "a",
      "error": {"message": "m", "type": "upstream_error", "param": None, "code": "c"}}),
    (b'{"type":"error","code":"ERR","message":"m","param":null,"sequence_number":4}', 5, None,
     {"type": "error", "sequence_number": 4,
      "error": {"type": "upstream_error", "code": "ERR", "message": "m", "param": None}}),
], ids=["as-is", "numbered-and-laned", "empty-object", "gateway-error", "flat-upstream-error"])
def test_wire_event_shapes(data: bytes, seq: int, lane: str | None, expected: Event) -> None:
    """The events the mock never sends: unnumbered ones and errors in the two other shapes."""
    assert json.loads(ws_responses.wire_event(StreamEvent(seq, None, data), lane)) == expected


# --------------------------------------------------------------------------- handshake


@pytest.mark.parametrize(("headers", "code"), [
    ({}, "missing_api_key"), ({"Authorization": "Bearer sk-wrong"}, "invalid_api_key"),
], ids=["no-key", "bad-key"])
async def test_handshake_without_a_valid_key_is_refused_with_http_401(
        gateway: RunningGateway, headers: dict[str, str], code: str) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with connect(gateway, headers=headers):
            pass
    assert refused.value.status == 401
    async with aiohttp.ClientSession() as session, session.get(
            gateway.url + "/v1/responses",
            headers={**headers, "Connection": "Upgrade", "Upgrade": "websocket",
                     "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    ) as response:
        body = await response.json()
    assert response.status == 401
    assert body["error"]["code"] == code
    assert "sk-wrong" not in json.dumps(body)
    assert "x-request-id" in response.headers


async def test_handshake_naming_a_model_the_key_may_not_use_is_refused_with_http_404(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(merge(base_config(mock_upstream.base_url),
                                        {"keys": {"tester": {"models": ["mock-*"]}}}))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                ws_url(gateway) + "?model=gpt-4o", headers=AUTH):
            pass
    assert refused.value.status == 404
    async with aiohttp.ClientSession() as session, session.ws_connect(
            ws_url(gateway) + "?model=mock-gpt", headers=AUTH) as ws:
        await ws.send_json(CREATE)
        assert (await until_terminal(ws))[-1]["type"] == "response.completed"


async def test_sdk_connect_with_a_bad_key_fails_at_the_handshake(gateway: RunningGateway) -> None:
    async with sdk_client(gateway, api_key="sk-wrong") as client:
        with pytest.raises(Exception, match="401"):
            async with client.responses.connect():
                pass


async def test_key_in_the_subprotocol_is_accepted(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(
            ws_url(gateway), protocols=(f"openai-insecure-api-key.{CLIENT_KEY}",)) as ws:
        await ws.send_json(CREATE)
        events = await until_terminal(ws)
    assert events[-1]["type"] == "response.completed"
    assert ws.protocol is None  # the key is never echoed back


async def test_plain_get_without_upgrade_still_passes_through(gateway: RunningGateway,
                                                              mock_upstream: MockUpstream) -> None:
    async with aiohttp.ClientSession() as session, session.get(
            gateway.url + "/v1/responses?limit=2", headers=AUTH) as response:
        echo = await response.json()
    assert response.status == 200
    assert (echo["method"], echo["path"], echo["query_string"]) == ("GET", "/v1/responses", "limit=2")
    assert echo["headers"]["Authorization"] != AUTH["Authorization"]


# --------------------------------------------------------------------------- drop, resume, drain


def http_events(raw: bytes) -> Iterator[Event]:
    for block in raw.decode().split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            yield json.loads("\n".join(data))


async def test_sdk_socket_closed_mid_stream_then_http_resume_gives_the_rest(
        slow_gateway: RunningGateway) -> None:
    async with sdk_client(slow_gateway) as client:
        seen = []
        async with client.responses.connect() as connection:
            await connection.response.create(model="mock-gpt", input="tell me a story")
            async with asyncio.timeout(IO_TIMEOUT_S):
                async for event in connection:
                    seen.append(event)
                    if event.sequence_number == 5:
                        break
        response_id = seen[0].response.id
        resumed = await client.responses.retrieve(response_id, stream=True, starting_after=5)
        async with asyncio.timeout(IO_TIMEOUT_S):
            rest = [event async for event in resumed]
    assert [e.sequence_number for e in rest] == list(range(6, 6 + len(rest)))
    assert rest[-1].type == "response.completed"
    assert rest[-1].response.id == response_id
    assert text_of(seen + rest) == expected_text(16)


async def test_socket_dropped_mid_stream_detaches_and_http_resume_is_byte_identical(
        slow_gateway: RunningGateway, slow_mock: MockUpstream) -> None:
    async with connect(slow_gateway) as ws:
        await ws.send_json(CREATE)
        before = [await receive(ws) for _ in range(7)]
        assert ws._response.connection is not None
        ws._response.connection.transport.abort()  # no close frame: the TCP connection is cut
    last = before[-1]["sequence_number"]
    response_id = before[0]["response"]["id"]
    async with aiohttp.ClientSession(headers=AUTH) as session, session.get(
            f"{slow_gateway.url}/v1/responses/{response_id}",
            params={"stream": "true", "starting_after": str(last)}) as response:
        assert response.status == 200
        raw = await asyncio.wait_for(response.read(), IO_TIMEOUT_S)
    rest = list(http_events(raw))
    assert [e["sequence_number"] for e in rest] == list(range(last + 1, last + 1 + len(rest)))
    assert rest[-1]["type"] == "response.completed"
    assert (text_of(before) + text_of(rest)).encode() == expected_text(16).encode()
    stats = await slow_mock.stats()
    assert (stats["streams_cancelled"], stats["streams_reset"]) == (0, 0)  # never cancelled


async def test_socket_closed_cleanly_mid_stream_lets_generation_finish(
        slow_gateway: RunningGateway, slow_mock: MockUpstream) -> None:
    async with connect(slow_gateway) as ws:
        await ws.send_json(CREATE)
        created = await receive(ws)
    # the client said goodbye after the first event: the stream detached, not cancelled
    async with sdk_client(slow_gateway) as client:
        resumed = await client.responses.retrieve(created["response"]["id"], stream=True,
                                                  starting_after=0)
        async with asyncio.timeout(IO_TIMEOUT_S):
            rest = [event async for event in resumed]
    assert rest[-1].type == "response.completed"
    assert text_of(rest) == expected_text(16)
    assert (await slow_mock.stats())["streams_cancelled"] == 0


async def test_drain_finishes_the_response_then_closes_with_1012(slow_gateway: RunningGateway) -> None:
    async with connect(slow_gateway) as ws:
        await ws.send_json(CREATE)
        first = await receive(ws)
        shutdown = asyncio.create_task(slow_gateway.runner.cleanup())
        events = await until_terminal(ws)
        closing = await ws.receive(timeout=IO_TIMEOUT_S)
        await shutdown
    assert events[-1]["type"] == "response.completed"
    assert text_of([first, *events]) == expected_text(16)
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1012


async def test_create_while_draining_is_refused_with_an_error_event(gateway: RunningGateway) -> None:
    sockets = gateway.app[GATEWAY].sockets
    async with connect(gateway) as ws:
        sockets.draining = True  # what _on_shutdown sets first
        try:
            await ws.send_json({**CREATE, "stream_id": "late"})
            refused = await receive(ws)
        finally:
            sockets.draining = False
    assert_error_event(refused, 503, "shutting_down")
    assert refused["stream_id"] == "late"
    assert refused["retry_after_ms"] == 1000
