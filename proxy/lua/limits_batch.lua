-- limits_batch.lua: the end of the limits script. Runs the batch's operations in order and
-- writes the cache back (see limits_state.lua for the arguments and the keys).
--
-- Reply     a JSON array with one reply object per operation, in order (each operation
--           file documents its own).
-- Writes    each key the batch changed, once, with its TTL:
--             <scope>:tat     SET PX: until the TAT has passed, + 1 s
--             <scope>:bucket  HSET level, updated_ms; PEXPIRE: until full again, + 1 s
--             <scope>:leases, <scope>:blocks  pending releases (ZREM), new members (ZADD);
--                             PEXPIRE 2 * lease_ttl_ms when a member was added
--             budget:<key>:<window>  pending settles, HDEL/HSET reservations, HINCRBY tok,
--                             HINCRBYFLOAT usd; PEXPIREAT the end of the next window
-- Errors    an unknown operation name fails the whole batch before anything is written
--           (the gateway then treats every operation of it as unanswered).

for _, op in ipairs(batch) do
  if not operations[op.op] then error('limits: unknown operation ' .. tostring(op.op)) end
end

local replies = {}
for i, op in ipairs(batch) do replies[i] = operations[op.op](op) end

for key, e in pairs(tats) do
  if e.dirty then
    redis.call('SET', key, string.format('%.0f', e.tat), 'PX', math.ceil((e.tat - now_us) / 1000) + 1000)
  end
end
for key, e in pairs(buckets) do
  if e.dirty then
    redis.call('HSET', key, 'level', fmt(e.level), 'updated_ms', now)
    redis.call('PEXPIRE', key, math.ceil((e.capacity - e.level) / e.rate) + 1000)
  end
end
for _, e in pairs(leases) do
  release_pending(e)
  for key, added in pairs({[e.key] = e.added, [e.block_key] = e.block_added}) do
    local args = {}
    for member, expiry in pairs(added) do
      table.insert(args, expiry)
      table.insert(args, member)
    end
    if #args > 0 then
      redis.call('ZADD', key, unpack(args))
      redis.call('PEXPIRE', key, 2 * lease_ttl)
    end
  end
end
for key, e in pairs(budgets) do
  settle_pending(e)
  if #e.deleted > 0 then redis.call('HDEL', key, unpack(e.deleted)) end
  local args = {}
  for field, held in pairs(e.reserved) do
    table.insert(args, field)
    table.insert(args, held)
  end
  if #args > 0 then redis.call('HSET', key, unpack(args)) end
  if e.charged_tokens ~= 0 then redis.call('HINCRBY', key, 'tok', e.charged_tokens) end
  if e.charged_usd ~= 0 then redis.call('HINCRBYFLOAT', key, 'usd', fmt_usd(e.charged_usd)) end
  if #args > 0 or e.charged_tokens ~= 0 or e.charged_usd ~= 0 then
    redis.call('PEXPIREAT', key, e.expire_at)
  end
end
return cjson.encode(replies)
