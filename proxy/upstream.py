"""One pooled keep-alive ``aiohttp.ClientSession`` per upstream, the one way a request is
sent on it (``Upstream.send``), header hygiene, and how upstream failures map to the errors
clients see.

Each upstream gets its own ``TCPConnector`` (``max_connections``, keep-alive expiry, DNS
cache) and a ``ClientTimeout(total=None, sock_connect=connect, sock_read=read_gap)``: there is
no total timeout, because aiohttp's default 300 s total would cut long generations. Redirects
are never followed (a redirect from an upstream is answered to the client as the error it is).
"""

from __future__ import annotations

import asyncio
import errno
import io
import math
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import UpstreamConfig
from proxy.errors import (
    GatewayError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamInvalidResponseError,
    UpstreamResponseTooLargeError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from proxy.sse import SSEError

JSONDict = dict[str, Any]

#: Connect failures that are the gateway's own (out of descriptors, buffers, memory or
#: ephemeral ports): nothing reached the upstream, so they never count against it.
LOCAL_CONNECT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                                  errno.EADDRNOTAVAIL})

#: The retry hint sent with an upstream 429/503 that gave none, in seconds.
DEFAULT_RETRY_AFTER_S = 1.0

#: Request bodies larger than this are handed to aiohttp as a file-like object, which it
#: writes in pieces, awaiting each (a bytes body is written whole in one call; aiohttp warns
#: that this "might lock the event loop" past 1 MiB).
LARGE_BODY_BYTES = 2**20

#: aiohttp's response read buffer; reading pauses the socket at twice this (plus one socket read).
READ_BUFFER_BYTES = 64 * 1024

#: Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction, plus the
#: framing headers aiohttp recomputes for the body it actually sends.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization",
})

#: Client request headers never sent upstream: credentials for us (the upstream gets its own
#: key), routing overrides (a client must not pick where we send its key), and headers the
#: client session sets itself.
_DROP_TO_UPSTREAM = HOP_BY_HOP | frozenset({
    "host", "content-length", "authorization", "x-api-key", "api-key",
    "openai-organization", "openai-project", "api_base", "api-base", "base_url", "base-url",
    "cookie", "last-event-id", "idempotency-key", "x-request-id",
})

_DROP_JSON_TO_UPSTREAM = _DROP_TO_UPSTREAM | {"accept-encoding"}

#: Upstream response headers not copied to the client: framing is ours, and the upstream's
#: request id is renamed so that ``x-request-id`` is always the gateway's.
_DROP_TO_CLIENT = HOP_BY_HOP | frozenset({
    "content-length", "content-encoding", "date", "server", "x-request-id", "set-cookie",
})


Headers = CIMultiDictProxy[str] | CIMultiDict[str]


def connection_tokens(headers: Headers) -> set[str]:
    """Header names listed in every ``Connection`` line (also hop-by-hop, RFC 9110 §7.6.1;
    repeated lines form one list, §5.3), lowercased."""
    return {token.strip().lower() for value in headers.getall("Connection", ())
            for token in value.split(",") if token.strip()}


