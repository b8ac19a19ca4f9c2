-- reader_count.lua: how many readers on any instance are attached to a stream now (the
-- producing instance asks before it cancels a stream nobody reads locally).
--
-- KEYS[1]  readers  the sorted set <prefix>{<stream_id>}:readers written by reader_touch.lua
--
-- Contract: members whose presence expired (score <= Redis's TIME in ms) are removed; the
-- reply is the number left (0 when the set does not exist).

local readers = KEYS[1]

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', readers, '-inf', now_ms)
return redis.call('ZCARD', readers)
