"""Dispatch and relay: the attempts of one request on deployments, and what each attempt
does with the upstream's answer (DESIGN §3 "dispatch"; ``pipeline`` calls it).

``Dispatcher`` takes an admission slot, runs an attempt, reports health, and retries or fails
over until the first byte reached the client. A unary attempt (``send_unary``) reads the
whole answer. A stream attempt (``produce_stream``, run by the producer task the
``StreamRegistry`` owns) reads the upstream's SSE, re-frames each event and appends it to
the stream log, which client readers follow by cursor. Usage is metered from the upstream's own ``usage``
objects; for chat and completion streams ``stream_options.include_usage`` is injected
upstream when the client did not ask for it, and that extra ``choices: []`` chunk is dropped
before it reaches the client (DESIGN §4 Wire rules).
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp
import msgspec
import orjson
from multidict import CIMultiDictProxy

from proxy.admission import Admission
from proxy.balancer import Balancer, RetryBudget
from proxy.config import RetryConfig
from proxy.errors import (
    GatewayError,
    InvalidRequestError,
    OverloadedError,
    RateLimitError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamInvalidResponseError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from proxy.sse import DONE, SSEError, SSEParser, encode_event
from proxy.streams import StreamCancelledError, StreamLog, StreamState, error_frame
from proxy.upstream import (
    DEFAULT_RETRY_AFTER_S,
    Headers,
    Upstream,
    invalid_response,
    map_client_error,
    normalize_error_body,
)

error_log = logging.getLogger("proxy.error")

JSONDict = dict[str, Any]
T = TypeVar("T")

#: Body fields a client might use to redirect the gateway; never forwarded (DESIGN §4).
_ROUTING_OVERRIDES = ("api_base", "base_url")

_DONE_FRAME = encode_event(DONE)

#: The most bytes taken from the upstream response per read, so the backpressure check
#: between reads bounds what a stream log holds beyond ``streams.buffer``.
READ_CHUNK_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An inference endpoint below ``/v1``.

    Attributes:
        name: the label logs and metrics use (``chat.completions``).
        path: the path below ``/v1`` (``/chat/completions``).
        streams: whether ``"stream": true`` is accepted.
        ends_with_done: whether a complete stream ends with ``data: [DONE]``.
        usage_option: whether ``stream_options.include_usage`` exists for it.
    """

    name: str
    path: str
    streams: bool = True
    ends_with_done: bool = True
    usage_option: bool = True


CHAT = Endpoint("chat.completions", "/chat/completions")
COMPLETIONS = Endpoint("completions", "/completions")
EMBEDDINGS = Endpoint("embeddings", "/embeddings", streams=False, usage_option=False)
RESPONSES = Endpoint("responses", "/responses", ends_with_done=False, usage_option=False)


class RequestHead(msgspec.Struct, frozen=True):
    """The few fields of an inference body the gateway reads. The body is decoded into this
    with msgspec, which skips every other field (``messages``, ``input``, ``tools``…) in
    the parser without building Python objects for them, so decoding costs about nothing
    beyond the body's own bytes whatever its shape (a 10 MB body of 3.4 million empty
    messages: under 2 KB, where a full decode builds 370 MB of dicts). ``None``: absent
    (or JSON ``null``); values are as sent, checked by ``parse_inference`` and
    ``limits.completion_reserve``."""

    model: Any = None
    stream: Any = None
    stream_options: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    max_output_tokens: Any = None
    n: Any = None
    api_base: Any = msgspec.UNSET
    base_url: Any = msgspec.UNSET

    def limit_fields(self) -> dict[str, object]:
        """The fields ``limits.completion_reserve`` reads."""
        return {"max_completion_tokens": self.max_completion_tokens, "max_tokens": self.max_tokens,
                "max_output_tokens": self.max_output_tokens, "n": self.n}

    @property
    def has_routing_override(self) -> bool:
        """Whether the body names ``api_base`` or ``base_url`` (never forwarded)."""
        return self.api_base is not msgspec.UNSET or self.base_url is not msgspec.UNSET


