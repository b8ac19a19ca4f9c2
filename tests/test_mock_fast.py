"""Tests for scripts/mock_fast.py, the mock upstream's load-test engine.

Both engines run on real loopback sockets (the fast one in-process via ``start_server``,
``mock_upstream.py`` as an aiohttp test server) and must give the same answers, ids and
``created`` aside.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer
from openai.types.chat import ChatCompletionUserMessageParam

from scripts.mock_fast import NOT_SUPPORTED, FastConnection, FastMock, split_request, start_server
from scripts.mock_upstream import MODEL_IDS, MockConfig, create_app, expected_text

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mock_fast.py"
PROMPT = [{"role": "user", "content": "say something nice"}]
CHAT = {"model": "mock-gpt", "messages": PROMPT}
Engines = Callable[..., Awaitable[tuple[str, str]]]
Response = tuple[int, dict[str, str], bytes]


@pytest.fixture
async def start_fast() -> AsyncIterator[Callable[[MockConfig], Awaitable[int]]]:
    """Start fast engines in-process on free ports; returns the port."""
    servers: list[asyncio.Server] = []

    async def start(config: MockConfig) -> int:
        server = await start_server(config, "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
def engines(start_fast: Callable[[MockConfig], Awaitable[int]],
            aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Engines:
    """Both engines with one config: (fast base URL, aiohttp base URL)."""

    async def start(**config: Any) -> tuple[str, str]:
        port = await start_fast(MockConfig(**config))
        server = await aiohttp_server(create_app(MockConfig(**config)))
        return f"http://127.0.0.1:{port}", str(server.make_url("")).rstrip("/")

    return start


async def fetch(url: str, body: Any = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a POST of ``body`` as JSON, or a GET without one."""
    async with aiohttp.ClientSession() as session:
        method = session.get if body is None else session.post
        async with method(url, **({} if body is None else {"json": body})) as resp:
            return resp.status, resp.headers["Content-Type"], await resp.read()


def without_ids(doc: Any) -> Any:
    """A JSON answer or chunk without ``id`` and ``created``."""
    if isinstance(doc, dict):
        return {k: v for k, v in doc.items() if k not in ("id", "created")}
    return doc


def events(body: bytes) -> list[Any]:
    """The parsed ``data:`` payloads of an SSE body, ``[DONE]`` kept as a string."""
    payloads = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    return [p if p == "[DONE]" else orjson.loads(p) for p in payloads]


COMPARED = [
    pytest.param(CHAT, id="plain"),
    pytest.param({**CHAT, "max_tokens": 3}, id="max_tokens-cut"),
    pytest.param({**CHAT, "max_completion_tokens": 2, "max_tokens": 9}, id="max_completion_tokens"),
    pytest.param({**CHAT, "max_tokens": 50}, id="max_tokens-not-reached"),
    pytest.param({**CHAT, "n": 2}, id="n2"),
    pytest.param({"messages": []}, id="no-model"),
    pytest.param({**CHAT, "n": 0}, id="bad-n"),
    pytest.param([1, 2], id="not-an-object"),
]


@pytest.mark.parametrize("body", COMPARED)
async def test_json_answers_match_mock_upstream(engines: Engines, body: Any) -> None:
    fast, slow = await engines(tokens=5)
    got = await fetch(fast + "/v1/chat/completions", body)
    want = await fetch(slow + "/v1/chat/completions", body)
    assert got[:2] == want[:2]
    assert without_ids(orjson.loads(got[2])) == without_ids(orjson.loads(want[2]))


STREAMED = [
    pytest.param({**CHAT, "stream": True}, id="stream"),
    pytest.param({**CHAT, "stream": True, "stream_options": {"include_usage": True}}, id="usage"),
    pytest.param({**CHAT, "stream": True, "max_tokens": 2,
                  "stream_options": {"include_usage": True}}, id="usage-cut"),
    pytest.param({**CHAT, "stream": True, "n": 2}, id="n2"),
    pytest.param({**CHAT, "stream": True, "max_tokens": 0}, id="zero-tokens"),
]


