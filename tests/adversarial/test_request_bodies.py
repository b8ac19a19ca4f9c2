"""Hostile request bodies: decoding costs about the body's own bytes, and no body, however
malformed, gets a 500 (issue: hardening, 4 and 7).

The gateway runs in this process (``start_gateway``), so its RSS is this process's RSS.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import aiohttp
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.adversarial.test_hostile_upstream import peak_rss_during
from tests.conftest import CLIENT_KEY, OTHER_KEY, MockUpstream, RunningGateway

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
LIMITED = {**AUTH, "Authorization": f"Bearer {OTHER_KEY}"}  # may use mock-gpt only
#: 3.4 million empty messages: 10.2 MB on the wire, about 370 MB as Python dicts.
MANY_EMPTY = b'{"model":"no-such-model","messages":[' + b",".join([b"{}"] * 3_400_000) + b"]}"


async def test_ten_concurrent_bodies_of_millions_of_messages_cost_their_bytes_not_their_objects(
        gateway: RunningGateway, mock_upstream: MockUpstream) -> None:
    async with aiohttp.ClientSession(headers=LIMITED) as session:

        async def post() -> int:
            async with session.post(gateway.url + "/v1/chat/completions",
                                    data=io.BytesIO(MANY_EMPTY)) as resp:
                await resp.read()
                return resp.status

        statuses, growth = await peak_rss_during(asyncio.gather(*(post() for _ in range(10))))
    assert statuses == [404] * 10  # parsed, then refused: the key may not use the model
    assert growth < 500 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB"
    assert (await mock_upstream.stats())["requests"] == 0


async def test_a_large_body_is_forwarded_whole(gateway: RunningGateway, mock_upstream: MockUpstream
                                               ) -> None:
    """A 4 MB body goes upstream byte for byte (in pieces, not one blocking write)."""
    body = orjson.dumps({"model": "mock-gpt", "messages": [
        {"role": "user", "content": "word " * 800_000}]})
    async with aiohttp.ClientSession(headers=AUTH) as session, session.post(
            gateway.url + "/v1/chat/completions", data=io.BytesIO(body)) as resp:
        assert resp.status == 200
    sent = (await mock_upstream.requests())[-1]["body"]
    assert orjson.dumps(sent) == body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
request_fields = st.fixed_dictionaries({}, optional={
    "model": json_values | st.sampled_from(["mock-gpt", "", "nope"]),
    "stream": json_values, "stream_options": json_values, "max_tokens": json_values,
    "n": json_values, "messages": json_values, "api_base": json_values})

def dumps(value: object) -> bytes:
    """JSON as Python writes it: integers of any size, and (not JSON) ``Infinity``."""
    return json.dumps(value).encode()


bodies = request_fields.map(dumps) | json_values.map(dumps) | st.binary(max_size=200)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["chat/completions", "completions", "embeddings", "responses"]))
async def test_no_body_gets_a_500(gateway: RunningGateway, body: bytes, path: str) -> None:
    async with aiohttp.ClientSession(headers={**AUTH, "x-mock-tokens": "2"}) as session, \
            session.post(f"{gateway.url}/v1/{path}", data=body) as resp:
        raw = await resp.read()
    assert resp.status < 500, (resp.status, raw[:300])
    if resp.status >= 400:
        error: Any = orjson.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"}


async def expect_continue(gateway: RunningGateway, headers: dict[str, str]) -> bytes:
    """Send only the headers of a POST with ``Expect: 100-continue`` and return what the
    gateway answers before any body byte is sent."""
    port = int(gateway.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = ["POST /v1/chat/completions HTTP/1.1", f"Host: 127.0.0.1:{port}",
             "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    writer.write("\r\n".join(lines).encode())
    await writer.drain()
    try:
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 100"):
                return head
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            return head + await reader.readexactly(length)
    finally:
        writer.close()


async def test_expect_100_continue_is_answered_only_after_the_key_and_size_are_checked(
        gateway: RunningGateway, mock_upstream: MockUpstream) -> None:
    huge = str(100 * 2**20)
    wrong_key = await expect_continue(gateway, {"Expect": "100-continue", "Content-Length": "10",
                                                "Authorization": "Bearer sk-wrong"})
    too_big = await expect_continue(gateway, {"Expect": "100-continue", "Content-Length": huge,
                                              "Authorization": AUTH["Authorization"]})
    odd = await expect_continue(gateway, {"Expect": "something-else", "Content-Length": "10",
                                          "Authorization": AUTH["Authorization"]})
    fine = await expect_continue(gateway, {"Expect": "100-continue", "Content-Length": "10",
                                           "Authorization": AUTH["Authorization"]})
    for answer, status, code in ((wrong_key, 401, b"invalid_api_key"),
                                 (too_big, 413, b"request_too_large"),
                                 (odd, 417, b"expectation_failed")):
        assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer
        assert b"application/json" in answer
        assert b'"code":"' + code + b'"' in answer
        assert b"sk-wrong" not in answer
    assert fine.startswith(b"HTTP/1.1 100 Continue")
    assert (await mock_upstream.stats())["requests"] == 0
