"""proxy/limits_redis.py: a micro-batch of limit operations means the same as the operations
run one at a time, in order.

``RedisLimitStore`` sends every op issued in one event-loop iteration in one EVALSHA, and the
script reads each key once per batch, writes it once at the end and resolves lease releases
and budget settles only when a check could depend on them. Each case here runs once op by op
(one EVALSHA each) and once in batches (the ops of a batch issued together with
``asyncio.gather``), on its own key prefix of one real ``redis-server``, both on the same
frozen clock (``clock_us``): nothing refills or expires, so every answer is deterministic and
both runs must give the same verdicts and leave the same keys with the same values.

Dollar amounts are multiples of 1/128, so sums and the script's ``%.12f`` are exact and the
budget hashes compare exactly whatever the order of the increments.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from hypothesis import HealthCheck, event, given, note, seed, settings
from hypothesis import strategies as st

from proxy import limits_redis
from proxy.limits import Budget, Demand, Scope, StoreUnavailable, Verdict
from proxy.limits_redis import RedisLimitStore
from tests.integration.conftest import SPIN_LUA, RedisServer

LEASE_TTL_S = 60.0
#: Relative TTLs (``PX``, ``PEXPIRE``) are set a few milliseconds apart in the two runs.
TTL_SLACK_MS = 5_000
USD_UNIT = 1 / 128
KEYS = ("k1", "k2")
REASONS = ("requests", "tokens", "concurrency", "budget")
#: The seed of the coverage check (most seeds pass it; this one is fixed so it is repeatable).
FIXED_SEED = 4


# --- the ops ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acquire:
    demand: Demand


@dataclass(frozen=True)
class Settle:
    """Settle the ``ref``-th earlier acquire (modulo their count) if it was admitted."""

    ref: int
    actual_tokens: int
    actual_usd: float


@dataclass(frozen=True)
class Cancel:
    """Cancel the ``ref``-th earlier acquire, admitted or not, as after a timed-out call."""

    ref: int


@dataclass(frozen=True)
class Refresh:
    ref: int


Op = Acquire | Settle | Cancel | Refresh


@dataclass(frozen=True)
class Call:
    """One store call with its references resolved: what both runs issue."""

    kind: str  # acquire, settle, cancel or refresh
    lease_id: str
    demand: Demand
    window: int | None = None
    actual_tokens: int = 0
    actual_usd: float = 0.0


def cancel_op(demand: Demand, lease_id: str) -> dict[str, Any]:
    """The op ``RedisLimitStore._run`` queues to undo a timed-out acquire: the acquire's own
    op with ``op`` set to ``cancel``."""
    return limits_redis.cancel_op(limits_redis.acquire_op(demand, lease_id))


async def invoke(store: RedisLimitStore, call: Call) -> Verdict | None:
    """Issue ``call``; its op is queued before the first ``await`` (so calls started in one
    ``gather`` share a batch)."""
    if call.kind == "acquire":
        return await store.acquire(call.demand, call.lease_id)
    if call.kind == "settle":
        await store.settle(call.demand, call.lease_id, call.window, call.actual_tokens, call.actual_usd)
    elif call.kind == "cancel":
        await store._submit(cancel_op(call.demand, call.lease_id))
    else:
        await store.refresh([(call.demand, call.lease_id)])
    return None


# --- running and inspecting ------------------------------------------------------------------


def new_store(url: str, prefix: str, now_us: int) -> RedisLimitStore:
    return RedisLimitStore(url, key_prefix=prefix, timeout_s=5.0, lease_ttl_s=LEASE_TTL_S,
                           clock_us=lambda: now_us)


async def run_one_by_one(store: RedisLimitStore, ops: Sequence[Op]
                         ) -> tuple[list[Call | None], list[Verdict | None]]:
    """Run ``ops`` one call at a time; returns the resolved calls (``None`` for an op that
    resolves to nothing: no earlier acquire, or a settle of a refused or settled lease) and
    their results."""
    calls: list[Call | None] = []
    results: list[Verdict | None] = []
    acquires: list[int] = []
    verdicts: dict[int, Verdict] = {}
    settled: set[int] = set()
    for i, op in enumerate(ops):
        call = resolve(op, i, ops, acquires, verdicts, settled)
        calls.append(call)
        result = None if call is None else await invoke(store, call)
        results.append(result)
        if isinstance(op, Acquire):
            assert result is not None
            acquires.append(i)
            verdicts[i] = result
    return calls, results


def resolve(op: Op, i: int, ops: Sequence[Op], acquires: list[int], verdicts: dict[int, Verdict],
            settled: set[int]) -> Call | None:
    if isinstance(op, Acquire):
        return Call("acquire", f"ls_{i}", op.demand)
    if not acquires:
        return None
    j = acquires[op.ref % len(acquires)]
    target = ops[j]
    assert isinstance(target, Acquire)
    lease_id, demand = f"ls_{j}", target.demand
    if isinstance(op, Settle):
        if not verdicts[j].allowed or j in settled:
            return None
        settled.add(j)
        return Call("settle", lease_id, demand, verdicts[j].budget_window, op.actual_tokens, op.actual_usd)
    return Call("cancel" if isinstance(op, Cancel) else "refresh", lease_id, demand)


async def run_batches(store: RedisLimitStore, batches: Sequence[Sequence[Call]]) -> list[Verdict | None]:
    """Run each batch's calls together (one EVALSHA), the batches one after another."""
    results: list[Verdict | None] = []
    for batch in batches:
        results += await asyncio.gather(*(invoke(store, call) for call in batch))
    return results


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def dump(r: redis_asyncio.Redis, prefix: str) -> dict[str, tuple[str, Any, int]]:
    """Every key under ``prefix`` (prefix removed): ``(type, value, PTTL in ms)``."""
    state: dict[str, tuple[str, Any, int]] = {}
    async for raw in r.scan_iter(match=prefix + "*", count=1000):
        kind = text(await r.type(raw))
        if kind == "string":
            value: Any = await r.get(raw)
        elif kind == "hash":
            value = await r.hgetall(raw)
        elif kind == "zset":
            value = await r.zrange(raw, 0, -1, withscores=True)
        else:
            value = None
        state[text(raw)[len(prefix):]] = (kind, value, await r.pttl(raw))
    return state