class Upstream:
    """One OpenAI-compatible deployment and its keep-alive pool.

    Args:
        name: the config name (``upstreams.<name>``); what logs and metrics show.
        config: the validated upstream config.

    ``start()`` opens the session; ``close()`` closes it. Both belong in ``app.cleanup_ctx``.
    """

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        self.base_url = URL(config.base_url)
        self._session: aiohttp.ClientSession | None = None
        self._connector: aiohttp.TCPConnector | None = None
        self._fixed_headers = self._build_fixed_headers()
        timeouts = config.timeouts
        #: For whole (non-stream) answers: no silence longer than ``first_byte`` while waiting
        #: for the response (an aiohttp timer per read, cheaper than a task-level timeout).
        self.unary_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect_s, sock_read=timeouts.first_byte_s)
        self._url_cache: dict[str, URL] = {}

    def __repr__(self) -> str:
        if self._connector is None:
            return f"<Upstream {self.name} {self.base_url} [closed]>"
        pool = self.pool_stats()
        return (f"<Upstream {self.name} {self.base_url} [Connections: {pool['in_use']} active, "
                f"{pool['idle']} idle, limit {self.config.max_connections}]>")

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled session. Raises ``RuntimeError`` before ``start()`` or after ``close()``."""
        if self._session is None:
            raise RuntimeError(f"upstream {self.name} is not started")
        return self._session

    async def start(self) -> None:
        """Open the keep-alive pool. Call once, from the running loop."""
        timeouts = self.config.timeouts
        self._connector = aiohttp.TCPConnector(
            limit=self.config.slots,
            limit_per_host=0,
            keepalive_timeout=self.config.keepalive_expiry_s,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=timeouts.connect_s, sock_read=timeouts.read_gap_s
            ),
            auto_decompress=True,
            read_bufsize=READ_BUFFER_BYTES,
            skip_auto_headers=("User-Agent",),
            raise_for_status=False,
            trust_env=False,
        )

    async def close(self) -> None:
        """Close the pool; in-flight requests on it fail. Safe to call twice."""
        if self._session is not None:
            await self._session.close()
        self._session = None
        self._connector = None

    async def probe(self, path: str, timeout_s: float) -> bool | None:
        """One active health probe: ``GET <base_url><path>``; True on a 2xx within
        ``timeout_s``, False otherwise, ``None`` when the gateway itself could not connect
        (short of descriptors or ports: says nothing of the upstream). Never raises
        (cancelling is safe)."""
        try:
            async with asyncio.timeout(timeout_s), self.session.get(
                self.url(path), headers=self._fixed_headers, allow_redirects=False
            ) as response:
                await response.read()
                return 200 <= response.status < 300
        except aiohttp.ClientConnectorError as exc:
            return None if exc.os_error.errno in LOCAL_CONNECT_ERRNOS else False
        except (aiohttp.ClientError, TimeoutError, RuntimeError):
            return False

    async def send(self, method: str, path: str, body: bytes | None, headers: Headers, *,
                   query_string: str = "", passthrough: bool = False,
                   client_timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientResponse:
        """Send one request and return the response once its headers arrived, whatever its
        status: the one way a request goes upstream. Redirects are not followed.

        Args:
            method, path: the HTTP method and the path below ``/v1`` (``/chat/completions``).
            body: the bytes to send, or ``None``.
            headers: the client's headers (cleaned by ``request_headers``).
            query_string: the raw query, percent-encoding kept.
            passthrough: relay byte for byte: the client's ``Accept-Encoding`` goes upstream
                and the body comes back still encoded.
            client_timeout: per-request aiohttp timeouts; ``None`` uses the session's
                (``sock_read = read_gap``). The caller bounds the wait for the first byte
                (``asyncio.timeout``) where one deadline must span more than the headers.

        The caller must release or close the response (``async with response``).

        Raises:
            UpstreamConnectionError: connect failure, or (``stale``) a pooled keep-alive
                connection the upstream had already closed (502).
            UpstreamTimeoutError: a timeout (504).
        Cancelling is safe: aiohttp closes the half-sent connection.
        """
        data: bytes | io.BytesIO | None = body
        if body is not None and len(body) > LARGE_BODY_BYTES:
            data = io.BytesIO(body)  # written in pieces, each awaited (aiohttp's BytesIOPayload)
        try:
            return await self.session.request(
                method, self.url(path, query_string), data=data, allow_redirects=False,
                headers=self.request_headers(headers, keep_encoding=passthrough),
                auto_decompress=not passthrough,
                timeout=client_timeout if client_timeout is not None else self.session.timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise request_error(self, exc) from None

    async def raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        """Read, release and raise an error response (status >= 300, redirects included);
        return at once for a 2xx.

        Raises:
            GatewayError: ``upstream_status_error`` of the answer.
        """
        if response.status < 300:
            return
        try:
            data = await response.read()
        except (aiohttp.ClientError, TimeoutError):
            data = b""
        finally:
            response.release()
        raise upstream_status_error(self, response.status, data, response.headers.get("Retry-After"))

    async def read_body(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole (decompressed) body of ``response``, at most ``max_response_bytes``;
        the response is released (closed when cut short).

        aiohttp decompresses in bounded pieces as the body is read, so a compression bomb
        costs at most one piece beyond the cap.

        Raises:
            UpstreamResponseTooLargeError: the body passed ``max_response_bytes`` (502).
            aiohttp.ClientError, TimeoutError: the body could not be read.
        Cancelling is safe: the connection is closed, not pooled half-read.
        """
        limit = self.config.max_response_bytes
        body = bytearray()
        async with response:
            async for chunk in response.content.iter_chunked(READ_BUFFER_BYTES):
                body += chunk
                if len(body) > limit:
                    response.close()
                    raise self.too_large()
        return bytes(body)

    def too_large(self) -> UpstreamResponseTooLargeError:
        """The error for a body past ``max_response_bytes``."""
        return UpstreamResponseTooLargeError(
            f"Upstream {self.name} sent more than max_response_bytes "
            f"({self.config.max_response_bytes} bytes after decompression).")

    def pool_stats(self) -> dict[str, int]:
        """Connections of the pool: ``in_use`` (checked out) and ``idle`` (kept alive)."""
        connector = self._connector
        if connector is None:
            return {"in_use": 0, "idle": 0}
        in_use = len(connector._acquired)
        idle = sum(len(conns) for conns in connector._conns.values())
        return {"in_use": in_use, "idle": idle}

    def url(self, path: str, query_string: str = "") -> URL:
        """The upstream URL for a client path below ``/v1`` (``/chat/completions``),
        percent-encoding kept byte for byte."""
        if not query_string:
            cached = self._url_cache.get(path)
            if cached is not None:
                return cached
        raw = str(self.base_url) + path + (f"?{query_string}" if query_string else "")
        url = URL(raw, encoded=True)
        if not query_string and len(self._url_cache) < 1024:
            self._url_cache[path] = url
        return url

    def request_headers(self, client_headers: Headers, *,
                        keep_encoding: bool = False) -> CIMultiDict[str]:
        """Headers for the upstream request built from the client's.

        Drops hop-by-hop headers, ``Host``, the client's credentials and routing overrides;
        adds this upstream's ``Authorization`` and configured headers. ``Accept-Encoding`` is
        forwarded only when ``keep_encoding`` (byte-exact passthrough); otherwise the session
        negotiates its own and decompresses.
        """
        drop = _DROP_JSON_TO_UPSTREAM if not keep_encoding else _DROP_TO_UPSTREAM
        if "Connection" in client_headers:
            drop = drop | connection_tokens(client_headers)
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in client_headers.items():
            if name.lower() not in drop:
                out.add(name, value)
        out.update(self._fixed_headers)
        return out

    def _build_fixed_headers(self) -> dict[str, str]:
        cfg = self.config
        headers = dict(cfg.headers)
        if cfg.api_key is not None:
            headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
        if cfg.organization:
            headers["OpenAI-Organization"] = cfg.organization
        if cfg.project:
            headers["OpenAI-Project"] = cfg.project
        return headers


