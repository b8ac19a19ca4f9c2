"""The official ``openai`` SDK (AsyncOpenAI) against the gateway, end to end.

Every test drives the real gateway (on loopback) in front of the mock upstream; per-request
faults are set with the mock's ``x-mock-*`` headers via ``extra_headers``.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from scripts.mock_upstream import (
    DEFAULT_DIMENSIONS,
    DEFAULT_TOKENS,
    MODEL_IDS,
    TEXT_ERROR_BODY,
    embedding_vector,
    expected_text,
)
from tests.conftest import (
    CLIENT_KEY,
    OTHER_KEY,
    UPSTREAM_KEY,
    MockUpstream,
    RunningGateway,
    StartGateway,
)

SLASH_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MESSAGES: list[Any] = [{"role": "user", "content": "hi there friend"}]  # 3 prompt tokens


def _client(gateway: RunningGateway, key: str = CLIENT_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=10)


def _error_field(exc: openai.APIError, name: str) -> Any:
    """A field of the error object in the body (openai-python keeps ``body["error"]`` or the
    whole body depending on the path, so accept both)."""
    body = exc.body
    assert isinstance(body, dict), body
    inner = body.get("error", body)
    assert isinstance(inner, dict), body
    return inner.get(name)


async def _read_until_error(stream: Any) -> tuple[str, openai.APIError | None]:
    """Join the chat deltas of ``stream``; return the text and the APIError that ended it."""
    text = ""
    try:
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    except openai.APIError as exc:
        return text, exc
    return text, None


async def _upstream_bodies(mock_upstream: MockUpstream, path: str) -> list[Any]:
    return [r["body"] for r in await mock_upstream.requests() if r["path"] == path]


# --------------------------------------------------------------------------- models


async def test_models_list_shows_mock_models(openai_client: openai.AsyncOpenAI) -> None:
    page = await openai_client.models.list()
    ids = [m.id for m in page.data]
    assert set(MODEL_IDS) <= set(ids)
    assert all(m.object == "model" for m in page.data)


async def test_models_retrieve_id_with_slash(openai_client: openai.AsyncOpenAI) -> None:
    model = await openai_client.models.retrieve(SLASH_MODEL)
    assert model.id == SLASH_MODEL
    assert model.object == "model"


async def test_limited_key_sees_only_its_models(gateway: RunningGateway) -> None:
    async with _client(gateway, OTHER_KEY) as client:
        page = await client.models.list()
        assert [m.id for m in page.data] == ["mock-gpt"]
        assert (await client.models.retrieve("mock-gpt")).id == "mock-gpt"
        with pytest.raises(openai.NotFoundError) as info:
            await client.models.retrieve("mock-embed")
        assert info.value.status_code == 404
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve(SLASH_MODEL)


# --------------------------------------------------------------------------- chat


async def test_chat_non_stream(openai_client: openai.AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model="mock-gpt", messages=MESSAGES, extra_headers={"x-mock-tokens": "5"}
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == expected_text(5)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == 8


async def test_chat_non_stream_max_tokens_cut(openai_client: openai.AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model="mock-gpt", messages=MESSAGES, max_completion_tokens=3
    )
    assert completion.choices[0].message.content == expected_text(3)
    assert completion.choices[0].finish_reason == "length"


async def test_chat_stream_with_include_usage(openai_client: openai.AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="mock-gpt",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-tokens": "6"},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(6)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (3, 6, 9)
    # only the last chunk has empty choices
    assert all(c.choices for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_chat_stream_without_include_usage_drops_injected_chunk(
    openai_client: openai.AsyncOpenAI, mock_upstream: MockUpstream
) -> None:
    stream = await openai_client.chat.completions.create(
        model="mock-gpt", messages=MESSAGES, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks, "no chunks"
    for chunk in chunks:
        assert chunk.choices, f"chunk with empty choices reached the client: {chunk}"
        assert chunk.choices[0] is not None
        assert chunk.usage is None
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected_text(DEFAULT_TOKENS)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # the gateway asked the upstream for usage (to meter) even though the client did not
    bodies = await _upstream_bodies(mock_upstream, "/v1/chat/completions")
    assert bodies[-1]["stream"] is True
    assert bodies[-1]["stream_options"]["include_usage"] is True


# --------------------------------------------------------------------------- completions


async def test_completions_non_stream(openai_client: openai.AsyncOpenAI) -> None:
    completion = await openai_client.completions.create(
        model="mock-gpt", prompt="say four words", max_tokens=4
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text == expected_text(4)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 4)


async def test_completions_stream(
    openai_client: openai.AsyncOpenAI, mock_upstream: MockUpstream
) -> None:
    stream = await openai_client.completions.create(
        model="mock-gpt", prompt="hello", stream=True, extra_headers={"x-mock-tokens": "5"}
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks), "an empty-choices chunk reached the client"
    assert "".join(c.choices[0].text for c in chunks) == expected_text(5)
    assert chunks[-1].choices[0].finish_reason == "stop"
    bodies = await _upstream_bodies(mock_upstream, "/v1/completions")
    assert bodies[-1]["stream_options"]["include_usage"] is True


async def test_completions_stream_with_include_usage(openai_client: openai.AsyncOpenAI) -> None:
    stream = await openai_client.completions.create(
        model="mock-gpt",
        prompt="hello",
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-tokens": "3"},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert "".join(c.choices[0].text for c in chunks[:-1]) == expected_text(3)


# --------------------------------------------------------------------------- embeddings


async def test_embeddings_default_sdk_base64_decoded(
    openai_client: openai.AsyncOpenAI, mock_upstream: MockUpstream
) -> None:
    # No encoding_format: the SDK asks for base64 and decodes it itself.
    result = await openai_client.embeddings.create(model="mock-embed", input=["one", "two words"])
    assert [d.index for d in result.data] == [0, 1]
    assert result.data[0].embedding == pytest.approx(embedding_vector("one"))
    assert result.data[1].embedding == pytest.approx(embedding_vector("two words"))
    assert result.usage.prompt_tokens == 3
    bodies = await _upstream_bodies(mock_upstream, "/v1/embeddings")
    assert bodies[-1]["encoding_format"] == "base64"


async def test_embeddings_explicit_float(openai_client: openai.AsyncOpenAI) -> None:
    result = await openai_client.embeddings.create(
        model="mock-embed", input="hello", encoding_format="float", dimensions=4
    )
    vector = result.data[0].embedding
    assert isinstance(vector, list)
    assert len(vector) == 4
    assert vector == embedding_vector("hello", 4)


async def test_embeddings_explicit_base64(openai_client: openai.AsyncOpenAI) -> None:
    raw = await openai_client.embeddings.with_raw_response.create(
        model="mock-embed", input="hello", encoding_format="base64"
    )
    assert raw.status_code == 200
    payload = raw.http_response.json()
    encoded = payload["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = list(struct.unpack(f"<{DEFAULT_DIMENSIONS}f", base64.b64decode(encoded)))
    assert decoded == embedding_vector("hello")
    parsed = raw.parse()
    assert parsed.model == "mock-embed"


# --------------------------------------------------------------------------- responses


async def test_responses_non_stream(openai_client: openai.AsyncOpenAI) -> None:
    response = await openai_client.responses.create(
        model="mock-gpt", input="tell me a story", extra_headers={"x-mock-tokens": "4"}
    )
    assert response.status == "completed"
    assert response.output_text == expected_text(4)
    assert response.usage is not None
    assert response.usage.input_tokens == 4
    assert response.usage.output_tokens == 4


async def test_responses_stream(openai_client: openai.AsyncOpenAI) -> None:
    stream = await openai_client.responses.create(
        model="mock-gpt", input="hi", stream=True, extra_headers={"x-mock-tokens": "3"}
    )
    events = [event async for event in stream]
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[1] == "response.in_progress"
    assert types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 3
    assert "response.output_text.done" in types
    seqs = [e.sequence_number for e in events]
    assert seqs == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == expected_text(3)
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == expected_text(3)


# --------------------------------------------------------------------------- client errors


async def test_bad_key_is_authentication_error(gateway: RunningGateway) -> None:
    async with _client(gateway, "sk-not-a-key") as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model="mock-gpt", messages=MESSAGES)
    assert info.value.status_code == 401
    assert _error_field(info.value, "message")


async def test_forbidden_model_is_not_found(
    gateway: RunningGateway, mock_upstream: MockUpstream
) -> None:
    async with _client(gateway, OTHER_KEY) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.embeddings.create(model="mock-embed", input="x")
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert _error_field(info.value, "code") == "model_not_found"
    assert await _upstream_bodies(mock_upstream, "/v1/embeddings") == []


async def test_malformed_json_is_bad_request(
    openai_client: openai.AsyncOpenAI, mock_upstream: MockUpstream
) -> None:
    # A real SDK path: the low-level post() with raw bytes as content.
    with pytest.raises(openai.BadRequestError) as info:
        await openai_client.post(
            "/chat/completions",
            cast_to=ChatCompletion,
            content=b'{"model": "mock-gpt", "messages": [',
            options={"headers": {"Content-Type": "application/json"}},
        )
    assert info.value.status_code == 400
    assert _error_field(info.value, "type") == "invalid_request_error"
    assert isinstance(_error_field(info.value, "message"), str)
    assert await _upstream_bodies(mock_upstream, "/v1/chat/completions") == []


# --------------------------------------------------------------------------- stream failures


async def test_mid_stream_reset_raises_api_error(openai_client: openai.AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model="mock-gpt",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-reset-after": "3"},
    )
    text, error = await _read_until_error(stream)
    assert error is not None, "a reset upstream stream ended as a silent success"
    # The gateway ends the stream with an error event (not by dropping the connection).
    assert not isinstance(error, openai.APIConnectionError)
    assert isinstance(error.body, dict)
    assert error.message
    # role chunk + 2 tokens arrived before the reset
    assert text == expected_text(2)


async def test_flat_vllm_error_raises_api_error_with_message(
    openai_client: openai.AsyncOpenAI,
) -> None:
    stream = await openai_client.chat.completions.create(
        model="mock-gpt",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-vllm-error-after": "2"},
    )
    text, error = await _read_until_error(stream)
    assert error is not None, "a stream ending in a vLLM error object looked successful"
    assert not isinstance(error, openai.APIConnectionError)
    assert "mock vllm failure" in error.message
    assert text == expected_text(1)


async def test_keepalive_during_silence_reaches_sdk_intact(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(server={"sse_keepalive": "100ms"})
    async with _client(gateway) as client:
        stream = await client.chat.completions.create(
            model="mock-gpt",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-mock-silence-s": "0.5", "x-mock-silence-after": "2"},
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        # The same request read raw: keep-alive comment lines really were sent.
        async with client.chat.completions.with_streaming_response.create(
            model="mock-gpt",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-mock-silence-s": "0.5", "x-mock-silence-after": "2"},
        ) as raw:
            wire = b"".join([part async for part in raw.iter_bytes()])
    assert text == expected_text(DEFAULT_TOKENS)
    assert b": keep-alive\n" in wire
    assert b"\n\n\n" not in wire
    assert wire.rstrip().endswith(b"data: [DONE]")


# --------------------------------------------------------------------------- upstream auth


async def test_upstream_sees_upstream_key_never_client_key(
    openai_client: openai.AsyncOpenAI, mock_upstream: MockUpstream
) -> None:
    await openai_client.chat.completions.create(model="mock-gpt", messages=MESSAGES)
    stream = await openai_client.chat.completions.create(
        model="mock-gpt", messages=MESSAGES, stream=True
    )
    async for _ in stream:
        pass
    await openai_client.embeddings.create(model="mock-embed", input="x")
    await openai_client.models.list()
    logged = await mock_upstream.requests()
    assert len(logged) >= 4
    for entry in logged:
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        assert headers.get("authorization") == f"Bearer {UPSTREAM_KEY}", entry["path"]
        for name, value in entry["headers"].items():
            assert CLIENT_KEY not in value, f"client key leaked upstream in {name}"
            assert CLIENT_KEY not in name


# --------------------------------------------------------------------------- upstream errors


async def test_upstream_429_is_rate_limit_error(openai_client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        await openai_client.chat.completions.create(
            model="mock-gpt",
            messages=MESSAGES,
            extra_headers={"x-mock-status": "429", "x-mock-retry-after": "7"},
        )
    assert info.value.status_code == 429
    assert info.value.response.headers.get("retry-after") == "7"
    assert _error_field(info.value, "code") == "rate_limit_exceeded"


async def test_upstream_429_on_stream_is_rate_limit_error(openai_client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        await openai_client.chat.completions.create(
            model="mock-gpt",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-mock-status": "429", "x-mock-retry-after": "2"},
        )
    assert info.value.response.headers.get("retry-after") == "2"


async def test_upstream_500_text_body_is_openai_shaped(openai_client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await openai_client.chat.completions.create(
            model="mock-gpt",
            messages=MESSAGES,
            extra_headers={"x-mock-status": "500", "x-mock-error-body": "text"},
        )
    exc = info.value
    assert isinstance(exc, openai.APIStatusError)
    assert exc.status_code == 500
    body = exc.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert TEXT_ERROR_BODY in body["error"]["message"]
    assert exc.response.headers["content-type"].startswith("application/json")