@dataclass(slots=True)
class InferenceRequest:
    """A parsed inference body.

    Attributes:
        endpoint: which endpoint it was sent to.
        head: the fields the gateway reads (the rest is forwarded as received).
        raw: the body bytes as received.
        model: the ``model`` field.
        stream: ``True`` only when the body says ``"stream": true`` (never from ``Accept``).
        client_wants_usage: the client set ``stream_options.include_usage``.
    """

    endpoint: Endpoint
    head: RequestHead
    raw: bytes
    model: str
    stream: bool
    client_wants_usage: bool

    def upstream_body(self, inject_usage: bool) -> tuple[bytes, bool]:
        """The body to send upstream and whether usage reporting was injected into it.

        The received bytes go out unchanged unless a routing override must be removed or
        ``include_usage`` injected. Then only the top level is rewritten: every other
        field's value is copied as the raw JSON it was (``msgspec.Raw``), never decoded.
        """
        inject = inject_usage and self.stream and self.endpoint.usage_option and not self.client_wants_usage
        if not inject and not self.head.has_routing_override:
            return self.raw, False
        fields = msgspec.json.decode(self.raw, type=dict[str, msgspec.Raw])
        for name in _ROUTING_OVERRIDES:
            fields.pop(name, None)
        if inject:
            options = self.head.stream_options
            merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            fields["stream_options"] = msgspec.Raw(msgspec.json.encode(merged))
        return msgspec.json.encode(fields), inject


def parse_inference(endpoint: Endpoint, raw: bytes) -> InferenceRequest:
    """Decode and check an inference body (only the fields of ``RequestHead``).

    Raises:
        InvalidRequestError: not a JSON object, no string ``model``, or ``stream`` not a
            boolean or set on an endpoint that does not stream (400).
    """
    try:
        head = msgspec.json.decode(raw, type=RequestHead)
    except msgspec.ValidationError:
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"We could not parse the JSON body of your request: {exc}",
                                  code="invalid_json") from None
    model = head.model
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("you must provide a model parameter", param="model",
                                  code="missing_required_parameter")
    stream = head.stream
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequestError("`stream` must be a boolean.", param="stream", code="invalid_type")
    if stream and not endpoint.streams:
        raise InvalidRequestError(f"{endpoint.name} does not support streaming.", param="stream")
    options = head.stream_options
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    return InferenceRequest(endpoint, head, raw, model, bool(stream), wants_usage)


@dataclass(slots=True)
class UnaryResult:
    """A whole upstream answer: ``status``, ``headers``, ``body`` and parsed ``usage``."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    usage: JSONDict | None = None
    model: str | None = None  # the answer's ``model``, if a string


@dataclass(slots=True)
class Metering:
    """What a stream reported: the last non-null ``usage`` object seen, or ``None``;
    ``events`` appended; ``sent_at``: ``time.perf_counter()`` when the latest attempt was
    sent; ``first_event_at``: when the first event was appended (``None``: none yet);
    ``model``: the ``model`` of the event that carried the usage (``None``: not seen)."""

    usage: JSONDict | None = None
    events: int = 0
    sent_at: float | None = None
    first_event_at: float | None = None
    model: str | None = None


async def send_unary(upstream: Upstream, deadline: float, method: str, path: str,
                     body: bytes | None, headers: Headers, query_string: str = "") -> UnaryResult:
    """A unary attempt: send one request (``Upstream.send``) and read the whole answer, at
    most ``max_response_bytes`` after decompression; the pooled connection is always
    released. The response headers must arrive by ``deadline`` (loop time; see
    ``Attempt``), then ``timeouts.first_byte`` bounds each wait for the body
    (``Upstream.unary_timeout``). A 2xx answer must be JSON (OpenAI API reference: every
    non-stream endpoint answers a JSON object).

    Raises:
        GatewayError: connect failure or timeout (502/504), the upstream's error status,
            ``upstream_response_too_large`` or ``upstream_invalid_response`` (502).
    Cancelling is safe: the connection is closed, not returned to the pool half-read.
    """
    try:
        async with asyncio.timeout_at(deadline):
            response = await upstream.send(method, path, body, headers, query_string=query_string,
                                           client_timeout=upstream.unary_timeout)
    except TimeoutError as exc:
        raise map_client_error(upstream, exc) from None
    await upstream.raise_for_status(response)
    try:
        data = await upstream.read_body(response)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise map_client_error(upstream, exc) from None
    payload = _json_answer(upstream, response, data)
    usage = payload.get("usage") if isinstance(payload, dict) else None
    model = payload.get("model") if isinstance(payload, dict) else None
    return UnaryResult(response.status, response.headers, data, usage if isinstance(usage, dict) else None,
                       model if isinstance(model, str) else None)


def _json_answer(upstream: Upstream, response: aiohttp.ClientResponse, data: bytes) -> object:
    """``data`` decoded, if the answer is JSON by its ``Content-Type`` (when it names one)
    and by its bytes.

    Raises:
        UpstreamInvalidResponseError: another content type, or bytes that do not parse.
    """
    content_type = response.headers.get("Content-Type")
    if content_type is not None and not _is_json_type(content_type):
        raise invalid_response(upstream, f"Content-Type {content_type[:60]!r} instead of JSON")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise invalid_response(upstream, "a body that is not JSON") from None


def _is_json_type(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


@dataclass(frozen=True, slots=True)
class Route:
    """Who asks for which model: the key's model patterns and queue priority; ``upstream``
    pins the request to one deployment (the model list, passthrough without a model),
    ``None`` lets the balancer pick among the model's deployments."""

    model: str
    allowed: tuple[str, ...]
    priority: int = 0
    upstream: str | None = None


