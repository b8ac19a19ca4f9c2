-- stream_append.lua: mirror one batch of a stream's frames into Redis and beat the producer's
-- heart. The producing instance's mirror calls it once per batch (every frame its log gained
-- since the previous call), with no frame as a heartbeat, and last with the final state.
--
-- KEYS[1]  events        the Redis Stream <prefix>{<stream_id>}:events (entry id "<seq>-0",
--                        one field "f": the SSE frame without its id: line)
-- KEYS[2]  meta          the hash <prefix>{<stream_id>}:meta
-- ARGV[1]  epoch         the epoch stream_open.lua gave the producer
-- ARGV[2]  first_seq     the seq of the first frame below (the previous batch's last + 1)
-- ARGV[3]  maxlen        entries the stream keeps at most (exact XADD MAXLEN)
-- ARGV[4]  ttl_ms        the TTL of both keys after this call: the running TTL, or the
--                        retention when final_state is "done" or "failed"
-- ARGV[5]  final_state   "running" (more to come), "done" or "failed"
-- ARGV[6]  error_status  "" or the HTTP status of a stream that failed before its first frame
-- ARGV[7]  error_body    "" or that error's JSON body
-- ARGV[8..] frames       the frames with seq first_seq, first_seq + 1, ...
--
-- Contract: only while the stream is "running" under this epoch are the frames appended,
-- heartbeat_ms set to Redis's TIME, state set to final_state and both TTLs set to ttl_ms.
-- Frames whose seq the stream already has are skipped, so a retried call appends nothing
-- twice. Reply {status, cancel_requested, last_seq}:
--   status            "ok"; "fenced" when the stream was ended by someone else (an
--                     interrupt by a reader that found the heartbeat stale) or its epoch moved
--                     on: the producer must stop; "unknown" when the meta is gone (expired,
--                     or Redis lost its data); "gap" when first_seq > last_seq + 1
--   cancel_requested  1 once stream_cancel.lua asked the producer to stop, else 0
--   last_seq          the seq of the newest entry after this call

local events = KEYS[1]
local meta = KEYS[2]
local epoch = ARGV[1]
local first_seq = tonumber(ARGV[2])
local maxlen = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])
local final_state = ARGV[5]
local error_status = ARGV[6]
local error_body = ARGV[7]
local FIRST_FRAME_ARG = 8

local current = redis.call('HMGET', meta, 'state', 'epoch', 'last_seq', 'first_seq',
                           'cancel_requested')
local state, stored_epoch = current[1], current[2]
if not state then
  return {'unknown', 0, 0}
end
local last_seq = tonumber(current[3])
local stored_first_seq = tonumber(current[4])
local cancel_requested = tonumber(current[5])
if state ~= 'running' or stored_epoch ~= epoch then
  return {'fenced', cancel_requested, last_seq}
end
if first_seq > last_seq + 1 then
  return {'gap', cancel_requested, last_seq}
end

for i = FIRST_FRAME_ARG, #ARGV do
  local seq = first_seq + i - FIRST_FRAME_ARG
  if seq > last_seq then
    redis.call('XADD', events, 'MAXLEN', maxlen, string.format('%d-0', seq), 'f', ARGV[i])
    last_seq = seq
  end
end

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local oldest_seq = math.max(stored_first_seq, last_seq - maxlen + 1)
redis.call('HSET', meta, 'state', final_state, 'last_seq', last_seq, 'first_seq', oldest_seq,
           'heartbeat_ms', now_ms)
if error_status ~= '' then
  redis.call('HSET', meta, 'error_status', error_status, 'error_body', error_body)
end
redis.call('PEXPIRE', meta, ttl_ms)
redis.call('PEXPIRE', events, ttl_ms)  -- 0 (no-op) while the stream has no entry yet
return {'ok', cancel_requested, last_seq}
