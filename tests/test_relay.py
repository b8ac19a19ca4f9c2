"""proxy/relay.py: request parsing, upstream bodies, error mapping, SSE error frames, the
Dispatcher (failover, retries, budget, cooldown, slots) and the stream producer, driven
against real mock upstreams on loopback."""

from __future__ import annotations

import asyncio
import random
import socket
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from openai._streaming import SSEDecoder

from proxy.admission import Admission, SlotLimits
from proxy.balancer import Balancer, DeploymentSpec, RetryBudget
from proxy.config import RetryConfig, UpstreamConfig, load_settings
from proxy.errors import (
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    RateLimitError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamStatusError,
)
from proxy.relay import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    Dispatcher,
    Endpoint,
    Route,
    StreamJob,
    UnaryResult,
    parse_inference,
    produce_stream,
    send_unary,
)
from proxy.streams import StreamLog, StreamState, error_frame
from proxy.upstream import (
    DEFAULT_RETRY_AFTER_S,
    Upstream,
    normalize_error_body,
    upstream_status_error,
)
from scripts.mock_upstream import MockConfig, create_app
from tests.conftest import MockUpstream, base_config, merge

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
    assert parsed.head.model == "m"


def test_parse_does_not_build_the_fields_it_does_not_read() -> None:
    """A body of 3.4 million empty messages decodes to its few read fields, not to millions
    of dicts: the peak of Python allocations stays a tiny fraction of the body's size."""
    raw = b'{"model":"m","messages":[' + b",".join([b"{}"] * 3_400_000) + b'],"stream":true}'
    tracemalloc.start()
    try:
        parsed = parse_inference(CHAT, raw)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (parsed.model, parsed.stream) == ("m", True)
    assert peak_bytes < len(raw) // 100, peak_bytes


def test_upstream_body_rewrites_only_the_top_level() -> None:
    """Injecting include_usage copies every other value as the raw JSON it was (spacing,
    key order and number spelling inside it untouched)."""
    raw = b'{"model":"m","stream":true,"messages":[{ "role" : "user", "content":"1.50e1" , "x": 1.50}]}'
    out, injected = parse_inference(CHAT, raw).upstream_body(True)
    assert injected is True
    assert b'[{ "role" : "user", "content":"1.50e1" , "x": 1.50}]' in out
    assert orjson.loads(out)["stream_options"] == {"include_usage": True}


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


# --- a cluster of real upstreams for the Dispatcher ---------------------------------------------

ANY = ("*",)
MODEL = "mock-gpt"
ROUTE = Route(MODEL, ANY)


class FakeClock:
    """The balancer's clock (cooldowns, ejections); moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """``DispatchEvents`` that remembers every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def count_retry(self, upstream: str, reason: str) -> None:
        self.calls.append(("retry", upstream, reason))

    def count_upstream_error(self, upstream: str, kind: str) -> None:
        self.calls.append(("error", upstream, kind))

    def count_ejection(self, upstream: str) -> None:
        self.calls.append(("ejection", upstream))

    def count_retry_budget_exhausted(self) -> None:
        self.calls.append(("budget_exhausted",))

    def of(self, kind: str) -> list[tuple[str, ...]]:
        return [call for call in self.calls if call[0] == kind]


