"""Logs and metrics.

Logs are JSON lines on stderr. A contextvar holds the request id and key name, so every log
line written while serving a request carries them without passing them around (structlog's
``contextvars`` habit). Logger names: ``proxy.access`` (one line per request), ``proxy.error``
(failures), ``proxy`` (lifecycle). Keys never appear in a log line: only key names do.

Metrics are Prometheus collectors in a registry per app, served at ``GET /metrics``. Every
label set is bounded: key name, model (``ModelLabels``), upstream, endpoint, status class;
never a request id. Request-level metrics (tokens, cost, time to first token, time per
output token, gateway overhead) are observed once per request from its usage-ledger row
(``Metrics.observe_row``), never per stream event.

With ``--workers N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before it starts the
workers: every worker's counters and histograms go to memory-mapped files there, and a scrape
served by any worker sums them all (prometheus-client's multiprocess mode). Gauges computed
at scrape time (``Metrics.watch``) are copied into multiprocess gauges every
``MIRROR_INTERVAL_S`` by each worker (``Metrics.mirror_forever``). One process keeps the
plain, faster in-memory collectors.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import logging.handlers
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.ledger import UsageRow

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
            "shepherd_streams_active", "SSE streams being served", registry=self.registry,
            multiprocess_mode="livesum",
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
        self._duration_children: dict[tuple[str, str], Any] = {}
        self.request_seconds = Histogram(
            "shepherd_request_seconds", "Request duration to last byte, by endpoint and status "
            "class", ["endpoint", "status_class"], registry=self.registry,
        )
        self._add_request_metrics()
        self.models = ModelLabels()
        #: Called with each row ``observe_row`` sees (``proxy.tracing`` exports spans).
        self.row_listeners: list[Callable[[UsageRow, RowTiming], None]] = []
        self._samplers: list[Callable[[], list[Sample]]] = []
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self._mirror: _GaugeMirror | None = None
        if self.multiprocess_dir is not None:
            self._mirror = _GaugeMirror(self.registry)

    def _add_request_metrics(self) -> None:
        """The collectors ``observe_row`` feeds: one observation set per request."""
        self.model_requests = Counter(
            "shepherd_model_requests", "Inference requests (HTTP and WebSocket) by model, "
            "upstream and status class", ["model", "upstream", "status_class"],
            registry=self.registry)
        self.tokens = Counter(
            "shepherd_tokens", "Tokens metered, by key, model and type (prompt, completion)",
            ["key", "model", "type"], registry=self.registry)
        self.cost_usd = Counter(
            "shepherd_cost_usd", "Cost in USD at models.<id>.price, by key and model",
            ["key", "model"], registry=self.registry)
        self.ttft_seconds = Histogram(
            "shepherd_time_to_first_token_seconds", "Streams: arrival to the first event",
            ["model", "upstream"], buckets=TTFT_BUCKETS_S, registry=self.registry)
        self.tpot_seconds = Histogram(
            "shepherd_time_per_output_token_seconds", "Streams: (last event - first event) / "
            "(completion tokens - 1)", ["model", "upstream"], buckets=TPOT_BUCKETS_S,
            registry=self.registry)
        self.overhead_seconds = Histogram(
            "shepherd_gateway_overhead_seconds", "Time the gateway itself added to a request "
            "(as x-shepherd-overhead-ms): arrival to sending the attempt that answered, plus "
            "(unary) answer to response ready", ["endpoint"], buckets=OVERHEAD_BUCKETS_S,
            registry=self.registry)
        self._row_children: dict[tuple[str, ...], Any] = {}

    def count_request(self, endpoint: str, key_name: str, status: int, elapsed_s: float) -> None:
        """``requests{endpoint, key, status} += 1`` and ``request_seconds{endpoint}`` observes
        ``elapsed_s``, reusing the labelled children (the hot path)."""
        labels = (endpoint, key_name, str(status))
        child = self._request_children.get(labels)
        if child is None:
            child = self._request_children[labels] = self.requests.labels(*labels)
        child.inc()
        duration_labels = (endpoint, status_class(status))
        histogram = self._duration_children.get(duration_labels)
        if histogram is None:
            histogram = self._duration_children[duration_labels] = \
                self.request_seconds.labels(*duration_labels)
        histogram.observe(elapsed_s)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached (``labels()`` takes a lock and builds a tuple)."""
        cache_key = (metric._name, *labels)
        child = self._row_children.get(cache_key)
        if child is None:
            child = self._row_children[cache_key] = metric.labels(*labels)
        return child

    def observe_row(self, row: UsageRow, timing: RowTiming | None = None) -> None:
        """Observe one finished inference request from its usage-ledger row (built whether
        or not the ledger is on): requests by model, tokens and cost by key and model, time
        to first token and per output token by model and upstream, gateway overhead by
        endpoint. Called once per request (never per event); then ``row_listeners``."""
        ok = 200 <= row.status < 400
        model = self.models.label(row.model, ok)
        upstream = row.upstream or "-"
        self._child(self.model_requests, model, upstream, status_class(row.status)).inc()
        if row.prompt_tokens:
            self._child(self.tokens, row.key_name, model, "prompt").inc(row.prompt_tokens)
        if row.completion_tokens:
            self._child(self.tokens, row.key_name, model, "completion").inc(row.completion_tokens)
        if row.cost_usd:
            self._child(self.cost_usd, row.key_name, model).inc(row.cost_usd)
        if row.ttft_ms is not None:
            self._child(self.ttft_seconds, model, upstream).observe(row.ttft_ms / 1000.0)
            tpot_s = time_per_output_token_s(row)
            if tpot_s is not None:
                self._child(self.tpot_seconds, model, upstream).observe(tpot_s)
        if row.overhead_ms is not None:
            self._child(self.overhead_seconds, row.endpoint).observe(row.overhead_ms / 1000.0)
        for listener in self.row_listeners:
            listener(row, timing or RowTiming())

    def exposition(self) -> bytes:
        """The Prometheus text of every metric: this process's registry, or, in
        multiprocess mode, every worker's files summed (scrape-time gauges of this worker
        copied first, the others' at most ``MIRROR_INTERVAL_S`` old)."""
        if self.multiprocess_dir is None or self._mirror is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        self.mirror_now()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=self.multiprocess_dir)
        return generate_latest(registry)

    def mirror_now(self) -> None:
        """Multiprocess mode: copy the scrape-time gauges into multiprocess gauges."""
        if self._mirror is not None:
            self._mirror.copy([sample for sampler in self._samplers for sample in sampler()])

    async def mirror_forever(self, interval_s: float = 1.0) -> None:
        """``mirror_now`` every ``interval_s`` seconds until cancelled (safe to cancel);
        returns at once in single-process mode."""
        if self._mirror is None:
            return
        while True:
            self.mirror_now()
            await asyncio.sleep(interval_s)

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
        """Export gauges computed at scrape time by ``samples`` (multiprocess mode: copied
        into multiprocess gauges, ``mirror_now``)."""
        self._samplers.append(samples)
        if self._mirror is None:
            self.registry.register(_CallbackCollector(samples))


