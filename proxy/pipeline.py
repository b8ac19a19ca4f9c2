"""One request, transport-neutral, top to bottom as DESIGN §3.

``run(gateway, call)`` takes plain values (the caller's principal, the endpoint, the body
bytes and the headers) and returns an ``Answer``: a whole ``UnaryAnswer`` or a
``StreamAnswer`` whose ``reader`` follows the stream log by cursor. The HTTP handlers, the
resume handlers and the WebSocket endpoints are thin adapters that turn their transport into
a ``Call`` and write the ``Answer`` back; ``GatewayError`` is raised for every refusal
before the first byte, with its HTTP meaning (``proxy.errors``)::

    parse body once → route (model allowed, deployments exist) → Idempotency-Key replay?
    → acquire limits (429) → admit + dispatch (503 queue; retries/failover before the
    first byte) → unary: answer | stream: producer task (owned by the StreamRegistry)
    → stream log → reader → settle limits (always, with the usage metered)

Resuming (``resume``, ``resume_response``) attaches a new reader to an existing log, here
or, with ``state.backend: redis``, on another instance (DESIGN §4 "Reconnection").
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from proxy.admission import Admission
from proxy.auth import KeyStore, Principal
from proxy.balancer import Balancer
from proxy.config import Settings
from proxy.errors import GatewayError, RateLimitError, UpstreamStatusError
from proxy.ledger import NullLedger, UsageSink
from proxy.limits import (
    DemandBuilder,
    Lease,
    Limiter,
    completion_reserve,
    estimate_prompt_tokens,
    usage_counts,
)
from proxy.observability import OVERHEAD_HEADER, Metrics, overhead_value, request_context
from proxy.relay import (
    Dispatcher,
    Endpoint,
    InferenceRequest,
    Metering,
    Route,
    StreamJob,
    UnaryResult,
    parse_inference,
    produce_stream,
    send_unary,
)
from proxy.sockets import SocketRegistry
from proxy.streams import (
    StreamCancelledError,
    StreamLog,
    StreamNotFoundError,
    StreamReader,
    StreamRegistry,
    StreamState,
    StreamTrimmedError,
    UnaryAnswer,
    nothing_left,
)
from proxy.upstream import Headers, Upstream, response_headers
from proxy.usage import Trace, count_resume, record_failure, record_stream, record_unary


class StreamCursor(Protocol):
    """A reader of one stream, local (``streams.StreamReader``) or on another instance
    (``streams_redis.RemoteStreamReader``): what an adapter writes from."""

    @property
    def stream_id(self) -> str: ...

    after_seq: int

    async def next(self, timeout_s: float) -> list[bytes] | None: ...

    def close(self) -> None: ...


class RemoteStreamInfo(Protocol):
    """What another instance's store knows of a stream (``streams_redis.RemoteStreamInfo``)."""

    @property
    def owner(self) -> str: ...

    @property
    def state(self) -> StreamState: ...

    @property
    def first_seq(self) -> int: ...

    @property
    def last_seq(self) -> int: ...

    @property
    def headers(self) -> dict[str, str]: ...

    @property
    def error_status(self) -> int | None: ...

    @property
    def error_body(self) -> dict[str, Any] | None: ...


class RemoteStreamSource(Protocol):
    """The cross-instance stream store as the pipeline uses it
    (``streams_redis.RedisStreamStore``)."""

    def mirror(self, log: StreamLog, on_cancel: Callable[[], None]) -> object: ...

    async def info(self, stream_id: str) -> RemoteStreamInfo | None: ...

    def reader(self, info: Any, after_seq: int) -> StreamCursor: ...

    async def find_response(self, response_id: str) -> str | None: ...

    async def cancel(self, stream_id: str) -> bool: ...


