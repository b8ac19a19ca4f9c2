"""OpenAI-compatible fake upstream with latency and fault knobs, for tests and load tests.

Run it standalone (uses uvloop when installed; prints one "listening" line when ready)::

    python scripts/mock_upstream.py --port 9001 [--host 127.0.0.1] [--ttft-ms 200] ...

or serve it from a test as an aiohttp app::

    from scripts.mock_upstream import MockConfig, create_app, expected_text
    app = create_app(MockConfig(tokens=16))

Deterministic output
--------------------
Token ``i`` (0-based) of every answer is ``WORDS[i % len(WORDS)] + " "``, so an answer of
``n`` tokens is exactly ``expected_text(n)``. An answer has ``min(tokens, limit)`` tokens,
where the limit is ``max_completion_tokens``/``max_tokens`` (chat), ``max_tokens``
(completions) or ``max_output_tokens`` (responses); cut answers end with finish_reason
``"length"`` (responses: status ``"incomplete"``), others with ``"stop"``.
``prompt_tokens`` is the number of whitespace-separated words in the prompt (message
contents, text parts, instructions; a token array counts its length), at least 1. With
``n > 1``, ``completion_tokens = n * tokens``. Embeddings are derived from a hash of each
input, see ``embedding_vector``.

Endpoints
---------
``GET  /v1/models``             the ids in ``MODEL_IDS``
``GET  /v1/models/{id}``        any id is served; ``/`` allowed, ``%2F`` decoded
``POST /v1/chat/completions``   JSON or SSE (``"stream": true``); ``n``,
                                ``stream_options.include_usage``
``POST /v1/completions``        JSON or SSE, ``object: "text_completion"``
``POST /v1/embeddings``         ``input``: str | [str] | [int] | [[int]];
                                ``encoding_format``: ``float`` | ``base64`` (little-endian
                                float32); ``dimensions`` (default 8)
``POST /v1/responses``          JSON or typed SSE events (``event:`` + ``data:``, no ``[DONE]``)
``GET  /v1/realtime?model=``    WebSocket speaking the Realtime API's GA event names (subprotocol
                                ``realtime`` selected when offered): ``session.created`` on
                                connect; ``session.update`` → ``session.updated``;
                                ``conversation.item.create`` → ``conversation.item.created``;
                                ``response.create`` → ``response.created``,
                                ``response.output_item.added``, ``response.content_part.added``,
                                one ``response.output_text.delta`` per token,
                                ``response.output_text.done``, ``response.content_part.done``,
                                ``response.output_item.done``, ``response.done`` (with
                                ``usage {input_tokens, output_tokens, total_tokens}``: input
                                counts the words of the instructions and of every item before
                                the response, earlier answers too; output counts the tokens;
                                ``response.max_output_tokens`` cuts it, status
                                ``incomplete``); a binary message is echoed back as binary;
                                anything else gets an ``error`` event
``*    /v1/<anything else>``    echo: ``{"method", "path", "raw_path", "query_string",
                                "headers", "body_b64"}`` for byte-exact passthrough tests
``GET  /mock/stats``            ``{"requests", "by_path", "open_streams", "streams_completed",
                                "streams_cancelled", "streams_reset", "realtime_open",
                                "realtime_sessions", "realtime_last_close"}``
                                (``realtime_last_close``: ``{"code", "reason"}`` the last
                                realtime client closed with, or null)
``GET  /mock/requests``         the last 200 ``/v1`` requests, oldest first:
                                ``[{"method", "path", "headers", "body"}]`` (body: JSON or null)
``POST /mock/reset``            zero the counters (not ``open_streams``), clear the request log

``/mock/*`` requests are not counted. A stream counts as cancelled when the client went away
before its end, as reset when ``reset-after`` aborted it, otherwise as completed.

Knobs
-----
Per request as a header (wins) or per process as a CLI flag / ``MockConfig`` field (the
flag is the field name with dashes). Units are in the names; a "chunk" is one SSE event,
``[DONE]`` included; k counts chunks.

==========================  =====================  ========================================
header                      field                  effect
==========================  =====================  ========================================
``x-mock-ttft-ms``          ``ttft_ms``            delay before the first response byte (0)
``x-mock-token-delay-ms``   ``token_delay_ms``     delay before each token; 0 never sleeps.
                                                   Non-stream answers wait
                                                   ttft + tokens * token delay
``x-mock-tokens``           ``tokens``             tokens per answer (``DEFAULT_TOKENS``)
``x-mock-status``           ``fail_status``        answer with this status (400-599) and an
                                                   OpenAI error body (429: type ``requests``,
                                                   code ``rate_limit_exceeded``; 5xx:
                                                   ``server_error``; other:
                                                   ``invalid_request_error``). CLI:
                                                   ``--fail-status``
``x-mock-error-body``       ``error_body``         ``json`` (default) or ``text``: the error
                                                   body is ``upstream exploded``, text/plain
``x-mock-retry-after``      ``retry_after``        with a fail status: ``Retry-After``
                                                   header, sent verbatim (seconds)
``x-mock-reset-after``      ``reset_after``        stream: abort the TCP connection (a
                                                   reset, not a clean end) after k chunks;
                                                   non-stream: abort instead of answering
``x-mock-silence-s``        ``silence_s``          stream: go silent this long after ...
``x-mock-silence-after``    ``silence_after``      ... chunk k (default 1), then continue
``x-mock-vllm-error-after`` ``vllm_error_after``   stream: after k chunks send the flat vLLM
                                                   error ``data: {"object": "error", ...}``
                                                   and end the stream, no ``[DONE]``
``x-mock-close-code``       ``close_code``         realtime: close the socket with this code
                                                   (1000-4999) after ``close-after`` events
``x-mock-close-reason``     ``close_reason``       ... and this reason (``mock close``)
``x-mock-close-after``      ``close_after``        ... k server events (default 1: right
                                                   after ``session.created``)
==========================  =====================  ========================================

On ``/v1/realtime`` the knobs mean: ``x-mock-status`` answers the handshake with that HTTP
status (no upgrade); ``ttft-ms`` delays the handshake; ``tokens`` and ``token-delay-ms`` shape
each response; ``reset-after`` aborts the TCP connection (no close frame) after k server
events; the ``close-*`` knobs close it cleanly with a chosen code and reason.

A malformed knob header is answered with 400 naming the header.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import orjson
from aiohttp import WSMsgType, web
from aiohttp.log import access_logger

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
DEFAULT_TOKENS = 8
DEFAULT_DIMENSIONS = 8
MODEL_IDS = ("mock-gpt", "mock-embed", "meta-llama/Llama-3.1-8B-Instruct")
MODEL_CREATED = 1700000000
REQUEST_LOG_SIZE = 200
MAX_N = 128
MAX_DIMENSIONS = 65536
TEXT_ERROR_BODY = "upstream exploded"

DONE = b"data: [DONE]\n\n"
# Marks a token boundary in a frame iterator: the writer sleeps token_delay_ms there.
GAP = b""
VLLM_ERROR = (
    b'data: {"object":"error","message":"mock vllm failure","type":"BadRequestError",'
    b'"param":null,"code":400}\n\n'
)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
JSON_TYPE = "application/json"


def token(i: int) -> str:
    """Token ``i`` (0-based) of every answer."""
    return WORDS[i % len(WORDS)] + " "


def expected_text(n_tokens: int) -> str:
    """The exact full content of an answer of ``n_tokens`` tokens."""
    return "".join(token(i) for i in range(n_tokens))


def embedding_vector(item: str | list[int], dimensions: int = DEFAULT_DIMENSIONS) -> list[float]:
    """Deterministic embedding of one input (a string or a token array).

    Values are k/32768 for k in [-32768, 32767], exact in float32, so the base64 encoding
    decodes to exactly these floats.
    """
    key = item.encode() if isinstance(item, str) else orjson.dumps(item)
    digest = hashlib.shake_256(key).digest(2 * dimensions)
    return [(h - 32768) / 32768 for h in struct.unpack(f"<{dimensions}H", digest)]


# --------------------------------------------------------------------------- knobs


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"must be >= 0, got {raw!r}")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"must be >= 0, got {raw!r}")
    return value


def _error_status(raw: str) -> int:
    value = int(raw)
    if not 400 <= value <= 599:
        raise ValueError(f"must be an HTTP error status 400-599, got {raw!r}")
    return value


def _close_code(raw: str) -> int:
    value = int(raw)
    if not 1000 <= value <= 4999:
        raise ValueError(f"must be a WebSocket close code 1000-4999, got {raw!r}")
    return value


def _error_body_kind(raw: str) -> str:
    if raw not in ("json", "text"):
        raise ValueError(f"must be 'json' or 'text', got {raw!r}")
    return raw


@dataclass(frozen=True, slots=True)
class MockConfig:
    """Per-process knob defaults; ``x-mock-*`` request headers override them per request.

    ``None`` means the fault is off. Units are in the field names (see the module docstring).
    """

    ttft_ms: float = 0.0
    token_delay_ms: float = 0.0
    tokens: int = DEFAULT_TOKENS
    fail_status: int | None = None
    error_body: str = "json"
    retry_after: str | None = None
    reset_after: int | None = None
    silence_s: float = 0.0
    silence_after: int = 1
    vllm_error_after: int | None = None
    close_code: int | None = None
    close_reason: str = "mock close"
    close_after: int = 1


# (request header, MockConfig field, parser, CLI help) — CLI flags are the field names.
KNOBS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("x-mock-ttft-ms", "ttft_ms", _non_negative_float, "delay before the first byte, ms"),
    ("x-mock-token-delay-ms", "token_delay_ms", _non_negative_float, "delay per token, ms"),
    ("x-mock-tokens", "tokens", _non_negative_int, "tokens per answer"),
    ("x-mock-status", "fail_status", _error_status, "answer every request with this status"),
    ("x-mock-error-body", "error_body", _error_body_kind, "error body: json or text"),
    ("x-mock-retry-after", "retry_after", str, "Retry-After value sent with fail-status"),
    ("x-mock-reset-after", "reset_after", _non_negative_int, "abort streams after k chunks"),
    ("x-mock-silence-s", "silence_s", _non_negative_float, "go silent this long, seconds"),
    ("x-mock-silence-after", "silence_after", _non_negative_int, "... after chunk k"),
    ("x-mock-vllm-error-after", "vllm_error_after", _non_negative_int, "vLLM error after k chunks"),
    ("x-mock-close-code", "close_code", _close_code, "realtime: close with this code ..."),
    ("x-mock-close-reason", "close_reason", str, "... and this reason ..."),
    ("x-mock-close-after", "close_after", _non_negative_int, "... after k server events"),
)


class MockReply(Exception):
    """Raised by a handler to answer at once with ``response`` (errors, injected faults)."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


