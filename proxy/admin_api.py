"""``/admin/*``: the operators' API, opened only by ``admin.keys`` (DESIGN §4 "Operations").

Admin keys are separate from virtual keys (``keys.<name>``): they are held as SHA-256
digests and compared with ``hmac.compare_digest`` like virtual keys, and a virtual key never
opens ``/admin`` (config refuses an admin key equal to a virtual one). Refusals are
OpenAI-shaped: no key or an unknown key → 401 ``invalid_api_key``; a virtual key, or any key
while ``admin.keys`` is empty → 403 (``admin_key_required``, ``admin_disabled``).

``GET /admin/usage`` reads the usage ledger (``proxy.ledger``)::

    ?key=<key name>&model=<id>&since=<ISO 8601 | unix s>&until=<…>   filters (AND); since ≤ ts < until
    &group_by=key|model|day       sums per group (day: UTC date), else rows:
    &limit=1..1000 (default 100)&order=desc|asc (default desc)&cursor=<id>   rows, paginated

JSON: ``{"object": "list", "data": [...], "has_more", "next_cursor"}`` (rows) or
``{"object": "list", "group_by", "data": [...]}`` (groups); with ``Accept: text/csv`` the
same objects as CSV with a header line (rows: ``X-Next-Cursor`` when there are more).
The columns are ``proxy.ledger.ROW_COLUMNS`` and ``GROUP_COLUMNS``.

This module also builds the ledger from ``ledger:`` (``build_ledger``) and runs it for the
app's lifetime (``ledger_lifetime``, a ``cleanup_ctx``).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from aiohttp import web

from proxy.auth import KeyStore, presented_key
from proxy.config import AdminKeyConfig, Settings
from proxy.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
)
from proxy.ledger import (
    GROUP_BYS,
    GROUP_COLUMNS,
    ROW_COLUMNS,
    Ledger,
    LedgerEvents,
    NullLedger,
    UsageQuery,
    UsageSink,
    parse_time,
)
from proxy.ledger_store import open_store
from proxy.observability import Metrics, log, request_context
from proxy.pipeline import GATEWAY

#: The longest ``GET /admin/usage`` waits for the database before answering 503, in seconds.
QUERY_TIMEOUT_S = 30.0


# --- the ledger's lifetime --------------------------------------------------------------------


def build_ledger(settings: Settings, metrics: Metrics) -> UsageSink:
    """The ledger ``ledger:`` describes (``NullLedger`` when disabled), counting written,
    dropped and failed rows in ``metrics``. Nothing is opened until ``ledger_lifetime``."""
    config = settings.ledger
    if not config.enabled:
        return NullLedger()
    events = LedgerEvents(dropped=metrics.ledger_rows_dropped.inc, written=metrics.ledger_rows_written.inc,
                          failed=metrics.ledger_write_errors.inc)
    return Ledger(open_store(config.url.get_secret_value()), batch_size=config.batch_size,
                  flush_interval_s=config.flush_interval_s, buffer_rows=config.buffer_rows,
                  write_timeout_s=config.write_timeout_s, events=events)


async def ledger_lifetime(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: connect and migrate at start-up, start the flusher; at exit write
    what is buffered within ``server.drain_timeout``. Register it before the context that
    ends the stream producers, so their rows are recorded before this one exits."""
    gateway = app[GATEWAY]
    ledger = gateway.ledger
    if isinstance(ledger, Ledger):
        await ledger.start()
        gateway.metrics.watch(lambda: [("shepherd_ledger_buffered_rows", {}, float(len(ledger.buffer)))])
    yield
    if isinstance(ledger, Ledger):
        await ledger.close(gateway.settings.server.drain_timeout_s)
        log.info("usage ledger closed", extra={"written": ledger.written, "dropped": ledger.buffer.dropped})


# --- admin keys -------------------------------------------------------------------------------


class AdminKeys:
    """The digests of ``admin.keys``.

    Args:
        entries: the ``admin.keys`` config entries.
    """

    def __init__(self, entries: Sequence[AdminKeyConfig]) -> None:
        self._entries = [(bytes.fromhex(e.digest_hex), e.name or f"admin-{i}") for i, e in enumerate(entries)]

    def __repr__(self) -> str:
        return f"<AdminKeys [{len(self._entries)} keys]>"

    def authorize(self, headers: Mapping[str, str], virtual: KeyStore) -> str:
        """The name of the admin key the request carries (``Authorization: Bearer`` or
        ``x-api-key``).

        Raises:
            AuthenticationError: no key, or a key that is no key at all (401).
            PermissionDeniedError: a virtual key, or ``admin.keys`` is empty (403).
        """
        key = presented_key(headers)
        if key is None:
            raise AuthenticationError("You didn't provide an admin key. Send it as "
                                      "`Authorization: Bearer <admin key>`.", code="missing_api_key")
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: str | None = None
        for stored, name in self._entries:
            if hmac.compare_digest(stored, digest):
                found = name
        if found is not None:
            return found
        if not self._entries:
            raise PermissionDeniedError("The admin API is disabled: no admin.keys are configured.",
                                        code="admin_disabled")
        if virtual.lookup(key) is not None:
            raise PermissionDeniedError("This is a virtual key; /admin needs an admin key (admin.keys).",
                                        code="admin_key_required")
        raise AuthenticationError("Incorrect admin key provided.")


