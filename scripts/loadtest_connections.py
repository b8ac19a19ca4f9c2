"""``loadtest.py --scenario connections``: many concurrent streams and idle keep-alive
connections against one gateway with the default ``server:`` settings, and its driver.

The scenario (``run_connections``, called by ``loadtest.py``): the fast mock engine
(``scripts/mock_fast.py``; ``--tokens`` tokens, a token every ``--token-delay-ms``, by
default long enough for a stream to outlive both ramps and the hold) as upstream
``streams`` for model ``mock-gpt``, with ``max_connections`` = ``--connections`` (so the
upstream pool never limits the streams), and a second fast mock without delays as upstream
``probe`` for model ``probe``. ``server:`` is left at its defaults (``max_connections``
10,000, ``header_timeout`` 10 s, ``keepalive_timeout`` 15 s, ``backlog`` 1024, the access
log on) apart from host and port. Timeline, in seconds from the start (``phase_of``):

* ``-1``: a probe process opens one keep-alive connection and sends a small non-stream chat
  completion (model ``probe``) every ``PROBE_INTERVAL_S``, until the end; it reconnects
  when the connection is lost (each reconnect counted).
* ``0 .. ramp``: ``--connections`` streamed chat completions are opened at an even pace
  (``--ramp-s``), from 127.0.0.2;
* ``ramp .. 2 ramp``: ``--idle-connections`` connections are opened at an even pace, from
  127.0.0.3, 127.0.0.4, ... (``IDLE_PER_PROCESS`` per client process and source address,
  so neither descriptors nor ephemeral ports run short); each sends one ``GET /healthz``
  with keep-alive and then stays idle. Nothing is re-sent: an accepted idle connection is
  expected to be closed by the gateway ``server.keepalive_timeout`` after its answer, and
  the time it was closed after is reported (closed much earlier counts as closed early).
* ``2 ramp .. 2 ramp + hold``: everything is held (``--hold-s``);
* then until the last stream ended and the idle connections were closed or held to
  ``idle_until_s``: drain.

Every second this script samples the gateway's ``VmRSS`` and open descriptors
(``/proc/<pid>/fd``); the stream driver samples its streams open. ``/metrics`` is read
before and after (not during: at the limit, a scrape would be refused like any other
connection). Every process (gateway, mocks, drivers) is started with ``--nofile`` as its
soft and hard ``RLIMIT_NOFILE`` (``loadtest.child_setup``; default 65536, so the gateway's
client connection cap is ``server.max_connections``, not the descriptors), the figure each
got is in the report. Outcomes (``classify``): a stream is intact (200, ends with ``data: [DONE]``,
the text is ``expected_text(tokens)``), refused (503: with or without ``retry-after``, how
fast), or failed: no connection, no response head, another status, or broken after its 200.

Driver: ``loadtest_connections.py '<json spec>'`` prints one JSON object; ``spec["mode"]``
is ``streams``, ``idle`` or ``probe`` (``STREAMS``/``IDLE``/``PROBE``). Each driver raises
its own soft ``RLIMIT_NOFILE`` to the hard limit (for a ``--nofile`` that was refused).
Everything is bounded: each connection by ``timeout_s`` (streams: plus their own length),
the whole driver by ``deadline_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvloop

try:  # imported as scripts.loadtest_connections (tests) or run as a script
    from scripts import loadtest as lt
    from scripts.loadtest_resume import DONE, HEAD_LIMIT_BYTES, Response, chat_text, split_events
    from scripts.mock_upstream import expected_text
except ImportError:  # pragma: no cover - script mode
    import loadtest as lt  # type: ignore[no-redef,import-not-found]
    from loadtest_resume import (  # type: ignore[no-redef,import-not-found]
        DONE,
        HEAD_LIMIT_BYTES,
        Response,
        chat_text,
        split_events,
    )
    from mock_upstream import expected_text  # type: ignore[no-redef,import-not-found]

DRIVER = Path(__file__).resolve()
STREAM_MODEL, PROBE_MODEL = "mock-gpt", "probe"
STREAM_SOURCE = "127.0.0.2"
IDLE_SOURCE_BASE = 3  # idle client i connects from 127.0.0.<3 + i>
IDLE_PER_PROCESS = 10_000  # connections per idle client (soft RLIMIT_NOFILE, ports per source)
PROBE_INTERVAL_S = 0.25
PROBE_LEAD_S = 1.0  # the probe connects this long before the ramp
KEEPALIVE_S = 15.0  # server.keepalive_timeout's default, for "closed early"
CLOSE_EARLY_SLACK_S = 1.0
PROBE_UPSTREAM_CONNECTIONS = 4
SAMPLE_INTERVAL_S = 1.0
STREAMS, IDLE, PROBE = "streams", "idle", "probe"
PHASE_NAMES = ("before", "stream ramp", "idle ramp", "hold", "drain")


# -- pure parts: outcomes, phases, summaries --------------------------------------------


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one connection got. ``status`` None: no response head (``error`` says why,
    ``"connect: ..."`` if the connection was never made). ``head_ms``: from before the
    connect to the complete response head (None: no head). ``ended``: the body ended
    cleanly (last chunk or Content-Length reached)."""

    status: int | None
    head_ms: float | None = None
    retry_after: bool = False
    code: str | None = None  # ``error.code`` of a JSON error body
    body: bytes = b""
    ended: bool = False
    error: str | None = None


