"""proxy/limits.py: each rule of the module docstring as a property, on a fake clock.

The policy is sans-I/O, so Hypothesis drives ``gcra()``, ``MemoryLimitStore`` and
``Limiter`` through arbitrary arrival times, reservations and interleavings in milliseconds.
The only I/O boundary, the primary store, is replaced by ``FlakyStore`` for the fallback tests.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.config import Settings, load_settings
from proxy.errors import GatewayError, OverloadedError, RateLimitError
from proxy.limits import (
    CONCURRENCY_RETRY_S,
    REDIS_RETRY_INTERVAL_S,
    Budget,
    Demand,
    DemandBuilder,
    Lease,
    Limiter,
    MemoryLimitStore,
    Scope,
    ScopeReport,
    StoreUnavailable,
    Verdict,
    completion_reserve,
    gcra,
    go_duration,
    ratelimit_headers,
    refill,
    refusal_error,
    share,
    share_budget,
    share_demand,
    share_scopes,
    usage_counts,
)

#: Float slack for bounds computed from sums of floats (times are ~1e4 s, so ulp ~ 2e-12).
EPS = 1e-6
#: A start time small enough that float times keep sub-nanosecond precision.
T0 = 10_000.0
DAY_S = 86_400.0

FAST = settings(max_examples=150, deadline=None)


class FakeClock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def new_store(clock: FakeClock, lease_ttl_s: float = 60.0) -> MemoryLimitStore:
    return MemoryLimitStore(lease_ttl_s=lease_ttl_s, clock=clock)


def probe(store: MemoryLimitStore, at_s: float, demand: Demand) -> Verdict:
    """Try ``demand`` at ``at_s`` on a copy of ``store`` (the original is not charged)."""
    twin = copy.deepcopy(store)
    twin.clock = FakeClock(at_s)
    return twin.acquire_now(demand, "ls_probe")


def level(store: MemoryLimitStore, scope: Scope) -> float:
    """The token bucket level of ``scope`` now (full if never touched)."""
    assert scope.tpm is not None
    if scope.scope_id not in store.buckets:
        return float(scope.tpm)
    held, updated = store.buckets[scope.scope_id]
    return refill(held, updated, store.clock(), scope.tpm, scope.tokens_per_s)


def live_leases(store: MemoryLimitStore, scope_id: str) -> set[str]:
    now = store.clock()
    return {lid for lid, expiry in store.leases.get(scope_id, {}).items() if expiry > now}


def spent(store: MemoryLimitStore, budget: Budget) -> tuple[int, float]:
    return store.spent.get((budget.key_name, budget.window(store.clock())), (0, 0.0))


def settings_from(keys: dict[str, Any], models: dict[str, Any] | None = None) -> Settings:
    tree: dict[str, Any] = {
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1"}},
        "keys": {name: {"key": f"sk-test-{name}", **cfg} for name, cfg in keys.items()},
    }
    if models is not None:
        tree["models"] = models
    return load_settings(tree, env={})


@pytest.fixture
def proxy_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog on logger ``proxy`` even if a gateway test turned its propagation off."""
    logger = logging.getLogger("proxy")
    propagate, logger.propagate = logger.propagate, True
    with caplog.at_level(logging.WARNING, logger="proxy"):
        yield caplog
    logger.propagate = propagate


# --- GCRA ------------------------------------------------------------------------------------

rpms = st.integers(1, 6000)
bursts = st.integers(1, 30)
#: Gaps between arrivals in units of the emission interval: bursts (0), the rate (~1), idle.
gap_units = st.lists(st.one_of(st.just(0.0), st.floats(0, 2.5), st.floats(0, 40)), min_size=1, max_size=80)


def admitted_within_bound(times: list[float], rpm: int, burst: int) -> None:
    """Every window [a, a + D] holds at most ``burst + rpm * D / 60`` of ``times`` (sorted).

    GCRA runs on whole microseconds (``gcra_us``): each time is rounded to the nearest
    microsecond, so D as the store saw it may be up to 1 us longer than in floats."""
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            duration = times[j] - start + 1e-6
            assert j - i + 1 <= burst + rpm * duration / 60 + EPS, (start, duration, j - i + 1)


@FAST
@given(rpm=rpms, burst=bursts, gaps=gap_units)
def test_gcra_admits_at_most_burst_plus_rate_in_every_window(rpm: int, burst: int, gaps: list[float]) -> None:
    emission = 60 / rpm
    tat, now, admitted = 0.0, T0, []
    for gap in gaps:
        now += gap * emission
        ok, new_tat, retry, remaining, reset = gcra(tat, now, emission, burst)
        assert remaining >= 0
        assert reset >= 0
        assert retry >= 0
        if ok:
            tat = new_tat
            # GCRA runs on a clock of whole microseconds (``_us`` rounds to the nearest): the
            # bound holds for arrival times as that clock reads them, not for the sub-µs
            # float (rpm=1815, burst=1, gaps=[0, 0.99999] admitted 0.48 µs "early").
            admitted.append(round(now * 1e6) / 1e6)
            assert retry == 0
        else:
            assert new_tat == tat  # a refusal leaves the TAT alone
            assert remaining == 0
            assert retry > 0
    admitted_within_bound(admitted, rpm, burst)


@FAST
@given(rpm=rpms, burst=bursts, gaps=gap_units)
def test_store_rpm_bound_remaining_and_reset(rpm: int, burst: int, gaps: list[float]) -> None:
    clock = FakeClock()
    store = new_store(clock)
    scope = Scope("k", rpm=rpm, burst=burst)
    demand = Demand((scope,), tokens=0)
    emission, admitted = 60 / rpm, []
    for i, gap in enumerate(gaps):
        clock.t += gap * emission
        verdict = store.acquire_now(demand, f"ls_{i}")
        (report,) = verdict.reports
        assert report.limit_requests == rpm
        assert report.remaining_requests is not None
        assert report.reset_requests_s is not None
        assert 0 <= report.remaining_requests < burst
        # the store rounds the emission interval up to whole microseconds
        assert 0 <= report.reset_requests_s <= burst * (emission + 1e-6) + EPS
        if verdict.allowed:
            admitted.append(clock.t)
            # ``remaining`` is exactly how many more would pass at this instant
            tat, passed = store.tat["k"] / 1e6, 0  # the store keeps microseconds
            while passed <= burst:
                ok, tat, *_ = gcra(tat, clock.t, emission, burst)
                if not ok:
                    break
                passed += 1
            assert passed == report.remaining_requests
        else:
            assert verdict.reason == "requests"
            assert report.remaining_requests == 0
        # ``reset`` is when the whole burst is available again
        after_reset = clock.t + report.reset_requests_s + 1e-9
        twin = copy.deepcopy(store)
        twin.clock = FakeClock(after_reset)
        assert all(twin.acquire_now(demand, f"ls_r{n}").allowed for n in range(burst))
    admitted_within_bound(admitted, rpm, burst)


