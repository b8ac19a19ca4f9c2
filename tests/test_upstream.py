"""proxy/upstream.py: header hygiene in both directions, upstream URLs, the pool's repr/stats."""

from __future__ import annotations

import errno
import os
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import load_settings
from proxy.errors import UpstreamConnectionError
from proxy.upstream import Upstream, request_error, response_headers
from tests.conftest import UPSTREAM_KEY, MockUpstream, base_config, merge


def make_upstream(url: str = "http://127.0.0.1:9/v1", **overrides: Any) -> Upstream:
    tree = merge(base_config(url), {"upstreams": {"mock": overrides}})
    return Upstream("mock", load_settings(tree, env={}).upstreams["mock"])


def client_headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def lower_names(headers: CIMultiDict[str]) -> set[str]:
    return {name.lower() for name in headers}


# --- request_headers ---------------------------------------------------------------------------


DROPPED_TO_UPSTREAM = [
    ("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("Proxy-Connection", "x"),
    ("TE", "trailers"), ("Trailer", "x-t"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
    ("Proxy-Authorization", "Basic Zm9vOmJhcg=="), ("Host", "gateway.example"),
    ("Content-Length", "12"), ("Authorization", "Bearer sk-client-secret"),
    ("X-Api-Key", "sk-client-secret"), ("Api-Key", "sk-client-secret"),
    ("OpenAI-Organization", "org-client"), ("OpenAI-Project", "proj-client"),
    ("api_base", "http://evil.example"), ("Api-Base", "http://evil.example"),
    ("base_url", "http://evil.example"), ("Base-Url", "http://evil.example"),
    ("Cookie", "session=abc"), ("Accept-Encoding", "gzip, br"),
]


@pytest.mark.parametrize(("name", "value"), DROPPED_TO_UPSTREAM)
def test_request_headers_drop(name: str, value: str) -> None:
    up = make_upstream(api_key=None)
    out = up.request_headers(client_headers((name, value), ("Content-Type", "application/json")))
    assert name.lower() not in lower_names(out)
    assert value not in out.values()
    assert out["Content-Type"] == "application/json"


def test_request_headers_keep_ordinary_headers_in_order() -> None:
    up = make_upstream(api_key=None)
    headers = client_headers(("Content-Type", "application/json"), ("X-Stainless-Lang", "python"),
                             ("User-Agent", "AsyncOpenAI/Python 1.0"), ("X-Multi", "a"),
                             ("X-Multi", "b"), ("Accept", "text/event-stream"))
    out = up.request_headers(headers)
    assert list(out.items()) == list(headers.items())


def test_request_headers_drop_headers_named_in_connection() -> None:
    up = make_upstream(api_key=None)
    out = up.request_headers(client_headers(
        ("Connection", "keep-alive, X-Hop-One , x-hop-two"), ("X-Hop-One", "1"), ("X-Hop-Two", "2"),
        ("X-End-To-End", "3")))
    assert lower_names(out) == {"x-end-to-end"}


def test_request_headers_drop_headers_named_in_every_connection_line() -> None:
    # RFC 9110 §5.3: several field lines of one name are one comma-separated list.
    up = make_upstream(api_key=None)
    out = up.request_headers(client_headers(
        ("Connection", "keep-alive"), ("Connection", "X-Hop"), ("X-Hop", "secret-hop-value"),
        ("X-End-To-End", "3")))
    assert lower_names(out) == {"x-end-to-end"}


def test_request_headers_keep_accept_encoding_for_passthrough() -> None:
    up = make_upstream(api_key=None)
    headers = client_headers(("Accept-Encoding", "gzip, br"), ("Authorization", "Bearer sk-client"))
    out = up.request_headers(headers, keep_encoding=True)
    assert out["Accept-Encoding"] == "gzip, br"
    assert "Authorization" not in out


def test_request_headers_add_upstream_credentials_and_custom_headers() -> None:
    up = make_upstream(organization="org-up", project="proj-up",
                       headers={"X-Tenant": "shepherd", "api-version": "2024-10-21"})
    out = up.request_headers(client_headers(
        ("Authorization", "Bearer sk-client-secret"), ("OpenAI-Organization", "org-client"),
        ("OpenAI-Project", "proj-client"), ("Content-Type", "application/json")))
    assert out.getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert out.getall("OpenAI-Organization") == ["org-up"]
    assert out.getall("OpenAI-Project") == ["proj-up"]
    assert out["X-Tenant"] == "shepherd"
    assert out["api-version"] == "2024-10-21"
    assert out["Content-Type"] == "application/json"
    assert "sk-client-secret" not in str(out)


def test_request_headers_without_upstream_key_send_no_authorization() -> None:
    up = make_upstream(api_key=None)
    out = up.request_headers(client_headers(("Authorization", "Bearer sk-client-secret")))
    assert "Authorization" not in out
    assert "OpenAI-Organization" not in out


def test_configured_header_wins_over_the_clients() -> None:
    up = make_upstream(headers={"X-Tenant": "shepherd"})
    out = up.request_headers(client_headers(("x-tenant", "spoofed")))
    assert out.getall("X-Tenant") == ["shepherd"]


# --- response_headers --------------------------------------------------------------------------


UPSTREAM_RESPONSE = [
    ("Content-Type", "application/json"), ("Content-Length", "42"),
    ("Transfer-Encoding", "chunked"), ("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"),
    ("Date", "Wed, 21 Oct 2015 07:28:00 GMT"), ("Server", "uvicorn"),
    ("Set-Cookie", "upstream=1"), ("Content-Encoding", "gzip"), ("x-request-id", "up-123"),
    ("openai-processing-ms", "17"), ("x-ratelimit-remaining-requests", "99"),
]


def test_response_headers_drop_framing_and_rename_request_id() -> None:
    out = response_headers(CIMultiDict(UPSTREAM_RESPONSE))
    assert dict(out) == {
        "Content-Type": "application/json", "x-upstream-request-id": "up-123",
        "openai-processing-ms": "17", "x-ratelimit-remaining-requests": "99",
    }
    assert "x-request-id" not in out


def test_response_headers_keep_content_encoding_for_passthrough() -> None:
    out = response_headers(CIMultiDict(UPSTREAM_RESPONSE), keep_encoding=True)
    assert out["Content-Encoding"] == "gzip"
    assert "Content-Length" not in out
    assert "Transfer-Encoding" not in out
    assert out["x-upstream-request-id"] == "up-123"


def test_response_headers_drop_headers_named_in_connection() -> None:
    out = response_headers(CIMultiDict([("Connection", "close, X-Hop"), ("X-Hop", "1"),
                                        ("X-Kept", "2")]))
    assert dict(out) == {"X-Kept": "2"}


# --- url -----------------------------------------------------------------------------------


def test_url_appends_path_to_base() -> None:
    up = make_upstream("http://upstream.example:8000/v1/")
    assert str(up.url("/chat/completions")) == "http://upstream.example:8000/v1/chat/completions"


def test_url_keeps_percent_encoding_byte_for_byte() -> None:
    up = make_upstream("http://upstream.example/v1")
    url = up.url("/models/meta-llama%2FLlama-3.1-8B%20Instruct")
    assert str(url) == "http://upstream.example/v1/models/meta-llama%2FLlama-3.1-8B%20Instruct"
    assert url.raw_path == "/v1/models/meta-llama%2FLlama-3.1-8B%20Instruct"


def test_url_keeps_query_string_and_does_not_leak_it_into_later_calls() -> None:
    up = make_upstream("http://upstream.example/v1")
    url = up.url("/files", "purpose=fine-tune&after=file%2Fabc&limit=2")
    assert url.raw_query_string == "purpose=fine-tune&after=file%2Fabc&limit=2"
    assert str(url) == "http://upstream.example/v1/files?purpose=fine-tune&after=file%2Fabc&limit=2"
    assert str(up.url("/files")) == "http://upstream.example/v1/files"
    assert str(up.url("/files", "limit=5")) == "http://upstream.example/v1/files?limit=5"


# --- repr, pool_stats, session lifetime ------------------------------------------------------


def test_pool_stats_before_start_are_zero() -> None:
    up = make_upstream()
    assert up.pool_stats() == {"in_use": 0, "idle": 0}
    with pytest.raises(RuntimeError, match="not started"):
        _ = up.session


def test_repr_before_start_shows_closed_and_no_key() -> None:
    up = make_upstream()
    assert repr(up) == "<Upstream mock http://127.0.0.1:9/v1 [closed]>"
    assert UPSTREAM_KEY not in repr(up)


async def test_repr_shows_pool_state_and_never_the_key(mock_upstream: MockUpstream) -> None:
    up = make_upstream(mock_upstream.base_url, max_connections=7)
    await up.start()
    try:
        assert repr(up) == (f"<Upstream mock {mock_upstream.base_url} "
                            "[Connections: 0 active, 0 idle, limit 7]>")
        async with up.session.get(up.url("/models"), headers=up.request_headers(CIMultiDict())) as r:
            assert r.status == 200
            await r.read()
        assert up.pool_stats() == {"in_use": 0, "idle": 1}
        assert "0 active, 1 idle, limit 7" in repr(up)
        assert UPSTREAM_KEY not in repr(up)
        assert UPSTREAM_KEY not in str(up)
    finally:
        await up.close()
    assert repr(up).endswith("[closed]>")


async def test_upstream_sees_its_own_key_not_the_clients(mock_upstream: MockUpstream) -> None:
    up = make_upstream(mock_upstream.base_url)
    await up.start()
    try:
        headers = up.request_headers(client_headers(("Authorization", "Bearer sk-client-secret"),
                                                     ("X-Trace", "t-1")))
        async with up.session.get(up.url("/models"), headers=headers) as r:
            await r.read()
    finally:
        await up.close()
    seen = {k.lower(): v for k, v in (await mock_upstream.requests())[-1]["headers"].items()}
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen["x-trace"] == "t-1"


async def test_close_is_idempotent_and_closes_the_session(mock_upstream: MockUpstream) -> None:
    up = make_upstream(mock_upstream.base_url)
    await up.start()
    session = up.session
    assert isinstance(session, aiohttp.ClientSession)
    await up.close()
    await up.close()
    assert session.closed
    assert up.pool_stats() == {"in_use": 0, "idle": 0}
    with pytest.raises(RuntimeError):
        _ = up.session


@pytest.mark.parametrize(("code", "local"), [(errno.EMFILE, True), (errno.ENFILE, True),
                                             (errno.EADDRNOTAVAIL, True), (errno.ECONNREFUSED, False)])
def test_a_connect_failure_of_the_gateways_own_making_is_local(code: int, local: bool) -> None:
    """Out of descriptors or ports, nothing reached the upstream: never held against it."""
    upstream = make_upstream()
    key = ConnectionKey("127.0.0.1", 9, False, True, None, None, None)
    error = request_error(upstream, aiohttp.ClientConnectorError(key, OSError(code, os.strerror(code))))
    assert isinstance(error, UpstreamConnectionError)
    assert error.local is local
    assert error.http_status == 502


async def test_a_probe_the_gateway_could_not_send_says_nothing_of_the_upstream() -> None:
    """Out of descriptors the probe's connect fails locally: ``None`` (not recorded), while
    a refused connection is a failed probe (``False``)."""
    upstream = make_upstream("http://127.0.0.1:9/v1")
    await upstream.start()
    try:
        assert await upstream.probe("/models", 1.0) is False  # port 9: connection refused
        key = ConnectionKey("127.0.0.1", 9, False, True, None, None, None)

        def out_of_descriptors(*_args: object, **_kwargs: object) -> None:
            raise aiohttp.ClientConnectorError(key, OSError(errno.EMFILE, os.strerror(errno.EMFILE)))

        upstream.session.get = out_of_descriptors  # type: ignore[method-assign]
        assert await upstream.probe("/models", 1.0) is None
    finally:
        await upstream.close()