def stream_problem(body: bytes, ended: bool, tokens: int) -> str | None:
    """Why a 200 stream body is not intact (None: it is): it must end cleanly, with
    ``data: [DONE]`` as its last event and nothing incomplete after it, and carry the text
    ``expected_text(tokens)``."""
    if not ended:
        return "the body did not end"
    events, rest = split_events(body)
    if not events or events[-1].data != DONE or rest:
        return "no data: [DONE] at the end"
    try:
        if chat_text(events) != expected_text(tokens):
            return f"text is not expected_text({tokens})"
    except ValueError:
        return "an event is not JSON"
    return None


def classify(attempt: Attempt, tokens: int | None = None) -> tuple[str, str | None]:
    """(kind, detail) of an attempt. Kinds: ``intact`` (a stream: 200 and ``stream_problem``
    finds nothing; with ``tokens`` None, any 200 that ended: ``ok``), ``refused`` (503),
    ``failed: connect``, ``failed: no head``, ``failed: HTTP <status>``, ``failed: broken
    after 200``. Only the last two failed after admission."""
    if attempt.status is None:
        error = attempt.error or "unknown"
        kind = "failed: connect" if error.startswith("connect:") else "failed: no head"
        return kind, error
    if attempt.status == 503:
        return "refused", attempt.code
    if attempt.status != 200:
        return f"failed: HTTP {attempt.status}", attempt.code or attempt.error
    if attempt.error is not None:
        return "failed: broken after 200", attempt.error
    if tokens is None:
        return ("ok", None) if attempt.ended else ("failed: broken after 200", "the body did not end")
    problem = stream_problem(attempt.body, attempt.ended, tokens)
    return ("intact", None) if problem is None else ("failed: broken after 200", problem)


def after_admission(kind: str) -> bool:
    """Whether a failure of this kind happened after the gateway admitted the connection."""
    return kind == "failed: broken after 200" or (kind.startswith("failed: HTTP ")
                                                  and kind != "failed: HTTP 503")


def phase_of(t_s: float, ramp_s: float, hold_s: float) -> str:
    """The phase (``PHASE_NAMES``) at ``t_s`` seconds from the start of the stream ramp."""
    if t_s < 0:
        return "before"
    if t_s < ramp_s:
        return "stream ramp"
    if t_s < 2 * ramp_s:
        return "idle ramp"
    return "hold" if t_s < 2 * ramp_s + hold_s else "drain"


def record_of(attempt: Attempt, tokens: int | None, **extra: Any) -> dict[str, Any]:
    """A JSON-able record of an attempt (the body left out)."""
    kind, detail = classify(attempt, tokens)
    return {"kind": kind, "detail": detail, "status": attempt.status,
            "head_ms": attempt.head_ms, "retry_after": attempt.retry_after, **extra}


def outcome_summary(records: Sequence[dict[str, Any]], good: str) -> dict[str, Any]:
    """Counts by kind; ``good`` (``intact`` or ``ok``) as % of attempts and of admitted
    ones (those not refused and not failed before admission); refusals: how many carried
    ``retry-after``, their codes and how fast their head came (ms)."""
    kinds = Counter(r["kind"] for r in records)
    refused = [r for r in records if r["kind"] == "refused"]
    admitted = sum(n for k, n in kinds.items()
                   if k == good or after_admission(k))
    failed_after = sum(n for k, n in kinds.items() if after_admission(k))
    details = Counter(f"{r['kind']}: {r['detail']}" for r in records
                      if r["kind"].startswith("failed"))
    return {"attempted": len(records), "kinds": dict(kinds), "good": kinds[good],
            "good_pct": 100 * kinds[good] / len(records) if records else None,
            "admitted": admitted,
            "good_pct_of_admitted": 100 * kinds[good] / admitted if admitted else None,
            "failed_after_admission": failed_after,
            "refused": len(refused),
            "refused_with_retry_after": sum(r["retry_after"] for r in refused),
            "refusal_codes": dict(Counter(str(r["detail"]) for r in refused)),
            "refusal_ms": lt.percentiles([r["head_ms"] for r in refused
                                          if r["head_ms"] is not None]),
            "failures": dict(details.most_common(10))}