@FAST
@given(rpm=rpms, burst=bursts, start=st.one_of(st.floats(0, 1e6), st.floats(1.6e9, 2e9)))
@example(rpm=300, burst=50, start=1_750_000_000.0)  # a time.time() of 2025: only 49 pass
def test_fresh_scope_admits_exactly_burst_at_one_instant(rpm: int, burst: int, start: float) -> None:
    """Also at Unix-epoch timestamps (the store's real clock is ``time.time``), where one
    float ulp is 2.4e-7 s, far above the 1e-9 s slack in ``gcra``."""
    store = new_store(FakeClock(start))
    demand = Demand((Scope("k", rpm=rpm, burst=burst),), tokens=0)
    outcomes = [store.acquire_now(demand, f"ls_{i}").allowed for i in range(burst + 3)]
    assert outcomes == [True] * burst + [False] * 3


@FAST
@given(rpm=rpms, burst=bursts, gaps=gap_units)
def test_rpm_retry_after_is_exact(rpm: int, burst: int, gaps: list[float]) -> None:
    clock = FakeClock()
    store = new_store(clock)
    demand = Demand((Scope("k", rpm=rpm, burst=burst),), tokens=0)
    refusals = 0
    for i, gap in enumerate([*gaps, *[0.0] * (burst + 1)]):  # end with a burst, so some refuse
        clock.t += gap * 60 / rpm
        verdict = store.acquire_now(demand, f"ls_{i}")
        if verdict.allowed:
            continue
        refusals += 1
        retry = verdict.retry_after_s
        assert retry is not None
        assert retry > 0
        assert probe(store, clock.t + retry + 1e-6, demand).allowed
        if retry > 1e-5:
            assert not probe(store, clock.t + retry - 1e-6, demand).allowed
    assert refusals > 0


def test_gcra_examples() -> None:
    # 60 rpm, burst 2: two at once, then one a second
    assert gcra(0.0, 100.0, 1.0, 2) == (True, 101.0, 0.0, 1, 1.0)
    assert gcra(101.0, 100.0, 1.0, 2) == (True, 102.0, 0.0, 0, 2.0)
    assert gcra(102.0, 100.0, 1.0, 2) == (False, 102.0, 1.0, 0, 2.0)
    assert gcra(102.0, 101.0, 1.0, 2)[0]


# --- token bucket -----------------------------------------------------------------------------

tpms = st.integers(1, 100_000)
bucket_ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.floats(0, 1.2)),   # reservation as a fraction of tpm
        st.tuples(st.just("settle"), st.floats(0, 2.5)),    # actual as a multiple of reserved
        st.tuples(st.just("settle_extra"), st.floats(0, 1)),  # actual = reserved + fraction of tpm
        st.tuples(st.just("wait"), st.floats(0, 90)),
    ),
    max_size=60,
)


@FAST
@given(tpm=tpms, ops=bucket_ops)
def test_token_bucket_reserve_then_reconcile(tpm: int, ops: list[tuple[str, float]]) -> None:
    clock = FakeClock()
    store = new_store(clock)
    scope = Scope("k", tpm=tpm)
    rate = tpm / 60
    outstanding: list[tuple[Demand, str]] = []
    for i, (op, x) in enumerate(ops):
        before = level(store, scope)
        if op == "wait":
            clock.t += x
            assert level(store, scope) == pytest.approx(min(tpm, before + x * rate), abs=EPS * tpm)
        elif op == "acquire":
            demand = Demand((scope,), tokens=int(x * tpm))
            verdict = store.acquire_now(demand, f"ls_{i}")
            (report,) = verdict.reports
            assert report.limit_tokens == tpm
            assert report.remaining_tokens is not None
            assert report.reset_tokens_s is not None
            assert report.remaining_tokens >= 0
            assert report.reset_tokens_s >= 0
            if demand.tokens > tpm:
                assert (verdict.allowed, verdict.reason, verdict.retry_after_s) == (
                    False, "tokens_too_large", None)
                assert level(store, scope) == before
            elif verdict.allowed:
                assert before >= demand.tokens  # admission needs the reservation to fit
                assert level(store, scope) == pytest.approx(before - demand.tokens, abs=1e-9 * tpm)
                assert report.remaining_tokens == int(before - demand.tokens)
                outstanding.append((demand, f"ls_{i}"))
            else:
                assert verdict.reason == "tokens"
                assert before < demand.tokens
                assert level(store, scope) == before
                assert verdict.retry_after_s == pytest.approx((demand.tokens - before) / rate)
                retry = verdict.retry_after_s
                assert retry is not None
                assert probe(store, clock.t + retry + 1e-6, demand).allowed
                if retry > 1e-5:
                    assert not probe(store, clock.t + retry - 1e-6, demand).allowed
        elif outstanding:
            demand, lease_id = outstanding.pop(int(x * 7) % len(outstanding))
            extra = x * tpm if op == "settle_extra" else (x - 1) * demand.tokens
            actual = max(0, demand.tokens + int(extra))
            store.settle_now(demand, lease_id, None, actual, 0.0)
            # refund (actual < reserved) or charge (actual > reserved), capped at capacity
            expected = min(tpm, before - (actual - demand.tokens))
            assert level(store, scope) == pytest.approx(expected, abs=1e-9 * tpm)
        assert level(store, scope) <= tpm
        assert all(held <= tpm for held, _ in store.buckets.values())  # stored, not only read