@pytest.mark.parametrize("body", STREAMED)
async def test_sse_events_match_mock_upstream(engines: Engines, body: dict[str, Any]) -> None:
    fast, slow = await engines(tokens=5)
    status, kind, raw = await fetch(fast + "/v1/chat/completions", body)
    want = await fetch(slow + "/v1/chat/completions", body)
    assert (status, kind) == want[:2] == (200, "text/event-stream")
    got_events = events(raw)
    assert [without_ids(e) for e in got_events] == [without_ids(e) for e in events(want[2])]
    assert len({e["id"] for e in got_events if e != "[DONE]"}) == 1  # one id per stream


async def test_models_and_ids(engines: Engines) -> None:
    fast, slow = await engines()
    got, want = await fetch(fast + "/v1/models"), await fetch(slow + "/v1/models")
    assert got == want
    assert [m["id"] for m in orjson.loads(got[2])["data"]] == list(MODEL_IDS)
    first, second = [orjson.loads((await fetch(fast + "/v1/chat/completions", CHAT))[2])
                     for _ in range(2)]
    assert first["id"] != second["id"]
    assert first["id"].startswith("chatcmpl-mock-")
    assert abs(first["created"] - time.time()) < 5


# --------------------------------------------------------------------------- raw HTTP


async def read_response(reader: asyncio.StreamReader) -> Response:
    """(status, lower-cased headers, body) of one HTTP/1.1 response; chunked is decoded."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status_line, *lines = head.strip().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)
    else:
        body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


def post(body: bytes, *extra: str) -> bytes:
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: t", f"Content-Length: {len(body)}", *extra]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def get(path: str, *extra: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: t", *extra]).encode() + b"\r\n\r\n"


@pytest.fixture
async def connect(start_fast: Callable[[MockConfig], Awaitable[int]]
                  ) -> AsyncIterator[Callable[..., Awaitable[tuple[asyncio.StreamReader,
                                                                   asyncio.StreamWriter]]]]:
    """Open raw connections to a fast engine started with the given config fields."""
    writers: list[asyncio.StreamWriter] = []

    async def open_(**config: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        port = await start_fast(MockConfig(**config))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return reader, writer

    yield open_
    for writer in writers:
        writer.close()


async def test_pipelined_requests_in_one_write_get_two_answers_in_order(connect: Any) -> None:
    reader, writer = await connect(tokens=4)
    body = orjson.dumps(CHAT)
    writer.write(post(body) + get("/v1/models") + post(body, "Connection: close"))
    answers = [await read_response(reader) for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 200]
    assert orjson.loads(answers[0][2])["choices"][0]["message"]["content"] == expected_text(4)
    assert orjson.loads(answers[1][2])["object"] == "list"
    assert answers[2][1]["connection"] == "close"
    assert await reader.read() == b""  # closed after the Connection: close answer


async def test_delayed_pipelined_answers_keep_their_order(connect: Any) -> None:
    reader, writer = await connect(tokens=3, ttft_ms=20, token_delay_ms=5)
    stream = orjson.dumps({**CHAT, "stream": True})
    started = time.monotonic()
    writer.write(post(stream) + post(orjson.dumps(CHAT)))
    first, second = await read_response(reader), await read_response(reader)
    # each waits ttft + 3 token delays, one after the other
    assert time.monotonic() - started >= 2 * 0.035 - 0.005
    assert events(first[2])[-1] == "[DONE]"
    assert orjson.loads(second[2])["choices"][0]["message"]["content"] == expected_text(3)


async def test_body_split_over_two_writes(connect: Any) -> None:
    reader, writer = await connect()
    raw = post(orjson.dumps({**CHAT, "max_tokens": 2}))
    for part in (raw[:70], raw[70:]):  # the head, then the rest of the head and the body
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.02)
    status, _, body = await read_response(reader)
    assert status == 200
    assert orjson.loads(body)["choices"][0]["finish_reason"] == "length"


async def test_x_mock_headers_are_refused_and_the_connection_stays_usable(connect: Any) -> None:
    reader, writer = await connect()
    writer.write(post(orjson.dumps(CHAT), "X-Mock-Status: 500") + get("/v1/models"))
    status, _, body = await read_response(reader)
    assert status == 400
    assert orjson.loads(body)["error"]["message"] == NOT_SUPPORTED
    assert (await read_response(reader))[0] == 200


@pytest.mark.parametrize("request_bytes", [get("/v1/embeddings"), get("/mock/stats"),
                                           get("/v1/chat/completions"),
                                           post(b"{}").replace(b"/v1/chat/completions",
                                                               b"/v1/completions")])
async def test_other_paths_are_404(connect: Any, request_bytes: bytes) -> None:
    reader, writer = await connect()
    writer.write(request_bytes)
    status, headers, body = await read_response(reader)
    assert (status, headers["content-type"]) == (404, "application/json")
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
     411),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n", 413),
    (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"NONSENSE\r\n\r\n", 400),
])
async def test_refused_requests_close_the_connection(connect: Any, request_bytes: bytes,
                                                     status: int) -> None:
    reader, writer = await connect()
    writer.write(request_bytes)
    got, headers, _ = await read_response(reader)
    assert (got, headers["connection"]) == (status, "close")
    assert await reader.read() == b""


async def test_ttft_and_token_delay_apply_to_non_stream_answers(connect: Any) -> None:
    reader, writer = await connect(tokens=4, ttft_ms=30, token_delay_ms=5)
    started = time.monotonic()
    writer.write(post(orjson.dumps(CHAT)))
    status, _, _ = await read_response(reader)
    assert status == 200
    assert time.monotonic() - started >= 0.045


def test_split_request_at_every_byte_boundary() -> None:
    raw = post(orjson.dumps(CHAT), "Connection: close") + get("/v1/models?x=1")
    first_len = len(raw) - len(get("/v1/models?x=1"))
    for cut in range(len(raw)):
        got = split_request(raw[:cut])
        assert got is None or got[1] == first_len
    request, used = split_request(raw) or (None, 0)
    assert request is not None
    assert (request.method, request.path, request.close, used) == (
        b"POST", b"/v1/chat/completions", True, first_len)
    second, _ = split_request(raw[used:]) or (None, 0)
    assert second is not None
    assert (second.path, second.close, second.body) == (b"/v1/models", False, b"")


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))


def test_a_repeated_request_is_answered_from_the_request_cache() -> None:
    mock = FastMock(MockConfig(tokens=2))
    conn = FastConnection(mock)
    conn.connection_made(RecordingTransport())
    raw = post(orjson.dumps(CHAT))
    for _ in range(3):
        conn.data_received(raw)
    assert repr(mock) == "<FastMock [requests 3 | connections 1 | cached 1 bodies, 1 requests]>"
    assert repr(conn) == "<FastConnection idle buffered=0>"


async def test_official_sdk_chat_completion_and_stream(
        start_fast: Callable[[MockConfig], Awaitable[int]]) -> None:
    port = await start_fast(MockConfig(tokens=5))
    messages: list[ChatCompletionUserMessageParam] = [{"role": "user", "content": "say something nice"}]
    sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    async with sdk:
        answer = await sdk.chat.completions.create(model="mock-gpt", messages=messages)
        assert answer.choices[0].message.content == expected_text(5)
        assert answer.usage is not None
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (3, 5)
        stream = await sdk.chat.completions.create(
            model="mock-gpt", messages=messages, stream=True, max_tokens=3,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected_text(3)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 3


async def test_standalone_script_prints_listening_line_and_serves() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--port", "0", "--tokens", "3",
        stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        assert line.startswith("mock upstream (fast engine) listening on http://127.0.0.1:")
        status, _, body = await fetch(line.rsplit(" ", 1)[1] + "/v1/chat/completions", CHAT)
        assert (status, orjson.loads(body)["choices"][0]["message"]["content"]) == (
            200, expected_text(3))
    finally:
        proc.terminate()
        await proc.wait()