def idle_summary(records: Sequence[dict[str, Any]], keepalive_s: float) -> dict[str, Any]:
    """``outcome_summary`` of the idle connections' ``GET /healthz`` plus what became of
    the accepted ones: closed by the gateway (and after how many idle seconds), closed
    early (more than ``CLOSE_EARLY_SLACK_S`` before ``keepalive_s``), still open at the end."""
    out = outcome_summary(records, "ok")
    accepted = [r for r in records if r["kind"] == "ok"]
    closed = [r["closed_after_s"] for r in accepted if r.get("closed_after_s") is not None]
    early = [s for s in closed if s < keepalive_s - CLOSE_EARLY_SLACK_S]
    seconds = sorted(closed)
    out |= {"accepted": len(accepted), "closed_by_gateway": len(closed),
            "closed_early": len(early), "open_at_end": len(accepted) - len(closed),
            "closed_after_s": {"min": seconds[0], "p50": seconds[len(seconds) // 2],
                               "max": seconds[-1]} if seconds else None}
    return out


def probe_summary(samples: Sequence[dict[str, Any]], ramp_s: float,
                  hold_s: float) -> dict[str, Any]:
    """Side-request latency (ms) overall and by phase, over the answered ones (200);
    the others counted by kind."""
    ok = [s for s in samples if s["kind"] == "ok"]
    by_phase = {name: lt.percentiles([s["ms"] for s in ok
                                      if phase_of(s["t"], ramp_s, hold_s) == name])
                for name in PHASE_NAMES}
    return {"sent": len(samples), "ok": len(ok), "latency_ms": lt.percentiles([s["ms"] for s in ok]),
            "by_phase": by_phase,
            "not_ok": dict(Counter(f"{s['kind']}: {s['detail']}" for s in samples
                                   if s["kind"] != "ok"))}


def phase_peaks(samples: Sequence[dict[str, Any]], keys: Sequence[str], ramp_s: float,
                hold_s: float) -> dict[str, dict[str, float | None]]:
    """The largest value of each of ``keys`` in the samples (``{"t": s, key: value}``)
    of each phase (None: no sample there)."""
    out: dict[str, dict[str, float | None]] = {}
    for name in PHASE_NAMES:
        inside = [s for s in samples if phase_of(s["t"], ramp_s, hold_s) == name]
        out[name] = {k: max((s[k] for s in inside if s.get(k) is not None), default=None)
                     for k in keys}
    return out


def auto_token_delay_ms(ramp_s: float, hold_s: float, tokens: int) -> float:
    """A token delay making a stream outlive both ramps and the hold (plus 2 s), so the
    first stream is still open at the end of the hold."""
    return math.ceil(1000 * (2 * ramp_s + hold_s + 2) / max(1, tokens))


# -- HTTP/1.1 on asyncio streams --------------------------------------------------------


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """(status, lower-case header fields) of a response head ending in a blank line."""
    status_line, *fields = head.decode("latin-1").split("\r\n")
    pairs = (f.split(":", 1) for f in fields if ":" in f)
    return int(status_line[9:12]), {k.strip().lower(): v.strip() for k, v in pairs}


def error_code(body: bytes) -> str | None:
    """``error.code`` of an OpenAI error body (None: not one)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    return str(error.get("code")) if isinstance(error, dict) else None


def request_bytes(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes,
                   t0: float) -> tuple[Response, float]:
    """Send ``raw`` and read the response head; (response, ms since ``t0``). Raises
    ``ConnectionError``/``asyncio.IncompleteReadError`` if no head comes."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status, fields = parse_head(head)
    chunked = fields.get("transfer-encoding", "").lower() == "chunked"
    length = None if chunked or "content-length" not in fields else int(fields["content-length"])
    resp = Response(status, fields, reader, writer, chunked, length, done=length == 0)
    return resp, (time.perf_counter() - t0) * 1000


async def attempt(host: str, port: int, source: str | None, raw: bytes,
                  keep: bool = False) -> tuple[Attempt, Response | None]:
    """Connect (from ``source``), send ``raw``, read the whole response. The connection is
    dropped unless ``keep`` and the answer is a 200 (then the response is returned too, for
    its reader and writer). Cancelling is safe: the connection is dropped."""
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(
            host, port, limit=HEAD_LIMIT_BYTES, local_addr=(source, 0) if source else None)
    except OSError as exc:
        return Attempt(None, error=f"connect: {type(exc).__name__}"), None
    kept = False
    try:
        try:
            resp, head_ms = await exchange(reader, writer, raw, t0)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            return Attempt(None, error=f"head: {type(exc).__name__}"), None
        body, error = bytearray(), None
        try:
            while piece := await resp.piece():
                body += piece
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            error = f"body: {type(exc).__name__}"
        got = Attempt(resp.status, head_ms, "retry-after" in resp.headers,
                      error_code(bytes(body)) if resp.status >= 400 else None, bytes(body),
                      resp.done, error)
        kept = keep and resp.status == 200 and error is None
        return got, resp if kept else None
    finally:
        if not kept:
            writer.transport.abort()


# -- the drivers ------------------------------------------------------------------------


async def sleep_until(at: float) -> None:
    """Sleep until ``time.time()`` is ``at``."""
    await asyncio.sleep(max(0.0, at - time.time()))


def bounded_s(spec: dict[str, Any], at: float, extra_s: float = 0.0) -> float:
    """Seconds one connection started at ``at`` may take: ``timeout_s`` plus ``extra_s``,
    and never past the driver's deadline."""
    return max(0.1, min(spec["timeout_s"] + extra_s,
                        spec["start_at"] + spec["deadline_s"] - at))


class StreamCounter:
    """Streams with a 200 head whose body has not ended, and their peak."""

    def __init__(self) -> None:
        self.open = 0
        self.peak = 0

    def __repr__(self) -> str:
        return f"<StreamCounter [open: {self.open} | peak: {self.peak}]>"

    def opened(self) -> None:
        self.open += 1
        self.peak = max(self.peak, self.open)


async def one_stream(spec: dict[str, Any], at: float, counter: StreamCounter) -> dict[str, Any]:
    await sleep_until(at)
    raw = request_bytes("POST", "/v1/chat/completions", spec["headers"],
                        orjson.dumps(spec["body"]))
    head: dict[str, Any] = {}
    try:
        async with asyncio.timeout(bounded_s(spec, at)) as bound:
            head["bound"] = bound
            got = await counted_stream(spec, raw, counter, head)
    except TimeoutError:
        got = Attempt(head.get("status"), head.get("ms"), error=(
            "body: TimeoutError" if "status" in head else "head: TimeoutError"))
    return record_of(got, spec["tokens"], t=at - spec["start_at"])


async def counted_stream(spec: dict[str, Any], raw: bytes, counter: StreamCounter,
                         head: dict[str, Any]) -> Attempt:
    """One stream, counted open in ``counter`` from its 200 head to its end. ``head``
    holds the ``asyncio.timeout`` bounding it (``timeout_s`` until the head); it gets the
    status and head ms as soon as they are known (for a timeout after them), and the bound
    is moved to ``timeout_s`` plus the stream's own length from then."""
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(
            spec["host"], spec["port"], limit=HEAD_LIMIT_BYTES, local_addr=(spec["source"], 0))
    except OSError as exc:
        return Attempt(None, error=f"connect: {type(exc).__name__}")
    try:
        try:
            resp, head_ms = await exchange(reader, writer, raw, t0)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            return Attempt(None, error=f"head: {type(exc).__name__}")
        head |= {"status": resp.status, "ms": head_ms}
        left_s = bounded_s(spec, time.time(), spec["stream_s"])  # the body: from its head
        head["bound"].reschedule(asyncio.get_running_loop().time() + left_s)
        if resp.status == 200:
            counter.opened()
        body, error = bytearray(), None
        try:
            while piece := await resp.piece():
                body += piece
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            error = f"body: {type(exc).__name__}"
        finally:
            if resp.status == 200:
                counter.open -= 1
        return Attempt(resp.status, head_ms, "retry-after" in resp.headers,
                       error_code(bytes(body)) if resp.status >= 400 else None, bytes(body),
                       resp.done, error)
    finally:
        writer.transport.abort()


async def sample_open(spec: dict[str, Any], counter: StreamCounter,
                      out: list[dict[str, Any]]) -> None:
    """Append ``{"t", "open"}`` every ``SAMPLE_INTERVAL_S`` until cancelled."""
    while True:
        out.append({"t": round(time.time() - spec["start_at"], 2), "open": counter.open})
        await asyncio.sleep(SAMPLE_INTERVAL_S)


async def run_streams(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec["count"]`` streams, one every ``ramp_s / count`` seconds from ``start_at``."""
    counter, samples = StreamCounter(), []
    sampler = asyncio.create_task(sample_open(spec, counter, samples))
    step = spec["ramp_s"] / max(1, spec["count"])
    records = await asyncio.gather(*(one_stream(spec, spec["start_at"] + i * step, counter)
                                     for i in range(spec["count"])))
    sampler.cancel()
    return {"records": records, "peak_open": counter.peak, "open_samples": samples}


async def one_idle(spec: dict[str, Any], at: float) -> dict[str, Any]:
    """Connect at ``at``, ``GET /healthz`` with keep-alive, then stay idle until the
    gateway closes the connection (``closed_after_s``: seconds after the answer) or
    ``idle_until`` (``time.time()``) passes."""
    await sleep_until(at)
    raw = request_bytes("GET", "/healthz", {})
    try:
        async with asyncio.timeout(bounded_s(spec, at)):
            got, resp = await attempt(spec["host"], spec["port"], spec["source"], raw, keep=True)
    except TimeoutError:
        got, resp = Attempt(None, error="head: TimeoutError"), None
    extra: dict[str, Any] = {"t": at - spec["start_at"], "closed_after_s": None}
    if resp is not None:
        extra |= await wait_for_close(resp, spec["idle_until"])
    return record_of(got, None, **extra)


async def wait_for_close(resp: Response, until: float) -> dict[str, Any]:
    """Wait (until ``until``, ``time.time()``) for the gateway to close an idle connection;
    then drop it. ``unexpected_bytes``: what it sent meanwhile."""
    answered = time.perf_counter()
    out: dict[str, Any] = {"closed_after_s": None, "unexpected_bytes": 0}
    try:
        async with asyncio.timeout(max(0.0, until - time.time())):
            while data := await resp.reader.read(65536):
                out["unexpected_bytes"] += len(data)
            out["closed_after_s"] = round(time.perf_counter() - answered, 3)
    except TimeoutError:
        pass
    except OSError:
        out["closed_after_s"] = round(time.perf_counter() - answered, 3)
    finally:
        resp.writer.transport.abort()
    return out


async def run_idle(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec["count"]`` idle connections, one every ``ramp_s / count`` seconds from
    ``start_at + offset_s``."""
    step = spec["ramp_s"] / max(1, spec["count"])
    first = spec["start_at"] + spec["offset_s"]
    records = await asyncio.gather(*(one_idle(spec, first + i * step)
                                     for i in range(spec["count"])))
    return {"records": records}


class ProbeConnection:
    """The probe's keep-alive connection: opened on demand, dropped after anything but a
    200 that leaves it usable; ``connects`` counts the connections made."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.resp: Response | None = None
        self.connects = 0

    def __repr__(self) -> str:
        return f"<ProbeConnection [{'open' if self.resp else 'closed'} | connects: {self.connects}]>"

    async def ask(self, raw: bytes) -> Attempt:
        """One request; reuses the connection when it is open. Cancelling is safe: the
        connection is dropped."""
        if self.resp is None:
            self.connects += 1
            got, self.resp = await attempt(self.spec["host"], self.spec["port"], None, raw, keep=True)
            return got
        t0 = time.perf_counter()
        try:
            resp, head_ms = await exchange(self.resp.reader, self.resp.writer, raw, t0)
            body = await resp.read_all()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            self.drop()
            return Attempt(None, error=f"head: {type(exc).__name__} (kept connection)")
        if resp.status != 200 or resp.headers.get("connection", "").lower() == "close":
            self.drop()
        return Attempt(resp.status, head_ms, "retry-after" in resp.headers,
                       error_code(body) if resp.status >= 400 else None, body, True)

    def drop(self) -> None:
        if self.resp is not None:
            self.resp.writer.transport.abort()
            self.resp = None


async def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """A request every ``interval_s`` from ``start_at - lead_s`` to ``until``; latency (ms)
    from sending it (or connecting, on a new connection) to the end of its answer."""
    raw = request_bytes("POST", "/v1/chat/completions", spec["headers"],
                        orjson.dumps(spec["body"]))
    conn, samples = ProbeConnection(spec), []
    tick = spec["start_at"] - spec["lead_s"]
    while tick < spec["until"]:
        await sleep_until(tick)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(spec["timeout_s"]):
                got = await conn.ask(raw)
        except TimeoutError:
            conn.drop()
            got = Attempt(None, error="head: TimeoutError")
        ms = (time.perf_counter() - t0) * 1000
        samples.append(record_of(got, None, t=round(tick - spec["start_at"], 3), ms=ms))
        tick = max(tick + spec["interval_s"], time.time())
    conn.drop()
    return {"samples": samples, "connects": conn.connects}


MODES = {STREAMS: run_streams, IDLE: run_idle, PROBE: run_probe}


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to the hard limit; (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    nofile = raise_nofile()
    out = await MODES[spec["mode"]](spec)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return out | {"cpu_s": usage.ru_utime + usage.ru_stime, "nofile": nofile,
                  "max_rss_kib": usage.ru_maxrss}


def main() -> None:
    spec = orjson.loads(sys.argv[1])
    sys.stdout.buffer.write(orjson.dumps(uvloop.run(run(spec))))


# -- the scenario (run by loadtest.py) --------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The run's shape, in seconds from the start of the stream ramp."""

    streams: int
    idle: int
    ramp_s: float
    hold_s: float
    tokens: int
    token_delay_ms: float

    @property
    def stream_s(self) -> float:
        return self.tokens * self.token_delay_ms / 1000

    @property
    def end_s(self) -> float:
        """When the last stream should have ended (idle connections are held until then)."""
        return self.ramp_s + self.stream_s + 1.0

    @classmethod
    def of(cls, args: argparse.Namespace) -> Plan:
        delay = args.token_delay_ms or auto_token_delay_ms(args.ramp_s, args.hold_s, args.tokens)
        return cls(args.connections, args.idle_connections, args.ramp_s, args.hold_s,
                   args.tokens, delay)


def gateway_config(plan: Plan, stream_port: int, probe_port: int) -> dict[str, Any]:
    """Default ``server:`` (host and port aside), the two mocks, one key without limits."""
    return {"server": {"host": "127.0.0.1", "port": 8080}, "state": {"backend": "memory"},
            "upstreams": {
                "streams": lt.mock_upstream(stream_port, models=[STREAM_MODEL],
                                            max_connections=max(1, plan.streams)),
                "probe": lt.mock_upstream(probe_port, models=[PROBE_MODEL],
                                          max_connections=PROBE_UPSTREAM_CONNECTIONS)},
            "keys": {"load": {"key": lt.GATEWAY_KEY, "models": ["*"]}}}


def spawn_fast_mock(fleet: lt.Fleet, name: str, port: int, tokens: int,
                    delay_ms: float) -> subprocess.Popen[bytes]:
    argv = [lt.PYTHON, str(lt.MOCK_SCRIPTS["fast"]), "--port", str(port), "--tokens",
            str(tokens), "--token-delay-ms", f"{delay_ms:g}"]
    return fleet.spawn(name, argv, None)


def start_servers(plan: Plan, fleet: lt.Fleet) -> dict[str, Any]:
    """The two mocks and the gateway, ready; returns their processes, ports and config."""
    stream_port, probe_port, port = lt.free_port(), lt.free_port(), lt.free_port()
    mocks = {"mock": (spawn_fast_mock(fleet, "mock", stream_port, plan.tokens,
                                      plan.token_delay_ms), stream_port),
             "mock-probe": (spawn_fast_mock(fleet, "mock-probe", probe_port, 1, 0), probe_port)}
    config = gateway_config(plan, stream_port, probe_port)
    path = fleet.log_dir / "connections.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    gateway = fleet.spawn("gateway", [lt.PYTHON, "-m", "proxy", "serve", "--config", str(path),
                                      "--host", "127.0.0.1", "--port", str(port)], None)
    for name, (proc, mock_port) in mocks.items():
        lt.wait_ready(name, proc, mock_port, "/v1/models", fleet.log_dir)
    lt.wait_ready("gateway", gateway, port, "/healthz", fleet.log_dir)
    return {"gateway": gateway, "port": port, "mocks": mocks, "config": config}


