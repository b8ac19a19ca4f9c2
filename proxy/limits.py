"""Per-key limits: GCRA for requests, a token bucket for tokens, concurrency leases, budgets.

The policy is sans-I/O: plain values in, plain values out, the clock passed in (seconds).
``MemoryLimitStore`` applies it to dicts in this process; ``limits_redis.RedisLimitStore``
applies the same rules inside one Lua script so several processes share them. ``Limiter``
picks the store, falls back to per-process limits when Redis fails, and builds the errors and
``x-ratelimit-*`` headers clients see.

Rules (each one a property test in ``tests/test_limits.py``):

* **RPM, GCRA** (the generic cell rate algorithm, ITU-T I.371). With emission interval
  ``T = 60 / rpm`` seconds and ``burst`` b, a request at time t is allowed when
  ``max(TAT, t) + T - t <= b * T``; then ``TAT = max(TAT, t) + T``. Bound: in any interval
  of ``D`` seconds a scope admits at most ``b + D / T = burst + rpm * D / 60`` requests.
* **TPM, token bucket with reserve-then-reconcile.** Capacity ``tpm`` tokens (one minute's
  worth), refilled at ``tpm / 60`` per second. Admission reserves an estimate (prompt bytes
  / 4 plus ``max_tokens`` or ``limits.default_reserve_tokens``) and needs the bucket to hold
  it; the end of the request returns the reservation and takes what the upstream reported
  (the bucket may go below zero: that debt delays later requests). A reservation larger than
  the capacity can never fit and is refused at once.
* **Concurrency leases.** At most ``max_concurrent`` leases per scope; each lease expires
  ``limits.lease_ttl`` after its last refresh, so a crashed process cannot hold slots forever.
* **Budgets.** Per fixed window of ``period`` seconds (windows count from the Unix epoch),
  ``spent + reserved + estimate <= limit`` is checked and the estimate charged in the same
  step, so no two requests can both take the last of a budget. What remains is the excess of
  actual use over reservations: requests in sequence overshoot by at most one request's
  excess, requests in flight together by at most the sum of their excesses.

A scope is a key (``keys.<name>``) or one model of a key (``keys.<name>.per_model.<model>``);
a request must pass every scope that applies, and is charged in all of them or none.

**Shares while the shared store is down.** Each gateway instance writes a heartbeat to the
shared store every ``HEARTBEAT_INTERVAL_S`` and reads back N, the instances alive then (at
least 1). While the store is unreachable, each instance applies ``share(limit, N, floor)``
of every limit in its own memory: ``limit // N``, but at least ``floor``
(``state.fallback_share_floor``, default 1) and never more than the limit itself. That is
``rpm``, ``burst``, ``tpm``, ``max_concurrent`` and a budget's tokens; a USD budget is
divided by N exactly. So N instances together admit at most what one shared limit admits
(``burst + rpm * D / 60`` requests in D seconds of an outage, and so on), except where a
limit divided by N falls below the floor (then N times the floor). Not covered: what the
shared store admitted just before the outage (the local state starts from nothing: up to
one more burst, and a budget's spending so far), and an instance that started less than
``HEARTBEAT_INTERVAL_S`` before the outage and was not yet counted by the others.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from proxy.config import BudgetConfig, KeyLimitsConfig, RateLimits, Settings
from proxy.errors import GatewayError, OverloadedError, RateLimitError

log = logging.getLogger("proxy")

#: The retry hint sent when ``max_concurrent`` is reached: leases free up when requests end,
#: which the gateway cannot predict, so the hint is short.
CONCURRENCY_RETRY_S = 0.5

#: How long the gateway keeps using per-process limits before it tries Redis again.
REDIS_RETRY_INTERVAL_S = 1.0

#: How often each gateway instance writes its heartbeat to a shared store (the count of live
#: instances sets each one's share of every limit while the store is down).
HEARTBEAT_INTERVAL_S = 1.0


# --- the policy ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of limits: ``scope_id`` names it in state (``key`` or ``key/model``)."""

    scope_id: str
    rpm: int | None = None
    burst: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    @property
    def emission_s(self) -> float:
        """GCRA emission interval ``60 / rpm`` seconds (only meaningful with ``rpm``)."""
        return 60.0 / self.rpm if self.rpm else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Token bucket refill rate ``tpm / 60`` (only meaningful with ``tpm``)."""
        return self.tpm / 60.0 if self.tpm else 0.0


@dataclass(frozen=True, slots=True)
class Budget:
    """A budget of one key: limits per window of ``period_s`` seconds; ``None`` = no limit."""

    key_name: str
    tokens: int | None
    usd: float | None
    period_s: float

    def window(self, now_s: float) -> int:
        """The index of the window holding ``now_s`` (windows count from the Unix epoch)."""
        return int(now_s // self.period_s)


@dataclass(frozen=True, slots=True)
class Demand:
    """What one request asks of the limits.

    Attributes:
        scopes: every scope that applies, key-wide first.
        tokens: tokens reserved against TPM and the token budget (prompt estimate plus
            completion reserve).
        usd: dollars reserved against the USD budget (0 when the model has no price).
        budget: the key's budget, or ``None``.
    """

    scopes: tuple[Scope, ...]
    tokens: int
    usd: float = 0.0
    budget: Budget | None = None

    @property
    def limited(self) -> bool:
        """Whether any limit applies (unlimited keys skip the store entirely)."""
        return self.budget is not None or any(
            s.rpm or s.tpm or s.max_concurrent for s in self.scopes)


@dataclass(slots=True)
class ScopeReport:
    """Headers state of one scope after a check: values of ``x-ratelimit-*``."""

    scope_id: str
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


@dataclass(slots=True)
class Verdict:
    """The outcome of one admission check.

    Attributes:
        allowed: whether the request was admitted (and charged everywhere).
        reason: when refused: ``requests``, ``tokens``, ``tokens_too_large``,
            ``concurrency``, ``budget``; ``None`` when allowed.
        retry_after_s: when refused, how long until a retry can pass (``None`` if never
            within this window: budget spent, or a reservation larger than the bucket).
        reports: per-scope header values.
        budget_window: the budget window charged, or ``None``.
        budget_spent: when the budget refused, ``(tokens, usd)`` already spent in its
            window; ``None`` otherwise (or when the store could not tell).
    """

    allowed: bool
    reason: str | None = None
    retry_after_s: float | None = None
    reports: list[ScopeReport] = field(default_factory=list)
    budget_window: int | None = None
    budget_spent: tuple[int, float] | None = None


def gcra(tat_s: float, now_s: float, emission_s: float, burst: int
         ) -> tuple[bool, float, float, int, float]:
    """One GCRA step, on seconds (see ``gcra_us`` for the arithmetic).

    Returns ``(allowed, new_tat_s, retry_after_s, remaining, reset_s)``: the TAT to store
    if allowed, how long until a request would pass if refused, how many more requests
    would pass right now, and how long until the scope is fully replenished.
    """
    ok, tat, retry, remaining, reset = gcra_us(_us(tat_s), _us(now_s), emission_us(emission_s), burst)
    return ok, tat / 1e6, retry / 1e6, remaining, reset / 1e6


def emission_us(emission_s: float) -> int:
    """The emission interval in whole microseconds, rounded up (so the admitted rate never
    exceeds ``rpm``), at least 1."""
    return max(1, math.ceil(emission_s * 1e6 - 1e-6))


def _us(seconds: float) -> int:
    return round(seconds * 1e6)


def gcra_us(tat: int, now: int, emission: int, burst: int) -> tuple[bool, int, int, int, int]:
    """One GCRA step in integer microseconds, so no float rounding at Unix-time magnitudes
    can shift a decision (the Lua script does the same with integers below 2^53).

    Returns ``(allowed, new_tat, retry_after, remaining, reset)``, times in microseconds.
    """
    base = max(tat, now)
    new_tat = base + emission
    tolerance = burst * emission
    if new_tat - now > tolerance:
        return False, tat, new_tat - now - tolerance, 0, base - now
    return True, new_tat, 0, (tolerance - (new_tat - now)) // emission, new_tat - now


def share(limit: int | None, instances: int, floor: int = 1) -> int | None:
    """One instance's share of ``limit`` among ``instances`` (see the module docstring):
    ``limit // instances``, at least ``floor`` and at most ``limit``; ``None`` (no limit)
    stays ``None``."""
    if limit is None:
        return None
    return min(limit, max(floor, limit // max(1, instances)))


@functools.lru_cache(maxsize=4096)
def share_scopes(scopes: tuple[Scope, ...], instances: int, floor: int = 1) -> tuple[Scope, ...]:
    """``scopes`` with every limit cut to its share (``share``), ids unchanged (memoized:
    a key's scopes are the same objects on every request)."""
    return tuple(Scope(s.scope_id, share(s.rpm, instances, floor), share(s.burst, instances, floor),
                       share(s.tpm, instances, floor), share(s.max_concurrent, instances, floor))
                 for s in scopes)


def share_budget(budget: Budget | None, instances: int, floor: int = 1) -> Budget | None:
    """``budget`` cut to its share: tokens as ``share``, dollars divided by ``instances``."""
    if budget is None or instances <= 1:
        return budget
    usd = None if budget.usd is None else budget.usd / instances
    return replace(budget, tokens=share(budget.tokens, instances, floor), usd=usd)


def share_demand(demand: Demand, instances: int, floor: int = 1) -> Demand:
    """``demand`` against one instance's share of its limits; the same demand when
    ``instances`` is 1 (what it reserves does not change)."""
    if instances <= 1:
        return demand
    return replace(demand, scopes=share_scopes(demand.scopes, instances, floor),
                   budget=share_budget(demand.budget, instances, floor))


def refill(tokens: float, updated_s: float, now_s: float, capacity: float, rate_per_s: float) -> float:
    """Tokens in a bucket at ``now_s`` that held ``tokens`` at ``updated_s`` (never above
    ``capacity``; a negative balance, a debt, refills like any other)."""
    return min(capacity, tokens + max(0.0, now_s - updated_s) * rate_per_s)


# --- the memory store -----------------------------------------------------------------------


class LimitStore(Protocol):
    """Where limit state lives. Implementations apply the rules of this module atomically.

    ``acquire`` checks and charges one demand in every scope or in none; ``settle`` returns
    a reservation and charges the actual tokens and dollars; ``release`` drops a lease;
    ``refresh`` extends live leases. Errors from a remote store raise ``StoreUnavailable``.
    ``heartbeat`` tells a shared store this instance is alive (``Limiter`` calls it every
    ``HEARTBEAT_INTERVAL_S``); ``instances`` is how many instances share the store as last
    seen, at least 1 (always 1 for a per-process store).
    """

    name: str
    instances: int

    async def acquire(self, demand: Demand, lease_id: str) -> Verdict: ...

    async def settle(self, demand: Demand, lease_id: str, budget_window: int | None,
                     actual_tokens: int, actual_usd: float) -> None: ...

    async def refresh(self, leases: Iterable[tuple[Demand, str]]) -> None: ...

    async def heartbeat(self) -> None: ...

    async def close(self) -> None: ...


class StoreUnavailable(Exception):
    """The remote store did not answer (in time)."""


class MemoryLimitStore:
    """Limit state in this process's memory (``state.backend: memory``, and the fallback
    while Redis is unreachable).

    Args:
        lease_ttl_s: how long a lease lives without a refresh.
        clock: seconds since the epoch (``time.time`` by default; tests pass a fake).
    """

    name = "memory"
    instances = 1

    def __init__(self, lease_ttl_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.lease_ttl_s = lease_ttl_s
        self.clock = clock
        self.tat: dict[str, int] = {}  # GCRA theoretical arrival time, microseconds
        self.buckets: dict[str, tuple[float, float]] = {}
        self.leases: dict[str, dict[str, float]] = {}
        self.spent: dict[tuple[str, int], tuple[int, float]] = {}

    def __repr__(self) -> str:
        held = sum(len(v) for v in self.leases.values())
        return f"<MemoryLimitStore [{len(self.tat)} rpm, {len(self.buckets)} tpm scopes | leases: {held}]>"

    async def acquire(self, demand: Demand, lease_id: str) -> Verdict:
        return self.acquire_now(demand, lease_id)

    def acquire_now(self, demand: Demand, lease_id: str) -> Verdict:
        """``acquire`` without the coroutine (the check and the charge are one step)."""
        now = self.clock()
        verdict = Verdict(True)
        commits: list[Callable[[], None]] = []
        for scope in demand.scopes:
            report = ScopeReport(scope.scope_id)
            verdict.reports.append(report)
            self._check_rpm(scope, now, verdict, report, commits)
            self._check_tpm(scope, demand.tokens, now, verdict, report, commits)
            self._check_concurrency(scope, lease_id, now, verdict, commits)
        if demand.budget is not None:
            self._check_budget(demand, now, verdict, commits)
        if verdict.allowed:
            for commit in commits:
                commit()
        return verdict

    def _check_rpm(self, scope: Scope, now: float, verdict: Verdict, report: ScopeReport,
                   commits: list[Callable[[], None]]) -> None:
        if not scope.rpm or not scope.burst:
            return
        ok, tat, retry, remaining, reset = gcra_us(self.tat.get(scope.scope_id, 0), _us(now),
                                                   emission_us(scope.emission_s), scope.burst)
        report.limit_requests, report.remaining_requests = scope.rpm, remaining
        report.reset_requests_s = reset / 1e6
        if ok:
            commits.append(lambda: self.tat.__setitem__(scope.scope_id, tat))
        else:
            _refuse(verdict, "requests", retry / 1e6)

    def _check_tpm(self, scope: Scope, tokens: int, now: float, verdict: Verdict,
                   report: ScopeReport, commits: list[Callable[[], None]]) -> None:
        if not scope.tpm:
            return
        held, updated = self.buckets.get(scope.scope_id, (float(scope.tpm), now))
        level = refill(held, updated, now, scope.tpm, scope.tokens_per_s)
        after = level - tokens
        shown = after if after >= 0 else level  # what is left if admitted, else what is there
        report.limit_tokens = scope.tpm
        report.remaining_tokens = max(0, int(shown))
        report.reset_tokens_s = (scope.tpm - shown) / scope.tokens_per_s
        if tokens > scope.tpm:
            _refuse(verdict, "tokens_too_large", None)
        elif after < 0:
            _refuse(verdict, "tokens", -after / scope.tokens_per_s)
        else:
            commits.append(lambda: self.buckets.__setitem__(scope.scope_id, (after, now)))

    def _check_concurrency(self, scope: Scope, lease_id: str, now: float, verdict: Verdict,
                           commits: list[Callable[[], None]]) -> None:
        if not scope.max_concurrent:
            return
        leases = self.leases.setdefault(scope.scope_id, {})
        if len(leases) >= scope.max_concurrent:  # only then can an expired lease matter
            for expired in [lid for lid, expiry in leases.items() if expiry <= now]:
                del leases[expired]
        if len(leases) >= scope.max_concurrent:
            _refuse(verdict, "concurrency", CONCURRENCY_RETRY_S)
        else:
            commits.append(lambda: leases.__setitem__(lease_id, now + self.lease_ttl_s))

    def _check_budget(self, demand: Demand, now: float, verdict: Verdict,
                      commits: list[Callable[[], None]]) -> None:
        budget = demand.budget
        assert budget is not None
        window = budget.window(now)
        slot = (budget.key_name, window)
        tokens, usd = self.spent.get(slot, (0, 0.0))
        over_tokens = budget.tokens is not None and tokens + demand.tokens > budget.tokens
        over_usd = budget.usd is not None and usd + demand.usd > budget.usd + 1e-12
        verdict.budget_window = window
        if over_tokens or over_usd:
            _refuse(verdict, "budget", None)
            verdict.budget_spent = (tokens, usd)
            return
        if slot not in self.spent:  # a new window: drop the key's older ones
            self._prune_windows(budget.key_name, window)
        commits.append(lambda: self.spent.__setitem__(slot, (tokens + demand.tokens, usd + demand.usd)))

    def _prune_windows(self, key_name: str, window: int) -> None:
        for old in [s for s in self.spent if s[0] == key_name and s[1] < window]:
            del self.spent[old]

    async def settle(self, demand: Demand, lease_id: str, budget_window: int | None,
                     actual_tokens: int, actual_usd: float) -> None:
        self.settle_now(demand, lease_id, budget_window, actual_tokens, actual_usd)

    def settle_now(self, demand: Demand, lease_id: str, budget_window: int | None,
                   actual_tokens: int, actual_usd: float) -> None:
        """``settle`` without the coroutine."""
        now = self.clock()
        delta = actual_tokens - demand.tokens
        for scope in demand.scopes:
            if scope.tpm and scope.scope_id in self.buckets:
                held, updated = self.buckets[scope.scope_id]
                level = refill(held, updated, now, scope.tpm, scope.tokens_per_s)
                self.buckets[scope.scope_id] = (min(float(scope.tpm), level - delta), now)
            self.leases.get(scope.scope_id, {}).pop(lease_id, None)
        if demand.budget is not None and budget_window is not None:
            slot = (demand.budget.key_name, budget_window)
            if slot in self.spent:
                tokens, usd = self.spent[slot]
                self.spent[slot] = (tokens + delta, usd + actual_usd - demand.usd)

    async def refresh(self, leases: Iterable[tuple[Demand, str]]) -> None:
        expiry = self.clock() + self.lease_ttl_s
        for demand, lease_id in leases:
            for scope in demand.scopes:
                held = self.leases.get(scope.scope_id)
                if held is not None and lease_id in held:
                    held[lease_id] = expiry

    async def heartbeat(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _refuse(verdict: Verdict, reason: str, retry_after_s: float | None) -> None:
    """Record a refusal; the most final reason wins (budget, then too large, then the
    longest wait)."""
    rank = {"budget": 3, "tokens_too_large": 2}
    if verdict.allowed or rank.get(reason, 1) > rank.get(verdict.reason or "", 1):
        verdict.reason, verdict.retry_after_s = reason, retry_after_s
    elif rank.get(reason, 1) == rank.get(verdict.reason or "", 1) == 1:
        verdict.retry_after_s = max(verdict.retry_after_s or 0.0, retry_after_s or 0.0)
    verdict.allowed = False


# --- the limiter ----------------------------------------------------------------------------


@dataclass(slots=True)
class Lease:
    """An admitted request's hold on its limits; give it back with ``Limiter.settle``.

    Attributes:
        lease_id: unique id (``ls_…``).
        demand: what was reserved.
        store: the store that granted it (settle goes back to the same one).
        budget_window: the budget window charged, or ``None``.
        headers: the ``x-ratelimit-*`` headers for the response.
        settled: set once settled; settling twice does nothing.
    """

    lease_id: str
    demand: Demand
    store: LimitStore
    budget_window: int | None
    headers: dict[str, str]
    settled: bool = False


def go_duration(seconds: float) -> str:
    """A Go ``time.Duration`` string as OpenAI's reset headers use: ``12ms``, ``1s``,
    ``6m0s``, ``1h2m3s`` (seconds rounded up to whole milliseconds below 1 s, to whole
    seconds above)."""
    ms = math.ceil(max(0.0, seconds) * 1000 - 1e-9)
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    total = math.ceil(seconds - 1e-9)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def ratelimit_headers(reports: list[ScopeReport]) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` from the most restrictive
    scope (fewest remaining) for each of requests and tokens."""
    headers: dict[str, str] = {}
    requests = [r for r in reports if r.limit_requests is not None]
    if requests:
        r = min(requests, key=lambda r: r.remaining_requests or 0)
        headers["x-ratelimit-limit-requests"] = str(r.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(r.remaining_requests)
        headers["x-ratelimit-reset-requests"] = go_duration(r.reset_requests_s or 0.0)
    tokens = [r for r in reports if r.limit_tokens is not None]
    if tokens:
        t = min(tokens, key=lambda r: r.remaining_tokens or 0)
        headers["x-ratelimit-limit-tokens"] = str(t.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(t.remaining_tokens)
        headers["x-ratelimit-reset-tokens"] = go_duration(t.reset_tokens_s or 0.0)
    return headers


def refusal_error(verdict: Verdict, headers: dict[str, str], demand: Demand | None = None,
                  now_s: float | None = None) -> GatewayError:
    """The 429 a refused verdict answers with, carrying ``headers``; ``type`` and ``code``
    as OpenAI sends them (``requests``/``tokens`` + ``rate_limit_exceeded``,
    ``insufficient_quota``). A budget refusal says what is left and when the budget resets
    (from ``demand.budget`` and ``now_s``, Unix seconds; ``retry-after`` is the time to the
    reset, ``x-should-retry: false`` all the same: it is hours away, not a blip)."""
    reason = verdict.reason
    if reason == "budget":
        message, reset_s = "You exceeded your current quota: this key's budget for the period is spent.", None
        if demand is not None and demand.budget is not None and now_s is not None:
            message, reset_s = budget_message(demand.budget, demand, verdict.budget_spent, now_s)
        error = RateLimitError(message, error_type="insufficient_quota", code="insufficient_quota",
                               retry_after_s=reset_s, should_retry=False)
    elif reason == "tokens_too_large":
        error = RateLimitError("Request too large: its token reservation exceeds this key's "
                               "tokens-per-minute limit. Lower max_tokens or the prompt size.",
                               error_type="tokens", should_retry=False)
    elif reason == "concurrency":
        error = RateLimitError("Too many requests in flight for this key; retry shortly.",
                               error_type="requests", code="concurrency_limit_exceeded",
                               retry_after_s=verdict.retry_after_s)
    else:
        kind = "tokens" if reason == "tokens" else "requests"
        error = RateLimitError(f"Rate limit reached for {kind} per minute; retry after the delay given.",
                               error_type=kind, retry_after_s=verdict.retry_after_s)
    error.extra_headers.update(headers)
    return error


def budget_message(budget: Budget, demand: Demand, spent: tuple[int, float] | None,
                   now_s: float) -> tuple[str, float]:
    """The text of a budget refusal and the seconds until the budget's window resets:
    what was spent and is left (when the store told), what this request needed, and the
    reset as a duration and a UTC time."""
    window_end_s = (budget.window(now_s) + 1) * budget.period_s
    reset_s = max(0.0, window_end_s - now_s)
    reset_at = datetime.fromtimestamp(window_end_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    parts = []
    if budget.tokens is not None:
        used = f"{spent[0]:,} of {budget.tokens:,} tokens used, {max(0, budget.tokens - spent[0]):,} left; " \
            if spent is not None else f"budget {budget.tokens:,} tokens; "
        parts.append(f"{used}this request reserves {demand.tokens:,}")
    if budget.usd is not None:
        used = f"${spent[1]:.4f} of ${budget.usd:.2f} used, ${max(0.0, budget.usd - spent[1]):.4f} left; " \
            if spent is not None else f"budget ${budget.usd:.2f}; "
        parts.append(f"{used}this request may cost ${demand.usd:.4f}")
    return (f"You exceeded your current quota: this key's budget for the period is spent "
            f"({'; '.join(parts)}). It resets in {go_duration(reset_s)} (at {reset_at}).", reset_s)


class Limiter:
    """Admits requests against their limits, on Redis or in memory, and settles them.

    Args:
        store: the primary store (memory, or Redis).
        fallback: per-process store used while the primary is unavailable (``None`` for the
            memory backend, where the primary is already local).
        on_store_error: ``open`` (fall back, the default) or ``closed`` (503).
        on_fallback: called once per fallback use (a metric).
        share_floor: ``state.fallback_share_floor``: the least a limit is cut to in the
            fallback (requests, tokens, leases; see ``share``).

    During an outage the primary is retried at most every ``REDIS_RETRY_INTERVAL_S``;
    one log line marks the start of an outage and one its end. The fallback applies this
    instance's share of every limit, ``1/N`` with N = ``store.instances``, the instances
    the primary counted from heartbeats before the outage (see the module docstring). A
    request refused only because of the share (its reservation fits the whole ``tpm`` but
    not this instance's part) gets a retryable ``tokens`` 429, not ``tokens_too_large``.
    """

    def __init__(self, store: LimitStore, fallback: MemoryLimitStore | None = None,
                 on_store_error: str = "open", on_fallback: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, share_floor: int = 1) -> None:
        self.store = store
        self.fallback = fallback
        self.on_store_error = on_store_error
        self.on_fallback = on_fallback or (lambda: None)
        self.clock = clock
        self.share_floor = max(1, share_floor)
        self.live: dict[str, Lease] = {}
        self._outage_since: float | None = None
        self._next_try = 0.0

    def __repr__(self) -> str:
        state = "fallback" if self._outage_since is not None else "ok"
        shared = f" | instances: {self.store.instances}" if self.store.instances > 1 else ""
        return f"<Limiter {self.store.name} [{state} | leases: {len(self.live)}{shared}]>"

    @property
    def degraded(self) -> bool:
        """True while the primary store is unavailable."""
        return self._outage_since is not None

    async def acquire(self, demand: Demand) -> Lease | None:
        """Admit ``demand`` or raise; ``None`` when no limit applies.

        Raises:
            RateLimitError: a limit or the budget refuses (429, with retry hints and
                ``x-ratelimit-*`` headers).
            OverloadedError: the store is down and ``on_redis_error: closed`` (503).
        Cancelling is safe: a lease granted after the cancel is not returned, but expires
        with its TTL and its reservation is refunded by the next refill.
        """
        if not demand.limited:
            return None
        lease_id = f"ls_{random.getrandbits(64):016x}"  # unique, not secret: no syscall
        store, charged, verdict = await self._acquire_on_some_store(demand, lease_id)
        headers = ratelimit_headers(verdict.reports)
        if not verdict.allowed:
            raise refusal_error(verdict, headers, demand, time.time())
        lease = Lease(lease_id, charged, store, verdict.budget_window, headers)
        if any(s.max_concurrent for s in demand.scopes):
            self.live[lease_id] = lease
        return lease

    async def _acquire_on_some_store(self, demand: Demand, lease_id: str
                                     ) -> tuple[LimitStore, Demand, Verdict]:
        """The store that answered, the demand as charged there, and its verdict."""
        if self.fallback is None or self.clock() >= self._next_try:
            try:
                verdict = await self.store.acquire(demand, lease_id)
            except StoreUnavailable as exc:
                self._mark_outage(exc)
            else:
                self._mark_recovered()
                return self.store, demand, verdict
        if self.on_store_error == "closed" or self.fallback is None:
            raise OverloadedError("Rate-limit state is unavailable; retry shortly.",
                                  code="limits_unavailable", retry_after_s=REDIS_RETRY_INTERVAL_S)
        self.on_fallback()
        shared = share_demand(demand, self.store.instances, self.share_floor)
        verdict = self.fallback.acquire_now(shared, lease_id)
        if verdict.reason == "tokens_too_large" and all(
                s.tpm is None or demand.tokens <= s.tpm for s in demand.scopes):
            verdict.reason, verdict.retry_after_s = "tokens", REDIS_RETRY_INTERVAL_S
        return self.fallback, shared, verdict

    def _mark_outage(self, exc: BaseException) -> None:
        now = self.clock()
        self._next_try = now + REDIS_RETRY_INTERVAL_S
        if self._outage_since is None:
            self._outage_since = now
            log.warning("limit store unavailable; using per-process limits"
                        if self.on_store_error == "open" else
                        "limit store unavailable; refusing limited requests",
                        extra={"store": self.store.name, "error": type(exc).__name__,
                               "detail": str(exc)[:200]})

    def _mark_recovered(self) -> None:
        if self._outage_since is not None:
            log.warning("limit store available again", extra={
                "store": self.store.name, "outage_s": round(self.clock() - self._outage_since, 3)})
            self._outage_since = None

    async def settle(self, lease: Lease | None, actual_tokens: int, actual_usd: float) -> None:
        """Return ``lease``'s reservation and charge what was used; releases its
        concurrency slot. Idempotent; never raises (a store failure is logged, and the
        lease then expires with its TTL)."""
        if lease is None or lease.settled:
            return
        lease.settled = True
        self.live.pop(lease.lease_id, None)
        try:
            await lease.store.settle(lease.demand, lease.lease_id, lease.budget_window,
                                     actual_tokens, actual_usd)
        except StoreUnavailable as exc:
            self._mark_outage(exc)

    async def refresh_leases(self) -> None:
        """Extend every live lease's TTL (run every third of ``lease_ttl``)."""
        by_store: dict[int, tuple[LimitStore, list[tuple[Demand, str]]]] = {}
        for lease in self.live.values():
            by_store.setdefault(id(lease.store), (lease.store, []))[1].append(
                (lease.demand, lease.lease_id))
        for store, leases in by_store.values():
            try:
                await store.refresh(leases)
            except StoreUnavailable as exc:
                self._mark_outage(exc)

    async def heartbeat(self) -> None:
        """Tell the primary store this instance is alive (see ``LimitStore.heartbeat``);
        a store that does not answer keeps ``instances`` as last seen."""
        try:
            await self.store.heartbeat()
        except StoreUnavailable:
            pass

    async def refresh_forever(self, interval_s: float) -> None:
        """``refresh_leases`` every ``interval_s`` and ``heartbeat`` every
        ``HEARTBEAT_INTERVAL_S`` (from the start), until cancelled (safe to cancel)."""
        tick_s = min(interval_s, HEARTBEAT_INTERVAL_S)
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + interval_s
        while True:
            await self.heartbeat()
            await asyncio.sleep(tick_s)
            if loop.time() >= next_refresh:
                next_refresh = loop.time() + interval_s
                await self.refresh_leases()

    async def close(self) -> None:
        """Close the stores' connections."""
        await self.store.close()


# --- from config ----------------------------------------------------------------------------


class KeyLimitsSource(Protocol):
    """Where ``DemandBuilder`` finds a key's limits (``proxy.auth.KeyStore``)."""

    @property
    def version(self) -> int:
        """Grows with every change of any key's limits."""
        ...

    def limits_of(self, name: str) -> KeyLimitsConfig | None:
        """The limits of the key ``name``, ``None`` if there is no such key."""
        ...


class DemandBuilder:
    """Turns (key name, model, token estimate) into a ``Demand`` using the config; scopes
    are built once per (key, model) and cached.

    Args:
        settings: the validated config (keys, their per-model limits and budgets, prices).
        keys: where a key's limits are looked up (the ``KeyStore``: config and runtime
            keys); ``None``: ``settings.keys`` only. The cache is dropped whenever
            ``keys.version`` changes (a runtime key created, changed or revoked; a reload).
    """

    def __init__(self, settings: Settings, keys: KeyLimitsSource | None = None) -> None:
        self._settings = settings
        self._keys = keys
        self._keys_version = keys.version if keys is not None else 0
        self._cache: dict[tuple[str, str], tuple[tuple[Scope, ...], Budget | None]] = {}
        self._unpriced_warned: set[str] = set()

    def demand(self, key_name: str, model: str, prompt_tokens: int, completion_tokens: int) -> Demand:
        """The demand of one request: ``prompt_tokens + completion_tokens`` reserved, and
        their price if the model has one."""
        scopes, budget = self._scopes(key_name, model)
        tokens = prompt_tokens + completion_tokens
        usd = self.cost_usd(model, prompt_tokens, completion_tokens) if budget and budget.usd else 0.0
        return Demand(scopes, tokens, usd, budget)

    def cost_usd(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollars for the tokens at ``models.<model>.price``; 0 (logged once) if unpriced."""
        model_cfg = self._settings.models.get(model)
        if model_cfg is None or model_cfg.price is None:
            if model not in self._unpriced_warned:
                self._unpriced_warned.add(model)
                log.warning("model has no price; USD budgets do not count it", extra={"model": model})
            return 0.0
        price = model_cfg.price
        return (prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok) / 1e6

    def _scopes(self, key_name: str, model: str) -> tuple[tuple[Scope, ...], Budget | None]:
        if self._keys is not None and self._keys.version != self._keys_version:
            self._cache.clear()
            self._keys_version = self._keys.version
        cached = self._cache.get((key_name, model))
        if cached is None:
            cached = self._build(key_name, model)
            if len(self._cache) < 100_000:
                self._cache[(key_name, model)] = cached
        return cached

    def _build(self, key_name: str, model: str) -> tuple[tuple[Scope, ...], Budget | None]:
        cfg = self._keys.limits_of(key_name) if self._keys is not None else None
        if cfg is None:
            cfg = self._settings.keys.get(key_name)
        if cfg is None:  # revoked while the request was on its way: no limits to apply
            return (), None
        scopes = [_scope(key_name, cfg)] if cfg.limited else []
        per_model = cfg.per_model.get(model)
        if per_model is not None and per_model.limited:
            scopes.append(_scope(f"{key_name}/{model}", per_model))
        return tuple(scopes), _budget(key_name, cfg.budget)


def _scope(scope_id: str, limits: RateLimits) -> Scope:
    return Scope(scope_id, limits.rpm, limits.effective_burst, limits.tpm, limits.max_concurrent)


def _budget(key_name: str, cfg: BudgetConfig | None) -> Budget | None:
    return None if cfg is None else Budget(key_name, cfg.tokens, cfg.usd, cfg.period_s)


def usage_counts(usage: dict[str, object] | None) -> tuple[int, int] | None:
    """``(prompt, completion)`` tokens from an OpenAI ``usage`` object (chat/completions
    names or responses' ``input_tokens``/``output_tokens``); ``None`` if absent or malformed."""
    if not usage:
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def completion_reserve(payload: Mapping[str, object], default_tokens: int, generates: bool = True) -> int:
    """Completion tokens to reserve: ``max_completion_tokens``, ``max_tokens`` or
    ``max_output_tokens`` (else ``default_tokens``), times ``n``; 0 when the endpoint does
    not generate (embeddings)."""
    if not generates:
        return 0
    limit = next((v for k in ("max_completion_tokens", "max_tokens", "max_output_tokens")
                  if isinstance(v := payload.get(k), int) and v >= 0), default_tokens)
    n = payload.get("n")
    return limit * (n if isinstance(n, int) and n > 0 else 1)


def estimate_prompt_tokens(body_bytes: int) -> int:
    """A deliberately rough prompt estimate for the reservation: a quarter of the body's
    bytes (reconciled against the upstream's count when the request ends)."""
    return max(1, body_bytes // 4)

