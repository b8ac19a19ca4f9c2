"""proxy/relay.py: request parsing, upstream bodies, error mapping, SSE error frames, and the
stream producer driven against the real mock upstream on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict
from openai._streaming import SSEDecoder

from proxy.config import load_settings
from proxy.errors import (
    GatewayError,
    InvalidRequestError,
    UpstreamError,
    UpstreamStatusError,
)
from proxy.relay import (
    CHAT,
    COMPLETIONS,
    DEFAULT_RETRY_AFTER_S,
    EMBEDDINGS,
    RESPONSES,
    Endpoint,
    StreamJob,
    error_frame,
    normalize_error_body,
    parse_inference,
    produce_stream,
    upstream_status_error,
)
from proxy.streams import StreamLog, StreamState
from proxy.upstream import Upstream
from tests.conftest import MockUpstream, base_config

TIMEOUT_S = 5.0
CHAT_BODY = {"model": "mock-gpt", "messages": [{"role": "user", "content": "say something nice"}]}


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def sse_payloads(frames: list[bytes]) -> list[str]:
    """The ``data`` of every event in ``frames``, decoded the way openai-python does."""
    return [event.data for event in SSEDecoder().iter_bytes(iter(frames))]


# --- parse_inference -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (b'"mock-gpt"', None, "invalid_json"),
        (b"{}", "model", "missing_required_parameter"),
        (b'{"model": ""}', "model", "missing_required_parameter"),
        (b'{"model": 7}', "model", "missing_required_parameter"),
        (b'{"model": null}', "model", "missing_required_parameter"),
        (b'{"model": "m", "stream": "true"}', "stream", "invalid_type"),
        (b'{"model": "m", "stream": 1}', "stream", "invalid_type"),
    ],
)
def test_parse_rejects_bad_bodies(raw: bytes, param: str | None, code: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_inference(CHAT, raw)
    err = info.value
    assert err.http_status == 400
    assert err.param == param
    assert err.code == code
    assert err.to_body()["error"]["type"] == "invalid_request_error"


def test_parse_rejects_stream_on_embeddings() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_inference(EMBEDDINGS, dumps({"model": "mock-embed", "input": "x", "stream": True}))
    assert info.value.http_status == 400
    assert info.value.param == "stream"
    assert "embeddings" in info.value.message


def test_parse_accepts_stream_false_on_embeddings() -> None:
    parsed = parse_inference(EMBEDDINGS, dumps({"model": "mock-embed", "input": "x", "stream": False}))
    assert parsed.stream is False


@pytest.mark.parametrize(
    ("body", "stream", "wants_usage"),
    [
        ({"model": "m"}, False, False),
        ({"model": "m", "stream": None}, False, False),
        ({"model": "m", "stream": True}, True, False),
        ({"model": "m", "stream": True, "stream_options": {"include_usage": True}}, True, True),
        ({"model": "m", "stream": True, "stream_options": {"include_usage": False}}, True, False),
        ({"model": "m", "stream": True, "stream_options": {"include_usage": 1}}, True, False),
    ],
)
def test_parse_reads_model_stream_and_usage_wish(body: dict[str, Any], stream: bool,
                                                 wants_usage: bool) -> None:
    raw = dumps(body)
    parsed = parse_inference(CHAT, raw)
    assert parsed.model == "m"
    assert parsed.stream is stream
    assert parsed.client_wants_usage is wants_usage
    assert parsed.raw is raw
    assert parsed.payload == body


# --- InferenceRequest.upstream_body ----------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "inject_usage"),
    [
        (CHAT, {"model": "m"}, True),  # not streamed
        (CHAT, {"model": "m", "stream": True}, False),  # injection turned off for the upstream
        (CHAT, {"model": "m", "stream": True, "stream_options": {"include_usage": True}}, True),
        (EMBEDDINGS, {"model": "m", "input": "x"}, True),
        (RESPONSES, {"model": "m", "input": "x", "stream": True}, True),  # no usage option
    ],
)
def test_upstream_body_is_the_received_bytes_when_nothing_to_do(
        endpoint: Endpoint, body: dict[str, Any], inject_usage: bool) -> None:
    # Odd spacing and key order would not survive a re-encode.
    rest = {k: v for k, v in body.items() if k != "stream"}
    raw = b'{ "stream" : ' + (b"true" if body.get("stream") else b"false") + b" , " + dumps(rest)[1:]
    assert orjson.loads(raw) == {"stream": bool(body.get("stream")), **rest}
    parsed = parse_inference(endpoint, raw)
    out, injected = parsed.upstream_body(inject_usage)
    assert out is raw
    assert injected is False


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
def test_upstream_body_injects_include_usage_for_streams(endpoint: Endpoint) -> None:
    parsed = parse_inference(endpoint, dumps({"model": "m", "stream": True, "temperature": 0.5}))
    out, injected = parsed.upstream_body(True)
    assert injected is True
    assert orjson.loads(out) == {"model": "m", "stream": True, "temperature": 0.5,
                                 "stream_options": {"include_usage": True}}


def test_upstream_body_keeps_existing_stream_options() -> None:
    parsed = parse_inference(CHAT, dumps({"model": "m", "stream": True,
                                          "stream_options": {"continuous_usage_stats": True}}))
    out, injected = parsed.upstream_body(True)
    assert injected is True
    assert orjson.loads(out)["stream_options"] == {"continuous_usage_stats": True,
                                                   "include_usage": True}


@pytest.mark.parametrize("field", ["api_base", "base_url"])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_body_removes_routing_overrides(field: str, stream: bool) -> None:
    body = {"model": "m", "stream": stream, field: "http://evil.example/v1", "n": 2}
    parsed = parse_inference(CHAT, dumps(body))
    out, injected = parsed.upstream_body(False)
    sent = orjson.loads(out)
    assert field not in sent
    assert sent == {"model": "m", "stream": stream, "n": 2}
    assert injected is False


def test_upstream_body_removes_overrides_and_injects_together() -> None:
    parsed = parse_inference(CHAT, dumps({"model": "m", "stream": True, "api_base": "x",
                                          "base_url": "y"}))
    out, injected = parsed.upstream_body(True)
    assert injected is True
    assert orjson.loads(out) == {"model": "m", "stream": True,
                                 "stream_options": {"include_usage": True}}


# --- normalize_error_body ----------------------------------------------------------------------


def test_normalize_fills_in_nested_error() -> None:
    body = {"error": {"message": "bad temperature", "type": "invalid_request_error",
                      "param": "temperature", "code": "bad_value"}}
    assert normalize_error_body(body) == body
    assert normalize_error_body({"error": {}}) == {"error": {
        "message": "upstream error", "type": "upstream_error", "param": None, "code": None}}


def test_normalize_wraps_string_error() -> None:
    assert normalize_error_body({"error": "model overloaded"}) == {"error": {
        "message": "model overloaded", "type": "upstream_error", "param": None, "code": None}}


def test_normalize_flat_vllm_error() -> None:
    flat = {"object": "error", "message": "mock vllm failure", "type": "BadRequestError",
            "param": None, "code": 400}
    assert normalize_error_body(flat) == {"error": {
        "message": "mock vllm failure", "type": "BadRequestError", "param": None, "code": 400}}


@pytest.mark.parametrize("obj", [
    None, "error", ["error"], 3, {}, {"object": "chat.completion.chunk", "choices": []},
    {"error": None}, {"message": "hi"},
])
def test_normalize_returns_none_for_non_errors(obj: object) -> None:
    assert normalize_error_body(obj) is None


# --- upstream_status_error ----------------------------------------------------------------------


@pytest.fixture
def offline_upstream() -> Upstream:
    settings = load_settings(base_config("http://127.0.0.1:9/v1"), env={})
    return Upstream("mock", settings.upstreams["mock"])


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_auth_failure_is_502_not_the_clients_fault(offline_upstream: Upstream,
                                                            status: int) -> None:
    body = dumps({"error": {"message": "Incorrect API key provided: sk-up***", "type": "x",
                            "code": "invalid_api_key"}})
    err = upstream_status_error(offline_upstream, status, body, None)
    assert err.http_status == 502
    assert err.code == f"upstream_{status}"
    assert "Incorrect API key" not in err.message  # the upstream's message is not relayed
    assert "credentials" in err.message


@pytest.mark.parametrize("status", [301, 302, 307])
def test_upstream_redirect_is_502(offline_upstream: Upstream, status: int) -> None:
    err = upstream_status_error(offline_upstream, status, b"", None)
    assert err.http_status == 502
    assert err.code == f"upstream_{status}"
    assert "redirected" in err.message


def test_text_error_body_is_wrapped_with_excerpt(offline_upstream: Upstream) -> None:
    err = upstream_status_error(offline_upstream, 500, b"upstream exploded\n", None)
    assert err.http_status == 500
    error = err.to_body()["error"]
    assert error["code"] == "upstream_500"
    assert error["type"] == "upstream_error"
    assert "upstream exploded" in error["message"]
    assert "HTTP 500" in error["message"]


def test_long_text_error_body_excerpt_is_short(offline_upstream: Upstream) -> None:
    err = upstream_status_error(offline_upstream, 502, b"<html>" + b"x" * 5000, None)
    assert len(err.to_body()["error"]["message"]) < 300


def test_429_without_retry_after_gets_retry_hints(offline_upstream: Upstream) -> None:
    body = dumps({"error": {"message": "slow down", "type": "requests",
                            "code": "rate_limit_exceeded"}})
    err = upstream_status_error(offline_upstream, 429, body, None)
    assert err.http_status == 429
    assert err.retry_after_s == DEFAULT_RETRY_AFTER_S
    assert err.headers() == {"retry-after": "1", "retry-after-ms": "1000"}
    assert err.to_body()["error"]["message"] == "slow down"


def test_503_without_retry_after_gets_retry_hints(offline_upstream: Upstream) -> None:
    err = upstream_status_error(offline_upstream, 503, b"", None)
    assert err.http_status == 503
    assert "retry-after" in err.headers()


def test_upstream_retry_after_seconds_pass_through(offline_upstream: Upstream) -> None:
    err = upstream_status_error(offline_upstream, 429, b"", "7")
    assert err.headers() == {"retry-after": "7", "retry-after-ms": "7000"}


def test_retry_after_http_date_falls_back_to_default(offline_upstream: Upstream) -> None:
    err = upstream_status_error(offline_upstream, 429, b"", "Wed, 21 Oct 2015 07:28:00 GMT")
    assert err.retry_after_s == DEFAULT_RETRY_AFTER_S


@pytest.mark.parametrize("value", ["inf", "1e999", "nan", "-5"])
def test_non_finite_or_negative_retry_after_still_gives_usable_headers(
        offline_upstream: Upstream, value: str) -> None:
    # An upstream's Retry-After must never make the client's error answer unbuildable.
    err = upstream_status_error(offline_upstream, 429, b"", value)
    headers = err.headers()
    assert int(headers["retry-after"]) >= 0
    assert int(headers["retry-after-ms"]) >= 0


def test_400_keeps_status_and_body(offline_upstream: Upstream) -> None:
    upstream_body = {"error": {"message": "max_tokens is too large", "type": "invalid_request_error",
                               "param": "max_tokens", "code": "bad_value"}}
    err = upstream_status_error(offline_upstream, 400, dumps(upstream_body), None)
    assert isinstance(err, UpstreamStatusError)
    assert err.http_status == 400
    assert err.to_body() == upstream_body
    assert err.headers() == {}


def test_flat_vllm_error_body_is_normalized(offline_upstream: Upstream) -> None:
    flat = {"object": "error", "message": "context too long", "type": "BadRequestError",
            "param": None, "code": 400}
    err = upstream_status_error(offline_upstream, 400, dumps(flat), None)
    assert err.http_status == 400
    assert err.to_body()["error"]["message"] == "context too long"


# --- error_frame -------------------------------------------------------------------------------


def test_error_frame_is_one_sse_data_event_with_the_error_object() -> None:
    err = UpstreamError("Upstream mock closed the connection\nmid-response.")
    frame = error_frame(err)
    assert frame.startswith(b'data: {"error":')
    assert frame.endswith(b"\n\n")
    assert frame.count(b"\n\n") == 1
    events = list(SSEDecoder().iter_bytes(iter([frame])))
    assert len(events) == 1
    assert events[0].event is None
    assert orjson.loads(events[0].data) == err.to_body()


# --- produce_stream against the mock upstream --------------------------------------------------


@pytest.fixture
async def upstream(mock_upstream: MockUpstream) -> AsyncIterator[Upstream]:
    settings = load_settings(base_config(mock_upstream.base_url), env={})
    up = Upstream("mock", settings.upstreams["mock"])
    await up.start()
    yield up
    await up.close()


def make_job(upstream: Upstream, body: dict[str, Any], headers: dict[str, str] | None = None,
             endpoint: Endpoint = CHAT) -> StreamJob:
    parsed = parse_inference(endpoint, dumps({**body, "stream": True}))
    raw, injected = parsed.upstream_body(upstream.config.inject_stream_usage)
    return StreamJob(upstream, parsed, raw, injected, CIMultiDict(headers or {}),
                     StreamLog("gs_test", "tester"))


async def run(job: StreamJob) -> None:
    await asyncio.wait_for(produce_stream(job), TIMEOUT_S)


async def test_stream_ends_in_done_with_usage_metered_and_injected_chunk_dropped(
        upstream: Upstream, mock_upstream: MockUpstream) -> None:
    job = make_job(upstream, CHAT_BODY)
    assert job.injected_usage is True
    await run(job)
    log = job.log
    assert log.state is StreamState.DONE
    assert log.error is None
    payloads = sse_payloads(log.frames)
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert len(chunks) == 1 + 8  # role chunk + one per token (DEFAULT_TOKENS)
    assert all(c["choices"] for c in chunks)  # the injected choices: [] chunk never reaches the log
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks).startswith("alpha bravo")
    assert job.metering.usage == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    sent = (await mock_upstream.requests())[-1]
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert upstream.pool_stats() == {"in_use": 0, "idle": 1}  # clean end: connection pooled


async def test_stream_keeps_usage_chunk_the_client_asked_for(upstream: Upstream) -> None:
    job = make_job(upstream, {**CHAT_BODY, "stream_options": {"include_usage": True}})
    assert job.injected_usage is False
    await run(job)
    payloads = sse_payloads(job.log.frames)
    assert payloads[-1] == "[DONE]"
    usage_chunk = orjson.loads(payloads[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == job.metering.usage
    assert job.metering.usage is not None


async def test_stream_frames_carry_the_upstream_order(upstream: Upstream) -> None:
    job = make_job(upstream, CHAT_BODY, {"x-mock-tokens": "3"})
    await run(job)
    chunks = [orjson.loads(p) for p in sse_payloads(job.log.frames)[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["", "alpha ", "bravo ", "charlie "]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_reset_mid_stream_fails_log_with_error_frame_last(upstream: Upstream) -> None:
    job = make_job(upstream, CHAT_BODY, {"x-mock-reset-after": "3"})
    await run(job)
    log = job.log
    assert log.state is StreamState.FAILED
    assert log.error is None  # frames were sent, so the error travels in the stream
    payloads = sse_payloads(log.frames)
    assert len(payloads) == 4  # three upstream chunks, then the error event
    assert "[DONE]" not in payloads
    error = orjson.loads(payloads[-1])["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "upstream_connection_error"
    assert upstream.pool_stats()["in_use"] == 0


async def test_vllm_error_mid_stream_ends_log_with_normalized_error(upstream: Upstream) -> None:
    job = make_job(upstream, CHAT_BODY, {"x-mock-vllm-error-after": "2"})
    await run(job)
    log = job.log
    assert log.state is StreamState.FAILED
    payloads = sse_payloads(log.frames)
    assert len(payloads) == 3
    assert orjson.loads(payloads[-1]) == {"error": {
        "message": "mock vllm failure", "type": "BadRequestError", "param": None, "code": 400}}


async def test_upstream_500_before_first_byte_sets_log_error_and_no_frames(
        upstream: Upstream) -> None:
    job = make_job(upstream, CHAT_BODY, {"x-mock-status": "500"})
    await run(job)
    log = job.log
    assert log.state is StreamState.FAILED
    assert log.frames == []
    assert isinstance(log.error, GatewayError)
    assert log.error.http_status == 500
    assert log.error.to_body()["error"]["type"] == "server_error"
    assert upstream.pool_stats()["in_use"] == 0


async def test_upstream_429_before_first_byte_keeps_retry_after(upstream: Upstream) -> None:
    job = make_job(upstream, CHAT_BODY, {"x-mock-status": "429", "x-mock-retry-after": "3"})
    await run(job)
    assert isinstance(job.log.error, GatewayError)
    assert job.log.error.http_status == 429
    assert job.log.error.headers()["retry-after"] == "3"


async def test_responses_stream_ends_without_done(upstream: Upstream) -> None:
    job = make_job(upstream, {"model": "mock-gpt", "input": "hello there"}, endpoint=RESPONSES)
    await run(job)
    log = job.log
    assert log.state is StreamState.DONE
    payloads = sse_payloads(log.frames)
    assert "[DONE]" not in payloads
    assert orjson.loads(payloads[-1])["type"] == "response.completed"
    assert job.metering.usage is not None


async def wait_for_stat(mock: MockUpstream, name: str, value: int) -> None:
    """Poll the mock's counters until ``name == value`` (the upstream sees a disconnect a
    moment after the client side closes it)."""
    for _ in range(int(TIMEOUT_S / 0.01)):
        if (await mock.stats())[name] == value:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"mock upstream {name} never reached {value}: {await mock.stats()}")


async def start_slow_stream(upstream: Upstream) -> tuple[StreamJob, asyncio.Task[None]]:
    """A producer that is mid-stream (two frames in) on a long, slow generation."""
    job = make_job(upstream, CHAT_BODY, {"x-mock-tokens": "1000", "x-mock-token-delay-ms": "20"})
    task = asyncio.create_task(produce_stream(job))
    async with asyncio.timeout(TIMEOUT_S):
        await job.log.wait(2)
    return job, task


async def test_pool_counts_the_connection_of_a_running_stream(upstream: Upstream) -> None:
    _, task = await start_slow_stream(upstream)
    try:
        assert upstream.pool_stats() == {"in_use": 1, "idle": 0}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_cancelling_producer_mid_stream_frees_the_pool(
        upstream: Upstream, mock_upstream: MockUpstream) -> None:
    job, task = await start_slow_stream(upstream)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert job.log.state is StreamState.FAILED
    assert b"[DONE]" not in b"".join(job.log.frames)
    assert upstream.pool_stats() == {"in_use": 0, "idle": 0}  # closed, not pooled half-read
    await wait_for_stat(mock_upstream, "streams_cancelled", 1)  # the generation stopped
    assert (await mock_upstream.stats())["open_streams"] == 0