#: A gauge sample computed at scrape time: (metric name, labels, value).
Sample = tuple[str, dict[str, str], float]

#: The response header that tells a client how long the gateway itself took, in
#: milliseconds: on a unary answer, all of it; on a stream (its headers go out with the first
#: event), the time from arrival to sending the attempt that answered.
OVERHEAD_HEADER = "x-shepherd-overhead-ms"


def overhead_value(overhead_ms: float) -> str:
    """``x-shepherd-overhead-ms``'s value: milliseconds with two decimals."""
    return f"{max(0.0, overhead_ms):.2f}"


#: The environment variable that turns prometheus-client's multiprocess mode on (set by the
#: ``--workers N`` supervisor, ``proxy.app``), naming the directory of its files.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds between two copies of a worker's scrape-time gauges in multiprocess mode.
MIRROR_INTERVAL_S = 1.0

#: Histogram buckets, in seconds: time to first token (a queued or thinking model takes
#: seconds), time per output token (tens of ms for most models), and the gateway's own
#: overhead (sub-millisecond when nothing waits).
TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
OVERHEAD_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                      0.5, 1.0, 2.5)

#: Scrape-time gauges summed over workers in multiprocess mode take ``livesum``; these take
#: ``livemax`` (an upstream ejected by any worker shows as ejected).
_MAX_GAUGES = frozenset({"shepherd_upstream_healthy", "shepherd_upstream_state"})


