"""Each request's usage-ledger row, built on the request path (DESIGN §3 "ledger.record").

``pipeline`` calls these where a request ends: ``record_failure`` for a refusal before any
token (400/404/429/503, or 499 when the client left first), ``record_unary`` when a unary
answer is ready (or failed), and ``record_stream`` from the producer task when a stream ends
— whether or not a client is still reading, so a detached stream gets its row with the
usage as finally metered. A ``Trace`` collects what the row learns on the way. Every row
is observed by the metrics (and traces) once (``Metrics.observe_row``: tokens, cost, time to
first token, overhead), and queued for the ledger only when it is on
(``UsageHost.ledger.enabled``). Everything here is synchronous: a row is queued
(``Ledger.record``), never written on the request path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from proxy.config import Settings
from proxy.errors import GatewayError
from proxy.ledger import UsageRow, UsageSink
from proxy.observability import CLIENT_CLOSED, Metrics, RowTiming, new_request_id, request_context
from proxy.relay import StreamJob
from proxy.streams import StreamState


class Prices(Protocol):
    """What a row's cost needs: ``limits.DemandBuilder``."""

    def cost_usd(self, model: str, prompt_tokens: int, completion_tokens: int) -> float: ...


class UsageHost(Protocol):
    """What recording needs of ``pipeline.Gateway``."""

    @property
    def ledger(self) -> UsageSink: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def demands(self) -> Prices: ...

    @property
    def ledger_streams(self) -> dict[str, Trace]: ...

    @property
    def metrics(self) -> Metrics: ...


@dataclass(slots=True)
class Trace:
    """What one request's ledger row learns on the way (built only with the ledger on).

    Attributes:
        started_at: ``time.perf_counter()`` when the request arrived (its ``RequestContext``).
        request_id, key_name, endpoint, transport: as in ``UsageRow``.
        model, stream_id, upstream: learnt on the way, else ``None``.
        sent_at, answered_at: when the unary attempt that answered was sent and answered.
        resumes: readers that re-attached to its stream.
        overhead_ms: the unary answer's gateway overhead once recorded (its
            ``x-shepherd-overhead-ms`` header), else ``None``.
        response_model: the model the upstream's answer names, if seen.
    """

    started_at: float
    request_id: str
    key_name: str
    endpoint: str
    transport: str
    model: str | None = None
    stream_id: str | None = None
    upstream: str | None = None
    sent_at: float | None = None
    answered_at: float | None = None
    resumes: int = 0
    overhead_ms: float | None = None
    response_model: str | None = None

    @classmethod
    def begin(cls, key_name: str, endpoint: str) -> Trace:
        """The trace of a request by ``key_name`` to ``endpoint`` (its label), timed and
        named from the request context (a fresh id and now when there is none)."""
        ctx = request_context.get()
        if ctx is None:
            return cls(time.perf_counter(), new_request_id(), key_name, endpoint, "http")
        return cls(ctx.started_at, ctx.request_id, key_name, endpoint, ctx.transport)

    def row(self, status: int, error_code: str | None, now: float) -> UsageRow:
        """A row ending at ``now`` (``perf_counter``) with these fields; tokens, cost and
        the stream timings are filled in by the caller."""
        elapsed_s = now - self.started_at
        return UsageRow(time.time() - elapsed_s, self.request_id, self.key_name, self.endpoint,
                        self.transport, status, error_code, self.model, self.upstream, self.stream_id,
                        latency_ms=_ms(elapsed_s), resumes=self.resumes)


def _ms(seconds: float) -> float:
    return seconds * 1000.0  # not rounded here: round() on a float costs a dtoa (queries round)


def _status_of(error: BaseException) -> tuple[int, str | None]:
    if isinstance(error, GatewayError):
        return error.http_status, error.code
    return CLIENT_CLOSED, "client_closed"


def record_failure(gateway: UsageHost, trace: Trace | None, error: BaseException) -> None:
    """The row of a request refused or abandoned before any token was generated: the
    error's status and code (``CLIENT_CLOSED`` when cancelled), no tokens."""
    if trace is None:
        return
    status, code = _status_of(error)
    row = trace.row(status, code, time.perf_counter())
    row.prompt_tokens = row.completion_tokens = row.total_tokens = 0
    _finish(gateway, row)


def _finish(gateway: UsageHost, row: UsageRow, timing: RowTiming | None = None) -> None:
    """Metrics and traces observe the row (``Metrics.observe_row``); the ledger keeps it
    when it is on."""
    gateway.metrics.observe_row(row, timing)
    if gateway.ledger.enabled:
        gateway.ledger.record(row)


def _charge_row(gateway: UsageHost, row: UsageRow, counts: tuple[int, int] | None) -> None:
    """Tokens and their price (``models.<id>.price``; ``None`` when unpriced) on ``row``."""
    if counts is None:
        return
    row.prompt_tokens, row.completion_tokens = counts
    row.total_tokens = counts[0] + counts[1]
    model_cfg = gateway.settings.models.get(row.model) if row.model is not None else None
    if model_cfg is not None and model_cfg.price is not None and row.model is not None:
        row.cost_usd = gateway.demands.cost_usd(row.model, *counts)


def record_unary(gateway: UsageHost, trace: Trace | None, status: int, error: BaseException | None,
                 counts: tuple[int, int] | None) -> None:
    """The row of a unary request as it ends: ``status`` (or ``error``'s), the metered
    ``counts``; overhead is the time outside the attempt that answered."""
    if trace is None:
        return
    now = time.perf_counter()
    code: str | None = None
    if error is not None:
        status, code = _status_of(error)
    row = trace.row(status, code, now)
    _charge_row(gateway, row, counts)
    attempt: tuple[float, float] | None = None
    if trace.sent_at is not None and trace.answered_at is not None:
        attempt = (trace.sent_at - trace.started_at, trace.answered_at - trace.started_at)
        if error is None:
            row.overhead_ms = trace.overhead_ms = _ms(
                (now - trace.started_at) - (trace.answered_at - trace.sent_at))
    _finish(gateway, row, RowTiming(attempt, trace.response_model))


def record_stream(gateway: UsageHost, trace: Trace | None, job: StreamJob,
                  counts: tuple[int, int] | None) -> None:
    """The row of a stream when its producer ends (whether or not a client is still
    reading): 200 if it ended normally, else the status and code of the error it ended
    with; ``ttft_ms`` to its first event; overhead from arrival to sending the attempt
    that produced it."""
    if trace is None:
        return
    gateway.ledger_streams.pop(job.log.stream_id, None)
    log, metering = job.log, job.metering
    status, code = 200, None
    if log.state is StreamState.FAILED:
        status, code = _status_of(log.failure) if log.failure is not None else (500, None)
    if job.upstream is not None:
        trace.upstream = job.upstream.name
    row = trace.row(status, code, time.perf_counter())
    _charge_row(gateway, row, counts)
    if metering.first_event_at is not None:
        row.ttft_ms = _ms(metering.first_event_at - trace.started_at)
        if metering.sent_at is not None:
            row.overhead_ms = _ms(metering.sent_at - trace.started_at)
    attempt = None if metering.sent_at is None else \
        (metering.sent_at - trace.started_at, (row.latency_ms or 0.0) / 1000.0)
    _finish(gateway, row, RowTiming(attempt, metering.model))


def count_resume(gateway: UsageHost, stream_id: str) -> None:
    trace = gateway.ledger_streams.get(stream_id)
    if trace is not None:
        trace.resumes += 1