@dataclass(slots=True)
class Gateway:
    """Everything a request needs, shared by every adapter (stored on the app under
    ``http_api.GATEWAY``).

    Attributes:
        settings: the validated config.
        keys: virtual keys.
        balancer: model → deployment.
        upstreams: upstream name → its pooled client.
        limiter: per-key limits (memory or Redis).
        demands: builds each request's limit demand from config.
        admission: in-flight slots and wait queues per upstream.
        dispatcher: attempts, retries and failover.
        streams: stream logs of this process and their producer tasks.
        metrics: Prometheus collectors.
        remote_streams: the Redis stream store (``state.backend: redis``), else ``None``.
        sockets: the WebSockets open in this process (per-key cap, drain).
        draining: set on shutdown; ``/readyz`` answers 503 from then on.
        ledger: where each request's ``UsageRow`` goes (``NullLedger``: none is built).
        ledger_streams: the ``Trace`` of each stream this process produces, by stream id,
            while it runs (resumes are counted on it).
    """

    settings: Settings
    keys: KeyStore
    balancer: Balancer
    upstreams: dict[str, Upstream]
    limiter: Limiter
    demands: DemandBuilder
    admission: Admission
    dispatcher: Dispatcher
    streams: StreamRegistry = field(default_factory=StreamRegistry)
    metrics: Metrics = field(default_factory=Metrics)
    remote_streams: RemoteStreamSource | None = None
    sockets: SocketRegistry = field(default_factory=SocketRegistry)
    draining: bool = False
    ledger: UsageSink = field(default_factory=NullLedger)
    ledger_streams: dict[str, Trace] = field(default_factory=dict)

    def busy(self) -> bool:
        """Whether any request holds an upstream slot or any stream is still generating."""
        return any(self.admission.in_flight(name) for name in self.upstreams) or self.streams.running > 0


#: Where the app keeps its ``Gateway`` (``app[GATEWAY]``), for every adapter.
GATEWAY = web.AppKey("gateway", Gateway)


@dataclass(frozen=True, slots=True)
class Call:
    """One request as every transport hands it over.

    Attributes:
        principal: the authenticated caller.
        endpoint: the inference endpoint.
        body: the request body, as received.
        headers: the client's headers (filtered before they go upstream).
        idempotency_key: the ``Idempotency-Key`` header, or ``None``.
    """

    principal: Principal
    endpoint: Endpoint
    body: bytes
    headers: Headers
    idempotency_key: str | None = None


@dataclass(slots=True)
class StreamAnswer:
    """A stream to write: ``reader`` yields encoded frames after its cursor (the adapter
    adds ``id: <stream_id>:<seq>``); ``headers`` go on the response (``X-Stream-Id``,
    ``x-ratelimit-*``); ``metering`` is what the producer metered (for the access log),
    ``None`` when this process does not run the producer."""

    reader: StreamCursor
    headers: dict[str, str]
    metering: Metering | None = None


Answer = UnaryAnswer | StreamAnswer


