-- limits_block_return.lua: operation "block_return", give back (part of) a block of quota
-- (see "block_grant"). Part of the limits script: see limits_state.lua for the batch, the
-- keys and the shared arguments.
--
-- Argument  {"op": "block_return", "id": "<block id>", "scopes": [scope...],
--            "budget": budget (optional), "window": n (the grant's budget window; absent:
--            none), "tokens": n, "usd": x, "final": true|false, "block_leases": k (the
--            grant's size; read only when final), "token_buckets": true|false}
--           tokens/usd come back (negative amounts charge: a request that used more than it
--           reserved); final ends the block.
-- Reply     {} (always)
-- Keys      per scope: <scope>:bucket (tpm, unless token_buckets is false: level += tokens,
--           at most full), <scope>:blocks (max_concurrent, final: "<id>*<k>" released);
--           budget:<key>:<window> (tok/usd -= tokens/usd while r:<id> is held; final deletes
--           r:<id>).
-- TTLs      set at write-back (limits_batch.lua).
-- Atomicity one step. Giving back twice refunds the budget once (the reservation is closed
--           by the first final return); the gateway retries a final return that failed with
--           token_buckets false, so the buckets are credited at most once too.

operations.block_return = function(op)
  for _, sc in ipairs(op.scopes) do
    if sc.tpm and op.token_buckets then
      local e = bucket_of(sc.id, sc.tpm)
      e.level, e.dirty = math.min(sc.tpm, e.level + op.tokens), true
    end
    if sc.max_concurrent and op.final then
      release_block_member(leases_of(sc.id), block_member(op.id, op.block_leases))
    end
  end
  if op.budget and op.window then
    local e = budget_of(op.budget, op.window)
    local field = reservation_field(op.id)
    local held = e.reserved[field]
    if not held and not e.gone[field] then held = redis.call('HEXISTS', e.key, field) == 1 end
    if held then
      charge(e, -op.tokens, -op.usd)
      if op.final then drop_reservation(e, field) end
    end
  end
  return {}
end
