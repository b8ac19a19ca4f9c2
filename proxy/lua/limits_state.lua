-- limits_state.lua: the start of the limits script. Reads the batch's arguments and the clock,
-- and holds the write-back cache every operation works on.
--
-- The limits script is these files run as one EVALSHA (proxy/limits_redis.py joins them, in
-- this order: limits_state, limits_acquire, limits_settle, limits_cancel, limits_refresh,
-- limits_block_grant, limits_block_return, limits_heartbeat, limits_batch), so that one round
-- trip carries a whole micro-batch of operations. Each operation file adds one function to
-- the table `operations`, keyed by the operation's name, and documents its argument object,
-- its reply object and the keys it touches; limits_batch.lua runs the batch and writes back.
-- (A Lua error's line number counts lines in that concatenation.)
--
-- KEYS     none: the keys are derived from the prefix and the scope ids in the operations
--          (one script call may touch any number of scopes; see limits_batch.lua)
-- ARGV[1]  prefix        state.key_prefix, e.g. "shepherd:"
-- ARGV[2]  lease_ttl_ms  limits.lease_ttl in milliseconds: how long a concurrency lease is
--                        held without a refresh
-- ARGV[3]  operations    a JSON array of operation objects, each {"op": "<name>", ...}
-- ARGV[4]  now_us        optional: a fixed clock in Unix microseconds, for tests; normally
--                        absent and the script reads Redis's own clock (TIME), one clock for
--                        every gateway whatever their skew
--
-- Shared argument objects (absent fields mean "no such limit"; JSON null is never sent):
--   scope   {"id": "<scope id>", "rpm": n, "emission_us": n, "burst": n, "tpm": n,
--            "max_concurrent": n}   emission_us and burst only with rpm (GCRA is on when
--            emission_us is present); rpm is what the reply reports as limit_requests
--   budget  {"key": "<key name>", "tokens": n, "usd": x, "period_ms": n}   spend caps of a
--            key per window of period_ms; an operation without a "budget" has none
--
-- Keys and their data (format 2: the token bucket moved from <scope>:tb {v, t} to
-- <scope>:bucket {level, updated_ms}; the other keys are as in format 1):
--   <prefix><scope>:tat       string  GCRA theoretical arrival time, Unix microseconds;
--                                     PX: until the TAT has passed, + 1 s
--   <prefix><scope>:bucket    hash    level (tokens left, 3 decimals), updated_ms (when);
--                                     PEXPIRE: until the bucket is full again, + 1 s
--   <prefix><scope>:leases    zset    one member per request lease, scored by expiry (ms);
--                                     PEXPIRE: 2 * lease_ttl_ms after the last lease added
--   <prefix><scope>:blocks    zset    one member "<block id>*<k>" per block of quota holding
--                                     k leases, scored by expiry (ms); PEXPIRE as :leases
--   <prefix>budget:<key>:<window>  hash  tok (tokens spent), usd (dollars spent, %.12f),
--                                     r:<lease or block id> = "<tokens> <usd>" reserved by an
--                                     acquire or a block not yet settled; PEXPIREAT: the end
--                                     of the next window (the fields keep their format-1
--                                     names: a budget window may last a month, and renaming
--                                     them would forget what was spent at an upgrade)
--   <prefix>instances         zset    live gateway instance ids scored by heartbeat expiry
--
-- Atomicity: the whole batch is one script, so every operation is atomic and the operations
-- of a batch apply in order, as if each were its own call. Nothing is written until
-- limits_batch.lua writes back after the last operation.

local prefix = ARGV[1]
local lease_ttl = tonumber(ARGV[2])
local batch = cjson.decode(ARGV[3])
local now_us = tonumber(ARGV[4])
if not now_us then
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])  -- exact: below 2^53
end
local now = math.floor(now_us / 1000)  -- milliseconds, for buckets, leases and budgets

-- The operations, by name: each file below adds its own.
local operations = {}

-- Write-back cache: the operations of a batch run in order against these tables; each key
-- is read at most once (on first use) and written once, after the last operation. Lease
-- releases and budget settles are applied lazily: only a check whose outcome they could
-- change (a scope at its max_concurrent, a budget that the pending settles could push over)
-- resolves them first.
local tats, buckets, leases, budgets = {}, {}, {}, {}

local function fmt(x) return string.format('%.3f', x) end
local function fmt_usd(x) return string.format('%.12f', x) end

-- The GCRA state of a scope: {tat = Unix us, dirty = written by this batch}.
local function tat_of(sid)
  local key = prefix .. sid .. ':tat'
  local e = tats[key]
  if not e then
    e = {tat = tonumber(redis.call('GET', key) or '0'), dirty = false}
    tats[key] = e
  end
  return e
end

-- The token bucket of a scope of tpm tokens per minute, refilled to now:
-- {level = tokens left, capacity, rate = tokens per ms, dirty}.
local function bucket_of(sid, tpm)
  local key = prefix .. sid .. ':bucket'
  local e = buckets[key]
  if not e then
    local rate = tpm / 60000
    local stored = redis.call('HMGET', key, 'level', 'updated_ms')
    local level = tpm
    if stored[1] then
      level = math.min(tpm, tonumber(stored[1]) + math.max(0, now - tonumber(stored[2])) * rate)
    end
    e = {level = level, capacity = tpm, rate = rate, dirty = false}
    buckets[key] = e
  end
  return e
