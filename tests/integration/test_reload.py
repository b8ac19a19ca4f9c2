"""Hot reload of a gateway process (``proxy/reload.py``): edit its YAML file, then SIGHUP or
``POST /admin/reload``.

The gateway runs as ``python -m proxy serve --config FILE`` (the ``gateway_process``
fixture); the mock upstreams are in-process. Reload latency (signal or POST to the new config
serving) is printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from scripts.mock_upstream import MockConfig, expected_text
from tests.conftest import CLIENT_KEY, OTHER_KEY, MockUpstream, base_config, in_process_mock, merge
from tests.integration.conftest import REPO_ROOT, GatewayProcess, RedisServer, StartGatewayProcess

ADMIN_KEY = "sk-admin-reload-0123456789abcdef"
NEW_KEY = "sk-new-key-after-reload-000000"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT_PATH = "/v1/chat/completions"
TIMEOUT_S = 10.0


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(model: str = "mock-gpt", stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def start_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    return merge(base_config(upstream_url), {"admin": {"keys": [ADMIN_KEY]}, **overrides})


def rewrite(gateway: GatewayProcess, config: dict[str, Any]) -> None:
    gateway.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")


async def post_reload(session: aiohttp.ClientSession, gateway: GatewayProcess,
                      headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with session.post(gateway.url + "/admin/reload", headers=ADMIN if headers is None else headers
                            ) as response:
        return response.status, await response.json()


async def status_of(session: aiohttp.ClientSession, gateway: GatewayProcess, key: str,
                    model: str = "mock-gpt") -> int:
    async with session.post(gateway.url + CHAT_PATH, json=chat(model), headers=auth(key)) as response:
        await response.read()
        return response.status


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = TIMEOUT_S,
                poll_s: float = 0.005) -> float:
    """Poll ``check`` until it is true; returns the seconds it took."""
    started = time.perf_counter()
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - polling another process: nothing to wait on
            await asyncio.sleep(poll_s)
    return time.perf_counter() - started


def log_lines(gateway: GatewayProcess, msg: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gateway.log_text().splitlines()
            if msg in line and line.startswith("{")]


@pytest.fixture
async def second_upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> MockUpstream:
    return await in_process_mock(aiohttp_server, MockConfig())


async def test_post_reload_adds_and_removes_keys_and_reports_what_changed(
        mock_upstream: MockUpstream, gateway_process: StartGatewayProcess) -> None:
    config = start_config(mock_upstream.base_url)
    gateway = await gateway_process(config)
    new = merge(config, {"keys": {"newbie": {"key": NEW_KEY}}, "server": {"port": 1234}})
    del new["keys"]["limited"]
    rewrite(gateway, new)
    async with aiohttp.ClientSession() as session:
        assert (await post_reload(session, gateway, {}))[0] == 401
        assert (await post_reload(session, gateway, auth(CLIENT_KEY)))[0] == 403  # a virtual key
        assert await status_of(session, gateway, NEW_KEY) == 401  # not reloaded yet
        started = time.perf_counter()
        status, report = await post_reload(session, gateway)
        post_ms = (time.perf_counter() - started) * 1000
        assert status == 200, report
        assert await status_of(session, gateway, NEW_KEY) == 200
        assert await status_of(session, gateway, OTHER_KEY) == 401
        assert await status_of(session, gateway, CLIENT_KEY) == 200
    assert report["keys"] == {"added": ["newbie"], "removed": ["limited"], "changed": []}
    assert report["upstreams"] == {"added": [], "removed": [], "changed": []}
    assert report["restart_required"] == ["server.port"]
    assert report["changed"] is True
    assert report["trigger"] == "POST /admin/reload"
    print(f"\nreload latency, POST /admin/reload: {post_ms:.1f} ms round trip, "
          f"{report['duration_ms']} ms in the gateway")
    [line] = log_lines(gateway, "need a restart")
    assert line["restart_required"] == ["server.port"]


async def test_sighup_reloads_and_never_ends_the_process(
        mock_upstream: MockUpstream, gateway_process: StartGatewayProcess) -> None:
    config = start_config(mock_upstream.base_url)
    gateway = await gateway_process(config)
    rewrite(gateway, merge(config, {"keys": {"newbie": {"key": NEW_KEY}}}))
    async with aiohttp.ClientSession() as session:
        async def new_key_works() -> bool:
            return await status_of(session, gateway, NEW_KEY) == 200

        signalled = time.perf_counter()
        gateway.proc.send_signal(signal.SIGHUP)
        latency_s = await until(new_key_works)
        print(f"\nreload latency, SIGHUP to the new key answering 200: {latency_s * 1000:.1f} ms")
        for _ in range(5):  # a burst of signals is coalesced, never fatal
            gateway.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert gateway.proc.returncode is None
        assert await status_of(session, gateway, NEW_KEY) == 200
    assert time.perf_counter() - signalled < TIMEOUT_S
    reloads = log_lines(gateway, "config reloaded")
    assert 2 <= len(reloads) <= 6
    assert reloads[0]["trigger"] == "SIGHUP"
    assert reloads[0]["keys"]["added"] == ["newbie"]
    assert all(not line["changed"] for line in reloads[1:])


async def test_a_changed_rpm_applies_and_another_keys_limiter_state_is_kept(
        mock_upstream: MockUpstream, gateway_process: StartGatewayProcess) -> None:
    config = start_config(mock_upstream.base_url, keys={"tester": {"rpm": 2}, "limited": {"rpm": 600}})
    gateway = await gateway_process(config)
    async with aiohttp.ClientSession() as session:
        assert await status_of(session, gateway, CLIENT_KEY) == 200  # burst 1 (rpm 2)
        assert await status_of(session, gateway, CLIENT_KEY) == 429  # tester is at its limit
        rewrite(gateway, merge(config, {"keys": {"limited": {"rpm": 6}}}))  # burst 1 from now on
        status, report = await post_reload(session, gateway)
        assert status == 200, report
        assert report["keys"]["changed"] == ["limited"]
        assert await status_of(session, gateway, CLIENT_KEY) == 429  # its state was kept
        assert await status_of(session, gateway, OTHER_KEY) == 200
        assert await status_of(session, gateway, OTHER_KEY) == 429  # the new rpm applies


async def test_an_added_upstream_and_model_route(
        mock_upstream: MockUpstream, second_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    config = start_config(mock_upstream.base_url, upstreams={"mock": {"models": ["mock-gpt"]}})
    gateway = await gateway_process(config)
    second = {"base_url": second_upstream.base_url, "models": ["second-gpt"],
              "health_check": {"enabled": True, "interval": "100ms"}}
    rewrite(gateway, merge(config, {"upstreams": {"second": second},
                                    "models": {"alias-gpt": {"upstreams": ["second"]}}}))
    async with aiohttp.ClientSession() as session:
        assert await status_of(session, gateway, CLIENT_KEY, "second-gpt") == 404
        status, report = await post_reload(session, gateway)
        assert status == 200, report
        assert report["upstreams"]["added"] == ["second"]
        assert report["models"]["added"] == ["alias-gpt"]
        assert await status_of(session, gateway, CLIENT_KEY, "second-gpt") == 200
        assert await status_of(session, gateway, CLIENT_KEY, "alias-gpt") == 200
        assert await status_of(session, gateway, CLIENT_KEY, "mock-gpt") == 200

        async def probed() -> bool:  # the new upstream has a health probe
            return (await second_upstream.stats())["by_path"].get("/v1/models", 0) > 0

        await until(probed, poll_s=0.05)
        async with session.get(gateway.url + "/readyz") as response:
            body = await response.json()
    assert set(body["upstreams"]) == {"mock", "second"}
    assert (await second_upstream.stats())["by_path"]["/v1/chat/completions"] == 2
    assert (await mock_upstream.stats())["by_path"]["/v1/chat/completions"] == 1


async def read_stream(session: aiohttp.ClientSession, gateway: GatewayProcess, tokens: int,
                      started: asyncio.Event) -> tuple[int, bytes]:
    headers = {**auth(CLIENT_KEY), "x-mock-token-delay-ms": "40", "x-mock-tokens": str(tokens)}
    raw = bytearray()
    async with session.post(gateway.url + CHAT_PATH, json=chat(stream=True), headers=headers) as response:
        async for chunk in response.content.iter_any():
            raw += chunk
            if raw.count(b"\ndata: ") >= 2:
                started.set()
        return response.status, bytes(raw)


def stream_text(raw: bytes) -> str:
    out = []
    for line in raw.decode().split("\n"):
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[len("data: "):])
            if chunk.get("choices"):
                out.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(out)


async def test_a_removed_upstreams_in_flight_stream_finishes_intact_then_its_pool_closes(
        mock_upstream: MockUpstream, second_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    config = start_config(mock_upstream.base_url)
    gateway = await gateway_process(config)
    replaced = merge(config, {"upstreams": {"second": {"base_url": second_upstream.base_url}}})
    del replaced["upstreams"]["mock"]
    rewrite(gateway, replaced)
    async with aiohttp.ClientSession() as session:
        started = asyncio.Event()
        stream = asyncio.create_task(read_stream(session, gateway, 40, started))  # ~1.6 s
        await started.wait()
        status, report = await post_reload(session, gateway)
        assert status == 200, report
        assert report["upstreams"] == {"added": ["second"], "removed": ["mock"], "changed": []}
        assert await status_of(session, gateway, CLIENT_KEY) == 200  # served by "second" now
        assert not log_lines(gateway, "retired upstream pool closed")  # still streaming
        code, raw = await stream
    assert code == 200
    assert raw.rstrip().endswith(b"data: [DONE]")
    assert stream_text(raw) == expected_text(40)
    assert (await second_upstream.stats())["by_path"]["/v1/chat/completions"] == 1

    async def pool_closed() -> bool:
        return bool(log_lines(gateway, "retired upstream pool closed"))

    await until(pool_closed, poll_s=0.05)
    assert log_lines(gateway, "retired upstream pool closed")[0]["upstream"] == "mock"
    assert not log_lines(gateway, "still busy")


async def test_an_invalid_file_answers_400_with_key_paths_and_changes_nothing(
        mock_upstream: MockUpstream, gateway_process: StartGatewayProcess) -> None:
    config = start_config(mock_upstream.base_url)
    gateway = await gateway_process(config)
    rewrite(gateway, merge(config, {"keys": {"newbie": {"key": NEW_KEY}, "tester": {"rpm": -1}},
                                    "upstreams": {"mock": {"max_connections": "lots"}}}))
    async with aiohttp.ClientSession() as session:
        status, body = await post_reload(session, gateway)
        assert status == 400
        assert body["error"]["code"] == "invalid_config"
        assert {e["path"] for e in body["errors"]} == {"keys.tester.rpm", "upstreams.mock.max_connections"}
        assert await status_of(session, gateway, NEW_KEY) == 401
        assert await status_of(session, gateway, CLIENT_KEY) == 200
        gateway.config_path.write_text("upstreams: [unclosed\n", encoding="utf-8")
        gateway.proc.send_signal(signal.SIGHUP)  # logged; the process goes on

        async def refused_twice() -> bool:
            return len(log_lines(gateway, "reload refused")) == 2

        await until(refused_twice, poll_s=0.05)
        assert gateway.proc.returncode is None
        assert await status_of(session, gateway, CLIENT_KEY) == 200
    first = log_lines(gateway, "reload refused")[0]
    assert any(e.startswith("keys.tester.rpm: ") for e in first["errors"])


async def test_reloads_under_load_fail_no_request(
        mock_upstream: MockUpstream, second_upstream: MockUpstream,
        gateway_process: StartGatewayProcess) -> None:
    """Unary requests and streams run without pause while three reloads add an upstream,
    change one (a new pool under the same name), remove one and change a key's limits."""
    config = start_config(mock_upstream.base_url)
    gateway = await gateway_process(config)
    second = {"base_url": second_upstream.base_url}
    configs = [
        merge(config, {"upstreams": {"second": second}, "keys": {"tester": {"rpm": 100_000}}}),
        merge(config, {"upstreams": {"second": second, "mock": {"timeouts": {"connect": "3s"}}}}),
        merge(config, {"upstreams": {"second": second}}),
    ]
    del configs[2]["upstreams"]["mock"]
    failures: list[str] = []
    done = asyncio.Event()
    counts = {"unary": 0, "stream": 0}

    async def unary_loop(session: aiohttp.ClientSession) -> None:
        for _ in range(2000):  # bounded
            if done.is_set():
                return
            async with session.post(gateway.url + CHAT_PATH, json=chat(),
                                    headers=auth(CLIENT_KEY)) as response:
                body = await response.read()
                if response.status != 200:
                    failures.append(f"unary {response.status} {body[:200]!r}")
            counts["unary"] += 1

    async def stream_loop(session: aiohttp.ClientSession) -> None:
        for _ in range(200):
            if done.is_set():
                return
            status, raw = await read_stream(session, gateway, 8, asyncio.Event())
            if status != 200 or stream_text(raw) != expected_text(8) or not raw.rstrip().endswith(b"[DONE]"):
                failures.append(f"stream {status} {raw[-200:]!r}")
            counts["stream"] += 1

    async with aiohttp.ClientSession() as session:
        loops = [asyncio.create_task(unary_loop(session)) for _ in range(8)]
        loops += [asyncio.create_task(stream_loop(session)) for _ in range(4)]
        durations = []
        for tree in configs:
            await asyncio.sleep(0.4)
            rewrite(gateway, tree)
            status, report = await post_reload(session, gateway)
            assert status == 200, report
            durations.append(report["duration_ms"])
        await asyncio.sleep(0.4)
        done.set()
        await asyncio.gather(*loops)
    assert failures == []
    assert counts["unary"] > 50
    assert counts["stream"] > 10
    print(f"\nreloads under load: {durations} ms; {counts['unary']} unary requests, "
          f"{counts['stream']} streams, 0 failed")