def resolve_knobs(headers: Mapping[str, str], config: MockConfig) -> MockConfig:
    """``config`` with the ``x-mock-*`` headers applied.

    Raises MockReply(400) naming the header if one is malformed.
    """
    overrides: dict[str, Any] = {}
    for header, name, parse, _ in KNOBS:
        raw = headers.get(header)
        if raw is None:
            continue
        try:
            overrides[name] = parse(raw)
        except ValueError as exc:
            raise MockReply(error_response(400, f"bad {header} header: {exc}", param=header)) from None
    return replace(config, **overrides) if overrides else config


# --------------------------------------------------------------------------- responses


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=JSON_TYPE, headers=headers)


def _error_kind(status: int) -> tuple[str, str | None]:
    """OpenAI's ``(type, code)`` for an HTTP error status."""
    if status == 429:
        return "requests", "rate_limit_exceeded"
    if status >= 500:
        return "server_error", None
    return "invalid_request_error", None


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    """An OpenAI-shaped error: ``{"error": {"message", "type", "param", "code"}}``."""
    err_type, code = _error_kind(status)
    error = {"message": message, "type": err_type, "param": param, "code": code}
    return json_response({"error": error}, status=status)


def fault_response(config: MockConfig) -> web.Response:
    """The injected failure for ``config.fail_status`` (which must be set)."""
    status = config.fail_status or 500
    if config.error_body == "text":
        response = web.Response(status=status, text=TEXT_ERROR_BODY)
    else:
        response = error_response(status, f"mock upstream failure (status {status})")
    if config.retry_after is not None:
        response.headers["Retry-After"] = config.retry_after
    return response