def chat(model: str, stream: bool, tokens: int) -> dict[str, Any]:
    return {"model": model, "stream": stream, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "Say hello."}]}


def driver_specs(plan: Plan, port: int, start_at: float, timeout_s: float) -> list[dict[str, Any]]:
    """The probe, the stream driver and the idle drivers (one per ``IDLE_PER_PROCESS``)."""
    deadline_s = plan.end_s + timeout_s + 5
    common = {"host": "127.0.0.1", "port": port, "start_at": start_at, "timeout_s": timeout_s,
              "deadline_s": deadline_s,
              "headers": {"Authorization": f"Bearer {lt.GATEWAY_KEY}",
                          "Content-Type": "application/json"}}
    specs = [common | {"mode": PROBE, "body": chat(PROBE_MODEL, False, 1),
                       "interval_s": PROBE_INTERVAL_S, "lead_s": PROBE_LEAD_S,
                       "until": start_at + plan.end_s}]
    if plan.streams:
        specs.append(common | {"mode": STREAMS, "count": plan.streams, "ramp_s": plan.ramp_s,
                               "source": STREAM_SOURCE, "tokens": plan.tokens,
                               "stream_s": plan.stream_s,
                               "body": chat(STREAM_MODEL, True, plan.tokens)})
    procs = math.ceil(plan.idle / IDLE_PER_PROCESS)
    for i in range(procs):
        count = lt.split(plan.idle, procs, i)
        offset = plan.ramp_s + plan.ramp_s * sum(lt.split(plan.idle, procs, j) for j in range(i)) \
            / max(1, plan.idle)
        specs.append(common | {"mode": IDLE, "count": count, "source": f"127.0.0.{IDLE_SOURCE_BASE + i}",
                               "ramp_s": plan.ramp_s * count / plan.idle, "offset_s": offset,
                               "idle_until": start_at + plan.end_s})
    return specs


