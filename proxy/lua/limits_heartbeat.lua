-- limits_heartbeat.lua: operation "heartbeat", a gateway instance saying it is alive (or
-- leaving). Part of the limits script: see limits_state.lua for the batch.
--
-- Argument  {"op": "heartbeat", "instance": "<instance id>", "ttl_ms": n (0: leaving)}
-- Reply     {"instances": n}: the instances alive now, this one included unless leaving
-- Keys      <prefix>instances (zset of instance ids by expiry, ms): expired ones removed,
--           this one added until now + ttl_ms (or removed).
-- TTLs      the set: PEXPIRE ttl_ms (it disappears when no instance beats any more).
-- Atomicity one step, written at once.

operations.heartbeat = function(op)
  local key = prefix .. 'instances'
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if op.ttl_ms > 0 then
    redis.call('ZADD', key, now + op.ttl_ms, op.instance)
    redis.call('PEXPIRE', key, op.ttl_ms)
  else
    redis.call('ZREM', key, op.instance)
  end
  return {instances = redis.call('ZCARD', key)}
end