def _sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _sse_event(kind: str, payload: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


# --------------------------------------------------------------------------- app state


@dataclass(slots=True)
class MockStats:
    """Request and stream counters plus a bounded log of recent ``/v1`` requests."""

    requests: int = 0
    by_path: Counter[str] = field(default_factory=Counter)
    open_streams: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    streams_reset: int = 0
    realtime_open: int = 0
    realtime_sessions: int = 0
    realtime_last_close: dict[str, Any] | None = None
    log: deque[tuple[str, str, Mapping[str, str], bytes]] = field(
        default_factory=lambda: deque(maxlen=REQUEST_LOG_SIZE)
    )

    def __repr__(self) -> str:
        return (
            f"<MockStats requests={self.requests} open_streams={self.open_streams} "
            f"completed={self.streams_completed} cancelled={self.streams_cancelled} "
            f"reset={self.streams_reset}>"
        )

    def record(self, request: web.Request, body: bytes) -> None:
        """Count a request and keep it in the log (headers and body are decoded lazily)."""
        self.requests += 1
        self.by_path[request.path] += 1
        self.log.append((request.method, request.path, request.headers, body))

    def end_stream(self, outcome: str) -> None:
        self.open_streams -= 1
        if outcome == "completed":
            self.streams_completed += 1
        elif outcome == "reset":
            self.streams_reset += 1
        else:
            self.streams_cancelled += 1

    def reset(self) -> None:
        """Zero the counters and clear the log; ``open_streams`` is a gauge and is kept."""
        self.requests = self.streams_completed = self.streams_cancelled = self.streams_reset = 0
        self.realtime_sessions = 0
        self.realtime_last_close = None
        self.by_path.clear()
        self.log.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_path": dict(self.by_path),
            "open_streams": self.open_streams,
            "streams_completed": self.streams_completed,
            "streams_cancelled": self.streams_cancelled,
            "streams_reset": self.streams_reset,
            "realtime_open": self.realtime_open,
            "realtime_sessions": self.realtime_sessions,
            "realtime_last_close": self.realtime_last_close,
        }


