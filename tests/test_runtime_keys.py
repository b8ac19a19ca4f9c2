"""proxy/runtime_keys.py, proxy/runtime_keys_store.py (SQLite) and proxy/limits_view.py:
bodies, rows, the service keeping a KeyStore in step with the database, and what a key has
left."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.auth import KeyStore, hash_key, key_entry
from proxy.config import KeyConfig, KeyLimitsConfig, load_settings
from proxy.errors import InvalidRequestError
from proxy.limits import Budget, Demand, DemandBuilder, MemoryLimitStore, Scope
from proxy.limits_view import memory_left, requests_left, tokens_left
from proxy.runtime_keys import (
    SECRET_PREFIX,
    KeyExistsError,
    KeyRecord,
    RuntimeKeys,
    apply_patch,
    generate_secret,
    parse_create,
    record_from_row,
    record_values,
)
from proxy.runtime_keys_store import SQLiteKeys


def test_secrets_are_prefixed_random_and_url_safe() -> None:
    secrets = {generate_secret() for _ in range(100)}
    assert len(secrets) == 100
    for secret in secrets:
        assert secret.startswith(SECRET_PREFIX)
        body = secret[len(SECRET_PREFIX):]
        assert len(body) == 32
        assert set(body) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_parse_create_validates_like_the_config() -> None:
    name, limits = parse_create({"name": "team-a", "models": ["gpt-4*"], "rpm": 60,
                                 "budget": {"usd": 5, "period": "12h"},
                                 "per_model": {"gpt-4o": {"tpm": 100}}})
    assert name == "team-a"
    assert (limits.models, limits.rpm, limits.effective_burst) == (("gpt-4*",), 60, 10)
    assert limits.budget is not None
    assert limits.budget.period_s == 43200
    with pytest.raises(InvalidRequestError) as info:
        parse_create({"name": "x", "budget": {"tokens": 0}})
    assert info.value.param == "budget.tokens"
    with pytest.raises(InvalidRequestError) as info:
        parse_create([])
    assert info.value.param is None


def test_patch_replaces_fields_and_null_restores_the_default() -> None:
    limits = KeyLimitsConfig.model_validate({"models": ["a"], "rpm": 5, "budget": {"tokens": 9}})
    patched = apply_patch(limits, {"rpm": None, "tpm": 50, "budget": None})
    assert (patched.models, patched.rpm, patched.tpm, patched.budget) == (("a",), None, 50, None)
    assert apply_patch(limits, {}) == limits
    with pytest.raises(InvalidRequestError) as info:
        apply_patch(limits, {"models": "a"})
    assert info.value.param == "models"


def test_records_round_trip_through_rows() -> None:
    limits = KeyLimitsConfig.model_validate({
        "models": ["m"], "rpm": 1, "burst": 2, "tpm": 3, "max_concurrent": 4, "per_model": {"m": {"rpm": 5}},
        "priority": 6, "max_websockets": 7, "budget": {"tokens": 8, "usd": 0.5, "period": "1h"}})
    record = KeyRecord("k", hash_key("sk-x"), limits, 10.0, 11.0, None, 3)
    assert record_from_row(record_values(record)) == record
    bare = KeyRecord("b", hash_key("sk-y"), KeyLimitsConfig(), 1.0, 1.0, 2.0, 4)
    assert record_from_row(record_values(bare)) == bare


async def test_two_services_on_one_sqlite_file_stay_in_step(tmp_path: Path) -> None:
    db_path = str(tmp_path / "keys.db")
    here, there = KeyStore({}), KeyStore({})
    a, b = RuntimeKeys(SQLiteKeys(db_path), here), RuntimeKeys(SQLiteKeys(db_path), there)
    try:
        assert await a.sync() == 0
        assert await b.sync() == 0
        record, secret = await a.create("k", KeyLimitsConfig(rpm=5))
        assert record.rev == 1
        assert here.lookup(secret) is not None  # here at once
        assert there.lookup(secret) is None
        assert await b.sync() == 1
        assert there.lookup(secret).rpm == 5  # type: ignore[union-attr]
        with pytest.raises(KeyExistsError):
            await b.create("k", KeyLimitsConfig())
        updated = await b.update("k", KeyLimitsConfig(rpm=9))
        assert updated is not None
        assert updated.rev == 2
        assert await a.update("nobody", KeyLimitsConfig()) is None
        await a.sync()
        assert here.lookup(secret).rpm == 9  # type: ignore[union-attr]
        revoked = await a.revoke("k")
        assert revoked is not None
        assert revoked.revoked_at is not None
        assert here.lookup(secret) is None
        again = await a.revoke("k")  # idempotent: the first revocation stands
        assert again is not None
        assert (again.revoked_at, again.rev) == (revoked.revoked_at, revoked.rev)
        await b.sync()
        assert there.lookup(secret) is None
        with pytest.raises(KeyExistsError) as info:
            await b.create("k", KeyLimitsConfig())
        assert info.value.revoked
        assert "revoked" in repr(a)
    finally:
        await a.close()
        await b.close()


async def test_a_config_name_cannot_be_created(tmp_path: Path) -> None:
    keys = KeyStore({"yaml": KeyConfig.model_validate({"key": "sk-yaml-123"})})
    service = RuntimeKeys(SQLiteKeys(str(tmp_path / "k.db")), keys)
    try:
        with pytest.raises(KeyExistsError) as info:
            await service.create("yaml", KeyLimitsConfig())
        assert info.value.in_config
    finally:
        await service.close()


def test_demand_builder_finds_runtime_keys_and_follows_changes() -> None:
    settings = load_settings({"upstreams": {"u": {"base_url": "http://127.0.0.1:1/v1"}},
                              "keys": {"yaml": {"key": "sk-yaml-123", "rpm": 60}}}, env={})
    keys = KeyStore(settings.keys)
    demands = DemandBuilder(settings, keys)
    assert demands.demand("yaml", "m", 1, 1).scopes[0].rpm == 60
    keys.put_runtime(key_entry("rt", KeyLimitsConfig(tpm=100), hash_key("sk-rt"), "runtime"))
    assert demands.demand("rt", "m", 1, 1).scopes[0].tpm == 100
    keys.put_runtime(key_entry("rt", KeyLimitsConfig(tpm=200), hash_key("sk-rt"), "runtime"))
    assert demands.demand("rt", "m", 1, 1).scopes[0].tpm == 200  # the cache follows the change
    keys.remove_runtime("rt")
    assert not demands.demand("rt", "m", 1, 1).limited  # revoked in flight: nothing to apply


# --- what is left -------------------------------------------------------------------------------


def test_requests_left_is_the_unused_burst() -> None:
    emission = 1_000_000  # rpm 60
    assert requests_left(0, 10_000_000, emission, 5) == (5, 0.0)
    assert requests_left(12_000_000, 10_000_000, emission, 5) == (3, 2.0)
    assert requests_left(16_000_000, 10_000_000, emission, 5) == (0, 6.0)


def test_tokens_left_refills() -> None:
    assert tokens_left(0.0, 100.0, 130.0, 600) == (300, 30.0)
    assert tokens_left(600.0, 100.0, 100.0, 600) == (600, 0.0)


def test_memory_left_reads_the_store_without_charging() -> None:
    now = 1000.0
    store = MemoryLimitStore(clock=lambda: now)
    scope = Scope("k", rpm=60, burst=3, tpm=600, max_concurrent=2)
    budget = Budget("k", 100, 1.0, 3600.0)
    demand = Demand((scope,), 10, 0.25, budget)
    assert store.acquire_now(demand, "lease-1").allowed
    left = memory_left(store, scope, budget, now)
    assert (left.requests, left.tokens, left.concurrent) == (2, 590, 1)
    assert (left.budget_tokens, left.budget_usd) == (90, 0.75)
    assert left.budget_reset_s == 3600 - (now % 3600)
    assert memory_left(store, scope, budget, now) == left  # reading charged nothing