def response_headers(upstream_headers: Headers, *, keep_encoding: bool = False
                     ) -> CIMultiDict[str]:
    """Upstream response headers fit to send to the client.

    Drops hop-by-hop and framing headers (and ``Content-Encoding`` unless ``keep_encoding``,
    when the body is relayed still encoded); the upstream's ``x-request-id`` becomes
    ``x-upstream-request-id``.
    """
    drop = _DROP_TO_CLIENT if not keep_encoding else _DROP_TO_CLIENT - {"content-encoding"}
    if "Connection" in upstream_headers:
        drop = drop | connection_tokens(upstream_headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream_headers.items():
        lname = name.lower()
        if lname not in drop:
            out.add(name, value)
        elif lname == "x-request-id":
            out["x-upstream-request-id"] = value
    return out


def _error_object(message: str, error_type: str, param: object = None, code: object = None) -> JSONDict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def normalize_error_body(obj: object) -> JSONDict | None:
    """Bring an upstream error object into OpenAI's nested shape, or ``None`` if it is none.

    Accepts ``{"error": {...}}`` (filled in), ``{"error": "text"}``, and the old flat vLLM
    shape ``{"object": "error", "message", "type", "param", "code"}``.
    """
    if not isinstance(obj, dict):
        return None
    error = obj.get("error")
    if isinstance(error, dict):
        return _error_object(str(error.get("message") or "upstream error"),
                             str(error.get("type") or "upstream_error"),
                             error.get("param"), error.get("code"))
    if isinstance(error, str):
        return _error_object(error, "upstream_error")
    if obj.get("object") == "error":
        return _error_object(str(obj.get("message") or "upstream error"),
                             str(obj.get("type") or "upstream_error"),
                             obj.get("param"), obj.get("code"))
    return None


def upstream_status_error(upstream: Upstream, status: int, body: bytes,
                          retry_after: str | None) -> GatewayError:
    """Map an upstream error response to the error the client gets.

    4xx other than 401/403 and 5xx keep their status and (normalized) body; 401/403 mean the
    gateway's own upstream credentials are wrong, so the client gets 502 rather than a hint
    that its key failed; 3xx (redirects are not followed) is a 502. A body that is not JSON
    is wrapped in the OpenAI shape with a short excerpt.
    """
    try:
        parsed = normalize_error_body(orjson.loads(body)) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if status in (401, 403) or status < 400:
        what = "redirected" if status < 400 else "rejected the gateway's credentials"
        return UpstreamError(f"Upstream {upstream.name} {what} (HTTP {status}).",
                             code=f"upstream_{status}")
    if parsed is None:
        excerpt = body[:200].decode("utf-8", "replace").strip()
        parsed = _error_object(f"Upstream {upstream.name} answered HTTP {status}: {excerpt}",
                               "upstream_error", None, f"upstream_{status}")
    retry_after_s = _retry_after_s(retry_after)
    if retry_after_s is None and status in (429, 503):
        retry_after_s = DEFAULT_RETRY_AFTER_S  # DESIGN §4: 429 and 503 always carry a hint
    return UpstreamStatusError(status, parsed, retry_after_s=retry_after_s)


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds; ``None`` when absent or an
    HTTP date (RFC 9110 §10.2.3 allows both; upstreams of this API send seconds)."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def invalid_response(upstream: Upstream, what: str) -> UpstreamInvalidResponseError:
    """The error for a 2xx answer that is not what the endpoint promises."""
    return UpstreamInvalidResponseError(f"Upstream {upstream.name} answered 2xx with {what}.")


def map_client_error(upstream: Upstream, exc: BaseException) -> GatewayError:
    """Turn an aiohttp / timeout / parse failure into the gateway error the client sees."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeoutError(f"Upstream {upstream.name} timed out.")
    if isinstance(exc, SSEError):
        return UpstreamError(f"Upstream {upstream.name} sent an unparsable stream: {exc}")
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return UpstreamConnectionError(f"Upstream {upstream.name} closed the connection mid-response.")
    return UpstreamConnectionError(f"Upstream {upstream.name} could not be reached ({type(exc).__name__}).")


def request_error(upstream: Upstream, exc: BaseException) -> GatewayError:
    """``map_client_error`` for a failure before any of the response arrived: there, a
    server disconnect means a pooled keep-alive connection the upstream had already closed
    (``stale``: the dispatcher redoes the attempt once on another connection)."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamConnectionError(f"Upstream {upstream.name} closed a pooled connection.",
                                       stale=True)
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno in LOCAL_CONNECT_ERRNOS:
        return UpstreamConnectionError(
            f"The gateway could not open a connection to upstream {upstream.name} "
            f"({errno.errorcode.get(exc.os_error.errno or 0, 'error')}: it is short of sockets).",
            local=True)
    return map_client_error(upstream, exc)
