"""Configuration: YAML with ``${ENV}`` interpolation, validated once into frozen ``Settings``.

The YAML key names of DESIGN §4 "Config" are public. Python attribute names carry units
(``connect_s``, ``max_body_bytes``); the YAML keys stay short (``connect: 5s``).

Durations accept a number of seconds or a string with a unit: ``250ms``, ``30s``, ``5m``,
``1h``, ``1d``. Sizes accept a number of bytes or a string: ``512KiB``, ``10MiB``, ``1GiB``,
``10MB`` (SI, powers of 1000). ``${NAME}`` is replaced by the environment variable NAME (an
error if unset) and ``${NAME:-default}`` falls back to ``default``; ``$${`` writes a literal
``${``. Interpolation happens inside string values only, after YAML parsing, so a secret
holding YAML syntax cannot change the document's structure.

Every error names its key path (``upstreams.mock.timeouts.connect``) and all errors are
reported together in one ``ConfigError``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_ENV_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


MEMORY_WORKERS_MESSAGE = (
    "more than one worker needs state.backend: redis. With the memory backend each worker "
    "would keep its own limits, so every rpm/tpm/max_concurrent/budget would be multiplied "
    "by the number of workers. Set `state: {backend: redis, redis_url: redis://HOST:6379/0}` "
    "or run one worker."
)


class ConfigError(Exception):
    """The configuration is invalid. ``errors`` lists ``(key_path, message)`` pairs, all of them."""

    def __init__(self, errors: list[tuple[str, str]], source: str = "config") -> None:
        self.errors = errors
        self.source = source
        lines = [f"{source}: {len(errors)} error(s)"]
        lines += [f"  {path or '<root>'}: {message}" for path, message in errors]
        super().__init__("\n".join(lines))


def model_matches(patterns: tuple[str, ...], model: str) -> bool:
    """Whether ``model`` matches any shell-style pattern (``"*"`` any, ``gpt-4*`` a prefix)."""
    return any(p == "*" or p == model or fnmatchcase(model, p) for p in patterns)


def parse_duration_s(value: object) -> float:
    """``"30s"`` → 30.0, ``"250ms"`` → 0.25, ``5`` → 5.0 (seconds). Raises ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 250ms or 5m")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION_RE.match(str(value))
    if match is None:
        raise ValueError(f"invalid duration {value!r}: expected a number with ms, s, m, h or d")
    return float(match.group(1)) * _DURATION_UNITS_S[match.group(2)]


