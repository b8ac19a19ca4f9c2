"""A hostile client cannot take the gateway down or make it leak (issue: hardening, 2).

Clients here are raw sockets (``asyncio.open_connection``) against the gateway of
``tests/conftest.py``: slowloris headers are cut at ``server.header_timeout``, an idle
keep-alive connection at ``server.keepalive_timeout``, a connection past
``server.max_connections`` is refused at once with a 503 and counted, and what aiohttp's
HTTP parser rejects is answered in the OpenAI error shape without echoing the request. None
of it reaches the upstream. The start-up side (backlog, ``RLIMIT_NOFILE``) is checked on the
in-process gateway and on ``python -m proxy serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import proxy.app
from proxy.listener import (
    LOG_INTERVAL_S,
    ConnectionGuard,
    GatewayRunner,
    client_connection_cap,
    parse_error,
    refusal_bytes,
)
from tests.conftest import CLIENT_KEY, MockUpstream, RunningGateway, StartGateway, base_config, merge
from tests.integration import conftest as integration
from tests.integration.conftest import GatewayProcess, StartGatewayProcess, wait_healthy

gateway_process = integration.gateway_process  # the subprocess fixture, for the start-up checks

SECRET = "sk-live-SECRET-do-not-echo-0123456789"
CHAT = b'{"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}'
DEADLINE_S = 5.0


def request(method: str = "GET", path: str = "/healthz", body: bytes = b"", *,
            headers: tuple[str, ...] = ()) -> bytes:
    """One HTTP/1.1 request, keep-alive, with the client key."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", f"Authorization: Bearer {CLIENT_KEY}",
             *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes

    def json(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = json.loads(self.body)
        return out


async def read_reply(reader: asyncio.StreamReader, timeout_s: float = DEADLINE_S) -> Reply:
    """One response with a ``Content-Length`` body."""
    async with asyncio.timeout(timeout_s):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip()
                   for name, value in (line.split(":", 1) for line in lines if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Reply(int(status_line.split()[1]), headers, body, head + body)


async def closed_after(reader: asyncio.StreamReader, timeout_s: float = DEADLINE_S) -> float:
    """Seconds until the server closes the connection (EOF or reset); fails past ``timeout_s``."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
    return time.monotonic() - started


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def ask(self, data: bytes) -> Reply:
        self.writer.write(data)
        await self.writer.drain()
        return await read_reply(self.reader)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


Connect = Callable[[RunningGateway], Awaitable[Connection]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    opened: list[Connection] = []

    async def open_to(gateway: RunningGateway) -> Connection:
        port = int(gateway.url.rsplit(":", 1)[1])
        connection = Connection(*await asyncio.open_connection("127.0.0.1", port))
        opened.append(connection)
        return connection

    yield open_to
    await asyncio.gather(*(c.close() for c in opened))


async def drip(writer: asyncio.StreamWriter, every_s: float = 0.2, limit: int = 100) -> None:
    """Slowloris: a request line, then one header byte every ``every_s`` seconds (at most
    ``limit`` bytes), never the blank line that ends the headers."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
    for _ in range(limit):
        if writer.is_closing():
            return
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(every_s)
        writer.write(b"a")


def refused_total(text: str, reason: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "shepherd_connections_refused_total" and sample.labels["reason"] == reason:
                return sample.value
    return 0.0


async def metrics_text(gateway: RunningGateway) -> str:
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/metrics") as response:
        assert response.status == 200
        return await response.text()


def guard_of(gateway: RunningGateway) -> ConnectionGuard:
    runner = gateway.runner
    assert isinstance(runner, GatewayRunner)
    return runner.guard


async def wait_open(gateway: RunningGateway, count: int) -> None:
    """Poll until the gateway counts ``count`` open connections."""
    for _ in range(int(DEADLINE_S / 0.01)):
        if guard_of(gateway).open == count:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"open connections never reached {count}: {guard_of(gateway)!r}")


def assert_openai_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply.raw
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers["x-request-id"].startswith("req_")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] is None


@pytest.fixture
def proxy_logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    # configure_logging() (CLI only) turns propagation off; make sure caplog sees proxy.*.
    monkeypatch.setattr(logging.getLogger("proxy"), "propagate", True)
    caplog.set_level(logging.DEBUG)
    return caplog


def assert_not_logged(caplog: pytest.LogCaptureFixture, secret: str) -> None:
    for record in caplog.records:
        dumped = " ".join([record.getMessage(), repr(record.args), repr(vars(record)),
                           record.exc_text or ""])
        assert secret not in dumped, f"{secret} in log record {vars(record)}"


# --- header_timeout: slowloris ---------------------------------------------------------------


async def test_a_slowloris_connection_is_closed_after_header_timeout(
        start_gateway: StartGateway, connect: Connect, mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(server={"header_timeout": "1s"})
    slow = await connect(gateway)
    dripping = asyncio.create_task(drip(slow.writer))
    try:
        elapsed = await closed_after(slow.reader)
    finally:
        dripping.cancel()
    assert 0.8 < elapsed < 2.0, elapsed
    assert guard_of(gateway).refused["header_timeout"] == 1
    assert refused_total(await metrics_text(gateway), "header_timeout") == 1.0
    assert (await mock_upstream.stats())["requests"] == 0


async def test_a_slow_body_gets_408_and_the_connection_is_closed(
        start_gateway: StartGateway, connect: Connect, mock_upstream: MockUpstream) -> None:
    gateway = await start_gateway(server={"body_timeout": "1s"})
    slow = await connect(gateway)
    whole = request("POST", "/v1/chat/completions", CHAT)
    slow.writer.write(whole[:-5])  # the headers and all of the body but its last bytes
    await slow.writer.drain()
    started = time.monotonic()
    reply = await read_reply(slow.reader)
    assert 0.8 < time.monotonic() - started < 2.0
    assert reply.status == 408
    assert reply.json()["error"]["code"] == "request_timeout"
    assert reply.headers.get("connection") == "close"
    assert await closed_after(slow.reader) < 1.0
    assert (await mock_upstream.stats())["requests"] == 0


async def test_a_hundred_slowloris_sockets_do_not_stop_a_normal_request(
        start_gateway: StartGateway, connect: Connect) -> None:
    gateway = await start_gateway(server={"header_timeout": "5s"})
    slow = [await connect(gateway) for _ in range(100)]
    drips = [asyncio.create_task(drip(c.writer)) for c in slow]
    try:
        await asyncio.sleep(0.5)
        normal = await connect(gateway)
        started = time.monotonic()
        reply = await normal.ask(request("POST", "/v1/chat/completions", CHAT))
        assert reply.status == 200, reply.raw
        assert time.monotonic() - started < 2.0
        assert guard_of(gateway).open >= 101  # the slow ones are all still open meanwhile
    finally:
        for task in drips:
            task.cancel()


async def test_the_header_deadline_applies_to_each_request_not_to_idle_time(
        start_gateway: StartGateway, connect: Connect) -> None:
    gateway = await start_gateway(server={"header_timeout": "500ms", "keepalive_timeout": "5s"})
    conn = await connect(gateway)
    assert (await conn.ask(request())).status == 200
    await asyncio.sleep(1.0)  # idle between requests: keepalive_timeout's business, not this one's
    assert (await conn.ask(request())).status == 200
    dripping = asyncio.create_task(drip(conn.writer))  # the next request's headers crawl
    try:
        assert await closed_after(conn.reader) < 1.5
    finally:
        dripping.cancel()


# --- keepalive_timeout -----------------------------------------------------------------------


async def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout(
        start_gateway: StartGateway, connect: Connect) -> None:
    gateway = await start_gateway(server={"keepalive_timeout": "1s"})
    conn = await connect(gateway)
    reply = await conn.ask(request())
    assert reply.status == 200
    assert reply.headers.get("connection", "").lower() != "close"
    elapsed = await closed_after(conn.reader)
    assert 0.8 < elapsed < 2.0, elapsed


# --- max_connections -------------------------------------------------------------------------


async def test_past_max_connections_a_connection_is_refused_fast_and_counted(
        start_gateway: StartGateway, connect: Connect, mock_upstream: MockUpstream,
        proxy_logs: pytest.LogCaptureFixture) -> None:
    gateway = await start_gateway(server={"max_connections": 20})
    first = [await connect(gateway) for _ in range(20)]
    for conn in first:
        assert (await conn.ask(request())).status == 200

    extra = await connect(gateway)
    started = time.monotonic()
    reply = await extra.ask(request("POST", "/v1/chat/completions", CHAT))
    assert time.monotonic() - started < 0.5
    assert_openai_error(reply, 503, "overloaded")
    assert reply.json()["error"]["type"] == "server_error"
    assert reply.headers["connection"] == "close"
    assert reply.headers["retry-after"] == "1"
    assert await closed_after(extra.reader) < 1.5

    for conn in first:  # the first twenty keep working
        assert (await conn.ask(request())).status == 200
    assert (await mock_upstream.stats())["requests"] == 0
    assert guard_of(gateway).refused["max_connections"] == 1
    assert any(r.getMessage().startswith("connection refused: server.max_connections")
               for r in proxy_logs.records)

    await asyncio.gather(*(c.close() for c in first))
    await wait_open(gateway, 0)
    text = await metrics_text(gateway)
    assert refused_total(text, "max_connections") == 1.0
    assert "shepherd_connections_open" in text


async def test_connections_past_what_file_descriptors_allow_are_refused(
        start_gateway: StartGateway, connect: Connect,
        monkeypatch: pytest.MonkeyPatch, proxy_logs: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(proxy.app, "client_connection_cap", lambda nofile, reserved: 3)
    gateway = await start_gateway()
    assert guard_of(gateway).limit == 3
    held = [await connect(gateway) for _ in range(3)]
    for conn in held:
        assert (await conn.ask(request())).status == 200
    extra = await connect(gateway)
    assert_openai_error(await extra.ask(request()), 503, "overloaded")
    assert guard_of(gateway).refused["file_descriptors"] == 1
    assert any(r.levelno == logging.WARNING and "file descriptors" in r.getMessage()
               for r in proxy_logs.records)


# --- parser errors: OpenAI-shaped, never an echo --------------------------------------------


async def test_a_64_kib_header_line_is_431_json_without_echo(
        start_gateway: StartGateway, connect: Connect, mock_upstream: MockUpstream,
        proxy_logs: pytest.LogCaptureFixture) -> None:
    gateway = await start_gateway()
    conn = await connect(gateway)
    padding = "p" * 65536
    reply = await conn.ask(request("POST", "/v1/chat/completions", CHAT,
                                   headers=(f"X-Leak: {SECRET}{padding}",)))
    assert_openai_error(reply, 431, "request_header_fields_too_large")
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert SECRET.encode() not in reply.raw
    assert b"ppppp" not in reply.raw
    assert (await mock_upstream.stats())["requests"] == 0
    assert_not_logged(proxy_logs, SECRET)
    assert await closed_after(conn.reader) < 1.0


async def test_200_headers_are_a_431_json_error(
        start_gateway: StartGateway, connect: Connect) -> None:
    gateway = await start_gateway()
    conn = await connect(gateway)
    reply = await conn.ask(request(headers=tuple(f"X-H{i}: {SECRET}" for i in range(200))))
    assert_openai_error(reply, 431, "too_many_headers")
    assert SECRET.encode() not in reply.raw


@pytest.mark.parametrize("line", [b"GARBAGE", b"GET /x HTTP/9.z", b"G\x00T / HTTP/1.1",
                                  b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"])
async def test_a_malformed_request_line_is_a_json_400(
        start_gateway: StartGateway, connect: Connect, line: bytes,
        proxy_logs: pytest.LogCaptureFixture) -> None:
    gateway = await start_gateway()
    conn = await connect(gateway)
    reply = await conn.ask(line + f"\r\nAuthorization: Bearer {SECRET}\r\n\r\n".encode())
    assert reply.status == 400
    assert reply.json()["error"]["code"] in ("invalid_request_line", "invalid_http_request")
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert line not in reply.raw
    assert SECRET.encode() not in reply.raw
    assert_not_logged(proxy_logs, SECRET)
    assert guard_of(gateway).refused["malformed_request"] == 1


async def test_a_malformed_header_is_a_json_400_without_echo(
        start_gateway: StartGateway, connect: Connect,
        proxy_logs: pytest.LogCaptureFixture) -> None:
    gateway = await start_gateway()
    conn = await connect(gateway)
    reply = await conn.ask(request(headers=(f"Bad Header: {SECRET}",)))
    assert_openai_error(reply, 400, "invalid_header")
    assert SECRET.encode() not in reply.raw
    assert_not_logged(proxy_logs, SECRET)


@pytest.mark.parametrize("split", [False, True], ids=["one-packet", "after-the-headers"])
async def test_broken_chunked_framing_is_a_json_400_not_a_hang(
        start_gateway: StartGateway, connect: Connect, mock_upstream: MockUpstream,
        split: bool) -> None:
    gateway = await start_gateway()
    conn = await connect(gateway)
    head = request("POST", "/v1/chat/completions", headers=("Content-Type: application/json",
                                                            "Transfer-Encoding: chunked"))
    bad_chunk = b"zz\r\n" + CHAT + b"\r\n0\r\n\r\n"
    if split:  # the handler is already reading the body when the framing breaks
        conn.writer.write(head)
        await conn.writer.drain()
        await asyncio.sleep(0.1)
        reply = await conn.ask(bad_chunk)
    else:
        reply = await conn.ask(head + bad_chunk)
    assert reply.status == 400, reply.raw
    assert reply.json()["error"]["code"] == "invalid_body"
    assert await closed_after(conn.reader) < 1.0
    assert (await mock_upstream.stats())["requests"] == 0


# --- start-up: backlog and RLIMIT_NOFILE -----------------------------------------------------


async def listen_backlog(port: int) -> int | None:
    """The accept-queue size of the socket listening on ``port`` (``ss``: Send-Q of a LISTEN
    socket), or ``None`` without ``ss``."""
    if shutil.which("ss") is None:
        return None
    proc = await asyncio.create_subprocess_exec("ss", "-ltnH", f"sport = :{port}",
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    rows = [line.split() for line in out.decode().splitlines() if line.strip()]
    assert len(rows) == 1, out
    return int(rows[0][2])


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


async def test_the_listen_backlog_is_server_backlog(start_gateway: StartGateway) -> None:
    for backlog in (1024, 77):
        gateway = await start_gateway(server={"backlog": backlog})
        (site,) = gateway.runner.sites
        assert site._backlog == backlog  # type: ignore[attr-defined]
        got = await listen_backlog(int(gateway.url.rsplit(":", 1)[1]))
        assert got in (None, min(backlog, somaxconn()))


def nofile_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = re.split(r"\s{2,}", line.strip())[1:3]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


async def test_shepherd_serve_raises_its_fd_limit_and_listens_with_the_server_settings(
        gateway_process: StartGatewayProcess) -> None:
    # `python -m proxy serve` (uvloop, serve_until_signalled) gets what start_server gives tests.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"hard RLIMIT_NOFILE {hard}: nothing to raise the soft limit to")
    config = base_config("http://127.0.0.1:9/v1")
    config["server"].update({"backlog": 77, "keepalive_timeout": "1s", "header_timeout": "1s",
                             "max_connections": 2})
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the child starts low...
    try:
        gateway = await gateway_process(config, wait=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await wait_healthy(gateway)
    assert nofile_limits(gateway.pid) == (hard, hard)  # ...and raised its soft limit to the hard one
    assert await listen_backlog(gateway.port) in (None, min(77, somaxconn()))
    await asyncio.sleep(0.2)  # the gateway sees wait_healthy's connection close
    opened: list[Connection] = []
    try:
        opened += [Connection(*await asyncio.open_connection("127.0.0.1", gateway.port))
                   for _ in range(3)]
        normal, slow, extra = opened
        assert (await normal.ask(request())).status == 200
        dripping = asyncio.create_task(drip(slow.writer))
        assert_openai_error(await extra.ask(request()), 503, "overloaded")  # max_connections: 2
        assert await closed_after(slow.reader) < 2.0  # header_timeout: 1s
        dripping.cancel()
        assert await closed_after(normal.reader) < 2.0  # keepalive_timeout: 1s
    finally:
        await asyncio.gather(*(c.close() for c in opened))
    for _ in range(int(DEADLINE_S / 0.05)):  # info lines are flushed every 0.5 s
        if '"msg":"file descriptor limit"' in gateway.log_text():
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"no file descriptor limit line in the log:\n{gateway.log_text()}")


@pytest.fixture
async def low_fd_gateway(tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    """``python -m proxy serve`` under ``prlimit --nofile=400:400``, one upstream of 4
    connections: room for 400 - 4 - FD_HEADROOM = 140 client connections."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit is not on PATH")
    config = merge(base_config("http://127.0.0.1:9/v1"), {"upstreams": {"mock": {"max_connections": 4}}})
    config_path, log_path = tmp_path / "gateway.yaml", tmp_path / "gateway.log"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = integration.free_port()
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            prlimit, "--nofile=400:400", "--", sys.executable, "-m", "proxy", "serve",
            "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port),
            cwd=integration.REPO_ROOT, env={**os.environ, "PYTHONPATH": str(integration.REPO_ROOT)},
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    gateway = GatewayProcess(proc, port, f"http://127.0.0.1:{port}", config_path, log_path)
    try:
        await wait_healthy(gateway)
        yield gateway
    finally:
        await gateway.stop()


async def test_connections_past_the_fd_limit_get_a_503_not_emfile(low_fd_gateway: GatewayProcess) -> None:
    assert nofile_limits(low_fd_gateway.pid) == (400, 400)
    await asyncio.sleep(0.2)  # the gateway sees wait_healthy's connection close
    opened: list[Connection] = []
    try:
        opened += [Connection(*await asyncio.open_connection("127.0.0.1", low_fd_gateway.port))
                   for _ in range(141)]
        replies = [await c.ask(request()) for c in opened]
        assert [r.status for r in replies] == [200] * 140 + [503]
        assert_openai_error(replies[-1], 503, "overloaded")
    finally:
        await asyncio.gather(*(c.close() for c in opened))
    for _ in range(int(DEADLINE_S / 0.05)):
        if "file descriptors are running short" in low_fd_gateway.log_text():
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"no refusal line in the log:\n{low_fd_gateway.log_text()}")
    assert "Too many open files" not in low_fd_gateway.log_text()


# --- the pieces, without sockets -------------------------------------------------------------


def test_guard_refuses_past_the_lower_cap_and_counts_each_reason() -> None:
    refused: list[str] = []
    guard = ConnectionGuard(3, 5, on_refuse=refused.append)
    assert [guard.admit() for _ in range(4)] == [None, None, None, "max_connections"]
    assert guard.open == 3
    guard.release()
    assert guard.admit() is None
    tight = ConnectionGuard(10, 1)
    assert [tight.admit(), tight.admit()] == [None, "file_descriptors"]
    assert refused == ["max_connections"]
    assert repr(guard) == "<ConnectionGuard [open: 3/3 | refused: max_connections: 1]>"
    assert repr(ConnectionGuard(2, 9)) == "<ConnectionGuard [open: 0/2 | refused: 0]>"


def test_guard_logs_at_most_one_line_per_reason_per_interval(caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger("proxy"), "propagate", True)
    caplog.set_level(logging.INFO, logger="proxy")
    now = [100.0]
    guard = ConnectionGuard(0, 10, clock=lambda: now[0])
    for _ in range(50):
        guard.admit()
    now[0] += LOG_INTERVAL_S
    guard.admit()
    lines = [r for r in caplog.records if r.getMessage().startswith("connection refused")]
    assert [getattr(r, "count", None) for r in lines] == [1, 50]
    assert guard.refused["max_connections"] == 51


def test_client_connection_cap_keeps_fds_for_the_pools() -> None:
    assert client_connection_cap(20_000, 100) == 20_000 - 100 - 256
    assert client_connection_cap(1024, 5000) == 64  # never below MIN_CLIENT_CONNECTIONS


def test_parse_errors_never_quote_the_request() -> None:
    from aiohttp import http_exceptions as he

    cases = [
        (he.LineTooLong(SECRET.encode(), 8190), 431, "request_header_fields_too_large"),
        (he.BadHttpMessage("Too many headers received"), 431, "too_many_headers"),
        (he.BadStatusLine(SECRET), 400, "invalid_request_line"),
        (he.BadHttpMethod(error=f"Bad method {SECRET}"), 400, "invalid_request_line"),
        (he.InvalidHeader(SECRET.encode()), 400, "invalid_header"),
        (he.TransferEncodingError(SECRET), 400, "invalid_body"),
        (he.BadHttpMessage(f"Invalid character in chunk size:\n\n  {SECRET!r}"), 400, "invalid_body"),
        (he.BadHttpMessage(SECRET), 400, "invalid_http_request"),
    ]
    for exc, status, code in cases:
        error = parse_error(exc, max_field_size=8190, max_headers=128)
        assert (error.http_status, error.code) == (status, code), exc
        assert SECRET not in json.dumps(error.to_body())


def test_the_refusal_is_a_complete_http_response() -> None:
    raw = refusal_bytes()
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body)["error"]["code"] == "overloaded"
    assert refusal_bytes() != raw  # each refusal has its own x-request-id
