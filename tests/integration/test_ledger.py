"""The usage ledger through a real gateway (DESIGN §3 "ledger.record", §4 "Operations"):
every request — HTTP unary, HTTP stream, a stream whose client left, a WebSocket request, a
refusal — gets exactly one row with its tokens, cost and status; ``GET /admin/usage`` reads
them (JSON, CSV, ``group_by``) behind admin keys only; a clean shutdown writes every
buffered row; PostgreSQL (a real server from the ``postgres_server`` fixture) takes the
same rows, and a database that stops answering mid-load slows no request and loses no row
within ``ledger.buffer_rows`` (past it, the drops are counted).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.ledger import GROUP_COLUMNS, ROW_COLUMNS, Ledger, UsageRow
from proxy.ledger_store import migrations
from proxy.pipeline import GATEWAY
from scripts.mock_upstream import expected_text
from tests.conftest import CLIENT_KEY, OTHER_KEY, RunningGateway, StartGateway, base_config, merge
from tests.integration.conftest import REPO_ROOT, StartGatewayProcess
from tests.integration.pg import PostgresServer

ADMIN_KEY = "sk-admin-test-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
MESSAGES = [{"role": "user", "content": "tell me a story"}]  # 4 prompt tokens at the mock
CHAT = {"model": "mock-gpt", "messages": MESSAGES, "max_tokens": 8}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
COST_4_8 = (4 * 1.0 + 8 * 2.0) / 1e6
WAIT_S = 10.0


def ledger_tree(mock_url: str, db_url: str, **ledger: Any) -> dict[str, Any]:
    return merge(base_config(mock_url), {
        "ledger": {"enabled": True, "url": db_url, "flush_interval": "20ms", **ledger},
        "admin": {"keys": [{"name": "ops", "key": ADMIN_KEY}]},
        "models": {"mock-gpt": {"price": PRICE}},
    })


@pytest.fixture
async def ledger_gateway(start_gateway: StartGateway, mock_upstream: Any, tmp_path: Path) -> RunningGateway:
    return await start_gateway(ledger_tree(mock_upstream.base_url, f"sqlite:///{tmp_path / 'usage.db'}"))


async def usage(gateway_url: str, params: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as session, session.get(
            gateway_url + "/admin/usage", params=params or {}, headers=ADMIN if headers is None else headers
    ) as response:
        text = await response.text()
        body = json.loads(text) if response.content_type == "application/json" else text
        return response.status, body, response.headers


async def wait_rows(gateway_url: str, n: int, **params: str) -> list[dict[str, Any]]:
    """The ledger's rows, oldest first, once there are at least ``n``."""
    deadline = time.monotonic() + WAIT_S
    while True:
        status, body, _ = await usage(gateway_url, {"order": "asc", "limit": "1000", **params})
        assert status == 200, body
        if len(body["data"]) >= n or time.monotonic() > deadline:
            assert len(body["data"]) == n, body["data"]
            return list(body["data"])
        await asyncio.sleep(0.02)


async def metric(gateway_url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(gateway_url + "/metrics") as response:
        text = await response.text()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name)


async def chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[int, bytes, aiohttp.typedefs.LooseHeaders]:
    async with session.post(url + "/v1/chat/completions", json=body, headers={**AUTH, **(headers or {})}
                            ) as response:
        return response.status, await response.read(), response.headers


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in raw.decode().splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


# --- one row per request ------------------------------------------------------------------------