async def test_sighup_to_the_supervisor_reloads_every_worker(
        mock_upstream: MockUpstream, redis_server: RedisServer,
        gateway_process: StartGatewayProcess) -> None:
    config = start_config(mock_upstream.base_url, state={"backend": "redis", "redis_url": redis_server.url})
    gateway = await gateway_process(config, workers=2)

    async def both_workers_listening() -> bool:
        return len({line["pid"] for line in log_lines(gateway, '"listening"')}) == 2

    await until(both_workers_listening, timeout_s=20, poll_s=0.05)
    rewrite(gateway, merge(config, {"keys": {"newbie": {"key": NEW_KEY}}}))
    gateway.proc.send_signal(signal.SIGHUP)

    async def both_reloaded() -> bool:
        return len({line["pid"] for line in log_lines(gateway, "config reloaded")}) == 2

    await until(both_reloaded, poll_s=0.05)
    await assert_every_worker_accepts(gateway, NEW_KEY)
    # POST /admin/reload on one worker reaches the other through the supervisor
    rewrite(gateway, merge(config, {"keys": {"newbie": {"key": NEW_KEY}, "third": {"key": NEW_KEY + "3"}}}))
    async with aiohttp.ClientSession() as session:
        status, report = await post_reload(session, gateway)
    assert status == 200, report
    assert report["keys"]["added"] == ["third"]

    async def both_added_third() -> bool:
        return len({line["pid"] for line in log_lines(gateway, "config reloaded")
                    if line["keys"]["added"] == ["third"]}) == 2

    await until(both_added_third, poll_s=0.05)
    await assert_every_worker_accepts(gateway, NEW_KEY + "3")
    assert gateway.proc.returncode is None