def test_settle_refunds_and_debt_delays_by_debt_over_rate() -> None:
    clock = FakeClock()
    store = new_store(clock)
    scope = Scope("k", tpm=600)  # 10 tokens a second
    big = Demand((scope,), tokens=500)
    assert store.acquire_now(big, "ls_a").allowed
    assert level(store, scope) == 100
    store.settle_now(big, "ls_a", None, 200, 0.0)  # used 200 of 500: 300 back
    assert level(store, scope) == 400
    assert store.acquire_now(Demand((scope,), tokens=400), "ls_b").allowed
    store.settle_now(Demand((scope,), tokens=400), "ls_b", None, 1400, 0.0)  # 1000 over
    assert level(store, scope) == -1000
    small = Demand((scope,), tokens=50)
    verdict = store.acquire_now(small, "ls_c")
    assert (verdict.allowed, verdict.reason) == (False, "tokens")
    assert verdict.retry_after_s == pytest.approx(105.0)  # (debt 1000 + 50) / 10 per second
    assert verdict.reports[0].remaining_tokens == 0
    clock.t += 105.0 + 1e-6
    assert store.acquire_now(small, "ls_c").allowed


def test_reservation_above_tpm_is_refused_without_retry_hint() -> None:
    store = new_store(FakeClock())
    verdict = store.acquire_now(Demand((Scope("k", tpm=1000),), tokens=1001), "ls_a")
    assert (verdict.allowed, verdict.reason, verdict.retry_after_s) == (False, "tokens_too_large", None)
    assert store.buckets == {}
    error = refusal_error(verdict, ratelimit_headers(verdict.reports))
    assert "retry-after" not in error.headers()
    assert error.headers()["x-should-retry"] == "false"


# --- concurrency leases -------------------------------------------------------------------------

lease_ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.just(0.0)),
        st.tuples(st.just("settle"), st.floats(0, 1)),
        st.tuples(st.just("settle_twice"), st.floats(0, 1)),
        st.tuples(st.just("refresh"), st.floats(0, 1)),
        st.tuples(st.just("wait"), st.floats(0, 0.8)),  # a fraction of the TTL
    ),
    max_size=60,
)


@FAST
@given(max_concurrent=st.integers(1, 5), ttl=st.sampled_from([1.0, 10.0, 60.0]), ops=lease_ops)
async def test_leases_never_exceed_max_concurrent(max_concurrent: int, ttl: float,
                                                  ops: list[tuple[str, float]]) -> None:
    clock = FakeClock()
    store = new_store(clock, lease_ttl_s=ttl)
    limiter = Limiter(store, clock=clock)
    demand = Demand((Scope("k", max_concurrent=max_concurrent),), tokens=0)
    leases: list[Lease] = []
    expiry: dict[str, float] = {}  # the model: unsettled leases and when they expire

    def live() -> set[str]:
        return {lid for lid, e in expiry.items() if e > clock.t}

    for op, x in ops:
        if op == "wait":
            clock.t += x * ttl
        elif op == "acquire" and len(live()) < max_concurrent:
            lease = await limiter.acquire(demand)
            assert lease is not None
            leases.append(lease)
            expiry[lease.lease_id] = clock.t + ttl
        elif op == "acquire":
            with pytest.raises(RateLimitError) as info:
                await limiter.acquire(demand)
            assert info.value.code == "concurrency_limit_exceeded"
            assert info.value.retry_after_s == CONCURRENCY_RETRY_S
        elif op == "refresh" and live():
            lease_id = sorted(live())[int(x * 7) % len(live())]
            await store.refresh([(demand, lease_id)])
            expiry[lease_id] = clock.t + ttl
        elif op.startswith("settle") and leases:
            lease = leases[int(x * 7) % len(leases)]
            for _ in range(2 if op == "settle_twice" else 1):
                await limiter.settle(lease, 0, 0.0)
            expiry.pop(lease.lease_id, None)
        held = live_leases(store, "k")
        assert held == live()
        assert 0 <= len(held) <= max_concurrent
        assert set(limiter.live) == {lease.lease_id for lease in leases if not lease.settled}


async def test_unrefreshed_lease_expires_after_ttl_and_refresh_extends_it() -> None:
    clock = FakeClock()
    limiter = Limiter(new_store(clock, lease_ttl_s=60.0), clock=clock)
    demand = Demand((Scope("k", max_concurrent=1),), tokens=0)
    first = await limiter.acquire(demand)
    assert first is not None
    clock.t += 59.999
    with pytest.raises(RateLimitError):
        await limiter.acquire(demand)
    clock.t = T0 + 60.0  # the slot frees itself exactly lease_ttl after the acquire
    second = await limiter.acquire(demand)
    assert second is not None
    clock.t += 30.0
    await limiter.refresh_leases()  # now lives until +90
    clock.t += 59.0
    with pytest.raises(RateLimitError):
        await limiter.acquire(demand)
    clock.t += 1.0
    assert await limiter.acquire(demand) is not None


async def test_settle_twice_releases_once_and_refunds_once() -> None:
    clock = FakeClock()
    store = new_store(clock)
    limiter = Limiter(store, clock=clock)
    scope = Scope("k", tpm=1000, max_concurrent=2)
    first = await limiter.acquire(Demand((scope,), tokens=300))
    second = await limiter.acquire(Demand((scope,), tokens=300))
    assert first is not None
    assert second is not None
    assert level(store, scope) == 400
    assert repr(limiter) == "<Limiter memory [ok | leases: 2]>"
    for _ in range(3):
        await limiter.settle(first, 100, 0.0)
    assert level(store, scope) == 600  # 200 back, once
    assert live_leases(store, "k") == {second.lease_id}
    assert repr(limiter) == "<Limiter memory [ok | leases: 1]>"
    assert repr(store) == "<MemoryLimitStore [0 rpm, 1 tpm scopes | leases: 1]>"
    await limiter.settle(None, 0, 0.0)  # no lease (unlimited key): nothing to do


# --- budgets -----------------------------------------------------------------------------------


@FAST
@given(limit=st.integers(1, 10_000), reservations=st.lists(st.integers(0, 3000), max_size=30),
       overuse=st.lists(st.integers(0, 2000), min_size=30, max_size=30))
