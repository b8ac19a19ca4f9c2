-- limits_refresh.lua: operation "refresh", keep a long request's concurrency leases (or a
-- block's) alive. Part of the limits script: see limits_state.lua for the batch, the keys
-- and the shared arguments.
--
-- Argument  {"op": "refresh", "id": "<lease or block id>", "scopes": [scope...],
--            "block_leases": k (optional: refresh the block member "<id>*<k>" instead of
--            the request lease "<id>")}
-- Reply     {} (always)
-- Keys      per max_concurrent scope: <scope>:leases (or <scope>:blocks), ZADD XX: a lease
--           that already expired or was released is not brought back.
-- TTLs      the member's expiry becomes now + lease_ttl_ms; the set's PEXPIRE 2 * lease_ttl_ms.
-- Atomicity one step; written at once (not through the write-back cache: refreshes come
--           alone, every lease_ttl / 2).

operations.refresh = function(op)
  for _, sc in ipairs(op.scopes) do
    if sc.max_concurrent then
      local key, member = prefix .. sc.id .. ':leases', op.id
      if op.block_leases and op.block_leases > 0 then
        key, member = prefix .. sc.id .. ':blocks', block_member(op.id, op.block_leases)
      end
      if redis.call('ZADD', key, 'XX', 'CH', now + lease_ttl, member) == 1 then
        redis.call('PEXPIRE', key, 2 * lease_ttl)  -- the set outlives its longest lease
      end
    end
  end
  return {}
end
