"""``/admin/keys`` and ``/admin/streams``: virtual keys at runtime and the streams of this
instance (DESIGN §4 "Operations"), behind ``admin.keys`` like ``/admin/usage``.

::

    GET    /admin/keys[?include_revoked=true]  every key (config and runtime): source, limits,
                                               what it has left now (``proxy.limits_view``)
    POST   /admin/keys                         {name, models, rpm, burst, tpm, max_concurrent,
                                               per_model, budget, priority, max_websockets}
                                               → 201 with the secret (``key``), shown once
    GET    /admin/keys/{name}                  one key, as in the list
    PATCH  /admin/keys/{name}                  change a runtime key's fields (null: default)
    DELETE /admin/keys/{name}                  revoke a runtime key (its next request: 401)
    GET    /admin/streams                      this instance's live and detached streams

A body is validated as ``keys.<name>`` is (``KeyLimitsConfig``): a bad field is 400 with
``param``; a name in use is 409 ``key_exists``; a config key is read-only: PATCH/DELETE on it
is 409 ``key_read_only``. Runtime keys live in the ledger's database (``ledger.url``), so
they need ``ledger.enabled`` (else 404 ``runtime_keys_disabled``); a database that does not
answer is 503 ``key_store_unavailable``. See ``proxy.runtime_keys`` for how changes reach
every instance (within ``KEYS_POLL_INTERVAL_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from proxy.admin_api import authorize
from proxy.auth import KeyEntry
from proxy.config import KeyLimitsConfig
from proxy.errors import ConflictError, InvalidRequestError, NotFoundError, OverloadedError
from proxy.limits import Budget, Scope
from proxy.limits_view import Left, key_left
from proxy.observability import log
from proxy.pipeline import GATEWAY
from proxy.runtime_keys import (
    KeyExistsError,
    KeyRecord,
    RuntimeKeys,
    apply_patch,
    limits_json,
    parse_create,
)
from proxy.runtime_keys_store import open_keys_db
from proxy.streams import StreamLog, StreamState


class _KeysState:
    """The app's ``RuntimeKeys`` (``None`` with ``ledger.enabled: false``) and its poll task."""

    def __init__(self) -> None:
        self.runtime: RuntimeKeys | None = None
        self.poller: asyncio.Task[None] | None = None


KEYS_STATE = web.AppKey("keys_state", _KeysState)


