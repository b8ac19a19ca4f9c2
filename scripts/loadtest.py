"""Load test: the gateway against a bare aiohttp forwarder and against the mock directly.

    .venv/bin/python scripts/loadtest.py [--concurrency 32] [--duration 5] [--warmup 1]
        [--rate 200] [--targets gateway,bare,direct] [--json PATH] [--procs 1] [--no-pin]
        [--tokens 16] [--ttft-ms 0] [--token-delay-ms 0] [--timeout 10]
        [--state memory|redis] [--workers N] [--no-limits] [--redis-timeout 50ms]
        [--mock-engine aiohttp|fast]
    .venv/bin/python scripts/loadtest.py --compare [--rounds 3] [--duration 5]
        [--generator wrk|python] [--mock-engine fast|aiohttp] ...
    .venv/bin/python scripts/loadtest.py --scenario overload [--levels 1,2,3] [--max-in-flight 16]
        [--max-queue 32] [--queue-timeout-ms 200] [--ttft-ms 50] [--duration 5] [--warmup 1]
    .venv/bin/python scripts/loadtest.py --scenario failover [--concurrency 16] [--ttft-ms 20]
        [--failover-duration 12] [--kill-at 4] [--restart-at 8] [--base-ejection-s 2]
    .venv/bin/python scripts/loadtest.py --scenario resume [--state redis|memory] [--streams 200]
        [--stream-tokens 64] [--stream-token-delay-ms 5] [--concurrency 32] [--seed 1]
        [--detached 500] [--rounds 3] [--duration 5] [--tokens 16]
    .venv/bin/python scripts/loadtest.py --scenario connections [--connections 10000]
        [--idle-connections 20000] [--ramp-s 10] [--hold-s 3] [--tokens 16] [--token-delay-ms 0]
    .venv/bin/python scripts/loadtest.py --scenario websocket [--sessions 10000]
        [--active-sessions 1000] [--ramp-s 10] [--hold-s 3] [--rounds 3] [--duration 5]

Starts ``scripts/mock_upstream.py``, the gateway (``python -m proxy serve``) and
``scripts/bare_forwarder.py`` as subprocesses on free 127.0.0.1 ports, then runs three
phases of ``--duration`` seconds against each target (the first ``--warmup`` seconds are
not counted), phase by phase so that the targets of one phase run close together in time:

* non-stream: ``--concurrency`` connections, each sending chat completions back to back
  (closed loop) -> requests/s and latency percentiles;
* stream: the same with ``"stream": true`` -> streams/s, time to the first ``data:`` chunk
  (TTFT) and time to the end of the stream (``data: [DONE]`` required);
* rate: an open loop at ``--rate`` req/s, non-stream, so latency is measured at a moderate
  load instead of at saturation. "Added latency vs direct" is a target's percentile here
  minus the same percentile of the direct target.

The gateway under test:

* ``--state memory|redis`` is its limit store. With ``redis`` this script starts a private
  ``redis-server`` (from PATH; ``--port <free> --save "" --appendonly no --bind 127.0.0.1``)
  for the run and stops it at the end.
* ``--workers N`` is passed to ``serve`` (N > 1 needs ``--state redis``).
* the load key has limits that never refuse but take every limiter path (GCRA, token
  bucket reserve + settle, a concurrency lease, a daily token budget): ``LOAD_LIMITS``.
  ``--no-limits`` gives it none, so the limiter is skipped (for comparison).
* ``--redis-timeout`` sets ``state.redis_timeout`` (default: the gateway's, 50 ms). After
  the run the gateway's ``GET /metrics`` is read from every worker: limit checks answered
  by the per-process fallback because Redis was slower than that are reported.

``--compare`` (``make load-test ARGS=--compare``) runs the non-stream phase only,
``--rounds`` times interleaved, against the bare forwarder and five gateways started side by
side on one ``redis-server`` (each with its own key prefix): memory without limits, memory,
redis, redis unpinned (one worker), redis with two workers; it prints medians and the
ratios redis / memory and workers=2 / workers=1 (about 2 minutes with the defaults). A round
during which other processes used more than 15% of a CPU is measured again
(``--retries``), keeping the quietest.

The load generator and the mock (``--generator python|wrk``, ``--mock-engine aiohttp|fast``):
a gateway with two workers needs both CPUs of this machine, so the other parties of the test
must cost little CPU per request or they take the second core from it. ``--compare``
therefore defaults to ``wrk`` (C; measured at the 3-7k req/s of these runs: ~23 us CPU per
request against ~36 us for the Python generator, most of either being loopback syscalls)
and to the fast mock engine (``scripts/mock_fast.py``: the same answers from a cache, 15-20
us per request at these rates against ~100 us for ``scripts/mock_upstream.py``). Without
``wrk`` on PATH it falls back to the Python generator and the report says so (``make
load-test`` tries to install it: ``scripts/install_loadtools.sh``). Every other run keeps
the Python generator and the aiohttp mock, so its figures stay comparable with earlier ones.
wrk runs closed-loop non-stream phases only, so ``--generator wrk`` needs ``--compare``:
``--procs`` processes of ``wrk -t1``, first for ``--warmup`` seconds (discarded), then for
``--duration`` minus that (whole seconds, wrk's unit), with a generated Lua script (the same
request as the Python generator's) whose ``done()`` prints the figures as one JSON line;
non-2xx answers count as errors (``HTTP non-2xx``), wrk's CPU time comes from ``os.wait4``.

Setup, chosen so that the server under test is the only bottleneck where it can be (2 CPUs):

* a single-process server under test (the bare forwarder, a one-worker gateway) is pinned
  to the first CPU and is alone there; the mock upstream, the load generator, redis-server
  and this script share the second CPU. ``direct`` leaves the first CPU idle, so its
  requests/s is the ceiling of the mock + generator pair. When the second CPU is nearly full
  during a phase the report says the load side may be limiting.
* a gateway with several workers would need every CPU, so nothing is pinned while it is
  loaded: its workers, the mock, the generator and redis-server share the machine as the
  scheduler decides, and its throughput is bounded by the whole machine (the report gives
  the CPU of every party per request, and the ceiling that implies). Placement is applied
  before each phase (``sched_setaffinity`` on every thread of every process involved), so
  targets with different placements can run in one invocation.
* the load generator is ``scripts/loadtest_client.py`` (``--generator python``, or wrk,
  see above): ``--procs`` separate processes on uvloop with a raw HTTP/1.1 keep-alive client
  (an ``asyncio.Protocol`` that parses only status, framing and SSE markers): ~26 us CPU per
  request against ~95 us for an aiohttp ``ClientSession`` on this machine.
* the same mock settings, connection count and request body for every target.

Besides requests/s, each phase reports the CPU time the process under test spent per
request (``/proc/<pid>/stat`` summed over the process and its descendants, so every worker
of a multi-worker gateway counts), which stays meaningful when other jobs share the machine:
the report warns when processes outside the test used more than 15% of a CPU during a
phase (``/proc/stat`` minus the test's own processes). Peak RSS is ``VmHWM`` from
``/proc/<pid>/status``, summed over the process tree.

Scenarios (``make load-test ARGS="--scenario overload"``), each well under 90 s; all first
wait (at most ``--quiet-wait`` s) for a second in which other processes use at most 15% of a
CPU, and pin the gateway like the default run:

* ``overload``: one mock with a fixed non-stream service time (``--ttft-ms``, default 50 ms)
  behind a gateway whose upstream has ``max_in_flight`` / ``max_queue`` / ``queue_timeout``
  (16 / 32 / 200 ms), so its capacity is max_in_flight / service time (320 req/s). An open
  loop (the generator's ``rate`` mode, one generator process per 1,500 req/s, 1,024
  connections each) runs ``--duration`` s at each of ``--levels`` times that capacity. Per
  level: offered and achieved issue rate (and the generator's worst lateness), goodput (200s
  per second) and its % of the best level's and of capacity, latency of the 200s, rate and
  latency of 503 refusals split by cause (the body says "queue is full" or "Timed out
  waiting"), other errors; a level during which other processes used more than 15% of a CPU
  is measured again (``--retries``). Targets: goodput at the highest level >= 90% of the best;
  queue-full 503s p99 <= 50 ms, deadline 503s p99 <= queue_timeout + 50 ms.
* ``failover``: two mocks serving the model, same priority, health checks every 500 ms
  (unhealthy / healthy threshold 2), outlier ejection for ``--base-ejection-s``;
  ``--concurrency`` (16) closed-loop non-stream connections for ``--failover-duration`` s
  (12); mock-b is SIGKILLed at ``--kill-at`` (4 s) and started again on its port at
  ``--restart-at`` (8 s). ``/readyz`` is polled every 100 ms and its state changes are
  logged with their times. Reported: requests, client-visible failures by kind (status and
  error ``code``, or exception), goodput per second with the events of that second, when
  mock-b left rotation / was marked unhealthy / came back, and ``shepherd_retries_total``,
  ``shepherd_upstream_ejections_total``, ``shepherd_retry_budget_exhausted_total`` and
  ``shepherd_upstream_errors_total`` from ``/metrics``. Target: zero client-visible failures.

* ``resume``: the mock, and with ``--state redis`` (the default here) a redis-server and two
  gateways ``redis-a``/``redis-b`` sharing their stream logs in it plus a memory-backend
  gateway ``memory`` for comparison; with ``--state memory`` the gateway ``memory`` alone.
  Each gateway's load key has no limits, ``streams.detach_timeout`` is 120 s. Three parts:
  (1) ``--streams`` streams of ``--stream-tokens`` tokens ``--stream-token-delay-ms`` apart,
  ``--concurrency`` at once, each cut once at a random byte (``--seed``) by the client
  dropping the connection and resumed with ``GET /v1/streams/{id}`` + ``Last-Event-ID``, on
  the same instance for half of them and on the other one for the other half (redis), by
  ``scripts/loadtest_resume.py``, which checks each stream: seqs 1..n without gap or repeat,
  byte for byte the stream's own full replay, the text ``expected_text(n)`` and the payloads
  of an uncut stream (ids and timestamps aside). Reported: streams intact, resume latency
  (before the reconnect's connect to the first body byte) by same/other instance, Redis
  commands per streamed token (``INFO commandstats`` before/after; commands run by Lua
  scripts included) and the gateways' stream counters. (2) ``--detached`` slow streams
  opened and dropped after their first event: gateway ``VmRSS`` before and with them, per
  detached stream, then after cancelling them. (3) ``--rounds`` interleaved rounds of the
  default run's stream phase against ``memory`` and ``redis-a``: streams/s and the ratio.
  Targets: 100 % intact, resume p99 < 50 ms, streams/s with Redis >= 0.8x memory's.

* ``connections``: one gateway with the default ``server:`` settings, the fast mock behind
  it (upstream ``max_connections`` = ``--connections``); ``--connections`` slow streams
  opened over ``--ramp-s``, then ``--idle-connections`` idle keep-alive connections (one
  ``GET /healthz`` each) over ``--ramp-s``, held ``--hold-s``, then drained; a side request
  every 250 ms throughout. Reported by phase: streams open, gateway RSS and descriptors,
  side-request latency; streams intact / refused (503, ``retry-after``, how fast) / failed
  (before or after admission), idle connections accepted / refused / closed by the gateway
  and when, ``shepherd_connections_refused_total`` by reason. ``scripts/loadtest_connections.py``
  has the details. Target: every stream intact, or refused fast with 503 + ``retry-after``.

* ``websocket``: one gateway process, the fast mock behind it; ``--sessions`` ``/v1/ws``
  sessions opened over ``--ramp-s`` and held (heartbeats answered), then ``--rounds`` rounds
  of a WebSocket and an SSE phase (``--duration`` s) with ``--active-sessions`` closed-loop
  streams each, every answer checked. Reported: gateway RSS baseline / idle / with streams
  (per idle socket, per active stream), messages/s, TTFC p50/p99 WebSocket vs SSE, errors
  by kind, intact %. ``scripts/loadtest_websocket.py`` has the details. Targets: every
  session held under 1 GiB RSS, every answer intact, TTFC over WebSocket <= over SSE.

``--json PATH`` writes every figure of any scenario, with the gateway's config.

Every phase is bounded by time (``--duration`` plus at most ``--timeout`` for requests in
flight); every subprocess is killed on exit, on Ctrl-C, on SIGTERM and on errors (and by the
kernel if this script dies: ``PR_SET_PDEATHSIG``). Every subprocess starts with ``--nofile``
(default 65536) as its soft and hard ``RLIMIT_NOFILE``, as a unit file's ``LimitNOFILE=``
would give it; where the hard limit may not be raised, a note says so and the run goes on
with the inherited limit.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLIENT = ROOT / "scripts" / "loadtest_client.py"
RESUME_DRIVER = ROOT / "scripts" / "loadtest_resume.py"
MOCK_SCRIPTS = {"aiohttp": ROOT / "scripts" / "mock_upstream.py",
                "fast": ROOT / "scripts" / "mock_fast.py"}
WRK_MISSING = ("note: wrk was not found on PATH, so the Python generator was used (more CPU per "
               "request on the load side); install it with `apt-get install wrk` (Debian/Ubuntu; "
               "`make load-test` tries) or `brew install wrk`")
TARGETS = ("gateway", "bare", "direct")
GATEWAY_KEY, MOCK_KEY = "sk-load-test", "sk-mock"
BRIEF_BARE_RPS = 5700  # a bare aiohttp forwarder on one core of the reference machine
CLK_TCK = os.sysconf("SC_CLK_TCK")
SATURATED_PCT = 80  # % of a CPU above which the process under test counts as CPU-bound
NOISY_PCT = 15  # % of a CPU used by other processes above which a phase counts as noisy
PR_SET_PDEATHSIG = 1
ALL_CPUS = frozenset(os.sched_getaffinity(0))
#: Limits of the load key: never reached at any rate this machine can drive, yet every
#: request goes through GCRA, the token bucket (reserve, then settle), a concurrency lease
#: and the budget (check-and-charge, then settle), in whichever store is configured.
LOAD_LIMITS: dict[str, Any] = {"rpm": 10_000_000, "tpm": 10_000_000_000,
                               "max_concurrent": 100_000,
                               "budget": {"tokens": 10**15, "period": "1d"}}

Placement = tuple[frozenset[int], frozenset[int]]  # (server under test, everything else)


@dataclass(frozen=True)
class Phase:
    name: str
    mode: str  # "closed" | "rate"
    stream: bool


PHASES = (Phase("non-stream", "closed", False), Phase("stream", "closed", True),
          Phase("rate", "rate", False))


@dataclass(frozen=True)
class GatewaySpec:
    """How one gateway under test runs: limit store, worker processes, load key limits."""

    state: str = "memory"
    workers: int = 1
    limits: bool = True
    redis_timeout: str | None = None  # ``state.redis_timeout``; None: the gateway's default
    cpu_affinity: bool = False  # ``server.cpu_affinity``: worker i pinned to CPU i

    def describe(self) -> str:
        limits = "load key limited (every limiter path)" if self.limits else "no limits"
        timeout = f", redis_timeout {self.redis_timeout}" if (
            self.state == "redis" and self.redis_timeout) else ""
        affinity = ", cpu_affinity (worker i on CPU i)" if self.cpu_affinity else ""
        return f"{self.state} store{timeout}, {self.workers} worker(s){affinity}, {limits}"


@dataclass(frozen=True)
class Plan:
    """A target to start: its column name, kind, gateway settings, whether it may be pinned."""

    name: str
    kind: str  # "gateway" | "bare" | "direct"
    gateway: GatewaySpec | None = None
    pin: bool = True


@dataclass
class Target:
    """One thing to load: its port, the key it wants, the process under test if any."""

    name: str
    kind: str
    port: int
    api_key: str
    proc: subprocess.Popen[bytes] | None
    gateway: GatewaySpec | None = None
    placement: Placement | None = None  # None: nothing pinned while it is loaded
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # --compare
    rss_mib: float = 0.0
    store: dict[str, Any] = field(default_factory=dict)  # limit store health after the run

    @property
    def procs(self) -> int:
        """Processes serving requests (the workers of a gateway)."""
        return self.gateway.workers if self.gateway else 1


@dataclass(frozen=True)
class Services:
    """The processes every target relies on: the mock upstream and, if used, redis-server."""

    mock_pid: int
    mock_port: int
    redis_pid: int | None = None
    redis_port: int | None = None

    def side_pids(self) -> dict[str, int]:
        pids = {"mock": self.mock_pid}
        if self.redis_pid is not None:
            pids["redis"] = self.redis_pid
        return pids


# -- processes -------------------------------------------------------------------------


def child_setup(cpus: frozenset[int] | None, nofile: int | None = None) -> Callable[[], None]:
    """``preexec_fn``: die with this script, run on ``cpus`` (None: anywhere), and with
    ``nofile`` as the soft and hard ``RLIMIT_NOFILE`` (None: inherited), as systemd's
    ``LimitNOFILE=`` gives a service. Raising the hard limit needs ``CAP_SYS_RESOURCE``
    and at most ``fs.nr_open``; where the kernel refuses, the inherited limits stay
    (``nofile_of`` reads what the child got)."""

    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if cpus:
            os.sched_setaffinity(0, cpus)
        if nofile is not None:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            except (ValueError, OSError):
                pass  # not permitted: the parent notes the limits the child kept

    return setup


def nofile_of(pid: int) -> tuple[int, int] | None:
    """(soft, hard) ``RLIMIT_NOFILE`` of ``pid`` from ``/proc/<pid>/limits`` (None: gone,
    or unlimited)."""
    try:
        text = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Max open files"):
            fields = line.split()
            try:
                return int(fields[3]), int(fields[4])
            except (IndexError, ValueError):
                return None
    return None


class Fleet:
    """Every subprocess this script started; ``stop_all`` ends them (TERM, then KILL).
    ``nofile``: the soft and hard ``RLIMIT_NOFILE`` each is started with (None:
    inherited); ``nofile_got`` holds what each name got, and a note is printed where the
    kernel refused it (once per limit kept)."""

    def __init__(self, log_dir: Path, nofile: int | None = None) -> None:
        self.log_dir = log_dir
        self.nofile = nofile
        self.nofile_got: dict[str, tuple[int, int] | None] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def __repr__(self) -> str:
        alive = sum(p.poll() is None for p in self.procs)
        return f"<Fleet [{alive} alive of {len(self.procs)}] logs={self.log_dir}>"

    def spawn(self, name: str, argv: Sequence[str], cpus: frozenset[int] | None,
              stdout: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stderr (and stdout unless given) going to ``<name>.log``. A
        gateway (``python -m proxy``) runs in the log directory, so that its usage ledger
        (``sqlite:///shepherd-usage.db`` by default: on, as in production) lands there."""
        gateway = list(argv[1:3]) == ["-m", "proxy"]
        # preexec_fn is safe here: this script runs no threads.
        with (self.log_dir / f"{name}.log").open("ab") as log, \
                (stdout.open("wb") if stdout else log) as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=log, stdin=subprocess.DEVNULL,
                                    cwd=self.log_dir if gateway else ROOT,
                                    preexec_fn=child_setup(cpus, self.nofile))
        self.procs.append(proc)
        if self.nofile is not None:
            self.note_nofile(name, nofile_of(proc.pid))
        return proc

    def note_nofile(self, name: str, got: tuple[int, int] | None) -> None:
        """Record the limits ``name`` was started with; print a note the first time a
        process kept limits other than ``nofile`` (this script may not raise the hard limit)."""
        kept = got is not None and got != (self.nofile, self.nofile)
        if kept and got not in self.nofile_got.values():
            print(f"note: could not set RLIMIT_NOFILE to {self.nofile} for {name} and the "
                  f"processes after it (raising the hard limit needs CAP_SYS_RESOURCE, which "
                  f"this script lacks, and at most fs.nr_open); they keep soft/hard "
                  f"{got[0]}/{got[1]}", file=sys.stderr)
        self.nofile_got.setdefault(name, got)

    def stop_all(self) -> None:
        """TERM every process, KILL those still alive 3 s later, then KILL any of their
        descendants left behind (a gateway's workers, should its parent not stop them)."""
        left = [(pid, start_time(pid)) for proc in self.procs if proc.poll() is None
                for pid in process_tree(proc.pid)[1:]]
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 3
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid, started in left:
            if started is not None and start_time(pid) == started:  # not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    continue


