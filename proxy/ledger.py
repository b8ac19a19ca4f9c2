"""The usage ledger: one ``UsageRow`` per request, written in batches off the request path.

``Ledger.record(row)`` is synchronous and O(1): the row goes into a bounded in-memory
buffer (``ledger.buffer_rows``) and a flusher task writes it with others, at most
``ledger.batch_size`` rows per insert and at most ``ledger.flush_interval`` after it was
recorded, to SQLite (the default, ``sqlite:///shepherd-usage.db``, WAL) or PostgreSQL
(``proxy.ledger_store``). A slow or down database never slows a request::

    request ends ─ record(row) ─▶ buffer (bounded; full: the row is dropped and counted)
                                   │  flusher: peek ≤ batch_size rows → insert (write_timeout)
                                   ▼        ok: pop them · failed: keep them, back off, retry
                                 database (usage table; migrations in schema_migrations)

A batch that fails stays at the head of the buffer and is retried, never written twice:
PostgreSQL's inserts, bounded by ``ledger.write_timeout``, may commit after they timed out,
so there ``request_id`` is unique and duplicates are ignored; SQLite's inserts are not timed
out (the local file answers or fails), so a failed one did not commit.
``Ledger.close(timeout_s)`` writes what is left (the app calls it at shutdown with
``server.drain_timeout``); rows still unwritten then are counted as dropped and logged.

Everything here but the flusher is sans-I/O: ``UsageBuffer``, ``UsageQuery`` and
``parse_time`` take plain values, so they are tested without a database.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import orjson

log = logging.getLogger("proxy.ledger")

#: What ``group_by`` may name.
GroupBy = Literal["key", "model", "day"]
GROUP_BYS: tuple[GroupBy, ...] = ("key", "model", "day")

#: Transports a row may name.
Transport = Literal["http", "websocket"]


@dataclass(slots=True)
class UsageRow:
    """One request as the ledger keeps it.

    Attributes:
        ts: Unix time (seconds, UTC) when the request arrived.
        request_id: ``req_…``, unique (a retried batch never writes a row twice).
        key_name: the virtual key's name (never the key).
        endpoint: ``chat.completions``, ``completions``, ``embeddings``, ``responses``.
        transport: ``http`` or ``websocket``.
        status: the HTTP status the request ended with: the upstream's for a unary answer,
            200 for a stream that ended normally, the error's status otherwise (a stream that
            failed mid-way: the status of the error in its error event; 499: the client
            left a unary request).
        error_code: the OpenAI ``error.code`` it ended with, else ``None``.
        model, upstream, stream_id: ``None`` when not known (refused before routing; not a
            stream).
        prompt_tokens, completion_tokens, total_tokens: as metered (a stream without a
            usage object: the prompt estimate and one token per event); ``None``: unknown.
        cost_usd: at ``models.<id>.price``; ``None`` when the model has no price.
        latency_ms: arrival to the end (unary: the answer ready; stream: the last event).
        ttft_ms: arrival to the first event in the stream log (streams only).
        overhead_ms: time the gateway added: arrival to sending the attempt that answered,
            plus (unary) the time from its answer to the response being ready; ``None``
            when no attempt answered.
        resumes: readers that re-attached to the stream on this instance while it ran.
    """

    ts: float
    request_id: str
    key_name: str
    endpoint: str
    transport: str
    status: int
    error_code: str | None = None
    model: str | None = None
    upstream: str | None = None
    stream_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    overhead_ms: float | None = None
    resumes: int = 0

    def values(self) -> tuple[Any, ...]:
        """The row's values in ``COLUMNS`` order (``dataclasses.astuple`` costs 10x this)."""
        return (self.ts, self.request_id, self.key_name, self.endpoint, self.transport, self.status,
                self.error_code, self.model, self.upstream, self.stream_id, self.prompt_tokens,
                self.completion_tokens, self.total_tokens, self.cost_usd, self.latency_ms, self.ttft_ms,
                self.overhead_ms, self.resumes)


#: The ``usage`` table's columns, in ``UsageRow`` field order.
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRow))

#: A row as buffered and written: ``UsageRow.values()``. A tuple of strings, numbers and
#: ``None`` is untracked by the cyclic GC, so thousands of buffered rows add nothing to its
#: collections (a dataclass instance would be scanned by every one until written).
RowValues = tuple[Any, ...]

#: Each column's SQL type: ``real``, ``int`` or ``text`` (how a batch's JSON is cast back).
COLUMN_TYPES: dict[str, str] = {
    "ts": "real", "status": "int", "prompt_tokens": "int", "completion_tokens": "int",
    "total_tokens": "int", "cost_usd": "real", "latency_ms": "real", "ttft_ms": "real",
    "overhead_ms": "real", "resumes": "int"}