@dataclass(slots=True)
class StreamJob:
    """Everything the producer of one stream needs.

    Attributes:
        request: the parsed request.
        route: model, allowed patterns and priority for picking deployments.
        headers: the client's request headers (filtered by ``Upstream.request_headers``).
        log: the log to fill.
        metering: receives the usage the upstream reports.
        upstream: the deployment of the current attempt (``None`` before the first).
        injected_usage: drop the ``choices: []`` usage chunk before it reaches the log.
        on_response_id: called with the ``id`` of a Responses API stream's
            ``response.created`` event (the registry indexes the log by it).
    """

    request: InferenceRequest
    route: Route
    headers: Headers
    log: StreamLog
    metering: Metering = field(default_factory=Metering)
    upstream: Upstream | None = None
    injected_usage: bool = False
    on_response_id: Callable[[str], None] = lambda _response_id: None


Attempt = Callable[[Upstream, float], Awaitable[T]]
"""One attempt of a request on a deployment: ``attempt(upstream, deadline)``, where
``deadline`` is the event-loop time (``loop.time()``) by which the first byte (the response
headers; for a stream, its first event) must have arrived. Raises ``GatewayError``."""


def is_retryable(error: GatewayError) -> bool:
    """Connect errors, timeouts, invalid answers, 429 and 5xx may succeed elsewhere; other
    4xx never."""
    if isinstance(error, UpstreamStatusError):
        return error.upstream_status == 429 or error.upstream_status >= 500
    return isinstance(error, UpstreamConnectionError | UpstreamTimeoutError | UpstreamInvalidResponseError)


