"""Load test: the gateway against a bare aiohttp forwarder and against the mock directly.

    .venv/bin/python scripts/loadtest.py [--concurrency 32] [--duration 5] [--warmup 1]
        [--rate 200] [--targets gateway,bare,direct] [--json PATH] [--procs 1] [--no-pin]
        [--tokens 16] [--ttft-ms 0] [--token-delay-ms 0] [--timeout 10]

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

Setup, chosen so that the server under test is the only bottleneck (2-core machine):

* the process under test (gateway or bare forwarder) is pinned to the first CPU and is
  alone there; the mock upstream, the load generator and this script share the second CPU
  (``os.sched_setaffinity`` in the child before ``exec``, so every thread inherits it).
  ``direct`` leaves the first CPU idle, so its requests/s is the ceiling of the mock +
  generator pair; when that CPU is nearly full during a target's phase the report says the
  load side may be limiting.
* the load generator is ``scripts/loadtest_client.py``: ``--procs`` separate processes on
  uvloop with a raw HTTP/1.1 keep-alive client (an ``asyncio.Protocol`` that parses only
  status, framing and SSE markers): ~26 us CPU per request against ~95 us for an aiohttp
  ``ClientSession`` on this machine.
* the same mock settings, connection count and request body for every target.

Besides requests/s, each phase reports the CPU time the process under test spent per
request (``/proc/<pid>/stat``), which stays meaningful when other jobs share the machine:
the report warns when processes outside the test used more than 15% of a CPU during a
phase (``/proc/stat`` minus the test's own processes). Peak RSS is ``VmHWM`` from
``/proc/<pid>/status``.

Every phase is bounded by time (``--duration`` plus at most ``--timeout`` for requests in
flight); every subprocess is killed on exit, on Ctrl-C, on SIGTERM and on errors (and by the
kernel if this script dies: ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import signal
import socket
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
TARGETS = ("gateway", "bare", "direct")
GATEWAY_KEY, MOCK_KEY = "sk-load-test", "sk-mock"
BRIEF_BARE_RPS = 5700  # a bare aiohttp forwarder on one core of the reference machine
CLK_TCK = os.sysconf("SC_CLK_TCK")
SATURATED_PCT = 80  # % of a CPU above which the process under test counts as CPU-bound
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Phase:
    name: str
    mode: str  # "closed" | "rate"
    stream: bool


PHASES = (Phase("non-stream", "closed", False), Phase("stream", "closed", True),
          Phase("rate", "rate", False))


@dataclass
class Target:
    """One thing to load: its port, the key it wants, the process under test if any."""

    name: str
    port: int
    api_key: str
    proc: subprocess.Popen[bytes] | None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    rss_mib: float = 0.0


# -- processes -------------------------------------------------------------------------


def child_setup(cpus: set[int] | None) -> Callable[[], None]:
    """``preexec_fn``: die with this script, and run on ``cpus`` (None: anywhere)."""

    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class Fleet:
    """Every subprocess this script started; ``stop_all`` ends them (TERM, then KILL)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def __repr__(self) -> str:
        alive = sum(p.poll() is None for p in self.procs)
        return f"<Fleet [{alive} alive of {len(self.procs)}] logs={self.log_dir}>"

    def spawn(self, name: str, argv: Sequence[str], cpus: set[int] | None,
              stdout: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stderr (and stdout unless given) going to ``<name>.log``."""
        # preexec_fn is safe here: this script runs no threads.
        with (self.log_dir / f"{name}.log").open("ab") as log, \
                (stdout.open("wb") if stdout else log) as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=log, stdin=subprocess.DEVNULL,
                                    cwd=ROOT, preexec_fn=child_setup(cpus))
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
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


@contextmanager
def fleet_in(log_dir: Path) -> Iterator[Fleet]:
    """A ``Fleet`` that is stopped however the block ends, SIGTERM included."""
    fleet = Fleet(log_dir)
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
               log_dir: Path, timeout_s: float = 30.0) -> None:
    """Poll ``GET path`` until 200; raise with the log's tail if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if http_status(port, path) == 200:
            return
        time.sleep(0.1)
    tail = (log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
    state = f"exited with {proc.returncode}" if proc.poll() is not None else "not ready"
    raise RuntimeError(f"{name} {state} (GET {path} on port {port}); log tail:\n{tail}")


# -- servers ----------------------------------------------------------------------------


def gateway_config(mock_port: int, directory: Path) -> Path:
    path = directory / "gateway.yaml"
    path.write_text(f"""\
server: {{host: 127.0.0.1, port: 8080}}
upstreams:
  mock:
    base_url: http://127.0.0.1:{mock_port}/v1
    api_key: {MOCK_KEY}
    models: ["*"]
    max_connections: 200
keys:
  load:
    key: {GATEWAY_KEY}
    models: ["*"]
""")
    return path


def start_mock(args: argparse.Namespace, fleet: Fleet,
               cpus: set[int] | None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [PYTHON, args.mock_script, "--port", str(port), "--ttft-ms", str(args.ttft_ms),
            "--token-delay-ms", str(args.token_delay_ms), "--tokens", str(args.tokens)]
    proc = fleet.spawn("mock", argv, cpus)
    return proc, port


def server_argv(name: str, port: int, mock_port: int, log_dir: Path) -> list[str]:
    if name == "gateway":
        config = gateway_config(mock_port, log_dir)
        return [PYTHON, "-m", "proxy", "serve", "--config", str(config),
                "--host", "127.0.0.1", "--port", str(port)]
    return [PYTHON, str(ROOT / "scripts" / "bare_forwarder.py"), "--port", str(port),
            "--upstream", f"http://127.0.0.1:{mock_port}", "--limit", "200"]


def start_targets(args: argparse.Namespace, fleet: Fleet,
                  cpus: tuple[set[int], set[int]] | None) -> tuple[list[Target], int]:
    """Start the mock and the servers under test, wait until all answer; (targets, mock pid)."""
    under_test, aux = cpus if cpus else (None, None)
    mock, mock_port = start_mock(args, fleet, aux)
    targets = []
    for name in args.targets:
        if name == "direct":
            targets.append(Target(name, mock_port, MOCK_KEY, None))
            continue
        port = free_port()
        proc = fleet.spawn(name, server_argv(name, port, mock_port, fleet.log_dir),
                           under_test)
        targets.append(Target(name, port, GATEWAY_KEY if name == "gateway" else MOCK_KEY,
                              proc))
    wait_ready("mock", mock, mock_port, "/v1/models", fleet.log_dir)
    for target in targets:
        if target.proc is not None:
            path = "/healthz" if target.name == "gateway" else "/v1/models"
            wait_ready(target.name, target.proc, target.port, path, fleet.log_dir)
    return targets, mock.pid


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


# -- one phase --------------------------------------------------------------------------


def client_spec(target: Target, phase: Phase, args: argparse.Namespace,
                share: int, start_at: float) -> dict[str, Any]:
    """The JSON spec for one generator process carrying ``share`` of 1/``procs``."""
    body = {"model": args.model, "max_tokens": args.tokens, "stream": phase.stream,
            "messages": [{"role": "user", "content": "Say hello."}]}
    return {
        "host": "127.0.0.1", "port": target.port, "path": "/v1/chat/completions",
        "headers": {"Authorization": f"Bearer {target.api_key}"}, "body": body,
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
        sys.stderr.write(f"\r[{bar}] {where:<30} {elapsed_s:4.1f}s/{total_s:.1f}s ")
        sys.stderr.flush()

    def finish(self, label: str, summary: str) -> None:
        self.done += 1
        if not self.tty:
            print(f"{self.done}/{self.phases} {label}: {summary}", file=sys.stderr)

    def clear(self) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * 79 + "\r")


def await_clients(clients: dict[Path, subprocess.Popen[bytes]], label: str,
                  start_at: float, args: argparse.Namespace,
                  shown: Progress) -> list[dict[str, Any]]:
    """Show progress until every generator exits; kill any that overrun their bound."""
    deadline = start_at + args.duration + args.timeout + 5
    while any(c.poll() is None for c in clients.values()) and time.time() < deadline:
        shown.draw(label, max(0.0, time.time() - start_at), args.duration)
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


def run_phase(target: Target, phase: Phase, args: argparse.Namespace, fleet: Fleet,
              mock_pid: int, aux: set[int] | None, shown: Progress) -> dict[str, Any]:
    """Run one phase against ``target``; return its merged figures."""
    label = f"{target.name} {phase.name}"
    start_at = time.time() + 0.3
    clients = {}
    for i in range(args.procs):
        spec = orjson.dumps(client_spec(target, phase, args, i, start_at)).decode()
        out = fleet.log_dir / f"loadgen-{i}.json"
        clients[out] = fleet.spawn("loadgen", [PYTHON, str(CLIENT), spec], aux, out)
    under_test = target.proc.pid if target.proc else mock_pid
    time.sleep(max(0.0, start_at - time.time()))
    before = CpuSample.take(under_test, mock_pid)
    outputs = await_clients(clients, label, start_at, args, shown)
    after = CpuSample.take(under_test, mock_pid)
    merged = merge(outputs, args.duration - args.warmup)
    loadgen_s = sum(o["cpu_s"] for o in outputs)
    merged["cpu_pct"] = cpu_use(before, after, loadgen_s, same=target.proc is None)
    used_s = after.under_test_s - before.under_test_s
    merged["cpu_us_per_request"] = 1e6 * used_s / merged["issued"] if merged["issued"] else None
    shown.finish(label, f"{merged['rps']:,.0f} req/s, {sum(merged['errors'].values())} errors")
    return merged


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by the process under test, the mock, this script and
    the whole machine (``/proc/stat``), taken at monotonic time ``at_s``."""

    at_s: float
    under_test_s: float
    mock_s: float
    own_s: float
    machine_s: float

    @classmethod
    def take(cls, under_test: int, mock: int) -> CpuSample:
        times = os.times()
        return cls(time.monotonic(), cpu_seconds(under_test), cpu_seconds(mock),
                   times.user + times.system, machine_busy_seconds())


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
    under = after.under_test_s - before.under_test_s
    mock = after.mock_s - before.mock_s
    ours = (0.0 if same else under) + mock + loadgen_s + after.own_s - before.own_s
    foreign = after.machine_s - before.machine_s - ours
    return {"under_test": 100 * under / wall, "mock": 100 * mock / wall,
            "loadgen": 100 * loadgen_s / wall, "other_processes": max(0.0, 100 * foreign / wall)}


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


def pair(stats: dict[str, float] | None, fmt: str = "{:.2f}") -> str:
    if not stats:
        return "-"
    return f"{fmt.format(stats['p50'])} / {fmt.format(stats['p99'])}"


def table_rows(targets: list[Target], extra: dict[str, Any],
               rate: float) -> list[tuple[str, list[str]]]:
    """(label, one cell per target) for every row of the main table."""

    def cells(get: Callable[[Target], str]) -> list[str]:
        return [get(t) for t in targets]

    added = extra["added_latency_ms"]
    return [
        ("non-stream  req/s", cells(lambda t: f"{t.results['non-stream']['rps']:,.0f}")),
        ("  latency p50 / p99 ms", cells(lambda t: pair(t.results["non-stream"]["latency_ms"]))),
        ("  CPU us / request (tested)", cells(lambda t: cost(t, "non-stream"))),
        ("stream      streams/s", cells(lambda t: f"{t.results['stream']['rps']:,.0f}")),
        ("  TTFT p50 / p99 ms", cells(lambda t: pair(t.results["stream"]["ttft_ms"]))),
        ("  total p50 / p99 ms", cells(lambda t: pair(t.results["stream"]["latency_ms"]))),
        ("  CPU us / stream (tested)", cells(lambda t: cost(t, "stream"))),
        (f"{rate:g} req/s  achieved", cells(lambda t: f"{t.results['rate']['rps']:,.1f}")),
        ("  latency p50 / p99 ms", cells(lambda t: pair(t.results["rate"]["latency_ms"]))),
        ("  added vs direct p50 / p99", cells(
            lambda t: pair(added.get(t.name), "{:+.2f}") if t.name in added else "-")),
        ("errors (all phases)", cells(lambda t: str(sum(
            sum(r["errors"].values()) for r in t.results.values())))),
        ("CPU% test/mock/gen/other", cells(lambda t: "/".join(
            f"{v:.0f}" for v in t.results["non-stream"]["cpu_pct"].values()))),
        ("peak RSS MiB (VmHWM)", cells(lambda t: f"{t.rss_mib:.1f}"
                                       + (" (mock)" if t.proc is None else ""))),
    ]


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


def render_table(targets: list[Target], extra: dict[str, Any], rate: float) -> str:
    rows = table_rows(targets, extra, rate)
    width = max(len(label) for label, _ in rows) + 2
    cols = [max(len(t.name), *(len(r[1][i]) for r in rows)) + 3
            for i, t in enumerate(targets)]
    lines = [" " * width + "".join(t.name.rjust(c) for t, c in zip(targets, cols, strict=True))]
    for label, row in rows:
        lines.append(label.ljust(width) + "".join(v.rjust(c) for v, c in zip(row, cols, strict=True)))
    return "\n".join(lines)


def findings(targets: list[Target], extra: dict[str, Any]) -> list[str]:
    """The sentences under the table: ratios, sanity checks, error details."""
    by_name = {t.name: t.results for t in targets}
    notes = ratio_notes(by_name, extra) + bare_notes(by_name.get("bare"))
    for target in targets:
        notes += saturation_notes(target)
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


def saturation_notes(target: Target) -> list[str]:
    """Warn when the mock + generator CPU was nearly full, or other jobs took CPU."""
    notes = []
    for phase, result in target.results.items():
        cpu = result["cpu_pct"]
        load_side = cpu["mock"] + cpu["loadgen"]
        if target.proc is not None and phase != "rate" and load_side > 85:
            notes.append(f"WARNING {target.name} {phase}: mock + load generator used "
                         f"{load_side:.0f}% of their CPU; the load side may be limiting")
        if cpu["other_processes"] > 15:
            notes.append(f"WARNING {target.name} {phase}: other processes used "
                         f"{cpu['other_processes']:.0f}% of a CPU; figures are noisy")
    return notes


def header(args: argparse.Namespace, cpus: tuple[set[int], set[int]] | None) -> str:
    """The setup, printed above the table."""
    if cpus:
        where = (f"server under test pinned to CPU {fmt_cpus(cpus[0])}; mock upstream + "
                 f"load generator pinned to CPU {fmt_cpus(cpus[1])}")
    else:
        where = "no CPU pinning (the scheduler places every process)"
    title = (f"Shepherd load test - 127.0.0.1, Python {platform.python_version()}, "
             f"{os.cpu_count()} CPUs, uvloop everywhere")
    setup = (f"setup: {where}; {args.procs} load generator process(es), raw HTTP/1.1 "
             "keep-alive client")
    load = (f"load: {args.concurrency} closed-loop connections, {args.duration:g} s per "
            f"phase ({args.warmup:g} s warm-up not counted); open loop at {args.rate:g} req/s")
    mock = (f"mock: {args.tokens} tokens per answer, ttft {args.ttft_ms:g} ms, "
            f"token delay {args.token_delay_ms:g} ms")
    return f"{title}\n{setup}\n{load}\n{mock}"


def fmt_cpus(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


# -- main -------------------------------------------------------------------------------


def placement(no_pin: bool) -> tuple[set[int], set[int]] | None:
    """(CPUs for the server under test, CPUs for mock + generator), or None: no pinning."""
    available = sorted(os.sched_getaffinity(0))
    if no_pin or len(available) < 2:
        return None
    return {available[0]}, set(available[1:])


def gateway_runnable() -> bool:
    return (ROOT / "proxy" / "__main__.py").exists() or (ROOT / "proxy" / "cli.py").exists()


def run_all(args: argparse.Namespace, fleet: Fleet,
            cpus: tuple[set[int], set[int]] | None) -> list[Target]:
    targets, mock_pid = start_targets(args, fleet, cpus)
    aux = cpus[1] if cpus else None
    shown = Progress(len(targets) * len(PHASES))
    for phase in PHASES:  # phase-major: a phase's targets run close together in time
        for target in targets:
            target.results[phase.name] = run_phase(target, phase, args, fleet,
                                                   mock_pid, aux, shown)
    for target in targets:
        target.rss_mib = peak_rss_mib(target.proc.pid if target.proc else mock_pid)
    shown.clear()
    return targets


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add = parser.add_argument
    add("--concurrency", type=int, default=32, help="closed-loop connections")
    add("--duration", type=float, default=5.0, help="seconds per phase, warm-up included")
    add("--warmup", type=float, default=1.0, help="seconds at the start not counted")
    add("--rate", type=float, default=200.0, help="req/s of the open-loop latency phase")
    add("--targets", default=",".join(TARGETS), help="comma list of gateway,bare,direct")
    add("--json", type=Path, help="also write every figure to this file")
    add("--procs", type=int, default=1, help="load generator processes")
    add("--timeout", type=float, default=10.0, help="seconds per request")
    add("--tokens", type=int, default=16, help="tokens per mock answer (= max_tokens)")
    add("--ttft-ms", type=float, default=0.0, help="mock delay before the first token")
    add("--token-delay-ms", type=float, default=0.0, help="mock delay between tokens")
    add("--model", default="mock-gpt", help="model name sent in every request")
    add("--no-pin", action="store_true", help="do not pin processes to CPUs")
    add("--mock-script", default=str(ROOT / "scripts" / "mock_upstream.py"),
        help="the mock upstream to start (takes --port/--ttft-ms/--token-delay-ms/--tokens)")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(args.targets) - set(TARGETS):
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if not 0 <= args.warmup < args.duration or min(args.concurrency, args.procs) < 1:
        parser.error("need 0 <= --warmup < --duration, --concurrency and --procs >= 1")
    return args


def report(args: argparse.Namespace, cpus: tuple[set[int], set[int]] | None,
           targets: list[Target]) -> None:
    extra = derived(targets)
    print(header(args, cpus), end="\n\n")
    print(render_table(targets, extra, args.rate), end="\n\n")
    for note in findings(targets, extra):
        print(note)
    if args.json:
        setup = {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()}
        setup["cpus"] = [sorted(c) for c in cpus] if cpus else None
        results = {t.name: {**t.results, "peak_rss_mib": t.rss_mib} for t in targets}
        doc = {"setup": setup, "results": results, **extra}
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        print(f"figures written to {args.json}")


def main() -> int:
    args = parse_args()
    if "gateway" in args.targets and not gateway_runnable():
        print("warning: proxy/ is not runnable yet; skipping the gateway", file=sys.stderr)
        args.targets.remove("gateway")
    cpus = placement(args.no_pin)
    if cpus:
        os.sched_setaffinity(0, cpus[1])
    with tempfile.TemporaryDirectory(prefix="shepherd-load-") as tmp, \
            fleet_in(Path(tmp)) as fleet:
        try:
            targets = run_all(args, fleet, cpus)
        except RuntimeError as exc:
            print(f"\nload test failed: {exc}", file=sys.stderr)
            return 1
    report(args, cpus, targets)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; subprocesses stopped", file=sys.stderr)
        sys.exit(130)
