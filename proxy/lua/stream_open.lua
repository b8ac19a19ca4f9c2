-- stream_open.lua: register a new stream (the producing instance's mirror calls it once,
-- before its first batch).
--
-- KEYS[1]  meta            the hash <prefix>{<stream_id>}:meta
-- ARGV[1]  owner           the name of the virtual key that owns the stream
-- ARGV[2]  instance_id     the gateway instance that produces it
-- ARGV[3]  endpoint        the endpoint label, e.g. "chat.completions"
-- ARGV[4]  headers_json    response headers every resumer replays (a JSON object)
-- ARGV[5]  running_ttl_ms  TTL of the meta while the stream runs (appends refresh it)
--
-- Contract: if the meta already exists nothing changes and 0 is returned (stream ids are
-- random; this only happens when one log is mirrored twice). Otherwise the meta is created
-- with state "running", epoch 1, first_seq 1, last_seq 0, cancel_requested 0, heartbeat_ms =
-- Redis's TIME (one clock for every instance) and the fields above, with a TTL of
-- running_ttl_ms; the reply is the epoch the producer must present to stream_append.lua.

local meta = KEYS[1]
local owner = ARGV[1]
local instance_id = ARGV[2]
local endpoint = ARGV[3]
local headers_json = ARGV[4]
local running_ttl_ms = tonumber(ARGV[5])

local FIRST_EPOCH = 1

if redis.call('EXISTS', meta) == 1 then
  return 0
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', meta, 'owner', owner, 'instance', instance_id, 'endpoint', endpoint,
           'headers', headers_json, 'state', 'running', 'epoch', FIRST_EPOCH, 'first_seq', 1,
           'last_seq', 0, 'cancel_requested', 0, 'heartbeat_ms', now_ms)
redis.call('PEXPIRE', meta, running_ttl_ms)
return FIRST_EPOCH