CONFIG_KEY = web.AppKey("mock_config", MockConfig)
STATS_KEY = web.AppKey("mock_stats", MockStats)
# Serial numbers for response ids: chatcmpl-mock-1, resp_mock_2, ...
NEXT_ID_KEY: web.AppKey[Callable[[], int]] = web.AppKey("mock_next_id")


# --------------------------------------------------------------------------- request helpers


async def _begin(request: web.Request) -> tuple[MockConfig, bytes]:
    """Record the request, resolve its knobs and wait ttft. Raises MockReply for faults."""
    raw = await request.read()
    request.app[STATS_KEY].record(request, raw)
    config = resolve_knobs(request.headers, request.app[CONFIG_KEY])
    if config.ttft_ms:
        await asyncio.sleep(config.ttft_ms / 1000)
    if config.fail_status is not None:
        raise MockReply(fault_response(config))
    return config, raw


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MockReply(error_response(400, f"body is not valid JSON: {exc}")) from None
    if not isinstance(body, dict):
        raise MockReply(error_response(400, "body must be a JSON object"))
    return body


def _int_field(body: Mapping[str, Any], name: str, default: int | None, low: int, high: int) -> Any:
    """``body[name]`` checked to be an int in [low, high]; ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MockReply(error_response(400, f"{name} must be an integer in [{low}, {high}]", param=name))
    return value


def _answer_length(config: MockConfig, limit: int | None) -> tuple[int, bool]:
    """``(tokens, cut)``: tokens generated and whether ``limit`` (max_tokens) cut the answer."""
    if limit is not None and limit < config.tokens:
        return limit, True
    return config.tokens, False


def _words(value: Any) -> int:
    """Word count of a prompt: strings, token arrays, messages' content, parts' text."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return _words(value.get("content")) + _words(value.get("text"))
    return 0


