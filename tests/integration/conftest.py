"""Fixtures for multi-process tests: a real ``redis-server`` and gateway subprocesses.

``redis_server`` runs ``redis-server`` (from PATH) on a free loopback port with persistence
off; ``.stop()`` / ``.start()`` take it down and bring it back on the same port (outage
tests). Without the binary the test is skipped, or fails when ``CI=true``.

``gateway_process(config, ...)`` writes ``config`` as YAML and starts
``python -m proxy serve --config PATH --port P`` (the same command as ``shepherd serve``) on a
free port, waits until ``GET /healthz`` answers 200 and returns a ``GatewayProcess`` whose
``.url`` is the base URL. Every process is stopped at teardown (SIGTERM, then SIGKILL).
The in-process ``mock_upstream`` runs on the test's event loop, so everything here awaits
(asyncio subprocesses, aiohttp polling) instead of blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.integration import pg

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 15.0
#: A script that keeps Redis busy (it serves nothing else meanwhile) for ARGV[1] ms: a slow
#: Redis, for the timeout and fallback tests.
SPIN_LUA = """
local function ms() local t = redis.call('TIME') return t[1] * 1000 + math.floor(t[2] / 1000) end
local start = ms()
while ms() - start < tonumber(ARGV[1]) do end
return ms() - start
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """A ``redis-server`` on ``127.0.0.1:port`` (database 0 at ``.url``)."""

    binary: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 5.0) -> None:
        """Start (or restart) the server on ``port`` and wait until PING answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [self.binary, "--save", "", "--appendonly", "no", "--port", str(self.port),
                 "--bind", "127.0.0.1", "--dir", str(self.workdir)],
                cwd=self.workdir, stdout=log_file, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while not _redis_answers(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server (an abrupt outage: no shutdown, nothing saved)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not on PATH (required in CI)")
        pytest.skip("redis-server is not on PATH")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(binary, free_port(), workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_server() -> Iterator[pg.PostgresServer]:
    """A throwaway PostgreSQL cluster on a free port (``tests/integration/pg.py``)."""
    server = pg.start_postgres(free_port())
    try:
        yield server
    finally:
        pg.remove(server)


@dataclass
class GatewayProcess:
    """A gateway subprocess: ``url`` is ``http://127.0.0.1:<port>``; ``log_path`` holds its
    stdout and stderr (JSON log lines)."""

    proc: asyncio.subprocess.Process
    port: int
    url: str
    config_path: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout_s):
                    await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode


StartGatewayProcess = Callable[..., Awaitable[GatewayProcess]]


async def wait_healthy(gateway: GatewayProcess, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll ``GET /healthz`` until 200; fail with the log if the process exits or times out."""
    try:
        async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as session:
            while True:
                if gateway.proc.returncode is not None:
                    pytest.fail(f"gateway exited with {gateway.proc.returncode}:\n{gateway.log_text()}")
                try:
                    async with session.get(gateway.url + "/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"gateway not healthy within {timeout_s}s:\n{gateway.log_text()}")


@pytest.fixture
async def gateway_process(tmp_path: Path) -> AsyncIterator[StartGatewayProcess]:
    started: list[GatewayProcess] = []

    async def start(config: dict[str, Any], *, port: int | None = None, workers: int | None = None,
                    wait: bool = True, extra_env: dict[str, str] | None = None) -> GatewayProcess:
        n = len(started)
        config_path = tmp_path / f"gateway-{n}.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        log_path = tmp_path / f"gateway-{n}.log"
        port = free_port() if port is None else port
        args = [sys.executable, "-m", "proxy", "serve", "--config", str(config_path),
                "--host", "127.0.0.1", "--port", str(port)]
        if workers is not None:
            args += ["--workers", str(workers)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(extra_env or {})}
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *args, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT)
        gateway = GatewayProcess(proc, port, f"http://127.0.0.1:{port}", config_path, log_path)
        started.append(gateway)
        if wait:
            await wait_healthy(gateway)
        return gateway

    yield start
    await asyncio.gather(*(g.stop() for g in started), return_exceptions=True)