#: Kernel counters (``/proc/net/netstat`` TcpExt, machine-wide) of connections the listen
#: queue could not take: the accept queue was full (``server.backlog``) or the SYN dropped.
LISTEN_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPReqQFullDoCookies")


def tcp_ext(text: str) -> dict[str, int]:
    """``LISTEN_COUNTERS`` of a ``/proc/net/netstat`` text (missing ones left out)."""
    lines = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
    if len(lines) < 2:
        return {}
    values = dict(zip(lines[0][1:], lines[1][1:], strict=False))
    return {k: int(values[k]) for k in LISTEN_COUNTERS if k in values}


def listen_counters() -> dict[str, int]:
    try:
        return tcp_ext(Path("/proc/net/netstat").read_text())
    except OSError:
        return {}


def descriptors(pid: int) -> int:
    """Open file descriptors of ``pid``'s tree (``/proc/<pid>/fd``)."""
    total = 0
    for each in lt.process_tree(pid):
        try:
            total += len(os.listdir(f"/proc/{each}/fd"))
        except OSError:
            continue
    return total


def watch(clients: dict[Path, subprocess.Popen[bytes]], gateway: int, start_at: float,
          deadline: float, plan: Plan, shown: lt.Progress) -> list[dict[str, Any]]:
    """Sample the gateway's RSS, descriptors and CPU (% of one CPU since the previous
    sample) every ``SAMPLE_INTERVAL_S`` until every driver exited or ``deadline``
    (``time.time()``) passed."""
    samples: list[dict[str, Any]] = []
    cpu0 = lt.cpu_seconds(gateway)
    while any(c.poll() is None for c in clients.values()) and time.time() < deadline:
        t, cpu = time.time() - start_at, lt.cpu_seconds(gateway)
        busy = 100 * (cpu - cpu0) / (t - samples[-1]["t"]) if samples else None
        samples.append({"t": round(t, 2), "rss_kib": lt.rss_kib(gateway),
                        "fds": descriptors(gateway), "cpu_pct": busy})
        cpu0 = cpu
        shown.draw("connections", max(0.0, t), plan.end_s)
        time.sleep(max(0.0, SAMPLE_INTERVAL_S - (time.time() - start_at - t)))
    return samples


