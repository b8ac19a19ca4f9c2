"""Optional OpenTelemetry traces: one span per inference request, exported over OTLP/HTTP
when ``observability.otlp_endpoint`` is set (the ``otel`` extra: ``opentelemetry-sdk`` and
``opentelemetry-exporter-otlp-proto-http``, imported only then, so the gateway runs
without them).

Spans follow the OpenTelemetry GenAI semantic conventions
(https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/): the span is named
``{gen_ai.operation.name} {gen_ai.request.model}`` and carries ``gen_ai.operation.name``,
``gen_ai.system`` (and its newer name ``gen_ai.provider.name``; the gateway speaks the
OpenAI API), ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``, ``server.address`` and
``server.port`` of the upstream, ``http.response.status_code``, ``error.type`` when it
failed, and ``shepherd.*`` (key name, upstream, endpoint, transport, request and stream id,
time to first token, gateway overhead, cost). The upstream attempt that answered is a child
span (``CLIENT``) from sending it to its answer (unary) or the stream's end.

A span is built from the request's usage-ledger row when the request ends
(``Metrics.row_listeners``), with the start and end times it had: nothing is held open
across the request and nothing runs per stream event. The SDK's ``BatchSpanProcessor``
exports from its own thread, off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from proxy.config import Settings
from proxy.ledger import UsageRow
from proxy.observability import Metrics, RowTiming, log

#: ``gen_ai.operation.name`` of each endpoint (GenAI semantic conventions' well-known values).
OPERATIONS = {"chat.completions": "chat", "completions": "text_completion",
              "embeddings": "embeddings", "responses": "chat"}

#: How long the exporter batches spans before a send, in milliseconds.
EXPORT_DELAY_MS = 1000

#: Tests may set this to a ``SpanExporter`` (e.g. the SDK's ``InMemorySpanExporter``) to be
#: used instead of the OTLP exporter, with or without ``otlp_endpoint``.
exporter_override: Any = None


class RowTracer:
    """Turns usage rows into spans on ``provider`` (an SDK ``TracerProvider``)."""

    def __init__(self, provider: Any, settings: Callable[[], Settings]) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("proxy")
        self._settings = settings

    def __repr__(self) -> str:
        return f"<RowTracer {self._provider!r}>"

    def export(self, row: UsageRow, timing: RowTiming) -> None:
        """One span (and its attempt's child span) for ``row``; never raises."""
        try:
            self._export(row, timing)
        except Exception:  # tracing must never break the request path
            log.exception("span export failed")

    def _export(self, row: UsageRow, timing: RowTiming) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        start_ns = int(row.ts * 1e9)
        end_ns = start_ns + int((row.latency_ms or 0.0) * 1e6)
        attributes = self.attributes(row, timing)
        operation = str(attributes["gen_ai.operation.name"])
        span = self._tracer.start_span(f"{operation} {row.model or ''}".strip(), kind=SpanKind.SERVER,
                                       start_time=start_ns, attributes=attributes)
        if row.status >= 500:
            span.set_status(Status(StatusCode.ERROR, row.error_code or str(row.status)))
        if timing.attempt_s is not None and row.upstream is not None:
            sent_s, done_s = timing.attempt_s
            child = self._tracer.start_span(
                f"{operation} {row.upstream}", context=trace.set_span_in_context(span),
                kind=SpanKind.CLIENT, start_time=start_ns + int(sent_s * 1e9),
                attributes={k: v for k, v in attributes.items() if k.startswith(("gen_ai.", "server."))})
            child.end(end_time=start_ns + int(done_s * 1e9))
        span.end(end_time=end_ns)

    def attributes(self, row: UsageRow, timing: RowTiming) -> dict[str, str | int | float]:
        """The span attributes of ``row`` (GenAI semantic conventions and ``shepherd.*``)."""
        out: dict[str, str | int | float] = {
            "gen_ai.operation.name": OPERATIONS.get(row.endpoint, row.endpoint),
            "gen_ai.system": "openai", "gen_ai.provider.name": "openai",
            "http.response.status_code": row.status,
            "shepherd.key": row.key_name, "shepherd.endpoint": row.endpoint,
            "shepherd.transport": row.transport, "shepherd.request_id": row.request_id,
        }
        optional: dict[str, str | int | float | None] = {
            "gen_ai.request.model": row.model, "gen_ai.response.model": timing.response_model,
            "gen_ai.usage.input_tokens": row.prompt_tokens,
            "gen_ai.usage.output_tokens": row.completion_tokens,
            "error.type": row.error_code if row.status >= 400 else None,
            "shepherd.upstream": row.upstream, "shepherd.stream_id": row.stream_id,
            "shepherd.ttft_ms": row.ttft_ms, "shepherd.overhead_ms": row.overhead_ms,
            "shepherd.cost_usd": row.cost_usd,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        upstream = self._settings().upstreams.get(row.upstream) if row.upstream else None
        if upstream is not None:
            url = urlsplit(str(upstream.base_url))
            if url.hostname:
                out["server.address"] = url.hostname
                out["server.port"] = url.port or (443 if url.scheme == "https" else 80)
        return out

    async def close(self) -> None:
        """Export what is batched and stop (in a thread: the SDK's shutdown blocks)."""
        await asyncio.to_thread(self._provider.shutdown)


def start(settings: Callable[[], Settings], metrics: Metrics) -> RowTracer | None:
    """Start exporting a span per request to ``observability.otlp_endpoint`` (or to
    ``exporter_override``); ``None`` when traces are off, or when the ``otel`` extra is
    not installed (logged)."""
    config = settings().observability
    if config.otlp_endpoint is None and exporter_override is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("observability.otlp_endpoint is set but OpenTelemetry is not installed "
                    "(pip install 'shepherd-gateway[otel]'); no traces")
        return None
    exporter = exporter_override
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
    tracer = RowTracer(provider, settings)
    metrics.row_listeners.append(tracer.export)
    log.info("exporting traces", extra={"otlp_endpoint": config.otlp_endpoint})
    return tracer
