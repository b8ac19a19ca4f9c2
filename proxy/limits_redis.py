"""Limit state in Redis, shared by every worker and machine (``state.backend: redis``).

The rules of ``proxy.limits`` run inside one Lua script, so a check and its charge are one
atomic step across all processes. The script reads the clock with ``TIME`` (one clock for
every gateway, whatever their skew), and sets a TTL on every key it writes, in the same
step. It is loaded once and called with EVALSHA (redis-py's ``Script`` reloads it on
NOSCRIPT).

A call that times out may still run once Redis is free; its acquires are then cancelled (leases
released, budget reservations refunded) with the next batch that gets through.

Calls are micro-batched: the operations issued during one event-loop iteration go to Redis
in one EVALSHA, each still applied atomically and in order, without delaying a lone request
(the batch is sent on the next loop iteration, not after a timer). Inside the script a batch
runs against a write-back cache: each key is read at most once and written once, so Redis
does a few commands per key per batch instead of some twenty per request (lease releases and
budget settles are applied lazily, unless a check near its limit depends on them).

Keys (``state.key_prefix`` first, default ``shepherd:``): ``<scope>:tat`` (GCRA),
``<scope>:tb`` (token bucket), ``<scope>:leases`` (sorted set of lease ids by expiry),
``budget:<key>:<window>``. Standalone Redis or Sentinel; keys are not hash-tagged for Cluster.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

from proxy.limits import (
    CONCURRENCY_RETRY_S,
    Budget,
    Demand,
    Scope,
    ScopeReport,
    StoreUnavailable,
    Verdict,
    emission_us,
)

#: The most operations sent in one EVALSHA.
MAX_BATCH = 256

#: The most timed-out acquires remembered for cancelling (the oldest are forgotten; their
#: leases then expire with ``limits.lease_ttl``).
MAX_ORPHANS = 10_000


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a background op's outcome so a failure is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()

LUA = r"""
local prefix = ARGV[1]
local lease_ttl = tonumber(ARGV[2])
local ops = cjson.decode(ARGV[3])
local now_us = tonumber(ARGV[4])  -- a fixed clock, for tests; normally absent: Redis's TIME
if not now_us then
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])  -- exact: below 2^53
end
local now = math.floor(now_us / 1000)  -- milliseconds, for buckets, leases and budgets

-- Write-back cache: the ops of a batch run in order against these tables; each key is read
-- at most once (on first use) and written once, after the last op. Lease releases and
-- budget settles are applied lazily: only a check whose outcome they could change (a key at
-- its max_concurrent, a budget that the pending settles could push over) resolves them first.
local tats, buckets, leases, budgets = {}, {}, {}, {}

local function fmt(x) return string.format('%.3f', x) end
local function fmt_usd(x) return string.format('%.12f', x) end

local function tat_of(key)
  local e = tats[key]
  if not e then
    e = {v = tonumber(redis.call('GET', key) or '0'), dirty = false}
    tats[key] = e
  end
  return e
end

local function bucket_of(key, cap, rate)
  local e = buckets[key]
  if not e then
    local v = redis.call('HMGET', key, 'v', 't')
    local level = cap
    if v[1] then level = math.min(cap, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * rate) end
    e = {v = level, cap = cap, rate = rate, dirty = false}
    buckets[key] = e
  end
  return e
end

local function leases_of(key)
  local e = leases[key]
  if not e then
    e = {n = nil, add = {}, rem = {}}
    leases[key] = e
  end
  return e
end

-- Apply pending releases; n counted them as still held.
local function release_pending(key, e)
  if #e.rem > 0 then
    local removed = redis.call('ZREM', key, unpack(e.rem))
    if e.n then e.n = e.n - removed end
    e.rem = {}
  end
end

local function lease_count(key, e)
  if not e.n then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    e.n = redis.call('ZCARD', key)
  end
  return e.n
end