def test_concurrent_budget_acquires_never_admit_beyond_the_limit(
        limit: int, reservations: list[int], overuse: list[int]) -> None:
    clock = FakeClock(100 * DAY_S + 5.0)
    store = new_store(clock)
    budget = Budget("k", tokens=limit, usd=None, period_s=DAY_S)
    admitted: list[tuple[Demand, str]] = []
    for i, tokens in enumerate(reservations):  # every acquire before any settle
        demand = Demand((), tokens, budget=budget)
        before = spent(store, budget)[0]
        verdict = store.acquire_now(demand, f"ls_{i}")
        assert verdict.allowed == (before + tokens <= limit)
        if verdict.allowed:
            admitted.append((demand, f"ls_{i}"))
            assert verdict.budget_window == budget.window(clock.t)
        else:
            assert (verdict.reason, verdict.retry_after_s) == ("budget", None)
        assert spent(store, budget)[0] <= limit
    assert spent(store, budget)[0] == sum(d.tokens for d, _ in admitted)
    for (demand, lease_id), extra in zip(admitted, overuse, strict=False):
        store.settle_now(demand, lease_id, budget.window(clock.t), demand.tokens + extra, 0.0)
    total = spent(store, budget)[0]
    assert total == sum(d.tokens + extra for (d, _), extra in zip(admitted, overuse, strict=False))
    # the overshoot is made of excesses over reservations, nothing else
    assert total - limit <= sum(overuse[: len(admitted)])
    if total >= limit:
        assert not store.acquire_now(Demand((), 1, budget=budget), "ls_after").allowed


@FAST
@given(limit=st.integers(1, 10_000),
       requests=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 6000)), max_size=30))
def test_sequential_budget_overshoots_by_at_most_one_requests_excess(
        limit: int, requests: list[tuple[int, int]]) -> None:
    clock = FakeClock(100 * DAY_S)
    store = new_store(clock)
    budget = Budget("k", tokens=limit, usd=None, period_s=DAY_S)
    worst_excess = 0
    for i, (reserved, actual) in enumerate(requests):
        clock.t += 1.0
        demand = Demand((), reserved, budget=budget)
        verdict = store.acquire_now(demand, f"ls_{i}")
        if verdict.allowed:
            store.settle_now(demand, f"ls_{i}", verdict.budget_window, actual, 0.0)
            worst_excess = max(worst_excess, actual - reserved)
        assert spent(store, budget)[0] <= limit + worst_excess


def test_two_concurrent_overruns_each_add_their_own_excess() -> None:
    """The docstring's "overshoot by at most one request's excess" holds for requests in
    sequence; requests in flight together each add their own excess (here 10 + 10)."""
    clock = FakeClock(100 * DAY_S)
    store = new_store(clock)
    budget = Budget("k", tokens=100, usd=None, period_s=DAY_S)
    demands = [Demand((), 50, budget=budget) for _ in range(3)]
    verdicts = [store.acquire_now(d, f"ls_{i}") for i, d in enumerate(demands)]
    assert [v.allowed for v in verdicts] == [True, True, False]
    for i in range(2):
        store.settle_now(demands[i], f"ls_{i}", verdicts[i].budget_window, 60, 0.0)
    assert spent(store, budget) == (120, 0.0)


def test_budget_window_starts_fresh() -> None:
    clock = FakeClock(100 * DAY_S + 10.0)
    store = new_store(clock)
    budget = Budget("k", tokens=100, usd=None, period_s=DAY_S)
    demand = Demand((), 100, budget=budget)
    old = store.acquire_now(demand, "ls_old")
    assert old.allowed
    assert old.budget_window == 100
    assert not store.acquire_now(Demand((), 1, budget=budget), "ls_x").allowed
    clock.t = 101 * DAY_S - 1e-3
    assert not store.acquire_now(Demand((), 1, budget=budget), "ls_x").allowed
    clock.t = 101 * DAY_S  # windows count from the epoch: a new day starts at 00:00 UTC
    fresh = store.acquire_now(Demand((), 60, budget=budget), "ls_new")
    assert fresh.allowed
    assert fresh.budget_window == 101
    # the old request ends now; its usage belongs to the old window, not the new one
    store.settle_now(demand, "ls_old", old.budget_window, 150, 0.0)
    assert spent(store, budget) == (60, 0.0)
    assert store.acquire_now(Demand((), 40, budget=budget), "ls_more").allowed


def test_budget_refusal_says_what_is_left_and_when_it_resets() -> None:
    clock = FakeClock(100 * DAY_S + 3600.0)  # 01:00 UTC
    store = new_store(clock)
    budget = Budget("k", tokens=1000, usd=None, period_s=DAY_S)
    assert store.acquire_now(Demand((), 900, budget=budget), "ls_a").allowed
    verdict = store.acquire_now(Demand((), 200, budget=budget), "ls_b")
    assert verdict.budget_spent == (900, 0.0)
    error = refusal_error(verdict, {}, Demand((), 200, budget=budget), clock.t)
    assert error.code == "insufficient_quota"
    assert "900 of 1,000 tokens used, 100 left" in error.message
    assert "this request reserves 200" in error.message
    assert "resets in 23h0m0s" in error.message
    assert f"(at {time.strftime('%Y-%m-%dT00:00:00Z', time.gmtime(101 * DAY_S))})" in error.message
    assert error.retry_after_s == 23 * 3600
    assert error.should_retry is False


PRICED = {"m": {"price": {"input_per_mtok": 2.0, "output_per_mtok": 8.0}}, "free": {}}


async def test_usd_budget_with_prices(proxy_log: pytest.LogCaptureFixture) -> None:
    builder = DemandBuilder(settings_from({"k": {"budget": {"usd": 0.01, "period": "1d"}}}, PRICED))
    demand = builder.demand("k", "m", 1000, 500)  # 1000 * 2 / 1e6 + 500 * 8 / 1e6 = 0.006
    assert demand.usd == pytest.approx(0.006)
    assert demand.budget == Budget("k", tokens=None, usd=0.01, period_s=DAY_S)
    assert demand.limited
    clock = FakeClock(100 * DAY_S)
    limiter = Limiter(new_store(clock), clock=clock)
    lease = await limiter.acquire(demand)
    assert lease is not None
    with pytest.raises(RateLimitError) as info:
        await limiter.acquire(demand)  # 0.012 > 0.01
    assert (info.value.type, info.value.code) == ("insufficient_quota", "insufficient_quota")
    assert info.value.headers()["x-should-retry"] == "false"
    await limiter.settle(lease, 1000, builder.cost_usd("m", 1000, 100))  # 0.0028 actually spent
    assert await limiter.acquire(demand) is not None  # 0.0088 <= 0.01
    # an unpriced model costs nothing and is logged once
    assert builder.demand("k", "free", 10**6, 10**6).usd == 0.0
    assert builder.demand("k", "free", 1, 1).usd == 0.0
    assert [r.getMessage() for r in proxy_log.records] == ["model has no price; USD budgets do not count it"]


