"""Shared fixtures: the mock upstream and the gateway on real loopback sockets.

``mock_upstream`` serves ``scripts/mock_upstream.py`` in-process on a free port.
``start_gateway(**overrides)`` starts the real gateway (``proxy.app.start_server``, the same
set-up ``shepherd serve`` uses) pointed at it; ``gateway`` is one with the defaults below.
``openai_client`` is the official SDK pointed at the gateway, retries off.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import start_server
from proxy.config import Settings, load_settings
from scripts.mock_upstream import MockConfig, create_app

CLIENT_KEY = "sk-test-client-key-0123456789"
OTHER_KEY = "sk-test-limited-key-abcdef"
UPSTREAM_KEY = "sk-upstream-secret-xyz"


@dataclass
class MockUpstream:
    """A running mock upstream: ``base_url`` ends in ``/v1``; helpers read its counters."""

    server: TestServer
    base_url: str

    async def stats(self) -> dict[str, Any]:
        return await self._get("/mock/stats")

    async def requests(self) -> list[dict[str, Any]]:
        return await self._get("/mock/requests")

    async def _get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as session, session.get(
            str(self.server.make_url(path))
        ) as response:
            return await response.json()


async def in_process_mock(aiohttp_server: Callable[..., Awaitable[TestServer]],
                          config: MockConfig) -> MockUpstream:
    """``scripts/mock_upstream.py`` with ``config`` served in-process on a free port."""
    server = await aiohttp_server(create_app(config))
    return MockUpstream(server, str(server.make_url("/v1")))


@pytest.fixture
async def mock_upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> MockUpstream:
    return await in_process_mock(aiohttp_server, MockConfig())


def base_config(upstream_url: str) -> dict[str, Any]:
    """The config tree tests start from: one upstream, a full key and a limited key."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, "sse_keepalive": "15s"},
        "upstreams": {
            "mock": {
                "base_url": upstream_url,
                "api_key": UPSTREAM_KEY,
                "models": ["*"],
                "timeouts": {"connect": "2s", "first_byte": "10s", "read_gap": "10s"},
                # Probes would add GET /v1/models to the mock's request counts; the health
                # tests turn them on explicitly.
                "health_check": {"enabled": False},
            }
        },
        "keys": {
            "tester": {"key": CLIENT_KEY, "models": ["*"]},
            "limited": {"key": OTHER_KEY, "models": ["mock-gpt"]},
        },
        # The usage ledger (on by default) writes a SQLite file; tests/test_ledger.py and
        # tests/integration/test_ledger.py turn it on with a file in tmp_path.
        "ledger": {"enabled": False},
    }


def merge(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``tree``."""
    out = copy.deepcopy(tree)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class RunningGateway:
    """A gateway serving on loopback: ``url`` is ``http://127.0.0.1:<port>``."""

    runner: web.AppRunner
    url: str
    settings: Settings

    @property
    def app(self) -> web.Application:
        return self.runner.app


StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_gateway(mock_upstream: MockUpstream) -> AsyncIterator[StartGateway]:
    runners: list[web.AppRunner] = []

    async def start(config: dict[str, Any] | None = None, **overrides: Any) -> RunningGateway:
        tree = merge(config or base_config(mock_upstream.base_url), overrides)
        settings = load_settings(tree, env={})
        runner, port = await start_server(settings, "127.0.0.1", 0)
        runners.append(runner)
        return RunningGateway(runner, f"http://127.0.0.1:{port}", settings)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> RunningGateway:
    return await start_gateway()


@pytest.fixture
async def openai_client(gateway: RunningGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def http(gateway: RunningGateway) -> AsyncIterator[aiohttp.ClientSession]:
    """A raw aiohttp client with the gateway as base URL and the client key set."""
    async with aiohttp.ClientSession(
        base_url=gateway.url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
    ) as session:
        yield session