def spent_as_numbers(state: dict[str, tuple[str, Any, int]]) -> dict[str, tuple[str, Any, int]]:
    """``state`` with each budget's ``tok`` and ``usd`` as numbers, 0 when absent, and a
    budget holding nothing (0 spent, no reservation) dropped: op by op, a reservation and
    its refund leave ``tok = 0``; in one batch they cancel out and nothing is written. The
    script reads both the same."""
    out = {}
    for key, (kind, value, ttl) in state.items():
        if key.startswith("budget:") and kind == "hash":
            fields = dict(value)
            spent = (int(fields.pop(b"tok", 0)), float(fields.pop(b"usd", 0)))
            if spent == (0, 0.0) and not fields:
                continue
            value = (spent, fields)
        out[key] = (kind, value, ttl)
    return out


def assert_same_state(one_by_one: dict[str, tuple[str, Any, int]],
                      batched: dict[str, tuple[str, Any, int]]) -> None:
    one_by_one, batched = spent_as_numbers(one_by_one), spent_as_numbers(batched)
    assert {k: v[:2] for k, v in batched.items()} == {k: v[:2] for k, v in one_by_one.items()}
    for key, (_, _, ttl) in one_by_one.items():
        other = batched[key][2]
        assert ttl > 0, (key, ttl)
        assert other > 0, (key, other)
        assert abs(ttl - other) <= TTL_SLACK_MS, (key, ttl, other)


