"""Streams that outlive their instance: two gateway processes sharing a real ``redis-server``
(``state.backend: redis``), the in-process mock upstream, real sockets (DESIGN §4
"Reconnection", §5).

A stream produced on A is resumed on B with no event lost or repeated; a reader on B keeps
A from cancelling a detached stream; a cancel on B stops A's generation; a SIGKILLed
producer ends every reader's stream with ``stream_interrupted``, never ``[DONE]``; with
Redis down streams keep working in-process.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from scripts.mock_upstream import expected_text
from tests.conftest import CLIENT_KEY, OTHER_KEY, MockUpstream, base_config, merge
from tests.integration.conftest import GatewayProcess, RedisServer, StartGatewayProcess

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
STREAM_CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "stream": True}
ID_RE = re.compile(rb"^id: (gs_[0-9a-f]{24}):(\d+)$", re.MULTILINE)


def shared_config(mock: MockUpstream, redis: RedisServer, **streams: Any) -> dict[str, Any]:
    """Both instances: Redis for limits and stream logs, the given ``streams:`` settings."""
    return merge(base_config(mock.base_url), {
        "state": {"backend": "redis", "redis_url": redis.url, "redis_timeout": "1s"},
        "server": {"access_log": False},
        "streams": streams,
    })


async def start_pair(gateway_process: StartGatewayProcess, config: dict[str, Any]
                     ) -> tuple[GatewayProcess, GatewayProcess]:
    a, b = await asyncio.gather(gateway_process(config), gateway_process(config))
    return a, b


def slow_tokens(tokens: int, delay_ms: int) -> dict[str, str]:
    return {**AUTH, "x-mock-tokens": str(tokens), "x-mock-token-delay-ms": str(delay_ms)}


def events(raw: bytes) -> list[bytes]:
    """The SSE events of ``raw`` (keep-alive comment lines dropped)."""
    return [e for e in raw.replace(b": keep-alive\n", b"").split(b"\n\n") if e.strip()]


def seqs(raw: bytes) -> list[int]:
    return [int(m.group(2)) for m in ID_RE.finditer(raw)]


def chat_text(raw: bytes) -> str:
    """The concatenated delta contents of a chat stream's events."""
    text = []
    for event in events(raw):
        data = event.split(b"data: ", 1)[1]
        if data != b"[DONE]":
            chunk = orjson.loads(data)
            text += [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
    return "".join(text)


async def read_events(response: aiohttp.ClientResponse, count: int) -> bytes:
    """Read until ``count`` complete events arrived."""
    received = b""
    async with asyncio.timeout(10):
        while len(events(received)) < count or not received.endswith(b"\n\n"):
            chunk = await response.content.readany()
            assert chunk, f"stream ended early: {received!r}"
            received += chunk
    return received


async def start_and_cut(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                        keep: int) -> tuple[str, bytes]:
    """Start a stream on ``url``, read ``keep`` events and drop the connection."""
    async with session.post(url + "/v1/chat/completions", json=STREAM_CHAT, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        stream_id = resp.headers["X-Stream-Id"]
        head = await read_events(resp, keep)
        resp.connection.transport.abort()  # type: ignore[union-attr]
    return stream_id, head


async def resume_on(session: aiohttp.ClientSession, url: str, stream_id: str, after_seq: int,
                    key: str = CLIENT_KEY) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}", "Last-Event-ID": f"{stream_id}:{after_seq}"}
    async with asyncio.timeout(20), session.get(f"{url}/v1/streams/{stream_id}", headers=headers) as resp:
        return resp.status, await resp.read()


async def mock_stat(mock: MockUpstream, name: str, value: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if (await mock.stats())[name] == value:
            return True
        await asyncio.sleep(0.05)
    return False


def complete_events(raw: bytes) -> bytes:
    """``raw`` up to its last complete event (what a client that was cut really has)."""
    return raw[:raw.rfind(b"\n\n") + 2]


async def test_a_stream_cut_on_one_instance_is_resumed_whole_on_the_other(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess) -> None:
    a, b = await start_pair(gateway_process, shared_config(mock_upstream, redis_server))
    async with aiohttp.ClientSession() as session:
        stream_id, head = await start_and_cut(session, a.url, slow_tokens(30, 20), keep=4)
        head = complete_events(head)
        last = seqs(head)[-1]
        status, tail = await resume_on(session, b.url, stream_id, last)
    assert status == 200
    assert seqs(head + tail) == list(range(1, len(events(head + tail)) + 1))  # none lost or repeated
    assert chat_text(head + tail) == expected_text(30)
    assert events(tail)[-1].endswith(b"data: [DONE]")
    assert (await mock_upstream.stats())["requests"] == 1  # one generation


async def test_a_finished_stream_replays_on_the_other_instance_and_answers_its_status_codes(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess) -> None:
    a, b = await start_pair(gateway_process, shared_config(mock_upstream, redis_server))
    async with aiohttp.ClientSession() as session:
        async with session.post(a.url + "/v1/chat/completions", json=STREAM_CHAT,
                                headers=slow_tokens(5, 0)) as resp:
            whole = await resp.read()
            stream_id = resp.headers["X-Stream-Id"]
        last = seqs(whole)[-1]
        await asyncio.sleep(0.3)  # the mirror's final batch
        status, replay = await resume_on(session, b.url, stream_id, 0)
        assert (status, replay) == (200, whole)
        assert await resume_on(session, b.url, stream_id, last) == (204, b"")
        status, body = await resume_on(session, b.url, stream_id, last + 1)
        assert status == 400
        assert orjson.loads(body)["error"]["code"] == "cursor_beyond_stream"
        status, body = await resume_on(session, b.url, stream_id, 0, key=OTHER_KEY)
        status_unknown, body_unknown = await resume_on(session, b.url, "gs_" + "0" * 24, 0)
        assert (status, body) == (status_unknown, body_unknown)
        assert status == 404
        assert orjson.loads(body)["error"]["code"] == "stream_not_found"


async def test_a_reader_on_another_instance_keeps_a_detached_stream_generating(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess) -> None:
    """A's client leaves; B's reader is attached; A must not cancel at detach_timeout."""
    a, b = await start_pair(gateway_process, shared_config(
        mock_upstream, redis_server, detach_timeout="0.5s"))
    async with aiohttp.ClientSession() as session:
        stream_id, head = await start_and_cut(session, a.url, slow_tokens(60, 40), keep=2)
        status, tail = await resume_on(session, b.url, stream_id, seqs(complete_events(head))[-1])
    assert status == 200
    assert events(tail)[-1].endswith(b"data: [DONE]")  # ~2.4 s of generation, past 0.5 s
    stats = await mock_upstream.stats()
    assert (stats["streams_completed"], stats["streams_cancelled"]) == (1, 0)


async def test_nobody_returning_cancels_at_detach_timeout_across_instances(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess) -> None:
    a, _b = await start_pair(gateway_process, shared_config(
        mock_upstream, redis_server, detach_timeout="0.5s"))
    async with aiohttp.ClientSession() as session:
        await start_and_cut(session, a.url, slow_tokens(200, 40), keep=2)
    assert await mock_stat(mock_upstream, "streams_cancelled", 1, within_s=5.0)
    assert (await mock_upstream.stats())["streams_completed"] == 0


async def test_a_cancel_on_another_instance_stops_generation(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess) -> None:
    a, b = await start_pair(gateway_process, shared_config(mock_upstream, redis_server))
    async with aiohttp.ClientSession() as session:
        async with session.post(a.url + "/v1/chat/completions", json=STREAM_CHAT,
                                headers=slow_tokens(400, 30)) as resp:
            stream_id = resp.headers["X-Stream-Id"]
            await read_events(resp, 2)
            async with session.post(f"{b.url}/v1/streams/{stream_id}/cancel", headers=AUTH) as cancel:
                assert cancel.status == 200
                assert await cancel.json() == {"id": stream_id, "object": "stream", "cancelled": True}
            async with asyncio.timeout(5):
                rest = await resp.read()
        async with session.post(f"{b.url}/v1/streams/{stream_id}/cancel",
                                headers={"Authorization": f"Bearer {OTHER_KEY}"}) as other:
            assert other.status == 404
    assert b"[DONE]" not in rest
    assert b'"code":"stream_cancelled"' in events(rest)[-1]
    assert await mock_stat(mock_upstream, "streams_cancelled", 1, within_s=3.0)


async def test_a_killed_producer_ends_every_reader_with_stream_interrupted(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess) -> None:
    producer_timeout_s = 2.0
    a, b = await start_pair(gateway_process, shared_config(
        mock_upstream, redis_server, producer_timeout=f"{producer_timeout_s}s"))
    async with aiohttp.ClientSession() as session:
        stream_id, head = await start_and_cut(session, a.url, slow_tokens(400, 30), keep=3)
        after = seqs(complete_events(head))[-1]
        readers = [asyncio.create_task(resume_on(session, b.url, stream_id, after)) for _ in range(2)]
        await asyncio.sleep(0.5)
        a.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        results = await asyncio.gather(*readers)
        ended_after_s = time.monotonic() - killed_at
    assert ended_after_s < producer_timeout_s + 1.0
    for status, tail in results:
        assert status == 200
        last = orjson.loads(events(tail)[-1].split(b"data: ", 1)[1])
        assert last["error"]["code"] == "stream_interrupted"
        assert b"[DONE]" not in tail
    assert results[0][1] == results[1][1]  # both readers saw the same ending


async def test_with_redis_down_streams_work_in_process(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess) -> None:
    gateway = await gateway_process(shared_config(mock_upstream, redis_server))
    redis_server.stop()
    async with aiohttp.ClientSession() as session:
        stream_id, head = await start_and_cut(session, gateway.url, slow_tokens(20, 10), keep=3)
        head = complete_events(head)
        status, tail = await resume_on(session, gateway.url, stream_id, seqs(head)[-1])
        assert status == 200
        assert chat_text(head + tail) == expected_text(20)
        async with session.get(gateway.url + "/metrics") as resp:
            metrics = await resp.text()
    errors = re.search(r"^shepherd_stream_store_errors_total (\S+)$", metrics, re.MULTILINE)
    assert errors is not None
    assert float(errors.group(1)) >= 1




async def test_responses_retrieve_resumes_on_the_other_instance(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess) -> None:
    """``client.responses.retrieve(id, stream=True, starting_after=N)`` on B serves the
    Responses stream A produced, from the events after sequence_number N."""
    a, b = await start_pair(gateway_process, shared_config(mock_upstream, redis_server))
    headers = {"x-mock-tokens": "12", "x-mock-token-delay-ms": "20"}
    async with openai.AsyncOpenAI(base_url=a.url + "/v1", api_key=CLIENT_KEY, max_retries=0,
                                  default_headers=headers) as on_a, \
            openai.AsyncOpenAI(base_url=b.url + "/v1", api_key=CLIENT_KEY, max_retries=0) as on_b:
        original = [event async for event in await on_a.responses.create(
            model="mock-gpt", input="hi", stream=True)]
        response_id = original[0].response.id  # type: ignore[union-attr]
        await asyncio.sleep(0.3)  # the mirror's final batch
        resumed = [event async for event in await on_b.responses.retrieve(
            response_id, stream=True, starting_after=4)]
    assert [e.sequence_number for e in resumed] == [e.sequence_number for e in original[5:]]
    assert [e.model_dump() for e in resumed] == [e.model_dump() for e in original[5:]]
    assert resumed[-1].type == "response.completed"


async def test_a_resume_on_the_other_instance_waits_for_the_copy_to_catch_up(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess) -> None:
    """The client can be faster than the producer's mirror: resumed on B the instant it was
    cut on A (right after the first event, or mid-stream), no stream is answered 404 or
    400 because Redis had not caught up yet; every one comes back whole."""
    a, b = await start_pair(gateway_process, shared_config(mock_upstream, redis_server))

    async def cut_and_resume(session: aiohttp.ClientSession, keep: int) -> str:
        stream_id, head = await start_and_cut(session, a.url, slow_tokens(40, 3), keep=keep)
        head = complete_events(head)
        status, tail = await resume_on(session, b.url, stream_id, seqs(head)[-1])
        assert status == 200, tail
        assert seqs(head + tail) == list(range(1, len(events(head + tail)) + 1))
        return chat_text(head + tail)

    async with aiohttp.ClientSession() as session:
        texts = await asyncio.gather(*(cut_and_resume(session, keep) for keep in [1, 20] * 12))
    assert texts == [expected_text(40)] * 24


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_concurrent_duplicates_of_an_idempotency_key_make_one_upstream_call_with_redis_limits(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess, stream: bool) -> None:
    """With limits in Redis the limit check awaits a round trip; a duplicate arriving
    meanwhile must still find the first request (it is registered before that await)."""
    config = merge(shared_config(mock_upstream, redis_server),
                   {"keys": {"tester": {"rpm": 6000, "tpm": 10_000_000}}})
    gateway = await gateway_process(config)
    body = {**STREAM_CHAT, "stream": stream}
    headers = {**slow_tokens(8, 5), "Idempotency-Key": "order-42"}
    async with aiohttp.ClientSession() as session:

        async def post() -> bytes:
            async with session.post(gateway.url + "/v1/chat/completions", json=body,
                                    headers=headers) as resp:
                assert resp.status == 200
                assert "x-ratelimit-limit-requests" in resp.headers
                return await resp.read()

        answers = await asyncio.gather(*(post() for _ in range(5)))
    assert (await mock_upstream.stats())["requests"] == 1
    assert answers == [answers[0]] * 5
