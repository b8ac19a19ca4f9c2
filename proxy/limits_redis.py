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
``<scope>:blocks`` (sorted set of ``<block id>*<leases held>`` by expiry, for blocks of
quota), ``budget:<key>:<window>`` (``tok``, ``usd`` and one ``r:<id>`` reservation per
request or block in flight), ``instances`` (sorted set of live gateway instance ids by the
expiry of their heartbeat: ``proxy.limits`` shares every limit among them while Redis is
down). Standalone Redis or Sentinel; keys are not hash-tagged for Cluster.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

from proxy.limits import (
    CONCURRENCY_RETRY_S,
    HEARTBEAT_INTERVAL_S,
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

#: Blocks of quota (see ``RedisLimitStore``): the fewest requests worth taking a block for,
#: and the share of what a limit has left that one block may take at most (1/8).
MIN_BLOCK = 4
BLOCK_SHARE = 8

#: How long an instance counts as alive after its last heartbeat (three missed beats).
INSTANCE_TTL_S = 3 * HEARTBEAT_INTERVAL_S

#: The ticks a wait for Redis is cut into (``RedisLimitStore._reply``): how finely time the
#: event loop was late is told apart from time Redis was slow.
WAIT_TICKS = 5

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

-- The leases of a scope: one member per request in <scope>:leases, and one member
-- '<block id>*<k>' per block of quota holding k of them in <scope>:blocks; both scored by
-- expiry. n counts them all, add/badd are added and rem/brem released by this batch.
local function leases_of(sid)
  local e = leases[sid]
  if not e then
    e = {key = prefix .. sid .. ':leases', bkey = prefix .. sid .. ':blocks', n = nil,
         add = {}, rem = {}, badd = {}, brem = {}}
    leases[sid] = e
  end
  return e
end

local function block_leases(member) return tonumber(string.match(member, '%*(%d+)$')) end

-- Apply pending releases; n counted them as still held.
local function release_pending(e)
  if #e.rem > 0 then
    local removed = redis.call('ZREM', e.key, unpack(e.rem))
    if e.n then e.n = e.n - removed end
    e.rem = {}
  end
  for _, member in ipairs(e.brem) do
    if redis.call('ZREM', e.bkey, member) == 1 and e.n then e.n = e.n - block_leases(member) end
  end
  e.brem = {}
end

local function lease_count(e)
  if not e.n then
    redis.call('ZREMRANGEBYSCORE', e.key, '-inf', now)
    redis.call('ZREMRANGEBYSCORE', e.bkey, '-inf', now)
    local n = redis.call('ZCARD', e.key)
    for _, member in ipairs(redis.call('ZRANGE', e.bkey, 0, -1)) do n = n + block_leases(member) end
    e.n = n
  end
  return e.n
end

local function release(sid, id)
  local e = leases_of(sid)
  if e.add[id] then
    e.add[id] = nil
    e.n = e.n - 1
  else
    table.insert(e.rem, id)
  end
end

local function release_block(e, member)
  if e.badd[member] then
    e.badd[member] = nil
    e.n = e.n - block_leases(member)
  else
    table.insert(e.brem, member)
  end
end

-- Release the block 'id*<k>' whatever its k (a cancelled grant may have been cut).
local function release_block_id(sid, id)
  local e, start = leases_of(sid), id .. '*'
  for member in pairs(e.badd) do
    if string.sub(member, 1, #start) == start then return release_block(e, member) end
  end
  for _, member in ipairs(redis.call('ZRANGE', e.bkey, 0, -1)) do
    if string.sub(member, 1, #start) == start then return release_block(e, member) end
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
    local e = leases_of(sid)
    if lease_count(e) >= maxc then release_pending(e) end
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
      res.spent = {e.tok, fmt_usd(e.usd)}  -- what the refusal message reports as used
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
  local spent = res.spent or {-1, '-1'}
  return {res.ok, res.reason, res.retry, res.reports, res.window, spent[1], spent[2]}
end

local function settle(op)
  local delta = op.act - op.tok
  for _, sc in ipairs(op.s) do
    local sid, tpm, maxc = sc[1], sc[4], sc[5]
    if tpm > 0 then
      local e = bucket_of(prefix .. sid .. ':tb', tpm, tpm / 60000)
      e.v, e.dirty = math.min(tpm, e.v - delta), true
    end
    if maxc > 0 then release(sid, op.id) end
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
    if sc[5] > 0 then
      release(sc[1], op.id)
      release_block_id(sc[1], op.id)
    end
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

-- Extend a lease, or with op.m > 0 the m leases of block op.id.
local function refresh(op)
  for _, sc in ipairs(op.s) do
    if sc[5] > 0 then
      local key, member = prefix .. sc[1] .. ':leases', op.id
      if op.m and op.m > 0 then key, member = prefix .. sc[1] .. ':blocks', op.id .. '*' .. op.m end
      if redis.call('ZADD', key, 'XX', 'CH', now + lease_ttl, member) == 1 then
        redis.call('PEXPIRE', key, 2 * lease_ttl)  -- the set outlives its longest lease
      end
    end
  end
  return {1}
end

-- A block of quota (see RedisLimitStore): up to op.k requests, each reserving op.tok tokens
-- and op.usd dollars, that one gateway admits on its own until now + op.d microseconds.
-- Granted only with k >= op.min, and k is cut so that the block takes at most what a rate
-- limit grants during d, and at most 1/op.share of what each limit has left (other gateways
-- are not starved; near a limit every request is checked here). GCRA stays exact: the block
-- is booked as k requests starting at max(TAT, now + d), which no admission within
-- [now, now + d] can precede, and it is granted only if its last request conforms even if
-- admitted at now.
local function grant(op)
  local k, share, plan, reports = op.k, op.share, {}, {}
  for _, sc in ipairs(op.s) do
    local sid, emission, burst, tpm, maxc = sc[1], sc[2], sc[3], sc[4], sc[5]
    local rep = {sid, -1, -1, -1, -1, -1, -1}
    table.insert(reports, rep)
    if emission > 0 then
      local e = tat_of(prefix .. sid .. ':tat')
      local base = math.max(e.v, now_us)
      local start = math.max(e.v, now_us + op.d)
      local room = (burst * emission - (base - now_us)) / share - (start - base)
      k = math.min(k, math.floor(room / emission), math.floor(op.d / emission))
      table.insert(plan, {'tat', e, start, emission, burst, rep, sc[6]})
    end
    if tpm > 0 then
      local e = bucket_of(prefix .. sid .. ':tb', tpm, tpm / 60000)
      if op.tok > 0 then  -- at most what refills during the block, and 1/share of the level
        k = math.min(k, math.floor(tpm * op.d / 6e7 / op.tok), math.floor(e.v / share / op.tok))
      end
      table.insert(plan, {'tb', e, tpm, rep})
    end
    if maxc > 0 then
      local e = leases_of(sid)
      if maxc - lease_count(e) < k * share then release_pending(e) end
      k = math.min(k, math.floor((maxc - e.n) / share))
      table.insert(plan, {'ls', e})
    end
  end
  local budget, window = nil, -1
  if op.b[4] > 0 then
    local b = op.b
    window = math.floor(now / b[4])
    local key = budget_key(b, window)
    budget = budget_of(key, (window + 2) * b[4])
    local function fit(slack_tok, slack_usd)
      local n = k
      if b[2] >= 0 and op.tok > 0 then
        n = math.min(n, math.floor((b[2] - budget.tok - slack_tok) / share / op.tok))
      end
      if b[3] >= 0 and op.usd > 0 then
        n = math.min(n, math.floor((b[3] - budget.usd - slack_usd) / share / op.usd))
      end
      return n
    end
    local n = fit(budget.up_tok, budget.up_usd)
    if n < k then
      settle_pending(key, budget)
      n = fit(0, 0)
    end
    k = n
  end
  if k < op.min then return {0} end
  for _, p in ipairs(plan) do
    local e = p[2]
    if p[1] == 'tat' then
      local start, emission, burst, rep = p[3], p[4], p[5], p[6]
      e.v, e.dirty = start + k * emission, true
      rep[2] = p[7]
      rep[3] = math.floor((burst * emission - (e.v - now_us)) / emission)
      rep[4] = (e.v - now_us) / 1000
    elseif p[1] == 'tb' then
      local tpm, rep = p[3], p[4]
      e.v, e.dirty = e.v - k * op.tok, true
      rep[5], rep[6], rep[7] = tpm, math.max(0, math.floor(e.v)), (tpm - e.v) / e.rate
    else
      e.badd[op.id .. '*' .. k] = now + lease_ttl
      e.n = e.n + k
    end
  end
  if budget then
    charge(budget, k * op.tok, k * op.usd)
    budget.res['r:' .. op.id] = (k * op.tok) .. ' ' .. fmt_usd(k * op.usd)
  end
  return {k, reports, window}
end

-- Give back (part of) a block: op.tok tokens and op.usd dollars return to the token buckets
-- (unless op.tb == 0) and the budget (negative amounts charge); with op.fin == 1 the block
-- ends: its concurrency slots are released and its budget reservation is closed, so giving
-- back twice refunds the budget once.
local function give_back(op)
  for _, sc in ipairs(op.s) do
    local sid, tpm, maxc = sc[1], sc[4], sc[5]
    if tpm > 0 and op.tb ~= 0 then
      local e = bucket_of(prefix .. sid .. ':tb', tpm, tpm / 60000)
      e.v, e.dirty = math.min(tpm, e.v + op.tok), true
    end
    if maxc > 0 and op.fin == 1 then release_block(leases_of(sid), op.id .. '*' .. op.m) end
  end
  if op.b[4] > 0 and op.w >= 0 then
    local key = budget_key(op.b, op.w)
    local e = budget_of(key, (op.w + 2) * op.b[4])
    local field = 'r:' .. op.id
    local held = e.res[field]
    if not held and not e.gone[field] then held = redis.call('HEXISTS', key, field) == 1 end
    if held then
      charge(e, -op.tok, -op.usd)
      if op.fin == 1 then
        if e.res[field] then
          e.res[field] = nil
        else
          table.insert(e.del, field)
          e.gone[field] = true
        end
      end
    end
  end
  return {1}
end

-- The heartbeat of gateway instance op.id: alive until now + op.ttl ms (op.ttl 0: leaving).
-- Answers how many instances are alive.
local function heartbeat(op)
  local key = prefix .. 'instances'
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if op.ttl > 0 then
    redis.call('ZADD', key, now + op.ttl, op.id)
    redis.call('PEXPIRE', key, op.ttl)
  else
    redis.call('ZREM', key, op.id)
  end
  return {redis.call('ZCARD', key)}
end

local out = {}
for i, op in ipairs(ops) do
  if op.t == 'a' then out[i] = acquire(op)
  elseif op.t == 'h' then out[i] = heartbeat(op)
  elseif op.t == 's' then out[i] = settle(op)
  elseif op.t == 'c' then out[i] = cancel(op)
  elseif op.t == 'g' then out[i] = grant(op)
  elseif op.t == 'x' then out[i] = give_back(op)
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
for _, e in pairs(leases) do
  release_pending(e)
  for key, added in pairs({[e.key] = e.add, [e.bkey] = e.badd}) do
    local args = {}
    for id, expiry in pairs(added) do
      table.insert(args, expiry)
      table.insert(args, id)
    end
    if #args > 0 then
      redis.call('ZADD', key, unpack(args))
      redis.call('PEXPIRE', key, 2 * lease_ttl)
    end
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


def grant_op(demand: Demand, block_id: str, size: int, block_us: int) -> dict[str, Any]:
    """The script op asking for a block of up to ``size`` requests of ``demand``, usable for
    ``block_us`` microseconds (see ``RedisLimitStore``)."""
    return {"t": "g", "id": block_id, "s": _scopes_arg(demand), "b": _budget_arg(demand),
            "k": size, "tok": demand.tokens, "usd": demand.usd, "d": block_us, "min": MIN_BLOCK,
            "share": BLOCK_SHARE}


def _opt_int(value: float) -> int | None:
    return None if value < 0 else int(value)


def _opt_s(value_ms: float) -> float | None:
    return None if value_ms < 0 else value_ms / 1000.0


def _verdict(raw: list[Any]) -> Verdict:
    """A ``Verdict`` from the script's ``[ok, reason, retry_ms, reports, window, spent_tokens,
    spent_usd]`` (a retry of -1 means never within the window, -2 the concurrency hint; a
    spent of -1: the budget did not refuse)."""
    ok, reason, retry_ms, reports, window, spent_tokens, spent_usd = raw
    verdict = Verdict(bool(ok), reason or None, None, [], None if window < 0 else int(window))
    if int(spent_tokens) >= 0:
        verdict.budget_spent = (int(spent_tokens), float(spent_usd))
    if not ok:
        verdict.retry_after_s = (None if retry_ms == -1 else
                                 CONCURRENCY_RETRY_S if retry_ms == -2 else retry_ms / 1000.0)
    for rep in reports if isinstance(reports, list) else []:  # cjson encodes [] as {}
        verdict.reports.append(ScopeReport(rep[0], _opt_int(rep[1]), _opt_int(rep[2]), _opt_s(rep[3]),
                                           _opt_int(rep[4]), _opt_int(rep[5]), _opt_s(rep[6])))
    return verdict


Shape = tuple[tuple[Scope, ...], Budget | None]


@dataclass(slots=True, eq=False)
class _Block:
    """A block of quota granted by Redis: requests of one shape (the same scopes and budget)
    that this process admits without asking Redis, until ``expires_at`` (loop time).

    ``tokens_left``/``usd_left`` are what is left of the block's reservation; ``back_*`` is
    what settled requests did not use (negative: used more), not yet given back; ``slots``
    is the number of concurrency lease ids the block holds in each ``max_concurrent`` scope.
    """

    block_id: str
    shape: Shape
    scopes_arg: list[list[Any]]
    budget_arg: list[Any]
    size: int
    expires_at: float
    requests_left: int
    tokens_left: int
    usd_left: float
    slots: int
    window: int | None
    reports: list[ScopeReport]
    started_at: float = 0.0
    in_flight: int = 0
    back_tokens: int = 0
    back_usd: float = 0.0
    closed: bool = False


class RedisLimitStore:
    """``LimitStore`` on Redis through redis-py's asyncio client.

    **Blocks of quota.** A shape of demand (one key and model) that arrives at least
    ``MIN_BLOCK`` times within ``block_ttl`` is no longer checked in Redis request by request:
    the store asks for a block of up to ``block_max_requests`` requests (starting at
    ``MIN_BLOCK``, then sized to last half a ``block_ttl`` at the rate the last one was used),
    each with the reservation of the request that asked for it, and admits from it here for
    ``block_ttl`` seconds. The next block is asked for when half of one is used and is used
    once this one is; a request that finds no block while one is on its way waits for it
    (one Redis round trip, as it would have waited for its own check). Redis grants a block
    only where it is no more than an RPM or TPM limit grants during ``block_ttl`` and takes
    at most ``1/BLOCK_SHARE`` of what every limit of the shape has left, so near a limit
    every request is checked in Redis again, and no limit is ever exceeded:

    * RPM: the block is booked in GCRA as its requests arriving one emission interval apart
      from ``max(TAT, now + block_ttl)``, and granted only if the last of them conforms when
      admitted at ``now``, so the bound ``burst + rpm * D / 60`` holds exactly; requests of a
      block that are not used are not refunded.
    * TPM and budgets: the block reserves ``k`` reservations; what its requests do not use,
      and what it did not admit, is given back when the block ends (a request that used more
      than it reserved is charged at once).
    * ``max_concurrent``: the block holds ``k`` leases in every such scope until the last
      request it admitted has ended.

    A response admitted from a block carries ``x-ratelimit-*`` values from the block's grant,
    less what this process has used of it since (at most ``block_ttl`` old).

    Args:
        url: ``state.redis_url``.
        key_prefix: ``state.key_prefix``.
        timeout_s: ``state.redis_timeout``: a batch not answered in time fails with
            ``StoreUnavailable`` (the limiter then falls back); time this process's event
            loop was late does not count (``_reply``), up to ``max_wait_s`` in all.
        lease_ttl_s: ``limits.lease_ttl``.
        clock_us: ``None`` (the default): every batch reads Redis's own clock (``TIME``), one
            clock for every gateway. A function returning Unix time in integer microseconds:
            a fake clock, for tests.
        block_ttl_s: ``limits.block_ttl``: how long a block of quota admits requests; 0
            turns blocks off (every limited request is checked in Redis).
        block_max_requests: ``limits.block_max_requests``: the largest block.
        on_block_admission: called once per request admitted from a block (a metric).

    ``heartbeat()`` adds this instance (``instance_id``, random per store) to
    ``<prefix>instances`` for ``INSTANCE_TTL_S``, in the next batch (no round trip of its
    own when requests are flowing), and sets ``instances`` to the live count it answers;
    ``close()`` takes the instance out.
    """

    name = "redis"

    def __init__(self, url: str, key_prefix: str = "shepherd:", timeout_s: float = 0.05,
                 lease_ttl_s: float = 60.0, clock_us: Callable[[], int] | None = None,
                 block_ttl_s: float = 0.0, block_max_requests: int = 256,
                 on_block_admission: Callable[[], None] | None = None) -> None:
        self.redis = redis_asyncio.Redis.from_url(
            url, socket_connect_timeout=max(timeout_s, 0.5), socket_timeout=max(timeout_s * 4, 1.0),
            health_check_interval=0, retry_on_timeout=False)
        self.script = self.redis.register_script(LUA)
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.max_wait_s = max(timeout_s * 4, 1.0)  # the socket timeout above
        self.loop_lag_s = 0.0  # waiting time not counted against Redis: the loop was late
        self.lease_ttl_ms = int(lease_ttl_s * 1000)
        self.clock_us = clock_us
        self.instance_id = f"gw_{random.getrandbits(64):016x}"
        self.instances = 1  # live instances sharing Redis, as last seen (at least 1)
        self._pending: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._orphans: list[dict[str, Any]] = []  # acquires to cancel once Redis answers again
        self.block_ttl_s = block_ttl_s
        self.block_max_requests = max(MIN_BLOCK, block_max_requests)
        self.on_block_admission = on_block_admission or (lambda: None)
        self._blocks: dict[Shape, _Block] = {}       # the block each shape admits from now
        self._spares: dict[Shape, _Block] = {}       # the block that follows it
        self._granting: dict[Shape, asyncio.Future[None]] = {}  # set when a block request ends
        self._block_size: dict[Shape, int] = {}      # the size to ask for next
        self._no_block_until: dict[Shape, float] = {}
        self._leased_from: dict[str, _Block] = {}    # lease id -> the block that admitted it
        self._arrivals: dict[Shape, tuple[float, int]] = {}  # requests checked in Redis lately

    def __repr__(self) -> str:
        return (f"<RedisLimitStore [pending: {len(self._pending)}, batches in flight: "
                f"{len(self._inflight)} | instances: {self.instances}]>")

    async def heartbeat(self) -> None:
        """Mark this instance alive for ``INSTANCE_TTL_S`` and read how many are.

        Raises:
            StoreUnavailable: Redis did not answer; ``instances`` keeps its last value.
        """
        op = {"t": "h", "id": self.instance_id, "ttl": round(INSTANCE_TTL_S * 1000)}
        self.instances = max(1, int((await self._submit(op))[0]))

    async def acquire(self, demand: Demand, lease_id: str) -> Verdict:
        if self.block_ttl_s > 0:
            verdict = self._acquire_from_block(demand, lease_id)
            granting = self._granting.get((demand.scopes, demand.budget))
            if verdict is None and granting is not None:  # a block is on its way: wait for it
                await asyncio.shield(granting)
                verdict = self._acquire_from_block(demand, lease_id)
            if verdict is not None:
                return verdict
        op = {"t": "a", "id": lease_id, "s": _scopes_arg(demand), "tok": demand.tokens,
              "usd": demand.usd, "b": _budget_arg(demand)}
        return _verdict(await self._submit(op))

    async def settle(self, demand: Demand, lease_id: str, budget_window: int | None,
                     actual_tokens: int, actual_usd: float) -> None:
        block = self._leased_from.pop(lease_id, None)
        if block is not None:
            self._settle_in_block(block, demand, actual_tokens, actual_usd)
            return
        await self._submit({"t": "s", "id": lease_id, "s": _scopes_arg(demand), "tok": demand.tokens,
                            "act": actual_tokens, "usd": demand.usd, "ausd": actual_usd,
                            "b": _budget_arg(demand), "w": -1 if budget_window is None else budget_window})

    async def refresh(self, leases: Iterable[tuple[Demand, str]]) -> None:
        ops: list[dict[str, Any]] = []
        blocks: dict[str, _Block] = {}
        for demand, lease_id in leases:
            block = self._leased_from.get(lease_id)
            if block is None:
                ops.append({"t": "r", "id": lease_id, "s": _scopes_arg(demand)})
            elif block.slots:
                blocks[block.block_id] = block
        ops.extend({"t": "r", "id": b.block_id, "s": b.scopes_arg, "m": b.slots}
                   for b in blocks.values())
        await asyncio.gather(*(self._submit(op) for op in ops))

    # --- blocks of quota ---------------------------------------------------------------------

    def _acquire_from_block(self, demand: Demand, lease_id: str) -> Verdict | None:
        """Admit from this shape's block if it can take ``demand``; ``None``: ask Redis
        (a new block is requested on the side)."""
        shape = (demand.scopes, demand.budget)
        now = asyncio.get_running_loop().time()
        block = self._blocks.get(shape) or self._next_block(shape, now)
        while block is not None:
            if (now < block.expires_at and block.requests_left > 0
                    and block.tokens_left >= demand.tokens and block.usd_left >= demand.usd - 1e-12):
                block.requests_left -= 1
                block.tokens_left -= demand.tokens
                block.usd_left -= demand.usd
                block.in_flight += 1
                self._leased_from[lease_id] = block
                if block.requests_left * 2 <= block.size and shape not in self._spares:
                    self._request_block(shape, demand, now)  # the next one, in time
                self.on_block_admission()
                return self._block_verdict(block)
            if now >= block.expires_at or block.requests_left == 0:
                self._close_block(block, now)
            if self._blocks.get(shape) is block:
                break  # it cannot take this demand, but may take smaller ones
            block = self._next_block(shape, now)
        start, seen = self._arrivals.get(shape, (now, 0))
        if now - start > self.block_ttl_s:
            start, seen = now, 0
        self._arrivals[shape] = (start, seen + 1)
        if seen + 1 >= MIN_BLOCK:  # busy enough for a block: MIN_BLOCK within a block_ttl
            self._request_block(shape, demand, now)
        return None

    def _next_block(self, shape: Shape, now: float) -> _Block | None:
        """Make the spare (the block asked for in time) current, if there is one."""
        block = self._spares.pop(shape, None)
        if block is not None:
            block.started_at = now
            self._blocks[shape] = block
        return block

    @staticmethod
    def _block_verdict(block: _Block) -> Verdict:
        reports = [ScopeReport(
            r.scope_id, r.limit_requests,
            None if r.remaining_requests is None else r.remaining_requests + block.requests_left,
            r.reset_requests_s, r.limit_tokens,
            None if r.remaining_tokens is None else r.remaining_tokens + block.tokens_left,
            r.reset_tokens_s) for r in block.reports]
        return Verdict(True, None, None, reports, block.window)

    def _request_block(self, shape: Shape, demand: Demand, now: float) -> None:
        if shape in self._granting or now < self._no_block_until.get(shape, 0.0):
            return
        if not demand.scopes and demand.budget is None:
            return
        op = grant_op(demand, f"blk_{random.getrandbits(64):016x}",
                      self._block_size.get(shape, MIN_BLOCK), round(self.block_ttl_s * 1e6))
        self._granting[shape] = asyncio.get_running_loop().create_future()
        self._submit(op).add_done_callback(
            functools.partial(self._on_grant, shape, op, now + self.block_ttl_s))

    def _on_grant(self, shape: Shape, op: dict[str, Any], expires_at: float,
                  future: asyncio.Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        granting = self._granting.pop(shape, None)
        if granting is not None:
            granting.set_result(None)  # waiters resume after this callback: the block is in place
        if future.cancelled() or future.exception() is not None:
            self._no_block_until[shape] = loop.time() + self.block_ttl_s
            return  # a grant that may have run is cancelled with the next batch
        raw = future.result()
        size = int(raw[0])
        if size == 0:  # too close to a limit: check each request in Redis for a while
            self._no_block_until[shape] = loop.time() + self.block_ttl_s
            self._block_size[shape] = MIN_BLOCK
            return
        verdict = _verdict([1, "", 0, raw[1], raw[2], -1, "-1"])
        slots = size if any(sc[4] for sc in op["s"]) else 0
        block = _Block(op["id"], shape, op["s"], op["b"], size, expires_at, size, size * op["tok"],
                       size * op["usd"], slots, verdict.budget_window, verdict.reports)
        now = loop.time()
        block.started_at = now
        current = self._blocks.get(shape)
        if current is None:
            self._blocks[shape] = block
        else:  # the current block is still in use: this one follows it
            spare = self._spares.get(shape)
            if spare is not None:
                self._close_block(spare, now)
            self._spares[shape] = block
        if now >= expires_at:
            self._close_block(block, now)
        else:
            loop.call_at(expires_at, self._expire_block, block)

    def _expire_block(self, block: _Block) -> None:
        self._close_block(block, asyncio.get_running_loop().time())

    def _close_block(self, block: _Block, now: float) -> None:
        """Admit no more from ``block``; give it back once its last request has ended.

        The next block asked for is sized to last half a ``block_ttl`` at the rate this one
        was used, so blocks are used up rather than left to expire (requests of a block that
        expires are lost to the RPM limit).
        """
        if block.closed:
            return
        block.closed = True
        if self._blocks.get(block.shape) is block:
            del self._blocks[block.shape]
        if self._spares.get(block.shape) is block:
            del self._spares[block.shape]
        used = block.size - block.requests_left
        rate_per_s = used / max(now - block.started_at, 0.001)
        self._block_size[block.shape] = min(self.block_max_requests,
                                            max(MIN_BLOCK, math.ceil(rate_per_s * self.block_ttl_s / 2)))
        if block.in_flight == 0:
            self._give_back(block, final=True)

    def _settle_in_block(self, block: _Block, demand: Demand, actual_tokens: int,
                         actual_usd: float) -> None:
        block.in_flight -= 1
        block.back_tokens += demand.tokens - actual_tokens
        block.back_usd += demand.usd - actual_usd
        if block.closed and block.in_flight == 0:
            self._give_back(block, final=True)
        elif block.back_tokens < 0 or block.back_usd < -1e-12:  # a debt is charged at once
            self._give_back(block, final=False)

    def _give_back(self, block: _Block, final: bool) -> None:
        if not (block.budget_arg[3] or (final and block.slots) or any(sc[3] for sc in block.scopes_arg)):
            return  # requests only: unused GCRA requests are not refunded
        tokens, usd = block.back_tokens, block.back_usd
        block.back_tokens, block.back_usd = 0, 0.0
        if final:
            tokens, usd = tokens + block.tokens_left, usd + block.usd_left
            block.tokens_left, block.usd_left = 0, 0.0
        op = {"t": "x", "id": block.block_id, "s": block.scopes_arg, "b": block.budget_arg,
              "w": -1 if block.window is None else block.window, "tok": tokens, "usd": usd,
              "m": block.slots if final else 0, "fin": int(final), "tb": 1}
        self._submit(op).add_done_callback(_consume)

    async def close(self) -> None:
        now = asyncio.get_running_loop().time()
        for block in [*self._blocks.values(), *self._spares.values()]:
            self._close_block(block, now)
        self._submit({"t": "h", "id": self.instance_id, "ttl": 0}).add_done_callback(_consume)
        await asyncio.sleep(0)  # let the give-backs and the goodbye be sent
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
            args: list[Any] = [self.key_prefix, self.lease_ttl_ms,
                               orjson.dumps([op for op, _ in batch])]
            if self.clock_us is not None:
                args.append(self.clock_us())
            raw = await self._reply(self.script(args=args))
            results = orjson.loads(raw)
        except (RedisError, OSError, TimeoutError, orjson.JSONDecodeError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(f"{type(exc).__name__}: {exc}"))
            # The script may still run once Redis is free: undo its acquires (and retry
            # undos that failed too) ahead of the next batch.
            for op, _ in batch:
                if op["t"] in ("a", "c", "g"):
                    self._orphans.append({**op, "t": "c"})
                elif op["t"] == "x" and op["fin"]:  # again, but the token buckets only once
                    self._orphans.append({**op, "tb": 0})
            del self._orphans[:-MAX_ORPHANS]
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _reply(self, call: Coroutine[Any, Any, Any]) -> Any:
        """Await Redis's reply to ``call``; ``TimeoutError`` if Redis, not this process, is slow.

        The rule: Redis gets ``timeout_s`` of this event loop's attention, not of wall time.
        The wait is cut into ticks of ``timeout_s / WAIT_TICKS``; a tick counts its length
        less how late the loop woke for it (never below 0): a loop busy with other callbacks,
        or a process the OS did not schedule, could not have read a reply sitting in the
        socket meanwhile, so that time does not count against Redis. The call fails once
        the counted time reaches ``timeout_s`` with no reply read by one more loop iteration
        (a reply read in the same iteration as the last tick wins), or once ``max_wait_s``
        of wall time has passed since sending (redis-py's own socket timeout), whichever
        comes first. On a loop that keeps time, that is ``timeout_s`` after sending.

        Cancelling is safe: the call is cancelled with it (as after a timeout, the script may
        still have run; ``_run`` then cancels its acquires).
        """
        loop = asyncio.get_running_loop()
        task = loop.create_task(call)
        tick_s = self.timeout_s / WAIT_TICKS
        sent = loop.time()
        counted_s = 0.0
        try:
            while True:
                due = loop.time() + tick_s
                await asyncio.wait((task,), timeout=tick_s)
                if task.done():
                    return task.result()
                now = loop.time()
                lag = max(0.0, now - due)
                counted_s += max(0.0, tick_s - lag)
                self.loop_lag_s += min(lag, tick_s)
                if counted_s >= self.timeout_s - 1e-9 or now - sent >= self.max_wait_s:
                    await asyncio.sleep(0)  # one more iteration: a reply read with the last tick
                    if task.done():
                        return task.result()
                    raise TimeoutError(f"no reply from Redis in {now - sent:.3f}s "
                                       f"({counted_s:.3f}s with the event loop on time)")
        finally:
            if not task.done():
                task.cancel()