local function release(key, id)
  local e = leases_of(key)
  if e.add[id] then
    e.add[id] = nil
    e.n = e.n - 1
  else
    table.insert(e.rem, id)
  end
end

local function budget_key(b, window) return prefix .. 'budget:' .. b[1] .. ':' .. window end

local function budget_of(key, expire_at)
  local e = budgets[key]
  if not e then
    local spent = redis.call('HMGET', key, 'tok', 'usd')
    e = {tok = tonumber(spent[1] or '0'), usd = tonumber(spent[2] or '0'), dtok = 0, dusd = 0,
         res = {}, del = {}, gone = {}, pend = {}, up_tok = 0, up_usd = 0, expire_at = expire_at}
    budgets[key] = e
  end
  return e
end

local function charge(e, tok, usd)
  e.tok, e.usd, e.dtok, e.dusd = e.tok + tok, e.usd + usd, e.dtok + tok, e.dusd + usd
end

-- Apply pending settles: each only if its reservation is still held (an acquire cancelled
-- after a timeout has none left).
local function settle_pending(key, e)
  if #e.pend == 0 then return end
  local fields = {}
  for i, p in ipairs(e.pend) do fields[i] = 'r:' .. p[1] end
  local held = redis.call('HMGET', key, unpack(fields))
  for i, p in ipairs(e.pend) do
    if held[i] and not e.gone[fields[i]] then
      charge(e, p[2], p[3])
      table.insert(e.del, fields[i])
      e.gone[fields[i]] = true
    end
  end
  e.pend, e.up_tok, e.up_usd = {}, 0, 0
end

local function refuse(res, reason, retry)
  local rank = {budget = 3, tokens_too_large = 2}
  local new, old = rank[reason] or 1, rank[res.reason] or 1
  if res.ok == 1 or new > old then
    res.reason, res.retry = reason, retry
  elseif new == 1 and old == 1 then
    res.retry = math.max(res.retry, retry)
  end
  res.ok = 0
end

local function check_scope(sc, op, res, commits)
  local sid, emission, burst, tpm, maxc = sc[1], sc[2], sc[3], sc[4], sc[5]
  local rep = {sid, -1, -1, -1, -1, -1, -1}
  if emission > 0 then  -- GCRA in integer microseconds, as proxy.limits.gcra_us
    local e = tat_of(prefix .. sid .. ':tat')
    local base = math.max(e.v, now_us)
    local new_tat = base + emission
    local tol = burst * emission
    rep[2] = sc[6]
    if new_tat - now_us > tol then
      rep[3], rep[4] = 0, (base - now_us) / 1000
      refuse(res, 'requests', (new_tat - now_us - tol) / 1000)
    else
      rep[3] = math.floor((tol - (new_tat - now_us)) / emission)
      rep[4] = (new_tat - now_us) / 1000
      table.insert(commits, {e, new_tat})
    end
  end
  if tpm > 0 then
    local rate = tpm / 60000
    local e = bucket_of(prefix .. sid .. ':tb', tpm, rate)
    local after = e.v - op.tok
    local shown = after
    if after < 0 then shown = e.v end
    rep[5], rep[6], rep[7] = tpm, math.max(0, math.floor(shown)), (tpm - shown) / rate
    if op.tok > tpm then
      refuse(res, 'tokens_too_large', -1)
    elseif after < 0 then
      refuse(res, 'tokens', -after / rate)
    else
      table.insert(commits, {e, after})
    end
  end
  if maxc > 0 then
    local key = prefix .. sid .. ':leases'
    local e = leases_of(key)
    if lease_count(key, e) >= maxc then release_pending(key, e) end
    if e.n >= maxc then
      refuse(res, 'concurrency', -2)
    else
      table.insert(commits, {e, 'lease'})
    end
  end
  table.insert(res.reports, rep)
end