def collect(clients: dict[Path, subprocess.Popen[bytes]], fleet: lt.Fleet) -> list[dict[str, Any]]:
    """Each driver's output (a driver still running is killed; one that failed raises)."""
    outputs = []
    for path, client in clients.items():
        if client.poll() is None:
            client.kill()
        if client.wait() != 0:
            tail = (fleet.log_dir / "loadgen.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"connections driver exited with {client.returncode}:\n{tail}")
        outputs.append(orjson.loads(path.read_bytes()))
    return outputs


def listener_log(log_dir: Path) -> dict[str, Any]:
    """The gateway's ``file descriptor limit`` and ``listener`` log lines, merged."""
    out: dict[str, Any] = {}
    for line in (log_dir / "gateway.log").read_text(errors="replace").splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("msg") in ("file descriptor limit", "listener"):
            out |= {k: v for k, v in record.items() if k in (
                "soft", "hard", "backlog", "max_connections", "fd_cap", "header_timeout_s",
                "keepalive_timeout_s")}
    return out


def run_connections(args: argparse.Namespace, fleet: lt.Fleet) -> dict[str, Any]:
    """Ramp streams, then idle connections, hold, drain (see the module docstring)."""
    plan = Plan.of(args)
    servers = start_servers(plan, fleet)
    gateway, port = servers["gateway"], servers["port"]
    mock_pids = [proc.pid for proc, _ in servers["mocks"].values()]
    load_side = lt.place(lt.scenario_placement(args), gateway.pid, mock_pids)
    metrics0 = lt.metric_samples(port, ["shepherd_connections"])
    kernel0 = listen_counters()
    start_at = time.time() + PROBE_LEAD_S + 1.0
    specs = driver_specs(plan, port, start_at, args.timeout)
    clients = lt.spawn_clients(fleet, specs, load_side, DRIVER)
    pids = {"under_test": gateway.pid, "mock": mock_pids[0]}
    before = lt.CpuSample.take(pids)
    shown = lt.Progress(1)
    samples = watch(clients, gateway.pid, start_at, start_at + specs[0]["deadline_s"] + 5,
                    plan, shown)
    after = lt.CpuSample.take(pids)
    kernel = {k: v - kernel0.get(k, 0) for k, v in listen_counters().items()}
    outputs = collect(clients, fleet)
    shown.clear()
    time.sleep(1.5)  # refused connections linger up to 1 s in the gateway
    doc = summarize_run(args, plan, servers, outputs, samples, metrics0,
                        lt.phase_cpu_pct(before, after, sum(o["cpu_s"] for o in outputs)),
                        fleet)
    return doc | {"listen_queue": kernel}


def summarize_run(args: argparse.Namespace, plan: Plan, servers: dict[str, Any],
                  outputs: list[dict[str, Any]], samples: list[dict[str, Any]],
                  metrics0: dict[str, float], cpu_pct: dict[str, float],
                  fleet: lt.Fleet) -> dict[str, Any]:
    probe = outputs[0]
    streams = [r for o in outputs if "peak_open" in o for r in o["records"]]
    idle = [r for o in outputs if "peak_open" not in o and "records" in o for r in o["records"]]
    open_samples = [s for o in outputs for s in o.get("open_samples", [])]
    limits = listener_log(fleet.log_dir)
    keepalive_s = float(limits.get("keepalive_timeout_s", KEEPALIVE_S))
    port = servers["port"]
    return {
        "scenario": "connections", "plan": vars(plan) | {"stream_s": plan.stream_s,
                                                          "end_s": plan.end_s},
        "streams": outcome_summary(streams, "intact") | {
            "peak_open": max((o.get("peak_open", 0) for o in outputs), default=0)},
        "idle": idle_summary(idle, keepalive_s),
        "probe": probe_summary(probe["samples"], plan.ramp_s, plan.hold_s)
        | {"connects": probe["connects"]},
        "gateway": {"rss_peak_kib": max((s["rss_kib"] for s in samples), default=None),
                    "fds_peak": max((s["fds"] for s in samples), default=None),
                    "rss_end_kib": lt.rss_kib(servers["gateway"].pid),
                    "fds_end": descriptors(servers["gateway"].pid),
                    "by_phase": phase_peaks(samples, ("rss_kib", "fds", "cpu_pct"), plan.ramp_s,
                                            plan.hold_s),
                    "streams_open_samples": open_samples,
                    "streams_open_by_phase": phase_peaks(open_samples, ("open",), plan.ramp_s,
                                                         plan.hold_s),
                    "listener": limits, "samples": samples},
        "metrics_before": metrics0,
        "metrics_after": lt.metric_samples(port, ["shepherd_connections"]),
        "cpu_pct": cpu_pct,
        "drivers": [{"mode": s, "cpu_s": o["cpu_s"], "nofile": o["nofile"],
                     "max_rss_kib": o["max_rss_kib"]}
                    for s, o in zip(["probe", *(["streams"] if plan.streams else []),
                                     *["idle"] * (len(outputs) - 1 - bool(plan.streams))],
                                    outputs, strict=True)],
        "nofile": {"asked": fleet.nofile, "started_with": fleet.nofile_got},
        "nofile_here": resource.getrlimit(resource.RLIMIT_NOFILE),
        "ephemeral_ports": Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split(),
        "gateway_logs": lt.log_problems(fleet.log_dir, ["gateway"]),
        "gateway_config": servers["config"],
        "streams_failed": [r for r in streams if r["kind"].startswith("failed")][:20],
        "idle_records_sample": idle[:3],
    }


# -- the report


def fmt_kib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.0f} MiB"