@dataclass
class Runs:
    calls: list[Call | None]
    one_by_one: list[Verdict | None]
    batches: list[list[Call]]
    batched: list[Verdict | None]
    evalshas: int
    state_one_by_one: dict[str, tuple[str, Any, int]]
    state_batched: dict[str, tuple[str, Any, int]]


@dataclass
class Pair:
    """Two stores on fresh prefixes of one server (``one`` for the op-by-op run, ``bat`` for
    the batched run) and a client to inspect the server."""

    r: redis_asyncio.Redis
    one: RedisLimitStore
    bat: RedisLimitStore

    async def evalshas(self) -> int:
        """EVALSHA calls the server has run so far (``INFO commandstats``)."""
        stats = await self.r.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    async def states(self) -> tuple[dict[str, tuple[str, Any, int]], dict[str, tuple[str, Any, int]]]:
        return await dump(self.r, self.one.key_prefix), await dump(self.r, self.bat.key_prefix)


@asynccontextmanager
async def store_pair(url: str, now_us: int) -> AsyncIterator[Pair]:
    """A ``Pair`` on the frozen clock ``now_us``; its keys are deleted afterwards."""
    base = f"t{uuid.uuid4().hex[:12]}:"
    pair = Pair(redis_asyncio.Redis.from_url(url), new_store(url, base + "one:", now_us),
                new_store(url, base + "bat:", now_us))
    try:
        yield pair
    finally:
        await pair.one.close()
        await pair.bat.close()
        keys = [k async for k in pair.r.scan_iter(match=base + "*", count=1000)]
        if keys:
            await pair.r.delete(*keys)
        await pair.r.aclose()


def split(calls: Sequence[Call | None], cuts: Sequence[bool]) -> list[list[Call]]:
    """``calls`` (without the ``None``) in batches ending where ``cuts`` is true."""
    batches: list[list[Call]] = [[]]
    for call, cut in zip(calls, cuts, strict=True):
        if call is not None:
            batches[-1].append(call)
        if cut and batches[-1]:
            batches.append([])
    return [b for b in batches if b]


async def compare_runs(url: str, now_us: int, ops: Sequence[Op], cuts: Sequence[bool]) -> Runs:
    """Run ``ops`` op by op, then in batches ending where ``cuts`` is true, each run on a
    fresh prefix; the batched run's EVALSHAs are counted."""
    async with store_pair(url, now_us) as pair:
        calls, one_results = await run_one_by_one(pair.one, ops)
        batches = split(calls, cuts)
        before = await pair.evalshas()
        bat_results = await run_batches(pair.bat, batches)
        evalshas = await pair.evalshas() - before
        return Runs(calls, one_results, batches, bat_results, evalshas, *await pair.states())


# --- strategies ------------------------------------------------------------------------------


def sometimes(values: st.SearchStrategy[Any], share: int, out_of: int) -> st.SearchStrategy[Any]:
    """``values`` ``share`` times in ``out_of``, else ``None`` (a uniform pick: Hypothesis
    draws small integers far more often than one in n)."""
    return st.sampled_from(range(out_of)).flatmap(lambda n: values if n < share else st.none())