async def runtime_keys_lifetime(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: load the runtime keys (a database down at start-up is logged and
    retried by the poller: config keys work meanwhile), then poll for other instances'
    changes every ``KEYS_POLL_INTERVAL_S`` until the app stops."""
    gateway, state = app[GATEWAY], app[KEYS_STATE]
    if gateway.settings.ledger.enabled:
        runtime = RuntimeKeys(open_keys_db(gateway.settings.ledger.url.get_secret_value()), gateway.keys)
        try:
            loaded = await runtime.sync()
            log.info("runtime keys loaded", extra={"keys": loaded})
        except Exception as exc:
            log.warning("runtime keys: database unavailable at start-up; retrying",
                        extra={"error": type(exc).__name__})
        state.runtime = runtime
        state.poller = asyncio.create_task(runtime.run_forever(), name="runtime-keys-poller")
    yield
    if state.poller is not None:
        state.poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await state.poller
    if state.runtime is not None:
        await state.runtime.close()


def _runtime(request: web.Request) -> RuntimeKeys:
    runtime = request.app[KEYS_STATE].runtime
    if runtime is None:
        raise NotFoundError("Runtime keys are stored in the ledger's database, which is disabled "
                            "(ledger.enabled: false).", code="runtime_keys_disabled")
    return runtime


def _unavailable(exc: BaseException) -> OverloadedError:
    log.warning("runtime keys: database call failed", extra={"error": type(exc).__name__})
    return OverloadedError("The key database is unavailable; retry later.", code="key_store_unavailable",
                           retry_after_s=2.0)


# --- the key objects --------------------------------------------------------------------------


def iso_time(unix_s: float | None) -> str | None:
    """``unix_s`` as ISO 8601 UTC with milliseconds (``…Z``), ``None`` stays ``None``."""
    if unix_s is None:
        return None
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def key_object(name: str, source: str, limits: KeyLimitsConfig, record: KeyRecord | None,
               left: Left | None, left_from: str) -> dict[str, Any]:
    """One key as ``/admin/keys`` shows it: flat fields (the status page's table), the
    ``*_left`` fields from ``left`` (``None``: no such limit, or unknown; ``left_from`` says
    where they were read: ``process``, ``redis`` or ``unavailable``)."""
    body: dict[str, Any] = {"object": "virtual_key", "name": name, "source": source, **limits_json(limits),
                            "effective_burst": limits.effective_burst}
    body.update({"created_at": iso_time(record.created_at if record else None),
                 "updated_at": iso_time(record.updated_at if record else None),
                 "revoked_at": iso_time(record.revoked_at if record else None)})
    left = left or Left()
    body.update({"requests_left": left.requests, "requests_reset_s": _round(left.requests_reset_s),
                 "tokens_left": left.tokens, "tokens_reset_s": _round(left.tokens_reset_s),
                 "concurrent_left": left.concurrent, "budget_tokens_left": left.budget_tokens,
                 "budget_usd_left": left.budget_usd, "budget_reset_s": _round(left.budget_reset_s),
                 "left_from": left_from})
    return body


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def key_scope(name: str, limits: KeyLimitsConfig) -> tuple[Scope, Budget | None]:
    """The key-wide limit scope and budget of ``name`` (as ``DemandBuilder`` builds them)."""
    scope = Scope(name, limits.rpm, limits.effective_burst, limits.tpm, limits.max_concurrent)
    budget = limits.budget
    return scope, (None if budget is None else Budget(name, budget.tokens, budget.usd, budget.period_s))


async def _describe(request: web.Request, name: str, source: str, limits: KeyLimitsConfig,
                    record: KeyRecord | None) -> dict[str, Any]:
    left: Left | None = None
    left_from = "unavailable"
    if record is None or record.revoked_at is None:
        left, left_from = await key_left(request.app[GATEWAY].limiter, *key_scope(name, limits))
    return key_object(name, source, limits, record, left, left_from)


def _listed(request: web.Request, include_revoked: bool
            ) -> list[tuple[str, str, KeyLimitsConfig, KeyRecord | None]]:
    runtime = request.app[KEYS_STATE].runtime
    records = runtime.records if runtime is not None else {}
    out: list[tuple[str, str, KeyLimitsConfig, KeyRecord | None]] = [
        (e.name, e.source, e.limits, records.get(e.name) if e.source == "runtime" else None)
        for e in request.app[GATEWAY].keys.entries()]
    if include_revoked:
        out += [(r.name, "runtime", r.limits, r) for r in records.values() if r.revoked_at is not None]
    return out


# --- handlers ---------------------------------------------------------------------------------


async def list_keys(request: web.Request) -> web.Response:
    """``GET /admin/keys``: ``{"object": "list", "data": [key objects]}`` (config keys first)."""
    authorize(request)
    include_revoked = request.query.get("include_revoked", "").lower() in ("1", "true", "yes")
    keys = _listed(request, include_revoked)
    data = await asyncio.gather(*(_describe(request, *k) for k in keys))
    return web.json_response({"object": "list", "data": list(data)})


async def get_key(request: web.Request) -> web.Response:
    """``GET /admin/keys/{name}``: one key object; 404 ``key_not_found``."""
    authorize(request)
    name = request.match_info["name"]
    for listed in _listed(request, include_revoked=True):
        if listed[0] == name:
            return web.json_response(await _describe(request, *listed))
    raise _not_found(name)


async def create_key(request: web.Request) -> web.Response:
    """``POST /admin/keys``: 201 with the key object and ``key``, the secret (shown once)."""
    authorize(request)
    name, limits = parse_create(await _json_body(request))
    runtime = _runtime(request)
    try:
        record, secret = await runtime.create(name, limits)
    except KeyExistsError as exc:
        raise _exists(exc) from None
    except Exception as exc:
        raise _unavailable(exc) from None
    body = await _describe(request, name, "runtime", record.limits, record)
    return web.json_response({**body, "key": secret}, status=201)


async def update_key(request: web.Request) -> web.Response:
    """``PATCH /admin/keys/{name}``: the changed key object."""
    authorize(request)
    name = request.match_info["name"]
    entry = _runtime_entry(request, name)
    limits = apply_patch(entry.limits, await _json_body(request))
    try:
        record = await _runtime(request).update(name, limits)
    except Exception as exc:
        raise _unavailable(exc) from None
    if record is None or record.revoked_at is not None:
        raise _not_found(name)
    return web.json_response(await _describe(request, name, "runtime", record.limits, record))


async def revoke_key(request: web.Request) -> web.Response:
    """``DELETE /admin/keys/{name}``: revoke; the key object with ``revoked_at``. Revoking
    a revoked key answers the same again."""
    authorize(request)
    name = request.match_info["name"]
    runtime = _runtime(request)
    entry = request.app[GATEWAY].keys.entry(name)
    if entry is not None and entry.source == "config":
        raise _read_only(name)
    try:
        record = await runtime.revoke(name)
    except Exception as exc:
        raise _unavailable(exc) from None
    if record is None:
        raise _not_found(name)
    return web.json_response(key_object(name, "runtime", record.limits, record, None, "unavailable"))


def _runtime_entry(request: web.Request, name: str) -> KeyEntry:
    _runtime(request)
    entry = request.app[GATEWAY].keys.entry(name)
    if entry is None:
        raise _not_found(name)
    if entry.source == "config":
        raise _read_only(name)
    return entry


async def _json_body(request: web.Request) -> object:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise InvalidRequestError("The body must be JSON.", param=None) from None


def _not_found(name: str) -> NotFoundError:
    return NotFoundError(f"No key named {name!r}.", code="key_not_found")


def _read_only(name: str) -> ConflictError:
    return ConflictError(f"Key {name!r} comes from the config file (keys.{name}) and is read-only here: "
                         "change it in the YAML and reload.", code="key_read_only")


def _exists(exc: KeyExistsError) -> ConflictError:
    if exc.in_config:
        message = f"A key named {exc.name!r} exists in the config file (keys.{exc.name})."
    elif exc.revoked:
        message = (f"A key named {exc.name!r} existed and was revoked; names are not reused "
                   "(the usage ledger's rows name keys).")
    else:
        message = f"A key named {exc.name!r} exists."
    return ConflictError(message, param="name", code="key_exists")


# --- GET /admin/streams -----------------------------------------------------------------------


def stream_object(stream: StreamLog, now: float) -> dict[str, Any]:
    """One stream as ``/admin/streams`` shows it; ``state`` is ``live`` (generating with a
    reader), ``detached`` (generating, no reader: cancelled after ``streams.detach_timeout``
    unless one re-attaches), ``done`` or ``failed`` (kept for resumers)."""
    if stream.state is StreamState.RUNNING:
        state = "live" if stream.readers else "detached"
    else:
        state = stream.state.value
    return {"stream_id": stream.stream_id, "key": stream.owner, "model": stream.model or None,
            "endpoint": stream.endpoint or None, "state": state, "readers": stream.readers,
            "last_seq": stream.last_seq, "age_s": round(now - stream.created_at, 3)}


async def list_streams(request: web.Request) -> web.Response:
    """``GET /admin/streams[?key=<name>&all=true]``: this instance's running streams (live
    and detached; ``all=true`` adds the finished ones still kept), newest first.
    ``{"object": "list", "instance": "this", "data": [...]}``: with ``state.backend: redis``
    other instances' streams are not listed (ask each instance)."""
    authorize(request)
    key = request.query.get("key") or None
    finished = request.query.get("all", "").lower() in ("1", "true", "yes")
    now = time.monotonic()
    logs = [s for s in request.app[GATEWAY].streams.logs()
            if (finished or not s.closed) and (key is None or s.owner == key)]
    logs.sort(key=lambda s: s.created_at, reverse=True)
    return web.json_response({"object": "list", "instance": "this",
                              "data": [stream_object(s, now) for s in logs]})


def add_routes(app: web.Application) -> None:
    """Register ``/admin/keys*`` and ``/admin/streams``."""
    app[KEYS_STATE] = _KeysState()
    app.router.add_get("/admin/keys", list_keys)
    app.router.add_post("/admin/keys", create_key)
    app.router.add_get("/admin/keys/{name}", get_key)
    app.router.add_patch("/admin/keys/{name}", update_key)
    app.router.add_delete("/admin/keys/{name}", revoke_key)
    app.router.add_get("/admin/streams", list_streams)