def batch_json(rows: Sequence[RowValues]) -> bytes:
    """``rows`` as one JSON array of arrays (``COLUMNS`` order): a batch is inserted as one
    statement with this as its only parameter, so the database driver's thread (aiosqlite)
    takes the GIL once per batch instead of twice per row."""
    return orjson.dumps(list(rows))


class UsageBuffer:
    """A bounded FIFO of rows waiting to be written (sans-I/O).

    ``add`` refuses a row when ``max_rows`` are held (the newest is the one dropped, so a
    batch being retried keeps its place); ``peek(n)`` shows the oldest ``n`` without
    removing them and ``commit(n)`` removes them once written.
    """

    __slots__ = ("max_rows", "_rows", "dropped", "added")

    def __init__(self, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.max_rows = max_rows
        self._rows: collections.deque[RowValues] = collections.deque()
        self.dropped = 0
        self.added = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"<UsageBuffer [{len(self._rows)}/{self.max_rows} rows | {self.dropped} dropped]>"

    def add(self, row: RowValues) -> bool:
        """Append ``row``; ``False`` (and ``dropped += 1``) when the buffer is full."""
        if len(self._rows) >= self.max_rows:
            self.dropped += 1
            return False
        self._rows.append(row)
        self.added += 1
        return True

    def peek(self, n: int) -> list[RowValues]:
        """The oldest ``n`` rows (fewer when fewer are held), left in place."""
        if n >= len(self._rows):
            return list(self._rows)
        return [self._rows[i] for i in range(n)]

    def commit(self, n: int) -> None:
        """Remove the oldest ``n`` rows (they were written)."""
        for _ in range(min(n, len(self._rows))):
            self._rows.popleft()

    def drop_all(self) -> int:
        """Forget every row (counted as dropped); returns how many."""
        n = len(self._rows)
        self._rows.clear()
        self.dropped += n
        return n


class LedgerStore(Protocol):
    """Where rows go (``proxy.ledger_store``: SQLite or PostgreSQL)."""

    dialect: str
    #: Whether ``insert`` may be timed out (then a retry may repeat a committed batch, and
    #: the store must ignore repeated ``request_id``s).
    insert_timeout: bool

    async def connect(self) -> None:
        """Connect (if not connected) and apply pending migrations. Raises on failure."""

    async def insert(self, rows: Sequence[RowValues]) -> None:
        """Write ``rows`` in one transaction, ignoring ``request_id``s already written."""

    async def reset(self) -> None:
        """Drop the write connection after a failure (the next ``connect`` opens anew)."""

    async def query(self, query: UsageQuery) -> list[dict[str, Any]]:
        """Rows or groups for ``query`` (``UsageQuery`` describes the shapes)."""

    async def close(self) -> None:
        """Close every connection."""


class UsageSink(Protocol):
    """What the pipeline records into: a ``Ledger``, or ``NullLedger`` when disabled."""

    @property
    def enabled(self) -> bool: ...

    def record(self, row: UsageRow) -> None: ...


class NullLedger:
    """``ledger.enabled: false``: rows are built for the metrics only (``enabled`` is False)."""

    enabled = False

    def record(self, row: UsageRow) -> None:
        """Does nothing."""


#: Backoff after a failed batch: doubled per failure from MIN to MAX seconds.
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0
#: At most one "rows dropped" / "write failed" log line per this many seconds.
LOG_EVERY_S = 10.0


@dataclass(slots=True)
class LedgerEvents:
    """Callbacks for metrics: ``dropped(n)`` rows lost (buffer full, or unwritten at
    shutdown), ``written(n)`` rows written, ``failed()`` a batch that failed."""

    dropped: Callable[[int], None] = lambda _n: None
    written: Callable[[int], None] = lambda _n: None
    failed: Callable[[], None] = lambda: None


class Ledger:
    """The buffer and its flusher task.

    Args:
        store: the database.
        batch_size: rows per insert at most.
        flush_interval_s: the longest a recorded row waits before a write is attempted.
        buffer_rows: rows held at most (past it ``record`` drops and counts).
        write_timeout_s: the longest one connect-and-insert may take (then it is retried);
            a store whose inserts are not timed out (SQLite) only bounds its connect.
        events: metric callbacks.
    """

    enabled = True

    def __init__(self, store: LedgerStore, *, batch_size: int = 500, flush_interval_s: float = 1.0,
                 buffer_rows: int = 100_000, write_timeout_s: float = 5.0,
                 events: LedgerEvents | None = None) -> None:
        self.store = store
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.write_timeout_s = write_timeout_s
        self.buffer = UsageBuffer(buffer_rows)
        self.events = events or LedgerEvents()
        self.written = 0
        self.failures = 0
        self._full = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._dropped_logged = 0
        self._last_drop_log = -math.inf
        self._last_fail_log = -math.inf

    def __repr__(self) -> str:
        return (f"<Ledger {self.store.dialect} [{len(self.buffer)} buffered, {self.written} written, "
                f"{self.buffer.dropped} dropped, {self.failures} failed batches]>")

    # --- the request path ----------------------------------------------------------------

    def record(self, row: UsageRow) -> None:
        """Queue ``row`` for writing; never blocks, never raises. A full buffer drops the
        row, counts it (``events.dropped``) and logs at most every ``LOG_EVERY_S``."""
        if not self.buffer.add(row.values()):
            self.events.dropped(1)
            self._log_drops()
            return
        if len(self.buffer) >= self.batch_size:
            self._full.set()

    def _log_drops(self) -> None:
        now = time.monotonic()
        if now - self._last_drop_log >= LOG_EVERY_S:
            log.error("usage ledger buffer full; rows dropped", extra={
                "dropped": self.buffer.dropped - self._dropped_logged, "buffer_rows": self.buffer.max_rows})
            self._last_drop_log, self._dropped_logged = now, self.buffer.dropped

    # --- lifetime ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and migrate (within ``write_timeout_s``; a database that is down then is
        logged and retried by the flusher, never a start-up failure), then start the
        flusher task."""
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await self.store.connect()
        except Exception as exc:
            log.error("usage ledger database unavailable at start-up; rows are buffered", extra={
                "dialect": self.store.dialect, "error": _describe(exc)})
            await self.store.reset()
        self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def close(self, timeout_s: float) -> None:
        """Write every buffered row within ``timeout_s`` seconds, then close the store.
        Rows still unwritten then are counted as dropped and logged."""
        self._closing = True
        self._full.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        lost = self.buffer.drop_all()
        if lost:
            self.events.dropped(lost)
            log.error("usage ledger rows not written before shutdown", extra={"dropped": lost})
        with contextlib.suppress(Exception):
            await self.store.close()

    async def flush(self) -> bool:
        """Write one batch now (the flusher's step); returns whether it succeeded (an empty
        buffer is a success). Cancel-safe: unwritten rows stay in the buffer."""
        rows = self.buffer.peek(self.batch_size)
        if not rows:
            return True
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await self.store.connect()
                if self.store.insert_timeout:
                    await self.store.insert(rows)
            if not self.store.insert_timeout:
                await self.store.insert(rows)
        except Exception as exc:
            self._failed(exc)
            return False
        self.buffer.commit(len(rows))
        self.written += len(rows)
        self.events.written(len(rows))
        return True

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.events.failed()
        now = time.monotonic()
        if now - self._last_fail_log >= LOG_EVERY_S:
            self._last_fail_log = now
            log.warning("usage ledger write failed; rows kept and retried", extra={
                "dialect": self.store.dialect, "error": _describe(exc), "buffered": len(self.buffer)})

    async def _flush_forever(self) -> None:
        """Until closed and empty: wait for a full batch or ``flush_interval_s``, write;
        after a failure drop the connection and back off."""
        backoff_s = RETRY_MIN_S
        while not (self._closing and not self.buffer):
            if len(self.buffer) < self.batch_size and not self._closing:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval_s):
                        await self._full.wait()
            if await self.flush():
                backoff_s = RETRY_MIN_S
                continue
            with contextlib.suppress(Exception):
                await self.store.reset()
            await asyncio.sleep(backoff_s)
            backoff_s = min(RETRY_MAX_S, backoff_s * 2)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


# --- reading ----------------------------------------------------------------------------------

#: Rows per page: the default and the most ``limit`` may ask for.
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """What ``GET /admin/usage`` asks for (all filters optional, combined with AND).

    Attributes:
        key: a key name; model: a model id.
        since, until: Unix seconds; rows with ``since <= ts < until``.
        group_by: ``None`` lists rows; ``key``/``model``/``day`` (UTC) sums them per group.
        limit: rows per page (``None``: ``DEFAULT_LIMIT``); ignored when grouping.
        cursor: the ``id`` after which the page starts (in ``order``), else ``None``.
        order: ``desc`` (newest first, the default) or ``asc``.

    Row results: ``id, time`` (ISO 8601 UTC) and the ``UsageRow`` fields (``key`` for
    ``key_name``). Group results: the group (``key``, ``model`` or ``day``), ``requests``,
    ``errors`` (status ≥ 400), the token sums, ``cost_usd`` (``None`` when no row was
    priced), ``avg_latency_ms``, ``avg_ttft_ms``, ``resumes``.
    """

    key: str | None = None
    model: str | None = None
    since: float | None = None
    until: float | None = None
    group_by: GroupBy | None = None
    limit: int | None = None
    cursor: int | None = None
    order: Literal["asc", "desc"] = "desc"

    @property
    def page_size(self) -> int:
        """``limit`` bounded to 1..``MAX_LIMIT``."""
        return max(1, min(MAX_LIMIT, self.limit if self.limit is not None else DEFAULT_LIMIT))


#: Group results' columns after the group itself.
GROUP_COLUMNS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens",
                 "cost_usd", "avg_latency_ms", "avg_ttft_ms", "resumes")
#: Row results' columns.
ROW_COLUMNS = ("id", "time", "request_id", "stream_id", "key", "model", "upstream", "endpoint",
               "transport", "status", "error_code", "prompt_tokens", "completion_tokens",
               "total_tokens", "cost_usd", "latency_ms", "ttft_ms", "overhead_ms", "resumes")


def build_query(query: UsageQuery, dialect: str, ts_param: Callable[[float], object] = float
                ) -> tuple[str, list[object]]:
    """The SQL and parameters for ``query`` (sans-I/O). ``dialect``: ``sqlite`` (``?``
    placeholders, ``ts`` in Unix seconds) or ``postgresql`` (``$n``, ``ts`` a timestamptz;
    ``ts_param`` converts Unix seconds to what the driver binds)."""
    params: list[object] = []

    def param(value: object) -> str:
        params.append(value)
        return "?" if dialect == "sqlite" else f"${len(params)}"

    where: list[str] = []
    if query.key is not None:
        where.append(f"key_name = {param(query.key)}")
    if query.model is not None:
        where.append(f"model = {param(query.model)}")
    if query.since is not None:
        where.append(f"ts >= {param(ts_param(query.since))}")
    if query.until is not None:
        where.append(f"ts < {param(ts_param(query.until))}")
    if query.group_by is None:
        if query.cursor is not None:
            where.append(f"id {'<' if query.order == 'desc' else '>'} {param(query.cursor)}")
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        order = "DESC" if query.order == "desc" else "ASC"
        return (f"SELECT id, {', '.join(COLUMNS)} FROM usage{clause} ORDER BY id {order} "
                f"LIMIT {param(query.page_size + 1)}", params)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    group = _group_expression(query.group_by, dialect)
    return (f"SELECT {group} AS grp, COUNT(*), SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), "
            "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
            "COALESCE(SUM(total_tokens), 0), SUM(cost_usd), AVG(latency_ms), AVG(ttft_ms), "
            f"COALESCE(SUM(resumes), 0) FROM usage{clause} GROUP BY grp ORDER BY grp", params)


def _group_expression(group_by: GroupBy, dialect: str) -> str:
    if group_by == "key":
        return "key_name"
    if group_by == "model":
        return "model"
    if dialect == "sqlite":
        return "strftime('%Y-%m-%d', ts, 'unixepoch')"
    return "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


def group_result(group_by: GroupBy, record: Sequence[Any]) -> dict[str, Any]:
    """One group's result object from a ``build_query`` result row."""
    out: dict[str, Any] = {group_by: record[0]}
    for name, value in zip(GROUP_COLUMNS, record[1:], strict=True):
        if name.startswith("avg_") and value is not None:
            value = round(float(value), 3)
        elif name == "cost_usd" and value is not None:
            value = float(value)
        elif value is not None and name != "cost_usd":
            value = int(value)
        out[name] = value
    return out


def row_result(record: Sequence[Any]) -> dict[str, Any]:
    """One row's result object from a ``build_query`` result row (``id`` then ``COLUMNS``;
    ``ts`` as Unix seconds or a ``datetime``)."""
    values = dict(zip(("id", *COLUMNS), record, strict=True))
    ts = values.pop("ts")
    when = ts if isinstance(ts, datetime) else datetime.fromtimestamp(float(ts), UTC)
    values["time"] = when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    values["key"] = values.pop("key_name")
    for name in ("latency_ms", "ttft_ms", "overhead_ms"):
        if values[name] is not None:
            values[name] = round(float(values[name]), 3)
    return {name: values[name] for name in ROW_COLUMNS}


_UNIX_RE = re.compile(r"^\d+(\.\d+)?$")


def parse_time(value: str) -> float:
    """``since``/``until``: Unix seconds (``1714557600``) or ISO 8601 (``2024-05-01``,
    ``2024-05-01T10:00:00Z``, ``2024-05-01T12:00:00+02:00``; no offset means UTC) → Unix
    seconds. Raises ``ValueError``."""
    text = value.strip()
    if _UNIX_RE.match(text):
        return float(text)
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"invalid time {value!r}: expected ISO 8601 or Unix seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