local function check_budget(op, res)
  local b = op.b
  local period = b[4]
  local window = math.floor(now / period)
  local key = budget_key(b, window)
  local e = budget_of(key, (window + 2) * period)
  res.window = window
  local function over(slack_tok, slack_usd)
    return (b[2] >= 0 and e.tok + slack_tok + op.tok > b[2]) or
           (b[3] >= 0 and e.usd + slack_usd + op.usd > b[3] + 1e-12)
  end
  if over(e.up_tok, e.up_usd) then
    settle_pending(key, e)
    if over(0, 0) then
      refuse(res, 'budget', -1)
      return nil
    end
  end
  return e
end

local function acquire(op)
  local res = {ok = 1, reason = '', retry = 0, reports = {}, window = -1}
  local commits = {}
  for _, sc in ipairs(op.s) do check_scope(sc, op, res, commits) end
  local budget = nil
  if op.b[4] > 0 then budget = check_budget(op, res) end
  if res.ok == 1 then
    for _, c in ipairs(commits) do
      local e, v = c[1], c[2]
      if v == 'lease' then
        e.add[op.id] = now + lease_ttl
        e.n = e.n + 1
      else
        e.v, e.dirty = v, true
      end
    end
    if budget then
      charge(budget, op.tok, op.usd)
      -- the reservation, so a settle or a cancel knows what was charged
      budget.res['r:' .. op.id] = op.tok .. ' ' .. fmt_usd(op.usd)
    end
  end
  return {res.ok, res.reason, res.retry, res.reports, res.window}
end

local function settle(op)
  local delta = op.act - op.tok
  for _, sc in ipairs(op.s) do
    local sid, tpm, maxc = sc[1], sc[4], sc[5]
    if tpm > 0 then
      local e = bucket_of(prefix .. sid .. ':tb', tpm, tpm / 60000)
      e.v, e.dirty = math.min(tpm, e.v - delta), true
    end
    if maxc > 0 then release(prefix .. sid .. ':leases', op.id) end
  end
  if op.b[4] > 0 and op.w >= 0 then
    local key = budget_key(op.b, op.w)
    local e = budget_of(key, (op.w + 2) * op.b[4])
    local field = 'r:' .. op.id
    local dusd = op.ausd - op.usd
    if e.res[field] then
      e.res[field] = nil
      charge(e, delta, dusd)
    else
      table.insert(e.pend, {op.id, delta, dusd})
      e.up_tok, e.up_usd = e.up_tok + math.max(0, delta), e.up_usd + math.max(0, dusd)
    end
  end
  return {1}
end

-- Undo an acquire whose answer never reached the gateway (the call timed out): release its
-- leases and refund its budget reservation if it was charged. Idempotent; the token bucket
-- is left alone (it refills within a minute).
local function cancel(op)
  for _, sc in ipairs(op.s) do
    if sc[5] > 0 then release(prefix .. sc[1] .. ':leases', op.id) end
  end
  if op.b[4] > 0 then
    local window = math.floor(now / op.b[4])
    local key = budget_key(op.b, window)
    local e = budget_of(key, (window + 2) * op.b[4])
    settle_pending(key, e)
    local field = 'r:' .. op.id
    local held = e.res[field]
    if held then
      e.res[field] = nil
    elseif not e.gone[field] then
      held = redis.call('HGET', key, field)
      if held then
        table.insert(e.del, field)
        e.gone[field] = true
      end
    end
    if held then
      local tok, usd = string.match(held, '^(%S+) (%S+)$')
      charge(e, -tonumber(tok), -tonumber(usd))
    end
  end
  return {1}
end

local function refresh(op)
  for _, sc in ipairs(op.s) do
    if sc[5] > 0 then
      local key = prefix .. sc[1] .. ':leases'
      if redis.call('ZADD', key, 'XX', 'CH', now + lease_ttl, op.id) == 1 then
        redis.call('PEXPIRE', key, 2 * lease_ttl)  -- the set outlives its longest lease
      end
    end
  end
  return {1}
end

