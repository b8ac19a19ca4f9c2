-- stream_cancel.lua: ask a stream's producer, on whichever instance it runs, to stop. Its
-- mirror learns it from the reply of its next append or heartbeat (stream_append.lua).
--
-- KEYS[1]  meta  the hash <prefix>{<stream_id>}:meta
--
-- Contract: idempotent. When the meta exists: a running stream gets cancel_requested = 1
-- (a finished one is left as it is) and the reply is 1. When it does not (unknown or
-- expired): nothing is written and the reply is 0.

local meta = KEYS[1]

local state = redis.call('HGET', meta, 'state')
if not state then
  return 0
end
if state == 'running' then
  redis.call('HSET', meta, 'cancel_requested', 1)
end
return 1