class Dispatcher:
    """Runs attempts of one request on deployments: a slot from admission, the attempt,
    its health report, and retries with failover until the first byte reached the client.

    Args:
        upstreams: name → pooled upstream.
        balancer: candidates, pick and health.
        admission: slots and queues.
        retry: ``routing.retry``.
        budget: the gateway-wide retry budget.
        events: receives retries, errors, ejections and budget exhaustion (metrics).
    """

    def __init__(self, upstreams: dict[str, Upstream], balancer: Balancer, admission: Admission,
                 retry: RetryConfig, budget: RetryBudget, events: DispatchEvents | None = None) -> None:
        self.upstreams = upstreams
        self.balancer = balancer
        self.admission = admission
        self.retry = retry
        self.budget = budget
        self.events = events or NoEvents()

    async def run(self, route: Route, attempt: Attempt[T],
                  committed: Callable[[], bool] = lambda: False) -> T:
        """Call ``attempt(upstream, deadline)`` until it succeeds, the error is final, the
        first byte was committed to the client (``committed()``), or the first-byte deadline
        passed.

        One deadline bounds the whole phase before the first byte: ``timeouts.first_byte``
        of the first deployment tried, counted from its first attempt; every attempt,
        backoff and queue wait after it spends from it (each attempt gets what is left),
        so with retries a client still waits at most about ``first_byte``.

        Raises:
            GatewayError: the last attempt's error; ``x-should-retry: false`` when the
                gateway already retried or its retry budget is spent. 404/503 from routing.
        Cancelling is safe: the slot is released and a queued request leaves the queue.
        """
        self.budget.start_request()
        try:
            return await self._attempts(route, attempt, committed)
        finally:
            self.budget.end_request()

    async def _attempts(self, route: Route, attempt: Attempt[T], committed: Callable[[], bool]) -> T:
        tried: set[str] = set()
        last: GatewayError | None = None
        retry_held = False  # a retry taken from the budget and not yet given back
        deadline: float | None = None  # loop time by which the first byte must have come
        try:
            for n in itertools.count(1):
                name = await self._slot(route, tried, last)
                upstream = self.upstreams[name]
                if deadline is None:
                    deadline = asyncio.get_running_loop().time() + upstream.config.timeouts.first_byte_s
                try:
                    result = await self._attempt_on_slot(upstream, attempt, deadline)
                except GatewayError as exc:
                    self._record(name, exc)
                    last = exc
                else:
                    self.balancer.record_success(name)
                    return result
                finally:
                    self.admission.release(name)
                    if retry_held:
                        self.budget.end_retry()
                        retry_held = False
                tried.add(name)
                retry_held = await self._before_retry(route, tried, last, n, committed, name, deadline)
            raise AssertionError("unreachable")  # pragma: no cover - count() never ends
        finally:
            if retry_held:  # cancelled in the backoff, or nowhere left to retry
                self.budget.end_retry()

    @staticmethod
    async def _attempt_on_slot(upstream: Upstream, attempt: Attempt[T], deadline: float) -> T:
        """One attempt; a pooled connection found dead before any response is redone once,
        at once, on the same deployment and slot (not a retry: nothing reached the upstream)."""
        try:
            return await attempt(upstream, deadline)
        except UpstreamConnectionError as exc:
            if not exc.stale:
                raise
        return await attempt(upstream, deadline)

    async def _slot(self, route: Route, tried: set[str], last: GatewayError | None) -> str:
        try:
            candidates = ([route.upstream] if route.upstream is not None else
                          self.balancer.candidates(route.model, route.allowed, frozenset(tried)))
        except (OverloadedError, RateLimitError):
            if last is not None:
                raise last from None  # nowhere left to fail over to: the real error
            raise
        name = self.admission.try_acquire(candidates, self.balancer.choose)  # no coroutine
        if name is not None:
            return name
        return await self.admission.acquire(candidates, self.balancer.choose, route.priority)

    async def _before_retry(self, route: Route, tried: set[str], error: GatewayError | None, n: int,
                            committed: Callable[[], bool], name: str, deadline: float) -> bool:
        """Raise ``error`` unless another attempt may follow, then wait the backoff.
        ``n``: attempts made so far. Returns whether the retry came out of the budget.
        No retry starts once the first-byte ``deadline`` (loop time) has passed, and the
        backoff never runs past it.

        A failover to a deployment not tried yet is free: it cannot hammer the one that
        failed. A retry on a deployment already tried (or when none other is available)
        takes a place in the retry budget, and is refused when the budget is spent.
        """
        assert error is not None
        loop = asyncio.get_running_loop()
        if committed() or not is_retryable(error) or n >= self.retry.attempts or loop.time() >= deadline:
            if n > 1:
                error.should_retry = False  # the gateway already retried
            raise error
        budgeted = not self._untried_available(route, tried)
        if budgeted and not self.budget.try_retry():
            self.events.count_retry_budget_exhausted()
            error.should_retry = False
            raise error
        self.events.count_retry(name, _error_kind(error))
        try:
            await asyncio.sleep(min(self.backoff_s(n), max(0.0, deadline - loop.time())))
        except asyncio.CancelledError:
            if budgeted:
                self.budget.end_retry()
            raise
        return budgeted

    def backoff_s(self, attempts: int) -> float:
        """The wait before the next try after ``attempts`` tries, in seconds: uniform in
        [0, min(backoff_max, backoff_base * 2^(attempts - 1))] ("full jitter", AWS
        Architecture Blog, "Exponential Backoff And Jitter")."""
        cap_s = min(self.retry.backoff_max_s, self.retry.backoff_base_s * 2 ** (attempts - 1))
        return random.uniform(0, cap_s)

    def _untried_available(self, route: Route, tried: set[str]) -> bool:
        if route.upstream is not None:
            return False
        try:
            candidates = self.balancer.candidates(route.model, route.allowed, frozenset(tried))
        except GatewayError:
            return False
        return any(name not in tried for name in candidates)

    def _record(self, name: str, error: GatewayError) -> None:
        self.events.count_upstream_error(name, _error_kind(error))
        if isinstance(error, UpstreamStatusError) and error.upstream_status == 429:
            self.balancer.record_rate_limited(name, error.retry_after_s or DEFAULT_RETRY_AFTER_S)
        elif isinstance(error, UpstreamStatusError) and error.upstream_status < 500:
            self.balancer.record_success(name)
        elif not (isinstance(error, UpstreamConnectionError) and error.stale) \
                and self.balancer.record_failure(name, local=_is_local(error)):
            self.events.count_ejection(name)
            error_log.warning("upstream ejected", extra={"upstream": name})


