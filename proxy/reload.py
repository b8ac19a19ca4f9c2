"""Hot reload: re-read the YAML file the gateway was started with and apply it to the running
process without dropping a request (DESIGN §4 "Operations": SIGHUP, ``POST /admin/reload``,
``shepherd reload``).

Two steps:

* ``plan_reload(old, new)`` is pure: it compares two ``Settings`` and returns a
  ``ReloadPlan``: the keys, upstreams and models added, removed or changed, the other
  settings that changed, and the settings a running process cannot change
  (``RESTART_REQUIRED``: the listener, the state backend, the stream registry, the ledger),
  which keep their old value in ``plan.settings`` and are reported as ``restart_required``.
* ``apply_plan`` applies it to the ``Gateway``: pools of new and changed upstreams are opened
  first; then everything is swapped in one synchronous step (STYLE §3: no request sees half a
  config); then health probes are stopped and started.

What a reload keeps:

* the ``Limiter`` and its stores: their state (GCRA arrival times, token buckets, concurrency
  leases, budgets) is held by key name and scope, so a key whose ``rpm`` changed goes on from
  its state at the new rate and every other key's state is untouched. Only the limits the
  ``DemandBuilder`` reads change.
* the ``Admission`` and ``Balancer`` objects: slots in use stay counted (a request on a
  removed upstream keeps its slot until it ends), and an unchanged upstream keeps its health.
* every in-flight request or stream: it holds the ``Upstream`` it was sent on. A removed or
  changed upstream (changed = replaced: a new pool under the same name, healthy as at
  start-up) takes no new request; its old pool is drained (``drain_and_close``: closed once no
  connection of it is in use) in the background.

An invalid file (``ConfigError``, or a key whose name or secret a runtime key holds) changes
nothing; the errors are logged with their key paths and returned by ``POST /admin/reload``
(400). One reload runs at a time (a lock); SIGHUPs that arrive during one are coalesced into
one more reload after it.

With ``--workers N`` the supervisor forwards SIGHUP to every worker; a worker that applied a
``POST /admin/reload`` sends SIGHUP to the supervisor (``notify_parent``), which forwards it to
all workers, so every worker reloads (the one that took the request finds nothing left to
change).

This module is part of layer 7 (``app.py`` owns reload): it uses the pipeline's ``Gateway``
and ``admin_api.authorize``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from proxy.admin_api import authorize
from proxy.admission import SlotLimits
from proxy.auth import KeyConflictError
from proxy.balancer import DeploymentSpec
from proxy.config import ConfigError, Settings, load_settings_file
from proxy.errors import GatewayError
from proxy.limits import DemandBuilder
from proxy.pipeline import Gateway
from proxy.upstream import Upstream

log = logging.getLogger("proxy")

#: Settings a running process cannot change, by section: the fields named (Python names), or
#: ``None`` for the whole section. A reload keeps their old values and reports the key paths
#: of those that differ in the file as ``restart_required``.
RESTART_REQUIRED: dict[str, tuple[str, ...] | None] = {
    # the listener and the app: bound, sized and wired at start-up
    "server": ("host", "port", "workers", "cpu_affinity", "max_body_bytes", "max_connections",
               "header_timeout_s", "keepalive_timeout_s", "backlog", "cors_origins"),
    "state": None,  # the limit store and the Redis stream store are built once
    "limits": ("lease_ttl_s", "block_ttl_s", "block_max_requests"),  # limit store parameters
    "streams": None,  # the stream registry
    "ledger": None,  # the usage ledger's database
}

#: A retired pool is not closed before this many seconds after the swap: a request that took
#: the old ``Upstream`` just before it has certainly checked out its connection by then.
RETIRE_GRACE_S = 0.5

#: A retired pool still in use after this long is closed anyway (its last requests fail), in
#: seconds: a stream may legitimately run for a long time, a stuck one must not pin a pool.
RETIRED_DRAIN_MAX_S = 3600.0

#: How often a retired pool is checked for connections in use, in seconds.
DRAIN_POLL_S = 0.05


# --- the plan (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Changes:
    """Names added, removed and changed between two configs (config order)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def as_dict(self) -> dict[str, list[str]]:
        return {"added": list(self.added), "removed": list(self.removed), "changed": list(self.changed)}