async def test_unary_request_gets_one_row_with_tokens_and_cost(ledger_gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        status, raw, headers = await chat(session, ledger_gateway.url, CHAT)
    assert status == 200
    [row] = await wait_rows(ledger_gateway.url, 1)
    assert row["request_id"] == headers["x-request-id"]
    assert (row["key"], row["model"], row["upstream"], row["endpoint"], row["transport"]) == (
        "tester", "mock-gpt", "mock", "chat.completions", "http")
    assert (row["status"], row["error_code"], row["stream_id"]) == (200, None, None)
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (4, 8, 12)
    assert json.loads(raw)["usage"]["total_tokens"] == 12
    assert row["cost_usd"] == pytest.approx(COST_4_8)
    assert row["latency_ms"] > 0
    assert row["ttft_ms"] is None
    assert 0 <= row["overhead_ms"] <= row["latency_ms"]
    assert row["resumes"] == 0


async def test_stream_gets_one_row_when_it_ends(ledger_gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        status, raw, headers = await chat(session, ledger_gateway.url, STREAM)
    assert status == 200
    [row] = await wait_rows(ledger_gateway.url, 1)
    assert row["stream_id"] == headers["X-Stream-Id"]
    assert row["request_id"] == headers["x-request-id"]
    assert (row["status"], row["transport"]) == (200, "http")
    assert sse_events(raw)[-1]["usage"]["completion_tokens"] == row["completion_tokens"] == 8
    assert row["cost_usd"] == pytest.approx(COST_4_8)
    assert 0 < row["ttft_ms"] <= row["latency_ms"]
    assert 0 <= row["overhead_ms"] <= row["ttft_ms"]


async def test_detached_stream_gets_its_row_with_the_usage_finally_metered(
        ledger_gateway: RunningGateway) -> None:
    slow = {"x-mock-tokens": "40", "x-mock-token-delay-ms": "15"}
    async with aiohttp.ClientSession() as session, session.post(
            ledger_gateway.url + "/v1/chat/completions", json={**STREAM, "max_tokens": 40},
            headers={**AUTH, **slow}) as response:
        assert response.status == 200
        await response.content.readline()  # the first event's id line: then the client leaves
        stream_id = response.headers["X-Stream-Id"]
    [row] = await wait_rows(ledger_gateway.url, 1)  # written when the producer ends, ~0.6 s later
    assert row["stream_id"] == stream_id
    assert (row["status"], row["error_code"]) == (200, None)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (4, 40)
    assert row["latency_ms"] >= 40 * 15 * 0.8


async def test_resumed_stream_counts_its_resumes(ledger_gateway: RunningGateway) -> None:
    slow = {"x-mock-tokens": "30", "x-mock-token-delay-ms": "15"}
    async with aiohttp.ClientSession() as session:
        async with session.post(ledger_gateway.url + "/v1/chat/completions",
                                json={**STREAM, "max_tokens": 30}, headers={**AUTH, **slow}) as response:
            await response.content.readline()
            stream_id = response.headers["X-Stream-Id"]
        async with session.get(f"{ledger_gateway.url}/v1/streams/{stream_id}", headers=AUTH,
                               params={"starting_after": "1"}) as resumed:
            assert resumed.status == 200
            text = await resumed.text()
    assert text.rstrip().endswith("data: [DONE]")
    [row] = await wait_rows(ledger_gateway.url, 1)
    assert (row["stream_id"], row["resumes"], row["completion_tokens"]) == (stream_id, 1, 30)


async def test_stream_failing_mid_way_records_the_error_of_its_error_event(
        ledger_gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        status, raw, _ = await chat(session, ledger_gateway.url, STREAM, {"x-mock-reset-after": "3"})
    assert status == 200
    error = sse_events(raw)[-1]["error"]
    [row] = await wait_rows(ledger_gateway.url, 1)
    assert row["status"] == 502
    assert row["error_code"] == error["code"] is not None
    assert row["completion_tokens"] == 3  # one per event generated (no usage object came)


async def test_websocket_request_gets_a_row_with_transport_websocket(ledger_gateway: RunningGateway) -> None:
    ws_url = ledger_gateway.url.replace("http://", "ws://") + "/v1/ws"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, headers=AUTH) as ws:
        await ws.send_json({"type": "request", "id": "r1", "body": CHAT})
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads((await ws.receive(timeout=WAIT_S)).data))
    assert frames[-1]["type"] == "done"
    assert "".join(c["delta"].get("content") or "" for f in frames[:-1]
                   for c in f["data"]["choices"]) == expected_text(8)
    [row] = await wait_rows(ledger_gateway.url, 1)
    assert (row["transport"], row["status"], row["stream_id"]) == ("websocket", 200, frames[0]["stream_id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (4, 8)
    assert row["request_id"].startswith("req_")


async def test_refusals_get_a_row_with_their_status(start_gateway: StartGateway, mock_upstream: Any,
                                                    tmp_path: Path) -> None:
    tree = ledger_tree(mock_upstream.base_url, f"sqlite:///{tmp_path / 'usage.db'}")
    tree["keys"]["limited"]["rpm"] = 1
    gateway = await start_gateway(tree)
    async with aiohttp.ClientSession() as session:
        limited = {"Authorization": f"Bearer {OTHER_KEY}"}
        assert (await chat(session, gateway.url, {**CHAT, "model": "other"}, limited))[0] == 404
        assert (await chat(session, gateway.url, CHAT, limited))[0] == 200
        assert (await chat(session, gateway.url, CHAT, limited))[0] == 429
        assert (await chat(session, gateway.url, CHAT, {"x-mock-status": "400"}))[0] == 400
    rows = await wait_rows(gateway.url, 4)
    assert [(r["key"], r["status"], r["total_tokens"]) for r in rows] == [
        ("limited", 404, 0), ("limited", 200, 12), ("limited", 429, 0), ("tester", 400, 0)]
    assert rows[0]["error_code"] == "model_not_found"
    assert rows[2]["error_code"] is not None


# --- GET /admin/usage ---------------------------------------------------------------------------


async def test_admin_usage_needs_an_admin_key(ledger_gateway: RunningGateway) -> None:
    status, body, _ = await usage(ledger_gateway.url, headers={})
    assert status == 401
    assert body["error"]["code"] == "missing_api_key"
    status, body, _ = await usage(ledger_gateway.url, headers=AUTH)  # a virtual key never opens it
    assert status == 403
    assert body["error"]["code"] == "admin_key_required"
    assert body["error"]["type"] == "invalid_request_error"
    status, body, _ = await usage(ledger_gateway.url, headers={"Authorization": "Bearer sk-nobody"})
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    status, body, _ = await usage(ledger_gateway.url, headers={"x-api-key": ADMIN_KEY})
    assert status == 200
    assert body["object"] == "list"


async def test_admin_usage_is_disabled_without_admin_keys(gateway: RunningGateway) -> None:
    status, body, _ = await usage(gateway.url)
    assert status == 403
    assert body["error"]["code"] == "admin_disabled"


async def test_admin_usage_json_csv_group_by_and_pages(ledger_gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        for body in (CHAT, CHAT, {**CHAT, "model": "mock-mini"}, STREAM):
            assert (await chat(session, ledger_gateway.url, body))[0] == 200
        limited = {"Authorization": f"Bearer {OTHER_KEY}"}
        assert (await chat(session, ledger_gateway.url, CHAT, limited))[0] == 200
    rows = await wait_rows(ledger_gateway.url, 5)
    status, page, headers = await usage(ledger_gateway.url, {"limit": "2"})
    assert status == 200
    assert page["has_more"]
    assert len(page["data"]) == 2
    assert [r["id"] for r in page["data"]] == [rows[4]["id"], rows[3]["id"]]  # newest first
    assert headers["X-Next-Cursor"] == str(page["next_cursor"])
    _, rest, _ = await usage(ledger_gateway.url, {"limit": "10", "cursor": str(page["next_cursor"])})
    assert [r["id"] for r in rest["data"]] == [r["id"] for r in reversed(rows[:3])]
    assert not rest["has_more"]

    _, by_model, _ = await usage(ledger_gateway.url, {"group_by": "model"})
    assert {g["model"]: g["requests"] for g in by_model["data"]} == {"mock-gpt": 4, "mock-mini": 1}
    priced = next(g for g in by_model["data"] if g["model"] == "mock-gpt")
    assert priced["cost_usd"] == pytest.approx(4 * COST_4_8)
    assert priced["total_tokens"] == 48
    unpriced = next(g for g in by_model["data"] if g["model"] == "mock-mini")
    assert unpriced["cost_usd"] is None
    _, by_key, _ = await usage(ledger_gateway.url, {"group_by": "key", "model": "mock-gpt"})
    assert {g["key"]: g["requests"] for g in by_key["data"]} == {"limited": 1, "tester": 3}
    _, by_day, _ = await usage(ledger_gateway.url, {"group_by": "day", "since": rows[0]["time"]})
    assert [g["requests"] for g in by_day["data"]] == [5]
    _, none, _ = await usage(ledger_gateway.url, {"until": rows[0]["time"][:10]})
    assert none["data"] == []
    _, later, _ = await usage(ledger_gateway.url, {"since": str(int(time.time()) + 3600)})
    assert later["data"] == []

    status, text, headers = await usage(ledger_gateway.url, {"key": "tester"},
                                        {**ADMIN, "Accept": "text/csv"})
    assert status == 200
    assert headers["Content-Type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(text)))
    assert tuple(table[0]) == ROW_COLUMNS
    assert len(table) == 1 + 4
    assert {line[ROW_COLUMNS.index("key")] for line in table[1:]} == {"tester"}
    _, text, _ = await usage(ledger_gateway.url, {"group_by": "key"}, {**ADMIN, "Accept": "text/csv"})
    table = list(csv.reader(io.StringIO(text)))
    assert tuple(table[0]) == ("key", *GROUP_COLUMNS)
    assert [line[:2] for line in table[1:]] == [
        ["limited", "1"], ["tester", "4"]]


@pytest.mark.parametrize(("params", "param"), [
    ({"since": "last week"}, "since"), ({"group_by": "upstream"}, "group_by"),
    ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"cursor": "x"}, "cursor"),
    ({"order": "up"}, "order"),
])
async def test_admin_usage_names_a_malformed_parameter(ledger_gateway: RunningGateway,
                                                       params: dict[str, str], param: str) -> None:
    status, body, _ = await usage(ledger_gateway.url, params)
    assert status == 400
    assert body["error"]["param"] == param


# --- shutdown -----------------------------------------------------------------------------------


async def test_clean_shutdown_writes_every_buffered_row(gateway_process: StartGatewayProcess,
                                                       mock_upstream: Any, tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    tree = ledger_tree(mock_upstream.base_url, f"sqlite:///{db}", flush_interval="1h", batch_size=10_000)
    process = await gateway_process(tree)
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(chat(session, process.url, CHAT) for _ in range(50)))
    assert {s for s, _, _ in statuses} == {200}
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 0  # all still buffered
    assert await process.stop() == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*), SUM(total_tokens) FROM usage").fetchone() == (50, 50 * 12)


# --- PostgreSQL ---------------------------------------------------------------------------------


async def pg_rows(server: PostgresServer) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(server.url)
    try:
        return list(await conn.fetch("SELECT * FROM usage ORDER BY id"))
    finally:
        await conn.close()


async def test_postgres_ledger_takes_the_same_rows(start_gateway: StartGateway, mock_upstream: Any,
                                                   postgres_server: PostgresServer) -> None:
    gateway = await start_gateway(ledger_tree(mock_upstream.base_url, postgres_server.url))
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, gateway.url, CHAT))[0] == 200
        assert (await chat(session, gateway.url, STREAM))[0] == 200
    rows = await wait_rows(gateway.url, 2)
    assert [(r["status"], r["total_tokens"], r["stream_id"] is not None) for r in rows] == [
        (200, 12, False), (200, 12, True)]
    assert rows[0]["time"].endswith("Z")
    assert rows[1]["cost_usd"] == pytest.approx(COST_4_8)
    _, by_day, _ = await usage(gateway.url, {"group_by": "day"})
    assert [(g["requests"], g["total_tokens"]) for g in by_day["data"]] == [(2, 24)]
    _, text, _ = await usage(gateway.url, {"group_by": "model"}, {**ADMIN, "Accept": "text/csv"})
    assert text.splitlines()[1].startswith("mock-gpt,2,0,8,16,24,")
    conn = await asyncpg.connect(postgres_server.url)
    try:
        records = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        applied = [r["version"] for r in records]
        assert applied == [version for version, _, _ in migrations("postgresql")]
    finally:
        await conn.close()
    ledger = gateway.app[GATEWAY].ledger
    assert isinstance(ledger, Ledger)
    rows_in_pg = await pg_rows(postgres_server)
    batch = [UsageRow(r["ts"].timestamp(), r["request_id"], r["key_name"], r["endpoint"], r["transport"],
                      r["status"]).values() for r in rows_in_pg]
    await ledger.store.insert(batch)  # a retried batch that had committed: ignored
    assert len(await pg_rows(postgres_server)) == 2
    await gateway.runner.cleanup()  # a second start on the same database migrates nothing
    again = await start_gateway(ledger_tree(mock_upstream.base_url, postgres_server.url))
    assert len(await wait_rows(again.url, 2)) == 2


