"""Tests for scripts/mock_upstream.py, the fake OpenAI upstream the integration tests use."""

from __future__ import annotations

import asyncio
import base64
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from scripts.mock_upstream import (
    DEFAULT_TOKENS,
    MODEL_IDS,
    MockConfig,
    create_app,
    embedding_vector,
    expected_text,
)

pytestmark = pytest.mark.asyncio

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "say something nice"}]}
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mock_upstream.py"


@pytest_asyncio.fixture
async def client(aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(create_app())


def sse_data(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [
        line.removeprefix("data: ")
        for block in body.split("\n\n")
        for line in block.split("\n")
        if line.startswith("data: ")
    ]


async def stream_chunks(client: Client, path: str, body: dict[str, Any], **kw: Any) -> list[Any]:
    """POST a streaming request; return the parsed chunks, ``[DONE]`` kept as a string."""
    resp = await client.post(path, json={**body, "stream": True}, **kw)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    return [d if d == "[DONE]" else orjson.loads(d) for d in sse_data(await resp.text())]


async def stats(client: Client) -> dict[str, Any]:
    resp = await client.get("/mock/stats")
    return await resp.json()  # type: ignore[no-any-return]


async def test_expected_text_is_the_word_sequence() -> None:
    assert expected_text(0) == ""
    assert expected_text(3) == "alpha bravo charlie "
    assert expected_text(9).endswith("hotel alpha ")


async def test_chat_non_stream_returns_expected_text_for_each_choice(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json={**CHAT, "n": 2})
    body = await resp.json()
    assert [c["message"]["content"] for c in body["choices"]] == [expected_text(DEFAULT_TOKENS)] * 2
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2 * DEFAULT_TOKENS,
        "total_tokens": 3 + 2 * DEFAULT_TOKENS,
    }


async def test_chat_stream_joins_to_expected_text_without_usage(client: Client) -> None:
    chunks = await stream_chunks(client, "/v1/chat/completions", CHAT)
    assert chunks[-1] == "[DONE]"
    events = chunks[:-1]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == expected_text(DEFAULT_TOKENS)
    assert [e["choices"][0]["finish_reason"] for e in events][-2:] == [None, "stop"]
    assert all("usage" not in e and e["object"] == "chat.completion.chunk" for e in events)


async def test_chat_stream_usage_chunk_only_when_asked(client: Client) -> None:
    body = {**CHAT, "stream_options": {"include_usage": True}}
    chunks = await stream_chunks(client, "/v1/chat/completions", body)
    usage_chunk = chunks[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == DEFAULT_TOKENS
    assert all(c["usage"] is None for c in chunks[:-2])


@pytest.mark.parametrize("limit_field", ["max_tokens", "max_completion_tokens"])
async def test_chat_max_tokens_cuts_with_finish_reason_length(client: Client, limit_field: str) -> None:
    body = {**CHAT, limit_field: 3}
    chunks = await stream_chunks(client, "/v1/chat/completions", body)
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1])
    assert text == expected_text(3)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    resp = await client.post("/v1/chat/completions", json=body)
    choice = (await resp.json())["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (expected_text(3), "length")


async def test_tokens_header_overrides_process_config(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(MockConfig(tokens=2)))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert (await resp.json())["choices"][0]["message"]["content"] == expected_text(2)
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"x-mock-tokens": "5"})
    assert (await resp.json())["choices"][0]["message"]["content"] == expected_text(5)


async def test_bad_knob_header_is_a_400_naming_it(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"x-mock-tokens": "lots"})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "x-mock-tokens"


async def test_completions_stream_and_non_stream(client: Client) -> None:
    body = {"model": "mock-gpt", "prompt": "once upon", "max_tokens": 4}
    chunks = await stream_chunks(client, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == expected_text(4)
    assert chunks[0]["object"] == "text_completion"
    resp = await client.post("/v1/completions", json=body)
    payload = await resp.json()
    assert payload["choices"][0]["text"] == expected_text(4)
    assert payload["usage"]["prompt_tokens"] == 2


async def test_embeddings_base64_decodes_to_the_float_vector(client: Client) -> None:
    body: dict[str, Any] = {"model": "mock-embed", "input": ["hello world", "bye"], "dimensions": 5}
    floats = await (await client.post("/v1/embeddings", json=body)).json()
    encoded = await (await client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})).json()
    for i, text in enumerate(body["input"]):
        vector = floats["data"][i]["embedding"]
        decoded = struct.unpack("<5f", base64.b64decode(encoded["data"][i]["embedding"]))
        assert list(decoded) == vector == embedding_vector(text, 5)
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


async def test_models_list_and_retrieve_percent_encoded_slash(client: Client) -> None:
    listed = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == list(MODEL_IDS)
    url = client.make_url("/v1/models/meta-llama%2FLlama-3.1-8B-Instruct")
    assert "%2F" in str(url)
    resp = await client.session.get(url)
    assert (await resp.json())["id"] == "meta-llama/Llama-3.1-8B-Instruct"


