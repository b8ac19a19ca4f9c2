"""What a client sees on the wire (DESIGN §4 "HTTP endpoints" and "Wire rules").

Raw HTTP against the real gateway on loopback: aiohttp's client where its framing is fine,
plain asyncio sockets where the test needs exact control of the request bytes (hop-by-hop
headers, chunked bodies, percent-encoded targets) or of the connection (disconnects).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from tests.conftest import (
    CLIENT_KEY,
    OTHER_KEY,
    UPSTREAM_KEY,
    MockUpstream,
    RunningGateway,
    StartGateway,
)

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
STREAM_CHAT = {**CHAT, "stream": True}
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
ERROR_FIELDS = {"message", "type", "param", "code"}


# --------------------------------------------------------------------------- helpers


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        pos = end + 2
        if size == 0:
            return bytes(out)
        out += data[pos:pos + size]
        pos += size + 2


def parse_response(data: bytes) -> RawResponse:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = _dechunk(rest)
    elif "Content-Length" in headers:
        body = rest[: int(headers["Content-Length"])]
    else:
        body = rest
    return RawResponse(int(status_line.split()[1]), headers, body)


def build_request(url: str, method: str, target: str, headers: list[tuple[str, str]],
                  body: bytes | None = None, chunks: list[bytes] | None = None) -> bytes:
    """Request bytes exactly as written; ``Connection: close`` unless a Connection is given."""
    parsed = URL(url)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parsed.host}:{parsed.port}"]
    if not any(name.lower() == "connection" for name, _ in headers):
        lines.append("Connection: close")
    lines += [f"{name}: {value}" for name, value in headers]
    payload = b""
    if chunks is not None:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    elif body is not None:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


async def raw_request(url: str, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes | None = None, chunks: list[bytes] | None = None) -> RawResponse:
    """Send one request on a fresh connection and read the response until the server closes."""
    parsed = URL(url)
    reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
    try:
        writer.write(build_request(url, method, target, headers, body, chunks))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        await _close(writer)
    return parse_response(data)


def assert_openai_error(status: int, headers: Any, body: bytes, expected_status: int) -> dict[str, Any]:
    """The body is exactly ``{"error": {"message", "type", "param", "code"}}`` as JSON."""
    assert status == expected_status, body[:500]
    assert headers.get("Content-Type", "").split(";")[0].strip() == "application/json"
    assert headers.get("x-request-id"), "error response without x-request-id"
    obj = json.loads(body)
    assert set(obj) == {"error"}, obj
    assert set(obj["error"]) == ERROR_FIELDS, obj
    assert isinstance(obj["error"]["message"], str)
    assert obj["error"]["message"]
    assert isinstance(obj["error"]["type"], str)
    assert obj["error"]["type"]
    return obj["error"]  # type: ignore[no-any-return]


async def error_of(response: aiohttp.ClientResponse, expected_status: int) -> dict[str, Any]:
    return assert_openai_error(response.status, response.headers, await response.read(), expected_status)


@dataclass
class Event:
    id: str | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.data)


def parse_events(raw: bytes) -> list[Event]:
    """SSE events of a body (comments skipped), in order."""
    events = []
    for block in raw.decode().split("\n\n"):
        event = Event()
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event.id = value
            elif name == "event":
                event.event = value
            elif name == "data":
                event.data.append(value)
        if event.data or event.id is not None or event.event is not None:
            events.append(event)
    return events


def check_framing(raw: bytes) -> int:
    """Assert the body is well-formed for openai-python; return the keep-alive line count.

    A ``: keep-alive`` line may only start at an event boundary; every blank line must end
    an event that has a non-empty ``data:`` line; no other comment is allowed.
    """
    assert b"\r" not in raw
    assert raw.endswith(b"\n\n"), raw[-100:]
    at_boundary, has_data, keepalives = True, False, 0
    for line in raw.split(b"\n")[:-1]:
        if line == b": keep-alive":
            assert at_boundary, f"keep-alive inside an event in {raw!r}"
            keepalives += 1
        elif line == b"":
            assert has_data, f"blank line that ends no data event in {raw!r}"
            at_boundary, has_data = True, False
        else:
            assert not line.startswith(b":"), f"unexpected comment line {line!r}"
            at_boundary = False
            if line.startswith(b"data:"):
                assert line[5:].strip(), f"empty data line in {raw!r}"
                has_data = True
    return keepalives


def assert_ids(events: list[Event], stream_id: str) -> None:
    assert [e.id for e in events] == [f"{stream_id}:{seq}" for seq in range(1, len(events) + 1)]


async def readyz(gateway: RunningGateway) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/readyz") as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)


def free_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def last_upstream_request(mock_upstream: MockUpstream) -> dict[str, Any]:
    logged = await mock_upstream.requests()
    assert logged, "the upstream saw no request"
    return logged[-1]


def lower_keys(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


# --------------------------------------------------------------------------- x-request-id


async def test_every_response_carries_a_unique_request_id(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gateway = await start_gateway(server={"max_body_bytes": "1KiB"})
    seen: list[tuple[int, str]] = []
    async with aiohttp.ClientSession(base_url=gateway.url) as session:
        cases: list[tuple[str, str, dict[str, Any], int]] = [
            ("POST", "/v1/chat/completions", {"json": CHAT, "headers": AUTH}, 200),
            ("POST", "/v1/chat/completions", {"json": STREAM_CHAT, "headers": AUTH}, 200),
            ("POST", "/v1/chat/completions", {"json": CHAT}, 401),
            ("GET", "/nope", {}, 404),
            ("POST", "/healthz", {}, 405),
            ("POST", "/v1/chat/completions", {"data": b"x" * 2048, "headers": AUTH}, 413),
            ("POST", "/v1/chat/completions", {"data": b"{oops", "headers": AUTH}, 400),
            ("GET", "/v1/whatever", {"headers": AUTH}, 200),
            ("GET", "/healthz", {}, 200),
            ("POST", "/v1/chat/completions",
             {"json": CHAT, "headers": {**AUTH, "x-mock-status": "503"}}, 503),
            ("POST", "/v1/chat/completions",
             {"json": STREAM_CHAT, "headers": {**AUTH, "x-mock-status": "503"}}, 503),
        ]
        for method, path, kwargs, status in cases:
            async with session.request(method, path, **kwargs) as resp:
                await resp.read()
                assert resp.status == status, (method, path)
                request_id = resp.headers.get("x-request-id")
                assert request_id, f"{method} {path} ({status}) has no x-request-id"
                seen.append((status, request_id))
    ids = [request_id for _, request_id in seen]
    assert len(set(ids)) == len(ids), seen


# --------------------------------------------------------------------------- request headers

HOP_HEADERS = [
    ("Connection", "x-custom-hop, close"),
    ("X-Custom-Hop", "must-not-pass"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Upgrade", "h2c"),
    ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
    ("Trailer", "X-Checksum"),
    ("x-api-key", CLIENT_KEY),
    ("OpenAI-Organization", "org-client"),
    ("OpenAI-Project", "proj-client"),
    ("api_base", "http://evil.example/v1"),
    ("base_url", "http://evil.example/v1"),
    ("api-base", "http://evil.example/v1"),
    ("base-url", "http://evil.example/v1"),
]
KEPT_HEADERS = [
    ("OpenAI-Beta", "assistants=v2"),
    ("x-mock-tokens", "3"),
    ("X-Custom-Thing", "custom-value"),
]
DROPPED = ["connection", "x-custom-hop", "keep-alive", "te", "upgrade", "proxy-authorization",
           "trailer", "x-api-key", "openai-organization", "openai-project", "api_base", "base_url",
           "api-base", "base-url"]


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/chat/completions", STREAM_CHAT),
        ("POST", "/v1/embeddings", {"model": "mock-embed", "input": "hi"}),
        ("GET", "/v1/whatever", None),
    ],
    ids=["chat", "chat-stream", "embeddings", "passthrough"],
)
async def test_request_headers_upstream(
    gateway: RunningGateway, mock_upstream: MockUpstream, method: str, target: str,
    body: dict[str, Any] | None,
) -> None:
    headers = [("Authorization", f"Bearer {CLIENT_KEY}"), *HOP_HEADERS, *KEPT_HEADERS]
    raw_body = None
    if body is not None:
        headers.append(("Content-Type", "application/json"))
        raw_body = json.dumps(body).encode()
    response = await raw_request(gateway.url, method, target, headers, raw_body)
    assert response.status == 200, response.body[:500]
    seen = lower_keys((await last_upstream_request(mock_upstream))["headers"])
    for name in DROPPED:
        assert name not in seen, f"{name} was forwarded upstream: {seen[name]!r}"
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    gateway_host = URL(gateway.url)
    assert seen.get("host") != f"{gateway_host.host}:{gateway_host.port}", "client Host forwarded"
    assert seen["host"] == f"{URL(mock_upstream.base_url).host}:{URL(mock_upstream.base_url).port}"
    for name, value in KEPT_HEADERS:
        assert seen.get(name.lower()) == value, f"{name} not forwarded: {seen}"


async def test_configured_organization_is_sent(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    gateway = await start_gateway(upstreams={"mock": {"organization": "org-x"}})
    async with aiohttp.ClientSession(base_url=gateway.url) as session, session.post(
        "/v1/chat/completions", json=CHAT,
        headers={**AUTH, "OpenAI-Organization": "org-client", "OpenAI-Project": "proj-client"},
    ) as resp:
        assert resp.status == 200
    seen = lower_keys((await last_upstream_request(mock_upstream))["headers"])
    assert seen["openai-organization"] == "org-x"
    assert "openai-project" not in seen


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_routing_override_fields_stripped_from_body(
    http: aiohttp.ClientSession, mock_upstream: MockUpstream, stream: bool
) -> None:
    body = {**CHAT, "stream": stream, "api_base": "http://evil.example/v1",
            "base_url": "http://evil.example/v1", "temperature": 0.5}
    async with http.post("/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        await resp.read()
    sent = (await last_upstream_request(mock_upstream))["body"]
    assert "api_base" not in sent, sent
    assert "base_url" not in sent, sent
    assert sent["model"] == "mock-gpt"
    assert sent["temperature"] == 0.5
    assert sent["messages"] == CHAT["messages"]


# --------------------------------------------------------------------------- early errors


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/files"])
async def test_body_over_limit_is_413_before_upstream(
    start_gateway: StartGateway, mock_upstream: MockUpstream, path: str
) -> None:
    gateway = await start_gateway(server={"max_body_bytes": "1KiB"})
    big = json.dumps({**CHAT, "pad": "x" * 2000}).encode()
    headers = [("Authorization", f"Bearer {CLIENT_KEY}"), ("Content-Type", "application/json")]

    declared = await raw_request(gateway.url, "POST", path, headers, big)
    error = assert_openai_error(declared.status, declared.headers, declared.body, 413)
    assert "1024" in error["message"]

    chunked = await raw_request(gateway.url, "POST", path, headers,
                                chunks=[big[i:i + 300] for i in range(0, len(big), 300)])
    assert_openai_error(chunked.status, chunked.headers, chunked.body, 413)

    assert (await mock_upstream.stats())["requests"] == 0


async def test_body_at_limit_is_accepted(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(server={"max_body_bytes": "1KiB"})
    body = json.dumps({**CHAT, "pad": ""}).encode()
    body = json.dumps({**CHAT, "pad": "x" * (1024 - len(body))}).encode()
    assert len(body) == 1024
    headers = [("Authorization", f"Bearer {CLIENT_KEY}"), ("Content-Type", "application/json")]
    response = await raw_request(gateway.url, "POST", "/v1/chat/completions", headers,
                                 chunks=[body[:500], body[500:]])
    assert response.status == 200, response.body


async def test_unknown_path_404(http: aiohttp.ClientSession, gateway: RunningGateway) -> None:
    async with http.get("/nope") as resp:
        await error_of(resp, 404)
    async with aiohttp.ClientSession(base_url=gateway.url) as anonymous, \
            anonymous.post("/v2/chat/completions", json=CHAT) as resp:
        await error_of(resp, 404)


async def test_post_healthz_405_with_allow(http: aiohttp.ClientSession) -> None:
    async with http.post("/healthz") as resp:
        await error_of(resp, 405)
        allowed = {m.strip() for m in resp.headers["Allow"].split(",")}
        assert "GET" in allowed
        assert "POST" not in allowed


@pytest.mark.parametrize(
    ("body", "param"),
    [(b"{not json", None), (b'{"messages": []}', "model"), (b"[1, 2]", None), (b"", None)],
    ids=["malformed", "missing-model", "not-an-object", "empty"],
)
async def test_bad_body_400(
    http: aiohttp.ClientSession, mock_upstream: MockUpstream, body: bytes, param: str | None
) -> None:
    async with http.post("/v1/chat/completions", data=body,
                         headers={"Content-Type": "application/json"}) as resp:
        error = await error_of(resp, 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert (await mock_upstream.stats())["requests"] == 0


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sk-not-a-real-key-123"}, {"x-api-key": "sk-not-a-real-key-123"},
     {"Authorization": "Basic Zm9vOmJhcg=="}, {"Authorization": "Bearer "}],
    ids=["missing", "wrong-bearer", "wrong-x-api-key", "basic", "empty-bearer"],
)
async def test_auth_401(
    gateway: RunningGateway, mock_upstream: MockUpstream, headers: dict[str, str]
) -> None:
    async with aiohttp.ClientSession(base_url=gateway.url) as session:
        for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/v1/whatever")]:
            async with session.request(method, path, json=CHAT, headers=headers) as resp:
                body = await resp.read()
                assert_openai_error(resp.status, resp.headers, body, 401)
                assert b"sk-not-a-real-key-123" not in body
    assert (await mock_upstream.stats())["requests"] == 0


async def test_x_api_key_authenticates(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession(base_url=gateway.url) as session, session.post(
        "/v1/chat/completions", json=CHAT, headers={"x-api-key": CLIENT_KEY}
    ) as resp:
        assert resp.status == 200


# --------------------------------------------------------------------------- SSE


async def test_sse_headers_ids_and_done(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/chat/completions", json=STREAM_CHAT,
                         headers={"Accept": "application/json", "x-mock-tokens": "5"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert resp.headers.get("x-request-id")
        assert "Content-Length" not in resp.headers
        stream_id = resp.headers["X-Stream-Id"]
        raw = await resp.read()
    assert stream_id.startswith("gs_")
    assert len(stream_id) > 3
    check_framing(raw)
    events = parse_events(raw)
    assert_ids(events, stream_id)
    assert [e.text for e in events].count("[DONE]") == 1
    assert raw.count(b"data: [DONE]\n") == 1
    assert events[-1].text == "[DONE]"
    chunks = [json.loads(e.text) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    # The gateway injected include_usage upstream; the client did not ask, so no usage chunk.
    assert all(c["choices"] for c in chunks)


async def test_accept_event_stream_does_not_make_a_stream(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/chat/completions", json=CHAT,
                         headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert "X-Stream-Id" not in resp.headers
        body = await resp.json()
    assert body["object"] == "chat.completion"


async def test_keepalive_only_between_events(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(server={"sse_keepalive": "100ms"})
    async with aiohttp.ClientSession(base_url=gateway.url, headers=AUTH) as session, session.post(
        "/v1/chat/completions", json=STREAM_CHAT,
        headers={"x-mock-silence-s": "0.5", "x-mock-tokens": "4"},
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    assert b": ping" not in raw
    assert b"event:" not in raw
    assert b"retry:" not in raw
    keepalives = check_framing(raw)
    assert keepalives >= 2, raw
    for index in range(len(raw)):
        if raw.startswith(b": keep-alive\n", index):
            before = raw[:index]
            assert before.endswith((b"\n\n", b": keep-alive\n")), raw
    events = parse_events(raw)
    assert_ids(events, resp.headers["X-Stream-Id"])
    assert events[-1].text == "[DONE]"


# --------------------------------------------------------------------------- upstream errors


async def _direct_mock(mock_upstream: MockUpstream, headers: dict[str, str], body: dict[str, Any]
                       ) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(
        mock_upstream.base_url + "/chat/completions", json=body, headers=headers
    ) as resp:
        return resp.status, await resp.read()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_upstream_503_passes_status_and_error_object(
    http: aiohttp.ClientSession, mock_upstream: MockUpstream, stream: bool
) -> None:
    body = {**CHAT, "stream": stream}
    async with http.post("/v1/chat/completions", json=body, headers={"x-mock-status": "503"}) as resp:
        await error_of(resp, 503)
        got = await resp.json()
    status, direct = await _direct_mock(mock_upstream, {"x-mock-status": "503"}, body)
    assert status == 503
    assert got == json.loads(direct)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_upstream_503_carries_retry_after(http: aiohttp.ClientSession, stream: bool) -> None:
    """DESIGN §4: 429 and 503 carry retry-after and retry-after-ms."""
    async with http.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                         headers={"x-mock-status": "503"}) as resp:
        await error_of(resp, 503)
        assert "retry-after" in resp.headers
        assert "retry-after-ms" in resp.headers


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_upstream_500_text_body_wrapped(http: aiohttp.ClientSession, stream: bool) -> None:
    async with http.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                         headers={"x-mock-status": "500", "x-mock-error-body": "text"}) as resp:
        error = await error_of(resp, 500)
    assert "upstream exploded" in error["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("upstream_status", ["401", "403"])
async def test_upstream_auth_failure_is_502(
    http: aiohttp.ClientSession, stream: bool, upstream_status: str
) -> None:
    async with http.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                         headers={"x-mock-status": upstream_status}) as resp:
        body = await resp.read()
        error = assert_openai_error(resp.status, resp.headers, body, 502)
    assert UPSTREAM_KEY not in json.dumps(error)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_upstream_429_keeps_retry_after(http: aiohttp.ClientSession, stream: bool) -> None:
    async with http.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                         headers={"x-mock-status": "429", "x-mock-retry-after": "7"}) as resp:
        error = await error_of(resp, 429)
        assert resp.headers["retry-after"] == "7"
        assert resp.headers["retry-after-ms"] == "7000"
    assert error["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_upstream_unreachable_is_502(start_gateway: StartGateway, stream: bool) -> None:
    port = free_closed_port()
    gateway = await start_gateway(upstreams={"mock": {"base_url": f"http://127.0.0.1:{port}/v1"}})
    async with aiohttp.ClientSession(base_url=gateway.url, headers=AUTH) as session:
        async with session.post("/v1/chat/completions", json={**CHAT, "stream": stream}) as resp:
            await error_of(resp, 502)
        async with session.get("/v1/whatever") as resp:
            await error_of(resp, 502)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_first_byte_timeout_is_504(start_gateway: StartGateway, stream: bool) -> None:
    gateway = await start_gateway(upstreams={"mock": {"timeouts": {"first_byte": "200ms"}}})
    async with aiohttp.ClientSession(base_url=gateway.url, headers=AUTH) as session:
        started = time.monotonic()
        async with session.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                                headers={"x-mock-ttft-ms": "1500"}) as resp:
            await error_of(resp, 504)
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_one_first_byte_deadline_bounds_all_attempts_together(
        start_gateway: StartGateway, mock_upstream: MockUpstream, stream: bool) -> None:
    """Five attempts allowed, each would time out at first_byte: the client still gets its
    504 after about one first_byte, not five (the retries spend the same deadline)."""
    gateway = await start_gateway(upstreams={"mock": {"timeouts": {"first_byte": "400ms"}}},
                                  routing={"retry": {"attempts": 5, "backoff_base": "1ms"}})
    async with aiohttp.ClientSession(base_url=gateway.url, headers=AUTH) as session:
        started = time.monotonic()
        async with session.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                                headers={"x-mock-ttft-ms": "3000"}) as resp:
            await error_of(resp, 504)
        assert time.monotonic() - started < 1.0
    assert (await mock_upstream.stats())["requests"] == 1


async def test_one_first_byte_deadline_spans_the_headers_and_the_first_event(
        start_gateway: StartGateway) -> None:
    """Headers after 0.35 s and the first event 0.35 s later: each wait is under
    ``first_byte`` (0.5 s) but together they are over it, so the stream times out."""
    gateway = await start_gateway(upstreams={"mock": {"timeouts": {"first_byte": "500ms"}}},
                                  routing={"retry": {"attempts": 1}})
    slow = {"x-mock-ttft-ms": "350", "x-mock-silence-after": "0", "x-mock-silence-s": "0.35"}
    async with aiohttp.ClientSession(base_url=gateway.url, headers=AUTH) as session:
        async with session.post("/v1/chat/completions", json=STREAM_CHAT, headers=slow) as resp:
            await error_of(resp, 504)
        fast_enough = {**slow, "x-mock-silence-s": "0.05"}
        async with session.post("/v1/chat/completions", json=STREAM_CHAT, headers=fast_enough) as resp:
            assert resp.status == 200
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")


# --------------------------------------------------------------------------- mid-stream errors


async def test_reset_mid_stream_ends_with_error_event(
    http: aiohttp.ClientSession, mock_upstream: MockUpstream
) -> None:
    async with http.post("/v1/chat/completions", json=STREAM_CHAT,
                         headers={"x-mock-reset-after": "3"}) as resp:
        assert resp.status == 200
        raw = await resp.read()
    check_framing(raw)
    events = parse_events(raw)
    assert_ids(events, resp.headers["X-Stream-Id"])
    assert b"[DONE]" not in raw
    assert len(events) == 4, raw
    last = json.loads(events[-1].text)
    assert set(last) == {"error"}, last
    assert set(last["error"]) == ERROR_FIELDS, last
    assert (await mock_upstream.stats())["streams_reset"] == 1


async def test_flat_vllm_error_rewritten_nested(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/chat/completions", json=STREAM_CHAT,
                         headers={"x-mock-vllm-error-after": "2"}) as resp:
        assert resp.status == 200
        raw = await resp.read()
    check_framing(raw)
    events = parse_events(raw)
    assert_ids(events, resp.headers["X-Stream-Id"])
    assert b"[DONE]" not in raw
    assert len(events) == 3, raw
    last = json.loads(events[-1].text)
    assert last == {"error": {"message": "mock vllm failure", "type": "BadRequestError",
                              "param": None, "code": 400}}


# --------------------------------------------------------------------------- client disconnect


async def _open_raw_stream(gateway: RunningGateway, headers: list[tuple[str, str]]
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = URL(gateway.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    all_headers = [("Authorization", f"Bearer {CLIENT_KEY}"),
                   ("Content-Type", "application/json"), *headers]
    writer.write(build_request(gateway.url, "POST", "/v1/chat/completions", all_headers,
                               json.dumps(STREAM_CHAT).encode()))
    await writer.drain()
    return reader, writer


async def _upstream_released(gateway: RunningGateway) -> bool:
    mock = (await readyz(gateway))["upstreams"]["mock"]
    return bool(mock["pool"]["in_use"] == 0 and mock["in_flight"] == 0)


DETACH_TIMEOUT_S = 0.6


async def _streams_active(gateway: RunningGateway) -> float:
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/metrics") as resp:
        text = await resp.text()
    line = next(line for line in text.splitlines() if line.startswith("shepherd_streams_active "))
    return float(line.split()[1])


async def test_client_disconnect_detaches_then_cancels_upstream_at_detach_timeout(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    """A client that leaves mid-stream is noticed at once, even while the upstream is
    silent; generation goes on for streams.detach_timeout, then the upstream is cancelled."""
    gateway = await start_gateway(streams={"detach_timeout": f"{DETACH_TIMEOUT_S}s"})
    reader, writer = await _open_raw_stream(gateway, [
        ("x-mock-token-delay-ms", "20"), ("x-mock-tokens", "400"),
        ("x-mock-silence-after", "2"), ("x-mock-silence-s", "0.4")])
    received = b""
    try:
        async with asyncio.timeout(5):
            while received.count(b"data: ") < 2:
                chunk = await reader.read(4096)
                assert chunk, "stream ended early"
                received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        assert b"\r\nx-stream-id: gs_" in received.lower()
        assert not await _upstream_released(gateway)
    finally:
        await _close(writer)
    closed_at = time.monotonic()

    async def reader_gone() -> bool:
        return await _streams_active(gateway) == 0

    assert await eventually(reader_gone, 0.3)  # during the upstream's silence
    await asyncio.sleep(DETACH_TIMEOUT_S / 2)
    stats = await mock_upstream.stats()
    assert stats["open_streams"] == 1  # still generating
    assert stats["streams_cancelled"] == 0

    async def upstream_cancelled() -> bool:
        stats = await mock_upstream.stats()
        return bool(stats["streams_cancelled"] == 1 and stats["open_streams"] == 0
                    and await _upstream_released(gateway))

    assert await eventually(upstream_cancelled, 2.0), (
        await mock_upstream.stats(), await readyz(gateway))
    assert time.monotonic() - closed_at >= DETACH_TIMEOUT_S
    assert (await mock_upstream.stats())["streams_completed"] == 0


async def test_client_disconnect_before_first_token_cancels_upstream_at_once(
    start_gateway: StartGateway, mock_upstream: MockUpstream
) -> None:
    """Before the first event the client has no stream id, so nobody can re-attach: the
    stream is cancelled at once instead of detaching."""
    gateway = await start_gateway(streams={"detach_timeout": "30s"})
    _reader, writer = await _open_raw_stream(gateway, [("x-mock-ttft-ms", "5000")])
    try:
        async def upstream_called() -> bool:
            return bool((await mock_upstream.stats())["requests"] == 1)

        assert await eventually(upstream_called, 1.0)
        await asyncio.sleep(0.05)
        assert not await _upstream_released(gateway)
    finally:
        await _close(writer)

    mock_server = mock_upstream.server.runner.server  # type: ignore[union-attr]
    assert mock_server is not None

    async def upstream_cancelled() -> bool:
        return await _upstream_released(gateway) and not mock_server.connections

    assert await eventually(upstream_cancelled, 1.0), (
        await readyz(gateway), mock_server.connections)
    stats = await mock_upstream.stats()
    assert stats["open_streams"] == 0
    assert stats["streams_completed"] == 0


async def test_models_and_passthrough_take_a_slot_through_admission(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    """With the only slot held and no queue, /v1/models/{id} and a passthrough path get the
    same 503 an inference request gets, and nothing reaches the upstream; the model list
    leaves the busy upstream out."""
    gateway = await start_gateway(upstreams={"mock": {"max_in_flight": 1, "max_queue": 0}})
    async with aiohttp.ClientSession(base_url=gateway.url, headers=AUTH) as session:
        holder = asyncio.create_task(session.post("/v1/chat/completions", json=CHAT,
                                                  headers={"x-mock-ttft-ms": "800"}))
        assert await eventually(lambda: _in_flight_is(gateway, 1), 2.0)
        for method, path in (("GET", "/v1/models/mock-gpt"), ("POST", "/v1/files"),
                             ("POST", "/v1/chat/completions")):
            async with session.request(method, path, json=CHAT) as resp:
                body = await error_of(resp, 503)
                assert body["code"] == "overloaded", (path, body)
        async with session.get("/v1/models") as resp:
            assert resp.status == 200
            assert "mock-embed" not in {m["id"] for m in (await resp.json())["data"]}
        async with await holder as resp:
            assert resp.status == 200
    assert (await mock_upstream.stats())["requests"] == 1


async def _in_flight_is(gateway: RunningGateway, count: int) -> bool:
    return bool((await readyz(gateway))["upstreams"]["mock"]["in_flight"] == count)


# --------------------------------------------------------------------------- passthrough


async def _multipart() -> tuple[bytes, str]:
    form = aiohttp.FormData()
    form.add_field("purpose", "fine-tune")
    form.add_field("file", io.BytesIO(b'{"prompt": "a"}\n\x00\xff\xfe binary\r\n--tail'),
                   filename="train.jsonl", content_type="application/jsonl")
    payload = form()
    body = await payload.as_bytes()
    return body, payload.content_type


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_multipart_passthrough_byte_exact(
    http: aiohttp.ClientSession, mock_upstream: MockUpstream, chunked: bool
) -> None:
    body, content_type = await _multipart()
    assert "boundary=" in content_type

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 17):
            yield body[i:i + 17]

    data: Any = pieces() if chunked else body
    async with http.post("/v1/files", data=data, headers={"Content-Type": content_type}) as resp:
        assert resp.status == 200
        assert resp.headers.get("x-request-id")
        echo = await resp.json()
    assert echo["method"] == "POST"
    assert echo["path"] == "/v1/files"
    assert base64.b64decode(echo["body_b64"]) == body
    assert lower_keys(echo["headers"])["content-type"] == content_type
    assert lower_keys(echo["headers"])["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_passthrough_preserves_query_and_encoded_path(
    gateway: RunningGateway, mock_upstream: MockUpstream
) -> None:
    target = "/v1/files/file%2Fabc%20d%3Ae/content?purpose=fine-tune&q=a%20b&s=%2F&e=&x=1&x=2"
    response = await raw_request(gateway.url, "GET", target,
                                 [("Authorization", f"Bearer {CLIENT_KEY}")])
    assert response.status == 200, response.body
    echo = response.json()
    assert echo["raw_path"] == target
    assert echo["method"] == "GET"


@pytest.mark.parametrize("method", ["GET", "DELETE", "POST"])
async def test_passthrough_other_v1_paths(
    http: aiohttp.ClientSession, mock_upstream: MockUpstream, method: str
) -> None:
    async with http.request(method, "/v1/whatever") as resp:
        assert resp.status == 200
        echo = await resp.json()
    assert echo["method"] == method
    assert echo["path"] == "/v1/whatever"
    assert (await mock_upstream.stats())["by_path"].get("/v1/whatever") == 1


# --------------------------------------------------------------------------- secrets


async def test_keys_never_in_logs_or_error_bodies(
    start_gateway: StartGateway, mock_upstream: MockUpstream,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrong = "sk-wrong-key-SECRET-4242"
    # configure_logging() (CLI only) turns propagation off; make sure caplog sees proxy.*.
    monkeypatch.setattr(logging.getLogger("proxy"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="proxy")
    gateway = await start_gateway()
    bodies: list[bytes] = []
    async with aiohttp.ClientSession(base_url=gateway.url) as session:
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/v1/chat/completions", {"json": CHAT, "headers": AUTH}),
            ("POST", "/v1/chat/completions", {"json": STREAM_CHAT, "headers": AUTH}),
            ("POST", "/v1/chat/completions",
             {"json": STREAM_CHAT, "headers": {**AUTH, "x-mock-reset-after": "2"}}),
            ("POST", "/v1/chat/completions",
             {"json": CHAT, "headers": {**AUTH, "x-mock-status": "401"}}),
            ("POST", "/v1/chat/completions",
             {"json": CHAT, "headers": {**AUTH, "x-mock-status": "500", "x-mock-error-body": "text"}}),
            ("GET", "/v1/models", {"headers": AUTH}),
            ("POST", "/v1/chat/completions",
             {"json": CHAT, "headers": {"Authorization": f"Bearer {OTHER_KEY}"}}),
            ("POST", "/v1/chat/completions",
             {"json": {**CHAT, "model": "not-allowed"},
              "headers": {"Authorization": f"Bearer {OTHER_KEY}"}}),
            ("POST", "/v1/chat/completions", {"json": CHAT, "headers": {"Authorization": f"Bearer {wrong}"}}),
            ("POST", "/v1/chat/completions", {"json": CHAT, "headers": {"x-api-key": wrong}}),
            ("GET", "/v1/whatever", {"headers": {"Authorization": f"Bearer {wrong}"}}),
            ("POST", "/v1/chat/completions", {"data": b"{bad", "headers": AUTH}),
            ("POST", "/v1/chat/completions", {"json": CHAT, "headers": {"Authorization": wrong}}),
        ]
        for method, path, kwargs in requests:
            async with session.request(method, path, **kwargs) as resp:
                body = await resp.read()
                if resp.status >= 400 or b'"error"' in body:
                    bodies.append(body)
                for name, value in resp.headers.items():
                    for secret in (CLIENT_KEY, OTHER_KEY, wrong, UPSTREAM_KEY):
                        assert secret not in value, f"{secret} in response header {name}"
    assert len(bodies) >= 7
    proxy_records = [r for r in caplog.records if r.name == "proxy" or r.name.startswith("proxy.")]
    assert any(r.name == "proxy.access" for r in proxy_records), "caplog captured no proxy.* record"
    assert len([r for r in proxy_records if r.name == "proxy.access"]) >= len(requests)
    for secret in (CLIENT_KEY, OTHER_KEY, wrong, UPSTREAM_KEY):
        for body in bodies:
            assert secret.encode() not in body, f"{secret} in error body {body!r}"
        for record in proxy_records:
            dumped = " ".join([record.getMessage(), repr(record.args), repr(vars(record)),
                               record.exc_text or ""])
            assert secret not in dumped, f"{secret} in log record {vars(record)}"
        assert secret not in caplog.text


async def test_stream_access_lines_carry_the_upstream_and_a_cut_responses_stream_its_usage(
        gateway: RunningGateway, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger("proxy"), "propagate", True)
    caplog.set_level(logging.INFO, logger="proxy.access")
    async with aiohttp.ClientSession(base_url=gateway.url, headers=AUTH) as session:
        async with session.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
            assert resp.status == 200
            await resp.read()
        # max_output_tokens cuts the answer: the stream ends with response.incomplete, whose
        # usage is what is metered (not an estimate)
        async with session.post("/v1/responses", json={"model": "mock-gpt", "input": "one two three",
                                                       "stream": True, "max_output_tokens": 3}) as resp:
            assert resp.status == 200
            assert b"response.incomplete" in await resp.read()
    lines = [r.fields for r in caplog.records if r.name == "proxy.access"]  # type: ignore[attr-defined]
    chat, responses = lines[-2], lines[-1]
    assert chat["upstream"] == "mock"
    assert chat["stream_id"].startswith("gs_")
    assert responses["upstream"] == "mock"
    assert (responses["prompt_tokens"], responses["completion_tokens"]) == (3, 3)
