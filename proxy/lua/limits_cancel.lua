-- limits_cancel.lua: operation "cancel", undo an "acquire" or a "block_grant" whose reply
-- never reached the gateway (the call timed out, but the script may have run). Part of the
-- limits script: see limits_state.lua for the batch, the keys and the shared arguments.
--
-- Argument  {"op": "cancel", "id": "<lease or block id>", "scopes": [scope...],
--            "budget": budget (optional)}
--           (the gateway sends the lost operation's own object with "op" set to "cancel";
--           other fields are ignored)
-- Reply     {} (always)
-- Keys      per max_concurrent scope: <scope>:leases (member <id>) and <scope>:blocks
--           (member "<id>*<k>", whatever k) released; budget:<key>:<current window>: r:<id>
--           deleted and its reservation refunded from tok/usd, if still held.
-- TTLs      set at write-back (limits_batch.lua).
-- Atomicity one step; idempotent (a second cancel finds nothing to undo). The token bucket
--           is left alone: it refills within a minute. A cancel in a later budget window
--           than its acquire finds nothing there: that window's reservation stays charged.

operations.cancel = function(op)
  for _, sc in ipairs(op.scopes) do
    if sc.max_concurrent then
      release_lease(sc.id, op.id)
      release_block(sc.id, op.id)
    end
  end
  if op.budget then
    local e = budget_of(op.budget, budget_window(op.budget))
    settle_pending(e)
    local field = reservation_field(op.id)
    local held = e.reserved[field]
    if held then
      e.reserved[field] = nil
    elseif not e.gone[field] then
      held = redis.call('HGET', e.key, field)
      if held then
        table.insert(e.deleted, field)
        e.gone[field] = true
      end
    end
    if held then
      local tokens, usd = string.match(held, '^(%S+) (%S+)$')
      charge(e, -tonumber(tokens), -tonumber(usd))
    end
  end
  return {}
end