@FAST
@given(limit_usd=st.floats(0.001, 1.0), input_price=st.floats(0, 100), output_price=st.floats(0, 100),
       requests=st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 20_000)), max_size=25))
def test_usd_budget_never_admits_beyond_the_limit(limit_usd: float, input_price: float, output_price: float,
                                                  requests: list[tuple[int, int]]) -> None:
    models = {"m": {"price": {"input_per_mtok": input_price, "output_per_mtok": output_price}}}
    builder = DemandBuilder(settings_from({"k": {"budget": {"usd": limit_usd, "period": "1d"}}}, models))
    store = new_store(FakeClock(100 * DAY_S))
    total = 0.0
    for i, (prompt, completion) in enumerate(requests):
        demand = builder.demand("k", "m", prompt, completion)
        assert demand.usd == pytest.approx((prompt * input_price + completion * output_price) / 1e6)
        if store.acquire_now(demand, f"ls_{i}").allowed:
            total += demand.usd
        assert demand.budget is not None
        assert spent(store, demand.budget)[1] == pytest.approx(total)
        assert total <= limit_usd + 1e-9


# --- all or nothing -----------------------------------------------------------------------------


def snapshot(store: MemoryLimitStore, demand: Demand) -> tuple[Any, ...]:
    return (
        {s.scope_id: store.tat.get(s.scope_id) for s in demand.scopes},
        {s.scope_id: level(store, s) for s in demand.scopes if s.tpm},
        {s.scope_id: live_leases(store, s.scope_id) for s in demand.scopes},
        spent(store, demand.budget) if demand.budget else None,
    )


limits_st = st.fixed_dictionaries({}, optional={
    "rpm": st.integers(1, 120), "burst": st.integers(1, 4), "tpm": st.integers(100, 5000),
    "max_concurrent": st.integers(1, 4)})
#: Per-model limits that make a scope (``burst`` alone is not a limit).
model_limits_st = limits_st.filter(lambda d: bool(d.keys() & {"rpm", "tpm", "max_concurrent"}))


@FAST
@given(key_limits=limits_st, model_limits=model_limits_st,
       budget_tokens=st.one_of(st.none(), st.integers(100, 20_000)),
       steps=st.lists(st.tuples(st.integers(0, 2000), st.floats(0, 3), st.booleans()), min_size=1,
                      max_size=40))
def test_refused_demand_charges_no_scope(key_limits: dict[str, int], model_limits: dict[str, int],
                                         budget_tokens: int | None,
                                         steps: list[tuple[int, float, bool]]) -> None:
    key_cfg: dict[str, Any] = {**key_limits, "per_model": {"m": model_limits}}
    if budget_tokens is not None:
        key_cfg["budget"] = {"tokens": budget_tokens}
    builder = DemandBuilder(settings_from({"k": key_cfg}))
    clock = FakeClock(100 * DAY_S)
    store = new_store(clock)
    held: list[tuple[Demand, str, int | None]] = []
    for i, (tokens, wait_s, settle_one) in enumerate(steps):
        clock.t += wait_s
        demand = builder.demand("k", "m", tokens, 0)
        assert demand.scopes[-1].scope_id == "k/m"
        before = snapshot(store, demand)
        verdict = store.acquire_now(demand, f"ls_{i}")
        after = snapshot(store, demand)
        if not verdict.allowed:
            assert after == before
        else:
            held.append((demand, f"ls_{i}", verdict.budget_window))
            for scope in demand.scopes:  # charged in every scope
                if scope.rpm:
                    assert after[0][scope.scope_id] != before[0][scope.scope_id]
                if scope.tpm:
                    assert after[1][scope.scope_id] == pytest.approx(before[1][scope.scope_id] - tokens)
                if scope.max_concurrent:
                    assert after[2][scope.scope_id] == before[2][scope.scope_id] | {f"ls_{i}"}
            if demand.budget is not None:
                assert after[3][0] == before[3][0] + tokens
        if settle_one and held:
            settled, lease_id, window = held.pop(0)
            store.settle_now(settled, lease_id, window, settled.tokens // 2, 0.0)


def test_per_model_refusal_leaves_the_key_wide_scope_untouched() -> None:
    builder = DemandBuilder(settings_from({"k": {
        "rpm": 600, "tpm": 10_000, "max_concurrent": 5, "budget": {"tokens": 1_000_000},
        "per_model": {"m": {"rpm": 1, "burst": 1}}}}))
    clock = FakeClock(100 * DAY_S)
    store = new_store(clock)
    demand = builder.demand("k", "m", 100, 100)
    assert store.acquire_now(demand, "ls_1").allowed
    before = snapshot(store, demand)
    verdict = store.acquire_now(demand, "ls_2")
    assert (verdict.allowed, verdict.reason, verdict.retry_after_s) == (False, "requests", 60.0)
    assert snapshot(store, demand) == before
    assert store.tat["k"] == round((100 * DAY_S + 0.1) * 1e6)  # microseconds
    assert level(store, demand.scopes[0]) == 10_000 - 200
    assert live_leases(store, "k") == {"ls_1"}
    assert spent(store, Budget("k", 1_000_000, None, DAY_S)) == (200, 0.0)


# --- errors and headers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (0.012, "12ms"), (0.0121, "13ms"), (0.5, "500ms"), (1.0, "1s"), (1.2, "2s"),
     (59.0, "59s"), (360.0, "6m0s"), (3723.0, "1h2m3s"), (3600.0, "1h0m0s"), (86400.0, "24h0m0s")],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


GO_DURATION_RE = re.compile(r"^(?:(\d+)ms|(?:(\d+)h)?(?:(\d+)m)?(\d+)s)$")


