"""A throwaway PostgreSQL server for the ledger tests (``postgres_server`` fixture in
``tests/integration/conftest.py``).

``initdb`` and ``pg_ctl`` come from PATH (Debian's ``postgresql`` package, or
``/usr/lib/postgresql/<v>/bin``). PostgreSQL refuses to run as root, so as root the cluster
is created and run as the ``postgres`` user (``runuser``), in a directory that user owns.
The server listens on a free loopback port with ``trust`` auth and no Unix socket; ``url``
is what ``ledger.url`` takes. ``pause()``/``resume()`` SIGSTOP and SIGCONT the postmaster
and its backends (a database that hangs); ``stop()``/``start()`` take it down and back on the
same port. Without the binaries the test is skipped, or fails when ``CI=true``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

USER = "shepherd"


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found is not None:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@dataclass
class PostgresServer:
    """One cluster in ``datadir`` on ``127.0.0.1:port``."""

    bindir: Path
    datadir: Path
    port: int
    run_as: str | None  # the OS user to run as (root cannot), or None for ourselves
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.datadir.parent / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        command = list(args)
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, timeout=60)

    def init(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", USER, "--auth=trust",
                  "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.log_path),
                  "-o", options, "-w", "-t", "30", "start")

    def stop(self) -> None:
        self.resume()
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w",
                  "stop", check=False)

    def pids(self) -> list[int]:
        """The postmaster and every backend (its children)."""
        pid_file = self.datadir / "postmaster.pid"
        if not pid_file.exists():
            return []
        master = int(pid_file.read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
        return [master, *map(int, children)]

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open, nothing answers."""
        for pid in self.pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_postgres(port: int) -> PostgresServer:
    """Create and start a cluster; skip (or fail under ``CI=true``) without the binaries."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("initdb/pg_ctl are not installed (PostgreSQL is required in CI)")
        pytest.skip("initdb/pg_ctl are not installed")
    bindir = Path(os.path.realpath(initdb)).parent
    run_as = None
    root = Path(tempfile.mkdtemp(prefix="shepherd-pg-"))
    if os.geteuid() == 0:
        run_as = "postgres"
        try:
            entry = pwd.getpwnam(run_as)
        except KeyError:
            pytest.fail("running as root needs a `postgres` user to run PostgreSQL as")
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bindir, root / "data", port, run_as)
    try:
        server.init()
        server.start()
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {exc.stderr.decode(errors='replace')}\n{server.log_text()}")
    return server


def remove(server: PostgresServer) -> None:
    server.stop()
    deadline = time.monotonic() + 5
    while server.pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(server.datadir.parent, ignore_errors=True)
