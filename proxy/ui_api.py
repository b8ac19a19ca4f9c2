"""``/ui/``: the browser playground and status page, static files from ``proxy/ui/``
(DESIGN §2 layer 6, §4 Operations). No build step: plain ES modules and a vendored uPlot.

The pages load without a key; the user types one in, the page keeps it in
``sessionStorage`` and sends it as ``Authorization`` on the API calls it makes (``/v1/*``,
``/readyz``, ``/metrics``, ``/admin/*``) — the files themselves are public.

Every ``/ui`` response — files, the ``/ui`` → ``/ui/`` redirect and errors — carries a strict
Content Security Policy (CSP Level 3: scripts, styles and connections only to this origin,
no inline code, no framing), ``X-Content-Type-Options: nosniff`` (WHATWG Fetch §"X-Content-
Type-Options"), ``Referrer-Policy: no-referrer`` and ``Cache-Control: no-cache`` (a browser
revalidates with ``If-Modified-Since``, so a new gateway version is picked up at once).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

#: The directory the files are served from (package data: ``proxy/ui/**``).
UI_DIR = Path(__file__).resolve().parent / "ui"

#: The page ``/ui/`` serves.
INDEX = "playground.html"

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self' ws: wss:",  # before CSP Level 3, 'self' did not cover ws(s)
    "font-src 'self'",
    "manifest-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}

#: The only file types served, with their media types; anything else is 404.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


def served_files(root: Path = UI_DIR) -> dict[str, Path]:
    """Every file ``/ui/<name>`` serves, by name (``a/b.js``), found once at start-up: files
    under ``root`` of a type in ``CONTENT_TYPES``, none hidden, none resolving outside
    ``root`` (a symlink out). Requests then never touch the file system to decide."""
    root = root.resolve()
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        real = path.resolve()
        if (path.suffix in CONTENT_TYPES and path.is_file() and real.is_relative_to(root)
                and not any(part.startswith(".") for part in name.split("/"))):
            files[name] = real
    return files


def resolve(name: str, files: dict[str, Path]) -> Path | None:
    """The file ``/ui/<name>`` names (``""`` or a trailing slash: ``INDEX``), or ``None``."""
    if not name or name.endswith("/"):
        name += INDEX
    return files.get(name)


UI_FILES = web.AppKey("ui_files", dict[str, Path])


async def ui_file(request: web.Request) -> web.StreamResponse:
    """``GET /ui/{name}``: one file of ``proxy/ui/``; ``/ui/`` is the playground."""
    path = resolve(request.match_info["name"], request.app[UI_FILES])
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Content-Type": CONTENT_TYPES[path.suffix],
                                           "Cache-Control": "no-cache"})


async def ui_redirect(request: web.Request) -> web.StreamResponse:
    """``GET /ui``: 308 to ``/ui/`` (relative module URLs resolve against the slash).
    Returned, not raised: the gateway middleware turns raised HTTP exceptions into errors."""
    return web.Response(status=308, headers={"Location": "/ui/"})


async def add_security_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the CSP and friends on every ``/ui`` response (errors too)."""
    if request.path == "/ui" or request.path.startswith("/ui/"):
        response.headers.update(SECURITY_HEADERS)


def add_routes(app: web.Application, root: Path = UI_DIR) -> None:
    """Register ``/ui`` and ``/ui/{name}`` (GET and HEAD) serving the files under ``root``,
    and the security-header hook."""
    app[UI_FILES] = served_files(root)
    app.router.add_get("/ui", ui_redirect)
    app.router.add_get("/ui/{name:.*}", ui_file)
    app.on_response_prepare.append(add_security_headers)