def closed_port_url() -> str:
    """A loopback URL nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@dataclass
class Cluster:
    """Deployments of ``mock-gpt``: each a real ``Upstream`` (started here, closed by the
    fixture) on its own mock server or on a closed port, plus the Dispatcher over them."""

    aiohttp_server: Callable[..., Awaitable[TestServer]]
    clock: FakeClock = field(default_factory=FakeClock)
    events: Recorder = field(default_factory=Recorder)
    mocks: dict[str, MockUpstream] = field(default_factory=dict)
    upstreams: dict[str, Upstream] = field(default_factory=dict)

    async def add(self, name: str, mock: MockConfig | MockUpstream | None = None,
                  **overrides: Any) -> Upstream:
        """``mock``: a config for a new mock server, a running one, or ``None`` for a
        closed port. ``overrides``: ``upstreams.<name>`` keys (priority, weight, ...)."""
        if mock is None:
            url = closed_port_url()
        else:
            if isinstance(mock, MockConfig):
                server = await self.aiohttp_server(create_app(mock))
                mock = MockUpstream(server, str(server.make_url("/v1")))
            self.mocks[name] = mock
            url = mock.base_url
        config = UpstreamConfig.model_validate(merge(base_config(url)["upstreams"]["mock"], overrides))
        upstream = self.upstreams[name] = Upstream(name, config)
        await upstream.start()
        return upstream

    def dispatcher(self, attempts: int = 3, budget: RetryBudget | None = None,
                   seed: int = 1) -> Dispatcher:
        configs = {name: up.config for name, up in self.upstreams.items()}
        admission = Admission({name: SlotLimits(c.slots, c.max_queue, c.queue_timeout_s)
                               for name, c in configs.items()})
        specs = {name: DeploymentSpec(name, c.models, c.priority, c.weight,
                                      c.health_check.healthy_threshold,
                                      c.health_check.unhealthy_threshold,
                                      c.outlier_detection.consecutive_failures,
                                      c.outlier_detection.base_ejection_s,
                                      c.outlier_detection.max_ejection_s)
                 for name, c in configs.items()}
        balancer = Balancer(specs, {}, 50.0, in_flight=admission.in_flight, clock=self.clock,
                            rng=random.Random(seed))
        retry = RetryConfig(attempts=attempts, backoff_base=0, backoff_max=0)
        return Dispatcher(self.upstreams, balancer, admission, retry,
                          budget if budget is not None else RetryBudget(), self.events)

    async def requests(self, name: str) -> int:
        """``/v1`` requests the mock behind ``name`` received."""
        return int((await self.mocks[name].stats())["requests"])

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()


@pytest.fixture
async def cluster(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> AsyncIterator[Cluster]:
    cluster = Cluster(aiohttp_server)
    yield cluster
    await cluster.close()


FAILING_503 = MockConfig(fail_status=503)
#: Outweighs a weight-1 deployment on an idle pick, so it is always tried first.
FIRST = {"weight": 100}


def unary(headers: dict[str, str] | None = None, calls: list[str] | None = None
          ) -> Callable[[Upstream, float], Awaitable[UnaryResult]]:
    """An attempt that sends the chat body on the upstream's pool (what the pipeline does)."""
    body = dumps(CHAT_BODY)

    async def attempt(upstream: Upstream, deadline: float) -> UnaryResult:
        if calls is not None:
            calls.append(upstream.name)
        return await send_unary(upstream, deadline, "POST", "/chat/completions", body,
                                CIMultiDict(headers or {}))

    return attempt


def scripted(outcomes: list[BaseException | None], calls: list[str]
             ) -> Callable[[Upstream, float], Awaitable[str]]:
    """An attempt that raises the next scripted error, or returns the upstream's name."""
    script = iter(outcomes)

    async def attempt(upstream: Upstream, deadline: float) -> str:
        calls.append(upstream.name)
        outcome = next(script)
        if outcome is not None:
            raise outcome
        return upstream.name

    return attempt


def status_error(status: int) -> UpstreamStatusError:
    return UpstreamStatusError(status, {"error": {"message": f"HTTP {status}"}})