local out = {}
for i, op in ipairs(ops) do
  if op.t == 'a' then out[i] = acquire(op)
  elseif op.t == 's' then out[i] = settle(op)
  elseif op.t == 'c' then out[i] = cancel(op)
  else out[i] = refresh(op) end
end

-- Write back, each key with its TTL.
for key, e in pairs(tats) do
  if e.dirty then
    redis.call('SET', key, string.format('%.0f', e.v), 'PX', math.ceil((e.v - now_us) / 1000) + 1000)
  end
end
for key, e in pairs(buckets) do
  if e.dirty then
    redis.call('HSET', key, 'v', fmt(e.v), 't', now)
    redis.call('PEXPIRE', key, math.ceil((e.cap - e.v) / e.rate) + 1000)
  end
end
for key, e in pairs(leases) do
  release_pending(key, e)
  local args = {}
  for id, expiry in pairs(e.add) do
    table.insert(args, expiry)
    table.insert(args, id)
  end
  if #args > 0 then
    redis.call('ZADD', key, unpack(args))
    redis.call('PEXPIRE', key, 2 * lease_ttl)
  end
end
for key, e in pairs(budgets) do
  settle_pending(key, e)
  if #e.del > 0 then redis.call('HDEL', key, unpack(e.del)) end
  local args = {}
  for field, held in pairs(e.res) do
    table.insert(args, field)
    table.insert(args, held)
  end
  if #args > 0 then redis.call('HSET', key, unpack(args)) end
  if e.dtok ~= 0 then redis.call('HINCRBY', key, 'tok', e.dtok) end
  if e.dusd ~= 0 then redis.call('HINCRBYFLOAT', key, 'usd', fmt_usd(e.dusd)) end
  if #args > 0 or e.dtok ~= 0 or e.dusd ~= 0 then redis.call('PEXPIREAT', key, e.expire_at) end
