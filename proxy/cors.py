"""Cross-origin requests from browser apps (``server.cors_origins``; the Fetch standard's
CORS protocol, https://fetch.spec.whatwg.org/#http-cors-protocol).

A browser app on another origin that calls the gateway with ``Authorization`` first sends a
preflight: ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``. It carries no
key (browsers never send credentials on a preflight), so ``cors_middleware`` answers it
before authentication: 204 with the allowed method and headers when the origin is listed,
otherwise a plain 403 without CORS headers (the browser then blocks the real request).
Every response to a listed origin carries ``Access-Control-Allow-Origin`` and
``Access-Control-Expose-Headers`` (``x-request-id``, ``X-Stream-Id``, ``x-ratelimit-*``,
``retry-after``…) so that apps can read them; they are added in ``on_response_prepare``,
before a stream's headers go out. With no origins configured (the default) nothing here
answers or adds anything. WebSocket handshakes are not subject to CORS.

aiohttp-cors registers options per route, and the gateway's ``/v1`` catch-all route takes
every method; a middleware that answers preflights for every path is simpler and total.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Where the app keeps ``server.cors_origins`` (``"*"`` allows any origin).
CORS_ORIGINS = web.AppKey("cors_origins", frozenset[str])

#: Methods a cross-origin request may use.
ALLOWED_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"

#: Response headers a cross-origin app may read (besides the CORS-safelisted ones).
EXPOSED_HEADERS = ", ".join((
    "x-request-id", "X-Stream-Id", "retry-after", "x-should-retry", "x-shepherd-overhead-ms",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
))

#: How long a browser may cache a preflight's answer, in seconds.
PREFLIGHT_MAX_AGE_S = 600


def allowed_origin(request: web.BaseRequest) -> str | None:
    """The request's ``Origin`` when ``server.cors_origins`` lists it (or holds ``*``),
    else ``None`` (also for a request the router never saw, e.g. one the parser refused)."""
    origin = request.headers.get("Origin")
    origins = request.app.get(CORS_ORIGINS, frozenset()) if isinstance(request, web.Request) else None
    if origin is None or not origins:
        return None
    return origin if origin in origins or "*" in origins else None


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflights (no key needed); pass everything else on."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers \
            or not request.app.get(CORS_ORIGINS):
        return await handler(request)
    origin = allowed_origin(request)
    if origin is None:
        return web.Response(status=403, text="origin not allowed (server.cors_origins)\n")
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": ALLOWED_METHODS,
        # The Fetch standard lets the server echo the requested headers; Authorization
        # must be named explicitly (a "*" does not cover it).
        "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                            "Authorization, Content-Type"),
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
    })


async def add_cors_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the CORS headers of a response to a listed origin."""
    origin = allowed_origin(request)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    response.headers.add("Vary", "Origin")


def setup(app: web.Application, origins: tuple[str, ...]) -> None:
    """Install CORS for ``origins`` (nothing when empty): the preflight middleware first,
    so that a preflight is answered before authentication."""
    if not origins:
        return
    app[CORS_ORIGINS] = frozenset(origins)
    app.middlewares.insert(0, cors_middleware)
    app.on_response_prepare.append(add_cors_headers)