def diff(old: Mapping[str, object], new: Mapping[str, object]) -> Changes:
    """What changed from ``old`` to ``new`` (entries compared with ``==``; pydantic models
    compare every field, secrets by value)."""
    return Changes(added=tuple(n for n in new if n not in old),
                   removed=tuple(n for n in old if n not in new),
                   changed=tuple(n for n in new if n in old and new[n] != old[n]))


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload changes.

    Attributes:
        settings: the settings to serve: the new file's, with the ``restart_required`` ones
            kept at their running value.
        keys, upstreams, models: ``keys.<name>``, ``upstreams.<name>``, ``models.<id>``
            added, removed, changed.
        other: key paths of the other settings that changed and are applied
            (``routing.retry``, ``admin.keys``, ``server.access_log``...).
        restart_required: key paths that differ in the file but cannot change in a running
            process; their old value is kept.
    """

    settings: Settings
    keys: Changes = Changes()
    upstreams: Changes = Changes()
    models: Changes = Changes()
    other: tuple[str, ...] = ()
    restart_required: tuple[str, ...] = ()

    def __repr__(self) -> str:
        named = (("keys", self.keys), ("upstreams", self.upstreams), ("models", self.models))
        parts = [f"{label}: +{len(c.added)} -{len(c.removed)} ~{len(c.changed)}" for label, c in named]
        parts += [f"other: {len(self.other)}", f"restart: {len(self.restart_required)}"]
        return f"<ReloadPlan [{' | '.join(parts)}]>"

    @property
    def changes_anything(self) -> bool:
        """Whether applying the plan changes what the gateway serves."""
        return bool(self.keys or self.upstreams or self.models or self.other)

    def report(self) -> dict[str, Any]:
        """The plan as ``POST /admin/reload`` answers it (without the timing)."""
        return {"changed": self.changes_anything, "keys": self.keys.as_dict(),
                "upstreams": self.upstreams.as_dict(), "models": self.models.as_dict(),
                "other": list(self.other), "restart_required": list(self.restart_required)}


def plan_reload(old: Settings, new: Settings) -> ReloadPlan:
    """Compare the running ``old`` settings with a freshly loaded ``new`` file. Pure."""
    sections: dict[str, BaseModel] = {}
    restart: list[str] = []
    for section, fields in RESTART_REQUIRED.items():
        kept, differing = _keep_fields(getattr(old, section), getattr(new, section), fields)
        sections[section] = kept
        restart += [f"{section}.{name}" for name in differing]
    settings = new.model_copy(update=sections)
    other = [path for section in Settings.model_fields if section not in ("keys", "upstreams", "models")
             for path in _changed_paths(section, getattr(old, section), getattr(settings, section))]
    return ReloadPlan(settings, keys=diff(old.keys, new.keys), upstreams=diff(old.upstreams, new.upstreams),
                      models=diff(old.models, new.models), other=tuple(other),
                      restart_required=tuple(restart))


def _keep_fields(old: BaseModel, new: BaseModel, fields: tuple[str, ...] | None
                 ) -> tuple[BaseModel, list[str]]:
    """``new`` with ``fields`` (``None``: all) taken from ``old``, and the config names
    (aliases) of those that differed."""
    names = tuple(type(new).model_fields) if fields is None else fields
    differing = [name for name in names if getattr(old, name) != getattr(new, name)]
    kept = new.model_copy(update={name: getattr(old, name) for name in differing})
    return kept, [_config_name(type(new), name) for name in differing]


def _changed_paths(section: str, old: object, new: object) -> list[str]:
    """Key paths of the fields of one section that differ (the section itself when it is
    not a model)."""
    if old == new:
        return []
    if not isinstance(old, BaseModel) or not isinstance(new, BaseModel):
        return [section]
    return [f"{section}.{_config_name(type(new), name)}" for name in type(new).model_fields
            if getattr(old, name) != getattr(new, name)]


def _config_name(model: type[BaseModel], name: str) -> str:
    """The name a field has in the YAML (its alias: ``header_timeout`` for ``header_timeout_s``)."""
    return model.model_fields[name].alias or name


# --- what the running objects are built from -----------------------------------------------------


def slot_limits(settings: Settings) -> dict[str, SlotLimits]:
    """Admission bounds of every upstream (``max_in_flight``, ``max_queue``, ``queue_timeout``)."""
    return {name: SlotLimits(cfg.slots, cfg.max_queue, cfg.queue_timeout_s)
            for name, cfg in settings.upstreams.items()}


def deployment_specs(settings: Settings) -> dict[str, DeploymentSpec]:
    """What the balancer knows of every upstream, in config order."""
    return {
        name: DeploymentSpec(
            name, cfg.models, cfg.priority, cfg.weight,
            cfg.health_check.healthy_threshold, cfg.health_check.unhealthy_threshold,
            cfg.outlier_detection.consecutive_failures, cfg.outlier_detection.base_ejection_s,
            cfg.outlier_detection.max_ejection_s)
        for name, cfg in settings.upstreams.items()
    }


def model_upstreams(settings: Settings) -> dict[str, tuple[str, ...]]:
    """``models.<id>.upstreams`` of the models that name some."""
    return {model: cfg.upstreams for model, cfg in settings.models.items() if cfg.upstreams}


# --- health probes --------------------------------------------------------------------------------


class ProbeSet:
    """The health-probe task of each upstream with ``health_check.enabled``, by name, so that
    a reload can stop a removed upstream's and start a new one's.

    Args:
        probe: the probe loop of one upstream (``app.probe_forever`` bound to the gateway).
    """

    def __init__(self, probe: Callable[[Upstream], Coroutine[Any, Any, None]]) -> None:
        self._probe = probe
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"<ProbeSet [{', '.join(self.tasks) or 'none'}]>"

    def start(self, upstream: Upstream) -> None:
        """Start probing ``upstream`` (nothing if its health checks are off). Needs a running loop."""
        if upstream.config.health_check.enabled:
            self.tasks[upstream.name] = asyncio.get_running_loop().create_task(self._probe(upstream))

    async def stop(self, names: Collection[str]) -> None:
        """Stop the probes of ``names`` and wait until they have ended."""
        tasks = [task for name in names if (task := self.tasks.pop(name, None)) is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop_all(self) -> None:
        await self.stop(list(self.tasks))


# --- applying a plan ------------------------------------------------------------------------------


async def apply_plan(gateway: Gateway, plan: ReloadPlan, probes: ProbeSet) -> list[Upstream]:
    """Apply ``plan`` to ``gateway``; returns the retired ``Upstream`` objects (removed and
    replaced), whose pools the caller drains and closes.

    Raises:
        ConfigError: a key of the file has the name or the secret of a runtime key (at
            ``keys``); nothing was changed.
    Not safe to cancel between the pools' opening and the swap (the caller shields it).
    """
    if not plan.changes_anything:
        return []  # the running settings are the file's already (restart-only keys aside)
    new = plan.settings
    fresh = {name: Upstream(name, new.upstreams[name])
             for name in (*plan.upstreams.added, *plan.upstreams.changed)}
    for upstream in fresh.values():
        await upstream.start()
    try:
        retired = swap(gateway, plan, fresh)
    except ConfigError:
        for upstream in fresh.values():
            await upstream.close()
        raise
    await probes.stop([*plan.upstreams.removed, *plan.upstreams.changed])
    for upstream in fresh.values():
        probes.start(upstream)
    return retired


def swap(gateway: Gateway, plan: ReloadPlan, fresh: Mapping[str, Upstream]) -> list[Upstream]:
    """Put ``plan`` in place in one synchronous step (no request runs in between); returns
    the retired upstreams. ``fresh``: started ``Upstream`` objects of the added and changed
    upstreams.

    Raises:
        ConfigError: the keys clash with runtime keys (raised before anything changed).
    """
    new = plan.settings
    try:
        gateway.keys.replace_config(new.keys)  # all or nothing; first, so a clash changes nothing
    except KeyConflictError as exc:
        raise ConfigError([("keys", str(exc))], "reload") from None
    upstreams = gateway.upstreams  # the dispatcher holds the same dict: change it in place
    retired = [upstreams[name] for name in (*plan.upstreams.removed, *plan.upstreams.changed)]
    serving = {name: fresh.get(name) or upstreams[name] for name in new.upstreams}
    upstreams.clear()
    upstreams.update(serving)  # config order: /readyz and /v1/models list them in it
    gateway.admission.reconfigure(slot_limits(new))
    gateway.balancer.reconfigure(deployment_specs(new), model_upstreams(new),
                                 new.routing.max_ejection_percent, new.routing.panic_threshold_percent,
                                 replaced=plan.upstreams.changed)
    retry, budget = new.routing.retry, gateway.dispatcher.budget
    gateway.dispatcher.retry = retry
    budget.percent, budget.minimum = retry.budget_percent, retry.budget_min
    gateway.demands = DemandBuilder(new, gateway.keys)
    gateway.settings = new
    return retired


async def drain_and_close(upstream: Upstream, gateway: Gateway, max_s: float = RETIRED_DRAIN_MAX_S) -> None:
    """Close a retired upstream's pool once none of its connections is in use (its in-flight
    requests and streams have ended) and, if it was removed, no request holds a slot on it;
    at most ``max_s`` seconds after it was retired. Cancelling is safe: the pool is closed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_s
    try:
        await asyncio.sleep(RETIRE_GRACE_S)
        while _retired_busy(upstream, gateway) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)  # polling a count beats hooking every release
        if _retired_busy(upstream, gateway):
            log.warning("retired upstream still busy; closing its pool", extra={
                "upstream": upstream.name, "in_use": upstream.pool_stats()["in_use"]})
    finally:
        await upstream.close()
    log.info("retired upstream pool closed", extra={"upstream": upstream.name})


