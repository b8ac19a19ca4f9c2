"""The usage ledger (``proxy/ledger.py``, ``proxy/ledger_store.py``) against a real SQLite
file in ``tmp_path``: batching, the bounded buffer and its overflow count, retries after a
failed write, the flush at shutdown, migrations applied once, queries and their SQL."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from proxy.ledger import (
    COLUMNS,
    Ledger,
    LedgerEvents,
    RowValues,
    UsageBuffer,
    UsageQuery,
    UsageRow,
    build_query,
    parse_time,
)
from proxy.ledger_store import SQLiteStore, migrations, open_store, sql_statements


def row(i: int, key: str = "team-a", model: str = "mock-gpt", ts: float | None = None, status: int = 200,
        tokens: tuple[int, int] = (3, 5)) -> UsageRow:
    return UsageRow(ts if ts is not None else time.time(), f"req_{i:024x}", key, "chat.completions", "http",
                    status, None if status < 400 else "upstream_error", model, "mock", None, tokens[0],
                    tokens[1], sum(tokens), 0.001, 12.5, None, 0.4, 0)


def count_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM usage").fetchone()[0])


class FlakyStore:
    """A SQLiteStore whose writes fail (``down``) or hang (``slow_s``, before writing) on
    demand; its inserts are timed out like PostgreSQL's."""

    insert_timeout = True

    def __init__(self, path: Path) -> None:
        self.inner = SQLiteStore(str(path))
        self.dialect = "sqlite"
        self.down = False
        self.slow_s = 0.0
        self.batches: list[int] = []

    async def connect(self) -> None:
        if self.down:
            raise ConnectionRefusedError("database down")
        await self.inner.connect()

    async def insert(self, rows: Sequence[RowValues]) -> None:
        if self.slow_s:
            await asyncio.sleep(self.slow_s)
        if self.down:
            raise ConnectionRefusedError("database down")
        await self.inner.insert(rows)
        self.batches.append(len(rows))

    async def reset(self) -> None:
        await self.inner.reset()

    async def query(self, query: UsageQuery) -> list[dict[str, Any]]:
        return await self.inner.query(query)

    async def close(self) -> None:
        await self.inner.close()


class Counts:
    def __init__(self) -> None:
        self.dropped = self.written = self.failed = 0

    def events(self) -> LedgerEvents:
        def dropped(n: int) -> None:
            self.dropped += n

        def written(n: int) -> None:
            self.written += n

        def failed() -> None:
            self.failed += 1

        return LedgerEvents(dropped=dropped, written=written, failed=failed)