def fmt_count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_lat(stats: dict[str, float] | None) -> str:
    return "-" if not stats else f"{stats['p50']:.1f} / {stats['p99']:.1f} / {stats['max']:.1f}"


def refusals(metrics: dict[str, float]) -> dict[str, float]:
    """``shepherd_connections_refused_total`` by reason."""
    prefix = 'shepherd_connections_refused_total{reason="'
    return {k[len(prefix):].split('"', 1)[0]: v for k, v in metrics.items() if k.startswith(prefix)}


def phase_rows(doc: dict[str, Any]) -> list[tuple[str, list[str]]]:
    gw, probe = doc["gateway"], doc["probe"]
    return [
        ("streams open (max)", [fmt_count(gw["streams_open_by_phase"][p]["open"])
                                for p in PHASE_NAMES]),
        ("gateway RSS (max)", [fmt_kib(gw["by_phase"][p]["rss_kib"]) for p in PHASE_NAMES]),
        ("gateway descriptors (max)", [fmt_count(gw["by_phase"][p]["fds"]) for p in PHASE_NAMES]),
        ("gateway CPU % (max 1 s)", [fmt_count(gw["by_phase"][p]["cpu_pct"]) for p in PHASE_NAMES]),
        ("side request p50/p99/max ms", [fmt_lat(probe["by_phase"][p]) for p in PHASE_NAMES]),
    ]


def outcome_lines(doc: dict[str, Any]) -> list[str]:
    s, i = doc["streams"], doc["idle"]
    lines = [
        f"streams: {s['attempted']:,} attempted, {s['good']:,} intact "
        f"({pct(s['good_pct'])} of attempted, {pct(s['good_pct_of_admitted'])} of admitted), "
        f"peak {s['peak_open']:,} open at once; {refusal_text(s)}; "
        f"{s['failed_after_admission']:,} failed after admission",
        f"idle: {i['attempted']:,} attempted, {i['accepted']:,} accepted; {refusal_text(i)}; "
        f"{i['failed_after_admission']:,} failed after admission",
    ]
    if closed := i["closed_after_s"]:
        lines.append(f"  accepted idle connections closed by the gateway: {i['closed_by_gateway']:,} "
                     f"after {closed['min']:.1f} / {closed['p50']:.1f} / {closed['max']:.1f} s "
                     f"idle (min/p50/max; keepalive_timeout), {i['closed_early']:,} early, "
                     f"{i['open_at_end']:,} still open at the end")
    for name, part in (("streams", s), ("idle", i)):
        for what, n in part["failures"].items():
            lines.append(f"  {name} {what} x{n}")
    p = doc["probe"]
    lines.append(f"side request (every {PROBE_INTERVAL_S * 1000:.0f} ms): {p['ok']}/{p['sent']} "
                 f"answered, p50/p99/max {fmt_lat(p['latency_ms'])} ms, {p['connects']} "
                 f"connection(s)" + (f"; not answered: {p['not_ok']}" if p["not_ok"] else ""))
    return lines