@FAST
@given(seconds=st.floats(0, 200_000))
@example(seconds=0.9995)  # rounds up to 1000ms: Go writes that as "1s"
def test_go_duration_rounds_up_to_a_canonical_go_string(seconds: float) -> None:
    text = go_duration(seconds)
    match = GO_DURATION_RE.match(text)
    assert match is not None, text
    ms, hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
    value = ms / 1000 if match.group(1) else hours * 3600 + minutes * 60 + secs
    assert value >= seconds - 1e-9
    assert value - seconds <= (0.001 if seconds < 1 else 1.0) + 1e-9
    # Go's Duration.String() never writes 1000ms or 60s: a rounded-up 999.5ms is "1s"
    assert ms < 1000
    assert secs < 60
    assert minutes < 60


def report(scope_id: str, remaining_requests: int | None, remaining_tokens: int | None) -> ScopeReport:
    out = ScopeReport(scope_id)
    if remaining_requests is not None:
        out.limit_requests, out.remaining_requests = 100, remaining_requests
        out.reset_requests_s = 0.6 * (100 - remaining_requests)
    if remaining_tokens is not None:
        out.limit_tokens, out.remaining_tokens = 10_000, remaining_tokens
        out.reset_tokens_s = 0.006 * (10_000 - remaining_tokens)
    return out


@FAST
@given(st.lists(st.tuples(st.none() | st.integers(0, 100), st.none() | st.integers(0, 10_000)), max_size=4))
def test_ratelimit_headers_pick_the_most_restrictive_scope(
        remaining: list[tuple[int | None, int | None]]) -> None:
    reports = [report(f"s{i}", r, t) for i, (r, t) in enumerate(remaining)]
    headers = ratelimit_headers(reports)
    requests = [r for r, _ in remaining if r is not None]
    tokens = [t for _, t in remaining if t is not None]
    expected: dict[str, str] = {}
    if requests:
        fewest = min(requests)
        expected |= {"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": str(fewest),
                     "x-ratelimit-reset-requests": go_duration(0.6 * (100 - fewest))}
    if tokens:
        fewest = min(tokens)
        expected |= {"x-ratelimit-limit-tokens": "10000", "x-ratelimit-remaining-tokens": str(fewest),
                     "x-ratelimit-reset-tokens": go_duration(0.006 * (10_000 - fewest))}
    assert headers == expected


HEADERS = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0"}


@pytest.mark.parametrize(
    ("reason", "retry", "error_type", "code", "retry_headers"),
    [
        ("requests", 1.2345, "requests", "rate_limit_exceeded",
         {"retry-after": "2", "retry-after-ms": "1235"}),
        ("tokens", 0.25, "tokens", "rate_limit_exceeded", {"retry-after": "1", "retry-after-ms": "250"}),
        ("concurrency", CONCURRENCY_RETRY_S, "requests", "concurrency_limit_exceeded",
         {"retry-after": "1", "retry-after-ms": "500"}),
        ("tokens_too_large", None, "tokens", "rate_limit_exceeded", {"x-should-retry": "false"}),
        ("budget", None, "insufficient_quota", "insufficient_quota", {"x-should-retry": "false"}),
    ],
)
def test_refusal_error_shapes(reason: str, retry: float | None, error_type: str, code: str,
                              retry_headers: dict[str, str]) -> None:
    error = refusal_error(Verdict(False, reason, retry), dict(HEADERS))
    assert isinstance(error, RateLimitError)
    assert error.http_status == 429
    body = error.to_body()["error"]
    assert (body["type"], body["code"], body["param"]) == (error_type, code, None)
    assert error.headers() == HEADERS | retry_headers


async def test_limiter_refusal_carries_verdict_retry_and_ratelimit_headers() -> None:
    clock = FakeClock()
    limiter = Limiter(new_store(clock), clock=clock)
    demand = Demand((Scope("k", rpm=60, burst=1, tpm=1000),), tokens=100)
    lease = await limiter.acquire(demand)
    assert lease is not None
    assert lease.headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "6s"}
    clock.t += 0.25
    with pytest.raises(RateLimitError) as info:
        await limiter.acquire(demand)
    assert info.value.retry_after_s == pytest.approx(0.75)
    assert info.value.headers() == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "750ms", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "804", "x-ratelimit-reset-tokens": "12s",
        "retry-after": "1", "retry-after-ms": "750"}


# --- the limiter's fallback ------------------------------------------------------------------


class FlakyStore:
    """A primary store (the I/O boundary) that raises ``StoreUnavailable`` until ``up``."""

    name = "redis"

    def __init__(self, instances: int = 1) -> None:
        self.up = False
        self.acquires = 0
        self.heartbeats = 0
        self.instances = instances
        self.inner = MemoryLimitStore()

    def _check(self) -> None:
        if not self.up:
            raise StoreUnavailable("connection refused")

    async def acquire(self, demand: Demand, lease_id: str) -> Verdict:
        self.acquires += 1
        self._check()
        return await self.inner.acquire(demand, lease_id)

    async def settle(self, demand: Demand, lease_id: str, budget_window: int | None,
                     actual_tokens: int, actual_usd: float) -> None:
        self._check()
        await self.inner.settle(demand, lease_id, budget_window, actual_tokens, actual_usd)

    async def refresh(self, leases: Iterable[tuple[Demand, str]]) -> None:
        self._check()
        await self.inner.refresh(leases)

    async def heartbeat(self) -> None:
        self.heartbeats += 1
        self._check()

    async def close(self) -> None:
        return None


CONCURRENT = Demand((Scope("k", max_concurrent=10),), tokens=0)