async def assert_every_worker_accepts(gateway: GatewayProcess, key: str) -> None:
    """Requests on fresh connections (SO_REUSEPORT spreads them over the workers) all pass."""
    for _ in range(20):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            assert await status_of(session, gateway, key) == 200


async def shepherd(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_shepherd_reload_command(
        mock_upstream: MockUpstream, gateway_process: StartGatewayProcess) -> None:
    config = start_config(mock_upstream.base_url)
    gateway = await gateway_process(config)
    connection = ("--url", gateway.url, "--admin-key", ADMIN_KEY)
    rewrite(gateway, merge(config, {"keys": {"newbie": {"key": NEW_KEY}}}))
    code, out, err = await shepherd("reload", *connection)
    assert code == 0, err
    assert out.startswith("reloaded in ")
    assert "keys: added newbie" in out
    rewrite(gateway, merge(config, {"keys": {"tester": {"rpm": 0}}}))
    code, out, err = await shepherd("reload", *connection)
    assert code == 1
    assert "invalid_config" in err
    assert "keys.tester.rpm: " in err
    code, out, err = await shepherd("reload", "--pid", str(gateway.pid))
    assert code == 0, err
    assert out.startswith(f"sent SIGHUP to {gateway.pid}")

    async def refused_twice() -> bool:
        return len(log_lines(gateway, "reload refused")) == 2

    await until(refused_twice, poll_s=0.05)
    assert gateway.proc.returncode is None
