"""The app's metrics and traces wiring (``install``), the ``--workers N`` multiprocess
directory (``multiprocess_dir``), and gauges computed at scrape time from the gateway's own
state (``Metrics.watch``).

Each samples function returns a ``samples()`` callable; nothing here runs on the request path. With
``--workers N`` each worker's samples are copied into multiprocess gauges and summed
(``proxy.observability``), so the numbers are the whole server's.

* ``shepherd_streams_running``: stream producers running in this process.
* ``shepherd_streams_detached``: running streams with no client attached (waiting up to
  ``streams.detach_timeout`` for a resume).
* ``shepherd_websockets_open{endpoint}``: WebSockets open now, by path.
* ``shepherd_budget_remaining{key, unit}``: what a key's budget (``keys.<name>.budget``) has
  left in its current window, ``unit`` ``tokens`` or ``usd``. Only with the memory backend,
  where the process's own ``MemoryLimitStore`` holds the exact figure at no cost; with Redis
  the figure lives in Redis and a scrape must not add round trips (``GET /admin/keys``
  reads it there).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator

from aiohttp import web

from proxy import tracing
from proxy.limits import MemoryLimitStore
from proxy.observability import MIRROR_INTERVAL_S, MULTIPROC_ENV, ModelLabels, Sample, log
from proxy.pipeline import GATEWAY, Gateway


def install(app: web.Application, gateway: Gateway) -> None:
    """Wire metrics and traces into a new app: bounded model labels from the config, the
    scrape-time gauges, WebSocket cap refusals counted as limit refusals, the multiprocess
    gauge copier and the OTLP exporter (``observability.otlp_endpoint``) as lifetimes."""
    metrics = gateway.metrics
    metrics.models = ModelLabels.from_settings(gateway.settings)
    metrics.watch(stream_samples(gateway))
    metrics.watch(budget_samples(gateway))
    gateway.sockets.on_refuse = lambda key, reason: metrics.rate_limited.labels(key, reason).inc()
    app.cleanup_ctx.append(_mirror_lifetime)
    app.cleanup_ctx.append(_tracing_lifetime)


async def _mirror_lifetime(app: web.Application) -> AsyncIterator[None]:
    """Multiprocess mode: copy this worker's scrape-time gauges every ``MIRROR_INTERVAL_S``."""
    metrics = app[GATEWAY].metrics
    task = None
    if metrics.multiprocess_dir is not None:
        task = asyncio.get_running_loop().create_task(metrics.mirror_forever(MIRROR_INTERVAL_S))
    yield
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _tracing_lifetime(app: web.Application) -> AsyncIterator[None]:
    """With ``observability.otlp_endpoint``: export one span per request; flush at exit."""
    gateway = app[GATEWAY]
    exporter = tracing.start(lambda: gateway.settings, gateway.metrics)
    yield
    if exporter is not None:
        await exporter.close()


@contextlib.contextmanager
def multiprocess_dir() -> Iterator[str]:
    """For the ``--workers N`` supervisor: a fresh directory for prometheus-client's
    multiprocess files, named in ``PROMETHEUS_MULTIPROC_DIR`` for the workers it starts
    (set before they are spawned), removed at exit. An operator's own directory (the
    variable already set) is used as it is and kept."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        yield given
        return
    path = tempfile.mkdtemp(prefix="shepherd-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def worker_gone(pid: int | None) -> None:
    """A worker exited (the supervisor replaces it): drop its live gauges' files, so
    ``livesum``/``livemax`` gauges stop counting it; its counters stay in the totals."""
    if pid is None or not os.environ.get(MULTIPROC_ENV):
        return
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
    except OSError as exc:
        log.warning("could not drop a dead worker's metrics", extra={"pid": pid, "error": str(exc)})


def stream_samples(gateway: Gateway) -> Callable[[], list[Sample]]:
    """Running and detached streams, and open WebSockets by endpoint."""

    def samples() -> list[Sample]:
        logs = gateway.streams.logs()
        detached = sum(1 for log in logs if not log.closed and not log.readers)
        out: list[Sample] = [("shepherd_streams_running", {}, float(gateway.streams.running)),
                             ("shepherd_streams_detached", {}, float(detached))]
        out.extend(("shepherd_websockets_open", {"endpoint": endpoint}, float(count))
                   for endpoint, count in sorted(gateway.sockets.by_endpoint().items()))
        return out

    return samples


def budget_samples(gateway: Gateway, clock: Callable[[], float] = time.time) -> Callable[[], list[Sample]]:
    """What each configured key's budget has left in its current window (memory backend
    only; see the module docstring). A key that spent nothing yet shows its whole budget."""

    def samples() -> list[Sample]:
        store = gateway.limiter.store
        if not isinstance(store, MemoryLimitStore):
            return []
        now = clock()
        out: list[Sample] = []
        for name, cfg in gateway.settings.keys.items():
            budget = cfg.budget
            if budget is None:
                continue
            tokens, usd = store.spent.get((name, int(now // budget.period_s)), (0, 0.0))
            if budget.tokens is not None:
                out.append(("shepherd_budget_remaining", {"key": name, "unit": "tokens"},
                            float(max(0, budget.tokens - tokens))))
            if budget.usd is not None:
                out.append(("shepherd_budget_remaining", {"key": name, "unit": "usd"},
                            max(0.0, budget.usd - usd)))
        return out

    return samples