end

-- The leases of a scope: one member per request in <scope>:leases, and one member
-- '<block id>*<k>' per block of quota holding k of them in <scope>:blocks; both scored by
-- expiry. count counts them all (nil: not read yet); added/block_added are added and
-- released/block_released released by this batch.
local function leases_of(sid)
  local e = leases[sid]
  if not e then
    e = {key = prefix .. sid .. ':leases', block_key = prefix .. sid .. ':blocks', count = nil,
         added = {}, released = {}, block_added = {}, block_released = {}}
    leases[sid] = e
  end
  return e
end

local function block_member(block_id, held) return block_id .. '*' .. held end
local function leases_in_block(member) return tonumber(string.match(member, '%*(%d+)$')) end

-- Apply pending releases; count counted them as still held.
local function release_pending(e)
  if #e.released > 0 then
    local removed = redis.call('ZREM', e.key, unpack(e.released))
    if e.count then e.count = e.count - removed end
    e.released = {}
  end
  for _, member in ipairs(e.block_released) do
    if redis.call('ZREM', e.block_key, member) == 1 and e.count then
      e.count = e.count - leases_in_block(member)
    end
  end
  e.block_released = {}
end

-- How many leases the scope holds (expired ones dropped; pending releases still counted).
local function lease_count(e)
  if not e.count then
    redis.call('ZREMRANGEBYSCORE', e.key, '-inf', now)
    redis.call('ZREMRANGEBYSCORE', e.block_key, '-inf', now)
    local n = redis.call('ZCARD', e.key)
    for _, member in ipairs(redis.call('ZRANGE', e.block_key, 0, -1)) do
      n = n + leases_in_block(member)
    end
    e.count = n
  end
  return e.count
end

local function release_lease(sid, lease_id)
  local e = leases_of(sid)
  if e.added[lease_id] then
    e.added[lease_id] = nil
    e.count = e.count - 1
  else
    table.insert(e.released, lease_id)
  end
end

local function release_block_member(e, member)
  if e.block_added[member] then
    e.block_added[member] = nil
    e.count = e.count - leases_in_block(member)
  else
    table.insert(e.block_released, member)
  end
end

-- Release the block '<block_id>*<k>' whatever its k (a cancelled grant may have been cut).
local function release_block(sid, block_id)
  local e, start = leases_of(sid), block_id .. '*'
  for member in pairs(e.block_added) do
    if string.sub(member, 1, #start) == start then return release_block_member(e, member) end
  end
  for _, member in ipairs(redis.call('ZRANGE', e.block_key, 0, -1)) do
    if string.sub(member, 1, #start) == start then return release_block_member(e, member) end
  end
end

-- The budget hash of window `window` of `budget` (a budget argument object), and its cache
-- entry: tokens/usd spent (as stored plus this batch's charges), charged_* (this batch's
-- increments), reserved (fields to write), deleted (fields to delete), gone (fields deleted
-- or settled by this batch), pending (settles not applied yet) and their upper bound
-- pending_tokens/pending_usd.
local function budget_of(budget, window)
  local key = prefix .. 'budget:' .. budget.key .. ':' .. window
  local e = budgets[key]
  if not e then
    local spent = redis.call('HMGET', key, 'tok', 'usd')
    e = {key = key, tokens = tonumber(spent[1] or '0'), usd = tonumber(spent[2] or '0'),
         charged_tokens = 0, charged_usd = 0, reserved = {}, deleted = {}, gone = {},
         pending = {}, pending_tokens = 0, pending_usd = 0,
         expire_at = (window + 2) * budget.period_ms}
    budgets[key] = e
  end
  return e
end

local function budget_window(budget) return math.floor(now / budget.period_ms) end

local function charge(e, tokens, usd)
  e.tokens, e.usd = e.tokens + tokens, e.usd + usd
  e.charged_tokens, e.charged_usd = e.charged_tokens + tokens, e.charged_usd + usd
end

local function reservation_field(id) return 'r:' .. id end

-- Forget reservation `field` (held in this batch's cache or in Redis).
local function drop_reservation(e, field)
  if e.reserved[field] then
    e.reserved[field] = nil
  else
    table.insert(e.deleted, field)
    e.gone[field] = true
  end
end

-- Apply pending settles: each only if its reservation is still held (an acquire cancelled
-- after a timeout has none left).
local function settle_pending(e)
  if #e.pending == 0 then return end
  local fields = {}
  for i, p in ipairs(e.pending) do fields[i] = reservation_field(p.id) end
  local held = redis.call('HMGET', e.key, unpack(fields))
  for i, p in ipairs(e.pending) do
    if held[i] and not e.gone[fields[i]] then
      charge(e, p.tokens, p.usd)
      table.insert(e.deleted, fields[i])
      e.gone[fields[i]] = true
    end
  end
  e.pending, e.pending_tokens, e.pending_usd = {}, 0, 0
end