def _is_local(error: GatewayError) -> bool:
    """Whether the gateway caused ``error`` itself (see ``UpstreamConnectionError.local``)."""
    return isinstance(error, UpstreamConnectionError) and error.local


def _error_kind(error: GatewayError) -> str:
    """A bounded label for metrics: ``http_<status>`` for upstream statuses, else the code."""
    if isinstance(error, UpstreamStatusError):
        return f"http_{error.upstream_status}"
    return error.code or type(error).__name__


class DispatchEvents(Protocol):
    """What the dispatcher reports (``observability.Metrics`` implements it)."""

    def count_retry(self, upstream: str, reason: str) -> None: ...

    def count_upstream_error(self, upstream: str, kind: str) -> None: ...

    def count_ejection(self, upstream: str) -> None: ...

    def count_retry_budget_exhausted(self) -> None: ...


class NoEvents:
    """``DispatchEvents`` that records nothing."""

    def count_retry(self, upstream: str, reason: str) -> None:
        return None

    def count_upstream_error(self, upstream: str, kind: str) -> None:
        return None

    def count_ejection(self, upstream: str) -> None:
        return None

    def count_retry_budget_exhausted(self) -> None:
        return None


async def produce_stream(job: StreamJob, dispatcher: Dispatcher) -> None:
    """Read the upstream stream into ``job.log`` until it ends, fails or is cancelled,
    failing over to another deployment while nothing was appended yet.

    Every ending closes the log: normally with ``[DONE]`` (chat, completions) or after the
    upstream's last event (responses); on failure with an error event, or with
    ``log.error`` set when nothing was sent yet. Cancelling is safe and is how generation
    is stopped (``/cancel``, the detach timeout, shutdown): the log then ends with the
    ``stream_cancelled`` error event.
    """
    log = job.log
    try:
        await dispatcher.run(job.route, functools.partial(_stream_attempt, job),
                             committed=lambda: log.last_seq > 0)
    except asyncio.CancelledError:
        cancelled = StreamCancelledError()
        log.fail(cancelled, error_frame(cancelled))
        raise
    except GatewayError as error:
        log.fail(error, error_frame(error))


async def _stream_attempt(job: StreamJob, upstream: Upstream, deadline: float) -> None:
    """One attempt: open the stream on ``upstream`` and pump it to its end. The request's
    first-byte ``deadline`` (loop time) bounds everything from sending the request to the
    first event appended; after it, ``read_gap`` (the session's ``sock_read``) bounds each
    silence. The connection is closed, not pooled, when the stream did not end cleanly."""
    job.upstream = upstream
    job.metering.sent_at = time.perf_counter()
    body, job.injected_usage = job.request.upstream_body(upstream.config.inject_stream_usage)
    response: aiohttp.ClientResponse | None = None
    clean = False
    try:
        async with asyncio.timeout_at(deadline) as first_byte:
            response = await upstream.send("POST", job.request.endpoint.path, body, job.headers)
            await upstream.raise_for_status(response)
            _check_event_stream(upstream, response)
            clean = await _pump_events(job, response, first_byte)
    except (aiohttp.ClientError, TimeoutError, SSEError) as exc:
        if job.log.last_seq:
            error_log.warning("upstream stream failed", extra={
                "upstream": upstream.name, "error": type(exc).__name__, "events": job.log.last_seq})
        raise map_client_error(upstream, exc) from None
    finally:
        if response is not None:
            response.release() if clean else response.close()


def _check_event_stream(upstream: Upstream, response: aiohttp.ClientResponse) -> None:
    """A 2xx answer to a stream request must be ``text/event-stream`` (WHATWG HTML §9.2).

    Raises:
        UpstreamInvalidResponseError: any other content type (the response is closed).
    """
    content_type = response.headers.get("Content-Type", "")
    if content_type.partition(";")[0].strip().lower() != "text/event-stream":
        response.close()
        raise invalid_response(upstream, f"Content-Type {content_type[:60]!r} instead of an event stream")


