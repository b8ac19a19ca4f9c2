"""One pooled keep-alive ``aiohttp.ClientSession`` per upstream, and header hygiene.

Each upstream gets its own ``TCPConnector`` (``max_connections``, keep-alive expiry, DNS
cache) and a ``ClientTimeout(total=None, sock_connect=connect, sock_read=read_gap)``: there is
no total timeout, because aiohttp's default 300 s total would cut long generations. Redirects
are never followed (a redirect from an upstream is answered to the client as the error it is).
"""

from __future__ import annotations

import asyncio

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import UpstreamConfig

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

    async def probe(self, path: str, timeout_s: float) -> bool:
        """One active health probe: ``GET <base_url><path>``; True on a 2xx within
        ``timeout_s``. Never raises (cancelling is safe)."""
        try:
            async with asyncio.timeout(timeout_s), self.session.get(
                self.url(path), headers=self._fixed_headers, allow_redirects=False
            ) as response:
                await response.read()
                return 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError, RuntimeError):
            return False

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
