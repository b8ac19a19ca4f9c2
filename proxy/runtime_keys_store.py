"""The runtime keys' tables (``virtual_keys``, ``keys_version``; migration 0002) in the
ledger's database: SQLite through aiosqlite, PostgreSQL through asyncpg.

Migrations are applied by the ledger's stores (``proxy.ledger_store``), which this module
uses once at connect. Each change is one transaction that first bumps
``keys_version.version`` (SQLite: under ``BEGIN IMMEDIATE``, the database's write lock;
PostgreSQL: the version row stays locked until commit), so revisions commit in the order
they are numbered and a reader of ``rev > n`` never skips one.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiosqlite
import asyncpg

from proxy.config import KeyLimitsConfig
from proxy.ledger_store import SQLITE_BUSY_TIMEOUT_MS, SQLiteStore, migrate_postgresql
from proxy.runtime_keys import (
    COLUMNS,
    KeyExistsError,
    KeyRecord,
    KeysDatabase,
    record_from_row,
    record_values,
)

_SELECT = f"SELECT {', '.join(COLUMNS)} FROM virtual_keys"
_INSERT = f"INSERT INTO virtual_keys ({', '.join(COLUMNS)}) VALUES "
_LIMIT_COLUMNS = COLUMNS[2:13]  # models .. max_websockets


def open_keys_db(url: str) -> KeysDatabase:
    """The key database at ``ledger.url`` (``sqlite:///path`` or ``postgresql://…``);
    nothing is opened until ``connect``. Raises ``ValueError`` for another scheme."""
    if url.startswith("sqlite:///"):
        return SQLiteKeys(url[len("sqlite:///"):])
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresKeys(url)
    raise ValueError("ledger.url must start with sqlite:/// or postgresql://")


class SQLiteKeys:
    """Runtime keys in the ledger's SQLite file (WAL: shared by processes on one host)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    def __repr__(self) -> str:
        return f"<SQLiteKeys {self.path} [{'connected' if self._db is not None else 'closed'}]>"

    async def connect(self) -> None:
        if self._db is not None:
            return
        migrator = SQLiteStore(self.path)
        await migrator.connect()
        await migrator.close()
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        except BaseException:
            await db.close()
            raise
        self._db = db

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("not connected")
        return self._db

    async def changed_since(self, rev: int) -> list[KeyRecord]:
        async with self._conn().execute(f"{_SELECT} WHERE rev > ? ORDER BY rev", (rev,)) as cursor:
            return [record_from_row(row) for row in await cursor.fetchall()]

    async def _write(self, statement: str, params: Callable[[int], tuple[Any, ...]], name: str
                     ) -> KeyRecord | None:
        """In one ``BEGIN IMMEDIATE`` transaction: bump the version, run ``statement`` with
        ``params(new version)``, and read back the row ``name``. A statement that changed
        nothing is rolled back (the version too) and the row is returned as it is."""
        db = self._conn()
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute("UPDATE keys_version SET version = version + 1 WHERE id = 1")
            async with db.execute("SELECT version FROM keys_version WHERE id = 1") as cursor:
                version = await cursor.fetchone()
            assert version is not None
            async with db.execute(statement, params(int(version[0]))) as cursor:
                changed = cursor.rowcount
            async with db.execute(f"{_SELECT} WHERE name = ?", (name,)) as cursor:
                found = await cursor.fetchone()
            await db.execute("COMMIT" if changed else "ROLLBACK")
        except BaseException:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await db.execute("ROLLBACK")
            raise
        return record_from_row(found) if found is not None else None

    async def create(self, record: KeyRecord) -> KeyRecord:
        async with self._conn().execute("SELECT revoked_at FROM virtual_keys WHERE name = ?",
                                        (record.name,)) as cursor:
            existing = await cursor.fetchone()
        if existing is not None:
            raise KeyExistsError(record.name, revoked=existing[0] is not None)
        values = record_values(record)[:-1]
        placeholders = ", ".join("?" for _ in COLUMNS)
        try:
            created = await self._write(f"{_INSERT}({placeholders})",
                                        lambda rev: (*values, rev), record.name)
        except sqlite3.IntegrityError:  # created meanwhile by another process
            raise KeyExistsError(record.name, revoked=False) from None
        assert created is not None
        return created

    async def update(self, name: str, limits: KeyLimitsConfig, now_s: float) -> KeyRecord | None:
        values = _limit_values(limits)
        sets = ", ".join(f"{column} = ?" for column in _LIMIT_COLUMNS)
        return await self._write(f"UPDATE virtual_keys SET {sets}, updated_at = ?, rev = ? "
                                 "WHERE name = ? AND revoked_at IS NULL",
                                 lambda rev: (*values, now_s, rev, name), name)

    async def revoke(self, name: str, now_s: float) -> KeyRecord | None:
        return await self._write("UPDATE virtual_keys SET revoked_at = ?, updated_at = ?, rev = ? "
                                 "WHERE name = ? AND revoked_at IS NULL",
                                 lambda rev: (now_s, now_s, rev, name), name)

    async def reset(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):  # already broken
                await db.close()

    async def close(self) -> None:
        await self.reset()


def _limit_values(limits: KeyLimitsConfig) -> tuple[Any, ...]:
    """The ``models`` .. ``max_websockets`` columns of ``limits``."""
    return record_values(KeyRecord("", "", limits, 0.0, 0.0))[2:13]


def _ts(unix_s: float | None) -> datetime | None:
    return None if unix_s is None else datetime.fromtimestamp(unix_s, UTC)


#: PostgreSQL: the columns as ``record_from_row`` reads them (times as Unix seconds).
_PG_SELECT = "SELECT " + ", ".join(
    f"extract(epoch FROM {c})::float8" if c in ("created_at", "updated_at", "revoked_at") else c
    for c in COLUMNS) + " FROM virtual_keys"
_PG_BUMP = "UPDATE keys_version SET version = version + 1 WHERE id = 1 RETURNING version"


class PostgresKeys:
    """Runtime keys in the ledger's PostgreSQL database (shared by every instance)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: asyncpg.Connection | None = None

    def __repr__(self) -> str:  # the URL may hold a password: never shown
        return f"<PostgresKeys [{'connected' if self._conn is not None else 'closed'}]>"

    async def connect(self) -> None:
        if self._conn is not None:
            return
        conn = await asyncpg.connect(self._url)
        try:
            await migrate_postgresql(conn)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn

    def _c(self) -> asyncpg.Connection:
        if self._conn is None:
            raise RuntimeError("not connected")
        return self._conn

    async def changed_since(self, rev: int) -> list[KeyRecord]:
        rows = await self._c().fetch(f"{_PG_SELECT} WHERE rev > $1 ORDER BY rev", rev)
        return [record_from_row(tuple(r)) for r in rows]

    async def _write(self, statement: str, params: Callable[[int], tuple[Any, ...]], name: str
                     ) -> KeyRecord | None:
        """In one transaction: bump the version (its row stays locked until commit), run
        ``statement`` with ``params(new version)``, read back the row ``name``; a statement
        that changed nothing is rolled back."""
        conn = self._c()
        tx = conn.transaction()
        await tx.start()
        try:
            version = await conn.fetchval(_PG_BUMP)
            status = await conn.execute(statement, *params(int(version)))
            found = await conn.fetchrow(f"{_PG_SELECT} WHERE name = $1", name)
        except BaseException:
            with contextlib.suppress(Exception):
                await tx.rollback()
            raise
        if status.endswith(" 0"):
            await tx.rollback()
        else:
            await tx.commit()
        return record_from_row(tuple(found)) if found is not None else None

    async def create(self, record: KeyRecord) -> KeyRecord:
        existing = await self._c().fetchrow("SELECT revoked_at FROM virtual_keys WHERE name = $1",
                                            record.name)
        if existing is not None:
            raise KeyExistsError(record.name, revoked=existing[0] is not None)
        values = record_values(record)
        args = (*values[:13], _ts(values[13]), _ts(values[14]), _ts(values[15]))
        placeholders = ", ".join(f"${i}" for i in range(1, len(COLUMNS) + 1))
        try:
            created = await self._write(f"{_INSERT}({placeholders})",
                                        lambda rev: (*args, rev), record.name)
        except asyncpg.UniqueViolationError:  # created meanwhile by another instance
            raise KeyExistsError(record.name, revoked=False) from None
        assert created is not None
        return created

    async def update(self, name: str, limits: KeyLimitsConfig, now_s: float) -> KeyRecord | None:
        values = _limit_values(limits)
        sets = ", ".join(f"{column} = ${i}" for i, column in enumerate(_LIMIT_COLUMNS, 1))
        n = len(_LIMIT_COLUMNS)
        return await self._write(f"UPDATE virtual_keys SET {sets}, updated_at = ${n + 1}, rev = ${n + 2} "
                                 f"WHERE name = ${n + 3} AND revoked_at IS NULL",
                                 lambda rev: (*values, _ts(now_s), rev, name), name)

    async def revoke(self, name: str, now_s: float) -> KeyRecord | None:
        return await self._write("UPDATE virtual_keys SET revoked_at = $1, updated_at = $1, rev = $2 "
                                 "WHERE name = $3 AND revoked_at IS NULL",
                                 lambda rev: (_ts(now_s), rev, name), name)

    async def reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=2.0)
            except Exception:
                conn.terminate()