async def _pump_events(job: StreamJob, response: aiohttp.ClientResponse,
                       first_byte: asyncio.Timeout) -> bool:
    """Copy events until the upstream ends; returns whether it ended cleanly. Lifts the
    ``first_byte`` deadline once the first event is in the log. The stream must be UTF-8
    (WHATWG HTML §9.2 decodes event streams as UTF-8 only) and at most
    ``max_response_bytes`` long after decompression."""
    log, parser, upstream = job.log, SSEParser(), job.upstream
    assert upstream is not None
    utf8 = codecs.getincrementaldecoder("utf-8")()
    limit_bytes, read_bytes = upstream.config.max_response_bytes, 0
    waiting_first = True
    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
        read_bytes += len(chunk)
        if read_bytes > limit_bytes:
            raise upstream.too_large()
        try:
            utf8.decode(chunk)
        except UnicodeDecodeError:
            raise invalid_response(upstream, "an event stream that is not UTF-8") from None
        for event in parser.feed(chunk):
            if _handle_event(job, event.data, event.event):
                return log.state is StreamState.DONE and await _drain(response)
        if waiting_first and log.last_seq:
            first_byte.reschedule(None)  # first event arrived; read_gap (sock_read) rules now
            waiting_first = False
        if log.backlogged:
            await log.writable()  # a slow reader pauses the upstream read (backpressure)
    if job.request.endpoint.ends_with_done:
        raise UpstreamConnectionError(f"Upstream {upstream.name} ended the stream before [DONE].")
    log.finish()
    return True


async def _drain(response: aiohttp.ClientResponse) -> bool:
    """Read what follows ``[DONE]`` (the end of the chunked body) so the connection can go
    back to the pool; returns False if that takes more than a second."""
    try:
        async with asyncio.timeout(1.0):
            await response.content.read()
    except (aiohttp.ClientError, TimeoutError):
        return False
    return True


def _handle_event(job: StreamJob, data: bytes, event: bytes | None) -> bool:
    """Append one upstream event to the log; returns True when the stream is over."""
    log = job.log
    if data == DONE:
        log.finish(_DONE_FRAME)
        return True
    obj = _loads_or_none(data) if _may_matter(data) else None
    if isinstance(obj, dict):
        error_body = normalize_error_body(obj) if ("error" in obj or obj.get("object") == "error") else None
        if error_body is not None and event in (None, b"error"):
            log.fail(UpstreamError(str(error_body["error"]["message"])),
                     encode_event(orjson.dumps(error_body)))
            return True
        if _meter(job, obj):
            return False
    if not job.metering.events:
        job.metering.first_event_at = time.perf_counter()
    job.metering.events += 1
    log.append(encode_event(data, event=event))
    return False


#: Byte patterns of the events the relay must look inside: errors (nested or vLLM's flat
#: ``"object":"error"``), usage objects, and the responses API's final event. JSON string
#: content escapes its quotes (``\"error\"``), so generated text cannot match ``"error"``.
_INTERESTING = (b'"error"', b'"usage":{', b'"usage": {', b'"response.completed"', b'"response.created"',
                b'"response.incomplete"', b'"response.failed"')

#: Responses stream events whose ``response`` carries the final ``usage`` (OpenAI API
#: reference, "Streaming events": completed, incomplete — e.g. cut by
#: ``max_output_tokens`` — and failed).
_RESPONSE_ENDINGS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _may_matter(data: bytes) -> bool:
    """Whether an event may be an error or carry usage; the others (almost every token
    chunk) are relayed without being parsed."""
    return any(pattern in data for pattern in _INTERESTING)


def _loads_or_none(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _meter(job: StreamJob, obj: JSONDict) -> bool:
    """Record usage from a chunk (and a Responses stream's response id); returns True if the
    chunk must be dropped (injected usage)."""
    if obj.get("type") == "response.created":
        response = obj.get("response")
        response_id = response.get("id") if isinstance(response, dict) else None
        if isinstance(response_id, str) and response_id:
            job.on_response_id(response_id)
    usage = obj.get("usage")
    if usage is None and obj.get("type") in _RESPONSE_ENDINGS:
        response = obj.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return False
    job.metering.usage = usage
    holder = obj.get("response") if obj.get("type") in _RESPONSE_ENDINGS else obj
    model = holder.get("model") if isinstance(holder, dict) else None
    if isinstance(model, str):
        job.metering.model = model
    return job.injected_usage and obj.get("choices") == []
