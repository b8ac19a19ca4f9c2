"""Logs and metrics.

Logs are JSON lines on stderr. A contextvar holds the request id and key name, so every log
line written while serving a request carries them without passing them around (structlog's
``contextvars`` habit). Logger names: ``proxy.access`` (one line per request), ``proxy.error``
(failures), ``proxy`` (lifecycle). Keys never appear in a log line: only key names do.

Metrics are Prometheus collectors in a registry per app, served at ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import logging.handlers
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: The request id and key name of the request being served, or ``None`` outside requests.
request_context: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "shepherd_request", default=None
)

#: The status an access-log line shows for a request whose client left before its answer
#: was complete (nginx's 499 "client closed request").
CLIENT_CLOSED = 499

access_log = logging.getLogger("proxy.access")
error_log = logging.getLogger("proxy.error")
log = logging.getLogger("proxy")


@dataclass(slots=True)
class RequestContext:
    """Per-request facts for logs: ``request_id`` (``req_…``), then what is learnt on the way."""

    request_id: str
    key_name: str | None = None
    model: str | None = None
    upstream: str | None = None
    stream_id: str | None = None
    usage: dict[str, object] | None = None
    client_closed: bool = False
    started_at: float = field(default_factory=time.perf_counter)
    transport: str = "http"  # or "websocket" (the usage ledger's transport column)


def new_request_id() -> str:
    """``req_`` + 24 hex characters (96 random bits; unique, not secret, so no syscall)."""
    return f"req_{random.getrandbits(96):024x}"


class RequestContextFilter(logging.Filter):
    """Stamps ``request_id`` and ``key`` (the key's name) of the current request on each
    record when it is logged, so buffered records keep them when formatted later."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = request_context.get()
        if ctx is not None:
            record.request_id = ctx.request_id
            if ctx.key_name is not None:
                record.key = ctx.key_name
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the request context and ``extra``."""

    _STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if not hasattr(record, "request_id"):  # not stamped by RequestContextFilter
            RequestContextFilter().filter(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):  # the access log's fast path: one attribute, no scan
            out["request_id"] = getattr(record, "request_id", None)
            if hasattr(record, "key"):
                out["key"] = record.key
            out.update(fields)
        else:
            out.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


#: Records buffered before a write; warnings and errors are written at once. The app's
#: ``flush_logs_periodically`` task writes the buffer every ``LOG_FLUSH_INTERVAL_S``.
LOG_BUFFER_RECORDS = 256
LOG_FLUSH_INTERVAL_S = 0.5


def configure_logging(level: str = "INFO") -> None:
    """Send ``proxy.*`` logs as JSON lines to stderr (idempotent).

    Lines are buffered (``logging.handlers.MemoryHandler``) so a busy gateway makes one
    write per batch instead of one per request; a line waits at most
    ``LOG_FLUSH_INTERVAL_S`` while ``flush_logs_periodically`` runs, and WARNING and above
    flush the buffer at once.
    """
    root = logging.getLogger("proxy")
    if any(isinstance(h, _BufferedHandler) for h in root.handlers):
        return
    stream = _BatchWriter(sys.stderr)
    stream.setFormatter(JSONFormatter())
    buffered = _BufferedHandler(LOG_BUFFER_RECORDS, logging.WARNING, stream)
    buffered.addFilter(RequestContextFilter())
    root.addHandler(buffered)
    root.setLevel(level)
    root.propagate = False


class _BufferedHandler(logging.handlers.MemoryHandler):
    """The gateway's buffered handler: on flush its target gets every record, then writes
    them all at once."""

    def flush(self) -> None:
        super().flush()
        if self.target is not None:
            self.target.flush()


class _BatchWriter(logging.Handler):
    """Formats records as they come and writes the lines of a batch in one ``write`` call
    when flushed (``logging.StreamHandler`` writes and flushes every record on its own)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
        except Exception:  # logging must never break the request path
            self.handleError(record)

    def flush(self) -> None:
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: drop, never raise into the app
            pass


def flush_logs() -> None:
    """Write every buffered log line now."""
    for handler in logging.getLogger("proxy").handlers:
        handler.flush()


async def flush_logs_periodically(interval_s: float = LOG_FLUSH_INTERVAL_S) -> None:
    """Flush buffered logs every ``interval_s`` seconds until cancelled (safe to cancel)."""
    try:
        while True:
            await asyncio.sleep(interval_s)
            flush_logs()
    finally:
        flush_logs()


class Metrics:
    """The gateway's Prometheus collectors, in their own registry (one per app).

    Attributes:
        requests: requests answered, by endpoint, key name and HTTP status.
        upstream_errors: upstream failures by upstream and kind (the error code: e.g.
            ``upstream_connection_error``, ``upstream_timeout``, ``upstream_error``).
        streams_active: SSE streams being served now.
        client_disconnects: streams whose client went away before the end.
        streams_started: streamed requests that started a stream log.
        stream_resumes: readers attached to an existing stream (resume, EventSource,
            Idempotency-Key), by ``where`` the log was: ``local`` or ``remote``.
        stream_detach_cancels: streams cancelled because nobody re-attached within
            ``streams.detach_timeout``.
        stream_store_errors: Redis stream-log operations that failed (the stream went on
            in-process).
        idempotent_replays: requests answered from what an earlier request with the same
            ``Idempotency-Key`` started.
        request_seconds: time from request to last byte, by endpoint.
        connections_refused: client connections the listener refused or closed early, by
            ``reason`` (``proxy.listener``).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "shepherd_requests", "Requests answered", ["endpoint", "key", "status"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "shepherd_upstream_errors", "Upstream failures", ["upstream", "kind"],
            registry=self.registry,
        )
        self.streams_active = Gauge(
            "shepherd_streams_active", "SSE streams being served", registry=self.registry
        )
        self.client_disconnects = Counter(
            "shepherd_client_disconnects", "Streams whose client left before the end",
            registry=self.registry,
        )
        self.streams_started = Counter(
            "shepherd_streams_started", "Streamed requests that started a stream log",
            registry=self.registry)
        self.stream_resumes = Counter(
            "shepherd_stream_resumes", "Readers attached to an existing stream", ["where"],
            registry=self.registry)
        self.stream_detach_cancels = Counter(
            "shepherd_stream_detach_cancels", "Streams cancelled because nobody re-attached "
            "within streams.detach_timeout", registry=self.registry)
        self.stream_store_errors = Counter(
            "shepherd_stream_store_errors", "Redis stream-log operations that failed (the "
            "stream went on in-process)", registry=self.registry)
        self.idempotent_replays = Counter(
            "shepherd_idempotent_replays", "Requests answered from an earlier request with "
            "the same Idempotency-Key", registry=self.registry)
        self.limit_store_fallbacks = Counter(
            "shepherd_limit_store_fallbacks", "Limit checks answered by per-process limits "
            "because Redis was unavailable", registry=self.registry,
        )
        self.limit_block_admissions = Counter(
            "shepherd_limit_block_admissions", "Limited requests admitted from a block of "
            "quota taken from Redis earlier, without a Redis round trip of their own",
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "shepherd_rate_limited", "Requests refused by a key's limits", ["key", "reason"],
            registry=self.registry,
        )
        self.retries = Counter("shepherd_retries", "Retries after a failed attempt", ["upstream", "reason"],
                               registry=self.registry)
        self.ejections = Counter("shepherd_upstream_ejections", "Outlier ejections", ["upstream"],
                                 registry=self.registry)
        self.retry_budget_exhausted = Counter(
            "shepherd_retry_budget_exhausted", "Retries refused by the retry budget", registry=self.registry)
        self.lb_panics = Counter(
            "shepherd_lb_panic", "Times a model's routing entered panic (below "
            "routing.panic_threshold_percent healthy: ejected deployments take traffic too), "
            "by its deployments", ["upstreams"], registry=self.registry)
        self.queue_overflows = Counter(
            "shepherd_queue_overflows", "Requests refused with 503: queue full or deadline passed",
            ["upstreams"], registry=self.registry)
        self.connections_refused = Counter(
            "shepherd_connections_refused", "Client connections refused or closed early by the "
            "listener, by reason: max_connections, file_descriptors, header_timeout, "
            "malformed_request", ["reason"], registry=self.registry)
        self.ledger_rows_written = Counter(
            "shepherd_ledger_rows_written", "Usage ledger rows written to the database",
            registry=self.registry)
        self.ledger_rows_dropped = Counter(
            "shepherd_ledger_rows_dropped", "Usage ledger rows lost: the buffer (ledger.buffer_rows) "
            "was full, or rows were still unwritten when shutdown ended", registry=self.registry)
        self.ledger_write_errors = Counter(
            "shepherd_ledger_write_errors", "Usage ledger batches that failed to write (kept and "
            "retried)", registry=self.registry)
        self._request_children: dict[tuple[str, str, str], Any] = {}
        self._duration_children: dict[str, Any] = {}
        self.request_seconds = Histogram(
            "shepherd_request_seconds", "Request duration to last byte", ["endpoint"],
            registry=self.registry,
        )

    def count_request(self, endpoint: str, key_name: str, status: int, elapsed_s: float) -> None:
        """``requests{endpoint, key, status} += 1`` and ``request_seconds{endpoint}`` observes
        ``elapsed_s``, reusing the labelled children (the hot path)."""
        labels = (endpoint, key_name, str(status))
        child = self._request_children.get(labels)
        if child is None:
            child = self._request_children[labels] = self.requests.labels(*labels)
        child.inc()
        histogram = self._duration_children.get(endpoint)
        if histogram is None:
            histogram = self._duration_children[endpoint] = self.request_seconds.labels(endpoint)
        histogram.observe(elapsed_s)

    def count_upstream_error(self, upstream: str, kind: str) -> None:
        """``upstream_errors{upstream, kind} += 1``."""
        self.upstream_errors.labels(upstream, kind).inc()

    def count_retry(self, upstream: str, reason: str) -> None:
        """A retry after a failed attempt on ``upstream``."""
        self.retries.labels(upstream, reason).inc()

    def count_ejection(self, upstream: str) -> None:
        """``upstream`` was ejected by outlier detection."""
        self.ejections.labels(upstream).inc()

    def count_retry_budget_exhausted(self) -> None:
        """A retry was refused by the retry budget."""
        self.retry_budget_exhausted.inc()

    def count_panic(self, model: str, upstreams: tuple[str, ...]) -> None:
        """A model's routing entered panic; labelled by its deployments (model ids are
        unbounded with ``models: ["*"]``)."""
        self.lb_panics.labels(",".join(upstreams)).inc()

    def count_queue_overflow(self, upstreams: str) -> None:
        """A request was refused with 503: queue full or deadline passed."""
        self.queue_overflows.labels(upstreams).inc()

    def watch(self, samples: Callable[[], list[Sample]]) -> None:
        """Export gauges computed at scrape time by ``samples``."""
        self.registry.register(_CallbackCollector(samples))


#: A gauge sample computed at scrape time: (metric name, labels, value).
Sample = tuple[str, dict[str, str], float]


class _CallbackCollector(Collector):
    """Turns ``samples()`` into gauge families at each scrape (prometheus-client custom
    collector)."""

    def __init__(self, samples: Callable[[], list[Sample]]) -> None:
        self._samples = samples

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily] = {}
        for name, labels, value in self._samples():
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, name.replace("_", " "),
                                                            labels=list(labels))
            family.add_metric(list(labels.values()), value)
        yield from families.values()


def log_access(metrics: Metrics, enabled: bool, method: str, path: str, endpoint: str,
               status: int, ctx: RequestContext, elapsed_s: float) -> None:
    """Count one finished request (``Metrics.count_request``) and, when ``enabled``
    (``server.access_log``), write its access-log line: method, path, status, latency and
    what the request context learnt (model, upstream, stream id, token counts). ``endpoint``
    is the route's canonical path (a bounded label); 499 means the client left."""
    metrics.count_request(endpoint, ctx.key_name or "-", status, elapsed_s)
    if not enabled:
        return
    fields: dict[str, object] = {
        "method": method, "path": path, "status": status, "latency_ms": round(elapsed_s * 1000, 2),
    }
    for name in ("model", "upstream", "stream_id"):
        if (value := getattr(ctx, name)) is not None:
            fields[name] = value
    if ctx.usage is not None:
        fields["prompt_tokens"] = ctx.usage.get("prompt_tokens", ctx.usage.get("input_tokens"))
        fields["completion_tokens"] = ctx.usage.get("completion_tokens",
                                                    ctx.usage.get("output_tokens"))
    access_log.info("request", extra={"fields": fields})
