"""proxy/app.py: building the app, its lifetimes, and the operational endpoints it serves."""

from __future__ import annotations

import asyncio
import gc
import resource
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import (
    GC_THRESHOLDS,
    STREAM_STORE_MAX_CONNECTIONS,
    create_app,
    full_gc_forever,
    reserved_fds,
    start_server,
    tune_gc,
)
from proxy.config import load_settings
from proxy.listener import GatewayRunner, client_connection_cap
from proxy.pipeline import GATEWAY
from tests.conftest import CLIENT_KEY, MockUpstream, RunningGateway, StartGateway, base_config, merge

CHAT_BODY = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hello there"}]}
TIMEOUT_S = 5.0


async def wait_for_stat(mock: MockUpstream, name: str, value: int) -> None:
    """Poll the mock's counters until ``name == value``."""
    for _ in range(int(TIMEOUT_S / 0.01)):
        if (await mock.stats())[name] == value:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"mock upstream {name} never reached {value}: {await mock.stats()}")


def test_create_app_with_redis_backend_connects_lazily() -> None:
    # Nothing listens on port 9: building the app must not try to reach Redis.
    tree = merge(base_config("http://127.0.0.1:9/v1"),
                 {"state": {"backend": "redis", "redis_url": "redis://127.0.0.1:9/0"}})
    app = create_app(load_settings(tree, env={}))
    assert app[GATEWAY].limiter.store.name == "redis"


def test_create_app_opens_nothing_before_start() -> None:
    app = create_app(load_settings(base_config("http://127.0.0.1:9/v1"), env={}))
    upstream = app[GATEWAY].upstreams["mock"]
    assert repr(upstream).endswith("[closed]>")
    with pytest.raises(RuntimeError):
        _ = upstream.session


def requests_total(text: str) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "shepherd_requests_total":
                labels = sample.labels
                out[labels["endpoint"], labels["key"], labels["status"]] = sample.value
    return out