async def test_status_knob_gives_openai_error_and_retry_after(client: Client) -> None:
    headers = {"x-mock-status": "429", "x-mock-retry-after": "7"}
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert (resp.status, resp.headers["Retry-After"]) == (429, "7")
    error = (await resp.json())["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "requests",
        "rate_limit_exceeded",
        None,
    )
    headers = {"x-mock-status": "502", "x-mock-error-body": "text"}
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert (resp.status, resp.content_type) == (502, "text/plain")
    assert await resp.text() == "upstream exploded"


async def test_reset_after_aborts_the_connection(client: Client) -> None:
    headers = {"x-mock-reset-after": "2"}
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers)
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert (await stats(client))["streams_reset"] == 1


async def test_vllm_error_after_ends_stream_without_done(client: Client) -> None:
    headers = {"x-mock-vllm-error-after": "2"}
    chunks = await stream_chunks(client, "/v1/chat/completions", CHAT, headers=headers)
    assert len(chunks) == 3
    assert chunks[-1] == {
        "object": "error",
        "message": "mock vllm failure",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }


async def test_silence_pauses_the_stream(client: Client) -> None:
    headers = {"x-mock-silence-s": "0.2", "x-mock-silence-after": "1"}
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers)
    await resp.content.readuntil(b"\n\n")
    started = asyncio.get_running_loop().time()
    await resp.content.readuntil(b"\n\n")
    assert asyncio.get_running_loop().time() - started >= 0.15
    assert "[DONE]" in await resp.text()


async def test_stats_count_a_stream_cancelled_by_the_client(client: Client) -> None:
    headers = {"x-mock-token-delay-ms": "5", "x-mock-tokens": "10000"}
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers)
    await resp.content.readuntil(b"\n\n")
    assert (await stats(client))["open_streams"] == 1
    resp.close()
    for _ in range(200):
        current = await stats(client)
        if current["streams_cancelled"]:
            break
        await asyncio.sleep(0.01)
    assert current["streams_cancelled"] == 1
    assert (current["open_streams"], current["streams_completed"]) == (0, 0)


async def test_echo_returns_raw_body_and_request_log_and_reset(client: Client) -> None:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", b"\x00\xffbytes", filename="a.jsonl")
    resp = await client.post("/v1/files?x=1", data=form)
    echoed = await resp.json()
    raw = base64.b64decode(echoed["body_b64"])
    boundary = echoed["headers"]["Content-Type"].split("boundary=")[1]
    assert boundary.encode() in raw
    assert b"\x00\xffbytes" in raw
    assert (echoed["method"], echoed["path"], echoed["query_string"]) == (
        "POST",
        "/v1/files",
        "x=1",
    )
    await client.post("/v1/chat/completions", json=CHAT)
    log = await (await client.get("/mock/requests")).json()
    assert [(e["path"], e["body"]) for e in log] == [
        ("/v1/files", None),
        ("/v1/chat/completions", CHAT),
    ]
    assert (await stats(client))["by_path"] == {"/v1/files": 1, "/v1/chat/completions": 1}
    await client.post("/mock/reset")
    assert (await stats(client))["requests"] == 0
    assert await (await client.get("/mock/requests")).json() == []


async def test_responses_stream_sequence_numbers_and_event_names(client: Client) -> None:
    resp = await client.post("/v1/responses", json={"input": "hi", "stream": True})
    blocks = [b for b in (await resp.text()).split("\n\n") if b]
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    events = [orjson.loads(b.split("\n")[1].removeprefix("data: ")) for b in blocks]
    assert [e["type"] for e in events] == names
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names.count("response.output_text.delta") == DEFAULT_TOKENS
    assert names[-1] == "response.completed"


async def test_official_sdk_against_real_socket(aiohttp_server: Callable[..., Any]) -> None:
    server: TestServer = await aiohttp_server(create_app(MockConfig(tokens=5)))
    sdk = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0)
    async with sdk:
        stream = await sdk.chat.completions.create(model="mock-gpt", messages=[], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == expected_text(5)
        response = await sdk.responses.create(model="mock-gpt", input="hello there")
        assert response.output_text == expected_text(5)
        assert response.usage is not None
        assert response.usage.output_tokens == 5
        events = await sdk.responses.create(model="mock-gpt", input="hi", stream=True)
        deltas = [e.delta async for e in events if e.type == "response.output_text.delta"]
        assert "".join(deltas) == expected_text(5)
        model = await sdk.models.retrieve("meta-llama/Llama-3.1-8B-Instruct")
        assert model.id == "meta-llama/Llama-3.1-8B-Instruct"


async def test_sdk_responses_stream_helper_and_incomplete(
    aiohttp_server: Callable[..., Any],
) -> None:
    server: TestServer = await aiohttp_server(create_app())
    sdk = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0)
    async with sdk:
        async with sdk.responses.stream(model="mock-gpt", input="hi") as stream:
            final = await stream.get_final_response()
        assert final.output_text == expected_text(DEFAULT_TOKENS)
        # Cut by max_output_tokens: like OpenAI, the stream ends with response.incomplete.
        events = await sdk.responses.create(input="hi", model="m", max_output_tokens=3, stream=True)
        last = [e async for e in events][-1]
        assert last.type == "response.incomplete"
        assert (last.response.status, last.response.output_text) == ("incomplete", expected_text(3))


