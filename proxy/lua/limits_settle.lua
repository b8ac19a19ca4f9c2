-- limits_settle.lua: operation "settle", the end of a request admitted by "acquire" (part of
-- the limits script: see limits_state.lua for the batch, the keys and the shared arguments).
--
-- Argument  {"op": "settle", "id": "<lease id>", "scopes": [scope...], "tokens": n,
--            "usd": x, "actual_tokens": n, "actual_usd": x, "budget": budget (optional),
--            "window": n (the budget window the acquire charged; absent: none)}
--           tokens/usd: what the acquire reserved; actual_*: what the request used.
-- Reply     {} (always)
-- Keys      per scope: <scope>:bucket (tpm: level -= actual - reserved, at most full),
--           <scope>:leases (max_concurrent: the lease is released);
--           budget:<key>:<window> (tok/usd += actual - reserved and r:<id> deleted, only if
--           r:<id> is still held: a settle after a cancel changes nothing).
-- TTLs      set at write-back (limits_batch.lua).
-- Atomicity one step. The lease release and the budget settle are applied lazily (at
--           write-back, or earlier when a check of the same batch depends on them), which
--           no later operation can tell from applying them at once.

operations.settle = function(op)
  local delta = op.actual_tokens - op.tokens
  for _, sc in ipairs(op.scopes) do
    if sc.tpm then
      local e = bucket_of(sc.id, sc.tpm)
      e.level, e.dirty = math.min(sc.tpm, e.level - delta), true
    end
    if sc.max_concurrent then release_lease(sc.id, op.id) end
  end
  if op.budget and op.window then
    local e = budget_of(op.budget, op.window)
    local field = reservation_field(op.id)
    local delta_usd = op.actual_usd - op.usd
    if e.reserved[field] then
      e.reserved[field] = nil
      charge(e, delta, delta_usd)
    else
      table.insert(e.pending, {id = op.id, tokens = delta, usd = delta_usd})
      e.pending_tokens = e.pending_tokens + math.max(0, delta)
      e.pending_usd = e.pending_usd + math.max(0, delta_usd)
    end
  end
  return {}
end