def parse_size_bytes(value: object) -> int:
    """``"10MiB"`` → 10485760, ``"1KB"`` → 1000, ``4096`` → 4096 (bytes). Raises ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 10MiB")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if match is None:
        raise ValueError(f"invalid size {value!r}: expected bytes or a unit like KiB, MiB, MB")
    unit = (match.group(2) or "b").lower()
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


DurationS = Annotated[float, BeforeValidator(parse_duration_s), Field(ge=0)]
PositiveDurationS = Annotated[float, BeforeValidator(parse_duration_s), Field(gt=0)]
SizeBytes = Annotated[int, BeforeValidator(parse_size_bytes), Field(gt=0)]
ModelPatterns = Annotated[tuple[str, ...], Field(min_length=1)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class ServerConfig(_Frozen):
    """``server:`` — the listener and request-level bounds.

    Listener bounds (``proxy.listener``), each per worker process: ``max_connections``
    client connections open at once (past it, or past what ``RLIMIT_NOFILE`` leaves after
    the upstream pools, a new connection is answered 503 ``overloaded`` and closed);
    ``header_timeout``: a connection whose request line and headers are not complete this
    long after it opened (or after the first byte of its next request) is closed
    (slowloris); ``body_timeout``: a request body not complete this long after its headers
    gets 408 and the connection is closed (a slow upload); ``keepalive_timeout``: an idle
    keep-alive connection is closed after it
    (keep it above the idle timeout of a load balancer in front, e.g. 60 s on AWS ALB);
    ``backlog``: the listen queue (``listen(2)``; the kernel caps it at
    ``net.core.somaxconn``). ``cors_origins``: browser origins (``https://app.example.com``,
    or ``*``) allowed to call the gateway cross-origin (``proxy.cors``; none by default).
    """

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    cpu_affinity: bool = False
    max_body_bytes: SizeBytes = 10 * 2**20
    sse_keepalive_s: PositiveDurationS = Field(15.0, alias="sse_keepalive")
    drain_timeout_s: DurationS = Field(30.0, alias="drain_timeout")
    access_log: bool = True
    max_connections: int = Field(10_000, ge=1)
    header_timeout_s: PositiveDurationS = Field(10.0, alias="header_timeout")
    body_timeout_s: PositiveDurationS = Field(60.0, alias="body_timeout")
    keepalive_timeout_s: PositiveDurationS = Field(15.0, alias="keepalive_timeout")
    backlog: int = Field(1024, ge=1, le=65535)
    cors_origins: tuple[str, ...] = ()

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
                raise ValueError(f"{origin!r} is not an origin: use scheme://host[:port] with no "
                                 "path (e.g. https://app.example.com), or *")
        return value


class StateConfig(_Frozen):
    """``state:`` — where shared state lives (``memory`` for one process, or ``redis``).

    ``redis_timeout``: the longest a limit check waits for Redis before the gateway falls
    back to per-process limits (``on_redis_error: open``, the default) or answers 503
    (``closed``). It counts Redis's time, not the gateway's: time the gateway's own event
    loop was late does not count (see ``proxy.limits_redis.RedisLimitStore._reply``).
    ``key_prefix`` starts every Redis key the gateway writes. ``fallback_share_floor``:
    while Redis is down each of the N instances alive before (counted from heartbeats)
    applies ``limit // N`` of every limit, but at least this many requests, tokens or
    concurrent requests (see ``proxy.limits``).
    """

    backend: Literal["memory", "redis"] = "memory"
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_timeout_s: PositiveDurationS = Field(0.05, alias="redis_timeout")
    on_redis_error: Literal["open", "closed"] = "open"
    key_prefix: str = "shepherd:"
    fallback_share_floor: int = Field(1, ge=1)


class LimitsConfig(_Frozen):
    """``limits:`` — gateway-wide limit settings.

    ``default_reserve_tokens``: completion tokens reserved against TPM and budgets when a
    request sets no ``max_tokens``. ``lease_ttl``: how long a concurrency lease outlives a
    process that died holding it (live leases are refreshed every third of it).
    ``block_ttl`` and ``block_max_requests`` (Redis backend only): a busy key far from its
    limits is admitted from blocks of quota taken from Redis, each usable for ``block_ttl``
    and holding at most ``block_max_requests`` requests; ``block_ttl: 0`` checks every
    request in Redis (see ``proxy.limits_redis.RedisLimitStore``).
    """

    default_reserve_tokens: int = Field(1024, ge=0)
    lease_ttl_s: PositiveDurationS = Field(60.0, alias="lease_ttl")
    block_ttl_s: DurationS = Field(0.25, alias="block_ttl", le=10.0)
    block_max_requests: int = Field(256, ge=4, le=4096)


class RateLimits(_Frozen):
    """Limits of one scope: a key, or one model of a key (``keys.<name>.per_model.<model>``).

    ``rpm``: requests per minute (GCRA); ``burst``: requests that may arrive at once
    (default: 10 seconds' worth of ``rpm``, at least 1); ``tpm``: tokens per minute (token
    bucket holding one minute's worth); ``max_concurrent``: requests in flight. ``None`` is
    unlimited.
    """

    rpm: int | None = Field(None, ge=1)
    burst: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)

    @property
    def effective_burst(self) -> int | None:
        """``burst``, or 10 seconds' worth of ``rpm`` (at least 1); ``None`` without ``rpm``."""
        if self.rpm is None:
            return None
        return self.burst if self.burst is not None else max(1, self.rpm // 6)

    @property
    def limited(self) -> bool:
        """Whether any limit is set."""
        return any(v is not None for v in (self.rpm, self.tpm, self.max_concurrent))


class BudgetConfig(_Frozen):
    """``keys.<name>.budget:`` — spend allowed per ``period`` (fixed windows from the Unix
    epoch, so ``1d`` is a UTC day): ``tokens`` and/or ``usd``."""

    tokens: int | None = Field(None, ge=1)
    usd: float | None = Field(None, gt=0)
    period_s: PositiveDurationS = Field(86400.0, alias="period")

    @model_validator(mode="after")
    def _something(self) -> BudgetConfig:
        if self.tokens is None and self.usd is None:
            raise ValueError("set `tokens`, `usd` or both")
        return self


class PriceConfig(_Frozen):
    """``models.<id>.price:`` — USD per million input and output tokens."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class ModelConfig(_Frozen):
    """``models.<id>:`` — per-model settings: its ``price``, and ``upstreams`` naming the
    deployments that serve it (in addition to those whose ``models`` patterns match)."""

    price: PriceConfig | None = None
    upstreams: tuple[str, ...] = ()


class StreamsConfig(_Frozen):
    """``streams:`` — stream logs and reconnection (DESIGN §4 "Reconnection").

    ``buffer``: unsent bytes at which the upstream read pauses for a slow (or absent)
    client, resuming below half; ``retain``: bytes of sent events kept per stream for
    resumers. ``detach_timeout``: how long a stream whose client left keeps generating
    before it is cancelled (nobody re-attached). ``retention``: how long a finished stream
    stays resumable. ``max_total_bytes``: bytes all stream logs of a process may hold
    (finished ones are evicted oldest first; past it new streams get 503).
    ``producer_timeout``: with ``state.backend: redis``, how long readers on other
    instances wait for a silent producer's heartbeat before ending the stream with
    ``stream_interrupted``. ``redis_maxlen``: events kept per stream in Redis (MAXLEN).
    """

    buffer_bytes: SizeBytes = Field(256 * 1024, alias="buffer")
    retain_bytes: SizeBytes = Field(1024 * 1024, alias="retain")
    detach_timeout_s: DurationS = Field(30.0, alias="detach_timeout")
    retention_s: DurationS = Field(300.0, alias="retention")
    max_total_bytes: SizeBytes = Field(256 * 2**20, alias="max_total_bytes")
    producer_timeout_s: PositiveDurationS = Field(10.0, alias="producer_timeout")
    redis_maxlen: int = Field(100_000, ge=16)


class WebSocketConfig(_Frozen):
    """``ws:`` — every WebSocket endpoint (DESIGN §4 "WebSocket").

    ``max_in_flight``: requests one socket may have running at once (``/v1/ws``; past it an
    ``error`` frame ``too_many_requests_in_flight``). ``idle_timeout``: a socket that sends
    nothing and has nothing in flight this long is closed with 1001 (going away).
    ``heartbeat``: the server pings this often and closes a socket whose pong does not come
    back within half of it (RFC 6455 §5.5.2). ``max_frame``: the largest message accepted
    (larger: closed with 1009, message too big; RFC 6455 §7.4.1).
    """

    max_in_flight: int = Field(16, ge=1)
    idle_timeout_s: PositiveDurationS = Field(300.0, alias="idle_timeout")
    heartbeat_s: PositiveDurationS = Field(30.0, alias="heartbeat")
    max_frame_bytes: SizeBytes = Field(4 * 2**20, alias="max_frame")


class RetryConfig(_Frozen):
    """``routing.retry:`` — retries before the first byte reaches the client.

    ``attempts``: tries per request in all (1 = no retry). Backoff before retry k is
    uniform in [0, min(backoff_max, backoff_base * 2^k)] ("full jitter"). The retry budget
    lets at most ``budget_percent`` % of the requests in flight be retries, but always at
    least ``budget_min`` (Envoy's retry budget), so a failing upstream is never hammered.
    """

    attempts: int = Field(3, ge=1)
    backoff_base_s: DurationS = Field(0.05, alias="backoff_base")
    backoff_max_s: DurationS = Field(1.0, alias="backoff_max")
    budget_percent: float = Field(20.0, ge=0, le=100)
    budget_min: int = Field(3, ge=0)


class RoutingConfig(_Frozen):
    """``routing:`` — ``max_ejection_percent`` of a model's deployments may be ejected at
    once (at least one). ``panic_threshold_percent`` (Envoy's panic threshold): when the
    healthy share of the serving tier of a model's deployments is below it, its ejected
    deployments take traffic too, so a model whose only deployment was ejected is still
    served rather than answered 503 (0 turns panic off; ``proxy.balancer`` has the rules).
    ``retry`` as ``RetryConfig``."""

    max_ejection_percent: float = Field(50.0, ge=0, le=100)
    panic_threshold_percent: float = Field(50.0, ge=0, le=100)
    retry: RetryConfig = Field(default_factory=RetryConfig)


class TimeoutsConfig(_Frozen):
    """``upstreams.<name>.timeouts:`` — no total timeout exists, so long streams are never cut.

    ``connect``: TCP (and TLS) connect. ``first_byte``: from sending the request to the
    response headers and, for streams, the first event. ``read_gap``: the longest silence
    between two reads of the response body.
    """

    connect_s: PositiveDurationS = Field(5.0, alias="connect")
    first_byte_s: PositiveDurationS = Field(60.0, alias="first_byte")
    read_gap_s: PositiveDurationS = Field(120.0, alias="read_gap")


class HealthCheckConfig(_Frozen):
    """``upstreams.<name>.health_check:`` — active probes: ``GET <base_url><path>`` every
    ``interval``; ``unhealthy_threshold`` consecutive failures (error, non-2xx, or no answer
    within ``timeout``) mark the upstream unhealthy, ``healthy_threshold`` successes healthy
    again. The default path ``/models`` is never a billable completion."""

    enabled: bool = True
    path: str = "/models"
    interval_s: PositiveDurationS = Field(10.0, alias="interval")
    timeout_s: PositiveDurationS = Field(3.0, alias="timeout")
    healthy_threshold: int = Field(2, ge=1)
    unhealthy_threshold: int = Field(3, ge=1)


class OutlierConfig(_Frozen):
    """``upstreams.<name>.outlier_detection:`` — passive ejection: ``consecutive_failures``
    connect errors, timeouts or 5xx in a row eject the upstream for ``base_ejection`` times
    2^(ejections so far), at most ``max_ejection``."""

    consecutive_failures: int = Field(5, ge=1)
    base_ejection_s: PositiveDurationS = Field(30.0, alias="base_ejection")
    max_ejection_s: PositiveDurationS = Field(300.0, alias="max_ejection")


class UpstreamConfig(_Frozen):
    """``upstreams.<name>:`` — one OpenAI-compatible deployment.

    ``priority``: tier, lower is preferred (higher tiers take traffic only when no deployment
    of a lower tier is available); ``weight``: share within a tier. ``max_in_flight``
    requests at once (default ``max_connections``; it also sizes the keep-alive pool),
    ``max_queue`` more may wait up to ``queue_timeout``. ``max_response_bytes``: the
    largest body taken from it, counted after decompression (a unary answer, or a whole
    stream); past it the request fails with 502 ``upstream_response_too_large``.
    ``realtime``: it serves the Realtime API WebSocket at ``<base_url>/realtime``, so
    ``GET /v1/realtime`` may be relayed to it (default false).
    """

    base_url: str
    api_key: SecretStr | None = None
    models: ModelPatterns = ("*",)
    priority: int = Field(0, ge=0)
    weight: int = Field(1, ge=1)
    max_connections: int = Field(100, ge=1)
    max_in_flight: int | None = Field(None, ge=1)
    max_queue: int = Field(1000, ge=0)
    queue_timeout_s: DurationS = Field(10.0, alias="queue_timeout")
    keepalive_expiry_s: PositiveDurationS = Field(15.0, alias="keepalive_expiry")
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    health_check: HealthCheckConfig = Field(default_factory=HealthCheckConfig)
    outlier_detection: OutlierConfig = Field(default_factory=OutlierConfig)
    organization: str | None = None
    project: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    inject_stream_usage: bool = True
    max_response_bytes: SizeBytes = 64 * 2**20
    realtime: bool = False

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        if not re.match(r"^https?://[^/\s]+/\S", value):
            raise ValueError("must include the API's path, e.g. https://api.openai.com/v1 or "
                             "http://127.0.0.1:8000/v1 (the gateway appends /chat/completions "
                             "and the like to it)")
        return value.rstrip("/")

    @property
    def slots(self) -> int:
        """Requests this upstream takes at once: ``max_in_flight``, else ``max_connections``."""
        return self.max_in_flight if self.max_in_flight is not None else self.max_connections


class KeyLimitsConfig(RateLimits):
    """A virtual key without its secret: its models, its limits (``RateLimits``), optional
    per-model limits and a budget, its ``priority`` in admission queues (higher is served
    first; default 0), and ``max_websockets``: WebSockets it may hold open at once, per
    process (default 64). ``POST /admin/keys`` validates its body with this model."""

    models: ModelPatterns = ("*",)
    per_model: dict[str, RateLimits] = Field(default_factory=dict)
    budget: BudgetConfig | None = None
    priority: int = 0
    max_websockets: int = Field(64, ge=0)


class KeyConfig(KeyLimitsConfig):
    """``keys.<name>:`` — one virtual key: exactly one of ``key`` and ``key_sha256``, and
    everything of ``KeyLimitsConfig``."""

    key: SecretStr | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("set exactly one of `key` and `key_sha256`")
        return self


class LedgerConfig(_Frozen):
    """``ledger:`` — the usage ledger (``proxy.ledger``): one row per request, written in
    batches off the request path.

    ``url``: ``sqlite:///<path>`` (relative to the working directory; ``sqlite:////abs``
    for an absolute path; WAL mode) or ``postgresql://user:pass@host:port/db``.
    ``batch_size``: rows per insert; ``flush_interval``: the longest a row waits before
    its batch is written; ``buffer_rows``: rows held in memory while the database is slow
    or down (past it new rows are dropped and counted in
    ``shepherd_ledger_rows_dropped_total``); ``write_timeout``: the longest one batch
    insert (or a connect) may take before it is retried.
    """

    enabled: bool = True
    url: SecretStr = SecretStr("sqlite:///shepherd-usage.db")
    batch_size: int = Field(500, ge=1, le=10_000)
    flush_interval_s: PositiveDurationS = Field(1.0, alias="flush_interval")
    buffer_rows: int = Field(100_000, ge=1)
    write_timeout_s: PositiveDurationS = Field(5.0, alias="write_timeout")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if not (url.startswith("sqlite:///") or url.startswith(("postgresql://", "postgres://"))):
            raise ValueError("must start with sqlite:/// or postgresql://")
        if url.startswith("sqlite:///") and len(url) == len("sqlite:///"):
            raise ValueError("sqlite:/// needs a file path, e.g. sqlite:///shepherd-usage.db")
        return value


def _bare_admin_key(value: object) -> object:
    return {"key": value} if isinstance(value, str) else value


class AdminKeyConfig(_Frozen):
    """One entry of ``admin.keys``: exactly one of ``key`` and ``key_sha256`` (as in
    ``keys.<name>``) and an optional ``name`` for logs; a bare string is a ``key``."""

    name: str | None = None
    key: SecretStr | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="after")
    def _one_secret(self) -> AdminKeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("set exactly one of `key` and `key_sha256`")
        return self

    @property
    def digest_hex(self) -> str:
        """The lowercase hex SHA-256 of the admin key."""
        if self.key_sha256 is not None:
            return self.key_sha256.lower()
        assert self.key is not None
        return hashlib.sha256(self.key.get_secret_value().encode("utf-8")).hexdigest()


class AdminConfig(_Frozen):
    """``admin:`` — ``keys``: the keys that open ``/admin/*`` (none: the admin API answers
    403). They are separate from ``keys.<name>``: a virtual key never opens ``/admin``."""

    keys: tuple[Annotated[AdminKeyConfig, BeforeValidator(_bare_admin_key)], ...] = ()


class ObservabilityConfig(_Frozen):
    """``observability:`` — who may read ``/metrics`` and ``/readyz``, and traces.

    ``metrics_auth``: ``none`` (anyone; the default) or ``admin`` (an ``admin.keys`` key,
    as ``/admin/*``; ``/healthz`` stays open). ``otlp_endpoint``: an OTLP/HTTP traces URL
    (``http://collector:4318/v1/traces``) to export one span per request to, with the
    OpenTelemetry GenAI attributes (needs the ``otel`` extra); ``None``: no traces.
    ``service_name``: the traces' ``service.name``. ``max_model_labels``: distinct model
    ids metrics label beyond the configured ones (``models:`` and exact ``upstreams.*.models``
    entries); later ones are labelled ``other``, so ``models: ["*"]`` cannot grow series
    without bound.
    """

    metrics_auth: Literal["none", "admin"] = "none"
    otlp_endpoint: str | None = Field(None, pattern=r"^https?://")
    service_name: str = "shepherd"
    max_model_labels: int = Field(100, ge=0)


class Settings(_Frozen):
    """The whole validated configuration (frozen)."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    streams: StreamsConfig = Field(default_factory=StreamsConfig)
    ws: WebSocketConfig = Field(default_factory=WebSocketConfig)
    upstreams: dict[str, UpstreamConfig] = Field(min_length=1)
    keys: dict[str, KeyConfig] = Field(min_length=1)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)



def cross_field_errors(tree: object) -> list[tuple[str, str]]:
    """Problems that involve more than one key, found in the raw tree (after ``${ENV}``
    interpolation) so that they are reported together with every other error, each at the
    key path to change: a model routed to an unknown upstream, several workers with the
    memory backend, two keys with the same secret. Parts of the wrong type are skipped
    (their own errors say why)."""
    if not isinstance(tree, dict):
        return []
    errors: list[tuple[str, str]] = []
    upstreams, models = tree.get("upstreams"), tree.get("models")
    if isinstance(upstreams, dict) and isinstance(models, dict):
        for model_id, model in models.items():
            named = model.get("upstreams") if isinstance(model, dict) else None
            if isinstance(named, list):
                unknown = [name for name in named if name not in upstreams]
                if unknown:
                    errors.append((f"models.{model_id}.upstreams",
                                   f"names unknown upstreams {unknown}; known: {sorted(upstreams)}"))
    server, state = tree.get("server"), tree.get("state")
    workers = server.get("workers", 1) if isinstance(server, dict) else 1
    backend = state.get("backend", "memory") if isinstance(state, dict) else "memory"
    if isinstance(workers, int) and workers > 1 and backend == "memory":
        errors.append(("server.workers", MEMORY_WORKERS_MESSAGE))
    keys = tree.get("keys")
    if isinstance(keys, dict):
        owner: dict[str, str] = {}
        for name, cfg in keys.items():
            if not isinstance(cfg, dict):
                continue
            secret, digest = cfg.get("key"), cfg.get("key_sha256")
            if isinstance(secret, str):
                digest, field = hashlib.sha256(secret.encode("utf-8")).hexdigest(), "key"
            elif isinstance(digest, str):
                digest, field = digest.lower(), "key_sha256"
            else:
                continue
            if digest in owner:
                errors.append((f"keys.{name}.{field}", f"the same secret as keys.{owner[digest]}; "
                               "each key needs its own (a request could not tell them apart)"))
            else:
                owner[digest] = name
    return errors


def _tree_digest(entry: object) -> tuple[str, str] | None:
    """``(digest_hex, field)`` of a raw ``keys.<name>`` or ``admin.keys[i]`` entry."""
    if isinstance(entry, str):
        entry = {"key": entry}
    if not isinstance(entry, dict):
        return None
    secret, digest = entry.get("key"), entry.get("key_sha256")
    if isinstance(secret, str):
        return hashlib.sha256(secret.encode("utf-8")).hexdigest(), "key"
    if isinstance(digest, str):
        return digest.lower(), "key_sha256"
    return None


def admin_key_errors(tree: object) -> list[tuple[str, str]]:
    """An ``admin.keys`` entry with the secret of a virtual key (``keys.<name>``): that key
    would open ``/admin``. Found in the raw tree, like ``cross_field_errors``."""
    if not isinstance(tree, dict):
        return []
    admin, keys = tree.get("admin"), tree.get("keys")
    entries = admin.get("keys") if isinstance(admin, dict) else None
    if not isinstance(entries, list) or not isinstance(keys, dict):
        return []
    virtual = {found[0]: name for name, cfg in keys.items() if (found := _tree_digest(cfg)) is not None}
    errors: list[tuple[str, str]] = []
    for index, entry in enumerate(entries):
        found = _tree_digest(entry)
        if found is not None and found[0] in virtual:
            path = f"admin.keys.{index}" + ("" if isinstance(entry, str) else f".{found[1]}")
            errors.append((path, f"the same secret as keys.{virtual[found[0]]}; an admin key "
                                 "must differ from every virtual key"))
    return errors


def interpolate_env(
    tree: object, env: Mapping[str, str], path: str = "", errors: list[tuple[str, str]] | None = None
) -> object:
    """Return ``tree`` with ``${NAME}`` / ``${NAME:-default}`` replaced in every string.

    Unset variables without a default are appended to ``errors`` as ``(key_path, message)``.
    """
    errors = [] if errors is None else errors
    if isinstance(tree, dict):
        return {k: interpolate_env(v, env, _join(path, k), errors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [interpolate_env(v, env, _join(path, i), errors) for i, v in enumerate(tree)]
    if not isinstance(tree, str) or "$" not in tree:
        return tree

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        errors.append((path, f"environment variable {name} is not set (use ${{{name}:-default}})"))
        return ""

    return _ENV_RE.sub(substitute, tree)


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _loc_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def load_settings(raw: object, env: Mapping[str, str] | None = None, source: str = "config") -> Settings:
    """Validate a parsed YAML tree into ``Settings``.

    Raises:
        ConfigError: listing every problem with its key path.
    """
    errors: list[tuple[str, str]] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([("", "the top level must be a mapping")], source)
    tree = interpolate_env(raw, os.environ if env is None else env, errors=errors)
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as exc:
        env_paths = {path for path, _ in errors}  # an unset variable already explains these
        errors += [(p, e["msg"]) for e in exc.errors() if (p := _loc_path(e["loc"])) not in env_paths]
    errors += cross_field_errors(tree)
    errors += admin_key_errors(tree)
    if errors:
        raise ConfigError(errors, source)
    return settings


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what the YAML error is, without quoting the line (it may hold a secret)."""
    problem = getattr(exc, "problem", None) or "invalid YAML"
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_settings_file(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the YAML file at ``path``.

    Raises:
        ConfigError: the file is unreadable, not YAML, or invalid (all errors listed).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError([("", f"cannot read: {exc.strerror}")], str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError([("", _yaml_problem(exc))], str(path)) from None
    return load_settings(raw, env, source=str(path))