end
return cjson.encode(out)
"""


def _scopes_arg(demand: Demand) -> list[list[Any]]:
    """Scopes as the script reads them: [id, emission_us, burst, tpm, max_concurrent, rpm],
    0 = none (memoized: a key's scopes are the same objects on every request)."""
    return _scopes_arg_of(demand.scopes)


@functools.lru_cache(maxsize=4096)
def _scopes_arg_of(scopes: tuple[Scope, ...]) -> list[list[Any]]:
    return [[s.scope_id, emission_us(s.emission_s) if s.rpm and s.burst else 0, s.burst or 0,
             s.tpm or 0, s.max_concurrent or 0, s.rpm or 0] for s in scopes]


def _budget_arg(demand: Demand) -> list[Any]:
    """The budget as [key, tokens or -1, usd or -1, period_ms], or a period of 0 for none."""
    return _budget_arg_of(demand.budget)


@functools.lru_cache(maxsize=4096)
def _budget_arg_of(b: Budget | None) -> list[Any]:
    if b is None:
        return ["", -1, -1, 0]
    return [b.key_name, -1 if b.tokens is None else b.tokens, -1.0 if b.usd is None else b.usd,
            int(b.period_s * 1000)]


def _opt_int(value: float) -> int | None:
    return None if value < 0 else int(value)


def _opt_s(value_ms: float) -> float | None:
    return None if value_ms < 0 else value_ms / 1000.0


def _verdict(raw: list[Any]) -> Verdict:
    """A ``Verdict`` from the script's ``[ok, reason, retry_ms, reports, window]`` (a retry
    of -1 means never within the window, -2 the concurrency hint)."""
    ok, reason, retry_ms, reports, window = raw
    verdict = Verdict(bool(ok), reason or None, None, [], None if window < 0 else int(window))
    if not ok:
        verdict.retry_after_s = (None if retry_ms == -1 else
                                 CONCURRENCY_RETRY_S if retry_ms == -2 else retry_ms / 1000.0)
    for rep in reports if isinstance(reports, list) else []:  # cjson encodes [] as {}
        verdict.reports.append(ScopeReport(rep[0], _opt_int(rep[1]), _opt_int(rep[2]), _opt_s(rep[3]),
                                           _opt_int(rep[4]), _opt_int(rep[5]), _opt_s(rep[6])))
    return verdict


class RedisLimitStore:
    """``LimitStore`` on Redis through redis-py's asyncio client.

    Args:
        url: ``state.redis_url``.
        key_prefix: ``state.key_prefix``.
        timeout_s: ``state.redis_timeout``: a batch not answered in time fails with
            ``StoreUnavailable`` (the limiter then falls back).
        lease_ttl_s: ``limits.lease_ttl``.
        clock_us: ``None`` (the default): every batch reads Redis's own clock (``TIME``), one
            clock for every gateway. A function returning Unix time in integer microseconds:
            a fake clock, for tests.
    """

    name = "redis"

    def __init__(self, url: str, key_prefix: str = "shepherd:", timeout_s: float = 0.05,
                 lease_ttl_s: float = 60.0, clock_us: Callable[[], int] | None = None) -> None:
        self.redis = redis_asyncio.Redis.from_url(
            url, socket_connect_timeout=max(timeout_s, 0.5), socket_timeout=max(timeout_s * 4, 1.0),
            health_check_interval=0, retry_on_timeout=False)
        self.script = self.redis.register_script(LUA)
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.lease_ttl_ms = int(lease_ttl_s * 1000)
        self.clock_us = clock_us
        self._pending: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._orphans: list[dict[str, Any]] = []  # acquires to cancel once Redis answers again

    def __repr__(self) -> str:
        return f"<RedisLimitStore [pending: {len(self._pending)}, batches in flight: {len(self._inflight)}]>"

    async def acquire(self, demand: Demand, lease_id: str) -> Verdict:
        op = {"t": "a", "id": lease_id, "s": _scopes_arg(demand), "tok": demand.tokens,
              "usd": demand.usd, "b": _budget_arg(demand)}
        return _verdict(await self._submit(op))

    async def settle(self, demand: Demand, lease_id: str, budget_window: int | None,
                     actual_tokens: int, actual_usd: float) -> None:
        await self._submit({"t": "s", "id": lease_id, "s": _scopes_arg(demand), "tok": demand.tokens,
                            "act": actual_tokens, "usd": demand.usd, "ausd": actual_usd,
                            "b": _budget_arg(demand), "w": -1 if budget_window is None else budget_window})

    async def refresh(self, leases: Iterable[tuple[Demand, str]]) -> None:
        ops = [{"t": "r", "id": lease_id, "s": _scopes_arg(demand)} for demand, lease_id in leases]
        await asyncio.gather(*(self._submit(op) for op in ops))

    async def ping(self) -> bool:
        """Whether Redis answers now."""
        try:
            async with asyncio.timeout(max(self.timeout_s, 0.5)):
                return bool(await self.redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self.redis.aclose()

    def _submit(self, op: dict[str, Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((op, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        if self._orphans:  # cancels go first, so a slot they free serves this very batch
            loop = asyncio.get_running_loop()
            cancels = [(op, loop.create_future()) for op in self._orphans]
            self._orphans = []
            for _, future in cancels:
                future.add_done_callback(_consume)
            self._pending[:0] = cancels
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _run(self, batch: list[tuple[dict[str, Any], asyncio.Future[Any]]]) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                args: list[Any] = [self.key_prefix, self.lease_ttl_ms,
                                   orjson.dumps([op for op, _ in batch])]
                if self.clock_us is not None:
                    args.append(self.clock_us())
                raw = await self.script(args=args)
            results = orjson.loads(raw)
        except (RedisError, OSError, TimeoutError, orjson.JSONDecodeError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(f"{type(exc).__name__}: {exc}"))
            # The script may still run once Redis is free: undo its acquires (and retry
            # undos that failed too) ahead of the next batch.
            self._orphans.extend({**op, "t": "c"} for op, _ in batch if op["t"] in ("a", "c"))
            del self._orphans[:-MAX_ORPHANS]
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