def _retired_busy(upstream: Upstream, gateway: Gateway) -> bool:
    if upstream.pool_stats()["in_use"]:
        return True
    removed = upstream.name not in gateway.upstreams
    return removed and gateway.admission.in_flight(upstream.name) > 0


# --- the reloader -----------------------------------------------------------------------------


class ReloadUnavailableError(GatewayError):
    """The gateway was not started from a file (``create_app(settings)`` without
    ``config_path``): there is nothing to re-read (409)."""

    status = 409
    error_type = "invalid_request_error"
    default_code = "reload_unavailable"


@dataclass(slots=True)
class Reloader:
    """Reloads ``config_path`` into ``gateway``: one reload at a time, SIGHUPs coalesced.

    Attributes:
        gateway: the running gateway.
        config_path: the YAML file the process was started with; ``None``: reload refused.
        probes: the upstreams' health probes.
        notify_parent: a worker of ``--workers N``: after a ``POST /admin/reload`` it sends
            SIGHUP to the supervisor, which forwards it to every worker.
        reloads: reloads applied (valid files) so far.
    """

    gateway: Gateway
    config_path: str | None
    probes: ProbeSet
    notify_parent: bool = False
    reloads: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _signalled: asyncio.Task[None] | None = None
    _again: bool = False
    _draining: set[asyncio.Task[None]] = field(default_factory=set)

    def __repr__(self) -> str:
        return (f"<Reloader {self.config_path} [reloads: {self.reloads} | "
                f"draining: {len(self._draining)} | running: {self._lock.locked()}]>")

    async def reload(self, trigger: str) -> dict[str, Any]:
        """Re-read the file and apply it; returns the report (``ReloadPlan.report`` plus
        ``duration_ms``: from the start of the reload to the new config serving, ``config``,
        ``trigger``, ``pid``). Waits while another reload runs.

        Raises:
            ConfigError: the file is unreadable or invalid, or its keys clash with runtime
                keys; nothing was changed (logged with every key path).
            ReloadUnavailableError: no config file to re-read.
        Cancelling is safe: the reload runs to its end in a task of its own (holding the lock).
        """
        if self.config_path is None:
            raise ReloadUnavailableError("This gateway was not started from a config file; "
                                         "nothing to reload.")
        task = asyncio.get_running_loop().create_task(self._locked_reload(self.config_path, trigger))
        task.add_done_callback(_retrieve)  # a caller cancelled meanwhile does not read the result
        return await asyncio.shield(task)

    async def _locked_reload(self, path: str, trigger: str) -> dict[str, Any]:
        async with self._lock:
            return await self._reload(path, trigger)

    async def _reload(self, path: str, trigger: str) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            new = await asyncio.to_thread(load_settings_file, path)
            plan = plan_reload(self.gateway.settings, new)
            retired = await apply_plan(self.gateway, plan, self.probes)
        except ConfigError as exc:
            log.error("reload refused: invalid config; nothing changed", extra={
                "config": path, "trigger": trigger,
                "errors": [f"{path or '<root>'}: {message}" for path, message in exc.errors]})
            raise
        duration_ms = round((time.perf_counter() - started) * 1000, 2)
        for upstream in retired:
            self._drain(upstream)
        self.reloads += 1
        report = {"object": "reload", **plan.report(), "duration_ms": duration_ms,
                  "config": path, "trigger": trigger, "pid": os.getpid()}
        self._log(plan, report)
        return report

    def _log(self, plan: ReloadPlan, report: dict[str, Any]) -> None:
        log.info("config reloaded", extra={
            "config": self.config_path, "trigger": report["trigger"], "pid": report["pid"],
            "changed": report["changed"], "duration_ms": report["duration_ms"],
            "keys": report["keys"], "upstreams": report["upstreams"], "models": report["models"],
            "other": report["other"]})
        if plan.restart_required:
            log.warning("config reload: these settings need a restart; their running values are kept",
                        extra={"restart_required": list(plan.restart_required)})

    def _drain(self, upstream: Upstream) -> None:
        task = asyncio.get_running_loop().create_task(drain_and_close(upstream, self.gateway))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def on_signal(self) -> None:
        """SIGHUP: reload in the background; while one runs, further signals are coalesced
        into one more reload after it. Never raises."""
        if self._signalled is not None and not self._signalled.done():
            self._again = True
            return
        self._signalled = asyncio.get_running_loop().create_task(self._reload_on_signal())

    async def _reload_on_signal(self) -> None:
        while True:
            self._again = False
            with contextlib.suppress(ConfigError):  # logged by reload()
                try:
                    await self.reload("SIGHUP")
                except ReloadUnavailableError:
                    log.warning("SIGHUP ignored: the gateway was not started from a config file")
                except Exception:  # a bug must not end the process or the next reload
                    log.exception("reload failed")
            if not self._again:
                return

    def tell_workers(self) -> None:
        """A worker of ``--workers N``: ask the supervisor to reload every worker (SIGHUP)."""
        if self.notify_parent:
            os.kill(os.getppid(), signal.SIGHUP)

    async def close(self) -> None:
        """At shutdown: stop a signalled reload and close the retired pools still draining."""
        tasks = [t for t in (self._signalled, *self._draining) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


#: Where the app keeps its ``Reloader``.
RELOADER = web.AppKey("reloader", Reloader)


async def reloader_lifetime(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: at exit, close the retired pools still draining. Register it before
    the context that closes the serving pools (it exits after it)."""
    yield
    await app[RELOADER].close()


# --- POST /admin/reload -----------------------------------------------------------------------


async def reload_config(request: web.Request) -> web.Response:
    """``POST /admin/reload`` (admin keys only): re-read the config file and apply it.

    200: the report (``Reloader.reload``): ``keys``/``upstreams``/``models`` added, removed,
    changed; ``other`` settings applied; ``restart_required`` key paths (old values kept);
    ``duration_ms``. 400 ``invalid_config``: nothing changed; ``errors`` lists
    ``{"path", "message"}``. 409 ``reload_unavailable``: not started from a file.
    With ``--workers N`` the other workers reload right after (via the supervisor).
    """
    authorize(request)
    reloader = request.app[RELOADER]
    try:
        report = await reloader.reload("POST /admin/reload")
    except ConfigError as exc:
        errors = [{"path": path or "<root>", "message": message} for path, message in exc.errors]
        return web.json_response({"error": {
            "message": f"The config file is invalid ({len(errors)} error(s)); nothing was changed.",
            "type": "invalid_request_error", "param": None, "code": "invalid_config"},
            "errors": errors}, status=400)
    reloader.tell_workers()
    return web.json_response(report)


def add_routes(app: web.Application) -> None:
    """Register ``POST /admin/reload``."""
    app.router.add_post("/admin/reload", reload_config)
