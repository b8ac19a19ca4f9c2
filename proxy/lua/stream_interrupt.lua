-- stream_interrupt.lua: end a stream whose producer stopped beating (its instance died or
-- stalls), so that every reader sees the same ending. A reader on any instance calls it when
-- its blocking read found nothing new for a while.
--
-- KEYS[1]  events          the Redis Stream <prefix>{<stream_id>}:events
-- KEYS[2]  meta            the hash <prefix>{<stream_id>}:meta
-- ARGV[1]  stale_after_ms  heartbeat age (Redis's clock) beyond which the producer is
--                          taken for dead
-- ARGV[2]  maxlen          entries the stream keeps at most (exact XADD MAXLEN)
-- ARGV[3]  retention_ms    the TTL of both keys once the stream is ended here
-- ARGV[4]  error_frame     the SSE error event that ends the stream (stream_interrupted)
--
-- Contract: atomically, and only if the stream is still "running" and its heartbeat is
-- older than stale_after_ms: append error_frame at seq last_seq + 1, set state "failed",
-- bump the epoch (so the producer's later appends are refused: it is fenced) and set both
-- TTLs to retention_ms. Reply {outcome, state, last_seq}:
--   outcome   "interrupted" (this call ended the stream), "alive" (the heartbeat is fresh),
--             "ended" (already "done" or "failed") or "unknown" (no meta: expired)
--   state     the stream's state after the call ("" when unknown)
--   last_seq  the seq of its newest entry after the call

local events = KEYS[1]
local meta = KEYS[2]
local stale_after_ms = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[2])
local retention_ms = tonumber(ARGV[3])
local error_frame = ARGV[4]

local current = redis.call('HMGET', meta, 'state', 'heartbeat_ms', 'last_seq', 'first_seq')
local state = current[1]
if not state then
  return {'unknown', '', 0}
end
local last_seq = tonumber(current[3])
if state ~= 'running' then
  return {'ended', state, last_seq}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if now_ms - tonumber(current[2]) <= stale_after_ms then
  return {'alive', state, last_seq}
end

local seq = last_seq + 1
redis.call('XADD', events, 'MAXLEN', maxlen, string.format('%d-0', seq), 'f', error_frame)
redis.call('HSET', meta, 'state', 'failed', 'last_seq', seq,
           'first_seq', math.max(tonumber(current[4]), seq - maxlen + 1), 'interrupted_ms', now_ms)
redis.call('HINCRBY', meta, 'epoch', 1)
redis.call('PEXPIRE', meta, retention_ms)
redis.call('PEXPIRE', events, retention_ms)
return {'interrupted', 'failed', seq}