async def wait_for(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- the buffer (sans-I/O) ---------------------------------------------------------------------


def test_buffer_is_bounded_drops_the_newest_and_counts() -> None:
    buffer = UsageBuffer(3)
    assert [buffer.add(row(i).values()) for i in range(5)] == [True, True, True, False, False]
    assert len(buffer) == 3
    assert buffer.dropped == 2
    assert [r[1] for r in buffer.peek(2)] == [row(0).request_id, row(1).request_id]
    buffer.commit(2)
    assert [r[1] for r in buffer.peek(10)] == [row(2).request_id]
    assert repr(buffer) == "<UsageBuffer [1/3 rows | 2 dropped]>"
    assert buffer.drop_all() == 1
    assert buffer.dropped == 3
    assert len(buffer) == 0


def test_row_values_follow_the_columns() -> None:
    values = row(1).values()
    assert len(values) == len(COLUMNS)
    assert COLUMNS[:2] == ("ts", "request_id")


@pytest.mark.parametrize(("text", "expected"), [
    ("1714557600", 1714557600.0),
    ("1714557600.5", 1714557600.5),
    ("2024-05-01", 1714521600.0),
    ("2024-05-01T10:00:00Z", 1714557600.0),
    ("2024-05-01T12:00:00+02:00", 1714557600.0),
    ("2024-05-01T10:00:00", 1714557600.0),
])
def test_parse_time_takes_iso_8601_and_unix_seconds(text: str, expected: float) -> None:
    assert parse_time(text) == expected


def test_parse_time_refuses_garbage() -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


def test_build_query_placeholders_per_dialect() -> None:
    query = UsageQuery(key="a", model="m", since=1.0, until=2.0, cursor=10, limit=5)
    sql, params = build_query(query, "sqlite")
    assert "key_name = ? AND model = ? AND ts >= ? AND ts < ? AND id < ?" in sql
    assert params == ["a", "m", 1.0, 2.0, 10, 6]  # one more than the page: has_more
    sql, params = build_query(query, "postgresql", ts_param=lambda s: f"ts({s})")
    assert "key_name = $1 AND model = $2 AND ts >= $3 AND ts < $4 AND id < $5" in sql
    assert "LIMIT $6" in sql
    assert params[2:4] == ["ts(1.0)", "ts(2.0)"]
    sql, _ = build_query(UsageQuery(group_by="day"), "postgresql")
    assert "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS grp" in sql


def test_sql_statements_split_a_migration() -> None:
    _, _, script = migrations("sqlite")[0]
    statements = sql_statements(script)
    assert statements[0].startswith("-- The usage ledger") or statements[0].startswith("CREATE TABLE")
    assert sum(s.rstrip(";").endswith(")") for s in statements) >= 4  # table + indexes


# --- the ledger on a real SQLite file -----------------------------------------------------------


async def test_rows_are_written_in_batches_of_batch_size(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "usage.db")
    ledger = Ledger(store, batch_size=4, flush_interval_s=30.0)
    await ledger.start()
    for i in range(10):
        ledger.record(row(i))
    await wait_for(lambda: ledger.written == 8)  # two full batches go at once…
    assert store.batches == [4, 4]
    assert len(ledger.buffer) == 2  # …the rest waits for flush_interval (or shutdown)
    await ledger.close(5.0)
    assert count_rows(tmp_path / "usage.db") == 10
    assert store.batches == [4, 4, 2]


async def test_a_partial_batch_goes_after_flush_interval(tmp_path: Path) -> None:
    ledger = Ledger(open_store(f"sqlite:///{tmp_path / 'usage.db'}"), batch_size=100, flush_interval_s=0.05)
    await ledger.start()
    ledger.record(row(1))
    await wait_for(lambda: ledger.written == 1, timeout_s=2.0)
    await ledger.close(5.0)
    assert count_rows(tmp_path / "usage.db") == 1


async def test_record_never_waits_for_a_slow_database(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "usage.db")
    store.slow_s = 0.5
    ledger = Ledger(store, batch_size=1, flush_interval_s=0.01, write_timeout_s=5.0)
    await ledger.start()
    started = time.perf_counter()
    for i in range(1000):
        ledger.record(row(i))
    assert time.perf_counter() - started < 0.05  # O(1) appends, no await
    store.slow_s = 0.0
    await ledger.close(10.0)
    assert count_rows(tmp_path / "usage.db") == 1000


async def test_overflow_is_counted_and_buffered_rows_survive_an_outage(tmp_path: Path) -> None:
    counts = Counts()
    store = FlakyStore(tmp_path / "usage.db")
    ledger = Ledger(store, batch_size=10, flush_interval_s=0.01, buffer_rows=50, events=counts.events())
    await ledger.start()
    store.down = True
    for i in range(80):
        ledger.record(row(i))
    assert len(ledger.buffer) == 50
    assert ledger.buffer.dropped == 30
    assert counts.dropped == 30
    await wait_for(lambda: counts.failed >= 2)  # retried with backoff, rows kept
    assert len(ledger.buffer) == 50
    store.down = False
    await wait_for(lambda: ledger.written == 50, timeout_s=10.0)
    await ledger.close(5.0)
    assert count_rows(tmp_path / "usage.db") == 50
    assert counts.written == 50
    assert counts.dropped == 30


async def test_a_write_that_times_out_is_retried(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "usage.db")
    ledger = Ledger(store, batch_size=5, flush_interval_s=0.01, write_timeout_s=0.1)
    await ledger.start()
    store.slow_s = 0.3  # longer than write_timeout: the batch is retried
    for i in range(5):
        ledger.record(row(i))
    await wait_for(lambda: ledger.failures >= 1)
    store.slow_s = 0.0
    await wait_for(lambda: ledger.written == 5)
    await ledger.close(5.0)
    assert count_rows(tmp_path / "usage.db") == 5


async def test_sqlite_inserts_are_not_timed_out(tmp_path: Path) -> None:
    class SlowDisk(SQLiteStore):
        async def insert(self, rows: Sequence[RowValues]) -> None:
            await asyncio.sleep(0.3)  # a slow fsync, say: longer than write_timeout
            await super().insert(rows)

    ledger = Ledger(SlowDisk(str(tmp_path / "usage.db")), batch_size=5, flush_interval_s=0.01,
                    write_timeout_s=0.05)
    await ledger.start()
    for i in range(5):
        ledger.record(row(i))
    await wait_for(lambda: ledger.written == 5)
    await ledger.close(5.0)
    assert ledger.failures == 0
    assert count_rows(tmp_path / "usage.db") == 5  # written once, never retried


async def test_close_flushes_everything_buffered(tmp_path: Path) -> None:
    ledger = Ledger(open_store(f"sqlite:///{tmp_path / 'usage.db'}"), batch_size=64, flush_interval_s=3600.0)
    await ledger.start()
    for i in range(1000):
        ledger.record(row(i))
    await ledger.close(5.0)
    assert count_rows(tmp_path / "usage.db") == 1000
    assert ledger.buffer.dropped == 0


async def test_close_gives_up_after_its_timeout_and_counts_the_rest(tmp_path: Path) -> None:
    counts = Counts()
    store = FlakyStore(tmp_path / "usage.db")
    ledger = Ledger(store, batch_size=10, flush_interval_s=3600.0, events=counts.events())
    await ledger.start()
    store.down = True
    for i in range(7):
        ledger.record(row(i))
    started = time.monotonic()
    await ledger.close(0.3)
    assert time.monotonic() - started < 2.0
    assert counts.dropped == 7
    assert "dropped" in repr(ledger)


async def test_a_database_down_at_start_up_is_retried(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "usage.db")
    store.down = True
    ledger = Ledger(store, batch_size=1, flush_interval_s=0.01)
    await ledger.start()  # logs, does not raise
    ledger.record(row(1))
    await asyncio.sleep(0.2)
    store.down = False
    await wait_for(lambda: ledger.written == 1, timeout_s=10.0)
    await ledger.close(5.0)


async def test_migrations_apply_once_and_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    stores = [SQLiteStore(str(path)) for _ in range(3)]
    await asyncio.gather(*(s.connect() for s in stores))  # three processes starting together
    await stores[0].reset()
    await stores[0].connect()  # and a restart
    for store in stores:
        await store.close()
    with sqlite3.connect(path) as db:
        applied = db.execute("SELECT version, name FROM schema_migrations").fetchall()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert applied == [(v, name) for v, name, _ in migrations("sqlite")]


async def test_query_rows_paginate_and_groups_sum(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "usage.db"))
    await store.connect()
    day1, day2 = parse_time("2024-05-01T10:00:00Z"), parse_time("2024-05-02T10:00:00Z")
    await store.insert([r.values() for r in (
        row(1, "a", "m1", day1), row(2, "a", "m2", day1, status=502, tokens=(1, 0)),
        row(3, "b", "m1", day2), row(4, "b", "m1", day2 + 1))])
    page = await store.query(UsageQuery(limit=2))
    assert [r["request_id"] for r in page] == [row(4).request_id, row(3).request_id, row(2).request_id]
    assert page[0]["time"].startswith("2024-05-02T10:00:01")
    assert page[0]["key"] == "b"
    after = await store.query(UsageQuery(limit=2, cursor=page[1]["id"]))
    assert [r["request_id"] for r in after] == [row(2).request_id, row(1).request_id]
    oldest_first = await store.query(UsageQuery(order="asc", limit=1))
    assert oldest_first[0]["request_id"] == row(1).request_id
    filtered = await store.query(UsageQuery(key="b", since=day2, until=day2 + 1))
    assert [r["request_id"] for r in filtered] == [row(3).request_id]
    by_key = await store.query(UsageQuery(group_by="key"))
    assert by_key[0] == {"key": "a", "requests": 2, "errors": 1, "prompt_tokens": 4, "completion_tokens": 5,
                         "total_tokens": 9, "cost_usd": pytest.approx(0.002), "avg_latency_ms": 12.5,
                         "avg_ttft_ms": None, "resumes": 0}
    by_day = await store.query(UsageQuery(group_by="day"))
    assert [(g["day"], g["requests"]) for g in by_day] == [("2024-05-01", 2), ("2024-05-02", 2)]
    by_model = await store.query(UsageQuery(group_by="model", key="b"))
    assert [(g["model"], g["total_tokens"]) for g in by_model] == [("m1", 16)]
    await store.close()


def test_open_store_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match="sqlite"):
        open_store("mysql://x")


async def test_a_batch_larger_than_one_statement_is_written_in_one_transaction(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "usage.db"))
    await store.connect()
    batch = [row(i).values() for i in range(2500)]  # three statements of at most 1000 rows
    await store.insert(batch)
    await store.close()
    assert count_rows(tmp_path / "usage.db") == 2500