async def test_metrics_count_requests(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/chat/completions", json=CHAT_BODY) as response:
        assert response.status == 200
        await response.read()
    async with http.post("/v1/chat/completions", json={"messages": []}) as response:
        assert response.status == 400
    async with http.get("/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    counts = requests_total(text)
    assert counts[("/v1/chat/completions", "tester", "200")] == 1.0
    assert counts[("/v1/chat/completions", "tester", "400")] == 1.0
    assert "shepherd_streams_active" in text


async def test_healthz(http: aiohttp.ClientSession) -> None:
    async with http.get("/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_healthz_needs_no_key(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/healthz") as response:
        assert response.status == 200


async def readyz(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.get("/readyz") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def test_readyz_lists_upstreams_with_in_flight_and_pool(http: aiohttp.ClientSession) -> None:
    assert await readyz(http) == {"status": "ready", "upstreams": {
        "mock": {"state": "healthy", "in_flight": 0, "queued": 0, "pool": {"in_use": 0, "idle": 0}}}}
    async with http.post("/v1/chat/completions", json=CHAT_BODY) as response:
        await response.read()
    assert (await readyz(http))["upstreams"]["mock"] == {
        "state": "healthy", "in_flight": 0, "queued": 0, "pool": {"in_use": 0, "idle": 1}}


async def test_readyz_counts_a_running_stream(http: aiohttp.ClientSession) -> None:
    body = {**CHAT_BODY, "stream": True}
    headers = {"x-mock-tokens": "1000", "x-mock-token-delay-ms": "20"}
    async with asyncio.timeout(TIMEOUT_S), http.post(
            "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status == 200
        await response.content.readuntil(b"\n\n")  # the stream is running
        assert (await readyz(http))["upstreams"]["mock"] == {
            "state": "healthy", "in_flight": 1, "queued": 0, "pool": {"in_use": 1, "idle": 0}}


async def test_cleanup_closes_upstream_sessions(start_gateway: StartGateway,
                                                mock_upstream: MockUpstream) -> None:
    gw = await start_gateway()
    upstream = gw.app[GATEWAY].upstreams["mock"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as session, \
            session.post(gw.url + "/v1/chat/completions", json=CHAT_BODY) as response:
        assert response.status == 200
    session_before = upstream.session
    assert not session_before.closed
    await gw.runner.cleanup()
    assert session_before.closed
    with pytest.raises(RuntimeError, match="not started"):
        _ = upstream.session
    assert upstream.pool_stats() == {"in_use": 0, "idle": 0}


async def test_cleanup_cancels_running_streams(start_gateway: StartGateway,
                                               mock_upstream: MockUpstream) -> None:
    gw = await start_gateway(server={"drain_timeout": "0.2s"})
    streams = gw.app[GATEWAY].streams
    body = {**CHAT_BODY, "stream": True}
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "x-mock-tokens": "1000",
               "x-mock-token-delay-ms": "20"}
    async with aiohttp.ClientSession(headers=headers) as session, \
            session.post(gw.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
        await response.content.readuntil(b"\n\n")
        assert streams.running == 1
        async with asyncio.timeout(TIMEOUT_S):
            await gw.runner.cleanup()
    assert streams.running == 0
    await wait_for_stat(mock_upstream, "open_streams", 0)
    assert (await mock_upstream.stats())["streams_cancelled"] == 1


async def test_metrics_count_upstream_errors_by_status(http: aiohttp.ClientSession) -> None:
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post("/v1/chat/completions", json=body, headers={"x-mock-status": "503"}) as resp:
        assert resp.status == 503
        assert resp.headers["x-should-retry"] == "false"  # the gateway already retried
    async with http.get("/metrics") as resp:
        text = await resp.text()
    # routing.retry.attempts defaults to 3: three attempts, two of them retries
    assert 'shepherd_upstream_errors_total{kind="http_503",upstream="mock"} 3.0' in text
    assert 'shepherd_retries_total{reason="http_503",upstream="mock"} 2.0' in text


async def test_models_list_keeps_upstream_models_matching_its_patterns(
        start_gateway: StartGateway) -> None:
    # The upstream serves "mock-*": its listed ids matching that pattern are shown, others not.
    gw = await start_gateway(upstreams={"mock": {"models": ["mock-*"]}})
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as session, \
            session.get(gw.url + "/v1/models") as response:
        assert response.status == 200
        ids = [m["id"] for m in (await response.json())["data"]]
    assert sorted(ids) == ["mock-embed", "mock-gpt"]


async def test_tune_gc_freezes_startup_objects_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    app = create_app(load_settings(base_config("http://127.0.0.1:9/v1"), env={}))
    tuning = tune_gc(app)
    try:
        await anext(tuning)
        assert gc.get_freeze_count() > 10_000  # at least the modules' objects
        assert gc.get_threshold() == GC_THRESHOLDS
        # the old generation that a full collection scans is (nearly) empty
        assert len(gc.get_objects(generation=2)) < 1_000
    finally:
        await anext(tuning, None)  # stops the periodic full collection
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_full_gc_forever_collects_cycles_that_automatic_collection_no_longer_reaches(
        caplog: pytest.LogCaptureFixture) -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self

    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        gc.collect()
        alive = [Node() for _ in range(100)]
        gc.collect(1)  # young collections promote what is still alive to the old generation ...
        del alive  # ... where it becomes cyclic garbage that only a full collection finds
        gc.collect(1)
        assert sum(isinstance(o, Node) for o in gc.get_objects(generation=2)) == 100
        task = asyncio.get_running_loop().create_task(full_gc_forever(0.01, unfreeze_every=3))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert not any(isinstance(o, Node) for o in gc.get_objects())
        # what survives a pass is frozen: the next passes do not scan it again ...
        alive = [Node() for _ in range(100)]
        frozen_before = gc.get_freeze_count()
        task = asyncio.get_running_loop().create_task(full_gc_forever(0.01, unfreeze_every=1000))
        await asyncio.sleep(0.05)
        assert gc.get_freeze_count() >= frozen_before + 100
        del alive  # ... so its cycles wait for a pass that unfreezes first
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert sum(isinstance(o, Node) for o in gc.get_objects()) == 0  # frozen: not tracked here
        gc.unfreeze()
        assert gc.collect() >= 100
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# --- the listener start_server builds (proxy/listener.py; hostile clients in tests/adversarial) ---


def test_reserved_fds_counts_upstream_pools_and_the_redis_stream_store() -> None:
    tree = merge(base_config("http://127.0.0.1:9/v1"),
                 {"upstreams": {"other": {"base_url": "http://127.0.0.1:9/v1", "max_connections": 7}}})
    assert reserved_fds(load_settings(tree, env={})) == 100 + 7
    redis = merge(tree, {"state": {"backend": "redis"}})
    assert reserved_fds(load_settings(redis, env={})) == 100 + 7 + STREAM_STORE_MAX_CONNECTIONS


async def test_start_server_raises_the_soft_fd_limit_and_caps_connections_by_it(
        start_gateway: StartGateway) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 512:
        pytest.skip(f"hard RLIMIT_NOFILE {hard}: nothing to raise the soft limit to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        gateway = await start_gateway(server={"max_connections": 10**9})
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 512), hard))
    runner = gateway.runner
    assert isinstance(runner, GatewayRunner)
    assert runner.guard.limit == client_connection_cap(hard, reserved_fds(gateway.settings))


async def test_metrics_show_open_connections_and_their_limit(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(server={"max_connections": 50})
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/metrics") as response:
        text = await response.text()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["shepherd_connections_open"] == 1.0  # this scrape's own connection
    assert samples["shepherd_connections_limit"] == 50.0


async def test_start_server_cleans_up_when_the_port_is_taken(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    settings = load_settings(base_config("http://127.0.0.1:9/v1"), env={})
    app = create_app(settings)
    sessions: list[aiohttp.ClientSession] = []

    async def grab_session(app: web.Application) -> None:  # after the pools opened
        sessions.append(app[GATEWAY].upstreams["mock"].session)

    app.on_startup.append(grab_session)
    with pytest.raises(OSError):
        await start_server(settings, "127.0.0.1", int(gateway.url.rsplit(":", 1)[1]), app=app)
    assert len(sessions) == 1
    assert sessions[0].closed