async def test_open_falls_back_retries_after_interval_and_logs_once_per_outage(
        proxy_log: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(0.0)
    primary, fallback, fallbacks = FlakyStore(), MemoryLimitStore(), []
    limiter = Limiter(primary, fallback, "open", on_fallback=lambda: fallbacks.append(1), clock=clock)

    lease = await limiter.acquire(CONCURRENT)
    assert lease is not None
    assert lease.store is fallback
    assert (primary.acquires, len(fallbacks), limiter.degraded) == (1, 1, True)
    assert live_leases(fallback, "k") == {lease.lease_id}
    assert repr(limiter) == "<Limiter redis [fallback | leases: 1]>"

    clock.t = REDIS_RETRY_INTERVAL_S - 0.01  # within the interval: the primary is not asked
    assert (await limiter.acquire(CONCURRENT)) is not None
    assert (primary.acquires, len(fallbacks)) == (1, 2)

    clock.t = REDIS_RETRY_INTERVAL_S  # tried again, still down: no second warning
    assert (await limiter.acquire(CONCURRENT)) is not None
    assert (primary.acquires, len(fallbacks)) == (2, 3)
    await limiter.refresh_leases()  # refreshing fallback leases does not touch the primary
    assert [r.getMessage() for r in proxy_log.records] == [
        "limit store unavailable; using per-process limits"]

    primary.up = True
    clock.t += REDIS_RETRY_INTERVAL_S
    recovered = await limiter.acquire(CONCURRENT)
    assert recovered is not None
    assert recovered.store is primary
    assert (primary.acquires, len(fallbacks), limiter.degraded) == (3, 3, False)
    assert [r.getMessage() for r in proxy_log.records] == [
        "limit store unavailable; using per-process limits", "limit store available again"]

    await limiter.settle(lease, 0, 0.0)  # goes back to the store that granted it
    assert lease.lease_id not in live_leases(fallback, "k")
    assert live_leases(primary.inner, "k") == {recovered.lease_id}


async def test_closed_answers_503_with_retry_after(proxy_log: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(0.0)
    primary, fallback, fallbacks = FlakyStore(), MemoryLimitStore(), []
    limiter = Limiter(primary, fallback, "closed", on_fallback=lambda: fallbacks.append(1), clock=clock)
    for t in (0.0, 0.5, 1.0, 1.5):
        clock.t = t
        with pytest.raises(OverloadedError) as info:
            await limiter.acquire(CONCURRENT)
        error: GatewayError = info.value
        assert error.http_status == 503
        assert error.code == "limits_unavailable"
        assert error.headers() == {"retry-after": "1", "retry-after-ms": "1000"}
    assert primary.acquires == 2  # at 0 and after the interval, at 1.0
    assert fallbacks == []
    assert repr(fallback) == "<MemoryLimitStore [0 rpm, 0 tpm scopes | leases: 0]>"
    assert [r.getMessage() for r in proxy_log.records] == [
        "limit store unavailable; refusing limited requests"]


async def test_settle_on_a_failing_store_does_not_raise(proxy_log: pytest.LogCaptureFixture) -> None:
    primary = FlakyStore()
    primary.up = True
    limiter = Limiter(primary, MemoryLimitStore(), clock=FakeClock(0.0))
    lease = await limiter.acquire(CONCURRENT)
    primary.up = False
    await limiter.settle(lease, 10, 0.0)
    assert limiter.degraded
    assert len(proxy_log.records) == 1


async def test_memory_backend_without_fallback_answers_503_when_its_store_fails() -> None:
    limiter = Limiter(FlakyStore(), None, "open", clock=FakeClock(0.0))
    with pytest.raises(OverloadedError):
        await limiter.acquire(CONCURRENT)


# --- DemandBuilder and request helpers ----------------------------------------------------------


async def test_demand_builder_scopes_and_unlimited_keys() -> None:
    builder = DemandBuilder(settings_from({
        "full": {"rpm": 60, "tpm": 1000, "max_concurrent": 3,
                 "per_model": {"m": {"rpm": 5}, "n": {"tpm": 50, "burst": 9}}},
        "model_only": {"per_model": {"m": {"max_concurrent": 1}}},
        "open": {},
    }))
    assert builder.demand("full", "m", 10, 5).scopes == (
        Scope("full", rpm=60, burst=10, tpm=1000, max_concurrent=3), Scope("full/m", rpm=5, burst=1))
    assert builder.demand("full", "n", 10, 5).scopes[1] == Scope("full/n", tpm=50)  # no rpm: no burst
    assert builder.demand("full", "other", 10, 5).scopes == (
        Scope("full", rpm=60, burst=10, tpm=1000, max_concurrent=3),)
    assert builder.demand("full", "m", 10, 5).tokens == 15
    assert builder.demand("model_only", "m", 1, 1).scopes == (Scope("model_only/m", max_concurrent=1),)
    assert not builder.demand("model_only", "other", 1, 1).limited
    unlimited = builder.demand("open", "m", 1, 1)
    assert (unlimited.scopes, unlimited.budget, unlimited.usd, unlimited.limited) == ((), None, 0.0, False)
    limiter = Limiter(new_store(FakeClock()), clock=FakeClock())
    assert await limiter.acquire(unlimited) is None


@FAST
@given(rpm=st.integers(1, 10**6), burst=st.one_of(st.none(), st.integers(1, 1000)))
def test_burst_defaults_to_ten_seconds_of_rpm(rpm: int, burst: int | None) -> None:
    cfg: dict[str, Any] = {"rpm": rpm} if burst is None else {"rpm": rpm, "burst": burst}
    (scope,) = DemandBuilder(settings_from({"k": cfg})).demand("k", "m", 1, 1).scopes
    assert scope.burst == (max(1, rpm // 6) if burst is None else burst)


@pytest.mark.parametrize(
    ("payload", "generates", "expected"),
    [
        ({}, True, 1024),
        ({"max_tokens": 100}, True, 100),
        ({"max_completion_tokens": 50, "max_tokens": 100}, True, 50),
        ({"max_output_tokens": 70}, True, 70),
        ({"max_completion_tokens": None, "max_tokens": 30}, True, 30),
        ({"max_tokens": 0}, True, 0),
        ({"max_tokens": -5}, True, 1024),
        ({"max_tokens": "100"}, True, 1024),
        ({"max_tokens": 100, "n": 3}, True, 300),
        ({"n": 2}, True, 2048),
        ({"n": 0}, True, 1024),
        ({"n": "2"}, True, 1024),
        ({"max_tokens": 100, "n": 3}, False, 0),  # embeddings reserve no completion
    ],
)
def test_completion_reserve(payload: dict[str, object], generates: bool, expected: int) -> None:
    assert completion_reserve(payload, 1024, generates) == expected


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}, (12, 30)),
        ({"input_tokens": 7, "output_tokens": 9, "total_tokens": 16}, (7, 9)),  # responses API
        ({"prompt_tokens": 5, "total_tokens": 5}, (5, 0)),  # embeddings
        ({"completion_tokens": 5}, None),
        ({"prompt_tokens": "5", "completion_tokens": 1}, None),
        ({"prompt_tokens": 5, "completion_tokens": None}, None),
        ({}, None),
        (None, None),
    ],
)
def test_usage_counts(usage: dict[str, object] | None, expected: tuple[int, int] | None) -> None:
    assert usage_counts(usage) == expected