def mostly(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``values`` three times in four, else ``None`` (no such limit)."""
    return sometimes(values, 3, 4)


@st.composite
def scope_limits(draw: st.DrawFn, scope_id: str) -> Scope:
    rpm = draw(mostly(st.sampled_from([6, 60, 600])))
    return Scope(scope_id, rpm, draw(st.integers(1, 5)) if rpm else None,
                 draw(mostly(st.integers(150, 300) | st.integers(50, 500))), draw(mostly(st.integers(1, 4))))


def budgets(key: str) -> st.SearchStrategy[Budget]:
    return st.builds(
        lambda tokens, usd_units, period: Budget(
            key, tokens, None if usd_units is None else usd_units * USD_UNIT, period),
        mostly(st.integers(100, 400) | st.integers(100, 2000)),
        mostly(st.integers(16, 64) | st.integers(16, 256)),
        st.sampled_from([3600.0, 86400.0]),
    ).filter(lambda b: b.tokens is not None or b.usd is not None)


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[Op], list[bool]]:
    """Ops over two keys (each with an optional per-model scope and budget) with limits small
    enough that every kind of refusal happens, and where the batches end."""
    scopes = {sid: draw(scope_limits(sid)) for key in KEYS for sid in (key, f"{key}/m")}
    key_budgets = {key: draw(sometimes(budgets(key), 1, 2)) for key in KEYS}
    ops: list[Op] = []
    for kind in draw(st.lists(st.sampled_from("aaaassccr"), min_size=8, max_size=40)):
        if kind == "a":
            key = draw(st.sampled_from(KEYS))
            chosen = (scopes[key], scopes[f"{key}/m"]) if draw(st.booleans()) else (scopes[key],)
            budget = key_budgets[key]
            usd = draw(st.integers(0, 64)) * USD_UNIT if budget and budget.usd else 0.0
            tokens = draw(st.integers(40, 120) | st.integers(1, 200))  # a few fill a bucket
            ops.append(Acquire(Demand(chosen, tokens, usd, budget)))
        elif kind == "s":
            ops.append(Settle(draw(st.integers(0, 30)), draw(st.integers(0, 400)),
                              draw(st.integers(0, 128)) * USD_UNIT))
        elif kind == "c":
            ops.append(Cancel(draw(st.integers(0, 30))))
        else:
            ops.append(Refresh(draw(st.integers(0, 30))))
    cuts = draw(st.lists(st.sampled_from([True, False, False, False]), min_size=len(ops), max_size=len(ops)))
    return ops, cuts


# --- the tests -------------------------------------------------------------------------------


@dataclass
class Coverage:
    """What the examples exercised: per refusal reason, the examples that met it."""

    examples: int = 0
    multi_op_batches: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


def differential(url: str, max_examples: int, fixed_seed: int | None = None) -> Coverage:
    """Run Hypothesis cases through ``compare_runs`` on one event loop (kept for the whole
    run) and assert both runs agree on each; ``fixed_seed`` makes the cases repeatable."""
    now_us = int(time.time()) * 1_000_000  # near real time: budgets expire at fake-clock instants
    coverage = Coverage()

    def check(case: tuple[list[Op], list[bool]]) -> None:
        ops, cuts = case
        runs = runner.run(compare_runs(url, now_us, ops, cuts))
        note(f"batches: {[[(c.kind, c.lease_id) for c in b] for b in runs.batches]}")
        note(f"one by one: {runs.one_by_one}")
        note(f"batched: {runs.batched}")
        assert runs.evalshas == len(runs.batches)  # each batch went in exactly one EVALSHA
        assert runs.batched == [v for v, c in zip(runs.one_by_one, runs.calls, strict=True) if c]
        assert_same_state(runs.state_one_by_one, runs.state_batched)

        refused = {v.reason for v in runs.one_by_one if v is not None and v.reason}
        for reason in refused:
            event(f"refused: {reason}")
        coverage.reasons.update(refused)
        coverage.examples += 1
        coverage.multi_op_batches += sum(len(b) > 1 for b in runs.batches)

    test = given(case=cases())(check)
    options = settings(max_examples=max_examples, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow])
    if fixed_seed is not None:
        test, options = seed(fixed_seed)(test), settings(options, database=None)
    test = options(test)
    with asyncio.Runner() as runner:
        test()
    return coverage


def test_batches_answer_as_ops_one_at_a_time(redis_server: RedisServer) -> None:
    """Random op sequences and batch partitions: same verdicts, same keys and values."""
    differential(redis_server.url, max_examples=100)


def test_the_cases_meet_every_refusal_in_batches(redis_server: RedisServer) -> None:
    """The same comparison on a fixed seed, to check the strategy does what it is meant to:
    every refusal reason in a good share of the examples, and batches of several ops."""
    coverage = differential(redis_server.url, max_examples=100, fixed_seed=FIXED_SEED)
    for reason in REASONS:
        assert coverage.reasons[reason] >= coverage.examples // 10, (reason, coverage)
    assert coverage.multi_op_batches >= coverage.examples, coverage


async def test_settles_earlier_in_a_batch_count_for_later_acquires(redis_server: RedisServer) -> None:
    """One batch where pending settles decide later acquires: a released lease frees the only
    slot, a settle below its reservation brings a budget back under its limit, one above
    pushes it over (in tokens and in dollars)."""
    slot = Demand((Scope("slot", max_concurrent=1),), 10)
    under = Demand((), 200, 0.0, Budget("under", 300, None, 3600.0))
    over = Demand((), 100, 0.0, Budget("over", 300, None, 3600.0))
    usd_under = Demand((), 1, 0.75, Budget("usd_under", None, 1.0, 3600.0))
    usd_over = Demand((), 1, 0.25, Budget("usd_over", None, 1.0, 3600.0))
    now_us = int(time.time()) * 1_000_000
    window = now_us // 1_000_000 // 3600

    def settle(lease_id: str, demand: Demand, tokens: int, usd: float = 0.0) -> Call:
        return Call("settle", lease_id, demand, window, tokens, usd)

    first = [Call("acquire", "L1", slot), Call("acquire", "U1", under), Call("acquire", "O1", over),
             Call("acquire", "DU1", usd_under), Call("acquire", "DO1", usd_over)]
    mixed = [
        settle("L1", slot, 10), Call("acquire", "L2", slot),  # the slot L1 held
        Call("acquire", "L3", slot),  # refused: L2 holds it
        settle("L2", slot, 10), Call("acquire", "L4", slot),  # the slot L2 held (same batch)
        settle("U1", under, 50), Call("acquire", "U2", under),  # 50 + 200 <= 300
        settle("O1", over, 250), Call("acquire", "O2", over),  # 250 + 100 > 300
        settle("DU1", usd_under, 1, 0.25), Call("acquire", "DU2", usd_under),  # $0.25 + $0.75 <= $1
        settle("DO1", usd_over, 1, 0.875), Call("acquire", "DO2", usd_over),  # $0.875 + $0.25 > $1
    ]
    async with store_pair(redis_server.url, now_us) as pair:
        one_results = await run_batches(pair.one, [[c] for c in first + mixed])
        await run_batches(pair.bat, [first])
        before = await pair.evalshas()
        bat_results = await run_batches(pair.bat, [mixed])
        assert await pair.evalshas() - before == 1
        state_one, state_bat = await pair.states()

    assert bat_results == one_results[len(first):]
    assert all(v is not None and v.allowed for v in one_results[:len(first)])
    acquires = {c.lease_id: v for c, v in zip(mixed, bat_results, strict=True) if v is not None}
    assert {k: (v.allowed, v.reason) for k, v in acquires.items()} == {
        "L2": (True, None), "L3": (False, "concurrency"), "L4": (True, None),
        "U2": (True, None), "O2": (False, "budget"), "DU2": (True, None), "DO2": (False, "budget")}
    assert_same_state(state_one, state_bat)
    assert state_bat["slot:leases"][1] == [(b"L4", float(now_us // 1000 + LEASE_TTL_S * 1000))]
    assert state_bat[f"budget:under:{window}"][1][b"tok"] == b"250"
    assert state_bat[f"budget:over:{window}"][1][b"tok"] == b"250"
    assert float(state_bat[f"budget:usd_under:{window}"][1][b"usd"]) == 1.0
    assert float(state_bat[f"budget:usd_over:{window}"][1][b"usd"]) == 0.875  # DO2 refused


async def test_cancel_from_a_timed_out_acquire_goes_first_in_the_next_batch(
        redis_server: RedisServer) -> None:
    """A cancel queued after a failed call (``_orphans``, as ``_run`` queues it) rides at
    the front of the next batch: the slot and budget it returns serve that very batch."""
    demand = Demand((Scope("c", max_concurrent=1),), 100, 0.0, Budget("c", 150, None, 3600.0))
    now_us = int(time.time()) * 1_000_000
    acquire, cancel, after = (Call("acquire", "A1", demand), Call("cancel", "A1", demand),
                              Call("acquire", "A2", demand))
    async with store_pair(redis_server.url, now_us) as pair:
        one_results = await run_batches(pair.one, [[acquire], [cancel], [after]])
        await run_batches(pair.bat, [[acquire]])
        pair.bat._orphans.append(cancel_op(demand, "A1"))
        before = await pair.evalshas()
        bat_results = await run_batches(pair.bat, [[after]])
        assert await pair.evalshas() - before == 1
        assert_same_state(*await pair.states())
    assert one_results[2] == bat_results[0]
    assert bat_results[0] is not None
    assert bat_results[0].allowed


async def test_refreshed_lease_keeps_its_slot_past_the_lease_set_ttl(redis_server: RedisServer) -> None:
    """A lease that is refreshed outlives the first TTL of its sorted set: refresh extends
    the set's TTL too, so a long request keeps its ``max_concurrent`` slot."""
    lease_ttl_s = 0.2     # the set's TTL: 2 * lease_ttl = 400 ms (Redis's real clock)
    demand = Demand((Scope("long", max_concurrent=1),), 1, 0.0, None)
    prefix = f"t-{uuid.uuid4().hex}:"
    store = RedisLimitStore(redis_server.url, key_prefix=prefix, timeout_s=5.0,
                            lease_ttl_s=lease_ttl_s)
    r = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        assert (await store.acquire(demand, "held")).allowed
        for _ in range(8):  # 800 ms of refreshes, every lease_ttl / 2
            await asyncio.sleep(lease_ttl_s / 2)
            await store.refresh([(demand, "held")])
        assert await r.zscore(f"{prefix}long:leases", "held") is not None
        refused = await store.acquire(demand, "second")
        assert not refused.allowed
        assert refused.reason == "concurrency"
    finally:
        await r.aclose()
        await store.close()


async def test_a_stalled_event_loop_is_not_taken_for_a_slow_redis(redis_server: RedisServer) -> None:
    """The loop stalls (a long callback, a collection) right after a batch was sent, past
    ``timeout_s``: Redis answered in time and the answer is in the socket, so the call
    succeeds instead of falling back. A Redis that really is slow still times out."""
    demand = Demand((Scope("lag", max_concurrent=5),), 1, 0.0, None)
    store = RedisLimitStore(redis_server.url, key_prefix=f"t-{uuid.uuid4().hex}:", timeout_s=0.05)
    send = store.script

    async def send_then_stall(args: list[Any]) -> Any:
        answer = asyncio.ensure_future(send(args=args))
        await asyncio.sleep(0)  # the command is written to Redis
        time.sleep(0.15)  # noqa: ASYNC251 -- the point: the whole loop stalls for 3 timeouts
        return await answer

    try:
        assert (await store.acquire(demand, "warm")).allowed   # connected, script loaded
        store.script = send_then_stall  # type: ignore[assignment]
        assert (await store.acquire(demand, "late")).allowed

        blocker = redis_asyncio.Redis.from_url(redis_server.url)
        try:
            spin = asyncio.ensure_future(blocker.eval(SPIN_LUA, 0, 300))
            await asyncio.sleep(0.05)
            store.script = send
            with pytest.raises(StoreUnavailable):
                await store.acquire(demand, "slow")
            await spin
        finally:
            await blocker.aclose()
    finally:
        await store.close()