async def test_standalone_script_prints_listening_line_and_serves() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--port",
        "0",
        "--tokens",
        "3",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        assert line.startswith("mock upstream listening on http://127.0.0.1:")
        async with aiohttp.ClientSession() as session:
            url = line.rsplit(" ", 1)[1] + "/v1/chat/completions"
            async with session.post(url, json=CHAT) as resp:
                body = await resp.json()
        assert body["choices"][0]["message"]["content"] == expected_text(3)
    finally:
        proc.terminate()
        await proc.wait()


# --------------------------------------------------------------------------- realtime


async def realtime_events(ws: Any, until: str) -> list[dict[str, Any]]:
    """Server events up to and including the first of type ``until``."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        while not events or events[-1]["type"] != until:
            events.append(await ws.receive_json())
    return events


async def test_realtime_round_trip_speaks_ga_event_names(client: Client) -> None:
    async with client.ws_connect("/v1/realtime?model=mock-gpt", protocols=("realtime",)) as ws:
        assert ws.protocol == "realtime"
        created = await ws.receive_json()
        assert (created["type"], created["session"]["model"]) == ("session.created", "mock-gpt")
        session = {"type": "realtime", "instructions": "be nice"}
        await ws.send_json({"type": "session.update", "session": session})
        assert (await ws.receive_json())["session"]["instructions"] == "be nice"
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi you"}]}
        await ws.send_json({"type": "conversation.item.create", "item": item})
        added = await ws.receive_json()
        assert (added["type"], added["previous_item_id"]) == ("conversation.item.created", None)
        await ws.send_json({"type": "response.create"})
        events = await realtime_events(ws, "response.done")
        kinds = [e["type"] for e in events]
        assert kinds[0] == "response.created"
        assert "response.output_text.done" in kinds
        deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
        assert "".join(deltas) == expected_text(DEFAULT_TOKENS)
        done = events[-1]["response"]
        assert done["status"] == "completed"
        assert done["usage"]["input_tokens"] == 4  # "be nice" + "hi you"
        assert done["usage"]["output_tokens"] == DEFAULT_TOKENS
        assert done["usage"]["total_tokens"] == 4 + DEFAULT_TOKENS
        # The answer is input of the next response.
        await ws.send_json({"type": "response.create", "response": {"max_output_tokens": 2}})
        done = (await realtime_events(ws, "response.done"))[-1]["response"]
        assert (done["status"], done["usage"]["input_tokens"]) == ("incomplete", 4 + DEFAULT_TOKENS)


async def test_realtime_echoes_binary_and_answers_unknown_events_with_error(client: Client) -> None:
    async with client.ws_connect("/v1/realtime?model=mock-gpt") as ws:
        await ws.receive_json()
        await ws.send_bytes(b"\x00\x01audio")
        assert (await ws.receive()).data == b"\x00\x01audio"
        await ws.send_str('{"type": "nope", "event_id": "e1"}')
        error = await ws.receive_json()
        assert error["type"] == "error"
        assert (error["error"]["code"], error["error"]["event_id"]) == ("unknown_event", "e1")
        await ws.send_str("not json")
        assert (await ws.receive_json())["error"]["code"] == "invalid_json"


async def test_realtime_close_knobs(client: Client) -> None:
    headers = {"x-mock-close-code": "4001", "x-mock-close-reason": "bye now", "x-mock-close-after": "1"}
    async with client.ws_connect("/v1/realtime", headers=headers) as ws:
        assert (await ws.receive_json())["type"] == "session.created"
        msg = await ws.receive()
        assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 4001, "bye now")


async def test_realtime_reset_knob_drops_the_connection(client: Client) -> None:
    async with client.ws_connect("/v1/realtime", headers={"x-mock-reset-after": "1"}) as ws:
        await ws.receive_json()
        msg = await ws.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        assert ws.close_code not in (1000, 4001)


async def test_realtime_status_knob_refuses_the_handshake(client: Client) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/v1/realtime", headers={"x-mock-status": "503"})
    assert info.value.status == 503
    resp = await client.get("/v1/realtime", headers={"x-mock-close-code": "999"})
    assert resp.status == 400
    assert "x-mock-close-code" in (await resp.json())["error"]["message"]


async def test_realtime_stats_record_sessions_and_the_clients_close(client: Client) -> None:
    async with client.ws_connect("/v1/realtime", headers={"Authorization": "Bearer sk-up"}) as ws:
        await ws.receive_json()
        assert (await stats(client))["realtime_open"] == 1
        await ws.close(code=4002, message=b"done here")
    for _ in range(100):
        current = await stats(client)
        if current["realtime_open"] == 0:
            break
        await asyncio.sleep(0.01)
    assert current["realtime_sessions"] == 1
    assert current["realtime_last_close"] == {"code": 4002, "reason": "done here"}
    logged = await (await client.get("/mock/requests")).json()
    assert logged[-1]["headers"]["Authorization"] == "Bearer sk-up"
