"""proxy/reload.py: the reload plan (pure), and what applying one does to the running objects
(admission, balancer, keys, limits), without sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.admission import Admission, SlotLimits
from proxy.app import create_app
from proxy.auth import hash_key
from proxy.balancer import Balancer, DeploymentSpec
from proxy.config import ConfigError, Settings, load_settings
from proxy.errors import RateLimitError
from proxy.limits import MemoryLimitStore
from proxy.pipeline import GATEWAY, Gateway
from proxy.reload import RELOADER, ReloadPlan, apply_plan, diff, plan_reload
from tests.conftest import merge

UP = "http://127.0.0.1:9/v1"


def config(**overrides: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "upstreams": {"a": {"base_url": UP, "health_check": {"enabled": False}},
                      "b": {"base_url": UP, "models": ["b-*"], "health_check": {"enabled": False}}},
        "keys": {"alice": {"key": "sk-alice-0000000000", "rpm": 60},
                 "bob": {"key": "sk-bob-00000000000000", "rpm": 60}},
        "models": {"b-1": {"price": {"input_per_mtok": 1, "output_per_mtok": 2}}},
        "ledger": {"enabled": False},
    }
    return merge(tree, overrides)


def settings(tree: dict[str, Any]) -> Settings:
    return load_settings(tree, env={})


# --- the plan -----------------------------------------------------------------------------------


def test_diff_names_added_removed_changed_in_config_order() -> None:
    changes = diff({"x": 1, "y": 2, "z": 3}, {"w": 0, "y": 2, "z": 4})
    assert (changes.added, changes.removed, changes.changed) == (("w",), ("x",), ("z",))
    assert changes
    assert not diff({"x": 1}, {"x": 1})


def test_identical_files_plan_nothing() -> None:
    plan = plan_reload(settings(config()), settings(config()))
    assert not plan.changes_anything
    assert plan.report() == {"changed": False, "keys": {"added": [], "removed": [], "changed": []},
                             "upstreams": {"added": [], "removed": [], "changed": []},
                             "models": {"added": [], "removed": [], "changed": []},
                             "other": [], "restart_required": []}


def test_keys_upstreams_and_models_added_removed_changed() -> None:
    old = settings(config())
    tree = config(keys={"alice": {"rpm": 120}, "carol": {"key": "sk-carol-000000000000"}},
                  upstreams={"c": {"base_url": "http://127.0.0.1:10/v1"}, "b": {"max_connections": 5}},
                  models={"b-2": {}})
    del tree["keys"]["bob"], tree["upstreams"]["a"], tree["models"]["b-1"]
    plan = plan_reload(old, settings(tree))
    assert plan.keys.as_dict() == {"added": ["carol"], "removed": ["bob"], "changed": ["alice"]}
    assert plan.upstreams.as_dict() == {"added": ["c"], "removed": ["a"], "changed": ["b"]}
    assert plan.models.as_dict() == {"added": ["b-2"], "removed": ["b-1"], "changed": []}
    assert plan.changes_anything
    assert plan.restart_required == ()
    assert repr(plan) == ("<ReloadPlan [keys: +1 -1 ~1 | upstreams: +1 -1 ~1 | models: +1 -1 ~0 | "
                          "other: 0 | restart: 0]>")


def test_a_changed_secret_is_a_changed_key() -> None:
    plan = plan_reload(settings(config()), settings(config(keys={"bob": {"key": "sk-bob-rotated-00000"}})))
    assert plan.keys.changed == ("bob",)


def test_settings_that_need_a_restart_keep_their_old_value_and_are_named() -> None:
    old = settings(config(server={"port": 8080, "access_log": True}))
    new = settings(config(server={"port": 9090, "header_timeout": "3s", "access_log": False},
                          state={"key_prefix": "other:"}, streams={"retention": "1m"},
                          ledger={"batch_size": 7}, limits={"lease_ttl": "10s", "default_reserve_tokens": 5}))
    plan = plan_reload(old, new)
    assert plan.restart_required == ("server.port", "server.header_timeout", "state.key_prefix",
                                     "limits.lease_ttl", "streams.retention", "ledger.batch_size")
    kept = plan.settings
    assert (kept.server.port, kept.server.header_timeout_s) == (8080, 10.0)
    assert kept.state.key_prefix == "shepherd:"
    assert (kept.limits.lease_ttl_s, kept.streams.retention_s, kept.ledger.batch_size) == (60.0, 300.0, 500)
    # what can change does, and is reported
    assert kept.server.access_log is False
    assert kept.limits.default_reserve_tokens == 5
    assert plan.other == ("server.access_log", "limits.default_reserve_tokens")


def test_hot_sections_are_reported_by_key_path() -> None:
    new = settings(config(routing={"retry": {"attempts": 1}, "panic_threshold_percent": 0},
                          ws={"max_in_flight": 2}, admin={"keys": ["sk-admin-key-000000000000"]}))
    plan = plan_reload(settings(config()), new)
    assert plan.other == ("routing.panic_threshold_percent", "routing.retry", "ws.max_in_flight",
                          "admin.keys")
    assert plan.settings.routing.retry.attempts == 1


def test_reloading_the_planned_settings_again_reports_the_restart_keys_again() -> None:
    running = plan_reload(settings(config()), settings(config(server={"port": 1234}))).settings
    again = plan_reload(running, settings(config(server={"port": 1234})))
    assert again.restart_required == ("server.port",)
    assert not again.changes_anything


# --- the objects a plan changes in place ------------------------------------------------------------


async def test_admission_reconfigure_keeps_slots_in_use_and_serves_waiters_on_raised_bounds() -> None:
    admission = Admission({"a": SlotLimits(1, 5, 5.0), "gone": SlotLimits(2, 5, 5.0)})
    assert admission.try_acquire(["a"], lambda f: f[0]) == "a"
    assert admission.try_acquire(["gone"], lambda f: f[0]) == "gone"
    waiter = asyncio.ensure_future(admission.acquire(["a"], lambda f: f[0]))
    await asyncio.sleep(0)
    assert admission.queue_depth == 1
    admission.reconfigure({"a": SlotLimits(2, 5, 5.0), "new": SlotLimits(1, 0, 0.0)})
    assert await waiter == "a"  # the raised bound served the waiter at once
    assert (admission.in_flight("a"), admission.in_flight("gone"), admission.in_flight("new")) == (2, 1, 0)
    assert not admission.has_free_slot("gone")  # a removed deployment takes nothing new
    admission.release("gone")  # the request on it ends normally
    assert admission.in_flight("gone") == 0
    admission.reconfigure({"a": SlotLimits(2, 5, 5.0)})
    assert admission.in_flight("gone") == 0
    assert admission.in_flight("new") == 0


def test_balancer_reconfigure_keeps_health_of_kept_deployments() -> None:
    clock = [0.0]
    balancer = Balancer({"a": DeploymentSpec("a", consecutive_failures=1), "b": DeploymentSpec("b"),
                         "c": DeploymentSpec("c", consecutive_failures=1)}, clock=lambda: clock[0])
    assert balancer.record_failure("a")
    assert balancer.record_failure("c")
    assert balancer.deployments_for("m") == ("a", "b", "c")
    specs = {"a": DeploymentSpec("a"), "c": DeploymentSpec("c"), "d": DeploymentSpec("d", ("d-*",))}
    balancer.reconfigure(specs, {}, 50.0, 50.0, replaced=("c",))
    assert balancer.status("a") == "ejected"  # kept
    assert balancer.status("c") == "healthy"  # replaced: a new pool starts healthy
    assert balancer.deployments_for("m") == ("a", "c")
    assert balancer.deployments_for("d-1") == ("a", "c", "d")
    # reports about a removed deployment (a request that was in flight on it) are ignored
    balancer.record_success("b")
    assert balancer.record_failure("b") is False
    balancer.record_rate_limited("b", 1.0)
    assert balancer.record_probe("b", False) is None
    assert "b" not in balancer.health


# --- applying a plan to a gateway ------------------------------------------------------------------


def gateway_for(tree: dict[str, Any]) -> Gateway:
    app = create_app(settings(tree), "unused.yaml")
    return app[GATEWAY]


async def apply(gateway: Gateway, tree: dict[str, Any]) -> ReloadPlan:
    plan = plan_reload(gateway.settings, settings(tree))
    app_probes = create_app(gateway.settings)[RELOADER].probes  # a probe set of its own
    retired = await apply_plan(gateway, plan, app_probes)
    for upstream in retired:
        await upstream.close()
    return plan


async def test_apply_swaps_keys_upstreams_and_limits_in_place() -> None:
    gateway = gateway_for(config())
    upstreams, admission, balancer = gateway.upstreams, gateway.admission, gateway.balancer
    limiter = gateway.limiter
    for upstream in upstreams.values():
        await upstream.start()
    old_a = upstreams["a"]
    tree = config(keys={"alice": {"rpm": 1}, "carol": {"key": "sk-carol-000000000000"}},
                  upstreams={"a": {"base_url": "http://127.0.0.1:11/v1"}, "c": {"base_url": UP}})
    del tree["keys"]["bob"], tree["upstreams"]["b"]
    await apply(gateway, tree)
    # the same objects, changed in place: in-flight requests and the dispatcher see them
    assert gateway.upstreams is upstreams
    assert gateway.dispatcher.upstreams is upstreams
    assert (gateway.admission, gateway.balancer, gateway.limiter) == (admission, balancer, limiter)
    assert list(upstreams) == ["a", "c"]
    assert upstreams["a"] is not old_a
    assert str(upstreams["a"].base_url) == "http://127.0.0.1:11/v1"
    assert old_a.pool_stats() == {"in_use": 0, "idle": 0}  # retired and closed
    assert gateway.keys.lookup("sk-carol-000000000000") is not None
    assert gateway.keys.lookup("sk-bob-00000000000000") is None
    assert gateway.demands.demand("alice", "m", 1, 1).scopes[0].rpm == 1
    for upstream in upstreams.values():
        await upstream.close()


async def test_limiter_state_of_a_key_is_kept_across_a_reload() -> None:
    gateway = gateway_for(config(keys={"alice": {"rpm": 1}}))
    store = gateway.limiter.store
    assert isinstance(store, MemoryLimitStore)
    assert await gateway.limiter.acquire(gateway.demands.demand("alice", "m", 1, 0)) is not None
    with pytest.raises(RateLimitError):
        await gateway.limiter.acquire(gateway.demands.demand("alice", "m", 1, 0))
    await apply(gateway, config(keys={"alice": {"rpm": 1}, "bob": {"rpm": 5}}))
    assert gateway.limiter.store is store
    with pytest.raises(RateLimitError):  # still at its limit
        await gateway.limiter.acquire(gateway.demands.demand("alice", "m", 1, 0))


async def test_a_key_clashing_with_a_runtime_key_changes_nothing() -> None:
    from proxy.auth import key_entry
    from proxy.config import KeyLimitsConfig

    gateway = gateway_for(config())
    gateway.keys.put_runtime(key_entry("rt", KeyLimitsConfig(), hash_key("sk-runtime-000000000"), "runtime"))
    before = (dict(gateway.upstreams), gateway.settings)
    tree = config(keys={"rt": {"key": "sk-other-0000000000000"}}, upstreams={"z": {"base_url": UP}})
    with pytest.raises(ConfigError) as info:
        await apply(gateway, tree)
    assert info.value.errors[0][0] == "keys"
    assert (dict(gateway.upstreams), gateway.settings) == before
    assert gateway.keys.lookup("sk-alice-0000000000") is not None
