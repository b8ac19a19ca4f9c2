-- stream_append.lua: mirror one batch of a stream's frames into Redis and beat the producer's
-- heart; the first call also registers the stream. The producing instance's mirror calls it
-- once per batch (every frame its log gained since the previous call), with no frame as a
-- heartbeat, and last with the final state. Its first call comes with the log's first frames,
-- its end, or the first heartbeat, whichever comes first: a short stream costs one call.
--
-- KEYS[1]  events        the Redis Stream <prefix>{<stream_id>}:events (entry id "<seq>-0",
--                        one field "f": the SSE frame without its id: line)
-- KEYS[2]  meta          the hash <prefix>{<stream_id>}:meta
-- ARGV[1]  epoch         "0" on the producer's first call (register the stream), then the
--                        epoch that call replied
-- ARGV[2]  first_seq     the seq of the first frame below (the previous batch's last + 1)
-- ARGV[3]  maxlen        entries the stream keeps at most (exact XADD MAXLEN)
-- ARGV[4]  ttl_ms        the TTL of both keys after this call: the running TTL, or the
--                        retention when final_state is "done" or "failed"
-- ARGV[5]  final_state   "running" (more to come), "done" or "failed"
-- ARGV[6]  error_status  "" or the HTTP status of a stream that failed before its first frame
-- ARGV[7]  error_body    "" or that error's JSON body
-- ARGV[8]  owner         first call: the name of the virtual key that owns the stream;
--                        later calls: "" (ignored, like ARGV[9..11])
-- ARGV[9]  instance_id   first call: the gateway instance that produces it
-- ARGV[10] endpoint      first call: the endpoint label, e.g. "chat.completions"
-- ARGV[11] headers_json  first call: response headers every resumer replays (a JSON object)
-- ARGV[12] frame_sizes   the byte size of each frame below, in decimal, space-separated
--                        ("" when there is none)
-- ARGV[13] frames        the frames with seq first_seq, first_seq + 1, ..., concatenated
--                        (two arguments rather than one per frame: redis-py packs every
--                        argument in Python, a cost per argument on the producing instance)
--
-- Contract: a first call (epoch "0") finds no meta and creates it with the fields above,
-- epoch 1, first_seq 1, last_seq 0 and cancel_requested 0, then appends as a later call does
-- with epoch 1; if the meta already exists nothing changes and the status is "exists" (stream
-- ids are random: this only happens when one log is mirrored twice). A later call appends only
-- while the stream is "running" under its epoch. Appending means: the frames are added, and
-- heartbeat_ms set to Redis's TIME (one clock for every instance), state set to final_state
-- (with error_status and error_body if given) and both TTLs set to ttl_ms. Frames whose seq
-- the stream already has are skipped, so a retried call appends nothing twice. Reply
-- {status, cancel_requested, last_seq, epoch}:
--   status            "ok"; "exists" (see above); "fenced" when the stream was ended by
--                     someone else (an interrupt by a reader that found the heartbeat stale)
--                     or its epoch moved on: the producer must stop; "unknown" when the meta
--                     is gone (expired, or Redis lost its data); "gap" when first_seq >
--                     last_seq + 1
--   cancel_requested  1 once stream_cancel.lua asked the producer to stop, else 0
--   last_seq          the seq of the newest entry after this call
--   epoch             the epoch to present to the next call (0 unless status is "ok")

local events = KEYS[1]
local meta = KEYS[2]
local epoch = ARGV[1]
local first_seq = tonumber(ARGV[2])
local maxlen = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])
local final_state = ARGV[5]
local error_status = ARGV[6]
local error_body = ARGV[7]
local frame_sizes = ARGV[12]
local frames = ARGV[13]

local NEW_STREAM = '0'
local FIRST_EPOCH = '1'

-- fields: what the final HSET writes besides state, last_seq, first_seq and heartbeat_ms
local fields = {}
local last_seq, stored_first_seq, cancel_requested
if epoch == NEW_STREAM then
  if redis.call('EXISTS', meta) == 1 then
    return {'exists', 0, 0, 0}
  end
  epoch = FIRST_EPOCH
  last_seq, stored_first_seq, cancel_requested = 0, 1, 0
  fields = {'owner', ARGV[8], 'instance', ARGV[9], 'endpoint', ARGV[10], 'headers', ARGV[11],
            'epoch', epoch, 'cancel_requested', cancel_requested}
else
  local current = redis.call('HMGET', meta, 'state', 'epoch', 'last_seq', 'first_seq',
                             'cancel_requested')
  local state, stored_epoch = current[1], current[2]
  if not state then
    return {'unknown', 0, 0, 0}
  end
  last_seq = tonumber(current[3])
  stored_first_seq = tonumber(current[4])
  cancel_requested = tonumber(current[5])
  if state ~= 'running' or stored_epoch ~= epoch then
    return {'fenced', cancel_requested, last_seq, 0}
  end
end
if first_seq > last_seq + 1 then
  return {'gap', cancel_requested, last_seq, 0}
end

local seq, start = first_seq, 1
for size in string.gmatch(frame_sizes, '%d+') do
  local stop = start + tonumber(size)
  if seq > last_seq then
    redis.call('XADD', events, 'MAXLEN', maxlen, string.format('%d-0', seq), 'f',
               string.sub(frames, start, stop - 1))
    last_seq = seq
  end
  seq, start = seq + 1, stop
end

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local oldest_seq = math.max(stored_first_seq, last_seq - maxlen + 1)
if error_status ~= '' then
  table.insert(fields, 'error_status')
  table.insert(fields, error_status)
  table.insert(fields, 'error_body')
  table.insert(fields, error_body)
end
redis.call('HSET', meta, 'state', final_state, 'last_seq', last_seq, 'first_seq', oldest_seq,
           'heartbeat_ms', now_ms, unpack(fields))
redis.call('PEXPIRE', meta, ttl_ms)
redis.call('PEXPIRE', events, ttl_ms)  -- 0 (no-op) while the stream has no entry yet
return {'ok', cancel_requested, last_seq, tonumber(epoch)}
