"""``create_app(settings)``: the aiohttp application, its state and lifetimes, and ``serve``.

Upstream sessions are opened and closed in ``app.cleanup_ctx`` (aiohttp
``examples/background_tasks.py``). Handler cancellation is on: when a client disconnects,
its handler is cancelled at once, which detaches it from its stream.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from proxy import admin_api, admin_keys, cors, ui_api, ws_api, ws_realtime, ws_responses
from proxy import reload as hot_reload
from proxy.admission import Admission
from proxy.auth import KeyStore
from proxy.balancer import Balancer, RetryBudget
from proxy.config import ConfigError, Settings, load_settings_file
from proxy.errors import OverloadedError
from proxy.http_api import ADMIN_CHECK, add_request_id, add_routes, gateway_middleware, passthrough
from proxy.limits import DemandBuilder, Limiter, MemoryLimitStore
from proxy.limits_redis import RedisLimitStore
from proxy.listener import ConnectionGuard, GatewayRunner, client_connection_cap, raise_nofile_limit
from proxy.observability import Metrics, Sample, configure_logging, flush_logs_periodically, log
from proxy.pipeline import GATEWAY, Gateway
from proxy.relay import Dispatcher
from proxy.streams import StreamRegistry
from proxy.streams_redis import MAX_CONNECTIONS as STREAM_STORE_MAX_CONNECTIONS
from proxy.streams_redis import RedisStreamStore
from proxy.telemetry import install as install_telemetry
from proxy.telemetry import multiprocess_dir, worker_gone
from proxy.upstream import Upstream

#: A supervisor that restarts more than MAX_RESTARTS workers within RESTART_WINDOW_S seconds
#: gives up (a worker crashing at start-up would otherwise be restarted forever).
MAX_RESTARTS = 5
RESTART_WINDOW_S = 30.0

#: After the drain (``_on_shutdown``), how long aiohttp waits for handlers to write their
#: last bytes before it closes their connections.
HANDLER_GRACE_S = 5.0


def create_app(settings: Settings, config_path: str | None = None) -> web.Application:
    """Build the gateway application for ``settings``; nothing is opened until it starts.
    ``config_path``: the file ``settings`` came from, re-read by a reload (SIGHUP,
    ``POST /admin/reload``; ``None``: reloading is refused).

    With ``state.backend: redis`` nothing connects to Redis until the first limited request;
    an unreachable Redis is handled then (fallback or 503), never at start-up.
    """
    app = web.Application(middlewares=[gateway_middleware],
                          client_max_size=settings.server.max_body_bytes)
    upstreams = {name: Upstream(name, cfg) for name, cfg in settings.upstreams.items()}
    metrics = Metrics()
    admission = Admission(hot_reload.slot_limits(settings), on_overflow=metrics.count_queue_overflow)
    balancer = build_balancer(settings, admission, metrics)
    dispatcher = Dispatcher(upstreams, balancer, admission, settings.routing.retry,
                            RetryBudget(settings.routing.retry.budget_percent,
                                        settings.routing.retry.budget_min), events=metrics)
    streams = build_stream_registry(settings, metrics)
    remote_streams = build_remote_streams(settings, metrics)
    streams.remote = remote_streams
    keys = KeyStore(settings.keys)
    gateway = Gateway(settings, keys, balancer, upstreams,
                      build_limiter(settings, metrics), DemandBuilder(settings, keys), admission,
                      dispatcher, streams, metrics=metrics, remote_streams=remote_streams)
    app[GATEWAY] = gateway
    gateway.ledger = admin_api.build_ledger(settings, metrics)
    metrics.watch(gateway_samples(gateway))
    install_telemetry(app, gateway)
    app[ADMIN_CHECK] = admin_api.authorize  # observability.metrics_auth: admin
    app.cleanup_ctx.append(admin_api.ledger_lifetime)  # first in, last out: after the producers end
    app.cleanup_ctx.append(admin_keys.runtime_keys_lifetime)
    app.cleanup_ctx.append(_limiter)
    app.cleanup_ctx.append(_remote_streams)
    app[hot_reload.RELOADER] = hot_reload.Reloader(
        gateway, config_path, hot_reload.ProbeSet(functools.partial(probe_forever, gateway)))
    app.cleanup_ctx.append(hot_reload.reloader_lifetime)  # exits after the serving pools closed
    app.cleanup_ctx.append(_upstream_pools)
    app.cleanup_ctx.append(_health_probes)
    app.cleanup_ctx.append(_log_flusher)
    app.on_response_prepare.append(add_request_id)
    cors.setup(app, settings.server.cors_origins)
    app.on_shutdown.append(_on_shutdown)
    ws_api.add_routes(app)  # WebSocket endpoints; aiohttp matches them before the /v1 catch-all
    ws_responses.add_routes(app, passthrough)
    ws_realtime.add_routes(app)
    ui_api.add_routes(app)
    admin_api.add_routes(app)
    hot_reload.add_routes(app)
    admin_keys.add_routes(app)
    add_routes(app)
    return app


def build_stream_registry(settings: Settings, metrics: Metrics) -> StreamRegistry:
    """The stream registry for ``streams:`` (detach timeout, retention, byte caps)."""
    config = settings.streams
    registry = StreamRegistry(buffer_bytes=config.buffer_bytes, retain_bytes=config.retain_bytes,
                              detach_timeout_s=config.detach_timeout_s, retention_s=config.retention_s,
                              max_total_bytes=config.max_total_bytes)
    registry.on_detach_cancel = metrics.stream_detach_cancels.inc
    return registry


#: The longest one Redis stream-log call may take: well under ``streams.producer_timeout``
#: (a stalled mirror looks like a dead producer), well over ``state.redis_timeout`` (a limit
#: check falls back after that; a mirror that fails stops for good).
STREAM_STORE_TIMEOUT_S = 1.0


def build_remote_streams(settings: Settings, metrics: Metrics) -> RedisStreamStore | None:
    """With ``state.backend: redis``, the Redis Streams copy of every stream log, so any
    instance can serve a resume; ``None`` with the memory backend. Connects lazily."""
    state, config = settings.state, settings.streams
    if state.backend != "redis":
        return None
    return RedisStreamStore(
        state.redis_url.get_secret_value(), state.key_prefix,
        timeout_s=min(STREAM_STORE_TIMEOUT_S, config.producer_timeout_s / 4),
        producer_timeout_s=config.producer_timeout_s, detach_timeout_s=config.detach_timeout_s,
        retention_s=config.retention_s, maxlen=config.redis_maxlen,
        on_error=metrics.stream_store_errors.inc)


def build_balancer(settings: Settings, admission: Admission, metrics: Metrics | None = None) -> Balancer:
    """The balancer over every upstream, counting in-flight requests from ``admission``;
    each entry of a model into panic routing is counted in ``metrics``."""
    return Balancer(hot_reload.deployment_specs(settings), hot_reload.model_upstreams(settings),
                    settings.routing.max_ejection_percent,
                    in_flight=admission.in_flight,
                    panic_threshold_percent=settings.routing.panic_threshold_percent,
                    on_panic=metrics.count_panic if metrics is not None else lambda _model, _names: None)


def gateway_samples(gateway: Gateway) -> Callable[[], list[Sample]]:
    """Per-upstream gauges read at scrape time: health, in flight, queued, pool use."""

    def samples() -> list[Sample]:
        out: list[Sample] = []
        for name, upstream in gateway.upstreams.items():
            status = gateway.balancer.status(name)
            labels = {"upstream": name}
            out.append(("shepherd_upstream_healthy", labels, 1.0 if status == "healthy" else 0.0))
            out.extend(("shepherd_upstream_state", {**labels, "state": state}, float(state == status))
                       for state in ("healthy", "unhealthy", "ejected", "cooldown"))
            out.append(("shepherd_upstream_in_flight", labels, float(gateway.admission.in_flight(name))))
            out.append(("shepherd_upstream_queued", labels, float(gateway.admission.queued_for(name))))
            for state, count in upstream.pool_stats().items():
                out.append(("shepherd_pool_connections", {**labels, "state": state}, float(count)))
        out.append(("shepherd_queue_depth", {}, float(gateway.admission.queue_depth)))
        return out

    return samples


async def _health_probes(app: web.Application) -> AsyncIterator[None]:
    """One probe loop per upstream with ``health_check.enabled`` (a reload stops and starts
    them as upstreams come and go)."""
    probes = app[hot_reload.RELOADER].probes
    for upstream in app[GATEWAY].upstreams.values():
        probes.start(upstream)
    yield
    await probes.stop_all()


async def probe_forever(gateway: Gateway, upstream: Upstream) -> None:
    """Probe ``upstream`` every ``health_check.interval``; log each health change. A probe
    the gateway could not even send (short of descriptors) is not held against it."""
    check = upstream.config.health_check
    while True:
        ok = await upstream.probe(check.path, check.timeout_s)
        changed = gateway.balancer.record_probe(upstream.name, ok) if ok is not None else None
        if changed is not None:
            log.warning("upstream health changed", extra={
                "upstream": upstream.name, "healthy": changed})
        await asyncio.sleep(check.interval_s)


def build_limiter(settings: Settings, metrics: Metrics) -> Limiter:
    """The limiter for ``state.backend``: memory, or Redis with a per-process fallback."""
    state, ttl_s = settings.state, settings.limits.lease_ttl_s
    if state.backend == "memory":
        return Limiter(MemoryLimitStore(ttl_s))
    store = RedisLimitStore(state.redis_url.get_secret_value(), state.key_prefix,
                            state.redis_timeout_s, ttl_s, block_ttl_s=settings.limits.block_ttl_s,
                            block_max_requests=settings.limits.block_max_requests,
                            on_block_admission=metrics.limit_block_admissions.inc)
    return Limiter(store, MemoryLimitStore(ttl_s), state.on_redis_error,
                   on_fallback=metrics.limit_store_fallbacks.inc, share_floor=state.fallback_share_floor)


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    """Refresh live concurrency leases every third of their TTL; close the store at exit."""
    gateway = app[GATEWAY]
    refresher = asyncio.get_running_loop().create_task(
        gateway.limiter.refresh_forever(gateway.settings.limits.lease_ttl_s / 3))
    yield
    refresher.cancel()
    await asyncio.gather(refresher, return_exceptions=True)
    await gateway.limiter.close()


async def _remote_streams(app: web.Application) -> AsyncIterator[None]:
    """Close the Redis stream store last (after the producers ended): its mirrors flush the
    final state of every stream first."""
    yield
    remote = app[GATEWAY].remote_streams
    if isinstance(remote, RedisStreamStore):
        await remote.close()


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
    """Drain: ``/readyz`` answers 503 from now on and WebSockets take no new requests;
    in-flight requests and streams get up to ``server.drain_timeout`` to finish; streams
    still running then end with an error event (never a silent truncation), and their
    generation is cancelled; then every WebSocket is closed with 1012 (service restart)."""
    gateway = app[GATEWAY]
    gateway.draining = gateway.sockets.draining = True
    deadline = asyncio.get_running_loop().time() + gateway.settings.server.drain_timeout_s
    while gateway.busy() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # polling two counters beats wiring an Event through both
    if gateway.busy():
        log.warning("drain timeout; ending streams still running", extra={"streams": len(gateway.streams)})
    gateway.streams.fail_all(OverloadedError("The gateway is shutting down; retry the request.",
                                             code="shutting_down", retry_after_s=1.0))
    # WebSockets last: their streams have ended (or failed above); each closes with 1012
    # once it has written what it had in flight.
    await gateway.sockets.close_all(deadline + HANDLER_GRACE_S / 2)


async def start_server(settings: Settings, host: str | None = None, port: int | None = None, *,
                       reuse_port: bool = False, app: web.Application | None = None
                       ) -> tuple[GatewayRunner, int]:
    """Start the gateway on the running loop; returns the runner and the bound port.

    The one way the gateway listens, for tests and ``shepherd serve`` alike: the soft
    ``RLIMIT_NOFILE`` is raised to the hard limit, and the listener gets ``server.backlog``,
    ``server.keepalive_timeout``, ``server.header_timeout`` and ``server.max_connections``
    (``proxy.listener``). ``port=0`` binds a free port; ``app`` defaults to
    ``create_app(settings)``. Stop it with ``await runner.cleanup()``.
    """
    app = create_app(settings) if app is None else app
    config, metrics = settings.server, app[GATEWAY].metrics
    fd_cap = client_connection_cap(raise_nofile_limit(), reserved_fds(settings))
    guard = ConnectionGuard(config.max_connections, fd_cap,
                            on_refuse=lambda reason: metrics.connections_refused.labels(reason).inc())
    metrics.watch(guard.samples)
    runner = GatewayRunner(app, guard, config.header_timeout_s, handler_cancellation=True,
                           access_log=None, shutdown_timeout=HANDLER_GRACE_S,
                           keepalive_timeout=config.keepalive_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host or config.host, config.port if port is None else port,
                       backlog=config.backlog, reuse_port=reuse_port)
    try:
        await site.start()
    except BaseException:  # the port is taken, say: close what startup opened, then raise
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])
    log.info("listener", extra={
        "backlog": config.backlog, "max_connections": config.max_connections, "fd_cap": fd_cap,
        "header_timeout_s": config.header_timeout_s, "keepalive_timeout_s": config.keepalive_timeout_s})
    return runner, bound


def reserved_fds(settings: Settings) -> int:
    """File descriptors the upstream pools (and, with Redis, the stream store's pool) may
    hold: kept free of client connections, so an upstream connect does not fail for want
    of one (``proxy.listener.client_connection_cap``)."""
    pools = sum(cfg.slots for cfg in settings.upstreams.values())
    return pools + (STREAM_STORE_MAX_CONNECTIONS if settings.state.backend == "redis" else 0)


def serve(settings: Settings, host: str | None = None, port: int | None = None,
          workers: int | None = None, config_path: str | None = None) -> int:
    """Run the gateway in the foreground until SIGINT/SIGTERM; returns the exit code.
    SIGHUP re-reads ``config_path`` (``proxy.reload``); it never ends the process.

    ``workers`` (default ``server.workers``) > 1 starts that many processes sharing the port
    through SO_REUSEPORT (the kernel spreads connections across them); the parent forwards
    SIGINT/SIGTERM/SIGHUP and restarts a worker that dies unexpectedly.
    """
    count = settings.server.workers if workers is None else workers
    bind = (host or settings.server.host, settings.server.port if port is None else port)
    if count <= 1:
        serve_worker(settings, *bind, reuse_port=False, config_path=config_path)
        return 0
    return supervise_workers(settings, bind, count, config_path)


#: Cyclic GC thresholds once serving (CPython's default is (700, 10, 10)). Request objects
#: are freed by reference counting; young collections mostly promote the objects of requests
#: in flight. The third threshold is out of reach on purpose: automatic full collections are
#: replaced by ``full_gc_forever``'s, one every ``FULL_GC_INTERVAL_S``.
GC_THRESHOLDS = (10_000, 10, 1_000_000)

#: Seconds between two collections of what is not frozen (``full_gc_forever``): short, so
#: that each scans only what survived since the last (a second of a 10,000-socket ramp).
FULL_GC_INTERVAL_S = 1.0

#: Every this many of those (10 minutes), everything is unfrozen first: a truly full
#: collection, whose stall grows with everything the process holds.
UNFREEZE_EVERY = 600

#: A full collection slower than this is logged, in seconds.
SLOW_GC_S = 0.1


async def tune_gc(app: web.Application) -> AsyncIterator[None]:
    """Last startup step (a ``cleanup_ctx``): move everything built so far (modules, config,
    pools) out of the collector's reach (``gc.freeze``), raise the young-generation
    threshold, and run full collections on a clock instead of CPython's heuristic.

    Measured with 32 connections at ~2,500 req/s: CPython's defaults ran a full collection
    about every second, each a 30-50 ms stall of the event loop (longer than the default
    ``state.redis_timeout``), for ~65k start-up objects that are never garbage; with the
    young threshold raised, collections cost under 2 ms and throughput rose by a quarter.
    While thousands of streams open, CPython still collected the whole heap each time it grew
    by a quarter: a ramp to 10,000 streams spent about a third of its CPU in full collections,
    seconds-long stalls during which the listen queue overflowed. Requests that end normally
    leave no cyclic garbage (measured: 0 objects over 2,000 requests); errors and cut streams
    leave about 10 objects each, which young collections mostly catch; what reaches the old
    generation waits for ``full_gc_forever`` (at most ``FULL_GC_INTERVAL_S``, or
    ``UNFREEZE_EVERY`` times that when its objects had been frozen).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    task = asyncio.get_running_loop().create_task(full_gc_forever(FULL_GC_INTERVAL_S))
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def full_gc_forever(interval_s: float, unfreeze_every: int = UNFREEZE_EVERY) -> None:
    """Every ``interval_s`` seconds collect the old generation, then freeze what survived
    (``gc.freeze``): long-lived objects (open sockets, streams, pools) are scanned once, not
    every time, so the stall is proportional to what survived since the last pass, not
    to everything the process holds (10,000 open WebSockets made a plain full collection a
    0.6-0.8 s stall; a pass a minute after they opened still took 0.54 s). Every
    ``unfreeze_every`` passes everything is unfrozen first, so cyclic garbage among objects
    frozen earlier waits at most that long. A pass slower than ``SLOW_GC_S`` is logged.
    Cancelling is safe."""
    passes = 0
    while True:
        await asyncio.sleep(interval_s)
        passes += 1
        full = passes % unfreeze_every == 0
        started = time.perf_counter()
        if full:
            gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        elapsed_s = time.perf_counter() - started
        if elapsed_s > SLOW_GC_S:
            log.warning("slow garbage collection", extra={
                "gc_ms": round(elapsed_s * 1000, 1), "unreachable": found, "unfrozen": full})


def worker_cpu(index: int) -> int | None:
    """The CPU that worker ``index`` (0-based) runs on with ``server.cpu_affinity``: the
    ``index``-th, modulo their count, of the CPUs this process may use; ``None`` where the
    platform cannot pin (no ``os.sched_setaffinity``: not Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[index % len(allowed)]


def serve_worker(settings: Settings, host: str, port: int, reuse_port: bool, index: int = 0,
                 config_path: str | None = None, supervised: bool = False) -> None:
    """One gateway process on uvloop, until SIGINT/SIGTERM. ``index``: the worker's number
    (0 for a single process), which picks its CPU with ``server.cpu_affinity``;
    ``config_path``: what SIGHUP re-reads; ``supervised``: a worker of ``--workers N``
    (``POST /admin/reload`` then asks the supervisor to reload every worker)."""
    import uvloop

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})  # held until the loop handles it
    configure_logging()
    cpu = worker_cpu(index) if settings.server.cpu_affinity else None
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    log.info("starting", extra={"host": host, "port": port, "pid": os.getpid(), "cpu": cpu,
                                "upstreams": list(settings.upstreams), "state": settings.state.backend})
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_until_signalled(settings, host, port, reuse_port, config_path, supervised))


async def serve_until_signalled(settings: Settings, host: str, port: int, reuse_port: bool,
                                config_path: str | None = None, supervised: bool = False) -> None:
    """``start_server``, then wait for SIGINT or SIGTERM and shut down (``_on_shutdown``
    drains; aiohttp then gives handlers ``HANDLER_GRACE_S``). SIGHUP reloads
    ``config_path`` (``Reloader.on_signal``: coalesced, never ends the process); a SIGHUP
    that arrived while starting (blocked until now) is handled once serving."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    app = create_app(settings, config_path)
    reloader = app[hot_reload.RELOADER]
    reloader.notify_parent = supervised
    app.cleanup_ctx.append(tune_gc)  # last: after every other startup step has built its state
    runner, bound = await start_server(settings, host, port, reuse_port=reuse_port, app=app)
    loop.add_signal_handler(signal.SIGHUP, reloader.on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    log.info("listening", extra={"url": f"http://{host}:{bound}", "pid": os.getpid()})
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def supervise_workers(settings: Settings, bind: tuple[str, int], count: int,
                      config_path: str | None = None) -> int:
    """Start ``count`` workers on ``bind`` with SO_REUSEPORT and wait for them; returns the
    exit code (0 when every worker stopped cleanly on a signal).

    Raises:
        ValueError: the platform has no SO_REUSEPORT, or ``bind`` uses port 0 (each worker
            would get a different port).
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("--workers > 1 needs SO_REUSEPORT, which this platform lacks")
    if bind[1] == 0:
        raise ValueError("--workers > 1 needs a fixed port, not 0")
    configure_logging()
    with multiprocess_dir():  # one /metrics scrape sums every worker (proxy.telemetry)
        return WorkerSupervisor(settings, bind, count, config_path).run()


class WorkerSupervisor:
    """The parent of ``--workers N``: starts the workers (spawned processes), forwards
    SIGINT/SIGTERM/SIGHUP to them, restarts one that exits on its own, and gives up when more
    than ``MAX_RESTARTS`` exits happen within ``RESTART_WINDOW_S``.

    On SIGHUP (from an operator, or from a worker that applied ``POST /admin/reload``) every
    worker reloads ``config_path``, and a worker restarted later starts from the reloaded
    settings. Workers start with SIGHUP blocked (inherited), so one sent while a worker
    starts is handled once it serves, not taken as the default "terminate"."""

    def __init__(self, settings: Settings, bind: tuple[str, int], count: int,
                 config_path: str | None = None) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._settings = settings
        self._config_path = config_path
        self._args = (*bind, True)
        self._count = count
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._restarts: list[float] = []
        self._stopping = False
        self._gave_up = False

    def run(self) -> int:
        signal.signal(signal.SIGHUP, self._reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # the CLI held it until now
        self._procs = [self._start(i) for i in range(self._count)]
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        while not self._stopping:
            for i, proc in enumerate(self._procs):
                proc.join(timeout=0.2)
                if proc.exitcode is not None and not self._stopping:
                    self._replace(i)
        for proc in self._procs:
            proc.join()
        return 0 if not self._gave_up and all(p.exitcode == 0 for p in self._procs) else 1

    def _start(self, index: int) -> multiprocessing.process.BaseProcess:
        proc = self._context.Process(target=serve_worker, args=(self._settings, *self._args, index),
                                     kwargs={"config_path": self._config_path, "supervised": True},
                                     daemon=False)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})  # the child inherits the mask
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        return proc

    def _reload(self, _signum: int, _frame: object) -> None:
        """SIGHUP: forward it to every worker, then re-read the file for workers started
        later (an invalid file keeps the settings; the workers log its errors)."""
        for proc in self._procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGHUP)
        if self._config_path is None:
            return
        try:
            new = load_settings_file(self._config_path)
        except ConfigError:
            return
        self._settings = hot_reload.plan_reload(self._settings, new).settings

    def _replace(self, index: int) -> None:
        now, old = time.monotonic(), self._procs[index]
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(self._restarts) > MAX_RESTARTS:
            log.error("workers keep exiting; stopping", extra={"restarts": len(self._restarts)})
            self._gave_up = True
            self._stop(signal.SIGTERM, None)
            return
        log.warning("worker exited; restarting", extra={"pid": old.pid, "code": old.exitcode})
        worker_gone(old.pid)
        self._procs[index] = self._start(index)

    def _stop(self, signum: int, _frame: object) -> None:
        self._stopping = True
        for proc in self._procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)