def _usage(prompt: Any, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = max(1, _words(prompt))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _wants_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _meta(request: web.Request, body: Mapping[str, Any], prefix: str, kind: str) -> dict[str, Any]:
    """The fields every completion object or chunk starts with."""
    return {
        "id": f"{prefix}{request.app[NEXT_ID_KEY]()}",
        "object": kind,
        "created": int(time.time()),
        "model": body.get("model") or MODEL_IDS[0],
    }


def _abort(request: web.Request) -> None:
    """Reset the TCP connection (RST where the OS allows), not a clean close."""
    if request.transport is not None:
        request.transport.abort()


async def _reply(request: web.Request, config: MockConfig, payload: Any, n_tokens: int) -> web.Response:
    """A non-stream answer after ``n_tokens`` token delays; aborts instead if reset-after is set."""
    if config.token_delay_ms and n_tokens:
        await asyncio.sleep(config.token_delay_ms * n_tokens / 1000)
    if config.reset_after is not None:
        _abort(request)
    return json_response(payload)


# --------------------------------------------------------------------------- streaming


async def _write_frames(
    request: web.Request, resp: web.StreamResponse, config: MockConfig, frames: Iterator[bytes]
) -> str:
    """Write each frame, applying delays and faults. Returns the outcome: completed | reset."""
    delay_s = config.token_delay_ms / 1000
    written = 0
    for frame in frames:
        if not frame:  # GAP
            if delay_s:
                await asyncio.sleep(delay_s)
            continue
        if written == config.silence_after and config.silence_s:
            await asyncio.sleep(config.silence_s)
        if written == config.reset_after:
            _abort(request)
            return "reset"
        if written == config.vllm_error_after:
            await resp.write(VLLM_ERROR)
            break
        await resp.write(frame)
        written += 1
    await resp.write_eof()
    return "completed"


async def _stream(request: web.Request, config: MockConfig, frames: Iterator[bytes]) -> web.StreamResponse:
    """Send ``frames`` as an SSE response, counting how the stream ended.

    A client that goes away shows up as ConnectionResetError on write (or as cancellation
    when the server cancels handlers); both count as a cancelled stream.
    """
    stats = request.app[STATS_KEY]
    resp = web.StreamResponse(headers=SSE_HEADERS)
    stats.open_streams += 1
    outcome = "cancelled"
    try:
        await resp.prepare(request)
        outcome = await _write_frames(request, resp, config, frames)
    except ConnectionResetError:
        pass
    finally:
        stats.end_stream(outcome)
    return resp


def _stream_tail(meta: Mapping[str, Any], usage: dict[str, int] | None) -> Iterator[bytes]:
    """The usage chunk (only when asked for) and ``[DONE]``."""
    if usage is not None:
        yield _sse({**meta, "choices": [], "usage": usage})
    yield DONE


# --------------------------------------------------------------------------- chat completions


def _chat_frames(
    meta: dict[str, Any], n: int, n_tokens: int, finish: str, usage: dict[str, int] | None
) -> Iterator[bytes]:
    """Role chunk, one chunk per token per choice (the last with ``finish``), tail."""
    extra = {"usage": None} if usage is not None else {}
    for k in range(n_tokens + 1):
        if k:
            yield GAP
        delta = {"content": token(k - 1)} if k else {"role": "assistant", "content": ""}
        reason = finish if k == n_tokens else None
        for i in range(n):
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            yield _sse({**meta, "choices": [choice], **extra})
    yield from _stream_tail(meta, usage)


def _chat_choice(index: int, text: str, finish: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None}
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, OpenAI chat API (JSON or SSE)."""
    config, raw = await _begin(request)
    body = _json_body(raw)
    n = _int_field(body, "n", 1, 1, MAX_N)
    limit = _int_field(body, "max_completion_tokens", None, 0, 2**31)
    limit = _int_field(body, "max_tokens", None, 0, 2**31) if limit is None else limit
    n_tokens, cut = _answer_length(config, limit)
    finish = "length" if cut else "stop"
    usage = _usage(body.get("messages"), n * n_tokens)
    if body.get("stream"):
        meta = _meta(request, body, "chatcmpl-mock-", "chat.completion.chunk")
        frames = _chat_frames(meta, n, n_tokens, finish, usage if _wants_usage(body) else None)
        return await _stream(request, config, frames)
    text = expected_text(n_tokens)
    payload = _meta(request, body, "chatcmpl-mock-", "chat.completion")
    payload["choices"] = [_chat_choice(i, text, finish) for i in range(n)]
    payload["usage"] = usage
    return await _reply(request, config, payload, n_tokens)


# --------------------------------------------------------------------------- completions


def _completion_frames(
    meta: dict[str, Any], n: int, n_tokens: int, finish: str, usage: dict[str, int] | None
) -> Iterator[bytes]:
    """One chunk per token per choice (an empty-text chunk if no tokens), then the tail."""
    extra = {"usage": None} if usage is not None else {}
    steps = max(n_tokens, 1)
    for k in range(steps):
        yield GAP
        text = token(k) if k < n_tokens else ""
        reason = finish if k == steps - 1 else None
        for i in range(n):
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            yield _sse({**meta, "choices": [choice], **extra})
    yield from _stream_tail(meta, usage)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions, the legacy text completion API (JSON or SSE)."""
    config, raw = await _begin(request)
    body = _json_body(raw)
    n = _int_field(body, "n", 1, 1, MAX_N)
    n_tokens, cut = _answer_length(config, _int_field(body, "max_tokens", None, 0, 2**31))
    finish = "length" if cut else "stop"
    usage = _usage(body.get("prompt"), n * n_tokens)
    meta = _meta(request, body, "cmpl-mock-", "text_completion")
    if body.get("stream"):
        frames = _completion_frames(meta, n, n_tokens, finish, usage if _wants_usage(body) else None)
        return await _stream(request, config, frames)
    text = expected_text(n_tokens)
    choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": finish} for i in range(n)]
    return await _reply(request, config, {**meta, "choices": choices, "usage": usage}, n_tokens)


# --------------------------------------------------------------------------- embeddings


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    """Normalise ``input`` to a list of strings or token arrays. Raises MockReply(400)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
        return value
    raise MockReply(error_response(400, "input must be a string, strings or token arrays", param="input"))


def _encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


async def embeddings(request: web.Request) -> web.StreamResponse:
    """POST /v1/embeddings with deterministic vectors (see ``embedding_vector``)."""
    config, raw = await _begin(request)
    body = _json_body(raw)
    inputs = _embedding_inputs(body.get("input"))
    dimensions = _int_field(body, "dimensions", DEFAULT_DIMENSIONS, 1, MAX_DIMENSIONS)
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise MockReply(
            error_response(400, "encoding_format must be float or base64", param="encoding_format")
        )
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _encode_embedding(embedding_vector(item, dimensions), encoding_format),
        }
        for i, item in enumerate(inputs)
    ]
    prompt_tokens = max(1, _words(inputs))
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    payload = {
        "object": "list",
        "data": data,
        "model": body.get("model") or MODEL_IDS[1],
        "usage": usage,
    }
    return await _reply(request, config, payload, 0)


# --------------------------------------------------------------------------- responses


def _response_message(item_id: str, n_tokens: int, status: str) -> dict[str, Any]:
    """The assistant ``message`` output item holding the answer text."""
    text = expected_text(n_tokens)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [part],
    }


def _response_usage(body: Mapping[str, Any], n_tokens: int) -> dict[str, Any]:
    """Responses API usage; ``input_tokens`` counts the words of ``input`` and ``instructions``."""
    input_tokens = max(1, _words(body.get("input")) + _words(body.get("instructions")))
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": n_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + n_tokens,
    }


def _response_object(
    request: web.Request, body: Mapping[str, Any], n_tokens: int, cut: bool
) -> dict[str, Any]:
    """The final ``response`` object (Responses API); ``cut`` means max_output_tokens ended it."""
    serial = request.app[NEXT_ID_KEY]()
    status = "incomplete" if cut else "completed"
    return {
        "id": f"resp_mock_{serial}",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "instructions": body.get("instructions"),
        "metadata": {},
        "model": body.get("model") or MODEL_IDS[0],
        "output": [_response_message(f"msg_mock_{serial}", n_tokens, status)],
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "text": {"format": {"type": "text"}},
        "usage": _response_usage(body, n_tokens),
    }


def _response_frames(final: dict[str, Any], n_tokens: int) -> Iterator[bytes]:
    """Typed Responses API events leading to ``final``, ``sequence_number`` from 0."""
    seq = itertools.count()

    def event(kind: str, **data: Any) -> bytes:
        return _sse_event(kind, {"type": kind, "sequence_number": next(seq), **data})

    item = final["output"][0]
    part = item["content"][0]
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    pending = {
        **final,
        "status": "in_progress",
        "incomplete_details": None,
        "output": [],
        "usage": None,
    }
    yield event("response.created", response=pending)
    yield event("response.in_progress", response=pending)
    yield event(
        "response.output_item.added",
        output_index=0,
        item={**item, "status": "in_progress", "content": []},
    )
    yield event("response.content_part.added", **where, part={**part, "text": ""})
    for k in range(n_tokens):
        yield GAP
        yield event("response.output_text.delta", **where, delta=token(k), logprobs=[])
    yield event("response.output_text.done", **where, text=part["text"], logprobs=[])
    yield event("response.content_part.done", **where, part=part)
    yield event("response.output_item.done", output_index=0, item=item)
    yield event(f"response.{final['status']}", response=final)


async def responses(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses, the Responses API (JSON or typed SSE events)."""
    config, raw = await _begin(request)
    body = _json_body(raw)
    n_tokens, cut = _answer_length(config, _int_field(body, "max_output_tokens", None, 0, 2**31))
    final = _response_object(request, body, n_tokens, cut)
    if body.get("stream"):
        return await _stream(request, config, _response_frames(final, n_tokens))
    return await _reply(request, config, final, n_tokens)


# --------------------------------------------------------------------------- realtime


@dataclass(slots=True)
class RealtimeSession:
    """One mock Realtime API session: its settings, the conversation's items and a count of
    the server events sent (for the ``close-after`` / ``reset-after`` knobs)."""

    request: web.Request
    ws: web.WebSocketResponse
    config: MockConfig
    session: dict[str, Any]
    items: list[dict[str, Any]] = field(default_factory=list)
    sent: int = 0
    ended: bool = False

    def next_id(self, prefix: str) -> str:
        return f"{prefix}{self.request.app[NEXT_ID_KEY]()}"

    async def send(self, kind: str, **data: Any) -> None:
        """Send one server event (``event_id`` and ``type`` added), then apply the close and
        reset knobs; ``ended`` is set once the socket is closed or aborted."""
        if self.ended:
            return
        event = {"event_id": self.next_id("event_mock_"), "type": kind, **data}
        await self.ws.send_str(orjson.dumps(event).decode())
        self.sent += 1
        config = self.config
        if config.reset_after is not None and self.sent >= config.reset_after:
            self.ended = True
            _abort(self.request)
        elif config.close_code is not None and self.sent >= config.close_after:
            self.ended = True
            await self.ws.close(code=config.close_code, message=config.close_reason.encode())

    async def error(self, message: str, code: str, event_id: object = None) -> None:
        """The Realtime API's ``error`` event; the session stays open."""
        await self.send("error", error={"type": "invalid_request_error", "code": code,
                                        "message": message, "param": None, "event_id": event_id})


def _realtime_session(session_id: str, model: str) -> dict[str, Any]:
    """The session object of ``session.created`` (GA shape, text output)."""
    return {"type": "realtime", "object": "realtime.session", "id": session_id, "model": model,
            "output_modalities": ["text"], "instructions": "", "tools": [], "tool_choice": "auto",
            "max_output_tokens": "inf"}


async def _realtime_item_create(rt: RealtimeSession, event: dict[str, Any]) -> None:
    item = event.get("item")
    if not isinstance(item, dict):
        await rt.error("conversation.item.create needs an `item` object", "missing_required_parameter",
                       event.get("event_id"))
        return
    previous = rt.items[-1]["id"] if rt.items else None
    item = {"id": rt.next_id("item_mock_"), "object": "realtime.item", "status": "completed", **item}
    rt.items.append(item)
    await rt.send("conversation.item.created", previous_item_id=previous, item=item)


def _realtime_limit(rt: RealtimeSession, response: dict[str, Any]) -> int | None:
    """``max_output_tokens`` of the response, else of the session; ``None`` for ``inf``."""
    limit = response.get("max_output_tokens", rt.session.get("max_output_tokens"))
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def _realtime_usage(rt: RealtimeSession, n_tokens: int) -> dict[str, Any]:
    """Realtime usage: input counts the words of the instructions and every item so far."""
    input_tokens = max(1, _words(rt.items) + _words(rt.session.get("instructions")))
    return {
        "total_tokens": input_tokens + n_tokens,
        "input_tokens": input_tokens,
        "output_tokens": n_tokens,
        "input_token_details": {"text_tokens": input_tokens, "audio_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": n_tokens, "audio_tokens": 0},
    }


async def _realtime_response(rt: RealtimeSession, event: dict[str, Any]) -> None:
    """``response.create``: the GA event sequence for a text answer, ``response.done`` last."""
    options = event.get("response") if isinstance(event.get("response"), dict) else {}
    n_tokens, cut = _answer_length(rt.config, _realtime_limit(rt, options))
    response_id, item_id = rt.next_id("resp_mock_"), rt.next_id("item_mock_")
    status = "incomplete" if cut else "completed"
    text = expected_text(n_tokens)
    part = {"type": "output_text", "text": text}
    item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant",
            "status": "completed", "content": [part]}
    pending = {"id": response_id, "object": "realtime.response", "status": "in_progress",
               "status_details": None, "output": [], "conversation_id": "conv_mock",
               "output_modalities": ["text"], "usage": None}
    where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
    await rt.send("response.created", response=pending)
    await rt.send("response.output_item.added", response_id=response_id, output_index=0,
                  item={**item, "status": "in_progress", "content": []})
    await rt.send("response.content_part.added", **where, part={**part, "text": ""})
    for k in range(n_tokens):
        if rt.config.token_delay_ms:
            await asyncio.sleep(rt.config.token_delay_ms / 1000)
        await rt.send("response.output_text.delta", **where, delta=token(k))
    await rt.send("response.output_text.done", **where, text=text)
    await rt.send("response.content_part.done", **where, part=part)
    await rt.send("response.output_item.done", response_id=response_id, output_index=0, item=item)
    usage = _realtime_usage(rt, n_tokens)
    rt.items.append(item)  # the input of later responses
    details = {"type": "incomplete", "reason": "max_output_tokens"} if cut else None
    await rt.send("response.done", response={**pending, "status": status, "status_details": details,
                                             "output": [item], "usage": usage})


