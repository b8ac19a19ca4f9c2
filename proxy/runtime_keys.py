"""Virtual keys created at runtime (``POST /admin/keys``), kept in the ledger's database.

A runtime key is a ``keys.<name>`` entry without the secret in the config: its limits are a
``KeyLimitsConfig`` (validated exactly as the config's), its secret is generated here
(``generate_secret``), returned once and stored only as its SHA-256. Changes are written
to the database first, then applied to this process's ``KeyStore`` at once; every other
instance sharing the database picks them up within ``KEYS_POLL_INTERVAL_S`` plus one query
(each change bumps ``keys_version.version`` and stamps the row with it as ``rev``; instances
read the rows whose ``rev`` is above the highest they have seen)::

    POST/PATCH/DELETE ─▶ database (one transaction: version + 1, the row with rev = version)
                      └▶ this KeyStore (at once)
    every instance: every KEYS_POLL_INTERVAL_S: rows with rev > seen ─▶ its KeyStore

Revoking keeps the row (``revoked_at``) and the name: the ledger's rows stay unambiguous.
A revoked key's next request gets 401 ``invalid_api_key``, as an unknown key does; requests
already admitted finish.

The body parsing (``parse_create``, ``apply_patch``) and the record/row conversions are
sans-I/O; ``RuntimeKeys`` is the service the admin API calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
from pydantic import ValidationError

from proxy.auth import KeyConflictError, KeyStore, hash_key, key_entry
from proxy.config import KeyLimitsConfig
from proxy.errors import InvalidRequestError

log = logging.getLogger("proxy.keys")

T = TypeVar("T")

#: How often each instance reads the keys changed on other instances, in seconds: a key
#: created, changed or revoked elsewhere takes effect here within this plus one query.
KEYS_POLL_INTERVAL_S = 1.0

#: The longest one key-database call may take, in seconds.
KEYS_DB_TIMEOUT_S = 5.0

#: Every generated secret starts with this; 32 URL-safe characters (192 random bits) follow.
SECRET_PREFIX = "sk-shp-"

#: What a runtime key's name may be: what logs, metrics and ledger rows show.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

#: Fields of a key's limits (``KeyLimitsConfig``), in the order the API shows them.
LIMIT_FIELDS = ("models", "rpm", "burst", "tpm", "max_concurrent", "per_model", "budget", "priority",
                "max_websockets")


def generate_secret() -> str:
    """A new key: ``sk-shp-`` and 32 URL-safe characters from ``secrets`` (192 bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(24)


class KeyExistsError(Exception):
    """A key of that name exists: in the config (``in_config``), or a runtime one (``revoked``:
    it was revoked; names are not reused)."""

    def __init__(self, name: str, revoked: bool, in_config: bool = False) -> None:
        super().__init__(name)
        self.name, self.revoked, self.in_config = name, revoked, in_config


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One runtime key as stored (never its secret).

    Attributes:
        name: the key's name.
        key_sha256: lowercase hex SHA-256 of the secret.
        limits: its models, limits and budget.
        created_at, updated_at: Unix seconds.
        revoked_at: Unix seconds, ``None`` while the key is valid.
        rev: ``keys_version.version`` written by the row's last change (0: not stored yet).
    """

    name: str
    key_sha256: str
    limits: KeyLimitsConfig
    created_at: float
    updated_at: float
    revoked_at: float | None = None
    rev: int = 0


# --- bodies -----------------------------------------------------------------------------------


def parse_create(body: object) -> tuple[str, KeyLimitsConfig]:
    """``(name, limits)`` of a ``POST /admin/keys`` body.

    Raises:
        InvalidRequestError: not an object, a missing or malformed ``name``, a secret
            supplied (``key``/``key_sha256``: the gateway generates it), or a field
            ``keys.<name>`` would refuse (400, ``param`` names the field).
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("The body must be a JSON object.", param=None)
    name = body.get("name")
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise InvalidRequestError("name must be 1-64 characters: letters, digits, '.', '_', ':' or '-', "
                                  "starting with a letter or digit.", param="name")
    fields = {k: v for k, v in body.items() if k != "name"}
    return name, validate_limits(fields)


def validate_limits(fields: Mapping[str, Any]) -> KeyLimitsConfig:
    """``fields`` validated as ``keys.<name>`` is (without the secret).

    Raises:
        InvalidRequestError: the first problem, ``param`` its dotted path.
    """
    for secret in ("key", "key_sha256"):
        if secret in fields:
            raise InvalidRequestError(f"{secret} cannot be set: the gateway generates the secret and "
                                      "returns it once.", param=secret)
    try:
        return KeyLimitsConfig.model_validate(dict(fields))
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        raise InvalidRequestError(message, param=param) from None


def apply_patch(limits: KeyLimitsConfig, patch: object) -> KeyLimitsConfig:
    """``limits`` with the fields of a ``PATCH`` body replaced (a field set to ``null``
    goes back to its default: no limit, no budget, every model).

    Raises:
        InvalidRequestError: not an object, ``name`` changed, or an invalid field (400).
    """
    if not isinstance(patch, dict):
        raise InvalidRequestError("The body must be a JSON object.", param=None)
    if "name" in patch:
        raise InvalidRequestError("name cannot be changed; create a new key.", param="name")
    merged = {**limits_json(limits), **patch}
    return validate_limits({k: v for k, v in merged.items() if v is not None})


def limits_json(limits: KeyLimitsConfig) -> dict[str, Any]:
    """A key's limits as the API shows and takes them (``budget.period`` in seconds)."""
    dumped = limits.model_dump(mode="json", by_alias=True)
    return {name: dumped[name] for name in LIMIT_FIELDS}


# --- rows -------------------------------------------------------------------------------------

#: The ``virtual_keys`` columns, in ``record_values`` order.
COLUMNS = ("name", "key_sha256", "models", "rpm", "burst", "tpm", "max_concurrent", "per_model",
           "budget_tokens", "budget_usd", "budget_period_s", "priority", "max_websockets",
           "created_at", "updated_at", "revoked_at", "rev")


def record_values(record: KeyRecord) -> tuple[Any, ...]:
    """``record`` as a row in ``COLUMNS`` order (JSON text for ``models`` and ``per_model``)."""
    limits, budget = record.limits, record.limits.budget
    per_model = {m: r.model_dump(exclude_none=True) for m, r in limits.per_model.items()}
    return (record.name, record.key_sha256, orjson.dumps(list(limits.models)).decode(), limits.rpm,
            limits.burst, limits.tpm, limits.max_concurrent, orjson.dumps(per_model).decode(),
            budget.tokens if budget else None, budget.usd if budget else None,
            budget.period_s if budget else None, limits.priority, limits.max_websockets,
            record.created_at, record.updated_at, record.revoked_at, record.rev)


def record_from_row(row: Sequence[Any]) -> KeyRecord:
    """The record of a row in ``COLUMNS`` order (times as Unix seconds)."""
    values = dict(zip(COLUMNS, row, strict=True))
    fields: dict[str, Any] = {name: values[name] for name in ("rpm", "burst", "tpm", "max_concurrent",
                                                              "priority", "max_websockets")}
    fields["models"] = orjson.loads(values["models"])
    fields["per_model"] = orjson.loads(values["per_model"] or "{}")
    if values["budget_period_s"] is not None:
        fields["budget"] = {"tokens": values["budget_tokens"], "usd": values["budget_usd"],
                            "period": values["budget_period_s"]}
    limits = KeyLimitsConfig.model_validate({k: v for k, v in fields.items() if v is not None})
    revoked_at = None if values["revoked_at"] is None else float(values["revoked_at"])
    return KeyRecord(values["name"], values["key_sha256"], limits, float(values["created_at"]),
                     float(values["updated_at"]), revoked_at, int(values["rev"]))


class KeysDatabase(Protocol):
    """Where runtime keys live (``proxy.runtime_keys_store``). Each call is one transaction;
    none is cancel-safe in the sense that a cancelled write may still commit."""

    async def connect(self) -> None:
        """Open the connection (if not open) and apply pending migrations."""

    async def changed_since(self, rev: int) -> list[KeyRecord]:
        """Every row whose ``rev`` is above ``rev`` (revoked ones too), by ``rev``."""
        ...

    async def create(self, record: KeyRecord) -> KeyRecord:
        """Insert ``record``; returns it with its ``rev``. Raises ``KeyExistsError``."""
        ...

    async def update(self, name: str, limits: KeyLimitsConfig, now_s: float) -> KeyRecord | None:
        """Set the limits of the valid key ``name``; ``None`` when there is none."""
        ...

    async def revoke(self, name: str, now_s: float) -> KeyRecord | None:
        """Revoke ``name`` (idempotent: a revoked key keeps its first ``revoked_at``);
        ``None`` when there is no such key."""
        ...

    async def reset(self) -> None:
        """Drop the connection; the next ``connect`` opens a new one."""

    async def close(self) -> None:
        """Close the connection."""


# --- the service ------------------------------------------------------------------------------


class RuntimeKeys:
    """Runtime keys: the database and this process's ``KeyStore`` kept in step.

    Args:
        db: the key database.
        keys: the gateway's ``KeyStore`` (runtime keys are put in and taken out of it).
        poll_interval_s: how often ``run_forever`` reads other instances' changes.

    Every database call and the ``KeyStore`` change that follows it happen under one lock,
    so a poll that read a row cannot apply it after a newer local change of the same row.
    """

    def __init__(self, db: KeysDatabase, keys: KeyStore,
                 poll_interval_s: float = KEYS_POLL_INTERVAL_S) -> None:
        self.db = db
        self.keys = keys
        self.poll_interval_s = poll_interval_s
        self.seen_rev = 0
        self.records: dict[str, KeyRecord] = {}
        self.connected = False
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        valid = sum(1 for r in self.records.values() if r.revoked_at is None)
        return (f"<RuntimeKeys [{valid} valid, {len(self.records) - valid} revoked | rev {self.seen_rev}, "
                f"{'connected' if self.connected else 'disconnected'}]>")

    async def create(self, name: str, limits: KeyLimitsConfig) -> tuple[KeyRecord, str]:
        """Create the key ``name``; returns its record and its secret (shown once: it is
        not kept anywhere).

        Raises:
            KeyExistsError: a runtime or config key has that name.
            Exception: the database failed (nothing was created).
        """
        existing = self.keys.entry(name)
        if existing is not None and existing.source == "config":
            raise KeyExistsError(name, revoked=False, in_config=True)
        secret = generate_secret()
        now = time.time()
        async with self._lock:
            await self._connected()
            record = await self._timed(self.db.create(KeyRecord(name, hash_key(secret), limits, now, now)))
            self._apply(record)
        log.info("runtime key created", extra={"key_name": name})
        return record, secret

    async def update(self, name: str, limits: KeyLimitsConfig) -> KeyRecord | None:
        """Set the limits of the runtime key ``name`` (``None``: no valid key of that name)."""
        async with self._lock:
            await self._connected()
            record = await self._timed(self.db.update(name, limits, time.time()))
            if record is not None:
                self._apply(record)
        if record is not None:
            log.info("runtime key updated", extra={"key_name": name})
        return record

    async def revoke(self, name: str) -> KeyRecord | None:
        """Revoke the runtime key ``name`` here at once and, through the database, on every
        instance within ``KEYS_POLL_INTERVAL_S`` (``None``: no such key)."""
        async with self._lock:
            await self._connected()
            record = await self._timed(self.db.revoke(name, time.time()))
            if record is not None:
                self._apply(record)
        if record is not None:
            log.info("runtime key revoked", extra={"key_name": name})
        return record

    async def sync(self) -> int:
        """Apply the rows changed since the last sync (connecting first if needed);
        returns how many."""
        async with self._lock:
            await self._connected()
            records = await self._timed(self.db.changed_since(self.seen_rev))
            for record in records:
                self._apply(record)
        return len(records)

    async def run_forever(self) -> None:
        """``sync`` every ``poll_interval_s`` until cancelled (safe to cancel); a failing
        database is logged once per outage and retried."""
        failing = False
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected = False
                with contextlib.suppress(Exception):
                    await self.db.reset()
                if not failing:
                    log.warning("runtime keys: database unavailable; keys as last read stay in force",
                                extra={"error": type(exc).__name__})
                failing = True
            else:
                if failing:
                    log.warning("runtime keys: database available again")
                failing = False
            await asyncio.sleep(self.poll_interval_s)

    async def close(self) -> None:
        """Close the database connection."""
        await self.db.close()

    async def _connected(self) -> None:
        if not self.connected:
            await self._timed(self.db.connect())
            self.connected = True

    @staticmethod
    async def _timed(call: Awaitable[T]) -> T:
        async with asyncio.timeout(KEYS_DB_TIMEOUT_S):
            return await call

    def _apply(self, record: KeyRecord) -> None:
        """Make this process's ``KeyStore`` hold ``record`` as stored (synchronous)."""
        self.seen_rev = max(self.seen_rev, record.rev)
        known = self.records.get(record.name)
        if known is not None and known.rev > record.rev:
            return
        self.records[record.name] = record
        if record.revoked_at is not None:
            self.keys.remove_runtime(record.name)
            return
        try:
            self.keys.put_runtime(key_entry(record.name, record.limits, record.key_sha256, "runtime"))
        except KeyConflictError as exc:
            if record.name not in self._warned:
                self._warned.add(record.name)
                log.warning("runtime key not loaded: clashes with the config", extra={"detail": str(exc)})
