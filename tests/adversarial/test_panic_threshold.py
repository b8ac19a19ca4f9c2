"""Outlier detection never ejects the last capacity of a model (issue: hardening; Envoy's
panic threshold, ``routing.panic_threshold_percent``).

Under 10,000 concurrent streams through one process, the only deployment of a model was
ejected by passive outlier detection and 11 requests got 503 ``no_healthy_upstream``. Here
the real gateway (``tests/conftest.py``) and the in-process mock upstream replay it: the
mock's ``x-mock-status: 500`` knob makes 5 requests in a row fail (the default
``outlier_detection.consecutive_failures``; retries are off so each request is one attempt),
which ejects the model's only deployment. With the default threshold (50 %: 0 of 1 healthy
is below it) the next normal request is still routed there and ``/readyz`` says ready; with
``panic_threshold_percent: 0`` (panic off) both answer 503 as before.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from proxy.pipeline import GATEWAY
from tests.conftest import CLIENT_KEY, MockUpstream, RunningGateway, StartGateway

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
CHAT_PATH = "/v1/chat/completions"
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
FAILURES_TO_EJECT = 5  # outlier_detection.consecutive_failures, the default


async def post_chat(session: aiohttp.ClientSession, gateway: RunningGateway,
                    headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with session.post(gateway.url + CHAT_PATH, json=CHAT, headers={**AUTH, **(headers or {})}
                            ) as response:
        return response.status, await response.json()


async def readyz(session: aiohttp.ClientSession, gateway: RunningGateway) -> tuple[int, dict[str, Any]]:
    async with session.get(gateway.url + "/readyz") as response:
        return response.status, await response.json()


async def eject_the_only_deployment(session: aiohttp.ClientSession, gateway: RunningGateway) -> None:
    for _ in range(FAILURES_TO_EJECT):
        status, body = await post_chat(session, gateway, {"x-mock-status": "500"})
        assert status == 500, body
    _, ready = await readyz(session, gateway)
    assert ready["upstreams"]["mock"]["state"] == "ejected"


async def chat_count(mock_upstream: MockUpstream) -> int:
    return int((await mock_upstream.stats())["by_path"].get(CHAT_PATH, 0))


async def test_ejected_only_deployment_still_takes_traffic_in_panic(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(routing={"retry": {"attempts": 1}})
    async with aiohttp.ClientSession() as session:
        await eject_the_only_deployment(session, gateway)
        status, body = await post_chat(session, gateway)
        assert status == 200, body
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"]
        assert await chat_count(mock_upstream) == FAILURES_TO_EJECT + 1  # it reached the upstream
        ready_status, ready = await readyz(session, gateway)
        assert (ready_status, ready["status"]) == (200, "ready")
        assert ready["upstreams"]["mock"]["state"] == "ejected"  # ejected, served in panic
        async with session.get(gateway.url + "/metrics") as response:
            assert 'shepherd_lb_panic_total{upstreams="mock"} 1.0' in await response.text()
    balancer = gateway.app[GATEWAY].balancer
    assert balancer.panic_models() == ["mock-gpt"]
    assert balancer.panics == 1


async def test_with_panic_off_the_ejected_only_deployment_is_503(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(routing={"retry": {"attempts": 1}, "panic_threshold_percent": 0})
    async with aiohttp.ClientSession() as session:
        await eject_the_only_deployment(session, gateway)
        status, body = await post_chat(session, gateway)
        assert status == 503, body
        assert body["error"]["code"] == "no_healthy_upstream"
        assert await chat_count(mock_upstream) == FAILURES_TO_EJECT
        ready_status, ready = await readyz(session, gateway)
        assert (ready_status, ready["status"]) == (503, "no_healthy_upstream")
    assert gateway.app[GATEWAY].balancer.panics == 0


async def test_failures_while_served_in_panic_reach_the_client_as_the_upstreams_answer(
        start_gateway: StartGateway, mock_upstream: MockUpstream) -> None:
    """Failures while ejected (served in panic) neither extend the ejection nor stop the
    traffic: each request still reaches the upstream and gets its real answer."""
    gateway = await start_gateway(routing={"retry": {"attempts": 1}})
    async with aiohttp.ClientSession() as session:
        await eject_the_only_deployment(session, gateway)
        for _ in range(3):
            status, body = await post_chat(session, gateway, {"x-mock-status": "500"})
            assert status == 500, body  # the upstream's own answer, not 503 no_healthy_upstream
        assert await chat_count(mock_upstream) == FAILURES_TO_EJECT + 3
        assert (await post_chat(session, gateway))[0] == 200