@dataclass(slots=True)
class Charge:
    """What a request reserved and how it is settled.

    Attributes:
        prompt_estimate: prompt tokens estimated from the body size.
        completion_reserve: completion tokens reserved (``max_tokens`` times ``n`` or the default).
        lease: the limiter's lease, or ``None`` for an unlimited key.
    """

    prompt_estimate: int
    completion_reserve: int
    lease: Lease | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers every response to a limited key carries."""
        return self.lease.headers if self.lease is not None else {}


async def run(gateway: Gateway, call: Call) -> Answer:
    """Serve one inference request (DESIGN §3).

    Raises:
        GatewayError: every refusal before the first byte — 400 (body), 404/403 (model),
            422 (Idempotency-Key reused with another body), 429 (limits), 503 (queue,
            stream capacity), or the upstream's failure (502/504/its status); limited
            keys' errors carry ``x-ratelimit-*``.
    Cancelling (the client left) is safe: a unary request is settled with its whole
    reservation; a stream's reader detaches and its producer goes on for
    ``streams.detach_timeout``.
    """
    trace = Trace.begin(call.principal.name, call.endpoint.name)  # the ledger's row and metrics
    try:
        request = parse_inference(call.endpoint, call.body)
        if trace is not None:
            trace.model = request.model
        gateway.balancer.require(request.model, call.principal.models)
    except GatewayError as exc:
        record_failure(gateway, trace, exc)
        raise
    _note_model(request.model)
    if call.idempotency_key is not None:
        replay = await _replay_idempotent(gateway, call)  # a replay adds no ledger row
        if replay is not None:
            return replay
    # From a first use of an Idempotency-Key to its registration below nothing awaits, so a
    # concurrent duplicate always finds it (and waits for what it started).
    if request.stream:
        return await start_stream(gateway, call, request, trace)
    return await answer_unary(gateway, call, request, trace)


def _note_model(model: str) -> None:
    ctx = request_context.get()
    if ctx is not None:
        ctx.model = model


async def acquire(gateway: Gateway, principal: Principal, request: InferenceRequest) -> Charge:
    """Reserve the request against the key's limits (RPM, TPM, concurrency, budgets).

    Raises:
        RateLimitError: a limit is reached (429 with ``retry-after`` and ``x-ratelimit-*``).
    """
    charge = Charge(estimate_prompt_tokens(len(request.raw)), completion_reserve(
        request.head.limit_fields(), gateway.settings.limits.default_reserve_tokens,
        request.endpoint.streams))
    try:
        charge.lease = await gateway.limiter.acquire(gateway.demands.demand(
            principal.name, request.model, charge.prompt_estimate, charge.completion_reserve))
    except RateLimitError as exc:
        gateway.metrics.rate_limited.labels(principal.name, exc.code or "-").inc()
        raise
    return charge


async def settle(gateway: Gateway, charge: Charge, model: str, counts: tuple[int, int] | None) -> None:
    """Settle ``charge`` with ``(prompt, completion)`` tokens used; ``None`` charges the
    whole reservation (the request ended without the gateway learning what it used)."""
    lease = charge.lease
    if lease is None:
        return
    if counts is None:
        tokens, usd = lease.demand.tokens, lease.demand.usd
    else:
        tokens = counts[0] + counts[1]
        budget = lease.demand.budget
        usd = gateway.demands.cost_usd(model, *counts) if budget and budget.usd else 0.0
    await gateway.limiter.settle(lease, tokens, usd)


# --- unary ----------------------------------------------------------------------------------


async def answer_unary(gateway: Gateway, call: Call, request: InferenceRequest,
                       trace: Trace | None = None) -> UnaryAnswer:
    """Acquire limits, dispatch a whole answer (with failover) and settle with the upstream's
    usage. With an ``Idempotency-Key`` the work runs in a task the registry owns (registered
    before anything awaits), so a repeat of the key, even while this one runs, gets the same
    answer from one upstream call. The work records the ledger row (``trace``) as it ends."""
    work = _acquire_and_answer(gateway, call, request, trace)
    if call.idempotency_key is None:
        return await work
    task = gateway.streams.remember_answer(call.principal.name, call.idempotency_key, call.body, work)
    return await asyncio.shield(task)


async def _acquire_and_answer(gateway: Gateway, call: Call, request: InferenceRequest,
                              trace: Trace | None = None) -> UnaryAnswer:
    try:
        charge = await acquire(gateway, call.principal, request)
    except BaseException as exc:
        record_failure(gateway, trace, exc)
        raise
    route = Route(request.model, call.principal.models, call.principal.priority)
    try:
        return await _unary(gateway, call, request, route, charge, trace)
    except GatewayError as exc:
        exc.extra_headers.update(charge.headers)
        raise


async def _unary(gateway: Gateway, call: Call, request: InferenceRequest, route: Route,
                 charge: Charge, trace: Trace | None = None) -> UnaryAnswer:
    """Relay a whole answer; settle with the upstream's usage (nothing after an upstream
    error, the whole reservation if cancelled mid-request) and record its ledger row."""
    ctx = request_context.get()

    async def attempt(upstream: Upstream, deadline: float) -> UnaryResult:
        if ctx is not None:
            ctx.upstream = upstream.name
        body, _ = request.upstream_body(upstream.config.inject_stream_usage)
        if trace is None:
            return await send_unary(upstream, deadline, "POST", request.endpoint.path, body, call.headers)
        trace.upstream, trace.sent_at = upstream.name, time.perf_counter()
        answer = await send_unary(upstream, deadline, "POST", request.endpoint.path, body, call.headers)
        trace.answered_at, trace.response_model = time.perf_counter(), answer.model
        return answer

    counts: tuple[int, int] | None = None
    status = 0
    failure: BaseException | None = None
    try:
        result = await gateway.dispatcher.run(route, attempt)
        counts, status = usage_counts(result.usage), result.status
    except GatewayError as exc:
        counts, failure = (0, 0), exc
        raise
    except BaseException as exc:  # cancelled: the client left
        failure = exc
        raise
    finally:
        record_unary(gateway, trace, status, failure, counts)
        await settle(gateway, charge, request.model, counts)
    if ctx is not None:
        ctx.usage = result.usage
    headers = {**response_headers(result.headers), **charge.headers}
    if trace is not None and trace.overhead_ms is not None:
        headers[OVERHEAD_HEADER] = overhead_value(trace.overhead_ms)
    return UnaryAnswer(result.status, headers, result.body)


# --- streams --------------------------------------------------------------------------------


async def start_stream(gateway: Gateway, call: Call, request: InferenceRequest,
                       trace: Trace | None = None) -> StreamAnswer:
    """Create the stream log (registered under its ``Idempotency-Key`` at once), acquire
    limits, start its producer (owned by the registry, mirrored to Redis when shared),
    attach the caller as its first reader and wait for the first event.

    Raises:
        OverloadedError: ``streams.max_total_bytes`` is reached (503).
        RateLimitError: a limit is reached (429; the log ends with it, so a duplicate
            request with the same ``Idempotency-Key`` gets the same answer).
        GatewayError: the upstream failed before the first event (its real HTTP status).

    The ledger row (``trace``) is recorded here for a refusal before the producer starts,
    and by the producer (``produce_and_settle``) from then on.
    """
    streams = gateway.streams
    try:
        log = streams.create(call.principal.name)
    except GatewayError as exc:
        record_failure(gateway, trace, exc)
        raise
    log.endpoint = request.endpoint.name
    log.model = request.model
    _note_stream(log.stream_id)
    if trace is not None:
        trace.stream_id = log.stream_id
    if call.idempotency_key is not None:
        streams.remember_stream(call.principal.name, call.idempotency_key, call.body, log)
    reader = streams.attach(log, 0)
    try:
        charge = await acquire(gateway, call.principal, request)
    except BaseException as exc:
        streams.abandon(log, exc if isinstance(exc, GatewayError) else StreamCancelledError(),
                        keep=call.idempotency_key is not None)
        reader.close()
        record_failure(gateway, trace, exc)
        raise
    log.headers = {**charge.headers, "X-Stream-Id": log.stream_id}
    route = Route(request.model, call.principal.models, call.principal.priority)
    job = StreamJob(request, route, call.headers, log,
                    on_response_id=lambda response_id: streams.name_response(log, response_id))
    if trace is not None:
        gateway.ledger_streams[log.stream_id] = trace
    streams.start(log, produce_and_settle(gateway, job, charge, trace))
    gateway.metrics.streams_started.inc()
    if gateway.remote_streams is not None:
        gateway.remote_streams.mirror(log, on_cancel=lambda: streams.cancel(log))
    try:
        answer = await _first_event(reader, cancel_if_left=call.idempotency_key is None)
    except GatewayError as exc:
        exc.extra_headers.update(charge.headers)
        raise
    answer.metering = job.metering
    if trace is not None and job.metering.sent_at is not None:  # the overhead before the first byte
        answer.headers = {**answer.headers,
                          OVERHEAD_HEADER: overhead_value((job.metering.sent_at - trace.started_at) * 1000)}
    ctx = request_context.get()
    if ctx is not None and job.upstream is not None:
        ctx.upstream = job.upstream.name  # the deployment whose answer is streaming
    return answer


def _note_stream(stream_id: str) -> None:
    ctx = request_context.get()
    if ctx is not None:
        ctx.stream_id = stream_id


async def _first_event(reader: StreamReader, cancel_if_left: bool = False) -> StreamAnswer:
    """Wait until the log has its first event (then the answer is a stream) or failed
    before it (then its error is raised, a real HTTP status). The reader is closed when
    this raises or is cancelled; with ``cancel_if_left``, a client that leaves now also
    cancels the stream (it never learnt the stream id, so nobody can re-attach)."""
    log = reader.log
    try:
        await log.wait(reader.after_seq)
    except BaseException:
        reader.close(cancel_if_last=cancel_if_left)
        raise
    if log.error is not None:
        reader.close()
        raise log.error
    return StreamAnswer(reader, log.headers)


async def produce_and_settle(gateway: Gateway, job: StreamJob, charge: Charge,
                             trace: Trace | None = None) -> None:
    """The producer task: run the stream's attempts (each holds and frees its upstream
    slot), then record its ledger row (``trace``) and settle its charge: the upstream's
    usage, else the prompt estimate plus one token per event generated, else nothing if the
    stream failed before its first event. Tokens generated before a cancel (detach
    timeout, ``/cancel``) are charged too. The row belongs to the producer's end, so a
    stream whose client left still gets one, with the usage as finally metered."""
    try:
        await produce_stream(job, gateway.dispatcher)
    finally:
        counts = usage_counts(job.metering.usage)
        if counts is None:
            counts = (charge.prompt_estimate, job.metering.events) if job.log.last_seq else (0, 0)
        record_stream(gateway, trace, job, counts)
        await settle(gateway, charge, job.request.model, counts)


# --- resume ---------------------------------------------------------------------------------


async def resume(gateway: Gateway, principal: Principal, stream_id: str,
                 after_seq: int) -> StreamAnswer | None:
    """Attach a new reader to ``stream_id`` after ``after_seq`` (DESIGN §4 "Reconnection"),
    here or, with Redis, wherever it was produced. ``None``: the stream ended and nothing
    is left after ``after_seq`` (204).

    Raises:
        StreamNotFoundError: unknown, expired or another key's (404, one answer for all).
        InvalidRequestError: ``after_seq`` beyond the latest seq (400).
        StreamTrimmedError: ``after_seq`` older than the oldest retained event (409).
        GatewayError: the stream failed before its first event (the original's status).
    """
    log = gateway.streams.get(stream_id, principal.name)
    if log is None:
        return await _resume_remote(gateway, principal, stream_id, after_seq)
    try:
        return await _attach_local(gateway, log, after_seq)
    except StreamTrimmedError:
        if gateway.remote_streams is None:
            raise
        # Redis keeps up to streams.redis_maxlen events, more than the local log retains.
        return await _resume_remote(gateway, principal, stream_id, after_seq)


async def _attach_local(gateway: Gateway, log: StreamLog, after_seq: int) -> StreamAnswer | None:
    _note_stream(log.stream_id)
    if log.error is not None:
        raise log.error
    if nothing_left(after_seq, log.first_seq, log.last_seq, log.closed):
        return None
    gateway.metrics.stream_resumes.labels("local").inc()
    count_resume(gateway, log.stream_id)
    return await _first_event(gateway.streams.attach(log, after_seq))


async def _resume_remote(gateway: Gateway, principal: Principal, stream_id: str,
                         after_seq: int) -> StreamAnswer | None:
    """``resume`` of a stream this instance does not hold, from the shared store."""
    info = await _remote_info(gateway, principal, stream_id, after_seq)
    if info.error_status is not None and info.error_body is not None:
        raise UpstreamStatusError(info.error_status, info.error_body)
    _note_stream(stream_id)
    if nothing_left(after_seq, info.first_seq, info.last_seq, info.state is not StreamState.RUNNING):
        return None
    assert gateway.remote_streams is not None
    gateway.metrics.stream_resumes.labels("remote").inc()
    return StreamAnswer(gateway.remote_streams.reader(info, after_seq), info.headers)


#: How long a resume on another instance waits for the shared store to catch up with the
#: producer: its mirror writes a new stream, and each batch of events, a moment after the
#: client may have seen them (the client can be faster than the copy).
REMOTE_CATCH_UP_S = 1.0
REMOTE_POLL_S = 0.01


async def _remote_info(gateway: Gateway, principal: Principal, stream_id: str,
                       after_seq: int = 0) -> RemoteStreamInfo:
    """The shared store's view of ``stream_id`` if it is this key's, once it holds the
    stream and (while running) the event at ``after_seq`` — waiting up to
    ``REMOTE_CATCH_UP_S`` for the producer's mirror to write them.

    Raises:
        StreamNotFoundError: no shared store, unknown, expired, another key's, or the store
            is unreachable (404; an unknown id is answered after ``REMOTE_CATCH_UP_S``).
    """
    remote = gateway.remote_streams
    if remote is None:
        raise StreamNotFoundError()
    deadline = asyncio.get_running_loop().time() + REMOTE_CATCH_UP_S
    while True:
        info = await remote.info(stream_id)
        caught_up = info is not None and (info.state is not StreamState.RUNNING
                                          or after_seq <= info.last_seq)
        if caught_up or asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(REMOTE_POLL_S)
    if info is None or info.owner != principal.name:
        raise StreamNotFoundError()
    return info


async def resume_response(gateway: Gateway, principal: Principal, response_id: str,
                          starting_after: int) -> StreamAnswer | None:
    """``GET /v1/responses/{id}?stream=true&starting_after=N`` from the gateway's log: the
    events whose ``sequence_number`` is greater than ``starting_after`` (OpenAI API
    reference, "Retrieve a model response"), then the live tail.

    Raises:
        StreamNotFoundError: the gateway holds no stream of that response for this key
            (the caller passes the request through to the upstream instead).
        Others as ``resume``.
    """
    log = gateway.streams.by_response_id(response_id, principal.name)
    if log is not None:
        return await _attach_local(gateway, log, _seq_after_sequence_number(log, starting_after))
    remote = gateway.remote_streams
    stream_id = await remote.find_response(response_id) if remote is not None else None
    if stream_id is None:
        raise StreamNotFoundError()
    # Another instance's log, as in _seq_after_sequence_number with the numbering the
    # Responses API uses: from 0, so sequence_number N is seq N + 1.
    return await _resume_remote(gateway, principal, stream_id, starting_after + 1)


_SEQUENCE_NUMBER_RE = re.compile(rb'"sequence_number":\s*(\d+)')


def sequence_number(frame: bytes) -> int | None:
    """The Responses API ``sequence_number`` of an encoded event, or ``None``."""
    match = _SEQUENCE_NUMBER_RE.search(frame)
    return int(match.group(1)) if match is not None else None


def _seq_after_sequence_number(log: StreamLog, starting_after: int) -> int:
    """The log seq after which the events with ``sequence_number > starting_after`` begin.

    The log holds one frame per upstream event, in order, and the Responses API numbers
    events consecutively, so seq ``k`` carries number ``first + k - 1`` where ``first`` is
    the number of the oldest frame held (0 when none is). Numbers older than the log holds
    map below its first seq and numbers beyond its last above it, so the cursor rules
    answer 409 and 400 (``check_cursor``)."""
    first_number = sequence_number(log.frames[0]) if log.frames else None
    if first_number is None:
        return starting_after + 1
    return log.first_seq - 1 + (starting_after + 1 - first_number)


async def cancel_stream(gateway: Gateway, principal: Principal, stream_id: str) -> None:
    """Stop generation of ``stream_id`` (idempotent: a finished stream stays as it is),
    here or on the instance producing it.

    Raises:
        StreamNotFoundError: unknown, expired or another key's (404).
    """
    log = gateway.streams.get(stream_id, principal.name)
    if log is not None:
        gateway.streams.cancel(log)
        return
    await _remote_info(gateway, principal, stream_id)
    assert gateway.remote_streams is not None
    await gateway.remote_streams.cancel(stream_id)


# --- Idempotency-Key ------------------------------------------------------------------------


async def _replay_idempotent(gateway: Gateway, call: Call) -> Answer | None:
    """What an earlier request with this ``Idempotency-Key`` started, replayed: a stream
    from its first event, a non-stream answer as it was (awaited if still running).
    ``None``: a first use."""
    assert call.idempotency_key is not None
    entry = gateway.streams.idempotent(call.principal.name, call.idempotency_key, call.body)
    if entry is None:
        return None
    gateway.metrics.idempotent_replays.inc()
    if entry.log is not None:
        if entry.log.error is not None:
            raise entry.log.error
        count_resume(gateway, entry.log.stream_id)
        return await _first_event(gateway.streams.attach(entry.log, 0))
    assert entry.answer is not None
    return await asyncio.shield(entry.answer)
