-- reader_touch.lua: record that readers on this instance are attached to a stream, so the
-- producing instance does not cancel it at its detach timeout (reader_count.lua). Each
-- instance calls it for its attached readers at least every second.
--
-- KEYS[1]  readers          the sorted set <prefix>{<stream_id>}:readers (member: reader
--                           id, score: when its presence expires, Redis's clock, ms)
-- ARGV[1]  presence_ttl_ms  how long this record counts without being renewed
-- ARGV[2..] reader_ids      the readers to record
--
-- Contract: every reader id is scored now + presence_ttl_ms, expired members are removed and
-- the set expires presence_ttl_ms after the last touch. Reply: the number of readers
-- present after the call.

local readers = KEYS[1]
local presence_ttl_ms = tonumber(ARGV[1])
local FIRST_READER_ARG = 2

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
for i = FIRST_READER_ARG, #ARGV do
  redis.call('ZADD', readers, now_ms + presence_ttl_ms, ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', readers, '-inf', now_ms)
redis.call('PEXPIRE', readers, presence_ttl_ms)
return redis.call('ZCARD', readers)