def test_refill_and_scope_units() -> None:
    assert refill(-100.0, 0.0, 10.0, 600.0, 10.0) == 0.0
    assert refill(500.0, 0.0, 100.0, 600.0, 10.0) == 600.0
    assert refill(500.0, 10.0, 5.0, 600.0, 10.0) == 500.0  # a clock going back adds nothing
    assert Scope("k", rpm=120).emission_s == 0.5
    assert Scope("k", tpm=120).tokens_per_s == 2.0
    assert Budget("k", 1, None, DAY_S).window(DAY_S * 3 - 1e-6) == 2


# --- shares of the limits while the shared store is down ----------------------------------


@given(limit=st.integers(1, 10**6), instances=st.integers(1, 64), floor=st.integers(1, 100))
def test_shares_add_up_to_the_limit_unless_the_floor_applies(limit: int, instances: int,
                                                             floor: int) -> None:
    part = share(limit, instances, floor)
    assert part is not None
    assert 1 <= part <= limit                           # never more than the whole
    assert part >= min(floor, limit)
    if limit // instances >= floor:                     # no floor: N shares fit the limit
        assert part * instances <= limit
        assert part == limit // instances
    else:
        assert part == min(floor, limit)


def test_share_arithmetic_examples() -> None:
    assert [share(120, n) for n in (1, 2, 3, 7, 200)] == [120, 60, 40, 17, 1]
    assert share(11, 2) == 5                            # rounded down: 10 of 11 in total
    assert share(3, 5, floor=2) == 2                    # the floor: 5 * 2 may exceed 3
    assert share(1, 4, floor=8) == 1                    # but never above the limit
    assert share(None, 4) is None
    scope = Scope("k", rpm=120, burst=10, tpm=1000, max_concurrent=5)
    assert share_scopes((scope,), 2) == (Scope("k", rpm=60, burst=5, tpm=500, max_concurrent=2),)
    budget = Budget("k", tokens=1001, usd=3.0, period_s=60.0)
    assert share_budget(budget, 2) == Budget("k", tokens=500, usd=1.5, period_s=60.0)
    assert share_budget(Budget("k", None, None, 60.0), 3) == Budget("k", None, None, 60.0)
    demand = Demand((scope,), tokens=7, usd=0.5, budget=budget)
    assert share_demand(demand, 1) is demand
    shared = share_demand(demand, 2)
    assert (shared.tokens, shared.usd, shared.scopes[0].rpm, shared.budget) == (
        7, 0.5, 60, share_budget(budget, 2))


@settings(max_examples=60, deadline=None)
@given(instances=st.integers(1, 6), span_s=st.floats(0.0, 120.0),
       gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=200))
def test_n_instances_on_their_shares_admit_within_one_shared_gcra_bound(
        instances: int, span_s: float, gaps: list[float]) -> None:
    """Every instance sees every arrival (the worst case for the sum); together they admit
    at most ``burst + rpm * D / 60`` in any D seconds, as one shared limit would."""
    rpm, burst = 120, 10
    demand = share_demand(Demand((Scope("k", rpm=rpm, burst=burst),), tokens=0), instances)
    stores = [MemoryLimitStore(clock=FakeClock()) for _ in range(instances)]
    admitted: list[float] = []
    t = T0
    for gap in gaps:
        t += gap * span_s / 60
        for store in stores:
            assert isinstance(store.clock, FakeClock)
            store.clock.t = t
            if store.acquire_now(demand, "x").allowed:
                admitted.append(t)
    for i, start in enumerate(admitted):
        within = [a for a in admitted[i:] if a - start <= span_s]
        assert len(within) <= burst + rpm * (span_s + 1e-6) / 60 + EPS  # 1 us: see above


async def test_fallback_applies_the_share_counted_before_the_outage() -> None:
    clock = FakeClock(0.0)
    primary, fallback = FlakyStore(instances=3), MemoryLimitStore(clock=clock)
    limiter = Limiter(primary, fallback, "open", clock=clock)
    # Shares of 3: rpm 20, burst 3, tpm 1000, max_concurrent 2.
    scopes = (Scope("k", rpm=60, burst=9, tpm=3000, max_concurrent=6),)

    async def outcome(tokens: int) -> Lease | RateLimitError:
        try:
            lease = await limiter.acquire(Demand(scopes, tokens=tokens))
        except RateLimitError as exc:
            return exc
        assert lease is not None
        return lease

    big = await outcome(1500)        # fits the whole tpm, not this instance's share of it
    assert isinstance(big, RateLimitError)
    assert (big.type, big.retry_after_s, big.should_retry) == ("tokens", REDIS_RETRY_INTERVAL_S, None)
    first, second, third = [await outcome(1) for _ in range(3)]
    assert isinstance(first, Lease)
    assert isinstance(second, Lease)
    assert isinstance(third, RateLimitError)
    assert third.code == "concurrency_limit_exceeded"
    assert repr(limiter) == "<Limiter redis [fallback | leases: 2 | instances: 3]>"
    await limiter.settle(first, 1, 0.0)
    assert isinstance(await outcome(1), Lease)                  # the third of burst 3
    refused = await outcome(1)
    assert isinstance(refused, RateLimitError)
    assert refused.code == "rate_limit_exceeded"
    assert refused.retry_after_s == pytest.approx(3.0)          # rpm 20: one every 3 s
    too_big = await outcome(3001)    # too large for the whole limit: never retried
    assert isinstance(too_big, RateLimitError)
    assert too_big.should_retry is False
    assert primary.acquires == 1     # all in the fallback, within the retry interval


async def test_limiter_heartbeats_from_the_start_and_refreshes_at_its_interval() -> None:
    primary = FlakyStore()
    primary.up = True
    limiter = Limiter(primary, MemoryLimitStore())
    task = asyncio.get_running_loop().create_task(limiter.refresh_forever(60.0))
    await asyncio.sleep(0)
    assert primary.heartbeats == 1
    primary.up = False               # a heartbeat that fails is not an outage
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await limiter.heartbeat()
    assert (primary.heartbeats, limiter.degraded) == (2, False)