@contextmanager
def fleet_in(log_dir: Path, nofile: int | None = None) -> Iterator[Fleet]:
    """A ``Fleet`` (started with ``nofile``, see there) that is stopped however the block
    ends, SIGTERM included."""
    fleet = Fleet(log_dir, nofile)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield fleet
    finally:
        fleet.stop_all()
        signal.signal(signal.SIGTERM, previous)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_status(port: int, path: str) -> int | None:
    """Status of ``GET path`` on 127.0.0.1:``port``, or None if it cannot connect."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Authorization: Bearer {GATEWAY_KEY}\r\n"
                         "Connection: close\r\n\r\n".encode())
            return int(sock.recv(64)[9:12])
    except (OSError, ValueError):
        return None


def wait_ready(name: str, proc: subprocess.Popen[bytes], port: int, path: str,
               log_dir: Path, timeout_s: float = 30.0, listening: int = 1) -> None:
    """Poll ``GET path`` until 200 and ``listening`` sockets listen on ``port`` (one per
    worker); raise with the log's tail if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if http_status(port, path) == 200 and listeners(port) >= listening:
            return
        time.sleep(0.1)
    tail = (log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
    state = f"exited with {proc.returncode}" if proc.poll() is not None else "not ready"
    raise RuntimeError(f"{name} {state} (GET {path} on port {port}); log tail:\n{tail}")


def http_get(port: int, path: str, timeout_s: float = 2.0) -> tuple[int, bytes] | None:
    """(status, body) of ``GET path`` on a new connection (``Connection: close``), or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Authorization: Bearer {GATEWAY_KEY}\r\n"
                         "Connection: close\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    try:
        status = int(head[9:12])
    except ValueError:
        return None
    if b"\r\ntransfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return status, body


def dechunk(data: bytes) -> bytes:
    """The payload of a complete ``Transfer-Encoding: chunked`` body."""
    out, pos = bytearray(), 0
    while (end := data.find(b"\r\n", pos)) >= 0:
        size = int(data[pos:end].split(b";", 1)[0], 16)
        if size == 0:
            break
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2
    return bytes(out)


def listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:``port`` (one per SO_REUSEPORT worker)."""
    want = f"0100007F:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return 0
    return sum(1 for line in lines if (f := line.split())[1] == want and f[3] == "0A")


def wait_redis(proc: subprocess.Popen[bytes], port: int, log_dir: Path,
               timeout_s: float = 10.0) -> None:
    """Wait until redis-server answers PING; raise with its log's tail otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    tail = (log_dir / "redis.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"redis-server not ready on port {port}; log tail:\n{tail}")


# -- servers ----------------------------------------------------------------------------


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def gateway_config(name: str, spec: GatewaySpec, services: Services, directory: Path) -> Path:
    """The gateway's YAML: the mock as its only upstream, one key (with ``LOAD_LIMITS``
    unless ``spec.limits`` is off), the limit store of ``spec``."""
    key: dict[str, Any] = {"key": GATEWAY_KEY, "models": ["*"]}
    if spec.limits:
        key |= LOAD_LIMITS
    state: dict[str, Any] = {"backend": spec.state}
    if spec.state == "redis":
        state |= {"redis_url": f"redis://127.0.0.1:{services.redis_port}/0",
                  "key_prefix": f"shepherd-load:{slug(name)}:"}
        if spec.redis_timeout:
            state["redis_timeout"] = spec.redis_timeout
    config = {
        "server": {"host": "127.0.0.1", "port": 8080, "cpu_affinity": spec.cpu_affinity},
        "state": state,
        "upstreams": {"mock": {"base_url": f"http://127.0.0.1:{services.mock_port}/v1",
                               "api_key": MOCK_KEY, "models": ["*"], "max_connections": 200}},
        "keys": {"load": key},
    }
    path = directory / f"{slug(name)}.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    return path


def start_mock(args: argparse.Namespace, fleet: Fleet) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [PYTHON, args.mock_script, "--port", str(port), "--ttft-ms", str(args.ttft_ms),
            "--token-delay-ms", str(args.token_delay_ms), "--tokens", str(args.tokens)]
    proc = fleet.spawn("mock", argv, None)
    return proc, port


def start_redis(fleet: Fleet) -> tuple[subprocess.Popen[bytes], int]:
    """A private redis-server without persistence, on a free port."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("--state redis needs redis-server on PATH (apt-get install redis-server)")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(fleet.log_dir), "--logfile", ""]
    proc = fleet.spawn("redis", argv, None)
    wait_redis(proc, port, fleet.log_dir)
    return proc, port


