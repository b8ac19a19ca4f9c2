"""Virtual keys at runtime and ``/admin/streams`` through a real gateway (DESIGN §4
"Operations"): a key created with ``POST /admin/keys`` works at once with its limits,
``GET /admin/keys`` shows what it has left, ``PATCH`` changes it, ``DELETE`` revokes it (401
at once here, within ``KEYS_POLL_INTERVAL_S`` on another process sharing the database —
SQLite in WAL mode, or PostgreSQL); config keys are read-only; bad bodies are 400 with
``param``; a virtual key never opens ``/admin``; the secret is shown once and never logged
or listed; ``shepherd keys`` wraps it all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.runtime_keys import SECRET_PREFIX
from tests.conftest import CLIENT_KEY, RunningGateway, StartGateway, base_config, merge
from tests.integration.conftest import REPO_ROOT, StartGatewayProcess
from tests.integration.pg import PostgresServer

ADMIN_KEY = "sk-admin-keys-test-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
#: A change made on one process is seen by another within this (KEYS_POLL_INTERVAL_S + a query).
PROPAGATION_S = 2.0


def keys_tree(mock_url: str, db_url: str) -> dict[str, Any]:
    return merge(base_config(mock_url), {
        "ledger": {"enabled": True, "url": db_url, "flush_interval": "20ms"},
        "admin": {"keys": [{"name": "ops", "key": ADMIN_KEY}]},
    })


@pytest.fixture
async def keys_gateway(start_gateway: StartGateway, mock_upstream: Any, tmp_path: Path) -> RunningGateway:
    return await start_gateway(keys_tree(mock_upstream.base_url, f"sqlite:///{tmp_path / 'keys.db'}"))


async def admin(session: aiohttp.ClientSession, method: str, url: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with session.request(method, url, json=body, headers=ADMIN if headers is None else headers
                               ) as response:
        return response.status, await response.json()


async def chat(session: aiohttp.ClientSession, url: str, key: str) -> tuple[int, Any]:
    async with session.post(url + "/v1/chat/completions", json=CHAT,
                            headers={"Authorization": f"Bearer {key}"}) as response:
        return response.status, await response.json()


async def wait_status(session: aiohttp.ClientSession, url: str, key: str, status: int) -> float:
    """Seconds until a request with ``key`` answers ``status`` (fails after 5 s)."""
    start = time.monotonic()
    while True:
        got, body = await chat(session, url, key)
        if got == status:
            return time.monotonic() - start
        assert time.monotonic() - start < 5.0, (got, body)
        await asyncio.sleep(0.05)


# --- one gateway ------------------------------------------------------------------------------


async def test_create_use_list_patch_revoke(keys_gateway: RunningGateway,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = keys_gateway.url
    async with aiohttp.ClientSession() as session:
        status, created = await admin(session, "POST", url + "/admin/keys", {
            "name": "team-a", "models": ["mock-gpt"], "rpm": 1, "burst": 1,
            "budget": {"tokens": 1000, "period": "1d"}})
        assert status == 201, created
        secret = created["key"]
        assert secret.startswith(SECRET_PREFIX)
        assert len(secret) == len(SECRET_PREFIX) + 32
        assert (created["name"], created["source"], created["rpm"]) == ("team-a", "runtime", 1)

        assert (await chat(session, url, secret))[0] == 200           # works at once
        status, refused = await chat(session, url, secret)            # rpm 1, burst 1
        assert (status, refused["error"]["code"]) == (429, "rate_limit_exceeded")

        status, listed = await admin(session, "GET", url + "/admin/keys")
        assert status == 200
        by_name = {k["name"]: k for k in listed["data"]}
        assert set(by_name) == {"tester", "limited", "team-a"}
        assert by_name["tester"]["source"] == "config"
        team = by_name["team-a"]
        assert (team["requests_left"], team["left_from"]) == (0, "process")
        assert 1000 - 8 - 4 <= team["budget_tokens_left"] < 1000 - 8  # 8 completion + the prompt's
        assert 0 < team["requests_reset_s"] <= 60
        assert secret not in json.dumps(listed)

        status, patched = await admin(session, "PATCH", url + "/admin/keys/team-a",
                                      {"models": ["other-model"], "tpm": 5000})
        assert (status, patched["models"], patched["tpm"], patched["rpm"]) == (200, ["other-model"], 5000, 1)
        status, body = await chat(session, url, secret)                 # the new models, at once
        assert (status, body["error"]["code"]) == (404, "model_not_found")

        status, revoked = await admin(session, "DELETE", url + "/admin/keys/team-a")
        assert status == 200
        assert revoked["revoked_at"] is not None
        status, body = await chat(session, url, secret)
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")  # at once, as unknown

        status, listed = await admin(session, "GET", url + "/admin/keys")
        assert "team-a" not in {k["name"] for k in listed["data"]}
        status, listed = await admin(session, "GET", url + "/admin/keys?include_revoked=true")
        assert "team-a" in {k["name"] for k in listed["data"]}
        status, again = await admin(session, "POST", url + "/admin/keys", {"name": "team-a"})
        assert (status, again["error"]["code"]) == (409, "key_exists")   # names are not reused
    assert secret not in caplog.text
    assert all(secret not in repr(vars(record)) for record in caplog.records)
    assert any(getattr(r, "key_name", None) == "team-a" for r in caplog.records)  # the name, never the key


async def test_in_flight_request_of_a_revoked_key_finishes(keys_gateway: RunningGateway) -> None:
    url = keys_gateway.url
    async with aiohttp.ClientSession() as session:
        _, created = await admin(session, "POST", url + "/admin/keys", {"name": "slow"})
        slow = {"Authorization": f"Bearer {created['key']}", "x-mock-tokens": "20",
                "x-mock-token-delay-ms": "20"}
        async with session.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 20},
                                headers=slow) as response:
            status, _ = await admin(session, "DELETE", url + "/admin/keys/slow")
            assert status == 200
            assert response.status == 200
            body = await response.json()
        assert body["usage"]["completion_tokens"] == 20
        assert (await chat(session, url, created["key"]))[0] == 401


async def test_config_keys_are_read_only(keys_gateway: RunningGateway) -> None:
    url = keys_gateway.url
    async with aiohttp.ClientSession() as session:
        for method, body in (("PATCH", {"rpm": 5}), ("DELETE", None)):
            status, answer = await admin(session, method, url + "/admin/keys/tester", body)
            assert (status, answer["error"]["code"]) == (409, "key_read_only")
            assert "config" in answer["error"]["message"]
        status, answer = await admin(session, "POST", url + "/admin/keys", {"name": "tester"})
        assert (status, answer["error"]["code"]) == (409, "key_exists")
        status, answer = await admin(session, "DELETE", url + "/admin/keys/nobody")
        assert (status, answer["error"]["code"]) == (404, "key_not_found")
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, url, CLIENT_KEY))[0] == 200


@pytest.mark.parametrize(("body", "param"), [
    ({"models": ["*"]}, "name"),
    ({"name": "has space"}, "name"),
    ({"name": "x", "rpm": 0}, "rpm"),
    ({"name": "x", "rpm": "many"}, "rpm"),
    ({"name": "x", "models": []}, "models"),
    ({"name": "x", "budget": {"period": "1d"}}, "budget"),
    ({"name": "x", "budget": {"tokens": 5, "period": "soon"}}, "budget.period"),
    ({"name": "x", "per_model": {"gpt-4o": {"rpm": -1}}}, "per_model.gpt-4o.rpm"),
    ({"name": "x", "colour": "blue"}, "colour"),
    ({"name": "x", "key": "sk-mine"}, "key"),
    ({"name": "x", "key_sha256": "0" * 64}, "key_sha256"),
])
async def test_bad_fields_are_400_with_param(keys_gateway: RunningGateway, body: dict[str, Any],
                                             param: str) -> None:
    async with aiohttp.ClientSession() as session:
        status, answer = await admin(session, "POST", keys_gateway.url + "/admin/keys", body)
        assert status == 400, answer
        assert answer["error"]["param"] == param
        status, answer = await admin(session, "GET", keys_gateway.url + "/admin/keys/x")
        assert status == 404


async def test_bad_patch_is_400_and_changes_nothing(keys_gateway: RunningGateway) -> None:
    url = keys_gateway.url
    async with aiohttp.ClientSession() as session:
        await admin(session, "POST", url + "/admin/keys", {"name": "p", "rpm": 10})
        status, answer = await admin(session, "PATCH", url + "/admin/keys/p", {"tpm": -5})
        assert (status, answer["error"]["param"]) == (400, "tpm")
        status, answer = await admin(session, "PATCH", url + "/admin/keys/p", {"name": "q"})
        assert (status, answer["error"]["param"]) == (400, "name")
        _, key = await admin(session, "GET", url + "/admin/keys/p")
        assert (key["rpm"], key["tpm"]) == (10, None)
        status, answer = await admin(session, "PATCH", url + "/admin/keys/p", {"rpm": None, "tpm": 100})
        assert (status, answer["rpm"], answer["tpm"]) == (200, None, 100)


async def test_admin_keys_need_an_admin_key(keys_gateway: RunningGateway) -> None:
    url = keys_gateway.url
    async with aiohttp.ClientSession() as session:
        _, created = await admin(session, "POST", url + "/admin/keys", {"name": "virtual"})
        for key in (CLIENT_KEY, created["key"]):
            for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/streams"),
                                 ("DELETE", "/admin/keys/virtual")):
                status, answer = await admin(session, method, url + path, {"name": "z"},
                                             headers={"Authorization": f"Bearer {key}"})
                assert (status, answer["error"]["code"]) == (403, "admin_key_required"), (method, path)
        status, _ = await admin(session, "GET", url + "/admin/keys", headers={})
        assert status == 401


async def test_runtime_keys_need_the_ledger_database(gateway: RunningGateway, start_gateway: StartGateway,
                                                     mock_upstream: Any) -> None:
    tree = merge(base_config(mock_upstream.base_url), {"admin": {"keys": [ADMIN_KEY]}})
    no_ledger = await start_gateway(tree)
    async with aiohttp.ClientSession() as session:
        status, answer = await admin(session, "POST", no_ledger.url + "/admin/keys", {"name": "n"})
        assert (status, answer["error"]["code"]) == (404, "runtime_keys_disabled")
        status, listed = await admin(session, "GET", no_ledger.url + "/admin/keys")
        assert status == 200
        assert {k["source"] for k in listed["data"]} == {"config"}


async def test_admin_streams_shows_live_and_detached_streams_by_key(keys_gateway: RunningGateway) -> None:
    url = keys_gateway.url
    slow = {"x-mock-tokens": "200", "x-mock-token-delay-ms": "20"}
    body = {**CHAT, "stream": True, "max_tokens": 200}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {CLIENT_KEY}", **slow}) as gone:
            await gone.content.readline()
            detached_id = gone.headers["X-Stream-Id"]
        async with session.post(url + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {CLIENT_KEY}", **slow}) as live:
            await live.content.readline()
            live_id = live.headers["X-Stream-Id"]
            deadline = time.monotonic() + 5
            while True:
                status, listed = await admin(session, "GET", url + "/admin/streams?key=tester")
                assert status == 200
                assert listed["instance"] == "this"
                states = {s["stream_id"]: s for s in listed["data"]}
                if states.get(detached_id, {}).get("state") == "detached" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert states[live_id]["state"] == "live"
            assert states[live_id]["readers"] == 1
            assert states[detached_id]["state"] == "detached"
            assert states[detached_id]["readers"] == 0
            for stream in states.values():
                assert (stream["key"], stream["model"], stream["endpoint"]) == (
                    "tester", "mock-gpt", "chat.completions")
                assert stream["last_seq"] >= 1
                assert stream["age_s"] >= 0
            _, others = await admin(session, "GET", url + "/admin/streams?key=limited")
            assert others["data"] == []


# --- two processes sharing one database -------------------------------------------------------


async def across_two_processes(gateway_process: StartGatewayProcess, tree: dict[str, Any]) -> None:
    a = await gateway_process(tree)
    b = await gateway_process(tree)
    async with aiohttp.ClientSession() as session:
        status, created = await admin(session, "POST", a.url + "/admin/keys", {"name": "shared", "rpm": 600})
        assert status == 201, created
        secret = created["key"]
        assert await wait_status(session, b.url, secret, 200) < PROPAGATION_S
        _, on_b = await admin(session, "GET", b.url + "/admin/keys/shared")
        assert (on_b["source"], on_b["rpm"]) == ("runtime", 600)
        await admin(session, "PATCH", a.url + "/admin/keys/shared", {"models": ["other-model"]})
        started = time.monotonic()
        while (await chat(session, b.url, secret))[0] != 404:  # model_not_found: the new models
            assert time.monotonic() - started < PROPAGATION_S
            await asyncio.sleep(0.05)
        status, _ = await admin(session, "DELETE", a.url + "/admin/keys/shared")
        assert status == 200
        assert await wait_status(session, b.url, secret, 401) < PROPAGATION_S
    for process in (a, b):
        assert secret not in process.log_text()


async def test_key_created_on_one_process_works_on_another_sqlite(
        gateway_process: StartGatewayProcess, mock_upstream: Any, tmp_path: Path) -> None:
    await across_two_processes(gateway_process, keys_tree(mock_upstream.base_url,
                                                          f"sqlite:///{tmp_path / 'shared.db'}"))


async def test_key_created_on_one_process_works_on_another_postgres(
        gateway_process: StartGatewayProcess, mock_upstream: Any, postgres_server: PostgresServer) -> None:
    await across_two_processes(gateway_process, keys_tree(mock_upstream.base_url, postgres_server.url))


# --- shepherd keys ----------------------------------------------------------------------------


async def shepherd_keys(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "keys", *args, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "SHEPHERD_ADMIN_KEY": ADMIN_KEY},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_shepherd_keys_create_list_update_revoke(keys_gateway: RunningGateway) -> None:
    url = ["--url", keys_gateway.url]
    code, out, err = await shepherd_keys("create", "cli-key", *url, "--models", "mock-gpt", "--rpm", "60",
                                         "--budget-usd", "5")
    assert code == 0, err
    secret = next(line.split()[1] for line in out.splitlines() if line.startswith("key: "))
    assert secret.startswith(SECRET_PREFIX)
    assert "shown only now" in out
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, keys_gateway.url, secret))[0] == 200
    code, out, _ = await shepherd_keys("list", *url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "SOURCE", "MODELS"]
    assert any(line.split()[:4] == ["cli-key", "runtime", "mock-gpt", "60"] for line in lines)
    assert secret not in out
    code, out, _ = await shepherd_keys("update", "cli-key", *url, "--tpm", "1000", "--json")
    assert code == 0
    assert json.loads(out)["tpm"] == 1000
    code, _, err = await shepherd_keys("revoke", "tester", *url)
    assert code == 1
    assert "key_read_only" in err
    code, out, _ = await shepherd_keys("revoke", "cli-key", *url)
    assert code == 0
    assert "revoked_at" in out
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, keys_gateway.url, secret))[0] == 401
    code, _, err = await shepherd_keys("create", "bad", *url, "--rpm", "0")
    assert code == 1
    assert "rpm" in err


async def test_left_is_read_from_redis_with_the_redis_backend(
        start_gateway: StartGateway, mock_upstream: Any, redis_server: Any, tmp_path: Path) -> None:
    tree = merge(keys_tree(mock_upstream.base_url, f"sqlite:///{tmp_path / 'keys.db'}"),
                 {"state": {"backend": "redis", "redis_url": redis_server.url}})
    gateway = await start_gateway(tree)
    async with aiohttp.ClientSession() as session:
        _, created = await admin(session, "POST", gateway.url + "/admin/keys",
                                 {"name": "shared", "rpm": 60, "burst": 5, "tpm": 10000, "max_concurrent": 3})
        assert (await chat(session, gateway.url, created["key"]))[0] == 200
        _, key = await admin(session, "GET", gateway.url + "/admin/keys/shared")
    assert key["left_from"] == "redis"
    assert key["requests_left"] == 4
    assert 10000 - 8 - 4 <= key["tokens_left"] < 10000
    assert key["concurrent_left"] == 3