async def _realtime_event(rt: RealtimeSession, raw: str) -> None:
    """Answer one client event."""
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        await rt.error("the message is not valid JSON", "invalid_json")
        return
    kind = event.get("type") if isinstance(event, dict) else None
    if kind == "session.update" and isinstance(event.get("session"), dict):
        rt.session.update(event["session"])
        await rt.send("session.updated", session=rt.session)
    elif kind == "conversation.item.create":
        await _realtime_item_create(rt, event)
    elif kind == "response.create":
        await _realtime_response(rt, event)
    else:
        event_id = event.get("event_id") if isinstance(event, dict) else None
        await rt.error(f"unsupported event type {kind!r}", "unknown_event", event_id)


async def realtime(request: web.Request) -> web.StreamResponse:
    """GET /v1/realtime?model=: the Realtime API over WebSocket (OpenAI API reference,
    "Realtime"), GA event names, text only. Knobs as in the module docstring."""
    config, _ = await _begin(request)
    model = request.query.get("model") or MODEL_IDS[0]
    ws = web.WebSocketResponse(protocols=("realtime",))
    await ws.prepare(request)
    stats = request.app[STATS_KEY]
    stats.realtime_open += 1
    stats.realtime_sessions += 1
    session = _realtime_session(f"sess_mock_{request.app[NEXT_ID_KEY]()}", model)
    rt = RealtimeSession(request, ws, config, session)
    try:
        await rt.send("session.created", session=rt.session)
        while not rt.ended:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                await _realtime_event(rt, msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            else:  # CLOSE (its code and reason are kept), CLOSING, CLOSED, ERROR
                if msg.type is WSMsgType.CLOSE:
                    stats.realtime_last_close = {"code": msg.data, "reason": msg.extra or ""}
                break
    except ConnectionResetError:
        pass
    finally:
        stats.realtime_open -= 1
    return ws


# --------------------------------------------------------------------------- models, echo


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": "mock"}


async def list_models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models."""
    config, _ = await _begin(request)
    return await _reply(request, config, {"object": "list", "data": [_model_object(m) for m in MODEL_IDS]}, 0)


async def retrieve_model(request: web.Request) -> web.StreamResponse:
    """GET /v1/models/{id}: any id is served; match_info is already percent-decoded."""
    config, _ = await _begin(request)
    return await _reply(request, config, _model_object(request.match_info["model_id"]), 0)


def _plain_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers as a JSON-able dict (``istr`` keys are not ``str`` for orjson); last value wins."""
    return {str(name): value for name, value in headers.items()}


async def echo(request: web.Request) -> web.StreamResponse:
    """Any other /v1 path and method: describe the request, body as base64 of the raw bytes."""
    config, raw = await _begin(request)
    payload = {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query_string": request.query_string,
        "headers": _plain_headers(request.headers),
        "body_b64": base64.b64encode(raw).decode(),
    }
    return await _reply(request, config, payload, 0)


# --------------------------------------------------------------------------- /mock/*


def _logged_body(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


async def mock_stats(request: web.Request) -> web.StreamResponse:
    """GET /mock/stats."""
    return json_response(request.app[STATS_KEY].snapshot())


async def mock_requests(request: web.Request) -> web.StreamResponse:
    """GET /mock/requests: the last REQUEST_LOG_SIZE /v1 requests, oldest first."""
    entries = [
        {
            "method": method,
            "path": path,
            "headers": _plain_headers(headers),
            "body": _logged_body(raw),
        }
        for method, path, headers, raw in request.app[STATS_KEY].log
    ]
    return json_response(entries)


async def mock_reset(request: web.Request) -> web.StreamResponse:
    """POST /mock/reset."""
    request.app[STATS_KEY].reset()
    return json_response({"ok": True})


# --------------------------------------------------------------------------- app


@web.middleware
async def _replies(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Turn a MockReply raised anywhere in a handler into its response."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except MockReply as reply:
        return reply.response


def create_app(config: MockConfig | None = None) -> web.Application:
    """The mock upstream as an aiohttp app; ``config`` holds the per-process knob defaults."""
    app = web.Application(middlewares=[_replies], client_max_size=1024**3)
    app[CONFIG_KEY] = config or MockConfig()
    app[STATS_KEY] = MockStats()
    app[NEXT_ID_KEY] = itertools.count(1).__next__
    app.router.add_get("/mock/stats", mock_stats)
    app.router.add_get("/mock/requests", mock_requests)
    app.router.add_post("/mock/reset", mock_reset)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", retrieve_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/realtime", realtime)
    app.router.add_route("*", "/v1/{tail:.*}", echo)
    return app


# --------------------------------------------------------------------------- standalone


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="OpenAI-compatible mock upstream (knobs: see module docstring)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument("--access-log", action="store_true", help="log every request (slow)")
    for _, name, parse, help_text in KNOBS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=parse, help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> MockConfig:
    """MockConfig from parsed flags; flags not given keep the MockConfig defaults."""
    given = {
        f.name: getattr(args, f.name) for f in fields(MockConfig) if getattr(args, f.name, None) is not None
    }
    return MockConfig(**given)


async def serve(app: web.Application, host: str, port: int, access_log: bool = False) -> None:
    """Serve ``app`` until cancelled; prints the listening line (with the real port) when ready."""
    runner = web.AppRunner(app, access_log=access_logger if access_log else None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=2048).start()
        bound_port = runner.addresses[0][1]
        print(f"mock upstream listening on http://{host}:{bound_port}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    app = create_app(config_from_args(args))
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(app, args.host, args.port, args.access_log))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