def stale() -> UpstreamConnectionError:
    return UpstreamConnectionError("Upstream closed a pooled connection.", stale=True)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (every 5 ms, at most ``TIMEOUT_S``)."""
    for _ in range(int(TIMEOUT_S / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"never happened: {what}")


def assert_all_released(dispatcher: Dispatcher) -> None:
    admission = dispatcher.admission
    assert [admission.in_flight(n) for n in dispatcher.upstreams] == [0] * len(dispatcher.upstreams)
    assert admission.queue_depth == 0
    assert dispatcher.budget.requests == 0


# --- Dispatcher -----------------------------------------------------------------------------


async def test_dispatch_success_on_the_first_deployment(cluster: Cluster) -> None:
    await cluster.add("a", MockConfig(), **FIRST)
    await cluster.add("b", MockConfig())
    dispatcher = cluster.dispatcher()
    result = await dispatcher.run(ROUTE, unary())
    assert result.status == 200
    assert result.usage is not None
    assert (await cluster.requests("a"), await cluster.requests("b")) == (1, 0)
    assert cluster.events.calls == []
    assert_all_released(dispatcher)
    assert dispatcher.budget.retries == 0


async def test_dispatch_503_fails_over_to_another_deployment(cluster: Cluster) -> None:
    await cluster.add("a", FAILING_503, **FIRST)
    await cluster.add("b", MockConfig())
    dispatcher = cluster.dispatcher()
    calls: list[str] = []
    result = await dispatcher.run(ROUTE, unary(calls=calls))
    assert result.status == 200
    assert calls == ["a", "b"]
    assert (await cluster.requests("a"), await cluster.requests("b")) == (1, 1)
    assert cluster.events.calls == [("error", "a", "http_503"), ("retry", "a", "http_503")]
    assert dispatcher.balancer.health["a"].consecutive_failures == 1  # a 5xx counts as a failure
    assert dispatcher.balancer.health["b"].consecutive_failures == 0
    assert_all_released(dispatcher)
    assert dispatcher.budget.retries == 0


async def test_dispatch_fails_over_to_the_next_priority_tier(cluster: Cluster) -> None:
    await cluster.add("primary", FAILING_503, priority=0)
    await cluster.add("backup", MockConfig(), priority=1)
    dispatcher = cluster.dispatcher()
    calls: list[str] = []
    assert (await dispatcher.run(ROUTE, unary(calls=calls))).status == 200
    assert calls == ["primary", "backup"]


async def test_dispatch_400_is_not_retried(cluster: Cluster) -> None:
    await cluster.add("a", MockConfig(), **FIRST)
    await cluster.add("b", MockConfig())
    dispatcher = cluster.dispatcher()
    with pytest.raises(UpstreamStatusError) as info:
        await dispatcher.run(ROUTE, unary({"x-mock-status": "400"}))
    err = info.value
    assert err.http_status == 400
    assert err.should_retry is None  # nothing was retried: the client decides
    assert (await cluster.requests("a"), await cluster.requests("b")) == (1, 0)
    assert cluster.events.of("retry") == []
    assert dispatcher.balancer.health["a"].consecutive_failures == 0  # the client's fault
    assert_all_released(dispatcher)


async def test_dispatch_gives_up_after_all_attempts_with_should_retry_false(cluster: Cluster) -> None:
    await cluster.add("a", FAILING_503, **FIRST)
    await cluster.add("b", FAILING_503)
    dispatcher = cluster.dispatcher(attempts=3)
    calls: list[str] = []
    with pytest.raises(UpstreamStatusError) as info:
        await dispatcher.run(ROUTE, unary(calls=calls))
    err = info.value
    assert err.http_status == 503
    assert err.should_retry is False
    assert err.headers()["x-should-retry"] == "false"
    assert len(calls) == 3
    assert calls[:2] == ["a", "b"]
    assert await cluster.requests("a") + await cluster.requests("b") == 3
    assert len(cluster.events.of("retry")) == 2
    assert_all_released(dispatcher)
    assert dispatcher.budget.retries == 0


async def test_dispatch_retry_budget_exhausted_means_no_retry(cluster: Cluster) -> None:
    # Only one deployment: a retry would go back to the one that failed, so it needs the budget.
    await cluster.add("a", FAILING_503)
    budget = RetryBudget(percent=0.0, minimum=0)
    dispatcher = cluster.dispatcher(budget=budget)
    with pytest.raises(UpstreamStatusError) as info:
        await dispatcher.run(ROUTE, unary())
    assert info.value.http_status == 503
    assert info.value.should_retry is False
    assert budget.exhausted == 1
    assert cluster.events.of("budget_exhausted") == [("budget_exhausted",)]
    assert cluster.events.of("retry") == []
    assert await cluster.requests("a") == 1
    assert_all_released(dispatcher)


async def test_dispatch_failover_to_an_untried_deployment_needs_no_budget(cluster: Cluster) -> None:
    # Failing over cannot hammer the deployment that failed, so a spent budget allows it.
    await cluster.add("a", FAILING_503, **FIRST)
    await cluster.add("b", MockConfig())
    budget = RetryBudget(percent=0.0, minimum=0)
    dispatcher = cluster.dispatcher(budget=budget)
    assert (await dispatcher.run(ROUTE, unary())).status == 200
    assert budget.exhausted == 0
    assert budget.retries == 0
    assert (await cluster.requests("a"), await cluster.requests("b")) == (1, 1)
    assert_all_released(dispatcher)


async def test_dispatch_429_cools_the_deployment_down_and_fails_over(cluster: Cluster) -> None:
    await cluster.add("a", MockConfig(fail_status=429, retry_after="30"), **FIRST)
    await cluster.add("b", MockConfig())
    dispatcher = cluster.dispatcher()
    calls: list[str] = []
    assert (await dispatcher.run(ROUTE, unary(calls=calls))).status == 200
    assert calls == ["a", "b"]
    balancer = dispatcher.balancer
    assert balancer.status("a") == "cooldown"
    assert balancer.candidates(MODEL, ANY) == ["b"]
    assert balancer.health["a"].consecutive_failures == 0  # rate limited, not broken
    assert cluster.events.of("retry") == [("retry", "a", "http_429")]
    # The next request goes straight to b.
    calls.clear()
    await dispatcher.run(ROUTE, unary(calls=calls))
    assert calls == ["b"]
    cluster.clock.now += 30.1
    assert balancer.candidates(MODEL, ANY) == ["a", "b"]
    assert_all_released(dispatcher)


async def test_dispatch_connection_refused_fails_over(cluster: Cluster) -> None:
    await cluster.add("down", None, **FIRST)
    await cluster.add("up", MockConfig())
    dispatcher = cluster.dispatcher()
    calls: list[str] = []
    assert (await dispatcher.run(ROUTE, unary(calls=calls))).status == 200
    assert calls == ["down", "up"]
    assert cluster.events.calls[:2] == [("error", "down", "upstream_connection_error"),
                                        ("retry", "down", "upstream_connection_error")]
    assert dispatcher.balancer.health["down"].consecutive_failures == 1
    assert_all_released(dispatcher)


async def test_dispatch_ejects_after_consecutive_failures(cluster: Cluster) -> None:
    await cluster.add("down", None, outlier_detection={"consecutive_failures": 2}, **FIRST)
    await cluster.add("up", MockConfig())
    dispatcher = cluster.dispatcher()
    for _ in range(2):
        await dispatcher.run(ROUTE, unary())
    assert dispatcher.balancer.status("down") == "ejected"
    assert cluster.events.of("ejection") == [("ejection", "down")]
    calls: list[str] = []
    await dispatcher.run(ROUTE, unary(calls=calls))
    assert calls == ["up"]


async def test_dispatch_with_nothing_available_is_503_no_healthy_upstream(cluster: Cluster) -> None:
    await cluster.add("a", MockConfig(), health_check={"unhealthy_threshold": 1})
    dispatcher = cluster.dispatcher()
    dispatcher.balancer.record_probe("a", False)
    calls: list[str] = []
    with pytest.raises(OverloadedError) as info:
        await dispatcher.run(ROUTE, unary(calls=calls))
    assert info.value.code == "no_healthy_upstream"
    assert calls == []
    with pytest.raises(ModelNotFoundError):
        await dispatcher.run(Route(MODEL, ("other-*",)), unary(calls=calls))
    assert calls == []
    assert_all_released(dispatcher)


async def test_dispatch_stale_connection_is_retried_once_without_counting_a_retry(
        cluster: Cluster) -> None:
    await cluster.add("a", MockConfig())
    dispatcher = cluster.dispatcher(attempts=1)  # no retries at all: the stale redo is free
    calls: list[str] = []
    real = unary()

    async def attempt(upstream: Upstream, deadline: float) -> UnaryResult:
        calls.append(upstream.name)
        if len(calls) == 1:
            raise stale()
        return await real(upstream, deadline)

    assert (await dispatcher.run(ROUTE, attempt)).status == 200
    assert calls == ["a", "a"]
    assert await cluster.requests("a") == 1
    assert cluster.events.of("retry") == []
    assert dispatcher.budget.retries == 0
    assert dispatcher.balancer.health["a"].consecutive_failures == 0  # not the upstream's fault
    assert_all_released(dispatcher)


async def test_dispatch_stale_connection_is_retried_only_once(cluster: Cluster) -> None:
    await cluster.add("a", MockConfig())
    dispatcher = cluster.dispatcher(attempts=1)
    calls: list[str] = []
    with pytest.raises(UpstreamConnectionError):
        await dispatcher.run(ROUTE, scripted([stale(), stale(), None], calls))
    assert calls == ["a", "a"]
    assert_all_released(dispatcher)


async def test_dispatch_stale_connection_is_retried_on_the_same_deployment(cluster: Cluster) -> None:
    await cluster.add("a", MockConfig())
    await cluster.add("b", MockConfig())
    dispatcher = cluster.dispatcher(attempts=1, seed=3)
    for _ in range(12):
        calls: list[str] = []
        await dispatcher.run(ROUTE, scripted([stale(), None], calls))
        assert calls[1] == calls[0], f"stale retry moved from {calls[0]} to {calls[1]}"
    assert_all_released(dispatcher)


async def test_dispatch_stale_redo_of_a_retry_returns_the_retry_to_the_budget_once(
        cluster: Cluster) -> None:
    await cluster.add("a", MockConfig(), **FIRST)
    await cluster.add("b", MockConfig())
    budget = RetryBudget(percent=0.0, minimum=5)
    dispatcher = cluster.dispatcher(budget=budget)
    assert budget.try_retry()  # a retry some other request has in flight
    calls: list[str] = []
    result = await dispatcher.run(ROUTE, scripted([status_error(503), stale(), None], calls))
    assert result == "b"
    assert calls == ["a", "b", "b"]
    assert budget.retries == 1  # only the other request's retry is still in flight


async def test_dispatch_retry_with_nowhere_to_go_returns_the_retry_to_the_budget(
        cluster: Cluster) -> None:
    await cluster.add("only", MockConfig(fail_status=429, retry_after="30"))
    budget = RetryBudget(percent=0.0, minimum=3)
    dispatcher = cluster.dispatcher(budget=budget)
    with pytest.raises(UpstreamStatusError) as info:
        await dispatcher.run(ROUTE, unary())
    assert info.value.http_status == 429  # the real error, not "no healthy upstream"
    assert info.value.retry_after_s == 30.0
    assert await cluster.requests("only") == 1
    assert_all_released(dispatcher)
    assert budget.retries == 0  # no retry is in flight any more


async def test_dispatch_cancelled_mid_attempt_frees_slot_and_connection(cluster: Cluster) -> None:
    upstream = await cluster.add("a", MockConfig(ttft_ms=10_000))
    dispatcher = cluster.dispatcher()
    task = asyncio.create_task(dispatcher.run(ROUTE, unary()))
    await until(lambda: upstream.pool_stats()["in_use"] == 1, "request sent")
    assert dispatcher.admission.in_flight("a") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_all_released(dispatcher)
    assert dispatcher.budget.retries == 0
    assert upstream.pool_stats()["in_use"] == 0


async def test_dispatch_cancelled_while_queued_for_a_retry_releases_everything(
        cluster: Cluster) -> None:
    await cluster.add("a", MockConfig(), priority=0, max_in_flight=1)
    await cluster.add("b", MockConfig(), priority=1, max_in_flight=1, max_queue=5,
                      queue_timeout="10s")
    dispatcher = cluster.dispatcher()
    admission = dispatcher.admission
    assert admission.try_acquire(["b"], lambda free: free[0]) == "b"  # another request holds b
    calls: list[str] = []
    task = asyncio.create_task(dispatcher.run(ROUTE, scripted([status_error(503), None], calls)))
    await until(lambda: admission.queue_depth == 1, "the retry waits for b")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == ["a"]
    assert (admission.in_flight("a"), admission.in_flight("b"), admission.queue_depth) == (0, 1, 0)
    assert dispatcher.budget.requests == 0
    assert dispatcher.budget.retries == 0  # the retry it took is back in the budget


async def test_dispatch_failure_of_a_non_gateway_error_still_releases(cluster: Cluster) -> None:
    await cluster.add("a", MockConfig())
    dispatcher = cluster.dispatcher()

    async def attempt(upstream: Upstream, deadline: float) -> None:
        raise RuntimeError("bug in the attempt")

    with pytest.raises(RuntimeError):
        await dispatcher.run(ROUTE, attempt)
    assert_all_released(dispatcher)


async def test_dispatch_queues_for_a_busy_deployment_and_runs_when_it_frees(cluster: Cluster) -> None:
    await cluster.add("a", MockConfig(), max_in_flight=1, max_queue=2, queue_timeout="5s")
    dispatcher = cluster.dispatcher()
    admission = dispatcher.admission
    admission.try_acquire(["a"], lambda free: free[0])
    task = asyncio.create_task(dispatcher.run(ROUTE, unary()))
    await until(lambda: admission.queue_depth == 1, "queued")
    admission.release("a")
    assert (await asyncio.wait_for(task, TIMEOUT_S)).status == 200
    assert_all_released(dispatcher)


# --- produce_stream against the mock upstream --------------------------------------------------


@pytest.fixture
async def upstream(cluster: Cluster, mock_upstream: MockUpstream) -> Upstream:
    return await cluster.add("mock", mock_upstream)


@pytest.fixture
def dispatcher(cluster: Cluster, upstream: Upstream) -> Dispatcher:
    return cluster.dispatcher()


def make_job(body: dict[str, Any], headers: dict[str, str] | None = None,
             endpoint: Endpoint = CHAT, log: StreamLog | None = None) -> StreamJob:
    parsed = parse_inference(endpoint, dumps({**body, "stream": True}))
    return StreamJob(parsed, Route(parsed.model, ANY), CIMultiDict(headers or {}),
                     log if log is not None else StreamLog("gs_test", "tester"))


async def run(job: StreamJob, dispatcher: Dispatcher) -> None:
    await asyncio.wait_for(produce_stream(job, dispatcher), TIMEOUT_S)


async def test_stream_ends_in_done_with_usage_metered_and_injected_chunk_dropped(
        upstream: Upstream, dispatcher: Dispatcher, mock_upstream: MockUpstream) -> None:
    job = make_job(CHAT_BODY)
    await run(job, dispatcher)
    assert job.injected_usage is True
    assert job.upstream is upstream
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
    assert job.metering.events == 9
    sent = (await mock_upstream.requests())[-1]
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert upstream.pool_stats() == {"in_use": 0, "idle": 1}  # clean end: connection pooled
    assert_all_released(dispatcher)


async def test_stream_keeps_usage_chunk_the_client_asked_for(dispatcher: Dispatcher) -> None:
    job = make_job({**CHAT_BODY, "stream_options": {"include_usage": True}})
    await run(job, dispatcher)
    assert job.injected_usage is False
    payloads = sse_payloads(job.log.frames)
    assert payloads[-1] == "[DONE]"
    usage_chunk = orjson.loads(payloads[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == job.metering.usage
    assert job.metering.usage is not None


async def test_stream_frames_carry_the_upstream_order(dispatcher: Dispatcher) -> None:
    job = make_job(CHAT_BODY, {"x-mock-tokens": "3"})
    await run(job, dispatcher)
    chunks = [orjson.loads(p) for p in sse_payloads(job.log.frames)[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["", "alpha ", "bravo ", "charlie "]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_reset_mid_stream_fails_log_with_error_frame_last_and_no_retry(
        upstream: Upstream, dispatcher: Dispatcher, mock_upstream: MockUpstream) -> None:
    job = make_job(CHAT_BODY, {"x-mock-reset-after": "3"})
    await run(job, dispatcher)
    log = job.log
    assert log.state is StreamState.FAILED
    assert log.error is None  # frames were sent, so the error travels in the stream
    payloads = sse_payloads(log.frames)
    assert len(payloads) == 4  # three upstream chunks, then the error event
    assert "[DONE]" not in payloads
    error = orjson.loads(payloads[-1])["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "upstream_connection_error"
    assert (await mock_upstream.stats())["requests"] == 1  # committed: never retried
    assert dispatcher.budget.retries == 0
    assert upstream.pool_stats()["in_use"] == 0
    assert_all_released(dispatcher)


async def test_vllm_error_mid_stream_ends_log_with_normalized_error(dispatcher: Dispatcher) -> None:
    job = make_job(CHAT_BODY, {"x-mock-vllm-error-after": "2"})
    await run(job, dispatcher)
    log = job.log
    assert log.state is StreamState.FAILED
    payloads = sse_payloads(log.frames)
    assert len(payloads) == 3
    assert orjson.loads(payloads[-1]) == {"error": {
        "message": "mock vllm failure", "type": "BadRequestError", "param": None, "code": 400}}


async def test_stream_500_before_first_byte_is_retried_on_another_deployment(cluster: Cluster) -> None:
    await cluster.add("broken", MockConfig(fail_status=500), priority=0)
    backup = await cluster.add("backup", MockConfig(), priority=1)
    dispatcher = cluster.dispatcher()
    job = make_job(CHAT_BODY)
    await run(job, dispatcher)
    assert job.log.state is StreamState.DONE
    assert sse_payloads(job.log.frames)[-1] == "[DONE]"
    assert job.upstream is backup
    assert (await cluster.requests("broken"), await cluster.requests("backup")) == (1, 1)
    assert cluster.events.of("retry") == [("retry", "broken", "http_500")]
    assert_all_released(dispatcher)


async def test_stream_500_everywhere_sets_log_error_and_no_frames(
        upstream: Upstream, dispatcher: Dispatcher, mock_upstream: MockUpstream) -> None:
    job = make_job(CHAT_BODY, {"x-mock-status": "500"})
    await run(job, dispatcher)
    log = job.log
    assert log.state is StreamState.FAILED
    assert log.frames == []
    assert isinstance(log.error, GatewayError)
    assert log.error.http_status == 500
    assert log.error.should_retry is False  # the gateway already retried
    assert log.error.to_body()["error"]["type"] == "server_error"
    assert (await mock_upstream.stats())["requests"] == 3  # routing.retry.attempts
    assert upstream.pool_stats()["in_use"] == 0
    assert_all_released(dispatcher)


async def test_upstream_429_before_first_byte_keeps_retry_after(dispatcher: Dispatcher) -> None:
    job = make_job(CHAT_BODY, {"x-mock-status": "429", "x-mock-retry-after": "3"})
    await run(job, dispatcher)
    assert isinstance(job.log.error, GatewayError)
    assert job.log.error.http_status == 429
    assert job.log.error.headers()["retry-after"] == "3"
    assert dispatcher.balancer.status("mock") == "cooldown"


async def test_stream_with_no_deployment_available_fails_before_first_byte(
        dispatcher: Dispatcher) -> None:
    dispatcher.balancer.record_rate_limited("mock", 60)
    job = make_job(CHAT_BODY)
    await run(job, dispatcher)
    assert isinstance(job.log.error, RateLimitError)  # the upstream asked to wait: a 429
    assert job.log.error.code == "upstream_rate_limited"
    assert job.upstream is None
    dispatcher.balancer.health["mock"].healthy = False  # probes found it down: a 503
    job = make_job(CHAT_BODY)
    await run(job, dispatcher)
    assert isinstance(job.log.error, OverloadedError)
    assert job.log.error.code == "no_healthy_upstream"


async def test_responses_stream_ends_without_done(dispatcher: Dispatcher) -> None:
    job = make_job({"model": "mock-gpt", "input": "hello there"}, endpoint=RESPONSES)
    await run(job, dispatcher)
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


async def start_slow_stream(dispatcher: Dispatcher) -> tuple[StreamJob, asyncio.Task[None]]:
    """A producer that is mid-stream (two frames in) on a long, slow generation."""
    job = make_job(CHAT_BODY, {"x-mock-tokens": "1000", "x-mock-token-delay-ms": "20"})
    task = asyncio.create_task(produce_stream(job, dispatcher))
    async with asyncio.timeout(TIMEOUT_S):
        await job.log.wait(2)
    return job, task


async def test_pool_and_slot_held_by_a_running_stream(upstream: Upstream, dispatcher: Dispatcher) -> None:
    _, task = await start_slow_stream(dispatcher)
    try:
        assert upstream.pool_stats() == {"in_use": 1, "idle": 0}
        assert dispatcher.admission.in_flight("mock") == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_cancelling_producer_mid_stream_frees_slot_and_pool(
        upstream: Upstream, dispatcher: Dispatcher, mock_upstream: MockUpstream) -> None:
    job, task = await start_slow_stream(dispatcher)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert job.log.state is StreamState.FAILED
    assert b"[DONE]" not in b"".join(job.log.frames)
    assert upstream.pool_stats() == {"in_use": 0, "idle": 0}  # closed, not pooled half-read
    assert_all_released(dispatcher)
    await wait_for_stat(mock_upstream, "streams_cancelled", 1)  # the generation stopped
    assert (await mock_upstream.stats())["open_streams"] == 0


async def test_cancelling_producer_before_first_byte_frees_slot(
        upstream: Upstream, dispatcher: Dispatcher) -> None:
    job = make_job(CHAT_BODY, {"x-mock-ttft-ms": "10000"})
    task = asyncio.create_task(produce_stream(job, dispatcher))
    await until(lambda: upstream.pool_stats()["in_use"] == 1, "request sent")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert job.log.state is StreamState.FAILED
    assert job.log.frames == []
    assert upstream.pool_stats()["in_use"] == 0
    assert_all_released(dispatcher)


async def test_slow_reader_pauses_the_upstream_read(upstream: Upstream, dispatcher: Dispatcher) -> None:
    log = StreamLog("gs_test", "tester", buffer_bytes=400, retain_bytes=100)
    reader = 1
    log.add_cursor(reader, 0)
    job = make_job(CHAT_BODY, {"x-mock-tokens": "40", "x-mock-token-delay-ms": "2"}, log=log)
    task = asyncio.create_task(produce_stream(job, dispatcher))
    await until(lambda: log.backlogged, "producer backlogged")
    paused_at = log.last_seq
    await asyncio.sleep(0.15)  # the upstream would have sent everything by now
    assert log.last_seq == paused_at
    assert log.state is StreamState.RUNNING
    # Memory stays bounded: one upstream read beyond the buffer at most.
    assert log.unsent_bytes < 400 + 64 * 1024
    # A reader that catches up lets it run to the end; sent frames are trimmed as it goes.
    async with asyncio.timeout(TIMEOUT_S):
        while not log.closed or log.acked_seq < log.last_seq:
            log.ack(reader, log.last_seq)
            await log.wait(log.acked_seq)
    await asyncio.wait_for(task, TIMEOUT_S)
    assert log.state is StreamState.DONE
    assert log.first_seq > 1
    assert log.held_bytes <= 100
    assert_all_released(dispatcher)


def test_only_events_that_may_be_errors_or_usage_are_parsed() -> None:
    from proxy.relay import _may_matter

    token = orjson.dumps({"choices": [{"index": 0, "delta": {"content": 'say "error" {"usage":{}}'}}],
                          "usage": None})
    assert not _may_matter(token)  # quotes inside generated text are escaped
    assert _may_matter(b'{"object":"error","message":"x"}')
    assert _may_matter(b'{"error": {"message": "x"}}')
    assert _may_matter(orjson.dumps({"choices": [], "usage": {"prompt_tokens": 1}}))
    assert _may_matter(b'{"choices": [], "usage": {"prompt_tokens": 1}}')
    assert _may_matter(b'{"type":"response.completed","response":{}}')