async def wait_pg_rows(server: PostgresServer, n: int, timeout_s: float = 20.0) -> list[asyncpg.Record]:
    """The rows in PostgreSQL once there are ``n`` (or what is there after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await pg_rows(server)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def timed_requests(url: str, n: int, concurrency: int = 8) -> list[float]:
    """Latencies (s) of ``n`` unary requests, ``concurrency`` at a time; every one must be 200."""
    latencies: list[float] = []
    semaphore = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession) -> None:
        async with semaphore:
            started = time.perf_counter()
            status, _, _ = await chat(session, url, CHAT)
            latencies.append(time.perf_counter() - started)
            assert status == 200

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session) for _ in range(n)))
    return latencies


async def test_postgres_paused_mid_load_slows_no_request_and_loses_no_row(
        start_gateway: StartGateway, mock_upstream: Any, postgres_server: PostgresServer) -> None:
    gateway = await start_gateway(ledger_tree(mock_upstream.base_url, postgres_server.url,
                                              write_timeout="300ms", batch_size=50))
    before = await timed_requests(gateway.url, 100)
    await wait_rows(gateway.url, 100)
    postgres_server.pause()  # SIGSTOP: connections open, nothing answers
    try:
        during = await timed_requests(gateway.url, 300)
        await asyncio.sleep(1.0)  # writes time out and are retried meanwhile
        assert await metric(gateway.url, "shepherd_ledger_write_errors_total") >= 1
        assert await metric(gateway.url, "shepherd_ledger_buffered_rows") == 300
    finally:
        postgres_server.resume()
    assert statistics.median(during) < statistics.median(before) * 3 + 0.02
    assert max(during) < 1.0
    rows = await wait_pg_rows(postgres_server, 400)
    assert len(rows) == 400
    assert len({r["request_id"] for r in rows}) == 400
    assert await metric(gateway.url, "shepherd_ledger_rows_dropped_total") == 0


async def test_postgres_down_past_the_buffer_counts_the_dropped_rows(
        start_gateway: StartGateway, mock_upstream: Any, postgres_server: PostgresServer) -> None:
    gateway = await start_gateway(ledger_tree(mock_upstream.base_url, postgres_server.url,
                                              write_timeout="300ms", buffer_rows=40))
    postgres_server.pause()
    try:
        await timed_requests(gateway.url, 100)
        assert await metric(gateway.url, "shepherd_ledger_rows_dropped_total") == 60
    finally:
        postgres_server.resume()
    assert len(await wait_pg_rows(postgres_server, 40)) == 40
    await asyncio.sleep(0.2)
    assert len(await pg_rows(postgres_server)) == 40
    assert await metric(gateway.url, "shepherd_ledger_rows_written_total") == 40


# --- shepherd usage -----------------------------------------------------------------------------


async def shepherd(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "usage", *args, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_shepherd_usage_prints_a_table_json_or_csv(ledger_gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        for body in (CHAT, STREAM):
            assert (await chat(session, ledger_gateway.url, body))[0] == 200
    await wait_rows(ledger_gateway.url, 2)
    url = ["--url", ledger_gateway.url]
    code, out, _ = await shepherd(*url, env={"SHEPHERD_ADMIN_KEY": ADMIN_KEY})
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split()[:4] == ["TIME", "KEY", "MODEL", "ENDPOINT"]
    assert len(lines) == 3
    assert all(" tester " in line and " mock-gpt " in line and " 0.000020 " in line for line in lines[1:])
    code, out, _ = await shepherd(*url, "--admin-key", ADMIN_KEY, "--group-by", "model")
    assert code == 0
    assert out.splitlines()[1].split()[:6] == ["mock-gpt", "2", "0", "8", "16", "24"]
    code, out, _ = await shepherd(*url, "--admin-key", ADMIN_KEY, "--json", "--key", "tester", "--limit", "1")
    assert code == 0
    assert json.loads(out)["has_more"] is True
    code, out, _ = await shepherd(*url, "--admin-key", ADMIN_KEY, "--csv", "--group-by", "key")
    assert code == 0
    assert out.splitlines()[0] == ",".join(("key", *GROUP_COLUMNS))


async def test_shepherd_usage_says_why_it_was_refused(ledger_gateway: RunningGateway) -> None:
    code, _, err = await shepherd("--url", ledger_gateway.url, env={"SHEPHERD_ADMIN_KEY": ""})
    assert code == 2
    assert "admin key is needed" in err
    code, _, err = await shepherd("--url", ledger_gateway.url, "--admin-key", CLIENT_KEY)
    assert code == 1
    assert "403" in err
    assert "admin_key_required" in err
    assert CLIENT_KEY not in err
    code, _, err = await shepherd("--url", "http://127.0.0.1:9", "--admin-key", ADMIN_KEY)
    assert code == 2
    assert "cannot reach" in err
