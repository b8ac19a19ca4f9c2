"""A bare aiohttp forwarder: the baseline the gateway's overhead is measured against.

Every request (method, path, query, body, headers minus hop-by-hop and ``Host``) goes to
``--upstream`` over ONE shared ``aiohttp.ClientSession`` (keep-alive pool of ``--limit``
connections, redirects not followed, bodies passed through undecoded), and the answer is
streamed back chunk by chunk as it arrives. No auth, limits, parsing or logging: this is the
cost of aiohttp server + aiohttp client alone. Runs on uvloop.

    .venv/bin/python scripts/bare_forwarder.py --upstream http://127.0.0.1:9001 --port 9100
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Mapping

import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict
from yarl import URL

# RFC 9110 §7.6.1: hop-by-hop fields, plus Host (the client library sets its own).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
     "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)
SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)
LIMIT = web.AppKey("limit", int)


def end_to_end(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop fields, including those named in ``Connection``."""
    named = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    drop = HOP_BY_HOP | named
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


async def forward(request: web.Request) -> web.StreamResponse:
    """Send ``request`` upstream and stream the answer back as it arrives."""
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    body = await request.read() if request.body_exists else None
    async with request.app[SESSION].request(
        request.method, url, headers=end_to_end(request.headers), data=body,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=end_to_end(upstream.headers))
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def client_session(app: web.Application) -> AsyncIterator[None]:
    """Own the one shared session for the app's lifetime (``cleanup_ctx``)."""
    connector = TCPConnector(limit=app[LIMIT], keepalive_timeout=30)
    timeout = ClientTimeout(total=None, sock_connect=5, sock_read=120)
    async with ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                             skip_auto_headers=("User-Agent",)) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9001")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--limit", type=int, default=200, help="upstream connections")
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 2**20)
    app[UPSTREAM], app[LIMIT] = args.upstream.rstrip("/"), args.limit
    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    print(f"bare forwarder listening on http://{args.host}:{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
