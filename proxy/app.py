"""``create_app(settings)``: the aiohttp application, its state and lifetimes, and ``serve``.

Upstream sessions are opened and closed in ``app.cleanup_ctx`` (aiohttp
``examples/background_tasks.py``). Handler cancellation is on: when a client disconnects,
its handler is cancelled at once, which detaches it from its stream.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.auth import KeyStore
from proxy.balancer import Balancer
from proxy.config import Settings
from proxy.http_api import GATEWAY, Gateway, add_routes, gateway_middleware
from proxy.limits import DemandBuilder, Limiter, MemoryLimitStore
from proxy.limits_redis import RedisLimitStore
from proxy.observability import Metrics, configure_logging, flush_logs_periodically, log
from proxy.upstream import Upstream


def create_app(settings: Settings) -> web.Application:
    """Build the gateway application for ``settings``; nothing is opened until it starts.

    With ``state.backend: redis`` nothing connects to Redis until the first limited request;
    an unreachable Redis is handled then (fallback or 503), never at start-up.
    """
    app = web.Application(middlewares=[gateway_middleware],
                          client_max_size=settings.server.max_body_bytes)
    upstreams = {name: Upstream(name, cfg) for name, cfg in settings.upstreams.items()}
    balancer = Balancer({name: cfg.models for name, cfg in settings.upstreams.items()})
    metrics = Metrics()
    app[GATEWAY] = Gateway(settings, KeyStore(settings.keys), balancer, upstreams,
                           build_limiter(settings, metrics), DemandBuilder(settings), metrics=metrics)
    app.cleanup_ctx.append(_limiter)
    app.cleanup_ctx.append(_upstream_pools)
    app.cleanup_ctx.append(_log_flusher)
    app.on_shutdown.append(_on_shutdown)
    add_routes(app)
    return app


def build_limiter(settings: Settings, metrics: Metrics) -> Limiter:
    """The limiter for ``state.backend``: memory, or Redis with a per-process fallback."""
    state, ttl_s = settings.state, settings.limits.lease_ttl_s
    if state.backend == "memory":
        return Limiter(MemoryLimitStore(ttl_s))
    store = RedisLimitStore(state.redis_url.get_secret_value(), state.key_prefix,
                            state.redis_timeout_s, ttl_s)
    return Limiter(store, MemoryLimitStore(ttl_s), state.on_redis_error,
                   on_fallback=metrics.limit_store_fallbacks.inc)


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    """Refresh live concurrency leases every third of their TTL; close the store at exit."""
    gateway = app[GATEWAY]
    refresher = asyncio.get_running_loop().create_task(
        gateway.limiter.refresh_forever(gateway.settings.limits.lease_ttl_s / 3))
    yield
    refresher.cancel()
    await asyncio.gather(refresher, return_exceptions=True)
    await gateway.limiter.close()


async def _upstream_pools(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    for upstream in gateway.upstreams.values():
        await upstream.start()
    yield
    tasks = gateway.streams.cancel_all()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    for upstream in gateway.upstreams.values():
        await upstream.close()


async def _log_flusher(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(flush_logs_periodically())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _on_shutdown(app: web.Application) -> None:
    app[GATEWAY].draining = True


async def start_server(settings: Settings, host: str | None = None, port: int | None = None
                       ) -> tuple[web.AppRunner, int]:
    """Start the gateway on the running loop; returns the runner and the bound port.

    ``port=0`` binds a free port. Stop it with ``await runner.cleanup()``. Tests use this,
    so they run the same server set-up as ``shepherd serve``.
    """
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=settings.server.drain_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host or settings.server.host,
                       settings.server.port if port is None else port)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    bound = server.sockets[0].getsockname()[1]
    return runner, int(bound)


def serve(settings: Settings, host: str | None = None, port: int | None = None,
          workers: int | None = None) -> int:
    """Run the gateway in the foreground until SIGINT/SIGTERM; returns the exit code.

    ``workers`` (default ``server.workers``) > 1 starts that many processes sharing the port
    through SO_REUSEPORT (the kernel spreads connections across them); the parent forwards
    SIGINT/SIGTERM and restarts a worker that dies unexpectedly.
    """
    count = settings.server.workers if workers is None else workers
    bind = (host or settings.server.host, settings.server.port if port is None else port)
    if count <= 1:
        serve_worker(settings, *bind, reuse_port=False)
        return 0
    return supervise_workers(settings, bind, count)


def serve_worker(settings: Settings, host: str, port: int, reuse_port: bool) -> None:
    """One gateway process on uvloop (``web.run_app``), until SIGINT/SIGTERM."""
    import uvloop

    configure_logging()
    log.info("starting", extra={"host": host, "port": port, "pid": os.getpid(),
                                "upstreams": list(settings.upstreams), "state": settings.state.backend})
    web.run_app(
        create_app(settings), host=host, port=port, access_log=None,
        handler_cancellation=True, shutdown_timeout=settings.server.drain_timeout_s,
        print=lambda _: log.info("listening", extra={"url": f"http://{host}:{port}", "pid": os.getpid()}),
        loop=uvloop.new_event_loop(), reuse_port=reuse_port,
    )


def supervise_workers(settings: Settings, bind: tuple[str, int], count: int) -> int:
    """Start ``count`` workers on ``bind`` with SO_REUSEPORT and wait for them.

    Raises:
        ValueError: the platform has no SO_REUSEPORT, or ``bind`` uses port 0 (each worker
            would get a different port).
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("--workers > 1 needs SO_REUSEPORT, which this platform lacks")
    if bind[1] == 0:
        raise ValueError("--workers > 1 needs a fixed port, not 0")
    configure_logging()
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> multiprocessing.process.BaseProcess:
        proc = context.Process(target=serve_worker, args=(settings, *bind, True), daemon=False)
        proc.start()
        return proc

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    procs = [start() for _ in range(count)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        for i, proc in enumerate(procs):
            proc.join(timeout=0.2)
            if proc.exitcode is not None and not stopping:
                log.warning("worker exited; restarting", extra={"pid": proc.pid, "code": proc.exitcode})
                procs[i] = start()
    for proc in procs:
        proc.join()
    return 0 if all(proc.exitcode == 0 for proc in procs) else 1
