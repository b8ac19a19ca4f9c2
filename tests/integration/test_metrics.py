"""``/metrics`` as an operator reads it: real requests (unary, SSE stream, WebSocket, a 429)
through the gateway, then a scrape parsed with ``prometheus_client.parser``; the Grafana
dashboard's metric names against a live scrape; ``observability.metrics_auth: admin``;
``--workers 2`` summed in one scrape (prometheus-client multiprocess mode); OTLP traces
with the GenAI attributes received by an in-test OTLP/HTTP endpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    CLIENT_KEY,
    OTHER_KEY,
    MockUpstream,
    RunningGateway,
    StartGateway,
    base_config,
    merge,
)
from tests.integration.conftest import RedisServer, StartGatewayProcess, wait_healthy

ADMIN_KEY = "sk-admin-metrics-0123456789"
DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana-dashboard.json"
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
BUDGET_TOKENS = 1_000_000
#: Every label name a gateway metric may carry: all bounded (no request or stream ids).
ALLOWED_LABELS = {"endpoint", "key", "status", "status_class", "model", "upstream", "type", "kind",
                  "reason", "where", "upstreams", "state", "unit", "le"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_config(mock: MockUpstream) -> dict[str, Any]:
    return merge(base_config(mock.base_url), {
        "keys": {"tester": {"budget": {"tokens": BUDGET_TOKENS, "period": "1d"}},
                 "limited": {"rpm": 1, "burst": 1}},
        "models": {"mock-gpt": {"price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}},
        "admin": {"keys": [ADMIN_KEY]},
    })


async def scrape_text(url: str, headers: dict[str, str] | None = None) -> str:
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection: any worker may answer
    async with aiohttp.ClientSession(connector=connector) as session, \
            session.get(url + "/metrics", headers=headers or {}) as response:
        assert response.status == 200, await response.text()
        return await response.text()


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples by (name, labels), and each family's type by family name."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, types


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def sample_names(samples: Samples, types: dict[str, str]) -> set[str]:
    """Every sample name a query may use: those present, plus each family's own names
    (counters and histograms without children yet still have HELP/TYPE)."""
    names = {name for name, _ in samples}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family, kind in types.items():
        names.update(family + suffix for suffix in suffixes.get(kind, ("",)))
    return names


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str = CLIENT_KEY
               ) -> tuple[int, dict[str, str], bytes]:
    async with session.post(url + "/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as response:
        return response.status, dict(response.headers), await response.read()


def stream_usage(raw: bytes) -> dict[str, int]:
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines()
              if line.startswith("data: {")]
    usage: dict[str, int] = [c for c in chunks if c.get("usage")][-1]["usage"]
    return usage


async def ws_stream(ws: aiohttp.ClientWebSocketResponse) -> dict[str, int]:
    await ws.send_json({"type": "request", "id": "w1", "endpoint": "chat.completions",
                        "body": {**CHAT, "stream": True}})
    while True:
        frame = json.loads((await ws.receive(timeout=10)).data)
        if frame["type"] in ("done", "error"):
            assert frame["type"] == "done", frame
            usage: dict[str, int] = frame["usage"]
            return usage


async def test_a_scrape_after_real_requests_answers_operators_questions(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(metrics_config(mock_upstream))
    usages: list[dict[str, int]] = []
    async with aiohttp.ClientSession() as session:
        status, headers, body = await post(session, gateway.url, CHAT)
        assert status == 200
        usages.append(json.loads(body)["usage"])
        assert float(headers["x-shepherd-overhead-ms"]) >= 0.0  # unary: the whole overhead
        for _ in range(2):
            status, headers, body = await post(session, gateway.url, STREAM)
            assert status == 200
            assert headers["Content-Type"].startswith("text/event-stream")
            assert float(headers["x-shepherd-overhead-ms"]) >= 0.0  # stream: before the first byte
            usages.append(stream_usage(body))
        refusals = [await post(session, gateway.url, CHAT, OTHER_KEY) for _ in range(2)]
        assert [r[0] for r in refusals] == [200, 429]
        usages.append(json.loads(refusals[0][2])["usage"])
        reason = json.loads(refusals[1][2])["error"]["code"]
        async with session.ws_connect(gateway.url.replace("http", "ws") + "/v1/ws",
                                      headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as ws:
            usages.append(await ws_stream(ws))
            while_open, _ = parse(await scrape_text(gateway.url))
    streams = 3  # two SSE, one WebSocket
    # A stream's row is recorded when its producer ends, a moment after the client saw the end.
    ttft = "shepherd_time_to_first_token_seconds_count"
    await scrape_until(gateway.url, lambda s: total(s, ttft) == streams)
    after, types = parse(await scrape_text(gateway.url))

    assert total(while_open, "shepherd_websockets_open", endpoint="/v1/ws") == 1
    assert total(after, "shepherd_websockets_open") == 0
    assert total(after, ttft, model="mock-gpt", upstream="mock") == streams
    assert total(after, "shepherd_time_per_output_token_seconds_count", model="mock-gpt") == streams
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    assert total(after, "shepherd_tokens_total", model="mock-gpt", type="prompt") == prompt
    assert total(after, "shepherd_tokens_total", model="mock-gpt", type="completion") == completion
    assert total(after, "shepherd_tokens_total", key="limited") == usages[3]["total_tokens"]
    cost = total(after, "shepherd_cost_usd_total", model="mock-gpt")
    assert cost == pytest.approx((prompt + 2 * completion) / 1e6)
    assert total(after, "shepherd_gateway_overhead_seconds_count") == 5  # 2 unary + 3 streams
    assert total(after, "shepherd_model_requests_total", model="mock-gpt", status_class="2xx") == 5
    assert total(after, "shepherd_model_requests_total", model="mock-gpt", status_class="4xx") == 1
    assert total(after, "shepherd_rate_limited_total", key="limited", reason=reason) == 1
    assert total(after, "shepherd_requests_total", endpoint="/v1/chat/completions", status="429") == 1
    assert total(after, "shepherd_request_seconds_count", endpoint="/v1/chat/completions",
                 status_class="2xx") == 4
    tester_tokens = sum(u["total_tokens"] for i, u in enumerate(usages) if i != 3)
    remaining = total(after, "shepherd_budget_remaining", key="tester", unit="tokens")
    assert remaining == BUDGET_TOKENS - tester_tokens
    assert total(after, "shepherd_streams_running") == 0
    assert total(after, "shepherd_streams_detached") == 0
    assert types["shepherd_time_to_first_token_seconds"] == "histogram"
    # Bounded labels: known names only, and never a request or stream id.
    for (_name, labels) in after:
        assert {k for k, _ in labels} <= ALLOWED_LABELS, labels
        assert not any(v.startswith(("req_", "gs_")) for _, v in labels), labels

    # The Grafana dashboard: valid JSON, and every metric it queries is in a live scrape.
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\bshepherd_[a-z_]+", e)}
    assert len(used) >= 15
    missing = used - sample_names(after, types) - sample_names(while_open, types)
    assert not missing, f"the dashboard queries metrics /metrics lacks: {sorted(missing)}"


async def test_metrics_and_readyz_need_an_admin_key_with_metrics_auth_admin(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(merge(metrics_config(mock_upstream),
                                        {"observability": {"metrics_auth": "admin"}}))
    async with aiohttp.ClientSession() as session:
        for path in ("/metrics", "/readyz"):
            async with session.get(gateway.url + path) as response:
                assert response.status == 401, path
                assert (await response.json())["error"]["code"] == "missing_api_key"
            virtual = {"Authorization": f"Bearer {CLIENT_KEY}"}
            async with session.get(gateway.url + path, headers=virtual) as r:
                assert r.status == 403, path
                assert (await r.json())["error"]["code"] == "admin_key_required"
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            async with session.get(gateway.url + path, headers=admin) as r:
                assert r.status == 200, path
        async with session.get(gateway.url + "/healthz") as response:
            assert response.status == 200


async def test_metrics_are_open_by_default(gateway: RunningGateway) -> None:
    assert "# TYPE shepherd_requests_total counter" in await scrape_text(gateway.url)
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/readyz") as response:
        assert response.status == 200


def worker_pids(parent: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    pids = []
    for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
        except FileNotFoundError:
            pass
    return pids


async def scrape_until(url: str, check: Callable[[Samples], bool], timeout_s: float = 10.0) -> Samples:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        samples, _ = parse(await scrape_text(url))
        if check(samples) or asyncio.get_running_loop().time() > deadline:
            return samples
        await asyncio.sleep(0.2)


async def test_two_workers_one_scrape_shows_the_whole_server(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess) -> None:
    config = merge(base_config(mock_upstream.base_url), {
        "state": {"backend": "redis", "redis_url": redis_server.url},
        "server": {"max_connections": 1000}})
    gateway = await gateway_process(config, workers=2)
    requests = 40
    connector = aiohttp.TCPConnector(force_close=True)  # each request on a new connection: both workers serve
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(requests):
            assert (await post(session, gateway.url, CHAT))[0] == 200
    # Each worker's listener limit is 1000: the sum proves both workers are in the scrape.
    both = lambda s: total(s, "shepherd_connections_limit") == 2000  # noqa: E731
    for _ in range(5):  # whichever worker answers, the scrape shows the whole server
        samples = await scrape_until(gateway.url, both)
        assert total(samples, "shepherd_requests_total", endpoint="/v1/chat/completions") == requests
        assert total(samples, "shepherd_tokens_total", type="completion") == requests * 8
        assert total(samples, "shepherd_connections_limit") == 2000
    # A worker that dies is replaced; its live gauges leave the sums, its counters stay.
    pids = worker_pids(gateway.pid)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    deadline = asyncio.get_running_loop().time() + 15
    while len(set(worker_pids(gateway.pid)) - {pids[0]}) < 2:
        assert asyncio.get_running_loop().time() < deadline, "the worker was not replaced"
        await asyncio.sleep(0.1)
    await wait_healthy(gateway)
    samples = await scrape_until(gateway.url, both)
    assert total(samples, "shepherd_connections_limit") == 2000
    assert total(samples, "shepherd_requests_total", endpoint="/v1/chat/completions") == requests


# --------------------------------------------------------------------------- OpenTelemetry


async def test_traces_reach_an_otlp_endpoint_with_genai_attributes(
        start_gateway: StartGateway, mock_upstream: MockUpstream,
        aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans: list[Any] = []

    async def receive(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        spans.extend(s for rs in message.resource_spans for ss in rs.scope_spans for s in ss.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", receive)
    collector = await aiohttp_server(app)
    gateway = await start_gateway(merge(metrics_config(mock_upstream), {
        "observability": {"otlp_endpoint": str(collector.make_url("/v1/traces"))}}))
    async with aiohttp.ClientSession() as session:
        assert (await post(session, gateway.url, CHAT))[0] == 200
        assert (await post(session, gateway.url, STREAM))[0] == 200
    deadline = asyncio.get_running_loop().time() + 10
    while len([s for s in spans if s.kind == 2]) < 2:  # SPAN_KIND_SERVER
        assert asyncio.get_running_loop().time() < deadline, spans
        await asyncio.sleep(0.1)

    def attrs(span: Any) -> dict[str, Any]:
        return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}

    servers = [s for s in spans if s.kind == 2]
    clients = [s for s in spans if s.kind == 3]
    assert {s.name for s in servers} == {"chat mock-gpt"}
    for span in servers:
        a = attrs(span)
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.system"] == "openai"
        assert a["gen_ai.request.model"] == "mock-gpt"
        assert a["gen_ai.response.model"]
        assert a["gen_ai.usage.input_tokens"] > 0
        assert a["gen_ai.usage.output_tokens"] == 8
        assert a["server.address"] == "127.0.0.1"
        assert a["http.response.status_code"] == 200
        assert a["shepherd.key"] == "tester"
        assert span.end_time_unix_nano > span.start_time_unix_nano
    assert "shepherd.ttft_ms" in {k for s in servers for k in attrs(s)}
    assert len(clients) == 2  # one upstream attempt each, children of their request span
    assert {c.parent_span_id for c in clients} == {s.span_id for s in servers}