def nofile_text(nofile: dict[str, Any]) -> str:
    """How the harness set ``RLIMIT_NOFILE``: ``--nofile`` and any process that did not
    get it."""
    asked = nofile["asked"]
    if asked is None:
        return "inherited"
    kept: dict[str, list[str]] = {}
    for name, got in nofile["started_with"].items():
        if got is not None and tuple(got) != (asked, asked):
            kept.setdefault(f"{got[0]}/{got[1]}", []).append(name)
    if not kept:
        return f"--nofile {asked}"
    return f"--nofile {asked} not permitted: " + ", ".join(
        f"{', '.join(names)} kept {limits}" for limits, names in kept.items())


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


def refusal_text(part: dict[str, Any]) -> str:
    if not part["refused"]:
        return "0 refused"
    ms = part["refusal_ms"]
    fast = f", answered in p50/p99/max {fmt_lat(ms)} ms" if ms else ""
    return (f"{part['refused']:,} refused with 503 ({part['refused_with_retry_after']:,} with "
            f"retry-after; codes {part['refusal_codes']}{fast})")


def verdict(doc: dict[str, Any]) -> str:
    s = doc["streams"]
    broken = s["failed_after_admission"] + doc["idle"]["failed_after_admission"]
    failed = sum(n for k, n in s["kinds"].items() if k.startswith("failed"))
    retry = s["refused_with_retry_after"] == s["refused"]
    p99 = (s["refusal_ms"] or {}).get("p99", 0.0)
    fast = p99 <= lt.FAST_503_MS
    ok = broken == 0 and failed == 0 and retry and fast and s["good"] + s["refused"] == s["attempted"]
    retry_text = (f" ({'all' if retry else 'NOT all'} with retry-after, p99 {p99:,.0f} ms from "
                  f"connect: {'fast' if fast else 'SLOW'})") if s["refused"] else ""
    return (f"{'PASS' if ok else 'FAIL'}: {s['good']:,} of {s['attempted']:,} streams intact, "
            f"{s['refused']:,} refused with 503{retry_text}, {failed:,} failed "
            f"({broken:,} after admission) "
            f"(target: every stream intact, or refused with 503 + retry-after within "
            f"{lt.FAST_503_MS} ms)")


def connections_report(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    plan, gw = doc["plan"], doc["gateway"]
    lim = gw["listener"]
    print(f"Shepherd connections - 127.0.0.1, Python {platform.python_version()}, "
          f"{len(lt.ALL_CPUS)} CPUs; {lt.where_scenario(args)}")
    print(f"gateway: server.* defaults (max_connections {lim.get('max_connections')}, "
          f"keepalive_timeout {lim.get('keepalive_timeout_s')} s, header_timeout "
          f"{lim.get('header_timeout_s')} s, backlog {lim.get('backlog')}); RLIMIT_NOFILE "
          f"{lim.get('soft')}/{lim.get('hard')} ({nofile_text(doc['nofile'])}) -> client "
          f"connection cap {lim.get('fd_cap')}; "
          f"upstream 'streams' max_connections {plan['streams']:,} (fast mock), 'probe' "
          f"{PROBE_UPSTREAM_CONNECTIONS}")
    print(f"load: {plan['streams']:,} streams over {plan['ramp_s']:g} s ({plan['tokens']} tokens "
          f"x {plan['token_delay_ms']:g} ms = {plan['stream_s']:g} s each), then "
          f"{plan['idle']:,} idle keep-alive connections over {plan['ramp_s']:g} s (one GET "
          f"/healthz each, nothing re-sent), hold {plan['hold_s']:g} s, drain to "
          f"{plan['end_s']:g} s; drivers' RLIMIT_NOFILE {doc['drivers'][0]['nofile']}, "
          f"ephemeral ports {'-'.join(doc['ephemeral_ports'])}\n")
    print(lt.render(list(PHASE_NAMES), phase_rows(doc)), end="\n\n")
    for line in outcome_lines(doc):
        print(line)
    before, after = refusals(doc["metrics_before"]), refusals(doc["metrics_after"])
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
    print(f"/metrics shepherd_connections_refused_total by reason (this run): {delta or 0}; "
          f"gateway peak RSS {fmt_kib(gw['rss_peak_kib'])}, peak descriptors "
          f"{fmt_count(gw['fds_peak'])}; at the end {fmt_kib(gw['rss_end_kib'])}, "
          f"{fmt_count(gw['fds_end'])} descriptors")
    print(f"kernel listen queue (/proc/net/netstat, machine-wide, this run): {doc['listen_queue']}")
    print("CPU% " + ", ".join(f"{k} {v:.0f}" for k, v in doc["cpu_pct"].items()))
    for name, seen in doc["gateway_logs"].items():
        if seen:
            print(f"{name} log warnings/errors: "
                  + ", ".join(f"{m} x{n}" for m, n in sorted(seen.items())))
    print(verdict(doc))
    lt.scenario_json(args, doc)


if __name__ == "__main__":
    main()