class _AdminState:
    """The app's ``AdminKeys``, rebuilt when the settings object changes (hot reload)."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.keys = AdminKeys(())


ADMIN_STATE = web.AppKey("admin_state", _AdminState)


def authorize(request: web.Request) -> str:
    """Check the request's admin key (``AdminKeys.authorize``); returns its name and records
    ``admin:<name>`` as the request's key in logs."""
    gateway, state = request.app[GATEWAY], request.app[ADMIN_STATE]
    if state.settings is not gateway.settings:
        state.keys, state.settings = AdminKeys(gateway.settings.admin.keys), gateway.settings
    name = state.keys.authorize(request.headers, gateway.keys)
    ctx = request_context.get()
    if ctx is not None:
        ctx.key_name = f"admin:{name}"
    return name


# --- GET /admin/usage -------------------------------------------------------------------------


def usage_query(params: Mapping[str, str]) -> UsageQuery:
    """The ``UsageQuery`` of ``/admin/usage``'s query string.

    Raises:
        InvalidRequestError: a malformed ``since``/``until``/``group_by``/``limit``/
            ``cursor``/``order`` (400, naming the parameter).
    """
    group_by = params.get("group_by") or None
    if group_by is not None and group_by not in GROUP_BYS:
        raise InvalidRequestError(f"group_by must be one of {', '.join(GROUP_BYS)}.", param="group_by")
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("order must be asc or desc.", param="order")
    return UsageQuery(key=params.get("key") or None, model=params.get("model") or None,
                      since=_time_param(params, "since"), until=_time_param(params, "until"),
                      group_by=group_by, limit=_int_param(params, "limit", 1, 1000),
                      cursor=_int_param(params, "cursor", 0, None),
                      order="asc" if order == "asc" else "desc")


def _time_param(params: Mapping[str, str], name: str) -> float | None:
    value = params.get(name)
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param=name) from None


def _int_param(params: Mapping[str, str], name: str, low: int, high: int | None) -> int | None:
    value = params.get(name)
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low or (high is not None and number > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise InvalidRequestError(f"{name} must be an integer {bound}.", param=name)
    return number


async def usage(request: web.Request) -> web.StreamResponse:
    """``GET /admin/usage`` (see the module docstring). 401/403 without an admin key; 400
    for a malformed parameter; 404 ``ledger_disabled``; 503 ``ledger_unavailable`` when the
    database does not answer within ``QUERY_TIMEOUT_S``."""
    authorize(request)
    query = usage_query(request.query)
    ledger = request.app[GATEWAY].ledger
    if not isinstance(ledger, Ledger):
        raise NotFoundError("The usage ledger is disabled (ledger.enabled: false).", code="ledger_disabled")
    try:
        async with asyncio.timeout(QUERY_TIMEOUT_S):
            results = await ledger.store.query(query)
    except Exception as exc:
        log.warning("usage query failed", extra={"error": type(exc).__name__})
        raise OverloadedError("The usage ledger database is unavailable; retry later.",
                              code="ledger_unavailable", retry_after_s=5.0) from None
    body, columns, headers = _usage_body(query, results)
    if "text/csv" in request.headers.get("Accept", ""):
        return web.Response(text=to_csv(columns, body["data"]), content_type="text/csv", headers=headers)
    return web.json_response(body, headers=headers)


def _usage_body(query: UsageQuery, results: list[dict[str, Any]]
                ) -> tuple[dict[str, Any], tuple[str, ...], dict[str, str]]:
    if query.group_by is not None:
        return ({"object": "list", "group_by": query.group_by, "data": results},
                (query.group_by, *GROUP_COLUMNS), {})
    has_more = len(results) > query.page_size
    data = results[:query.page_size]
    next_cursor = data[-1]["id"] if has_more and data else None
    headers = {"X-Next-Cursor": str(next_cursor)} if next_cursor is not None else {}
    return ({"object": "list", "data": data, "has_more": has_more, "next_cursor": next_cursor},
            ROW_COLUMNS, headers)


def to_csv(columns: Sequence[str], records: Sequence[Mapping[str, Any]]) -> str:
    """``records`` as CSV (RFC 4180, CRLF line ends) with a header line of ``columns``;
    ``None`` is an empty field."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows([["" if r.get(c) is None else r[c] for c in columns] for r in records])
    return out.getvalue()


def add_routes(app: web.Application) -> None:
    """Register ``/admin/*`` (not under ``/v1``, so the order against the catch-all does not
    matter)."""
    app[ADMIN_STATE] = _AdminState()
    app.router.add_get("/admin/usage", usage)