def server_argv(target: Plan, port: int, services: Services, log_dir: Path) -> list[str]:
    if target.kind == "gateway":
        assert target.gateway is not None
        config = gateway_config(target.name, target.gateway, services, log_dir)
        return [PYTHON, "-m", "proxy", "serve", "--config", str(config),
                "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(target.gateway.workers)]
    return [PYTHON, str(ROOT / "scripts" / "bare_forwarder.py"), "--port", str(port),
            "--upstream", f"http://127.0.0.1:{services.mock_port}", "--limit", "200"]


def placement(plan: Plan, no_pin: bool) -> Placement | None:
    """(CPUs for the server under test, CPUs for everything else), or None: no pinning.

    Only a single-process server is pinned (to the first CPU, the rest on the others); a
    gateway with several workers needs every CPU, so then nothing is pinned at all."""
    available = sorted(ALL_CPUS)
    multi = plan.gateway is not None and plan.gateway.workers > 1
    if no_pin or not plan.pin or multi or len(available) < 2:
        return None
    return frozenset(available[:1]), frozenset(available[1:])


def start_targets(args: argparse.Namespace, fleet: Fleet,
                  plans: Sequence[Plan]) -> tuple[list[Target], Services]:
    """Start the mock, redis-server if a gateway uses it, and the servers under test; wait
    until all answer (every worker listening)."""
    mock, mock_port = start_mock(args, fleet)
    services = Services(mock.pid, mock_port)
    if any(p.gateway and p.gateway.state == "redis" for p in plans):
        redis, redis_port = start_redis(fleet)
        services = Services(mock.pid, mock_port, redis.pid, redis_port)
    targets = []
    for plan in plans:
        where = placement(plan, args.no_pin)
        if plan.kind == "direct":
            targets.append(Target(plan.name, plan.kind, mock_port, MOCK_KEY, None,
                                  placement=where))
            continue
        port = free_port()
        proc = fleet.spawn(slug(plan.name), server_argv(plan, port, services, fleet.log_dir),
                           None)
        targets.append(Target(plan.name, plan.kind, port,
                              GATEWAY_KEY if plan.kind == "gateway" else MOCK_KEY, proc,
                              plan.gateway, where))
    wait_ready("mock", mock, mock_port, "/v1/models", fleet.log_dir)
    for target in targets:
        if target.proc is not None:
            path = "/healthz" if target.kind == "gateway" else "/v1/models"
            wait_ready(slug(target.name), target.proc, target.port, path, fleet.log_dir,
                       listening=target.procs)
    return targets, services


def pin_tree(pid: int, cpus: frozenset[int]) -> None:
    """Run every thread of ``pid`` and of its descendants on ``cpus``."""
    for each in process_tree(pid):
        try:
            tasks = [int(t.name) for t in Path(f"/proc/{each}/task").iterdir()]
        except OSError:
            continue
        for tid in tasks:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                continue


def apply_placement(target: Target, services: Services) -> frozenset[int]:
    """Place the processes for a phase against ``target``; returns the load side's CPUs."""
    under_test, rest = target.placement or (ALL_CPUS, ALL_CPUS)
    if target.proc is not None:
        pin_tree(target.proc.pid, under_test)
    for pid in services.side_pids().values():
        pin_tree(pid, rest)
    os.sched_setaffinity(0, rest)
    return rest


# -- /proc ------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (``--workers N`` forks), from /proc."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                continue
    return pids


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid``'s tree so far (0.0 if it is gone)."""
    total = 0
    for each in process_tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return total / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    """Sum over ``pid``'s tree of ``VmHWM`` (peak resident set), in MiB."""
    total_kib = 0
    for each in process_tree(pid):
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def store_health(target: Target, log_dir: Path) -> dict[str, Any]:
    """Limit store health of a gateway after its phases, from ``GET /metrics`` of every
    worker (new connections until each worker answered; workers are told apart by their
    chat request counters) and from its log.

    ``fallbacks``: limit checks answered by per-process limits because Redis failed or was
    slower than ``state.redis_timeout``; ``rate_limited``: requests refused by a limit;
    ``outages_logged``: "limit store unavailable" warnings."""
    seen: dict[tuple[float, float], dict[str, float]] = {}
    for _ in range(12 * target.procs):
        got = http_get(target.port, "/metrics")
        if got is None or got[0] != 200:
            continue
        figures = parse_metrics(got[1].decode(errors="replace"))
        seen[(figures["chat_requests"], figures["chat_seconds"])] = figures
        if len(seen) >= target.procs:
            break
    log = (log_dir / f"{slug(target.name)}.log").read_text(errors="replace")
    return {"workers_seen": len(seen),
            "fallbacks": sum(f["fallbacks"] for f in seen.values()),
            "rate_limited": sum(f["rate_limited"] for f in seen.values()),
            "chat_requests": sum(f["chat_requests"] for f in seen.values()),
            "outages_logged": log.count("limit store unavailable")}


def parse_metrics(text: str) -> dict[str, float]:
    """The few counters ``store_health`` needs from a Prometheus text exposition."""
    out = {"fallbacks": 0.0, "rate_limited": 0.0, "chat_requests": 0.0, "chat_seconds": 0.0}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if line.startswith("#") or not name:
            continue
        if name.startswith("shepherd_limit_store_fallbacks_total"):
            out["fallbacks"] += float(value)
        elif name.startswith("shepherd_rate_limited_total"):
            out["rate_limited"] += float(value)
        elif name.startswith("shepherd_requests_total{") and "chat/completions" in name:
            out["chat_requests"] += float(value)
        elif name.startswith("shepherd_request_seconds_sum{") and "chat/completions" in name:
            out["chat_seconds"] += float(value)
    return out


# -- one phase --------------------------------------------------------------------------


def chat_body(args: argparse.Namespace, stream: bool) -> dict[str, Any]:
    """The chat completion every generator sends (both generators, every phase)."""
    return {"model": args.model, "max_tokens": args.tokens, "stream": stream,
            "messages": [{"role": "user", "content": "Say hello."}]}


def client_spec(target: Target, phase: Phase, args: argparse.Namespace,
                share: int, start_at: float) -> dict[str, Any]:
    """The JSON spec for one generator process carrying ``share`` of 1/``procs``."""
    return {
        "host": "127.0.0.1", "port": target.port, "path": "/v1/chat/completions",
        "headers": {"Authorization": f"Bearer {target.api_key}"},
        "body": chat_body(args, phase.stream),
        "mode": phase.mode, "concurrency": split(args.concurrency, args.procs, share),
        "rate": args.rate / args.procs, "duration_s": args.duration,
        "warmup_s": args.warmup, "timeout_s": args.timeout, "max_connections": 512,
        "start_at": start_at,
    }


def split(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


@dataclass
class Progress:
    """Progress on stderr: ``[#####.....] 2/9 gateway stream 2.3s/5.0s`` redrawn on a
    terminal, one line per finished phase otherwise (CI logs)."""

    phases: int
    done: int = 0
    tty: bool = field(default_factory=sys.stderr.isatty)
    width: int = 30

    def draw(self, label: str, elapsed_s: float, total_s: float) -> None:
        if not self.tty:
            return
        filled = min(self.width, int(self.width * elapsed_s / total_s))
        bar = "#" * filled + "." * (self.width - filled)
        where = f"{self.done + 1}/{self.phases} {label}"
        sys.stderr.write(f"\r[{bar}] {where:<34} {elapsed_s:4.1f}s/{total_s:.1f}s ")
        sys.stderr.flush()

    def finish(self, label: str, summary: str) -> None:
        self.done += 1
        if not self.tty:
            print(f"{self.done}/{self.phases} {label}: {summary}", file=sys.stderr)

    def clear(self) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * 85 + "\r")


def await_clients(clients: dict[Path, subprocess.Popen[bytes]], label: str,
                  start_at: float, args: argparse.Namespace,
                  shown: Progress, duration_s: float | None = None) -> list[dict[str, Any]]:
    """Show progress until every generator exits; kill any that overrun their bound.
    ``duration_s``: how long the generators run (default ``--duration``)."""
    duration_s = args.duration if duration_s is None else duration_s
    deadline = start_at + duration_s + args.timeout + 5
    while any(c.poll() is None for c in clients.values()) and time.time() < deadline:
        shown.draw(label, max(0.0, time.time() - start_at), duration_s)
        time.sleep(0.1)
    outputs = []
    for path, client in clients.items():
        if client.poll() is None:
            client.kill()
        if client.wait() != 0:
            tail = (path.parent / "loadgen.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"load generator exited with {client.returncode} in {label}:"
                               f"\n{tail}")
        outputs.append(orjson.loads(path.read_bytes()))
    return outputs


@dataclass(frozen=True)
class Load:
    """What the load generators of one phase measured: ``merge``'s figures, their own CPU
    seconds, and the CPU samples taken around the measured part."""

    merged: dict[str, Any]
    cpu_s: float
    before: CpuSample
    after: CpuSample


@dataclass(frozen=True)
class PhaseRun:
    """One phase to run: the target, the phase, where the generators run, what to sample."""

    target: Target
    phase: Phase
    label: str
    cpus: frozenset[int]  # where the generators run
    pids: dict[str, int]  # the parties whose CPU is sampled (``CpuSample.take``)
    started_s: float = field(default_factory=time.time)  # for the progress bar


def run_phase(target: Target, phase: Phase, args: argparse.Namespace, fleet: Fleet,
              services: Services, shown: Progress) -> dict[str, Any]:
    """Run one phase against ``target``; return its merged figures."""
    load_side = apply_placement(target, services)
    pids = {"under_test": target.proc.pid if target.proc else services.mock_pid,
            **services.side_pids()}
    run = PhaseRun(target, phase, f"{target.name} {phase.name}", load_side, pids)
    load = (run_wrk if args.generator == "wrk" else run_python)(run, args, fleet, shown)
    before, after, merged, loadgen_s = load.before, load.after, load.merged, load.cpu_s
    used = after.used_since(before)
    merged["cpu_pct"] = cpu_use(before, after, loadgen_s, same=target.proc is None)
    issued = merged["issued"]
    merged["cpu_us_per_request"] = 1e6 * used["under_test"] / issued if issued else None
    if "redis" in used:
        merged["redis_us_per_request"] = 1e6 * used["redis"] / issued if issued else None
    # Every party of the test (server, mock, generator, redis-server) per request: the
    # whole machine can carry at most cpus * 1e6 / this many requests/s.
    total = loadgen_s + sum(v for k, v in used.items() if k != "under_test" or target.proc)
    merged["test_us_per_request"] = 1e6 * total / issued if issued else None
    shown.finish(run.label, f"{merged['rps']:,.0f} req/s, {sum(merged['errors'].values())} errors")
    return merged


def run_python(run: PhaseRun, args: argparse.Namespace, fleet: Fleet,
               shown: Progress) -> Load:
    """The phase with ``--procs`` processes of ``scripts/loadtest_client.py``."""
    start_at = time.time() + 0.3
    clients = {}
    for i in range(args.procs):
        spec = orjson.dumps(client_spec(run.target, run.phase, args, i, start_at)).decode()
        out = fleet.log_dir / f"loadgen-{i}.json"
        clients[out] = fleet.spawn("loadgen", [PYTHON, str(CLIENT), spec], run.cpus, out)
    time.sleep(max(0.0, start_at - time.time()))
    before = CpuSample.take(run.pids)
    outputs = await_clients(clients, run.label, start_at, args, shown)
    after = CpuSample.take(run.pids)
    return Load(merge(outputs, args.duration - args.warmup), sum(o["cpu_s"] for o in outputs),
                before, after)


# -- wrk --------------------------------------------------------------------------------

#: wrk's ``done()`` hook: the figures of the run as one JSON line on stdout (wrk's summary
#: has durations in us; errors.status counts answers with a status above 399).
WRK_DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  local function ms(us) return us / 1000 end
  io.write(string.format('{"requests":%d,"duration_s":%.6f,"errors":{"connect":%d,' ..
    '"read":%d,"write":%d,"status":%d,"timeout":%d},"latency_ms":{"p50":%.3f,' ..
    '"p90":%.3f,"p99":%.3f,"p99.9":%.3f,"mean":%.3f,"max":%.3f}}\n',
    summary.requests, summary.duration / 1e6, e.connect, e.read, e.write, e.status,
    e.timeout, ms(latency:percentile(50)), ms(latency:percentile(90)),
    ms(latency:percentile(99)), ms(latency:percentile(99.9)), ms(latency.mean),
    ms(latency.max)))
end
"""
WRK_ERRORS = {"status": "HTTP non-2xx", "connect": "connect error", "read": "read error",
              "write": "write error", "timeout": "timeout"}


def lua_string(text: str) -> str:
    """``text`` as a Lua long string literal ``[==[...]==]`` (nothing to escape)."""
    level = 0
    while (closer := f"]{'=' * level}]") in text + closer[:-1]:
        level += 1
    return f"[{'=' * level}[{text}{closer}"


def wrk_script(target: Target, phase: Phase, args: argparse.Namespace) -> str:
    """The Lua script for wrk: the Python generator's request, and ``WRK_DONE``."""
    body = orjson.dumps(chat_body(args, phase.stream)).decode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {target.api_key}"}
    lines = ['wrk.method = "POST"', f"wrk.body = {lua_string(body)}"]
    lines += [f"wrk.headers[ {lua_string(k)} ] = {lua_string(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n" + WRK_DONE


def wrk_seconds(args: argparse.Namespace) -> tuple[int, int]:
    """(warm-up, measured) seconds of the wrk runs: whole seconds, wrk's ``-d`` unit."""
    return round(args.warmup), max(1, round(args.duration - args.warmup))


def spawn_wrk(run: PhaseRun, args: argparse.Namespace, fleet: Fleet, script: Path,
              seconds: int) -> dict[Path, subprocess.Popen[bytes]]:
    """``--procs`` processes of ``wrk -t1`` sharing ``--concurrency`` connections."""
    url = f"http://127.0.0.1:{run.target.port}/v1/chat/completions"
    procs = {}
    for i in range(args.procs):
        argv = [shutil.which("wrk") or "wrk", "-t1", f"-c{split(args.concurrency, args.procs, i)}",
                f"-d{seconds}s", "--timeout", f"{math.ceil(args.timeout)}s", "-s", str(script), url]
        out = fleet.log_dir / f"wrk-{i}.out"
        procs[out] = fleet.spawn("wrk", argv, run.cpus, out)
    return procs


def reap(proc: subprocess.Popen[bytes], block: bool = False) -> float | None:
    """CPU seconds (user + system, from ``os.wait4``) of ``proc`` once it has exited, which
    reaps it (its ``returncode`` is set); None while it runs (``block``: wait for it)."""
    pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def await_wrk(procs: dict[Path, subprocess.Popen[bytes]], run: PhaseRun,
              args: argparse.Namespace, shown: Progress, seconds: int) -> list[dict[str, Any]]:
    """Wait for every wrk process of a ``seconds`` run, showing progress; kill any that
    overruns its bound (then raise). Returns their ``done()`` figures plus ``cpu_s``."""
    deadline = time.time() + seconds + args.timeout + 5
    cpu: dict[Path, float] = {}
    while len(cpu) < len(procs):
        for out, proc in procs.items():
            if out not in cpu and (used := reap(proc)) is not None:
                cpu[out] = used
        if time.time() > deadline:
            for out, proc in procs.items():
                if out not in cpu:
                    proc.kill()
                    reap(proc, block=True)
            raise RuntimeError(f"wrk overran its {seconds} s run in {run.label}")
        shown.draw(run.label, time.time() - run.started_s, args.duration)
        time.sleep(0.05)
    return [wrk_figures(out, proc, cpu[out]) for out, proc in procs.items()]


def wrk_figures(out: Path, proc: subprocess.Popen[bytes], cpu_s: float) -> dict[str, Any]:
    """The JSON line ``WRK_DONE`` printed (the last line of ``out`` starting with ``{``)."""
    text = out.read_text(errors="replace")
    found = [line for line in text.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not found:
        log = (out.parent / "wrk.log").read_text(errors="replace")[-1000:]
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{text[-1000:]}{log}")
    figures: dict[str, Any] = orjson.loads(found[-1])
    return {**figures, "cpu_s": cpu_s}


def merge_wrk(outputs: list[dict[str, Any]], warmup: list[dict[str, Any]]) -> dict[str, Any]:
    """``merge``'s figures from the wrk processes of the measured run; errors of the warm-up
    run count too, as the Python generator counts them over the whole phase. With several
    processes the percentiles are their request-weighted means (an approximation)."""
    ok = [o["requests"] - o["errors"]["status"] for o in outputs]
    issued = sum(o["requests"] for o in outputs)
    errors: Counter[str] = Counter()
    for output in outputs + warmup:
        errors.update({WRK_ERRORS[k]: n for k, n in output["errors"].items() if n})
    latency = None
    if issued:
        latency = {k: sum(o["requests"] * o["latency_ms"][k] for o in outputs) / issued
                   for k in ("p50", "p90", "p99", "p99.9", "mean")}
        latency["max"] = max(o["latency_ms"]["max"] for o in outputs)
    return {"ok": sum(ok), "rps": sum(n / o["duration_s"] for n, o in zip(ok, outputs, strict=True)),
            "issued": issued, "errors": dict(errors), "latency_ms": latency, "ttft_ms": None,
            "max_schedule_lag_ms": 0.0}


def run_wrk(run: PhaseRun, args: argparse.Namespace, fleet: Fleet, shown: Progress) -> Load:
    """The phase with wrk: a warm-up run (figures dropped), then the measured run, with the
    CPU of every party sampled around the measured run only."""
    script = fleet.log_dir / "wrk.lua"
    script.write_text(wrk_script(run.target, run.phase, args))
    warmup_s, window_s = wrk_seconds(args)
    warmup = []
    if warmup_s:
        warmup = await_wrk(spawn_wrk(run, args, fleet, script, warmup_s), run, args, shown,
                           warmup_s)
    before = CpuSample.take(run.pids)
    outputs = await_wrk(spawn_wrk(run, args, fleet, script, window_s), run, args, shown,
                        window_s)
    after = CpuSample.take(run.pids)
    return Load(merge_wrk(outputs, warmup), sum(o["cpu_s"] for o in outputs), before, after)


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by each party (server under test, mock, redis-server), this
    script and the whole machine (``/proc/stat``), taken at monotonic time ``at_s``."""

    at_s: float
    used_s: dict[str, float]
    own_s: float
    machine_s: float

    @classmethod
    def take(cls, pids: dict[str, int]) -> CpuSample:
        times = os.times()
        return cls(time.monotonic(), {name: cpu_seconds(pid) for name, pid in pids.items()},
                   times.user + times.system, machine_busy_seconds())

    def used_since(self, before: CpuSample) -> dict[str, float]:
        return {name: s - before.used_s[name] for name, s in self.used_s.items()}


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (``/proc/stat`` first line)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK  # minus idle, iowait


def cpu_use(before: CpuSample, after: CpuSample, loadgen_s: float,
            same: bool) -> dict[str, float]:
    """% of one CPU used between two samples, per party; ``same``: mock is under test.

    ``other_processes`` is what the machine did beyond this test (other users' jobs):
    when it is high the figures are noisy."""
    wall = after.at_s - before.at_s
    used = after.used_since(before)
    mine = sum(v for k, v in used.items() if not (same and k == "under_test"))
    ours = mine + loadgen_s + after.own_s - before.own_s
    foreign = after.machine_s - before.machine_s - ours
    pct = {"under_test": 100 * used["under_test"] / wall, "mock": 100 * used["mock"] / wall,
           "loadgen": 100 * loadgen_s / wall}
    if "redis" in used:
        pct["redis"] = 100 * used["redis"] / wall
    pct["other_processes"] = max(0.0, 100 * foreign / wall)
    return pct


# -- figures ----------------------------------------------------------------------------


def percentiles(values_ms: list[float]) -> dict[str, float] | None:
    """Nearest-rank p50/p90/p99/p99.9 plus mean and max, in ms; None if no samples."""
    if not values_ms:
        return None
    ordered = sorted(values_ms)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(p / 100 * len(ordered) + 0.5) - 1))]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "p99.9": rank(99.9),
            "mean": sum(ordered) / len(ordered), "max": ordered[-1]}


def merge(outputs: list[dict[str, Any]], window_s: float) -> dict[str, Any]:
    """Combine the generator processes' outputs of one phase."""
    latencies = [v for o in outputs for v in o["latencies_ms"]]
    ttfts = [v for o in outputs for v in o["ttft_ms"]]
    errors: Counter[str] = Counter()
    for output in outputs:
        errors.update(output["errors"])
    return {
        "ok": len(latencies), "rps": len(latencies) / window_s,
        "issued": sum(o["issued"] for o in outputs), "errors": dict(errors),
        "latency_ms": percentiles(latencies), "ttft_ms": percentiles(ttfts),
        "max_schedule_lag_ms": max(o["max_lag_ms"] for o in outputs),
    }


def derived(targets: list[Target]) -> dict[str, Any]:
    """Added latency vs direct at the fixed rate, and gateway throughput as % of bare."""
    by_name = {t.name: t.results for t in targets}
    out: dict[str, Any] = {"added_latency_ms": {}, "gateway_pct_of_bare": {}}
    direct = (by_name.get("direct") or {}).get("rate", {}).get("latency_ms")
    for name, results in by_name.items():
        mine = results.get("rate", {}).get("latency_ms")
        if name != "direct" and mine and direct:
            out["added_latency_ms"][name] = {p: mine[p] - direct[p] for p in ("p50", "p99")}
    if "gateway" in by_name and "bare" in by_name:
        out["gateway_cpu_per_request_vs_bare"] = {}
        for phase in ("non-stream", "stream"):
            gateway, bare = by_name["gateway"][phase], by_name["bare"][phase]
            pct = 100 * gateway["rps"] / bare["rps"] if bare["rps"] else 0.0
            out["gateway_pct_of_bare"][phase] = pct
            if gateway["cpu_us_per_request"] and bare["cpu_us_per_request"]:
                ratio = gateway["cpu_us_per_request"] / bare["cpu_us_per_request"]
                out["gateway_cpu_per_request_vs_bare"][phase] = ratio
    return out


# -- report -----------------------------------------------------------------------------


CPU_PARTIES = {"under_test": "test", "mock": "mock", "loadgen": "gen", "redis": "redis",
               "other_processes": "other"}


def pair(stats: dict[str, float] | None, fmt: str = "{:.2f}") -> str:
    if not stats:
        return "-"
    return f"{fmt.format(stats['p50'])} / {fmt.format(stats['p99'])}"


def cpu_label(result: dict[str, Any]) -> str:
    return "CPU% " + "/".join(CPU_PARTIES[k] for k in result["cpu_pct"])


def cpu_cells(result: dict[str, Any]) -> str:
    return "/".join(f"{v:.0f}" for v in result["cpu_pct"].values())


def table_rows(targets: list[Target], extra: dict[str, Any],
               rate: float) -> list[tuple[str, list[str]]]:
    """(label, one cell per target) for every row of the main table."""

    def cells(get: Callable[[Target], str]) -> list[str]:
        return [get(t) for t in targets]

    added = extra["added_latency_ms"]
    with_redis = "redis_us_per_request" in targets[0].results["non-stream"]
    rows = [
        ("non-stream  req/s", cells(lambda t: f"{t.results['non-stream']['rps']:,.0f}")),
        ("  latency p50 / p99 ms", cells(lambda t: pair(t.results["non-stream"]["latency_ms"]))),
        ("  CPU us / request (tested)", cells(lambda t: cost(t, "non-stream"))),
    ]
    if with_redis:
        rows.append(("  CPU us / request redis", cells(lambda t: redis_cost(t, "non-stream"))))
    rows += [
        ("stream      streams/s", cells(lambda t: f"{t.results['stream']['rps']:,.0f}")),
        ("  TTFT p50 / p99 ms", cells(lambda t: pair(t.results["stream"]["ttft_ms"]))),
        ("  total p50 / p99 ms", cells(lambda t: pair(t.results["stream"]["latency_ms"]))),
        ("  CPU us / stream (tested)", cells(lambda t: cost(t, "stream"))),
    ]
    if with_redis:
        rows.append(("  CPU us / stream redis", cells(lambda t: redis_cost(t, "stream"))))
    rows += [
        (f"{rate:g} req/s  achieved", cells(lambda t: f"{t.results['rate']['rps']:,.1f}")),
        ("  latency p50 / p99 ms", cells(lambda t: pair(t.results["rate"]["latency_ms"]))),
        ("  added vs direct p50 / p99", cells(
            lambda t: pair(added.get(t.name), "{:+.2f}") if t.name in added else "-")),
        ("errors (all phases)", cells(lambda t: str(sum(
            sum(r["errors"].values()) for r in t.results.values())))),
        (cpu_label(targets[0].results["non-stream"]),
         cells(lambda t: cpu_cells(t.results["non-stream"]))),
        ("peak RSS MiB (VmHWM)", cells(rss_cell)),
    ]
    if any(t.store for t in targets):
        rows.append(("limit store fallbacks", cells(
            lambda t: f"{t.store['fallbacks']:.0f}" if t.store else "-")))
    return rows


def rss_cell(target: Target) -> str:
    if target.proc is None:
        return f"{target.rss_mib:.1f} (mock)"
    if target.procs > 1:
        return f"{target.rss_mib:.1f} ({target.procs}w+parent)"
    return f"{target.rss_mib:.1f}"


def saturated(result: dict[str, Any]) -> bool:
    """Was the process under test CPU-bound? Only then does CPU per request predict the
    rate one CPU sustains (an idle process pays wake-ups that a busy one batches)."""
    return bool(result["cpu_pct"]["under_test"] >= SATURATED_PCT)


def cost(target: Target, phase: str) -> str:
    """CPU us of the process under test per request; if CPU-bound, the rate filling a CPU."""
    result = target.results[phase]
    us = result["cpu_us_per_request"]
    if not us:
        return "-"
    return f"{us:.0f} (={1e6 / us:,.0f}/s)" if saturated(result) else f"{us:.0f}"


def redis_cost(target: Target, phase: str) -> str:
    us = target.results[phase].get("redis_us_per_request")
    return f"{us:.1f}" if us is not None and target.gateway and target.gateway.state == "redis" \
        else "-"


def render(header_row: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """A plain text table: labels on the left, right-aligned cells."""
    width = max(len(label) for label, _ in rows) + 2
    cols = [max(len(name), *(len(r[1][i]) for r in rows)) + 3
            for i, name in enumerate(header_row)]
    lines = [" " * width + "".join(n.rjust(c) for n, c in zip(header_row, cols, strict=True))]
    for label, row in rows:
        lines.append(label.ljust(width) + "".join(v.rjust(c) for v, c in zip(row, cols, strict=True)))
    return "\n".join(lines)


def render_table(targets: list[Target], extra: dict[str, Any], rate: float) -> str:
    return render([t.name for t in targets], table_rows(targets, extra, rate))


def findings(targets: list[Target], extra: dict[str, Any]) -> list[str]:
    """The sentences under the table: ratios, sanity checks, error details."""
    by_name = {t.name: t.results for t in targets}
    notes = ratio_notes(by_name, extra) + bare_notes(by_name.get("bare"))
    for target in targets:
        notes += saturation_notes(target, target.results)
        notes += store_notes(target)
        for phase, result in target.results.items():
            if result["errors"]:
                kinds = ", ".join(f"{k} x{v}" for k, v in sorted(result["errors"].items()))
                notes.append(f"errors {target.name} {phase}: {kinds}")
    return notes


def ratio_notes(by_name: dict[str, dict[str, Any]], extra: dict[str, Any]) -> list[str]:
    """Gateway vs bare forwarder: throughput, and CPU per request (robust to noise)."""
    notes = []
    ratios = extra.get("gateway_cpu_per_request_vs_bare", {})
    for phase, pct in extra["gateway_pct_of_bare"].items():
        note = f"gateway {phase} throughput = {pct:.0f}% of the bare forwarder"
        if phase in ratios:
            note += f"; CPU per request {ratios[phase]:.2f}x the bare forwarder's"
            if saturated(by_name["gateway"][phase]) and saturated(by_name["bare"][phase]):
                note += f" (= {100 / ratios[phase]:.0f}% of its throughput on a dedicated CPU)"
        notes.append(note)
    return notes


def bare_notes(bare: dict[str, Any] | None) -> list[str]:
    """Sanity check of the bare forwarder against the reference figure."""
    if not bare or not bare["non-stream"]["cpu_us_per_request"]:
        return []
    result = bare["non-stream"]
    us = result["cpu_us_per_request"]
    if not saturated(result):
        return [f"bare forwarder non-stream: {result['rps']:,.0f} req/s at "
                f"{result['cpu_pct']['under_test']:.0f}% CPU, not CPU-bound (mock delays?), "
                f"so not comparable with the ~{BRIEF_BARE_RPS:,} req/s reference"]
    return [f"bare forwarder non-stream: {result['rps']:,.0f} req/s measured, {us:.0f} us CPU "
            f"per request = {1e6 / us:,.0f} req/s per full CPU (reference: "
            f"~{BRIEF_BARE_RPS:,} req/s on one core)"]


def saturation_notes(target: Target, results: dict[str, dict[str, Any]]) -> list[str]:
    """Warn when the load side's CPU (or, unpinned, the machine) was nearly full, or other
    jobs took CPU."""
    notes = []
    for phase, result in results.items():
        cpu = result["cpu_pct"]
        load_side = cpu["mock"] + cpu["loadgen"] + cpu.get("redis", 0.0)
        closed = target.proc is not None and not phase.startswith("rate")
        if closed and target.placement is not None and load_side > 85:
            notes.append(f"WARNING {target.name} {phase}: mock + load generator"
                         f"{' + redis' if 'redis' in cpu else ''} used {load_side:.0f}% of "
                         "their CPU; the load side may be limiting")
        busy = load_side + cpu["under_test"]
        if closed and target.placement is None and busy > 90 * len(ALL_CPUS):
            us = result.get("test_us_per_request")
            ceiling = f" (~{len(ALL_CPUS) * 1e6 / us:,.0f} req/s at {us:.0f} us per request " \
                      "for all parties together)" if us else ""
            notes.append(f"{target.name} {phase}: unpinned, all {len(ALL_CPUS)} CPUs busy "
                         f"({busy:.0f}%): throughput is the machine's ceiling with mock and "
                         f"generator on it{ceiling}, not the server's alone")
        if cpu["other_processes"] > NOISY_PCT:
            notes.append(f"WARNING {target.name} {phase}: other processes used "
                         f"{cpu['other_processes']:.0f}% of a CPU; figures are noisy")
    return notes


def store_notes(target: Target) -> list[str]:
    """What ``GET /metrics`` and the log say about the limit store of a gateway."""
    health = target.store
    if not health:
        return []
    note = (f"{target.name} limit store: {health['fallbacks']:.0f} fallbacks to per-process "
            f"limits, {health['rate_limited']:.0f} requests refused by limits, "
            f"{health['outages_logged']} 'limit store unavailable' warnings "
            f"(/metrics of {health['workers_seen']}/{target.procs} workers)")
    if health["fallbacks"]:
        note += ("; WARNING: Redis answered slower than state.redis_timeout under load, so "
                 "part of the requests skipped it (try --redis-timeout 500ms)")
    return [note]


def where(target: Target) -> str:
    """Where the processes ran while ``target`` was loaded."""
    if target.placement is None:
        return "nothing pinned"
    under, rest = target.placement
    if target.proc is None:
        return f"mock + generator on CPU {fmt_cpus(rest)}, CPU {fmt_cpus(under)} idle"
    return f"server on CPU {fmt_cpus(under)}, the rest on CPU {fmt_cpus(rest)}"


def header(args: argparse.Namespace, targets: list[Target], services: Services) -> str:
    """The setup, printed above the table."""
    title = (f"Shepherd load test - 127.0.0.1, Python {platform.python_version()}, "
             f"{len(ALL_CPUS)} CPUs, uvloop everywhere")
    lines = [title]
    for target in targets:
        what = f"gateway: {target.gateway.describe()}" if target.gateway else (
            "bare aiohttp forwarder" if target.kind == "bare" else "the mock itself")
        lines.append(f"  {target.name:<20} {what}; {where(target)}")
    if services.redis_port is not None:
        lines.append(f"redis: private redis-server on port {services.redis_port} (no "
                     "persistence), placed like the mock and the generator")
    if any(t.gateway and t.gateway.limits for t in targets):
        budget = LOAD_LIMITS["budget"]
        lines.append(f"load key limits: rpm {LOAD_LIMITS['rpm']:,}, tpm {LOAD_LIMITS['tpm']:,}, "
                     f"max_concurrent {LOAD_LIMITS['max_concurrent']:,}, budget "
                     f"{budget['tokens']:.0e} tokens per {budget['period']} (never reached)")
    lines.append(f"load: {generator_text(args)}, {args.concurrency} closed-loop connections, "
                 f"{args.duration:g} s per phase ({args.warmup:g} s warm-up not counted)"
                 + ("" if args.compare else f"; open loop at {args.rate:g} req/s"))
    lines.append(f"mock: {args.mock_engine} engine ({Path(args.mock_script).name}), "
                 f"{args.tokens} tokens per answer, ttft {args.ttft_ms:g} ms, "
                 f"token delay {args.token_delay_ms:g} ms")
    if args.wrk_note:
        lines.append(args.wrk_note)
    return "\n".join(lines)


def generator_text(args: argparse.Namespace) -> str:
    if args.generator == "wrk":
        warmup_s, window_s = wrk_seconds(args)
        return (f"generator wrk ({args.procs} process(es) of wrk -t1, {warmup_s} s warm-up run "
                f"then {window_s} s measured)")
    return (f"generator python ({args.procs} process(es) of loadtest_client.py, raw HTTP/1.1 "
            "keep-alive client)")


def fmt_cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


# -- --compare --------------------------------------------------------------------------


def compare_plans(args: argparse.Namespace) -> list[Plan]:
    """Same load, one change at a time: limits, store, pinning, workers."""
    timeout = args.redis_timeout
    return [
        Plan("bare", "bare"),
        Plan("memory w1 no-limits", "gateway", GatewaySpec("memory", 1, limits=False)),
        Plan("memory w1", "gateway", GatewaySpec("memory", 1)),
        Plan("redis w1", "gateway", GatewaySpec("redis", 1, redis_timeout=timeout)),
        Plan("redis w1 unpinned", "gateway", GatewaySpec("redis", 1, redis_timeout=timeout),
             pin=False),
        Plan("redis w2", "gateway", GatewaySpec("redis", 2, redis_timeout=timeout)),
        Plan("redis w2 affinity", "gateway",
             GatewaySpec("redis", 2, redis_timeout=timeout, cpu_affinity=True)),
    ]


def run_compare(args: argparse.Namespace, fleet: Fleet) -> tuple[list[Target], Services]:
    """``--rounds`` rounds of the non-stream phase over every plan, the order rotated each
    round so that slow drifts of the machine spread over all of them."""
    targets, services = start_targets(args, fleet, compare_plans(args))
    shown = Progress(len(targets) * args.rounds)
    phase = PHASES[0]
    for r in range(args.rounds):
        for target in targets[r % len(targets):] + targets[: r % len(targets)]:
            result = run_phase(target, phase, args, fleet, services, shown)
            for _ in range(args.retries):  # other jobs took CPU: measure again
                if result["cpu_pct"]["other_processes"] <= NOISY_PCT:
                    break
                shown.phases += 1
                again = run_phase(target, phase, args, fleet, services, shown)
                again["noisy_attempts"] = result.get("noisy_attempts", 0) + 1
                if again["cpu_pct"]["other_processes"] < result["cpu_pct"]["other_processes"]:
                    result = again
                else:
                    result["noisy_attempts"] = again["noisy_attempts"]
            target.rounds.append(result)
    finish_targets(targets, services, fleet)
    shown.clear()
    for target in targets:
        target.results["non-stream"] = summarize(target.rounds)
    return targets, services


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds; errors summed; the CPU split of the median round."""
    def med(get: Callable[[dict[str, Any]], float | None]) -> float | None:
        values = [v for r in rounds if (v := get(r)) is not None]
        return statistics.median(values) if values else None

    errors: Counter[str] = Counter()
    for r in rounds:
        errors.update(r["errors"])
    middle = sorted(rounds, key=lambda r: r["rps"])[len(rounds) // 2]
    def pct(name: str) -> float | None:
        return med(lambda r: (r["latency_ms"] or {}).get(name))

    latency = {"p50": pct("p50"), "p99": pct("p99")}
    return {"rps": med(lambda r: r["rps"]), "rps_rounds": [r["rps"] for r in rounds],
            "cpu_us_per_request": med(lambda r: r["cpu_us_per_request"]),
            "redis_us_per_request": med(lambda r: r.get("redis_us_per_request")),
            "test_us_per_request": med(lambda r: r["test_us_per_request"]),
            "latency_ms": latency if latency["p50"] is not None else None,
            "errors": dict(errors), "cpu_pct": middle["cpu_pct"],
            "noisy_rounds": sum(r["cpu_pct"]["other_processes"] > NOISY_PCT for r in rounds)}


def compare_rows(targets: list[Target]) -> list[tuple[str, list[str]]]:
    def row(target: Target) -> list[str]:
        res = target.results["non-stream"]
        spread = f"{min(res['rps_rounds']):,.0f}-{max(res['rps_rounds']):,.0f}"
        redis = res["redis_us_per_request"]
        return [f"{res['rps']:,.0f}", spread, f"{res['cpu_us_per_request']:.0f}",
                f"{redis:.1f}" if redis is not None and target.gateway
                and target.gateway.state == "redis" else "-",
                f"{res['test_us_per_request']:.0f}", pair(res["latency_ms"]),
                cpu_cells(res), str(sum(res["errors"].values())),
                f"{target.store['fallbacks']:.0f}" if target.store else "-",
                "pinned" if target.placement else "no"]

    return [(t.name, row(t)) for t in targets]


COMPARE_COLUMNS = ["req/s", "min-max", "srv us/req", "redis us/req", "all us/req",
                   "p50 / p99 ms", "CPU% srv/mock/gen/redis/other", "errors", "fallbacks",
                   "pinned"]


def ratio(targets: dict[str, Target], num: str, den: str, key: str) -> float | None:
    a, b = targets.get(num), targets.get(den)
    if a is None or b is None:
        return None
    x, y = a.results["non-stream"][key], b.results["non-stream"][key]
    return x / y if x and y else None


def compare_ratios(targets: list[Target]) -> list[tuple[str, str, str, str]]:
    """(what, req/s ratio, server CPU per request ratio, numerator / denominator)."""
    by_name = {t.name: t for t in targets}
    pairs = [
        ("redis / memory (1 worker, pinned)", "redis w1", "memory w1"),
        ("limits on / off (memory, 1 worker)", "memory w1", "memory w1 no-limits"),
        ("workers 2 / 1 (redis, both unpinned)", "redis w2", "redis w1 unpinned"),
        ("workers 2 / 1 (redis, w1 pinned)", "redis w2", "redis w1"),
        ("workers 2 cpu_affinity / 1 pinned (redis)", "redis w2 affinity", "redis w1"),
        ("gateway memory w1 / bare", "memory w1", "bare"),
        ("gateway redis w2 / bare", "redis w2", "bare"),
    ]
    out = []
    for what, num, den in pairs:
        rps = ratio(by_name, num, den, "rps")
        cpu = ratio(by_name, num, den, "cpu_us_per_request")
        out.append((what, f"{rps:.2f}x" if rps else "-", f"{cpu:.2f}x" if cpu else "-",
                    f"{num} / {den}"))
    return out


def compare_report(args: argparse.Namespace, targets: list[Target], services: Services) -> None:
    print(header(args, targets, services), end="\n\n")
    print(f"non-stream, closed loop, median of {args.rounds} rounds (srv = server under test, "
          "all its workers; all = server + mock + generator + redis-server)")
    print(render(COMPARE_COLUMNS, compare_rows(targets)), end="\n\n")
    ratios = compare_ratios(targets)
    print(render(["req/s", "srv CPU/req", "configs"], [(w, [a, b, c]) for w, a, b, c in ratios]),
          end="\n\n")
    for target in targets:
        median = target.results["non-stream"]
        notes = saturation_notes(target, {"non-stream": median})
        if median["noisy_rounds"]:
            notes.append(f"WARNING {target.name}: {median['noisy_rounds']} of {args.rounds} "
                         f"rounds had other processes above {NOISY_PCT}% of a CPU after "
                         f"{args.retries} retries; figures are noisy")
        notes += store_notes(target)
        if errors := target.results["non-stream"]["errors"]:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(errors.items()))
            notes.append(f"errors {target.name}: {kinds}")
        for note in notes:
            print(note)
    if args.json:
        doc = {"setup": setup_json(args, targets, services),
               "results": {t.name: {"median": t.results["non-stream"], "rounds": t.rounds,
                                    "limit_store": t.store, "peak_rss_mib": t.rss_mib}
                           for t in targets},
               "ratios": [{"what": w, "rps": a, "cpu_per_request": b, "configs": c}
                          for w, a, b, c in ratios]}
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        print(f"figures written to {args.json}")


# -- scenarios: overload, failover and resume -----------------------------------------------
#
# ``--scenario overload``: one mock with a fixed service time behind a gateway whose upstream
# has ``max_in_flight``/``max_queue``/``queue_timeout``; an open loop at multiples of its
# capacity. ``--scenario failover``: two mocks serving one model, closed-loop load, one mock
# SIGKILLed and later restarted on its port, ``/readyz`` polled throughout. ``--scenario
# resume``: streams cut and resumed on the same or the other instance, detached streams'
# RSS, streaming throughput with memory and Redis stream logs. See ``--help``.


#: An overload 503's body names its cause: a full queue, or the queue wait's deadline.
OVERLOAD_CLASSIFY = [["queue is full", "queue full"], ["Timed out waiting", "deadline"]]
GENERATOR_RATE = 1500  # req/s one open-loop generator process is given at most
GOODPUT_TARGET_PCT = 90  # goodput at the highest level, % of the best level's
FAST_503_MS = 50  # p99 of a queue-full 503 must be below this
FAILOVER_HEALTH = {"interval": "500ms", "timeout": "250ms", "unhealthy_threshold": 2,
                   "healthy_threshold": 2}
SPARK = " ▁▂▃▄▅▆▇█"


def spawn_mock(args: argparse.Namespace, fleet: Fleet, name: str, port: int,
               cpus: frozenset[int] | None) -> subprocess.Popen[bytes]:
    argv = [PYTHON, args.mock_script, "--port", str(port), "--ttft-ms", str(args.ttft_ms),
            "--token-delay-ms", str(args.token_delay_ms), "--tokens", str(args.tokens)]
    return fleet.spawn(name, argv, cpus)


def start_scenario_gateway(args: argparse.Namespace, fleet: Fleet,
                           upstreams: dict[str, dict[str, Any]],
                           mocks: dict[str, tuple[subprocess.Popen[bytes], int]]
                           ) -> tuple[subprocess.Popen[bytes], int, dict[str, Any]]:
    """Start a one-worker gateway (memory store, load key without limits) on ``upstreams``;
    wait until it and every mock answer. Returns (process, port, config)."""
    config = {"server": {"host": "127.0.0.1", "port": 8080, "access_log": False},
              "state": {"backend": "memory"}, "upstreams": upstreams,
              "keys": {"load": {"key": GATEWAY_KEY, "models": ["*"]}}}
    path = fleet.log_dir / f"{args.scenario}.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    port = free_port()
    proc = fleet.spawn("gateway", [PYTHON, "-m", "proxy", "serve", "--config", str(path),
                                   "--host", "127.0.0.1", "--port", str(port)], None)
    for name, (mock, mock_port) in mocks.items():
        wait_ready(name, mock, mock_port, "/v1/models", fleet.log_dir)
    wait_ready("gateway", proc, port, "/healthz", fleet.log_dir)
    return proc, port, config


def mock_upstream(port: int, **extra: Any) -> dict[str, Any]:
    return {"base_url": f"http://127.0.0.1:{port}/v1", "api_key": MOCK_KEY, "models": ["*"],
            **extra}


def scenario_placement(args: argparse.Namespace) -> Placement | None:
    """Like the gateway of the default run: alone on the first CPU, the rest on the others."""
    return placement(Plan("gateway", "gateway", GatewaySpec()), args.no_pin)


def place(where: Placement | None, gateway: int, others: Sequence[int]) -> frozenset[int] | None:
    """Pin the gateway and the other processes (and this script) as ``where`` says; returns
    the CPUs for processes started later on the load side (None: anywhere)."""
    if where is None:
        return None
    under, rest = where
    pin_tree(gateway, under)
    for pid in others:
        pin_tree(pid, rest)
    os.sched_setaffinity(0, rest)
    return rest


def scenario_spec(args: argparse.Namespace, port: int, start_at: float, *, mode: str,
                  duration_s: float, warmup_s: float, rate: float = 0.0, concurrency: int = 0,
                  classify: list[list[str]] | None = None, timeline_s: float | None = None,
                  max_connections: int = 1024) -> dict[str, Any]:
    """A generator spec: non-stream chat completions to the gateway."""
    return {"host": "127.0.0.1", "port": port, "path": "/v1/chat/completions",
            "headers": {"Authorization": f"Bearer {GATEWAY_KEY}"},
            "body": chat_body(args, stream=False),
            "mode": mode, "concurrency": concurrency, "rate": rate, "duration_s": duration_s,
            "warmup_s": warmup_s, "timeout_s": args.timeout, "max_connections": max_connections,
            "start_at": start_at, "classify": classify or [], "timeline_s": timeline_s}


def spawn_clients(fleet: Fleet, specs: list[dict[str, Any]], cpus: frozenset[int] | None,
                  script: Path = CLIENT) -> dict[Path, subprocess.Popen[bytes]]:
    """One ``script`` process per spec (``loadtest_client.py`` unless told), output files
    ``loadgen-<i>.json``, logs in ``loadgen.log``."""
    clients = {}
    for i, spec in enumerate(specs):
        out = fleet.log_dir / f"loadgen-{i}.json"
        clients[out] = fleet.spawn("loadgen", [PYTHON, str(script), orjson.dumps(spec).decode()],
                                   cpus, out)
    return clients


def merge_scenario(outputs: list[dict[str, Any]], window_s: float) -> dict[str, Any]:
    """``merge`` plus the error latencies (window) and the timeline of every generator."""
    merged = merge(outputs, window_s)
    errors: dict[str, list[float]] = {}
    timeline: dict[int, Counter[str]] = {}
    for output in outputs:
        for kind, values in output.get("error_latencies_ms", {}).items():
            errors.setdefault(kind, []).extend(values)
        for bucket, counts in output.get("timeline", {}).items():
            timeline.setdefault(int(bucket), Counter()).update(counts)
    merged["window_errors"] = {kind: {"count": len(v), "per_s": len(v) / window_s,
                                      "latency_ms": percentiles(v)}
                               for kind, v in sorted(errors.items())}
    merged["timeline"] = {b: dict(timeline[b]) for b in sorted(timeline)}
    return merged


def metric_samples(port: int, prefixes: Sequence[str]) -> dict[str, float]:
    """``name{labels}`` -> value of every sample of ``GET /metrics`` starting with a prefix."""
    got = http_get(port, "/metrics")
    if got is None or got[0] != 200:
        return {}
    out = {}
    for line in got[1].decode(errors="replace").splitlines():
        name, _, value = line.rpartition(" ")
        if name and not line.startswith("#") and name.startswith(tuple(prefixes)):
            out[name] = float(value)
    return out


def readyz(port: int) -> dict[str, Any] | None:
    got = http_get(port, "/readyz", timeout_s=1.0)
    if got is None:
        return None
    try:
        doc: dict[str, Any] = orjson.loads(got[1])
    except orjson.JSONDecodeError:
        return None
    return doc


def other_cpu_pct(before: CpuSample, after: CpuSample, ours_s: float) -> float:
    """% of a CPU the machine spent outside this test between two samples."""
    wall = after.at_s - before.at_s
    own = after.own_s - before.own_s
    return max(0.0, 100 * (after.machine_s - before.machine_s - ours_s - own) / wall)


def fmt_ms(stats: dict[str, float] | None) -> str:
    return "-" if not stats else f"{stats['p50']:.1f} / {stats['p99']:.1f}"


def scenario_json(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    if args.json:
        setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_bytes(orjson.dumps({"setup": setup, **doc},
                                           option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
        print(f"figures written to {args.json}")


# -- overload


def run_overload(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    """Open loop at ``--levels`` multiples of the capacity, ``--duration`` s each."""
    mock_port = free_port()
    mock = spawn_mock(args, fleet, "mock", mock_port, None)
    upstream = mock_upstream(mock_port, max_in_flight=args.max_in_flight,
                             max_queue=args.max_queue,
                             queue_timeout=f"{args.queue_timeout_ms:g}ms")
    gateway, port, config = start_scenario_gateway(args, fleet, {"mock": upstream},
                                                   {"mock": (mock, mock_port)})
    load_side = place(scenario_placement(args), gateway.pid, [mock.pid])
    service_ms = args.ttft_ms + args.tokens * args.token_delay_ms
    capacity = args.max_in_flight * 1000 / service_ms
    pids = {"under_test": gateway.pid, "mock": mock.pid}
    shown = Progress(len(args.levels))
    levels = []
    for mult in args.levels:
        result = overload_level(args, fleet, port, pids, mult * capacity, load_side, shown,
                                f"overload {mult:g}x")
        for _ in range(args.retries):  # other jobs took CPU: measure again
            if result["cpu_pct"]["other_processes"] <= NOISY_PCT:
                break
            shown.phases += 1
            again = overload_level(args, fleet, port, pids, mult * capacity, load_side, shown,
                                   f"overload {mult:g}x (again)")
            again["noisy_attempts"] = result.get("noisy_attempts", 0) + 1
            if again["cpu_pct"]["other_processes"] < result["cpu_pct"]["other_processes"]:
                result = again
            else:
                result["noisy_attempts"] = again["noisy_attempts"]
        result["multiple"] = mult
        levels.append(result)
    shown.clear()
    counters = metric_samples(port, ["shepherd_queue_overflows_total",
                                     "shepherd_upstream_errors_total",
                                     "shepherd_retries_total"])
    best = max(r["goodput"] for r in levels) if levels else 0.0
    for r in levels:
        r["pct_of_best"] = 100 * r["goodput"] / best if best else 0.0
        r["pct_of_capacity"] = 100 * r["goodput"] / capacity
    return {"scenario": "overload", "capacity_rps": capacity, "service_ms": service_ms,
            "best_goodput": best, "levels": levels, "metrics": counters,
            "gateway_upstream": upstream, "gateway_config": config}


def overload_level(args: argparse.Namespace, fleet: Fleet, port: int, pids: dict[str, int],
                   rate: float, load_side: frozenset[int] | None, shown: Progress,
                   label: str) -> dict[str, Any]:
    """One open-loop level; then wait (at most 3 s) until the gateway's queue drained."""
    procs = max(args.procs, math.ceil(rate / GENERATOR_RATE))
    start_at = time.time() + 0.3
    specs = [scenario_spec(args, port, start_at, mode="rate", rate=rate / procs,
                           duration_s=args.duration, warmup_s=args.warmup,
                           classify=OVERLOAD_CLASSIFY) for _ in range(procs)]
    clients = spawn_clients(fleet, specs, load_side)
    time.sleep(max(0.0, start_at - time.time()))
    before = CpuSample.take(pids)
    outputs = await_clients(clients, label, start_at, args, shown)
    after = CpuSample.take(pids)
    shown.finish(label, "done")
    window = args.duration - args.warmup
    merged = merge_scenario(outputs, window)
    loadgen_s = sum(o["cpu_s"] for o in outputs)
    merged["cpu_pct"] = cpu_use(before, after, loadgen_s, same=False)
    merged |= {"offered_rps": rate, "generators": procs,
               "issued_rps": merged["issued"] / args.duration, "goodput": merged["rps"]}
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # let the queue drain before the next level
        doc = readyz(port)
        ups = (doc or {}).get("upstreams", {}).values()
        if doc and all(u.get("in_flight", 0) == 0 and u.get("queued", 0) == 0 for u in ups):
            break
        time.sleep(0.1)
    return merged


def overload_report(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    levels = doc["levels"]
    up = doc["gateway_upstream"]
    print(f"Shepherd overload - 127.0.0.1, Python {platform.python_version()}, "
          f"{len(ALL_CPUS)} CPUs; {where_scenario(args)}")
    print(f"mock: non-stream service time {doc['service_ms']:g} ms (ttft {args.ttft_ms:g} ms, "
          f"{args.tokens} tokens x {args.token_delay_ms:g} ms); gateway upstream: "
          f"max_in_flight {up['max_in_flight']}, max_queue {up['max_queue']}, queue_timeout "
          f"{up['queue_timeout']} -> capacity {doc['capacity_rps']:,.0f} req/s")
    print(f"load: open loop (fixed rate), {args.duration:g} s per level, the first "
          f"{args.warmup:g} s not counted; figures are over the requests issued in the window; "
          f"a full queue holds {up['max_queue'] / doc['capacity_rps'] * 1000:.0f} ms of work\n")
    overload = [f"HTTP 503 {label}" for _, label in OVERLOAD_CLASSIFY]
    kinds = overload + sorted({k for r in levels for k in r["window_errors"]} - set(overload))
    rows: list[tuple[str, list[str]]] = [
        ("offered req/s", [f"{r['offered_rps']:,.0f}" for r in levels]),
        ("  issued req/s / max lag ms", [f"{r['issued_rps']:,.0f} / {r['max_schedule_lag_ms']:.1f}"
                                          for r in levels]),
        ("goodput (200/s)", [f"{r['goodput']:,.1f}" for r in levels]),
        ("  % of best / % of capacity", [f"{r['pct_of_best']:.1f} / {r['pct_of_capacity']:.1f}"
                                          for r in levels]),
        ("  200 latency p50 / p99 ms", [fmt_ms(r["latency_ms"]) for r in levels]),
    ]
    for kind in kinds:
        def cell(r: dict[str, Any], kind: str = kind) -> tuple[str, str]:
            e = r["window_errors"].get(kind)
            return ("0", "-") if e is None else (f"{e['per_s']:,.1f}", fmt_ms(e["latency_ms"]))
        rows.append((f"{kind} /s", [cell(r)[0] for r in levels]))
        rows.append(("  latency p50 / p99 ms", [cell(r)[1] for r in levels]))
    rows += [
        ("not counted (in warm-up)", [str(sum(r["errors"].values())
                                       - sum(e["count"] for e in r["window_errors"].values()))
                                   for r in levels]),
        ("CPU% gateway/mock/gen/other", [cpu_cells(r) for r in levels]),
    ]
    print(render([f"{r['multiple']:g}x" for r in levels], rows), end="\n\n")
    for note in overload_findings(args, doc):
        print(note)
    scenario_json(args, doc)


def overload_findings(args: argparse.Namespace, doc: dict[str, Any]) -> list[str]:
    levels, notes = doc["levels"], []
    if levels:
        top = levels[-1]
        verdict = "PASS" if top["pct_of_best"] >= GOODPUT_TARGET_PCT else "FAIL"
        notes.append(f"goodput at {top['multiple']:g}x = {top['goodput']:,.1f} req/s = "
                     f"{top['pct_of_best']:.1f}% of the best level ({doc['best_goodput']:,.1f}), "
                     f"{top['pct_of_capacity']:.1f}% of capacity: {verdict} "
                     f"(target >= {GOODPUT_TARGET_PCT}%)")
    for r in levels:
        full = r["window_errors"].get("HTTP 503 queue full")
        late = r["window_errors"].get("HTTP 503 deadline")
        if full and full["latency_ms"]:
            p99 = full["latency_ms"]["p99"]
            notes.append(f"{r['multiple']:g}x: queue-full 503s p99 {p99:.1f} ms: "
                         f"{'fast' if p99 <= FAST_503_MS else 'SLOW'} (target <= {FAST_503_MS} ms)")
        if late and late["latency_ms"]:
            p99, bound = late["latency_ms"]["p99"], args.queue_timeout_ms + FAST_503_MS
            notes.append(f"{r['multiple']:g}x: deadline 503s p99 {p99:.1f} ms "
                         f"(queue_timeout {args.queue_timeout_ms:g} ms): "
                         f"{'on time' if p99 <= bound else 'LATE'} (target <= {bound:g} ms)")
        if r["issued_rps"] < 0.97 * r["offered_rps"] or r["max_schedule_lag_ms"] > 50:
            notes.append(f"WARNING {r['multiple']:g}x: the generator issued {r['issued_rps']:,.0f} "
                         f"of {r['offered_rps']:,.0f} req/s (max lag "
                         f"{r['max_schedule_lag_ms']:.0f} ms); the offered load was not met")
        if r["cpu_pct"]["other_processes"] > NOISY_PCT:
            notes.append(f"WARNING {r['multiple']:g}x: other processes used "
                         f"{r['cpu_pct']['other_processes']:.0f}% of a CPU; figures are noisy")
        if other := {k: v for k, v in r["errors"].items() if not k.startswith("HTTP 503 ")}:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(other.items()))
            notes.append(f"{r['multiple']:g}x: errors other than overload 503s: {kinds}")
    overflows = sum(v for k, v in doc["metrics"].items()
                    if k.startswith("shepherd_queue_overflows_total"))
    notes.append(f"gateway /metrics: shepherd_queue_overflows_total {overflows:,.0f} (all levels)")
    return notes


def where_scenario(args: argparse.Namespace) -> str:
    where = scenario_placement(args)
    if where is None:
        return "nothing pinned"
    return f"gateway on CPU {fmt_cpus(where[0])}, mock(s) + generator on CPU {fmt_cpus(where[1])}"


# -- failover


@dataclass
class Failover:
    """What happened during the failover run; times are seconds from the load's start."""

    events: list[tuple[float, str]] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)  # last /readyz state per upstream
    polls: int = 0
    poll_failures: int = 0

    def note(self, t: float, what: str) -> None:
        self.events.append((round(t, 3), what))

    def observe(self, t: float, doc: dict[str, Any] | None) -> None:
        """Record the state changes of one ``/readyz`` answer."""
        self.polls += 1
        if doc is None:
            self.poll_failures += 1
            return
        seen = {"/readyz": str(doc.get("status"))}
        seen |= {name: str(u.get("state")) for name, u in doc.get("upstreams", {}).items()}
        for name, state in seen.items():
            old = self.states.get(name)
            if old != state:
                self.note(t, f"{name}: {old or 'first seen'} -> {state}")
                self.states[name] = state

    def first(self, prefix: str, after: float = -1.0) -> float | None:
        return next((t for t, what in self.events if what.startswith(prefix) and t > after), None)


def run_failover(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    """Two mocks, closed-loop load; SIGKILL mock-b at ``--kill-at``, restart it at
    ``--restart-at`` on its port; ``/readyz`` every 100 ms."""
    ports = {"mock-a": free_port(), "mock-b": free_port()}
    mocks = {name: (spawn_mock(args, fleet, name, port, None), port)
             for name, port in ports.items()}
    outlier = {"consecutive_failures": 5, "base_ejection": f"{args.base_ejection_s:g}s",
               "max_ejection": f"{max(10.0, args.base_ejection_s):g}s"}
    upstreams = {name: mock_upstream(port, priority=0, health_check=FAILOVER_HEALTH,
                                     outlier_detection=outlier)
                 for name, port in ports.items()}
    gateway, port, config = start_scenario_gateway(args, fleet, upstreams, mocks)
    where = scenario_placement(args)
    load_side = place(where, gateway.pid, [p.pid for p, _ in mocks.values()])
    duration = args.failover_duration
    procs = args.procs
    start_at = time.time() + 0.5
    specs = [scenario_spec(args, port, start_at, mode="closed", duration_s=duration,
                           warmup_s=0.0, concurrency=split(args.concurrency, procs, i),
                           classify=[], timeline_s=1.0) for i in range(procs)]
    clients = spawn_clients(fleet, specs, load_side)
    log = Failover()
    victim, victim_port = mocks["mock-b"]
    pids = {"gateway": gateway.pid, "mock-a": mocks["mock-a"][0].pid, "mock-b": victim.pid}
    shown = Progress(1)
    before = CpuSample.take(pids)
    victim_cpu_s = 0.0  # CPU of the killed mock before it died
    restarted: subprocess.Popen[bytes] | None = None
    listening = False
    next_poll = start_at - 0.3
    while any(c.poll() is None for c in clients.values()):
        now = time.time()
        t = now - start_at
        if t > duration + args.timeout + 5:
            break
        if now >= next_poll:
            log.observe(t, readyz(port))
            next_poll += 0.1
        if victim.poll() is None and t >= args.kill_at:
            victim_cpu_s = cpu_seconds(victim.pid) - before.used_s["mock-b"]
            victim.kill()
            victim.wait()
            log.note(time.time() - start_at, "mock-b SIGKILLed")
        if restarted is None and victim.poll() is not None and t >= args.restart_at:
            restarted = spawn_mock(args, fleet, "mock-b", victim_port, load_side)
            log.note(time.time() - start_at, "mock-b restarted (process started)")
        if restarted is not None and not listening and http_status(victim_port,
                                                                   "/v1/models") == 200:
            listening = True
            log.note(time.time() - start_at, "mock-b listening again")
        shown.draw("failover", max(0.0, t), duration)
        time.sleep(max(0.0, min(0.02, next_poll - time.time())))
    outputs = await_clients(clients, "failover", start_at, args, shown, duration)
    after = CpuSample.take({**pids, "mock-b": restarted.pid if restarted else victim.pid})
    shown.finish("failover", "done")
    shown.clear()
    loadgen_s = sum(o["cpu_s"] for o in outputs)
    used = after.used_since(before)
    if victim.returncode is not None:  # killed: its CPU until then, plus its successor's
        used["mock-b"] = victim_cpu_s + (after.used_s["mock-b"] if restarted else 0.0)
    wall = after.at_s - before.at_s
    cpu_pct = {name: 100 * v / wall for name, v in used.items()}
    cpu_pct["loadgen"] = 100 * loadgen_s / wall
    cpu_pct["other_processes"] = other_cpu_pct(before, after, sum(used.values()) + loadgen_s)
    merged = merge_scenario(outputs, duration)
    counters = metric_samples(port, ["shepherd_retries_total", "shepherd_upstream_ejections_total",
                                     "shepherd_retry_budget_exhausted_total",
                                     "shepherd_upstream_errors_total"])
    return {"scenario": "failover", "result": merged, "events": log.events,
            "readyz_polls": log.polls, "readyz_poll_failures": log.poll_failures,
            "metrics": counters, "cpu_pct": cpu_pct, "gateway_upstreams": upstreams,
            "gateway_config": config, "duration_s": duration}


def failover_summary(args: argparse.Namespace, doc: dict[str, Any]) -> dict[str, Any]:
    """Times of interest (s from the start): kill, marked out, restart, back in."""
    log = Failover(events=[(t, w) for t, w in doc["events"]])
    killed = log.first("mock-b SIGKILLed")
    out = log.first("mock-b: healthy -> ", after=killed or 0.0)
    unhealthy = next((t for t, w in log.events if w.startswith("mock-b: ")
                      and w.endswith("-> unhealthy")), None)
    restarted = log.first("mock-b restarted")
    listening = log.first("mock-b listening again")
    back = next((t for t, w in log.events if w.startswith("mock-b: ") and w.endswith("-> healthy")
                 and restarted is not None and t > restarted), None)
    return {"killed_at": killed, "out_of_rotation_at": out, "unhealthy_at": unhealthy,
            "restarted_at": restarted, "listening_at": listening, "healthy_again_at": back}


def failover_report(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    res, summary = doc["result"], failover_summary(args, doc)
    doc["summary"] = summary
    hc = FAILOVER_HEALTH
    print(f"Shepherd failover - 127.0.0.1, Python {platform.python_version()}, "
          f"{len(ALL_CPUS)} CPUs; {where_scenario(args)}")
    print(f"two mocks (mock-a, mock-b) serving {args.model}, same priority; health_check interval "
          f"{hc['interval']}, timeout {hc['timeout']}, unhealthy_threshold "
          f"{hc['unhealthy_threshold']}, healthy_threshold {hc['healthy_threshold']}; "
          f"outlier_detection {doc['gateway_upstreams']['mock-b']['outlier_detection']}; "
          f"routing.retry: gateway defaults")
    print(f"load: {args.concurrency} closed-loop connections, non-stream, {doc['duration_s']:g} s; "
          f"mock service time {args.ttft_ms:g} ms; mock-b SIGKILLed at {args.kill_at:g} s, "
          f"restarted on its port at {args.restart_at:g} s; /readyz polled every 100 ms\n")
    timeline = res["timeline"]
    seconds = range(0, max([int(doc["duration_s"])] + [int(b) + 1 for b in timeline]))
    peak = max([c.get("ok", 0) for c in timeline.values()] + [1])
    print(f"{'second':>8} {'200s':>6} {'failed':>6}  {'goodput':<24}  events (readyz state changes)")
    for s in seconds:
        counts = timeline.get(s, {})
        ok = counts.get("ok", 0)
        bad = sum(v for k, v in counts.items() if k != "ok")
        marks = "; ".join(f"{t:.1f}s {w}" for t, w in doc["events"] if s <= t < s + 1)
        if s >= doc["duration_s"]:
            marks = "(load stopped: requests in flight finishing)"
        bar = "#" * round(24 * ok / peak)
        print(f"{f'{s}-{s + 1}':>8} {ok:>6,} {bad:>6}  {bar:<24}  {marks}")
    spark = "".join(SPARK[round(timeline.get(s, {}).get("ok", 0) / peak * (len(SPARK) - 1))]
                    for s in seconds)
    print(f"\ngoodput per second: |{spark}| (peak {peak:,}/s)\n")
    failures = res["errors"]
    total = sum(sum(c.values()) for c in timeline.values())
    counters = doc["metrics"]

    def fmt_t(key: str) -> str:
        t = summary[key]
        return "never" if t is None else f"{t:.2f} s"

    def since(a: str, b: str) -> str:
        ta, tb = summary[a], summary[b]
        return "" if ta is None or tb is None else f" (+{tb - ta:.2f} s)"

    lines = [
        ("requests (finished)", f"{total:,} (issued {res['issued']:,})"),
        ("client-visible failures", str(sum(failures.values())) + (
            " (" + ", ".join(f"{k} x{v}" for k, v in sorted(failures.items())) + ")"
            if failures else "")),
        ("200 latency p50 / p99 / max ms",
         f"{fmt_ms(res['latency_ms'])} / {res['latency_ms']['max']:.1f}"
         if res["latency_ms"] else "-"),
        ("mock-b SIGKILLed at", fmt_t("killed_at")),
        ("  out of rotation (/readyz)", fmt_t("out_of_rotation_at") + since("killed_at",
                                                                            "out_of_rotation_at")),
        ("  marked unhealthy (probes)", fmt_t("unhealthy_at") + since("killed_at", "unhealthy_at")),
        ("mock-b restarted at", fmt_t("restarted_at")),
        ("  listening again", fmt_t("listening_at") + since("restarted_at", "listening_at")),
        ("  healthy again (/readyz)", fmt_t("healthy_again_at")
         + since("listening_at", "healthy_again_at")),
    ]
    errors_first = sorted(counters, key=lambda n: (n.startswith("shepherd_upstream_errors"), n))
    lines += [(name, f"{counters[name]:,.0f}") for name in errors_first]
    if not any(k.startswith("shepherd_retries_total") for k in counters):
        lines.append(("shepherd_retries_total", "0 (no sample)"))
    if not any(k.startswith("shepherd_upstream_ejections_total") for k in counters):
        lines.append(("shepherd_upstream_ejections_total", "0 (no sample)"))
    width = max(len(k) for k, _ in lines) + 2
    for key, value in lines:
        print(f"{key.ljust(width)}{value}")
    print("\n/readyz transitions:")
    for t, what in doc["events"]:
        print(f"  {t:7.2f} s  {what}")
    print(f"  ({doc['readyz_polls']} polls, {doc['readyz_poll_failures']} unanswered)")
    cpu = doc["cpu_pct"]
    print("CPU% " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
    verdict = "PASS" if not failures else "FAIL"
    print(f"\nclient-visible failures: {sum(failures.values())}: {verdict} (target: 0)")
    if cpu["other_processes"] > NOISY_PCT:
        print(f"WARNING: other processes used {cpu['other_processes']:.0f}% of a CPU; "
              "timings are noisy")
    scenario_json(args, doc)


# -- resume


#: Detached streams stay until the scenario cancels them (it measures them in between).
RESUME_STREAMS_CONFIG = {"detach_timeout": "120s"}
RESUME_KEY_PREFIX = "shepherd-resume:"  # shared by the Redis gateways: one set of stream logs
RESUME_MAX_CONNECTIONS = 2048  # upstream connections per gateway: a detached stream holds one
DETACHED_TOKEN_DELAY_MS = 1000  # detached streams barely grow while RSS is measured
DETACH_CONCURRENCY = 128  # detached streams being opened at once
RESUME_P99_TARGET_MS = 50.0
THROUGHPUT_TARGET_RATIO = 0.8
RESUME_COUNTERS = ("shepherd_stream_resumes_total", "shepherd_stream_store_errors_total",
                   "shepherd_client_disconnects_total", "shepherd_stream_detach_cancels_total",
                   "shepherd_streams_started_total")
STREAM_PHASE = PHASES[1]


@dataclass(frozen=True)
class ResumeRun:
    """The processes of ``--scenario resume``: the services, the gateways by name
    (``redis-a`` and ``redis-b`` sharing Redis, then ``memory``; or ``memory`` alone) and
    the CPUs of the load side (None: nothing pinned)."""

    services: Services
    gateways: dict[str, Target]
    load_side: frozenset[int] | None

    @property
    def resumers(self) -> list[Target]:
        """The instances streams start and resume on: the Redis pair, else ``memory``."""
        return [t for t in self.gateways.values() if t.name != "memory"] or [
            self.gateways["memory"]]


def resume_gateway_config(name: str, state: str, services: Services, directory: Path) -> Path:
    """A gateway of the resume scenario: the mock upstream (room for every detached stream),
    the load key without limits, ``RESUME_STREAMS_CONFIG``; with ``state`` redis, the
    stream logs every Redis gateway of the run shares."""
    backend: dict[str, Any] = {"backend": state}
    if state == "redis":
        backend |= {"redis_url": f"redis://127.0.0.1:{services.redis_port}/0",
                    "key_prefix": RESUME_KEY_PREFIX}
    config = {"server": {"host": "127.0.0.1", "port": 8080, "access_log": False},
              "state": backend, "streams": RESUME_STREAMS_CONFIG,
              "upstreams": {"mock": mock_upstream(services.mock_port,
                                                  max_connections=RESUME_MAX_CONNECTIONS)},
              "keys": {"load": {"key": GATEWAY_KEY, "models": ["*"]}}}
    path = directory / f"resume-{name}.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    return path


def spawn_resume_gateway(fleet: Fleet, name: str, state: str, services: Services,
                         where: Placement | None) -> Target:
    config = resume_gateway_config(name, state, services, fleet.log_dir)
    port = free_port()
    proc = fleet.spawn(name, [PYTHON, "-m", "proxy", "serve", "--config", str(config),
                              "--host", "127.0.0.1", "--port", str(port)], None)
    return Target(name, "gateway", port, GATEWAY_KEY, proc, GatewaySpec(state, limits=False),
                  where)


def start_resume(args: argparse.Namespace, fleet: Fleet) -> ResumeRun:
    """The mock, redis-server (``--state redis``) and the gateways; wait until all answer,
    then pin the gateways to the first CPU and everything else to the others."""
    mock_port = free_port()
    mock = spawn_mock(args, fleet, "mock", mock_port, None)
    services = Services(mock.pid, mock_port)
    states = {"memory": "memory"}
    if args.state == "redis":
        redis, redis_port = start_redis(fleet)
        services = Services(mock.pid, mock_port, redis.pid, redis_port)
        states = {"redis-a": "redis", "redis-b": "redis", "memory": "memory"}
    where = scenario_placement(args)
    gateways = {name: spawn_resume_gateway(fleet, name, state, services, where)
                for name, state in states.items()}
    wait_ready("mock", mock, mock_port, "/v1/models", fleet.log_dir)
    for target in gateways.values():
        assert target.proc is not None
        wait_ready(target.name, target.proc, target.port, "/healthz", fleet.log_dir)
    pids = [t.proc.pid for t in gateways.values() if t.proc is not None]
    if where is not None:
        for pid in pids[1:]:
            pin_tree(pid, where[0])
    load_side = place(where, pids[0], list(services.side_pids().values()))
    return ResumeRun(services, gateways, load_side)


def driver_spec(args: argparse.Namespace, mode: str, ports: list[int], *, deadline_s: float,
                token_delay_ms: float | None = None, **extra: Any) -> dict[str, Any]:
    """A spec for ``scripts/loadtest_resume.py``: streamed chat completions of
    ``--stream-tokens`` tokens, ``token_delay_ms`` apart (default ``--stream-token-delay-ms``)."""
    tokens = args.stream_tokens
    delay_ms = args.stream_token_delay_ms if token_delay_ms is None else token_delay_ms
    return {"mode": mode, "host": "127.0.0.1", "ports": ports, "api_key": GATEWAY_KEY,
            "body": {"model": args.model, "max_tokens": tokens, "stream": True,
                     "messages": [{"role": "user", "content": "Say hello."}]},
            "headers": {"x-mock-tokens": str(tokens), "x-mock-token-delay-ms": f"{delay_ms:g}"},
            "tokens": tokens, "concurrency": args.concurrency, "seed": args.seed,
            "timeout_s": args.timeout, "deadline_s": deadline_s, **extra}


def cut_deadline_s(args: argparse.Namespace) -> float:
    """A bound for the cut phase: twice the streams' own time, run ``--concurrency`` at a
    time, plus ``--timeout`` for a straggler (at most 120 s)."""
    stream_s = args.stream_tokens * args.stream_token_delay_ms / 1000 + 0.5
    return min(120.0, 2 * math.ceil(args.streams / args.concurrency) * stream_s + args.timeout)


def run_driver(args: argparse.Namespace, fleet: Fleet, spec: dict[str, Any],
               run: ResumeRun, shown: Progress, label: str) -> dict[str, Any]:
    """Run one ``loadtest_resume.py`` process on the load side; return its output."""
    start_at = time.time() + 0.2
    clients = spawn_clients(fleet, [spec | {"start_at": start_at}], run.load_side, RESUME_DRIVER)
    [output] = await_clients(clients, label, start_at, args, shown, spec["deadline_s"])
    shown.finish(label, f"{output['elapsed_s']:.1f} s")
    return output


def parse_commandstats(text: str) -> dict[str, int]:
    """Calls per command of an ``INFO commandstats`` answer, without INFO itself (the
    scenario's own calls). Commands run by Lua scripts are counted too (Redis 7)."""
    calls = {}
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            name, _, stats = line.removeprefix("cmdstat_").partition(":")
            calls[name] = int(stats.split(",", 1)[0].removeprefix("calls="))
    calls.pop("info", None)
    return calls


def redis_calls(port: int | None) -> dict[str, int]:
    """``parse_commandstats`` of the redis-server on ``port`` ({} for None)."""
    if port is None:
        return {}
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"INFO commandstats\r\n")
        head, _, data = sock.recv(65536).partition(b"\r\n")
        size = int(head[1:])  # a RESP bulk string: $<size>\r\n<data>\r\n
        while len(data) < size + 2 and (chunk := sock.recv(65536)):
            data += chunk
    return parse_commandstats(data[:size].decode())


def redis_commands(before: dict[str, int], after: dict[str, int], tokens: int,
               events: int) -> dict[str, Any] | None:
    """Redis commands between two ``redis_calls`` per streamed token and per event (None
    without Redis or tokens)."""
    if not after or not tokens:
        return None
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    total = sum(delta.values())
    return {"tokens": tokens, "events": events, "commands": total,
            "per_token": total / tokens, "per_event": total / events if events else None,
            "evalsha_per_token": delta.get("evalsha", 0) / tokens,
            "by_command": dict(sorted(delta.items(), key=lambda kv: -kv[1]))}


def counters(targets: Sequence[Target]) -> dict[str, dict[str, float]]:
    return {t.name: metric_samples(t.port, RESUME_COUNTERS) for t in targets}


def counter_deltas(before: dict[str, dict[str, float]],
                   after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per gateway, the samples of ``RESUME_COUNTERS`` that changed between two reads."""
    return {name: {k: v - before.get(name, {}).get(k, 0.0) for k, v in samples.items()
                   if v != before.get(name, {}).get(k, 0.0)}
            for name, samples in after.items()}


def group_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Streams, intact ones, resumes from the start (cut in the first event), latency."""
    intact = sum(not r["problems"] for r in records)
    latencies = [r["resume_latency_ms"] for r in records
                 if r.get("resume_latency_ms") is not None]
    return {"streams": len(records), "intact": intact,
            "intact_pct": 100 * intact / len(records) if records else 0.0,
            "from_start": sum(r.get("held_events") == 0 for r in records),
            "latency_ms": percentiles(latencies)}


def cut_summary(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``group_summary`` of the streams resumed on the same instance, on the other one, all."""
    groups = {"same": [r for r in records if r["where"] == "same"],
              "other": [r for r in records if r["where"] == "other"], "all": records}
    return {name: group_summary(rs) for name, rs in groups.items() if rs}


def resume_cuts(args: argparse.Namespace, fleet: Fleet, run: ResumeRun,
                shown: Progress) -> dict[str, Any]:
    """``--streams`` streams cut once and resumed (``loadtest_resume.py`` mode ``cut``);
    Redis commands and gateway counters around it."""
    ports = [t.port for t in run.resumers]
    spec = driver_spec(args, "cut", ports * (2 // len(ports)), streams=args.streams,
                       deadline_s=cut_deadline_s(args))
    pids = {t.name: t.proc.pid for t in run.resumers if t.proc is not None}
    pids |= run.services.side_pids()
    calls0, counts0 = redis_calls(run.services.redis_port), counters(run.resumers)
    before = CpuSample.take(pids)
    output = run_driver(args, fleet, spec, run, shown, "resume: cut + resume")
    after = CpuSample.take(pids)
    calls1, counts1 = redis_calls(run.services.redis_port), counters(run.resumers)
    records = output["records"]
    names = {t.port: t.name for t in run.resumers}
    for record in records:
        record["origin"] = names.get(record.get("origin"), record.get("origin"))
        record["resume_port"] = names.get(record.get("resume_port"), record.get("resume_port"))
    events = args.streams * output["reference"]["events"]
    return {"reference": output["reference"], "summary": cut_summary(records),
            "failures": [r for r in records if r["problems"]], "records": records,
            "redis": redis_commands(calls0, calls1, args.streams * args.stream_tokens, events),
            "metrics": counter_deltas(counts0, counts1), "elapsed_s": output["elapsed_s"],
            "cpu_pct": phase_cpu_pct(before, after, output["cpu_s"])}


def phase_cpu_pct(before: CpuSample, after: CpuSample, client_s: float) -> dict[str, float]:
    """% of a CPU each sampled process, the client and other processes used in between."""
    wall = after.at_s - before.at_s
    used = after.used_since(before)
    pct = {name: 100 * s / wall for name, s in used.items()}
    pct["client"] = 100 * client_s / wall
    pct["other_processes"] = other_cpu_pct(before, after, sum(used.values()) + client_s)
    return pct


def rss_kib(pid: int) -> int:
    """Sum over ``pid``'s tree of ``VmRSS`` (resident set now), in KiB."""
    total = 0
    for each in process_tree(pid):
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in status.splitlines()
                     if line.startswith("VmRSS:"))
    return total


def counter_sum(port: int, name: str) -> float:
    return sum(metric_samples(port, [name]).values())


def upstream_in_flight(port: int) -> int | None:
    """Requests the gateway has in flight upstream (``/readyz``), or None if unanswered."""
    doc = readyz(port)
    if doc is None:
        return None
    return sum(int(u.get("in_flight", 0)) for u in doc.get("upstreams", {}).values())


def wait_until(done: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll ``done`` until it is true (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
    return True


def detached_rss(args: argparse.Namespace, fleet: Fleet, run: ResumeRun, target: Target,
                 shown: Progress) -> dict[str, Any]:
    """RSS of ``target`` before and with ``--detached`` streams dropped after their first
    event (slow: a token per ``DETACHED_TOKEN_DELAY_MS``), then after cancelling them."""
    assert target.proc is not None
    pid, port, wanted = target.proc.pid, target.port, args.detached
    time.sleep(0.5)
    before_kib, gone0 = rss_kib(pid), counter_sum(port, "shepherd_client_disconnects_total")
    store_errors0 = counter_sum(port, "shepherd_stream_store_errors_total")
    spec = driver_spec(args, "detach", [port], streams=wanted, concurrency=DETACH_CONCURRENCY,
                       token_delay_ms=DETACHED_TOKEN_DELAY_MS, deadline_s=args.timeout + 10)
    opened = run_driver(args, fleet, spec, run, shown, f"{target.name}: {wanted} detached")
    ids = opened["stream_ids"]

    def seen() -> float:
        return counter_sum(port, "shepherd_client_disconnects_total") - gone0

    wait_until(lambda: seen() >= len(ids), 5.0)
    time.sleep(0.5)
    detached_kib, in_flight, disconnects = rss_kib(pid), upstream_in_flight(port), seen()
    spec = driver_spec(args, "cancel", [port], stream_ids=ids, deadline_s=args.timeout + 10)
    cancelled = run_driver(args, fleet, spec, run, shown, f"{target.name}: cancel them")
    drained = wait_until(lambda: upstream_in_flight(port) == 0, 5.0)
    return {"opened": len(ids), "failed": opened["failed"], "failures": opened["failures"],
            "disconnects_seen": disconnects, "upstream_in_flight": in_flight,
            "rss_before_kib": before_kib, "rss_detached_kib": detached_kib,
            "per_stream_kib": (detached_kib - before_kib) / len(ids) if ids else None,
            "cancel_statuses": cancelled["statuses"], "drained": drained,
            "rss_after_cancel_kib": rss_kib(pid),
            "store_errors": counter_sum(port, "shepherd_stream_store_errors_total") - store_errors0}


def throughput_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median streams/s of the rounds, their spread, errors, CPU and Redis per stream."""
    errors: Counter[str] = Counter()
    for r in rounds:
        errors.update(r["errors"])
    costs = [r["redis"]["per_token"] for r in rounds if r.get("redis")]
    cpu = [r["cpu_us_per_request"] for r in rounds if r.get("cpu_us_per_request") is not None]
    return {"rps": statistics.median(r["rps"] for r in rounds),
            "min": min(r["rps"] for r in rounds), "max": max(r["rps"] for r in rounds),
            "errors": dict(errors), "cpu_us_per_stream": statistics.median(cpu) if cpu else None,
            "cpu_pct": {k: statistics.median(r["cpu_pct"].get(k, 0.0) for r in rounds)
                        for k in ("under_test", "redis")},
            "other_cpu_pct_max": max(r["cpu_pct"]["other_processes"] for r in rounds),
            "redis_commands_per_token": statistics.median(costs) if costs else None,
            "ttft_ms": rounds[-1]["ttft_ms"], "latency_ms": rounds[-1]["latency_ms"]}


def stream_throughput(args: argparse.Namespace, fleet: Fleet, run: ResumeRun,
                      shown: Progress) -> dict[str, Any]:
    """``--rounds`` rounds of the default run's stream phase (``--tokens`` tokens,
    ``--concurrency`` connections, ``--duration`` s) against ``memory`` and, with Redis,
    ``redis-a``, interleaved; medians and the ratio redis-a / memory."""
    targets = [t for name, t in run.gateways.items() if name in ("memory", "redis-a")]
    rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for _ in range(args.rounds):
        for target in targets:
            redis = target.gateway is not None and target.gateway.state == "redis"
            calls0 = redis_calls(run.services.redis_port) if redis else {}
            result = run_phase(target, STREAM_PHASE, args, fleet, run.services, shown)
            if redis:
                streams = result["issued"]
                result["redis"] = redis_commands(calls0, redis_calls(run.services.redis_port),
                                             streams * args.tokens, streams * (args.tokens + 2))
            rounds[target.name].append(result)
    summary = {name: throughput_summary(rs) for name, rs in rounds.items()}
    both = "redis-a" in summary and summary["memory"]["rps"]
    ratio = summary["redis-a"]["rps"] / summary["memory"]["rps"] if both else None
    cpu = [summary[n]["cpu_us_per_stream"] for n in ("memory", "redis-a") if n in summary]
    cpu_ratio = cpu[0] / cpu[1] if len(cpu) == 2 and None not in cpu and cpu[1] else None
    return {"targets": summary, "ratio": ratio, "cpu_ratio": cpu_ratio, "rounds": rounds}


def log_problems(log_dir: Path, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Warning and error lines of each gateway's log, counted by message (with the last
    line of the traceback, if any)."""
    out: dict[str, dict[str, int]] = {}
    for name in names:
        seen: Counter[str] = Counter()
        for line in (log_dir / f"{name}.log").read_text(errors="replace").splitlines():
            if '"level":"warning"' in line or '"level":"error"' in line or "Traceback" in line:
                seen[log_message(line)] += 1
        out[name] = dict(seen)
    return out


def log_message(line: str) -> str:
    """``msg (error: the exception's last line or the error field)`` of a JSON log line;
    the line's start otherwise."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line[:120]
    exc = str(record.get("exc") or "").strip().rpartition("\n")[2] or record.get("error")
    return f"{record.get('msg')} ({exc})" if exc else str(record.get("msg"))


def run_resume(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    """Cut and resume ``--streams`` streams, ``--detached`` streams left detached, then the
    streaming throughput of memory and Redis stream logs (see ``--help``)."""
    run = start_resume(args, fleet)
    rss_targets = [run.resumers[0]] + ([run.gateways["memory"]] if args.state == "redis" else [])
    throughput_targets = 2 if args.state == "redis" else 1
    shown = Progress(1 + 2 * len(rss_targets) * (args.detached > 0)
                     + args.rounds * throughput_targets)
    doc: dict[str, Any] = {"scenario": "resume", "state": args.state,
                           "gateways": {n: t.port for n, t in run.gateways.items()}}
    doc["cuts"] = resume_cuts(args, fleet, run, shown)
    doc["detached"] = {t.name: detached_rss(args, fleet, run, t, shown)
                       for t in rss_targets if args.detached > 0}
    doc["throughput"] = stream_throughput(args, fleet, run, shown)
    shown.clear()
    doc["gateway_logs"] = log_problems(fleet.log_dir, list(run.gateways))
    doc["metrics_end"] = counters(list(run.gateways.values()))
    doc["gateway_config"] = orjson.loads((fleet.log_dir / f"resume-{run.resumers[0].name}.yaml")
                                         .read_bytes())
    return doc


def resume_report(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    for line in resume_header(args, doc):
        print(line)
    cuts = doc["cuts"]
    print(render(["same instance", "other instance", "all"], cut_rows(cuts["summary"])),
          end="\n\n")
    for line in [*failure_lines(cuts), *redis_lines(cuts), *counter_lines(cuts["metrics"])]:
        print(line)
    print("CPU% during the cut phase: " + ", ".join(f"{k} {v:.0f}"
                                                    for k, v in cuts["cpu_pct"].items()))
    if doc["detached"]:
        print(f"\n{args.detached} streams detached: each dropped after its first event (mock: a "
              f"token every {DETACHED_TOKEN_DELAY_MS} ms), then cancelled "
              "(POST /v1/streams/{id}/cancel)")
        print(render(list(doc["detached"]), rss_rows(doc["detached"])))
    tp = doc["throughput"]
    print(f"\nstreaming throughput: {args.tokens} tokens per stream, {args.concurrency} "
          f"connections, {args.duration:g} s ({args.warmup:g} s warm-up), median of "
          f"{args.rounds} interleaved round(s)")
    print(render(list(tp["targets"]), throughput_rows(tp["targets"])), end="\n\n")
    for line in resume_verdicts(doc):
        print(line)
    scenario_json(args, doc)


def resume_header(args: argparse.Namespace, doc: dict[str, Any]) -> list[str]:
    redis = doc["state"] == "redis"
    where = scenario_placement(args)
    placed = ("nothing pinned" if where is None else
              f"gateway(s) on CPU {fmt_cpus(where[0])}, mock{' + redis-server' if redis else ''}"
              f" + client on CPU {fmt_cpus(where[1])}")
    names = [t for t in doc["gateways"] if t != "memory"] or ["memory"]
    state = (f"state redis: {' and '.join(names)} share one redis-server (stream logs in Redis "
             "Streams); memory: a memory-backend gateway for the throughput comparison"
             if redis else "state memory: one gateway, resumed on itself")
    resumed = ("on the same instance (half) or the other one (half)" if redis
               else "on the same instance")
    ref = doc["cuts"]["reference"]
    return [f"Shepherd resume - 127.0.0.1, Python {platform.python_version()}, "
            f"{len(ALL_CPUS)} CPUs; {placed}",
            f"{state}; streams.detach_timeout {RESUME_STREAMS_CONFIG['detach_timeout']}",
            f"{args.streams} streams of {args.stream_tokens} tokens ({ref['events']} events, "
            f"{ref['body_bytes']:,} bytes), {args.stream_token_delay_ms:g} ms apart, "
            f"{args.concurrency} at once; each cut once at a random byte (seed {args.seed}) "
            "by dropping the connection, resumed with GET /v1/streams/{id} + Last-Event-ID "
            f"{resumed}; latency: before the reconnect's connect to the first body byte", ""]


def cut_rows(summary: dict[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    cols = [summary.get(k) for k in ("same", "other", "all")]

    def cells(fmt: Callable[[dict[str, Any]], str]) -> list[str]:
        return ["-" if c is None else fmt(c) for c in cols]

    return [
        ("streams cut and resumed", cells(lambda c: f"{c['streams']:,}")),
        ("intact, byte-identical", cells(lambda c: f"{c['intact']:,} ({c['intact_pct']:.1f} %)")),
        ("  resumed from the start", cells(lambda c: f"{c['from_start']:,}")),
        ("resume latency p50 / p99 ms", cells(lambda c: fmt_ms(c["latency_ms"]))),
        ("  p99.9 / max ms", cells(lambda c: "-" if not c["latency_ms"] else
                                   f"{c['latency_ms']['p99.9']:.1f} / {c['latency_ms']['max']:.1f}")),
    ]


def failure_lines(cuts: dict[str, Any], shown: int = 5) -> list[str]:
    """The first ``shown`` streams that were not intact, each with what it held at the cut."""
    failures = cuts["failures"]
    if not failures:
        return []
    head = f"NOT INTACT: {len(failures)} stream(s); the first {min(shown, len(failures))}:"
    lines = [head, *(failure_line(r) for r in failures[:shown])]
    return [*lines, "  (every record is in --json; the same cuts again: the same --seed and "
            "--streams)", ""]


def failure_line(r: dict[str, Any]) -> str:
    return (f"  #{r['index']} {r.get('stream_id', '?')} started on {r.get('origin')}, resumed on "
            f"{r.get('resume_port')} ({r['where']}); cut at byte {r['cut_at']:,}, held "
            f"{r.get('held_events', '?')} events, Last-Event-ID {r.get('last_event_id')}, resume "
            f"HTTP {r.get('resume_status')}: " + "; ".join(r["problems"]))


def redis_lines(cuts: dict[str, Any]) -> list[str]:
    cost = cuts["redis"]
    if cost is None:
        return ["Redis: not used (state memory)"]
    top = ", ".join(f"{k} {v / cost['tokens']:.2f}" for k, v in list(cost["by_command"].items())[:8])
    return [f"Redis during the cut phase (INFO commandstats; commands run by Lua scripts "
            f"included): {cost['commands']:,} commands for {cost['tokens']:,} tokens "
            f"({cost['events']:,} events): {cost['per_token']:.2f} per token "
            f"({cost['per_event']:.2f} per event), EVALSHA {cost['evalsha_per_token']:.2f} "
            f"per token", f"  per token by command: {top}"]


def counter_lines(metrics: dict[str, dict[str, float]]) -> list[str]:
    lines = []
    for name, samples in metrics.items():
        shown = ", ".join(f"{k.removeprefix('shepherd_')} +{v:,.0f}"
                          for k, v in sorted(samples.items()))
        lines.append(f"{name} /metrics during the cut phase: {shown or 'no change'}")
    return [*lines, "  (stream_resumes count the full replays fetched for the check too)"]


def rss_rows(detached: dict[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    cols = list(detached.values())

    def mib(kib: int) -> str:
        return f"{kib / 1024:,.1f}"

    return [
        ("detached (dropped / seen)", [f"{c['opened']:,} / {c['disconnects_seen']:,.0f}"
                                       for c in cols]),
        ("  upstream in flight", [str(c["upstream_in_flight"]) for c in cols]),
        ("RSS before MiB", [mib(c["rss_before_kib"]) for c in cols]),
        ("RSS with them detached MiB", [mib(c["rss_detached_kib"]) for c in cols]),
        ("RSS per detached stream KiB", ["-" if c["per_stream_kib"] is None else
                                         f"{c['per_stream_kib']:.1f}" for c in cols]),
        ("RSS after cancel MiB", [mib(c["rss_after_cancel_kib"]) for c in cols]),
        ("  stream store errors", [f"{c['store_errors']:,.0f}" for c in cols]),
        ("  cancel answers / drained", [", ".join(f"{k} x{v}" for k, v in
                                                 c["cancel_statuses"].items())
                                        + (" / yes" if c["drained"] else " / NO")
                                        for c in cols]),
    ]


def throughput_rows(targets: dict[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    cols = list(targets.values())

    def opt(value: float | None, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    return [
        ("streams/s", [f"{c['rps']:,.0f}" for c in cols]),
        ("  min-max", [f"{c['min']:,.0f}-{c['max']:,.0f}" for c in cols]),
        ("TTFT p50 / p99 ms (last round)", [fmt_ms(c["ttft_ms"]) for c in cols]),
        ("gateway CPU us / stream", [opt(c["cpu_us_per_stream"], "{:,.0f}") for c in cols]),
        ("CPU% gateway / redis / other", [f"{c['cpu_pct']['under_test']:.0f} / "
                                          f"{c['cpu_pct']['redis']:.0f} / "
                                          f"{c['other_cpu_pct_max']:.0f}" for c in cols]),
        ("Redis commands / token", [opt(c["redis_commands_per_token"], "{:.2f}") for c in cols]),
        ("errors", [str(sum(c["errors"].values())) for c in cols]),
    ]


def resume_verdicts(doc: dict[str, Any]) -> list[str]:
    """PASS/FAIL against the targets, then anything the gateways complained about."""
    summary, tp = doc["cuts"]["summary"], doc["throughput"]
    every = summary["all"]
    parts = ", ".join(f"{k} {summary[k]['intact']}/{summary[k]['streams']}"
                      for k in ("same", "other") if k in summary)
    lines = [f"intact: {every['intact']}/{every['streams']} ({every['intact_pct']:.1f} %; "
             f"{parts}): {'PASS' if every['intact'] == every['streams'] else 'FAIL'} "
             "(target 100 %)"]
    for k in ("same", "other"):
        p99 = (summary.get(k) or {}).get("latency_ms")
        if p99:
            ok = p99["p99"] < RESUME_P99_TARGET_MS
            lines.append(f"resume latency p99 ({k} instance): {p99['p99']:.1f} ms: "
                         f"{'PASS' if ok else 'FAIL'} (target < {RESUME_P99_TARGET_MS:g} ms)")
    if tp["ratio"] is not None:
        ok = tp["ratio"] >= THROUGHPUT_TARGET_RATIO
        cpu = "" if tp["cpu_ratio"] is None else (
            f"; gateway CPU per stream memory / redis-a {tp['cpu_ratio']:.2f}x")
        lines.append(f"streaming throughput redis-a / memory: {tp['ratio']:.2f}x: "
                     f"{'PASS' if ok else 'FAIL'} (target >= {THROUGHPUT_TARGET_RATIO:g}x{cpu})")
    else:
        lines.append("streaming throughput redis / memory: not measured (--state memory)")
    if (cut_noise := doc["cuts"]["cpu_pct"]["other_processes"]) > NOISY_PCT:
        lines.append(f"WARNING: other processes used {cut_noise:.0f}% of a CPU during the cut "
                     "phase; its latencies are noisy")
    noisy = max(c["other_cpu_pct_max"] for c in tp["targets"].values())
    if noisy > NOISY_PCT:
        lines.append(f"WARNING: other processes used up to {noisy:.0f}% of a CPU during the "
                     "throughput rounds; streams/s are noisy (CPU per stream is not)")
    if not doc["cuts"]["reference"]["text_ok"]:
        lines.append("WARNING: the uncut reference stream's text is not expected_text()")
    for name, samples in doc["metrics_end"].items():
        if errors := samples.get("shepherd_stream_store_errors_total"):
            lines.append(f"{name}: shepherd_stream_store_errors_total {errors:,.0f} (whole run)")
    for name, seen in doc["gateway_logs"].items():
        if seen:
            lines.append(f"{name} log warnings/errors: "
                         + ", ".join(f"{m} x{n}" for m, n in sorted(seen.items())))
    return lines


def wait_quiet(max_wait_s: float) -> float:
    """Wait at most ``max_wait_s`` for a second during which other processes used at most
    ``NOISY_PCT`` % of a CPU; returns the last such figure (before anything is started)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        t0, busy0, own0 = time.monotonic(), machine_busy_seconds(), sum(os.times()[:2])
        time.sleep(1.0)
        own = sum(os.times()[:2]) - own0
        pct = 100 * (machine_busy_seconds() - busy0 - own) / (time.monotonic() - t0)
        if pct <= NOISY_PCT or time.monotonic() >= deadline:
            return pct
        print(f"other processes use {pct:.0f}% of a CPU; waiting for a quieter machine "
              f"(at most {deadline - time.monotonic():.0f} s more)", file=sys.stderr)


def connections_module() -> Any:
    """``scripts/loadtest_connections.py``, imported when needed (it imports this module;
    run as a script, this module is registered as ``loadtest`` first so it is not loaded
    twice)."""
    if __name__ == "__main__":
        sys.modules.setdefault("loadtest", sys.modules[__name__])
        import loadtest_connections  # type: ignore[import-not-found]
        return loadtest_connections
    from scripts import loadtest_connections as module
    return module


def run_connections(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    doc: dict[str, Any] = connections_module().run_connections(args, fleet)
    return doc


def connections_report(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    connections_module().connections_report(args, doc)


def websocket_module() -> Any:
    """``scripts/loadtest_websocket.py``, imported when needed (as ``connections_module``)."""
    if __name__ == "__main__":
        sys.modules.setdefault("loadtest", sys.modules[__name__])
        import loadtest_websocket  # type: ignore[import-not-found]
        return loadtest_websocket
    from scripts import loadtest_websocket as module
    return module


def run_websocket(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    doc: dict[str, Any] = websocket_module().run_websocket(args, fleet)
    return doc


def websocket_report(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    websocket_module().websocket_report(args, doc)


#: ``--scenario`` name -> (run it, print its report).
SCENARIOS: dict[str, tuple[Callable[[argparse.Namespace, Fleet], dict[str, Any]],
                           Callable[[argparse.Namespace, dict[str, Any]], None]]] = {
    "overload": (run_overload, overload_report), "failover": (run_failover, failover_report),
    "resume": (run_resume, resume_report), "connections": (run_connections, connections_report),
    "websocket": (run_websocket, websocket_report)}


def run_scenario(args: argparse.Namespace) -> int:
    """``--scenario``: run it with every subprocess stopped at the end; print the report."""
    if not gateway_runnable():
        print("proxy/ is not runnable yet; no scenario to run", file=sys.stderr)
        return 1
    if args.quiet_wait > 0 and (pct := wait_quiet(args.quiet_wait)) > NOISY_PCT:
        print(f"warning: the machine is still busy ({pct:.0f}% of a CPU used by other "
              "processes); running anyway", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="shepherd-load-") as tmp, \
            fleet_in(Path(tmp), args.nofile) as fleet:
        try:
            doc = SCENARIOS[args.scenario][0](args, fleet)
        except RuntimeError as exc:
            print(f"\nload test failed: {exc}", file=sys.stderr)
            return 1
        finally:
            os.sched_setaffinity(0, ALL_CPUS)
    SCENARIOS[args.scenario][1](args, doc)
    return 0



# -- main -------------------------------------------------------------------------------


def gateway_runnable() -> bool:
    return (ROOT / "proxy" / "__main__.py").exists() or (ROOT / "proxy" / "cli.py").exists()


def default_plans(args: argparse.Namespace) -> list[Plan]:
    spec = GatewaySpec(args.state, args.workers, not args.no_limits, args.redis_timeout)
    return [Plan(name, name, spec if name == "gateway" else None) for name in args.targets]


def finish_targets(targets: list[Target], services: Services, fleet: Fleet) -> None:
    """Peak RSS of every target; limit store health of every gateway on Redis."""
    for target in targets:
        target.rss_mib = peak_rss_mib(target.proc.pid if target.proc else services.mock_pid)
        if target.gateway and target.gateway.state == "redis" and target.gateway.limits:
            target.store = store_health(target, fleet.log_dir)


def run_all(args: argparse.Namespace, fleet: Fleet) -> tuple[list[Target], Services]:
    targets, services = start_targets(args, fleet, default_plans(args))
    shown = Progress(len(targets) * len(PHASES))
    for phase in PHASES:  # phase-major: a phase's targets run close together in time
        for target in targets:
            target.results[phase.name] = run_phase(target, phase, args, fleet, services, shown)
    finish_targets(targets, services, fleet)
    shown.clear()
    return targets, services


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add = parser.add_argument
    add("--concurrency", type=int, help="closed-loop connections (default 32; failover 16)")
    add("--duration", type=float, default=5.0, help="seconds per phase, warm-up included")
    add("--warmup", type=float, default=1.0, help="seconds at the start not counted")
    add("--rate", type=float, default=200.0, help="req/s of the open-loop latency phase")
    add("--targets", default=",".join(TARGETS), help="comma list of gateway,bare,direct")
    add("--json", type=Path, help="also write every figure to this file")
    add("--procs", type=int, default=1, help="load generator processes")
    add("--timeout", type=float, default=10.0, help="seconds per request")
    add("--tokens", type=int, default=16, help="tokens per mock answer (= max_tokens)")
    add("--ttft-ms", type=float,
        help="mock delay before the first token (default 0; overload 50, failover 20)")
    add("--token-delay-ms", type=float, default=0.0, help="mock delay between tokens")
    add("--model", default="mock-gpt", help="model name sent in every request")
    add("--no-pin", action="store_true", help="do not pin processes to CPUs")
    add("--nofile", type=int, default=65536,
        help="soft and hard RLIMIT_NOFILE of every process started (gateway, mocks, load "
        "generators), as systemd's LimitNOFILE= would give them; raising the hard limit needs "
        "root or CAP_SYS_RESOURCE (otherwise a note is printed and the inherited limit kept)")
    add("--generator", choices=("python", "wrk"),
        help="load generator: python (scripts/loadtest_client.py, every phase) or wrk "
        "(closed-loop non-stream only, so --compare only); default: wrk for --compare when "
        "installed, else python")
    add("--mock-engine", choices=("aiohttp", "fast"),
        help="mock upstream: aiohttp (scripts/mock_upstream.py, every knob) or fast "
        "(scripts/mock_fast.py, same answers at a fifth or less of the CPU); default: fast for "
        "--compare, else aiohttp")
    add("--mock-script", help="the mock upstream to start, instead of the --mock-engine's "
        "(takes --port/--ttft-ms/--token-delay-ms/--tokens)")
    add("--state", choices=("memory", "redis"),
        help="the gateway's limit store (resume: its stream logs); redis: a private "
        "redis-server is started; default memory (resume: redis)")
    add("--workers", type=int, default=1, help="gateway worker processes (> 1 needs redis)")
    add("--no-limits", action="store_true",
        help="give the load key no limits (the limiter is skipped) instead of LOAD_LIMITS")
    add("--redis-timeout", help="state.redis_timeout of the gateway, e.g. 500ms "
        "(default: the gateway's own, 50ms)")
    add("--compare", action="store_true",
        help="non-stream only: bare + memory/redis and workers 1/2 gateways, median of "
        "--rounds; ignores --targets/--state/--workers/--no-limits")
    add("--rounds", type=int, default=3, help="rounds of --compare")
    add("--retries", type=int, default=2,
        help="--compare: measure a round again (keeping the quietest) while other processes "
        f"used more than {NOISY_PCT}%% of a CPU during it")
    scenario = parser.add_argument_group(
        "scenarios", "--scenario overload: one mock with a fixed service time (--ttft-ms) behind "
        "an upstream with --max-in-flight/--max-queue/--queue-timeout-ms; an open loop at "
        "--levels times its capacity (max_in_flight / service time), --duration s each. "
        "--scenario failover: two mocks serving one model, --concurrency closed-loop "
        "connections for --failover-duration s; mock-b SIGKILLed at --kill-at and restarted "
        "on its port at --restart-at; /readyz polled every 100 ms, /metrics read at the end. "
        "--scenario resume: --streams streams cut once at a random byte and resumed (half on "
        "the other instance with --state redis), --detached streams left detached for RSS, "
        "then --rounds of the stream phase against memory and Redis stream logs. "
        "--scenario connections: --connections slow streams over --ramp-s, then "
        "--idle-connections idle keep-alive connections over --ramp-s, held --hold-s, "
        "against a gateway with the default server settings; a side request every 250 ms")
    add = scenario.add_argument
    add("--scenario", choices=tuple(SCENARIOS), help="run this scenario instead")
    add("--quiet-wait", type=float, default=15.0,
        help=f"wait at most this many seconds, before starting, for a second in which other "
        f"processes use at most {NOISY_PCT}%% of a CPU (0: do not wait)")
    add("--max-in-flight", type=int, default=16, help="overload: upstream max_in_flight")
    add("--max-queue", type=int, default=32, help="overload: upstream max_queue")
    add("--queue-timeout-ms", type=float, default=200.0, help="overload: queue_timeout")
    add("--levels", default="1,2,3", help="overload: offered load, multiples of capacity")
    add("--failover-duration", type=float, default=12.0, help="failover: seconds of load")
    add("--kill-at", type=float, default=4.0, help="failover: SIGKILL mock-b (s)")
    add("--restart-at", type=float, default=8.0, help="failover: restart mock-b (s)")
    add("--streams", type=int, default=200, help="resume: streams cut and resumed")
    add("--stream-tokens", type=int, default=64, help="resume: tokens of each cut stream")
    add("--stream-token-delay-ms", type=float, default=5.0,
        help="resume: mock delay between the tokens of a cut stream")
    add("--detached", type=int, default=500,
        help="resume: streams left detached for the RSS figure (0: skip)")
    add("--seed", type=int, default=1, help="resume: seed of the cut positions")
    add("--connections", type=int, default=10_000, help="connections: concurrent streams")
    add("--idle-connections", type=int, default=20_000,
        help="connections: idle keep-alive connections opened after the streams")
    add("--ramp-s", type=float, default=10.0,
        help="connections: seconds over which the streams, then the idle connections, open")
    add("--hold-s", type=float, default=3.0, help="connections: seconds everything is held")
    add("--sessions", type=int, default=10_000,
        help="websocket: /v1/ws sessions held open (opened over --ramp-s, idle --hold-s)")
    add("--active-sessions", type=int, default=1_000,
        help="websocket: sessions streaming at once in a WebSocket phase, and SSE streams "
        "in an SSE phase (--rounds rounds of both, --duration s each; --token-delay-ms 0: 200)")
    add("--base-ejection-s", type=float, default=2.0,
        help="failover: outlier_detection.base_ejection (the gateway's default, 30, would "
        "keep the restarted mock out for the rest of the run)")
    args = parser.parse_args(argv)
    if args.ttft_ms is None:
        args.ttft_ms = {"overload": 50.0, "failover": 20.0}.get(args.scenario, 0.0)
    if args.concurrency is None:
        args.concurrency = 16 if args.scenario == "failover" else 32
    if args.state is None:
        args.state = "redis" if args.scenario == "resume" else "memory"
    try:
        args.levels = [float(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        parser.error("--levels takes comma-separated numbers, e.g. 1,2,3")
    if args.scenario == "overload" and (not args.levels or min(args.levels) <= 0
                                        or args.ttft_ms + args.tokens * args.token_delay_ms <= 0):
        parser.error("overload needs positive --levels and a service time (--ttft-ms > 0)")
    if args.scenario == "failover" and not (
            0 < args.kill_at < args.restart_at < args.failover_duration):
        parser.error("failover needs 0 < --kill-at < --restart-at < --failover-duration")
    if args.scenario == "resume" and (min(args.streams, args.stream_tokens) < 1
                                      or args.detached < 0 or args.stream_token_delay_ms < 0):
        parser.error("resume needs --streams and --stream-tokens >= 1, --detached >= 0 and "
                     "--stream-token-delay-ms >= 0")
    if args.scenario == "connections" and (min(args.connections, args.idle_connections) < 0
                                           or args.ramp_s <= 0 or args.hold_s < 0
                                           or args.tokens < 1):
        parser.error("connections needs --connections, --idle-connections >= 0, --ramp-s > 0, "
                     "--hold-s >= 0 and --tokens >= 1")
    if args.scenario == "websocket" and not (0 < args.active_sessions <= args.sessions
                                             and args.ramp_s > 0 and args.hold_s > 0
                                             and args.tokens >= 1):
        parser.error("websocket needs 0 < --active-sessions <= --sessions, --ramp-s > 0, "
                     "--hold-s > 0 and --tokens >= 1")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(args.targets) - set(TARGETS):
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if not 0 <= args.warmup < args.duration or min(args.concurrency, args.procs) < 1:
        parser.error("need 0 <= --warmup < --duration, --concurrency and --procs >= 1")
    if args.workers < 1 or args.rounds < 1 or args.retries < 0 or args.nofile < 64:
        parser.error("need --workers >= 1, --rounds >= 1, --retries >= 0 and --nofile >= 64")
    if args.workers > 1 and args.state != "redis" and not args.compare:
        parser.error("--workers > 1 needs --state redis (the gateway refuses memory state)")
    choose_load_tools(args, parser)
    return args


def choose_load_tools(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Settle ``--generator`` and ``--mock-engine``/``--mock-script``: ``--compare`` defaults
    to wrk (the Python generator and a note in the report if wrk is missing) and the fast
    mock; everything else to the Python generator and the aiohttp mock."""
    args.wrk_note = None
    if args.generator == "wrk" and (args.scenario or not args.compare):
        parser.error("--generator wrk runs closed-loop non-stream phases only: use it with "
                     "--compare (the default run has stream and open-loop phases, the "
                     "scenarios open loops)")
    if args.generator == "wrk" and shutil.which("wrk") is None:
        parser.error("--generator wrk: wrk is not on PATH (apt-get install wrk)")
    if args.generator is None:
        wrk = args.compare and not args.scenario
        if wrk and shutil.which("wrk") is None:
            wrk, args.wrk_note = False, WRK_MISSING
        args.generator = "wrk" if wrk else "python"
    if args.generator == "wrk" and args.procs > args.concurrency:
        parser.error("--generator wrk needs --procs <= --concurrency (one connection each)")
    if args.mock_engine is None:
        args.mock_engine = "fast" if args.compare and not args.scenario else "aiohttp"
        if args.mock_script is not None:
            args.mock_engine = "custom"
    if args.mock_script is None:
        args.mock_script = str(MOCK_SCRIPTS[args.mock_engine])


def setup_json(args: argparse.Namespace, targets: list[Target],
               services: Services) -> dict[str, Any]:
    setup = {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()}
    setup["cpus"] = sorted(ALL_CPUS)
    setup["targets"] = {t.name: {"kind": t.kind, "where": where(t),
                                 "placement": [sorted(c) for c in t.placement]
                                 if t.placement else None,
                                 "gateway": vars(t.gateway) if t.gateway else None}
                        for t in targets}
    setup["load_key_limits"] = LOAD_LIMITS
    setup["redis_port"] = services.redis_port
    return setup


def report(args: argparse.Namespace, targets: list[Target], services: Services) -> None:
    extra = derived(targets)
    print(header(args, targets, services), end="\n\n")
    print(render_table(targets, extra, args.rate), end="\n\n")
    for note in findings(targets, extra):
        print(note)
    if args.json:
        results = {t.name: {**t.results, "peak_rss_mib": t.rss_mib, "limit_store": t.store}
                   for t in targets}
        doc = {"setup": setup_json(args, targets, services), "results": results, **extra}
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        print(f"figures written to {args.json}")


def main() -> int:
    args = parse_args()
    if args.scenario:
        return run_scenario(args)
    if not gateway_runnable():
        if args.compare:
            print("proxy/ is not runnable yet; nothing to compare", file=sys.stderr)
            return 1
        if "gateway" in args.targets:
            print("warning: proxy/ is not runnable yet; skipping the gateway", file=sys.stderr)
            args.targets.remove("gateway")
    with tempfile.TemporaryDirectory(prefix="shepherd-load-") as tmp, \
            fleet_in(Path(tmp), args.nofile) as fleet:
        try:
            targets, services = (run_compare if args.compare else run_all)(args, fleet)
        except RuntimeError as exc:
            print(f"\nload test failed: {exc}", file=sys.stderr)
            return 1
        finally:
            os.sched_setaffinity(0, ALL_CPUS)
    (compare_report if args.compare else report)(args, targets, services)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; subprocesses stopped", file=sys.stderr)
        sys.exit(130)