def status_class(status: int) -> str:
    """``2xx``…``5xx`` for an HTTP status (499, the client left, is ``4xx``); else ``other``."""
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


def time_per_output_token_s(row: UsageRow) -> float | None:
    """A stream's seconds per output token after the first: (end - first event) /
    (completion tokens - 1); ``None`` for fewer than two tokens or no first event."""
    if row.ttft_ms is None or row.latency_ms is None or not row.completion_tokens \
            or row.completion_tokens < 2:
        return None
    return max(0.0, row.latency_ms - row.ttft_ms) / 1000.0 / (row.completion_tokens - 1)


@dataclass(frozen=True, slots=True)
class RowTiming:
    """What a usage row does not hold, for traces: ``attempt_s``, the upstream attempt
    that answered as (start, end) seconds after the request arrived (``None``: none);
    ``response_model``: the model the upstream said answered (``None``: not seen)."""

    attempt_s: tuple[float, float] | None = None
    response_model: str | None = None


class ModelLabels:
    """Bounded ``model`` label values: ids the config names (``models:`` and exact entries of
    ``upstreams.*.models``) always; up to ``max_extra`` others once an upstream answered them
    successfully (with ``models: ["*"]`` any id reaches an upstream); everything else
    ``other``. ``-`` when the request named no model."""

    def __init__(self, known: Iterable[str] = (), max_extra: int = 100) -> None:
        self._known = set(known)
        self._extra: set[str] = set()
        self._max_extra = max_extra

    def __repr__(self) -> str:
        return f"<ModelLabels [{len(self._known)} known, {len(self._extra)}/{self._max_extra} seen]>"

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelLabels:
        exact = {m for cfg in settings.upstreams.values() for m in cfg.models
                 if not any(c in m for c in "*?[")}
        return cls(set(settings.models) | exact, settings.observability.max_model_labels)

    def label(self, model: str | None, ok: bool) -> str:
        """The label for ``model``; ``ok``: the upstream answered it (it may be admitted)."""
        if model is None:
            return "-"
        if model in self._known or model in self._extra:
            return model
        if ok and len(self._extra) < self._max_extra:
            self._extra.add(model)
            return model
        return "other"


class _GaugeMirror:
    """Multiprocess mode: scrape-time samples written into multiprocess gauges (one per
    metric name, ``livesum`` or ``livemax``). A label set that stops being reported is set
    to 0 (multiprocess files cannot forget a series)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._gauges: dict[str, Gauge] = {}
        self._last: set[tuple[str, tuple[str, ...]]] = set()

    def copy(self, samples: list[Sample]) -> None:
        seen: set[tuple[str, tuple[str, ...]]] = set()
        for name, labels, value in samples:
            gauge = self._gauge(name, tuple(labels))
            values = tuple(labels.values())
            (gauge.labels(*values) if values else gauge).set(value)
            seen.add((name, values))
        for name, values in self._last - seen:
            gauge = self._gauges[name]
            (gauge.labels(*values) if values else gauge).set(0.0)
        self._last = seen

    def _gauge(self, name: str, label_names: tuple[str, ...]) -> Gauge:
        gauge = self._gauges.get(name)
        if gauge is None:
            gauge = self._gauges[name] = Gauge(
                name, name.replace("_", " "), list(label_names), registry=None,
                multiprocess_mode="livemax" if name in _MAX_GAUGES else "livesum")
        return gauge


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
